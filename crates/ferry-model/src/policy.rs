//! What one Service may claim on a node: which ExternalIPs it may use and how
//! much of the datapath it may take.
//!
//! A tenant writes Services; the node decides what of them it serves. Frontend
//! ownership between Services is settled by [`crate::plan::Claim`] (a ClusterIP
//! always belongs to its Service); this file holds the checks on one Service
//! alone. Each refusal is an [`ObjectError`] naming the Service and the field,
//! so `explain`, the agent log and `ferry_object_problems` show it, and
//! everything else keeps being served.

use crate::node_config::ServiceLimits;
use crate::plan::{NodeFacts, ServicePort, frontend_claims};
use crate::problem::{ObjectError, ObjectKind};
use crate::service::ServiceInfo;
use std::net::IpAddr;

/// Why an address can never be an ExternalIP: it does not name a destination
/// a packet from outside can be sent to on this node alone.
pub fn special_address(ip: &IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
        IpAddr::V4(_) => *ip,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        _ => None,
    }
}

/// The Service's ExternalIPs this node serves, and a problem for each one it
/// ignores: special addresses always, addresses outside
/// `externalIPs.allowedCIDRs` when the node config sets it.
pub fn admit_external_ips(node: &NodeFacts, info: &ServiceInfo) -> (Vec<IpAddr>, Vec<ObjectError>) {
    let mut admitted = Vec::with_capacity(info.external_ips().len());
    let mut problems = Vec::new();
    let refuse = |ip: &IpAddr, why: String| {
        ObjectError::skip_entry(
            ObjectKind::Service,
            &info.key,
            "spec.externalIPs",
            format!("{ip} is {why}; this ExternalIP is not served"),
        )
    };
    for ip in info.external_ips() {
        if let Some(kind) = special_address(ip) {
            problems.push(refuse(ip, format!("{kind}, never a valid ExternalIP")));
        } else if let Some(allowed) = &node.external_ips_allowed
            && !allowed.iter().any(|n| n.contains(ip))
        {
            let list: Vec<String> = allowed.iter().map(|n| n.to_string()).collect();
            let list = if list.is_empty() { "(empty: no ExternalIP is allowed)".to_string() } else { list.join(", ") };
            problems.push(refuse(ip, format!("outside the node config's externalIPs.allowedCIDRs [{list}]")));
        } else {
            admitted.push(*ip);
        }
    }
    (admitted, problems)
}

/// Checks a planned Service against the node's per-Service limits. `Err`
/// names the Service, the limit and the count: the whole Service is refused
/// (serving an arbitrary part of it would be a worse surprise).
pub fn within_limits(node: &NodeFacts, info: &ServiceInfo, ports: &[ServicePort]) -> Result<(), ObjectError> {
    let limits: ServiceLimits = node.service_limits;
    let frontends: usize = ports.iter().map(|sp| frontend_claims(sp).len()).sum();
    if frontends > limits.max_frontends as usize {
        return Err(ObjectError::skip(
            ObjectKind::Service,
            &info.key,
            "spec",
            format!(
                "needs {frontends} frontends (ports x addresses x families), over this node's \
                 limits.maxFrontendsPerService of {}; split the Service or raise the limit",
                limits.max_frontends
            ),
        ));
    }
    let endpoints: usize = ports.iter().map(|sp| sp.endpoints.len()).sum();
    let widest = ports.iter().map(|sp| sp.endpoints.len()).max().unwrap_or(0);
    if endpoints > limits.max_endpoints as usize || widest > ServiceLimits::SLOT_CEILING as usize {
        return Err(ObjectError::skip(
            ObjectKind::Service,
            &info.key,
            "endpoints",
            format!(
                "has {endpoints} endpoints over its service ports, over this node's \
                 limits.maxEndpointsPerService of {} (at most {} per service port); \
                 split the Service or raise the limit",
                limits.max_endpoints,
                ServiceLimits::SLOT_CEILING
            ),
        ));
    }
    Ok(())
}
