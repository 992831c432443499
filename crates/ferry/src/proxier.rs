//! `Proxier`: one node's sync loop body. ClusterState in, datapath updated.
//!
//! ```text
//! ClusterState + NodeConfig --build_plan--> Plan --diff with last--> Programmer::sync --> Maps::apply
//! ```
//!
//! `ferry run` (manifests) and `ferry agent` (Kubernetes API) both drive it.

use crate::config::Settings;
use anyhow::Context;
use ferry_bpf::{InstallOptions, Maps, NodeRuntime, Programmer};
use ferry_model::{ClusterState, NodeConfig, ObjectError, Plan, build_plan};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What one sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub service_ports: usize,
    pub map_ops: usize,
    pub plan_time: Duration,
    pub apply_time: Duration,
    /// Problems that appeared since the previous sync (reported once).
    pub new_problems: Vec<ObjectError>,
    /// Problems that were fixed since the previous sync.
    pub fixed_problems: usize,
}

/// The eBPF backend of one node.
pub struct Proxier {
    cfg: NodeConfig,
    runtime: NodeRuntime,
    maps: Maps,
    programmer: Programmer,
    last: Option<Plan>,
    problems: BTreeSet<ObjectError>,
    /// A failed apply leaves the mirror ahead of the kernel: re-sync everything next time.
    dirty: bool,
}

impl Proxier {
    /// Installs (or adopts) the datapath and prepares to program it.
    pub fn start(settings: &Settings, opts: &InstallOptions) -> anyhow::Result<(Proxier, ferry_bpf::Installed)> {
        let cfg = settings.node.clone();
        let installed = ferry_bpf::install(opts).context("installing the eBPF datapath")?;
        let runtime = crate::datapath::runtime(settings, &installed)?;
        let maps = ferry_bpf::Maps::open(&opts.pin_dir)?;
        let programmer = if installed.adopted { Programmer::adopt(&maps.dump()) } else { Programmer::new() };
        let proxier = Proxier { cfg, runtime, maps, programmer, last: None, problems: BTreeSet::new(), dirty: false };
        Ok((proxier, installed))
    }

    /// Brings the datapath to the Plan of `state`.
    pub fn sync(&mut self, state: &ClusterState) -> anyhow::Result<SyncReport> {
        let t0 = Instant::now();
        let plan = build_plan(state, &self.cfg);
        let diff = match (&self.last, self.dirty) {
            (Some(last), false) => Some(Plan::diff(last, &plan)),
            _ => None,
        };
        let ops = self.programmer.sync(&plan, diff.as_ref(), &self.runtime);
        let plan_time = t0.elapsed();
        let t1 = Instant::now();
        if let Err(e) = self.maps.apply(&ops) {
            // The mirror already believes the ops happened; rebuild it from the kernel.
            self.programmer = Programmer::adopt(&self.maps.dump());
            self.dirty = true;
            return Err(e).context("programming the datapath maps");
        }
        self.dirty = false;
        let apply_time = t1.elapsed();
        let now: BTreeSet<ObjectError> = plan.problems.iter().cloned().collect();
        let new_problems = now.difference(&self.problems).cloned().collect();
        let fixed_problems = self.problems.difference(&now).count();
        self.problems = now;
        let report = SyncReport {
            service_ports: plan.services.len(),
            map_ops: ops.len(),
            plan_time,
            apply_time,
            new_problems,
            fixed_problems,
        };
        self.last = Some(plan);
        Ok(report)
    }

    /// The Plan programmed by the last successful sync.
    pub fn plan(&self) -> Option<&Plan> {
        self.last.as_ref()
    }

    /// Datapath counters (named like `ferry_bpf::stats::NAMES`).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        ferry_bpf::stats::NAMES.iter().copied().zip(self.maps.counters()).collect()
    }

    /// Verifies the kernel maps against the last Plan: re-reads them, and
    /// rewrites whatever drifted (something deleted an entry, a partial
    /// apply). Returns the number of corrections made.
    pub fn resync(&mut self) -> anyhow::Result<usize> {
        let Some(plan) = self.last.clone() else { return Ok(0) };
        let mut fresh = Programmer::adopt(&self.maps.dump());
        let ops = fresh.sync(&plan, None, &self.runtime);
        self.maps.apply(&ops).context("correcting the datapath maps")?;
        self.programmer = fresh;
        self.dirty = false;
        Ok(ops.len())
    }
}
