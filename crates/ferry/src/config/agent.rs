//! The agent's own settings (`ferry agent`): where health and metrics are
//! served, how often it syncs, and which API server it talks to.
//!
//! Values are written the way kube-proxy writes them, so a file can be reused:
//! durations in Go syntax (`1s`, `1m30s`, `24h0m0s`) and bind addresses as
//! `IP:PORT` (`0.0.0.0:10256`, `[::1]:10249`), a bare IP (kube-proxy's default
//! port), or empty to switch the server off.

use super::keys::KeyProblem;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// kube-proxy's health server port.
pub const HEALTHZ_PORT: u16 = 10256;
/// kube-proxy's metrics server port.
pub const METRICS_PORT: u16 = 10249;

/// Settings only `ferry agent` reads. Defaults are kube-proxy's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// `/healthz` and `/livez`; `None`: not served.
    pub healthz_bind_address: Option<SocketAddr>,
    /// `/metrics`; `None`: not served. Loopback by default: metrics reveal the
    /// cluster's services to whoever can reach the port.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Exit when a health or metrics port cannot be bound (else log and retry).
    pub bind_address_hard_fail: bool,
    /// At least this long between two syncs: a burst of changes becomes one sync.
    pub min_sync_period: Duration,
    /// The datapath is verified against the Plan at least this often, changes or not.
    pub sync_period: Duration,
    /// kubeconfig for the API server; `None`: in-cluster, then the default kubeconfig.
    pub kubeconfig: Option<PathBuf>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            healthz_bind_address: Some(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), HEALTHZ_PORT)),
            metrics_bind_address: Some(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), METRICS_PORT)),
            bind_address_hard_fail: false,
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            kubeconfig: None,
        }
    }
}

/// The agent's keys as the node config file holds them (before checking).
#[derive(Debug, Default)]
pub struct AgentFile {
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub min_sync_period: Option<String>,
    pub sync_period: Option<String>,
    pub kubeconfig: Option<PathBuf>,
}

impl AgentFile {
    /// Checks every value; problems name the key.
    pub fn build(self, problems: &mut Vec<KeyProblem>) -> AgentSettings {
        let mut s = AgentSettings::default();
        let mut bad = |key: &str, message: String| problems.push(KeyProblem { key: key.into(), message });
        if let Some(v) = self.healthz_bind_address {
            match parse_bind_address(&v, HEALTHZ_PORT) {
                Ok(a) => s.healthz_bind_address = a,
                Err(e) => bad("healthzBindAddress", e),
            }
        }
        if let Some(v) = self.metrics_bind_address {
            match parse_bind_address(&v, METRICS_PORT) {
                Ok(a) => s.metrics_bind_address = a,
                Err(e) => bad("metricsBindAddress", e),
            }
        }
        s.bind_address_hard_fail = self.bind_address_hard_fail.unwrap_or(false);
        if let Some(v) = self.min_sync_period {
            match parse_go_duration(&v) {
                Ok(d) => s.min_sync_period = d,
                Err(e) => bad("minSyncPeriod", e),
            }
        }
        if let Some(v) = self.sync_period {
            match parse_go_duration(&v) {
                Ok(d) if d.is_zero() => {
                    bad("syncPeriod", "must be greater than 0 (kube-proxy's default is 30s)".into())
                }
                Ok(d) => s.sync_period = d,
                Err(e) => bad("syncPeriod", e),
            }
        }
        if s.min_sync_period > s.sync_period {
            bad(
                "minSyncPeriod",
                format!(
                    "{:?} is longer than syncPeriod {:?}; make it shorter (kube-proxy: 1s and 30s)",
                    s.min_sync_period, s.sync_period
                ),
            );
        }
        s.kubeconfig = self.kubeconfig.filter(|p| !p.as_os_str().is_empty());
        s
    }
}

/// Parses a Go duration (`time.ParseDuration`): `300ms`, `1.5h`, `2h45m`, `0`.
/// Negative durations are refused: no setting of ferry's means one.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let hint = || format!("{text:?} is not a duration; write it like 1s, 500ms, 1m30s or 24h0m0s");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(hint());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().map_err(|_| hint())?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(hint()),
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| hint())
}

/// Parses a bind address: `IP:PORT`, `[IPv6]:PORT`, a bare IP (with
/// `default_port`), or empty (`None`: the server is off).
pub fn parse_bind_address(text: &str, default_port: u16) -> Result<Option<SocketAddr>, String> {
    let s = text.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    let bare = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(s);
    match bare.parse::<IpAddr>() {
        Ok(ip) => Ok(Some(SocketAddr::new(ip, default_port))),
        Err(_) => Err(format!(
            "{text:?} is not an address to listen on; write IP:PORT (like 0.0.0.0:{default_port} or [::]:{default_port}), or \"\" to turn the server off"
        )),
    }
}

/// The agent's settings and where they came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: super::Settings,
    /// kube-proxy config fields that ferry does not act on (log each once).
    pub ignored: Vec<super::kubeproxy::IgnoredField>,
    /// kube-proxy's `mode`, when a KubeProxyConfiguration was read.
    pub kube_proxy_mode: Option<String>,
    /// The files read, for messages.
    pub source: String,
}

/// Reads the agent's configuration: `config` (a KubeProxyConfiguration or a
/// ferry node config, told apart by apiVersion/kind) and the node config of
/// `flags.node_config` (ferry's format; its keys win over a kube-proxy file's),
/// then the flags over both.
pub fn load(config: Option<&Path>, flags: &super::NodeFlags) -> anyhow::Result<Loaded> {
    use super::kubeproxy;
    let read = |path: &Path| -> anyhow::Result<Value> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read config file {}: {e}; check the path and its mount", path.display())
        })?;
        if text.trim().is_empty() {
            return Ok(Value::Object(Default::default()));
        }
        serde_saphyr::from_str(&text).map_err(|e| {
            anyhow::anyhow!("config file {} is not valid YAML: {e}; fix the file and start again", path.display())
        })
    };
    let mut sources = Vec::new();
    let mut merged = Value::Object(Default::default());
    let mut ignored = Vec::new();
    let mut kube_proxy_mode = None;
    if let Some(path) = config {
        let doc = read(path)?;
        if kubeproxy::is_kube_proxy_config(&doc) {
            let source = format!("kube-proxy config {}", path.display());
            let t = kubeproxy::translate(&source, &doc)?;
            merged = t.node_config;
            ignored = t.ignored;
            kube_proxy_mode = Some(t.mode);
            sources.push(source);
        } else {
            if flags.node_config.is_some() {
                anyhow::bail!(
                    "--config {} is a ferry node config and --node-config names another; give ferry's node config once                      (--config also takes a kube-proxy KubeProxyConfiguration)",
                    path.display()
                );
            }
            merged = doc;
            sources.push(format!("node config {}", path.display()));
        }
    }
    if let Some(path) = &flags.node_config {
        let doc = read(path)?;
        if kubeproxy::is_kube_proxy_config(&doc) {
            anyhow::bail!(
                "{} is a kube-proxy KubeProxyConfiguration; pass it with --config, and ferry's own settings with --node-config",
                path.display()
            );
        }
        merge(&mut merged, doc);
        sources.push(format!("node config {}", path.display()));
    }
    let source = if sources.is_empty() { "(flags)".to_string() } else { sources.join(" + ") };
    if !merged.is_object() {
        anyhow::bail!("{source} must be a mapping of keys to values");
    }
    // JSON is YAML: the merged document goes through the node config's own checks.
    let file = super::parse_file(&source, &merged.to_string())?;
    let settings = super::build(&source, file, flags)?;
    Ok(Loaded { settings, ignored, kube_proxy_mode, source })
}

/// Deep-merges `over` into `base`: mappings key by key, anything else replaced.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_kube_proxy_writes_them() {
        let ok = [
            ("1s", Duration::from_secs(1)),
            ("30s", Duration::from_secs(30)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            ("1m0s", Duration::from_secs(60)),
            ("24h0m0s", Duration::from_secs(86400)),
            ("2h45m", Duration::from_secs(9900)),
            ("1.5h", Duration::from_secs(5400)),
            ("300ms", Duration::from_millis(300)),
            ("10us", Duration::from_micros(10)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "5", "1d", "-1s", "s", "1..5s", "ten seconds"] {
            let e = parse_go_duration(bad).unwrap_err();
            assert!(e.contains("1m30s"), "{bad}: {e}");
        }
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(parse_bind_address("0.0.0.0:10256", 1), Ok(Some("0.0.0.0:10256".parse().unwrap())));
        assert_eq!(parse_bind_address("[::1]:9", 1), Ok(Some("[::1]:9".parse().unwrap())));
        assert_eq!(parse_bind_address("127.0.0.1", 10249), Ok(Some("127.0.0.1:10249".parse().unwrap())));
        assert_eq!(parse_bind_address("::", 10256), Ok(Some("[::]:10256".parse().unwrap())));
        assert_eq!(parse_bind_address("", 1), Ok(None));
        assert!(parse_bind_address("localhost:80", 1).unwrap_err().contains("IP:PORT"));
    }

    #[test]
    fn defaults_are_kube_proxys() {
        let s = AgentFile::default().build(&mut Vec::new());
        assert_eq!(s.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(s.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!((s.min_sync_period, s.sync_period), (Duration::from_secs(1), Duration::from_secs(30)));
        assert!(!s.bind_address_hard_fail);
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut problems = Vec::new();
        AgentFile {
            healthz_bind_address: Some("nowhere".into()),
            sync_period: Some("0s".into()),
            min_sync_period: Some("1 minute".into()),
            ..Default::default()
        }
        .build(&mut problems);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["healthzBindAddress", "minSyncPeriod", "syncPeriod"]);

        let mut problems = Vec::new();
        AgentFile { min_sync_period: Some("1m".into()), sync_period: Some("10s".into()), ..Default::default() }
            .build(&mut problems);
        assert_eq!(problems[0].key, "minSyncPeriod", "{problems:?}");
    }

    #[test]
    fn a_kube_proxy_file_and_a_node_config_combine_node_config_winning() {
        let dir = std::env::temp_dir().join(format!("ferry-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kp = dir.join("kube-proxy.yaml");
        std::fs::write(
            &kp,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
             clusterCIDR: 10.244.0.0/16\nhostnameOverride: kp-name\noomScoreAdj: -999\n",
        )
        .unwrap();
        let node = dir.join("node.yaml");
        std::fs::write(&node, "nodeName: ferry-name\nserviceCIDRs: [10.96.0.0/12]\nsyncPeriod: 10s\n").unwrap();
        let flags = super::super::NodeFlags { node_config: Some(node.clone()), ..Default::default() };
        let loaded = load(Some(&kp), &flags).unwrap();
        assert_eq!(loaded.settings.node.node_name, "ferry-name");
        assert_eq!(loaded.settings.node.cluster_cidrs.len(), 1);
        assert_eq!(loaded.settings.node.service_cidrs.len(), 1);
        assert_eq!(loaded.settings.agent.sync_period, Duration::from_secs(10));
        assert_eq!(loaded.kube_proxy_mode.as_deref(), Some("nftables"));
        assert_eq!(loaded.ignored.len(), 1, "{:?}", loaded.ignored);
        assert!(loaded.source.contains("kube-proxy config") && loaded.source.contains("node config"));

        // A ferry file given with --config works alone; a kube-proxy file with --node-config is refused.
        let alone = load(Some(&node), &Default::default()).unwrap();
        assert_eq!(alone.settings.node.node_name, "ferry-name");
        let flags = super::super::NodeFlags { node_config: Some(kp.clone()), ..Default::default() };
        let e = load(None, &flags).unwrap_err().to_string();
        assert!(e.contains("--config"), "{e}");
        // Errors from the combination name the files.
        std::fs::write(&node, "nodeName: x\nsyncPeriod: soon\n").unwrap();
        let flags = super::super::NodeFlags { node_config: Some(node.clone()), ..Default::default() };
        let e = load(Some(&kp), &flags).unwrap_err().to_string();
        assert!(e.contains("syncPeriod") && e.contains("node.yaml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
