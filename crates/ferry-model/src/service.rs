//! Reading a v1 Service into the facts kube-proxy acts on (`ServiceInfo`).
//!
//! Every check that can reject a Service lives here, so the planner downstream
//! works on values that are known to be well formed. A malformed Service is
//! skipped as a whole: serving half of it would be a surprise harder to debug
//! than an error message naming the field.

use crate::addr::{IpFamily, parse_cidr_sloppy, parse_ip_sloppy};
use crate::node_config::NodeConfig;
use crate::problem::{ObjectError, ObjectKind};
use crate::protocol::Protocol;
use crate::state::ObjectKey;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Label that hands a Service (or EndpointSlice) to a specific proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Annotation choosing how the packet path picks a backend: `maglev` or `random`.
pub const ANNOTATION_LB_ALGORITHM: &str = "ferry.io/lb-algorithm";
/// kube-proxy's default session affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;
/// The API's upper bound for `sessionAffinityConfig.clientIP.timeoutSeconds` (one day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// One entry of `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortSpec {
    /// Port name; `""` for an unnamed single port. Endpoint ports are matched by (name, protocol).
    pub name: std::sync::Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
}

/// A `status.loadBalancer.ingress` address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadBalancerIngress {
    pub ip: IpAddr,
    /// `ipMode: Proxy`: the load balancer proxies itself, so the node must not intercept the address.
    pub proxy_mode: bool,
}

/// Why a well-formed Service is not proxied at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum IgnoreReason {
    /// `clusterIP: None`: DNS-only, no virtual IP.
    Headless,
    /// `type: ExternalName`: a DNS alias, no virtual IP.
    ExternalName,
    /// Labelled for another proxy (`service.kubernetes.io/service-proxy-name`).
    OtherProxy(String),
}

impl std::fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IgnoreReason::Headless => f.write_str("headless (clusterIP: None): DNS only, nothing to proxy"),
            IgnoreReason::ExternalName => f.write_str("type ExternalName: a DNS alias, nothing to proxy"),
            IgnoreReason::OtherProxy(p) => {
                write!(f, "labelled {LABEL_SERVICE_PROXY_NAME}={p}: served by another proxy")
            }
        }
    }
}

/// At most one address per IP family (a Service's ClusterIPs): two slots,
/// no allocation, each family in its own address type (22 bytes; two
/// `Option<IpAddr>` took 36 in every Service).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FamilyIps {
    v4: Option<std::net::Ipv4Addr>,
    v6: Option<std::net::Ipv6Addr>,
}

impl FamilyIps {
    /// Sets the address of its family; returns the one it replaced.
    pub fn insert(&mut self, family: IpFamily, ip: IpAddr) -> Option<IpAddr> {
        debug_assert_eq!(IpFamily::of(&ip), family);
        match ip {
            IpAddr::V4(a) => self.v4.replace(a).map(IpAddr::V4),
            IpAddr::V6(a) => self.v6.replace(a).map(IpAddr::V6),
        }
    }

    pub fn get(&self, family: &IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.v4.map(IpAddr::V4),
            IpFamily::V6 => self.v6.map(IpAddr::V6),
        }
    }

    pub fn contains_key(&self, family: &IpFamily) -> bool {
        self.get(family).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// The validated facts of one Service. The planner keeps one per Service,
/// so lists are exactly sized (`Box<[_]>`) and what most Services do not
/// have (external addresses, source ranges, a health-check port, a traffic
/// distribution) sits in one optional box, read through its accessors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub key: ObjectKey,
    pub service_type: ServiceType,
    /// At most one ClusterIP per family.
    pub cluster_ips: FamilyIps,
    pub ports: Box<[PortSpec]>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// `sessionAffinity: ClientIP` timeout; `None` without affinity.
    pub affinity_timeout_seconds: Option<std::num::NonZeroU32>,
    /// `ferry.io/lb-algorithm`: Some(true) for Maglev, Some(false) for random,
    /// None for the node's default.
    pub maglev: Option<bool>,
    outside: Option<Box<OutsideFacts>>,
}

/// The facts of a Service reachable from outside (and its traffic distribution).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
struct OutsideFacts {
    external_ips: Box<[IpAddr]>,
    load_balancer_ingress: Box<[LoadBalancerIngress]>,
    source_ranges: Box<[IpNet]>,
    health_check_node_port: Option<u16>,
    traffic_distribution: Option<std::sync::Arc<str>>,
}

impl ServiceInfo {
    pub fn external_ips(&self) -> &[IpAddr] {
        self.outside.as_ref().map_or(&[], |o| &o.external_ips)
    }

    pub fn load_balancer_ingress(&self) -> &[LoadBalancerIngress] {
        self.outside.as_ref().map_or(&[], |o| &o.load_balancer_ingress)
    }

    pub fn source_ranges(&self) -> &[IpNet] {
        self.outside.as_ref().map_or(&[], |o| &o.source_ranges)
    }

    /// Served only for `type: LoadBalancer` with `externalTrafficPolicy: Local`.
    pub fn health_check_node_port(&self) -> Option<u16> {
        self.outside.as_ref().and_then(|o| o.health_check_node_port)
    }

    pub fn traffic_distribution(&self) -> Option<&str> {
        self.outside.as_ref().and_then(|o| o.traffic_distribution.as_deref())
    }
}

impl ServiceInfo {
    /// kube-proxy's `ExternallyAccessible` on the Service: reachable from
    /// outside the cluster through a NodePort, a load balancer or an ExternalIP.
    pub fn externally_accessible_type(&self) -> bool {
        matches!(self.service_type, ServiceType::NodePort | ServiceType::LoadBalancer)
            || !self.external_ips().is_empty()
    }
}

/// What reading a Service produced.
#[derive(Debug, Clone)]
pub enum ServiceRead {
    Served(Box<ServiceInfo>),
    Ignored(IgnoreReason),
    Invalid(Vec<ObjectError>),
}

/// True when the object's `service-proxy-name` label hands it to another proxy.
pub fn handled_by_other_proxy(labels: Option<&BTreeMap<String, String>>, cfg: &NodeConfig) -> Option<String> {
    let value = labels?.get(LABEL_SERVICE_PROXY_NAME)?;
    match &cfg.service_proxy_name {
        Some(mine) if mine == value => None,
        _ => Some(value.clone()),
    }
}

struct Checker<'a> {
    key: &'a ObjectKey,
    errors: Vec<ObjectError>,
}

impl Checker<'_> {
    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ObjectError::skip(ObjectKind::Service, self.key, field, message));
    }

    fn ip(&mut self, field: String, value: &str) -> Option<IpAddr> {
        let ip = parse_ip_sloppy(value);
        if ip.is_none() {
            self.fail(field, format!("{value:?} is not an IP address"));
        }
        ip
    }
}

fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// Reads and validates one Service.
pub fn read_service(svc: &Service, cfg: &NodeConfig) -> ServiceRead {
    read_service_as(&ObjectKey::of_meta(&svc.metadata), svc, cfg)
}

/// [`read_service`] for a caller that already holds the Service's key: the
/// read shares it rather than holding a copy of its own.
pub fn read_service_as(key: &ObjectKey, svc: &Service, cfg: &NodeConfig) -> ServiceRead {
    let mut c = Checker { key, errors: Vec::new() };
    if key.name().is_empty() {
        c.fail("metadata.name", "is empty");
        return ServiceRead::Invalid(c.errors);
    }
    if let Some(other) = handled_by_other_proxy(svc.metadata.labels.as_ref(), cfg) {
        return ServiceRead::Ignored(IgnoreReason::OtherProxy(other));
    }
    let Some(spec) = &svc.spec else {
        c.fail("spec", "is missing");
        return ServiceRead::Invalid(c.errors);
    };
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return ServiceRead::Ignored(IgnoreReason::ExternalName),
        Some(other) => {
            c.fail(
                "spec.type",
                format!("{other:?} is not a Service type (ClusterIP, NodePort, LoadBalancer, ExternalName)"),
            );
            return ServiceRead::Invalid(c.errors);
        }
    };

    // ClusterIPs: `clusterIPs` is authoritative when present; `clusterIP` is its first entry.
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    if primary == "None" || spec.cluster_ips.as_ref().is_some_and(|ips| ips.first().map(String::as_str) == Some("None"))
    {
        return ServiceRead::Ignored(IgnoreReason::Headless);
    }
    let mut cluster_ips = FamilyIps::default();
    let listed: Vec<(String, &str)> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => {
            ips.iter().enumerate().map(|(i, s)| (format!("spec.clusterIPs[{i}]"), s.as_str())).collect()
        }
        _ if !primary.is_empty() => vec![("spec.clusterIP".to_string(), primary)],
        _ => Vec::new(),
    };
    if listed.is_empty() {
        c.fail(
            "spec.clusterIP",
            "is not set; a Service needs an allocated ClusterIP (the API server assigns one; in a manifest, write it out)",
        );
    }
    for (field, value) in listed {
        if let Some(ip) = c.ip(field.clone(), value)
            && cluster_ips.insert(IpFamily::of(&ip), ip).is_some()
        {
            c.fail(
                field,
                format!("a second {} ClusterIP ({ip}); a Service has at most one per family", IpFamily::of(&ip)),
            );
        }
    }
    if let (Some(ips), false) = (&spec.cluster_ips, primary.is_empty())
        && let (Some(first), Some(p)) = (ips.first(), parse_ip_sloppy(primary))
        && parse_ip_sloppy(first) != Some(p)
    {
        c.fail("spec.clusterIP", format!("{primary:?} differs from spec.clusterIPs[0] {first:?}"));
    }
    if let Some(families) = &spec.ip_families {
        for (i, fam) in families.iter().enumerate() {
            match IpFamily::from_k8s(fam) {
                None => c.fail(format!("spec.ipFamilies[{i}]"), format!("{fam:?} is not IPv4 or IPv6")),
                Some(f) if !cluster_ips.is_empty() && !cluster_ips.contains_key(&f) => c.fail(
                    format!("spec.ipFamilies[{i}]"),
                    format!("lists {f} but spec.clusterIPs has no {f} address (wrong address family)"),
                ),
                Some(_) => {}
            }
        }
    }

    // Ports: (port, protocol) and (name, protocol) must be unique, because
    // endpoints are matched to service ports by name and protocol.
    let mut ports = Vec::new();
    let mut seen_port = BTreeSet::new();
    let mut seen_name = BTreeSet::new();
    let mut seen_node_port = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => match s.parse::<Protocol>() {
                Ok(proto) if proto.as_k8s() == s => proto,
                _ => {
                    c.fail(format!("{field}.protocol"), format!("{s:?} is not TCP, UDP or SCTP"));
                    continue;
                }
            },
        };
        let Some(port) = port_number(p.port) else {
            c.fail(format!("{field}.port"), format!("{} is out of range 1-65535", p.port));
            continue;
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match port_number(n) {
                Some(n) => Some(n),
                None => {
                    c.fail(format!("{field}.nodePort"), format!("{n} is out of range 1-65535"));
                    continue;
                }
            },
        };
        let name = p.name.clone().unwrap_or_default();
        if !seen_port.insert((port, protocol)) {
            c.fail(format!("{field}.port"), format!("duplicate port {port}/{protocol}"));
        }
        if !seen_name.insert((name.clone(), protocol)) {
            c.fail(format!("{field}.name"), format!("duplicate port name {name:?} for {protocol}"));
        }
        if let Some(np) = node_port
            && !seen_node_port.insert((np, protocol))
        {
            c.fail(format!("{field}.nodePort"), format!("duplicate nodePort {np}/{protocol}"));
        }
        ports.push(PortSpec { name: crate::intern::shared_str(&name), port, protocol, node_port });
    }

    let mut external_ips = Vec::new();
    for (i, s) in spec.external_ips.iter().flatten().enumerate() {
        if let Some(ip) = c.ip(format!("spec.externalIPs[{i}]"), s)
            && !external_ips.contains(&ip)
        {
            external_ips.push(ip);
        }
    }

    let mut load_balancer_ingress = Vec::new();
    if service_type == ServiceType::LoadBalancer {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let field = format!("status.loadBalancer.ingress[{i}]");
            // Hostname-only ingress (AWS ELB style) has no address to intercept.
            let Some(s) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
                continue;
            };
            let proxy_mode = match ing.ip_mode.as_deref() {
                None | Some("VIP") => false,
                Some("Proxy") => true,
                Some(other) => {
                    c.fail(format!("{field}.ipMode"), format!("{other:?} is not VIP or Proxy"));
                    continue;
                }
            };
            if let Some(ip) = c.ip(format!("{field}.ip"), s)
                && !load_balancer_ingress.iter().any(|l: &LoadBalancerIngress| l.ip == ip)
            {
                load_balancer_ingress.push(LoadBalancerIngress { ip, proxy_mode });
            }
        }
    }

    let mut source_ranges = Vec::new();
    for (i, s) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        match parse_cidr_sloppy(s) {
            Some(net) => source_ranges.push(net),
            // Failing closed: ignoring a bad range would open the load balancer wider than asked.
            None => c.fail(format!("spec.loadBalancerSourceRanges[{i}]"), format!("{s:?} is not a CIDR")),
        }
    }

    let policy = |c: &mut Checker, field: &str, v: Option<&str>| -> bool {
        match v {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                c.fail(field.to_string(), format!("{other:?} is not Cluster or Local"));
                false
            }
        }
    };
    let etp_local = policy(&mut c, "spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref());
    let internal_policy_local = policy(&mut c, "spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref());

    let affinity_timeout_seconds = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|a| a.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => std::num::NonZeroU32::new(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_SECONDS => std::num::NonZeroU32::new(t as u32),
                Some(t) => {
                    c.fail(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT_SECONDS}"),
                    );
                    None
                }
            }
        }
        Some(other) => {
            c.fail("spec.sessionAffinity", format!("{other:?} is not None or ClientIP"));
            None
        }
    };

    let needs_health_check = service_type == ServiceType::LoadBalancer && etp_local;
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(_) if !needs_health_check => None,
        Some(n) => match port_number(n) {
            Some(n) => Some(n),
            None => {
                c.fail("spec.healthCheckNodePort", format!("{n} is out of range 1-65535"));
                None
            }
        },
    };

    let maglev =
        match svc.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_LB_ALGORITHM)).map(String::as_str) {
            None => None,
            Some("maglev") => Some(true),
            Some("random") => Some(false),
            Some(other) => {
                c.fail(
                    format!("metadata.annotations[{ANNOTATION_LB_ALGORITHM}]"),
                    format!("{other:?} is not maglev or random"),
                );
                None
            }
        };
    if !c.errors.is_empty() {
        return ServiceRead::Invalid(c.errors);
    }
    let outside = OutsideFacts {
        external_ips: external_ips.into(),
        load_balancer_ingress: load_balancer_ingress.into(),
        source_ranges: source_ranges.into(),
        health_check_node_port,
        traffic_distribution: spec.traffic_distribution.as_deref().map(crate::intern::shared_str),
    };
    let mut info = ServiceInfo {
        key: key.clone(),
        service_type,
        cluster_ips,
        ports: ports.into(),
        external_policy_local: false,
        internal_policy_local,
        affinity_timeout_seconds,
        maglev,
        outside: (outside != OutsideFacts::default()).then(|| Box::new(outside)),
    };
    // kube-proxy's ExternalPolicyLocal: eTP only means something for Services
    // reachable from outside.
    info.external_policy_local = etp_local && info.externally_accessible_type();
    ServiceRead::Served(Box::new(info))
}

/// Addresses of `family` from a list, in order.
pub fn of_family(ips: &[IpAddr], family: IpFamily) -> Vec<IpAddr> {
    ips.iter().copied().filter(|ip| IpFamily::of(ip) == family).collect()
}
