//! Where and how the eBPF datapath is installed on this node: which devices
//! get the per-packet programs, which address each one SNATs to, and the
//! runtime settings (conntrack lifetimes, NAT ports) the programs read.

use crate::config::{BpfSettings, Settings};
use crate::node_addrs;
use anyhow::Context;
use ferry_bpf::entries::{DEV_EXTERNAL, DEV_POD, Device, words};
use ferry_bpf::{DeviceRole, InstallOptions, Installed, NodeRuntime};
use ferry_model::{IpFamily, LocalDetector};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

/// The devices that get programs: configured, or every interface holding a
/// node IP (uplinks) plus the pod bridge named by the local traffic detector.
pub fn devices(settings: &Settings) -> anyhow::Result<Vec<(String, DeviceRole)>> {
    let bpf: &BpfSettings = &settings.bpf;
    let mut out = Vec::new();
    let uplinks = match &bpf.devices {
        Some(list) => list.clone(),
        None => {
            let mut names: Vec<String> = node_addrs::by_device()
                .context("listing interfaces")?
                .into_iter()
                .filter(|(name, ip)| name != "lo" && settings.node.node_ips.contains(ip))
                .map(|(name, _)| name)
                .collect();
            names.sort();
            names.dedup();
            names
        }
    };
    out.extend(uplinks.into_iter().map(|d| (d, DeviceRole::External)));
    let pods = match (&bpf.pod_devices, &settings.node.local_detector) {
        (Some(list), _) => list.clone(),
        (None, LocalDetector::BridgeInterface(b)) => vec![b.clone()],
        _ => Vec::new(),
    };
    out.extend(pods.into_iter().map(|d| (d, DeviceRole::Pod)));
    Ok(out)
}

/// Install options from settings, with optional command-line overrides.
pub fn install_options(
    settings: &Settings,
    pin_dir: Option<PathBuf>,
    cgroup: Option<PathBuf>,
) -> anyhow::Result<InstallOptions> {
    let pin_dir = pin_dir.unwrap_or_else(|| settings.bpf.pin_path.clone());
    let cgroup = match cgroup.or_else(|| settings.bpf.cgroup_path.clone()) {
        Some(c) => c,
        None => ferry_bpf::system::cgroup2_mount()?,
    };
    Ok(InstallOptions { pin_dir, cgroup, devices: devices(settings)?, capacities: Vec::new() })
}

/// The SNAT address of a device, per family: the node's primary address when
/// the device holds it, else the device's first usable address, else zero
/// (the datapath then uses the primary address).
fn snat_addresses(name: &str, settings: &Settings, addrs: &[(String, IpAddr)]) -> [[u32; 4]; 2] {
    let mut out = [[0; 4]; 2];
    for (slot, family) in IpFamily::ALL.iter().enumerate() {
        let mine: Vec<IpAddr> = addrs
            .iter()
            .filter(|(n, ip)| n == name && IpFamily::of(ip) == *family && node_addrs::is_usable(ip))
            .map(|(_, ip)| *ip)
            .collect();
        let pick = settings.node.primary_ip(*family).filter(|p| mine.contains(p)).or_else(|| mine.first().copied());
        if let Some(ip) = pick {
            out[slot] = words(&ip);
        }
    }
    out
}

/// Runtime facts the datapath reads, for what `install` attached.
pub fn runtime(settings: &Settings, installed: &Installed) -> anyhow::Result<NodeRuntime> {
    let addrs = node_addrs::by_device().context("listing interface addresses")?;
    let mut devices = BTreeMap::new();
    for d in &installed.devices {
        let flags = match d.role {
            DeviceRole::External => DEV_EXTERNAL,
            DeviceRole::Pod => DEV_POD,
        };
        devices.insert(d.ifindex, Device { snat: snat_addresses(&d.name, settings, &addrs), flags });
    }
    Ok(NodeRuntime {
        host_netns_cookie: ferry_bpf::system::current_netns_cookie()?,
        timeouts: settings.bpf.timeouts,
        nat_ports: settings.bpf.nat_ports,
        devices,
        maglev_default: settings.bpf.maglev_default,
        maglev_size: settings.bpf.maglev_size,
    })
}
