//! Named network namespaces (`/run/netns/NAME`): create, delete, enter, and find what still runs inside.
//!
//! Processes enter a namespace with `setns(2)` in a `pre_exec` hook rather than `ip netns exec`, because
//! the latter remounts /sys in a private mount namespace and hides /sys/fs/bpf and the cgroup2 mount.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use crate::SandboxError;
use crate::exec;

/// Where iproute2 keeps named network namespaces (bind mounts of nsfs inodes).
pub(crate) const NETNS_DIR: &str = "/run/netns";

const ROOT_HINT: &str = " (are you root, with iproute2 installed?)";

pub(crate) fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub(crate) fn ensure_dir() -> Result<(), SandboxError> {
    fs::create_dir_all(NETNS_DIR).map_err(|source| SandboxError::Io {
        what: "creating the named-netns directory".into(),
        path: NETNS_DIR.into(),
        source,
        hint: " (are you root?)",
    })
}

pub(crate) fn create(name: &str, timeout: Duration) -> Result<(), SandboxError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "add", name]);
    exec::run_checked(format!("creating netns {name}"), cmd, None, timeout, ROOT_HINT).map(drop)
}

pub(crate) fn delete(name: &str, timeout: Duration) -> Result<(), SandboxError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "delete", name]);
    exec::run_checked(format!("deleting netns {name}"), cmd, None, timeout, ROOT_HINT).map(drop)
}

/// Names in /run/netns; a missing directory means there are none.
pub(crate) fn list() -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Makes `cmd` join the namespace at `netns` between fork and exec.
pub(crate) fn enter_before_exec(cmd: &mut Command, netns: &Path) {
    let path = CString::new(netns.as_os_str().as_bytes()).expect("netns paths are built from checked names");
    let hook = move || {
        // SAFETY: open/setns/close are async-signal-safe and get a NUL-terminated path made before fork;
        // nothing here allocates.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        let err = io::Error::last_os_error();
        unsafe { libc::close(fd) };
        if rc != 0 { Err(err) } else { Ok(()) }
    };
    // SAFETY: the hook is async-signal-safe (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// The (device, inode) pair that identifies a namespace, whichever path refers to it.
pub(crate) fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Pids of the processes whose network namespace is the one at `netns`.
pub(crate) fn pids_inside(netns: &Path) -> Vec<u32> {
    let Ok(target) = identity(netns) else { return Vec::new() };
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| identity(Path::new(&format!("/proc/{pid}/ns/net"))).is_ok_and(|id| id == target))
        .collect()
}

/// Writes `net.*` sysctls as seen from inside the namespace at `netns`.
///
/// A short-lived thread joins the namespace (setns affects only the calling thread) and checks that it
/// really did before writing, so a failed setns can never change the machine's own settings.
pub(crate) fn write_sysctls(netns_name: &str, settings: &[(&str, &str)]) -> Result<(), SandboxError> {
    let mut files = Vec::with_capacity(settings.len());
    for (key, value) in settings {
        files.push((*key, *value, sysctl_path(key)?));
    }
    let netns = path(netns_name);
    let result = thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(), (usize, io::Error)> {
                enter_this_thread(&netns).map_err(|e| (0, e))?;
                for (i, (_, value, file)) in files.iter().enumerate() {
                    fs::write(file, value).map_err(|e| (i, e))?;
                }
                Ok(())
            })
            .join()
    });
    let (index, source) = match result {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(failure)) => failure,
        Err(_) => (0, io::Error::other("the sysctl writer thread panicked")),
    };
    let (key, value, _) = files[index.min(files.len().saturating_sub(1))];
    Err(SandboxError::Sysctl { key: key.to_owned(), value: value.to_owned(), netns: netns_name.to_owned(), source })
}

fn enter_this_thread(netns: &Path) -> io::Result<()> {
    let file = File::open(netns)?;
    // SAFETY: setns on a valid fd; it changes only this (short-lived) thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if identity(Path::new("/proc/thread-self/ns/net"))? != identity(netns)? {
        return Err(io::Error::other("setns returned success but the thread is not in the namespace"));
    }
    Ok(())
}

/// Maps a sysctl key to its /proc/sys file, accepting only per-netns `net.*` keys.
///
/// Like sysctl(8), a key containing `/` uses `/` as separator, so dotted interface names (`eth0.100`)
/// can be written as `net/ipv4/conf/eth0.100/rp_filter`.
pub(crate) fn sysctl_path(key: &str) -> Result<PathBuf, SandboxError> {
    let relative = if key.contains('/') { key.to_owned() } else { key.replace('.', "/") };
    let parts: Vec<&str> = relative.split('/').collect();
    let per_netns =
        parts.len() >= 3 && parts[0] == "net" && parts.iter().all(|p| !p.is_empty() && *p != "." && *p != "..");
    if !per_netns {
        return Err(SandboxError::SysctlNotPerNetns { key: key.to_owned() });
    }
    Ok(Path::new("/proc/sys").join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_map_to_proc_sys() {
        assert_eq!(sysctl_path("net.ipv4.ip_forward").unwrap(), Path::new("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
    }

    #[test]
    fn non_network_sysctls_are_refused() {
        for key in ["kernel.pid_max", "vm.swappiness", "net", "net.", "net/../kernel/x", "net..ipv4"] {
            assert!(sysctl_path(key).is_err(), "{key}");
        }
    }
}
