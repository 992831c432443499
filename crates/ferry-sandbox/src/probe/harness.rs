//! Driving the probe from a [`Sandbox`]: start a server and wait until it listens, run a client and
//! parse what it observed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{ConnectMode, ConnectOpts, Observation, ServeOpts};
use crate::exec;
use crate::{Host, Sandbox, SandboxError};

/// How long a server may take to bind its sockets.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of the client's own timeouts before the sandbox kills it.
const CLIENT_SLACK: Duration = Duration::from_secs(10);

/// Which program runs the probe: `ferry-probe`, or `ferry` with leading args `["probe"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeCommand {
    /// The executable.
    pub program: PathBuf,
    /// Arguments placed before `serve` / `connect`.
    pub leading_args: Vec<String>,
}

impl ProbeCommand {
    /// A probe started as `program serve|connect ...`.
    pub fn new(program: impl Into<PathBuf>) -> ProbeCommand {
        ProbeCommand { program: program.into(), leading_args: Vec::new() }
    }

    /// A probe started as `program LEADING_ARGS... serve|connect ...`.
    pub fn with_leading_args(program: impl Into<PathBuf>, leading_args: &[&str]) -> ProbeCommand {
        ProbeCommand { program: program.into(), leading_args: leading_args.iter().map(|s| s.to_string()).collect() }
    }

    fn command(&self, args: Vec<String>) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.leading_args).args(args);
        cmd
    }
}

impl Sandbox {
    /// Starts a probe server in `host` (and `cgroup`) and returns its pid once every socket is bound.
    ///
    /// The ready file and the server's stderr (`serve-<n>.log`) live in the sandbox state directory; the
    /// log is quoted if the server exits before it is ready.
    pub fn start_probe_server(
        &mut self,
        host: &Host,
        cgroup: Option<&Path>,
        probe: &ProbeCommand,
        opts: &ServeOpts,
    ) -> Result<u32, SandboxError> {
        let dir = self.state_dir()?;
        let n = next_serial();
        let ready = dir.join(format!("serve-{n}.ready"));
        let log = dir.join(format!("serve-{n}.log"));
        let mut opts = opts.clone();
        opts.ready_file = Some(ready.clone());
        let mut cmd = probe.command(opts.to_args());
        let log_file = File::create(&log).map_err(|source| SandboxError::Io {
            what: "creating the probe server log".into(),
            path: log.clone(),
            source,
            hint: "",
        })?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
        let pid = self.spawn_in(host, cgroup, cmd)?;
        self.wait_for_file(pid, &ready, READY_TIMEOUT).map_err(|e| match e {
            SandboxError::NotReady { what, detail } => SandboxError::NotReady {
                what: format!("starting probe server {} in host {}", opts.name, host.netns()),
                detail: format!(
                    "{what}: {detail}; server log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                ),
            },
            other => other,
        })?;
        Ok(pid)
    }

    /// Runs one probe attempt from `host` (and `cgroup`) and returns what it observed.
    pub fn probe_connect(
        &self,
        host: &Host,
        cgroup: Option<&Path>,
        probe: &ProbeCommand,
        opts: &ConnectOpts,
    ) -> Result<Observation, SandboxError> {
        let mut all = self.probe_connect_mode(host, cgroup, probe, opts, ConnectMode::Once)?;
        match all.len() {
            1 => Ok(all.remove(0)),
            n => Err(SandboxError::ProbeOutput {
                host: host.netns().to_owned(),
                cmdline: format!("{:?}", opts.to_args(ConnectMode::Once)),
                detail: format!("expected one observation, got {n}"),
            }),
        }
    }

    /// Runs a probe client with `--count` or `--keep-open` and returns every observation, in order.
    pub fn probe_connect_mode(
        &self,
        host: &Host,
        cgroup: Option<&Path>,
        probe: &ProbeCommand,
        opts: &ConnectOpts,
        mode: ConnectMode,
    ) -> Result<Vec<Observation>, SandboxError> {
        let mut cmd = probe.command(opts.to_args(mode));
        let cmdline = exec::describe(&cmd);
        let budget = match mode {
            ConnectMode::Once => opts.timeout,
            ConnectMode::Count(n) => opts.timeout.saturating_mul(n),
            ConnectMode::KeepOpen(hold) | ConnectMode::UdpStream(hold) => hold + opts.timeout.saturating_mul(2),
            // Run to completion, stdin is empty: one exchange, then the held client exits.
            ConnectMode::Held(_) => opts.timeout.saturating_mul(2),
        };
        let out = self.run_in_with_timeout(host, cgroup, &mut cmd, budget + CLIENT_SLACK)?;
        let failed = |detail: String| SandboxError::ProbeOutput {
            host: host.netns().to_owned(),
            cmdline: cmdline.clone(),
            detail,
        };
        if !out.status.success() {
            return Err(failed(format!("{}; stderr: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| failed(format!("line {l:?}: {e}"))))
            .collect()
    }
}

/// Distinguishes ready files of servers started by the same sandbox.
fn next_serial() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}
