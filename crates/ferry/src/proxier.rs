//! `Proxier`: one node's sync loop body. ClusterState in, datapath updated.
//!
//! ```text
//! ClusterState + NodeConfig --build_plan--> Plan --diff with last--> Programmer::sync --> Maps::apply
//! ```
//!
//! `ferry run` (manifests) and `ferry agent` (Kubernetes API) both drive it.

use crate::config::Settings;
use anyhow::Context;
use ferry_bpf::stale::Serving;
use ferry_bpf::{InstallOptions, Maps, NodeRuntime, Programmer};
use ferry_model::{ClusterState, NodeConfig, ObjectError, Plan, PlanDiff, Protocol, ServicePort, build_plan};
use std::collections::BTreeSet;
use std::collections::HashMap;
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
    /// UDP flows of the packet path removed because their backend stopped serving.
    pub stale_flows_deleted: usize,
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
    /// Uplinks (for the nftables masquerade table).
    uplinks: Vec<String>,
    /// The nftables masquerade script last applied (None: the table is not ours now).
    nft_masquerade: Option<String>,
}

impl Proxier {
    /// Installs (or adopts) the datapath and prepares to program it.
    pub fn start(settings: &Settings, opts: &InstallOptions) -> anyhow::Result<(Proxier, ferry_bpf::Installed)> {
        let cfg = settings.node.clone();
        let installed = ferry_bpf::install(opts).context("installing the eBPF datapath")?;
        let runtime = crate::datapath::runtime(settings, &installed)?;
        let maps = ferry_bpf::Maps::open(&opts.pin_dir)?;
        let programmer = if installed.adopted { Programmer::adopt(&maps.dump()) } else { Programmer::new() };
        let uplinks = installed
            .devices
            .iter()
            .filter(|d| d.role == ferry_bpf::DeviceRole::External)
            .map(|d| d.name.clone())
            .collect();
        let proxier = Proxier {
            cfg,
            runtime,
            maps,
            programmer,
            last: None,
            problems: BTreeSet::new(),
            dirty: false,
            uplinks,
            // Unknown after a restart: the first sync re-applies or removes it.
            nft_masquerade: Some(String::new()),
        };
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
        // Ids of deleted UDP services must be read before the sync releases them.
        let deleted_udp: Vec<u32> = diff
            .iter()
            .flat_map(|d| d.removed.iter())
            .filter(|sp| sp.id.protocol == Protocol::Udp)
            .filter_map(|sp| self.programmer.service_id(&sp.id))
            .collect();
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
        self.sync_nft_masquerade(&plan)?;
        let stale_flows_deleted = self.purge_stale_flows(&plan, diff.as_ref(), &deleted_udp);
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
            stale_flows_deleted,
        };
        self.last = Some(plan);
        Ok(report)
    }

    /// Keeps the `masquerade: nftables` table in step: applied (atomically)
    /// when its rules change, removed when another mode is configured.
    fn sync_nft_masquerade(&mut self, plan: &Plan) -> anyhow::Result<()> {
        if plan.node.masquerade == ferry_model::MasqueradeMode::Nftables {
            let script = ferry_nft::masquerade::render(&plan.node, &self.uplinks);
            if self.nft_masquerade.as_deref() != Some(script.as_str()) {
                ferry_nft::nft::apply(ferry_nft::masquerade::TABLE, &script)
                    .context("applying the nftables masquerade table")?;
                self.nft_masquerade = Some(script);
            }
        } else if self.nft_masquerade.is_some() {
            if ferry_nft::nft::table_exists(ferry_nft::masquerade::FAMILY, ferry_nft::masquerade::TABLE) {
                ferry_nft::nft::delete_table(ferry_nft::masquerade::FAMILY, ferry_nft::masquerade::TABLE)
                    .context("removing the nftables masquerade table")?;
            }
            self.nft_masquerade = None;
        }
        Ok(())
    }

    /// NAT entries in use on the packet path (flows with a rewritten source).
    pub fn nat_entries(&self) -> usize {
        self.maps.ct_entries().iter().filter(|e| e.flags & ferry_bpf::stale::CT_SNAT != 0).count()
    }

    /// Deletes packet-path UDP flows whose backend is no longer serving (see
    /// `ferry_bpf::stale`), for the services this sync changed (all of them
    /// on a full sync). Returns how many entries were deleted.
    fn purge_stale_flows(&self, plan: &Plan, diff: Option<&PlanDiff>, deleted: &[u32]) -> usize {
        let serving = |sp: &ServicePort| {
            Serving::Endpoints(sp.serving_endpoints().map(|e| (ferry_bpf::entries::words(&e.ip), e.port)).collect())
        };
        let mut services: HashMap<u32, Serving> = deleted.iter().map(|id| (*id, Serving::Deleted)).collect();
        let udp = |sp: &ServicePort| sp.id.protocol == Protocol::Udp;
        match diff {
            None => {
                for sp in plan.services.values().filter(|sp| udp(sp)) {
                    if let Some(id) = self.programmer.service_id(&sp.id) {
                        services.insert(id, serving(sp));
                    }
                }
            }
            Some(d) => {
                for c in d.changed.iter().filter(|c| udp(&c.new)) {
                    let before: Vec<_> = c.old.serving_endpoints().map(|e| e.addr()).collect();
                    let after: Vec<_> = c.new.serving_endpoints().map(|e| e.addr()).collect();
                    if before != after
                        && let Some(id) = self.programmer.service_id(&c.new.id)
                    {
                        services.insert(id, serving(&c.new));
                    }
                }
            }
        }
        if services.is_empty() {
            return 0;
        }
        let stale = ferry_bpf::stale::stale_udp_flows(&self.maps.ct_entries(), &services);
        self.maps.delete_ct(&stale)
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
