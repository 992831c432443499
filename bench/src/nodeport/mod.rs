//! The NodePort benchmark (`nodeport` binary): new-connection latency and
//! held-connection request rate from a client outside the cluster through
//! node-a's NodePorts, to a pod on node-a and to a pod on node-b, against the
//! same pods dialled directly; on the BPF datapath (SNAT and DSR, tc and
//! XDP) and the nftables datapath, each in a two-node lab of its own, in the
//! same run; and a UDP flood's packets per second through node-a.
//!
//! ```text
//! cluster  the lab: two nodes running `ferry run`, two pods, the outside client; the arms
//! measure  the rounds: arms interleaved per connection, labs alternating per round
//! flood    UDP packets per second through node-a per core, and softirq CPU per million packets
//! chart    SVG latency distributions (the remote path: SNAT, DSR, untranslated)
//! report   nodeport.json, nodeport.md and the charts
//! ```

pub mod chart;
pub mod cluster;
pub mod flood;
pub mod measure;
pub mod report;
