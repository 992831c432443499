//! The measurement: in every datapath's lab, the four arms interleaved
//! connection by connection (new connections) and request by request (one
//! held connection per arm); the labs take turns round by round, in
//! alternating order, so a slow minute of the machine hits every datapath.

use super::cluster::{ArmSpec, CLIENT, CLIENT_IP, COMPARISONS, Datapath, NodePortLab};
use crate::conn::{Arm, ArmSamples};
use crate::stats::{Summary, summarize};
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long one client run may take.
const CLIENT_LIMIT: Duration = Duration::from_secs(300);
/// Unrecorded requests at the start of each held-connection run.
const HELD_WARMUP: usize = 50;
/// A new connection this slow lost a packet: a lost SYN is resent after 1 s.
const SLOW_NS: u64 = 500_000_000;

/// How many connections and requests to make.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sampling {
    /// Turns per datapath: each is one new-connection run and one held-connection run.
    pub rounds: usize,
    /// New connections per arm in each round.
    pub per_round: usize,
    /// Requests per arm on the held connections in each round.
    pub requests_per_round: usize,
    /// Unrecorded new connections per arm before the rounds (fills neighbour caches).
    pub warmup: usize,
}

/// One arm's summary.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    pub name: String,
    /// Through a NodePort (else straight to the pod: a floor).
    pub translated: bool,
    /// The pod that answered.
    pub pod: String,
    /// The source address the pod saw (the client's, or node-a's after SNAT).
    pub source_seen: String,
    /// socket() -> reply on a new connection.
    pub connect: Summary,
    /// New connections that took over 500 ms (a lost SYN or reply, resent after 1 s).
    pub connect_over_500ms: usize,
    /// New connections with no reply within 2 s (not in `connect`, not timed).
    pub connect_failed: u64,
    pub first_failure: Option<String>,
    /// Sequential new connections per second: count / time in this arm's full cycles.
    pub conns_per_s: f64,
    /// One request/reply on a held connection.
    pub request: Summary,
    /// Held connections that broke (their remaining requests were not made).
    pub held_failed: u64,
    /// Sequential requests per second on one held connection: count / time in its exchanges.
    pub requests_per_s: f64,
}

/// An arm against a floor (see `cluster::COMPARISONS`).
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub arm: String,
    pub floor: String,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub conns_per_s: f64,
    pub request_p50: f64,
    pub requests_per_s: f64,
}

/// Everything measured on one datapath.
#[derive(Debug, Clone, Serialize)]
pub struct DatapathResult {
    pub datapath: Datapath,
    pub arms: Vec<ArmResult>,
    pub ratios: Vec<Ratios>,
    /// node-a's BPF datapath counters after the run (empty for nftables).
    pub node_a_counters: BTreeMap<String, u64>,
    /// node-a's SNATed flows in the BPF conntrack after the run (`natEntries`; 0 for nftables).
    pub node_a_nat_entries: u64,
}

/// Runs the bench binary's client once in the lab's outside client host.
fn client(
    np: &NodePortLab,
    self_exe: &Path,
    arms: &[Arm],
    count: usize,
    warmup: usize,
    held: bool,
) -> anyhow::Result<Vec<ArmSamples>> {
    let lab = &np.lab;
    let mut cmd = Command::new(self_exe);
    cmd.arg("client").args(["--count", &count.to_string(), "--warmup", &warmup.to_string()]);
    if held {
        cmd.arg("--held");
    }
    for a in arms {
        cmd.arg("--arm").arg(a.to_arg());
    }
    let out = lab.sb.run_in_with_timeout(&lab.externals[CLIENT].host, None, &mut cmd, CLIENT_LIMIT)?;
    anyhow::ensure!(
        out.status.success(),
        "the client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("reading the client's JSON")
}

/// Accumulated samples of one lab.
struct Acc {
    connect: Vec<ArmSamples>,
    held: Vec<ArmSamples>,
}

fn merge(into: &mut [ArmSamples], got: Vec<ArmSamples>) -> anyhow::Result<()> {
    for s in got {
        let slot = into.iter_mut().find(|a| a.name == s.name).context("unknown arm in the client's output")?;
        slot.merge(s);
    }
    Ok(())
}

/// The one server that answered an arm, and the source it saw; an error unless it is `spec`'s pod.
/// Failed connections are not an error here: they are counted and reported.
fn answered_by(what: &str, s: &ArmSamples, spec: &ArmSpec) -> anyhow::Result<(String, String)> {
    let servers: Vec<&String> = s.servers.keys().collect();
    anyhow::ensure!(servers.len() == 1, "{what}: answered by more than one pod or source: {:?}", s.servers);
    let (pod, source) = servers[0].split_once(' ').unwrap_or((servers[0].as_str(), "?"));
    anyhow::ensure!(pod == spec.pod.name, "{what}: answered by pod {pod}, not {}", spec.pod.name);
    if !spec.translated {
        anyhow::ensure!(source == CLIENT_IP.to_string(), "{what}: the pod saw {source}, not the client {CLIENT_IP}");
    }
    Ok((pod.to_string(), source.to_string()))
}

fn rate(s: &ArmSamples) -> f64 {
    if s.cycle_ns_total == 0 { 0.0 } else { s.latency_ns.len() as f64 * 1e9 / s.cycle_ns_total as f64 }
}

fn result(np: &NodePortLab, acc: &Acc) -> anyhow::Result<DatapathResult> {
    let dp = np.datapath.name();
    let mut arms = Vec::new();
    for ((_, spec), (c, h)) in np.arms().iter().zip(acc.connect.iter().zip(&acc.held)) {
        let (pod, source_seen) = answered_by(&format!("{dp} {} new connections", c.name), c, spec)?;
        let (held_pod, held_source) = answered_by(&format!("{dp} {} held connection", h.name), h, spec)?;
        anyhow::ensure!(
            (&held_pod, &held_source) == (&pod, &source_seen),
            "{dp} {}: the held connection reached {held_pod} from {held_source}, new connections {pod} from {source_seen}",
            c.name
        );
        arms.push(ArmResult {
            name: c.name.clone(),
            translated: spec.translated,
            pod,
            source_seen,
            connect: summarize(&c.latency_ns),
            connect_over_500ms: c.latency_ns.iter().filter(|ns| **ns >= SLOW_NS).count(),
            connect_failed: c.errors,
            first_failure: c.first_error.clone().or_else(|| h.first_error.clone()),
            conns_per_s: rate(c),
            request: summarize(&h.latency_ns),
            held_failed: h.errors,
            requests_per_s: rate(h),
        });
    }
    let mut ratios = Vec::new();
    for (arm, floor) in COMPARISONS {
        let find = |name: &str| arms.iter().find(|a| a.name == name).context("a compared arm is missing");
        let (a, f) = (find(arm)?, find(floor)?);
        ratios.push(Ratios {
            arm: arm.to_string(),
            floor: floor.to_string(),
            p50: a.connect.p50_us / f.connect.p50_us,
            p90: a.connect.p90_us / f.connect.p90_us,
            p99: a.connect.p99_us / f.connect.p99_us,
            mean: a.connect.mean_us / f.connect.mean_us,
            conns_per_s: a.conns_per_s / f.conns_per_s,
            request_p50: a.request.p50_us / f.request.p50_us,
            requests_per_s: a.requests_per_s / f.requests_per_s,
        });
    }
    let (node_a_counters, node_a_nat_entries) = np.status()?;
    Ok(DatapathResult { datapath: np.datapath, arms, ratios, node_a_counters, node_a_nat_entries })
}

/// Measures every lab: warm-up, then `rounds` turns per lab.
pub fn measure(labs: &[NodePortLab], self_exe: &Path, sampling: Sampling) -> anyhow::Result<Vec<DatapathResult>> {
    let arms: Vec<Vec<Arm>> = labs.iter().map(|np| np.arms().into_iter().map(|(a, _)| a).collect()).collect();
    let mut acc: Vec<Acc> = arms
        .iter()
        .map(|arms| {
            let empty = || arms.iter().map(|a| ArmSamples { name: a.name.clone(), ..Default::default() }).collect();
            Acc { connect: empty(), held: empty() }
        })
        .collect();
    for (np, arms) in labs.iter().zip(&arms) {
        eprintln!("nodeport: {}: warm-up ({} connections per arm)", np.datapath.name(), sampling.warmup);
        // Failures here show up again, with their reason, in the recorded rounds.
        client(np, self_exe, arms, 0, sampling.warmup, false)?;
        client(np, self_exe, arms, 0, HELD_WARMUP, true)?;
    }
    for round in 0..sampling.rounds {
        let mut order: Vec<usize> = (0..labs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let np = &labs[i];
            eprintln!(
                "nodeport: round {}/{}: {} ({} connections, {} requests per arm)",
                round + 1,
                sampling.rounds,
                np.datapath.name(),
                sampling.per_round,
                sampling.requests_per_round
            );
            let got = client(np, self_exe, &arms[i], sampling.per_round, 0, false)?;
            merge(&mut acc[i].connect, got)?;
            let got = client(np, self_exe, &arms[i], sampling.requests_per_round, HELD_WARMUP, true)?;
            merge(&mut acc[i].held, got)?;
        }
    }
    let mut out = Vec::new();
    for (np, acc) in labs.iter().zip(&acc) {
        let r = result(np, acc)?;
        for a in &r.arms {
            eprintln!(
                "nodeport: {:<8} {:<19} p50 {:>7.1} us  p99 {:>7.1} us  over 500 ms {:>3}  failed {:>3}  {:>6.0} conn/s  {:>6.0} req/s  (pod {} saw {})",
                np.datapath.name(),
                a.name,
                a.connect.p50_us,
                a.connect.p99_us,
                a.connect_over_500ms,
                a.connect_failed,
                a.conns_per_s,
                a.requests_per_s,
                a.pod,
                a.source_seen
            );
        }
        out.push(r);
    }
    Ok(out)
}
