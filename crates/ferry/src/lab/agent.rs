//! Lab nodes' agents: their config file, their manifests, starting and stopping them.

use super::Lab;
use anyhow::{Context, bail};
use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

impl Lab {
    /// Writes node `node`'s config: its name, addresses, pin directory,
    /// cgroup and devices (the uplink eth0, the pod bridge br0), then `extra`
    /// (more YAML keys, e.g. CIDRs and proxy settings; not `bpf`).
    pub fn write_node_config(&self, node: usize, extra: &str) -> anyhow::Result<()> {
        let n = &self.nodes[node];
        let ips: Vec<String> = self.node_ips(node).iter().map(|ip| format!("\"{ip}\"")).collect();
        let mut text = format!(
            "# written by the ferry lab\nnodeName: {}\nbpf:\n  pinPath: {}\n  cgroupPath: {}\n  devices: [eth0]\n  podDevices: [br0]\n",
            n.name,
            n.pin_dir.display(),
            n.cgroup.display()
        );
        if !extra.contains("nodeIPs:") {
            text.push_str(&format!("nodeIPs: [{}]\n", ips.join(", ")));
        }
        if !extra.contains("primaryIPs:") {
            text.push_str(&format!("primaryIPs: [\"{}\", \"{}\"]\n", n.primary_v4, n.primary_v6));
        }
        text.push_str(extra);
        std::fs::write(&n.config, text).with_context(|| format!("writing {}", n.config.display()))
    }

    /// Writes a kubeconfig for the API server at `url` (plain HTTP, a dummy
    /// token) into the lab's state directory and returns its path.
    pub fn write_kubeconfig(&self, url: &str) -> anyhow::Result<std::path::PathBuf> {
        let path = self.state.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
             clusters: [{{name: lab, cluster: {{server: '{url}'}}}}]\n\
             users: [{{name: lab, user: {{token: lab}}}}]\n\
             contexts: [{{name: lab, context: {{cluster: lab, user: lab}}}}]\n"
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Replaces node `node`'s manifest directory with one file holding `yaml`.
    /// The file is written aside and renamed, so the agent never reads half of it.
    pub fn write_manifests(&self, node: usize, yaml: &str) -> anyhow::Result<()> {
        let dir = &self.nodes[node].manifests;
        let tmp = dir.with_extension("tmp.yaml");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join("cluster.yaml"))?;
        Ok(())
    }

    /// Replaces node `node`'s manifests with the objects of `state` (one JSON `List`).
    pub fn write_manifests_json(&self, node: usize, state: &ferry_model::ClusterState) -> anyhow::Result<()> {
        self.replace_manifests_json(node, state).map(drop)
    }

    /// Like [`Lab::write_manifests_json`]; returns the wall-clock time taken just before the new
    /// file was renamed in, so a caller can wait for a sync whose input was read after it.
    pub fn replace_manifests_json(
        &self,
        node: usize,
        state: &ferry_model::ClusterState,
    ) -> anyhow::Result<std::time::SystemTime> {
        let mut items = Vec::new();
        for n in state.nodes.values() {
            let mut v = serde_json::to_value(n)?;
            v["apiVersion"] = "v1".into();
            v["kind"] = "Node".into();
            items.push(v);
        }
        for s in state.services.values() {
            let mut v = serde_json::to_value(s)?;
            v["apiVersion"] = "v1".into();
            v["kind"] = "Service".into();
            items.push(v);
        }
        for s in state.endpoint_slices.values() {
            let mut v = serde_json::to_value(s)?;
            v["apiVersion"] = "discovery.k8s.io/v1".into();
            v["kind"] = "EndpointSlice".into();
            items.push(v);
        }
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let dir = &self.nodes[node].manifests;
        let tmp = dir.with_extension("tmp.json");
        std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
        let before = std::time::SystemTime::now();
        std::fs::rename(&tmp, dir.join("cluster.json"))?;
        Ok(before)
    }

    /// Starts node `node`'s agent (`ferry run`) and waits until its first sync is programmed.
    pub fn start_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let manifests = self.nodes[node].manifests.clone();
        let args = [OsStr::new("run"), OsStr::new("--manifests"), manifests.as_os_str()];
        self.spawn_agent(node, &args, Duration::from_secs(30))
    }

    /// Starts node `node`'s agent as `ferry agent`, reading the cluster from the API
    /// server `kubeconfig` points at, and waits (at most `limit`) for its first sync.
    pub fn start_api_agent(&mut self, node: usize, kubeconfig: &Path, limit: Duration) -> anyhow::Result<()> {
        let args = [OsStr::new("agent"), OsStr::new("--kubeconfig"), kubeconfig.as_os_str()];
        self.spawn_agent(node, &args, limit)
    }

    fn spawn_agent(&mut self, node: usize, source_args: &[&OsStr], limit: Duration) -> anyhow::Result<()> {
        if self.nodes[node].agent.is_some() {
            bail!("the agent of {} is already running", self.nodes[node].name);
        }
        let n = &self.nodes[node];
        let ready = self.ready_file(node);
        let _ = std::fs::remove_file(&ready);
        let log_path = self.state.join(format!("agent-{node}.log"));
        let log = File::options().create(true).append(true).open(&log_path)?;
        let mut cmd = self.sb.command(&n.host, &self.ferry);
        cmd.args(source_args)
            .arg("--node-config")
            .arg(&n.config)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let host = n.host.clone();
        let pid = self.sb.spawn_in(&host, None, cmd)?;
        self.nodes[node].agent = Some(pid);
        self.sb
            .wait_for_file(pid, &ready, limit)
            .with_context(|| format!("agent log:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default()))?;
        Ok(())
    }

    /// The process id of node `node`'s running agent.
    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].agent
    }

    /// Kills node `node`'s agent without warning (SIGKILL): the datapath stays pinned.
    pub fn kill_agent(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(pid) = self.nodes[node].agent.take() {
            self.sb.kill(pid)?;
        }
        Ok(())
    }

    /// The input time (Unix nanoseconds) of node `node`'s last reported sync,
    /// from its ready file (`synced <generation> <input_unix_nanos>`).
    pub fn synced_input(&self, node: usize) -> Option<u128> {
        let text = std::fs::read_to_string(self.ready_file(node)).ok()?;
        let mut words = text.split_whitespace();
        if words.next()? != "synced" {
            return None;
        }
        words.nth(1)?.parse().ok()
    }

    /// The agent's `--ready-file`: `synced <generation> <input_unix_nanos>` after every sync.
    pub fn ready_file(&self, node: usize) -> std::path::PathBuf {
        self.state.join(format!("agent-{node}.ready"))
    }

    /// Sends SIGHUP to node `node`'s agent: `ferry run` resyncs its datapath and rewrites its ready file.
    pub fn hangup_agent(&self, node: usize) -> anyhow::Result<()> {
        let pid =
            self.nodes[node].agent.with_context(|| format!("the agent of {} is not running", self.nodes[node].name))?;
        // SAFETY: kill(2) with a pid this lab started and still owns.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) } != 0 {
            bail!("SIGHUP to the agent of {} (pid {pid}): {}", self.nodes[node].name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether node `node`'s agent was started and has exited since (e.g. on a fatal error).
    pub fn agent_exited(&mut self, node: usize) -> bool {
        match self.nodes[node].agent {
            Some(pid) => matches!(self.sb.try_wait(pid), Ok(Some(_))),
            None => false,
        }
    }

    /// What node `node`'s eBPF datapath counted so far, as `ferry status --json` reports it.
    pub fn counters(&self, node: usize) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let out = std::process::Command::new(&self.ferry)
            .args(["status", "--json", "--pin-dir"])
            .arg(&self.nodes[node].pin_dir)
            .output()
            .context("running ferry status")?;
        if !out.status.success() {
            bail!("ferry status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ferry status --json prints JSON")?;
        serde_json::from_value(v["counters"].clone()).context("counters are a map of numbers")
    }

    /// Each node's counters and agent log, for a failed test's message.
    pub fn report(&self, nodes: &[usize]) -> String {
        let mut out = String::new();
        for &n in nodes {
            let name = &self.nodes[n].name;
            match self.counters(n) {
                Ok(c) => out.push_str(&format!("--- {name} counters {c:?}\n")),
                Err(e) => out.push_str(&format!("--- {name} counters unreadable: {e:#}\n")),
            }
            out.push_str(&format!("--- {name} log:\n{}\n", self.agent_log(n)));
        }
        out
    }

    /// The agent's log so far (for failure messages).
    pub fn agent_log(&self, node: usize) -> String {
        std::fs::read_to_string(self.state.join(format!("agent-{node}.log"))).unwrap_or_default()
    }

    /// Polls `check` every 50 ms until it returns true, for at most `limit`.
    pub fn wait_until(&self, limit: Duration, mut check: impl FnMut(&Lab) -> bool) -> bool {
        let start = Instant::now();
        loop {
            if check(self) {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `after - before` of the counters that moved (what a step did to a node's datapath).
pub fn counters_moved(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, a)| {
            let d = a.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}
