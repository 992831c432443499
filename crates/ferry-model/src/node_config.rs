//! `NodeConfig`: what the planner must know about the node it runs on.
//!
//! This is plain data. The agent fills it from its config file, flags and the
//! node's interfaces; `ferry conformance` fills it from an acceptance case.
//! Parsing and key validation of the file live with the binary (`ferry::config`).

use crate::addr::IpFamily;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Which node addresses serve NodePorts (`nodePortAddresses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodePortAddresses {
    /// The literal `primary`: the node's primary IP of each family.
    pub primary: bool,
    /// Any local address inside one of these ranges. A family with no range
    /// (and no `primary`) serves NodePorts on every local address of that family.
    pub cidrs: Vec<IpNet>,
}

impl Default for NodePortAddresses {
    /// kube-proxy's nftables default (and ferry's): the primary IPs only.
    fn default() -> Self {
        NodePortAddresses { primary: true, cidrs: Vec::new() }
    }
}

impl NodePortAddresses {
    /// Every local address of every family (kube-proxy's iptables default).
    pub fn all() -> Self {
        NodePortAddresses { primary: false, cidrs: Vec::new() }
    }
}

/// How the node tells pod traffic apart from other traffic (kube-proxy's
/// `detectLocalMode`). Pod traffic is not masqueraded on its way to a ClusterIP
/// and is short-circuited to all endpoints for `externalTrafficPolicy: Local`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LocalDetector {
    /// Sources inside the cluster CIDRs are pods.
    ClusterCidr,
    /// Sources inside this node's pod CIDRs are pods.
    NodeCidr,
    /// Packets arriving on an interface whose name starts with this prefix are from pods.
    InterfaceNamePrefix(String),
    /// Packets arriving on this bridge are from pods.
    BridgeInterface(String),
    /// Pod traffic cannot be told apart.
    None,
}

impl std::fmt::Display for LocalDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalDetector::ClusterCidr => f.write_str("ClusterCIDR"),
            LocalDetector::NodeCidr => f.write_str("NodeCIDR"),
            LocalDetector::InterfaceNamePrefix(p) => write!(f, "InterfaceNamePrefix {p}*"),
            LocalDetector::BridgeInterface(b) => write!(f, "BridgeInterface {b}"),
            LocalDetector::None => f.write_str("None"),
        }
    }
}

/// Who masquerades pod egress traffic. Never on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MasqueradeMode {
    /// Pod egress keeps the pod address.
    Off,
    /// tc egress programs SNAT pod egress to the node.
    Bpf,
    /// An nftables table owned by ferry does it (for hosts that do not want BPF masquerading).
    Nftables,
}

/// Feature gates that change proxy semantics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureGates {
    /// `PreferSameTrafficDistribution`: honour node hints (`trafficDistribution: PreferSameNode`).
    pub prefer_same_traffic_distribution: bool,
}

impl Default for FeatureGates {
    fn default() -> Self {
        FeatureGates { prefer_same_traffic_distribution: true }
    }
}

/// Where the NodePort / LoadBalancer / ExternalIP datapath for traffic from
/// outside runs (`acceleration` in the node config). The planner does not
/// read it: it picks where the eBPF datapath attaches, not what it decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum Acceleration {
    /// tc ingress only.
    #[default]
    Disabled,
    /// An XDP program in driver mode on the external devices; failing to
    /// attach it is an error.
    Native,
    /// Native XDP where the driver takes it, else tc only (logged with the reason).
    BestEffort,
}

impl Acceleration {
    /// The value named in the config file (`disabled`, `native`, `best-effort`).
    pub fn parse(s: &str) -> Option<Acceleration> {
        match s {
            "disabled" => Some(Acceleration::Disabled),
            "native" => Some(Acceleration::Native),
            "best-effort" => Some(Acceleration::BestEffort),
            _ => None,
        }
    }
}

impl std::fmt::Display for Acceleration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Acceleration::Disabled => "disabled",
            Acceleration::Native => "native",
            Acceleration::BestEffort => "best-effort",
        })
    }
}

/// Everything about the node that the planner reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    /// This node's name; endpoints with this `nodeName` are local.
    pub node_name: String,
    /// Every address configured on the node. A source in this list is the host itself.
    pub node_ips: Vec<IpAddr>,
    /// The node's primary address per family (at most one each). Empty: the
    /// first address of each family in `node_ips`.
    pub primary_ips: Vec<IpAddr>,
    /// This node's pod ranges (`Node.spec.podCIDRs`), used by `LocalDetector::NodeCidr`.
    pub pod_cidrs: Vec<IpNet>,
    /// The cluster's pod ranges, used by `LocalDetector::ClusterCidr`.
    pub cluster_cidrs: Vec<IpNet>,
    /// Service ranges: an unallocated address inside them is dropped.
    pub service_cidrs: Vec<IpNet>,
    /// The families this node proxies.
    pub ip_families: Vec<IpFamily>,
    pub node_port_addresses: NodePortAddresses,
    /// Serve IPv4 NodePorts on 127.0.0.1 too (kube-proxy iptables mode only).
    pub localhost_node_ports: bool,
    /// SNAT every service connection, whatever its source.
    pub masquerade_all: bool,
    pub local_detector: LocalDetector,
    /// Topology zone of this node; `None`: read `topology.kubernetes.io/zone` from the Node object.
    pub zone: Option<String>,
    pub feature_gates: FeatureGates,
    /// `service.kubernetes.io/service-proxy-name` value ferry answers to. Services
    /// carrying that label with another value are left to another proxy.
    pub service_proxy_name: Option<String>,
    /// Explicitly accept traffic to health-check node ports ahead of any host
    /// firewall (what kube-proxy's iptables mode does). Off: such traffic simply
    /// continues to the local stack, where ferry's health server answers.
    pub accept_health_check_node_ports: bool,
    /// Egress masquerading of pod traffic.
    pub masquerade: MasqueradeMode,
    /// Destinations never masqueraded; empty means ip-masq-agent's private defaults.
    pub non_masquerade_cidrs: Vec<IpNet>,
    /// Masquerade link-local destinations too.
    pub masquerade_link_local: bool,
    /// `externalIPs.allowedCIDRs`: the only ranges a Service's `spec.externalIPs`
    /// may come from (the DenyServiceExternalIPs idea, enforced at the node).
    /// `None`: every unicast address is allowed, as with kube-proxy.
    pub external_ips_allowed: Option<Vec<IpNet>>,
    /// Per-Service limits; a Service over them is refused by name.
    pub service_limits: ServiceLimits,
    /// `loadBalancing.mode`: how outside connections reach backends on other nodes (`crate::dsr`).
    pub load_balancing: crate::dsr::LoadBalancingMode,
    /// `acceleration`: whether outside traffic to NodePorts / LB IPs /
    /// ExternalIPs is handled at XDP before tc sees it.
    pub acceleration: Acceleration,
}

/// How much of the datapath one Service may take (`limits` in the node config).
/// A Service over a limit is refused as a whole, by name, and every other
/// Service keeps being programmed: one tenant cannot fill a map for everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ServiceLimits {
    /// Frontends of one Service over all its ports and families (ClusterIP,
    /// each ExternalIP, each load-balancer address, the NodePort).
    pub max_frontends: u32,
    /// Endpoints of one Service summed over its service ports; also the
    /// hard ceiling of one backend set (slot numbers are 16 bits).
    pub max_endpoints: u32,
}

impl ServiceLimits {
    /// One backend set never holds more than this many slots (a `u16` slot index).
    pub const SLOT_CEILING: u32 = u16::MAX as u32;
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits { max_frontends: 4096, max_endpoints: Self::SLOT_CEILING }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_name: String::new(),
            node_ips: Vec::new(),
            primary_ips: Vec::new(),
            pod_cidrs: Vec::new(),
            cluster_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
            ip_families: vec![IpFamily::V4, IpFamily::V6],
            node_port_addresses: NodePortAddresses::default(),
            localhost_node_ports: false,
            masquerade_all: false,
            local_detector: LocalDetector::ClusterCidr,
            zone: None,
            feature_gates: FeatureGates::default(),
            service_proxy_name: None,
            accept_health_check_node_ports: false,
            masquerade: MasqueradeMode::Off,
            non_masquerade_cidrs: Vec::new(),
            masquerade_link_local: false,
            external_ips_allowed: None,
            service_limits: ServiceLimits::default(),
            load_balancing: crate::dsr::LoadBalancingMode::Snat,
            acceleration: Acceleration::Disabled,
        }
    }
}

impl NodeConfig {
    /// The primary address of `family`: configured, else the first node IP of that family.
    pub fn primary_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.primary_ips.iter().chain(self.node_ips.iter()).copied().find(|ip| IpFamily::of(ip) == family)
    }

    pub fn serves_family(&self, family: IpFamily) -> bool {
        self.ip_families.contains(&family)
    }
}

/// Labels of the Node object the planner cares about.
pub type NodeLabels = BTreeMap<String, String>;
