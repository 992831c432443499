//! `explain`: what the Plan does with one new connection, and why.
//!
//! This is the reference semantics of a flow. `ferry explain` prints it,
//! `ferry conformance --datapath model` compares it with the acceptance cases,
//! and the real datapaths are checked against the same answers.

use crate::addr::{IpFamily, fmt_addr_port};
use crate::dsr::{Carrier, LoadBalancingMode, carrier};
use crate::node_config::LocalDetector;
use crate::plan::{FrontendKey, FrontendKind, NodeFacts, Plan, ServicePort, ServicePortId};
use crate::protocol::Protocol;
use crate::route::{EndpointSet, MasqReason, Route, SourceClass};
use crate::topology::{EndpointChoice, TopologyMode};
use serde::Serialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The first packet of a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Interface the packet arrives on; only the interface-based local traffic detectors read it.
    pub in_interface: Option<String>,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}/{}", self.src, fmt_addr_port(&self.dst, self.port), self.protocol)
    }
}

/// One endpoint the connection may be DNATed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub local: bool,
    /// SNAT to the node on the way to this endpoint.
    pub masquerade: bool,
    pub masquerade_reason: MasqReason,
    /// Which mode carries the connection to this endpoint, when the node is
    /// not in `snat` mode (`crate::dsr::carrier`); a `Dsr` carrier is never masqueraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier: Option<Carrier>,
}

/// The outcome for the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", content = "candidates")]
pub enum Verdict {
    /// DNAT to one of these endpoints.
    Endpoints(Vec<Candidate>),
    /// Silently dropped.
    Drop,
    /// Refused at once (ICMP port unreachable, or a refused connect on the socket path).
    Reject,
    /// No service rule matched: the packet continues unchanged.
    Pass,
    /// Explicitly accepted for the local stack (health-check node port).
    Accept,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Endpoints(c) => {
                let list: Vec<String> = c.iter().map(|c| fmt_addr_port(&c.addr.ip(), c.addr.port())).collect();
                f.write_str(&list.join(", "))
            }
            Verdict::Drop => f.write_str("DROP"),
            Verdict::Reject => f.write_str("REJECT"),
            Verdict::Pass => f.write_str("PASS"),
            Verdict::Accept => f.write_str("ACCEPT"),
        }
    }
}

/// The frontend the flow hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchedFrontend {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    pub service: ServicePortId,
}

/// How one endpoint of the matched service port was considered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointNote {
    pub addr: SocketAddr,
    pub node: Option<String>,
    pub state: String,
    pub used: bool,
    pub why: String,
}

/// The full answer for one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub flow: Flow,
    pub source: SourceClass,
    pub source_reason: String,
    pub frontend: Option<MatchedFrontend>,
    pub verdict: Verdict,
    /// The rule that decided the verdict, in an operator's words.
    pub rule: String,
    pub endpoints: Vec<EndpointNote>,
    pub notes: Vec<String>,
    /// For traffic routed out unchanged: whether it leaves masqueraded.
    pub egress: Option<crate::egress::EgressDecision>,
}

impl Explanation {
    /// Whether every candidate is masqueraded (`None` when no endpoint is chosen).
    pub fn masquerade(&self) -> Option<bool> {
        match &self.verdict {
            Verdict::Endpoints(c) if !c.is_empty() => Some(c.iter().all(|c| c.masquerade)),
            _ => None,
        }
    }
}

/// Which source class `src` belongs to on this node, and why.
pub fn classify_source(node: &NodeFacts, src: &IpAddr, in_interface: Option<&str>) -> (SourceClass, String) {
    let family = IpFamily::of(src);
    let in_ranges = node.pod_ranges.iter().find(|n| n.contains(src));
    let pod = match (&node.local_detector, in_ranges) {
        (LocalDetector::ClusterCidr, Some(net)) => {
            Some(format!("{src} is inside cluster CIDR {net} (local traffic detector ClusterCIDR)"))
        }
        (LocalDetector::NodeCidr, Some(net)) => {
            Some(format!("{src} is inside this node's pod CIDR {net} (local traffic detector NodeCIDR)"))
        }
        (LocalDetector::InterfaceNamePrefix(p), _) | (LocalDetector::BridgeInterface(p), _) => {
            let by_prefix = matches!(node.local_detector, LocalDetector::InterfaceNamePrefix(_));
            match (in_interface, in_ranges) {
                (Some(i), _) if (by_prefix && i.starts_with(p.as_str())) || (!by_prefix && i == p) => {
                    Some(format!("it arrives on {i}, a pod interface"))
                }
                (Some(_), _) => None,
                (None, Some(net)) => Some(format!(
                    "{src} is inside this node's pod CIDR {net}, so it is assumed to arrive on a pod interface ({p}); pass --in-interface to be exact"
                )),
                (None, None) => None,
            }
        }
        _ => None,
    };
    if let Some(why) = pod.filter(|_| node.detects_pods(family)) {
        return (SourceClass::Pod, why);
    }
    if node.local_addresses.contains(src) {
        return (SourceClass::Host, format!("{src} is an address of this node: the host itself"));
    }
    let why = if node.detects_pods(family) {
        format!("{src} is neither a pod (per the local traffic detector) nor an address of this node")
    } else {
        format!(
            "{src} is not an address of this node (no local traffic detector for {family}, so no source counts as a pod)"
        )
    };
    (SourceClass::External, why)
}

fn endpoint_state(e: &crate::endpoints::Endpoint) -> String {
    let mut s = Vec::new();
    s.push(if e.ready { "ready" } else { "not ready" });
    if e.terminating {
        s.push(if e.serving { "serving, terminating" } else { "terminating, not serving" });
    } else if !e.serving {
        s.push("not serving");
    }
    s.join(", ")
}

fn endpoint_notes(sp: &ServicePort, route: &Route) -> Vec<EndpointNote> {
    let set = match route {
        Route::Forward { set, .. } => Some(*set),
        _ => None,
    };
    let chosen: Vec<SocketAddr> = set.map(|s| sp.endpoint_set(s).map(|e| e.addr()).collect()).unwrap_or_default();
    let cat = &sp.categorized;
    sp.endpoints
        .iter()
        .map(|e| {
            let used = chosen.contains(&e.addr());
            let why = if used {
                match (set, cat.cluster_choice, cat.local_choice) {
                    (Some(EndpointSet::Local), _, EndpointChoice::ServingTerminating) => {
                        "local; no local endpoint is ready, so serving-terminating ones are used".to_string()
                    }
                    (Some(EndpointSet::Local), _, _) => "on this node and ready".to_string(),
                    (_, EndpointChoice::ServingTerminating, _) => {
                        "no endpoint is ready anywhere, so serving-terminating ones are used".to_string()
                    }
                    _ => match cat.topology {
                        TopologyMode::None => "any ready endpoint may be chosen".to_string(),
                        TopologyMode::SameZone => "ready and hinted for this node's zone".to_string(),
                        TopologyMode::SameNode => "ready and hinted for this node".to_string(),
                    },
                }
            } else if set == Some(EndpointSet::Local) && !e.local {
                "on another node; the traffic policy is Local".to_string()
            } else if !e.ready && !e.is_serving_terminating() {
                "neither ready nor serving".to_string()
            } else if !e.ready {
                "terminating: used only when nothing is ready".to_string()
            } else if cat.topology != TopologyMode::None {
                format!("filtered by topology ({})", cat.topology_reason)
            } else if set.is_none() {
                "the connection does not reach any endpoint".to_string()
            } else {
                "not in the endpoint set for this path".to_string()
            };
            EndpointNote { addr: e.addr(), node: e.node_name().map(String::from), state: endpoint_state(e), used, why }
        })
        .collect()
}

/// Explains what happens to `flow` on this node.
pub fn explain(plan: &Plan, flow: &Flow) -> Explanation {
    let (source, source_reason) = classify_source(&plan.node, &flow.src, flow.in_interface.as_deref());
    let mut out = Explanation {
        flow: flow.clone(),
        source,
        source_reason,
        frontend: None,
        verdict: Verdict::Pass,
        rule: String::new(),
        endpoints: Vec::new(),
        notes: Vec::new(),
        egress: None,
    };
    if IpFamily::of(&flow.src) != IpFamily::of(&flow.dst) {
        out.rule = "source and destination are of different IP families: no service rule applies".into();
        return out;
    }
    if !plan.node.families.contains(&IpFamily::of(&flow.dst)) {
        out.rule = format!("this node does not proxy {}", IpFamily::of(&flow.dst));
        return out;
    }

    let Some((key, frontend)) = plan.frontend_for(flow.dst, flow.port, flow.protocol) else {
        no_frontend(plan, flow, &mut out);
        if out.verdict == Verdict::Pass && !plan.node.local_addresses.contains(&flow.dst) {
            out.egress = Some(crate::egress::decide(&plan.node, &flow.src, &flow.dst));
        }
        return out;
    };
    let sp = plan.services.get(&frontend.service).expect("every frontend belongs to a planned service port");
    out.frontend = Some(MatchedFrontend { key: *key, kind: frontend.kind, service: sp.id.clone() });
    let route = sp.route(frontend.kind, source);
    out.endpoints = endpoint_notes(sp, &route);

    if frontend.kind == FrontendKind::LoadBalancer
        && let Some(allowed) = sp.firewall()
        && !allowed.iter().any(|n| n.contains(&flow.src))
    {
        out.verdict = Verdict::Drop;
        for e in &mut out.endpoints {
            e.used = false;
            e.why = "not reached: the source range check drops the connection first".into();
        }
        let ranges: Vec<String> = sp.source_ranges().iter().map(|n| n.to_string()).collect();
        out.rule = format!(
            "loadBalancerSourceRanges [{}] do not include {}: DROP before load balancing",
            ranges.join(", "),
            flow.src
        );
        return out;
    }
    if sp.firewall().is_some() && frontend.kind == FrontendKind::LoadBalancer {
        out.notes.push(format!("{} is allowed by loadBalancerSourceRanges", flow.src));
    }
    match route {
        Route::Reject { reason } => {
            out.verdict = Verdict::Reject;
            out.rule = reason.to_string();
        }
        Route::Drop { reason } => {
            out.verdict = Verdict::Drop;
            out.rule = reason.to_string();
        }
        Route::Forward { set, masquerade, reason } => {
            let candidates = sp
                .endpoint_set(set)
                .map(|e| {
                    let hairpin = !masquerade.masquerades() && e.ip == flow.src;
                    let reason = if hairpin { MasqReason::Hairpin } else { masquerade };
                    let node = &plan.node;
                    let carried = (node.load_balancing != LoadBalancingMode::Snat).then(|| {
                        carrier(
                            node.load_balancing,
                            &node.tunnels,
                            frontend.kind,
                            source,
                            flow.protocol,
                            &e.ip,
                            e.local,
                        )
                    });
                    let dsr = matches!(carried, Some(Carrier::Dsr { .. }));
                    Candidate {
                        addr: e.addr(),
                        local: e.local,
                        masquerade: reason.masquerades() && !dsr,
                        masquerade_reason: reason,
                        carrier: carried,
                    }
                })
                .collect();
            out.verdict = Verdict::Endpoints(candidates);
            out.rule = reason.to_string();
            if let Some(t) = sp.affinity_timeout_seconds {
                out.notes.push(format!(
                    "sessionAffinity ClientIP: a client keeps its endpoint for {t}s after its last connection"
                ));
            }
        }
    }
    out
}

fn no_frontend(plan: &Plan, flow: &Flow, out: &mut Explanation) {
    if plan.cluster_ips.contains(&flow.dst) {
        out.verdict = Verdict::Reject;
        out.rule = format!(
            "{} is a ClusterIP but no service port {}/{} is defined on it: REJECT",
            flow.dst, flow.port, flow.protocol
        );
        return;
    }
    if plan.node.in_service_cidrs(&flow.dst) {
        out.verdict = Verdict::Drop;
        out.rule = format!("{} is inside the service CIDR but allocated to no Service: DROP", flow.dst);
        return;
    }
    if plan.node.local_addresses.contains(&flow.dst)
        && flow.protocol == Protocol::Tcp
        && let Some(owner) = plan.health_check_node_ports.get(&flow.port)
    {
        if plan.node.accept_health_check_node_ports {
            out.verdict = Verdict::Accept;
            out.rule = format!("health-check node port of {owner}: explicitly accepted for ferry's health server");
        } else {
            out.rule = format!(
                "health-check node port of {owner}: no datapath rule; ferry's health server answers on the node"
            );
        }
        return;
    }
    for sp in plan.services.values() {
        if sp.proxied_load_balancer_ips().contains(&flow.dst) && sp.port == flow.port && sp.id.protocol == flow.protocol
        {
            out.rule = format!(
                "{} is a load-balancer address of {} with ipMode Proxy: the load balancer proxies itself, the node does not intercept it",
                flow.dst, sp.id
            );
            return;
        }
    }
    if plan.node.local_addresses.contains(&flow.dst) {
        let np = plan.frontends.keys().any(|k| {
            matches!(k.addr, crate::plan::FrontendAddr::NodePort(_))
                && k.port == flow.port
                && k.protocol == flow.protocol
        });
        out.rule = if np && !plan.node.node_port_addresses.contains(&flow.dst) {
            format!(
                "{}/{} is a NodePort, but {} is not one of the node's NodePort addresses (nodePortAddresses): the packet goes to the local stack unchanged",
                flow.port, flow.protocol, flow.dst
            )
        } else {
            format!(
                "{} is an address of this node and no service uses this port: delivered locally, unchanged",
                flow.dst
            )
        };
        return;
    }
    out.rule = "no service frontend matches: the packet is routed as usual, unchanged".into();
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "flow      {}", self.flow)?;
        writeln!(f, "source    {} — {}", self.source, self.source_reason)?;
        match &self.frontend {
            Some(m) => writeln!(f, "frontend  {} of {} ({})", m.kind, m.service, m.key)?,
            None => writeln!(f, "frontend  none")?,
        }
        if !self.endpoints.is_empty() {
            writeln!(f, "endpoints")?;
            for e in &self.endpoints {
                let node = e.node.as_deref().unwrap_or("-");
                let mark = if e.used { "use " } else { "skip" };
                writeln!(
                    f,
                    "  {mark} {:<24} node {:<12} {:<28} {}",
                    fmt_addr_port(&e.addr.ip(), e.addr.port()),
                    node,
                    e.state,
                    e.why
                )?;
            }
        }
        writeln!(f, "verdict   {}", self.verdict)?;
        writeln!(f, "because   {}", self.rule)?;
        if let Verdict::Endpoints(c) = &self.verdict {
            let masq: Vec<&Candidate> = c.iter().filter(|c| c.masquerade).collect();
            let line = match (masq.len(), c.len()) {
                (0, _) => format!("no — {}", c.first().map(|c| c.masquerade_reason.to_string()).unwrap_or_default()),
                (m, n) if m == n => {
                    format!("yes, SNAT to the node — {}", masq[0].masquerade_reason)
                }
                _ => {
                    let who: Vec<String> = masq.iter().map(|c| c.addr.to_string()).collect();
                    format!("only towards {} — {}", who.join(", "), masq[0].masquerade_reason)
                }
            };
            writeln!(f, "masquerade {line}")?;
            for c in c.iter() {
                match &c.carrier {
                    Some(Carrier::Dsr { node, via }) => writeln!(
                        f,
                        "carried   to {}: DSR, tunnelled ({}) to {node} at {via}, which answers the client directly from the frontend; client address kept",
                        c.addr,
                        if via.is_ipv4() { "IPIP" } else { "IPv6 in IPv6" }
                    )?,
                    Some(Carrier::Translated { why }) => {
                        writeln!(f, "carried   to {}: as in snat mode — {why}", c.addr)?
                    }
                    None => {}
                }
            }
        }
        if let Some(e) = &self.egress {
            writeln!(f, "egress    {e}")?;
        }
        for n in &self.notes {
            writeln!(f, "note      {n}")?;
        }
        Ok(())
    }
}
