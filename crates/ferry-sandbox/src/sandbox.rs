//! [`Sandbox`]: a small cluster of network namespaces, cgroups and processes that is torn down on drop.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::exec;
use crate::naming;
use crate::{SandboxError, cgroup, netns};

/// Sandboxes made by one process get distinct names through this counter.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long cleanup waits for killed processes to go away before reporting a problem.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// One machine of a sandboxed cluster: a named network namespace (`ferry-<tag>-<pid>-<seq>-<name>`).
///
/// A `Host` is only a name; the [`Sandbox`] that made it owns the namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Host {
    name: String,
    netns: String,
}

impl Host {
    /// The short name given to [`Sandbox::add_host`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full namespace name, as listed by `ip netns list`.
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

/// A cluster of network namespaces ("hosts") linked by veth pairs, plus cgroups and processes.
///
/// Nothing is created in the root network namespace: veth pairs are created from inside one host with
/// their peer placed directly in the other, and no host is ever linked to the root namespace, so no
/// packet can leave the machine. Everything is named `ferry-<tag>-<pid>-<seq>-*`.
///
/// Dropping the sandbox (also while unwinding from a panic) kills the processes it spawned, removes its
/// cgroups, deletes its namespaces and its state directory. A run killed by SIGKILL leaves them behind;
/// [`crate::sweep_stale`] removes those once their owner process is gone.
///
/// Needs root, iproute2 and a kernel with network namespaces; cgroups need a cgroup2 mount.
///
/// ```no_run
/// use ferry_sandbox::Sandbox;
/// use std::process::Command;
/// let mut sb = Sandbox::new("demo")?;
/// let client = sb.add_host("client")?;
/// let server = sb.add_host("server")?;
/// sb.link(&client, "eth0", &server, "eth0")?;
/// sb.add_address(&client, "eth0", "198.18.0.1/24")?;
/// sb.add_address(&server, "eth0", "198.18.0.2/24")?;
/// let out = sb.run_in(&client, None, Command::new("ip").args(["-br", "addr"]))?;
/// # Ok::<(), ferry_sandbox::SandboxError>(())
/// ```
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    hosts: Vec<Host>,
    cgroups: Vec<PathBuf>,
    children: BTreeMap<u32, Child>,
    state_dir: Option<PathBuf>,
    run_timeout: Duration,
}

impl Sandbox {
    /// Starts an empty sandbox. `tag` (1-8 chars of a-z0-9) appears in every name it creates.
    pub fn new(tag: &str) -> Result<Sandbox, SandboxError> {
        naming::check_tag(tag)?;
        netns::ensure_dir()?;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        Ok(Sandbox {
            id: naming::sandbox_id(tag, std::process::id(), seq),
            hosts: Vec::new(),
            cgroups: Vec::new(),
            children: BTreeMap::new(),
            state_dir: None,
            run_timeout: DEFAULT_RUN_TIMEOUT,
        })
    }

    /// `ferry-<tag>-<pid>-<seq>`: the prefix of every object of this sandbox.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hosts created so far, in creation order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The cgroup directories created so far.
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }

    /// Sets the deadline for [`Sandbox::run_in`] and for the `ip` commands the sandbox runs (default 30 s).
    pub fn set_run_timeout(&mut self, timeout: Duration) {
        self.run_timeout = timeout;
    }

    /// Creates a host: a new network namespace with `lo` up, IPv4/IPv6 forwarding off and IPv6 duplicate
    /// address detection off.
    ///
    /// Forwarding is set explicitly because a new namespace inherits the root namespace's IPv4 settings
    /// (`net.core.devconf_inherit_init_net=0`), so on a machine running Docker it would start as a router.
    /// DAD is off because an interface's link-local address stays tentative for about two seconds, and
    /// until then a router cannot send neighbour solicitations for packets it forwards (it needs a
    /// usable link-local source), so forwarded IPv6 silently vanishes right after setup.
    pub fn add_host(&mut self, short_name: &str) -> Result<Host, SandboxError> {
        naming::check_object("host", short_name)?;
        if self.hosts.iter().any(|h| h.name == short_name) {
            return Err(SandboxError::InvalidName {
                kind: "host",
                name: short_name.to_owned(),
                reason: format!("sandbox {} already has a host with this name", self.id),
            });
        }
        let host = Host { name: short_name.to_owned(), netns: naming::object_name(&self.id, short_name) };
        netns::create(&host.netns, self.run_timeout)?;
        self.hosts.push(host.clone());
        self.ip(&host, &["link", "set", "lo", "up"])?;
        self.set_forwarding(&host, false)?;
        netns::write_sysctls(
            &host.netns,
            &[("net.ipv6.conf.all.accept_dad", "0"), ("net.ipv6.conf.default.accept_dad", "0")],
        )?;
        Ok(host)
    }

    /// Turns IPv4 and IPv6 forwarding on or off inside `host` (a node or router needs it on).
    pub fn set_forwarding(&self, host: &Host, on: bool) -> Result<(), SandboxError> {
        let value = if on { "1" } else { "0" };
        netns::write_sysctls(&host.netns, &[("net.ipv4.ip_forward", value), ("net.ipv6.conf.all.forwarding", value)])
    }

    /// Writes one `net.*` sysctl inside `host`, e.g. `net.ipv4.conf.all.rp_filter`.
    /// Other keys are refused: they are not per namespace and would change the machine.
    pub fn sysctl(&self, host: &Host, key: &str, value: &str) -> Result<(), SandboxError> {
        netns::write_sysctls(&host.netns, &[(key, value)])
    }

    /// Runs `ip -n <host's netns> ARGS...`; the escape hatch for anything without its own method
    /// (neighbour entries, rules, `link set` options).
    pub fn ip(&self, host: &Host, args: &[&str]) -> Result<Output, SandboxError> {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&host.netns).args(args);
        let what = format!("`ip {}` in host {}", args.join(" "), host.netns);
        exec::run_checked(what, cmd, None, self.run_timeout, "")
    }

    /// Runs many `ip` commands in one process (`ip -n NS -batch -`), one command per line without the
    /// leading `ip`; much faster than one process per command for large topologies.
    pub fn ip_batch(&self, host: &Host, lines: &[String]) -> Result<Output, SandboxError> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &host.netns, "-batch", "-"]);
        let mut input = lines.join("\n");
        input.push('\n');
        let what = format!("ip batch of {} commands in host {}", lines.len(), host.netns);
        exec::run_checked(
            what,
            cmd,
            Some(input.into_bytes()),
            self.run_timeout,
            " (the failing line number is in stderr)",
        )
    }

    /// Adds a Linux bridge `ifname` inside `host` and sets it up.
    pub fn add_bridge(&self, host: &Host, ifname: &str) -> Result<(), SandboxError> {
        naming::check_ifname(ifname)?;
        self.ip(host, &["link", "add", ifname, "type", "bridge"])?;
        self.ip(host, &["link", "set", ifname, "up"]).map(drop)
    }

    /// Links two hosts with a veth pair (`a_if` in `a`, `b_if` in `b`), both ends up.
    ///
    /// The pair is created inside `a` with its peer placed directly in `b`, so neither end ever exists
    /// in the root namespace.
    pub fn link(&self, a: &Host, a_if: &str, b: &Host, b_if: &str) -> Result<(), SandboxError> {
        naming::check_ifname(a_if)?;
        naming::check_ifname(b_if)?;
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &a.netns, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.netns]);
        let what = format!("creating veth {}:{a_if} <-> {}:{b_if}", a.netns, b.netns);
        exec::run_checked(what, cmd, None, self.run_timeout, " (is an interface with that name already there?)")?;
        self.ip(a, &["link", "set", a_if, "up"])?;
        self.ip(b, &["link", "set", b_if, "up"]).map(drop)
    }

    /// Turns GRO on for the veth `ifname` in `host`. A veth takes frames
    /// another device's XDP program sends into it (XDP_TX from its peer,
    /// XDP_REDIRECT to it) only with its NAPI running, which GRO (or an XDP
    /// program of its own) turns on; otherwise the kernel drops them. The
    /// same as `ethtool -K ifname gro on`, without needing ethtool.
    pub fn veth_gro(&self, host: &Host, ifname: &str) -> Result<(), SandboxError> {
        const ETHTOOL_SGRO: u32 = 0x2c;
        self.ethtool_set(host, ifname, ETHTOOL_SGRO, 1, "turning GRO on")
    }

    /// Turns transmit checksum offload off for `ifname` in `host`, so its
    /// packets leave with complete TCP/UDP checksums. A veth otherwise hands
    /// on packets whose checksum field holds only the pseudo-header's sum
    /// (the skb says the rest is still to be done), which an XDP program
    /// further on cannot tell (no skb): after it rewrote and sent the frame,
    /// the receiver finds a wrong checksum. Real NICs receive complete
    /// checksums. The same as `ethtool -K ifname tx off`.
    pub fn tx_checksum_off(&self, host: &Host, ifname: &str) -> Result<(), SandboxError> {
        const ETHTOOL_STXCSUM: u32 = 0x17;
        self.ethtool_set(host, ifname, ETHTOOL_STXCSUM, 0, "turning transmit checksum offload off")
    }

    /// One legacy ethtool "set" command (`struct ethtool_value`) on `ifname` in `host`.
    fn ethtool_set(&self, host: &Host, ifname: &str, cmd: u32, data: u32, what: &str) -> Result<(), SandboxError> {
        naming::check_ifname(ifname)?;
        let path = self.netns_path(host);
        let io = |step: &str, source: io::Error| SandboxError::Io {
            what: format!("{what} ({step}) for {ifname} in {}", host.netns),
            path: path.clone(),
            source,
            hint: "",
        };
        let ns = std::fs::File::open(&path).map_err(|e| io("opening the namespace", e))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a valid fd changes only this short-lived thread's namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io("joining the namespace", io::Error::last_os_error()));
                }
                // SAFETY: a plain datagram socket, closed below.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
                if fd < 0 {
                    return Err(io("opening a socket", io::Error::last_os_error()));
                }
                /// struct ethtool_value.
                #[repr(C)]
                struct EthtoolValue {
                    cmd: u32,
                    data: u32,
                }
                const SIOCETHTOOL: libc::c_ulong = 0x8946;
                let mut value = EthtoolValue { cmd, data };
                // SAFETY: an all-zero ifreq is valid; the name is shorter than IFNAMSIZ (checked above).
                let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
                for (d, b) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
                    *d = b as libc::c_char;
                }
                req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
                // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both live here.
                let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
                let err = io::Error::last_os_error();
                // SAFETY: closing the socket opened above.
                unsafe { libc::close(fd) };
                if rc < 0 { Err(io("SIOCETHTOOL", err)) } else { Ok(()) }
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Enslaves `ifname` to the bridge `bridge` inside `host`.
    pub fn attach_to_bridge(&self, host: &Host, ifname: &str, bridge: &str) -> Result<(), SandboxError> {
        self.ip(host, &["link", "set", ifname, "master", bridge]).map(drop)
    }

    /// Adds an IPv4 or IPv6 address (CIDR notation) to `ifname`.
    /// IPv6 addresses skip duplicate address detection (`nodad`), so they are usable at once.
    pub fn add_address(&self, host: &Host, ifname: &str, cidr: &str) -> Result<(), SandboxError> {
        let mut args = vec!["addr", "add", cidr, "dev", ifname];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(host, &args).map(drop)
    }

    /// Adds a route to `dst` (a CIDR or `default`) via a gateway and/or out of a device.
    pub fn add_route(&self, host: &Host, dst: &str, via: Option<&str>, dev: Option<&str>) -> Result<(), SandboxError> {
        // `default` alone says nothing about the family; the gateway does.
        let v6 = dst.contains(':') || via.is_some_and(|v| v.contains(':'));
        let mut args = vec![if v6 { "-6" } else { "-4" }, "route", "add", dst];
        if let Some(via) = via {
            args.extend(["via", via]);
        }
        if let Some(dev) = dev {
            args.extend(["dev", dev]);
        }
        self.ip(host, &args).map(drop)
    }

    /// Creates the cgroup `<cgroup2 mount>/ferry-<tag>-<pid>-<seq>-<short_name>`; removed on drop.
    pub fn cgroup(&mut self, short_name: &str) -> Result<PathBuf, SandboxError> {
        naming::check_object("cgroup", short_name)?;
        let dir = cgroup::cgroup2_mount()?.join(naming::object_name(&self.id, short_name));
        cgroup::create(&dir)?;
        self.cgroups.push(dir.clone());
        Ok(dir)
    }

    /// The bind-mounted namespace file of `host` (`/run/netns/<netns>`), for setns or `nsenter --net=`.
    pub fn netns_path(&self, host: &Host) -> PathBuf {
        netns::path(&host.netns)
    }

    /// A command that runs `program` inside `host`'s network namespace (joined between fork and exec;
    /// the mount namespace is unchanged, so /sys/fs/bpf and the cgroup2 mount stay visible).
    pub fn command(&self, host: &Host, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        netns::enter_before_exec(&mut cmd, &self.netns_path(host));
        cmd
    }

    /// Starts `cmd` inside `host` (and inside `cgroup`, joined before exec) and keeps it running; the
    /// sandbox kills it on drop. `cmd` may be a plain `Command::new(..)`. Returns the pid.
    pub fn spawn_in(&mut self, host: &Host, cgroup: Option<&Path>, mut cmd: Command) -> Result<u32, SandboxError> {
        self.prepare(host, cgroup, &mut cmd);
        let child = cmd.spawn().map_err(|source| SandboxError::CommandSpawn {
            what: format!("starting a process in host {}", host.netns),
            cmdline: exec::describe(&cmd),
            source,
        })?;
        let pid = child.id();
        self.children.insert(pid, child);
        Ok(pid)
    }

    /// Like [`Sandbox::spawn_in`], with the child's stdin and stdout piped to the caller (a client
    /// driven line by line, e.g. a held connection). The sandbox still kills it on drop.
    pub fn spawn_piped(
        &mut self,
        host: &Host,
        cgroup: Option<&Path>,
        mut cmd: Command,
    ) -> Result<(u32, std::process::ChildStdin, std::process::ChildStdout), SandboxError> {
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        self.prepare(host, cgroup, &mut cmd);
        let mut child = cmd.spawn().map_err(|source| SandboxError::CommandSpawn {
            what: format!("starting a process in host {}", host.netns),
            cmdline: exec::describe(&cmd),
            source,
        })?;
        let pid = child.id();
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        self.children.insert(pid, child);
        match (stdin, stdout) {
            (Some(i), Some(o)) => Ok((pid, i, o)),
            _ => unreachable!("both pipes were requested"),
        }
    }

    /// Runs `cmd` inside `host` (and `cgroup`) to completion with captured output, killing it after the
    /// sandbox's run timeout. A non-zero exit is returned as `Ok`: the caller decides what it means.
    pub fn run_in(&self, host: &Host, cgroup: Option<&Path>, cmd: &mut Command) -> Result<Output, SandboxError> {
        self.run_in_with_timeout(host, cgroup, cmd, self.run_timeout)
    }

    /// [`Sandbox::run_in`] with an explicit deadline.
    pub fn run_in_with_timeout(
        &self,
        host: &Host,
        cgroup: Option<&Path>,
        cmd: &mut Command,
        timeout: Duration,
    ) -> Result<Output, SandboxError> {
        self.prepare(host, cgroup, cmd);
        let what = format!("running a command in host {}", host.netns);
        let cmdline = exec::describe(cmd);
        match exec::output_with_timeout(cmd, None, timeout) {
            Ok(Some(out)) => Ok(out),
            Ok(None) => Err(SandboxError::CommandTimeout { what, cmdline, timeout }),
            Err(source) => Err(SandboxError::CommandSpawn { what, cmdline, source }),
        }
    }

    fn prepare(&self, host: &Host, cgroup: Option<&Path>, cmd: &mut Command) {
        netns::enter_before_exec(cmd, &self.netns_path(host));
        if let Some(dir) = cgroup {
            cgroup::join_before_exec(cmd, dir);
        }
    }

    /// Pids of the processes started with [`Sandbox::spawn_in`] that have not been killed yet.
    pub fn pids(&self) -> Vec<u32> {
        self.children.keys().copied().collect()
    }

    /// `Some(status)` once a spawned process has exited (it is then reaped and forgotten).
    pub fn try_wait(&mut self, pid: u32) -> Result<Option<ExitStatus>, SandboxError> {
        let unknown = self.unknown(pid);
        let child = self.children.get_mut(&pid).ok_or(unknown)?;
        let status = child.try_wait().map_err(|source| SandboxError::Io {
            what: format!("checking process {pid}"),
            path: format!("/proc/{pid}").into(),
            source,
            hint: "",
        })?;
        if status.is_some() {
            self.children.remove(&pid);
        }
        Ok(status)
    }

    /// Kills (SIGKILL) and reaps a process started by this sandbox, e.g. to simulate an agent crash.
    pub fn kill(&mut self, pid: u32) -> Result<ExitStatus, SandboxError> {
        let mut child = self.children.remove(&pid).ok_or_else(|| self.unknown(pid))?;
        kill_and_reap(&mut child)
            .map_err(|detail| SandboxError::NotReady { what: format!("killing process {pid}"), detail })
    }

    fn unknown(&self, pid: u32) -> SandboxError {
        SandboxError::UnknownProcess { pid, sandbox: self.id.clone() }
    }

    /// A directory for this sandbox's files (ready files, logs): `<tmp>/ferry-<tag>-<pid>-<seq>-files`,
    /// removed on drop.
    pub fn state_dir(&mut self) -> Result<PathBuf, SandboxError> {
        if let Some(dir) = &self.state_dir {
            return Ok(dir.clone());
        }
        let dir = std::env::temp_dir().join(naming::object_name(&self.id, "files"));
        fs::create_dir_all(&dir).map_err(|source| SandboxError::Io {
            what: "creating the sandbox state directory".into(),
            path: dir.clone(),
            source,
            hint: "",
        })?;
        self.state_dir = Some(dir.clone());
        Ok(dir)
    }

    /// Waits (polling, bounded by `timeout`) until `file` exists, failing early if process `pid` exits.
    pub fn wait_for_file(&mut self, pid: u32, file: &Path, timeout: Duration) -> Result<(), SandboxError> {
        let deadline = Instant::now() + timeout;
        loop {
            if file.exists() {
                return Ok(());
            }
            if let Some(status) = self.try_wait(pid)? {
                return Err(SandboxError::NotReady {
                    what: format!("waiting for {}", file.display()),
                    detail: format!("process {pid} exited first ({status})"),
                });
            }
            if Instant::now() >= deadline {
                return Err(SandboxError::NotReady {
                    what: format!("waiting for {}", file.display()),
                    detail: format!("process {pid} did not create it within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Tears the sandbox down now and reports anything that could not be removed.
    /// Dropping does the same but can only print the problems.
    pub fn close(mut self) -> Result<(), SandboxError> {
        let problems = self.cleanup();
        if problems.is_empty() { Ok(()) } else { Err(SandboxError::Cleanup { sandbox: self.id.clone(), problems }) }
    }

    /// Processes first (they keep namespaces alive and cgroups busy), then cgroups, then namespaces.
    fn cleanup(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for (pid, mut child) in std::mem::take(&mut self.children) {
            if let Err(detail) = kill_and_reap(&mut child) {
                problems.push(format!("process {pid}: {detail}"));
            }
        }
        for dir in std::mem::take(&mut self.cgroups).iter().rev() {
            if let Err(e) = cgroup::remove(dir, REAP_TIMEOUT) {
                problems.push(e.to_string());
            }
        }
        for host in std::mem::take(&mut self.hosts).iter().rev() {
            problems.extend(remove_netns(&host.netns, self.run_timeout));
        }
        if let Some(dir) = self.state_dir.take()
            && let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
        problems
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for problem in self.cleanup() {
            eprintln!("ferry-sandbox {}: cleanup problem: {problem}", self.id);
        }
    }
}

fn kill_and_reap(child: &mut Child) -> Result<ExitStatus, String> {
    // An already-exited child makes kill fail; reaping it below is all that is left to do.
    let _ = child.kill();
    match exec::wait_bounded(child, REAP_TIMEOUT) {
        Ok(Some(status)) => Ok(status),
        Ok(None) => Err(format!("still running {REAP_TIMEOUT:?} after SIGKILL")),
        Err(e) => Err(format!("waiting for it failed: {e}")),
    }
}

/// Kills whatever still runs inside a namespace we created (e.g. grandchildren of spawned processes, or
/// processes a caller spawned from [`Sandbox::command`] itself), then deletes the namespace.
pub(crate) fn remove_netns(name: &str, timeout: Duration) -> Vec<String> {
    let mut problems = Vec::new();
    let path = netns::path(name);
    if !path.exists() {
        return problems;
    }
    let pids = netns::pids_inside(&path);
    for &pid in &pids {
        // SAFETY: sending a signal has no memory-safety implications.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let deadline = Instant::now() + REAP_TIMEOUT;
    while !pids.is_empty() && !netns::pids_inside(&path).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Err(e) = netns::delete(name, timeout) {
        problems.push(e.to_string());
    }
    problems
}
