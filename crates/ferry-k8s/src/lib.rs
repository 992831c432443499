//! ferry's sources of cluster state.
//!
//! Both sources produce the same thing, a `ClusterState` of real Kubernetes
//! objects (k8s-openapi types): `manifests` reads a directory of YAML/JSON
//! files (standalone mode, demos, tests); the Kubernetes API source follows a
//! live cluster (`api`).

pub mod api;
pub mod manifests;

pub use manifests::{LoadedManifests, ManifestProblem, load_dir};
