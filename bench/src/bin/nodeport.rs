//! `nodeport`: the NodePort benchmark of the per-packet datapaths (issue #4
//! item 6, and its nftables peer in issue #6). In a two-node lab per datapath
//! (BPF and nftables, both in the same run), a client outside the cluster
//! dials node-a's NodePorts, whose only endpoint is a pod on node-a (local)
//! or on node-b (remote: DNAT + SNAT on node-a, forwarded to node-b), and the
//! same pods by pod IP (the floor). It measures new-connection latency and
//! rate, and the request rate on one held connection, and writes
//! `bench/results/nodeport.json` and `nodeport.md`. Needs root.
//!
//! `client` and `serve` are hidden subcommands: the bench re-executes itself
//! inside the lab's hosts and pods with them (see `ferry_bench::conn`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_bench::conn;
use ferry_bench::machine::Machine;
use ferry_bench::nodeport::cluster::{Datapath, NodePortLab};
use ferry_bench::nodeport::measure::{self, Sampling};
use ferry_bench::nodeport::report::Results;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

#[derive(Parser)]
#[command(
    name = "nodeport",
    about = "ferry's NodePort benchmark: an outside client through node-a's NodePorts to a local and a remote pod, \
             against the same pods dialled directly, on the BPF and the nftables datapath",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Datapaths to measure, comma-separated; each gets a two-node lab of its own.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Datapath::Bpf, Datapath::Nftables])]
    datapaths: Vec<Datapath>,
    /// Turns per datapath (the labs alternate, in alternating order); each turn is one
    /// new-connection run and one held-connection run.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// New connections per arm in each round (5 arms, interleaved connection by connection).
    #[arg(long, default_value_t = 1000)]
    per_round: usize,
    /// Requests per arm on the held connections in each round (interleaved request by request).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Unrecorded new connections per arm before the rounds.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// natPortRange (FIRST-LAST) for the BPF lab's agents; default: ferry's own (1024-29999).
    #[arg(long, value_name = "FIRST-LAST")]
    nat_port_range: Option<String>,
    /// The ferry binary the agents run (default: `ferry` next to this binary).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// Where nodeport.json and nodeport.md go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to targets and print the samples as JSON (runs inside the client host).
    #[command(hide = true)]
    Client {
        /// NAME=ADDR,ADDR,... (repeatable); arms are interleaved.
        #[arg(long = "arm", required = true)]
        arms: Vec<String>,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// One held connection per arm, `count` requests on each.
        #[arg(long)]
        held: bool,
    },
    /// Answer `pong NAME PEER` to one-line requests (runs inside a pod).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// Add the peer address to every reply.
        #[arg(long)]
        tell_peer: bool,
        #[arg(long)]
        ready: Option<PathBuf>,
        #[arg(long, default_value_t = 3600)]
        lifetime_s: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Client { arms, count, warmup, held }) => {
            let arms = arms.iter().map(|a| conn::Arm::parse(a)).collect::<anyhow::Result<Vec<_>>>()?;
            let samples =
                if held { conn::run_held(&arms, count, warmup) } else { conn::run_client(&arms, count, warmup) };
            serde_json::to_writer(std::io::stdout().lock(), &samples)?;
            Ok(())
        }
        Some(Cmd::Serve { listen, name, tell_peer, ready, lifetime_s }) => {
            conn::serve(listen, &name, tell_peer, Duration::from_secs(lifetime_s), ready.as_deref())
        }
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "nodeport needs root (network namespaces, cgroups, BPF, nftables)"
    );
    anyhow::ensure!(!args.datapaths.is_empty(), "--datapaths names no datapath");
    anyhow::ensure!(
        args.rounds > 0 && args.per_round > 0 && args.requests > 0,
        "--rounds, --per-round and --requests must be at least 1"
    );
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
    let machine = Machine::detect();
    eprintln!("nodeport: {}", machine.describe());
    let sampling = Sampling {
        rounds: args.rounds,
        per_round: args.per_round,
        requests_per_round: args.requests,
        warmup: args.warmup,
    };
    let started = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);

    let mut labs = Vec::new();
    for dp in &args.datapaths {
        eprintln!("nodeport: building the {} lab (node-a, node-b, two pods, outside client; both agents)", dp.name());
        labs.push(NodePortLab::build(*dp, &ferry, &self_exe, args.nat_port_range.as_deref())?);
    }
    let datapaths = measure::measure(&labs, &self_exe, sampling)?;
    drop(labs);

    let results = Results {
        benchmark: "nodeport",
        machine,
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        sampling,
        nat_port_range: args.nat_port_range,
        datapaths,
    };
    std::fs::create_dir_all(&args.out_dir)?;
    let json = args.out_dir.join("nodeport.json");
    let md = args.out_dir.join("nodeport.md");
    std::fs::write(&json, serde_json::to_string_pretty(&results)? + "\n")?;
    let table = results.markdown();
    std::fs::write(&md, &table)?;
    println!("{table}");
    eprintln!("nodeport: wrote {} and {} in {:.0} s", json.display(), md.display(), results.duration_s);
    Ok(())
}
