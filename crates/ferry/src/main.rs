//! The `ferry` command: a Kubernetes service proxy with an eBPF datapath.
//!
//! Each subcommand lives in its own module under `cli/`; this file only
//! declares the command line and dispatches.

use ferry::cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// ferry turns Kubernetes Services and EndpointSlices into load balancing on
/// this node, replacing kube-proxy. Start with `ferry explain` to see what a
/// set of manifests means for a node, or `make demo` for a live sandbox.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what happens to a connection (or to every service) on a node, and why.
    ///
    /// Without --from/--to, prints every service port with its frontends,
    /// endpoints and the route taken by pod, host and outside traffic.
    /// With --from and --to, follows one new connection step by step.
    Explain(cli::explain::ExplainArgs),
    /// Check ferry against kube-proxy's behaviour, flow by flow.
    ///
    /// Reads a case file in the acceptance format (acceptance/README.md), runs
    /// every flow on the chosen datapath, prints one line per failing flow and
    /// ends with "N passed, M failed". Exits 0 only if every flow passed.
    /// With --scenarios, runs Service changes over time instead: one agent
    /// per scenario, each step's changes handed to it as one batch, the step's
    /// flows checked and every connection held since an earlier step asked
    /// once more (acceptance/README.md, "kube-proxy-scenarios.json").
    /// With --conntrack-cases, runs the kernel conntrack reconciler on the
    /// conntrack cleanup cases instead, counting one check per entry and one
    /// per case for its deleted count.
    Conformance(cli::conformance::ConformanceArgs),
    /// Run the standalone agent: serve a directory of manifests on this node.
    ///
    /// Installs the eBPF datapath (pinned under bpffs, so it keeps serving
    /// while the agent is down and a restarted agent adopts it), programs the
    /// manifests, and re-programs within a second of any file change.
    Run(cli::run::RunArgs),
    /// Run the node agent: serve the cluster's Services from the Kubernetes API (the DaemonSet entrypoint).
    ///
    /// Replaces kube-proxy on this node. Watches Services, EndpointSlices and
    /// this node's Node object, programs the eBPF datapath once both lists are
    /// in, re-programs at most once per minSyncPeriod after changes and
    /// verifies the datapath every syncPeriod. Serves /healthz and /livez
    /// (0.0.0.0:10256), /metrics (127.0.0.1:10249) and the health-check node
    /// ports of externalTrafficPolicy: Local Services. Reads a ferry node
    /// config or kube-proxy's own KubeProxyConfiguration (--config). An API
    /// outage leaves the datapath serving as it was; SIGTERM stops the agent
    /// and leaves the datapath installed.
    Agent(cli::agent::AgentArgs),
    /// Show what the datapath holds: frontends, backends, routes, XDP acceleration per device and counters.
    Status(cli::status::StatusArgs),
    /// The pinned datapath's layout version; convert it to an older one (downgrade).
    Datapath(cli::datapath::DatapathArgs),
    /// Remove everything ferry attached or pinned (and nothing else).
    Cleanup(cli::cleanup::CleanupArgs),
    /// A live tour in a sandbox of network namespaces (what `make demo` runs; needs root).
    ///
    /// Builds a node with a client pod and three backend pods, starts a real
    /// agent, spreads connections to a ClusterIP and a NodePort over the
    /// backends, removes one backend and shows traffic moving, explains a
    /// flow, and removes everything it created.
    Demo(cli::demo::DemoArgs),
    /// Traffic probe used by the sandbox (serve / connect).
    #[command(hide = true)]
    Probe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

// mimalloc rather than glibc malloc: the agent reads objects on one thread
// and frees them on another while it keeps a compact copy, which left glibc's
// arenas fragmented (at 100k services 860 MiB RSS with glibc, 640 MiB with a
// single arena); mimalloc returns freed pages to the kernel.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ferry::memory::configure();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Explain(args) => cli::explain::run(args),
        Command::Conformance(args) => cli::conformance::run(args),
        Command::Run(args) => cli::run::run(args),
        Command::Agent(args) => cli::agent::run(args),
        Command::Status(args) => cli::status::run(args),
        Command::Datapath(args) => cli::datapath::run(args),
        Command::Cleanup(args) => cli::cleanup::run(args),
        Command::Demo(args) => cli::demo::run(args),
        Command::Probe { args } => cli::probe::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(2)
        }
    }
}
