//! The sync thread: owns the [`Planner`] and the [`Proxier`], and runs
//! syncs and resyncs off the async runtime, so the sources keep draining
//! while a large Plan is built and written.
//!
//! Source events reach it as they arrive (`Work::Event`) and go straight
//! into the planner's compact model, so no copy of the cluster's objects is
//! kept anywhere; a `Work::Job` then plans what changed and hands the
//! `(Arc<Plan>, PlanDiff)` to the Proxier.
//!
//! The datapath is installed (or adopted) on the first job, and reinstalled,
//! adopting what is pinned, if the node's config changes (its primary address
//! arrived from the Node object). After every job it sends back what the agent
//! publishes: the sync report, the health checks the Plan asks for, and the
//! figures for the metrics.

use super::metrics::{DatapathView, MapFill, NoLocalCounts, NoLocalLabels};
use super::schedule::Due;
use crate::config::Settings;
use crate::health::HealthChecks;
use crate::proxier::{Proxier, SyncReport};
use ferry_k8s::api::{Kind, SourceEvent, node_key};
use ferry_model::{NodeConfig, Planner};
use libbpf_rs::MapCore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A sync touching more service ports than this is followed by `mi_collect`.
const LARGE_SYNC: usize = 10_000;

/// A sync or resync for the sync thread.
pub struct Job {
    pub due: Due,
    pub settings: Settings,
}

/// What the sync thread is sent, in order: a job sees every event sent before it.
pub enum Work {
    Event(SourceEvent),
    Job(Box<Job>),
    /// Install the datapath now, ahead of the first job, while the source is
    /// still reading: loading the programs (the verifier) then overlaps the
    /// reading of the cluster instead of following it. The first job reports it.
    Prepare(Box<crate::config::Settings>),
}

/// What a finished job produced.
pub struct Done {
    pub due: Due,
    pub elapsed: Duration,
    pub result: anyhow::Result<Synced>,
    /// No datapath has been installed yet and installing failed.
    pub never_installed: bool,
}

/// A successful job's results.
pub struct Synced {
    /// `Due::Sync`: what the sync did.
    pub report: Option<SyncReport>,
    /// `Due::Resync`: map entries rewritten because the kernel had drifted.
    pub corrections: usize,
    /// Set when this job installed (or reinstalled) the datapath: how it went.
    pub installed: Option<String>,
    pub health_checks: HealthChecks,
    pub no_local: Vec<(NoLocalLabels, i64)>,
    pub service_ports: usize,
    /// What is refused now: service ports the datapath could not program
    /// (retried with backoff) and objects the planner skipped whole.
    pub refused: Vec<RefusedObject>,
}

/// A refused object, by name, with the reason (`ferry_refused`, `ferry status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedObject {
    /// `ServicePort` or `NodeEntries` (refused by the datapath), `Service`, `EndpointSlice` or `Node` (by the planner).
    pub kind: String,
    pub object: String,
    /// Short and stable: `ferry_services full`, `spec.ports`, ...
    pub cause: String,
    pub reason: String,
}

impl RefusedObject {
    /// Refused by the datapath (retried with backoff), not by the planner.
    pub fn by_datapath(&self) -> bool {
        self.kind == "ServicePort" || self.kind == "NodeEntries"
    }
}

/// Where the agent leaves its refused objects for `ferry status` (bpffs holds no regular files).
pub fn refused_path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "refused")
}

/// `/run/ferry/<what><pin_dir as a tag>.json`: what the agent on `pin_dir` leaves for `ferry status`.
fn run_file(pin_dir: &Path, what: &str) -> PathBuf {
    let tag: String =
        pin_dir.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    PathBuf::from("/run/ferry").join(format!("{what}{tag}.json"))
}

/// The `acceleration` the agent installed with, and the devices `best-effort`
/// left to tc with why (the pinned links show what is attached, not what was asked).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccelerationRecord {
    pub acceleration: String,
    pub fallbacks: Vec<ferry_bpf::acceleration::Fallback>,
}

/// Where the agent leaves its [`AccelerationRecord`].
pub fn acceleration_path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "acceleration")
}

/// Removes what the agent on `pin_dir` left in /run/ferry (with its datapath).
pub fn remove_run_files(pin_dir: &Path) {
    let _ = std::fs::remove_file(refused_path(pin_dir));
    let _ = std::fs::remove_file(acceleration_path(pin_dir));
}

/// The record the agent on `pin_dir` wrote at its last install (None: none
/// (acceleration disabled), or an older agent).
pub fn read_acceleration(pin_dir: &Path) -> Option<AccelerationRecord> {
    std::fs::read_to_string(acceleration_path(pin_dir)).ok().and_then(|t| serde_json::from_str(&t).ok())
}

/// The refused objects the agent on `pin_dir` last wrote (empty if none or no agent).
pub fn read_refused(pin_dir: &Path) -> Vec<RefusedObject> {
    std::fs::read_to_string(refused_path(pin_dir)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

fn refused_now(proxier: &Proxier, plan: Option<&ferry_model::Plan>) -> Vec<RefusedObject> {
    let mut out: Vec<RefusedObject> = proxier
        .refused()
        .iter()
        .map(|r| RefusedObject {
            kind: if r.owner == ferry_bpf::program::NODE_OWNER { "NodeEntries" } else { "ServicePort" }.into(),
            object: r.owner.clone(),
            cause: r.cause.clone(),
            reason: r.reason.clone(),
        })
        .collect();
    for p in plan.iter().flat_map(|p| p.problems.iter()) {
        if p.consequence == ferry_model::Consequence::ObjectSkipped {
            out.push(RefusedObject {
                kind: p.kind.to_string(),
                object: format!("{}/{}", p.object.namespace(), p.object.name()),
                cause: p.field.clone(),
                reason: p.message.clone(),
            });
        }
    }
    out
}

/// Where the datapath goes, beyond the settings (command-line overrides).
#[derive(Debug, Clone, Default)]
pub struct InstallOverrides {
    pub pin_dir: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
}

/// Events sent to the sync thread and not yet read by it, beyond which the
/// agent stops taking events from the source (see `Loop::run`).
pub const MAX_BACKLOG: usize = 4096;

/// A handle on the running sync thread.
pub struct SyncThread {
    jobs: std::sync::mpsc::Sender<Work>,
    /// Events sent and not yet applied to the planner.
    backlog: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl SyncThread {
    /// Starts the thread; finished jobs arrive on `done`. `node` is the
    /// configuration objects are read with (see `Planner::reconfigure`).
    pub fn spawn(
        node: NodeConfig,
        overrides: InstallOverrides,
        view: Arc<DatapathView>,
        done: mpsc::UnboundedSender<Done>,
    ) -> std::io::Result<SyncThread> {
        let (jobs, rx) = std::sync::mpsc::channel::<Work>();
        let backlog = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let applied = backlog.clone();
        let thread = std::thread::Builder::new().name("ferry-sync".into()).spawn(move || {
            let mut worker = Worker {
                overrides,
                view,
                planner: Planner::new(node),
                no_local: NoLocalCounts::default(),
                proxier: None,
                preparing: None,
                prepared: None,
                refused_written: None,
            };
            while let Ok(work) = rx.recv() {
                let job = match work {
                    Work::Event(event) => {
                        worker.apply(event);
                        applied.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Work::Job(job) => *job,
                    Work::Prepare(settings) => {
                        worker.prepare(*settings);
                        continue;
                    }
                };
                let t0 = Instant::now();
                let due = job.due;
                let never_installed = worker.proxier.is_none();
                let result = worker.run(job);
                let never_installed = never_installed && worker.proxier.is_none();
                if done.send(Done { due, elapsed: t0.elapsed(), result, never_installed }).is_err() {
                    break;
                }
            }
        })?;
        Ok(SyncThread { jobs, backlog, thread })
    }

    /// Events sent and not yet applied to the planner.
    pub fn backlog(&self) -> usize {
        self.backlog.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues a job. Fails only if the thread is gone (it panicked).
    pub fn send(&self, job: Job) -> anyhow::Result<()> {
        self.send_work(Work::Job(Box::new(job)))
    }

    /// Installs the datapath ahead of the first job (see [`Work::Prepare`]).
    pub fn prepare(&self, settings: crate::config::Settings) -> anyhow::Result<()> {
        self.send_work(Work::Prepare(Box::new(settings)))
    }

    /// Hands a source event to the planner.
    pub fn event(&self, event: SourceEvent) -> anyhow::Result<()> {
        self.backlog.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send_work(Work::Event(event))
    }

    fn send_work(&self, work: Work) -> anyhow::Result<()> {
        self.jobs.send(work).map_err(|_| anyhow::anyhow!("the sync thread stopped unexpectedly; see the log above"))
    }

    /// Stops the thread after its current job.
    pub fn stop(self) {
        drop(self.jobs);
        let _ = self.thread.join();
    }
}

struct Worker {
    overrides: InstallOverrides,
    view: Arc<DatapathView>,
    planner: Planner,
    /// Follows the planner's Plan (not the datapath's), diff by diff.
    no_local: NoLocalCounts,
    proxier: Option<(Proxier, NodeConfig, PathBuf)>,
    /// A `Work::Prepare` install running on a thread of its own, so that
    /// events keep flowing into the planner meanwhile (queued instead, a
    /// large cluster's objects all waited in the channel: ~600 MB at 100k
    /// services). The first job takes its result.
    preparing: Option<std::thread::JoinHandle<anyhow::Result<Installed>>>,
    /// The install line of a `Work::Prepare`, for the first job to report.
    prepared: Option<String>,
    /// The refused objects last written for `ferry status` (`None`: nothing
    /// written yet, so a previous agent's file is replaced at the first sync).
    refused_written: Option<Vec<RefusedObject>>,
}

/// A datapath just installed: the Proxier, its maps for the counters, where it is pinned, the log line.
struct Installed {
    proxier: Proxier,
    maps: Option<ferry_bpf::Maps>,
    pin_dir: PathBuf,
    line: String,
}

impl Worker {
    /// Starts installing the datapath ahead of the first job (see [`Work::Prepare`]).
    fn prepare(&mut self, settings: Settings) {
        if self.proxier.is_some() || self.preparing.is_some() {
            return;
        }
        let overrides = self.overrides.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-install".into())
            .spawn(move || install_datapath(&overrides, &settings, false));
        match spawned {
            Ok(handle) => self.preparing = Some(handle),
            Err(e) => tracing::debug!("cannot install ahead of the first sync: {e}"),
        }
    }

    /// Waits for a `Work::Prepare` install, if one runs, and keeps its datapath.
    fn take_prepared(&mut self, settings: &Settings) {
        let Some(handle) = self.preparing.take() else { return };
        match handle.join() {
            Ok(Ok(installed)) => {
                tracing::debug!("datapath installed ahead of the first sync");
                *self.view.maps.lock().unwrap_or_else(|p| p.into_inner()) = installed.maps;
                self.proxier = Some((installed.proxier, settings.node.clone(), installed.pin_dir));
                self.prepared = Some(installed.line);
            }
            // The job installs again and reports the error properly.
            Ok(Err(e)) => tracing::debug!("installing ahead of the first sync failed: {e:#}"),
            Err(_) => tracing::warn!("installing ahead of the first sync panicked; installing again"),
        }
    }

    fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Change(change) | SourceEvent::ListItem(change) => self.planner.apply(change),
            SourceEvent::Listed(listing) => {
                let keys = listing.key_set();
                match listing.kind {
                    Kind::Service => self.planner.keep_only_services(|k| keys.contains(k)),
                    Kind::EndpointSlice => self.planner.keep_only_slices(|k| keys.contains(k)),
                    Kind::Node => self.planner.keep_only_nodes(|name| keys.contains(&node_key(name))),
                }
            }
            SourceEvent::Synced | SourceEvent::WatchError { .. } | SourceEvent::Checkpoint(_) => {}
        }
    }

    /// Plans what changed and programs it.
    fn sync(&mut self) -> anyhow::Result<SyncReport> {
        let Some((proxier, _, _)) = self.proxier.as_mut() else { anyhow::bail!("no datapath installed") };
        let t0 = Instant::now();
        let (plan, diff) = self.planner.sync();
        self.no_local.update(&diff);
        let large = diff.added.len() + diff.changed.len() + diff.removed.len() > LARGE_SYNC;
        let report = proxier.sync(plan, &diff, t0.elapsed());
        drop(diff);
        if large {
            // A start-up or a relist leaves the reading and planning garbage
            // in the allocator's free lists: give it back to the kernel now,
            // not at mimalloc's own pace.
            crate::memory::release_now();
        }
        report
    }

    fn run(&mut self, job: Job) -> anyhow::Result<Synced> {
        self.planner.reconfigure(job.settings.node.clone())?;
        self.take_prepared(&job.settings);
        let mut installed = None;
        let current = self.proxier.as_ref().map(|(_, cfg, _)| cfg);
        if current != Some(&job.settings.node) {
            installed = Some(self.install(&job.settings)?);
        }
        let prepared = self.prepared.take();
        if installed.is_none() {
            installed = prepared;
        }
        let (report, corrections) = match job.due {
            // A fresh Proxier has no Plan yet: a resync is a full sync for it.
            Due::Sync => (Some(self.sync()?), 0),
            Due::Resync if installed.is_some() => (Some(self.sync()?), 0),
            Due::Resync => {
                let Some((proxier, _, _)) = self.proxier.as_mut() else { anyhow::bail!("no datapath installed") };
                let expired = proxier.collect_expired_flows();
                if expired > 0 {
                    tracing::debug!(expired, "removed expired connection-tracking entries");
                }
                (None, proxier.resync()?)
            }
        };
        let Some((proxier, _, pin_dir)) = self.proxier.as_mut() else { anyhow::bail!("no datapath installed") };
        if job.due == Due::Resync || installed.is_some() {
            let fill = map_fill(pin_dir);
            if let Some(maps) = &*self.view.maps.lock().unwrap_or_else(|p| p.into_inner()) {
                *self.view.evictions.lock().unwrap_or_else(|p| p.into_inner()) = lru_evictions(maps, &fill);
            }
            *self.view.fill.lock().unwrap_or_else(|p| p.into_inner()) = fill;
            *self.view.nat_entries.lock().unwrap_or_else(|p| p.into_inner()) = Some(proxier.nat_entries() as u64);
        }
        let plan = proxier.plan();
        let refused = refused_now(proxier, plan);
        if self.refused_written.as_ref() != Some(&refused) {
            // Only while something is refused: nothing refused, no file (none left behind).
            let path = refused_path(pin_dir);
            let written = if refused.is_empty() {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            } else {
                std::fs::create_dir_all("/run/ferry").and_then(|()| {
                    let text = serde_json::to_string_pretty(&refused).unwrap_or_default();
                    std::fs::write(&path, text)
                })
            };
            match written {
                Ok(()) => self.refused_written = Some(refused.clone()),
                Err(e) => {
                    tracing::warn!("`ferry status` will not show refused objects: writing {}: {e}", path.display())
                }
            }
        }
        Ok(Synced {
            report,
            corrections,
            installed,
            health_checks: plan.map(HealthChecks::from_plan).unwrap_or_default(),
            no_local: self.no_local.samples(),
            service_ports: plan.map_or(0, |p| p.services.len()),
            refused,
        })
    }

    fn install(&mut self, settings: &Settings) -> anyhow::Result<String> {
        // Drop the old handles first: the new Proxier adopts what is pinned.
        let reinstall = self.proxier.take().is_some();
        *self.view.maps.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let installed = install_datapath(&self.overrides, settings, reinstall)?;
        *self.view.maps.lock().unwrap_or_else(|p| p.into_inner()) = installed.maps;
        self.proxier = Some((installed.proxier, settings.node.clone(), installed.pin_dir));
        Ok(installed.line)
    }
}

/// Installs (or adopts) the datapath `settings` describe.
fn install_datapath(o: &InstallOverrides, settings: &Settings, reinstall: bool) -> anyhow::Result<Installed> {
    let opts = crate::datapath::install_options(settings, o.pin_dir.clone(), o.cgroup.clone())?;
    let (proxier, installed) = Proxier::start(settings, &opts)?;
    let mut maps = None;
    if installed.datapath == "bpf" {
        match ferry_bpf::Maps::open(&opts.pin_dir) {
            Ok(m) => maps = Some(m),
            Err(e) => tracing::warn!("datapath counters will be missing from /metrics: {e}"),
        }
    }
    // Only while accelerating: disabled, no file (none left behind by the many short-lived agents of a lab).
    let path = acceleration_path(&opts.pin_dir);
    if installed.datapath == "bpf" && settings.node.acceleration != ferry_model::Acceleration::Disabled {
        let record = AccelerationRecord {
            acceleration: settings.node.acceleration.to_string(),
            fallbacks: installed.xdp_fallbacks.clone(),
        };
        let text = serde_json::to_string_pretty(&record).unwrap_or_default();
        if let Err(e) = std::fs::create_dir_all("/run/ferry").and_then(|()| std::fs::write(&path, text)) {
            tracing::warn!(
                "`ferry status` will not show why a device runs without XDP: writing {}: {e}",
                path.display()
            );
        }
    } else if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", path.display());
    }
    let devices: Vec<String> = installed.devices.iter().map(|d| format!("{}({:?})", d.name, d.role)).collect();
    let line = format!(
        "datapath {}: pin_dir={} cgroup={} devices={} acceleration={}[{}] adopted={}{} links_updated={} links_attached={}",
        if reinstall { "reinstalled for the node's new addresses" } else { "installed" },
        opts.pin_dir.display(),
        opts.cgroup.display(),
        devices.join(","),
        settings.node.acceleration,
        installed.accelerated.join(","),
        installed.adopted,
        match installed.migrated_from {
            Some(from) => format!(
                " migrated_from_layout={from} to_layout={} retired=[{}]",
                ferry_bpf::layout::LAYOUT,
                installed.retired.join(",")
            ),
            None => String::new(),
        },
        installed.links_updated,
        installed.links_attached,
    );
    Ok(Installed { proxier, maps, pin_dir: opts.pin_dir, line })
}

/// Entries each LRU map evicted, by map name, from the datapath's insert and
/// delete counters and the entries `fill` found ([`ferry_bpf::Maps::lru_evictions`]).
pub fn lru_evictions(maps: &ferry_bpf::Maps, fill: &[MapFill]) -> Vec<(String, u64)> {
    let held = |map: &str| fill.iter().find(|f| f.map == map).map_or(0, |f| f.entries);
    let e = maps.lru_evictions(held("ferry_ct_new"), held("ferry_sock_rev"), held("ferry_affinity"));
    vec![
        ("ferry_ct_new".into(), e.ct_new),
        ("ferry_sock_rev".into(), e.sock_rev),
        ("ferry_affinity".into(), e.affinity),
    ]
}

/// Entries and capacity of every pinned map. Walks each map's keys, so it runs
/// with the periodic resync (which reads the maps anyway), not per scrape.
pub fn map_fill(pin_dir: &Path) -> Vec<MapFill> {
    ferry_bpf::maps::MAP_NAMES
        .iter()
        .filter_map(|name| {
            let map = libbpf_rs::MapHandle::from_pinned_path(pin_dir.join(name)).ok()?;
            Some(MapFill {
                map: name.to_string(),
                entries: map.keys().count() as u64,
                capacity: map.max_entries().into(),
            })
        })
        .collect()
}
