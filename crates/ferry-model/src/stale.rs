//! Which kernel conntrack entries are stale UDP flows: kube-proxy's conntrack
//! reconciler rule (`pkg/proxy/conntrack/cleanup.go`, newest version, with
//! kubernetes/kubernetes#139629 and #141371), as a pure function over the Plan.
//!
//! UDP has no teardown, so a client that keeps sending to a Service keeps its
//! conntrack entry, and with it a DNAT to a backend that may be gone (DNS is the
//! classic victim). The rule, for every UDP service port of the Plan, whether it
//! has serving endpoints or not:
//!
//! ```text
//! frontends = {clusterIP, VIP-mode LB IPs, externalIPs} x port   and   *:nodePort
//! allowed   = {endpointIP:endpointPort of every serving endpoint}   (may be empty)
//! stale     = UDP && ((origDst:origDstPort is a frontend && replySrc:replySrcPort not allowed)
//!                     || (origDstPort is a nodePort && replySrc:replySrcPort not allowed for it))
//! ```
//!
//! A service port without serving endpoints is not skipped: its allowed set is
//! empty, so every UDP flow to its frontends is deleted and the client's next
//! datagram meets the datapath's REJECT instead of a pod that is gone
//! (kubernetes/kubernetes#139628, fixed by #139629: skipping it blackholed a
//! one-way sender for 13 hours). A UDP service port deleted since the previous
//! sync ([`StaleFlowIndex::new`]'s `deleted`) counts as one without serving
//! endpoints for the frontends it had, unless a live service port owns the
//! frontend now, whose rule then applies (kubernetes/kubernetes#141371).
//!
//! TCP and SCTP are never touched (they end their own connections), and
//! traffic policies, topology and terminating state are ignored so that UDP
//! behaves like TCP: an existing flow keeps its backend while that backend
//! still serves.
//!
//! The side that lists and deletes kernel entries is `ferry-conntrack`.

pub mod cases;

use crate::addr::IpFamily;
use crate::plan::{FrontendAddr, FrontendKey, Plan, ServicePort};
use crate::protocol::Protocol;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The stale-flow rule compiled from one Plan (and the UDP service ports
/// deleted since the previous one): the frontends of UDP service ports, each
/// with the backends a reply may come from (none, for a port without serving
/// endpoints or a deleted one).
///
/// Lookups are two hash probes, so checking a million conntrack entries costs
/// about as much as reading them.
///
/// ```
/// use ferry_model::{Plan, PlanDiff, Protocol};
/// use ferry_model::stale::StaleFlowIndex;
/// # fn check(plan: &Plan, diff: &PlanDiff) {
/// // The Plan just programmed, and the service ports its diff removed.
/// let index = StaleFlowIndex::new(plan, &diff.removed);
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
    /// Serving backends of one service port, shared by all its frontends
    /// (empty: every flow to those frontends is stale).
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
    /// Compiles the rule from `plan` alone: [`StaleFlowIndex::new`] with no
    /// deleted service ports (a full reconcile with no "before", the cases
    /// without `deletedServices`).
    pub fn from_plan(plan: &Plan) -> StaleFlowIndex {
        StaleFlowIndex::new(plan, &[])
    }

    /// Compiles the rule from `plan` and the service ports deleted since the
    /// Plan before it (`PlanDiff::removed`; ports that are not UDP are
    /// ignored). A port that `plan` still has may be passed as it was before a
    /// change: the frontends it no longer has, and no live port owns, count as
    /// a deleted port's; the others are owned by a live port, whose rule applies.
    ///
    /// Every UDP service port of `plan` is indexed, with or without serving
    /// endpoints. A frontend that two service ports claim belongs to the one
    /// the Plan programmed (`Plan::frontends`), so the reconciler never deletes
    /// flows that the datapath itself sends to the winner's backends. A
    /// deleted port's frontends are indexed with no allowed backend, except
    /// where a live service port owns the frontend now (its rule applies).
    pub fn new(plan: &Plan, deleted: &[Arc<ServicePort>]) -> StaleFlowIndex {
        let mut index = StaleFlowIndex::default();
        for sp in plan.services.values() {
            if sp.id.protocol != Protocol::Udp {
                continue;
            }
            let slot = index.allowed.len();
            index.allowed.push(sp.serving_endpoints().map(|e| e.addr()).collect());
            for ip in frontend_ips(sp) {
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
        let mut nothing_allowed = None;
        for sp in deleted {
            if sp.id.protocol != Protocol::Udp {
                continue;
            }
            let slot = *nothing_allowed.get_or_insert_with(|| {
                index.allowed.push(HashSet::new());
                index.allowed.len() - 1
            });
            for ip in frontend_ips(sp) {
                if !owned_now(plan, FrontendAddr::Ip(*ip), sp.port) {
                    index.by_frontend.entry((*ip, sp.port)).or_insert(slot);
                }
            }
            if let Some(np) = sp.node_port
                && !owned_now(plan, FrontendAddr::NodePort(sp.id.family), np)
            {
                index.by_node_port.entry((sp.id.family, np)).or_insert(slot);
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

    /// No UDP frontend is indexed (no UDP service port, live or deleted):
    /// nothing can be stale, and a caller may skip listing the conntrack table.
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

/// The `ip:port` frontends' addresses of a service port: ClusterIP, VIP-mode LB IPs, ExternalIPs.
fn frontend_ips(sp: &ServicePort) -> impl Iterator<Item = &IpAddr> {
    std::iter::once(&sp.cluster_ip).chain(sp.load_balancer_ips()).chain(sp.external_ips())
}

fn owns(plan: &Plan, sp: &ServicePort, addr: FrontendAddr, port: u16) -> bool {
    let key = FrontendKey { addr, port, protocol: sp.id.protocol };
    plan.frontends.get(&key).is_none_or(|owner| owner.service == sp.id)
}

/// Whether a live service port of `plan` owns this UDP frontend.
fn owned_now(plan: &Plan, addr: FrontendAddr, port: u16) -> bool {
    plan.frontends.contains_key(&FrontendKey { addr, port, protocol: Protocol::Udp })
}

#[cfg(test)]
mod tests;
