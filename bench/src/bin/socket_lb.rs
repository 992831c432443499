//! `socket_lb`: the socket-level load-balancing benchmark (issue "eBPF
//! socket-level load balancing", item 8). For each size (default 1k, 10k and
//! 100k services, two endpoints each) it measures, in a lab of network
//! namespaces:
//!
//! - (b) programming time of the full state and of one endpoint change, in-process;
//! - (c) a `ferry run` agent's first sync, memory, BPF map memory and one-change re-sync;
//! - (a) new-connection latency to ClusterIPs against the pod IPs (the floor).
//!
//! It writes `bench/results/socket-lb.json` and `socket-lb.md`. Needs root.
//! `client` and `serve` are hidden subcommands: the bench re-executes itself
//! inside the lab's pods with them (see `ferry_bench::conn`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_bench::cluster::{self, Synthetic};
use ferry_bench::latency::{self, Sampling};
use ferry_bench::report::{Results, SizeResult};
use ferry_bench::{agent, conn, machine::Machine, programming};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

#[global_allocator]
static ALLOC: ferry_bench::heap::CountingAlloc = ferry_bench::heap::CountingAlloc;

#[derive(Parser)]
#[command(name = "socket_lb", about = "ferry's socket-LB benchmark: latency, programming time and memory at scale")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Numbers of services, comma-separated (multiples of 100).
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10_000, 100_000])]
    sizes: Vec<usize>,
    /// Client runs per size.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Connections per arm in each round.
    #[arg(long, default_value_t = 1000)]
    per_round: usize,
    /// Unrecorded connections per arm before the rounds.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// One-endpoint changes timed per size (the median is reported).
    #[arg(long, default_value_t = 7)]
    changes: usize,
    /// Pin the client to CPU 0 and the servers to CPU 1.
    #[arg(long)]
    pin_cpus: bool,
    /// The ferry binary (default: `ferry` next to this binary).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// Where socket-lb.json and socket-lb.md go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to targets and print the samples as JSON (runs inside a pod).
    #[command(hide = true)]
    Client {
        /// NAME=ADDR,ADDR,... (repeatable); arms are interleaved.
        #[arg(long = "arm", required = true)]
        arms: Vec<String>,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// Pin to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Answer `pong NAME` to one-line requests (runs inside a pod).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long)]
        ready: Option<PathBuf>,
        #[arg(long, default_value_t = 3600)]
        lifetime_s: u64,
        /// Pin to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Client { arms, count, warmup, cpu }) => {
            conn::pin_to_cpu(cpu)?;
            let arms = arms.iter().map(|a| conn::Arm::parse(a)).collect::<anyhow::Result<Vec<_>>>()?;
            let samples = conn::run_client(&arms, count, warmup);
            serde_json::to_writer(std::io::stdout().lock(), &samples)?;
            Ok(())
        }
        Some(Cmd::Serve { listen, name, ready, lifetime_s, cpu }) => {
            conn::pin_to_cpu(cpu)?;
            conn::serve(listen, &name, false, Duration::from_secs(lifetime_s), ready.as_deref())
        }
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "socket_lb needs root (network namespaces, cgroups, BPF)");
    let self_exe = std::env::current_exe().context("finding this binary")?;
    let ferry = match args.ferry {
        Some(f) => f,
        None => self_exe.with_file_name("ferry"),
    };
    anyhow::ensure!(
        ferry.exists(),
        "no ferry binary at {}: build it (cargo build --release -p ferry) or pass --ferry",
        ferry.display()
    );
    let sizes = args.sizes.iter().map(|n| Synthetic::new(*n)).collect::<anyhow::Result<Vec<_>>>()?;
    let machine = Machine::detect();
    eprintln!("socket_lb: {}", machine.describe());
    let pin_cpus = args.pin_cpus && machine.cpus >= 2;
    let sampling = Sampling { rounds: args.rounds, per_round: args.per_round, warmup: args.warmup, pin_cpus };
    let started = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);

    eprintln!("socket_lb: building the lab (node, client pod, two backend pods)");
    let mut lab = latency::setup(&ferry, &self_exe, pin_cpus)?;
    let prog_cgroup = lab.sb.cgroup("prog")?;
    let nohook_cgroup = lab.sb.cgroup("nohook")?;
    let cfg = cluster::node_config(&lab.node_ips(latency::NODE));
    let mut results = Vec::new();
    for synthetic in &sizes {
        let n = synthetic.services;
        let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(format!("{}-p{n}", lab.sb.id()));
        let programming = programming::run(synthetic, &cfg, pin_dir, &prog_cgroup, args.changes)?;

        let (running, manifest_bytes, ready_s, first_sync) = agent::start(&mut lab, latency::NODE, synthetic)?;
        let measured = (|| -> anyhow::Result<(agent::AgentResult, latency::LatencyResult)> {
            let memory_after_first_sync = agent::proc_memory(running.pid)?;
            eprintln!("[{n}] agent: reading BPF map memory");
            let maps = agent::map_memory(&lab.nodes[latency::NODE].pin_dir)?;
            eprintln!("[{n}] heap: replaying the agent's first sync with a counting allocator");
            let heap = agent::heap_attribution(&lab.nodes[latency::NODE].manifests, &cfg)?;
            let latency = latency::measure(&lab, &self_exe, &nohook_cgroup, synthetic, sampling)?;
            let (one_change_wall_ms, one_change_sync) = agent::one_change(&lab, &running, synthetic)?;
            let agent = agent::AgentResult {
                services: n,
                manifest_bytes,
                ready_s,
                first_sync,
                memory_after_first_sync,
                maps_memlock_total_bytes: maps.iter().map(|m| m.memlock_bytes).sum(),
                maps,
                heap,
                one_change_wall_ms,
                one_change_sync,
                memory_after_one_change: agent::proc_memory(running.pid)?,
            };
            Ok((agent, latency))
        })();
        agent::stop(&mut lab, running)?;
        let (agent, latency) = measured?;
        results.push(SizeResult { services: n, programming, agent, latency });
    }
    drop(lab);

    let results = Results {
        benchmark: "socket-lb",
        machine,
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        sampling,
        change_repetitions: args.changes,
        sizes: results,
    };
    std::fs::create_dir_all(&args.out_dir)?;
    let json = args.out_dir.join("socket-lb.json");
    let md = args.out_dir.join("socket-lb.md");
    std::fs::write(&json, serde_json::to_string_pretty(&results)? + "\n")?;
    let table = results.markdown();
    std::fs::write(&md, &table)?;
    println!("{table}");
    eprintln!("socket_lb: wrote {} and {} in {:.0} s", json.display(), md.display(), results.duration_s);
    Ok(())
}
