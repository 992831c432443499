//! `ferry agent`: one node's service proxy, fed by the Kubernetes API (the
//! DaemonSet entrypoint).
//!
//! ```text
//! ApiSource ─┐                      ┌─ every event ──────────────► sync thread: Planner::apply (compact model)
//! manifests ─┴─ events ─► Loop ─────┤                                           │
//!                         │         └─ Job (Synced, min sync period) ─► Planner::sync -> (Arc<Plan>, PlanDiff)
//!                         └ ChangeTracker, ProxyHealth                           -> Proxier::sync -> health checks, metrics
//! ```
//!
//! One loop for both sources (`ferry agent` with the Kubernetes API, `ferry
//! run` with a manifest directory): same batching, resync and retry. The
//! loop holds no objects: it counts each event (metrics) and forwards it to
//! the sync thread, whose planner keeps the compact model. It writes nothing
//! until the source reports Services and EndpointSlices listed. After a
//! change it syncs once `minSyncPeriod` has passed since the previous sync;
//! with nothing changing it verifies the datapath against the Plan every
//! `syncPeriod`. API outages change nothing: the model only moves with
//! events, and a relist replaces it once the API is back.

pub mod changes;
pub mod metrics;
pub mod node;
pub mod schedule;
mod servers;
pub mod sync;

pub use ferry_k8s::api::{WATCHED_RESOURCES, WatchedResource};

use crate::config::{self, NodeFlags, Settings};
use crate::health::{ProxyHealth, ServiceHealthServer};
use changes::{Batch, ChangeTracker};
use ferry_k8s::api::{ApiSource, Kind, SourceEvent, node_key};
use ferry_model::state::StateChange;
use k8s_openapi::api::core::v1::Node;
use metrics::{KindLabels, Metrics};
use schedule::{Due, Schedule};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use sync::{Done, InstallOverrides, Job, SyncThread};
use tokio::sync::{mpsc, oneshot};

/// How long the first sync waits for this node's Node object (for its primary
/// addresses) once everything else is listed, when the config names none.
pub const NODE_WAIT: Duration = Duration::from_secs(30);

/// Everything `ferry agent` is started with.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// A KubeProxyConfiguration or a ferry node config.
    pub config: Option<PathBuf>,
    pub node: NodeFlags,
    pub kubeconfig: Option<PathBuf>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub install: InstallOverrides,
    /// Written after the first sync and rewritten after every successful one.
    pub ready_file: Option<PathBuf>,
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Reads the configuration and applies the command line over it.
fn settings(opts: &AgentOptions) -> anyhow::Result<Settings> {
    let loaded = config::agent::load(opts.config.as_deref(), &opts.node)?;
    tracing::info!(source = %loaded.source, "configuration read");
    if let Some(mode) = &loaded.kube_proxy_mode {
        let mode = if mode.is_empty() { "iptables (the default)" } else { mode };
        tracing::info!(
            "kube-proxy mode {mode}: ferry's eBPF datapath takes its place; the mode only chose which section \
             syncPeriod, minSyncPeriod and masqueradeAll were read from"
        );
    }
    for field in &loaded.ignored {
        tracing::warn!("{field}");
    }
    let mut settings = loaded.settings;
    let agent = &mut settings.agent;
    if let Some(k) = &opts.kubeconfig {
        agent.kubeconfig = Some(k.clone());
    }
    let flag_addr = |text: &str, port: u16, flag: &str| {
        config::agent::parse_bind_address(text, port).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    if let Some(a) = &opts.healthz_bind_address {
        agent.healthz_bind_address = flag_addr(a, config::agent::HEALTHZ_PORT, "healthz-bind-address")?;
    }
    if let Some(a) = &opts.metrics_bind_address {
        agent.metrics_bind_address = flag_addr(a, config::agent::METRICS_PORT, "metrics-bind-address")?;
    }
    settings.node.node_name =
        node::node_name(&settings.node.node_name, std::env::var("NODE_NAME").ok(), node::hostname)?;
    if settings.node.node_ips.is_empty() {
        settings.node.node_ips = crate::node_addrs::detect()
            .map_err(|e| anyhow::anyhow!("detecting this node's addresses failed ({e}); list them in nodeIPs"))?;
        tracing::info!(addresses = ?settings.node.node_ips, "nodeIPs not configured: using every address of this network namespace");
    }
    Ok(settings)
}

/// Runs the agent until `shutdown` completes. The datapath stays installed.
pub async fn run(opts: AgentOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let settings = settings(&opts)?;
    let agent = settings.agent.clone();
    tracing::info!(
        node = %settings.node.node_name,
        min_sync_period = ?agent.min_sync_period,
        sync_period = ?agent.sync_period,
        "starting ferry agent"
    );
    let metrics = Metrics::new();
    let health = ProxyHealth::new(agent.sync_period * 2);
    if let Some(addr) = agent.healthz_bind_address {
        let app = servers::health_router(health.clone(), metrics.clone());
        servers::serve("health", "healthzBindAddress", addr, app, agent.bind_address_hard_fail)?;
    }
    if let Some(addr) = agent.metrics_bind_address {
        let app = servers::metrics_router(metrics.clone());
        servers::serve("metrics", "metricsBindAddress", addr, app, agent.bind_address_hard_fail)?;
    }
    let client = ferry_k8s::api::client(agent.kubeconfig.as_deref()).await?;
    let (events_tx, events) = mpsc::channel(1024);
    let (stop_source, source_stopped) = oneshot::channel::<()>();
    let source = ApiSource::new(client).node_name(settings.node.node_name.clone());
    let source_task = tokio::spawn(source.run(events_tx, async {
        let _ = source_stopped.await;
    }));
    let options = LoopOptions {
        settings,
        install: opts.install.clone(),
        ready_file: opts.ready_file.clone(),
        once: false,
        node_wait: NODE_WAIT,
    };
    let result = drive(options, metrics, health, events, shutdown).await;
    let _ = stop_source.send(());
    let _ = source_task.await;
    tracing::info!("stopping; the datapath stays installed and keeps serving (`ferry cleanup` removes it)");
    result
}

/// Runs the agent on a manifest directory (`ferry run`) until `shutdown`
/// completes (or after the first sync, with `once`). The same loop as the
/// API agent; no metrics or healthz servers.
pub async fn run_manifests(
    options: LoopOptions,
    dir: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let health = ProxyHealth::new(options.settings.agent.sync_period * 2);
    let (events_tx, events) = mpsc::channel(1024);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let limits = options.settings.manifests;
    let source = std::thread::Builder::new().name("ferry-manifests".into()).spawn(move || {
        ferry_k8s::ManifestSource::new(dir)
            .with_limits(limits)
            .on_idle(crate::memory::release_idle)
            .run_blocking(events_tx, stopped)
    })?;
    let result = drive(options, metrics, health, events, shutdown).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let watched = tokio::task::spawn_blocking(move || source.join()).await;
    tracing::info!("stopping; the datapath stays installed and keeps serving (`ferry cleanup` removes it)");
    match watched {
        Ok(Ok(Err(e))) => Err(e.into()),
        _ => result,
    }
}

/// What one agent loop runs with, whichever its source.
pub struct LoopOptions {
    pub settings: Settings,
    pub install: InstallOverrides,
    /// Rewritten after every successful sync: `synced <generation> <input_unix_nanos>`.
    pub ready_file: Option<PathBuf>,
    /// Stop after the first successful sync (`ferry run --once`).
    pub once: bool,
    /// How long the first sync waits for this node's Node object once the
    /// source has listed everything (`NODE_WAIT` for the API; zero for a
    /// manifest directory, which is read whole before it says so).
    pub node_wait: Duration,
}

/// The loop shared by both sources: see the module documentation.
async fn drive(
    options: LoopOptions,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    events: mpsc::Receiver<SourceEvent>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let LoopOptions { settings, install, ready_file, once, node_wait } = options;
    let agent = settings.agent.clone();
    if settings.node.external_ips_allowed.is_none() {
        tracing::warn!(
            "externalIPs.allowedCIDRs is not set: a Service in any namespace may expose itself on any unicast \
             address as an ExternalIP on this node (CVE-2020-8554; ClusterIPs stay protected). Set it in the \
             node config to the ranges your ExternalIPs come from (see the README's \"Security model\")"
        );
    }
    // One writer per pin directory, for as long as this loop runs.
    let pin_dir = install.pin_dir.clone().unwrap_or_else(|| settings.bpf.pin_path.clone());
    let _pin_lock = match settings.datapath {
        crate::config::DatapathChoice::Bpf if ferry_bpf::system::is_under_bpffs(&pin_dir) => {
            Some(crate::pin_lock::lock(&pin_dir)?)
        }
        _ => None,
    };
    let (done_tx, done) = mpsc::unbounded_channel();
    let sync_thread = SyncThread::spawn(settings.node.clone(), install, metrics.datapath.clone(), done_tx)?;
    // With primary addresses in the config nothing the source reads can change
    // how the datapath is installed, so install it while the source reads.
    if !settings.node.primary_ips.is_empty() {
        sync_thread.prepare(settings.clone())?;
    }
    let healthy = health.clone();
    let checks = ServiceHealthServer::new(tokio::runtime::Handle::current(), Arc::new(move || healthy.is_healthy()));
    let mut agent_loop = Loop {
        primary_configured: !settings.node.primary_ips.is_empty(),
        settings,
        this_node: None,
        tracker: ChangeTracker::new(SystemTime::now()),
        schedule: Schedule::new(agent.min_sync_period, agent.sync_period),
        metrics,
        health,
        checks,
        sync_thread: &sync_thread,
        in_flight: None,
        changed_during_sync: None,
        synced_at: None,
        node_seen: false,
        programmed_once: false,
        ready_file,
        once,
        node_wait,
        finished_once: false,
        generation: 0,
        latest_input: None,
        ready_input: None,
    };
    let result = agent_loop.run(events, done, shutdown).await;
    drop(agent_loop);
    sync_thread.stop();
    result
}

/// The agent's loop state; see the module documentation.
struct Loop<'a> {
    settings: Settings,
    primary_configured: bool,
    /// This node's Node object (health, primary addresses); the planner has the rest.
    this_node: Option<Node>,
    tracker: ChangeTracker,
    schedule: Schedule,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    checks: ServiceHealthServer,
    sync_thread: &'a SyncThread,
    /// The running job, the changes it carries and the input time it reflects.
    in_flight: Option<(Due, Batch, SystemTime)>,
    /// The first change that arrived while a job ran.
    changed_during_sync: Option<Instant>,
    /// When the source reported Services and EndpointSlices listed.
    synced_at: Option<Instant>,
    node_seen: bool,
    programmed_once: bool,
    ready_file: Option<PathBuf>,
    once: bool,
    node_wait: Duration,
    /// With `once`: the first sync is done, stop.
    finished_once: bool,
    /// Successful syncs so far (the ready file's generation).
    generation: u64,
    /// The latest checkpoint of the source: everything it read up to then has arrived.
    latest_input: Option<SystemTime>,
    /// The input instant the ready file last reported (it never goes back).
    ready_input: Option<SystemTime>,
}

impl Loop<'_> {
    async fn run(
        &mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut done: mpsc::UnboundedReceiver<Done>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!("cannot install the SIGHUP handler (resync on demand): {e}"))
            .ok();
        while !self.finished_once {
            let next = self.schedule.next();
            let node_deadline = self.node_deadline();
            // While the sync thread has this many events still to read, the
            // source waits (its channel fills and it stops reading): without
            // it, a start-up that reads faster than the planner takes held
            // the whole cluster's objects in the queue (~600 MB at 100k services).
            let backlogged = self.sync_thread.backlog() >= sync::MAX_BACKLOG;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                finished = done.recv() => {
                    let Some(finished) = finished else { anyhow::bail!("the sync thread stopped unexpectedly") };
                    self.finished(finished)?;
                }
                () = tokio::time::sleep(Duration::from_millis(1)), if backlogged => {}
                event = events.recv(), if !backlogged => {
                    let Some(event) = event else { anyhow::bail!("the Kubernetes API source stopped unexpectedly") };
                    self.event(event)?;
                }
                () = sleep_until(next.map(|(at, _)| at)), if next.is_some() => {
                    if let Some((_, due)) = next {
                        self.dispatch(due)?;
                    }
                }
                () = sleep_until(node_deadline), if node_deadline.is_some() => self.check_ready(),
                Some(()) = recv_hangup(&mut hangup) => {
                    tracing::info!("SIGHUP: verifying the datapath against the Plan now");
                    self.schedule.request_resync();
                }
            }
        }
        // Let a running sync finish: killing it half-way would leave the mirror ahead of the kernel.
        if self.in_flight.is_some() {
            match tokio::time::timeout(Duration::from_secs(30), done.recv()).await {
                Ok(Some(finished)) => self.finished(finished)?,
                _ => tracing::warn!("the last sync did not finish in 30s; stopping anyway"),
            }
        }
        Ok(())
    }

    /// While waiting for the Node object, when to give up on it.
    fn node_deadline(&self) -> Option<Instant> {
        match self.synced_at {
            Some(at) if !self.schedule.is_ready() => Some(at + self.node_wait),
            _ => None,
        }
    }

    fn event(&mut self, event: SourceEvent) -> anyhow::Result<()> {
        let now = Instant::now();
        match &event {
            SourceEvent::WatchError { kind, .. } => {
                self.metrics.watch_errors.get_or_create(&KindLabels { kind: kind.to_string() }).inc();
                return Ok(());
            }
            SourceEvent::Synced => {
                self.synced_at = Some(now);
                self.check_ready();
                return Ok(());
            }
            SourceEvent::Checkpoint(at) => {
                self.latest_input = Some(*at);
                // Nothing new to program: what is programmed already reflects this input.
                if self.in_flight.is_none() && self.tracker.pending_services() + self.tracker.pending_endpoints() == 0 {
                    self.write_ready(*at)?;
                }
                return Ok(());
            }
            _ => {}
        }
        let counted = self.tracker.observe(&event);
        self.keep_this_node(&event);
        self.sync_thread.event(event)?;
        self.metrics.service_changes_total.inc_by(counted.services);
        self.metrics.endpoint_changes_total.inc_by(counted.endpoints);
        self.publish_pending();
        if counted.other > 0 {
            self.node_changed();
        }
        if counted.any() {
            self.schedule.changed();
            self.health.queued_update(now);
            self.metrics.last_queued.set(unix_seconds(SystemTime::now()));
            if self.in_flight.is_some() {
                self.changed_during_sync.get_or_insert(now);
            }
        }
        Ok(())
    }

    /// Keeps this node's Node object out of the events that pass.
    fn keep_this_node(&mut self, event: &SourceEvent) {
        let name = &self.settings.node.node_name;
        match event {
            SourceEvent::Change(StateChange::NodeApplied(n)) | SourceEvent::ListItem(StateChange::NodeApplied(n))
                if n.metadata.name.as_ref() == Some(name) =>
            {
                self.this_node = Some((**n).clone());
            }
            SourceEvent::Change(StateChange::NodeDeleted(n)) if n == name => self.this_node = None,
            SourceEvent::Listed(listing) if listing.kind == Kind::Node && !listing.keys.contains(&node_key(name)) => {
                self.this_node = None;
            }
            _ => {}
        }
    }

    fn publish_pending(&self) {
        self.metrics.service_changes_pending.set(self.tracker.pending_services() as i64);
        self.metrics.endpoint_changes_pending.set(self.tracker.pending_endpoints() as i64);
    }

    /// This node's Node object arrived or changed: eligibility, primary addresses.
    fn node_changed(&mut self) {
        let Some(node) = &self.this_node else { return };
        self.health.sync_node(node);
        self.node_seen = true;
        if !self.primary_configured {
            let primary = node::primary_ips(node);
            if !primary.is_empty() && primary != self.settings.node.primary_ips {
                tracing::info!(primary = ?primary, "primary addresses from the Node object");
                self.settings.node.primary_ips = primary;
            }
        }
        self.check_ready();
    }

    fn check_ready(&mut self) {
        let Some(synced_at) = self.synced_at else { return };
        if self.schedule.is_ready() {
            return;
        }
        let waited = synced_at.elapsed() >= self.node_wait;
        if self.primary_configured || self.node_seen || waited {
            if !self.primary_configured && self.settings.node.primary_ips.is_empty() && !self.node_wait.is_zero() {
                let first: Vec<IpAddr> = [true, false]
                    .into_iter()
                    .filter_map(|v4| self.settings.node.node_ips.iter().copied().find(|ip| ip.is_ipv4() == v4))
                    .collect();
                tracing::warn!(
                    node = %self.settings.node.node_name,
                    primary = ?first,
                    "{}; using the first node address of each family as primary (set primaryIPs to choose)",
                    if self.node_seen { "the Node object lists no InternalIP or ExternalIP" } else { "no Node object with this name" }
                );
            }
            tracing::info!("Services and EndpointSlices synced: programming the datapath");
            self.schedule.set_ready();
        }
    }

    fn dispatch(&mut self, due: Due) -> anyhow::Result<()> {
        let batch = if due == Due::Sync { self.tracker.take() } else { Batch::default() };
        self.publish_pending();
        self.schedule.started(due, Instant::now());
        self.changed_during_sync = None;
        // A sync reflects what the source had sent. A resync verifies the
        // datapath against the Plan already made, as of now; but with changes
        // still waiting for their sync it covers no more than the ready file
        // already said (reporting "now" then let a waiter probe before the
        // change was programmed).
        let pending = self.tracker.pending_services() + self.tracker.pending_endpoints() > 0;
        let input = match due {
            Due::Sync => self.latest_input.unwrap_or_else(SystemTime::now),
            Due::Resync if pending => self.ready_input.unwrap_or(SystemTime::UNIX_EPOCH),
            Due::Resync => SystemTime::now(),
        };
        self.in_flight = Some((due, batch, input));
        self.sync_thread.send(Job { due, settings: self.settings.clone() })
    }

    fn finished(&mut self, finished: Done) -> anyhow::Result<()> {
        let now = Instant::now();
        let (batch, input) = match self.in_flight.take() {
            Some((_, b, input)) => (b, input),
            None => (Batch::default(), SystemTime::now()),
        };
        // Refused service ports are retried with the same backoff as a failed sync.
        let ok = finished.result.as_ref().is_ok_and(|s| !s.refused.iter().any(|r| r.by_datapath()));
        self.schedule.finished(ok, now);
        let synced = match finished.result {
            Ok(s) => s,
            Err(e) => {
                self.metrics.sync_failures.inc();
                self.tracker.restore(batch);
                self.publish_pending();
                if !self.programmed_once
                    && let Some(f) = &self.ready_file
                {
                    // Waiters for the first sync learn it failed (the log says why).
                    let _ = std::fs::write(f, format!("failed 0 {}\n", unix_nanos(input)));
                }
                if finished.never_installed {
                    let refused = e.chain().any(|c| {
                        matches!(c.downcast_ref(), Some(ferry_bpf::install::InstallError::NewerLayout { .. }))
                    });
                    if refused {
                        // Not a permission problem: the error says what to do.
                        return Err(e.context("the pinned eBPF datapath was left untouched"));
                    }
                    return Err(e.context(
                        "the eBPF datapath cannot be installed on this node; ferry needs root (or CAP_BPF, \
                         CAP_NET_ADMIN, CAP_SYS_ADMIN), bpffs at /sys/fs/bpf and cgroup v2",
                    ));
                }
                tracing::error!("{:?} failed, retrying with backoff: {e:#}", finished.due);
                return Ok(());
            }
        };
        if let Some(line) = &synced.installed {
            tracing::info!("{line}");
        }
        for r in synced.refused.iter().filter(|r| r.by_datapath()) {
            tracing::warn!(
                object = %r.object,
                cause = %r.cause,
                "{} {} not programmed (the rest of the Plan is), retrying with backoff: {}",
                r.kind,
                r.object,
                r.reason
            );
        }
        self.metrics.set_refused(&synced.refused);
        let wall = SystemTime::now();
        if let Some(r) = &synced.report {
            for p in &r.new_problems {
                tracing::warn!("{p}");
            }
            self.metrics.set_object_problems(&r.problem_counts);
            self.metrics.sync_duration.observe(finished.elapsed.as_secs_f64());
            self.metrics.map_operations.inc_by(r.map_ops as u64);
            if let Some(ct) = &r.conntrack {
                self.metrics.record_conntrack(ct);
            }
            for trigger in &batch.triggers {
                if let Ok(latency) = wall.duration_since(*trigger) {
                    self.metrics.network_programming.observe(latency.as_secs_f64());
                }
            }
            tracing::info!(
                service_ports = r.service_ports,
                map_ops = r.map_ops,
                plan_ms = r.plan_time.as_secs_f64() * 1e3,
                apply_ms = r.apply_time.as_secs_f64() * 1e3,
                fixed_problems = r.fixed_problems,
                conntrack_deleted = r.conntrack.as_ref().map_or(0, |c| c.deleted()),
                "synced"
            );
        }
        if synced.corrections > 0 {
            tracing::warn!(
                corrections = synced.corrections,
                "resync: the datapath had drifted from the Plan; rewrote it"
            );
        }
        self.metrics.resync_corrections.inc_by(synced.corrections as u64);
        self.metrics.last_sync.set(unix_seconds(wall));
        self.metrics.service_ports.set(synced.service_ports as i64);
        self.metrics.set_no_local_endpoints(&synced.no_local);
        self.health.updated(wall, self.changed_during_sync.take());
        self.checks.update(&synced.health_checks);
        if synced.report.is_some() || self.programmed_once {
            self.programmed_once = true;
            // With nothing pending, everything the source has sent is programmed.
            let pending = self.tracker.pending_services() + self.tracker.pending_endpoints() > 0;
            let input = match (finished.due, pending) {
                // A change arrived while the resync ran: it may have been read
                // before the resync started, and the resync did not plan it.
                (Due::Resync, true) => self.ready_input.unwrap_or(input).min(input),
                (_, true) => input,
                (_, false) => self.latest_input.map_or(input, |l| l.max(input)),
            };
            self.write_ready(input)?;
            self.finished_once = self.once;
        }
        Ok(())
    }

    /// Rewrites the ready file (written aside, then renamed): `synced
    /// <generation> <input_unix_nanos>`, where every change the source sent
    /// before that instant is programmed.
    fn write_ready(&mut self, input: SystemTime) -> anyhow::Result<()> {
        if !self.programmed_once {
            return Ok(());
        }
        self.generation += 1;
        let input = self.ready_input.map_or(input, |r| r.max(input));
        self.ready_input = Some(input);
        let Some(f) = &self.ready_file else { return Ok(()) };
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, format!("synced {} {}\n", self.generation, unix_nanos(input)))
            .and_then(|()| std::fs::rename(&tmp, f))
            .map_err(|e| anyhow::anyhow!("writing the ready file {}: {e}", f.display()))
    }
}

async fn recv_hangup(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
