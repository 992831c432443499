//! `ferry conformance`: acceptance cases run against a datapath, flow by flow.
//!
//! Every datapath answers each flow with an `Observed` outcome that is
//! compared with the case's expectation: the pure model (`model`), or the real
//! kernel datapath in a lab of network namespaces (`kernel`). "Not covered" is
//! reported separately and never counted as passed. The conntrack cleanup
//! cases run the kernel conntrack reconciler instead (`conntrack`).

pub mod conntrack;
pub mod dsr;
pub mod kernel;
pub mod model;
pub mod scenario;

use ferry_model::acceptance::{Expected, Observed};

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

    pub fn summary(&self) -> String {
        if self.not_covered > 0 {
            format!("{} passed, {} failed, {} not covered", self.passed, self.failed, self.not_covered)
        } else {
            format!("{} passed, {} failed", self.passed, self.failed)
        }
    }
}
