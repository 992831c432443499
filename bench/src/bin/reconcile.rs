//! `reconcile`: the kernel conntrack reconciler at 100k and 1M UDP entries
//! (issue #6), against what an operator would do with conntrack-tools.
//!
//! The shape is the acceptance scale case's (`acceptance/conntrack-cleanup-cases.json`,
//! "reconcile at scale"): its Service (UDP 8000 on ExternalIP 192.168.99.100,
//! one serving endpoint 10.240.0.4:9090) and entries to the ExternalIP, but
//! half of them stale instead of a handful:
//!
//! ```text
//! i % 2 == 0   192.168.99.100:8000   answered by 10.240.2.6:9090 (not an endpoint)   stale
//! i % 4 == 1   192.168.99.100:8000   answered by 10.240.0.4:9090 (serving)            kept
//! i % 4 == 3   192.168.99.100:P      answered by 10.240.2.6:9090, P random ≠ 8000     kept (not a frontend)
//! ```
//!
//! For each size, in one `ferry-bench-*` network namespace, each round times
//! both ways of deleting the stale half from the same full table (the order
//! alternates between rounds, and the deleted entries are re-created between
//! the two):
//!
//! - ferry: `Conntrack::reconcile` (one kernel-filtered dump, the rule per
//!   entry, batched deletes), as the agent runs it; its listing alone is timed too;
//! - conntrack-tools: `conntrack -D -p udp --orig-dst 192.168.99.100
//!   --orig-port-dst 8000 --reply-src 10.240.2.6 --reply-port-src 9090`, one
//!   command per (frontend, stale backend), here exactly one.
//!
//! `net.netfilter.nf_conntrack_max` is global (read-only inside a namespace),
//! so a size above it is run with the limit raised machine-wide and restored
//! afterwards (also on error; not after SIGKILL). Writes
//! `bench/results/reconcile.{json,md}`. Needs root and conntrack-tools.

use anyhow::Context;
use clap::Parser;
use ferry::conformance::conntrack::client;
use ferry_bench::machine::Machine;
use ferry_conntrack::{Conntrack, Entry};
use ferry_model::stale::StaleFlowIndex;
use ferry_model::stale::cases::{ConntrackCaseFile, NodeAddresses};
use ferry_model::{IpFamily, Protocol};
use ferry_sandbox::{Host, Sandbox};
use serde::Serialize;
use std::fmt::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const CASES: &str = include_str!("../../../acceptance/conntrack-cleanup-cases.json");
const SCALE_CASE: &str = "reconcile at scale";
const FRONTEND: &str = "192.168.99.100:8000";
const SERVING: &str = "10.240.0.4:9090";
const STALE_BACKEND: &str = "10.240.2.6:9090";
const ENTRY_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

#[derive(Parser)]
#[command(name = "reconcile", about = "ferry's conntrack reconciler benchmark: 100k and 1M UDP entries, half stale")]
struct Args {
    /// Table sizes (entries, multiples of 4), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000, 1_000_000])]
    sizes: Vec<usize>,
    /// Rounds per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where reconcile.json and reconcile.md go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
struct Timing {
    samples_s: Vec<f64>,
    median_s: f64,
    min_s: f64,
    max_s: f64,
}

impl Timing {
    fn of(mut samples: Vec<f64>) -> Timing {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median_s = if n % 2 == 1 { samples[n / 2] } else { (samples[n / 2 - 1] + samples[n / 2]) / 2.0 };
        Timing { median_s, min_s: samples[0], max_s: samples[n - 1], samples_s: samples }
    }
}

#[derive(Debug, Clone, Serialize)]
struct SizeResult {
    entries: usize,
    stale: usize,
    /// Creating the full table over ctnetlink (batched), first round.
    create_s: f64,
    /// ferry: list only (dump + rule, nothing deleted).
    ferry_list: Timing,
    /// ferry: the whole reconcile (list + delete).
    ferry_reconcile: Timing,
    ferry_deleted: usize,
    tool_command: String,
    tool_delete: Timing,
    tool_deleted: usize,
    /// conntrack -D median / ferry reconcile median.
    ferry_speedup: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Results {
    benchmark: &'static str,
    machine: Machine,
    conntrack_tools: String,
    started_unix_s: u64,
    duration_s: f64,
    rounds: usize,
    nf_conntrack_max_before: u64,
    nf_conntrack_buckets: u64,
    sizes: Vec<SizeResult>,
}

/// Raises the global nf_conntrack_max for the run; the old value comes back on drop.
struct RaisedLimit {
    old: u64,
}

impl RaisedLimit {
    fn at_least(limit: u64) -> anyhow::Result<Option<RaisedLimit>> {
        let old = read_u64(MAX_PATH)?;
        if old >= limit {
            return Ok(None);
        }
        std::fs::write(MAX_PATH, limit.to_string()).with_context(|| format!("raising {MAX_PATH} to {limit}"))?;
        eprintln!("reconcile: raised net.netfilter.nf_conntrack_max (global) from {old} to {limit} for this run");
        Ok(Some(RaisedLimit { old }))
    }
}

impl Drop for RaisedLimit {
    fn drop(&mut self) {
        match std::fs::write(MAX_PATH, self.old.to_string()) {
            Ok(()) => eprintln!("reconcile: restored net.netfilter.nf_conntrack_max to {}", self.old),
            Err(e) => eprintln!("reconcile: could not restore net.netfilter.nf_conntrack_max to {}: {e}", self.old),
        }
    }
}

fn read_u64(path: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.trim().parse().with_context(|| format!("{path}: {text:?}"))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("constant address")
}

/// The table: entry `i` is stale iff `i` is even (see the file comment).
fn table(n: usize) -> Vec<Entry> {
    let mut rng = 0x5eed_0000_0000_0006_u64;
    (0..n)
        .map(|i| {
            let client = client(IpFamily::V4, i);
            match i % 4 {
                0 | 2 => Entry::new(Protocol::Udp.number(), client, sa(FRONTEND), sa(STALE_BACKEND)),
                1 => Entry::new(Protocol::Udp.number(), client, sa(FRONTEND), sa(SERVING)),
                _ => {
                    // SplitMix64, as the case generator: a random destination port other than 8000.
                    let port = loop {
                        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        let mut z = rng;
                        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                        let p = ((z ^ (z >> 31)) % 65_535) as u16;
                        if p != 8000 {
                            break p;
                        }
                    };
                    let dst = SocketAddr::new(sa(FRONTEND).ip(), port);
                    Entry::new(Protocol::Udp.number(), client, dst, sa(STALE_BACKEND))
                }
            }
        })
        .collect()
}

fn is_stale(index: &StaleFlowIndex, e: &Entry) -> bool {
    index.is_stale(Protocol::Udp, e.orig.dst.ip(), e.orig.dst.port(), e.reply.src.ip(), e.reply.src.port())
}

/// Entries left in the table, and how many of them are stale.
fn census(ct: &mut Conntrack, index: &StaleFlowIndex) -> anyhow::Result<(usize, usize)> {
    let listing = ct.list(IpFamily::V4, Some(Protocol::Udp), |e| is_stale(index, e))?;
    anyhow::ensure!(listing.complete, "the census dump was interrupted");
    Ok((listing.listed, listing.entries.len()))
}

fn create(ct: &mut Conntrack, entries: &[Entry]) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let created = ct.create(entries, ENTRY_TIMEOUT)?;
    anyhow::ensure!(created.created == entries.len(), "created {} of {}: {created:?}", created.created, entries.len());
    Ok(t0.elapsed().as_secs_f64())
}

fn tool_args() -> Vec<String> {
    let (f, b) = (sa(FRONTEND), sa(STALE_BACKEND));
    let args = ["-D", "-p", "udp", "--orig-dst", &f.ip().to_string(), "--orig-port-dst", &f.port().to_string()];
    let reply = ["--reply-src", &b.ip().to_string(), "--reply-port-src", &b.port().to_string()];
    args.iter().chain(reply.iter()).map(|s| s.to_string()).collect()
}

/// Runs `conntrack -D` with the filters inside the namespace; its time and the count it reports.
fn tool_delete(sb: &Sandbox, host: &Host) -> anyhow::Result<(f64, usize)> {
    let mut cmd = sb.command(host, "conntrack");
    // Each deleted entry is printed on stdout; the count is on stderr.
    cmd.args(tool_args()).stdout(Stdio::null()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let out = cmd.output().context("running conntrack -D (is conntrack-tools installed?)")?;
    let elapsed = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "conntrack -D failed: {stderr}");
    let deleted = stderr
        .split_whitespace()
        .zip(stderr.split_whitespace().skip(1))
        .find_map(|(n, word)| (word == "flow").then(|| n.parse::<usize>().ok()).flatten())
        .with_context(|| format!("no count in conntrack's output: {stderr}"))?;
    Ok((elapsed, deleted))
}

fn run_size(n: usize, rounds: usize, index: &StaleFlowIndex) -> anyhow::Result<SizeResult> {
    anyhow::ensure!(n.is_multiple_of(4) && n > 0, "sizes must be positive multiples of 4 (got {n})");
    let entries = table(n);
    let stale: Vec<Entry> = entries.iter().filter(|e| is_stale(index, e)).cloned().collect();
    anyhow::ensure!(
        stale.len() == n / 2,
        "the rule finds {} stale entries, the table was built with {}",
        stale.len(),
        n / 2
    );
    let _limit = RaisedLimit::at_least((n + n / 10 + 10_000) as u64)?;
    let mut sb = Sandbox::new("bench")?;
    let result = (|| -> anyhow::Result<SizeResult> {
        let host = sb.add_host("ct")?;
        let mut ct = Conntrack::open_in_netns(&sb.netns_path(&host))?;
        eprintln!("[{n}] creating {n} entries in netns {}", host.netns());
        let create_s = create(&mut ct, &entries)?;
        anyhow::ensure!(census(&mut ct, index)? == (n, n / 2), "the table is not as built");
        let (mut list, mut reconcile, mut tool) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ferry_deleted, mut tool_deleted) = (0, 0);
        for round in 0..rounds {
            let t0 = Instant::now();
            let listing = ct.list(IpFamily::V4, Some(Protocol::Udp), |e| is_stale(index, e))?;
            list.push(t0.elapsed().as_secs_f64());
            anyhow::ensure!(listing.entries.len() == n / 2, "listing found {} stale", listing.entries.len());
            for first_ferry in [round % 2 == 0, round % 2 == 1] {
                if first_ferry {
                    let report = ct.reconcile(index, &[IpFamily::V4]);
                    let f = &report.families[0];
                    anyhow::ensure!(f.error.is_none() && !f.partial, "reconcile: {f:?}");
                    reconcile.push(f.duration.as_secs_f64());
                    ferry_deleted = f.deleted;
                    eprintln!(
                        "[{n}] round {round}: ferry reconcile deleted {} in {:.3} s",
                        f.deleted,
                        f.duration.as_secs_f64()
                    );
                } else {
                    let (s, deleted) = tool_delete(&sb, &host)?;
                    tool.push(s);
                    tool_deleted = deleted;
                    eprintln!("[{n}] round {round}: conntrack -D deleted {deleted} in {s:.3} s");
                }
                anyhow::ensure!(census(&mut ct, index)? == (n / 2, 0), "after deleting, the stale half is not gone");
                create(&mut ct, &stale)?;
            }
        }
        let (ferry_reconcile, tool_delete) = (Timing::of(reconcile), Timing::of(tool));
        Ok(SizeResult {
            entries: n,
            stale: n / 2,
            create_s,
            ferry_list: Timing::of(list),
            ferry_speedup: tool_delete.median_s / ferry_reconcile.median_s,
            ferry_reconcile,
            ferry_deleted,
            tool_command: format!("conntrack {}", tool_args().join(" ")),
            tool_delete,
            tool_deleted,
        })
    })();
    eprintln!("[{n}] removing the namespace");
    let closed = sb.close();
    let result = result?;
    closed?;
    Ok(result)
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# conntrack reconciler benchmark results\n");
    let _ = writeln!(s, "Machine: {}  ", r.machine.describe());
    let _ = writeln!(
        s,
        "Run: {:.0} s, {} rounds per size (median; min-max in brackets), {}; nf_conntrack_buckets {}.\n",
        r.duration_s, r.rounds, r.conntrack_tools, r.nf_conntrack_buckets
    );
    let _ = writeln!(
        s,
        "| UDP entries | stale (deleted) | ferry reconcile | of which listing | `conntrack -D` (filtered) | ferry faster by | create (setup) |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
    let t = |t: &Timing| format!("{:.3} s [{:.3}-{:.3}]", t.median_s, t.min_s, t.max_s);
    for z in &r.sizes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.1}x | {:.2} s |",
            z.entries,
            z.stale,
            t(&z.ferry_reconcile),
            t(&z.ferry_list),
            t(&z.tool_delete),
            z.ferry_speedup,
            z.create_s
        );
    }
    if let Some(z) = r.sizes.first() {
        let _ = writeln!(s, "\nconntrack-tools command: `{}`.", z.tool_command);
    }
    s
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "reconcile needs root (network namespaces, conntrack)");
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let file = ConntrackCaseFile::parse(CASES)?;
    let case = file.cases.iter().find(|c| c.name.contains(SCALE_CASE)).context("the case file has no scale case")?;
    let index = StaleFlowIndex::from_plan(&case.plan(NodeAddresses::default())?);
    let machine = Machine::detect();
    eprintln!("reconcile: {}", machine.describe());
    let version = Command::new("conntrack").arg("--version").output().context("running conntrack --version")?;
    let conntrack_tools = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let nf_conntrack_max_before = read_u64(MAX_PATH)?;
    let nf_conntrack_buckets = read_u64("/proc/sys/net/netfilter/nf_conntrack_buckets")?;
    let started = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut sizes = Vec::new();
    for &n in &args.sizes {
        sizes.push(run_size(n, args.rounds, &index)?);
    }
    let results = Results {
        benchmark: "reconcile",
        machine,
        conntrack_tools,
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        rounds: args.rounds,
        nf_conntrack_max_before,
        nf_conntrack_buckets,
        sizes,
    };
    std::fs::create_dir_all(&args.out_dir)?;
    let json = args.out_dir.join("reconcile.json");
    let md = args.out_dir.join("reconcile.md");
    std::fs::write(&json, serde_json::to_string_pretty(&results)? + "\n")?;
    let table = markdown(&results);
    std::fs::write(&md, &table)?;
    print!("{table}");
    eprintln!("reconcile: wrote {} and {} in {:.0} s", json.display(), md.display(), results.duration_s);
    Ok(())
}
