//! The node config file (YAML) and the command-line flags that override it.
//!
//! Reading goes: YAML text -> key check against `keys::ROOT` (unknown and
//! renamed keys are errors) -> typed `ConfigFile` -> `NodeConfig`, where every
//! address and range is parsed. Each error names the file and the key.

pub mod agent;
pub mod keys;
pub mod kubeproxy;
pub mod write;

use clap::Args;
use ferry_model::addr::{IpFamily, parse_cidr_sloppy, parse_ip_sloppy};
use ferry_model::node_config::{
    FeatureGates, LocalDetector, MasqueradeMode, NodeConfig, NodePortAddresses, ServiceLimits,
};
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// Everything wrong with a config file, all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<keys::KeyProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid node config {}:", self.source)?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.key, p.message)?;
        }
        write!(f, "\nFix these keys and start again; see the README's \"Configuration\" section for every key.")
    }
}

impl std::error::Error for ConfigError {}

/// The file's typed form. Every field is optional: a flag or a default fills it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    pub node_name: Option<String>,
    #[serde(rename = "nodeIPs")]
    pub node_ips: Option<Vec<String>>,
    #[serde(rename = "primaryIPs")]
    pub primary_ips: Option<Vec<String>>,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
    #[serde(rename = "clusterCIDRs")]
    pub cluster_cidrs: Option<Vec<String>>,
    #[serde(rename = "serviceCIDRs")]
    pub service_cidrs: Option<Vec<String>>,
    pub ip_families: Option<Vec<String>>,
    pub node_port_addresses: Option<Vec<String>>,
    pub localhost_node_ports: Option<bool>,
    pub masquerade_all: Option<bool>,
    pub local_traffic_detector: Option<DetectorFile>,
    pub zone: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub service_proxy_name: Option<String>,
    pub accept_health_check_node_ports: Option<bool>,
    pub datapath: Option<String>,
    pub bpf: Option<BpfFile>,
    pub conntrack: Option<ConntrackFile>,
    pub nat_port_range: Option<String>,
    pub maglev: Option<MaglevFile>,
    pub maps: Option<MapsFile>,
    /// A string (`bpf`, `nftables`, `off`); kept loose so a boolean gets a precise error.
    pub masquerade: Option<Value>,
    #[serde(rename = "nonMasqueradeCIDRs")]
    pub non_masquerade_cidrs: Option<Vec<String>>,
    pub masquerade_link_local: Option<bool>,
    pub node_port_range: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<ExternalIpsFile>,
    pub limits: Option<LimitsFile>,
    pub manifests: Option<ManifestsFile>,
    pub load_balancing: Option<LoadBalancingFile>,
    /// `disabled` (default), `native` or `best-effort`.
    pub acceleration: Option<String>,
}

/// `loadBalancing`: how outside connections reach backends on other nodes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancingFile {
    /// `snat` (default), `dsr` or `hybrid` (`ferry_model::dsr`).
    pub mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManifestsFile {
    pub max_file_bytes: Option<u64>,
    pub max_documents_per_file: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExternalIpsFile {
    #[serde(rename = "allowedCIDRs")]
    pub allowed_cidrs: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsFile {
    pub max_frontends_per_service: Option<u32>,
    pub max_endpoints_per_service: Option<u32>,
}

/// `maps`: capacity (entries) per datapath map; unset ones are sized from node memory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MapsFile {
    pub frontends: Option<u32>,
    pub services: Option<u32>,
    pub slots: Option<u32>,
    pub backends: Option<u32>,
    pub members: Option<u32>,
    pub names: Option<u32>,
    pub conntrack: Option<u32>,
    pub conntrack_unconfirmed: Option<u32>,
    pub affinity: Option<u32>,
    pub socket_reverse: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MaglevFile {
    pub default: Option<bool>,
    pub table_size: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConntrackFile {
    pub tcp_syn_timeout: Option<String>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub udp_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BpfFile {
    pub pin_path: Option<PathBuf>,
    pub cgroup_path: Option<PathBuf>,
    pub devices: Option<Vec<String>>,
    pub pod_devices: Option<Vec<String>>,
    pub defrag_loop: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectorFile {
    pub mode: Option<String>,
    pub interface_name_prefix: Option<String>,
    pub bridge_interface: Option<String>,
}

/// Which datapath programs the Plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathChoice {
    /// The eBPF datapath (socket hooks, tc programs).
    Bpf,
    /// nftables tables ferry owns, for hosts where BPF is not allowed.
    Nftables,
}

/// Settings of the eBPF datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfSettings {
    /// Pin directory on bpffs; maps and links live here.
    pub pin_path: PathBuf,
    /// cgroup v2 directory whose sockets get socket-level load balancing;
    /// `None`: the cgroup2 mount root (every process on the node).
    pub cgroup_path: Option<PathBuf>,
    /// Uplinks carrying the per-packet programs; `None`: every interface holding a node IP.
    pub devices: Option<Vec<String>>,
    /// Pod-facing devices; `None`: the bridge of `localTrafficDetector: BridgeInterface`, else none.
    pub pod_devices: Option<Vec<String>>,
    /// Make the defrag loop (README, "The defrag loop").
    pub defrag_loop: bool,
    pub timeouts: ferry_bpf::CtTimeouts,
    /// SNAT source ports (inclusive).
    pub nat_ports: (u16, u16),
    /// NodePort range of the cluster, only to check `natPortRange` against it.
    pub node_ports: (u16, u16),
    /// Maglev for services without a `ferry.io/lb-algorithm` annotation.
    pub maglev_default: bool,
    /// Slots per Maglev table (a prime from `ferry_model::maglev::TABLE_SIZES`).
    pub maglev_size: u32,
    /// Capacities set in the config file (`maps.*`), by pinned map name;
    /// the others are sized from node memory at install (`datapath::map_capacities`).
    pub map_capacities: Vec<(String, u32)>,
}

impl Default for BpfSettings {
    fn default() -> Self {
        BpfSettings {
            pin_path: PathBuf::from("/sys/fs/bpf/ferry"),
            cgroup_path: None,
            devices: None,
            pod_devices: None,
            defrag_loop: true,
            timeouts: ferry_bpf::CtTimeouts::default(),
            nat_ports: (1024, 29999),
            node_ports: (30000, 32767),
            maglev_default: false,
            maglev_size: ferry_model::maglev::DEFAULT_TABLE_SIZE,
            map_capacities: Vec::new(),
        }
    }
}

/// Parses a Kubernetes/Go duration ("24h", "1h30m", "90s", "24h0m0s") to whole seconds.
pub fn parse_duration_secs(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (mut total, mut num) = (0u64, String::new());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                0
            }
            ('h', _) => 3600,
            ('m', _) => 60,
            ('s', _) => 1,
            _ => return None,
        };
        let n: u64 = num.parse().ok()?;
        num.clear();
        total += n * unit;
    }
    if !num.is_empty() {
        return None;
    }
    u32::try_from(total).ok()
}

fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.trim().split_once('-')?;
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a >= 1 && a <= b).then_some((a, b))
}

/// Everything the config file and flags say.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: NodeConfig,
    pub datapath: DatapathChoice,
    pub bpf: BpfSettings,
    /// What only `ferry agent` reads (health, metrics, sync periods, API server).
    pub agent: agent::AgentSettings,
    /// Bounds on each manifest file (`ferry run`, `ferry explain`).
    pub manifests: ferry_k8s::manifests::LoadLimits,
}

/// Flags that override the config file. Lists replace the file's list.
#[derive(Debug, Default, Clone, Args)]
pub struct NodeFlags {
    /// Node config file (YAML). See the README for every key.
    #[arg(long, value_name = "FILE")]
    pub node_config: Option<PathBuf>,
    /// This node's name (endpoints with this nodeName are local).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// An address of this node; repeat for several.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<String>,
    /// Pod range of the whole cluster; repeat for dual-stack.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    pub cluster_cidrs: Vec<String>,
    /// Service range; an unallocated address inside it is dropped.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<String>,
    /// Addresses that serve NodePorts: CIDRs or `primary`; repeat for several.
    #[arg(long = "node-port-address", value_name = "CIDR|primary")]
    pub node_port_addresses: Vec<String>,
    /// Masquerade every service connection.
    #[arg(long)]
    pub masquerade_all: bool,
}

struct Builder<'a> {
    source: &'a str,
    problems: Vec<keys::KeyProblem>,
}

impl Builder<'_> {
    fn bad(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(keys::KeyProblem { key: key.into(), message: message.into() });
    }

    fn ips(&mut self, key: &str, list: &[String]) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            match parse_ip_sloppy(s.trim()) {
                Some(ip) => out.push(ip),
                None => self.bad(format!("{key}[{i}]"), format!("{s:?} is not an IP address")),
            }
        }
        out
    }

    fn cidrs(&mut self, key: &str, list: &[String]) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            match parse_cidr_sloppy(s) {
                Some(n) => out.push(n),
                None => self.bad(format!("{key}[{i}]"), format!("{s:?} is not a CIDR (like 10.244.0.0/16)")),
            }
        }
        out
    }
}

/// Parses config text. `source` names the file in messages.
pub fn parse_file(source: &str, text: &str) -> Result<ConfigFile, ConfigError> {
    let fail = |key: &str, message: String| ConfigError {
        source: source.to_string(),
        problems: vec![keys::KeyProblem { key: key.to_string(), message }],
    };
    let doc: Value = if text.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_saphyr::from_str(text).map_err(|e| fail("(document)", format!("not valid YAML: {e}")))?
    };
    if !doc.is_object() {
        return Err(fail("(document)", "must be a mapping of keys to values".into()));
    }
    let mut problems = Vec::new();
    keys::check(&doc, &keys::ROOT, "", &mut problems);
    if !problems.is_empty() {
        return Err(ConfigError { source: source.to_string(), problems });
    }
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let key = e.path().to_string();
        fail(&key, e.into_inner().to_string())
    })
}

/// Reads the config file (if any), applies flags, and builds the `NodeConfig`.
pub fn node_config(flags: &NodeFlags) -> Result<NodeConfig, anyhow::Error> {
    Ok(settings(flags)?.node)
}

/// Reads the config file (if any), applies flags, and builds every setting.
pub fn settings(flags: &NodeFlags) -> Result<Settings, anyhow::Error> {
    let (source, file) = match &flags.node_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read node config {}: {e}", path.display()))?;
            let source = path.display().to_string();
            let file = parse_file(&source, &text)?;
            (source, file)
        }
        None => ("(flags)".to_string(), ConfigFile::default()),
    };
    Ok(build(&source, file, flags)?)
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn masquerade_is_explicit_and_renamed_keys_name_their_replacement() {
        let parse = |t: &str| parse_file("m.yaml", t).and_then(|f| build("m.yaml", f, &NodeFlags::default()));
        assert_eq!(parse("nodeName: a\n").unwrap().node.masquerade, MasqueradeMode::Off);
        use ferry_model::LoadBalancingMode as Lb;
        assert_eq!(parse("nodeName: a\n").unwrap().node.load_balancing, Lb::Snat, "snat by default");
        assert_eq!(parse("loadBalancing: {mode: dsr}\n").unwrap().node.load_balancing, Lb::Dsr);
        assert_eq!(parse("loadBalancing: {mode: hybrid}\n").unwrap().node.load_balancing, Lb::Hybrid);
        assert_eq!(parse("loadBalancing: {mode: snat}\n").unwrap().node.load_balancing, Lb::Snat);
        for bad in ["loadBalancing: {mode: DSR}\n", "loadBalancing: {mode: dsr}\ndatapath: nftables\n"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.problems[0].key, "loadBalancing.mode", "{bad}: {e}");
        }
        assert_eq!(parse("loadBalancing: {dsr: true}\n").unwrap_err().problems[0].key, "loadBalancing.dsr");
        assert_eq!(parse("masquerade: bpf\n").unwrap().node.masquerade, MasqueradeMode::Bpf);
        assert_eq!(parse("masquerade: nftables\n").unwrap().node.masquerade, MasqueradeMode::Nftables);
        assert_eq!(parse("masquerade: \"off\"\n").unwrap().node.masquerade, MasqueradeMode::Off);
        assert_eq!(parse("masquerade: off\n").unwrap().node.masquerade, MasqueradeMode::Off);
        let e = parse("masquerade: true\n").unwrap_err();
        assert!(e.problems[0].message.contains("does not say who masquerades"), "{e}");
        let e = parse("enableIPv4Masquerade: true\n").unwrap_err();
        assert_eq!(e.problems[0].key, "enableIPv4Masquerade");
        assert!(e.problems[0].message.contains("use masquerade: bpf | nftables | off"), "{e}");
        let e = parse("nativeRoutingCIDR: 10.20.30.0/24\n").unwrap_err();
        assert!(e.problems[0].message.contains("nonMasqueradeCIDRs"), "{e}");
        let e = parse("masqueradeCidrs: [10.0.0.0/8]\n").unwrap_err();
        assert!(e.problems[0].message.contains("did you mean nonMasqueradeCIDRs?"), "{e}");
        let s = parse("masquerade: bpf\nnonMasqueradeCIDRs: [10.20.30.0/24]\nmasqueradeLinkLocal: true\n").unwrap();
        assert_eq!(s.node.non_masquerade_cidrs.len(), 1);
        assert!(s.node.masquerade_link_local);
    }

    #[test]
    fn durations_parse_like_kubernetes() {
        assert_eq!(parse_duration_secs("24h0m0s"), Some(86400));
        assert_eq!(parse_duration_secs("1h30m"), Some(5400));
        assert_eq!(parse_duration_secs("30s"), Some(30));
        assert_eq!(parse_duration_secs("500ms"), Some(0));
        assert_eq!(parse_duration_secs("30"), None);
        assert_eq!(parse_duration_secs("3d"), None);
    }

    #[test]
    fn conntrack_and_port_ranges_are_checked() {
        let file =
            parse_file("n.yaml", "conntrack: {udpTimeout: 5s, tcpEstablishedTimeout: 1h}\nnatPortRange: 40000-50000\n")
                .unwrap();
        let s = build("n.yaml", file, &NodeFlags::default()).unwrap();
        assert_eq!(s.bpf.timeouts.udp, 5);
        assert_eq!(s.bpf.timeouts.tcp_established, 3600);
        assert_eq!(s.bpf.nat_ports, (40000, 50000));
        let file = parse_file("n.yaml", "maglev: {default: true, tableSize: 1000}\n").unwrap();
        assert_eq!(build("n.yaml", file, &NodeFlags::default()).unwrap_err().problems[0].key, "maglev.tableSize");
        let file = parse_file("n.yaml", "natPortRange: 30000-40000\n").unwrap();
        let e = build("n.yaml", file, &NodeFlags::default()).unwrap_err();
        assert!(e.problems[0].message.contains("overlaps the NodePort range"), "{e}");
        let file = parse_file("n.yaml", "conntrack: {udpTimeout: soon}\n").unwrap();
        assert_eq!(build("n.yaml", file, &NodeFlags::default()).unwrap_err().problems[0].key, "conntrack.udpTimeout");
    }

    #[test]
    fn bpf_settings_parse_and_are_checked() {
        let file = parse_file("n.yaml", "bpf: {pinPath: /sys/fs/bpf/ferry-x, cgroupPath: /sys/fs/cgroup/unified/x}\n")
            .unwrap();
        let s = build("n.yaml", file, &NodeFlags::default()).unwrap();
        assert_eq!(s.bpf.pin_path, PathBuf::from("/sys/fs/bpf/ferry-x"));
        assert!(s.bpf.defrag_loop, "the defrag loop is on unless turned off");
        let file = parse_file("n.yaml", "bpf: {defragLoop: false}\n").unwrap();
        assert!(!build("n.yaml", file, &NodeFlags::default()).unwrap().bpf.defrag_loop);
        let e = parse_file("n.yaml", "bpf: {defragLoop: sometimes}\n").unwrap_err();
        assert!(e.to_string().contains("defragLoop"), "{e}");
        let file = parse_file("n.yaml", "bpf: {pinPath: /tmp/x}\n").unwrap();
        let e = build("n.yaml", file, &NodeFlags::default()).unwrap_err();
        assert_eq!(e.problems[0].key, "bpf.pinPath");
        let e = parse_file("n.yaml", "bpf: {pinDir: /sys/fs/bpf/x}\n").unwrap_err();
        assert!(e.problems[0].message.contains("use bpf.pinPath"), "{e}");
        let file = parse_file("n.yaml", "datapath: iptables\n").unwrap();
        assert_eq!(build("n.yaml", file, &NodeFlags::default()).unwrap_err().problems[0].key, "datapath");
    }

    #[test]
    fn acceleration_is_disabled_native_or_best_effort() {
        use ferry_model::Acceleration as A;
        let parse =
            |t: &str| parse_file("a.yaml", t).and_then(|f| build("a.yaml", f, &NodeFlags::default())).map(|s| s.node);
        assert_eq!(parse("nodeName: a\n").unwrap().acceleration, A::Disabled, "disabled by default");
        assert_eq!(parse("acceleration: native\n").unwrap().acceleration, A::Native);
        assert_eq!(parse("acceleration: best-effort\n").unwrap().acceleration, A::BestEffort);
        assert_eq!(parse("acceleration: disabled\n").unwrap().acceleration, A::Disabled);
        assert_eq!(parse("acceleration: disabled\ndatapath: nftables\n").unwrap().acceleration, A::Disabled);
        for bad in ["acceleration: xdp\n", "acceleration: true\n", "acceleration: native\ndatapath: nftables\n"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.problems[0].key, "acceleration", "{bad}: {e}");
        }
    }
}

/// Turns a parsed file plus flags into `Settings`.
pub fn build(source: &str, file: ConfigFile, flags: &NodeFlags) -> Result<Settings, ConfigError> {
    let mut b = Builder { source, problems: Vec::new() };
    let datapath = match file.datapath.as_deref() {
        None | Some("bpf") => DatapathChoice::Bpf,
        Some("nftables") => DatapathChoice::Nftables,
        Some(other) => {
            b.bad("datapath", format!("{other:?} is not a datapath ferry has; use bpf or nftables"));
            DatapathChoice::Bpf
        }
    };
    let mut bpf = BpfSettings::default();
    if let Some(f) = file.bpf {
        if let Some(p) = f.pin_path {
            if !p.starts_with("/sys/fs/bpf/") {
                b.bad("bpf.pinPath", format!("{} is not below /sys/fs/bpf (pins must live on bpffs)", p.display()));
            }
            bpf.pin_path = p;
        }
        bpf.cgroup_path = f.cgroup_path;
        bpf.devices = f.devices;
        bpf.pod_devices = f.pod_devices;
        bpf.defrag_loop = f.defrag_loop.unwrap_or(true);
    }
    if let Some(m) = file.maps {
        let keys = [
            ("frontends", "ferry_frontends", m.frontends),
            ("services", "ferry_services", m.services),
            ("slots", "ferry_slots", m.slots),
            ("backends", "ferry_backends", m.backends),
            ("members", "ferry_members", m.members),
            ("names", "ferry_names", m.names),
            ("conntrack", "ferry_ct", m.conntrack),
            ("conntrackUnconfirmed", "ferry_ct_new", m.conntrack_unconfirmed),
            ("affinity", "ferry_affinity", m.affinity),
            ("socketReverse", "ferry_sock_rev", m.socket_reverse),
        ];
        for (key, map, n) in keys {
            let Some(n) = n else { continue };
            if n < 16 {
                b.bad(format!("maps.{key}"), format!("{n} is below 16 entries; nothing useful fits"));
            }
            bpf.map_capacities.push((map.to_string(), n));
        }
    }
    if let Some(m) = file.maglev {
        bpf.maglev_default = m.default.unwrap_or(false);
        if let Some(size) = m.table_size {
            if ferry_model::maglev::TABLE_SIZES.contains(&size) {
                bpf.maglev_size = size;
            } else {
                let sizes: Vec<String> = ferry_model::maglev::TABLE_SIZES.iter().map(|s| s.to_string()).collect();
                b.bad("maglev.tableSize", format!("{size} is not one of the supported primes: {}", sizes.join(", ")));
            }
        }
    }
    if let Some(ct) = file.conntrack {
        let mut set = |key: &str, v: Option<String>, slot: &mut u32| {
            if let Some(v) = v {
                match parse_duration_secs(&v) {
                    Some(secs) if secs > 0 => *slot = secs,
                    _ => b.bad(
                        format!("conntrack.{key}"),
                        format!("{v:?} is not a positive duration like 30s, 1h or 24h0m0s"),
                    ),
                }
            }
        };
        let t = &mut bpf.timeouts;
        set("tcpSynTimeout", ct.tcp_syn_timeout, &mut t.tcp_syn);
        set("tcpEstablishedTimeout", ct.tcp_established_timeout, &mut t.tcp_established);
        set("tcpCloseWaitTimeout", ct.tcp_close_wait_timeout, &mut t.tcp_close);
        set("udpTimeout", ct.udp_timeout, &mut t.udp);
    }
    for (key, value, slot) in [
        ("natPortRange", file.nat_port_range, &mut bpf.nat_ports),
        ("nodePortRange", file.node_port_range, &mut bpf.node_ports),
    ] {
        if let Some(v) = value {
            match parse_port_range(&v) {
                Some(r) => *slot = r,
                None => b.bad(key, format!("{v:?} is not a port range like 1024-29999")),
            }
        }
    }
    if bpf.nat_ports.0 <= bpf.node_ports.1 && bpf.node_ports.0 <= bpf.nat_ports.1 {
        b.bad(
            "natPortRange",
            format!(
                "{}-{} overlaps the NodePort range {}-{}; SNAT ports must never collide with NodePorts",
                bpf.nat_ports.0, bpf.nat_ports.1, bpf.node_ports.0, bpf.node_ports.1
            ),
        );
    }
    let pick = |flag: &Vec<String>, file: Option<Vec<String>>| {
        if flag.is_empty() { file.unwrap_or_default() } else { flag.clone() }
    };
    let mut cfg = NodeConfig {
        node_name: flags.node_name.clone().or(file.node_name).unwrap_or_default(),
        ..NodeConfig::default()
    };
    cfg.node_ips = b.ips("nodeIPs", &pick(&flags.node_ips, file.node_ips));
    cfg.primary_ips = b.ips("primaryIPs", &file.primary_ips.unwrap_or_default());
    for fam in IpFamily::ALL {
        if cfg.primary_ips.iter().filter(|ip| IpFamily::of(ip) == fam).count() > 1 {
            b.bad(
                "primaryIPs",
                format!("lists more than one {fam} address; a node has one primary address per family"),
            );
        }
    }
    cfg.pod_cidrs = b.cidrs("podCIDRs", &file.pod_cidrs.unwrap_or_default());
    cfg.cluster_cidrs = b.cidrs("clusterCIDRs", &pick(&flags.cluster_cidrs, file.cluster_cidrs));
    cfg.service_cidrs = b.cidrs("serviceCIDRs", &pick(&flags.service_cidrs, file.service_cidrs));
    if let Some(fams) = file.ip_families {
        cfg.ip_families.clear();
        for (i, f) in fams.iter().enumerate() {
            match IpFamily::from_k8s(f) {
                Some(f) if !cfg.ip_families.contains(&f) => cfg.ip_families.push(f),
                Some(_) => b.bad(format!("ipFamilies[{i}]"), format!("{f} is listed twice")),
                None => b.bad(format!("ipFamilies[{i}]"), format!("{f:?} is not IPv4 or IPv6")),
            }
        }
        if cfg.ip_families.is_empty() {
            b.bad("ipFamilies", "is empty; list IPv4, IPv6 or both");
        }
    }
    let npa = pick(&flags.node_port_addresses, file.node_port_addresses);
    if !npa.is_empty() {
        let primary = npa.iter().any(|s| s.trim() == "primary");
        let listed: Vec<String> = npa.iter().filter(|s| s.trim() != "primary").cloned().collect();
        cfg.node_port_addresses = NodePortAddresses { primary, cidrs: b.cidrs("nodePortAddresses", &listed) };
    }
    cfg.localhost_node_ports = file.localhost_node_ports.unwrap_or(false);
    cfg.masquerade_all = flags.masquerade_all || file.masquerade_all.unwrap_or(false);
    if let Some(d) = file.local_traffic_detector {
        cfg.local_detector = match d.mode.as_deref().unwrap_or("ClusterCIDR") {
            "ClusterCIDR" => LocalDetector::ClusterCidr,
            "NodeCIDR" => LocalDetector::NodeCidr,
            "InterfaceNamePrefix" => match d.interface_name_prefix.filter(|p| !p.is_empty()) {
                Some(p) => LocalDetector::InterfaceNamePrefix(p),
                None => {
                    b.bad("localTrafficDetector.interfaceNamePrefix", "is required with mode InterfaceNamePrefix");
                    LocalDetector::None
                }
            },
            "BridgeInterface" => match d.bridge_interface.filter(|p| !p.is_empty()) {
                Some(p) => LocalDetector::BridgeInterface(p),
                None => {
                    b.bad("localTrafficDetector.bridgeInterface", "is required with mode BridgeInterface");
                    LocalDetector::None
                }
            },
            "None" => LocalDetector::None,
            other => {
                b.bad(
                    "localTrafficDetector.mode",
                    format!("{other:?} is not ClusterCIDR, NodeCIDR, InterfaceNamePrefix, BridgeInterface or None"),
                );
                LocalDetector::None
            }
        };
    }
    if cfg.local_detector == LocalDetector::ClusterCidr && cfg.cluster_cidrs.is_empty() && b.problems.is_empty() {
        // kube-proxy runs without a detector in this case; say so rather than guess.
        cfg.local_detector = LocalDetector::None;
    }
    cfg.zone = file.zone.filter(|z| !z.is_empty());
    let mut gates = FeatureGates::default();
    for (name, on) in file.feature_gates.unwrap_or_default() {
        match name.as_str() {
            "PreferSameTrafficDistribution" => gates.prefer_same_traffic_distribution = on,
            other => {
                b.bad(format!("featureGates.{other}"), "unknown feature gate; known: PreferSameTrafficDistribution")
            }
        }
    }
    cfg.feature_gates = gates;
    cfg.service_proxy_name = file.service_proxy_name.filter(|s| !s.is_empty());
    cfg.accept_health_check_node_ports = file.accept_health_check_node_ports.unwrap_or(false);
    cfg.masquerade = match &file.masquerade {
        None => MasqueradeMode::Off,
        Some(Value::String(s)) => match s.as_str() {
            "off" => MasqueradeMode::Off,
            "bpf" => MasqueradeMode::Bpf,
            "nftables" => MasqueradeMode::Nftables,
            other => {
                b.bad("masquerade", format!("{other:?} is not bpf, nftables or off"));
                MasqueradeMode::Off
            }
        },
        // YAML reads an unquoted `off` / `no` / `false` as false: that is an explicit "off".
        Some(Value::Bool(false)) => MasqueradeMode::Off,
        Some(Value::Bool(true)) => {
            b.bad(
                "masquerade",
                "true does not say who masquerades: write `masquerade: bpf` or `masquerade: nftables` (or `off`)",
            );
            MasqueradeMode::Off
        }
        Some(other) => {
            b.bad("masquerade", format!("{other} is not bpf, nftables or off"));
            MasqueradeMode::Off
        }
    };
    cfg.non_masquerade_cidrs = b.cidrs("nonMasqueradeCIDRs", &file.non_masquerade_cidrs.unwrap_or_default());
    cfg.masquerade_link_local = file.masquerade_link_local.unwrap_or(false);
    if let Some(e) = file.external_ips
        && let Some(list) = e.allowed_cidrs
    {
        cfg.external_ips_allowed = Some(b.cidrs("externalIPs.allowedCIDRs", &list));
    }
    if let Some(l) = file.limits {
        let ceiling = ServiceLimits::SLOT_CEILING;
        if let Some(n) = l.max_frontends_per_service {
            if n == 0 {
                b.bad("limits.maxFrontendsPerService", "is 0; a Service has at least its ClusterIP");
            }
            cfg.service_limits.max_frontends = n;
        }
        if let Some(n) = l.max_endpoints_per_service {
            if n > ceiling {
                b.bad(
                    "limits.maxEndpointsPerService",
                    format!("{n} is over {ceiling}, the most one backend set can hold (16-bit slot numbers)"),
                );
            }
            cfg.service_limits.max_endpoints = n;
        }
    }
    if let Some(mode) = file.load_balancing.and_then(|l| l.mode) {
        match ferry_model::LoadBalancingMode::parse(&mode) {
            Some(m) if m != ferry_model::LoadBalancingMode::Snat && datapath == DatapathChoice::Nftables => b.bad(
                "loadBalancing.mode",
                format!("{mode} needs the bpf datapath (the nftables datapath has only snat); use datapath: bpf or loadBalancing.mode: snat"),
            ),
            Some(m) => cfg.load_balancing = m,
            None => b.bad("loadBalancing.mode", format!("{mode:?} is not snat, dsr or hybrid")),
        }
    }
    if let Some(a) = file.acceleration {
        use ferry_model::Acceleration;
        match Acceleration::parse(&a) {
            Some(m) if m != Acceleration::Disabled && datapath == DatapathChoice::Nftables => b.bad(
                "acceleration",
                format!("{a} needs the bpf datapath (XDP programs); use datapath: bpf or acceleration: disabled"),
            ),
            Some(m) => cfg.acceleration = m,
            None => b.bad("acceleration", format!("{a:?} is not disabled, native or best-effort")),
        }
    }
    let mut manifests = ferry_k8s::manifests::LoadLimits::default();
    if let Some(m) = file.manifests {
        if let Some(n) = m.max_file_bytes {
            if n == 0 {
                b.bad("manifests.maxFileBytes", "is 0; no manifest could be read");
            }
            manifests.max_file_bytes = n;
        }
        if let Some(n) = m.max_documents_per_file {
            if n == 0 {
                b.bad("manifests.maxDocumentsPerFile", "is 0; no manifest could be read");
            }
            manifests.max_documents = n;
        }
    }
    let agent = agent::AgentFile {
        healthz_bind_address: file.healthz_bind_address,
        metrics_bind_address: file.metrics_bind_address,
        bind_address_hard_fail: file.bind_address_hard_fail,
        min_sync_period: file.min_sync_period,
        sync_period: file.sync_period,
        kubeconfig: file.kubeconfig,
    }
    .build(&mut b.problems);
    if b.problems.is_empty() {
        Ok(Settings { node: cfg, datapath, bpf, agent, manifests })
    } else {
        Err(ConfigError { source: b.source.to_string(), problems: b.problems })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        let file = parse_file("node.yaml", text)?;
        build("node.yaml", file, &NodeFlags::default()).map(|s| s.node)
    }

    #[test]
    fn a_full_file_parses() {
        let cfg = parse(
            "nodeName: a\nnodeIPs: [192.168.0.2, 2001:db8::1]\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/12]\nnodePortAddresses: [primary, 192.168.0.0/16]\nlocalTrafficDetector: {mode: ClusterCIDR}\n",
        )
        .unwrap();
        assert_eq!(cfg.node_name, "a");
        assert_eq!(cfg.node_ips.len(), 2);
        assert!(cfg.node_port_addresses.primary);
        assert_eq!(cfg.node_port_addresses.cidrs.len(), 1);
        assert_eq!(cfg.local_detector, LocalDetector::ClusterCidr);
    }

    #[test]
    fn a_misspelled_key_is_refused_with_a_suggestion() {
        let err = parse("nodeName: a\nmasqueradAll: true\n").unwrap_err();
        assert_eq!(err.problems[0].key, "masqueradAll");
        assert!(err.problems[0].message.contains("did you mean masqueradeAll?"), "{err}");
        assert!(err.to_string().contains("node.yaml"));
    }

    #[test]
    fn a_renamed_key_names_its_replacement() {
        let err = parse("clusterCIDR: 10.0.0.0/8\n").unwrap_err();
        assert!(err.problems[0].message.contains("use clusterCIDRs"), "{err}");
    }

    #[test]
    fn nested_unknown_keys_are_refused() {
        let err = parse("localTrafficDetector: {mode: ClusterCIDR, cidr: 10.0.0.0/8}\n").unwrap_err();
        assert_eq!(err.problems[0].key, "localTrafficDetector.cidr");
    }

    #[test]
    fn map_capacities_are_read_checked_and_unknown_ones_refused() {
        let file =
            parse_file("node.yaml", "nodeName: a\nnodeIPs: [10.0.0.1]\nmaps: {services: 1000, conntrack: 65536}\n")
                .unwrap();
        let bpf = build("node.yaml", file, &NodeFlags::default()).unwrap().bpf;
        assert_eq!(bpf.map_capacities, vec![("ferry_services".into(), 1000), ("ferry_ct".into(), 65536)]);
        let err = parse("maps: {servics: 1000}\n").unwrap_err();
        assert_eq!(err.problems[0].key, "maps.servics", "{err}");
        let file = parse_file("node.yaml", "nodeName: a\nnodeIPs: [10.0.0.1]\nmaps: {frontends: 3}\n").unwrap();
        let err = build("node.yaml", file, &NodeFlags::default()).unwrap_err();
        assert!(format!("{err:#}").contains("maps.frontends"), "{err:#}");
    }

    #[test]
    fn bad_values_name_the_key_and_index() {
        let err = parse("nodeIPs: [192.168.0.2, 300.1.1.1]\nserviceCIDRs: [10.96.0.0]\n").unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["nodeIPs[1]", "serviceCIDRs[0]"]);
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = parse("masqueradeAll: 'often'\n").unwrap_err();
        assert_eq!(err.problems[0].key, "masqueradeAll", "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse_file("node.yaml", "nodeName: a\nnodeIPs: [10.0.0.1]\n").unwrap();
        let flags = NodeFlags { node_name: Some("b".into()), node_ips: vec!["10.0.0.2".into()], ..Default::default() };
        let cfg = build("node.yaml", file, &flags).unwrap().node;
        assert_eq!(cfg.node_name, "b");
        assert_eq!(cfg.node_ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn every_schema_key_is_read_by_the_typed_file() {
        // A key listed in the schema but missing from ConfigFile would pass the
        // key check and then fail deserialisation: catch that here.
        for (key, sub) in keys::ROOT.keys {
            let value = if sub.is_some() { "{}" } else { "null" };
            parse_file("t.yaml", &format!("{key}: {value}\n")).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }
}
