//! One module per `ferry` subcommand, plus the inputs they share.

pub mod agent;
pub mod cleanup;
pub mod conformance;
pub mod datapath;
pub mod demo;
pub mod explain;
pub mod probe;
pub mod run;
pub mod status;
pub mod verify;

use anyhow::Context;
use ferry_k8s::manifests;
use ferry_model::ClusterState;
use std::path::Path;

/// Loads a manifest directory, printing skipped documents to stderr (they never
/// stop the rest from being served).
pub fn load_manifests(dir: &Path) -> anyhow::Result<ClusterState> {
    load_manifests_with(dir, manifests::LoadLimits::default())
}

/// [`load_manifests`] within the node config's `manifests` limits.
pub fn load_manifests_with(dir: &Path, limits: manifests::LoadLimits) -> anyhow::Result<ClusterState> {
    let loaded =
        manifests::load_dir_with(dir, limits).with_context(|| format!("loading manifests from {}", dir.display()))?;
    for p in &loaded.problems {
        if p.skipped {
            eprintln!("warning: {p}");
        }
    }
    Ok(loaded.state)
}
