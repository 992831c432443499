//! Which endpoints a service port uses: topology hints, traffic policies and the
//! terminating-endpoint fallback (kube-proxy's `CategorizeEndpoints`).

use crate::endpoints::Endpoint;
use serde::Serialize;

/// The topology filter in effect for a service port's cluster-wide endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TopologyMode {
    /// No filtering.
    None,
    /// Only endpoints hinted for this node (`PreferSameNode`).
    SameNode,
    /// Only endpoints hinted for this node's zone (`PreferSameZone` / `PreferClose`).
    SameZone,
}

/// Why the topology filter is (not) in effect, for `ferry explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TopologyReason {
    NodeHintsForThisNode,
    ZoneHintsForThisZone(String),
    SomeEndpointLacksHints,
    NodeHasNoZone,
    NoHintForThisZone(String),
    NoReadyEndpoints,
}

impl std::fmt::Display for TopologyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologyReason::NodeHintsForThisNode => {
                f.write_str("every ready endpoint has node hints and some are for this node")
            }
            TopologyReason::ZoneHintsForThisZone(z) => {
                write!(f, "every ready endpoint has zone hints and some are for zone {z}")
            }
            TopologyReason::SomeEndpointLacksHints => {
                f.write_str("a ready endpoint has no hints, so hints are ignored")
            }
            TopologyReason::NodeHasNoZone => {
                f.write_str("this node has no topology.kubernetes.io/zone label, so zone hints are ignored")
            }
            TopologyReason::NoHintForThisZone(z) => {
                write!(f, "no endpoint is hinted for zone {z}, so hints are ignored")
            }
            TopologyReason::NoReadyEndpoints => f.write_str("no ready endpoints"),
        }
    }
}

/// Inputs that do not depend on the endpoints.
#[derive(Debug, Clone, Copy)]
pub struct TopologyContext<'a> {
    pub node_name: &'a str,
    pub zone: Option<&'a str>,
    pub prefer_same_node_gate: bool,
}

/// kube-proxy's `topologyModeFromHints`.
pub fn topology_mode(endpoints: &[Endpoint], ctx: TopologyContext) -> (TopologyMode, TopologyReason) {
    let mut has_for_node = false;
    let mut all_node_hints = true;
    let mut has_for_zone = false;
    let mut all_zone_hints = true;
    let mut any_ready = false;
    let zone = ctx.zone.unwrap_or("");
    for ep in endpoints.iter().filter(|e| e.is_ready()) {
        any_ready = true;
        if ep.zone_hints().is_empty() {
            all_zone_hints = false;
        } else if ep.zone_hints().contains(zone) {
            has_for_zone = true;
        }
        if ep.node_hints().is_empty() {
            all_node_hints = false;
        } else if ep.node_hints().contains(ctx.node_name) {
            has_for_node = true;
        }
    }
    if !any_ready {
        return (TopologyMode::None, TopologyReason::NoReadyEndpoints);
    }
    if ctx.prefer_same_node_gate && all_node_hints && has_for_node {
        return (TopologyMode::SameNode, TopologyReason::NodeHintsForThisNode);
    }
    if !all_zone_hints {
        return (TopologyMode::None, TopologyReason::SomeEndpointLacksHints);
    }
    if has_for_zone {
        return (TopologyMode::SameZone, TopologyReason::ZoneHintsForThisZone(zone.to_string()));
    }
    if zone.is_empty() {
        (TopologyMode::None, TopologyReason::NodeHasNoZone)
    } else {
        (TopologyMode::None, TopologyReason::NoHintForThisZone(zone.to_string()))
    }
}

fn available_for_topology(ep: &Endpoint, mode: &TopologyMode, ctx: TopologyContext) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => ep.node_hints().contains(ctx.node_name),
        TopologyMode::SameZone => ep.zone_hints().contains(ctx.zone.unwrap_or("")),
    }
}

/// Which kind of endpoints a set holds, for `ferry explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EndpointChoice {
    /// Ready endpoints (after topology filtering).
    Ready,
    /// No endpoint was ready: serving-and-terminating ones are used instead.
    ServingTerminating,
    /// Nothing usable.
    Empty,
}

/// The outcome of categorising one service port's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Categorized {
    /// Indexes into the endpoint list used by "Cluster" traffic policy
    /// (exactly sized: the planner keeps one per service port).
    pub cluster: Box<[u32]>,
    pub cluster_choice: EndpointChoice,
    /// Indexes used by "Local" traffic policy.
    pub local: Box<[u32]>,
    pub local_choice: EndpointChoice,
    /// Some endpoint anywhere could serve: decides DROP (true) against REJECT (false).
    pub has_any: bool,
    pub topology: TopologyMode,
    pub topology_reason: TopologyReason,
}

/// kube-proxy's `CategorizeEndpoints`.
///
/// `uses_cluster`: some traffic path of this port uses cluster-wide endpoints
/// (internal policy Cluster, or reachable from outside at all, for the
/// short-circuit). `uses_local`: some path uses node-local endpoints.
pub fn categorize(endpoints: &[Endpoint], uses_cluster: bool, uses_local: bool, ctx: TopologyContext) -> Categorized {
    let mut out = Categorized {
        cluster: Box::default(),
        cluster_choice: EndpointChoice::Empty,
        local: Box::default(),
        local_choice: EndpointChoice::Empty,
        has_any: false,
        topology: TopologyMode::None,
        topology_reason: TopologyReason::NoReadyEndpoints,
    };
    let pick = |f: &dyn Fn(&Endpoint) -> bool| -> Box<[u32]> {
        endpoints.iter().enumerate().filter(|(_, e)| f(e)).map(|(i, _)| i as u32).collect()
    };

    if uses_cluster {
        let (mode, reason) = topology_mode(endpoints, ctx);
        out.cluster = pick(&|e| e.is_ready() && available_for_topology(e, &mode, ctx));
        out.topology = mode;
        out.topology_reason = reason;
        out.cluster_choice = EndpointChoice::Ready;
        // Topology is already ignored when no ready endpoint matches it, so an
        // empty set here means nothing is ready anywhere.
        if out.cluster.is_empty() {
            out.cluster = pick(&|e| e.is_serving_terminating());
            out.cluster_choice = EndpointChoice::ServingTerminating;
        }
        if out.cluster.is_empty() {
            out.cluster_choice = EndpointChoice::Empty;
        } else {
            out.has_any = true;
        }
    }
    if !uses_local {
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.is_ready() {
            out.has_any = true;
            local_ready |= ep.local;
        } else if ep.is_serving_terminating() {
            out.has_any = true;
            local_serving_terminating |= ep.local;
        }
    }
    if local_ready {
        out.local = pick(&|e| e.local && e.is_ready());
        out.local_choice = EndpointChoice::Ready;
    } else if local_serving_terminating {
        out.local = pick(&|e| e.local && e.is_serving_terminating());
        out.local_choice = EndpointChoice::ServingTerminating;
    }
    out
}
