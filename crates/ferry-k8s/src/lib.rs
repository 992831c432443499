//! ferry's sources of cluster state.
//!
//! Both sources speak the same [`api::SourceEvent`]s (objects applied and
//! deleted, relists, "synced"), which the agent loop forwards to the
//! planner: [`manifest_source::ManifestSource`] watches a directory of
//! YAML/JSON files (standalone mode, demos, tests); [`api::ApiSource`]
//! follows a live cluster. [`manifests`] reads a directory once into a
//! `ClusterState` (for `ferry explain` and tests).

pub mod api;
pub mod manifest_source;
pub mod manifests;
pub mod names;

pub use manifest_source::{ManifestSource, ManifestSourceError};
pub use manifests::{LoadedManifests, ManifestProblem, load_dir};
