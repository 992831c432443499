//! `ferry conformance`: run acceptance case files against a datapath.
//!
//! The model datapath answers each flow with `explain`. Real datapaths build
//! the case in a sandbox of network namespaces and send real packets. Every
//! datapath reports, per flow, passed / failed / not covered; "not covered" is
//! never counted as passed.

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferry_model::acceptance::{Case, CaseFile, Expected, Observed, ParsedFlow, matches, observed_from_model};
use ferry_model::{Flow, build_plan, explain};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatapathKind {
    /// The pure model (`ferry explain`): no kernel involved.
    Model,
}

#[derive(Debug, Args)]
pub struct ConformanceArgs {
    /// Flow case file (format: acceptance/README.md), e.g. acceptance/kube-proxy-flows.json.
    #[arg(long, value_name = "FILE")]
    pub cases: PathBuf,
    /// Which datapath answers the flows.
    #[arg(long, value_enum, default_value_t = DatapathKind::Model)]
    pub datapath: DatapathKind,
    /// Only run cases whose name contains this text.
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    /// Print every flow, not only the failing ones.
    #[arg(long, short)]
    pub verbose: bool,
}

/// The result of one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowOutcome {
    Passed(Observed),
    Failed { expected: Expected, got: Observed, detail: String },
    NotCovered(String),
}

/// Tally of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub not_covered: usize,
}

impl Tally {
    /// Counts an outcome and prints its line (failures and gaps always; passes when verbose).
    pub fn record(&mut self, label: &str, outcome: &FlowOutcome, verbose: bool) {
        match outcome {
            FlowOutcome::Passed(got) => {
                self.passed += 1;
                if verbose {
                    println!("ok      {label}: {got}");
                }
            }
            FlowOutcome::Failed { expected, got, detail } => {
                self.failed += 1;
                println!("FAIL    {label}: expected {expected}, got {got} ({detail})");
            }
            FlowOutcome::NotCovered(why) => {
                self.not_covered += 1;
                println!("not covered  {label}: {why}");
            }
        }
    }
}

/// Answers every flow of a case with the pure model.
pub fn model_case(case: &Case, flows: &[ParsedFlow]) -> anyhow::Result<Vec<FlowOutcome>> {
    let cfg = case.node_config()?;
    let state = case.cluster_state()?;
    let plan = build_plan(&state, &cfg);
    Ok(flows.iter().map(|f| model_outcome(&plan, f)).collect())
}

fn model_outcome(plan: &ferry_model::Plan, flow: &ParsedFlow) -> FlowOutcome {
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

pub fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.cases).with_context(|| format!("reading {}", args.cases.display()))?;
    let file: CaseFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a flow case file (see acceptance/README.md)", args.cases.display()))?;
    let mut tally = Tally::default();
    for case in &file.cases {
        if args.only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        let labels: Vec<String> = case
            .flows
            .iter()
            .map(|f| format!("{} / {}", case.name, if f.name.is_empty() { "(unnamed flow)" } else { &f.name }))
            .collect();
        let parsed: Result<Vec<ParsedFlow>, String> = case.flows.iter().map(|f| f.parse()).collect();
        let outcomes = parsed
            .map_err(anyhow::Error::msg)
            .and_then(|flows| match args.datapath {
                DatapathKind::Model => model_case(case, &flows),
            })
            .unwrap_or_else(|e| vec![FlowOutcome::NotCovered(format!("case cannot be run: {e:#}")); labels.len()]);
        for (label, outcome) in labels.iter().zip(outcomes) {
            tally.record(label, &outcome, args.verbose);
        }
    }
    if tally.not_covered > 0 {
        println!("{} passed, {} failed, {} not covered", tally.passed, tally.failed, tally.not_covered);
    } else {
        println!("{} passed, {} failed", tally.passed, tally.failed);
    }
    Ok(if tally.failed == 0 && tally.not_covered == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
