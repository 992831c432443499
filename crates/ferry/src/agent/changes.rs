//! Which Services and endpoints changed since the last sync (pure): the
//! "changes pending/total" metrics and the network programming latency, as
//! kube-proxy's change trackers define them.
//!
//! A change is counted per event, and pending per Service (several events for
//! one Service are one pending change). An EndpointSlice event carrying the
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation adds that time
//! to the pending trigger times; once a sync has programmed the change, the
//! time since each trigger is the network programming latency. Triggers from
//! before the agent started are skipped (they measure the agent's start, not
//! the network), as kube-proxy does. A relist counts only what it changed.
//!
//! The tracker keeps no objects: only a 64-bit digest of each object's key,
//! resourceVersion and (for slices) Service, which is all counting needs.

use ferry_k8s::api::{Kind, SourceEvent};
use ferry_model::state::{ObjectKey, StateChange};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::SystemTime;

/// The EndpointSlice annotation with the time of the change that caused it.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The label naming an EndpointSlice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What one event changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    pub services: u64,
    pub endpoints: u64,
    /// The node or anything else that changes the Plan.
    pub other: u64,
}

impl Counted {
    pub fn any(&self) -> bool {
        self.services + self.endpoints + self.other > 0
    }
}

/// A Service's key, as a digest.
type Digest = u64;

fn digest(value: impl Hash) -> Digest {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// Changes taken by a sync (Services, as digests of their keys): handed back if it fails.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub services: HashSet<Digest>,
    pub endpoints: HashSet<Digest>,
    pub triggers: Vec<SystemTime>,
}

/// Pending changes since the last sync.
#[derive(Debug, Clone)]
pub struct ChangeTracker {
    started: SystemTime,
    pending: Batch,
    /// Service key digest -> resourceVersion digest.
    services: HashMap<Digest, Digest>,
    /// Slice key digest -> (resourceVersion digest, owner Service digest).
    slices: HashMap<Digest, (Digest, Digest)>,
}

fn owner(slice: &EndpointSlice) -> Digest {
    let key = ObjectKey::of_meta(&slice.metadata);
    match slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
        Some(service) => digest(ObjectKey::new(key.namespace(), service)),
        None => digest(key),
    }
}

fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice.metadata.annotations.as_ref()?.get(LAST_CHANGE_TRIGGER_TIME)?;
    let ts: Timestamp = text.parse().ok()?;
    Some(SystemTime::from(ts))
}

impl ChangeTracker {
    /// `started`: when the agent started; earlier triggers are not measured.
    pub fn new(started: SystemTime) -> ChangeTracker {
        ChangeTracker { started, pending: Batch::default(), services: HashMap::new(), slices: HashMap::new() }
    }

    pub fn pending_services(&self) -> usize {
        self.pending.services.len()
    }

    pub fn pending_endpoints(&self) -> usize {
        self.pending.endpoints.len()
    }

    /// Records `event`.
    pub fn observe(&mut self, event: &SourceEvent) -> Counted {
        let mut c = Counted::default();
        match event {
            SourceEvent::Change(StateChange::ServiceApplied(svc)) => {
                let key = digest(ObjectKey::of_meta(&svc.metadata));
                self.services.insert(key, digest(&svc.metadata.resource_version));
                self.pending.services.insert(key);
                c.services += 1;
            }
            SourceEvent::Change(StateChange::ServiceDeleted(key)) => {
                let key = digest(key);
                self.services.remove(&key);
                self.pending.services.insert(key);
                c.services += 1;
            }
            SourceEvent::Change(StateChange::EndpointSliceApplied(slice)) => {
                self.slice_changed(slice);
                c.endpoints += 1;
            }
            SourceEvent::Change(StateChange::EndpointSliceDeleted(key)) => {
                let key = digest(key);
                let service = self.slices.remove(&key).map_or(key, |(_, owner)| owner);
                self.pending.endpoints.insert(service);
                c.endpoints += 1;
            }
            SourceEvent::Change(StateChange::NodeApplied(_) | StateChange::NodeDeleted(_)) => c.other += 1,
            // A (re)list sends every object again: only those whose
            // resourceVersion moved are changes.
            SourceEvent::ListItem(StateChange::ServiceApplied(svc)) => {
                let key = digest(ObjectKey::of_meta(&svc.metadata));
                let rv = digest(&svc.metadata.resource_version);
                if self.services.insert(key, rv) != Some(rv) {
                    self.pending.services.insert(key);
                    c.services += 1;
                }
            }
            SourceEvent::ListItem(StateChange::EndpointSliceApplied(slice)) => {
                let key = digest(ObjectKey::of_meta(&slice.metadata));
                let rv = digest(&slice.metadata.resource_version);
                if self.slices.get(&key).map(|(v, _)| *v) != Some(rv) {
                    self.slice_changed(slice);
                    c.endpoints += 1;
                }
            }
            SourceEvent::ListItem(_) => c.other += 1,
            SourceEvent::Listed(listing) => {
                let seen: HashSet<Digest> = listing.keys.iter().map(digest).collect();
                match listing.kind {
                    Kind::Service => {
                        let gone: Vec<Digest> = self.services.keys().filter(|k| !seen.contains(*k)).copied().collect();
                        for key in gone {
                            self.services.remove(&key);
                            self.pending.services.insert(key);
                            c.services += 1;
                        }
                    }
                    Kind::EndpointSlice => {
                        let gone: Vec<Digest> = self.slices.keys().filter(|k| !seen.contains(*k)).copied().collect();
                        for key in gone {
                            if let Some((_, owner)) = self.slices.remove(&key) {
                                self.pending.endpoints.insert(owner);
                                c.endpoints += 1;
                            }
                        }
                    }
                    Kind::Node => c.other += 1,
                }
            }
            SourceEvent::Synced | SourceEvent::WatchError { .. } | SourceEvent::Checkpoint(_) => {}
        }
        c
    }

    fn slice_changed(&mut self, slice: &EndpointSlice) {
        let key = digest(ObjectKey::of_meta(&slice.metadata));
        let owner = owner(slice);
        self.slices.insert(key, (digest(&slice.metadata.resource_version), owner));
        self.pending.endpoints.insert(owner);
        if let Some(t) = trigger_time(slice).filter(|t| *t > self.started) {
            self.pending.triggers.push(t);
        }
    }

    /// Hands the pending changes to a sync.
    pub fn take(&mut self) -> Batch {
        std::mem::take(&mut self.pending)
    }

    /// Gives back the changes of a sync that failed: they are still pending.
    pub fn restore(&mut self, batch: Batch) {
        self.pending.services.extend(batch.services);
        self.pending.endpoints.extend(batch.endpoints);
        self.pending.triggers.extend(batch.triggers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn svc(name: &str, rv: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn slice(name: &str, service: &str, rv: &str, trigger: Option<&str>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), service.to_string())])),
                annotations: trigger.map(|t| BTreeMap::from([(LAST_CHANGE_TRIGGER_TIME.to_string(), t.to_string())])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ..Default::default()
        }
    }

    fn feed(t: &mut ChangeTracker, ev: SourceEvent) -> Counted {
        t.observe(&ev)
    }

    fn change(c: StateChange) -> SourceEvent {
        SourceEvent::Change(c)
    }

    #[test]
    fn pending_is_per_service_and_total_per_event() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut t = ChangeTracker::new(started);
        let a1 = slice("a-1", "a", "1", Some("2023-11-14T22:13:00Z")); // before start: not measured
        let a2 = slice("a-2", "a", "2", Some("2023-11-14T22:13:19.5Z"));
        let late = slice("a-3", "a", "3", Some("2023-11-14T22:15:00Z"));
        let mut counted = Counted::default();
        for ev in [
            change(StateChange::ServiceApplied(Box::new(svc("a", "1")))),
            change(StateChange::ServiceApplied(Box::new(svc("a", "2")))),
            change(StateChange::EndpointSliceApplied(Box::new(a1))),
            change(StateChange::EndpointSliceApplied(Box::new(a2))),
            change(StateChange::EndpointSliceApplied(Box::new(late))),
            change(StateChange::EndpointSliceDeleted(ObjectKey::new("ns", "a-1"))),
        ] {
            let c = feed(&mut t, ev);
            counted.services += c.services;
            counted.endpoints += c.endpoints;
        }
        assert_eq!((counted.services, counted.endpoints), (2, 4));
        assert_eq!((t.pending_services(), t.pending_endpoints()), (1, 1));
        let batch = t.take();
        assert_eq!(batch.triggers, [SystemTime::from("2023-11-14T22:15:00Z".parse::<Timestamp>().unwrap())]);
        assert_eq!(
            batch.endpoints,
            HashSet::from([digest(ObjectKey::new("ns", "a"))]),
            "a deleted slice counts for its Service"
        );
        assert_eq!((t.pending_services(), t.pending_endpoints()), (0, 0));
        t.restore(batch.clone());
        assert_eq!(t.take(), batch, "a failed sync gives its changes back");
    }

    #[test]
    fn a_relist_counts_only_what_changed() {
        use ferry_k8s::api::relist;
        fn services(list: Vec<Service>) -> Vec<StateChange> {
            list.into_iter().map(|s| StateChange::ServiceApplied(Box::new(s))).collect()
        }
        // The counts of a whole (re)list: its items and its listing.
        fn feed_all(t: &mut ChangeTracker, events: Vec<SourceEvent>) -> Counted {
            let mut total = Counted::default();
            for ev in events {
                let c = feed(t, ev);
                total.services += c.services;
                total.endpoints += c.endpoints;
            }
            total
        }
        let mut t = ChangeTracker::new(SystemTime::UNIX_EPOCH);
        feed_all(&mut t, relist(Kind::Service, services(vec![svc("a", "1"), svc("b", "1")])));
        let slices = vec![StateChange::EndpointSliceApplied(Box::new(slice("a-1", "a", "1", None)))];
        feed_all(&mut t, relist(Kind::EndpointSlice, slices));
        t.take();
        // b changed, c is new, a is unchanged; the slice of a is gone.
        let c = feed_all(&mut t, relist(Kind::Service, services(vec![svc("a", "1"), svc("b", "5"), svc("c", "6")])));
        assert_eq!(c.services, 2);
        let c = feed_all(&mut t, relist(Kind::EndpointSlice, vec![]));
        assert_eq!(c.endpoints, 1);
        let batch = t.take();
        assert_eq!(
            batch.services,
            HashSet::from([digest(ObjectKey::new("ns", "b")), digest(ObjectKey::new("ns", "c"))])
        );
        assert_eq!(batch.endpoints, HashSet::from([digest(ObjectKey::new("ns", "a"))]));
        assert!(!feed(&mut t, SourceEvent::Synced).any());
    }
}
