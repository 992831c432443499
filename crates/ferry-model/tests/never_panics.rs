//! Property tests: the planner, diff and explain never panic, whatever objects arrive.

use ferry_model::{ClusterState, Flow, NodeConfig, Plan, Protocol, StateChange, build_plan, explain};
use proptest::prelude::*;
use serde_json::{Value, json};

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("10.0.0.1".to_string()),
        Just("10.0.0.2".to_string()),
        Just("172.30.0.1".to_string()),
        Just("192.168.0.2".to_string()),
        Just("fd00::1".to_string()),
        Just("2001:db8::1".to_string()),
        Just("010.000.000.001".to_string()),
        Just("None".to_string()),
        Just("".to_string()),
        "[0-9a-f:.]{0,12}",
        any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])),
    ]
}

fn cidr() -> impl Strategy<Value = String> {
    (ip(), -2i32..140).prop_map(|(ip, len)| format!("{ip}/{len}"))
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![Just("".to_string()), Just("a".to_string()), Just("b".to_string()), "[a-zA-Z]{1,8}"]
}

fn port() -> impl Strategy<Value = i64> {
    prop_oneof![1i64..5, Just(80), Just(53), -3i64..3, 65530i64..65540, any::<i32>().prop_map(i64::from)]
}

fn protocol() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!("TCP")),
        Just(json!("UDP")),
        Just(json!("SCTP")),
        word().prop_map(Value::from)
    ]
}

fn one_of(values: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![Just(Value::Null), proptest::sample::select(values).prop_map(Value::from), word().prop_map(Value::from)]
}

fn service() -> impl Strategy<Value = Value> {
    (
        (word(), one_of(&["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]), ip(), prop::collection::vec(ip(), 0..3)),
        prop::collection::vec((word(), port(), protocol(), prop::option::of(port())), 0..4),
        (prop::collection::vec(ip(), 0..3), prop::collection::vec(ip(), 0..3), prop::collection::vec(cidr(), 0..3)),
        (one_of(&["Cluster", "Local"]), one_of(&["Cluster", "Local"]), one_of(&["None", "ClientIP"]), prop::option::of(port())),
        (prop::option::of(port()), prop::collection::vec(one_of(&["IPv4", "IPv6"]), 0..3), one_of(&["Proxy", "VIP"])),
    )
        .prop_map(|((name, ty, cip, cips), ports, (eips, lbs, ranges), (etp, itp, aff, timeout), (hc, fams, mode))| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(n, p, proto, np)| json!({"name": n, "port": p, "protocol": proto, "nodePort": np}))
                .collect();
            let ingress: Vec<Value> = lbs.into_iter().map(|ip| json!({"ip": ip, "ipMode": mode})).collect();
            json!({
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"type": ty, "clusterIP": cip, "clusterIPs": cips, "ports": ports, "externalIPs": eips,
                         "loadBalancerSourceRanges": ranges, "externalTrafficPolicy": etp, "internalTrafficPolicy": itp,
                         "sessionAffinity": aff, "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
                         "healthCheckNodePort": hc, "ipFamilies": fams},
                "status": {"loadBalancer": {"ingress": ingress}}
            })
        })
}

fn slice() -> impl Strategy<Value = Value> {
    (
        word(),
        word(),
        one_of(&["IPv4", "IPv6", "FQDN"]),
        prop::collection::vec(
            (
                prop::collection::vec(ip(), 0..2),
                any::<Option<bool>>(),
                any::<Option<bool>>(),
                any::<Option<bool>>(),
                one_of(&["node-a", "node-b"]),
                prop::collection::vec(word(), 0..2),
            ),
            0..5,
        ),
        prop::collection::vec((prop::option::of(word()), prop::option::of(port()), protocol()), 0..3),
    )
        .prop_map(|(name, svc, fam, eps, ports)| {
            let eps: Vec<Value> = eps
                .into_iter()
                .map(|(addrs, r, s, t, node, zones)| {
                    let zones: Vec<Value> = zones.into_iter().map(|z| json!({"name": z})).collect();
                    json!({"addresses": addrs, "conditions": {"ready": r, "serving": s, "terminating": t},
                           "nodeName": node, "hints": {"forZones": zones, "forNodes": [{"name": "node-a"}]}})
                })
                .collect();
            let ports: Vec<Value> =
                ports.into_iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect();
            json!({"metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": svc}},
                   "addressType": fam, "endpoints": eps, "ports": ports})
        })
}

fn node_config() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        zone: Some("a".into()),
        ..Default::default()
    }
}

fn state_of(services: Vec<Value>, slices: Vec<Value>) -> ClusterState {
    let mut state = ClusterState::default();
    for s in services {
        // Values the API types cannot even hold (e.g. a port above i32) never reach the planner.
        if let Ok(svc) = serde_json::from_value(s) {
            state.apply(StateChange::ServiceApplied(Box::new(svc)));
        }
    }
    for s in slices {
        if let Ok(sl) = serde_json::from_value(s) {
            state.apply(StateChange::EndpointSliceApplied(Box::new(sl)));
        }
    }
    state
}

fn probe(plan: &Plan) {
    let dsts: Vec<std::net::IpAddr> = plan
        .cluster_ips
        .iter()
        .copied()
        .chain(plan.node.local_addresses.iter().copied())
        .chain(["172.30.0.99".parse().unwrap(), "8.8.8.8".parse().unwrap()])
        .collect();
    let ports: Vec<u16> = plan.frontends.keys().map(|k| k.port).chain([1, 80]).collect();
    for dst in &dsts {
        for port in &ports {
            for protocol in Protocol::ALL {
                for src in ["10.0.0.7", "192.168.0.2", "203.0.113.2", "fd00::7"] {
                    let src = src.parse().unwrap();
                    let e = explain(plan, &Flow { src, dst: *dst, port: *port, protocol, in_interface: None });
                    let _ = e.to_string();
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn planning_arbitrary_objects_never_panics(
        services in prop::collection::vec(service(), 0..4),
        slices in prop::collection::vec(slice(), 0..4),
        more in prop::collection::vec(slice(), 0..2),
    ) {
        let cfg = node_config();
        let before = build_plan(&state_of(services.clone(), slices.clone()), &cfg);
        probe(&before);
        let mut all = slices;
        all.extend(more);
        let after = build_plan(&state_of(services, all), &cfg);
        let d = Plan::diff(&before, &after);
        let _ = d.is_empty();
        // Every frontend points at a planned service port.
        for f in after.frontends.values() {
            prop_assert!(after.services.contains_key(&f.service));
        }
        // Diffing a plan with itself finds nothing.
        prop_assert!(Plan::diff(&after, &after).is_empty());
    }
}
