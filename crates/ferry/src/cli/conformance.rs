//! `ferry conformance`: run acceptance case files against a datapath.

use crate::conformance::kernel::KernelRunner;
use crate::conformance::scenario::{self, ScenarioTally};
use crate::conformance::{FlowOutcome, Tally, conntrack, model};
use anyhow::Context;
use clap::{ArgGroup, Args, ValueEnum};
use ferry_model::acceptance::{CaseFile, ParsedFlow};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatapathKind {
    /// The pure model (`ferry explain`): no kernel involved.
    Model,
    /// The eBPF datapath: each case is built from network namespaces and a real
    /// `ferry run` agent, and every flow is sent as real connections (needs root).
    Bpf,
    /// The nftables datapath, in the same network-namespace lab (needs root).
    Nftables,
}

/// `--lb-mode`: `loadBalancing.mode` of the node under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LbMode {
    Snat,
    Dsr,
    Hybrid,
}

/// `--acceleration`: `acceleration` of the node under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelerationArg {
    Disabled,
    Native,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("case_file").required(true).args(["cases", "conntrack_cases", "scenarios"])))]
pub struct ConformanceArgs {
    /// Flow case file (format: acceptance/README.md), e.g. acceptance/kube-proxy-flows.json.
    #[arg(long, value_name = "FILE")]
    pub cases: Option<PathBuf>,
    /// Scenario file (format: acceptance/README.md), e.g. acceptance/kube-proxy-scenarios.json:
    /// Service changes over time. For each scenario ONE agent runs (on --datapath bpf or
    /// nftables, in a lab of network namespaces; needs root) and each step's changes are
    /// handed to it as one batch, then the step's flows are sent and every TCP connection
    /// opened by an earlier step's flow is asked once more (it must still reach the same
    /// endpoint while that endpoint serves). On --datapath model the steps drive the model
    /// and flows are answered by `explain`. Prints one line per failing check and ends with
    /// "N passed, M failed" (checks the lab cannot observe are listed as not covered first).
    #[arg(long, value_name = "FILE")]
    pub scenarios: Option<PathBuf>,
    /// Conntrack cleanup case file (acceptance/conntrack-cleanup-cases.json): each case's
    /// entries are created in a fresh network namespace and the kernel conntrack
    /// reconciler runs on them (needs root and conntrack-tools). --datapath does not apply.
    #[arg(long, value_name = "FILE")]
    pub conntrack_cases: Option<PathBuf>,
    /// With --conntrack-cases: entries per group of the scale case's generator
    /// (1000000 is the full size; 0 leaves the case out, reported as not run).
    #[arg(long, value_name = "N", default_value_t = conntrack::DEFAULT_SCALE, conflicts_with = "cases")]
    pub scale: u64,
    /// Which datapath answers the flows.
    #[arg(long, value_enum, default_value_t = DatapathKind::Model)]
    pub datapath: DatapathKind,
    /// With --cases or --scenarios and --datapath bpf: run the kernel lab in this
    /// loadBalancing.mode (over the cases' or scenarios' node config). In dsr and hybrid the
    /// lab's remote node runs an agent too (in a scenario it gets every step's changes first),
    /// and a flow DSR carries to an endpoint (the model says which) is checked for the DSR
    /// observation: the endpoint sees the client's own address.
    #[arg(long, value_enum, default_value_t = LbMode::Snat)]
    pub lb_mode: LbMode,
    /// With --cases or --scenarios and --datapath bpf: the node under test's `acceleration`
    /// (over the cases' or scenarios' node config). native attaches the XDP program to the
    /// node's uplink in driver mode (and turns GRO on at the lab fabric's end of that link,
    /// which XDP on veth needs); every flow and held connection must pass as without it. A
    /// scenario also checks that the uplink runs ferry's XDP program after the agent starts
    /// and after every restart.
    #[arg(long, value_enum, default_value_t = AccelerationArg::Disabled)]
    pub acceleration: AccelerationArg,
    /// Only run cases whose name contains this text.
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    /// Print every flow, not only the failing ones.
    #[arg(long, short)]
    pub verbose: bool,
}

pub fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.conntrack_cases {
        let opts = conntrack::Options { only: args.only.clone(), scale: args.scale, verbose: args.verbose };
        return conntrack::run_file(path, &opts);
    }
    let lb_mode = match args.lb_mode {
        LbMode::Snat => ferry_model::LoadBalancingMode::Snat,
        LbMode::Dsr => ferry_model::LoadBalancingMode::Dsr,
        LbMode::Hybrid => ferry_model::LoadBalancingMode::Hybrid,
    };
    if lb_mode != ferry_model::LoadBalancingMode::Snat
        && (args.datapath != DatapathKind::Bpf || (args.cases.is_none() && args.scenarios.is_none()))
    {
        anyhow::bail!("--lb-mode dsr and hybrid run with --datapath bpf and --cases or --scenarios only");
    }
    let acceleration = match args.acceleration {
        AccelerationArg::Disabled => ferry_model::Acceleration::Disabled,
        AccelerationArg::Native => ferry_model::Acceleration::Native,
    };
    if acceleration != ferry_model::Acceleration::Disabled
        && (args.datapath != DatapathKind::Bpf || (args.cases.is_none() && args.scenarios.is_none()))
    {
        anyhow::bail!("--acceleration native runs with --datapath bpf and --cases or --scenarios only");
    }
    let runner = KernelRunner {
        ferry: std::env::current_exe().context("locating the ferry binary")?,
        datapath: if args.datapath == DatapathKind::Nftables { "nftables" } else { "bpf" },
        lb_mode,
        acceleration,
    };
    if let Some(path) = &args.scenarios {
        return run_scenarios(path, &args, &runner);
    }
    let cases = args.cases.as_ref().context("--cases, --scenarios or --conntrack-cases is required")?;
    let text = std::fs::read_to_string(cases).with_context(|| format!("reading {}", cases.display()))?;
    let file: CaseFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a flow case file (see acceptance/README.md)", cases.display()))?;
    let cases: Vec<_> = file.cases.iter().filter(|c| args.only.as_deref().is_none_or(|o| c.name.contains(o))).collect();
    let mut tally = Tally::default();
    for (i, case) in cases.iter().enumerate() {
        if args.datapath != DatapathKind::Model {
            eprintln!("[{}/{}] {}", i + 1, cases.len(), case.name);
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
                DatapathKind::Model => model::run_case(case, &flows),
                DatapathKind::Bpf | DatapathKind::Nftables => runner.run_case(case, &flows),
            })
            .unwrap_or_else(|e| vec![FlowOutcome::NotCovered(format!("case cannot be run: {e:#}")); labels.len()]);
        for (label, outcome) in labels.iter().zip(outcomes) {
            tally.record(label, &outcome, args.verbose);
        }
    }
    println!("{}", tally.summary());
    Ok(if tally.failed == 0 && tally.not_covered == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `--scenarios FILE`: every scenario on the chosen datapath.
fn run_scenarios(path: &std::path::Path, args: &ConformanceArgs, runner: &KernelRunner) -> anyhow::Result<ExitCode> {
    let all = scenario::format::load(path)?;
    let chosen: Vec<_> = all.iter().filter(|s| args.only.as_deref().is_none_or(|o| s.name.contains(o))).collect();
    let mut tally = ScenarioTally::default();
    for (i, sc) in chosen.iter().enumerate() {
        let checks = match args.datapath {
            DatapathKind::Model => scenario::model::run(sc),
            DatapathKind::Bpf | DatapathKind::Nftables => {
                eprintln!("[{}/{}] {}", i + 1, chosen.len(), sc.name);
                scenario::kernel::run(runner, sc)
            }
        };
        for c in &checks {
            tally.record(c, args.verbose);
        }
    }
    println!("{}", tally.summary());
    Ok(if tally.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
