//! Writing a `NodeConfig` back as a config file: `ferry conformance` turns an
//! acceptance case into the file a real agent reads. `parse(write(c)) == c`.

use ferry_model::node_config::{LocalDetector, MasqueradeMode, NodeConfig};
use std::fmt::Write as _;

fn list<T: ToString>(items: &[T]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{}\"", i.to_string())).collect();
    format!("[{}]", quoted.join(", "))
}

/// The config-file keys that express `cfg`.
pub fn node_config_yaml(cfg: &NodeConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "nodeName: \"{}\"", cfg.node_name);
    let _ = writeln!(s, "nodeIPs: {}", list(&cfg.node_ips));
    if !cfg.primary_ips.is_empty() {
        let _ = writeln!(s, "primaryIPs: {}", list(&cfg.primary_ips));
    }
    let _ = writeln!(s, "podCIDRs: {}", list(&cfg.pod_cidrs));
    let _ = writeln!(s, "clusterCIDRs: {}", list(&cfg.cluster_cidrs));
    let _ = writeln!(s, "serviceCIDRs: {}", list(&cfg.service_cidrs));
    let fams: Vec<&str> = cfg.ip_families.iter().map(|f| f.as_k8s()).collect();
    let _ = writeln!(s, "ipFamilies: {}", list(&fams));
    let mut npa: Vec<String> = cfg.node_port_addresses.cidrs.iter().map(|c| c.to_string()).collect();
    if cfg.node_port_addresses.primary {
        npa.insert(0, "primary".into());
    }
    if npa.is_empty() {
        // "Every local address": a family with no range listed matches all of it.
        npa = vec!["0.0.0.0/0".into(), "::/0".into()];
    }
    let _ = writeln!(s, "nodePortAddresses: {}", list(&npa));
    let _ = writeln!(s, "localhostNodePorts: {}", cfg.localhost_node_ports);
    let _ = writeln!(s, "masqueradeAll: {}", cfg.masquerade_all);
    let detector = match &cfg.local_detector {
        LocalDetector::ClusterCidr => "{mode: ClusterCIDR}".to_string(),
        LocalDetector::NodeCidr => "{mode: NodeCIDR}".to_string(),
        LocalDetector::InterfaceNamePrefix(p) => format!("{{mode: InterfaceNamePrefix, interfaceNamePrefix: \"{p}\"}}"),
        LocalDetector::BridgeInterface(b) => format!("{{mode: BridgeInterface, bridgeInterface: \"{b}\"}}"),
        LocalDetector::None => "{mode: None}".to_string(),
    };
    let _ = writeln!(s, "localTrafficDetector: {detector}");
    if let Some(z) = &cfg.zone {
        let _ = writeln!(s, "zone: \"{z}\"");
    }
    let _ = writeln!(
        s,
        "featureGates: {{PreferSameTrafficDistribution: {}}}",
        cfg.feature_gates.prefer_same_traffic_distribution
    );
    if let Some(n) = &cfg.service_proxy_name {
        let _ = writeln!(s, "serviceProxyName: \"{n}\"");
    }
    let _ = writeln!(s, "acceptHealthCheckNodePorts: {}", cfg.accept_health_check_node_ports);
    let mode = match cfg.masquerade {
        MasqueradeMode::Off => "\"off\"",
        MasqueradeMode::Bpf => "bpf",
        MasqueradeMode::Nftables => "nftables",
    };
    let _ = writeln!(s, "masquerade: {mode}");
    let _ = writeln!(s, "nonMasqueradeCIDRs: {}", list(&cfg.non_masquerade_cidrs));
    let _ = writeln!(s, "masqueradeLinkLocal: {}", cfg.masquerade_link_local);
    if let Some(allowed) = &cfg.external_ips_allowed {
        let _ = writeln!(s, "externalIPs: {{allowedCIDRs: {}}}", list(allowed));
    }
    let l = cfg.service_limits;
    let _ = writeln!(
        s,
        "limits: {{maxFrontendsPerService: {}, maxEndpointsPerService: {}}}",
        l.max_frontends, l.max_endpoints
    );
    let _ = writeln!(s, "loadBalancing: {{mode: {}}}", cfg.load_balancing);
    let _ = writeln!(s, "acceleration: {}", cfg.acceleration);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NodeFlags, build, parse_file};

    fn round_trip(cfg: &NodeConfig) -> NodeConfig {
        let text = node_config_yaml(cfg);
        let file = parse_file("w.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        build("w.yaml", file, &NodeFlags::default()).unwrap().node
    }

    #[test]
    fn every_acceptance_case_config_round_trips() {
        let mut cases = Vec::new();
        for text in [
            include_str!("../../../../acceptance/kube-proxy-flows.json"),
            include_str!("../../../../acceptance/ferry-isolation-flows.json"),
        ] {
            let file: ferry_model::acceptance::CaseFile = serde_json::from_str(text).unwrap();
            cases.extend(file.cases);
        }
        for case in &cases {
            let cfg = case.node_config().unwrap();
            let back = round_trip(&cfg);
            // "Every address" is written as catch-all ranges; same meaning.
            let mut want = cfg.clone();
            if want.node_port_addresses.cidrs.is_empty() && !want.node_port_addresses.primary {
                want.node_port_addresses.cidrs = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
            }
            if want.local_detector == LocalDetector::ClusterCidr && want.cluster_cidrs.is_empty() {
                want.local_detector = LocalDetector::None;
            }
            assert_eq!(back, want, "case {}", case.name);
        }
    }
}
