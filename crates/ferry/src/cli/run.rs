//! `ferry run`: the standalone agent. Watches a manifest directory and keeps
//! the eBPF datapath in step with it.

use crate::config::{self, NodeFlags};
use crate::proxier::Proxier;
use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory of Kubernetes manifests to serve; re-read whenever a file changes.
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
    /// How often the manifest directory is checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub poll_ms: u64,
    /// Write this file once the first sync is programmed, and rewrite it (write aside, rename)
    /// after every later successful sync and every resync, as one line
    /// `synced <generation> <input_unix_nanos>`: the input time is the wall clock just before
    /// that sync read its input (for scripts and tests that wait for a change to land).
    /// SIGHUP makes the agent run a full resync and then rewrite this file.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Sync once and exit, leaving the datapath installed.
    #[arg(long)]
    pub once: bool,
}

/// (path, modified, length) of every manifest file: cheap to compare.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) => out.push((path, m.modified().ok(), m.len())),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut settings = config::settings(&args.node)?;
    if settings.node.node_ips.is_empty() {
        settings.node.node_ips = crate::node_addrs::detect().context("detecting node addresses")?;
        tracing::info!(addresses = ?settings.node.node_ips, "nodeIPs not configured: using every address of this network namespace");
    }
    tracing::info!(datapath = ?settings.datapath, "starting");
    let opts = crate::datapath::install_options(&settings, args.pin_dir.clone(), args.cgroup.clone())?;
    let (mut proxier, installed) = Proxier::start(&settings, &opts)?;
    let devices: Vec<String> = installed.devices.iter().map(|d| format!("{}({:?})", d.name, d.role)).collect();
    if installed.datapath == "nftables" {
        tracing::info!(
            "nftables datapath: tables ip/ip6 {} are replaced by the first sync",
            ferry_nft::services::TABLE
        );
    } else {
        tracing::info!(
            pin_dir = %opts.pin_dir.display(),
            cgroup = %opts.cgroup.display(),
            devices = %devices.join(","),
            adopted = installed.adopted,
            links_updated = installed.links_updated,
            links_attached = installed.links_attached,
            "datapath installed"
        );
    }

    log_masquerade(&settings.node);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let resync_asked = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, resync_asked.clone())
        .context("installing the SIGHUP handler")?;
    let mut generation: u64 = 0;
    let mut health_checks = crate::health::ServiceHealthServer::standalone().context("starting health checks")?;
    let mut seen = None;
    let mut ready = false;
    let mut last_gc = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if last_gc.elapsed() >= GC_PERIOD {
            last_gc = std::time::Instant::now();
            proxier.collect_expired_flows();
        }
        if resync_asked.swap(false, Ordering::Relaxed) {
            let input = SystemTime::now();
            match proxier.resync() {
                Ok(n) => {
                    tracing::info!(corrections = n, "resynced (SIGHUP)");
                    generation += 1;
                    write_ready_file(args.ready_file.as_deref(), "synced", generation, input)?;
                }
                Err(e) => tracing::error!("resync failed: {e:#}"),
            }
        }
        let now = fingerprint(&args.manifests);
        if seen.as_ref() != Some(&now) {
            seen = Some(now);
            let input = SystemTime::now();
            let state = super::load_manifests(&args.manifests)?;
            let synced = proxier.sync(&state);
            let ok = synced.is_ok();
            match synced {
                Ok(r) => {
                    for p in &r.new_problems {
                        tracing::warn!("{p}");
                    }
                    tracing::info!(
                        service_ports = r.service_ports,
                        map_ops = r.map_ops,
                        plan_ms = r.plan_time.as_secs_f64() * 1e3,
                        apply_ms = r.apply_time.as_secs_f64() * 1e3,
                        fixed_problems = r.fixed_problems,
                        stale_flows_deleted = r.stale_flows_deleted,
                        conntrack_deleted = r.conntrack.as_ref().map_or(0, |c| c.deleted()),
                        "synced"
                    );
                }
                Err(e) => tracing::error!("sync failed, will retry on the next change: {e:#}"),
            }
            if let Some(plan) = proxier.plan() {
                health_checks.update(&crate::health::HealthChecks::from_plan(plan));
            }
            if ok {
                generation += 1;
                write_ready_file(args.ready_file.as_deref(), "synced", generation, input)?;
            } else if !ready {
                // The first sync failed: say so, but still tell waiters the agent is up.
                write_ready_file(args.ready_file.as_deref(), "failed", generation, input)?;
            }
            ready = true;
            if args.once {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(args.poll_ms));
    }
    tracing::info!("stopping; the datapath stays installed and keeps serving (`ferry cleanup` removes it)");
    Ok(ExitCode::SUCCESS)
}

/// Rewrites the ready file (write aside, rename) with `<word> <generation> <input_unix_nanos>`.
fn write_ready_file(file: Option<&Path>, word: &str, generation: u64, input: SystemTime) -> anyhow::Result<()> {
    let Some(f) = file else { return Ok(()) };
    let nanos = input.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut tmp = f.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{word} {generation} {nanos}\n"))
        .with_context(|| format!("writing {}", f.display()))?;
    std::fs::rename(&tmp, f).with_context(|| format!("renaming the ready file into {}", f.display()))
}

/// How often expired connection-tracking entries are collected (the agent does it every syncPeriod).
const GC_PERIOD: Duration = Duration::from_secs(30);

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
