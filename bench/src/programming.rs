//! (b) Programming time on a real pinned datapath, in-process: the full state
//! from empty maps, then one endpoint change, each split into its steps.
//!
//! ```text
//! full     build_plan(state) | Programmer::sync(plan, None) | Maps::apply(ops)
//! change   state.apply(EndpointSliceApplied) -> build_plan | Plan::diff | sync(plan, Some(diff)) | apply
//! ```
//!
//! The datapath (socket programs only: no devices get the per-packet
//! programs) is installed into `/sys/fs/bpf/ferry-bench-<pid>-<seq>-p<N>`,
//! attached to a cgroup of the lab that no process is in, and uninstalled
//! afterwards (also on failure, by `PinnedDatapath`'s drop).

use crate::cluster::Synthetic;
use crate::stats::median;
use anyhow::Context;
use ferry_bpf::{InstallOptions, MapOp, Maps, NodeRuntime, Programmer};
use ferry_model::{NodeConfig, Plan, build_plan};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A datapath installed for the benchmark; uninstalled on drop.
pub struct PinnedDatapath {
    pub pin_dir: PathBuf,
    pub maps: Maps,
}

impl PinnedDatapath {
    pub fn install(pin_dir: PathBuf, cgroup: &Path) -> anyhow::Result<PinnedDatapath> {
        Self::install_sized(pin_dir, cgroup, Vec::new())
    }

    /// As [`PinnedDatapath::install`], with map capacities (`maps.*` in the node config) for larger shapes.
    pub fn install_sized(
        pin_dir: PathBuf,
        cgroup: &Path,
        capacities: Vec<(String, u32)>,
    ) -> anyhow::Result<PinnedDatapath> {
        let _ = ferry_bpf::uninstall(&pin_dir);
        let installed = ferry_bpf::install(&InstallOptions {
            pin_dir: pin_dir.clone(),
            cgroup: cgroup.to_path_buf(),
            devices: Vec::new(),
            capacities,
            defrag_loop: true,
            acceleration: Default::default(),
        })
        .with_context(|| format!("installing the datapath into {}", pin_dir.display()))?;
        Ok(PinnedDatapath { pin_dir, maps: installed.maps })
    }
}

impl Drop for PinnedDatapath {
    fn drop(&mut self) {
        if let Err(e) = ferry_bpf::uninstall(&self.pin_dir) {
            eprintln!("socket_lb: removing {}: {e}", self.pin_dir.display());
        }
    }
}

/// The full state programmed into empty maps.
#[derive(Debug, Clone, Serialize)]
pub struct FullProgram {
    pub build_plan_ms: f64,
    pub sync_ms: f64,
    pub apply_ms: f64,
    pub total_ms: f64,
    pub map_ops: usize,
    /// `apply_ms` per operation, in microseconds.
    pub apply_us_per_op: f64,
    pub ops_by_kind: BTreeMap<String, usize>,
}

/// One endpoint change, one repetition.
#[derive(Debug, Clone, Serialize)]
pub struct OneChange {
    pub build_plan_ms: f64,
    pub diff_ms: f64,
    pub sync_ms: f64,
    pub apply_ms: f64,
    pub total_ms: f64,
    pub map_ops: usize,
}

/// Medians over the repetitions, and every repetition.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeResult {
    pub repetitions: usize,
    pub median: OneChange,
    pub runs: Vec<OneChange>,
    pub ops_by_kind: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgrammingResult {
    pub services: usize,
    pub service_ports_planned: usize,
    pub full: FullProgram,
    pub change: ChangeResult,
}

/// This host's runtime facts, with the agent's defaults for what the socket
/// programs do not read (no devices: socket LB only).
pub fn runtime() -> anyhow::Result<NodeRuntime> {
    let defaults = ferry::config::BpfSettings::default();
    Ok(NodeRuntime {
        host_netns_cookie: ferry_bpf::system::current_netns_cookie()?,
        timeouts: defaults.timeouts,
        nat_ports: defaults.nat_ports,
        ..NodeRuntime::default()
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `PutSlot`, `DelBackend`, ...: the operation's variant name.
fn kinds(ops: &[MapOp]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for op in ops {
        let debug = format!("{op:?}");
        let kind = debug.split(['(', ' ', '{']).next().unwrap_or("?").to_string();
        *out.entry(kind).or_default() += 1;
    }
    out
}

/// Runs (b) for one size. `repetitions` one-endpoint changes are timed.
pub fn run(
    synthetic: &Synthetic,
    cfg: &NodeConfig,
    pin_dir: PathBuf,
    cgroup: &Path,
    repetitions: usize,
) -> anyhow::Result<ProgrammingResult> {
    let n = synthetic.services;
    eprintln!("[{n}] programming: building the ClusterState");
    let mut state = synthetic.cluster_state()?;
    let dp = PinnedDatapath::install(pin_dir, cgroup)?;
    let rt = runtime()?;
    let mut programmer = Programmer::new();

    eprintln!("[{n}] programming: full state into empty maps");
    let t = Instant::now();
    let mut plan = build_plan(&state, cfg);
    let build_plan_ms = ms(t);
    anyhow::ensure!(plan.problems.is_empty(), "the synthetic cluster has problems: {:?}", &plan.problems[..1]);
    let t = Instant::now();
    let ops = programmer.sync(&plan, None, &rt);
    let sync_ms = ms(t);
    let t = Instant::now();
    dp.maps.apply(&ops).context("applying the full state")?;
    let apply_ms = ms(t);
    let full = FullProgram {
        build_plan_ms,
        sync_ms,
        apply_ms,
        total_ms: build_plan_ms + sync_ms + apply_ms,
        map_ops: ops.len(),
        apply_us_per_op: apply_ms * 1e3 / ops.len().max(1) as f64,
        ops_by_kind: kinds(&ops),
    };
    eprintln!(
        "[{n}] programming: full: plan {build_plan_ms:.1} ms, sync {sync_ms:.1} ms, apply {apply_ms:.1} ms, {} ops",
        ops.len()
    );
    let service_ports_planned = plan.services.len();
    drop(ops);

    let mut runs = Vec::with_capacity(repetitions);
    let mut change_kinds = BTreeMap::new();
    for rep in 1..=repetitions {
        state.apply(synthetic.endpoint_change(rep)?);
        let t = Instant::now();
        let new = build_plan(&state, cfg);
        let build_plan_ms = ms(t);
        let t = Instant::now();
        let diff = Plan::diff(&plan, &new);
        let diff_ms = ms(t);
        let t = Instant::now();
        let ops = programmer.sync(&new, Some(&diff), &rt);
        let sync_ms = ms(t);
        let t = Instant::now();
        dp.maps.apply(&ops).context("applying one endpoint change")?;
        let apply_ms = ms(t);
        anyhow::ensure!(diff.changed.len() == 1, "one endpoint change changed {} service ports", diff.changed.len());
        change_kinds = kinds(&ops);
        runs.push(OneChange {
            build_plan_ms,
            diff_ms,
            sync_ms,
            apply_ms,
            total_ms: build_plan_ms + diff_ms + sync_ms + apply_ms,
            map_ops: ops.len(),
        });
        plan = new;
    }
    let med = |f: fn(&OneChange) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let median = OneChange {
        build_plan_ms: med(|r| r.build_plan_ms),
        diff_ms: med(|r| r.diff_ms),
        sync_ms: med(|r| r.sync_ms),
        apply_ms: med(|r| r.apply_ms),
        total_ms: med(|r| r.total_ms),
        map_ops: med(|r| r.map_ops as f64) as usize,
    };
    eprintln!(
        "[{n}] programming: one endpoint change (median of {repetitions}): plan {:.2} ms, diff {:.2} ms, sync {:.3} ms, apply {:.3} ms, {} ops",
        median.build_plan_ms, median.diff_ms, median.sync_ms, median.apply_ms, median.map_ops
    );
    drop(dp);
    Ok(ProgrammingResult {
        services: n,
        service_ports_planned,
        full,
        change: ChangeResult { repetitions, median, runs, ops_by_kind: change_kinds },
    })
}
