//! Hostile input (issue 12): one tenant's Service cannot take another's
//! ClusterIP, special and disallowed ExternalIPs are ignored by name, and a
//! Service over the per-Service limits is refused by name while the rest is
//! served. The flow cases of `acceptance/ferry-isolation-flows.json` run here
//! in the model, through `build_plan` and through the incremental planner in
//! both arrival orders.

use ferry_model::acceptance::{Case, CaseFile, matches, observed_from_model};
use ferry_model::{Consequence, Flow, ObjectKey, Plan, Planner, StateChange, build_plan, explain};

const FLOWS: &str = include_str!("../../../acceptance/ferry-isolation-flows.json");

fn cases() -> Vec<Case> {
    serde_json::from_str::<CaseFile>(FLOWS).expect("isolation cases parse").cases
}

fn answer(plan: &Plan, case: &Case) -> Vec<String> {
    let mut failures = Vec::new();
    for f in &case.flows {
        let flow = f.parse().expect("flow parses");
        let e = explain(
            plan,
            &Flow { src: flow.src, dst: flow.dst, port: flow.port, protocol: flow.protocol, in_interface: None },
        );
        let got = observed_from_model(&e);
        if !matches(&flow.expected, &got) {
            failures.push(format!("{} / {}: expected {}, got {}\n{}", case.name, flow.name, flow.expected, got, e));
        }
    }
    failures
}

/// The incremental planner fed the objects in `reverse` order or not.
fn planned_incrementally(case: &Case, reverse: bool) -> Plan {
    let state = case.cluster_state().unwrap();
    let mut planner = Planner::new(case.node_config().unwrap());
    let mut changes: Vec<StateChange> = Vec::new();
    changes.extend(state.nodes.values().map(|n| StateChange::NodeApplied(Box::new(n.clone()))));
    changes.extend(state.services.values().map(|s| StateChange::ServiceApplied(Box::new(s.clone()))));
    changes.extend(state.endpoint_slices.values().map(|s| StateChange::EndpointSliceApplied(Box::new(s.clone()))));
    if reverse {
        changes.reverse();
    }
    for c in changes {
        planner.apply(c);
        if reverse {
            planner.sync(); // one object at a time: the owner arrives last
        }
    }
    let (plan, _) = planner.sync();
    (*plan).clone()
}

#[test]
fn every_isolation_flow_passes_in_the_model_whatever_the_arrival_order() {
    let mut failures = Vec::new();
    let mut total = 0;
    for case in cases() {
        let cfg = case.node_config().unwrap();
        let plan = build_plan(&case.cluster_state().unwrap(), &cfg);
        total += case.flows.len();
        failures.extend(answer(&plan, &case));
        for reverse in [false, true] {
            let inc = planned_incrementally(&case, reverse);
            assert_eq!(inc.frontends, plan.frontends, "{}: incremental (reverse={reverse}) frontends", case.name);
            assert_eq!(inc.problems, plan.problems, "{}: incremental (reverse={reverse}) problems", case.name);
            failures.extend(answer(&inc, &case));
        }
    }
    assert!(failures.is_empty(), "{} flows failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(total, 23);
}

fn problems_of(case_name: &str) -> Vec<ferry_model::ObjectError> {
    let case = cases().into_iter().find(|c| c.name == case_name).unwrap();
    build_plan(&case.cluster_state().unwrap(), &case.node_config().unwrap()).problems
}

#[test]
fn the_hijacker_is_named_whichever_side_it_sorts_on() {
    for tenant in ["aaa-tenant", "zzz-tenant"] {
        let problems = problems_of(&format!("clusterip-hijack/externalip-equal-to-kube-dns-clusterip-{tenant}"));
        let evil = ObjectKey::new(tenant, "evil");
        let lost: Vec<_> = problems.iter().filter(|p| p.object == evil).collect();
        assert_eq!(lost.len(), 2, "{tenant}: one per port: {problems:?}");
        for p in lost {
            assert_eq!(p.field, "spec.externalIPs");
            assert!(p.message.contains("172.30.0.10:53") && p.message.contains("kube-system/kube-dns"), "{p}");
        }
        assert!(problems.iter().all(|p| p.object != ObjectKey::new("kube-system", "kube-dns")), "{problems:?}");
    }
}

#[test]
fn special_and_disallowed_external_ips_are_reported_entry_by_entry() {
    let problems = problems_of("externalip/special-addresses-ignored-the-rest-served");
    let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 4, "{shown:#?}");
    assert!(problems.iter().all(|p| p.consequence == Consequence::EntrySkipped && p.field == "spec.externalIPs"));
    for (addr, kind) in [
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.251", "multicast"),
    ] {
        assert!(shown.iter().any(|s| s.contains(addr) && s.contains(kind)), "{addr}: {shown:#?}");
    }
    let problems = problems_of("externalip/outside-allowed-cidrs-ignored");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].message.contains("198.51.100.7 is outside the node config's externalIPs.allowedCIDRs"),
        "{}",
        problems[0]
    );
}

#[test]
fn an_over_limit_service_is_refused_by_name() {
    let problems = problems_of("limits/over-frontend-limit-service-refused-next-to-a-normal-one");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, ObjectKey::new("ns1", "big"));
    assert_eq!(problems[0].consequence, Consequence::ObjectSkipped);
    assert!(
        problems[0].message.contains("needs 12 frontends") && problems[0].message.contains("of 8"),
        "{}",
        problems[0]
    );
    let problems = problems_of("limits/over-endpoint-limit-service-refused-next-to-a-normal-one");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, ObjectKey::new("ns1", "wide"));
    assert!(problems[0].message.contains("has 3 endpoints"), "{}", problems[0]);
}
