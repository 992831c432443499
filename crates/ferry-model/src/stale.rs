//! Which kernel conntrack entries are stale UDP flows: kube-proxy's conntrack
//! reconciler rule (`pkg/proxy/conntrack/cleanup.go`, newest version), as a pure
//! function over the Plan.
//!
//! UDP has no teardown, so a client that keeps sending to a Service keeps its
//! conntrack entry, and with it a DNAT to a backend that may be gone (DNS is the
//! classic victim). The rule, for every UDP service port with at least one
//! serving endpoint:
//!
//! ```text
//! frontends = {clusterIP, VIP-mode LB IPs, externalIPs} x port   and   *:nodePort
//! allowed   = {endpointIP:endpointPort of every serving endpoint}
//! stale     = UDP && ((origDst:origDstPort is a frontend && replySrc:replySrcPort not allowed)
//!                     || (origDstPort is a nodePort && replySrc:replySrcPort not allowed for it))
//! ```
//!
//! Services without serving endpoints are skipped (a flow to them has nowhere
//! better to go, and deleting it changes nothing), TCP and SCTP are never
//! touched (they end their own connections), and traffic policies, topology and
//! terminating state are ignored so that UDP behaves like TCP: an existing flow
//! keeps its backend while that backend still serves.
//!
//! The side that lists and deletes kernel entries is `ferry-conntrack`.

pub mod cases;

use crate::addr::IpFamily;
use crate::plan::{FrontendAddr, FrontendKey, Plan, ServicePort};
use crate::protocol::Protocol;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

/// The stale-flow rule compiled from one Plan: frontends of UDP service ports
/// with serving endpoints, each with the backends a reply may come from.
///
/// Lookups are two hash probes, so checking a million conntrack entries costs
/// about as much as reading them.
///
/// ```
/// use ferry_model::{Plan, Protocol};
/// use ferry_model::stale::StaleFlowIndex;
/// # fn check(plan: &Plan) {
/// let index = StaleFlowIndex::from_plan(plan);
/// let stale = index.is_stale(
///     Protocol::Udp,
///     "172.30.1.1".parse().unwrap(), 8000, // where the client sent it
///     "10.240.2.6".parse().unwrap(), 9090, // who answers (the DNAT target)
/// );
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct StaleFlowIndex {
    /// `ip:port` frontends (ClusterIP, VIP LB IPs, ExternalIPs) -> index into `allowed`.
    by_frontend: HashMap<(IpAddr, u16), usize>,
    /// NodePorts (any node address of the family) -> index into `allowed`.
    by_node_port: HashMap<(IpFamily, u16), usize>,
    /// Serving backends of one service port, shared by all its frontends.
    allowed: Vec<HashSet<SocketAddr>>,
}

/// Why an entry is stale, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// Sent to a ClusterIP, LB IP or ExternalIP frontend; the reply source is not a serving backend.
    Frontend,
    /// Sent to a NodePort (any address); the reply source is not a serving backend.
    NodePort,
}

impl StaleFlowIndex {
    /// Compiles the rule from `plan`.
    ///
    /// A frontend that two service ports claim belongs to the one the Plan
    /// programmed (`Plan::frontends`), so the reconciler never deletes flows
    /// that the datapath itself sends to the winner's backends.
    pub fn from_plan(plan: &Plan) -> StaleFlowIndex {
        let mut index = StaleFlowIndex::default();
        for sp in plan.services.values() {
            if sp.id.protocol != Protocol::Udp {
                continue;
            }
            let allowed: HashSet<SocketAddr> = sp.serving_endpoints().map(|e| e.addr()).collect();
            if allowed.is_empty() {
                continue;
            }
            let slot = index.allowed.len();
            index.allowed.push(allowed);
            for ip in std::iter::once(&sp.cluster_ip).chain(&sp.load_balancer_ips).chain(&sp.external_ips) {
                if owns(plan, sp, FrontendAddr::Ip(*ip), sp.port) {
                    index.by_frontend.insert((*ip, sp.port), slot);
                }
            }
            if let Some(np) = sp.node_port
                && owns(plan, sp, FrontendAddr::NodePort(sp.id.family), np)
            {
                index.by_node_port.insert((sp.id.family, np), slot);
            }
        }
        index
    }

    /// Whether a conntrack entry is a stale UDP flow that must be deleted.
    ///
    /// `orig_dst:orig_dst_port` is the original direction's destination (what
    /// the client sent to); `reply_src:reply_src_port` is the reply direction's
    /// source, which is the DNAT target for a translated flow and the service
    /// address itself for a flow that was never translated (such a flow is
    /// stale too: it was created before the service had endpoints).
    pub fn is_stale(
        &self,
        protocol: Protocol,
        orig_dst: IpAddr,
        orig_dst_port: u16,
        reply_src: IpAddr,
        reply_src_port: u16,
    ) -> bool {
        self.stale_reason(protocol, orig_dst, orig_dst_port, reply_src, reply_src_port).is_some()
    }

    /// [`StaleFlowIndex::is_stale`], saying which half of the rule matched.
    /// When both match (a frontend port that is also a NodePort) the frontend wins.
    pub fn stale_reason(
        &self,
        protocol: Protocol,
        orig_dst: IpAddr,
        orig_dst_port: u16,
        reply_src: IpAddr,
        reply_src_port: u16,
    ) -> Option<StaleReason> {
        if protocol != Protocol::Udp {
            return None;
        }
        let reply = SocketAddr::new(reply_src, reply_src_port);
        if let Some(&slot) = self.by_frontend.get(&(orig_dst, orig_dst_port))
            && !self.allowed[slot].contains(&reply)
        {
            return Some(StaleReason::Frontend);
        }
        if let Some(&slot) = self.by_node_port.get(&(IpFamily::of(&orig_dst), orig_dst_port))
            && !self.allowed[slot].contains(&reply)
        {
            return Some(StaleReason::NodePort);
        }
        None
    }

    /// No UDP service port has a serving endpoint: nothing can be stale, and a
    /// caller may skip listing the conntrack table altogether.
    pub fn is_empty(&self) -> bool {
        self.by_frontend.is_empty() && self.by_node_port.is_empty()
    }

    /// Whether any frontend of `family` is indexed (a caller may skip that family's table).
    pub fn has_family(&self, family: IpFamily) -> bool {
        self.by_frontend.keys().any(|(ip, _)| IpFamily::of(ip) == family)
            || self.by_node_port.keys().any(|(f, _)| *f == family)
    }

    /// Number of `ip:port` frontends and NodePorts indexed.
    pub fn frontend_count(&self) -> usize {
        self.by_frontend.len() + self.by_node_port.len()
    }
}

fn owns(plan: &Plan, sp: &ServicePort, addr: FrontendAddr, port: u16) -> bool {
    let key = FrontendKey { addr, port, protocol: sp.id.protocol };
    plan.frontends.get(&key).is_none_or(|owner| owner.service == sp.id)
}

#[cfg(test)]
mod tests;
