//! `control_plane_bpf`: the incremental control plane on ferry's eBPF datapath at
//! 1k, 10k and 100k services (issue #11's targets): in-process full sync and
//! one-endpoint-change latency with kept heap per service, and a real `ferry
//! run` on a chunked manifest directory (start to ready, RSS, file change to
//! datapath). Writes `bench/results/incremental.json` and `incremental.md`.
//! Needs root (a pinned datapath, a lab of network namespaces).

use anyhow::Context;
use clap::Parser;
use ferry::lab::Lab;
use ferry_bench::api_agent::{self, ApiAgent};
use ferry_bench::cluster::{self, Synthetic};
use ferry_bench::incremental::{self, InProcess, RunAgent, Shape};
use ferry_bench::machine::Machine;
use serde::Serialize;
use std::path::PathBuf;

#[global_allocator]
static ALLOC: ferry_bench::heap::CountingAlloc = ferry_bench::heap::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "control_plane_bpf",
    about = "ferry's incremental control plane: full sync, one change, memory, at scale"
)]
struct Cli {
    /// Numbers of services, comma-separated (multiples of 100).
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10_000, 100_000])]
    sizes: Vec<usize>,
    /// One-endpoint changes timed in-process per size.
    #[arg(long, default_value_t = 500)]
    changes: usize,
    /// One-endpoint changes timed through `ferry run` per size.
    #[arg(long, default_value_t = 100)]
    agent_changes: usize,
    /// Cluster shapes SERVICESxENDPOINTS timed in-process too (comma-separated; empty: none).
    #[arg(long, value_delimiter = ',', default_values_t = ["10000x100".to_string(), "1x10000".to_string()])]
    shapes: Vec<String>,
    /// One-endpoint changes timed through `ferry agent` (fake API server) per size.
    #[arg(long, default_value_t = 100)]
    api_changes: usize,
    /// Churn through `ferry agent` at the largest size: RATExSECONDS (changes per
    /// second, each to another service, for that long); empty: none.
    #[arg(long, default_value = "1000x60")]
    churn: String,
    /// Which measurements to run (comma-separated): in-process, run, agent, shapes.
    #[arg(long, value_delimiter = ',', default_values_t = ["in-process".to_string(), "run".to_string(), "agent".to_string(), "shapes".to_string()])]
    parts: Vec<String>,
    /// The ferry binary (default: `ferry` next to this binary).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// Where incremental.json and incremental.md go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out_dir: PathBuf,
}

#[derive(Serialize)]
struct Results {
    machine: Machine,
    in_process: Vec<InProcess>,
    ferry_run: Vec<RunAgent>,
    ferry_agent: Vec<ApiAgent>,
    shapes: Vec<Shape>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "control_plane_bpf needs root (network namespaces, cgroups, BPF)");
    let ferry = match cli.ferry {
        Some(f) => f,
        None => std::env::current_exe()?.with_file_name("ferry"),
    };
    anyhow::ensure!(ferry.exists(), "no ferry binary at {}: build it (make bench-build)", ferry.display());
    let machine = Machine::detect();
    eprintln!("control_plane_bpf: {}", machine.describe());
    let sizes = cli.sizes.iter().map(|n| Synthetic::new(*n)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut lab = Lab::new("cp", &ferry)?;
    let node = lab.add_node(cluster::NODE)?;
    let cgroup = lab.sb.cgroup("prog")?;
    let cfg = cluster::node_config(&lab.node_ips(node));
    let mut results =
        Results { machine, in_process: Vec::new(), ferry_run: Vec::new(), ferry_agent: Vec::new(), shapes: Vec::new() };
    let part = |name: &str| cli.parts.iter().any(|p| p == name);
    for p in &cli.parts {
        anyhow::ensure!(
            ["in-process", "run", "agent", "shapes"].contains(&p.as_str()),
            "--parts {p}: the parts are in-process, run, agent and shapes"
        );
    }
    let churn = match cli.churn.as_str() {
        "" => None,
        c => Some(
            c.split_once('x')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                .with_context(|| format!("--churn {c}: write RATExSECONDS, e.g. 1000x60"))?,
        ),
    };
    let largest = sizes.iter().map(|s| s.services).max().unwrap_or(0);
    for synthetic in &sizes {
        let n = synthetic.services;
        if part("in-process") {
            let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(format!("{}-p{n}", lab.sb.id()));
            results.in_process.push(incremental::in_process(synthetic, &cfg, pin_dir, &cgroup, cli.changes)?);
        }
        if part("run") {
            results.ferry_run.push(incremental::run_agent(&mut lab, node, synthetic, cli.agent_changes)?);
        }
        if part("agent") {
            let churn = churn.filter(|_| n == largest);
            results.ferry_agent.push(api_agent::run(&mut lab, node, synthetic, cli.api_changes, churn)?);
        }
    }
    for shape in cli.shapes.iter().filter(|s| !s.is_empty() && part("shapes")) {
        let (services, endpoints) = shape
            .split_once('x')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .with_context(|| format!("--shapes {shape}: write SERVICESxENDPOINTS, e.g. 10000x100"))?;
        let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(format!("{}-s{services}x{endpoints}", lab.sb.id()));
        results.shapes.push(incremental::shape(services, endpoints, &cfg, pin_dir, &cgroup, cli.changes.min(200))?);
    }
    std::fs::create_dir_all(&cli.out_dir)?;
    let json = cli.out_dir.join("incremental.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = cli.out_dir.join("incremental.md");
    std::fs::write(&md, markdown(&results)).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("control_plane_bpf: wrote {} and {}", json.display(), md.display());
    Ok(())
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    s.push_str("# Incremental control plane: ferry's eBPF datapath\n\n");
    s.push_str(&format!("Machine: {}\n\n", r.machine.describe()));
    s.push_str("## In-process (events -> Planner -> Programmer -> pinned maps)\n\n");
    s.push_str("| services | full sync | per service | map ops | one change p50 | p99 | kept heap / service | startup peak / kept |\n|---|---|---|---|---|---|---|---|\n");
    for x in &r.in_process {
        s.push_str(&format!(
            "| {} | {:.0} ms (plan {:.0}, program {:.0}, maps {:.0}) | {:.1} µs | {} | {:.1} µs | {:.1} µs | {:.0} B | {:.2}× |\n",
            x.services,
            x.full_sync_ms,
            x.plan_ms,
            x.program_ms,
            x.maps_ms,
            x.full_sync_us_per_service,
            x.map_ops,
            x.one_change.p50_us,
            x.one_change.p99_us,
            x.kept_heap_bytes_per_service,
            x.startup_peak_ratio
        ));
    }
    s.push_str("\nFull sync excludes feeding the events (the planner reads each object as it arrives); ");
    s.push_str("one change is the event applied, planned, programmed and written to the maps.\n\n");
    s.push_str("## `ferry run` on a chunked manifest directory\n\n");
    s.push_str("| services | files | MB | start to ready | RSS after ready | peak RSS | RSS after changes | file change to datapath p50 | p99 |\n|---|---|---|---|---|---|---|---|---|\n");
    for x in &r.ferry_run {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} s | {} MiB | {} MiB | {} MiB | {:.1} ms | {:.1} ms |\n",
            x.services,
            x.manifest_files,
            x.manifest_bytes as f64 / 1e6,
            x.start_to_ready_s,
            x.rss_after_ready_kib / 1024,
            x.peak_rss_kib / 1024,
            x.rss_after_changes_kib / 1024,
            x.file_change_to_datapath.p50_us / 1e3,
            x.file_change_to_datapath.p99_us / 1e3
        ));
    }
    s.push_str("\n## `ferry agent` against the fake API server (real list/watch over HTTP)\n\n");
    s.push_str("| services | start to ready | RSS after ready | peak RSS | RSS after changes | event to datapath p50 | p99 |\n|---|---|---|---|---|---|---|\n");
    for x in &r.ferry_agent {
        s.push_str(&format!(
            "| {} | {:.2} s | {} MiB | {} MiB | {} MiB | {:.1} ms | {:.1} ms |\n",
            x.services,
            x.start_to_ready_s,
            x.rss_after_ready_kib / 1024,
            x.peak_rss_kib / 1024,
            x.rss_after_changes_kib / 1024,
            x.event_to_datapath.p50_us / 1e3,
            x.event_to_datapath.p99_us / 1e3
        ));
    }
    let churns: Vec<_> = r.ferry_agent.iter().filter_map(|x| Some((x.services, x.churn.as_ref()?))).collect();
    if !churns.is_empty() {
        s.push_str("\nChurn (each change to another service; latency is an upper bound: a change is credited to the second sync that starts after it was sent):\n\n");
        s.push_str("| services | asked | sent | syncs | event to datapath p50 | p99 | max | RSS first / max / last second |\n|---|---|---|---|---|---|---|---|\n");
        for (n, c) in churns {
            s.push_str(&format!(
                "| {} | {}/s × {} s | {:.0}/s | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} / {} / {} MiB |\n",
                n,
                c.rate_per_s,
                c.seconds,
                c.sent_per_s,
                c.syncs,
                c.event_to_datapath.p50_us / 1e3,
                c.event_to_datapath.p99_us / 1e3,
                c.event_to_datapath.max_us / 1e3,
                c.rss_kib.first().copied().unwrap_or(0) / 1024,
                c.rss_kib.iter().max().copied().unwrap_or(0) / 1024,
                c.rss_kib.last().copied().unwrap_or(0) / 1024,
            ));
        }
    }
    s.push_str("\n## Other shapes (in-process)\n\n| services × endpoints | full sync | map ops | one change p50 | p99 |\n|---|---|---|---|---|\n");
    for x in &r.shapes {
        s.push_str(&format!(
            "| {} × {} | {:.0} ms | {} | {:.1} µs | {:.1} µs |\n",
            x.services, x.endpoints_per_service, x.full_sync_ms, x.map_ops, x.one_change.p50_us, x.one_change.p99_us
        ));
    }
    s
}
