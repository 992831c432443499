//! Socket-LB's guarantee for removed UDP backends: connected UDP sockets that
//! socket-LB pointed at a backend that is gone are destroyed, so the
//! application reconnects and gets a live backend (bpf/sockdestroy.bpf.c).
//!
//! Why destroy and not re-steer: a connected UDP socket sends without any
//! cgroup hook running again, so there is no point at which ferry could pick
//! another backend for it; `bpf_sock_destroy` (Linux 6.5+) is the one safe
//! way to end it. The application gets `ECONNABORTED` once, as for any
//! aborted socket, and its reconnect goes through `connect4/6` again.
//!
//! A socket iterator sees only the sockets of the network namespace it is
//! opened in, so the iterator is opened once per namespace that has
//! socket-LB clients: the namespaces of the processes in the attached cgroup
//! subtree (each read from `/proc/PID/ns/net`), entered from a short-lived
//! thread with `setns`.

use crate::skel::sockdestroy::{SockdestroySkel, SockdestroySkelBuilder};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Iter, MapCore, MapFlags};
use std::collections::BTreeMap;
use std::io::Read;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Network namespaces searched.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("{step}: {source} (the kernel needs bpf_sock_destroy, Linux 6.5 or newer)")]
    Libbpf { step: &'static str, source: libbpf_rs::Error },
    #[error("reading the cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
}

fn lb(step: &'static str) -> impl FnOnce(libbpf_rs::Error) -> DestroyError {
    move |source| DestroyError::Libbpf { step, source }
}

/// The key of `ferry_gone` (struct gone_key in bpf/sockdestroy.bpf.c).
fn gone_key(addr: &SocketAddr) -> [u8; 20] {
    let mut key = [0u8; 20];
    let words = crate::entries::words(&addr.ip());
    let family = if addr.is_ipv4() { crate::entries::FAM_V4 } else { crate::entries::FAM_V6 };
    for (i, w) in words.iter().enumerate() {
        key[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    key[16..18].copy_from_slice(&addr.port().to_be_bytes());
    key[18] = family;
    key
}

/// Destroys connected UDP sockets of processes under `cgroup` whose peer is
/// one of `gone` and that socket-LB connected there (pins in `pin_dir`).
pub fn destroy_udp_sockets(pin_dir: &Path, cgroup: &Path, gone: &[SocketAddr]) -> Result<DestroyReport, DestroyError> {
    if gone.is_empty() {
        return Ok(DestroyReport::default());
    }
    let mut storage = MaybeUninit::uninit();
    let mut open =
        SockdestroySkelBuilder::default().open(&mut storage).map_err(lb("opening the socket-destroy BPF object"))?;
    open.maps
        .ferry_sock_rev
        .set_pin_path(pin_dir.join("ferry_sock_rev"))
        .map_err(lb("setting the pin path of ferry_sock_rev"))?;
    let skel: SockdestroySkel = open.load().map_err(lb("loading the socket-destroy iterator (verifier)"))?;
    for addr in gone {
        skel.maps.ferry_gone.update(&gone_key(addr), &[1], MapFlags::ANY).map_err(lb("filling ferry_gone"))?;
    }
    let link = skel.progs.ferry_destroy_udp.attach().map_err(lb("attaching the UDP socket iterator"))?;
    let namespaces = client_namespaces(cgroup)?;
    let mut report = DestroyReport { namespaces: namespaces.len(), destroyed: 0 };
    for ns in namespaces.values() {
        // A namespace whose last process exited meanwhile has no sockets left: nothing to do.
        let _ = run_in_netns(ns, || -> Result<(), DestroyError> {
            let mut iter = Iter::new(&link).map_err(lb("opening the UDP socket iterator"))?;
            let mut sink = Vec::new();
            let _ = iter.read_to_end(&mut sink);
            Ok(())
        });
    }
    report.destroyed = skel.maps.bss_data.as_deref().map_or(0, |b| b.destroyed);
    Ok(report)
}

/// One `/proc/PID/ns/net` per distinct network namespace of the processes in
/// `cgroup` and every cgroup below it (keyed by the namespace's device and inode).
fn client_namespaces(cgroup: &Path) -> Result<BTreeMap<(u64, u64), PathBuf>, DestroyError> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    // A cgroup tree is finite; the bound only guards against a pathological mount.
    let mut budget = 100_000usize;
    while let Some(dir) = dirs.pop() {
        budget = budget.saturating_sub(1);
        if budget == 0 {
            break;
        }
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(p) => p,
            Err(e) if dir == cgroup => return Err(DestroyError::Cgroup { path: dir, source: e }),
            Err(_) => continue, // removed while we walked
        };
        for pid in procs.split_whitespace() {
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(m) = std::fs::metadata(&ns) {
                out.entry((m.dev(), m.ino())).or_insert(ns);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    Ok(out)
}

/// Runs `f` on a new thread that has entered the network namespace `ns`
/// (setns affects only the calling thread, so the agent's own threads stay put).
fn run_in_netns<T: Send>(ns: &Path, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(ns)?;
            // SAFETY: setns on a valid namespace fd; it only changes this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("socket iterator thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_key_layout_matches_the_c_struct() {
        let k = gone_key(&"10.0.0.1:53".parse().unwrap());
        assert_eq!(&k[0..4], &[10, 0, 0, 1]);
        assert_eq!(&k[4..16], &[0; 12]);
        assert_eq!(&k[16..18], &53u16.to_be_bytes());
        assert_eq!(k[18], crate::entries::FAM_V4);
        let k6 = gone_key(&"[fd00::5]:53".parse().unwrap());
        assert_eq!(k6[0], 0xfd);
        assert_eq!(k6[15], 5);
        assert_eq!(k6[18], crate::entries::FAM_V6);
    }
}
