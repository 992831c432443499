//! The NodePort benchmark (`nodeport` binary): new-connection latency and
//! held-connection request rate from a client outside the cluster through
//! node-a's NodePorts, to a pod on node-a and to a pod on node-b, against the
//! same pods dialled directly; on the BPF and the nftables datapath, each in
//! a two-node lab of its own, in the same run.
//!
//! ```text
//! cluster  the lab: two nodes running `ferry run`, two pods, the outside client; the arms
//! measure  the rounds: arms interleaved per connection, labs alternating per round
//! report   nodeport.json and nodeport.md
//! ```

pub mod cluster;
pub mod measure;
pub mod report;
