//! The model datapath: each flow answered by `explain`, no kernel involved.

use super::FlowOutcome;
use ferry_model::acceptance::{Case, ParsedFlow, matches, observed_from_model};
use ferry_model::{Flow, Plan, build_plan, explain};

/// Answers every flow of a case with the pure model.
pub fn run_case(case: &Case, flows: &[ParsedFlow]) -> anyhow::Result<Vec<FlowOutcome>> {
    let cfg = case.node_config()?;
    let state = case.cluster_state()?;
    let plan = build_plan(&state, &cfg);
    Ok(flows.iter().map(|f| outcome(&plan, f)).collect())
}

/// One flow answered by `explain` over `plan`.
pub fn outcome(plan: &Plan, flow: &ParsedFlow) -> FlowOutcome {
    let e = explain(
        plan,
        &Flow { src: flow.src, dst: flow.dst, port: flow.port, protocol: flow.protocol, in_interface: None },
    );
    let got = observed_from_model(&e);
    if matches(&flow.expected, &got) {
        FlowOutcome::Passed(got)
    } else {
        FlowOutcome::Failed { expected: flow.expected.clone(), got, detail: e.rule.clone() }
    }
}
