//! The incremental control plane at scale (issue #11's targets), ferry's
//! eBPF datapath only; the peers' rule layouts are measured by `control_plane`.
//!
//! ```text
//! in-process   events -> Planner::apply | Planner::sync | Programmer::sync | Maps::apply   (a real pinned datapath)
//!              full sync from empty maps; one endpoint change, p50/p99 over many; heap kept per service
//! ferry run    a chunked manifest directory in a lab node: start to ready, RSS (after ready, peak),
//!              one endpoint change file-rewrite -> datapath (ready file), p50/p99
//! ```

use crate::cluster::{self, Synthetic};
use crate::heap;
use crate::programming::{PinnedDatapath, runtime};
use crate::stats::{Summary, summarize};
use anyhow::Context;
use ferry::lab::Lab;
use ferry_bpf::Programmer;
use ferry_model::{NodeConfig, Planner};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Services per manifest file of the chunked directory (at most 1,000 files).
fn chunk(n: usize) -> usize {
    (n / 1000).max(1)
}

#[derive(Debug, Clone, Serialize)]
pub struct InProcess {
    pub services: usize,
    /// Feeding every Service and EndpointSlice event to the planner.
    pub apply_events_ms: f64,
    pub plan_ms: f64,
    pub program_ms: f64,
    pub maps_ms: f64,
    /// plan + program + maps: an empty datapath brought to N services.
    pub full_sync_ms: f64,
    pub full_sync_us_per_service: f64,
    pub map_ops: usize,
    /// One endpoint change: event applied, planned, programmed, written to the maps (ns).
    pub one_change: Summary,
    pub one_change_map_ops: usize,
    /// Heap the planner and the programmer keep after the full sync.
    pub kept_heap_bytes: i64,
    /// Of which the planner (compact objects, claims, the Plan).
    pub planner_heap_bytes: i64,
    pub kept_heap_bytes_per_service: f64,
    /// Highest heap while feeding the events and syncing, over what is kept after.
    pub startup_peak_ratio: f64,
}

/// Roughly what a full sync's diff holds on its own (one pointer per added port).
fn diff_bytes(diff: &ferry_model::PlanDiff) -> i64 {
    (diff.added.capacity() * std::mem::size_of::<usize>()) as i64
}

/// Runs the in-process measurement for one size. Counting heap needs the
/// binary to install `heap::CountingAlloc`.
pub fn in_process(
    synthetic: &Synthetic,
    cfg: &NodeConfig,
    pin_dir: PathBuf,
    cgroup: &Path,
    changes: usize,
) -> anyhow::Result<InProcess> {
    let n = synthetic.services;
    let dp = PinnedDatapath::install(pin_dir, cgroup)?;
    let rt = runtime()?;
    // Memory first, in a pass of its own: the counting allocator slows every
    // allocation, so the timed pass below runs with it off.
    let (kept_heap_bytes, planner_heap_bytes, startup_peak_ratio) = {
        heap::start();
        let base = heap::live_bytes();
        let mut planner = Planner::new(cfg.clone());
        for i in 0..n {
            planner.apply(Synthetic::service_change(i)?);
            planner.apply(synthetic.slice_change(i, 0)?);
        }
        let (plan, diff) = planner.sync();
        let planner_heap_bytes = heap::live_bytes() - base - diff_bytes(&diff);
        let mut programmer = Programmer::new();
        // The batch, as the agent builds it (not flattened into one list of operations).
        let ops = programmer.sync_batch(&plan, None, &rt);
        drop((ops, diff, plan));
        let kept = heap::live_bytes() - base;
        let peak_ratio = (heap::peak_bytes() - base) as f64 / kept.max(1) as f64;
        heap::stop();
        drop((planner, programmer));
        (kept, planner_heap_bytes, peak_ratio)
    };
    let t = Instant::now();
    let mut planner = Planner::new(cfg.clone());
    for i in 0..n {
        planner.apply(Synthetic::service_change(i)?);
        planner.apply(synthetic.slice_change(i, 0)?);
    }
    let apply_events_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let (plan, diff) = planner.sync();
    let plan_ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(plan.problems.is_empty(), "the synthetic cluster has problems: {:?}", &plan.problems[..1]);
    let t = Instant::now();
    let mut programmer = Programmer::new();
    let ops = programmer.sync_batch(&plan, None, &rt);
    let program_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    // As the agent does: each service port on its own.
    let refused = dp.maps.apply_batch(&ops);
    anyhow::ensure!(refused.is_empty(), "applying the full state refused {:?}", &refused[..1]);
    let maps_ms = t.elapsed().as_secs_f64() * 1e3;
    let map_ops = ops.len();
    drop((ops, diff, plan));
    let full_sync_ms = plan_ms + program_ms + maps_ms;
    eprintln!(
        "[{n}] in-process: events {apply_events_ms:.0} ms; full sync {full_sync_ms:.0} ms (plan {plan_ms:.0}, program {program_ms:.0}, maps {maps_ms:.0}); kept heap {:.0} B/service (planner {:.0})",
        kept_heap_bytes as f64 / n as f64,
        planner_heap_bytes as f64 / n as f64
    );

    let mut samples = Vec::with_capacity(changes);
    let mut one_change_map_ops = 0;
    for rep in 1..=changes {
        let change = synthetic.endpoint_change(rep)?;
        let t = Instant::now();
        planner.apply(change);
        let (plan, diff) = planner.sync();
        let ops = programmer.sync_batch(&plan, Some(&diff), &rt);
        let refused = dp.maps.apply_batch(&ops);
        anyhow::ensure!(refused.is_empty(), "applying one endpoint change refused {:?}", &refused[..1]);
        samples.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(diff.changed.len() == 1, "one endpoint change changed {} service ports", diff.changed.len());
        one_change_map_ops = ops.len();
    }
    let one_change = summarize(&samples);
    eprintln!(
        "[{n}] in-process: one endpoint change p50 {:.1} us, p99 {:.1} us ({changes} changes, {one_change_map_ops} map ops)",
        one_change.p50_us, one_change.p99_us
    );
    Ok(InProcess {
        services: n,
        apply_events_ms,
        plan_ms,
        program_ms,
        maps_ms,
        full_sync_ms,
        full_sync_us_per_service: full_sync_ms * 1e3 / n as f64,
        map_ops,
        one_change,
        one_change_map_ops,
        kept_heap_bytes,
        planner_heap_bytes,
        kept_heap_bytes_per_service: kept_heap_bytes as f64 / n as f64,
        startup_peak_ratio,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct RunAgent {
    pub services: usize,
    pub manifest_files: usize,
    pub manifest_bytes: u64,
    /// Process start to the ready file's first `synced` line.
    pub start_to_ready_s: f64,
    pub rss_after_ready_kib: u64,
    /// VmHWM: the highest RSS so far (start-up included).
    pub peak_rss_kib: u64,
    pub rss_after_changes_kib: u64,
    /// One chunk file rewritten (one endpoint changed) to the ready file saying it is programmed (ns).
    pub file_change_to_datapath: Summary,
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// The input time of the ready file's `synced` line.
fn synced_input(ready: &Path) -> Option<u128> {
    let text = std::fs::read_to_string(ready).ok()?;
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["synced", _, t] => t.parse().ok(),
        _ => None,
    }
}

fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.with_extension(format!("{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Runs `ferry run` on a chunked manifest directory of the size in `lab`'s node `node`.
pub fn run_agent(lab: &mut Lab, node: usize, synthetic: &Synthetic, changes: usize) -> anyhow::Result<RunAgent> {
    let n = synthetic.services;
    let size = chunk(n);
    let dir = lab.nodes[node].manifests.clone();
    for entry in std::fs::read_dir(&dir)? {
        std::fs::remove_file(entry?.path())?;
    }
    let mut manifest_bytes = 0;
    let files = n.div_ceil(size);
    eprintln!("[{n}] ferry run: writing {files} manifest files");
    for f in 0..files {
        let text = synthetic.manifest_chunk(f * size..((f + 1) * size).min(n), 0);
        manifest_bytes += text.len() as u64;
        std::fs::write(dir.join(format!("chunk-{f:04}.json")), text)?;
    }
    // kube-proxy's default minSyncPeriod (1 s) would make every change wait for the
    // previous sync's period; 10 ms batches bursts and lets a lone change through.
    lab.write_node_config(node, &format!("{}minSyncPeriod: 10ms\n", cluster::node_config_yaml()))?;
    let t = Instant::now();
    lab.start_agent(node)?;
    let ready = lab.ready_file(node);
    anyhow::ensure!(synced_input(&ready).is_some(), "the agent's first sync failed:\n{}", lab.agent_log(node));
    let start_to_ready_s = t.elapsed().as_secs_f64();
    let pid = lab.agent_pid(node).context("the agent is not running")?;
    let after_ready = crate::agent::proc_memory(pid)?;
    eprintln!(
        "[{n}] ferry run: ready in {start_to_ready_s:.2} s, RSS {} MiB (peak {} MiB)",
        after_ready.vm_rss_kib / 1024,
        after_ready.vm_hwm_kib / 1024
    );

    let changed = synthetic.changed_service();
    let file = changed / size;
    let name = format!("chunk-{file:04}.json");
    let mut samples = Vec::with_capacity(changes);
    for rep in 1..=changes {
        let text = synthetic.manifest_chunk(file * size..((file + 1) * size).min(n), rep);
        std::thread::sleep(crate::api_agent::IDLE_GAP);
        let before = SystemTime::now();
        let t = Instant::now();
        write_atomically(&dir, &name, &text)?;
        let limit = Duration::from_secs(30);
        loop {
            if synced_input(&ready).is_some_and(|i| i > nanos(before)) {
                samples.push(t.elapsed().as_nanos() as u64);
                break;
            }
            anyhow::ensure!(
                t.elapsed() < limit,
                "change {rep} was not programmed within {limit:?}:\n{}",
                lab.agent_log(node)
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let file_change_to_datapath = summarize(&samples);
    let after_changes = crate::agent::proc_memory(pid)?;
    eprintln!(
        "[{n}] ferry run: file change to datapath p50 {:.1} ms, p99 {:.1} ms; RSS after {changes} changes {} MiB",
        file_change_to_datapath.p50_us / 1e3,
        file_change_to_datapath.p99_us / 1e3,
        after_changes.vm_rss_kib / 1024
    );
    lab.kill_agent(node)?;
    Ok(RunAgent {
        services: n,
        manifest_files: files,
        manifest_bytes,
        start_to_ready_s,
        rss_after_ready_kib: after_ready.vm_rss_kib,
        peak_rss_kib: after_ready.vm_hwm_kib,
        rss_after_changes_kib: after_changes.vm_rss_kib,
        file_change_to_datapath,
    })
}

/// Full sync and one change for a cluster shape other than 2 endpoints per
/// service: `services` × `endpoints` (slices of at most 100 endpoints, as the
/// EndpointSlice controller cuts them).
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub full_sync_ms: f64,
    pub map_ops: usize,
    pub one_change: Summary,
}

fn shape_events(i: usize, endpoints: usize, changes: usize) -> anyhow::Result<Vec<ferry_model::StateChange>> {
    use serde_json::json;
    let name = format!("shape-{i:06}");
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)) + i as u32).to_string();
    let svc = json!({"metadata": {"name": name, "namespace": cluster::NAMESPACE},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}});
    let mut out = vec![ferry_model::StateChange::ServiceApplied(Box::new(serde_json::from_value(svc)?))];
    for (s, first) in (0..endpoints).step_by(100).enumerate() {
        let eps: Vec<_> = (first..(first + 100).min(endpoints))
            .map(|e| {
                // Endpoint 0 of the service moves with each change.
                let n = if e == 0 { 16_000_000 + changes } else { i * endpoints + e };
                let addr = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + n as u32);
                json!({"addresses": [addr.to_string()], "nodeName": cluster::REMOTE_NODE})
            })
            .collect();
        let slice = json!({"metadata": {"name": format!("{name}-{s}"), "namespace": cluster::NAMESPACE,
                                        "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": 8080}]});
        out.push(ferry_model::StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice)?)));
        if changes > 0 {
            break; // only the first slice holds endpoint 0
        }
    }
    Ok(out)
}

/// Runs one shape in-process on a pinned datapath.
pub fn shape(
    services: usize,
    endpoints: usize,
    cfg: &NodeConfig,
    pin_dir: PathBuf,
    cgroup: &Path,
    changes: usize,
) -> anyhow::Result<Shape> {
    // Sized as an operator would set `maps.backends` / `maps.slots` for this
    // cluster: each endpoint is a backend and a slot (two revisions of the
    // slots of the service that changes).
    let entries = u32::try_from(services * endpoints).unwrap_or(u32::MAX);
    let room = entries.saturating_add(entries / 4).next_power_of_two();
    let capacities = if entries > 400_000 {
        vec![("ferry_backends".to_string(), room), ("ferry_slots".to_string(), room)]
    } else {
        Vec::new()
    };
    let dp = PinnedDatapath::install_sized(pin_dir, cgroup, capacities)?;
    let rt = runtime()?;
    let mut planner = Planner::new(cfg.clone());
    for i in 0..services {
        for e in shape_events(i, endpoints, 0)? {
            planner.apply(e);
        }
    }
    let t = Instant::now();
    let (plan, _) = planner.sync();
    let mut programmer = Programmer::new();
    let ops = programmer.sync(&plan, None, &rt);
    dp.maps.apply(&ops).map_err(|e| anyhow::anyhow!("applying the full state of {services} x {endpoints}: {e}"))?;
    let full_sync_ms = t.elapsed().as_secs_f64() * 1e3;
    let map_ops = ops.len();
    drop((ops, plan));
    let mut samples = Vec::with_capacity(changes);
    for rep in 1..=changes {
        let events = shape_events(services / 2, endpoints, rep)?;
        let t = Instant::now();
        for e in events.into_iter().skip(1) {
            planner.apply(e);
        }
        let (plan, diff) = planner.sync();
        let ops = programmer.sync_batch(&plan, Some(&diff), &rt);
        let refused = dp.maps.apply_batch(&ops);
        anyhow::ensure!(refused.is_empty(), "applying one endpoint change refused {:?}", &refused[..1]);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let one_change = summarize(&samples);
    eprintln!(
        "[{services} x {endpoints}] in-process: full sync {full_sync_ms:.0} ms, one change p50 {:.1} us, p99 {:.1} us",
        one_change.p50_us, one_change.p99_us
    );
    Ok(Shape { services, endpoints_per_service: endpoints, full_sync_ms, map_ops, one_change })
}
