//! `masquerade: nftables`: the same egress rules as the BPF datapath
//! (ferry_model::egress), rendered as one nftables table ferry owns.
//!
//! Only new connections reach a nat chain, so replies to connections that came
//! in from outside are never masqueraded; the host's own traffic is not from a
//! pod range and is not either.

use ferry_model::egress::ExemptReason;
use ferry_model::{IpFamily, NodeFacts};
use ipnet::IpNet;
use std::fmt::Write as _;

/// The table ferry owns for masquerading.
pub const TABLE: &str = "ferry-masq";
pub const FAMILY: &str = "inet";

fn elements(nets: &[IpNet]) -> String {
    nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

/// The whole table, replacing any previous version in the same transaction.
/// `uplinks` are the devices traffic leaves the node through.
pub fn render(node: &NodeFacts, uplinks: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}");
    let _ = writeln!(s, "table {FAMILY} {TABLE} {{");
    let _ = writeln!(s, "  comment \"ferry: pod egress masquerading (masquerade: nftables)\"");
    for (fam, addr) in [(IpFamily::V4, "ipv4_addr"), (IpFamily::V6, "ipv6_addr")] {
        let sources: Vec<IpNet> =
            node.masquerade_sources.iter().filter(|n| IpFamily::of_net(n) == fam).copied().collect();
        let mut exempt: Vec<IpNet> =
            node.masquerade_exempt.iter().filter(|(n, _)| IpFamily::of_net(n) == fam).map(|(n, _)| *n).collect();
        exempt.extend(node.other_node_addresses.iter().filter(|a| IpFamily::of(a) == fam).map(|a| IpNet::from(*a)));
        let v = if fam == IpFamily::V4 { "4" } else { "6" };
        let _ = writeln!(s, "  set pod_sources{v} {{ type {addr}; flags interval; auto-merge;");
        if !sources.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", elements(&sources));
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "  set exempt{v} {{ type {addr}; flags interval; auto-merge;");
        if !exempt.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", elements(&exempt));
        }
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "  chain postrouting {{");
    let _ = writeln!(s, "    type nat hook postrouting priority srcnat; policy accept;");
    if !uplinks.is_empty() {
        let names: Vec<String> = uplinks.iter().map(|u| format!("\"{u}\"")).collect();
        let _ = writeln!(s, "    oifname != {{ {} }} return", names.join(", "));
    }
    let _ = writeln!(s, "    ip saddr @pod_sources4 ip daddr != @exempt4 masquerade");
    let _ = writeln!(s, "    ip6 saddr @pod_sources6 ip6 daddr != @exempt6 masquerade");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    s
}

/// Why a range is in the exempt set, for `ferry status`.
pub fn describe(reason: ExemptReason) -> &'static str {
    match reason {
        ExemptReason::Configured => "nonMasqueradeCIDRs",
        ExemptReason::PrivateDefault => "private default",
        ExemptReason::ClusterCidr => "cluster CIDR",
        ExemptReason::LinkLocal => "link-local",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{ClusterState, NodeConfig, build_plan, node_config::MasqueradeMode};

    #[test]
    fn renders_sources_exemptions_and_uplinks() {
        let cfg = NodeConfig {
            node_name: "a".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            non_masquerade_cidrs: vec!["10.20.30.0/24".parse().unwrap()],
            masquerade: MasqueradeMode::Nftables,
            ..Default::default()
        };
        let plan = build_plan(&ClusterState::default(), &cfg);
        let text = render(&plan.node, &["eth0".into()]);
        assert!(text.contains("table inet ferry-masq {"), "{text}");
        assert!(text.contains("elements = { 10.244.1.0/24 }"), "{text}");
        assert!(text.contains("10.20.30.0/24, 10.244.0.0/16, 169.254.0.0/16"), "{text}");
        assert!(text.contains("oifname != { \"eth0\" } return"), "{text}");
        assert!(text.starts_with("add table inet ferry-masq\ndelete table inet ferry-masq\n"));
    }
}
