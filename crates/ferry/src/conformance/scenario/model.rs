//! Scenarios on the model: each step's changes drive the model, whose Plan
//! answers the step's flows with `explain`. Held connections are a kernel
//! matter and are not counted here.

use super::format::ParsedScenario;
use super::{Check, Outcome, changes};
use crate::conformance::model;
use ferry_model::{ClusterState, NodeConfig, Plan, StateChange, build_plan};
use std::sync::Arc;

/// The model as one live agent sees it: the node's configuration and the
/// objects received so far.
pub struct ModelDriver {
    cfg: NodeConfig,
    state: ClusterState,
}

impl ModelDriver {
    /// A model that has seen nothing yet (the first step's batch brings the Node too).
    pub fn new(cfg: NodeConfig) -> ModelDriver {
        ModelDriver { cfg, state: ClusterState::default() }
    }

    /// The objects received so far.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }
}

/// Hands one step's changes to the model and returns the Plan after them.
// incremental planner goes here: `Planner::apply` each change, then `Planner::sync()`,
// and compare its Plan with `build_plan(driver.state(), cfg)` (the oracle).
pub fn model_step(driver: &mut ModelDriver, changes: Vec<StateChange>) -> Arc<Plan> {
    for c in changes {
        driver.state.apply(c);
    }
    Arc::new(build_plan(&driver.state, &driver.cfg))
}

/// Runs every step of a scenario on the model; one check per flow.
pub fn run(sc: &ParsedScenario) -> Vec<Check> {
    let mut driver = ModelDriver::new(sc.cfg.clone());
    let mut out = Vec::new();
    for (j, step) in sc.steps.iter().enumerate() {
        let batch = changes::between(driver.state(), &step.state);
        let plan = model_step(&mut driver, batch);
        if driver.state() != &step.state {
            // The runner's own diff is wrong: never let that pass as a datapath result.
            out.push(Check {
                label: sc.label(j, "state"),
                outcome: Outcome::NotCovered("the step's changes did not produce the step's state".into()),
            });
            continue;
        }
        for f in &step.flows {
            out.push(Check { label: sc.label(j, &f.name), outcome: model::outcome(&plan, f).into() });
        }
    }
    out
}
