//! `NodeInfo`: the few facts of a Node object that planning reads.
//!
//! Node objects are large (images, conditions, capacity) and change often
//! (status updates); the planner keeps only this, and a Node update that
//! leaves it unchanged costs nothing downstream.

use k8s_openapi::api::core::v1::Node;
use std::net::IpAddr;

/// What planning reads of one Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The `topology.kubernetes.io/zone` label, if set and not empty.
    pub zone: Option<String>,
    /// `spec.podCIDRs` (or `spec.podCIDR` when the list is empty), as written.
    pub pod_cidrs: Vec<String>,
    /// `InternalIP` and `ExternalIP` addresses of `status.addresses`.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    pub fn read(node: &Node) -> NodeInfo {
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::plan::LABEL_ZONE))
            .filter(|z| !z.is_empty())
            .cloned();
        let pod_cidrs = match node.spec.as_ref() {
            Some(spec) => {
                let listed = spec.pod_cidrs.clone().unwrap_or_default();
                if listed.is_empty() { spec.pod_cidr.clone().into_iter().collect() } else { listed }
            }
            None => Vec::new(),
        };
        let addresses = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| crate::addr::parse_ip_sloppy(&a.address))
            .collect();
        NodeInfo { zone, pod_cidrs, addresses }
    }
}
