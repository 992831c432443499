//! The fake server's objects, resourceVersions and watch history (no I/O).
//!
//! Like etcd behind kube-apiserver, every write bumps one global
//! resourceVersion and is remembered in a bounded per-resource history, so a
//! watch can resume "after N". A watch from before the retained history is
//! answered with 410 Gone, which is what makes a client relist.

use crate::resource::ResourceType;
use crate::selector::Selectors;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};

/// What a write did, as a watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One remembered write.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub change_type: ChangeType,
    /// The object before a modification; a watch needs it to turn "stopped
    /// matching my selector" into DELETED and "started matching" into ADDED.
    pub old: Option<Value>,
    pub object: Value,
}

/// A watch cannot resume: its resourceVersion is older than the retained history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

/// The watch event a change means for one watcher's selectors, if any.
pub fn event_for(change: &Change, selectors: &Selectors) -> Option<(&'static str, Value)> {
    let now = selectors.matches(&change.object);
    let before = change.old.as_ref().is_some_and(|o| selectors.matches(o));
    let event = match (change.change_type, before, now) {
        (ChangeType::Added, _, true) => "ADDED",
        (ChangeType::Deleted, _, true) => "DELETED",
        (ChangeType::Modified, true, true) => "MODIFIED",
        (ChangeType::Modified, false, true) => "ADDED",
        (ChangeType::Modified, true, false) => "DELETED",
        _ => return None,
    };
    Some((event, change.object.clone()))
}

pub type Key = (String, String);

/// All objects and the history of writes.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<ResourceType, BTreeMap<Key, Value>>,
    history: BTreeMap<ResourceType, VecDeque<Change>>,
    /// A watch from resourceVersion N can be served iff N >= horizon: every
    /// change after the horizon is still in `history`.
    horizon: BTreeMap<ResourceType, u64>,
    history_limit: usize,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Store {
            // Start above 0: resourceVersion "0" means "any version" to clients.
            rv: 1,
            objects: BTreeMap::new(),
            history: BTreeMap::new(),
            horizon: BTreeMap::new(),
            history_limit: history_limit.max(1),
        }
    }

    /// The current (newest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces an object; returns its new resourceVersion.
    pub fn apply(&mut self, resource: ResourceType, mut object: Value) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        {
            let meta = object.as_object_mut().expect("objects are JSON objects").entry("metadata").or_insert(json!({}));
            let meta = meta.as_object_mut().expect("metadata is an object");
            if resource.namespaced() {
                // As `kubectl apply` does for a manifest without a namespace.
                meta.entry("namespace").or_insert(json!("default"));
            } else {
                meta.remove("namespace");
            }
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        let key = key_of(&object);
        let objects = self.objects.entry(resource).or_default();
        let old = objects.get(&key).cloned();
        let meta = &mut object["metadata"];
        match old.as_ref().map(|o| &o["metadata"]) {
            // Keep identity across updates, as the real server does.
            Some(old_meta) => {
                for field in ["uid", "creationTimestamp"] {
                    if !old_meta[field].is_null() {
                        meta[field] = old_meta[field].clone();
                    }
                }
            }
            None if meta["uid"].is_null() => meta["uid"] = json!(format!("00000000-0000-0000-0000-{rv:012}")),
            None => {}
        }
        objects.insert(key, object.clone());
        let change_type = if old.is_some() { ChangeType::Modified } else { ChangeType::Added };
        self.remember(resource, Change { rv, change_type, old, object });
        rv
    }

    /// Deletes an object; returns the deletion's resourceVersion, or `None` if it did not exist.
    pub fn delete(&mut self, resource: ResourceType, namespace: &str, name: &str) -> Option<u64> {
        let namespace = if resource.namespaced() { namespace } else { "" };
        let mut object = self.objects.get_mut(&resource)?.remove(&(namespace.to_string(), name.to_string()))?;
        self.rv += 1;
        let rv = self.rv;
        // A DELETED event carries the last state with the deletion's resourceVersion.
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.remember(resource, Change { rv, change_type: ChangeType::Deleted, old: None, object });
        Some(rv)
    }

    fn remember(&mut self, resource: ResourceType, change: Change) {
        let history = self.history.entry(resource).or_default();
        history.push_back(change);
        while history.len() > self.history_limit {
            let dropped = history.pop_front().expect("longer than the limit");
            self.horizon.insert(resource, dropped.rv);
        }
    }

    /// Forgets all history, like an etcd compaction: every watch resuming from
    /// before now gets 410 Gone. The resourceVersion is bumped so that a fresh
    /// list returns a version that can be watched from.
    pub fn expire_history(&mut self) {
        self.rv += 1;
        for resource in ResourceType::ALL {
            self.history.entry(resource).or_default().clear();
            self.horizon.insert(resource, self.rv);
        }
    }

    /// Objects matching the selectors, in namespace/name order, and the list's resourceVersion.
    pub fn list(&self, resource: ResourceType, namespace: Option<&str>, selectors: &Selectors) -> (Vec<Value>, u64) {
        let (items, _) = self.list_page(resource, namespace, selectors, None, usize::MAX);
        (items, self.rv)
    }

    /// At most `limit` matching objects in key order after `after` (exclusive),
    /// and the key of the last one when more may follow.
    pub fn list_page(
        &self,
        resource: ResourceType,
        namespace: Option<&str>,
        selectors: &Selectors,
        after: Option<&Key>,
        limit: usize,
    ) -> (Vec<Value>, Option<Key>) {
        let Some(all) = self.objects.get(&resource) else { return (Vec::new(), None) };
        let from = match after {
            Some(k) => std::ops::Bound::Excluded(k.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let mut matching = all
            .range((from, std::ops::Bound::Unbounded))
            .filter(|((ns, _), obj)| namespace.is_none_or(|want| want == ns) && selectors.matches(obj));
        let mut items = Vec::new();
        let mut last = None;
        for (key, obj) in matching.by_ref().take(limit) {
            items.push(obj.clone());
            last = Some(key.clone());
        }
        let more = matching.next().is_some();
        (items, last.filter(|_| more))
    }

    pub fn get(&self, resource: ResourceType, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if resource.namespaced() { namespace } else { "" };
        self.objects.get(&resource)?.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    /// Changes after resourceVersion `after`, or `Expired` if some are no longer retained.
    pub fn changes_since(&self, resource: ResourceType, after: u64) -> Result<Vec<Change>, Expired> {
        let horizon = self.horizon.get(&resource).copied().unwrap_or(0);
        if after < horizon {
            return Err(Expired { requested: after, oldest: horizon });
        }
        Ok(self.history.get(&resource).into_iter().flatten().filter(|c| c.rv > after).cloned().collect())
    }
}

fn key_of(object: &Value) -> Key {
    let field = |f: &str| object["metadata"][f].as_str().unwrap_or("").to_string();
    (field("namespace"), field("name"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::LabelSelector;

    fn svc(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}})
    }

    #[test]
    fn writes_bump_one_global_version() {
        let mut s = Store::new(10);
        let a = s.apply(ResourceType::Services, svc("a"));
        let n = s.apply(ResourceType::Nodes, json!({"metadata": {"name": "n", "namespace": "x"}}));
        assert!(n > a);
        let (items, rv) = s.list(ResourceType::Services, None, &Selectors::default());
        assert_eq!(rv, n);
        assert_eq!(items[0]["metadata"]["namespace"], "default");
        assert_eq!(items[0]["metadata"]["resourceVersion"], a.to_string());
        // Nodes are cluster-scoped: a namespace in the manifest is dropped.
        assert!(s.get(ResourceType::Nodes, "", "n").unwrap()["metadata"].get("namespace").is_none());
    }

    #[test]
    fn history_resumes_and_expires() {
        let mut s = Store::new(2);
        let start = s.resource_version();
        let a = s.apply(ResourceType::Services, svc("a"));
        s.apply(ResourceType::Services, svc("a"));
        let d = s.delete(ResourceType::Services, "default", "a").unwrap();
        assert_eq!(s.delete(ResourceType::Services, "default", "a"), None);
        // Three changes, two retained: resuming from before the first is Gone.
        assert!(s.changes_since(ResourceType::Services, start).is_err());
        let types: Vec<_> = s.changes_since(ResourceType::Services, a).unwrap().iter().map(|c| c.change_type).collect();
        assert_eq!(types, [ChangeType::Modified, ChangeType::Deleted]);
        assert!(s.changes_since(ResourceType::Services, d).unwrap().is_empty());
        // Other resources are unaffected by the services history.
        assert!(s.changes_since(ResourceType::Nodes, start).unwrap().is_empty());

        s.expire_history();
        assert_eq!(s.changes_since(ResourceType::Services, d).unwrap_err(), Expired { requested: d, oldest: d + 1 });
        let (_, rv) = s.list(ResourceType::Services, None, &Selectors::default());
        assert!(s.changes_since(ResourceType::Services, rv).is_ok(), "a fresh list must be watchable");
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let mut s = Store::new(10);
        let sel = Selectors { labels: LabelSelector::parse("!headless").unwrap(), ..Default::default() };
        let start = s.resource_version();
        s.apply(ResourceType::EndpointSlices, json!({"metadata": {"name": "a"}}));
        s.apply(ResourceType::EndpointSlices, json!({"metadata": {"name": "a", "labels": {"headless": ""}}}));
        s.apply(ResourceType::EndpointSlices, json!({"metadata": {"name": "a", "labels": {"headless": ""}}}));
        s.apply(ResourceType::EndpointSlices, json!({"metadata": {"name": "a"}}));
        let events: Vec<_> = s
            .changes_since(ResourceType::EndpointSlices, start)
            .unwrap()
            .iter()
            .filter_map(|c| event_for(c, &sel).map(|(t, _)| t))
            .collect();
        assert_eq!(events, ["ADDED", "DELETED", "ADDED"]);
    }
}
