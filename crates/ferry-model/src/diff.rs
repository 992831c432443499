//! `Plan::diff`: the minimal set of changes between two Plans.
//!
//! Backends apply a diff instead of rebuilding the world: one endpoint change
//! touches one service port. Unchanged service ports are shared (`Arc`)
//! between consecutive Plans, so comparing them is a pointer check first.

use crate::plan::{Frontend, FrontendKey, Plan, ServicePort, ServicePortId};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// How one service port changed.
#[derive(Debug, Clone)]
pub struct ServicePortChange {
    pub old: Arc<ServicePort>,
    pub new: Arc<ServicePort>,
    pub endpoints_added: Vec<SocketAddr>,
    pub endpoints_removed: Vec<SocketAddr>,
    /// Only endpoints (or their states) changed; addresses, ports and policies did not.
    pub only_endpoints: bool,
}

/// Everything that differs between two Plans.
#[derive(Debug, Clone, Default)]
pub struct PlanDiff {
    pub added: Vec<Arc<ServicePort>>,
    pub removed: Vec<Arc<ServicePort>>,
    pub changed: Vec<ServicePortChange>,
    pub frontends_added: Vec<(FrontendKey, Frontend)>,
    pub frontends_removed: Vec<(FrontendKey, Frontend)>,
    /// Node facts (addresses, detector, CIDRs, masquerade settings) changed.
    pub node_changed: bool,
    pub cluster_ips_changed: bool,
    pub health_checks_changed: bool,
}

impl PlanDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.frontends_added.is_empty()
            && self.frontends_removed.is_empty()
            && !self.node_changed
            && !self.cluster_ips_changed
            && !self.health_checks_changed
    }

    /// Service ports touched in any way.
    pub fn touched(&self) -> BTreeSet<&ServicePortId> {
        self.added
            .iter()
            .map(|s| &s.id)
            .chain(self.removed.iter().map(|s| &s.id))
            .chain(self.changed.iter().map(|c| &c.new.id))
            .collect()
    }
}

fn same_shape(a: &ServicePort, b: &ServicePort) -> bool {
    a.cluster_ip == b.cluster_ip
        && a.port == b.port
        && a.node_port == b.node_port
        && a.external_ips == b.external_ips
        && a.load_balancer_ips == b.load_balancer_ips
        && a.proxied_load_balancer_ips == b.proxied_load_balancer_ips
        && a.source_ranges == b.source_ranges
        && a.internal_policy_local == b.internal_policy_local
        && a.external_policy_local == b.external_policy_local
        && a.affinity_timeout_seconds == b.affinity_timeout_seconds
        && a.health_check_node_port == b.health_check_node_port
        && a.maglev == b.maglev
}

impl Plan {
    /// What changed from `old` to `new`.
    pub fn diff(old: &Plan, new: &Plan) -> PlanDiff {
        let mut d = PlanDiff {
            node_changed: old.node != new.node,
            cluster_ips_changed: old.cluster_ips != new.cluster_ips,
            health_checks_changed: old.health_check_node_ports != new.health_check_node_ports,
            ..Default::default()
        };
        for (id, o) in &old.services {
            match new.services.get(id) {
                None => d.removed.push(o.clone()),
                Some(n) if Arc::ptr_eq(o, n) || o == n => {}
                Some(n) => {
                    let before: BTreeSet<SocketAddr> = o.endpoints.iter().map(|e| e.addr()).collect();
                    let after: BTreeSet<SocketAddr> = n.endpoints.iter().map(|e| e.addr()).collect();
                    d.changed.push(ServicePortChange {
                        old: o.clone(),
                        new: n.clone(),
                        endpoints_added: after.difference(&before).copied().collect(),
                        endpoints_removed: before.difference(&after).copied().collect(),
                        only_endpoints: same_shape(o, n),
                    });
                }
            }
        }
        for (id, n) in &new.services {
            if !old.services.contains_key(id) {
                d.added.push(n.clone());
            }
        }
        for (k, f) in &old.frontends {
            if new.frontends.get(k) != Some(f) {
                d.frontends_removed.push((*k, f.clone()));
            }
        }
        for (k, f) in &new.frontends {
            if old.frontends.get(k) != Some(f) {
                d.frontends_added.push((*k, f.clone()));
            }
        }
        d
    }
}
