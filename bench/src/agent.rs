//! (c) A real `ferry run` agent serving N services: time to its first sync,
//! its memory (VmRSS / VmHWM from /proc/PID/status), the kernel memory of the
//! BPF maps it programmed, and how long it takes to re-sync after one
//! endpoint changes in its manifest directory.
//!
//! Map memory is the kernel's own figure: `memlock` in `/proc/self/fdinfo/FD`
//! of each pinned map opened by the bench (what `bpftool map show` prints as
//! `memlock`). For maps without preallocation the kernel counts the elements
//! actually stored; preallocated maps (LRU, arrays) count their capacity.

use crate::cluster::{self, Synthetic};
use anyhow::{Context, bail};
use ferry::lab::Lab;
use libbpf_rs::{MapCore, MapHandle};
use serde::Serialize;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// How long an agent may take to program its first sync.
const READY_LIMIT: Duration = Duration::from_secs(600);
/// How long a re-sync after one change may take to show up in the log.
const RESYNC_LIMIT: Duration = Duration::from_secs(300);

/// Heap bytes held by each stage of the agent's sync, measured in the bench
/// process with the counting allocator (see `heap`), following the agent's
/// steps: read the manifest directory, `build_plan`, `Programmer::sync`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeapAttribution {
    /// Highest live heap while reading the manifest directory.
    pub load_peak_bytes: i64,
    /// The ClusterState read from it.
    pub cluster_state_bytes: i64,
    pub plan_bytes: i64,
    /// The Programmer's mirror of the datapath, after the operations are dropped.
    pub programmer_bytes: i64,
    /// The operation list of the full sync (transient).
    pub map_ops_bytes: i64,
    /// What the agent keeps between syncs: the last Plan and the Programmer.
    pub kept_between_syncs_bytes: i64,
}

/// One `synced` line of the agent's log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncLine {
    pub service_ports: u64,
    pub map_ops: u64,
    pub plan_ms: f64,
    pub apply_ms: f64,
}

/// Memory of a process, from /proc/PID/status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcMemory {
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
}

/// One pinned map as the kernel accounts it.
#[derive(Debug, Clone, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub map_type: u32,
    pub max_entries: u64,
    pub entries: u64,
    pub memlock_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentResult {
    pub services: usize,
    pub manifest_bytes: usize,
    /// Spawn to the ready file (install, read manifests, plan, apply).
    pub ready_s: f64,
    pub first_sync: SyncLine,
    pub memory_after_first_sync: ProcMemory,
    pub maps: Vec<MapMemory>,
    pub maps_memlock_total_bytes: u64,
    pub heap: HeapAttribution,
    /// Manifest file renamed into place -> the agent logged its next sync.
    pub one_change_wall_ms: f64,
    pub one_change_sync: SyncLine,
    pub memory_after_one_change: ProcMemory,
}

/// An agent the bench started; stopped (and its datapath removed) by `stop`.
pub struct RunningAgent {
    pub pid: u32,
    log: PathBuf,
    node: usize,
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The `synced` lines of a log so far.
pub fn synced_lines(log: &str) -> Vec<SyncLine> {
    log.lines()
        .filter(|l| l.contains(" synced "))
        .map(|l| SyncLine {
            service_ports: field(l, "service_ports").unwrap_or(0.0) as u64,
            map_ops: field(l, "map_ops").unwrap_or(0.0) as u64,
            plan_ms: field(l, "plan_ms").unwrap_or(f64::NAN),
            apply_ms: field(l, "apply_ms").unwrap_or(f64::NAN),
        })
        .collect()
}

pub fn proc_memory(pid: u32) -> anyhow::Result<ProcMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading the agent's status")?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcMemory { vm_rss_kib: kib("VmRSS:"), vm_hwm_kib: kib("VmHWM:") })
}

/// Kernel memory and fill of every map pinned in `pin_dir`.
pub fn map_memory(pin_dir: &Path) -> anyhow::Result<Vec<MapMemory>> {
    let mut out = Vec::new();
    for name in ferry_bpf::maps::MAP_NAMES {
        let path = pin_dir.join(name);
        let map = MapHandle::from_pinned_path(&path).with_context(|| format!("opening {}", path.display()))?;
        let fd = map.as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let num = |key: &str| -> u64 {
            info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        out.push(MapMemory {
            name: name.to_string(),
            map_type: num("map_type:") as u32,
            max_entries: num("max_entries:"),
            entries: map.keys().count() as u64,
            memlock_bytes: num("memlock:"),
        });
    }
    Ok(out)
}

/// Entries in one pinned map.
pub fn map_entries(pin_dir: &Path, name: &str) -> anyhow::Result<u64> {
    let path = pin_dir.join(name);
    let map = MapHandle::from_pinned_path(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(map.keys().count() as u64)
}

/// Services per manifest file: `ferry run` refuses a file over 64 MiB (a
/// JSON List of 100,000 services is 69 MB), and a change rewrites one file.
const PER_FILE: usize = 20_000;

/// The manifest file holding service `i`, and the services it holds.
fn file_of(synthetic: &Synthetic, i: usize) -> (String, std::ops::Range<usize>) {
    let f = i / PER_FILE;
    (format!("cluster-{f:03}.json"), f * PER_FILE..((f + 1) * PER_FILE).min(synthetic.services))
}

/// Writes one manifest file atomically (a reader never sees half of it).
fn write_file(dir: &std::path::Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.with_extension(format!("{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Replaces the node's manifests with the services of `synthetic` after
/// `changes` one-endpoint changes, as JSON Lists of [`PER_FILE`] services; returns the bytes written.
fn write_manifests(lab: &Lab, node: usize, synthetic: &Synthetic, changes: usize) -> anyhow::Result<usize> {
    let dir = &lab.nodes[node].manifests;
    for e in std::fs::read_dir(dir)?.flatten() {
        std::fs::remove_file(e.path())?;
    }
    let mut bytes = 0;
    for first in (0..synthetic.services).step_by(PER_FILE) {
        let (name, range) = file_of(synthetic, first);
        let text = synthetic.manifest_chunk(range, changes);
        bytes += text.len();
        write_file(dir, &name, &text)?;
    }
    Ok(bytes)
}

/// Starts `ferry run` on `node` with the manifests of `synthetic` and waits for its first sync.
pub fn start(
    lab: &mut Lab,
    node: usize,
    synthetic: &Synthetic,
) -> anyhow::Result<(RunningAgent, usize, f64, SyncLine)> {
    let n = synthetic.services;
    eprintln!("[{n}] agent: writing {n} services as JSON Lists of {PER_FILE}");
    let bytes = write_manifests(lab, node, synthetic, 0)?;
    lab.write_node_config(node, &cluster::node_config_yaml())?;
    let log = lab.state.join(format!("agent-{n}.log"));
    let ready = lab.state.join(format!("agent-{n}.ready"));
    let _ = std::fs::remove_file(&ready);
    let out = std::fs::File::create(&log)?;
    let nd = &lab.nodes[node];
    let mut cmd = lab.sb.command(&nd.host, &lab.ferry);
    cmd.args(["run", "--manifests"])
        .arg(&nd.manifests)
        .arg("--node-config")
        .arg(&nd.config)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let host = nd.host.clone();
    eprintln!("[{n}] agent: starting ferry run ({} MB of manifests)", bytes / 1_000_000);
    let t = Instant::now();
    let pid = lab.sb.spawn_in(&host, None, cmd)?;
    let agent = RunningAgent { pid, log, node };
    if let Err(e) = lab.sb.wait_for_file(pid, &ready, READY_LIMIT) {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        let _ = stop(lab, agent);
        return Err(e).with_context(|| format!("the agent did not get ready; its log:\n{log}"));
    }
    let ready_s = t.elapsed().as_secs_f64();
    let first = synced_lines(&std::fs::read_to_string(&agent.log)?).into_iter().next().unwrap_or_default();
    eprintln!(
        "[{n}] agent: ready after {ready_s:.2} s (plan_ms {:.1}, apply_ms {:.1}, map_ops {})",
        first.plan_ms, first.apply_ms, first.map_ops
    );
    Ok((agent, bytes, ready_s, first))
}

/// Rewrites the manifests with one endpoint changed and times the agent's re-sync.
pub fn one_change(lab: &Lab, agent: &RunningAgent, synthetic: &Synthetic) -> anyhow::Result<(f64, SyncLine)> {
    let n = synthetic.services;
    let (name, range) = file_of(synthetic, synthetic.changed_service());
    let text = synthetic.manifest_chunk(range, 1);
    let before = synced_lines(&std::fs::read_to_string(&agent.log)?).len();
    eprintln!("[{n}] agent: one endpoint changed in the manifest; waiting for the re-sync");
    let t = Instant::now();
    write_file(&lab.nodes[agent.node].manifests, &name, &text)?;
    while t.elapsed() < RESYNC_LIMIT {
        let lines = synced_lines(&std::fs::read_to_string(&agent.log)?);
        if lines.len() > before {
            let wall = t.elapsed().as_secs_f64() * 1e3;
            let line = lines[before].clone();
            eprintln!(
                "[{n}] agent: re-synced {wall:.0} ms after the change (plan_ms {:.1}, apply_ms {:.2}, map_ops {})",
                line.plan_ms, line.apply_ms, line.map_ops
            );
            return Ok((wall, line));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the agent did not re-sync within {RESYNC_LIMIT:?}")
}

/// Kills the agent and removes the datapath it pinned.
pub fn stop(lab: &mut Lab, agent: RunningAgent) -> anyhow::Result<()> {
    lab.sb.kill(agent.pid)?;
    ferry_bpf::uninstall(&lab.nodes[agent.node].pin_dir)?;
    Ok(())
}

/// Replays the agent's first sync in this process with the counting allocator on.
pub fn heap_attribution(manifests: &Path, cfg: &ferry_model::NodeConfig) -> anyhow::Result<HeapAttribution> {
    let rt = crate::programming::runtime()?;
    crate::heap::start();
    let result = (|| {
        let state = ferry::cli::load_manifests(manifests)?;
        let load_peak_bytes = crate::heap::peak_bytes();
        let cluster_state_bytes = crate::heap::live_bytes();
        let plan = ferry_model::build_plan(&state, cfg);
        let plan_bytes = crate::heap::live_bytes() - cluster_state_bytes;
        let mut programmer = ferry_bpf::Programmer::new();
        let ops = programmer.sync(&plan, None, &rt);
        let with_ops = crate::heap::live_bytes() - cluster_state_bytes - plan_bytes;
        drop(ops);
        let programmer_bytes = crate::heap::live_bytes() - cluster_state_bytes - plan_bytes;
        drop(state);
        let kept_between_syncs_bytes = crate::heap::live_bytes();
        drop((plan, programmer));
        anyhow::Ok(HeapAttribution {
            load_peak_bytes,
            cluster_state_bytes,
            plan_bytes,
            programmer_bytes,
            map_ops_bytes: with_ops - programmer_bytes,
            kept_between_syncs_bytes,
        })
    })();
    crate::heap::stop();
    result
}
