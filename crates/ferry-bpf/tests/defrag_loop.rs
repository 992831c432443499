//! The defrag loop's node state (`crates/ferry-bpf/src/defrag_loop.rs`) on the real kernel: made
//! once per node namespace, adopted as it is by the next agent (same namespace, same device),
//! made anew when half of it is gone, and removed whole. What travels through it is the lab test
//! `crates/ferry/tests/packet_shapes.rs`'s; the programs' decisions are the packet tests'.
//!
//! Each test runs in a node namespace of its own (`ferry-dfl-<pid>-<seq>-node`). Needs root;
//! never skipped.

use ferry_bpf::defrag_loop::{self, NODE_DEVICE};
use ferry_sandbox::Sandbox;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

/// Runs `f` on a thread inside a fresh node namespace; the loop is removed afterwards, also on failure.
fn in_node<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut sandbox = Sandbox::new("dfl").expect("creating the sandbox (root?)");
    let node = sandbox.add_host("node").expect("creating the node namespace");
    let netns = sandbox.netns_path(&node);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&netns).expect("opening the namespace");
            // SAFETY: setns on a valid fd; it changes this thread's namespace only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = defrag_loop::remove();
            result.unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_loop_is_made_once_adopted_by_the_next_agent_and_removed_whole() {
    in_node(|| {
        let made = defrag_loop::ensure().expect("making the loop");
        assert!(Path::new("/run/netns").join(&made.netns).exists(), "its namespace is named under /run/netns");
        assert!(made.netns.starts_with("ferry-dfl-"), "{}", made.netns);
        let link = ip(&["-d", "link", "show", NODE_DEVICE]);
        assert!(link.contains("mtu 65535") && link.contains("veth"), "{link}");
        assert!(link.contains(defrag_loop::NODE_MAC), "{link}");
        assert!(!ip(&["-6", "addr", "show", "dev", NODE_DEVICE]).contains("inet6"), "no addresses on the node end");
        let far = ip(&["-n", &made.netns, "route", "show"]);
        assert!(far.contains("default via 169.254.0.1"), "{far}");
        let far6 = ip(&["-n", &made.netns, "-6", "route", "show"]);
        assert!(far6.contains("default via fe80::1"), "{far6}");

        // Its sysctls are the loop namespace's, none of the node's.
        let sysctl = |ns: Option<&str>, key: &str| {
            let cat = ["cat", key];
            let out = match ns {
                Some(ns) => ip(&[&["netns", "exec", ns][..], &cat[..]].concat()),
                None => String::from_utf8(Command::new("cat").arg(key).output().unwrap().stdout).unwrap(),
            };
            out.trim().to_string()
        };
        for key in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
            assert_eq!(sysctl(Some(&made.netns), key), "1", "{key} in the loop");
            assert_eq!(sysctl(None, key), "0", "{key} in the node: untouched");
        }
        assert_eq!(sysctl(Some(&made.netns), "/proc/sys/net/ipv4/conf/all/send_redirects"), "0");

        // The next agent (a restart) adopts it: nothing made anew.
        let adopted = defrag_loop::ensure().expect("adopting the loop");
        assert_eq!(adopted, made, "same namespace, same device");

        // Half of it gone (the namespace removed by hand): made anew.
        ip(&["netns", "del", &made.netns]);
        let again = defrag_loop::ensure().expect("making the loop again");
        assert_eq!(again.netns, made.netns, "the name is the node namespace's");
        assert!(Path::new("/run/netns").join(&again.netns).exists());

        assert_eq!(defrag_loop::remove().expect("removing the loop"), Some(made.netns.clone()));
        assert!(!Path::new("/run/netns").join(&made.netns).exists(), "its namespace is gone");
        assert!(Command::new("ip").args(["link", "show", NODE_DEVICE]).output().unwrap().stdout.is_empty());
        assert_eq!(defrag_loop::remove().expect("removing nothing"), None);
    });
}

#[test]
fn each_node_namespace_gets_its_own_loop() {
    let a = in_node(|| defrag_loop::ensure().expect("node a's loop").netns);
    let b = in_node(|| {
        let b = defrag_loop::ensure().expect("node b's loop").netns;
        assert!(Path::new("/run/netns").join(&b).exists());
        b
    });
    assert_ne!(a, b, "two node namespaces, two loops");
    assert!(!Path::new("/run/netns").join(&a).exists(), "removed with its node");
}

fn device_exists(name: &str) -> bool {
    Command::new("ip").args(["link", "show", name]).output().expect("running ip").status.success()
}

/// A datapath installed on a dummy uplink of the node namespace; uninstalled on drop.
struct Installed {
    pin_dir: std::path::PathBuf,
    cgroup: std::path::PathBuf,
}

impl Installed {
    fn install(defrag_loop: bool) -> Installed {
        let id = format!("ferry-dfl-{}-install", std::process::id());
        let pin_dir = Path::new(ferry_bpf::system::BPFFS).join(&id);
        let cgroup = ferry_bpf::system::cgroup2_mount().expect("cgroup v2 mount").join(&id);
        std::fs::create_dir_all(&cgroup).expect("creating the test cgroup");
        let opts = ferry_bpf::InstallOptions {
            pin_dir: pin_dir.clone(),
            cgroup: cgroup.clone(),
            devices: vec![("ferry-up0".into(), ferry_bpf::DeviceRole::External)],
            capacities: Vec::new(),
            defrag_loop,
            acceleration: Default::default(),
        };
        let guard = Installed { pin_dir, cgroup };
        drop(ferry_bpf::install(&opts).expect("installing the datapath"));
        guard
    }
    fn has_link(&self, name: &str) -> bool {
        self.pin_dir.join("links").join(name).exists()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = ferry_bpf::uninstall(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[test]
fn with_bpf_defrag_loop_false_an_install_makes_none_and_removes_the_one_an_earlier_install_made() {
    in_node(|| {
        ip(&["link", "add", "ferry-up0", "type", "veth", "peer", "name", "ferry-up1"]);
        ip(&["link", "set", "ferry-up0", "up"]);
        let on = Installed::install(true);
        assert!(device_exists(NODE_DEVICE), "the loop's node end exists");
        assert!(on.has_link("tcx_loop_in") && on.has_link("nf_loop_v4"), "the loop's links are pinned");
        let netns = defrag_loop::ensure().expect("adopting the loop").netns;

        // The same pin directory, installed again with the loop turned off.
        let off = Installed::install(false);
        assert!(!device_exists(NODE_DEVICE), "the loop's node end is gone");
        assert!(!Path::new("/run/netns").join(&netns).exists(), "its namespace {netns} is gone");
        for link in ["tcx_loop_in", "nf_loop_v4", "nf_loop_v6"] {
            assert!(!off.has_link(link), "{link} is unpinned");
        }
        assert!(off.has_link("tcx_ext_ferry-up0_in"), "the uplink keeps its programs");
        drop(on);
    });
}
