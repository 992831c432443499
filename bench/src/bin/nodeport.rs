//! `nodeport`: the NodePort benchmark of the per-packet datapaths (issue #4
//! item 6, its nftables peer in issue #6, DSR and XDP in issue #14). In a
//! two-node lab per variant (BPF in SNAT and DSR mode, optionally at XDP,
//! and nftables, all in the same run), a client outside the cluster dials
//! node-a's NodePorts, whose only endpoint is a pod on node-a (local) or on
//! node-b (remote: DNAT and SNAT or DSR on node-a, forwarded to node-b), and
//! the same pods by pod IP (the floors). It measures new-connection latency
//! and rate, and the request rate on one held connection; then a UDP flood's
//! packets per second through node-a and the CPU they cost per core. Writes
//! `bench/results/nodeport.json`, `nodeport.md` and the charts
//! `nodeport-request.svg` and `nodeport-connect.svg`. Needs root.
//!
//! `client`, `serve` and `flood` are hidden subcommands: the bench
//! re-executes itself inside the lab's hosts and pods with them (see
//! `ferry_bench::conn`, `ferry_bench::nodeport::flood`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_bench::conn;
use ferry_bench::machine::Machine;
use ferry_bench::nodeport::cluster::{Acceleration, Datapath, LbMode, NodePortLab, Variant};
use ferry_bench::nodeport::flood::{self, FloodSampling, GenSpec};
use ferry_bench::nodeport::measure::{self, Sampling};
use ferry_bench::nodeport::report::Results;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

#[derive(Parser)]
#[command(
    name = "nodeport",
    about = "ferry's NodePort benchmark: an outside client through node-a's NodePorts to a local and a remote pod, \
             against the same pods dialled directly, on the BPF datapath (SNAT and DSR, tc and XDP) and the nftables \
             datapath; and the UDP packets per second one core forwards through node-a",
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
    /// Datapaths to measure, comma-separated; each gets a two-node lab of its own (bpf: one per
    /// --lb-modes and --accelerations combination).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Datapath::Bpf, Datapath::Nftables])]
    datapaths: Vec<Datapath>,
    /// loadBalancing.mode of the BPF labs, comma-separated: one lab per mode (and acceleration).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [LbMode::Snat, LbMode::Dsr])]
    lb_modes: Vec<LbMode>,
    /// acceleration of the BPF labs, comma-separated: `disabled` (tc) and/or `native` (XDP on
    /// the nodes' eth0, the fabric readied for it).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Acceleration::Disabled, Acceleration::Native])]
    accelerations: Vec<Acceleration>,
    /// Turns per lab (the labs alternate, in alternating order); each turn is one
    /// new-connection run and one held-connection run.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// New connections per arm in each round (6 arms, interleaved connection by connection).
    #[arg(long, default_value_t = 1000)]
    per_round: usize,
    /// Requests per arm on the held connections in each round (interleaved request by request).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// The CPU the client and the pods' servers are pinned to, so that no wakeup crosses
    /// CPUs (on veth the packets' whole path runs on the sender's CPU): a held connection's
    /// latency otherwise depends on where its server thread happened to be scheduled.
    #[arg(long, default_value_t = 1, conflicts_with = "unpinned")]
    pin_cpu: usize,
    /// Leave the client and the servers unpinned (the scheduler places them).
    #[arg(long)]
    unpinned: bool,
    /// Unrecorded new connections per arm before the rounds.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// UDP flood: recorded runs per arm (nodeport, via-a, direct) and lab; 0 leaves the flood out.
    #[arg(long, default_value_t = 5)]
    flood_runs: usize,
    /// UDP flood: seconds per run.
    #[arg(long, default_value_t = 2.0)]
    flood_seconds: f64,
    /// UDP flood: distinct source ports (flows), a multiple of 64.
    #[arg(long, default_value_t = 4096)]
    flood_flows: u16,
    /// UDP flood: the CPU the generator is pinned to (on veth, the whole receive path runs there too).
    #[arg(long, default_value_t = 1)]
    flood_cpu: usize,
    /// natPortRange (FIRST-LAST) for the BPF lab's agents; default: ferry's own (1024-29999).
    #[arg(long, value_name = "FIRST-LAST")]
    nat_port_range: Option<String>,
    /// The ferry binary the agents run (default: `ferry` next to this binary).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// Where nodeport.json, nodeport.md and the charts go.
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
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Send UDP frames from eth0 as fast as one pinned thread can; print what was sent as JSON
    /// (runs inside the client host).
    #[command(hide = true)]
    Flood {
        #[arg(long)]
        src_mac: String,
        #[arg(long)]
        dst_mac: String,
        #[arg(long)]
        dst: Ipv4Addr,
        #[arg(long)]
        dst_port: u16,
        #[arg(long)]
        flows: u16,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        cpu: usize,
        #[arg(long, default_value_t = 1_000_000_000)]
        max_packets: u64,
    },
    /// Draw the charts (nodeport-request.svg, nodeport-connect.svg) again from a saved
    /// nodeport.json, into the directory it is in.
    #[command(hide = true)]
    Charts { json: PathBuf },
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
        /// Run on this CPU only (the connection threads too).
        #[arg(long)]
        cpu: Option<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Client { arms, count, warmup, held, cpu }) => {
            if let Some(cpu) = cpu {
                flood::pin(cpu)?;
            }
            let arms = arms.iter().map(|a| conn::Arm::parse(a)).collect::<anyhow::Result<Vec<_>>>()?;
            let samples =
                if held { conn::run_held(&arms, count, warmup) } else { conn::run_client(&arms, count, warmup) };
            serde_json::to_writer(std::io::stdout().lock(), &samples)?;
            Ok(())
        }
        Some(Cmd::Flood { src_mac, dst_mac, dst, dst_port, flows, seconds, cpu, max_packets }) => {
            let spec = GenSpec {
                src_mac: flood::parse_mac(&src_mac)?,
                dst_mac: flood::parse_mac(&dst_mac)?,
                dst,
                dst_port,
                flows,
                seconds,
                cpu,
                max_packets,
            };
            serde_json::to_writer(std::io::stdout().lock(), &flood::generate(&spec)?)?;
            Ok(())
        }
        Some(Cmd::Charts { json }) => {
            #[derive(serde::Deserialize)]
            struct Saved {
                datapaths: Vec<ferry_bench::nodeport::measure::DatapathResult>,
            }
            let text = std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
            let saved: Saved =
                serde_json::from_str(&text).with_context(|| format!("{} is not a nodeport.json", json.display()))?;
            let dir = json.parent().unwrap_or(std::path::Path::new("."));
            for (file, svg) in ferry_bench::nodeport::report::charts(&saved.datapaths) {
                std::fs::write(dir.join(&file), svg)?;
                eprintln!("nodeport: wrote {}", dir.join(file).display());
            }
            Ok(())
        }
        Some(Cmd::Serve { listen, name, tell_peer, ready, lifetime_s, cpu }) => {
            if let Some(cpu) = cpu {
                flood::pin(cpu)?;
            }
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
        !args.lb_modes.is_empty() && !args.accelerations.is_empty(),
        "--lb-modes or --accelerations is empty"
    );
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let pin_cpu = (!args.unpinned).then_some(args.pin_cpu);
    anyhow::ensure!((args.pin_cpu as i64) < cpus, "--pin-cpu {} does not exist (CPUs online: {cpus})", args.pin_cpu);
    anyhow::ensure!(
        (args.flood_cpu as i64) < cpus,
        "--flood-cpu {} does not exist (CPUs online: {cpus})",
        args.flood_cpu
    );
    anyhow::ensure!(
        args.flood_flows >= 64 && args.flood_flows.is_multiple_of(64),
        "--flood-flows must be a positive multiple of 64"
    );
    anyhow::ensure!(args.flood_seconds > 0.0 && args.flood_seconds <= 60.0, "--flood-seconds must be in (0, 60]");
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
        pin_cpu,
    };
    let started = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);

    let flood_sampling = FloodSampling::new(args.flood_runs, args.flood_seconds, args.flood_flows, args.flood_cpu);
    let mut labs = Vec::new();
    for v in Variant::all(&args.datapaths, &args.lb_modes, &args.accelerations) {
        eprintln!("nodeport: building the {} lab (node-a, node-b, three pods, outside client; both agents)", v.name());
        labs.push(NodePortLab::build(v, &ferry, &self_exe, args.nat_port_range.as_deref(), pin_cpu)?);
    }
    let mut datapaths = measure::measure(&labs, &self_exe, sampling)?;
    if args.flood_runs > 0 {
        eprintln!(
            "nodeport: UDP flood ({} flows, {} s per run, generator on CPU {})",
            args.flood_flows, args.flood_seconds, args.flood_cpu
        );
        let floods = flood::measure(&labs, &self_exe, &flood_sampling)?;
        for ((r, f), np) in datapaths.iter_mut().zip(floods).zip(&labs) {
            r.flood = Some(f);
            measure::read_counters(np, r)?;
            // An XDP lab whose XDP forwarded nothing measured the tc path: never report that as XDP.
            let at_xdp =
                ["xdp_forward", "xdp_dsr_encap"].iter().map(|k| r.node_a_counters.get(*k).unwrap_or(&0)).sum::<u64>();
            anyhow::ensure!(
                np.variant.acceleration == Acceleration::Disabled || at_xdp > 0,
                "{}: node-a's XDP forwarded no packet (xdp_forward, xdp_dsr_encap are 0): counters {:?}",
                r.name,
                r.node_a_counters
            );
        }
    }
    drop(labs);
    let load_average_end = Machine::detect().load_average;

    let results = Results {
        benchmark: "nodeport",
        machine,
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        sampling,
        nat_port_range: args.nat_port_range,
        load_average_end,
        flood: (args.flood_runs > 0).then_some(flood_sampling),
        datapaths,
    };
    std::fs::create_dir_all(&args.out_dir)?;
    let json = args.out_dir.join("nodeport.json");
    let md = args.out_dir.join("nodeport.md");
    std::fs::write(&json, serde_json::to_string_pretty(&results)? + "\n")?;
    let table = results.markdown();
    std::fs::write(&md, &table)?;
    for (file, svg) in results.charts() {
        std::fs::write(args.out_dir.join(file), svg)?;
    }
    println!("{table}");
    eprintln!("nodeport: wrote {} and {} in {:.0} s", json.display(), md.display(), results.duration_s);
    Ok(())
}
