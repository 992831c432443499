//! One writer per pin directory: an exclusive `flock` on the directory itself.
//!
//! Two agents on one pin directory would each adopt the maps and delete every
//! service the other programmed. `ferry run` and `ferry agent` hold the lock
//! for their whole life (the kernel drops it when the process dies, even on
//! SIGKILL); a second one exits naming the holder's pid, read from
//! `/proc/locks`. bpffs holds no regular files, so the lock is taken on the
//! directory's own descriptor.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The held lock; dropping it releases the directory.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
    pub path: PathBuf,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    #[error(
        "pin directory {path} is in use by another ferry (pid {holder}); stop it first \
         (two agents on one pin directory would delete each other's services)"
    )]
    Held { path: PathBuf, holder: String },
    #[error("cannot lock pin directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Creates `dir` if needed and locks it exclusively, without waiting.
pub fn lock(dir: &Path) -> Result<PinDirLock, PinLockError> {
    let io = |source| PinLockError::Io { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = File::open(dir).map_err(io)?;
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let meta = file.metadata().map_err(io)?;
            let holder = holder_pid(meta.dev(), meta.ino()).map_or("unknown".to_string(), |p| p.to_string());
            return Err(PinLockError::Held { path: dir.to_path_buf(), holder });
        }
        return Err(io(err));
    }
    Ok(PinDirLock { _dir: file, path: dir.to_path_buf() })
}

/// The pid holding a `flock` on the file `(dev, ino)`, from `/proc/locks`.
pub fn holder_pid(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&text, libc::major(dev), libc::minor(dev), ino)
}

/// Finds the holder in `/proc/locks` text: `1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<ino> 0 EOF`
/// (major and minor in hex, the inode in decimal).
fn holder_in(text: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        if fields.get(at + 1) == Some(&"->") {
            return None; // a waiter, not the holder
        }
        let pid: u32 = fields.get(at + 3)?.parse().ok()?;
        let mut id = fields.get(at + 4)?.split(':');
        let (ma, mi, i) = (id.next()?, id.next()?, id.next()?);
        let same = u32::from_str_radix(ma, 16).ok()? == major
            && u32::from_str_radix(mi, 16).ok()? == minor
            && i.parse::<u64>().ok()? == ino;
        same.then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks_text() {
        let text = "1: POSIX  ADVISORY  WRITE 77 00:1f:99 0 EOF\n2: FLOCK  ADVISORY  WRITE 4242 00:1f:99 0 EOF\n";
        assert_eq!(holder_in(text, 0, 0x1f, 99), Some(4242));
        assert_eq!(holder_in(text, 0, 0x1f, 98), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("ferry-pinlock-test-{}", std::process::id()));
        let first = lock(&dir).unwrap();
        // A second open file description conflicts even within one process.
        let err = lock(&dir).unwrap_err();
        let me = std::process::id().to_string();
        assert!(matches!(&err, PinLockError::Held { holder, .. } if *holder == me), "{err}");
        drop(first);
        drop(lock(&dir).unwrap());
        let _ = std::fs::remove_dir(&dir);
    }
}
