//! `ferry run`: the standalone agent. Watches a manifest directory (inotify)
//! and keeps the datapath in step with it, through the same loop as `ferry
//! agent` (batching, resync, retry), with the directory as its source.

use crate::agent::sync::InstallOverrides;
use crate::agent::{self, LoopOptions};
use crate::config::{self, NodeFlags};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory of Kubernetes manifests to serve (*.yaml, *.yml, *.json,
    /// searched recursively). Watched: a file written, renamed in or removed
    /// is applied within milliseconds; only that file is read again.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Pin directory on bpffs (overrides bpf.pinPath; default /sys/fs/bpf/ferry).
    #[arg(long, value_name = "PATH")]
    pub pin_dir: Option<PathBuf>,
    /// cgroup v2 directory to load-balance sockets of (overrides bpf.cgroupPath; default: the cgroup2 root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Rewritten after every successful sync with `synced <generation>
    /// <input_unix_nanos>`: every manifest change made before that instant
    /// is programmed (for scripts and tests: write, then wait for a later time).
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Sync once and exit, leaving the datapath installed.
    #[arg(long)]
    pub once: bool,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut settings = config::settings(&args.node)?;
    if settings.node.node_ips.is_empty() {
        settings.node.node_ips = crate::node_addrs::detect().context("detecting node addresses")?;
        tracing::info!(addresses = ?settings.node.node_ips, "nodeIPs not configured: using every address of this network namespace");
    }
    if !args.manifests.is_dir() {
        anyhow::bail!(
            "--manifests {}: not a directory (create it, or point at the directory holding your manifests)",
            args.manifests.display()
        );
    }
    tracing::info!(datapath = ?settings.datapath, manifests = %args.manifests.display(), "starting");
    log_masquerade(&settings.node);
    let options = LoopOptions {
        settings,
        install: InstallOverrides { pin_dir: args.pin_dir, cgroup: args.cgroup },
        ready_file: args.ready_file,
        once: args.once,
        node_wait: std::time::Duration::ZERO,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ferry-run")
        .on_thread_park(crate::memory::release_idle)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run_manifests(options, args.manifests, super::agent::stop_signal()))?;
    Ok(ExitCode::SUCCESS)
}

/// Masquerading must never be a surprise: say at start exactly what is in force.
pub fn log_masquerade(node: &ferry_model::NodeConfig) {
    let exempt = if node.non_masquerade_cidrs.is_empty() {
        "ip-masq-agent private defaults (nonMasqueradeCIDRs is empty)".to_string()
    } else {
        node.non_masquerade_cidrs.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
    };
    match node.masquerade {
        ferry_model::MasqueradeMode::Off => tracing::info!("masquerade: off; pod egress keeps pod addresses"),
        mode => tracing::info!(
            mode = ?mode,
            never_to = %exempt,
            link_local = node.masquerade_link_local,
            "masquerade: pod egress to destinations outside the exempt ranges and cluster CIDRs leaves with the node address"
        ),
    }
}
