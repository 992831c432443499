//! ferry's benchmarks. The `nodeport` binary (src/bin/nodeport.rs) measures
//! the per-packet datapaths (BPF and nftables) on NodePorts in a two-node lab
//! (module `nodeport`). The `socket_lb` binary (src/bin/socket_lb.rs) measures
//! eBPF socket-level load balancing at 1k, 10k and 100k services:
//!
//! ```text
//! cluster     synthetic Services + EndpointSlices (JSON List manifests, ClusterState)
//! latency     (a) connect+request+reply latency: ClusterIP vs. the pod IP (the floor), in the lab
//! programming (b) build_plan / Programmer::sync / Maps::apply on a real pinned datapath
//! agent       (c) a real `ferry run` agent: RSS, first sync, one-change resync, BPF map memory
//! heap        a counting allocator, for what the model and programmer keep in memory
//! ```
//!
//! The `control_plane_bpf` binary measures the incremental control plane (module
//! `incremental`): in-process full sync and one-change latency at 1k to 100k
//! services, a real `ferry run` on a chunked manifest directory, and a real
//! `ferry agent` against the fake API server (module `api_agent`), with churn.
//!
//! ```text
//! conn        the client and echo server re-executed inside the lab's pods
//! ```
//!
//! Benchmarks are not tests: nothing here is `#[test]`, and `make test` never runs it.

pub mod agent;
pub mod api_agent;
pub mod cluster;
pub mod conn;
pub mod control_plane;
pub mod heap;
pub mod incremental;
pub mod latency;
pub mod machine;
pub mod nodeport;
pub mod programming;
pub mod report;
pub mod stats;
