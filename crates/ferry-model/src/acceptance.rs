//! The acceptance case format (`shared/acceptance/README.md`) and its translation
//! into real Kubernetes objects and a `NodeConfig`.
//!
//! Cases are converted into k8s-openapi `Service`/`EndpointSlice`/`Node`
//! objects, so a case exercises exactly the code path the API and manifest
//! sources use. Unknown fields in case files are tolerated: the format may
//! grow, and a case runner should not break on a note it does not read.

use crate::addr::{IpFamily, parse_cidr_sloppy, parse_ip_sloppy};
use crate::endpoints::LABEL_SERVICE_NAME;
use crate::explain::{Explanation, Verdict};
use crate::node_config::{FeatureGates, LocalDetector, NodeConfig, NodePortAddresses};
use crate::plan::LABEL_ZONE;
use crate::protocol::Protocol;
use crate::state::{ClusterState, ObjectKey};
use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeSpec, Service, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A file of flow cases.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseFile {
    pub schema_version: u32,
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Case {
    pub name: String,
    pub proxy_config: ProxyConfig,
    pub node: CaseNode,
    #[serde(default)]
    pub services: Vec<CaseService>,
    #[serde(default)]
    pub endpoint_slices: Vec<CaseSlice>,
    #[serde(default)]
    pub flows: Vec<CaseFlow>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    pub mode: String,
    pub ip_family: String,
    #[serde(default)]
    pub masquerade_all: bool,
    pub local_traffic_detector: Option<CaseDetector>,
    #[serde(default)]
    pub node_port_addresses: Vec<String>,
    #[serde(default)]
    pub localhost_node_ports: bool,
    #[serde(default, rename = "serviceCIDRs")]
    pub service_cidrs: Vec<String>,
    #[serde(default)]
    pub feature_gates: BTreeMap<String, bool>,
    /// ferry's own cases (`evidence: ferry-policy`): the node config's
    /// `externalIPs.allowedCIDRs`. Absent: every unicast address.
    #[serde(default, rename = "externalIPsAllowedCIDRs")]
    pub external_ips_allowed_cidrs: Option<Vec<String>>,
    /// ferry's own cases: the node config's `limits`.
    #[serde(default)]
    pub limits: Option<CaseLimits>,
}

/// Per-Service limits of a ferry policy case (the node config's `limits`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaseLimits {
    pub max_frontends_per_service: Option<u32>,
    pub max_endpoints_per_service: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseDetector {
    pub mode: Option<String>,
    #[serde(default)]
    pub cidrs: Vec<String>,
    pub interface_name_prefix: Option<String>,
    pub bridge_interface: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseNode {
    pub name: String,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default, rename = "primaryIPs")]
    pub primary_ips: BTreeMap<String, String>,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseService {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub service_type: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// Optional (scenarios of dual-stack Services): every ClusterIP, primary first, as
    /// `spec.clusterIPs`; `clusterIP` stays the primary. Absent: single-stack `clusterIP`.
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<CaseServicePort>,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Vec<String>,
    #[serde(default, rename = "loadBalancerIPs")]
    pub load_balancer_ips: Vec<String>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub session_affinity: Option<String>,
    pub session_affinity_timeout_seconds: Option<i32>,
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    pub health_check_node_port: Option<i32>,
    #[serde(default, rename = "loadBalancerIPMode")]
    pub load_balancer_ip_mode: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseServicePort {
    #[serde(default)]
    pub name: String,
    pub port: i32,
    pub protocol: Option<String>,
    pub node_port: Option<i32>,
    pub target_port: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseSlice {
    pub name: String,
    /// `namespace/name` of the owning Service.
    pub service: String,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<CaseEndpoint>,
    #[serde(default)]
    pub ports: Vec<CaseSlicePort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseEndpoint {
    pub ip: String,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub hints: Option<CaseHints>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseHints {
    #[serde(default)]
    pub for_zones: Vec<String>,
    #[serde(default)]
    pub for_nodes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseSlicePort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseFlow {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "sourceIP")]
    pub source_ip: String,
    #[serde(rename = "destIP")]
    pub dest_ip: String,
    pub dest_port: u16,
    pub protocol: String,
    pub expect: String,
    #[serde(default)]
    pub masq: bool,
}

/// What a flow is expected to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    Endpoints { set: BTreeSet<SocketAddr>, masq: bool },
    Drop,
    Reject,
    Pass,
    Accept,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Endpoints { set, masq } => {
                let list: Vec<String> = set.iter().map(|a| a.to_string()).collect();
                write!(f, "{}{}", list.join(", "), if *masq { " (masqueraded)" } else { " (not masqueraded)" })
            }
            Expected::Drop => f.write_str("DROP"),
            Expected::Reject => f.write_str("REJECT"),
            Expected::Pass => f.write_str("PASS"),
            Expected::Accept => f.write_str("ACCEPT"),
        }
    }
}

/// A flow parsed into addresses.
#[derive(Debug, Clone)]
pub struct ParsedFlow {
    pub name: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub expected: Expected,
}

impl CaseFlow {
    pub fn parse(&self) -> Result<ParsedFlow, String> {
        let ip = |s: &str| parse_ip_sloppy(s).ok_or_else(|| format!("{s:?} is not an IP address"));
        let expected = match self.expect.trim() {
            "DROP" => Expected::Drop,
            "REJECT" => Expected::Reject,
            "PASS" => Expected::Pass,
            "ACCEPT" => Expected::Accept,
            list => {
                let mut set = BTreeSet::new();
                for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    set.insert(item.parse::<SocketAddr>().map_err(|_| format!("{item:?} is not IP:port"))?);
                }
                Expected::Endpoints { set, masq: self.masq }
            }
        };
        Ok(ParsedFlow {
            name: self.name.clone(),
            src: ip(&self.source_ip)?,
            dst: ip(&self.dest_ip)?,
            port: self.dest_port,
            protocol: self.protocol.parse()?,
            expected,
        })
    }
}

/// What a datapath did with a flow, in the terms of the case format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Reached this endpoint; `masq`: with the node's address as source.
    Endpoint {
        addr: SocketAddr,
        masq: bool,
    },
    Endpoints {
        set: BTreeSet<SocketAddr>,
        masq: bool,
    },
    Drop,
    Reject,
    Pass,
    Accept,
    /// Something no verdict describes (unreachable, an error, an unknown answer).
    Unexpected(String),
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Endpoint { addr, masq } => {
                write!(f, "{addr}{}", if *masq { " (masqueraded)" } else { " (not masqueraded)" })
            }
            Observed::Endpoints { set, masq } => Expected::Endpoints { set: set.clone(), masq: *masq }.fmt(f),
            Observed::Drop => f.write_str("DROP"),
            Observed::Reject => f.write_str("REJECT"),
            Observed::Pass => f.write_str("PASS"),
            Observed::Accept => f.write_str("ACCEPT"),
            Observed::Unexpected(what) => write!(f, "{what}"),
        }
    }
}

/// The model's answer in the case vocabulary. Every candidate must agree on
/// masquerading; if they do not (hairpin with several endpoints), the answer
/// says "masqueraded" only when all are.
pub fn observed_from_model(e: &Explanation) -> Observed {
    match &e.verdict {
        Verdict::Endpoints(c) if c.is_empty() => Observed::Drop,
        Verdict::Endpoints(c) => {
            Observed::Endpoints { set: c.iter().map(|c| c.addr).collect(), masq: c.iter().all(|c| c.masquerade) }
        }
        Verdict::Drop => Observed::Drop,
        Verdict::Reject => Observed::Reject,
        Verdict::Pass => Observed::Pass,
        Verdict::Accept => Observed::Accept,
    }
}

/// Whether an observation satisfies the expectation. A single observed
/// endpoint passes when it is one of the allowed ones.
pub fn matches(expected: &Expected, observed: &Observed) -> bool {
    match (expected, observed) {
        (Expected::Endpoints { set, masq }, Observed::Endpoints { set: got, masq: m }) => set == got && masq == m,
        (Expected::Endpoints { set, masq }, Observed::Endpoint { addr, masq: m }) => set.contains(addr) && masq == m,
        (Expected::Drop, Observed::Drop)
        | (Expected::Reject, Observed::Reject)
        | (Expected::Pass, Observed::Pass)
        | (Expected::Accept, Observed::Accept) => true,
        _ => false,
    }
}

/// Errors in a case that make it impossible to run.
#[derive(Debug, thiserror::Error)]
#[error("case {case:?}: {field}: {message}")]
pub struct CaseError {
    pub case: String,
    pub field: String,
    pub message: String,
}

impl Case {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> CaseError {
        CaseError { case: self.name.clone(), field: field.into(), message: message.into() }
    }

    pub fn family(&self) -> Result<IpFamily, CaseError> {
        IpFamily::from_k8s(&self.proxy_config.ip_family).ok_or_else(|| {
            self.err("proxyConfig.ipFamily", format!("{:?} is not IPv4 or IPv6", self.proxy_config.ip_family))
        })
    }

    /// The node configuration the case describes, with kube-proxy's mode defaults applied.
    pub fn node_config(&self) -> Result<NodeConfig, CaseError> {
        let pc = &self.proxy_config;
        let family = self.family()?;
        let iptables = match pc.mode.as_str() {
            "iptables" => true,
            "nftables" => false,
            other => {
                return Err(self.err("proxyConfig.mode", format!("{other:?} is not iptables or nftables")));
            }
        };
        let cidrs = |field: &str, list: &[String]| -> Result<Vec<ipnet::IpNet>, CaseError> {
            list.iter()
                .flat_map(|s| s.split(','))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| parse_cidr_sloppy(s).ok_or_else(|| self.err(field, format!("{s:?} is not a CIDR"))))
                .collect()
        };
        let node_ips: Vec<IpAddr> = self
            .node
            .ips
            .iter()
            .map(|s| parse_ip_sloppy(s).ok_or_else(|| self.err("node.ips", format!("{s:?} is not an IP"))))
            .collect::<Result<_, _>>()?;
        let mut primary_ips = Vec::new();
        for (fam, ip) in &self.node.primary_ips {
            let ip = parse_ip_sloppy(ip).ok_or_else(|| self.err(format!("node.primaryIPs.{fam}"), "not an IP"))?;
            primary_ips.push(ip);
        }
        let node_port_addresses = if pc.node_port_addresses.is_empty() {
            if iptables { NodePortAddresses::all() } else { NodePortAddresses::default() }
        } else {
            let primary = pc.node_port_addresses.iter().any(|s| s == "primary");
            let listed: Vec<String> = pc.node_port_addresses.iter().filter(|s| *s != "primary").cloned().collect();
            NodePortAddresses { primary, cidrs: cidrs("proxyConfig.nodePortAddresses", &listed)? }
        };
        let cluster_cidr: Vec<String> = self.node.cluster_cidr.iter().cloned().collect();
        let mut cluster_cidrs = cidrs("node.clusterCIDR", &cluster_cidr)?;
        let pod_cidr: Vec<String> = self.node.pod_cidr.iter().cloned().collect();
        let mut pod_cidrs = cidrs("node.podCIDR", &pod_cidr)?;
        let local_detector = match &pc.local_traffic_detector {
            None => LocalDetector::None,
            Some(d) => {
                let listed = cidrs("proxyConfig.localTrafficDetector.cidrs", &d.cidrs)?;
                match d.mode.as_deref().unwrap_or("None") {
                    "ClusterCIDR" => {
                        if !listed.is_empty() {
                            cluster_cidrs = listed;
                        }
                        LocalDetector::ClusterCidr
                    }
                    "NodeCIDR" => {
                        if !listed.is_empty() {
                            pod_cidrs = listed;
                        }
                        LocalDetector::NodeCidr
                    }
                    "InterfaceNamePrefix" => LocalDetector::InterfaceNamePrefix(
                        d.interface_name_prefix.clone().unwrap_or_else(|| "veth".into()),
                    ),
                    "BridgeInterface" => {
                        LocalDetector::BridgeInterface(d.bridge_interface.clone().unwrap_or_else(|| "cbr0".into()))
                    }
                    "None" | "" => LocalDetector::None,
                    other => {
                        return Err(
                            self.err("proxyConfig.localTrafficDetector.mode", format!("unknown mode {other:?}"))
                        );
                    }
                }
            }
        };
        let mut gates = FeatureGates::default();
        if let Some(v) = pc.feature_gates.get("PreferSameTrafficDistribution") {
            gates.prefer_same_traffic_distribution = *v;
        }
        let external_ips_allowed = match &pc.external_ips_allowed_cidrs {
            None => None,
            Some(list) => Some(cidrs("proxyConfig.externalIPsAllowedCIDRs", list)?),
        };
        let mut service_limits = crate::node_config::ServiceLimits::default();
        if let Some(l) = &pc.limits {
            service_limits.max_frontends = l.max_frontends_per_service.unwrap_or(service_limits.max_frontends);
            service_limits.max_endpoints = l.max_endpoints_per_service.unwrap_or(service_limits.max_endpoints);
        }
        Ok(NodeConfig {
            external_ips_allowed,
            service_limits,
            node_name: self.node.name.clone(),
            node_ips,
            primary_ips,
            pod_cidrs,
            cluster_cidrs,
            service_cidrs: cidrs("proxyConfig.serviceCIDRs", &pc.service_cidrs)?,
            ip_families: vec![family],
            node_port_addresses,
            localhost_node_ports: iptables && pc.localhost_node_ports,
            masquerade_all: pc.masquerade_all,
            local_detector,
            zone: None,
            feature_gates: gates,
            service_proxy_name: None,
            accept_health_check_node_ports: iptables,
            ..NodeConfig::default()
        })
    }

    /// The case's objects as real Kubernetes objects.
    pub fn cluster_state(&self) -> Result<ClusterState, CaseError> {
        let mut state = ClusterState::default();
        state.nodes.insert(self.node.name.clone(), case_node(&self.node));
        for s in &self.services {
            let svc = s.to_service();
            state.services.insert(ObjectKey::new(&s.namespace, &s.name), svc);
        }
        for (i, sl) in self.endpoint_slices.iter().enumerate() {
            let (ns, svc) = sl
                .service
                .split_once('/')
                .ok_or_else(|| self.err(format!("endpointSlices[{i}].service"), "expected namespace/name"))?;
            let slice = sl.to_slice(ns, svc);
            state.endpoint_slices.insert(ObjectKey::new(ns, &sl.name), slice);
        }
        Ok(state)
    }
}

fn case_node(n: &CaseNode) -> Node {
    let mut labels = n.labels.clone();
    labels.retain(|k, v| k != LABEL_ZONE || !v.is_empty());
    Node {
        metadata: ObjectMeta { name: Some(n.name.clone()), labels: Some(labels), ..Default::default() },
        spec: Some(NodeSpec { pod_cidr: n.pod_cidr.clone(), ..Default::default() }),
        status: None,
    }
}

impl CaseService {
    /// The Service object this case entry stands for.
    pub fn to_service(&self) -> Service {
        let ports = self
            .ports
            .iter()
            .map(|p| ServicePort {
                name: Some(p.name.clone()).filter(|n| !n.is_empty()),
                port: p.port,
                protocol: p.protocol.clone(),
                node_port: p.node_port.filter(|n| *n != 0),
                target_port: p.target_port.as_ref().and_then(|v| match v {
                    serde_json::Value::Number(n) => n.as_i64().map(|n| IntOrString::Int(n as i32)),
                    serde_json::Value::String(s) => Some(IntOrString::String(s.clone())),
                    _ => None,
                }),
                app_protocol: None,
            })
            .collect();
        let ingress: Vec<LoadBalancerIngress> = self
            .load_balancer_ips
            .iter()
            .map(|ip| LoadBalancerIngress {
                ip: Some(ip.clone()),
                ip_mode: self.load_balancer_ip_mode.get(ip).cloned().flatten(),
                ..Default::default()
            })
            .collect();
        Service {
            metadata: ObjectMeta {
                namespace: Some(self.namespace.clone()),
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: self.service_type.clone(),
                cluster_ip: self.cluster_ip.clone(),
                cluster_ips: Some(self.cluster_ips.clone()).filter(|v| !v.is_empty()),
                ports: Some(ports),
                external_ips: Some(self.external_ips.clone()).filter(|v| !v.is_empty()),
                external_traffic_policy: self.external_traffic_policy.clone(),
                internal_traffic_policy: self.internal_traffic_policy.clone(),
                session_affinity: self.session_affinity.clone(),
                session_affinity_config: self
                    .session_affinity_timeout_seconds
                    .map(|t| SessionAffinityConfig { client_ip: Some(ClientIPConfig { timeout_seconds: Some(t) }) }),
                load_balancer_source_ranges: Some(self.load_balancer_source_ranges.clone()).filter(|v| !v.is_empty()),
                health_check_node_port: self.health_check_node_port.filter(|p| *p != 0),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus { ingress: Some(ingress).filter(|v| !v.is_empty()) }),
                conditions: None,
            }),
        }
    }
}

impl CaseSlice {
    /// The EndpointSlice object this case entry stands for.
    pub fn to_slice(&self, namespace: &str, service: &str) -> EndpointSlice {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addresses: vec![e.ip.clone()],
                conditions: Some(EndpointConditions { ready: e.ready, serving: e.serving, terminating: e.terminating }),
                node_name: e.node_name.clone().filter(|n| !n.is_empty()),
                zone: e.zone.clone().filter(|z| !z.is_empty()),
                hints: e.hints.as_ref().map(|h| EndpointHints {
                    for_zones: Some(h.for_zones.iter().map(|z| ForZone { name: z.clone() }).collect()),
                    for_nodes: Some(h.for_nodes.iter().map(|n| ForNode { name: n.clone() }).collect()),
                }),
                ..Default::default()
            })
            .collect();
        let ports = self
            .ports
            .iter()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: p.port,
                protocol: p.protocol.clone(),
                app_protocol: None,
            })
            .collect();
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_string()),
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([(LABEL_SERVICE_NAME.to_string(), service.to_string())])),
                ..Default::default()
            },
            address_type: self.address_type.clone(),
            endpoints: Some(endpoints),
            ports: Some(ports),
        }
    }
}

/// The keys each object of the case formats (flow cases' Services and slices
/// as the scenario and conntrack-case files write them) may have: the strict
/// parsers reject any other key by name.
pub mod keys {
    pub const SERVICE: &[&str] = &[
        "namespace",
        "name",
        "type",
        "clusterIP",
        "clusterIPs",
        "ports",
        "externalIPs",
        "loadBalancerIPs",
        "externalTrafficPolicy",
        "internalTrafficPolicy",
        "sessionAffinity",
        "sessionAffinityTimeoutSeconds",
        "loadBalancerSourceRanges",
        "healthCheckNodePort",
        "loadBalancerIPMode",
    ];
    pub const SERVICE_PORT: &[&str] = &["name", "port", "protocol", "nodePort", "targetPort"];
    pub const SLICE: &[&str] = &["name", "service", "addressType", "endpoints", "ports"];
    pub const ENDPOINT: &[&str] = &["ip", "ready", "serving", "terminating", "nodeName", "zone", "hints"];
    pub const HINTS: &[&str] = &["forZones", "forNodes"];
    pub const SLICE_PORT: &[&str] = &["name", "port", "protocol"];
}
