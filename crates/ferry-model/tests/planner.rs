//! The incremental planner against its oracle: after any sequence of changes
//! (Services and slices created, changed, deleted; ClusterIPs moving between
//! Services; external addresses and NodePorts contested; long names;
//! dual-stack; Node changes), `Planner::sync` gives exactly the Plan
//! `build_plan` makes from the same objects, and the diff it returns is the
//! diff between the two whole Plans.

use ferry_model::{ClusterState, NodeConfig, Plan, PlanDiff, Planner, StateChange, build_plan};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;

const LONG: &str = "a-namespace-name-that-is-exactly-sixty-three-characters-long-xx";

fn name() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        Just(("ns".to_string(), "a".to_string())),
        Just(("ns".to_string(), "b".to_string())),
        Just(("ns".to_string(), "c".to_string())),
        Just(("other".to_string(), "a".to_string())),
        Just((LONG.to_string(), LONG.to_string())),
    ]
}

fn cluster_ip() -> impl Strategy<Value = Vec<&'static str>> {
    prop_oneof![
        Just(vec!["172.30.0.1"]),
        Just(vec!["172.30.0.2"]),
        Just(vec!["172.30.0.3"]),
        Just(vec!["fd00:30::1"]),
        Just(vec!["172.30.0.1", "fd00:30::1"]),
        Just(vec!["172.30.0.2", "fd00:30::2"]),
        Just(vec!["None"]),
    ]
}

fn external_ips() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(&["172.30.0.1", "203.0.113.1", "203.0.113.2", "2001:db8::9"][..]), 0..3)
}

fn service() -> impl Strategy<Value = Value> {
    (
        name(),
        prop::sample::select(&["ClusterIP", "NodePort", "LoadBalancer"][..]),
        cluster_ip(),
        prop::collection::vec(
            (
                prop::sample::select(&["", "http", "a-port-name-15c"][..]),
                prop::sample::select(&[53i64, 80, 443][..]),
                prop::sample::select(&["TCP", "UDP"][..]),
                prop::option::of(prop::sample::select(&[30001i64, 30002][..])),
            ),
            0..3,
        ),
        (external_ips(), external_ips(), prop::collection::vec(prop::sample::select(&["10.0.0.0/8", "fd00::/8"][..]), 0..2)),
        (
            prop::sample::select(&["Cluster", "Local"][..]),
            prop::sample::select(&["Cluster", "Local"][..]),
            prop::sample::select(&["None", "ClientIP"][..]),
            prop::option::of(prop::sample::select(&[32000i64, 32001][..])),
            any::<bool>(),
        ),
    )
        .prop_map(|((ns, name), ty, cips, ports, (eips, lbs, ranges), (etp, itp, aff, hc, annotated))| {
            let mut seen = BTreeSet::new();
            let ports: Vec<Value> = ports
                .into_iter()
                .filter(|(n, _, _, _)| seen.insert(*n))
                .map(|(n, p, proto, np)| json!({"name": n, "port": p, "protocol": proto, "nodePort": np}))
                .collect();
            let families: Vec<&str> = cips.iter().map(|c| if c.contains(':') { "IPv6" } else { "IPv4" }).collect();
            let ingress: Vec<Value> = lbs.into_iter().map(|ip| json!({"ip": ip})).collect();
            let mut annotations = serde_json::Map::new();
            if annotated {
                annotations.insert("unrelated".into(), json!("changes nothing"));
            }
            json!({
                "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                "spec": {"type": ty, "clusterIP": cips[0], "clusterIPs": cips, "ipFamilies": families,
                         "ports": ports, "externalIPs": eips, "loadBalancerSourceRanges": ranges,
                         "externalTrafficPolicy": etp, "internalTrafficPolicy": itp, "sessionAffinity": aff,
                         "healthCheckNodePort": if ty == "LoadBalancer" && etp == "Local" { json!(hc) } else { Value::Null }},
                "status": {"loadBalancer": {"ingress": ingress}}
            })
        })
}

fn slice() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&["s1", "s2", "s3"][..]),
        name(),
        any::<bool>(),
        prop::collection::vec(
            (
                prop::sample::select(&["10.1.0.1", "10.1.0.2", "10.2.0.1", "bogus"][..]),
                any::<bool>(),
                any::<bool>(),
                prop::sample::select(&["node-a", "node-b"][..]),
                prop::sample::select(&["a", "b"][..]),
            ),
            0..4,
        ),
        prop::collection::vec(
            (prop::sample::select(&["", "http", "a-port-name-15c"][..]), prop::sample::select(&[8080i64, 5353][..])),
            0..3,
        ),
        prop::sample::select(&["TCP", "UDP"][..]),
    )
        .prop_map(|(slice, (ns, svc), v6, eps, ports, proto)| {
            let eps: Vec<Value> = eps
                .into_iter()
                .map(|(ip, ready, terminating, node, zone)| {
                    let ip = if v6 { ip.replace("10.", "fd00:10::").replace(".0.", ":") } else { ip.to_string() };
                    json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready || terminating,
                           "terminating": terminating}, "nodeName": node, "zone": zone,
                           "hints": {"forZones": [{"name": zone}]}})
                })
                .collect();
            let ports: Vec<Value> =
                ports.into_iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": proto})).collect();
            json!({"metadata": {"name": format!("{svc}-{slice}"), "namespace": ns,
                                "labels": {"kubernetes.io/service-name": svc}},
                   "addressType": if v6 { "IPv6" } else { "IPv4" }, "endpoints": eps, "ports": ports})
        })
}

fn node() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&["node-a", "node-b"][..]),
        prop::sample::select(&["a", "b", ""][..]),
        prop::sample::select(&["192.168.0.2", "192.168.0.3", "192.168.0.4"][..]),
        prop::sample::select(&["10.1.0.0/24", "10.2.0.0/24"][..]),
        any::<u8>(),
    )
        .prop_map(|(name, zone, addr, cidr, heartbeat)| {
            json!({"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone},
                                "annotations": {"heartbeat": heartbeat.to_string()}},
                   "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                   "status": {"addresses": [{"type": "InternalIP", "address": addr}]}})
        })
}

#[derive(Debug, Clone)]
enum Step {
    Change(Box<StateChange>),
    Sync,
}

fn step() -> impl Strategy<Value = Step> {
    let change = prop_oneof![
        4 => service().prop_map(|v| StateChange::ServiceApplied(Box::new(serde_json::from_value(v).unwrap()))),
        2 => name().prop_map(|(ns, n)| StateChange::ServiceDeleted(ferry_model::ObjectKey::new(ns, n))),
        5 => slice().prop_map(|v| StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(v).unwrap()))),
        1 => (name(), prop::sample::select(&["s1", "s2", "s3"][..])).prop_map(|((ns, svc), s)| {
            StateChange::EndpointSliceDeleted(ferry_model::ObjectKey::new(ns, format!("{svc}-{s}")))
        }),
        1 => node().prop_map(|v| StateChange::NodeApplied(Box::new(serde_json::from_value(v).unwrap()))),
        1 => prop::sample::select(&["node-a", "node-b"][..]).prop_map(|n| StateChange::NodeDeleted(n.to_string())),
    ];
    prop_oneof![6 => change.prop_map(|c| Step::Change(Box::new(c))), 1 => Just(Step::Sync)]
}

fn node_config() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap(), "fd00:168::2".parse().unwrap()],
        primary_ips: vec!["192.168.0.2".parse().unwrap(), "fd00:168::2".parse().unwrap()],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00:10::/32".parse().unwrap()],
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap(), "fd00:30::/64".parse().unwrap()],
        ..Default::default()
    }
}

/// What a diff says, in a form two diffs can be compared by.
fn summary(d: &PlanDiff) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    out.extend(d.added.iter().map(|s| format!("+{}", s.id)));
    out.extend(d.removed.iter().map(|s| format!("-{}", s.id)));
    out.extend(
        d.changed
            .iter()
            .map(|c| format!("~{} +{:?} -{:?} {}", c.new.id, c.endpoints_added, c.endpoints_removed, c.only_endpoints)),
    );
    out.extend(d.frontends_added.iter().map(|(k, f)| format!("+fe {k} {:?} {}", f.kind, f.service)));
    out.extend(d.frontends_removed.iter().map(|(k, f)| format!("-fe {k} {:?} {}", f.kind, f.service)));
    out.push(format!(
        "node {} ips +{:?} -{:?} hc {}",
        d.node_changed, d.cluster_ips_added, d.cluster_ips_removed, d.health_checks_changed
    ));
    out.sort();
    out
}

fn check(planner: &mut Planner, state: &ClusterState, previous: &Plan) -> Result<Plan, TestCaseError> {
    let (plan, diff) = planner.sync();
    let oracle = build_plan(state, planner.config());
    prop_assert_eq!(&*plan, &oracle, "incremental Plan differs from build_plan");
    let whole = Plan::diff(previous, &oracle);
    // The first sync reports node facts against an empty planner; compare everything else.
    prop_assert_eq!(summary(&diff), summary(&whole), "incremental diff differs from Plan::diff");
    Ok(oracle)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn incremental_plan_equals_build_plan(steps in prop::collection::vec(step(), 1..40)) {
        let cfg = node_config();
        let mut planner = Planner::new(cfg.clone());
        let mut state = ClusterState::default();
        let mut previous = planner.sync().0.as_ref().clone();
        prop_assert_eq!(&previous, &build_plan(&state, &cfg));
        for step in steps {
            match step {
                Step::Change(change) => {
                    state.apply((*change).clone());
                    planner.apply(*change);
                }
                Step::Sync => previous = check(&mut planner, &state, &previous)?,
            }
        }
        check(&mut planner, &state, &previous)?;
    }
}

/// Without a change, a sync plans nothing and says nothing changed.
#[test]
fn a_sync_without_changes_is_empty() {
    let mut planner = Planner::new(node_config());
    let svc = json!({"metadata": {"name": "a", "namespace": "ns"},
                     "spec": {"clusterIP": "172.30.0.1", "ports": [{"port": 80}]}});
    planner.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc.clone()).unwrap())));
    let (_, first) = planner.sync();
    assert_eq!(first.added.len(), 1);
    let (_, second) = planner.sync();
    assert!(second.is_empty(), "{second:?}");
    // The same object again (a resync of the watch) changes nothing either.
    planner.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
    let (_, third) = planner.sync();
    assert!(third.is_empty(), "{third:?}");
}

/// A ClusterIP is its Service's, whatever another Service lists as an external address.
#[test]
fn a_cluster_ip_beats_an_external_ip_claim() {
    let mut planner = Planner::new(node_config());
    let evil = json!({"metadata": {"name": "evil", "namespace": "aaa-tenant"},
                      "spec": {"clusterIP": "172.30.0.9", "externalIPs": ["172.30.0.10"],
                               "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}});
    let dns = json!({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
                     "spec": {"clusterIP": "172.30.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}});
    for v in [evil, dns] {
        planner.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(v).unwrap())));
    }
    let (plan, _) = planner.sync();
    let (_, owner) =
        plan.frontend_for("172.30.0.10".parse().unwrap(), 53, ferry_model::Protocol::Udp).expect("a frontend");
    assert_eq!(owner.service.service.to_string(), "kube-system/kube-dns");
    assert!(plan.problems.iter().any(|p| p.to_string().contains("aaa-tenant/evil")), "{:?}", plan.problems);
}

/// A batch large enough to be planned on several threads (the first sync of
/// a big cluster, and a full re-plan after a config change) gives the Plan
/// and diff `build_plan` gives: the same services, contested frontends,
/// dual-stack, slices arriving before and after their Service.
#[test]
fn a_large_batch_planned_on_several_threads_equals_build_plan() {
    let cfg = node_config();
    let mut planner = Planner::new(cfg.clone());
    let mut state = ClusterState::default();
    let apply = |planner: &mut Planner, state: &mut ClusterState, change: StateChange| {
        state.apply(change.clone());
        planner.apply(change);
    };
    let n = 6000;
    for i in 0..n {
        let name = format!("svc-{i:05}");
        let (a, b) = (i / 250, i % 250);
        // Every 7th Service also claims its neighbour's ClusterIP as an ExternalIP.
        let external: Vec<String> =
            if i % 7 == 0 { vec![format!("172.30.{}.{}", (i + 1) / 250, (i + 1) % 250)] } else { vec![] };
        let svc = json!({"metadata": {"name": name, "namespace": format!("ns-{}", i % 13)},
            "spec": {"clusterIP": format!("172.30.{a}.{b}"), "externalIPs": external,
                     "ipFamilyPolicy": if i % 5 == 0 { "PreferDualStack" } else { "SingleStack" },
                     "clusterIPs": if i % 5 == 0 { json!([format!("172.30.{a}.{b}"), format!("fd00:30::{i:x}")]) } else { json!([format!("172.30.{a}.{b}")]) },
                     "ports": [{"name": "http", "port": 80}]}});
        let slice = json!({"metadata": {"name": format!("{name}-1"), "namespace": format!("ns-{}", i % 13),
                                        "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [format!("10.1.{a}.{b}")], "nodeName": if i % 2 == 0 { "node-a" } else { "node-b" }},
                          {"addresses": [format!("10.2.{a}.{b}")], "zone": "z1"}]});
        let svc = StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap()));
        let slice = StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap()));
        if i % 2 == 0 {
            apply(&mut planner, &mut state, svc);
            apply(&mut planner, &mut state, slice);
        } else {
            apply(&mut planner, &mut state, slice);
            apply(&mut planner, &mut state, svc);
        }
    }
    let empty = build_plan(&ClusterState::default(), &cfg);
    let (plan, diff) = planner.sync();
    let oracle = build_plan(&state, &cfg);
    assert_eq!(&*plan, &oracle, "the first, parallel sync differs from build_plan");
    assert_eq!(summary(&diff), summary(&Plan::diff(&empty, &oracle)));
    assert!(diff.added.windows(2).all(|w| w[0].id < w[1].id), "added in id order");
    // A config change re-plans everything, again in parallel, over a full Plan.
    let mut cfg2 = cfg.clone();
    cfg2.zone = Some("z1".into());
    planner.reconfigure(cfg2.clone()).unwrap();
    let (plan2, diff2) = planner.sync();
    let oracle2 = build_plan(&state, &cfg2);
    assert_eq!(&*plan2, &oracle2, "the full re-plan differs from build_plan");
    assert_eq!(summary(&diff2), summary(&Plan::diff(&oracle, &oracle2)));
}
