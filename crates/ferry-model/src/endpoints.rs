//! Reading discovery.k8s.io/v1 EndpointSlices into per-service-port endpoint lists.
//!
//! Each slice is read on its own into a compact [`SliceRead`] (the planner
//! keeps those, not the API objects); all slices of a Service are then merged.
//! The DNAT port of an endpoint is the slice port whose (name, protocol)
//! equals the Service port's (`targetPort` is never consulted, exactly as
//! kube-proxy). One bad endpoint is skipped on its own; a slice that cannot be
//! attributed to a Service is skipped whole.

use crate::addr::{IpFamily, parse_ip_sloppy};
use crate::intern::shared_str;
use crate::node_config::NodeConfig;
use crate::problem::{ObjectError, ObjectKind};
use crate::protocol::Protocol;
use crate::service::{LABEL_HEADLESS, handled_by_other_proxy};
use crate::state::ObjectKey;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// One endpoint address as kube-proxy sees it. 32 bytes: the planner keeps
/// every endpoint twice (as its slice read it, and in the planned service
/// port), so where it runs and its hints live in one shared [`Placement`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// On this node (`nodeName` equals the node's name).
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `None`: no node, zone or hints (the same as an empty `Placement`).
    placement: Option<Arc<Placement>>,
}

/// Where an endpoint runs and the hints it carries. Most endpoints of one
/// node have the same, so one copy is shared ([`crate::intern`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Placement {
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub zone_hints: Hints,
    pub node_hints: Hints,
}

static PLACEMENTS: crate::intern::Interner<Placement> = crate::intern::Interner::new();

impl Placement {
    /// The shared copy; `None` for an empty placement.
    fn shared(self) -> Option<Arc<Placement>> {
        (self != Placement::default()).then(|| PLACEMENTS.share(&self, || Arc::new(self.clone())))
    }
}

/// The zone or node names of one endpoint's topology hints, sorted and
/// de-duplicated. Most endpoints have none, so an empty set is one null
/// pointer (a `BTreeSet<String>` took 24 bytes in every endpoint, stored twice
/// per service: in the slice read and in the planned service port).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints(Option<Box<[Box<str>]>>);

impl Hints {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.iter().any(|n| n == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|names| names.iter().map(|n| &**n))
    }
}

impl FromIterator<String> for Hints {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Self {
        let set: BTreeSet<String> = names.into_iter().collect();
        if set.is_empty() { Hints(None) } else { Hints(Some(set.into_iter().map(String::into_boxed_str).collect())) }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Endpoint", 10)?;
        st.serialize_field("ip", &self.ip)?;
        st.serialize_field("port", &self.port)?;
        st.serialize_field("local", &self.local)?;
        st.serialize_field("node_name", &self.node_name())?;
        st.serialize_field("zone", &self.zone())?;
        st.serialize_field("ready", &self.ready)?;
        st.serialize_field("serving", &self.serving)?;
        st.serialize_field("terminating", &self.terminating)?;
        st.serialize_field("zone_hints", self.zone_hints())?;
        st.serialize_field("node_hints", self.node_hints())?;
        st.end()
    }
}

impl Serialize for Hints {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

static NO_HINTS: Hints = Hints(None);

impl Endpoint {
    pub fn new(ip: IpAddr, port: u16, conditions: [bool; 3], local: bool, placement: Placement) -> Endpoint {
        let [ready, serving, terminating] = conditions;
        Endpoint { ip, port, local, ready, serving, terminating, placement: placement.shared() }
    }

    /// The endpoint's `nodeName`, if set.
    pub fn node_name(&self) -> Option<&str> {
        self.placement.as_ref().and_then(|p| p.node_name.as_deref())
    }

    /// The endpoint's `zone`, if set.
    pub fn zone(&self) -> Option<&str> {
        self.placement.as_ref().and_then(|p| p.zone.as_deref())
    }

    pub fn zone_hints(&self) -> &Hints {
        self.placement.as_ref().map_or(&NO_HINTS, |p| &p.zone_hints)
    }

    pub fn node_hints(&self) -> &Hints {
        self.placement.as_ref().map_or(&NO_HINTS, |p| &p.node_hints)
    }

    /// Usable for new connections under normal circumstances.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Serving and terminating: usable only as a fallback when nothing is ready.
    pub fn is_serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }

    /// Counted by the stale-flow rules: ready, or serving while terminating.
    pub fn is_serving(&self) -> bool {
        self.serving
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port)
    }
}

/// Endpoints of one Service, per family and per (port name, protocol).
pub type ServiceEndpoints = BTreeMap<(IpFamily, Arc<str>, Protocol), Arc<[Endpoint]>>;

/// The Service and family a slice serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceOwner {
    pub service: ObjectKey,
    pub family: IpFamily,
}

/// One EndpointSlice read into the little planning needs: its owner, its
/// ports and its endpoints, and what was wrong with it. The API object
/// itself is not kept. The endpoints carry the slice's port when it has
/// exactly one (nearly every slice), else 0 until merged: a one-port
/// slice's list is then the very list its service port plans with, shared
/// rather than copied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SliceRead {
    /// `None`: not ours (headless, another proxy's, FQDN) or unattributable.
    pub owner: Option<SliceOwner>,
    pub ports: Box<[(Arc<str>, Protocol, u16)]>,
    pub endpoints: Arc<[Endpoint]>,
    /// What was wrong with it; boxed, as nearly every slice has nothing
    /// (one pointer in the table of every slice, not a list's two words).
    pub problems: Option<Box<Vec<ObjectError>>>,
}

impl SliceRead {
    pub fn problems(&self) -> &[ObjectError] {
        self.problems.as_deref().map_or(&[], |p| p.as_slice())
    }
}

/// Reads one slice (see [`SliceRead`]).
pub fn read_slice(key: &ObjectKey, slice: &EndpointSlice, cfg: &NodeConfig) -> SliceRead {
    let mut problems = Vec::new();
    let owner = slice_owner(key, slice, cfg, &mut problems);
    let (ports, endpoints) = match &owner {
        Some(o) => {
            let ports = read_ports(key, slice, &mut problems);
            let mut endpoints = read_endpoints(key, slice, o.family, cfg, &mut problems);
            if let [(_, _, port)] = ports.as_slice() {
                endpoints.iter_mut().for_each(|e| e.port = *port);
            }
            (ports.into(), endpoints.into())
        }
        None => (Box::default(), Arc::default()),
    };
    let problems = (!problems.is_empty()).then(|| Box::new(problems));
    SliceRead { owner, ports, endpoints, problems }
}

/// Merges the slices of one Service, in the order given (slice key order).
/// The same address may appear in two slices while pods move; one copy is
/// kept, the local one if any, as kube-proxy does. Linear in the endpoints.
pub fn merge_slices<'a>(slices: impl IntoIterator<Item = &'a SliceRead>) -> ServiceEndpoints {
    let slices: smallvec::SmallVec<[&SliceRead; 1]> = slices.into_iter().filter(|r| r.owner.is_some()).collect();
    if let [read] = slices.as_slice()
        && let Some(as_is) = as_is(read)
    {
        return as_is;
    }
    let mut merged: BTreeMap<(IpFamily, Arc<str>, Protocol), Vec<Endpoint>> = BTreeMap::new();
    // Per service port, where each address:port sits in its list (built once a list is long).
    type Positions = HashMap<(IpAddr, u16), usize>;
    let mut index: HashMap<(IpFamily, Arc<str>, Protocol), Positions> = HashMap::new();
    for read in slices {
        let Some(owner) = &read.owner else { continue };
        for (name, protocol, port) in read.ports.iter() {
            let k = (owner.family, name.clone(), *protocol);
            let list = merged.entry(k.clone()).or_default();
            for ep in read.endpoints.iter() {
                let found = if list.len() < SCAN {
                    list.iter().position(|e| e.ip == ep.ip && e.port == *port)
                } else {
                    let positions = index.entry(k.clone()).or_default();
                    if positions.len() < list.len() {
                        positions.extend(list.iter().enumerate().map(|(i, e)| ((e.ip, e.port), i)));
                    }
                    positions.get(&(ep.ip, *port)).copied()
                };
                match found {
                    Some(i) => {
                        if ep.local && !list[i].local {
                            list[i] = Endpoint { port: *port, ..ep.clone() };
                        }
                    }
                    None => {
                        if list.len() >= SCAN {
                            index.entry(k.clone()).or_default().insert((ep.ip, *port), list.len());
                        }
                        list.push(Endpoint { port: *port, ..ep.clone() });
                    }
                }
            }
        }
    }
    merged.into_iter().map(|(k, list)| (k, list.into())).collect()
}

/// Below this many endpoints a scan finds duplicates faster than an index.
const SCAN: usize = 32;

/// The endpoints of a Service's only slice, when they are its service
/// port's list as they stand (one port, which they carry, and no address
/// twice): shared, not merged into a copy.
fn as_is(read: &SliceRead) -> Option<ServiceEndpoints> {
    let owner = read.owner.as_ref()?;
    let [(name, protocol, port)] = &*read.ports else { return None };
    let eps = &read.endpoints;
    if eps.iter().any(|e| e.port != *port) {
        return None;
    }
    let repeated = if eps.len() < SCAN {
        eps.iter().enumerate().any(|(i, e)| eps[..i].iter().any(|f| f.ip == e.ip))
    } else {
        let mut seen = HashSet::with_capacity(eps.len());
        !eps.iter().all(|e| seen.insert(e.ip))
    };
    if repeated {
        return None;
    }
    Some(BTreeMap::from([((owner.family, name.clone(), *protocol), eps.clone())]))
}

/// The Service and family a slice serves, or `None` if the slice is not ours.
fn slice_owner(
    key: &ObjectKey,
    slice: &EndpointSlice,
    cfg: &NodeConfig,
    errors: &mut Vec<ObjectError>,
) -> Option<SliceOwner> {
    let labels = slice.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) || handled_by_other_proxy(labels, cfg).is_some() {
        return None;
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        // FQDN slices are for DNS, never proxied.
        "FQDN" => return None,
        other => {
            errors.push(ObjectError::skip(
                ObjectKind::EndpointSlice,
                key,
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ));
            return None;
        }
    };
    let Some(service) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)).filter(|s| !s.is_empty()) else {
        errors.push(ObjectError::skip(
            ObjectKind::EndpointSlice,
            key,
            format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
            "is missing, so the slice belongs to no Service",
        ));
        return None;
    };
    Some(SliceOwner { service: ObjectKey::in_namespace_of(key, service), family })
}

fn read_ports(key: &ObjectKey, slice: &EndpointSlice, errors: &mut Vec<ObjectError>) -> Vec<(Arc<str>, Protocol, u16)> {
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        // kube-proxy ignores a port without a number: it stands for "all ports" in other consumers.
        let Some(port) = p.port else { continue };
        let Some(port) = u16::try_from(port).ok().filter(|p| *p != 0) else {
            errors.push(ObjectError::skip_entry(
                ObjectKind::EndpointSlice,
                key,
                format!("{field}.port"),
                format!("{port} is out of range 1-65535"),
            ));
            continue;
        };
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => match s.parse::<Protocol>() {
                Ok(proto) if proto.as_k8s() == s => proto,
                _ => {
                    errors.push(ObjectError::skip_entry(
                        ObjectKind::EndpointSlice,
                        key,
                        format!("{field}.protocol"),
                        format!("{s:?} is not TCP, UDP or SCTP"),
                    ));
                    continue;
                }
            },
        };
        ports.push((shared_str(p.name.as_deref().unwrap_or_default()), protocol, port));
    }
    ports
}

fn read_endpoints(
    key: &ObjectKey,
    slice: &EndpointSlice,
    family: IpFamily,
    cfg: &NodeConfig,
    errors: &mut Vec<ObjectError>,
) -> Vec<Endpoint> {
    // Exactly sized: the planner keeps this list as long as the slice exists.
    let mut endpoints = Vec::with_capacity(slice.endpoints.as_ref().map_or(0, Vec::len));
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let field = || format!("endpoints[{i}].addresses[0]");
        // kube-proxy uses the first address only; an endpoint without one is not usable yet.
        let Some(address) = ep.addresses.first() else {
            continue;
        };
        let Some(ip) = parse_ip_sloppy(address) else {
            errors.push(ObjectError::skip_entry(
                ObjectKind::EndpointSlice,
                key,
                field(),
                format!("{address:?} is not an IP address"),
            ));
            continue;
        };
        if IpFamily::of(&ip) != family {
            errors.push(ObjectError::skip_entry(
                ObjectKind::EndpointSlice,
                key,
                field(),
                format!("{ip} is {} but the slice's addressType is {family} (wrong address family)", IpFamily::of(&ip)),
            ));
            continue;
        }
        let cond = ep.conditions.as_ref();
        // kube-proxy's defaults for unset conditions.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        let zone_hints =
            hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone()).collect();
        let node_hints =
            hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone()).collect();
        let node_name = ep.node_name.as_deref().filter(|n| !n.is_empty());
        let local = node_name == Some(cfg.node_name.as_str()) && !cfg.node_name.is_empty();
        let placement = Placement {
            node_name: node_name.map(shared_str),
            zone: ep.zone.as_deref().filter(|z| !z.is_empty()).map(shared_str),
            zone_hints,
            node_hints,
        };
        endpoints.push(Endpoint::new(ip, 0, [ready, serving, terminating], local, placement));
    }
    endpoints.shrink_to_fit();
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(n: usize, offset: usize, local: bool) -> SliceRead {
        let endpoints = (0..n)
            .map(|i| {
                let ip = IpAddr::from([10, 0, ((i + offset) / 250) as u8, ((i + offset) % 250) as u8]);
                Endpoint::new(ip, 0, [true, true, false], local, Placement::default())
            })
            .collect();
        SliceRead {
            owner: Some(SliceOwner { service: ObjectKey::new("ns", "s"), family: IpFamily::V4 }),
            ports: Box::new([(Arc::from("http"), Protocol::Tcp, 8080)]),
            endpoints: Arc::from_iter::<Vec<Endpoint>>(endpoints),
            problems: None,
        }
    }

    /// A one-port slice that alone gives its service port's list is that
    /// list: planning shares the slice's allocation instead of copying it.
    /// Two slices, or a duplicate address, make a list of its own.
    #[test]
    fn one_slice_lists_are_shared_not_copied() {
        let mut a = read(3, 0, false);
        a.endpoints = a.endpoints.iter().map(|e| Endpoint { port: 8080, ..e.clone() }).collect();
        let k = (IpFamily::V4, Arc::from("http"), Protocol::Tcp);
        let merged = merge_slices([&a]);
        assert!(Arc::ptr_eq(&merged[&k], &a.endpoints));

        let b = read(2, 1, true);
        let both = merge_slices([&a, &b]);
        assert!(!Arc::ptr_eq(&both[&k], &a.endpoints));
        assert_eq!(both[&k].len(), 3, "the addresses of b are a's second and third");

        let mut dup = a.clone();
        dup.endpoints = a.endpoints.iter().chain(&a.endpoints[..1]).cloned().collect();
        let merged = merge_slices([&dup]);
        assert_eq!(merged[&k].len(), 3);
        assert!(!Arc::ptr_eq(&merged[&k], &dup.endpoints));
    }

    /// Large slices that overlap (pods moving between slices): one copy of
    /// each address, the local one preferred, first-seen order kept.
    #[test]
    fn overlapping_slices_merge_to_one_copy_of_each_endpoint() {
        let a = read(1000, 0, false);
        let b = read(1000, 500, true);
        let merged = merge_slices([&a, &b]);
        let list = &merged[&(IpFamily::V4, Arc::from("http"), Protocol::Tcp)];
        assert_eq!(list.len(), 1500);
        assert!(list[..500].iter().all(|e| !e.local));
        assert!(list[500..].iter().all(|e| e.local), "the local copy replaces the remote one in place");
        assert_eq!(list[0].ip, a.endpoints[0].ip);
        assert!(list.iter().all(|e| e.port == 8080));
    }
}
