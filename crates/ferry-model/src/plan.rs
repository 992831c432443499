//! The Plan: everything a datapath backend needs, derived from `ClusterState + NodeConfig`.
//!
//! `build_plan` is a pure function. It reads every Service and EndpointSlice,
//! skips (and reports) malformed ones, and produces one `ServicePort` per
//! (service, port, family) with its frontends, endpoint sets and the route
//! taken by each source class. The frontend table maps every address:port a
//! packet can be sent to onto the service port that owns it; ownership is
//! policy, not iteration order (see [`Claim`]).
//!
//! `build_plan` plans the whole cluster from scratch. The agent uses the
//! incremental [`crate::planner::Planner`], which re-plans only what changed
//! with the same per-service functions (`plan_service`, `frontend_claims`);
//! `build_plan` stays as the oracle the planner is tested against. The
//! Plan's large tables are persistent maps, so handing a Plan to the sync
//! thread (`Arc<Plan>`) and changing one service port are both cheap.

use crate::addr::{IpFamily, fmt_addr_port};
use crate::endpoints::{Endpoint, ServiceEndpoints, merge_slices, read_slice};
use crate::node_config::{LocalDetector, NodeConfig};
use crate::node_info::NodeInfo;
use crate::problem::{ObjectError, ObjectKind};
use crate::protocol::Protocol;
use crate::route::{EndpointSet, MasqReason, PerSource, Route, RouteReason, SourceClass};
use crate::service::{IgnoreReason, ServiceInfo, ServiceRead, read_service};
use crate::state::{ClusterState, ObjectKey};
use crate::topology::{Categorized, TopologyContext, categorize};
use imbl::{OrdMap, OrdSet};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// Node label holding the topology zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Identifies one service port in one family: kube-proxy's `ServicePortName`
/// plus the family. One shared allocation: an id is copied into the Plan's
/// table, its frontends, the planner's claims and the programmer's mirror,
/// and each copy is a pointer (the fields were 56 bytes in every one).
#[derive(Clone)]
pub struct ServicePortId(Arc<ServicePortName>);

/// What a [`ServicePortId`] names (read through it: `id.service`, `id.port_name`, ...).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub service: ObjectKey,
    pub port_name: Arc<str>,
    pub protocol: Protocol,
    pub family: IpFamily,
}

impl ServicePortId {
    pub fn new(service: ObjectKey, port_name: Arc<str>, protocol: Protocol, family: IpFamily) -> ServicePortId {
        ServicePortId(Arc::new(ServicePortName { service, port_name, protocol, family }))
    }
}

impl std::ops::Deref for ServicePortId {
    type Target = ServicePortName;
    fn deref(&self) -> &ServicePortName {
        &self.0
    }
}

impl PartialEq for ServicePortId {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for ServicePortId {}

impl Ord for ServicePortId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.0, &other.0) { std::cmp::Ordering::Equal } else { self.0.cmp(&other.0) }
    }
}

impl PartialOrd for ServicePortId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::hash::Hash for ServicePortId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl fmt::Debug for ServicePortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServicePortId")
            .field("service", &self.service)
            .field("port_name", &self.port_name)
            .field("protocol", &self.protocol)
            .field("family", &self.family)
            .finish()
    }
}

impl Serialize for ServicePortId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl fmt::Display for ServicePortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)?;
        if self.family == IpFamily::V6 {
            f.write_str(" (IPv6)")?;
        }
        Ok(())
    }
}

/// One service port in one family, fully decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub id: ServicePortId,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// External, load-balancer and source-range addresses (read with
    /// `external_ips()`, `load_balancer_ips()`, ...).
    #[serde(flatten)]
    outside: OutsideAddresses,
    pub internal_policy_local: bool,
    pub external_policy_local: bool,
    /// Reachable through a NodePort, a load-balancer address or an ExternalIP.
    pub externally_accessible: bool,
    pub affinity_timeout_seconds: Option<std::num::NonZeroU32>,
    pub health_check_node_port: Option<u16>,
    /// Backend choice on the packet path: Maglev (true), random (false), node default (None).
    pub maglev: Option<bool>,
    /// Every endpoint of the port (deduplicated), whatever its state. Shared
    /// with the EndpointSlice it came from when one slice gives the whole
    /// list (the common case), so the planner keeps each endpoint once.
    pub endpoints: Arc<[Endpoint]>,
    pub categorized: Categorized,
    /// Route for ClusterIP traffic.
    pub internal: PerSource<Route>,
    /// Route for NodePort, load-balancer and ExternalIP traffic.
    pub external: PerSource<Route>,
}

/// The addresses of a service port other than its ClusterIP and NodePort.
/// Most service ports (ClusterIP only) have none, and then the whole set is
/// one null pointer: five empty lists in every service port were a tenth of
/// the planner's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OutsideAddresses(Option<Box<PortAddresses>>);

impl Serialize for OutsideAddresses {
    /// As the five fields they are (empty when there are none).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        static NONE: PortAddresses = PortAddresses {
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            proxied_load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            firewall: None,
        };
        let a = self.0.as_deref().unwrap_or(&NONE);
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("external_ips", &a.external_ips)?;
        m.serialize_entry("load_balancer_ips", &a.load_balancer_ips)?;
        m.serialize_entry("proxied_load_balancer_ips", &a.proxied_load_balancer_ips)?;
        m.serialize_entry("source_ranges", &a.source_ranges)?;
        m.serialize_entry("firewall", &a.firewall)?;
        m.end()
    }
}

impl ServicePort {
    /// ExternalIPs of this family the node admits.
    pub fn external_ips(&self) -> &[IpAddr] {
        self.outside.0.as_ref().map_or(&[], |a| &a.external_ips)
    }

    /// Load-balancer addresses the node intercepts (`ipMode: VIP`).
    pub fn load_balancer_ips(&self) -> &[IpAddr] {
        self.outside.0.as_ref().map_or(&[], |a| &a.load_balancer_ips)
    }

    /// Load-balancer addresses left alone (`ipMode: Proxy`), kept for `explain`.
    pub fn proxied_load_balancer_ips(&self) -> &[IpAddr] {
        self.outside.0.as_ref().map_or(&[], |a| &a.proxied_load_balancer_ips)
    }

    /// `loadBalancerSourceRanges` of this family as written.
    pub fn source_ranges(&self) -> &[IpNet] {
        self.outside.0.as_ref().map_or(&[], |a| &a.source_ranges)
    }

    /// Sources allowed to reach the load-balancer addresses, when a
    /// source-range firewall is in force: the ranges, plus the LB addresses
    /// themselves when the node's primary IP is inside a range
    /// (node-originated VIP traffic loops back with the VIP as source).
    pub fn firewall(&self) -> Option<&[IpNet]> {
        self.outside.0.as_ref().and_then(|a| a.firewall.as_deref())
    }

    pub fn endpoint_set(&self, set: EndpointSet) -> impl Iterator<Item = &Endpoint> {
        let idx = match set {
            EndpointSet::Cluster => self.categorized.cluster(),
            EndpointSet::Local => self.categorized.local(),
        };
        idx.iter().map(|i| &self.endpoints[*i as usize])
    }

    /// Endpoints counted as serving by the stale-flow rules.
    pub fn serving_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.is_serving())
    }

    /// The `ip:port` of every serving endpoint: what a flow of this port may be steered to.
    pub fn serving_addrs(&self) -> BTreeSet<std::net::SocketAddr> {
        self.serving_endpoints().map(|e| e.addr()).collect()
    }

    pub fn route(&self, kind: FrontendKind, source: SourceClass) -> Route {
        match kind {
            FrontendKind::ClusterIp => *self.internal.get(source),
            _ => *self.external.get(source),
        }
    }
}

/// How a frontend was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer IP",
            FrontendKind::ExternalIp => "ExternalIP",
        })
    }
}

/// The address part of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendAddr {
    Ip(IpAddr),
    /// Every NodePort address of the family (`Plan::node.node_port_addresses`).
    NodePort(IpFamily),
}

/// An address, port and protocol a packet can be sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FrontendKey {
    pub addr: FrontendAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            FrontendAddr::Ip(ip) => {
                write!(f, "{}/{}", fmt_addr_port(&ip, self.port), self.protocol)
            }
            FrontendAddr::NodePort(fam) => write!(f, "<{fam} node-port addresses>:{}/{}", self.port, self.protocol),
        }
    }
}

/// Who owns a frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub service: ServicePortId,
}

/// Node-level facts the datapath needs, resolved from `NodeConfig` and the Node object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFacts {
    pub name: String,
    pub zone: Option<String>,
    pub families: Vec<IpFamily>,
    /// Every address of the node, plus loopback.
    pub local_addresses: BTreeSet<IpAddr>,
    pub primary_ips: BTreeMap<IpFamily, IpAddr>,
    /// Addresses serving NodePorts (after `nodePortAddresses` and `localhostNodePorts`).
    pub node_port_addresses: BTreeSet<IpAddr>,
    pub local_detector: LocalDetector,
    /// Pod ranges the detector uses (ClusterCIDR or NodeCIDR mode); for the
    /// interface modes, this node's pod ranges (used by `explain` only).
    pub pod_ranges: Vec<IpNet>,
    pub service_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    pub accept_health_check_node_ports: bool,
    /// Egress masquerading of pod traffic.
    pub masquerade: crate::node_config::MasqueradeMode,
    /// Sources whose egress may be masqueraded: this node's pod ranges.
    pub masquerade_sources: Vec<IpNet>,
    /// Destinations never masqueraded, in the order they are checked.
    pub masquerade_exempt: Vec<(IpNet, crate::egress::ExemptReason)>,
    /// Addresses of the other nodes (from their Node objects).
    pub other_node_addresses: BTreeSet<IpAddr>,
    /// `externalIPs.allowedCIDRs`; `None`: every unicast address.
    pub external_ips_allowed: Option<Vec<IpNet>>,
    pub service_limits: crate::node_config::ServiceLimits,
    /// `loadBalancing.mode` (`crate::dsr`).
    pub load_balancing: crate::dsr::LoadBalancingMode,
    /// Where DSR tunnels a remote backend's packets (`crate::dsr::tunnels`);
    /// empty unless the mode is `dsr` or `hybrid`.
    pub tunnels: Vec<crate::dsr::Tunnel>,
}

impl NodeFacts {
    /// Whether pod traffic of `family` can be recognised.
    pub fn detects_pods(&self, family: IpFamily) -> bool {
        match self.local_detector {
            LocalDetector::ClusterCidr | LocalDetector::NodeCidr => {
                self.pod_ranges.iter().any(|n| IpFamily::of_net(n) == family)
            }
            LocalDetector::InterfaceNamePrefix(_) | LocalDetector::BridgeInterface(_) => true,
            LocalDetector::None => false,
        }
    }

    pub fn in_pod_ranges(&self, ip: &IpAddr) -> bool {
        self.pod_ranges.iter().any(|n| n.contains(ip))
    }

    pub fn in_service_cidrs(&self, ip: &IpAddr) -> bool {
        self.service_cidrs.iter().any(|n| n.contains(ip))
    }
}

/// Everything a backend applies. Cloning is cheap: the tables are persistent
/// maps sharing their nodes with the clone.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Shared between consecutive Plans while it does not change.
    pub node: Arc<NodeFacts>,
    pub services: OrdMap<ServicePortId, Arc<ServicePort>>,
    pub frontends: OrdMap<FrontendKey, Frontend>,
    /// Every ClusterIP in use: other ports on them are rejected.
    pub cluster_ips: OrdSet<IpAddr>,
    /// Health-check node ports (TCP) and the Service each belongs to.
    pub health_check_node_ports: OrdMap<u16, ObjectKey>,
    /// Sorted and without duplicates.
    pub problems: Vec<ObjectError>,
    pub ignored: OrdMap<ObjectKey, IgnoreReason>,
}

impl Plan {
    /// The service ports of one Service, in id order (a range of the table,
    /// not a scan).
    pub fn ports_of<'a>(&'a self, service: &'a ObjectKey) -> impl Iterator<Item = &'a Arc<ServicePort>> + 'a {
        static UNNAMED: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
        let first = ServicePortId::new(service.clone(), UNNAMED.clone(), Protocol::Tcp, IpFamily::V4);
        self.services.range(first..).take_while(move |(id, _)| &id.service == service).map(|(_, sp)| sp)
    }

    /// The frontend a packet to `dst:port/protocol` hits, if any, with the
    /// NodePort addresses resolved.
    pub fn frontend_for(&self, dst: IpAddr, port: u16, protocol: Protocol) -> Option<(&FrontendKey, &Frontend)> {
        let exact = FrontendKey { addr: FrontendAddr::Ip(dst), port, protocol };
        if let Some(found) = self.frontends.get_key_value(&exact) {
            return Some((found.0, found.1));
        }
        if self.node.node_port_addresses.contains(&dst) {
            let np = FrontendKey { addr: FrontendAddr::NodePort(IpFamily::of(&dst)), port, protocol };
            return self.frontends.get_key_value(&np);
        }
        None
    }
}

/// The node's facts from its configuration and the Node objects (this node's
/// zone and pod CIDRs, the other nodes' addresses).
pub fn node_facts(nodes: &BTreeMap<String, NodeInfo>, cfg: &NodeConfig) -> NodeFacts {
    let node = nodes.get(&cfg.node_name);
    let zone = cfg.zone.clone().or_else(|| node.and_then(|n| n.zone.clone())).filter(|z| !z.is_empty());
    let mut pod_cidrs = cfg.pod_cidrs.clone();
    if pod_cidrs.is_empty()
        && let Some(n) = node
    {
        pod_cidrs = n.pod_cidrs.iter().filter_map(|s| crate::addr::parse_cidr_sloppy(s)).collect();
    }
    let families: Vec<IpFamily> = IpFamily::ALL.into_iter().filter(|f| cfg.serves_family(*f)).collect();
    let mut local_addresses: BTreeSet<IpAddr> = cfg.node_ips.iter().copied().collect();
    for f in IpFamily::ALL {
        local_addresses.insert(f.loopback());
    }
    let primary_ips: BTreeMap<IpFamily, IpAddr> =
        IpFamily::ALL.into_iter().filter_map(|f| cfg.primary_ip(f).map(|ip| (f, ip))).collect();

    let mut node_port_addresses = BTreeSet::new();
    let npa = &cfg.node_port_addresses;
    for &family in &families {
        let cidrs: Vec<&IpNet> = npa.cidrs.iter().filter(|n| IpFamily::of_net(n) == family).collect();
        let match_all = !npa.primary && cidrs.is_empty();
        for ip in local_addresses.iter().filter(|ip| IpFamily::of(ip) == family) {
            let selected = match_all
                || (npa.primary && primary_ips.get(&family) == Some(ip))
                || cidrs.iter().any(|n| n.contains(ip));
            // Loopback NodePorts are an iptables-mode IPv4 special (route_localnet).
            let loopback_ok = !ip.is_loopback() || (cfg.localhost_node_ports && family == IpFamily::V4);
            if selected && loopback_ok {
                node_port_addresses.insert(*ip);
            }
        }
    }
    // Pods of this node: its pod CIDRs, else (not known) the whole cluster's.
    let masquerade_sources = if pod_cidrs.is_empty() { cfg.cluster_cidrs.clone() } else { pod_cidrs.clone() };
    let pod_ranges = match cfg.local_detector {
        LocalDetector::ClusterCidr => cfg.cluster_cidrs.clone(),
        _ => pod_cidrs,
    };
    let other_node_addresses: BTreeSet<IpAddr> = nodes
        .iter()
        .filter(|(name, _)| **name != cfg.node_name)
        .flat_map(|(_, n)| n.addresses.iter().copied())
        .collect();
    NodeFacts {
        name: cfg.node_name.clone(),
        zone,
        families,
        local_addresses,
        primary_ips,
        node_port_addresses,
        local_detector: cfg.local_detector.clone(),
        pod_ranges,
        service_cidrs: cfg.service_cidrs.clone(),
        masquerade_all: cfg.masquerade_all,
        accept_health_check_node_ports: cfg.accept_health_check_node_ports,
        masquerade: cfg.masquerade,
        masquerade_sources,
        masquerade_exempt: crate::egress::exempt_ranges(
            &cfg.non_masquerade_cidrs,
            &cfg.cluster_cidrs,
            cfg.masquerade_link_local,
        ),
        other_node_addresses,
        external_ips_allowed: cfg.external_ips_allowed.clone(),
        service_limits: cfg.service_limits,
        load_balancing: cfg.load_balancing,
        tunnels: match cfg.load_balancing {
            crate::dsr::LoadBalancingMode::Snat => Vec::new(),
            _ => crate::dsr::tunnels(nodes, &cfg.node_name),
        },
    }
}

impl NodeFacts {
    /// The same facts without those no service port's decisions read (the
    /// other nodes' addresses feed only the masquerade ranges, the tunnels
    /// only the datapath's DSR table): when only those change, no service
    /// port has to be planned again.
    pub(crate) fn planning_view(&self) -> NodeFacts {
        NodeFacts { other_node_addresses: BTreeSet::new(), tunnels: Vec::new(), ..self.clone() }
    }

    pub(crate) fn topology<'a>(&'a self, cfg: &NodeConfig) -> TopologyContext<'a> {
        TopologyContext {
            node_name: &self.name,
            zone: self.zone.as_deref(),
            prefer_same_node_gate: cfg.feature_gates.prefer_same_traffic_distribution,
        }
    }
}

/// One Service planned on its own: its service ports, its ClusterIPs and
/// what was wrong. Frontend ownership and health-check node ports are
/// decided across Services, from the claims (`frontend_claims`).
#[derive(Debug, Clone, Default)]
pub(crate) struct PlannedService {
    pub ports: Vec<ServicePort>,
    pub cluster_ips: Vec<IpAddr>,
    pub problems: Vec<ObjectError>,
}

/// Claim ranks: a ClusterIP always belongs to its Service, whatever another
/// Service lists as an external or load-balancer address (CVE-2020-8554).
fn kind_rank(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::LoadBalancer => 1,
        FrontendKind::ExternalIp => 2,
        FrontendKind::NodePort => 3,
    }
}

/// A service port's claim on a frontend. The smallest claim owns the
/// frontend: by kind (ClusterIP first), then by service port id. So the
/// owner never depends on the order objects arrived in, and removing the
/// owner hands the frontend to the next claimant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    rank: u8,
    pub service: ServicePortId,
    pub kind: FrontendKind,
}

impl Claim {
    /// The claim a frontend's owner holds.
    pub fn of(owner: &Frontend) -> Claim {
        Claim { rank: kind_rank(owner.kind), service: owner.service.clone(), kind: owner.kind }
    }

    pub fn frontend(&self) -> Frontend {
        Frontend { kind: self.kind, service: self.service.clone() }
    }

    /// The field of the Service the claim comes from.
    pub fn field(&self) -> &'static str {
        match self.kind {
            FrontendKind::ClusterIp => "spec.clusterIP",
            FrontendKind::ExternalIp => "spec.externalIPs",
            FrontendKind::LoadBalancer => "status.loadBalancer.ingress",
            FrontendKind::NodePort => "spec.ports.nodePort",
        }
    }

    /// The warning for a claim that lost to `owner`; `None` when both are the
    /// same service port (one port listing its ClusterIP as an ExternalIP too).
    pub fn lost_to(&self, key: &FrontendKey, owner: &Claim) -> Option<ObjectError> {
        (owner.service != self.service).then(|| {
            ObjectError::warn(
                ObjectKind::Service,
                &self.service.service,
                self.field(),
                format!("{key} is already served by {}; this frontend is not programmed", owner.service),
            )
        })
    }
}

/// Every frontend a service port claims.
pub fn frontend_claims(sp: &ServicePort) -> Vec<(FrontendKey, Claim)> {
    let claim = |kind: FrontendKind| Claim { rank: kind_rank(kind), service: sp.id.clone(), kind };
    let at = |ip: IpAddr| FrontendKey { addr: FrontendAddr::Ip(ip), port: sp.port, protocol: sp.id.protocol };
    let mut out = vec![(at(sp.cluster_ip), claim(FrontendKind::ClusterIp))];
    out.extend(sp.external_ips().iter().map(|ip| (at(*ip), claim(FrontendKind::ExternalIp))));
    out.extend(sp.load_balancer_ips().iter().map(|ip| (at(*ip), claim(FrontendKind::LoadBalancer))));
    if let Some(np) = sp.node_port {
        let key = FrontendKey { addr: FrontendAddr::NodePort(sp.id.family), port: np, protocol: sp.id.protocol };
        out.push((key, claim(FrontendKind::NodePort)));
    }
    out
}

/// The warning for a Service whose health-check node port another Service has.
pub(crate) fn health_check_clash(service: &ObjectKey, port: u16, owner: &ObjectKey) -> ObjectError {
    ObjectError::warn(
        ObjectKind::Service,
        service,
        "spec.healthCheckNodePort",
        format!("{port} is already the health-check node port of {owner}"),
    )
}

/// The warning for an EndpointSlice whose Service does not exist.
pub(crate) fn orphan_slice(slice: &ObjectKey, service: &ObjectKey) -> ObjectError {
    ObjectError::warn(
        ObjectKind::EndpointSlice,
        slice,
        format!("metadata.labels[{}]", crate::endpoints::LABEL_SERVICE_NAME),
        format!("names Service {service}, which does not exist; its endpoints are unused"),
    )
}

/// Builds the whole Plan from scratch. Never fails: bad objects end up in
/// `Plan::problems`. The incremental planner's oracle.
pub fn build_plan(state: &ClusterState, cfg: &NodeConfig) -> Plan {
    let nodes: BTreeMap<String, NodeInfo> =
        state.nodes.iter().map(|(n, node)| (n.clone(), NodeInfo::read(node))).collect();
    let node = node_facts(&nodes, cfg);
    let mut problems = Vec::new();
    let mut ignored = OrdMap::new();
    let mut infos: BTreeMap<ObjectKey, ServiceInfo> = BTreeMap::new();
    for (key, svc) in &state.services {
        match read_service(svc, cfg) {
            ServiceRead::Served(info) => {
                infos.insert(key.clone(), *info);
            }
            ServiceRead::Ignored(reason) => {
                ignored.insert(key.clone(), reason);
            }
            ServiceRead::Invalid(errs) => problems.extend(errs),
        }
    }
    let mut slices_of: BTreeMap<ObjectKey, Vec<crate::endpoints::SliceRead>> = BTreeMap::new();
    for (key, slice) in &state.endpoint_slices {
        let read = read_slice(key, slice, cfg);
        problems.extend(read.problems().iter().cloned());
        if let Some(owner) = &read.owner {
            if !state.services.contains_key(&owner.service) {
                problems.push(orphan_slice(key, &owner.service));
            }
            slices_of.entry(owner.service.clone()).or_default().push(read);
        }
    }

    let ctx = node.topology(cfg);
    let mut services = OrdMap::new();
    let mut cluster_ips = OrdSet::new();
    let mut claims: BTreeMap<FrontendKey, Vec<(FrontendKey, Claim)>> = BTreeMap::new();
    let mut hc_claims: BTreeMap<u16, Vec<&ObjectKey>> = BTreeMap::new();
    for (key, info) in &infos {
        let eps = merge_slices(slices_of.get(key).into_iter().flatten());
        let planned = plan_service(&node, info, &eps, ctx);
        problems.extend(planned.problems);
        cluster_ips.extend(planned.cluster_ips);
        for sp in planned.ports {
            for (k, c) in frontend_claims(&sp) {
                claims.entry(k).or_default().push((k, c));
            }
            services.insert(sp.id.clone(), Arc::new(sp));
        }
        if let Some(hc) = info.health_check_node_port() {
            hc_claims.entry(hc).or_default().push(key);
        }
    }
    let mut frontends = OrdMap::new();
    for (key, mut list) in claims {
        list.sort_by(|a, b| a.1.cmp(&b.1));
        let owner = &list[0].1;
        problems.extend(list[1..].iter().filter_map(|(_, c)| c.lost_to(&key, owner)));
        frontends.insert(key, owner.frontend());
    }
    let mut health_check_node_ports = OrdMap::new();
    for (port, owners) in hc_claims {
        // `infos` is in key order: the first claimant owns the port.
        problems.extend(owners[1..].iter().map(|s| health_check_clash(s, port, owners[0])));
        health_check_node_ports.insert(port, owners[0].clone());
    }
    problems.sort();
    problems.dedup();
    Plan { node: Arc::new(node), services, frontends, cluster_ips, health_check_node_ports, problems, ignored }
}

/// Plans one Service: one service port per (port, served family).
pub(crate) fn plan_service(
    node: &NodeFacts,
    info: &ServiceInfo,
    eps: &ServiceEndpoints,
    ctx: TopologyContext,
) -> PlannedService {
    let mut out = PlannedService::default();
    let (admitted_external_ips, refused) = crate::policy::admit_external_ips(node, info);
    out.problems.extend(refused);
    for &family in &node.families {
        let Some(cluster_ip) = info.cluster_ips.get(&family) else {
            continue;
        };
        out.cluster_ips.push(cluster_ip);
        let fam =
            |ips: &[IpAddr]| -> Vec<IpAddr> { ips.iter().copied().filter(|i| IpFamily::of(i) == family).collect() };
        let external_ips = fam(&admitted_external_ips);
        let lb_all: Vec<_> = info.load_balancer_ingress().iter().filter(|l| IpFamily::of(&l.ip) == family).collect();
        let load_balancer_ips: Vec<IpAddr> = lb_all.iter().filter(|l| !l.proxy_mode).map(|l| l.ip).collect();
        let proxied_load_balancer_ips: Vec<IpAddr> = lb_all.iter().filter(|l| l.proxy_mode).map(|l| l.ip).collect();
        let source_ranges: Vec<IpNet> =
            info.source_ranges().iter().copied().filter(|n| IpFamily::of_net(n) == family).collect();
        if !info.source_ranges().is_empty() && source_ranges.is_empty() && !load_balancer_ips.is_empty() {
            out.problems.push(ObjectError::warn(
                ObjectKind::Service,
                &info.key,
                "spec.loadBalancerSourceRanges",
                format!(
                    "has no {family} range, so its {family} load-balancer addresses accept every source (as kube-proxy does); add a {family} range to restrict them"
                ),
            ));
        }
        for spec in &info.ports {
            let id = ServicePortId::new(info.key.clone(), spec.name.clone(), spec.protocol, family);
            let endpoints = eps.get(&(family, spec.name.clone(), spec.protocol)).cloned().unwrap_or_default();
            let externally_accessible =
                spec.node_port.is_some() || !load_balancer_ips.is_empty() || !external_ips.is_empty();
            out.ports.push(decide(
                node,
                id,
                info,
                cluster_ip,
                spec.port,
                spec.node_port,
                externally_accessible,
                PortAddresses {
                    external_ips: external_ips.clone(),
                    load_balancer_ips: load_balancer_ips.clone(),
                    proxied_load_balancer_ips: proxied_load_balancer_ips.clone(),
                    source_ranges: source_ranges.clone(),
                    firewall: None,
                },
                endpoints,
                ctx,
            ));
        }
    }
    if let Err(refusal) = crate::policy::within_limits(node, info, &out.ports) {
        // Refused whole, by name: its ClusterIPs stay allocated (nothing else
        // may take them), none of its frontends is programmed.
        out.ports.clear();
        out.problems.push(refusal);
    }
    out
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortAddresses {
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    proxied_load_balancer_ips: Vec<IpAddr>,
    source_ranges: Vec<IpNet>,
    firewall: Option<Vec<IpNet>>,
}

#[allow(clippy::too_many_arguments)]
fn decide(
    node: &NodeFacts,
    id: ServicePortId,
    info: &ServiceInfo,
    cluster_ip: IpAddr,
    port: u16,
    node_port: Option<u16>,
    externally_accessible: bool,
    addrs: PortAddresses,
    endpoints: Arc<[Endpoint]>,
    ctx: TopologyContext,
) -> ServicePort {
    let family = id.family;
    let itp_local = info.internal_policy_local;
    let etp_local = info.external_policy_local;
    // kube-proxy's UsesClusterEndpoints / UsesLocalEndpoints.
    let uses_cluster = !itp_local || externally_accessible;
    // DSR: a connection tunnelled here by another node is balanced over this
    // node's own endpoints (crate::dsr), whatever the traffic policy.
    let dsr = node.load_balancing != crate::dsr::LoadBalancingMode::Snat;
    let uses_local = itp_local || (etp_local && externally_accessible) || (dsr && externally_accessible);
    let categorized = categorize(&endpoints, uses_cluster, uses_local, ctx);
    let has_any = categorized.has_any;
    let has_local = !categorized.local().is_empty();
    let detects = node.detects_pods(family);

    let internal = PerSource::from_fn(|source| {
        if !has_any {
            return Route::Reject { reason: RouteReason::NoEndpoints };
        }
        if itp_local && !has_local {
            return Route::Drop { reason: RouteReason::InternalLocalNoLocalEndpoints };
        }
        let masquerade = if node.masquerade_all {
            MasqReason::MasqueradeAll
        } else if !detects {
            MasqReason::NoLocalDetector
        } else if source == SourceClass::Pod {
            MasqReason::FromPod
        } else {
            MasqReason::NotFromPod
        };
        let (set, reason) = if itp_local {
            (EndpointSet::Local, RouteReason::InternalPolicyLocal)
        } else {
            (EndpointSet::Cluster, RouteReason::InternalPolicyCluster)
        };
        Route::Forward { set, masquerade, reason }
    });

    let external = PerSource::from_fn(|source| {
        if !has_any {
            return Route::Reject { reason: RouteReason::NoEndpoints };
        }
        if !etp_local {
            return Route::Forward {
                set: EndpointSet::Cluster,
                masquerade: MasqReason::ExternalPolicyCluster,
                reason: RouteReason::ExternalPolicyCluster,
            };
        }
        match source {
            SourceClass::Pod if detects => Route::Forward {
                set: EndpointSet::Cluster,
                masquerade: MasqReason::FromPod,
                reason: RouteReason::PodShortCircuit,
            },
            SourceClass::Host => Route::Forward {
                set: EndpointSet::Cluster,
                masquerade: MasqReason::HostToExternalLocal,
                reason: RouteReason::HostShortCircuit,
            },
            _ if has_local => Route::Forward {
                set: EndpointSet::Local,
                masquerade: MasqReason::ClientIpPreserved,
                reason: RouteReason::ExternalPolicyLocal,
            },
            _ => Route::Drop { reason: RouteReason::ExternalLocalNoLocalEndpoints },
        }
    });

    let mut addrs = addrs;
    addrs.firewall = if has_any && !addrs.load_balancer_ips.is_empty() && !addrs.source_ranges.is_empty() {
        let mut allowed = addrs.source_ranges.clone();
        let node_in_range =
            node.primary_ips.get(&family).is_some_and(|ip| addrs.source_ranges.iter().any(|n| n.contains(ip)));
        if node_in_range {
            allowed.extend(addrs.load_balancer_ips.iter().map(|ip| IpNet::from(*ip)));
        }
        Some(allowed)
    } else {
        None
    };

    ServicePort {
        id,
        cluster_ip,
        port,
        node_port,
        outside: OutsideAddresses((addrs != PortAddresses::default()).then(|| Box::new(addrs))),
        internal_policy_local: itp_local,
        external_policy_local: etp_local,
        externally_accessible,
        affinity_timeout_seconds: info.affinity_timeout_seconds,
        health_check_node_port: info.health_check_node_port(),
        maglev: info.maglev,
        endpoints,
        categorized,
        internal,
        external,
    }
}
