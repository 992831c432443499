//! The defrag loop (`bpf/lib/loop.h`): a veth pair whose far end lives in a
//! small ferry-owned network namespace where netfilter reassembles IP
//! fragments and forwards each datagram straight back, first fragment first.
//! The tc programs send it the fragments they cannot translate one by one (a
//! later fragment that overtook its first; fragmented SCTP, whose CRC32c
//! correction needs the whole packet's length).
//!
//! What the operator sees, per node (network namespace): the device
//! [`NODE_DEVICE`] (MTU 65535, no addresses) and the namespace
//! `ferry-dfl-<inode>` ([`netns_name`], `ip netns list`), holding its end of
//! the pair, static routes back to it and the netfilter link (pinned with the
//! other links, `links/nf_loop_v4` and `links/nf_loop_v6`). It survives an
//! agent restart (the namespace is bind-mounted under `/run/netns` like `ip
//! netns add` does; the next agent adopts it); `ferry cleanup` removes it.
//! Linux 6.6+ (netfilter BPF link with `BPF_F_NETFILTER_IP_DEFRAG`).
//!
//! The setup goes through iproute2 (`ip`), as an operator would, and never
//! touches the node's own routes, sysctls or netfilter tables.

use libbpf_rs::{AsRawLibbpf, Link, NetfilterOpts, ProgramMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The pair's end in the node's namespace (the tc program `ferry_from_loop` sits on its ingress).
pub const NODE_DEVICE: &str = "ferry-defrag";
/// The pair's end in the loop's namespace.
pub const FAR_DEVICE: &str = "defrag0";
/// MAC addresses of the two ends: fixed, as `bpf/lib/loop.h` addresses the far end by it.
pub const NODE_MAC: &str = "02:66:65:72:72:01";
pub const FAR_MAC: &str = "02:66:65:72:72:02";
/// Next hops of the loop's default routes: link-local addresses nobody holds,
/// resolved by permanent neighbour entries to the node end's MAC.
const GW4: &str = "169.254.0.1";
const GW6: &str = "fe80::1";
/// Netfilter priority of the note program: after defragmentation (-400), anywhere in FORWARD.
const NF_PRIORITY: i32 = 0;
/// `BPF_F_NETFILTER_IP_DEFRAG` (uapi/linux/bpf.h).
const BPF_F_NETFILTER_IP_DEFRAG: u32 = 1;
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("defrag loop: `ip {args}` failed: {detail} (is iproute2 installed, and are we root?)")]
    Ip { args: String, detail: String },
    #[error("defrag loop: {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(
        "defrag loop: attaching the netfilter program in {netns} ({family}): {source} (Linux 6.6+ with CONFIG_NETFILTER_BPF_LINK and NF_DEFRAG_IPV4/6)"
    )]
    Netfilter { netns: String, family: &'static str, source: libbpf_rs::Error },
}

/// The loop's namespace name for the network namespace whose nsfs inode is
/// `inode`: unique per node namespace on the machine (the sandbox lab runs
/// many nodes, each its own namespace, on one kernel).
pub fn netns_name_for(inode: u64) -> String {
    format!("ferry-dfl-{inode:x}")
}

/// The loop's namespace name for the calling thread's network namespace (an agent's, or a
/// thread that joined a node's namespace).
pub fn netns_name() -> Result<String, LoopError> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|source| LoopError::Io { what: "reading /proc/thread-self/ns/net".into(), source })?;
    Ok(netns_name_for(meta.ino()))
}

fn ip(args: &[&str]) -> Result<String, LoopError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| LoopError::Ip { args: args.join(" "), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(LoopError::Ip {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: NUL-terminated name; the call only reads it.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Writes `key=value` sysctls (paths below /proc/sys) in the named namespace, from a thread that
/// joined it: /proc/sys/net is the namespace of the task that opens it.
fn write_sysctls(netns: &str, sysctls: &[String]) -> Result<(), LoopError> {
    let ns = std::fs::File::open(Path::new(NETNS_DIR).join(netns))
        .map_err(|source| LoopError::Io { what: format!("opening namespace {netns}"), source })?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), LoopError> {
            // SAFETY: setns on a valid fd changes only this scoped thread's namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LoopError::Io {
                    what: format!("joining namespace {netns}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            for kv in sysctls {
                let (key, value) = kv.split_once('=').expect("key=value");
                let path = Path::new("/proc/sys").join(key);
                std::fs::write(&path, value).map_err(|source| LoopError::Io {
                    what: format!("writing {} in {netns}", path.display()),
                    source,
                })?;
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(LoopError::Io { what: "sysctl thread".into(), source: std::io::Error::other("panicked") })
        })
    })
}

/// The loop of this node, once [`ensure`]d.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefragLoop {
    /// The namespace's name under `/run/netns`.
    pub netns: String,
    /// ifindex of [`NODE_DEVICE`].
    pub ifindex: u32,
}

/// Creates this node's loop, or adopts the one a previous agent made (the
/// same settings are applied again: each step is idempotent). A namespace
/// left without its node end (a crash between steps, a reused inode) is
/// made anew.
pub fn ensure() -> Result<DefragLoop, LoopError> {
    let netns = netns_name()?;
    let ns_path = Path::new(NETNS_DIR).join(&netns);
    if ifindex(NODE_DEVICE).is_none() {
        if ns_path.exists() {
            ip(&["netns", "del", &netns])?;
        }
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link",
            "add",
            NODE_DEVICE,
            "address",
            NODE_MAC,
            "mtu",
            "65535",
            "type",
            "veth",
            "peer",
            "name",
            FAR_DEVICE,
            "address",
            FAR_MAC,
            "mtu",
            "65535",
            "netns",
            &netns,
        ])?;
    } else if !ns_path.exists() {
        // The node end without its namespace cannot be repaired: start over.
        ip(&["link", "del", NODE_DEVICE])?;
        return ensure();
    }
    // Far side: forwarding on, no redirects (datagrams leave by the device they came in by),
    // no reverse-path filter, no addresses of its own; every route leads back.
    let sysctls = [
        "net/ipv4/ip_forward=1".to_string(),
        "net/ipv4/conf/all/send_redirects=0".into(),
        "net/ipv4/conf/default/send_redirects=0".into(),
        "net/ipv4/conf/all/rp_filter=0".into(),
        "net/ipv4/conf/default/rp_filter=0".into(),
        "net/ipv6/conf/all/forwarding=1".into(),
        format!("net/ipv4/conf/{FAR_DEVICE}/send_redirects=0"),
        format!("net/ipv4/conf/{FAR_DEVICE}/rp_filter=0"),
        format!("net/ipv6/conf/{FAR_DEVICE}/addr_gen_mode=1"),
    ];
    write_sysctls(&netns, &sysctls)?;
    ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    ip(&["-n", &netns, "link", "set", FAR_DEVICE, "up"])?;
    ip(&["-n", &netns, "neigh", "replace", GW4, "lladdr", NODE_MAC, "dev", FAR_DEVICE, "nud", "permanent"])?;
    ip(&["-n", &netns, "neigh", "replace", GW6, "lladdr", NODE_MAC, "dev", FAR_DEVICE, "nud", "permanent"])?;
    ip(&["-n", &netns, "route", "replace", "default", "via", GW4, "dev", FAR_DEVICE, "onlink"])?;
    ip(&["-n", &netns, "-6", "route", "replace", "default", "via", GW6, "dev", FAR_DEVICE])?;
    // Node side: no addresses (no link-local either), nothing routed to it; tc redirects only.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{NODE_DEVICE}/addr_gen_mode"), "1");
    ip(&["link", "set", NODE_DEVICE, "up"])?;
    let ifindex = ifindex(NODE_DEVICE).ok_or_else(|| LoopError::Ip {
        args: format!("link show {NODE_DEVICE}"),
        detail: "the device vanished".into(),
    })?;
    Ok(DefragLoop { netns, ifindex })
}

/// Attaches `prog` (`ferry_defrag_note`) at FORWARD, IPv4 and IPv6, in the
/// loop's namespace, with netfilter defragmentation on (which is what makes
/// the loop reassemble), and pins the links in `links_dir`, replacing the
/// ones a previous load pinned. The links are created from a thread that
/// joined the namespace: a netfilter link hooks the namespace of its creator.
pub fn attach_note(prog: &ProgramMut, netns: &str, links_dir: &Path) -> Result<(), LoopError> {
    /// The program's libbpf handle, for the one thread that attaches it while this call waits.
    struct ProgPtr(*mut libbpf_sys::bpf_program);
    // SAFETY: used by one thread at a time (the caller blocks until it is joined).
    unsafe impl Send for ProgPtr {}
    let ptr = ProgPtr(prog.as_libbpf_object().as_ptr());
    let ns = std::fs::File::open(Path::new(NETNS_DIR).join(netns))
        .map_err(|source| LoopError::Io { what: format!("opening namespace {netns}"), source })?;
    let netns = netns.to_string();
    let links_dir = links_dir.to_path_buf();
    std::thread::spawn(move || -> Result<(), LoopError> {
        let ptr = ptr;
        // SAFETY: setns on a valid fd changes only this short-lived thread's namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(LoopError::Io {
                what: format!("joining namespace {netns}"),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut made: Vec<(PathBuf, *mut libbpf_sys::bpf_link)> = Vec::new();
        let destroy = |made: &[(PathBuf, *mut libbpf_sys::bpf_link)]| {
            for (_, l) in made {
                // SAFETY: a link libbpf returned and nothing else holds; unpinned ones detach.
                unsafe { libbpf_sys::bpf_link__destroy(*l) };
            }
        };
        for (family, pf, file) in
            [("IPv4", libbpf_rs::NFPROTO_IPV4, "nf_loop_v4"), ("IPv6", libbpf_rs::NFPROTO_IPV6, "nf_loop_v6")]
        {
            let opts = libbpf_sys::bpf_netfilter_opts::from(NetfilterOpts {
                protocol_family: pf,
                hooknum: libbpf_rs::NF_INET_FORWARD,
                priority: NF_PRIORITY,
                flags: BPF_F_NETFILTER_IP_DEFRAG,
                ..Default::default()
            });
            // SAFETY: a loaded program and options that live across the call; returns a link or NULL (errno set).
            let link = unsafe { libbpf_sys::bpf_program__attach_netfilter(ptr.0, &opts) };
            if link.is_null() {
                let source = libbpf_rs::Error::from(std::io::Error::last_os_error());
                destroy(&made);
                return Err(LoopError::Netfilter { netns, family, source });
            }
            made.push((links_dir.join(file), link));
        }
        // The new links are live: the old ones go (defrag stays on: ours hold it).
        let mut result = Ok(());
        for (path, link) in &made {
            if let Ok(old) = Link::open(path) {
                let _ = old.detach();
            }
            let _ = std::fs::remove_file(path);
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in a pin path");
            // SAFETY: a live link and a NUL-terminated path.
            let rc = unsafe { libbpf_sys::bpf_link__pin(*link, c.as_ptr()) };
            if rc != 0 && result.is_ok() {
                result = Err(LoopError::Io {
                    what: format!("pinning {}", path.display()),
                    source: std::io::Error::from_raw_os_error(-rc),
                });
            }
        }
        // Pinned links stay attached when their handle goes.
        destroy(&made);
        result
    })
    .join()
    .unwrap_or_else(|_| Err(LoopError::Io { what: "attach thread".into(), source: std::io::Error::other("panicked") }))
}

/// Removes the loop of the network namespace whose nsfs inode is `inode`
/// (its namespace; the pair goes with it). Returns whether there was one.
pub fn remove_for(inode: u64) -> Result<bool, LoopError> {
    let netns = netns_name_for(inode);
    if !Path::new(NETNS_DIR).join(&netns).exists() {
        return Ok(false);
    }
    ip(&["netns", "del", &netns])?;
    Ok(true)
}

/// Removes this namespace's loop: the pair (deleting the node end takes the far end with it),
/// then its namespace. Returns the namespace's name if there was anything to remove.
pub fn remove() -> Result<Option<String>, LoopError> {
    let netns = netns_name()?;
    let had_dev = ifindex(NODE_DEVICE).is_some();
    // A namespace deleted a moment ago may still be taking the pair down with it.
    if had_dev
        && let Err(e) = ip(&["link", "del", NODE_DEVICE])
        && ifindex(NODE_DEVICE).is_some()
    {
        return Err(e);
    }
    let meta = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|source| LoopError::Io { what: "reading /proc/thread-self/ns/net".into(), source })?;
    let had_ns = remove_for(meta.ino())?;
    Ok((had_ns || had_dev).then_some(netns))
}
