//! Where and how the eBPF datapath is installed on this node: which devices
//! get the per-packet programs, which address each one SNATs to, and the
//! runtime settings (conntrack lifetimes, NAT ports) the programs read.

use crate::config::{BpfSettings, Settings};
use crate::node_addrs;
use anyhow::Context;
use ferry_bpf::entries::{DEV_EXTERNAL, DEV_POD, Device, words};
use ferry_bpf::{AttachedDevice, DeviceRole, InstallOptions, Installed, NodeRuntime};
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
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| mem_total_bytes(&t));
    Ok(InstallOptions {
        pin_dir,
        cgroup,
        devices: devices(settings)?,
        capacities: map_capacities(&settings.bpf, mem),
        defrag_loop: settings.bpf.defrag_loop,
        acceleration: settings.node.acceleration,
    })
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
    runtime_for(settings, &installed.devices)
}

/// The devices `install` would attach to, resolved to their ifindex without
/// attaching anything (`ferry status --verify`).
pub fn resolved_devices(settings: &Settings) -> anyhow::Result<Vec<AttachedDevice>> {
    devices(settings)?
        .into_iter()
        .map(|(name, role)| {
            let ifindex = ifindex(&name).with_context(|| {
                format!(
                    "device {name:?} of the node config is not in this network namespace (run where the agent runs)"
                )
            })?;
            Ok(AttachedDevice { name, ifindex, role })
        })
        .collect()
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Runtime facts the datapath reads, for programs attached to `attached`.
pub fn runtime_for(settings: &Settings, attached: &[AttachedDevice]) -> anyhow::Result<NodeRuntime> {
    let addrs = node_addrs::by_device().context("listing interface addresses")?;
    let mut devices = BTreeMap::new();
    for d in attached {
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
        // Turned on by the Proxier once it has filled the pass-through sets.
        fast_pass: false,
    })
}

/// Maps whose default capacity follows node memory, with the size compiled
/// into `bpf/lib/maps.h` (sized for an 8 GiB node).
pub const SCALED_MAPS: &[(&str, u32)] = &[
    ("ferry_frontends", 262_144),
    ("ferry_services", 262_144),
    ("ferry_slots", 1_048_576),
    ("ferry_backends", 524_288),
    ("ferry_members", 1_048_576),
    ("ferry_names", 262_144),
    ("ferry_ct", 524_288),
    ("ferry_ct_new", 131_072),
    ("ferry_affinity", 262_144),
    ("ferry_sock_rev", 262_144),
];

/// The capacity of every memory-scaled map: `maps.*` from the config where
/// set, else the compiled size times MemTotal / 8 GiB, rounded down to a
/// power of two and kept between 1/4 of the compiled size and the compiled
/// size (a 4 GiB node gets half, 2 GiB or less a quarter, 8 GiB or more the
/// compiled size: hash maps are preallocated, so a larger default would
/// cost every big node memory it may never use; raise `maps.*` instead).
/// Unknown memory: the compiled sizes.
pub fn map_capacities(bpf: &BpfSettings, mem_total: Option<u64>) -> Vec<(String, u32)> {
    const BASE: u64 = 8 << 30;
    let mut caps: Vec<(String, u32)> = SCALED_MAPS
        .iter()
        .map(|(map, compiled)| {
            let set = bpf.map_capacities.iter().find(|(m, _)| m == map).map(|(_, n)| *n);
            let scaled = mem_total.map_or(*compiled, |mem| {
                // factor = 2^k with 2^k <= mem / 8 GiB, k in [-2, 0].
                let mut n = u64::from(*compiled) / 4;
                let mut budget = BASE / 4;
                while budget * 2 <= mem && n < u64::from(*compiled) {
                    budget *= 2;
                    n *= 2;
                }
                u32::try_from(n).unwrap_or(u32::MAX)
            });
            (map.to_string(), set.unwrap_or(scaled))
        })
        .collect();
    // The pass-through sets (not preallocated) hold an address per frontend
    // and per backend at most, plus node addresses: sized after those maps.
    let cap = |m: &str| caps.iter().find(|(n, _)| n == m).map_or(0, |(_, c)| *c);
    let (addrs, peers) = (cap("ferry_frontends").max(4096), cap("ferry_backends").max(4096));
    caps.push(("ferry_addrs".into(), addrs));
    caps.push(("ferry_peers".into(), peers));
    caps
}

/// MemTotal from /proc/meminfo, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod capacity_tests {
    use super::*;

    fn cap(settings: &BpfSettings, mem_gib: u64, map: &str) -> u32 {
        map_capacities(settings, Some(mem_gib << 30)).into_iter().find(|(m, _)| m == map).unwrap().1
    }

    #[test]
    fn default_capacities_follow_node_memory_and_the_config_wins() {
        let mut s = BpfSettings::default();
        assert_eq!(cap(&s, 8, "ferry_frontends"), 262_144, "8 GiB: the compiled size");
        assert_eq!(cap(&s, 6, "ferry_frontends"), 131_072, "rounded down to a power of two");
        assert_eq!(cap(&s, 4, "ferry_ct"), 262_144, "4 GiB: half");
        assert_eq!(cap(&s, 2, "ferry_services"), 65_536, "2 GiB: a quarter");
        assert_eq!(cap(&s, 1, "ferry_services"), 65_536, "never below a quarter");
        assert_eq!(cap(&s, 512, "ferry_slots"), 1_048_576, "never above the compiled size");
        assert_eq!(map_capacities(&s, None).iter().find(|(m, _)| m == "ferry_ct").unwrap().1, 524_288);
        s.map_capacities.push(("ferry_services".into(), 1000));
        assert_eq!(cap(&s, 64, "ferry_services"), 1000);
        assert_eq!(mem_total_bytes("MemTotal:       16384 kB\nMemFree: 1 kB\n"), Some(16 << 20));
    }
}
