//! `ferry agent`: one node's service proxy, fed by the Kubernetes API (the
//! DaemonSet entrypoint).
//!
//! ```text
//! ApiSource --events--> ClusterState --(Synced, min sync period)--> sync thread: Proxier::sync
//!                        │                                            │
//!                        └ ChangeTracker, ProxyHealth                 └ Plan -> health checks, metrics
//! ```
//!
//! The loop applies every event to a `ClusterState` and writes nothing until
//! the source reports Services and EndpointSlices listed. After a change it
//! syncs once `minSyncPeriod` has passed since the previous sync; with nothing
//! changing it verifies the datapath against the Plan every `syncPeriod`.
//! Syncs run on their own thread. API outages change nothing: the state only
//! moves with events, and a relist replaces it once the API is back.

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
use ferry_k8s::api::{ApiSource, SourceEvent, apply_event};
use ferry_model::ClusterState;
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
    /// Written once the first sync is programmed.
    pub ready_file: Option<PathBuf>,
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
    let (done_tx, done) = mpsc::unbounded_channel();
    let sync_thread = SyncThread::spawn(opts.install.clone(), metrics.datapath.clone(), done_tx)?;
    let healthy = health.clone();
    let checks = ServiceHealthServer::new(tokio::runtime::Handle::current(), Arc::new(move || healthy.is_healthy()));
    let mut agent_loop = Loop {
        primary_configured: !settings.node.primary_ips.is_empty(),
        settings,
        state: ClusterState::default(),
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
        ready_file: opts.ready_file.clone(),
    };
    let result = agent_loop.run(events, done, shutdown).await;
    drop(agent_loop);
    let _ = stop_source.send(());
    let _ = source_task.await;
    sync_thread.stop();
    tracing::info!("stopping; the datapath stays installed and keeps serving (`ferry cleanup` removes it)");
    result
}

/// The agent's loop state; see the module documentation.
struct Loop<'a> {
    settings: Settings,
    primary_configured: bool,
    state: ClusterState,
    tracker: ChangeTracker,
    schedule: Schedule,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    checks: ServiceHealthServer,
    sync_thread: &'a SyncThread,
    /// The running job and the changes it carries.
    in_flight: Option<(Due, Batch)>,
    /// The first change that arrived while a job ran.
    changed_during_sync: Option<Instant>,
    /// When the source reported Services and EndpointSlices listed.
    synced_at: Option<Instant>,
    node_seen: bool,
    programmed_once: bool,
    ready_file: Option<PathBuf>,
}

impl Loop<'_> {
    async fn run(
        &mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut done: mpsc::UnboundedReceiver<Done>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let next = self.schedule.next();
            let node_deadline = self.node_deadline();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                finished = done.recv() => {
                    let Some(finished) = finished else { anyhow::bail!("the sync thread stopped unexpectedly") };
                    self.finished(finished)?;
                }
                event = events.recv() => {
                    let Some(event) = event else { anyhow::bail!("the Kubernetes API source stopped unexpectedly") };
                    self.event(event);
                }
                () = sleep_until(next.map(|(at, _)| at)), if next.is_some() => {
                    if let Some((_, due)) = next {
                        self.dispatch(due)?;
                    }
                }
                () = sleep_until(node_deadline), if node_deadline.is_some() => self.check_ready(),
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
            Some(at) if !self.schedule.is_ready() => Some(at + NODE_WAIT),
            _ => None,
        }
    }

    fn event(&mut self, event: SourceEvent) {
        let now = Instant::now();
        match &event {
            SourceEvent::WatchError { kind, .. } => {
                self.metrics.watch_errors.get_or_create(&KindLabels { kind: kind.to_string() }).inc();
                return;
            }
            SourceEvent::Synced => {
                self.synced_at = Some(now);
                self.check_ready();
                return;
            }
            _ => {}
        }
        let counted = self.tracker.observe(&self.state, &event);
        apply_event(&mut self.state, &event);
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
    }

    fn publish_pending(&self) {
        self.metrics.service_changes_pending.set(self.tracker.pending_services() as i64);
        self.metrics.endpoint_changes_pending.set(self.tracker.pending_endpoints() as i64);
    }

    /// This node's Node object arrived or changed: eligibility, primary addresses.
    fn node_changed(&mut self) {
        let Some(node) = self.state.nodes.get(&self.settings.node.node_name) else { return };
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
        let waited = synced_at.elapsed() >= NODE_WAIT;
        if self.primary_configured || self.node_seen || waited {
            if !self.primary_configured && self.settings.node.primary_ips.is_empty() {
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
        self.in_flight = Some((due, batch));
        self.sync_thread.send(Job { due, state: self.state.clone(), settings: self.settings.clone() })
    }

    fn finished(&mut self, finished: Done) -> anyhow::Result<()> {
        let now = Instant::now();
        let batch = self.in_flight.take().map(|(_, b)| b).unwrap_or_default();
        let ok = finished.result.is_ok();
        self.schedule.finished(ok, now);
        let synced = match finished.result {
            Ok(s) => s,
            Err(e) => {
                self.metrics.sync_failures.inc();
                self.tracker.restore(batch);
                self.publish_pending();
                if finished.never_installed {
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
        let wall = SystemTime::now();
        if let Some(r) = &synced.report {
            for p in &r.new_problems {
                tracing::warn!("{p}");
            }
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
        if !self.programmed_once && synced.report.is_some() {
            self.programmed_once = true;
            if let Some(f) = &self.ready_file {
                std::fs::write(f, b"ready\n")
                    .map_err(|e| anyhow::anyhow!("writing the ready file {}: {e}", f.display()))?;
            }
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
