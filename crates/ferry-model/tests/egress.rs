//! Egress masquerading decisions, rule by rule (the order is part of the contract).

use ferry_model::node_config::MasqueradeMode;
use ferry_model::{ClusterState, NodeConfig, build_plan, egress};
use serde_json::json;

fn cfg(mode: MasqueradeMode, non_masq: &[&str], link_local: bool) -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade: mode,
        non_masquerade_cidrs: non_masq.iter().map(|s| s.parse().unwrap()).collect(),
        masquerade_link_local: link_local,
        ..Default::default()
    }
}

fn state_with_other_node() -> ClusterState {
    let mut s = ClusterState::default();
    let node = json!({"metadata": {"name": "node-b"}, "status": {"addresses": [{"type": "InternalIP", "address": "34.1.2.3"}]}});
    s.apply(ferry_model::StateChange::NodeApplied(Box::new(serde_json::from_value(node).unwrap())));
    s
}

fn decide(c: &NodeConfig, src: &str, dst: &str) -> (bool, String) {
    let plan = build_plan(&state_with_other_node(), c);
    let d = egress::decide(&plan.node, &src.parse().unwrap(), &dst.parse().unwrap());
    (d.masquerade, d.rule)
}

#[test]
fn off_by_default_and_named_as_such() {
    assert_eq!(NodeConfig::default().masquerade, MasqueradeMode::Off);
    let (m, why) = decide(&cfg(MasqueradeMode::Off, &[], false), "10.244.1.5", "1.2.3.4");
    assert!(!m);
    assert!(why.contains("masquerading is off"), "{why}");
}

#[test]
fn pods_going_outside_are_masqueraded() {
    let (m, why) = decide(&cfg(MasqueradeMode::Bpf, &[], false), "10.244.1.5", "1.2.3.4");
    assert!(m, "{why}");
}

#[test]
fn the_host_and_foreign_sources_are_not() {
    let c = cfg(MasqueradeMode::Bpf, &[], false);
    assert!(decide(&c, "192.168.0.2", "1.2.3.4").1.contains("the node itself"));
    assert!(decide(&c, "10.244.2.5", "1.2.3.4").1.contains("not a pod of this node"));
}

#[test]
fn empty_list_means_private_defaults() {
    let c = cfg(MasqueradeMode::Bpf, &[], false);
    for dst in ["10.9.9.9", "172.20.0.1", "192.168.7.7", "100.64.0.1", "203.0.113.9"] {
        let (m, why) = decide(&c, "10.244.1.5", dst);
        assert!(!m && why.contains("private ranges"), "{dst}: {why}");
    }
}

#[test]
fn configured_ranges_replace_the_defaults() {
    // The routable-pod-IP setup of the seed: the database network must see pod addresses.
    let c = cfg(MasqueradeMode::Bpf, &["10.20.30.0/24"], false);
    let (m, why) = decide(&c, "10.244.1.5", "10.20.30.40");
    assert!(!m && why.contains("nonMasqueradeCIDRs entry 10.20.30.0/24"), "{why}");
    // With an explicit list, private ranges outside it are masqueraded.
    assert!(decide(&c, "10.244.1.5", "192.168.7.7").0);
}

#[test]
fn cluster_cidrs_link_local_and_other_nodes_are_exempt() {
    let c = cfg(MasqueradeMode::Bpf, &["1.1.1.0/24"], false);
    assert!(decide(&c, "10.244.1.5", "10.244.3.3").1.contains("cluster CIDR"));
    assert!(decide(&c, "10.244.1.5", "169.254.169.254").1.contains("link-local"));
    assert!(decide(&c, "10.244.1.5", "34.1.2.3").1.contains("another node"));
    let with_ll = cfg(MasqueradeMode::Bpf, &["1.1.1.0/24"], true);
    assert!(decide(&with_ll, "10.244.1.5", "169.254.169.254").0);
}

#[test]
fn explain_reports_the_egress_decision() {
    let plan = build_plan(&state_with_other_node(), &cfg(MasqueradeMode::Nftables, &[], false));
    let e = ferry_model::explain(
        &plan,
        &ferry_model::Flow {
            src: "10.244.1.5".parse().unwrap(),
            dst: "8.8.8.8".parse().unwrap(),
            port: 443,
            protocol: ferry_model::Protocol::Tcp,
            in_interface: None,
        },
    );
    let egress = e.egress.clone().expect("an egress decision");
    assert!(egress.masquerade);
    assert!(e.to_string().contains("egress    masqueraded"), "{e}");
}
