//! `Plan::diff`: the minimal set of changes between two Plans.
//!
//! Backends apply a diff instead of rebuilding the world: one endpoint change
//! touches one service port. The incremental planner produces the diff as it
//! plans; `Plan::diff` computes it from two whole Plans (after a failed
//! apply, and as the planner's oracle in tests). Unchanged service ports are
//! shared (`Arc`) between consecutive Plans, so comparing them is a pointer
//! check first.

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
    /// ClusterIPs that came into use / went out of use (sorted).
    pub cluster_ips_added: Vec<std::net::IpAddr>,
    pub cluster_ips_removed: Vec<std::net::IpAddr>,
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
            && !self.cluster_ips_changed()
            && !self.health_checks_changed
    }

    pub fn cluster_ips_changed(&self) -> bool {
        !self.cluster_ips_added.is_empty() || !self.cluster_ips_removed.is_empty()
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

impl ServicePortChange {
    /// The change from `old` to `new` (the same service port, different values).
    pub fn between(old: &Arc<ServicePort>, new: &Arc<ServicePort>) -> ServicePortChange {
        let before: BTreeSet<SocketAddr> = old.endpoints.iter().map(|e| e.addr()).collect();
        let after: BTreeSet<SocketAddr> = new.endpoints.iter().map(|e| e.addr()).collect();
        ServicePortChange {
            old: old.clone(),
            new: new.clone(),
            endpoints_added: after.difference(&before).copied().collect(),
            endpoints_removed: before.difference(&after).copied().collect(),
            only_endpoints: same_shape(old, new),
        }
    }
}

fn same_shape(a: &ServicePort, b: &ServicePort) -> bool {
    a.cluster_ip == b.cluster_ip
        && a.port == b.port
        && a.node_port == b.node_port
        && a.external_ips() == b.external_ips()
        && a.load_balancer_ips() == b.load_balancer_ips()
        && a.proxied_load_balancer_ips() == b.proxied_load_balancer_ips()
        && a.source_ranges() == b.source_ranges()
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
            cluster_ips_added: new.cluster_ips.iter().filter(|ip| !old.cluster_ips.contains(*ip)).copied().collect(),
            cluster_ips_removed: old.cluster_ips.iter().filter(|ip| !new.cluster_ips.contains(*ip)).copied().collect(),
            health_checks_changed: old.health_check_node_ports != new.health_check_node_ports,
            ..Default::default()
        };
        for (id, o) in &old.services {
            match new.services.get(id) {
                None => d.removed.push(o.clone()),
                Some(n) if Arc::ptr_eq(o, n) || o == n => {}
                Some(n) => d.changed.push(ServicePortChange::between(o, n)),
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
