//! `ClusterState`: the Kubernetes objects a node proxies, in their real API shapes.
//!
//! Sources (the Kubernetes API, a manifest directory, an acceptance case) fill a
//! `ClusterState`; the planner reads it. Objects are kept exactly as the API
//! served them, so validation happens once, in the model, for every source.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// `namespace/name` of a namespaced object: one pointer to a shared pair. A
/// key is copied into many tables (the planner's, the Plan's, the
/// programmer's mirror), and a copy costs a reference count, 8 bytes (two
/// shared strings side by side took 32 in every copy, and most keys are
/// held five to seven times). The namespace is interned (a cluster has
/// few), so two keys of one namespace compare it by pointer.
#[derive(Clone)]
pub struct ObjectKey(Arc<KeyParts>);

#[derive(Debug)]
struct KeyParts {
    namespace: Arc<str>,
    name: Box<str>,
}

/// Orders shared strings, equal at once when they are the same string.
fn cmp_shared(a: &Arc<str>, b: &Arc<str>) -> std::cmp::Ordering {
    if Arc::ptr_eq(a, b) { std::cmp::Ordering::Equal } else { a.cmp(b) }
}

impl PartialEq for ObjectKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for ObjectKey {}

// By content, as equality is (the pointer test is only a shortcut).
impl std::hash::Hash for ObjectKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.namespace.hash(state);
        self.0.name.hash(state);
    }
}

impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.0, &other.0) {
            return std::cmp::Ordering::Equal;
        }
        cmp_shared(&self.0.namespace, &other.0.namespace).then_with(|| self.0.name.cmp(&other.0.name))
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// What an `ObjectKey` is written and read as.
#[derive(Serialize, Deserialize)]
struct KeyFields<'a> {
    #[serde(borrow)]
    namespace: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
}

impl Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        KeyFields { namespace: self.namespace().into(), name: self.name().into() }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ObjectKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = KeyFields::deserialize(d)?;
        Ok(ObjectKey::new(f.namespace, f.name))
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectKey").field("namespace", &self.namespace()).field("name", &self.name()).finish()
    }
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        ObjectKey(Arc::new(KeyParts {
            namespace: crate::intern::shared_str(namespace.as_ref()),
            name: name.as_ref().into(),
        }))
    }

    /// A key in the namespace of `other` (sharing its namespace string).
    pub fn in_namespace_of(other: &ObjectKey, name: impl AsRef<str>) -> Self {
        ObjectKey(Arc::new(KeyParts { namespace: other.0.namespace.clone(), name: name.as_ref().into() }))
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The key of an object's metadata; a missing namespace means `default`,
    /// as for `kubectl apply` of a manifest without one.
    pub fn of_meta(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        ObjectKey::new(meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or_default())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())
    }
}

/// Every object the planner reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
}

/// One change to a `ClusterState`, as a watch event delivers it.
#[derive(Debug, Clone)]
pub enum StateChange {
    ServiceApplied(Box<Service>),
    ServiceDeleted(ObjectKey),
    EndpointSliceApplied(Box<EndpointSlice>),
    EndpointSliceDeleted(ObjectKey),
    NodeApplied(Box<Node>),
    NodeDeleted(String),
}

impl ClusterState {
    pub fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::ServiceApplied(svc) => {
                self.services.insert(ObjectKey::of_meta(&svc.metadata), *svc);
            }
            StateChange::ServiceDeleted(key) => {
                self.services.remove(&key);
            }
            StateChange::EndpointSliceApplied(slice) => {
                self.endpoint_slices.insert(ObjectKey::of_meta(&slice.metadata), *slice);
            }
            StateChange::EndpointSliceDeleted(key) => {
                self.endpoint_slices.remove(&key);
            }
            StateChange::NodeApplied(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                self.nodes.insert(name, *node);
            }
            StateChange::NodeDeleted(name) => {
                self.nodes.remove(&name);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.services.len() + self.endpoint_slices.len() + self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
