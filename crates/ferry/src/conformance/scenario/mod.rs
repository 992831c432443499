//! `ferry conformance --scenarios`: Service changes over time, applied to one
//! live agent (or to the model) step by step.
//!
//! A scenario is a node, a proxy configuration and steps; each step is the
//! whole desired state plus flows (`format`). The runner turns consecutive
//! states into one batch of changes (`changes`), hands it to the model
//! (`model`) or to a real `ferry run` agent in a lab (`kernel`), and checks
//! the step's flows exactly as flow cases are checked, plus, on the kernel,
//! every connection held open since an earlier step.

pub mod changes;
pub mod format;
pub mod kernel;
pub mod model;

use super::FlowOutcome;
use std::fmt;

/// The result of one check (a flow, a held connection at a later step, or a
/// step that could not be applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(String),
    /// The lab cannot observe it; the reason says why. Never counted as passed.
    NotCovered(String),
}

impl From<FlowOutcome> for Outcome {
    fn from(o: FlowOutcome) -> Outcome {
        match o {
            FlowOutcome::Passed(_) => Outcome::Passed,
            FlowOutcome::Failed { expected, got, detail } => {
                Outcome::Failed(format!("expected {expected}, got {got} ({detail})"))
            }
            FlowOutcome::NotCovered(why) => Outcome::NotCovered(why),
        }
    }
}

/// One labelled check.
#[derive(Debug, Clone)]
pub struct Check {
    pub label: String,
    pub outcome: Outcome,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Passed => write!(f, "ok      {}", self.label),
            Outcome::Failed(why) => write!(f, "FAIL    {}: {why}", self.label),
            Outcome::NotCovered(why) => write!(f, "not covered  {}: {why}", self.label),
        }
    }
}

/// Counts of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioTally {
    pub passed: usize,
    pub failed: usize,
    pub not_covered: usize,
}

impl ScenarioTally {
    /// Counts a check and prints its line (failures and gaps always; passes when verbose).
    pub fn record(&mut self, check: &Check, verbose: bool) {
        match check.outcome {
            Outcome::Passed => self.passed += 1,
            Outcome::Failed(_) => self.failed += 1,
            Outcome::NotCovered(_) => self.not_covered += 1,
        }
        if verbose || check.outcome != Outcome::Passed {
            println!("{check}");
        }
    }

    /// The closing lines: `K not covered` (only when K > 0), then exactly `N passed, M failed`.
    pub fn summary(&self) -> String {
        let last = format!("{} passed, {} failed", self.passed, self.failed);
        if self.not_covered > 0 { format!("{} not covered\n{last}", self.not_covered) } else { last }
    }

    /// Everything ran and passed.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.not_covered == 0
    }
}
