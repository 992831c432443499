//! What a sandbox leaves on the machine: cgroup and netns membership of spawned processes, per-host
//! sysctls, nothing in the root namespace, and nothing at all after drop (even on panic) or after a
//! sweep of a dead run's leftovers.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_sandbox::{Sandbox, SandboxError, cgroup_procs, cgroup2_mount, sweep_stale};

const SIGKILL: i32 = 9;

fn sleeper() -> Command {
    let mut cmd = Command::new("sleep");
    cmd.arg("30").stdin(Stdio::null());
    cmd
}

fn netns_names() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[test]
fn spawned_processes_join_cgroup_and_netns_before_exec() {
    let mut sb = Sandbox::new("cg").unwrap();
    let host = sb.add_host("node").unwrap();
    let cgroup = sb.cgroup("clients").unwrap();
    assert!(cgroup.starts_with(cgroup2_mount().unwrap()));
    assert!(cgroup.file_name().unwrap().to_str().unwrap().starts_with("ferry-cg-"));

    let pid = sb.spawn_in(&host, Some(&cgroup), sleeper()).unwrap();
    assert_eq!(cgroup_procs(&cgroup).unwrap(), vec![pid]);
    assert!(same_file(Path::new(&format!("/proc/{pid}/ns/net")), &sb.netns_path(&host)));

    // The process is in the cgroup from its first instruction, so it reads its own membership.
    let out = sb.run_in(&host, Some(&cgroup), Command::new("cat").arg("/proc/self/cgroup")).unwrap();
    let name = cgroup.file_name().unwrap().to_str().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("0::/{name}")), "{out:?}");

    let status = sb.kill(pid).unwrap();
    assert_eq!(status.signal(), Some(SIGKILL));
    assert!(cgroup_procs(&cgroup).unwrap().is_empty());
    sb.close().unwrap();
    assert!(!cgroup.exists());
}

#[test]
fn forwarding_and_sysctls_stay_inside_the_host() {
    let root_forwarding = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let sb_and_host = || -> Result<(), SandboxError> {
        let mut sb = Sandbox::new("sysctl")?;
        let host = sb.add_host("router")?;
        let read = |sb: &Sandbox, file: &str| {
            let out = sb.run_in(&host, None, Command::new("cat").arg(file)).unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        assert_eq!(read(&sb, "/proc/sys/net/ipv4/ip_forward"), "0");
        assert_eq!(read(&sb, "/proc/sys/net/ipv6/conf/all/forwarding"), "0");
        sb.set_forwarding(&host, true)?;
        assert_eq!(read(&sb, "/proc/sys/net/ipv4/ip_forward"), "1");
        assert_eq!(read(&sb, "/proc/sys/net/ipv6/conf/all/forwarding"), "1");
        sb.sysctl(&host, "net.ipv4.conf.all.rp_filter", "2")?;
        assert_eq!(read(&sb, "/proc/sys/net/ipv4/conf/all/rp_filter"), "2");
        assert!(matches!(sb.sysctl(&host, "kernel.pid_max", "1000"), Err(SandboxError::SysctlNotPerNetns { .. })));
        assert!(matches!(sb.sysctl(&host, "net.ipv4.no_such_key", "1"), Err(SandboxError::Sysctl { .. })));
        sb.close()
    };
    sb_and_host().unwrap();
    assert_eq!(fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(), root_forwarding);
}

#[test]
fn links_never_appear_in_the_root_namespace() {
    let mut sb = Sandbox::new("rootns").unwrap();
    let a = sb.add_host("a").unwrap();
    let b = sb.add_host("b").unwrap();
    sb.link(&a, "fsbxa0", &b, "fsbxb0").unwrap();
    sb.add_bridge(&a, "fsbxbr0").unwrap();
    let root = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    let root = String::from_utf8_lossy(&root.stdout);
    for name in ["fsbxa0", "fsbxb0", "fsbxbr0"] {
        assert!(!root.contains(name), "{name} showed up in the root namespace");
    }
    let inside = sb.ip(&a, &["-o", "link", "show"]).unwrap();
    assert!(String::from_utf8_lossy(&inside.stdout).contains("fsbxa0"));
    let error = sb.link(&a, "this-name-is-too-long", &b, "x").unwrap_err();
    assert!(error.to_string().contains("15"), "{error}");
}

#[test]
fn drop_cleans_up_even_when_the_test_body_panics() {
    let mut created: Option<(Vec<String>, PathBuf, PathBuf, u32)> = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut sb = Sandbox::new("panic").unwrap();
        let a = sb.add_host("a").unwrap();
        let b = sb.add_host("b").unwrap();
        sb.link(&a, "eth0", &b, "eth0").unwrap();
        let cgroup = sb.cgroup("cg").unwrap();
        let pid = sb.spawn_in(&a, Some(&cgroup), sleeper()).unwrap();
        // A process the caller spawned itself from `command` is not tracked, but it lives in the
        // namespace, so deleting the namespace must still end it.
        let untracked = sb.command(&b, "sleep").arg("30").stdin(Stdio::null()).spawn().unwrap();
        let state = sb.state_dir().unwrap();
        created = Some((vec![a.netns().to_owned(), b.netns().to_owned()], cgroup, state, pid));
        drop(untracked); // dropping a Child neither kills nor waits: only the sandbox can end it
        panic!("the test body failed");
    }));
    assert!(outcome.is_err());
    let (namespaces, cgroup, state, pid) = created.expect("the body ran up to the panic");
    let listed = netns_names();
    for ns in &namespaces {
        assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} still in /run/netns");
        assert!(!listed.contains(ns.as_str()), "{ns} still listed");
    }
    assert!(!cgroup.exists(), "{} still exists", cgroup.display());
    assert!(!state.exists(), "{} still exists", state.display());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "spawned process {pid} survived");
}

/// Removes a namespace or cgroup made by hand in a test, whatever happens.
struct Made(Vec<String>, Vec<PathBuf>);

impl Drop for Made {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", ns]).stderr(Stdio::null()).status();
        }
        for dir in &self.1 {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The sweep tests run one at a time: a sweep removes every dead owner's leftovers, including the ones
/// another sweep test is about to look for.
static SWEEPS: Mutex<()> = Mutex::new(());

#[test]
fn sweep_removes_leftovers_of_dead_owners_only() {
    let _one_sweep = SWEEPS.lock().unwrap_or_else(|e| e.into_inner());
    // A real pid that has exited: what a SIGKILLed test run leaves in its names.
    let dead = {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    assert!(!Path::new(&format!("/proc/{dead}")).exists());
    let stale_ns = format!("ferry-sweep-{dead}-0-node");
    let live_ns = format!("ferry-sweep-{}-999-node", std::process::id());
    let stale_cg = cgroup2_mount().unwrap().join(format!("ferry-sweep-{dead}-0-cg"));
    let _made = Made(vec![stale_ns.clone(), live_ns.clone()], vec![stale_cg.clone()]);
    for ns in [&stale_ns, &live_ns] {
        assert!(Command::new("ip").args(["netns", "add", ns]).status().unwrap().success());
    }
    fs::create_dir(&stale_cg).unwrap();

    // An orphan still running inside the stale namespace, as after the owner's SIGKILL.
    let stale_path = Path::new("/run/netns").join(&stale_ns);
    let mut orphan = Command::new("nsenter")
        .arg(format!("--net={}", stale_path.display()))
        .args(["sleep", "30"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let orphan_ns = PathBuf::from(format!("/proc/{}/ns/net", orphan.id()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !same_file(&orphan_ns, &stale_path) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(same_file(&orphan_ns, &stale_path), "nsenter did not enter {stale_ns}");

    let report = sweep_stale().unwrap();
    assert!(report.netns_removed.contains(&stale_ns), "{report:?}");
    assert!(report.cgroups_removed.contains(&stale_cg), "{report:?}");
    assert!(!report.netns_removed.contains(&live_ns), "{report:?}");
    assert!(Path::new("/run/netns").join(&live_ns).exists(), "a live owner's namespace was swept");
    assert!(!stale_path.exists());
    assert!(!stale_cg.exists());

    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = orphan.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = orphan.kill();
            let _ = orphan.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.and_then(|s| s.signal()), Some(SIGKILL), "the orphan was not killed by the sweep");
}

/// Set in the child process of `sigkilled_run_is_swept`: where to write the names it created.
const CHILD_ENV: &str = "FERRY_SANDBOX_TEST_CHILD_NAMES";

/// Runs only as the child of `sigkilled_run_is_swept`: builds a sandbox, reports what it made, and
/// waits to be killed.
#[test]
fn child_that_gets_sigkilled() {
    let Some(names_file) = std::env::var_os(CHILD_ENV) else { return };
    let mut sb = Sandbox::new("killed").unwrap();
    let host = sb.add_host("node").unwrap();
    let cgroup = sb.cgroup("cg").unwrap();
    let pid = sb.spawn_in(&host, Some(&cgroup), sleeper()).unwrap();
    let state = sb.state_dir().unwrap();
    let names = format!("{}\n{}\n{}\n{pid}\n", host.netns(), cgroup.display(), state.display());
    fs::write(PathBuf::from(&names_file).with_extension("tmp"), names).unwrap();
    fs::rename(PathBuf::from(&names_file).with_extension("tmp"), &names_file).unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn sigkilled_run_is_swept() {
    let _one_sweep = SWEEPS.lock().unwrap_or_else(|e| e.into_inner());
    let names_file = std::env::temp_dir().join(format!("ferry-sandbox-test-{}.names", std::process::id()));
    let _ = fs::remove_file(&names_file);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_that_gets_sigkilled", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, &names_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !names_file.exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL: no Drop runs in the child
    child.wait().unwrap();
    let names = fs::read_to_string(&names_file).expect("the child reported what it created");
    let _ = fs::remove_file(&names_file);
    let [netns, cgroup, state, pid] = names.lines().collect::<Vec<_>>()[..] else { panic!("bad names file {names:?}") };
    let (cgroup, state) = (PathBuf::from(cgroup), PathBuf::from(state));
    assert!(Path::new("/run/netns").join(netns).exists(), "the killed run left its namespace");
    assert!(cgroup.exists(), "the killed run left its cgroup");

    let report = sweep_stale().unwrap();
    assert!(report.netns_removed.iter().any(|n| n == netns), "{report:?}");
    assert!(report.cgroups_removed.contains(&cgroup), "{report:?}");
    assert!(report.dirs_removed.contains(&state), "{report:?}");
    assert!(!Path::new("/run/netns").join(netns).exists());
    assert!(!cgroup.exists());
    assert!(!state.exists());
    // The orphaned sleeper was reparented; the sweep killed it through its cgroup.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/ns/net")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!Path::new(&format!("/proc/{pid}/ns/net")).exists(), "the orphaned process {pid} survived the sweep");
}
