//! `Plan::diff` reports exactly what changed: one endpoint change touches one service port.

use ferry_model::{ClusterState, NodeConfig, Plan, StateChange, build_plan};
use serde_json::json;

fn cfg() -> NodeConfig {
    NodeConfig { node_name: "node-a".into(), node_ips: vec!["192.168.0.2".parse().unwrap()], ..Default::default() }
}

fn cluster(n_services: usize, endpoints_of_first: &[&str]) -> ClusterState {
    let mut s = ClusterState::default();
    for i in 0..n_services {
        let svc = json!({"metadata": {"name": format!("s{i}"), "namespace": "ns"},
            "spec": {"clusterIP": format!("172.30.{}.{}", i / 250, i % 250 + 1), "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let eps: Vec<_> = if i == 0 {
            endpoints_of_first.iter().map(|ip| json!({"addresses": [ip]})).collect()
        } else {
            vec![json!({"addresses": [format!("10.1.{}.{}", i / 250, i % 250 + 1)]})]
        };
        let slice = json!({"metadata": {"name": format!("s{i}-1"), "namespace": "ns", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
    }
    s
}

#[test]
fn identical_plans_have_an_empty_diff() {
    let a = build_plan(&cluster(20, &["10.9.0.1"]), &cfg());
    let b = build_plan(&cluster(20, &["10.9.0.1"]), &cfg());
    assert!(Plan::diff(&a, &b).is_empty());
}

#[test]
fn one_endpoint_change_touches_only_that_service() {
    let a = build_plan(&cluster(50, &["10.9.0.1", "10.9.0.2"]), &cfg());
    let b = build_plan(&cluster(50, &["10.9.0.1", "10.9.0.3"]), &cfg());
    let d = Plan::diff(&a, &b);
    assert!(d.added.is_empty() && d.removed.is_empty());
    assert!(d.frontends_added.is_empty() && d.frontends_removed.is_empty());
    assert_eq!(d.changed.len(), 2, "both ports of s0, nothing else");
    for c in &d.changed {
        assert_eq!(c.new.id.service.name(), "s0");
        assert!(c.only_endpoints);
        assert_eq!(c.endpoints_added.len(), 1);
        assert_eq!(c.endpoints_added[0].ip().to_string(), "10.9.0.3");
        assert_eq!(c.endpoints_removed[0].ip().to_string(), "10.9.0.2");
    }
    assert!(!d.node_changed && !d.cluster_ips_changed());
}

#[test]
fn adding_and_removing_services_and_node_changes() {
    let a = build_plan(&cluster(3, &["10.9.0.1"]), &cfg());
    let b = build_plan(&cluster(4, &["10.9.0.1"]), &cfg());
    let d = Plan::diff(&a, &b);
    assert_eq!(d.added.len(), 2);
    assert_eq!(d.frontends_added.len(), 2);
    assert!(d.cluster_ips_changed());
    let d = Plan::diff(&b, &a);
    assert_eq!(d.removed.len(), 2);
    assert_eq!(d.frontends_removed.len(), 2);

    let other = NodeConfig { masquerade_all: true, ..cfg() };
    let c = build_plan(&cluster(3, &["10.9.0.1"]), &other);
    let d = Plan::diff(&a, &c);
    assert!(d.node_changed);
}
