//! A step's changes: the difference between two consecutive desired states,
//! as the watch events that would deliver it.

use ferry_model::{ClusterState, StateChange};

/// The changes that turn `prev` into `next`: deletions first, then every new
/// or changed object (one batch; the order inside a batch must not matter).
/// A scenario's Node never changes between steps; it is in the first batch.
pub fn between(prev: &ClusterState, next: &ClusterState) -> Vec<StateChange> {
    let mut out = Vec::new();
    for name in prev.nodes.keys().filter(|k| !next.nodes.contains_key(*k)) {
        out.push(StateChange::NodeDeleted(name.clone()));
    }
    for key in prev.services.keys().filter(|k| !next.services.contains_key(*k)) {
        out.push(StateChange::ServiceDeleted(key.clone()));
    }
    for key in prev.endpoint_slices.keys().filter(|k| !next.endpoint_slices.contains_key(*k)) {
        out.push(StateChange::EndpointSliceDeleted(key.clone()));
    }
    for (name, node) in &next.nodes {
        if prev.nodes.get(name) != Some(node) {
            out.push(StateChange::NodeApplied(Box::new(node.clone())));
        }
    }
    for (key, svc) in &next.services {
        if prev.services.get(key) != Some(svc) {
            out.push(StateChange::ServiceApplied(Box::new(svc.clone())));
        }
    }
    for (key, slice) in &next.endpoint_slices {
        if prev.endpoint_slices.get(key) != Some(slice) {
            out.push(StateChange::EndpointSliceApplied(Box::new(slice.clone())));
        }
    }
    out
}

/// One line per change, for logs: `+ Service ns/name`, `- EndpointSlice ns/name`.
pub fn describe(changes: &[StateChange]) -> String {
    let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| ferry_model::ObjectKey::of_meta(m);
    changes
        .iter()
        .map(|c| match c {
            StateChange::ServiceApplied(s) => format!("apply Service {}", key(&s.metadata)),
            StateChange::ServiceDeleted(k) => format!("delete Service {k}"),
            StateChange::EndpointSliceApplied(s) => format!("apply EndpointSlice {}", key(&s.metadata)),
            StateChange::EndpointSliceDeleted(k) => format!("delete EndpointSlice {k}"),
            StateChange::NodeApplied(n) => format!("apply Node {}", n.metadata.name.as_deref().unwrap_or("")),
            StateChange::NodeDeleted(n) => format!("delete Node {n}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::acceptance::CaseService;

    fn svc(name: &str, ip: &str) -> CaseService {
        serde_json::from_value(serde_json::json!({
            "namespace": "ns", "name": name, "type": "ClusterIP", "clusterIP": ip,
            "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    fn state(svcs: &[CaseService]) -> ClusterState {
        let mut s = ClusterState::default();
        for c in svcs {
            s.services.insert(ferry_model::ObjectKey::new(&c.namespace, &c.name), c.to_service());
        }
        s
    }

    #[test]
    fn applying_the_changes_gives_the_next_state() {
        let a = state(&[svc("one", "172.30.0.1"), svc("two", "172.30.0.2")]);
        let b = state(&[svc("two", "172.30.0.3"), svc("three", "172.30.0.1")]);
        let changes = between(&a, &b);
        assert_eq!(changes.len(), 3, "{}", describe(&changes));
        let mut s = a.clone();
        for c in changes {
            s.apply(c);
        }
        assert_eq!(s, b);
        assert!(between(&b, &b).is_empty());
    }
}
