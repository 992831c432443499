//! The machine a run happened on, as read from /proc (printed at start and saved with the results).

use serde::{Deserialize, Serialize};

/// CPU, cores, memory, kernel, OS and the ferry commit (of the working directory's repository).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_mib: u64,
    pub kernel: String,
    pub os: String,
    pub ferry_commit: String,
    /// `/proc/loadavg`'s 1-minute figure at the start: other work on the
    /// machine slows every timing, and the report should say so.
    #[serde(default)]
    pub load_average: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_string();
        let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let memory_mib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        // ferry's own code is crates/ and bpf/; the bench's files do not make it "modified".
        let ferry_commit = match git(&["rev-parse", "--short", "HEAD"]) {
            Some(head) => match git(&["status", "--porcelain", "--untracked-files=no", "--", "crates", "bpf"]) {
                Some(changes) if changes.is_empty() => head,
                _ => format!("{head} + uncommitted changes in crates/ or bpf/"),
            },
            None => "unknown".into(),
        };
        Machine {
            cpu_model,
            cpus,
            memory_mib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            os,
            ferry_commit,
            load_average: read("/proc/loadavg").split_whitespace().next().unwrap_or("?").to_string(),
        }
    }

    /// One line for stderr and the report.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} CPUs), {} MiB RAM, Linux {}, {}, ferry {}; load average {} at the start",
            self.cpu_model, self.cpus, self.memory_mib, self.kernel, self.os, self.ferry_commit, self.load_average
        )
    }
}
