//! Egress masquerading: whether a pod's connection to a destination outside
//! the cluster leaves the node with the node's address, and which rule decided.
//!
//! Masquerading is never implied: it is off unless the node config says
//! `masquerade: bpf` or `masquerade: nftables` (see seeds/cilium-masquerading-
//! troubleshooting: a renamed key silently turned it on, and a database saw
//! node addresses instead of pod addresses). The rules, in order:
//!
//! 1. masquerading is off: never;
//! 2. the source is not a pod of this node (the host itself, a forwarded
//!    packet): not masqueraded;
//! 3. the destination is in `nonMasqueradeCIDRs` (empty: ip-masq-agent's
//!    private defaults) or a cluster CIDR (native routing): not masqueraded;
//! 4. the destination is link-local: masqueraded only with `masqueradeLinkLocal`;
//! 5. the destination is another node's address: not masqueraded;
//! 6. otherwise: masqueraded to the address of the device it leaves through.
//!
//! Replies to connections that came in from outside are never masqueraded:
//! they are not new connections, the datapath matches them to their flow.

use crate::addr::IpFamily;
use crate::node_config::MasqueradeMode;
use crate::plan::NodeFacts;
use ipnet::IpNet;
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;

/// ip-masq-agent's default non-masquerade ranges (used when `nonMasqueradeCIDRs` is empty).
pub const DEFAULT_NON_MASQUERADE_V4: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "240.0.0.0/4",
];
/// Unique local addresses: the IPv6 counterpart of the private defaults.
pub const DEFAULT_NON_MASQUERADE_V6: &[&str] = &["fc00::/7"];

/// Why a range is exempt from masquerading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ExemptReason {
    /// Listed in `nonMasqueradeCIDRs`.
    Configured,
    /// `nonMasqueradeCIDRs` is empty, so ip-masq-agent's private defaults apply.
    PrivateDefault,
    /// A cluster (pod) CIDR: pods are reached by native routing.
    ClusterCidr,
    /// Link-local, and `masqueradeLinkLocal` is off.
    LinkLocal,
}

/// The egress decision for one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressDecision {
    pub masquerade: bool,
    /// The rule that decided, in an operator's words.
    pub rule: String,
}

impl fmt::Display for EgressDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} — {}",
            if self.masquerade { "masqueraded to the node's address" } else { "not masqueraded" },
            self.rule
        )
    }
}

/// Ranges exempt from masquerading, in the order they are checked.
pub fn exempt_ranges(
    non_masquerade: &[IpNet],
    cluster_cidrs: &[IpNet],
    masquerade_link_local: bool,
) -> Vec<(IpNet, ExemptReason)> {
    let mut out = Vec::new();
    if non_masquerade.is_empty() {
        for s in DEFAULT_NON_MASQUERADE_V4.iter().chain(DEFAULT_NON_MASQUERADE_V6) {
            out.push((s.parse().expect("constant CIDR"), ExemptReason::PrivateDefault));
        }
    } else {
        out.extend(non_masquerade.iter().map(|n| (*n, ExemptReason::Configured)));
    }
    out.extend(cluster_cidrs.iter().map(|n| (*n, ExemptReason::ClusterCidr)));
    if !masquerade_link_local {
        out.push(("169.254.0.0/16".parse().expect("constant CIDR"), ExemptReason::LinkLocal));
        out.push(("fe80::/10".parse().expect("constant CIDR"), ExemptReason::LinkLocal));
    }
    out
}

/// The decision for a new connection from `src` to `dst` leaving the node.
pub fn decide(node: &NodeFacts, src: &IpAddr, dst: &IpAddr) -> EgressDecision {
    let no = |rule: String| EgressDecision { masquerade: false, rule };
    match node.masquerade {
        MasqueradeMode::Off => {
            return no("masquerading is off (the node config has no `masquerade: bpf|nftables`)".into());
        }
        MasqueradeMode::Bpf | MasqueradeMode::Nftables => {}
    }
    let family = IpFamily::of(dst);
    if node.local_addresses.contains(src) {
        return no(format!("{src} is the node itself; the host's own traffic is never masqueraded"));
    }
    if !node.masquerade_sources.iter().any(|n| n.contains(src)) {
        let ranges: Vec<String> = node.masquerade_sources.iter().map(|n| n.to_string()).collect();
        return no(format!("{src} is not a pod of this node (pod ranges: [{}])", ranges.join(", ")));
    }
    for (net, why) in &node.masquerade_exempt {
        if IpFamily::of_net(net) == family && net.contains(dst) {
            return no(match why {
                ExemptReason::Configured => format!("{dst} is inside nonMasqueradeCIDRs entry {net}"),
                ExemptReason::PrivateDefault => {
                    format!("{dst} is inside {net}, one of the private ranges used because nonMasqueradeCIDRs is empty")
                }
                ExemptReason::ClusterCidr => format!("{dst} is inside cluster CIDR {net}: pods are routed natively"),
                ExemptReason::LinkLocal => format!("{dst} is link-local ({net}) and masqueradeLinkLocal is off"),
            });
        }
    }
    if node.other_node_addresses.contains(dst) {
        return no(format!("{dst} is another node's address; node-to-node traffic keeps the pod address"));
    }
    EgressDecision {
        masquerade: true,
        rule: format!(
            "{dst} is outside every exempt range: SNAT to the node address of the device the packet leaves through ({} datapath)",
            match node.masquerade {
                MasqueradeMode::Bpf => "BPF",
                _ => "nftables",
            }
        ),
    }
}
