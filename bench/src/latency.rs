//! (a) New-connection latency in the lab: a client pod connects to ClusterIPs
//! (translated by ferry's connect4 hook) and, interleaved connection by
//! connection in the same process, straight to the same backends' pod IPs
//! (the floor). A third arm repeats the direct connections from a process in
//! a sibling cgroup without any ferry program (`direct-nohook`), which shows
//! what the connect4 hook costs a connection it does not translate. Two more
//! (`clusterip+tcx`, `direct+tcx`) repeat the first two while ferry's
//! pod-facing packet program is attached to the node's bridge, which every
//! pod packet crosses: what the per-packet programs cost traffic socket-LB
//! already translated (issue 15: the pass-through fast path).
//!
//! ```text
//! node-a (ferry run, N services)
//!  ├ client pod 10.128.0.10   socket_lb client, in node-a's cgroup (for "direct-nohook": in the cgroup `nohook`)
//!  ├ be0 pod   10.129.0.1-100  socket_lb serve :8080 (endpoint 0 of the 100 sampled services)
//!  └ be1 pod   10.129.1.1-100  socket_lb serve :8080 (endpoint 1)
//! ```

use crate::cluster::{self, Synthetic};
use crate::conn::{Arm, ArmSamples};
use crate::stats::{Summary, summarize};
use anyhow::Context;
use ferry::lab::Lab;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const NODE: usize = 0;
pub const CLIENT_POD: usize = 0;
/// How long one client run may take.
const CLIENT_LIMIT: Duration = Duration::from_secs(300);
/// Servers exit on their own after this long, even if nothing kills them.
const SERVER_LIFETIME_S: u64 = 3600;

/// How many connections to make.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sampling {
    /// Client runs per size; each runs the interleaved in-cgroup arms and the
    /// no-hook arm, in alternating order from round to round.
    pub rounds: usize,
    /// Connections per arm per round.
    pub per_round: usize,
    /// Unrecorded connections per arm before the rounds (fills neighbour caches).
    pub warmup: usize,
    /// Client on CPU 0, both servers on CPU 1 (off by default: while other
    /// work shared the machine it made the tails worse, not better).
    pub pin_cpus: bool,
}

/// One arm's summary.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    pub name: String,
    pub latency: Summary,
    /// Sequential connections per second: count / time spent in this arm's cycles.
    pub conns_per_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub servers: BTreeMap<String, u64>,
}

/// ClusterIP against the floor.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
    pub conns_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub services: usize,
    /// ClusterIPs the `clusterip` arm picks from (one per sampled service).
    pub clusterip_targets: usize,
    /// Pod IPs the direct arms pick from (both endpoints of every sampled service).
    pub direct_targets: usize,
    pub arms: Vec<ArmResult>,
    /// Entries in the socket reverse-translation LRU map (`ferry_sock_rev`)
    /// after all connections: the connect hook records one per translated
    /// TCP connection too, and closing the socket does not remove it.
    pub sock_rev_entries_after: u64,
    /// clusterip / direct.
    pub clusterip_vs_direct: Ratios,
    /// clusterip / direct-nohook.
    pub clusterip_vs_nohook: Ratios,
    /// clusterip+tcx (ferry's packet program on the bridge too) / direct (the floor).
    pub clusterip_tcx_vs_direct: Ratios,
    /// clusterip+tcx / direct-nohook.
    pub clusterip_tcx_vs_nohook: Ratios,
}

/// The arms, in the order of [`LatencyResult::arms`].
const ARMS: [&str; 5] = ["clusterip", "direct", "direct-nohook", "clusterip+tcx", "direct+tcx"];

/// Runs `f` while ferry's pod-facing packet program (`ferry_from_pods`, from
/// the agent's own object, on the agent's pinned maps, so with the
/// pass-through sets the agent filled) is attached at tcx ingress of node-a's
/// bridge, which every pod packet crosses (as with `bpf.podDevices: [br0]`);
/// detached afterwards, also when `f` fails.
fn with_tcx_on_bridge<R>(lab: &Lab, f: impl FnOnce() -> anyhow::Result<R>) -> anyhow::Result<R> {
    let netns = lab.sb.netns_path(&lab.nodes[NODE].host);
    let pin = lab.nodes[NODE].pin_dir.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            let fail = |e: anyhow::Error| drop(ready_tx.send(Err(e)));
            if let Err(e) = enter_netns(&netns) {
                return fail(e);
            }
            let mut storage = std::mem::MaybeUninit::uninit();
            let skel = match ferry_bpf::install::load_packet_programs(&mut storage, &pin) {
                Ok(skel) => skel,
                Err(e) => return fail(e.into()),
            };
            let link = match ferry_bpf::install::attach_tcx_unpinned(&skel.progs.ferry_from_pods, ifindex("br0")) {
                Ok(link) => link,
                Err(e) => return fail(e.into()),
            };
            let _ = ready_tx.send(Ok(()));
            let _ = done_rx.recv();
            drop(link);
        });
        ready_rx.recv().context("the tcx thread ended")?.context("attaching ferry_from_pods to br0")?;
        let out = f();
        let _ = done_tx.send(());
        out
    })
}

/// Moves this thread (only) into the network namespace at `netns`.
fn enter_netns(netns: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    // SAFETY: setns on a valid fd; it changes this thread's namespace only.
    anyhow::ensure!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0, "setns into {}", netns.display());
    Ok(())
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("no NUL in a device name");
    // SAFETY: a NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// Builds the lab: node-a, the client pod and two backend pods running the echo server.
pub fn setup(ferry: &Path, self_exe: &Path, pin_cpus: bool) -> anyhow::Result<Lab> {
    let mut lab = Lab::new("bench", ferry).context("creating the lab")?;
    let node = lab.add_node(cluster::NODE)?;
    lab.add_pod(node, "client", &[IpAddr::V4(cluster::CLIENT_IP)])?;
    for j in 0..2 {
        let pod = lab.add_pod(node, &format!("be{j}"), &cluster::live_addresses(j))?;
        let host = lab.nodes[node].pods[pod].host.clone();
        let cgroup = lab.nodes[node].cgroup.clone();
        let ready = lab.state.join(format!("be{j}.ready"));
        let log = std::fs::File::create(lab.state.join(format!("be{j}.log")))?;
        let mut cmd = lab.sb.command(&host, self_exe);
        cmd.args(["serve", "--listen", &format!("0.0.0.0:{}", cluster::TARGET_PORT), "--name", &format!("be{j}")])
            .arg("--ready")
            .arg(&ready)
            .args(["--lifetime-s", &SERVER_LIFETIME_S.to_string()])
            .args(if pin_cpus { vec!["--cpu", "1"] } else { vec![] })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let pid = lab.sb.spawn_in(&host, Some(&cgroup), cmd)?;
        lab.sb.wait_for_file(pid, &ready, Duration::from_secs(10))?;
    }
    lab.write_node_config(node, &cluster::node_config_yaml())?;
    Ok(lab)
}

/// Runs the client once in the client pod, in `cgroup`.
fn client(
    lab: &Lab,
    self_exe: &Path,
    cgroup: &Path,
    arms: &[Arm],
    count: usize,
    sampling: Sampling,
) -> anyhow::Result<Vec<ArmSamples>> {
    let host = &lab.nodes[NODE].pods[CLIENT_POD].host;
    let mut cmd = Command::new(self_exe);
    // Warm-up only in the first call (count 0), as a run of its own.
    let warmup = if count == 0 { sampling.warmup } else { 0 };
    cmd.arg("client").args(["--count", &count.to_string(), "--warmup", &warmup.to_string()]);
    if sampling.pin_cpus {
        cmd.args(["--cpu", "0"]);
    }
    for a in arms {
        cmd.arg("--arm").arg(a.to_arg());
    }
    let out = lab.sb.run_in_with_timeout(host, Some(cgroup), &mut cmd, CLIENT_LIMIT)?;
    anyhow::ensure!(
        out.status.success(),
        "the client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("reading the client's JSON")
}

fn arm_result(s: &ArmSamples) -> ArmResult {
    let n = s.latency_ns.len();
    ArmResult {
        name: s.name.clone(),
        latency: summarize(&s.latency_ns),
        conns_per_s: if s.cycle_ns_total == 0 { 0.0 } else { n as f64 * 1e9 / s.cycle_ns_total as f64 },
        errors: s.errors,
        first_error: s.first_error.clone(),
        servers: s.servers.clone(),
    }
}

fn ratios(a: &ArmResult, b: &ArmResult) -> Ratios {
    Ratios {
        p50: a.latency.p50_us / b.latency.p50_us,
        p99: a.latency.p99_us / b.latency.p99_us,
        mean: a.latency.mean_us / b.latency.mean_us,
        conns_per_s: a.conns_per_s / b.conns_per_s,
    }
}

/// Measures the three arms while the agent serves `synthetic`. `nohook_cgroup`
/// is a cgroup with no BPF programs attached.
pub fn measure(
    lab: &Lab,
    self_exe: &Path,
    nohook_cgroup: &Path,
    synthetic: &Synthetic,
    sampling: Sampling,
) -> anyhow::Result<LatencyResult> {
    let node_cgroup = lab.nodes[NODE].cgroup.as_path();
    let n = synthetic.services;
    let sampled: Vec<usize> = (0..cluster::SAMPLED).collect();
    let clusterip = Arm {
        name: "clusterip".into(),
        targets: sampled
            .iter()
            .map(|k| {
                SocketAddr::new(Synthetic::cluster_ip(synthetic.sampled_service(*k)).into(), cluster::SERVICE_PORT)
            })
            .collect(),
    };
    // The same backends the ClusterIPs lead to: both endpoints of every sampled service.
    let direct_targets: Vec<SocketAddr> = sampled
        .iter()
        .flat_map(|k| (0..2).map(move |j| SocketAddr::new(cluster::live_endpoint(*k, j).into(), cluster::TARGET_PORT)))
        .collect();
    let direct = Arm { name: "direct".into(), targets: direct_targets.clone() };
    let nohook = Arm { name: "direct-nohook".into(), targets: direct_targets };
    let with_tcx = [
        Arm { name: "clusterip+tcx".into(), targets: clusterip.targets.clone() },
        Arm { name: "direct+tcx".into(), targets: direct.targets.clone() },
    ];
    let in_cgroup = [clusterip, direct];

    eprintln!("[{n}] latency: warm-up ({} connections per arm)", sampling.warmup);
    let nohook = std::slice::from_ref(&nohook);
    client(lab, self_exe, node_cgroup, &in_cgroup, 0, sampling)?;
    client(lab, self_exe, nohook_cgroup, nohook, 0, sampling)?;
    with_tcx_on_bridge(lab, || client(lab, self_exe, node_cgroup, &with_tcx, 0, sampling))?;

    let mut acc: Vec<ArmSamples> =
        ARMS.iter().map(|name| ArmSamples { name: name.to_string(), ..Default::default() }).collect();
    for round in 0..sampling.rounds {
        eprintln!(
            "[{n}] latency: round {}/{} ({} connections per arm)",
            round + 1,
            sampling.rounds,
            sampling.per_round
        );
        let mut got = Vec::new();
        for step in 0..3 {
            let per_round = sampling.per_round;
            match (round + step) % 3 {
                0 => got.extend(client(lab, self_exe, node_cgroup, &in_cgroup, per_round, sampling)?),
                1 => got.extend(client(lab, self_exe, nohook_cgroup, nohook, per_round, sampling)?),
                _ => got.extend(with_tcx_on_bridge(lab, || {
                    client(lab, self_exe, node_cgroup, &with_tcx, per_round, sampling)
                })?),
            }
        }
        for s in got {
            let slot = acc.iter_mut().find(|a| a.name == s.name).context("unknown arm in the client's output")?;
            slot.merge(s);
        }
    }
    let arms: Vec<ArmResult> = acc.iter().map(arm_result).collect();
    for a in &arms {
        anyhow::ensure!(
            a.errors == 0,
            "arm {} had {} failed connections, first: {:?}",
            a.name,
            a.errors,
            a.first_error
        );
        anyhow::ensure!(
            a.servers.len() == 2 && a.servers.contains_key("be0") && a.servers.contains_key("be1"),
            "arm {} was not answered by both backends: {:?}",
            a.name,
            a.servers
        );
        eprintln!(
            "[{n}] latency: {:<14} p50 {:>7.1} us  p99 {:>7.1} us  {:>7.0} conn/s",
            a.name, a.latency.p50_us, a.latency.p99_us, a.conns_per_s
        );
    }
    let sock_rev_entries_after = crate::agent::map_entries(&lab.nodes[NODE].pin_dir, "ferry_sock_rev")?;
    eprintln!("[{n}] latency: ferry_sock_rev holds {sock_rev_entries_after} entries after the run");
    Ok(LatencyResult {
        services: n,
        sock_rev_entries_after,
        clusterip_targets: cluster::SAMPLED,
        direct_targets: 2 * cluster::SAMPLED,
        clusterip_vs_direct: ratios(&arms[0], &arms[1]),
        clusterip_vs_nohook: ratios(&arms[0], &arms[2]),
        clusterip_tcx_vs_direct: ratios(&arms[3], &arms[1]),
        clusterip_tcx_vs_nohook: ratios(&arms[3], &arms[2]),
        arms,
    })
}
