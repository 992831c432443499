//! Direct Server Return: which mode carries an outside connection to a
//! backend on another node (`loadBalancing.mode`), decided once, here.
//!
//! In `snat` mode (the default, kube-proxy's behaviour) the receiving node
//! SNATs such a connection to itself and carries the replies back. In `dsr`
//! mode it tunnels the client's packets unchanged (IPv4 in IPv4, IPv6 in
//! IPv6) to the backend's node, which answers the client directly from the
//! frontend address;
//! `hybrid` does so for TCP and keeps SNAT for UDP (and SCTP), whose
//! datagrams cannot be made smaller by an MSS and may not fit the tunnel.
//!
//! The backend's node is found from the Node objects: each other node's pod
//! ranges (`spec.podCIDRs`) and its own addresses (host-network endpoints)
//! map to its first address of the same family (a tunnel never changes the
//! family: an IPv6 backend is reached through its node's IPv6 address, and a
//! node without one has no IPv6 rows). A backend in no such range has
//! no known node: its flow falls back to SNAT (the datapath counts it,
//! `dsr_no_tunnel`). The datapath programs the same table, so `explain` and
//! the kernel agree.

use crate::addr::IpFamily;
use crate::node_info::NodeInfo;
use crate::plan::FrontendKind;
use crate::protocol::Protocol;
use crate::route::SourceClass;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// `loadBalancing.mode` in the node config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancingMode {
    /// SNAT to the receiving node for remote backends (kube-proxy).
    #[default]
    Snat,
    /// Direct Server Return for every protocol.
    Dsr,
    /// Direct Server Return for TCP, SNAT for UDP and SCTP.
    Hybrid,
}

impl LoadBalancingMode {
    /// The mode named in the config file (`snat`, `dsr`, `hybrid`).
    pub fn parse(s: &str) -> Option<LoadBalancingMode> {
        match s {
            "snat" => Some(LoadBalancingMode::Snat),
            "dsr" => Some(LoadBalancingMode::Dsr),
            "hybrid" => Some(LoadBalancingMode::Hybrid),
            _ => None,
        }
    }

    /// Whether connections of `protocol` may be carried by DSR.
    pub fn dsr_for(self, protocol: Protocol) -> bool {
        match self {
            LoadBalancingMode::Snat => false,
            LoadBalancingMode::Dsr => true,
            LoadBalancingMode::Hybrid => protocol == Protocol::Tcp,
        }
    }
}

impl fmt::Display for LoadBalancingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadBalancingMode::Snat => "snat",
            LoadBalancingMode::Dsr => "dsr",
            LoadBalancingMode::Hybrid => "hybrid",
        })
    }
}

/// Where packets for backends inside `prefix` are tunnelled to: `via`, an
/// address of node `node`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Tunnel {
    pub prefix: IpNet,
    pub node: String,
    pub via: IpAddr,
}

/// The tunnel table of this node: for every other node, its pod ranges and
/// its own addresses, each to the node's first address of that family
/// (both families: the datapath tunnels IPv4 in IPv4 and IPv6 in IPv6).
pub fn tunnels(nodes: &BTreeMap<String, NodeInfo>, this_node: &str) -> Vec<Tunnel> {
    let mut out = Vec::new();
    for (name, n) in nodes.iter().filter(|(name, _)| name.as_str() != this_node) {
        for family in [IpFamily::V4, IpFamily::V6] {
            let Some(via) = n.addresses.iter().copied().find(|a| IpFamily::of(a) == family) else { continue };
            let ranges = n.pod_cidrs.iter().filter_map(|s| crate::addr::parse_cidr_sloppy(s));
            let own = n.addresses.iter().map(|a| IpNet::from(*a));
            for prefix in ranges.chain(own).filter(|p| IpFamily::of_net(p) == family) {
                out.push(Tunnel { prefix: prefix.trunc(), node: name.clone(), via });
            }
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.prefix == b.prefix);
    out
}

/// The longest tunnel prefix holding `backend` (what the datapath's LPM lookup finds).
pub fn tunnel_for<'a>(tunnels: &'a [Tunnel], backend: &IpAddr) -> Option<&'a Tunnel> {
    tunnels.iter().filter(|t| t.prefix.contains(backend)).max_by_key(|t| t.prefix.prefix_len())
}

/// How a connection reaches one remote endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Carrier {
    /// As in `snat` mode: the route's masquerade decision applies.
    Translated { why: String },
    /// Tunnelled to the endpoint's node, which answers the client directly.
    Dsr { node: String, via: IpAddr },
}

/// Which mode carries a new connection of `protocol` from a source of
/// `class`, through a frontend of `kind`, to a backend at `backend` (remote
/// when `!local`), on a node in `mode` with `tunnels`.
pub fn carrier(
    mode: LoadBalancingMode,
    tunnels: &[Tunnel],
    kind: FrontendKind,
    class: SourceClass,
    protocol: Protocol,
    backend: &IpAddr,
    local: bool,
) -> Carrier {
    let why = |s: String| Carrier::Translated { why: s };
    if mode == LoadBalancingMode::Snat {
        return why("loadBalancing.mode is snat".into());
    }
    if local {
        return why("the endpoint is on this node: nothing to tunnel".into());
    }
    if kind == FrontendKind::ClusterIp {
        return why("DSR carries NodePort, LoadBalancer and ExternalIP connections only".into());
    }
    if class != SourceClass::External {
        return why(format!("DSR carries connections from outside the cluster only; the source is {class}"));
    }
    if !mode.dsr_for(protocol) {
        return why(format!("loadBalancing.mode {mode} carries {protocol} by SNAT"));
    }
    match tunnel_for(tunnels, backend) {
        Some(t) => Carrier::Dsr { node: t.node.clone(), via: t.via },
        None => why(format!(
            "no node is known for {backend} (no Node object's podCIDRs or addresses hold it): SNAT instead, counted as dsr_no_tunnel"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nodes() -> BTreeMap<String, NodeInfo> {
        let n2 = |cidrs: [&str; 2], addrs: &[&str]| NodeInfo {
            zone: None,
            pod_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            addresses: addrs.iter().map(|a| ip(a)).collect(),
        };
        let n = |cidr: &str, addrs: &[&str]| NodeInfo { pod_cidrs: vec![cidr.into()], ..n2([cidr, cidr], addrs) };
        BTreeMap::from([
            ("node-a".to_string(), n("10.244.1.0/24", &["192.168.50.10"])),
            ("node-b".to_string(), n2(["10.244.2.0/24", "fd00:244:2::/64"], &["fd00:50::b", "192.168.50.11"])),
            ("node-c".to_string(), n2(["10.244.3.0/24", "fd00:244:3::/64"], &["fd00:50::c"])),
            ("node-d".to_string(), n2(["10.244.4.0/24", "fd00:244:4::/64"], &["192.168.50.13"])),
        ])
    }

    #[test]
    fn modes_parse_and_cover_protocols() {
        assert_eq!(LoadBalancingMode::parse("hybrid"), Some(LoadBalancingMode::Hybrid));
        assert_eq!(LoadBalancingMode::parse("DSR"), None);
        assert!(!LoadBalancingMode::Snat.dsr_for(Protocol::Tcp));
        assert!(LoadBalancingMode::Dsr.dsr_for(Protocol::Udp));
        assert!(LoadBalancingMode::Hybrid.dsr_for(Protocol::Tcp));
        assert!(!LoadBalancingMode::Hybrid.dsr_for(Protocol::Udp));
        assert!(!LoadBalancingMode::Hybrid.dsr_for(Protocol::Sctp));
    }

    #[test]
    fn the_tunnel_table_maps_other_nodes_pods_and_addresses_to_their_address_of_the_family() {
        let t = tunnels(&nodes(), "node-a");
        let rows: Vec<(String, &str, IpAddr)> =
            t.iter().map(|t| (t.prefix.to_string(), t.node.as_str(), t.via)).collect();
        assert_eq!(
            rows,
            [
                ("10.244.2.0/24".to_string(), "node-b", ip("192.168.50.11")),
                ("10.244.4.0/24".to_string(), "node-d", ip("192.168.50.13")),
                ("192.168.50.11/32".to_string(), "node-b", ip("192.168.50.11")),
                ("192.168.50.13/32".to_string(), "node-d", ip("192.168.50.13")),
                ("fd00:50::b/128".to_string(), "node-b", ip("fd00:50::b")),
                ("fd00:50::c/128".to_string(), "node-c", ip("fd00:50::c")),
                ("fd00:244:2::/64".to_string(), "node-b", ip("fd00:50::b")),
                ("fd00:244:3::/64".to_string(), "node-c", ip("fd00:50::c")),
            ],
            "this node has no row; a node without an address of a family has no row of it (node-c: IPv4, node-d: IPv6)"
        );
        assert_eq!(tunnel_for(&t, &ip("10.244.2.7")).map(|t| t.via), Some(ip("192.168.50.11")));
        assert_eq!(tunnel_for(&t, &ip("fd00:244:2::7")).map(|t| t.via), Some(ip("fd00:50::b")));
        assert_eq!(tunnel_for(&t, &ip("10.244.3.7")), None);
        assert_eq!(tunnel_for(&t, &ip("fd00:244:4::7")), None);
    }

    /// The whole way: a NodePort with an endpoint on node-b (known from its
    /// Node object) and one on this node, planned and explained in each mode.
    #[test]
    fn explain_says_which_mode_carries_each_endpoint() {
        use crate::explain::{Flow, Verdict, explain};
        use crate::{ClusterState, NodeConfig, StateChange, build_plan};
        use serde_json::json;
        let mut s = ClusterState::default();
        let svc = json!({"metadata": {"name": "web", "namespace": "demo"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.20",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                               {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let slice = json!({"metadata": {"name": "web-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["10.244.2.21"], "nodeName": "node-b"}, {"addresses": ["10.244.1.21"], "nodeName": "node-a"}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
        let node = json!({"metadata": {"name": "node-b"}, "spec": {"podCIDRs": ["10.244.2.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.11"}]}});
        s.apply(StateChange::NodeApplied(Box::new(serde_json::from_value(node).unwrap())));
        let cfg = |mode| NodeConfig {
            node_name: "node-a".into(),
            node_ips: vec![ip("192.168.50.10")],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            load_balancing: mode,
            ..Default::default()
        };
        let flow = |port, protocol| Flow {
            src: ip("203.0.113.10"),
            dst: ip("192.168.50.10"),
            port,
            protocol,
            in_interface: None,
        };
        let candidates = |mode, port, protocol| {
            let plan = build_plan(&s, &cfg(mode));
            let Verdict::Endpoints(c) = explain(&plan, &flow(port, protocol)).verdict else { panic!("no endpoints") };
            c.into_iter().map(|c| (c.addr.ip(), c.masquerade, c.carrier)).collect::<Vec<_>>()
        };
        let dsr = Some(Carrier::Dsr { node: "node-b".into(), via: ip("192.168.50.11") });
        let got = candidates(LoadBalancingMode::Dsr, 30080, Protocol::Tcp);
        assert_eq!(got[0].0, ip("10.244.2.21"));
        assert_eq!((got[0].1, &got[0].2), (false, &dsr), "remote: DSR, not masqueraded");
        assert!(matches!(got[1].2, Some(Carrier::Translated { .. })), "local: nothing to tunnel");
        let got = candidates(LoadBalancingMode::Hybrid, 30053, Protocol::Udp);
        assert!(got[0].1 && matches!(got[0].2, Some(Carrier::Translated { .. })), "hybrid UDP: SNAT: {got:?}");
        let got = candidates(LoadBalancingMode::Snat, 30080, Protocol::Tcp);
        assert!(got[0].1 && got[0].2.is_none(), "snat: as before, no carrier line: {got:?}");
        // The node's own endpoints of an eTP Cluster service are planned as
        // a local set in DSR modes (what a tunnelled flow is balanced over).
        for (mode, local) in [(LoadBalancingMode::Snat, 0), (LoadBalancingMode::Dsr, 1)] {
            let plan = build_plan(&s, &cfg(mode));
            let sp = plan.services.values().find(|sp| sp.id.protocol == Protocol::Tcp).unwrap();
            assert_eq!(sp.endpoint_set(crate::route::EndpointSet::Local).count(), local, "{mode}");
        }
    }

    /// IPv6: an outside client's connection to a dual-stack NodePort on the
    /// node's IPv6 address is carried by DSR through node-b's IPv6 address,
    /// and `explain` says so, naming the tunnel IPv6 in IPv6.
    #[test]
    fn explain_says_dsr_carries_an_ipv6_flow_through_the_nodes_ipv6_address() {
        use crate::explain::{Flow, Verdict, explain};
        use crate::{ClusterState, NodeConfig, StateChange, build_plan};
        use serde_json::json;
        let mut s = ClusterState::default();
        let svc = json!({"metadata": {"name": "web", "namespace": "demo"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                     "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let slice = json!({"metadata": {"name": "web-6", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["fd00:244:2::21"], "nodeName": "node-b"}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
        let node = json!({"metadata": {"name": "node-b"}, "spec": {"podCIDRs": ["10.244.2.0/24", "fd00:244:2::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.11"},
                                     {"type": "InternalIP", "address": "fd00:50::b"}]}});
        s.apply(StateChange::NodeApplied(Box::new(serde_json::from_value(node).unwrap())));
        let cfg = NodeConfig {
            node_name: "node-a".into(),
            node_ips: vec![ip("192.168.50.10"), ip("fd00:50::a")],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap(), "fd00:244::/32".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap(), "fd00:96::/112".parse().unwrap()],
            load_balancing: LoadBalancingMode::Dsr,
            ..Default::default()
        };
        let flow = Flow {
            src: ip("2001:db8::10"),
            dst: ip("fd00:50::a"),
            port: 30080,
            protocol: Protocol::Tcp,
            in_interface: None,
        };
        let plan = build_plan(&s, &cfg);
        let e = explain(&plan, &flow);
        let text = e.to_string();
        let Verdict::Endpoints(c) = e.verdict else { panic!("no endpoints: {text}") };
        assert_eq!(c.len(), 1, "{text}");
        assert_eq!(c[0].carrier, Some(Carrier::Dsr { node: "node-b".into(), via: ip("fd00:50::b") }), "{text}");
        assert!(!c[0].masquerade, "{text}");
        assert!(text.contains("DSR, tunnelled (IPv6 in IPv6) to node-b at fd00:50::b"), "{text}");
    }

    /// Table: (mode, frontend, source, protocol, backend, local) -> carried how.
    #[test]
    fn which_mode_carries_a_flow() {
        use FrontendKind::*;
        use LoadBalancingMode::*;
        use SourceClass::*;
        let t = tunnels(&nodes(), "node-a");
        let b = ip("10.244.2.7");
        let b6 = ip("fd00:244:2::7");
        let dsr = Carrier::Dsr { node: "node-b".into(), via: ip("192.168.50.11") };
        let dsr6 = Carrier::Dsr { node: "node-b".into(), via: ip("fd00:50::b") };
        let cases = [
            (Dsr, NodePort, External, Protocol::Tcp, b, false, true),
            (Dsr, LoadBalancer, External, Protocol::Udp, b, false, true),
            (Dsr, ExternalIp, External, Protocol::Sctp, b, false, true),
            (Hybrid, NodePort, External, Protocol::Tcp, b, false, true),
            (Hybrid, NodePort, External, Protocol::Udp, b, false, false),
            (Snat, NodePort, External, Protocol::Tcp, b, false, false),
            (Dsr, NodePort, External, Protocol::Tcp, b, true, false),
            (Dsr, ClusterIp, External, Protocol::Tcp, b, false, false),
            (Dsr, NodePort, Pod, Protocol::Tcp, b, false, false),
            (Dsr, NodePort, Host, Protocol::Tcp, b, false, false),
            (Dsr, NodePort, External, Protocol::Tcp, ip("10.244.3.7"), false, false),
            // IPv6: the same decisions, through the node's IPv6 address.
            (Dsr, NodePort, External, Protocol::Tcp, b6, false, true),
            (Hybrid, LoadBalancer, External, Protocol::Tcp, b6, false, true),
            (Hybrid, NodePort, External, Protocol::Udp, b6, false, false),
            (Dsr, NodePort, External, Protocol::Tcp, b6, true, false),
            (Dsr, NodePort, Pod, Protocol::Tcp, b6, false, false),
            (Dsr, NodePort, External, Protocol::Tcp, ip("fd00:244:4::7"), false, false),
        ];
        for (mode, kind, class, proto, backend, local, want_dsr) in cases {
            let got = carrier(mode, &t, kind, class, proto, &backend, local);
            if want_dsr {
                let want = if backend.is_ipv6() { &dsr6 } else { &dsr };
                assert_eq!(&got, want, "{mode} {kind} {class} {proto} {backend}");
            } else {
                assert!(matches!(got, Carrier::Translated { .. }), "{mode} {kind} {class} {proto} {backend}: {got:?}");
            }
        }
    }
}
