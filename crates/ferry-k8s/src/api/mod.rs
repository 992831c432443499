//! The Kubernetes API source: a live cluster's Services, EndpointSlices and this node's Node.
//!
//! [`client`] connects (kubeconfig or in-cluster), [`ApiSource`] watches and
//! sends [`SourceEvent`]s, and [`apply_event`] folds them into a
//! `ClusterState`. Tests drive the real kube-rs client against the fake API
//! server in `ferry-testapi`.

mod client;
mod event;
mod source;

pub use client::{ApiError, client};
pub use event::{Kind, Listing, SourceEvent, apply_event, node_key, relist};
pub use source::{ApiSource, ENDPOINT_SLICE_LABEL_SELECTOR, Stopped, WATCHED_RESOURCES, WatchedResource};
