//! The one error type of the sandbox: each variant names the object that failed and what to try next.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a sandbox operation failed.
///
/// Messages are meant for the person running the tests: they say which object (netns, cgroup, link) was
/// involved, quote the command line and its stderr when a tool failed, and end with a hint.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// An external tool (`ip`) ran but reported failure.
    #[error("{what} failed: `{cmdline}` ended with {status}; stderr: {stderr}{hint}")]
    CommandFailed { what: String, cmdline: String, status: String, stderr: String, hint: &'static str },

    /// An external tool or a sandboxed process could not be started at all.
    #[error("{what}: could not start `{cmdline}`: {source} (is the program installed and on PATH, and are you root?)")]
    CommandSpawn {
        what: String,
        cmdline: String,
        #[source]
        source: io::Error,
    },

    /// A command ran longer than allowed; it has been killed.
    #[error("{what}: `{cmdline}` did not finish within {timeout:?} and was killed (is the machine overloaded?)")]
    CommandTimeout { what: String, cmdline: String, timeout: Duration },

    /// A file-system operation (cgroupfs, /run/netns, /proc) failed.
    #[error("{what} failed on {}: {source}{hint}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },

    /// Writing a sysctl inside a host's network namespace failed.
    #[error(
        "setting sysctl {key}={value} in netns {netns} failed: {source} \
         (does the key exist on this kernel? per-interface keys need the interface to exist first)"
    )]
    Sysctl {
        key: String,
        value: String,
        netns: String,
        #[source]
        source: io::Error,
    },

    /// The key is not a network sysctl, so writing it would change the machine, not the host.
    #[error(
        "sysctl {key} is not a per-network-namespace setting; only net.* keys can be set inside a sandbox host \
         (refusing to change the machine's own settings)"
    )]
    SysctlNotPerNetns { key: String },

    /// No cgroup2 file system is mounted.
    #[error(
        "no cgroup2 file system found in /proc/mounts; mount one (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`) \
         and retry"
    )]
    NoCgroup2,

    /// A name given by the caller does not fit the sandbox naming rules.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName { kind: &'static str, name: String, reason: String },

    /// The pid was not started by this sandbox, so the sandbox will not signal or wait for it.
    #[error("process {pid} was not spawned by sandbox {sandbox}; a sandbox only manages processes it started")]
    UnknownProcess { pid: u32, sandbox: String },

    /// A spawned process did not signal readiness in time (or exited first).
    #[error("{what}: {detail}")]
    NotReady { what: String, detail: String },

    /// A probe ran but its output was not an observation.
    #[error("probe `{cmdline}` in host {host} did not report an observation: {detail}")]
    ProbeOutput { host: String, cmdline: String, detail: String },

    /// Cleaning up the sandbox left something behind.
    #[error("cleaning up sandbox {sandbox} left problems: {}; run `sweep_stale()` after this process exits, or remove them by hand", problems.join("; "))]
    Cleanup { sandbox: String, problems: Vec<String> },
}
