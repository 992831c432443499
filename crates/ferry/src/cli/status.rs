//! `ferry status`: what the datapath holds right now, read from the pinned maps
//! (with `--verify`, compared with the Plan: `super::verify`).

use crate::agent::sync::AccelerationRecord;
use crate::config::{self, NodeFlags};
use anyhow::Context;
use clap::Args;
use ferry_bpf::acceleration::{DeviceXdp, XdpMode};
use ferry_bpf::entries::*;
use ferry_bpf::{MapDump, Maps};
use ferry_model::addr::fmt_addr_port;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Pin directory the datapath was installed in (default /sys/fs/bpf/ferry;
    /// with --verify, bpf.pinPath of the node config).
    #[arg(long, value_name = "PATH")]
    pub pin_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Compare the pinned maps with the Plan the agent would program from
    /// --manifests and the node config, and list every difference (missing,
    /// extra, wrong or orphaned entries; also XDP links the node config's
    /// `acceleration` lacks or does not want). Exit code 0: equal; 1: they differ;
    /// 2: could not compare. Run it on the node (its network namespace), with
    /// the agent's own flags; while the agent runs, a change it has not synced
    /// yet shows as a difference.
    #[arg(long, requires = "manifests")]
    pub verify: bool,
    /// Directory of manifests the agent serves (`ferry run --manifests`), for --verify.
    #[arg(long, value_name = "DIR", requires = "verify")]
    pub manifests: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeFlags,
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ferry";

fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    }
}

fn kind_name(k: u8) -> &'static str {
    match k {
        FE_CLUSTER_IP => "ClusterIP",
        FE_NODE_PORT => "NodePort",
        FE_LOAD_BALANCER => "LoadBalancer",
        FE_EXTERNAL_IP => "ExternalIP",
        _ => "?",
    }
}

fn action_name(a: u8) -> String {
    let base = match a & ACT_MASK {
        ACT_FORWARD_CLUSTER => "cluster",
        ACT_FORWARD_LOCAL => "local",
        ACT_DROP => "DROP",
        ACT_REJECT => "REJECT",
        _ => "-",
    };
    if a & ACT_MASQ != 0 { format!("{base}+SNAT") } else { base.to_string() }
}

/// One row per programmed frontend.
#[derive(Debug, serde::Serialize)]
pub struct FrontendRow {
    pub frontend: String,
    pub kind: &'static str,
    pub service: String,
    pub backends: Vec<String>,
    pub local_backends: Vec<String>,
    /// Route per source class (pod, host, outside).
    pub routes: [String; 3],
}

pub fn rows(d: &MapDump) -> Vec<FrontendRow> {
    let names: BTreeMap<u32, &String> = d.names.iter().map(|(k, v)| (*k, v)).collect();
    let services: BTreeMap<u32, SvcVal> = d.services.iter().copied().collect();
    let slots: BTreeMap<SlotKey, u32> = d.slots.iter().copied().collect();
    let backends: BTreeMap<u32, Backend> = d.backends.iter().copied().collect();
    let mut out = Vec::new();
    let mut fes = d.frontends.clone();
    fes.sort_by_key(|(k, _)| (k.family, k.addr.map(u32::from_be), k.port, k.proto));
    for (k, v) in fes {
        if v.kind == FE_CLUSTER_IP_ANY_PORT {
            continue;
        }
        let frontend = if k.addr == [0; 4] {
            format!("*:{}/{}", k.port, proto_name(k.proto))
        } else {
            format!("{}/{}", fmt_addr_port(&ip_of(&k.addr, k.family), k.port), proto_name(k.proto))
        };
        let svc = services.get(&v.service).copied().unwrap_or_default();
        let list = |set: u8| -> Vec<String> {
            (0..svc.count[set as usize])
                .filter_map(|slot| slots.get(&SlotKey { service: v.service, rev: svc.rev, set, slot }))
                .filter_map(|id| backends.get(id))
                .map(|b| fmt_addr_port(&ip_of(&b.addr, b.family), b.port))
                .collect()
        };
        let path = if v.kind == FE_CLUSTER_IP { 0 } else { 1 };
        out.push(FrontendRow {
            frontend,
            kind: kind_name(v.kind),
            service: names.get(&v.service).map(|s| s.to_string()).unwrap_or_else(|| format!("#{}", v.service)),
            backends: list(SET_CLUSTER),
            local_backends: list(SET_LOCAL),
            routes: [0, 1, 2].map(|c| action_name(svc.action[path][c])),
        });
    }
    out
}

/// The masquerade settings in force, as the datapath holds them.
/// Whether the pass-through fast path is on, and the sizes of its sets.
pub fn fast_pass_line(d: &MapDump, peers: usize) -> String {
    if d.config.is_some_and(|c| c.flags & CFG_FAST_PASS != 0) {
        format!(
            "fast path   on: a whole TCP/UDP/SCTP packet to none of {} addresses (ferry_addrs) and from none of \
             {peers} backends (ferry_peers) passes without a conntrack lookup",
            d.addrs.len()
        )
    } else {
        "fast path   off: every packet takes the full path (the agent turns it on after its first sync)".into()
    }
}

pub fn masquerade_line(d: &MapDump) -> String {
    let fmt = |kind: u8| -> Vec<String> {
        d.ranges
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| format!("{}/{}", ip_of(&r.addr, r.family), r.prefixlen - 32))
            .collect()
    };
    if d.config.is_some_and(|c| c.flags & CFG_MASQ_BPF != 0) {
        let nat = d.config.map(|c| format!("{}-{}", c.nat_port_min, c.nat_port_max)).unwrap_or_default();
        format!(
            "masquerade  bpf: egress of pods in [{}] is SNATed to the node (NAT ports {nat}), except to [{}]",
            fmt(RANGE_MASQ_SOURCE).join(", "),
            fmt(RANGE_NO_MASQ).join(", ")
        )
    } else if ferry_nft::nft::table_exists(ferry_nft::masquerade::FAMILY, ferry_nft::masquerade::TABLE) {
        format!(
            "masquerade  nftables: table {} {} (see `nft list table {0} {1}`)",
            ferry_nft::masquerade::FAMILY,
            ferry_nft::masquerade::TABLE
        )
    } else {
        "masquerade  off: pod egress keeps pod addresses".to_string()
    }
}

/// XDP acceleration per device, from the pinned links and the agent's record
/// (what it asked for, and why `best-effort` left a device to tc).
pub fn acceleration_lines(devs: &[DeviceXdp], record: Option<&AccelerationRecord>) -> Vec<String> {
    if devs.is_empty() {
        let setting = record.map_or(" disabled".to_string(), |r| format!(" {}", r.acceleration));
        return vec![format!("acceleration{setting}: no external devices")];
    }
    // The agent records its setting only while it accelerates.
    let mut out = vec![match record {
        Some(r) => format!("acceleration {} (the agent's node config), per external device:", r.acceleration),
        None if devs.iter().all(|d| d.xdp.is_none()) => "acceleration disabled, per external device:".to_string(),
        None => {
            "acceleration: the agent left no record of its setting (/run/ferry); per device, from the pinned links:"
                .to_string()
        }
    }];
    let native = record.is_some_and(|r| r.acceleration == "native");
    let width = devs.iter().map(|d| d.device.len()).max().unwrap_or(0);
    for d in devs {
        let fallback = record.and_then(|r| r.fallbacks.iter().find(|f| f.device == d.device));
        let what = match (&d.xdp, fallback) {
            (Some(x), _) if x.ifindex == 0 => {
                format!("XDP link {} detached (its device went away); tc only", x.link_id)
            }
            (Some(x), _) => match x.mode {
                Some(XdpMode::Native) => format!("XDP native, program {} (link {})", x.program_id, x.link_id),
                None => format!(
                    "XDP attached in driver mode, program {} (link {}; the device is not in this network namespace: \
                     run status there to read its own report)",
                    x.program_id, x.link_id
                ),
                Some(m) => format!("XDP link {} attached, but the device runs it as: {m}", x.link_id),
            },
            (None, Some(f)) => format!("tc only: best-effort fell back ({})", f.reason),
            (None, None) if native => "tc only: NO XDP program although acceleration is native (see --verify)".into(),
            (None, None) => "tc only".into(),
        };
        let role = if d.external { "" } else { " (not an external device of this datapath)" };
        out.push(format!("  {:<width$}  {what}{role}", d.device));
    }
    out
}

/// `ferry status --verify`: prints every difference; exit code 1 if there is one.
fn verify(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let mut settings = config::settings(&args.node)?;
    if settings.datapath != config::DatapathChoice::Bpf {
        anyhow::bail!(
            "--verify compares the eBPF datapath's maps; this node config selects nftables (see `nft list table ...`)"
        );
    }
    if settings.node.node_ips.is_empty() {
        settings.node.node_ips = crate::node_addrs::detect().context("detecting node addresses")?;
    }
    let pin_dir = args.pin_dir.clone().unwrap_or_else(|| settings.bpf.pin_path.clone());
    if !ferry_bpf::install::is_installed(&pin_dir) {
        anyhow::bail!("no ferry datapath in {} (start one with `ferry run`)", pin_dir.display());
    }
    let manifests = args.manifests.as_ref().context("--verify needs --manifests")?;
    let state = super::load_manifests_with(manifests, settings.manifests)?;
    let plan = ferry_model::build_plan(&state, &settings.node);
    let devices = crate::datapath::resolved_devices(&settings)?;
    let mut runtime = crate::datapath::runtime_for(&settings, &devices)?;
    let maps = Maps::open(&pin_dir).with_context(|| format!("opening the maps pinned in {}", pin_dir.display()))?;
    let dump = maps.dump();
    // The agent turns the fast path on itself once its sets are filled.
    runtime.fast_pass = dump.config.is_some_and(|c| c.flags & ferry_bpf::entries::CFG_FAST_PASS != 0);
    let mut diffs = super::verify::differences(&dump, &plan, &runtime);
    let externals: Vec<String> =
        devices.iter().filter(|d| d.role == ferry_bpf::DeviceRole::External).map(|d| d.name.clone()).collect();
    let fallbacks = crate::agent::sync::read_acceleration(&pin_dir).map(|r| r.fallbacks).unwrap_or_default();
    diffs.extend(super::verify::xdp_differences(
        settings.node.acceleration,
        &externals,
        &ferry_bpf::acceleration::devices(&pin_dir),
        &fallbacks,
    ));
    if args.json {
        let out = serde_json::json!({
            "pinDir": pin_dir,
            "servicePorts": plan.services.len(),
            "matches": diffs.is_empty(),
            "differences": diffs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if diffs.is_empty() {
        println!(
            "datapath {} matches the Plan: {} service port(s) from {}",
            pin_dir.display(),
            plan.services.len(),
            manifests.display()
        );
    } else {
        println!(
            "datapath {} differs from the Plan of {} in {} entr{}:",
            pin_dir.display(),
            manifests.display(),
            diffs.len(),
            if diffs.len() == 1 { "y" } else { "ies" }
        );
        for d in &diffs {
            println!("  {d}");
        }
        println!("a running agent fixes these on its next full sync (restart it, or send it SIGHUP)");
    }
    Ok(if diffs.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn run(mut args: StatusArgs) -> anyhow::Result<ExitCode> {
    if args.verify {
        return verify(&args);
    }
    let args_pin_dir = args.pin_dir.take().unwrap_or_else(|| DEFAULT_PIN_DIR.into());
    let args = Plain { pin_dir: args_pin_dir, json: args.json };
    if !ferry_bpf::install::is_installed(&args.pin_dir) {
        let nft: Vec<&str> = ferry_nft::owned_tables()
            .into_iter()
            .filter(|(_, name)| *name == ferry_nft::services::TABLE)
            .map(|(family, _)| family)
            .collect();
        if !nft.is_empty() {
            // The nftables datapath keeps its state in the kernel's ruleset, readable as is.
            for family in nft {
                println!(
                    "nftables datapath: table {family} {} (see `nft list table {family} {}`)",
                    ferry_nft::services::TABLE,
                    ferry_nft::services::TABLE
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        println!("no ferry datapath in {} (start one with `ferry run`)", args.pin_dir.display());
        return Ok(ExitCode::FAILURE);
    }
    let maps = Maps::open(&args.pin_dir)?;
    let dump = maps.dump();
    let rows = rows(&dump);
    let counters: BTreeMap<&str, u64> = ferry_bpf::stats::NAMES.iter().copied().zip(maps.counters()).collect();
    let (rev, aff) = maps.lru_fill();
    let frags = maps.frag_fill();
    let fill = crate::agent::sync::map_fill(&args.pin_dir);
    let evictions = crate::agent::sync::lru_evictions(&maps, &fill);
    let refused = crate::agent::sync::read_refused(&args.pin_dir);
    let xdp = ferry_bpf::acceleration::devices(&args.pin_dir);
    let accel = crate::agent::sync::read_acceleration(&args.pin_dir);
    if args.json {
        let fill: Vec<_> = fill
            .iter()
            .map(|f| serde_json::json!({"map": f.map, "entries": f.entries, "capacity": f.capacity}))
            .collect();
        let out = serde_json::json!({
            "pinDir": args.pin_dir,
            "maps": fill,
            "evictions": evictions.iter().cloned().collect::<BTreeMap<String, u64>>(),
            "refused": refused,
            "acceleration": {
                "setting": accel.as_ref().map(|r| r.acceleration.clone()),
                "devices": xdp.iter().map(|d| serde_json::json!({
                    "device": d.device,
                    "external": d.external,
                    "xdp": d.xdp,
                    "fallback": accel.as_ref()
                        .and_then(|r| r.fallbacks.iter().find(|f| f.device == d.device))
                        .map(|f| f.reason.clone()),
                })).collect::<Vec<_>>(),
            },
            "frontends": rows,
            "backends": dump.backends.len(),
            "servicePorts": dump.services.len(),
            "counters": counters,
            "socketReverseEntries": rev,
            "affinityEntries": aff,
            "fragmentEntries": frags,
            "masquerade": masquerade_line(&dump),
            "fastPass": dump.config.is_some_and(|c| c.flags & CFG_FAST_PASS != 0),
            "natEntries": ferry_bpf::stale::nat_entries_in_use(&maps.ct_entries(), ferry_bpf::stale::monotonic_ns()),
            "conntrackEntries": maps.ct_entries().len(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    // Backends in the live revision of some service; the other revision keeps a
    // removed backend until the service's next change rewrites it.
    let live: BTreeMap<u32, u8> = dump.services.iter().map(|(id, v)| (*id, v.rev)).collect();
    let in_use: std::collections::BTreeSet<u32> =
        dump.slots.iter().filter(|(k, _)| live.get(&k.service) == Some(&k.rev)).map(|(_, b)| *b).collect();
    let held = dump.backends.len().saturating_sub(in_use.len());
    println!(
        "datapath {}: {} service port(s), {} frontend(s), {} backend(s){}",
        args.pin_dir.display(),
        dump.services.len(),
        rows.len(),
        in_use.len(),
        if held > 0 {
            format!(" (+{held} kept by the previous revision until the next change)")
        } else {
            String::new()
        }
    );
    // Columns as wide as their widest cell, so long names and routes stay aligned.
    let width = |head: &str, cell: &dyn Fn(&FrontendRow) -> String| {
        rows.iter().map(|r| cell(r).len()).chain([head.len()]).max().unwrap_or(0)
    };
    let (wf, wk, ws, wr) = (
        width("FRONTEND", &|r| r.frontend.clone()),
        width("KIND", &|r| r.kind.to_string()),
        width("SERVICE", &|r| r.service.clone()),
        width("POD/HOST/OUTSIDE", &|r| r.routes.join("/")),
    );
    println!("\n{:<wf$} {:<wk$} {:<ws$} {:<wr$} BACKENDS", "FRONTEND", "KIND", "SERVICE", "POD/HOST/OUTSIDE");
    for r in &rows {
        let mut backends = r.backends.join(", ");
        if !r.local_backends.is_empty() && r.local_backends != r.backends {
            backends.push_str(&format!(" (local: {})", r.local_backends.join(", ")));
        }
        if backends.is_empty() {
            backends = "none".into();
        }
        println!("{:<wf$} {:<wk$} {:<ws$} {:<wr$} {}", r.frontend, r.kind, r.service, r.routes.join("/"), backends);
    }
    println!();
    for line in acceleration_lines(&xdp, accel.as_ref()) {
        println!("{line}");
    }
    println!("\n{}", masquerade_line(&dump));
    println!("{}", fast_pass_line(&dump, maps.pass_set(ferry_bpf::pass::PassSet::Peers).len()));
    println!("\nmaps (entries / capacity)");
    for f in &fill {
        let pct = if f.capacity > 0 { f.entries as f64 * 100.0 / f.capacity as f64 } else { 0.0 };
        let tunable = crate::datapath::SCALED_MAPS.iter().any(|(m, _)| *m == f.map);
        let warn = if pct >= 90.0 && tunable { "  near full: raise maps.* in the node config" } else { "" };
        let evicted = evictions.iter().find(|(m, _)| *m == f.map).map(|(_, n)| format!("  evicted {n}"));
        println!(
            "  {:<16} {:>9} / {:<9} {pct:5.1}%{warn}{}",
            f.map,
            f.entries,
            f.capacity,
            evicted.unwrap_or_default()
        );
    }
    if refused.is_empty() {
        println!("\nrefused: none");
    } else {
        println!("\nrefused (the rest is programmed; the agent retries service ports with backoff)");
        for r in &refused {
            println!("  {:<12} {}  [{}] {}", r.kind, r.object, r.cause, r.reason);
        }
    }
    println!("\ncounters");
    for (name, value) in &counters {
        println!("  {name:<22} {value}");
    }
    println!("  {:<22} {rev}", "sock_rev_entries");
    println!("  {:<22} {aff}", "affinity_entries");
    println!("  {:<22} {frags}", "fragment_entries");
    let ct = maps.ct_entries();
    println!("  {:<22} {}", "conntrack_entries", ct.len());
    println!("  {:<22} {}", "nat_entries", ferry_bpf::stale::nat_entries_in_use(&ct, ferry_bpf::stale::monotonic_ns()));
    Ok(ExitCode::SUCCESS)
}

/// What plain `ferry status` reads.
struct Plain {
    pin_dir: PathBuf,
    json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_bpf::acceleration::{Fallback, XdpLink};

    fn record(acceleration: &str, fallbacks: &[(&str, &str)]) -> AccelerationRecord {
        AccelerationRecord {
            acceleration: acceleration.into(),
            fallbacks: fallbacks
                .iter()
                .map(|(d, r)| Fallback { device: d.to_string(), reason: r.to_string() })
                .collect(),
        }
    }

    fn dev(name: &str, xdp: Option<XdpLink>) -> DeviceXdp {
        DeviceXdp { device: name.into(), external: true, xdp }
    }

    #[test]
    fn acceleration_lines_name_each_device_state() {
        let link = |mode| Some(XdpLink { link_id: 4, program_id: 40, ifindex: 2, mode });
        let devs = [
            dev("eth0", link(Some(XdpMode::Native))),
            dev("eth1", None),
            dev("eth2", link(None)),
            dev("eth3", Some(XdpLink { ifindex: 0, ..link(None).unwrap() })),
        ];
        let r = record("best-effort", &[("eth1", "Operation not supported")]);
        let lines = acceleration_lines(&devs, Some(&r));
        assert_eq!(lines[0], "acceleration best-effort (the agent's node config), per external device:");
        assert_eq!(lines[1], "  eth0  XDP native, program 40 (link 4)");
        assert_eq!(lines[2], "  eth1  tc only: best-effort fell back (Operation not supported)");
        assert!(lines[3].starts_with("  eth2  XDP attached in driver mode, program 40 (link 4; the device is not in"));
        assert_eq!(lines[4], "  eth3  XDP link 4 detached (its device went away); tc only");
        let native = acceleration_lines(&devs[1..2], Some(&record("native", &[])));
        assert_eq!(native[1], "  eth1  tc only: NO XDP program although acceleration is native (see --verify)");
        let off = acceleration_lines(&devs[1..2], None);
        assert_eq!(off, ["acceleration disabled, per external device:", "  eth1  tc only"]);
        assert!(acceleration_lines(&devs[..1], None)[0].contains("no record"), "links without a record");
        assert_eq!(acceleration_lines(&[], None), ["acceleration disabled: no external devices"]);
        assert_eq!(acceleration_lines(&[], Some(&record("native", &[]))), ["acceleration native: no external devices"]);
    }
}
