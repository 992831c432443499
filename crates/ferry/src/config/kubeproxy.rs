//! Reading kube-proxy's own config file (`KubeProxyConfiguration`,
//! kubeproxy.config.k8s.io/v1alpha1), so an operator can hand ferry the file
//! kube-proxy used.
//!
//! Every field kube-proxy knows is listed in [`ROOT`] with what ferry does with
//! it: mapped onto a node-config key, or ignored for a stated reason. The
//! result of [`translate`] is a document in ferry's own node-config schema,
//! checked by the same code as a node config file, plus the list of ignored
//! fields that the agent logs once at start. Fields kube-proxy does not know
//! are errors, as they are in ferry's own file.
//!
//! kube-proxy keeps `syncPeriod`, `minSyncPeriod` and `masqueradeAll` in the
//! section of its `mode` (`iptables`, `ipvs`, `nftables`); ferry reads them
//! from the same section kube-proxy would, and reports the other sections'
//! values as ignored.

use super::ConfigError;
use super::agent::parse_go_duration;
use super::keys::KeyProblem;
use ferry_model::addr::{parse_cidr_sloppy, parse_ip_sloppy};
use serde_json::{Map, Value, json};
use std::fmt;

/// The only version of the file ferry reads (the one kube-proxy reads).
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The file's `kind`.
pub const KIND: &str = "KubeProxyConfiguration";

/// What ferry does with one kube-proxy field.
pub enum Rule {
    /// Translated onto a node-config key.
    Mapped,
    /// Translated when `mode` is one of these (`""` is kube-proxy's default,
    /// iptables); otherwise ignored, since kube-proxy would not read it either.
    ForModes(&'static [&'static str]),
    /// Not acted on, for this reason (reported when set to anything but its zero value).
    Ignored(&'static str),
    /// A nested section with its own fields.
    Section(&'static [(&'static str, Rule)]),
    /// A nested section ignored as a whole (its content is free-form).
    IgnoredSection(&'static str),
}

const WINDOWS: &str = "Windows only; ferry runs on Linux";
const NO_MARKS: &str = "ferry's eBPF datapath marks no packets: it masquerades in eBPF, not through an iptables mark";

static CLIENT_CONNECTION: &[(&str, Rule)] = &[
    ("kubeconfig", Rule::Mapped),
    ("acceptContentTypes", Rule::Ignored("ferry's Kubernetes client always talks JSON with the API server")),
    ("contentType", Rule::Ignored("ferry's Kubernetes client always talks JSON with the API server")),
    (
        "qps",
        Rule::Ignored(
            "ferry only lists and watches (a handful of requests per relist), so it has no client-side rate limit",
        ),
    ),
    (
        "burst",
        Rule::Ignored(
            "ferry only lists and watches (a handful of requests per relist), so it has no client-side rate limit",
        ),
    ),
];

static IPTABLES: &[(&str, Rule)] = &[
    ("masqueradeBit", Rule::Ignored(NO_MARKS)),
    ("masqueradeAll", Rule::ForModes(&["", "iptables", "ipvs"])),
    ("localhostNodePorts", Rule::ForModes(&["", "iptables"])),
    (
        "snatNodeInternalIP",
        Rule::Ignored(
            "ferry SNATs to the node's primary address (or the egress device's address); there is nothing to choose",
        ),
    ),
    ("syncPeriod", Rule::ForModes(&["", "iptables"])),
    ("minSyncPeriod", Rule::ForModes(&["", "iptables"])),
];

const IPVS_ONLY: &str = "IPVS only; ferry's eBPF datapath does not use IPVS";
static IPVS: &[(&str, Rule)] = &[
    ("syncPeriod", Rule::ForModes(&["ipvs"])),
    ("minSyncPeriod", Rule::ForModes(&["ipvs"])),
    (
        "scheduler",
        Rule::Ignored(
            "ferry picks backends at random per connection (or by session affinity), as kube-proxy's iptables and nftables modes do",
        ),
    ),
    ("excludeCIDRs", Rule::Ignored(IPVS_ONLY)),
    (
        "strictARP",
        Rule::Ignored("ferry creates no kube-ipvs0 dummy interface, so there are no ARP replies to restrict"),
    ),
    ("tcpTimeout", Rule::Ignored("IPVS only; ferry's flow lifetimes are under conntrack")),
    ("tcpFinTimeout", Rule::Ignored("IPVS only; ferry's flow lifetimes are under conntrack")),
    ("udpTimeout", Rule::Ignored("IPVS only; ferry's flow lifetimes are under conntrack")),
];

static NFTABLES: &[(&str, Rule)] = &[
    ("masqueradeBit", Rule::Ignored(NO_MARKS)),
    ("masqueradeAll", Rule::ForModes(&["nftables"])),
    ("syncPeriod", Rule::ForModes(&["nftables"])),
    ("minSyncPeriod", Rule::ForModes(&["nftables"])),
];

static WINKERNEL: &[(&str, Rule)] = &[
    ("networkName", Rule::Ignored(WINDOWS)),
    ("sourceVip", Rule::Ignored(WINDOWS)),
    ("enableDSR", Rule::Ignored(WINDOWS)),
    ("rootHnsEndpointName", Rule::Ignored(WINDOWS)),
    ("forwardHealthCheckVip", Rule::Ignored(WINDOWS)),
];

static DETECT_LOCAL: &[(&str, Rule)] = &[("bridgeInterface", Rule::Mapped), ("interfaceNamePrefix", Rule::Mapped)];

static CONNTRACK: &[(&str, Rule)] = &[
    (
        "maxPerCore",
        Rule::Ignored(
            "ferry does not resize the kernel's conntrack table: service flows are tracked in its own BPF map",
        ),
    ),
    (
        "min",
        Rule::Ignored(
            "ferry does not resize the kernel's conntrack table: service flows are tracked in its own BPF map",
        ),
    ),
    ("tcpEstablishedTimeout", Rule::Mapped),
    ("tcpCloseWaitTimeout", Rule::Mapped),
    (
        "tcpBeLiberal",
        Rule::Ignored("ferry's BPF connection tracker does not check TCP windows, so there is nothing to relax"),
    ),
    ("udpTimeout", Rule::Mapped),
    (
        "udpStreamTimeout",
        Rule::Ignored("ferry's BPF connection tracker keeps one lifetime for UDP flows; set conntrack.udpTimeout"),
    ),
];

/// Every field of KubeProxyConfiguration v1alpha1 and what ferry does with it.
pub static ROOT: &[(&str, Rule)] = &[
    ("apiVersion", Rule::Mapped),
    ("kind", Rule::Mapped),
    ("featureGates", Rule::Mapped),
    ("clientConnection", Rule::Section(CLIENT_CONNECTION)),
    (
        "logging",
        Rule::IgnoredSection(
            "ferry logs to stderr; choose the level with the FERRY_LOG environment variable (e.g. FERRY_LOG=debug)",
        ),
    ),
    ("hostnameOverride", Rule::Mapped),
    ("bindAddress", Rule::Mapped),
    ("healthzBindAddress", Rule::Mapped),
    ("metricsBindAddress", Rule::Mapped),
    ("bindAddressHardFail", Rule::Mapped),
    ("enableProfiling", Rule::Ignored("ferry serves no /debug/pprof handlers")),
    ("showHiddenMetricsForVersion", Rule::Ignored("ferry has no hidden (deprecated) metrics to show")),
    ("mode", Rule::Mapped),
    ("iptables", Rule::Section(IPTABLES)),
    ("ipvs", Rule::Section(IPVS)),
    ("nftables", Rule::Section(NFTABLES)),
    ("winkernel", Rule::Section(WINKERNEL)),
    ("detectLocalMode", Rule::Mapped),
    ("detectLocal", Rule::Section(DETECT_LOCAL)),
    ("clusterCIDR", Rule::Mapped),
    ("nodePortAddresses", Rule::Mapped),
    (
        "oomScoreAdj",
        Rule::Ignored(
            "ferry leaves its OOM score alone; the DaemonSet's system-node-critical priority class protects it",
        ),
    ),
    ("conntrack", Rule::Section(CONNTRACK)),
    (
        "configSyncPeriod",
        Rule::Ignored(
            "ferry's watches need no periodic re-delivery: they resume from their resourceVersion and relist after 410 Gone",
        ),
    ),
    ("portRange", Rule::Ignored("unused by kube-proxy itself since its userspace mode was removed")),
    ("windowsRunAsService", Rule::Ignored(WINDOWS)),
];

/// Feature gates of kube-proxy's that ferry's model has.
const KNOWN_GATES: &[&str] = &["PreferSameTrafficDistribution"];

/// A field ferry reads but does not act on, and why. The agent logs each once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredField {
    /// Dotted path, e.g. `iptables.masqueradeBit`.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for IgnoredField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kube-proxy config field {} is ignored: {}", self.key, self.reason)
    }
}

/// A KubeProxyConfiguration in ferry's terms.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The same settings as a ferry node-config document (keys of `keys::ROOT`).
    pub node_config: Value,
    /// Fields set in the file that ferry does not act on.
    pub ignored: Vec<IgnoredField>,
    /// kube-proxy's proxy mode as written (`""` is its default, iptables).
    pub mode: String,
}

/// Whether a parsed document is a KubeProxyConfiguration (by kind or API group).
pub fn is_kube_proxy_config(doc: &Value) -> bool {
    let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    kind == KIND || api.starts_with("kubeproxy.config.k8s.io/")
}

/// Whether a value is anything but its type's zero value (what an ignored
/// field must be set to before it is worth a log line: generated files list
/// every field, most at zero).
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty() && parse_go_duration(s).ok() != Some(std::time::Duration::ZERO),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => o.values().any(is_set),
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// Checks every field against the schema: unknown ones are problems, ignored
/// ones are collected.
fn walk(
    doc: &Map<String, Value>,
    table: &[(&str, Rule)],
    prefix: &str,
    mode: &str,
    ignored: &mut Vec<IgnoredField>,
    problems: &mut Vec<KeyProblem>,
) {
    for (key, value) in doc {
        let path = join(prefix, key);
        let Some((_, rule)) = table.iter().find(|(k, _)| k == key) else {
            let best = table
                .iter()
                .map(|(k, _)| (strsim::jaro_winkler(&key.to_lowercase(), &k.to_lowercase()), *k))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let message = match best {
                Some((_, k)) => format!("not a KubeProxyConfiguration field; did you mean {}?", join(prefix, k)),
                None => {
                    let known: Vec<&str> = table.iter().map(|(k, _)| *k).collect();
                    format!("not a KubeProxyConfiguration field; known fields here: {}", known.join(", "))
                }
            };
            problems.push(KeyProblem { key: path, message });
            continue;
        };
        match rule {
            Rule::Mapped => {}
            Rule::ForModes(modes) => {
                if !modes.contains(&mode) && is_set(value) {
                    let shown = if mode.is_empty() { "iptables (the default)" } else { mode };
                    let named: Vec<&str> = modes.iter().copied().filter(|m| !m.is_empty()).collect();
                    ignored.push(IgnoredField {
                        key: path,
                        reason: format!(
                            "mode is {shown}, and kube-proxy reads this field only in mode {}",
                            named.join(" or ")
                        ),
                    });
                }
            }
            Rule::Ignored(reason) | Rule::IgnoredSection(reason) => {
                if is_set(value) {
                    ignored.push(IgnoredField { key: path, reason: reason.to_string() });
                }
            }
            Rule::Section(sub) => match value {
                Value::Object(map) => walk(map, sub, &path, mode, ignored, problems),
                Value::Null => {}
                _ => problems.push(KeyProblem { key: path, message: "must be a mapping of fields".into() }),
            },
        }
    }
}

/// Typed reads of mapped fields; type errors are collected as problems.
struct Reader<'a> {
    doc: &'a Value,
    problems: Vec<KeyProblem>,
}

impl<'a> Reader<'a> {
    fn get(&self, path: &str) -> Option<&'a Value> {
        let mut v = self.doc;
        for part in path.split('.') {
            v = v.get(part)?;
        }
        (!v.is_null()).then_some(v)
    }

    fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(KeyProblem { key: key.into(), message: message.into() });
    }

    /// A string field; empty counts as unset, as kube-proxy's defaulting treats it.
    fn string(&mut self, path: &str) -> Option<String> {
        match self.get(path)? {
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(s.trim().to_string()),
            other => {
                let msg = format!("must be a string, not {other}");
                self.bad(path, msg);
                None
            }
        }
    }

    fn bool(&mut self, path: &str) -> Option<bool> {
        match self.get(path)? {
            Value::Bool(b) => Some(*b),
            other => {
                let msg = format!("must be true or false, not {other}");
                self.bad(path, msg);
                None
            }
        }
    }

    fn strings(&mut self, path: &str) -> Vec<String> {
        match self.get(path) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(s) => out.push(s.trim().to_string()),
                        None => self.bad(&format!("{path}[{i}]"), format!("must be a string, not {item}")),
                    }
                }
                out
            }
            Some(other) => {
                let msg = format!("must be a list of strings, not {other}");
                self.bad(path, msg);
                Vec::new()
            }
        }
    }

    /// A Go duration.
    fn duration(&mut self, path: &str) -> Option<std::time::Duration> {
        let text = self.string(path)?;
        match parse_go_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.bad(path, e);
                None
            }
        }
    }
}

fn duration_text(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// Translates a parsed KubeProxyConfiguration. `source` names the file in errors.
pub fn translate(source: &str, doc: &Value) -> Result<Translated, ConfigError> {
    let fail = |problems: Vec<KeyProblem>| ConfigError { source: source.to_string(), problems };
    let Some(map) = doc.as_object() else {
        return Err(fail(vec![KeyProblem { key: "(document)".into(), message: "must be a mapping of fields".into() }]));
    };
    let mut r = Reader { doc, problems: Vec::new() };
    match r.string("apiVersion").as_deref() {
        Some(API_VERSION) => {}
        Some(other) => r.bad(
            "apiVersion",
            format!(
                "{other} is not a version ferry reads; convert the file to {API_VERSION} (what kube-proxy itself reads)"
            ),
        ),
        None => r.bad("apiVersion", format!("is missing; a KubeProxyConfiguration says apiVersion: {API_VERSION}")),
    }
    match r.string("kind").as_deref() {
        Some(KIND) => {}
        Some(other) => r.bad("kind", format!("{other} is not {KIND}")),
        None => r.bad("kind", format!("is missing; a kube-proxy config says kind: {KIND}")),
    }
    let mode = r.string("mode").unwrap_or_default();
    let section = match mode.as_str() {
        "" | "iptables" => "iptables",
        "ipvs" => "ipvs",
        "nftables" => "nftables",
        "kernelspace" => {
            r.bad("mode", "kernelspace is kube-proxy's Windows mode; ferry runs on Linux");
            "iptables"
        }
        other => {
            r.bad("mode", format!("{other:?} is not a kube-proxy mode (iptables, ipvs or nftables)"));
            "iptables"
        }
    };
    let mut ignored = Vec::new();
    let mut problems = Vec::new();
    walk(map, ROOT, "", &mode, &mut ignored, &mut problems);
    r.problems.extend(problems);

    let mut out = Map::new();
    if let Some(name) = r.string("hostnameOverride") {
        // kube-proxy lowercases the node name it derives (nodeutil.GetHostname).
        out.insert("nodeName".into(), json!(name.to_lowercase()));
    }
    let mut bind_v6 = false;
    if let Some(addr) = r.string("bindAddress") {
        match parse_ip_sloppy(&addr) {
            Some(ip) => {
                bind_v6 = ip.is_ipv6();
                // "0.0.0.0" / "::" only pick the family, as in kube-proxy.
                if !ip.is_unspecified() {
                    out.insert("primaryIPs".into(), json!([ip.to_string()]));
                }
            }
            None => r.bad("bindAddress", format!("{addr:?} is not an IP address")),
        }
    }
    let healthz = r.string("healthzBindAddress").or_else(|| bind_v6.then(|| "[::]:10256".to_string()));
    let metrics = r.string("metricsBindAddress").or_else(|| bind_v6.then(|| "[::1]:10249".to_string()));
    if let Some(h) = healthz {
        out.insert("healthzBindAddress".into(), json!(h));
    }
    if let Some(m) = metrics {
        out.insert("metricsBindAddress".into(), json!(m));
    }
    if let Some(hard) = r.bool("bindAddressHardFail") {
        out.insert("bindAddressHardFail".into(), json!(hard));
    }
    if let Some(k) = r.string("clientConnection.kubeconfig") {
        out.insert("kubeconfig".into(), json!(k));
    }
    if let Some(cidrs) = r.string("clusterCIDR") {
        let mut list = Vec::new();
        for part in cidrs.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match parse_cidr_sloppy(part) {
                Some(n) => list.push(n.to_string()),
                None => r.bad("clusterCIDR", format!("{part:?} is not a CIDR (like 10.244.0.0/16)")),
            }
        }
        out.insert("clusterCIDRs".into(), json!(list));
    }
    let npa = r.strings("nodePortAddresses");
    let mut addresses = Vec::new();
    for (i, a) in npa.iter().enumerate() {
        match a.as_str() {
            "primary" => addresses.push("primary".to_string()),
            "all" => addresses.extend(["0.0.0.0/0".to_string(), "::/0".to_string()]),
            "localhost" => addresses.extend(["127.0.0.0/8".to_string(), "::1/128".to_string()]),
            cidr => match parse_cidr_sloppy(cidr) {
                Some(n) => addresses.push(n.to_string()),
                None => r.bad(
                    &format!("nodePortAddresses[{i}]"),
                    format!("{cidr:?} is not a CIDR or one of primary, localhost, all"),
                ),
            },
        }
    }
    if addresses.is_empty() && section != "nftables" {
        // kube-proxy's iptables and ipvs modes serve NodePorts on every local address by default.
        addresses.extend(["0.0.0.0/0".to_string(), "::/0".to_string()]);
    }
    if !addresses.is_empty() {
        out.insert("nodePortAddresses".into(), json!(addresses));
    }
    if section == "iptables" {
        // iptables mode accepts IPv4 NodePorts on 127.0.0.1 unless told otherwise.
        let localhost = r.bool("iptables.localhostNodePorts").unwrap_or(true);
        out.insert("localhostNodePorts".into(), json!(localhost));
    }
    let masq_section = if section == "nftables" { "nftables" } else { "iptables" };
    if let Some(m) = r.bool(&format!("{masq_section}.masqueradeAll")) {
        out.insert("masqueradeAll".into(), json!(m));
    }
    for key in ["syncPeriod", "minSyncPeriod"] {
        let path = format!("{section}.{key}");
        // Zero is how a generated file says "unset": kube-proxy's defaulting then picks 30s / 1s.
        if let Some(d) = r.duration(&path).filter(|d| !d.is_zero()) {
            out.insert(key.into(), json!(duration_text(d)));
        }
    }
    let mut detector = Map::new();
    if let Some(mode) = r.string("detectLocalMode") {
        match mode.as_str() {
            "ClusterCIDR" | "NodeCIDR" | "BridgeInterface" | "InterfaceNamePrefix" => {
                detector.insert("mode".into(), json!(mode));
            }
            other => r.bad(
                "detectLocalMode",
                format!("{other:?} is not ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix"),
            ),
        }
    }
    if let Some(b) = r.string("detectLocal.bridgeInterface") {
        detector.insert("bridgeInterface".into(), json!(b));
    }
    if let Some(p) = r.string("detectLocal.interfaceNamePrefix") {
        detector.insert("interfaceNamePrefix".into(), json!(p));
    }
    if !detector.is_empty() {
        out.insert("localTrafficDetector".into(), Value::Object(detector));
    }
    let mut conntrack = Map::new();
    for key in ["tcpEstablishedTimeout", "tcpCloseWaitTimeout", "udpTimeout"] {
        // kube-proxy: "must be greater than 0 to set"; zero leaves the default.
        if let Some(d) = r.duration(&format!("conntrack.{key}")).filter(|d| !d.is_zero()) {
            conntrack.insert(key.into(), json!(format!("{}s", d.as_secs().max(1))));
        }
    }
    if !conntrack.is_empty() {
        out.insert("conntrack".into(), Value::Object(conntrack));
    }
    match r.get("featureGates") {
        None => {}
        Some(Value::Object(gates)) => {
            let mut known = Map::new();
            for (name, on) in gates {
                let Some(on) = on.as_bool() else {
                    r.bad(&format!("featureGates.{name}"), format!("must be true or false, not {on}"));
                    continue;
                };
                if KNOWN_GATES.contains(&name.as_str()) {
                    known.insert(name.clone(), json!(on));
                } else {
                    ignored.push(IgnoredField {
                        key: format!("featureGates.{name}"),
                        reason: "ferry's model has no such gate (the behaviour is fixed in ferry, or does not concern a service proxy)".into(),
                    });
                }
            }
            if !known.is_empty() {
                out.insert("featureGates".into(), Value::Object(known));
            }
        }
        Some(other) => {
            let msg = format!("must be a mapping of gate names to true/false, not {other}");
            r.bad("featureGates", msg);
        }
    }
    if !r.problems.is_empty() {
        return Err(fail(r.problems));
    }
    Ok(Translated { node_config: Value::Object(out), ignored, mode })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NodeFlags, build, parse_file};
    use ferry_model::node_config::LocalDetector;
    use std::time::Duration;

    fn doc(yaml: &str) -> Value {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn translate_yaml(yaml: &str) -> Result<Translated, ConfigError> {
        translate("kube-proxy.yaml", &doc(yaml))
    }

    /// The translated document goes through ferry's own checks, as the agent does.
    fn settings(yaml: &str) -> crate::config::Settings {
        let t = translate_yaml(yaml).unwrap();
        let file = parse_file("kube-proxy.yaml", &t.node_config.to_string()).unwrap();
        build("kube-proxy.yaml", file, &NodeFlags::default()).unwrap()
    }

    /// kubeadm's generated file for a dual-stack cluster (trimmed of nothing: every field is there).
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadms_file_translates_with_nothing_to_report() {
        let t = translate_yaml(KUBEADM).unwrap();
        assert!(t.ignored.is_empty(), "{:?}", t.ignored);
        let s = settings(KUBEADM);
        assert_eq!(s.node.cluster_cidrs.len(), 2);
        assert_eq!(s.node.local_detector, LocalDetector::ClusterCidr);
        // iptables mode (the default): NodePorts on every address, and on 127.0.0.1.
        assert!(!s.node.node_port_addresses.primary);
        assert!(s.node.localhost_node_ports);
        assert_eq!(s.agent.kubeconfig.as_deref(), Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf")));
        // Unset (zero) periods and addresses keep kube-proxy's defaults.
        assert_eq!(s.agent.sync_period, Duration::from_secs(30));
        assert_eq!(s.agent.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(s.agent.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
        assert!(is_kube_proxy_config(&doc(KUBEADM)));
        assert!(!is_kube_proxy_config(&doc("nodeName: a\n")));
    }

    #[test]
    fn mapped_fields_land_on_ferry_settings() {
        let s = settings(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: Node-A
bindAddress: 192.168.1.10
healthzBindAddress: 0.0.0.0:10266
metricsBindAddress: 0.0.0.0:10259
bindAddressHardFail: true
clusterCIDR: 10.244.0.0/16
nodePortAddresses: [primary, 10.0.0.0/8]
detectLocalMode: InterfaceNamePrefix
detectLocal: {interfaceNamePrefix: veth}
nftables: {masqueradeAll: true, syncPeriod: 1m0s, minSyncPeriod: 500ms}
conntrack: {tcpEstablishedTimeout: 2h0m0s, tcpCloseWaitTimeout: 1h0m0s, udpTimeout: 45s}
featureGates: {PreferSameTrafficDistribution: false}
"#,
        );
        assert_eq!(s.node.node_name, "node-a");
        assert_eq!(s.node.primary_ips, vec!["192.168.1.10".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(s.agent.healthz_bind_address, Some("0.0.0.0:10266".parse().unwrap()));
        assert_eq!(s.agent.metrics_bind_address, Some("0.0.0.0:10259".parse().unwrap()));
        assert!(s.agent.bind_address_hard_fail);
        assert!(s.node.node_port_addresses.primary);
        assert_eq!(s.node.node_port_addresses.cidrs.len(), 1);
        assert!(!s.node.localhost_node_ports, "nftables mode never serves NodePorts on loopback");
        assert_eq!(s.node.local_detector, LocalDetector::InterfaceNamePrefix("veth".into()));
        assert!(s.node.masquerade_all);
        assert_eq!(s.agent.sync_period, Duration::from_secs(60));
        assert_eq!(s.agent.min_sync_period, Duration::from_millis(500));
        assert_eq!(s.bpf.timeouts.tcp_established, 7200);
        assert_eq!(s.bpf.timeouts.tcp_close, 3600);
        assert_eq!(s.bpf.timeouts.udp, 45);
        assert!(!s.node.feature_gates.prefer_same_traffic_distribution);
    }

    #[test]
    fn fields_that_do_not_apply_are_reported_once_each_with_a_reason() {
        let t = translate_yaml(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
oomScoreAdj: -999
portRange: 30000-32767
iptables: {masqueradeBit: 14, syncPeriod: 30s, masqueradeAll: true}
ipvs: {scheduler: rr, strictARP: true, syncPeriod: 15s}
winkernel: {enableDSR: true}
conntrack: {maxPerCore: 32768, udpStreamTimeout: 300s}
featureGates: {SomeOtherGate: true}
logging: {verbosity: 4}
"#,
        )
        .unwrap();
        let mut keys: Vec<&str> = t.ignored.iter().map(|i| i.key.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "conntrack.maxPerCore",
                "conntrack.udpStreamTimeout",
                "featureGates.SomeOtherGate",
                "iptables.masqueradeBit",
                "iptables.syncPeriod",
                "ipvs.scheduler",
                "ipvs.strictARP",
                "logging",
                "oomScoreAdj",
                "portRange",
                "winkernel.enableDSR",
            ]
        );
        for i in &t.ignored {
            assert!(!i.reason.is_empty(), "{i}");
        }
        let sync = t.ignored.iter().find(|i| i.key == "iptables.syncPeriod").unwrap();
        assert!(sync.to_string().contains("mode is ipvs"), "{sync}");
        // ipvs mode reads its own periods, and masqueradeAll from the iptables section (as kube-proxy does).
        assert_eq!(t.node_config["syncPeriod"], json!("15s"));
        assert_eq!(t.node_config["masqueradeAll"], json!(true));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors_naming_the_field() {
        let e = translate_yaml(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCidr: 10.0.0.0/8\niptables: {masqueradeAl: true}\n",
        )
        .unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["clusterCidr", "iptables.masqueradeAl"]);
        assert!(e.problems[0].message.contains("did you mean clusterCIDR?"), "{e}");

        let e = translate_yaml(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: userspace\nclusterCIDR: 10.0.0.0/33\nnodePortAddresses: [everywhere]\niptables: {syncPeriod: 30}\n",
        )
        .unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["mode", "clusterCIDR", "nodePortAddresses[0]", "iptables.syncPeriod"]);

        let e =
            translate_yaml("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n").unwrap_err();
        assert!(e.to_string().contains("v1alpha1"), "{e}");
    }

    #[test]
    fn an_ipv6_bind_address_moves_the_default_servers_to_ipv6() {
        let s =
            settings("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: '::'\n");
        assert_eq!(s.agent.healthz_bind_address, Some("[::]:10256".parse().unwrap()));
        assert_eq!(s.agent.metrics_bind_address, Some("[::1]:10249".parse().unwrap()));
        assert!(s.node.primary_ips.is_empty());
    }
}
