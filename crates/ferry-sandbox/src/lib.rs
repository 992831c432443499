//! ferry-sandbox: small clusters of Linux network namespaces for tests, demos, conformance runs and
//! benchmarks, and a probe that sends real TCP/UDP through them and reports what it observed.
//!
//! ```text
//! Sandbox ── add_host ──► netns ferry-<tag>-<pid>-<seq>-<host>   (lo up, forwarding off)
//!         ── link ──────► veth pair, one end in each netns        (nothing in the root netns)
//!         ── cgroup ────► <cgroup2 mount>/ferry-<tag>-<pid>-<seq>-<name>
//!         ── spawn_in ──► process in a netns (+ cgroup joined before exec), killed on drop
//! probe::serve / probe::connect ──► Observation (reply with both ends' addresses, refused, timeout, ...)
//! sweep_stale ──► removes what sandboxes of dead processes left behind
//! ```
//!
//! Everything here needs root, iproute2 and network namespaces (any current Linux); cgroups need a
//! cgroup2 mount (found through /proc/mounts).

pub mod cgroup;
mod error;
mod exec;
pub mod naming;
mod netns;
pub mod probe;
mod sandbox;
mod sweep;

pub use cgroup::{cgroup_procs, cgroup2_mount};
pub use error::SandboxError;
pub use sandbox::{Host, Sandbox};
pub use sweep::{SweepReport, sweep_stale};
