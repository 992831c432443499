//! Malformed objects are skipped with an error naming object and field; everything else is still served.

use ferry_model::{ClusterState, Consequence, NodeConfig, ObjectKind, StateChange, build_plan};
use serde_json::{Value, json};

fn cfg() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap(), "2001:db8::2".parse().unwrap()],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00:10::/64".parse().unwrap()],
        ..Default::default()
    }
}

fn state(objects: Vec<Value>) -> ClusterState {
    let mut s = ClusterState::default();
    for o in objects {
        let change = match o["kind"].as_str().unwrap() {
            "Service" => StateChange::ServiceApplied(Box::new(serde_json::from_value(o).unwrap())),
            "EndpointSlice" => StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(o).unwrap())),
            "Node" => StateChange::NodeApplied(Box::new(serde_json::from_value(o).unwrap())),
            k => panic!("kind {k}"),
        };
        s.apply(change);
    }
    s
}

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

fn slice(name: &str, service: &str, family: &str, endpoints: Value, ports: Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "endpoints": endpoints, "ports": ports})
}

fn good() -> Vec<Value> {
    vec![
        service("good", json!({"clusterIP": "172.30.0.1", "ports": [{"port": 80}]})),
        slice("good-1", "good", "IPv4", json!([{"addresses": ["10.1.0.1"]}]), json!([{"port": 8080}])),
    ]
}

/// Builds a plan of `good()` plus `bad`, asserts `good` is still fully served,
/// and returns the problems.
fn problems_with(bad: Vec<Value>) -> Vec<ferry_model::ObjectError> {
    let mut objects = good();
    objects.extend(bad);
    let plan = build_plan(&state(objects), &cfg());
    let good = plan.services.values().find(|s| s.id.service.name() == "good").expect("good service still planned");
    assert_eq!(good.endpoints.len(), 1, "good service keeps its endpoint");
    plan.problems
}

fn assert_one(problems: &[ferry_model::ObjectError], kind: ObjectKind, object: &str, field: &str, words: &str) {
    let p = problems
        .iter()
        .find(|p| p.kind == kind && p.object.to_string() == object && p.field == field)
        .unwrap_or_else(|| panic!("no problem for {kind} {object} {field} in {problems:#?}"));
    assert!(p.message.contains(words), "{p}");
    assert!(p.to_string().contains(object) && p.to_string().contains(field), "{p}");
}

#[test]
fn bad_cluster_ip_skips_the_service() {
    let ps = problems_with(vec![service("bad", json!({"clusterIP": "172.30.0.300", "ports": [{"port": 80}]}))]);
    assert_one(&ps, ObjectKind::Service, "ns/bad", "spec.clusterIP", "not an IP address");
    assert_eq!(ps[0].consequence, Consequence::ObjectSkipped);
}

#[test]
fn port_out_of_range() {
    let ps = problems_with(vec![service("bad", json!({"clusterIP": "172.30.0.2", "ports": [{"port": 70000}]}))]);
    assert_one(&ps, ObjectKind::Service, "ns/bad", "spec.ports[0].port", "out of range 1-65535");
    let ps = problems_with(vec![service(
        "bad",
        json!({"type": "NodePort", "clusterIP": "172.30.0.2", "ports": [{"port": 80, "nodePort": -1}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/bad", "spec.ports[0].nodePort", "out of range");
}

#[test]
fn duplicate_ports_and_names() {
    let ps = problems_with(vec![service(
        "bad",
        json!({"clusterIP": "172.30.0.2", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/bad", "spec.ports[1].port", "duplicate port 80/TCP");
    let ps = problems_with(vec![service(
        "bad",
        json!({"clusterIP": "172.30.0.2", "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/bad", "spec.ports[1].name", "duplicate port name");
    // Same number on two protocols is fine.
    let ps = problems_with(vec![service(
        "ok",
        json!({"clusterIP": "172.30.0.2", "ports": [{"name": "a", "port": 53, "protocol": "UDP"}, {"name": "b", "port": 53}]}),
    )]);
    assert!(ps.is_empty(), "{ps:?}");
}

#[test]
fn bad_protocol_policy_affinity() {
    let ps = problems_with(vec![service(
        "p",
        json!({"clusterIP": "172.30.0.2", "ports": [{"port": 80, "protocol": "tcp"}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/p", "spec.ports[0].protocol", "not TCP, UDP or SCTP");
    let ps = problems_with(vec![service(
        "p",
        json!({"type": "NodePort", "clusterIP": "172.30.0.2", "externalTrafficPolicy": "Sometimes", "ports": [{"port": 80}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/p", "spec.externalTrafficPolicy", "not Cluster or Local");
    let ps = problems_with(vec![service(
        "p",
        json!({"clusterIP": "172.30.0.2", "sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}, "ports": [{"port": 80}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/p", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "out of range");
}

#[test]
fn bad_external_ip_and_source_range() {
    let ps = problems_with(vec![service(
        "x",
        json!({"clusterIP": "172.30.0.2", "externalIPs": ["1.2.3.4", "nope"], "ports": [{"port": 80}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/x", "spec.externalIPs[1]", "not an IP address");
    let ps = problems_with(vec![service(
        "x",
        json!({"type": "LoadBalancer", "clusterIP": "172.30.0.2", "loadBalancerSourceRanges": ["10.0.0.0/33"], "ports": [{"port": 80}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/x", "spec.loadBalancerSourceRanges[0]", "not a CIDR");
}

#[test]
fn wrong_family_endpoint_is_skipped_alone() {
    let mut objects = good();
    objects.push(service("mixed", json!({"clusterIP": "172.30.0.3", "ports": [{"port": 80}]})));
    objects.push(slice(
        "mixed-1",
        "mixed",
        "IPv4",
        json!([{"addresses": ["fd00::1"]}, {"addresses": ["10.1.0.9"]}, {"addresses": ["10.1.0.x"]}]),
        json!([{"port": 80}]),
    ));
    let plan = build_plan(&state(objects), &cfg());
    assert_one(
        &plan.problems,
        ObjectKind::EndpointSlice,
        "ns/mixed-1",
        "endpoints[0].addresses[0]",
        "wrong address family",
    );
    assert_one(
        &plan.problems,
        ObjectKind::EndpointSlice,
        "ns/mixed-1",
        "endpoints[2].addresses[0]",
        "not an IP address",
    );
    let mixed = plan.services.values().find(|s| s.id.service.name() == "mixed").unwrap();
    assert_eq!(mixed.endpoints.len(), 1);
    assert_eq!(mixed.endpoints[0].ip.to_string(), "10.1.0.9");
}

#[test]
fn slice_for_unknown_service_and_without_label() {
    let mut bad = vec![slice("orphan", "ghost", "IPv4", json!([{"addresses": ["10.1.0.5"]}]), json!([{"port": 80}]))];
    let mut unlabelled = slice("nolabel", "x", "IPv4", json!([]), json!([]));
    unlabelled["metadata"]["labels"] = json!({});
    bad.push(unlabelled);
    let ps = problems_with(bad);
    assert_one(
        &ps,
        ObjectKind::EndpointSlice,
        "ns/orphan",
        "metadata.labels[kubernetes.io/service-name]",
        "does not exist",
    );
    assert_one(
        &ps,
        ObjectKind::EndpointSlice,
        "ns/nolabel",
        "metadata.labels[kubernetes.io/service-name]",
        "is missing",
    );
}

#[test]
fn ip_families_must_match_cluster_ips() {
    let ps = problems_with(vec![service(
        "fam",
        json!({"clusterIP": "172.30.0.9", "ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
    )]);
    assert_one(&ps, ObjectKind::Service, "ns/fam", "spec.ipFamilies[0]", "wrong address family");
}

#[test]
fn missing_cluster_ip_is_explained() {
    let ps = problems_with(vec![service("noip", json!({"ports": [{"port": 80}]}))]);
    assert_one(&ps, ObjectKind::Service, "ns/noip", "spec.clusterIP", "is not set");
}

#[test]
fn headless_external_name_and_other_proxies_are_ignored_not_errors() {
    let mut objects = good();
    objects.push(service("headless", json!({"clusterIP": "None", "ports": [{"port": 80}]})));
    objects.push(service("alias", json!({"type": "ExternalName", "externalName": "example.com"})));
    let mut other = service("other", json!({"clusterIP": "172.30.0.7", "ports": [{"port": 80}]}));
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    objects.push(other);
    let plan = build_plan(&state(objects), &cfg());
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    assert_eq!(plan.ignored.len(), 3);
    assert!(!plan.cluster_ips.contains(&"172.30.0.7".parse::<std::net::IpAddr>().unwrap()));

    // A node configured with that proxy name serves it.
    let mine = NodeConfig { service_proxy_name: Some("someone-else".into()), ..cfg() };
    let mut objects = good();
    let mut other = service("other", json!({"clusterIP": "172.30.0.7", "ports": [{"port": 80}]}));
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    objects.push(other);
    let plan = build_plan(&state(objects), &mine);
    assert!(plan.cluster_ips.contains(&"172.30.0.7".parse::<std::net::IpAddr>().unwrap()));
}

#[test]
fn headless_slices_are_ignored() {
    let mut objects = good();
    let mut s = slice("h", "good", "IPv4", json!([{"addresses": ["10.9.9.9"]}]), json!([{"port": 8080}]));
    s["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    objects.push(s);
    let plan = build_plan(&state(objects), &cfg());
    let good = plan.services.values().find(|s| s.id.service.name() == "good").unwrap();
    assert_eq!(good.endpoints.len(), 1);
}

#[test]
fn conflicting_frontends_keep_the_first_and_warn() {
    let mut objects = good();
    objects
        .push(service("a", json!({"clusterIP": "172.30.0.10", "externalIPs": ["5.5.5.5"], "ports": [{"port": 80}]})));
    objects
        .push(service("b", json!({"clusterIP": "172.30.0.11", "externalIPs": ["5.5.5.5"], "ports": [{"port": 80}]})));
    let plan = build_plan(&state(objects), &cfg());
    assert_one(&plan.problems, ObjectKind::Service, "ns/b", "spec.externalIPs", "already served by ns/a");
    let key = ferry_model::FrontendKey {
        addr: ferry_model::FrontendAddr::Ip("5.5.5.5".parse().unwrap()),
        port: 80,
        protocol: ferry_model::Protocol::Tcp,
    };
    assert_eq!(plan.frontends[&key].service.service.name(), "a");
}

#[test]
fn dual_stack_service_gets_one_port_per_family() {
    let objects = vec![
        service(
            "ds",
            json!({"clusterIP": "172.30.0.5", "clusterIPs": ["172.30.0.5", "fd00:96::5"],
                   "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80}]}),
        ),
        slice("ds-4", "ds", "IPv4", json!([{"addresses": ["10.1.0.1"]}]), json!([{"port": 80}])),
        slice("ds-6", "ds", "IPv6", json!([{"addresses": ["fd00:10::1"]}]), json!([{"port": 80}])),
    ];
    let plan = build_plan(&state(objects), &cfg());
    assert_eq!(plan.services.len(), 2);
    for sp in plan.services.values() {
        assert_eq!(sp.endpoints.len(), 1);
        assert_eq!(ferry_model::IpFamily::of(&sp.endpoints[0].ip), sp.id.family);
    }
}

#[test]
fn endpoints_from_several_slices_merge_and_deduplicate() {
    let objects = vec![
        service("m", json!({"clusterIP": "172.30.0.5", "ports": [{"port": 80}]})),
        slice(
            "m-1",
            "m",
            "IPv4",
            json!([{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.2"]}]),
            json!([{"port": 80}]),
        ),
        slice("m-2", "m", "IPv4", json!([{"addresses": ["10.1.0.2"], "nodeName": "node-a"}]), json!([{"port": 80}])),
    ];
    let plan = build_plan(&state(objects), &cfg());
    let sp = plan.services.values().next().unwrap();
    assert_eq!(sp.endpoints.len(), 2);
    assert!(sp.endpoints.iter().find(|e| e.ip.to_string() == "10.1.0.2").unwrap().local, "local copy wins");
}
