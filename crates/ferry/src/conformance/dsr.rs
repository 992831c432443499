//! `ferry conformance --lb-mode dsr|hybrid`: what the kernel lab needs for
//! Direct Server Return, and the expectation DSR legitimately changes.
//!
//! The lab's remote node (where every endpoint not on the node under test
//! lives) gets an agent of its own in the same mode, since it must unwrap the
//! tunnel and answer the client itself: its manifests are the case's, with
//! every endpoint not on the node under test moved to it by `nodeName`, and
//! the node under test's Node object (its addresses authenticate the
//! tunnel). The node under test learns the remote node from a Node object
//! `ferry-remote` whose pod ranges are the remote endpoints' addresses.
//!
//! The expectation: a case says, per flow, whether the endpoint sees the
//! connection masqueraded, for kube-proxy (SNAT). Where the model (`explain`
//! in the mode) says DSR carries the flow to an endpoint, the lab checks the
//! DSR observation instead, per endpoint: the client's own address.

use ferry_model::dsr::Carrier;
use ferry_model::explain::{Flow, Verdict, explain};
use ferry_model::{ClusterState, NodeConfig, Plan, StateChange};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// The remote node's name in the lab and in its Node object.
pub const REMOTE_NODE: &str = "ferry-remote";

fn node_object(name: &str, addresses: &[IpAddr], pod_cidrs: &[String]) -> StateChange {
    let addrs: Vec<serde_json::Value> =
        addresses.iter().map(|a| json!({"type": "InternalIP", "address": a.to_string()})).collect();
    let node = json!({"metadata": {"name": name}, "spec": {"podCIDRs": pod_cidrs}, "status": {"addresses": addrs}});
    StateChange::NodeApplied(Box::new(serde_json::from_value(node).expect("a Node object")))
}

/// The endpoints a Plan places on other nodes (the lab puts them on its remote node).
pub fn remote_endpoints(plan: &Plan) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> =
        plan.services.values().flat_map(|sp| sp.endpoints.iter()).filter(|e| !e.local).map(|e| e.ip).collect();
    out.sort();
    out.dedup();
    out
}

/// The node under test's objects: the case's, plus the remote node's Node
/// object (its addresses; the remote endpoints as its pod ranges).
pub fn for_node_under_test(state: &ClusterState, remote: &[IpAddr], remote_addresses: &[IpAddr]) -> ClusterState {
    let mut s = state.clone();
    let cidrs: Vec<String> = remote.iter().map(|ip| ipnet::IpNet::from(*ip).to_string()).collect();
    s.apply(node_object(REMOTE_NODE, remote_addresses, &cidrs));
    s
}

/// The remote node's objects: the case's, every endpoint not on the node
/// under test moved to the remote node, and the node under test's Node
/// object with `addresses`.
pub fn for_remote_node(state: &ClusterState, cfg: &NodeConfig, addresses: &[IpAddr]) -> ClusterState {
    let mut s = state.clone();
    for slice in s.endpoint_slices.values_mut() {
        for e in slice.endpoints.iter_mut().flatten() {
            if e.node_name.as_deref() != Some(cfg.node_name.as_str()) {
                e.node_name = Some(REMOTE_NODE.to_string());
            }
        }
    }
    s.apply(node_object(&cfg.node_name, addresses, &[]));
    s
}

/// The remote node's config: its name and addresses, the case's ranges and detector, the mode.
pub fn remote_config(cfg: &NodeConfig, addresses: &[IpAddr]) -> NodeConfig {
    NodeConfig {
        node_name: REMOTE_NODE.to_string(),
        node_ips: addresses.to_vec(),
        cluster_cidrs: cfg.cluster_cidrs.clone(),
        service_cidrs: cfg.service_cidrs.clone(),
        local_detector: cfg.local_detector.clone(),
        load_balancing: cfg.load_balancing,
        ..NodeConfig::default()
    }
}

/// Per endpoint, whether the model in DSR mode expects it to see the flow
/// masqueraded; `None` when DSR carries the flow to none of them (the
/// case's own expectation stands).
pub fn expected_masquerade(plan: &Plan, flow: &Flow) -> Option<BTreeMap<SocketAddr, bool>> {
    let Verdict::Endpoints(c) = explain(plan, flow).verdict else { return None };
    c.iter()
        .any(|c| matches!(c.carrier, Some(Carrier::Dsr { .. })))
        .then(|| c.iter().map(|c| (c.addr, c.masquerade)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{LoadBalancingMode, Protocol, build_plan};

    /// A NodePort with one endpoint here and one elsewhere: in dsr mode the
    /// remote one is expected unmasqueraded (DSR), the local one masqueraded
    /// (eTP Cluster, as kube-proxy); the remote node's view has it local.
    #[test]
    fn dsr_changes_the_expectation_of_remote_endpoints_only() {
        let mut s = ClusterState::default();
        let svc = json!({"metadata": {"name": "web", "namespace": "demo"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "ports": [{"port": 80, "nodePort": 30080}]}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let slice = json!({"metadata": {"name": "web-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.1.0.5"], "nodeName": "a"}, {"addresses": ["10.2.0.5"], "nodeName": "b"}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
        let cfg = NodeConfig {
            node_name: "a".into(),
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            load_balancing: LoadBalancingMode::Dsr,
            ..Default::default()
        };
        let remote: Vec<IpAddr> = vec!["198.18.0.2".parse().unwrap()];
        let plan0 = build_plan(&s, &cfg);
        let far = remote_endpoints(&plan0);
        assert_eq!(far, ["10.2.0.5".parse::<IpAddr>().unwrap()]);
        let plan = build_plan(&for_node_under_test(&s, &far, &remote), &cfg);
        let flow = Flow {
            src: "203.0.113.9".parse().unwrap(),
            dst: "192.168.0.2".parse().unwrap(),
            port: 30080,
            protocol: Protocol::Tcp,
            in_interface: None,
        };
        let want = expected_masquerade(&plan, &flow).expect("DSR carries the flow to 10.2.0.5");
        assert!(!want[&"10.2.0.5:8080".parse().unwrap()], "the remote endpoint sees the client (DSR)");
        assert!(want[&"10.1.0.5:8080".parse().unwrap()], "the local endpoint is masqueraded (eTP Cluster)");
        let snat = NodeConfig { load_balancing: LoadBalancingMode::Snat, ..cfg.clone() };
        assert_eq!(expected_masquerade(&build_plan(&s, &snat), &flow), None);
        let theirs = build_plan(&for_remote_node(&s, &cfg, &cfg.node_ips), &remote_config(&cfg, &remote));
        let sp = theirs.services.values().next().unwrap();
        let local: Vec<IpAddr> = sp.endpoints.iter().filter(|e| e.local).map(|e| e.ip).collect();
        assert_eq!(local, far, "the remote node holds the far endpoint");
    }
}
