//! The config file's key schema: which keys exist, which were renamed, and
//! checking a parsed document against both.
//!
//! Unknown keys are errors, never silently ignored: a misspelled or renamed
//! key that is dropped quietly is how a masquerading default flips on an
//! upgrade (see seeds/cilium-masquerading-troubleshooting). Every key ferry
//! reads is listed here; `ferry::config` and the README follow this table.

use serde_json::Value;

/// A mapping's keys, and for nested mappings, their own schema.
pub struct Section {
    pub keys: &'static [(&'static str, Option<&'static Section>)],
}

/// A key that no longer exists, and what to write instead.
pub struct Renamed {
    /// Dotted path of the old key.
    pub old: &'static str,
    /// What replaces it, in words an operator can act on.
    pub use_instead: &'static str,
}

pub static DETECTOR: Section =
    Section { keys: &[("mode", None), ("interfaceNamePrefix", None), ("bridgeInterface", None)] };

pub static BPF: Section = Section {
    keys: &[("pinPath", None), ("cgroupPath", None), ("devices", None), ("podDevices", None), ("defragLoop", None)],
};

pub static MAGLEV: Section = Section { keys: &[("default", None), ("tableSize", None)] };

pub static CONNTRACK: Section = Section {
    keys: &[
        ("tcpSynTimeout", None),
        ("tcpEstablishedTimeout", None),
        ("tcpCloseWaitTimeout", None),
        ("udpTimeout", None),
    ],
};

pub static EXTERNAL_IPS: Section = Section { keys: &[("allowedCIDRs", None)] };

pub static LIMITS: Section = Section { keys: &[("maxFrontendsPerService", None), ("maxEndpointsPerService", None)] };

pub static MAPS: Section = Section {
    keys: &[
        ("frontends", None),
        ("services", None),
        ("slots", None),
        ("backends", None),
        ("members", None),
        ("names", None),
        ("conntrack", None),
        ("conntrackUnconfirmed", None),
        ("affinity", None),
        ("socketReverse", None),
    ],
};

pub static LOAD_BALANCING: Section = Section { keys: &[("mode", None)] };

pub static MANIFESTS: Section = Section { keys: &[("maxFileBytes", None), ("maxDocumentsPerFile", None)] };

pub static ROOT: Section = Section {
    keys: &[
        ("nodeName", None),
        ("nodeIPs", None),
        ("primaryIPs", None),
        ("podCIDRs", None),
        ("clusterCIDRs", None),
        ("serviceCIDRs", None),
        ("ipFamilies", None),
        ("nodePortAddresses", None),
        ("localhostNodePorts", None),
        ("masqueradeAll", None),
        ("localTrafficDetector", Some(&DETECTOR)),
        ("zone", None),
        ("featureGates", None),
        ("serviceProxyName", None),
        ("acceptHealthCheckNodePorts", None),
        ("datapath", None),
        ("bpf", Some(&BPF)),
        ("conntrack", Some(&CONNTRACK)),
        ("natPortRange", None),
        ("masquerade", None),
        ("nonMasqueradeCIDRs", None),
        ("masqueradeLinkLocal", None),
        ("maglev", Some(&MAGLEV)),
        ("nodePortRange", None),
        ("healthzBindAddress", None),
        ("metricsBindAddress", None),
        ("bindAddressHardFail", None),
        ("minSyncPeriod", None),
        ("syncPeriod", None),
        ("kubeconfig", None),
        ("externalIPs", Some(&EXTERNAL_IPS)),
        ("limits", Some(&LIMITS)),
        ("maps", Some(&MAPS)),
        ("manifests", Some(&MANIFESTS)),
        ("loadBalancing", Some(&LOAD_BALANCING)),
        ("acceleration", None),
    ],
};

/// Keys operators bring from kube-proxy, Cilium or older ferry drafts.
pub static RENAMED: &[Renamed] = &[
    Renamed { old: "nodeIP", use_instead: "nodeIPs (a list)" },
    Renamed { old: "nodeIps", use_instead: "nodeIPs" },
    Renamed { old: "podCIDR", use_instead: "podCIDRs (a list)" },
    Renamed { old: "clusterCIDR", use_instead: "clusterCIDRs (a list)" },
    Renamed { old: "serviceCIDR", use_instead: "serviceCIDRs (a list)" },
    Renamed { old: "serviceClusterIPRange", use_instead: "serviceCIDRs (a list)" },
    Renamed { old: "detectLocalMode", use_instead: "localTrafficDetector.mode" },
    Renamed { old: "detectLocal", use_instead: "localTrafficDetector (interfaceNamePrefix / bridgeInterface)" },
    Renamed { old: "nodeportAddresses", use_instead: "nodePortAddresses" },
    Renamed { old: "hostnameOverride", use_instead: "nodeName" },
    Renamed { old: "bpf.pinDir", use_instead: "bpf.pinPath" },
    Renamed { old: "bpf.cgroup", use_instead: "bpf.cgroupPath" },
    Renamed { old: "mode", use_instead: "datapath (bpf or nftables)" },
    Renamed { old: "bpf.device", use_instead: "bpf.devices (a list)" },
    // Masquerading: the seed's incident was a renamed key silently flipping it on.
    Renamed { old: "enableIPv4Masquerade", use_instead: "masquerade: bpf | nftables | off" },
    Renamed { old: "enableIPv6Masquerade", use_instead: "masquerade: bpf | nftables | off" },
    Renamed { old: "enableBPFMasquerade", use_instead: "masquerade: bpf" },
    Renamed { old: "enable-ipv4-masquerade", use_instead: "masquerade: bpf | nftables | off" },
    Renamed { old: "enable-bpf-masquerade", use_instead: "masquerade: bpf" },
    Renamed { old: "nativeRoutingCIDR", use_instead: "nonMasqueradeCIDRs (a list)" },
    Renamed { old: "ipv4NativeRoutingCIDR", use_instead: "nonMasqueradeCIDRs (a list)" },
    Renamed { old: "native-routing-cidr", use_instead: "nonMasqueradeCIDRs (a list)" },
    Renamed { old: "ipv4-native-routing-cidr", use_instead: "nonMasqueradeCIDRs (a list)" },
    Renamed { old: "masqueradeCIDRs", use_instead: "nonMasqueradeCIDRs" },
    Renamed { old: "nonMasqCIDRs", use_instead: "nonMasqueradeCIDRs" },
    Renamed { old: "nonMasqueradeCIDR", use_instead: "nonMasqueradeCIDRs (a list)" },
    Renamed { old: "masqLinkLocal", use_instead: "masqueradeLinkLocal" },
    Renamed { old: "conntrack.tcpTimeout", use_instead: "conntrack.tcpEstablishedTimeout" },
    Renamed { old: "externalIPs.allowedCidrs", use_instead: "externalIPs.allowedCIDRs" },
    Renamed { old: "allowedExternalIPs", use_instead: "externalIPs.allowedCIDRs" },
];

/// A problem with one key of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    pub key: String,
    pub message: String,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// Checks every key of `doc` against `section`, recursively.
pub fn check(doc: &Value, section: &Section, prefix: &str, problems: &mut Vec<KeyProblem>) {
    let Some(map) = doc.as_object() else { return };
    for (key, value) in map {
        let path = join(prefix, key);
        match section.keys.iter().find(|(k, _)| k == key) {
            Some((_, Some(sub))) => check(value, sub, &path, problems),
            Some((_, None)) => {}
            None => {
                let message = if let Some(r) = RENAMED.iter().find(|r| r.old == path) {
                    format!("this key was renamed: use {} instead", r.use_instead)
                } else {
                    let best = section
                        .keys
                        .iter()
                        .map(|(k, _)| (strsim::jaro_winkler(&key.to_lowercase(), &k.to_lowercase()), *k))
                        .filter(|(score, _)| *score > 0.8)
                        .max_by(|a, b| a.0.total_cmp(&b.0));
                    match best {
                        Some((_, k)) => format!("unknown key; did you mean {}?", join(prefix, k)),
                        None => {
                            let known: Vec<&str> = section.keys.iter().map(|(k, _)| *k).collect();
                            format!("unknown key; known keys here: {}", known.join(", "))
                        }
                    }
                };
                problems.push(KeyProblem { key: path, message });
            }
        }
    }
}
