//! The `ferry` command: a Kubernetes service proxy with an eBPF datapath.
//!
//! Each subcommand lives in its own module under `cli/`; this file only
//! declares the command line and dispatches.

mod cli;
mod config;

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
    Conformance(cli::conformance::ConformanceArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Explain(args) => cli::explain::run(args),
        Command::Conformance(args) => cli::conformance::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(2)
        }
    }
}
