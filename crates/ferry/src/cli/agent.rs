//! `ferry agent`: the DaemonSet entrypoint. Watches the Kubernetes API and
//! keeps this node's eBPF datapath in step with it (see `crate::agent`).

use crate::agent::sync::InstallOverrides;
use crate::agent::{self, AgentOptions};
use crate::config::NodeFlags;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file: a kube-proxy KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1)
    /// or a ferry node config, told apart by apiVersion/kind. Fields of a kube-proxy
    /// file that do not apply to ferry are listed once at start.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeFlags,
    /// This node's name (same as --node-name; default: NODE_NAME, else the hostname).
    #[arg(long, value_name = "NAME", conflicts_with = "node_name")]
    pub hostname_override: Option<String>,
    /// kubeconfig to reach the API server (default: the pod's service account,
    /// else KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Where /healthz and /livez are served (default 0.0.0.0:10256; "" turns them off).
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<String>,
    /// Where /metrics is served (default 127.0.0.1:10249; "" turns it off).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,
    /// Pin directory on bpffs (overrides bpf.pinPath; default /sys/fs/bpf/ferry).
    #[arg(long, value_name = "PATH")]
    pub pin_dir: Option<PathBuf>,
    /// cgroup v2 directory to load-balance sockets of (overrides bpf.cgroupPath; default: the cgroup2 root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Written once the first sync is programmed, then rewritten after every successful sync as
    /// `synced <generation> <input_unix_nanos>` (for scripts and tests).
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let mut node = args.node;
    if args.hostname_override.is_some() {
        node.node_name = args.hostname_override;
    }
    let opts = AgentOptions {
        config: args.config,
        node,
        kubeconfig: args.kubeconfig,
        healthz_bind_address: args.healthz_bind_address,
        metrics_bind_address: args.metrics_bind_address,
        install: InstallOverrides { pin_dir: args.pin_dir, cgroup: args.cgroup },
        ready_file: args.ready_file,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ferry-agent")
        .on_thread_park(crate::memory::release_idle)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run(opts, stop_signal()))?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGTERM (the kubelet stopping the pod) or SIGINT.
/// Completes on SIGTERM or SIGINT.
pub(crate) async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
