//! `Proxier`: one node's datapath, brought to each Plan the planner makes.
//!
//! ```text
//! Planner::sync --(Arc<Plan>, PlanDiff)--> bpf:      Programmer::sync --> Maps::apply
//!                                          nftables: Renderer::sync --> nft -f
//! ```
//!
//! `ferry run` (manifests) and `ferry agent` (Kubernetes API) both drive it
//! from the same agent loop. The diff is used as long as the datapath is
//! known to hold the previous Plan; after a failed apply (or at start) the
//! next sync compares the whole Plan with what is programmed instead.

use crate::config::Settings;
use anyhow::Context;
use ferry_bpf::stale::Serving;
use ferry_bpf::{InstallOptions, Maps, NodeRuntime, Programmer};
use ferry_model::{NodeConfig, ObjectError, Plan, PlanDiff, Protocol, ServicePort};
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;
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
    /// Every current problem, counted by object kind and consequence (`/metrics`).
    pub problem_counts: Vec<((ferry_model::ObjectKind, ferry_model::Consequence), usize)>,
    /// UDP flows of the packet path removed because their backend stopped serving.
    pub stale_flows_deleted: usize,
    /// Connected UDP sockets destroyed because socket-LB had pointed them at a removed backend.
    pub udp_sockets_destroyed: u64,
    /// The kernel conntrack reconciler's run (stale UDP flows deleted per
    /// family); `None` when this sync touched no UDP service port.
    pub conntrack: Option<ferry_conntrack::ReconcileReport>,
    /// Service ports the datapath refused this sync (a full map, say): the
    /// rest of the Plan is programmed; these are retried with backoff.
    pub refused: Vec<ferry_bpf::Refused>,
}

/// The eBPF datapath's state.
struct BpfBackend {
    runtime: NodeRuntime,
    maps: Maps,
    programmer: Programmer,
    pin_dir: std::path::PathBuf,
    cgroup: std::path::PathBuf,
    /// Backends found in the adopted maps at start, until the first full sync
    /// compares them with the Plan: connected UDP sockets aimed at one that is
    /// no longer serving (removed while no agent ran) are destroyed then.
    adopted_backends: Vec<std::net::SocketAddr>,
    /// The live tracked flows (conntrack, DSR) the last collection read, for the resync after it.
    live_flows: Option<(Vec<ferry_bpf::stale::CtEntry>, Vec<ferry_bpf::stale::DsrEntry>)>,
}

/// Which datapath programs the Plan.
enum Backend {
    Bpf(Box<BpfBackend>),
    Nftables(ferry_nft::services::Renderer),
}

/// What starting the datapath found and did.
#[derive(Debug, Clone, Default)]
pub struct Started {
    pub datapath: &'static str,
    /// The BPF maps already existed: a previous agent's state was adopted.
    pub adopted: bool,
    /// The pinned datapath had this older map layout and was migrated.
    pub migrated_from: Option<u32>,
    /// Its maps that were re-created (refilled by the first full sync, or
    /// their live entries copied: `carried`).
    pub retired: Vec<String>,
    /// Retired maps whose live entries were copied into the new ones.
    pub carried: Vec<ferry_bpf::migrate::Carried>,
    pub links_updated: usize,
    pub links_attached: usize,
    pub devices: Vec<ferry_bpf::AttachedDevice>,
    /// External devices whose XDP program is attached (`acceleration`).
    pub accelerated: Vec<String>,
    /// `best-effort`: external devices left to tc, and why.
    pub xdp_fallbacks: Vec<ferry_bpf::acceleration::Fallback>,
}

/// One node's proxy: the Plan, and the datapath that carries it out.
pub struct Proxier {
    cfg: NodeConfig,
    backend: Backend,
    last: Option<Arc<Plan>>,
    problems: BTreeSet<ObjectError>,
    /// A failed apply leaves the mirror ahead of the kernel: re-sync everything next time.
    dirty: bool,
    /// Service ports the last sync could not program (see `SyncReport::refused`).
    refused: Vec<ferry_bpf::Refused>,
    /// Uplinks (for the nftables masquerade table).
    uplinks: Vec<String>,
    /// The nftables masquerade script last applied (None: the table is not ours now).
    nft_masquerade: Option<String>,
}

impl Proxier {
    /// Installs (or adopts) the datapath and prepares to program it.
    pub fn start(settings: &Settings, opts: &InstallOptions) -> anyhow::Result<(Proxier, Started)> {
        let cfg = settings.node.clone();
        let (backend, started) = match settings.datapath {
            crate::config::DatapathChoice::Bpf => {
                let installed = ferry_bpf::install(opts).context("installing the eBPF datapath")?;
                warn_if_nat_ports_are_ephemeral(settings.bpf.nat_ports);
                for k in &installed.capacity_kept {
                    tracing::warn!(
                        "map {} keeps its pinned capacity {} (the config asks {}): resizing recreates it and drops \
                         tracked flows; to resize, stop ferry, run `ferry cleanup --pin-dir {}` and start it again",
                        k.map,
                        k.pinned,
                        k.asked,
                        opts.pin_dir.display()
                    );
                }
                for c in &installed.carried {
                    let line = format!(
                        "copied the live entries of the retired {}: confirmed={} unconfirmed={} confirm_full={} \
                         expired={} not_copied={} stranded={} late={} adopted={}",
                        c.map,
                        c.confirmed,
                        c.unconfirmed,
                        c.confirm_full,
                        c.expired,
                        c.not_copied,
                        c.stranded,
                        c.late,
                        c.adopted
                    );
                    // Entries that found no room are flows balanced again (a SNATed one reset).
                    if c.not_copied > 0 || c.confirm_full > 0 {
                        tracing::warn!("{line}: raise maps.conntrack / maps.conntrackUnconfirmed");
                    } else {
                        tracing::info!("{line}");
                    }
                }
                let runtime = crate::datapath::runtime(settings, &installed)?;
                let maps = ferry_bpf::Maps::open(&opts.pin_dir)?;
                let (programmer, adopted_backends) = if installed.adopted {
                    let dump = maps.dump();
                    let backends = dump
                        .backends
                        .iter()
                        .map(|(_, b)| std::net::SocketAddr::new(ferry_bpf::entries::ip_of(&b.addr, b.family), b.port))
                        .collect();
                    (Programmer::adopt(&dump), backends)
                } else {
                    (Programmer::new(), Vec::new())
                };
                let started = Started {
                    datapath: "bpf",
                    adopted: installed.adopted,
                    migrated_from: installed.migrated_from,
                    retired: installed.retired.clone(),
                    carried: installed.carried.clone(),
                    links_updated: installed.links_updated,
                    links_attached: installed.links_attached,
                    devices: installed.devices,
                    accelerated: installed.accelerated.clone(),
                    xdp_fallbacks: installed.xdp_fallbacks.clone(),
                };
                (
                    Backend::Bpf(Box::new(BpfBackend {
                        runtime,
                        maps,
                        programmer,
                        pin_dir: opts.pin_dir.clone(),
                        cgroup: opts.cgroup.clone(),
                        adopted_backends,
                        live_flows: None,
                    })),
                    started,
                )
            }
            crate::config::DatapathChoice::Nftables => {
                // NodePorts on 127.0.0.1 need route_localnet: turned on after the
                // first apply, once the table's guard rule is in (crate::localnet).
                (
                    Backend::Nftables(ferry_nft::services::Renderer::default()),
                    Started { datapath: "nftables", ..Default::default() },
                )
            }
        };
        let uplinks = crate::datapath::devices(settings)?
            .into_iter()
            .filter(|(_, role)| *role == ferry_bpf::DeviceRole::External)
            .map(|(name, _)| name)
            .collect();
        let proxier = Proxier {
            cfg,
            backend,
            last: None,
            problems: BTreeSet::new(),
            dirty: false,
            refused: Vec::new(),
            uplinks,
            // Unknown after a restart: the first sync re-applies or removes it.
            nft_masquerade: Some(String::new()),
        };
        Ok((proxier, started))
    }

    /// The node configuration the datapath was started with.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Brings the datapath to `plan`; `diff` is what changed since the Plan
    /// of the previous call (the planner's diff). `planned` is how long
    /// planning took, for the report.
    pub fn sync(&mut self, plan: Arc<Plan>, diff: &PlanDiff, planned: Duration) -> anyhow::Result<SyncReport> {
        let t0 = Instant::now() - planned;
        let diff = match (&self.last, self.dirty) {
            (Some(_), false) => Some(diff),
            _ => None,
        };
        let mut sockets_destroyed = 0;
        let (map_ops, plan_time, t1, stale_flows_deleted) = match &mut self.backend {
            Backend::Bpf(b) => {
                // Ids of deleted UDP services must be read before the sync releases them.
                let deleted_udp: Vec<u32> = diff
                    .iter()
                    .flat_map(|d| d.removed.iter())
                    .filter(|sp| sp.id.protocol == Protocol::Udp)
                    .filter_map(|sp| b.programmer.service_id(&sp.id))
                    .collect();
                let batch = b.programmer.sync_batch(&plan, diff, &b.runtime);
                let plan_time = t0.elapsed();
                let t1 = Instant::now();
                // Each service port on its own: one that fails (its map is
                // full) is skipped and named, the others are programmed.
                self.refused = b.maps.apply_batch(&batch);
                // Freed before the rest of the sync: a full sync's batch is tens of MiB.
                let map_ops = batch.len();
                drop(batch);
                if !self.refused.is_empty() {
                    // The mirror believes every op happened; rebuild it from the
                    // kernel, and compare the whole Plan next time (the retry).
                    b.programmer = Programmer::adopt(&b.maps.dump());
                }
                if !b.runtime.fast_pass
                    && self.refused.is_empty()
                    && let Err(e) = b.enable_fast_pass(&plan)
                {
                    tracing::warn!("{e:#}; every packet keeps taking the full path (retried at the next sync)");
                }
                let stale = b.purge_stale_flows(&plan, diff, &deleted_udp);
                let away = if diff.is_none() { std::mem::take(&mut b.adopted_backends) } else { Vec::new() };
                sockets_destroyed = b.destroy_stale_udp_sockets(&plan, diff, away);
                (map_ops, plan_time, t1, stale)
            }
            Backend::Nftables(r) => {
                let scripts = r.sync(&plan, diff);
                let plan_time = t0.elapsed();
                let t1 = Instant::now();
                let mut lines = 0;
                for (family, script, table) in scripts {
                    lines += script.lines().count();
                    if let Err(e) = ferry_nft::nft::apply(ferry_nft::services::TABLE, &script) {
                        // The kernel may hold anything now: replace the whole table next time.
                        r.reset();
                        self.dirty = true;
                        return Err(e).context("programming the nftables datapath");
                    }
                    r.applied(family, table);
                }
                if crate::localnet::needed(&self.cfg) {
                    crate::localnet::enable()?;
                }
                (lines, plan_time, t1, 0)
            }
        };
        self.dirty = !self.refused.is_empty();
        self.sync_nft_masquerade(&plan)?;
        let apply_time = t1.elapsed();
        let conntrack = reconcile_kernel_conntrack(&plan, self.last.as_deref(), diff);
        let now: BTreeSet<ObjectError> = plan.problems.iter().cloned().collect();
        let new_problems = now.difference(&self.problems).cloned().collect();
        let fixed_problems = self.problems.difference(&now).count();
        let mut counts = std::collections::BTreeMap::new();
        for p in &now {
            *counts.entry((p.kind, p.consequence)).or_insert(0usize) += 1;
        }
        let problem_counts = counts.into_iter().collect();
        self.problems = now;
        let report = SyncReport {
            service_ports: plan.services.len(),
            map_ops,
            plan_time,
            apply_time,
            new_problems,
            fixed_problems,
            problem_counts,
            stale_flows_deleted,
            udp_sockets_destroyed: sockets_destroyed,
            conntrack,
            refused: self.refused.clone(),
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

    /// NAT entries in use on the packet path (live flows with a rewritten source).
    pub fn nat_entries(&self) -> usize {
        match &self.backend {
            Backend::Bpf(b) => {
                ferry_bpf::stale::nat_entries_in_use(&b.maps.ct_entries(), ferry_bpf::stale::monotonic_ns())
            }
            Backend::Nftables(_) => 0,
        }
    }

    /// Deletes expired entries of the packet path's connection tracking
    /// (and of its DSR flows), and entries stranded by another flow. The
    /// datapath removes an expired entry only when a packet meets it, and
    /// `ferry_ct` never evicts: this frees NAT ports and keeps fill levels
    /// and `ferry_nat_entries` honest. Run with the periodic resync. Returns
    /// the conntrack entries deleted.
    pub fn collect_expired_flows(&mut self) -> usize {
        let Backend::Bpf(b) = &mut self.backend else { return 0 };
        let now = ferry_bpf::stale::monotonic_ns();
        let (mut live, expired): (Vec<_>, Vec<_>) = b.maps.ct_entries().into_iter().partition(|e| e.is_live(now));
        let mut n = b.maps.delete_ct(&expired);
        // Entries a layout change carried across with their flow already
        // over (ferry_bpf::stale::stranded_flows): the copies leave them
        // behind, this heals whatever state they come from.
        let stranded = b.maps.delete_stranded_ct(&live, now);
        if !stranded.is_empty() {
            tracing::info!(
                removed = stranded.len(),
                "removed conntrack entries stranded by another flow (their flow's other entry belongs to a newer one)"
            );
            let stranded: std::collections::HashSet<_> = stranded.into_iter().collect();
            live.retain(|e| !stranded.contains(e));
            n += stranded.len();
        }
        let (live_dsr, expired_dsr): (Vec<_>, Vec<_>) = b.maps.dsr_entries().into_iter().partition(|e| e.is_live(now));
        b.maps.delete_dsr(&expired_dsr);
        // Kept for the resync that follows (its collection of the pass-through sets).
        b.live_flows = Some((live, live_dsr));
        n
    }

    /// Service ports the datapath refused at the last sync or resync, by name, with the reason.
    pub fn refused(&self) -> &[ferry_bpf::Refused] {
        &self.refused
    }

    /// The Plan programmed by the last successful sync.
    pub fn plan(&self) -> Option<&Plan> {
        self.last.as_deref()
    }

    /// Datapath counters (named like `ferry_bpf::stats::NAMES`; none for nftables).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        match &self.backend {
            Backend::Bpf(b) => ferry_bpf::stats::NAMES.iter().copied().zip(b.maps.counters()).collect(),
            Backend::Nftables(_) => Vec::new(),
        }
    }

    /// Whether the packet path's pass-through fast path is on (bpf only).
    pub fn fast_pass(&self) -> bool {
        matches!(&self.backend, Backend::Bpf(b) if b.runtime.fast_pass)
    }

    /// Verifies the datapath against the last Plan and rewrites whatever
    /// drifted (something deleted an entry, a partial apply). BPF: the maps
    /// are re-read and compared; nftables: the tables are replaced whole, in
    /// one transaction. Returns the number of corrections (or lines) applied.
    pub fn resync(&mut self) -> anyhow::Result<usize> {
        let Some(plan) = self.last.clone() else { return Ok(0) };
        match &mut self.backend {
            Backend::Bpf(b) => {
                let dump = b.maps.dump();
                let mut fresh = Programmer::adopt(&dump);
                b.collect_pass_sets(&ferry_bpf::pass::Programmed::of(&dump, &fresh));
                let batch = fresh.sync_batch(&plan, None, &b.runtime);
                self.refused = b.maps.apply_batch(&batch);
                if self.refused.is_empty() {
                    b.programmer = fresh;
                    self.dirty = false;
                } else {
                    b.programmer = Programmer::adopt(&b.maps.dump());
                    self.dirty = true;
                }
                Ok(batch.len())
            }
            Backend::Nftables(r) => {
                r.reset();
                let mut lines = 0;
                for (family, script, table) in r.sync(&plan, None) {
                    lines += script.lines().count();
                    ferry_nft::nft::apply(ferry_nft::services::TABLE, &script)
                        .context("replacing the nftables datapath")?;
                    r.applied(family, table);
                }
                Ok(lines)
            }
        }
    }
}

/// A NAT port that the host may also pick for its own connections could give
/// a host connection and a NAT flow the same tuple: say so at start.
fn warn_if_nat_ports_are_ephemeral((lo, hi): (u16, u16)) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else { return };
    let mut it = text.split_whitespace().filter_map(|w| w.parse::<u16>().ok());
    if let (Some(elo), Some(ehi)) = (it.next(), it.next())
        && lo <= ehi
        && elo <= hi
    {
        tracing::warn!(
            "natPortRange {lo}-{hi} overlaps this host's ephemeral ports {elo}-{ehi} \
             (net.ipv4.ip_local_port_range): choose a natPortRange outside it, or reserve it \
             with net.ipv4.ip_local_reserved_ports"
        );
    }
}

impl BpfBackend {
    /// The pass-through sets shrink here only (`ferry_bpf::pass`), at a
    /// resync: from one reading of the maps (`programmed`) and the flows the
    /// collection before it kept, on the sync thread, so nothing is
    /// programmed meanwhile. Before the resync's corrections: an entry they
    /// put back writes its address again.
    fn collect_pass_sets(&mut self, programmed: &ferry_bpf::pass::Programmed) {
        let Some((flows, dsr)) = self.live_flows.take() else { return };
        if !self.runtime.fast_pass {
            return;
        }
        match ferry_bpf::pass::reconcile(&self.maps, programmed, &flows, &dsr) {
            Ok(c) if !c.is_empty() => tracing::debug!(
                addresses_added = c.add_addrs.len(),
                addresses_removed = c.del_addrs.len(),
                peers_added = c.add_peers.len(),
                peers_removed = c.del_peers.len(),
                "pass-through sets brought up to date"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("pass-through sets: {e}"),
        }
    }

    /// Fills the pass-through sets and turns the fast path on, once per
    /// install, after the first sync (`ferry_bpf::pass`): from then on a
    /// packet that is none of ferry's business leaves the tc programs after
    /// two lookups. Until then (and on a datapath a previous layout left)
    /// every packet takes the full path.
    fn enable_fast_pass(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let flows = self.maps.ct_entries();
        let dsr = self.maps.dsr_entries();
        let (addrs, peers) = ferry_bpf::pass::fill(&self.maps, &self.programmer.pass_addrs(), &flows, &dsr)
            .context("filling the pass-through sets")?;
        self.runtime.fast_pass = true;
        let node_only = PlanDiff { node_changed: true, ..Default::default() };
        let batch = self.programmer.sync_batch(plan, Some(&node_only), &self.runtime);
        let refused = self.maps.apply_batch(&batch);
        if !refused.is_empty() {
            self.runtime.fast_pass = false;
            self.programmer = Programmer::adopt(&self.maps.dump());
            anyhow::bail!("turning the pass-through fast path on: {refused:?}");
        }
        tracing::info!(addresses = addrs, peers, "pass-through fast path on");
        Ok(())
    }

    /// Destroys connected UDP sockets that socket-LB pointed at a backend this
    /// sync removed (see `ferry_bpf::sockdestroy`). The application gets
    /// ECONNABORTED and reconnects to a live backend; with none left, its
    /// reconnect is refused at once instead of sending into the void. A full
    /// sync has no "before" diff: the first one after start compares the
    /// backends of the adopted maps (`away`) with the Plan instead, so a
    /// backend removed while no agent ran loses its sockets too.
    fn destroy_stale_udp_sockets(&self, plan: &Plan, diff: Option<&PlanDiff>, away: Vec<std::net::SocketAddr>) -> u64 {
        let udp = |sp: &ServicePort| sp.id.protocol == Protocol::Udp;
        let mut gone: BTreeSet<std::net::SocketAddr> = away.into_iter().collect();
        if let Some(d) = diff {
            for c in d.changed.iter().filter(|c| udp(&c.old)) {
                let now = c.new.serving_addrs();
                gone.extend(c.old.serving_addrs().into_iter().filter(|a| !now.contains(a)));
            }
            for old in d.removed.iter().filter(|sp| udp(sp)) {
                gone.extend(old.serving_addrs());
            }
        }
        if gone.is_empty() {
            return 0;
        }
        // A backend another UDP service port still serves keeps its sockets. A
        // scan of the Plan, but only when a UDP backend went away.
        let still_serving: std::collections::HashSet<std::net::SocketAddr> =
            plan.services.values().filter(|sp| udp(sp)).flat_map(|sp| sp.serving_addrs()).collect();
        gone.retain(|a| !still_serving.contains(a));
        if gone.is_empty() {
            return 0;
        }
        let gone: Vec<_> = gone.into_iter().collect();
        match ferry_bpf::sockdestroy::destroy_udp_sockets(&self.pin_dir, &self.cgroup, &gone) {
            Ok(r) => {
                if r.destroyed > 0 {
                    tracing::info!(
                        destroyed = r.destroyed,
                        namespaces = r.namespaces,
                        backends = gone.len(),
                        "destroyed connected UDP sockets of removed backends; their applications reconnect"
                    );
                }
                r.destroyed
            }
            Err(e) => {
                tracing::warn!("could not destroy UDP sockets of removed backends: {e}");
                0
            }
        }
    }

    /// Deletes packet-path UDP flows whose backend is no longer serving (see
    /// `ferry_bpf::stale`), for the services this sync changed (all of them
    /// on a full sync); a service left without serving endpoints loses all
    /// its UDP flows, and so does a deleted one (`deleted`: its id before the
    /// sync; on a full sync, whose "before" is unknown, every UDP flow of a
    /// service id no service port holds now). The flows this node carries by
    /// DSR (`ferry_dsr`, `ferry_dsr6`) go by the same rule: deleted, the next datagram is
    /// balanced anew, or refused. Returns how many entries were deleted.
    fn purge_stale_flows(&self, plan: &Plan, diff: Option<&PlanDiff>, deleted: &[u32]) -> usize {
        let serving = |sp: &ServicePort| {
            Serving::Endpoints(sp.serving_endpoints().map(|e| (ferry_bpf::entries::words(&e.ip), e.port)).collect())
        };
        let mut services: HashMap<u32, Serving> = deleted.iter().map(|id| (*id, Serving::Deleted)).collect();
        let udp = |sp: &ServicePort| sp.id.protocol == Protocol::Udp;
        let mut entries = None;
        match diff {
            None => {
                for sp in plan.services.values().filter(|sp| udp(sp)) {
                    if let Some(id) = self.programmer.service_id(&sp.id) {
                        services.insert(id, serving(sp));
                    }
                }
                // Flows of services deleted while the agent was down or behind a failed apply.
                // Service 0 is pod egress masquerading, not a service.
                let live: std::collections::HashSet<u32> =
                    plan.services.keys().filter_map(|id| self.programmer.service_id(id)).collect();
                let all = self.maps.ct_entries();
                let all_dsr = self.maps.dsr_entries();
                let held = all.iter().map(|e| e.service).chain(all_dsr.iter().map(|e| e.service));
                for service in held.filter(|s| *s != 0 && !live.contains(s)) {
                    services.entry(service).or_insert(Serving::Deleted);
                }
                entries = Some((all, all_dsr));
            }
            Some(d) => {
                for c in d.changed.iter().filter(|c| udp(&c.new)) {
                    if c.old.serving_addrs() != c.new.serving_addrs()
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
        let (entries, dsr) = entries.unwrap_or_else(|| (self.maps.ct_entries(), self.maps.dsr_entries()));
        let stale = ferry_bpf::stale::stale_udp_flows(&entries, &services);
        let stale_dsr = ferry_bpf::stale::stale_udp_dsr_flows(&dsr, &services);
        self.maps.delete_ct(&stale) + self.maps.delete_dsr(&stale_dsr)
    }
}

/// Whether a change of one UDP service port can leave a conntrack entry
/// stale under the reconciler's rule: a serving endpoint went away (the last
/// one included: a port without serving endpoints loses every flow,
/// kubernetes/kubernetes#139629), the port got its first serving endpoint
/// (flows sent while it had none were never DNATed), or it gained or lost a
/// frontend. Endpoints only being added make nothing stale, so a scale-up
/// never lists the conntrack table.
fn can_leave_stale_flows(old: &ServicePort, new: &ServicePort) -> bool {
    let (before, after) = (old.serving_addrs(), new.serving_addrs());
    !before.is_subset(&after)
        || (before.is_empty() && !after.is_empty())
        || old.cluster_ip != new.cluster_ip
        || old.node_port != new.node_port
        || !new.load_balancer_ips().iter().all(|ip| old.load_balancer_ips().contains(ip))
        || !new.external_ips().iter().all(|ip| old.external_ips().contains(ip))
        || lost_frontend(old, new)
}

/// Whether `new` no longer has a frontend `old` had.
fn lost_frontend(old: &ServicePort, new: &ServicePort) -> bool {
    old.cluster_ip != new.cluster_ip
        || old.port != new.port
        || (old.node_port.is_some() && old.node_port != new.node_port)
        || !old.load_balancer_ips().iter().all(|ip| new.load_balancer_ips().contains(ip))
        || !old.external_ips().iter().all(|ip| new.external_ips().contains(ip))
}

/// The UDP service ports whose frontends the reconciler must treat as a
/// deleted service's (kubernetes/kubernetes#141371): those removed since the
/// last programmed Plan, and the old form of those that lost a frontend (a
/// frontend nobody serves now keeps no flow). Without a diff, `last` (the
/// last Plan programmed) stands for the "before"; with neither, none are known.
fn departed_udp_ports(plan: &Plan, last: Option<&Plan>, diff: Option<&PlanDiff>) -> Vec<Arc<ServicePort>> {
    let udp = |sp: &ServicePort| sp.id.protocol == Protocol::Udp;
    match (diff, last) {
        (Some(d), _) => d
            .removed
            .iter()
            .filter(|sp| udp(sp))
            .cloned()
            .chain(d.changed.iter().filter(|c| udp(&c.old) && lost_frontend(&c.old, &c.new)).map(|c| c.old.clone()))
            .collect(),
        (None, Some(last)) => last
            .services
            .values()
            .filter(|sp| udp(sp))
            .filter(|old| plan.services.get(&old.id).is_none_or(|new| lost_frontend(old, new)))
            .cloned()
            .collect(),
        (None, None) => Vec::new(),
    }
}

/// Deletes the kernel conntrack entries of UDP flows whose backend no longer
/// serves (kube-proxy's conntrack reconciler, rule in `ferry_model::stale`:
/// a UDP service port without serving endpoints loses every flow to its
/// frontends, kubernetes/kubernetes#139629, and so does one removed since the
/// last sync where no live service owns the frontend now, #141371), after a
/// sync with a UDP change that can leave stale flows (a UDP service port
/// added or removed, or changed as `can_leave_stale_flows` says; a full sync:
/// any UDP service port). Listing a large conntrack table takes seconds, so it
/// is skipped when nothing can be stale. Both datapaths need it: with bpf,
/// traffic that takes the normal stack (host network, NodePorts handled by
/// netfilter) still leaves entries in the kernel's table. Failures are logged,
/// not fatal: the next UDP change runs it again (a removed port's flows are
/// then left to time out).
fn reconcile_kernel_conntrack(
    plan: &Plan,
    last: Option<&Plan>,
    diff: Option<&PlanDiff>,
) -> Option<ferry_conntrack::ReconcileReport> {
    let udp = |sp: &ServicePort| sp.id.protocol == Protocol::Udp;
    let touched = match diff {
        Some(d) => {
            d.added.iter().any(|sp| udp(sp))
                || d.removed.iter().any(|sp| udp(sp))
                || d.changed.iter().any(|c| udp(&c.new) && can_leave_stale_flows(&c.old, &c.new))
                || d.frontends_added.iter().any(|(k, _)| k.protocol == Protocol::Udp)
        }
        None => plan.services.values().chain(last.iter().flat_map(|l| l.services.values())).any(|sp| udp(sp)),
    };
    if !touched {
        return None;
    }
    let index = ferry_model::stale::StaleFlowIndex::new(plan, &departed_udp_ports(plan, last, diff));
    // A family without a UDP frontend (live or departed) has nothing stale: its table is not listed.
    let families: Vec<_> = plan.node.families.iter().copied().filter(|f| index.has_family(*f)).collect();
    if families.is_empty() {
        return Some(ferry_conntrack::ReconcileReport::default());
    }
    let report = match ferry_conntrack::Conntrack::open() {
        Ok(mut ct) => ct.reconcile(&index, &families),
        Err(e) => {
            tracing::warn!("conntrack reconciler: {e}; stale UDP flows stay until they time out");
            return None;
        }
    };
    for f in &report.families {
        let family = f.family.as_k8s();
        let ms = f.duration.as_secs_f64() * 1e3;
        if let Some(e) = &f.error {
            tracing::warn!(family, listed = f.listed, deleted = f.deleted, "conntrack reconciler: {e}");
        } else if f.deleted > 0 || f.partial {
            tracing::info!(
                family,
                listed = f.listed,
                deleted = f.deleted,
                partial = f.partial,
                ms,
                "deleted stale UDP conntrack entries"
            );
        } else {
            tracing::debug!(family, listed = f.listed, ms, "no stale UDP conntrack entries");
        }
    }
    Some(report)
}
