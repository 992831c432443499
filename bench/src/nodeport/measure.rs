//! The measurement: in every variant's lab, the arms interleaved connection
//! by connection (new connections) and request by request (one held
//! connection per arm); the labs take turns round by round, in alternating
//! order, so a slow minute of the machine hits every variant. Besides the
//! pooled percentiles, each round's p50 of every arm is kept: the median over
//! rounds of an arm's p50 against its floor's is the ratio least moved by a
//! slow round.

use super::cluster::{ArmSpec, CLIENT, CLIENT_IP, COMPARISONS, NODE_A, NODE_B, NodePortLab, Variant};
use crate::conn::{Arm, ArmSamples};
use crate::stats::{Summary, median, percentile, summarize};
use anyhow::Context;
use serde::{Deserialize, Serialize};
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
    /// The CPU the client and the servers run on (None: unpinned).
    pub pin_cpu: Option<usize>,
}

/// One arm's summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Each round's p50 of new connections, µs.
    pub connect_round_p50_us: Vec<f64>,
    /// Each round's p50 of held-connection requests, µs.
    pub request_round_p50_us: Vec<f64>,
    /// New-connection latency at the percentiles of [`CDF_PERCENTILES`], µs (for the charts).
    pub connect_cdf_us: Vec<f64>,
    /// Held-connection request latency at the percentiles of [`CDF_PERCENTILES`], µs.
    pub request_cdf_us: Vec<f64>,
}

/// Where the charts sample each latency distribution: every percent, and the tail finer.
pub const CDF_PERCENTILES: [f64; 104] = {
    let mut p = [0.0; 104];
    let mut i = 0;
    while i < 100 {
        p[i] = (i + 1) as f64 * 0.99; // 0.99 .. 99.0
        i += 1;
    }
    p[100] = 99.5;
    p[101] = 99.8;
    p[102] = 99.9;
    p[103] = 100.0;
    p
};

fn cdf(ns: &[u64]) -> Vec<f64> {
    let mut v = ns.to_vec();
    v.sort_unstable();
    CDF_PERCENTILES.iter().map(|p| percentile(&v, *p) as f64 / 1e3).collect()
}

/// An arm against a floor (see `cluster::COMPARISONS`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratios {
    pub arm: String,
    pub floor: String,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub conns_per_s: f64,
    pub request_p50: f64,
    pub request_p99: f64,
    pub requests_per_s: f64,
    /// Median over rounds of (the arm's round p50 / the floor's round p50), new connections.
    pub p50_round_median: f64,
    /// The same for held-connection requests.
    pub request_p50_round_median: f64,
}

/// Everything measured on one variant (a datapath; for BPF, a mode and an acceleration).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatapathResult {
    /// `bpf`, `bpf-dsr`, `bpf-xdp`, `bpf-dsr-xdp`, `nftables`.
    pub name: String,
    #[serde(flatten)]
    pub variant: Variant,
    pub arms: Vec<ArmResult>,
    pub ratios: Vec<Ratios>,
    /// The UDP flood (`super::flood`); absent when the run left it out.
    pub flood: Option<super::flood::FloodResult>,
    /// node-a's BPF datapath counters after the run (empty for nftables).
    pub node_a_counters: BTreeMap<String, u64>,
    /// node-a's SNATed flows in the BPF conntrack after the run (`natEntries`; 0 for nftables).
    pub node_a_nat_entries: u64,
    /// node-b's BPF datapath counters after the run (DSR: `dsr_decap`).
    pub node_b_counters: BTreeMap<String, u64>,
}

/// Runs the bench binary's client once in the lab's outside client host.
fn client(
    np: &NodePortLab,
    self_exe: &Path,
    arms: &[Arm],
    (count, warmup, held): (usize, usize, bool),
    pin_cpu: Option<usize>,
) -> anyhow::Result<Vec<ArmSamples>> {
    let lab = &np.lab;
    let mut cmd = Command::new(self_exe);
    cmd.arg("client").args(["--count", &count.to_string(), "--warmup", &warmup.to_string()]);
    if let Some(cpu) = pin_cpu {
        cmd.arg(format!("--cpu={cpu}"));
    }
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

/// Accumulated samples of one lab, and each round's p50 per arm (µs).
struct Acc {
    connect: Vec<ArmSamples>,
    held: Vec<ArmSamples>,
    connect_rounds: BTreeMap<String, Vec<f64>>,
    held_rounds: BTreeMap<String, Vec<f64>>,
}

fn merge(into: &mut [ArmSamples], rounds: &mut BTreeMap<String, Vec<f64>>, got: Vec<ArmSamples>) -> anyhow::Result<()> {
    for s in got {
        let slot = into.iter_mut().find(|a| a.name == s.name).context("unknown arm in the client's output")?;
        rounds.entry(s.name.clone()).or_default().push(summarize(&s.latency_ns).p50_us);
        slot.merge(s);
    }
    Ok(())
}

/// Median over rounds of arm / floor (rounds where either has no sample are left out).
fn round_ratio(arm: &[f64], floor: &[f64]) -> f64 {
    let r: Vec<f64> = arm.iter().zip(floor).filter(|(a, f)| **a > 0.0 && **f > 0.0).map(|(a, f)| a / f).collect();
    median(&r)
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
    if let Some(want) = spec.sees {
        anyhow::ensure!(source == want.to_string(), "{what}: the pod saw {source}, not {want}");
    }
    Ok((pod.to_string(), source.to_string()))
}

fn rate(s: &ArmSamples) -> f64 {
    if s.cycle_ns_total == 0 { 0.0 } else { s.latency_ns.len() as f64 * 1e9 / s.cycle_ns_total as f64 }
}

fn result(np: &NodePortLab, acc: &Acc) -> anyhow::Result<DatapathResult> {
    let dp = np.variant.name();
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
            connect_round_p50_us: acc.connect_rounds.get(&c.name).cloned().unwrap_or_default(),
            request_round_p50_us: acc.held_rounds.get(&h.name).cloned().unwrap_or_default(),
            connect_cdf_us: cdf(&c.latency_ns),
            request_cdf_us: cdf(&h.latency_ns),
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
            request_p99: a.request.p99_us / f.request.p99_us,
            requests_per_s: a.requests_per_s / f.requests_per_s,
            p50_round_median: round_ratio(&a.connect_round_p50_us, &f.connect_round_p50_us),
            request_p50_round_median: round_ratio(&a.request_round_p50_us, &f.request_round_p50_us),
        });
    }
    let mut r = DatapathResult {
        name: np.variant.name(),
        variant: np.variant,
        arms,
        ratios,
        flood: None,
        node_a_counters: BTreeMap::new(),
        node_a_nat_entries: 0,
        node_b_counters: BTreeMap::new(),
    };
    read_counters(np, &mut r)?;
    Ok(r)
}

/// Both nodes' datapath counters, as they are now (BPF; nothing for nftables).
pub fn read_counters(np: &NodePortLab, r: &mut DatapathResult) -> anyhow::Result<()> {
    (r.node_a_counters, r.node_a_nat_entries) = np.status(NODE_A)?;
    r.node_b_counters = np.status(NODE_B)?.0;
    Ok(())
}

/// Measures every lab: warm-up, then `rounds` turns per lab.
pub fn measure(labs: &[NodePortLab], self_exe: &Path, sampling: Sampling) -> anyhow::Result<Vec<DatapathResult>> {
    let arms: Vec<Vec<Arm>> = labs.iter().map(|np| np.arms().into_iter().map(|(a, _)| a).collect()).collect();
    let mut acc: Vec<Acc> = arms
        .iter()
        .map(|arms| {
            let empty = || arms.iter().map(|a| ArmSamples { name: a.name.clone(), ..Default::default() }).collect();
            Acc { connect: empty(), held: empty(), connect_rounds: BTreeMap::new(), held_rounds: BTreeMap::new() }
        })
        .collect();
    for (np, arms) in labs.iter().zip(&arms) {
        eprintln!("nodeport: {}: warm-up ({} connections per arm)", np.variant.name(), sampling.warmup);
        // Failures here show up again, with their reason, in the recorded rounds.
        client(np, self_exe, arms, (0, sampling.warmup, false), sampling.pin_cpu)?;
        client(np, self_exe, arms, (0, HELD_WARMUP, true), sampling.pin_cpu)?;
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
                np.variant.name(),
                sampling.per_round,
                sampling.requests_per_round
            );
            let got = client(np, self_exe, &arms[i], (sampling.per_round, 0, false), sampling.pin_cpu)?;
            let Acc { connect, held, connect_rounds, held_rounds } = &mut acc[i];
            merge(connect, connect_rounds, got)?;
            let got =
                client(np, self_exe, &arms[i], (sampling.requests_per_round, HELD_WARMUP, true), sampling.pin_cpu)?;
            merge(held, held_rounds, got)?;
        }
    }
    let mut out = Vec::new();
    for (np, acc) in labs.iter().zip(&acc) {
        let r = result(np, acc)?;
        for a in &r.arms {
            eprintln!(
                "nodeport: {:<11} {:<22} p50 {:>7.1} us  p99 {:>7.1} us  over 500 ms {:>3}  failed {:>3}  {:>6.0} conn/s  {:>6.0} req/s  (pod {} saw {})",
                np.variant.name(),
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
