//! Lab traffic: servers in pods and hosts, clients sending real connections.

use super::Lab;
use anyhow::Context;
use ferry_sandbox::Host;
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation, ServeOpts};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Where a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The node itself (its host network namespace, in its cgroup).
    Node(usize),
    /// Pod `.1` of node `.0` (in the node's cgroup).
    Pod(usize, usize),
    /// An external host.
    External(usize),
}

/// A client started in the background.
pub struct BackgroundClient {
    pub pid: u32,
    output: PathBuf,
}

impl BackgroundClient {
    /// What it observed so far, while it runs (the complete lines of its output).
    pub fn observed(&self) -> Vec<Observation> {
        observed_in(&self.output)
    }
}

/// The observations a probe client has written to `output` so far: its
/// complete lines (the one being written is left for the next read).
pub fn observed_in(output: &Path) -> Vec<Observation> {
    let text = std::fs::read_to_string(output).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client output line {l:?}: {e}")))
        .collect()
}

impl Lab {
    pub fn host(&self, at: At) -> &Host {
        match at {
            At::Node(n) => &self.nodes[n].host,
            At::Pod(n, p) => &self.nodes[n].pods[p].host,
            At::External(x) => &self.externals[x].host,
        }
    }

    fn cgroup(&self, at: At) -> Option<&Path> {
        match at {
            At::Node(n) | At::Pod(n, _) => Some(self.nodes[n].cgroup.as_path()),
            At::External(_) => None,
        }
    }

    /// Every address configured in a host (all interfaces).
    pub fn addresses(&self, at: At) -> anyhow::Result<std::collections::BTreeSet<std::net::IpAddr>> {
        let out = self.sb.ip(self.host(at), &["-j", "addr", "show"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing `ip -j addr`")?;
        let mut set = std::collections::BTreeSet::new();
        for link in v.as_array().into_iter().flatten() {
            for a in link["addr_info"].as_array().into_iter().flatten() {
                if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                    set.insert(ip);
                }
            }
        }
        Ok(set)
    }

    /// Starts a probe server named `name` at `at`, listening on `listen`.
    pub fn serve(&mut self, at: At, name: &str, listen: Vec<Endpoint>) -> anyhow::Result<u32> {
        self.serve_with(at, ServeOpts::new(name, listen))
    }

    /// Like `serve`, with full options (e.g. `echo_lines` for long-lived connections).
    pub fn serve_with(&mut self, at: At, opts: ServeOpts) -> anyhow::Result<u32> {
        let host = self.host(at).clone();
        let cgroup = self.cgroup(at).map(Path::to_path_buf);
        let probe = self.probe.clone();
        Ok(self.sb.start_probe_server(&host, cgroup.as_deref(), &probe, &opts)?)
    }

    /// One connection attempt from `at`.
    pub fn connect(&self, at: At, opts: &ConnectOpts) -> anyhow::Result<Observation> {
        Ok(self.sb.probe_connect(self.host(at), self.cgroup(at), &self.probe, opts)?)
    }

    /// `count` sequential connections from `at`, each on a new socket.
    pub fn connect_many(&self, at: At, opts: &ConnectOpts, count: u32) -> anyhow::Result<Vec<Observation>> {
        Ok(self.sb.probe_connect_mode(self.host(at), self.cgroup(at), &self.probe, opts, ConnectMode::Count(count))?)
    }

    /// Starts a client in the background (e.g. one connection held open for a while).
    pub fn spawn_client(&mut self, at: At, opts: &ConnectOpts, mode: ConnectMode) -> anyhow::Result<BackgroundClient> {
        let output = self.state.join(format!("client-{}.out", self.sb.pids().len()));
        let mut cmd = self.sb.command(self.host(at), &self.probe.program);
        cmd.args(&self.probe.leading_args)
            .args(opts.to_args(mode))
            .stdin(Stdio::null())
            .stdout(File::create(&output)?)
            .stderr(Stdio::null());
        let host = self.host(at).clone();
        let cgroup = self.cgroup(at).map(Path::to_path_buf);
        let pid = self.sb.spawn_in(&host, cgroup.as_deref(), cmd)?;
        Ok(BackgroundClient { pid, output })
    }

    /// Starts a held TCP connection from `at` (`connect --held`): its first exchange is printed at
    /// once, and one more for every line written to its stdin. The lab kills it on drop.
    pub fn spawn_held(
        &mut self,
        at: At,
        opts: &ConnectOpts,
        lifetime: Duration,
    ) -> anyhow::Result<(u32, std::process::ChildStdin, std::process::ChildStdout)> {
        let mut cmd = self.sb.command(self.host(at), &self.probe.program);
        cmd.args(&self.probe.leading_args).args(opts.to_args(ConnectMode::Held(lifetime))).stderr(Stdio::null());
        let host = self.host(at).clone();
        let cgroup = self.cgroup(at).map(Path::to_path_buf);
        Ok(self.sb.spawn_piped(&host, cgroup.as_deref(), cmd)?)
    }

    /// Waits (at most `limit`) for a background client and returns what it observed.
    pub fn finish_client(&mut self, c: BackgroundClient, limit: Duration) -> anyhow::Result<Vec<Observation>> {
        let start = std::time::Instant::now();
        while self.sb.try_wait(c.pid)?.is_none() {
            if start.elapsed() > limit {
                self.sb.kill(c.pid)?;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&c.output).context("reading the client's output")?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("client output line {l:?}")))
            .collect()
    }
}
