//! Scenarios on the model: each step's changes drive the incremental planner
//! (the agent's own change path), whose Plan answers the step's flows with
//! `explain`; each step's Plan is also compared with `build_plan` of the
//! step's whole state (one check per step). Held connections are a kernel
//! matter and are not counted here.

use super::format::ParsedScenario;
use super::{Check, Outcome, changes};
use crate::conformance::model;
use ferry_model::{ClusterState, NodeConfig, Plan, Planner, StateChange, build_plan};
use std::sync::Arc;

/// The model as one live agent sees it: the node's configuration and the
/// objects received so far.
pub struct ModelDriver {
    cfg: NodeConfig,
    planner: Planner,
    /// The same objects as whole API objects, for the oracle.
    state: ClusterState,
}

impl ModelDriver {
    /// A model that has seen nothing yet (the first step's batch brings the Node too).
    pub fn new(cfg: NodeConfig) -> ModelDriver {
        ModelDriver { planner: Planner::new(cfg.clone()), cfg, state: ClusterState::default() }
    }

    /// The objects received so far.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }
}

/// Hands one step's changes to the planner and returns its Plan, and
/// whether it equals the Plan built from scratch.
pub fn model_step(driver: &mut ModelDriver, changes: Vec<StateChange>) -> (Arc<Plan>, bool) {
    for c in changes {
        driver.state.apply(c.clone());
        driver.planner.apply(c);
    }
    let (plan, _) = driver.planner.sync();
    let same = *plan == build_plan(&driver.state, &driver.cfg);
    (plan, same)
}

/// Runs every step of a scenario on the model; one check per flow.
pub fn run(sc: &ParsedScenario) -> Vec<Check> {
    let mut driver = ModelDriver::new(sc.cfg.clone());
    let mut out = Vec::new();
    for (j, step) in sc.steps.iter().enumerate() {
        let batch = changes::between(driver.state(), &step.state);
        let (plan, same) = model_step(&mut driver, batch);
        out.push(Check {
            label: sc.label(j, "incremental plan"),
            outcome: if same {
                Outcome::Passed
            } else {
                Outcome::Failed("the incremental planner's Plan differs from build_plan of the same objects".into())
            },
        });
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
