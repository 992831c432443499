//! XDP acceleration's install side (`crates/ferry-bpf/src/install.rs`) on the
//! real kernel: `native` attaches `ferry_xdp` in driver mode to an external
//! veth through a pinned link, a restart swaps the program inside that link,
//! a device without native XDP (a bridge) fails `native` by name and is left
//! to tc by `best-effort` (which reports why), and `disabled` (or a downgrade) detaches what
//! was attached; `acceleration::devices` reads each state back from the pins. What the
//! program does with packets is the packet tests' (`tests/packet/xdp.rs`) and
//! the lab's (`crates/ferry/tests/packet_xdp.rs`).
//!
//! Runs in a node namespace of its own (`ferry-xdpi-<pid>-<seq>-node`); pin
//! directory and cgroup are `ferry-xdpi-<pid>-install`, removed even when the
//! test fails. Needs root; never skipped.

use ferry_bpf::acceleration::XdpMode;
use ferry_bpf::{DeviceRole, InstallOptions};
use ferry_model::Acceleration;
use ferry_sandbox::Sandbox;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pin directory and cgroup of the test; removed on drop.
struct Pins {
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = ferry_bpf::uninstall(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn xdp_on(dev: &str) -> bool {
    let link = ip(&["-d", "link", "show", dev]);
    assert!(!link.contains("xdpgeneric"), "{dev}: generic XDP, never wanted:\n{link}");
    link.contains("prog/xdp")
}

#[test]
fn native_attaches_best_effort_falls_back_disabled_detaches() {
    let mut sandbox = Sandbox::new("xdpi").expect("creating the sandbox (root?)");
    let node = sandbox.add_host("node").expect("creating the node namespace");
    let netns = sandbox.netns_path(&node);
    let id = format!("ferry-xdpi-{}-install", std::process::id());
    let pins = Pins {
        pin_dir: Path::new(ferry_bpf::system::BPFFS).join(&id),
        cgroup: ferry_bpf::system::cgroup2_mount().expect("cgroup v2 mount").join(&id),
    };
    std::fs::create_dir_all(&pins.cgroup).expect("creating the test cgroup");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&netns).expect("opening the namespace");
            // SAFETY: setns on a valid fd; it changes this thread's namespace only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            ip(&["link", "add", "ferry-up0", "type", "veth", "peer", "name", "ferry-up1"]);
            ip(&["link", "add", "ferry-br9", "type", "bridge"]);
            for dev in ["ferry-up0", "ferry-up1", "ferry-br9"] {
                ip(&["link", "set", dev, "up"]);
            }
            let install = |acceleration, devices: &[&str]| {
                ferry_bpf::install(&InstallOptions {
                    pin_dir: pins.pin_dir.clone(),
                    cgroup: pins.cgroup.clone(),
                    devices: devices.iter().map(|d| (d.to_string(), DeviceRole::External)).collect(),
                    capacities: Vec::new(),
                    defrag_loop: false,
                    acceleration,
                })
            };
            let link = pins.pin_dir.join("links/xdp_ext_ferry-up0");

            let first = install(Acceleration::Native, &["ferry-up0"]).expect("native on a veth");
            assert_eq!(first.accelerated, ["ferry-up0"]);
            assert!(xdp_on("ferry-up0") && link.exists(), "native: ferry_xdp in driver mode, its link pinned");
            let read = ferry_bpf::acceleration::devices(&pins.pin_dir);
            let x = read[0].xdp.clone().expect("the XDP link read back");
            assert_eq!((read.len(), read[0].device.as_str(), read[0].external), (1, "ferry-up0", true), "{read:?}");
            assert_eq!(x.mode, Some(XdpMode::Native), "the device reports the link's program in driver mode");
            let shown = ip(&["-d", "link", "show", "ferry-up0"]);
            assert!(shown.contains(&format!("prog/xdp id {} ", x.program_id)), "program id {x:?}:\n{shown}");
            let attached = first.links_attached;
            drop(first);

            let again = install(Acceleration::Native, &["ferry-up0"]).expect("a restart");
            assert_eq!(again.accelerated, ["ferry-up0"]);
            assert_eq!(again.links_attached, 0, "a restart attaches nothing anew");
            assert_eq!(again.links_updated, attached, "every link swapped in place, the XDP one too");
            assert!(xdp_on("ferry-up0"));
            drop(again);

            let refused = install(Acceleration::Native, &["ferry-up0", "ferry-br9"]).err().expect("native on a bridge");
            let msg = refused.to_string();
            assert!(msg.contains("ferry-br9") && msg.contains("driver mode"), "the error names the device: {msg}");

            let fallback = install(Acceleration::BestEffort, &["ferry-up0", "ferry-br9"]).expect("best-effort");
            assert_eq!(fallback.accelerated, ["ferry-up0"], "the bridge runs on tc only");
            let why = &fallback.xdp_fallbacks;
            assert!(why.len() == 1 && why[0].device == "ferry-br9", "{why:?}");
            assert!(why[0].reason.contains("driver mode"), "the kernel's reason is kept: {why:?}");
            let read = ferry_bpf::acceleration::devices(&pins.pin_dir);
            let br = read.iter().find(|d| d.device == "ferry-br9").expect("the bridge is an external device");
            assert!(br.external && br.xdp.is_none(), "{read:?}");
            assert!(!xdp_on("ferry-br9"));
            assert!(pins.pin_dir.join("links/tcx_ext_ferry-br9_in").exists(), "the bridge keeps its tc programs");
            drop(fallback);

            let off = install(Acceleration::Disabled, &["ferry-up0"]).expect("disabled");
            assert!(off.accelerated.is_empty());
            assert!(!xdp_on("ferry-up0") && !link.exists(), "disabled: the XDP program and its link are gone");
            assert!(ferry_bpf::acceleration::devices(&pins.pin_dir).iter().all(|d| d.xdp.is_none()));
            assert!(pins.pin_dir.join("links/tcx_ext_ferry-up0_in").exists(), "tc stays");
            drop(off);

            // A downgrade detaches XDP: no older build would ever switch its link.
            drop(install(Acceleration::Native, &["ferry-up0"]).expect("native again"));
            assert!(xdp_on("ferry-up0"));
            let older = ferry_bpf::layout::LAYOUT - 1;
            let converted = ferry_bpf::downgrade::convert(&pins.pin_dir, older).expect("downgrade");
            assert!(converted.is_some(), "a conversion to layout {older}");
            assert!(!xdp_on("ferry-up0") && !link.exists(), "the downgrade detached XDP");
            assert!(pins.pin_dir.join("links/tcx_ext_ferry-up0_in").exists(), "tc stays for the older agent");
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
}
