//! What the Kubernetes API source sends, and how it changes a `ClusterState` (pure).
//!
//! The source speaks in [`SourceEvent`]s: single changes, whole-kind
//! replacements after a (re)list, one `Synced` once the first lists are in, and
//! watch errors for logs. [`apply_event`] is the only way they touch a
//! `ClusterState`, so the agent and the tests apply them identically.

use ferry_model::state::{ClusterState, ObjectKey, StateChange};
use std::fmt;

/// A kind of object the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        })
    }
}

/// The end of a (re)list of one kind: the keys of every object it returned
/// (each came before as a [`SourceEvent::ListItem`]). Keys, not objects: a
/// list is streamed into the model object by object, never held whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub kind: Kind,
    /// Nodes are keyed `("", name)`.
    pub keys: Vec<ObjectKey>,
}

impl Listing {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys as a set, to tell which held objects the list no longer has.
    pub fn key_set(&self) -> std::collections::HashSet<&ObjectKey> {
        self.keys.iter().collect()
    }
}

/// The key a [`Listing`] has for a Node.
pub fn node_key(name: &str) -> ObjectKey {
    ObjectKey::new("", name)
}

/// The events a (re)list of `changes` (all `*Applied` of one kind) sends:
/// each object, then the listing. For tests and sources that read whole sets.
pub fn relist(kind: Kind, changes: Vec<StateChange>) -> Vec<SourceEvent> {
    let keys = changes
        .iter()
        .filter_map(|c| match c {
            StateChange::ServiceApplied(o) => Some(ObjectKey::of_meta(&o.metadata)),
            StateChange::EndpointSliceApplied(o) => Some(ObjectKey::of_meta(&o.metadata)),
            StateChange::NodeApplied(o) => Some(node_key(o.metadata.name.as_deref().unwrap_or_default())),
            _ => None,
        })
        .collect();
    let mut out: Vec<SourceEvent> = changes.into_iter().map(SourceEvent::ListItem).collect();
    out.push(SourceEvent::Listed(Listing { kind, keys }));
    out
}

/// One message from the Kubernetes API source.
///
/// Order per kind is the API server's order. A consumer applies them with
/// [`apply_event`] and must not program the datapath before `Synced`: until
/// then the state may hold Services without their endpoints, and writing
/// rules from it would briefly blackhole traffic.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// One object was added, modified or deleted.
    Change(StateChange),
    /// One object of a (re)list in progress (always an `*Applied`): the API
    /// server's current version, possibly unchanged since it was last sent.
    ListItem(StateChange),
    /// A (re)list of one kind finished: objects of that kind not in it are
    /// gone (e.g. deleted during an outage).
    Listed(Listing),
    /// Services and EndpointSlices have both completed their first list. Sent
    /// once per run; the Node watch does not hold it back.
    Synced,
    /// A list or watch failed; the source retries with backoff by itself.
    /// For logs and metrics only: the state is still correct, only late.
    WatchError { kind: Kind, message: String },
    /// Everything the source read up to this instant has been sent (the
    /// manifest source, after each batch): a sync that includes it reflects
    /// every file as it was then.
    Checkpoint(std::time::SystemTime),
}

/// Applies a change or a listing to the state; returns whether the state may have
/// changed (false for `Synced` and `WatchError`).
pub fn apply_event(state: &mut ClusterState, event: &SourceEvent) -> bool {
    match event {
        SourceEvent::Change(change) => {
            state.apply(change.clone());
            true
        }
        SourceEvent::ListItem(change) => {
            state.apply(change.clone());
            true
        }
        SourceEvent::Listed(listing) => {
            let keys = listing.key_set();
            match listing.kind {
                Kind::Service => state.services.retain(|k, _| keys.contains(k)),
                Kind::EndpointSlice => state.endpoint_slices.retain(|k, _| keys.contains(k)),
                Kind::Node => state.nodes.retain(|name, _| keys.contains(&node_key(name))),
            }
            true
        }
        SourceEvent::Synced | SourceEvent::WatchError { .. } | SourceEvent::Checkpoint(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn meta(ns: Option<&str>, name: &str, rv: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(Into::into),
            name: Some(name.into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        }
    }

    fn svc(name: &str, rv: &str) -> Service {
        Service { metadata: meta(Some("default"), name, rv), ..Default::default() }
    }

    fn slice(name: &str, rv: &str) -> EndpointSlice {
        EndpointSlice { metadata: meta(Some("default"), name, rv), ..Default::default() }
    }

    fn applied_svc(name: &str, rv: &str) -> StateChange {
        StateChange::ServiceApplied(Box::new(svc(name, rv)))
    }

    fn node(name: &str) -> Node {
        Node { metadata: meta(None, name, "1"), ..Default::default() }
    }

    fn keys<V>(m: &std::collections::BTreeMap<ObjectKey, V>) -> Vec<String> {
        m.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn replace_removes_vanished_objects_and_keeps_the_rest() {
        let mut state = ClusterState::default();
        for ev in [
            SourceEvent::Change(StateChange::ServiceApplied(Box::new(svc("a", "1")))),
            SourceEvent::Change(StateChange::ServiceApplied(Box::new(svc("b", "2")))),
            SourceEvent::Change(StateChange::EndpointSliceApplied(Box::new(slice("a-1", "3")))),
            SourceEvent::Change(StateChange::NodeApplied(Box::new(node("n1")))),
        ] {
            assert!(apply_event(&mut state, &ev));
        }

        // A relist of Services: b vanished, a changed, c is new.
        for ev in relist(Kind::Service, vec![applied_svc("a", "9"), applied_svc("c", "10")]) {
            apply_event(&mut state, &ev);
        }
        assert_eq!(keys(&state.services), ["default/a", "default/c"]);
        assert_eq!(state.services[&ObjectKey::new("default", "a")].metadata.resource_version.as_deref(), Some("9"));
        // Other kinds are untouched by a Services relist.
        assert_eq!(keys(&state.endpoint_slices), ["default/a-1"]);
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), ["n1"]);

        for ev in relist(Kind::EndpointSlice, vec![]) {
            apply_event(&mut state, &ev);
        }
        assert!(state.endpoint_slices.is_empty());
        for ev in relist(Kind::Node, vec![StateChange::NodeApplied(Box::new(node("n2")))]) {
            apply_event(&mut state, &ev);
        }
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), ["n2"]);
        assert_eq!(keys(&state.services), ["default/a", "default/c"]);
    }

    #[test]
    fn deletes_and_non_state_events() {
        let mut state = ClusterState::default();
        for ev in relist(Kind::Service, vec![applied_svc("a", "1"), applied_svc("b", "2")]) {
            apply_event(&mut state, &ev);
        }
        apply_event(&mut state, &SourceEvent::Change(StateChange::ServiceDeleted(ObjectKey::new("default", "a"))));
        assert_eq!(keys(&state.services), ["default/b"]);

        let before = state.clone();
        assert!(!apply_event(&mut state, &SourceEvent::Synced));
        assert!(!apply_event(&mut state, &SourceEvent::WatchError { kind: Kind::Service, message: "x".into() }));
        assert_eq!(state, before);
    }
}
