//! cgroup v2 directories for sandboxed processes: find the mount, create, join before exec, kill, remove.
//!
//! ferry's socket load balancer attaches to a cgroup, so tests put clients in a cgroup of their own and
//! attach there, never to the machine's root cgroup.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::SandboxError;

/// Sub-cgroups deeper than this are not removed; nothing ferry makes nests that deep.
const MAX_DEPTH: usize = 16;

/// The mount point of the cgroup2 file system, read from /proc/mounts.
///
/// On hybrid systems this is not `/sys/fs/cgroup` (on the development machine it is
/// `/sys/fs/cgroup/unified`), so it must never be hard-coded.
pub fn cgroup2_mount() -> Result<PathBuf, SandboxError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| SandboxError::Io {
        what: "reading the mount table".into(),
        path: "/proc/mounts".into(),
        source,
        hint: " (is /proc mounted?)",
    })?;
    parse_cgroup2_mount(&mounts).ok_or(SandboxError::NoCgroup2)
}

/// The first `cgroup2` mount point in a /proc/mounts text.
pub(crate) fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// /proc/mounts writes space, tab, newline and backslash as 3-digit octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn create(dir: &Path) -> Result<(), SandboxError> {
    fs::create_dir(dir).map_err(|source| SandboxError::Io {
        what: "creating cgroup".into(),
        path: dir.to_owned(),
        source,
        hint: " (are you root? if it already exists, an earlier run died: call sweep_stale())",
    })
}

/// Pids listed in `<cgroup>/cgroup.procs`.
pub fn cgroup_procs(cgroup: &Path) -> io::Result<Vec<u32>> {
    let text = fs::read_to_string(cgroup.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Makes the process started by `cmd` move itself into `cgroup` between fork and exec, so that every
/// socket it creates already belongs to the cgroup (cgroup socket hooks see it from the first syscall).
pub(crate) fn join_before_exec(cmd: &mut Command, cgroup: &Path) {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).expect("cgroup paths have no NUL");
    let hook = move || {
        // SAFETY: open/write/close are async-signal-safe and use data prepared before fork.
        let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // "0" means "the writing process" in cgroup.procs.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = io::Error::last_os_error();
        unsafe { libc::close(fd) };
        if written != 1 { Err(err) } else { Ok(()) }
    };
    // SAFETY: the hook is async-signal-safe (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Kills everything in the cgroup tree at `dir`, waits (bounded) for it to empty, and removes it.
/// A directory that no longer exists counts as removed.
pub(crate) fn remove(dir: &Path, timeout: Duration) -> Result<(), SandboxError> {
    remove_tree(dir, timeout, 0)
}

fn remove_tree(dir: &Path, timeout: Duration, depth: usize) -> Result<(), SandboxError> {
    let io_err = |what: &str, source: io::Error| SandboxError::Io {
        what: what.to_owned(),
        path: dir.to_owned(),
        source,
        hint: " (a process may be stuck in the kernel; check cgroup.procs)",
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing cgroup", e)),
    };
    if depth < MAX_DEPTH {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), timeout, depth + 1)?;
            }
        }
    }
    kill_all(dir);
    let deadline = Instant::now() + timeout;
    while cgroup_procs(dir).is_ok_and(|p| !p.is_empty()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing cgroup", e)),
    }
}

/// `cgroup.kill` (Linux 5.14+) kills the whole cgroup atomically, including processes forked after we
/// listed it; on older kernels fall back to signalling each listed pid.
fn kill_all(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for pid in cgroup_procs(dir).unwrap_or_default() {
        // SAFETY: sending a signal has no memory-safety implications.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_systems() {
        let mounts = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
";
        assert_eq!(parse_cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn unescapes_mount_points() {
        let mounts = "none /run/my\\040cgroup cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(mounts), Some(PathBuf::from("/run/my cgroup")));
        assert_eq!(parse_cgroup2_mount("cgroup /x cgroup rw 0 0\n"), None);
    }
}
