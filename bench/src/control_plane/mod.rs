//! The control-plane benchmark: how long each proxy's rules take to load into
//! the kernel, for the same synthetic services, measured in the same run.
//!
//! ```text
//! shape           N services x M endpoints (ClusterIP, TCP 80 -> 8080)
//!  ├ ferry nftables        Planner -> Renderer::sync -> nft::apply_with  (crates/ferry-nft)
//!  ├ kube-proxy iptables   KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-* -> iptables-nft-restore  (kube_iptables)
//!  └ kube-proxy nftables   table ip kube-proxy: service-ips vmap, service-*/endpoint-* chains -> nft -f  (kube_nft)
//! each series in its own empty network namespace of a ferry-bench sandbox:
//!   full sync from empty, then one-endpoint changes (p50 / p99)
//! chart           SVG, log-log: time against services, one series per proxy
//! ```
//!
//! The peers' rule layouts are generated here, as kube-proxy's proxiers
//! write them (pkg/proxy/iptables and pkg/proxy/nftables), not taken from
//! kube-proxy itself: what is measured is the kernel (and `nft` /
//! `iptables-restore`) loading them, not kube-proxy's Go code.

pub mod chart;
pub mod exec;
pub mod kube_iptables;
pub mod kube_nft;
pub mod shape;
