//! The host facts the datapath depends on: where bpffs and cgroup2 are
//! mounted, and the host's network-namespace cookie.

use std::path::{Path, PathBuf};

/// Where bpffs is expected; ferry mounts it there when it is missing, as Cilium does.
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(
        "no cgroup2 filesystem is mounted (none in /proc/mounts); mount one (mount -t cgroup2 none /sys/fs/cgroup) or set bpf.cgroupPath"
    )]
    NoCgroup2,
    #[error("reading /proc/mounts: {0}")]
    Mounts(std::io::Error),
    #[error("mounting bpffs at {BPFFS} failed: {0} (ferry needs root, or mount it yourself: mount -t bpf bpf {BPFFS})")]
    MountBpffs(std::io::Error),
    #[error("reading the network-namespace cookie (SO_NETNS_COOKIE, Linux 5.14+) failed: {0}")]
    NetnsCookie(std::io::Error),
}

fn mounts() -> Result<Vec<(String, String)>, SystemError> {
    let text = std::fs::read_to_string("/proc/mounts").map_err(SystemError::Mounts)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _dev = f.next()?;
            let path = f.next()?;
            let fstype = f.next()?;
            Some((path.replace("\\040", " "), fstype.to_string()))
        })
        .collect())
}

/// The cgroup2 mount point (e.g. `/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf, SystemError> {
    mounts()?.into_iter().find(|(_, t)| t == "cgroup2").map(|(p, _)| PathBuf::from(p)).ok_or(SystemError::NoCgroup2)
}

/// Mounts bpffs at /sys/fs/bpf unless some bpffs is already mounted there.
pub fn ensure_bpffs() -> Result<(), SystemError> {
    if mounts()?.iter().any(|(p, t)| p == BPFFS && t == "bpf") {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: plain mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(SystemError::MountBpffs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `path` lies on bpffs (pins must).
pub fn is_under_bpffs(path: &Path) -> bool {
    path.starts_with(BPFFS)
}

/// Cookie of the network namespace the calling thread is in.
pub fn current_netns_cookie() -> Result<u64, SystemError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: socket/getsockopt/close on a descriptor we own, with a correctly sized buffer.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(SystemError::NetnsCookie(std::io::Error::last_os_error()));
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(SystemError::NetnsCookie(err));
        }
        Ok(cookie)
    }
}
