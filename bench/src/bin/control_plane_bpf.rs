//! `control_plane_bpf`: the incremental control plane on ferry's eBPF datapath at
//! 1k, 10k and 100k services (issue #11's targets): in-process full sync and
//! one-endpoint-change latency with kept heap per service, and a real `ferry
//! run` on a chunked manifest directory (start to ready, RSS, file change to
//! datapath). Writes `bench/results/incremental.json` and `incremental.md`.
//! Needs root (a pinned datapath, a lab of network namespaces).

use anyhow::Context;
use clap::Parser;
use ferry::lab::Lab;
use ferry_bench::cluster::{self, Synthetic};
use ferry_bench::incremental::{self, InProcess, RunAgent};
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
    let mut lab = Lab::new("bench-cp", &ferry)?;
    let node = lab.add_node(cluster::NODE)?;
    let cgroup = lab.sb.cgroup("prog")?;
    let cfg = cluster::node_config(&lab.node_ips(node));
    let mut results = Results { machine, in_process: Vec::new(), ferry_run: Vec::new() };
    for synthetic in &sizes {
        let n = synthetic.services;
        let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(format!("{}-p{n}", lab.sb.id()));
        results.in_process.push(incremental::in_process(synthetic, &cfg, pin_dir, &cgroup, cli.changes)?);
        results.ferry_run.push(incremental::run_agent(&mut lab, node, synthetic, cli.agent_changes)?);
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
    s
}
