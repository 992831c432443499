//! Every flow of the acceptance file, answered by the model alone.

use ferry_model::acceptance::{CaseFile, matches, observed_from_model};
use ferry_model::{Flow, build_plan, explain};

const FLOWS: &str = include_str!("../../../acceptance/kube-proxy-flows.json");

#[test]
fn every_acceptance_flow_passes_in_the_model() {
    let file: CaseFile = serde_json::from_str(FLOWS).expect("acceptance file parses");
    let mut failures = Vec::new();
    let mut total = 0;
    for case in &file.cases {
        let cfg = case.node_config().expect("node config");
        let state = case.cluster_state().expect("cluster state");
        let plan = build_plan(&state, &cfg);
        assert!(
            plan.problems.iter().all(|p| p.consequence != ferry_model::Consequence::ObjectSkipped),
            "case {}: unexpected problems {:?}",
            case.name,
            plan.problems
        );
        for f in &case.flows {
            total += 1;
            let flow = f.parse().expect("flow parses");
            let e = explain(
                &plan,
                &Flow { src: flow.src, dst: flow.dst, port: flow.port, protocol: flow.protocol, in_interface: None },
            );
            let got = observed_from_model(&e);
            if !matches(&flow.expected, &got) {
                failures.push(format!("{} / {}: expected {}, got {}\n{}", case.name, flow.name, flow.expected, got, e));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {total} flows failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(total, 198);
}
