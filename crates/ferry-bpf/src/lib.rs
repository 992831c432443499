//! ferry's eBPF datapath.
//!
//! The C programs live in `/bpf` (one file per hook family, shared logic in
//! `/bpf/lib`). This crate loads them through libbpf-rs skeletons, pins maps
//! and links under bpffs, and turns Plans into map operations:
//!
//! ```text
//! Plan / PlanDiff --Programmer::sync (pure)--> Vec<MapOp> --Maps::apply--> kernel maps
//! ```

pub mod acceleration;
pub mod defrag_loop;
pub mod downgrade;
pub mod entries;
pub mod install;
pub mod layout;
pub mod maps;
pub mod migrate;
pub mod pass;
pub mod program;
pub mod skel;
pub mod sockdestroy;
pub mod stale;
pub mod stats;
pub mod system;

pub use entries::MapOp;
pub use install::{AttachedDevice, CapacityKept, DeviceRole, InstallOptions, Installed, install, uninstall};
pub use maps::Maps;
pub use program::{Batch, Cause, CtTimeouts, MapDump, NodeRuntime, Programmer, Refused, canonical_name};
