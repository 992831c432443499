//! Removing what sandboxes of dead processes left behind (a test run killed with SIGKILL never drops).
//!
//! Only names that parse as `ferry-<tag>-<pid>-<seq>-<object>` and whose owner pid no longer exists are
//! touched, so concurrent runs and other `ferry-*` objects (an installed agent's cgroup) are safe.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sandbox::remove_netns;
use crate::{SandboxError, cgroup, naming, netns};

const SWEEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`sweep_stale`] removed, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Deleted network namespaces (names in /run/netns).
    pub netns_removed: Vec<String>,
    /// Removed cgroup directories.
    pub cgroups_removed: Vec<PathBuf>,
    /// Removed sandbox state directories.
    pub dirs_removed: Vec<PathBuf>,
    /// Leftovers that could not be removed, with the reason.
    pub problems: Vec<String>,
}

impl SweepReport {
    /// True when nothing was found to remove and nothing failed.
    pub fn is_empty(&self) -> bool {
        self.netns_removed.is_empty()
            && self.cgroups_removed.is_empty()
            && self.dirs_removed.is_empty()
            && self.problems.is_empty()
    }
}

/// Deletes sandbox namespaces, cgroups and state directories whose owner process has exited, killing any
/// process still running inside them first.
pub fn sweep_stale() -> Result<SweepReport, SandboxError> {
    let mut report = SweepReport::default();

    let names = netns::list().map_err(|source| SandboxError::Io {
        what: "listing named network namespaces".into(),
        path: netns::NETNS_DIR.into(),
        source,
        hint: " (are you root?)",
    })?;
    for name in stale(names, owner_is_gone) {
        let problems = remove_netns(&name, SWEEP_TIMEOUT);
        if problems.is_empty() {
            report.netns_removed.push(name);
        } else {
            report.problems.extend(problems);
        }
    }

    // Without a cgroup2 mount no sandbox can have made cgroups, so there is nothing to sweep there.
    if let Ok(mount) = cgroup::cgroup2_mount() {
        for name in stale(dir_names(&mount), owner_is_gone) {
            let dir = mount.join(&name);
            match cgroup::remove(&dir, SWEEP_TIMEOUT) {
                Ok(()) => report.cgroups_removed.push(dir),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
    }

    let tmp = std::env::temp_dir();
    for name in stale(dir_names(&tmp), owner_is_gone) {
        let dir = tmp.join(&name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => report.dirs_removed.push(dir),
            Err(e) => report.problems.push(format!("removing {}: {e}", dir.display())),
        }
    }
    Ok(report)
}

/// The sandbox-made names among `names` whose owner is gone.
fn stale(names: Vec<String>, is_gone: impl Fn(u32) -> bool) -> Vec<String> {
    names.into_iter().filter(|n| naming::parse(n).is_some_and(|owned| is_gone(owned.owner_pid))).collect()
}

/// A pid counts as alive while /proc has an entry for it (zombies included), so a sandbox is never
/// swept while its owner could still clean it up itself.
fn owner_is_gone(pid: u32) -> bool {
    pid != 0 && !Path::new(&format!("/proc/{pid}")).exists()
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_type().ok()?.is_dir().then(|| e.file_name().to_string_lossy().into_owned())
        })
        .filter(|n| n.starts_with(naming::PREFIX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sandbox_names_of_dead_owners_are_stale() {
        let names = [
            "ferry-t-100-0-node",   // dead owner
            "ferry-t-200-1-pod-a",  // live owner
            "ferry-agent",          // not made by a sandbox
            "ferry-t-100-client",   // malformed
            "other-t-100-0-node",   // not ours
            "ferry-bench-100-7-cg", // dead owner
        ];
        let got = stale(names.iter().map(|s| s.to_string()).collect(), |pid| pid == 100);
        assert_eq!(got, vec!["ferry-t-100-0-node", "ferry-bench-100-7-cg"]);
    }

    #[test]
    fn our_own_pid_is_alive() {
        assert!(!owner_is_gone(std::process::id()));
        assert!(!owner_is_gone(0), "pid 0 is never an owner");
    }
}
