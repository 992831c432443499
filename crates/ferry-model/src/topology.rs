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

/// Why the topology filter is (not) in effect, for `ferry explain`. The
/// zone meant is always the node's own (`NodeFacts::zone`), so it is not
/// copied into every service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TopologyReason {
    NodeHintsForThisNode,
    ZoneHintsForThisZone,
    SomeEndpointLacksHints,
    NodeHasNoZone,
    NoHintForThisZone,
    NoReadyEndpoints,
}

impl std::fmt::Display for TopologyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologyReason::NodeHintsForThisNode => {
                f.write_str("every ready endpoint has node hints and some are for this node")
            }
            TopologyReason::ZoneHintsForThisZone => {
                f.write_str("every ready endpoint has zone hints and some are for this node's zone")
            }
            TopologyReason::SomeEndpointLacksHints => {
                f.write_str("a ready endpoint has no hints, so hints are ignored")
            }
            TopologyReason::NodeHasNoZone => {
                f.write_str("this node has no topology.kubernetes.io/zone label, so zone hints are ignored")
            }
            TopologyReason::NoHintForThisZone => {
                f.write_str("no endpoint is hinted for this node's zone, so hints are ignored")
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
        return (TopologyMode::SameZone, TopologyReason::ZoneHintsForThisZone);
    }
    if zone.is_empty() {
        (TopologyMode::None, TopologyReason::NodeHasNoZone)
    } else {
        (TopologyMode::None, TopologyReason::NoHintForThisZone)
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Categorized {
    /// Indexes into the endpoint list: those used by "Cluster" traffic
    /// policy (the first `cluster_len`), then those used by "Local". One
    /// exactly sized list: the planner keeps one per service port, and two
    /// lists and a reason with its zone name took 72 bytes in every one.
    sets: Box<[u32]>,
    /// A set never exceeds `ServiceLimits::SLOT_CEILING` (u16::MAX) endpoints.
    cluster_len: u16,
    pub cluster_choice: EndpointChoice,
    pub local_choice: EndpointChoice,
    /// Some endpoint anywhere could serve: decides DROP (true) against REJECT (false).
    pub has_any: bool,
    pub topology: TopologyMode,
    pub topology_reason: TopologyReason,
}

impl Categorized {
    /// Indexes into the endpoint list used by "Cluster" traffic policy.
    pub fn cluster(&self) -> &[u32] {
        &self.sets[..self.cluster_len as usize]
    }

    /// Indexes used by "Local" traffic policy.
    pub fn local(&self) -> &[u32] {
        &self.sets[self.cluster_len as usize..]
    }

    /// Replaces both sets. A "Cluster" set is cut at `u16::MAX`: a port
    /// with more endpoints than that is refused by the planner anyway
    /// (`ServiceLimits::SLOT_CEILING`).
    pub fn set_indexes(&mut self, cluster: &[u32], local: &[u32]) {
        let cluster = &cluster[..cluster.len().min(usize::from(u16::MAX))];
        self.sets = cluster.iter().chain(local).copied().collect();
        self.cluster_len = cluster.len() as u16;
    }
}

impl Serialize for Categorized {
    /// As the two lists they are.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Categorized", 7)?;
        st.serialize_field("cluster", self.cluster())?;
        st.serialize_field("cluster_choice", &self.cluster_choice)?;
        st.serialize_field("local", self.local())?;
        st.serialize_field("local_choice", &self.local_choice)?;
        st.serialize_field("has_any", &self.has_any)?;
        st.serialize_field("topology", &self.topology)?;
        st.serialize_field("topology_reason", &self.topology_reason)?;
        st.end()
    }
}

/// kube-proxy's `CategorizeEndpoints`.
///
/// `uses_cluster`: some traffic path of this port uses cluster-wide endpoints
/// (internal policy Cluster, or reachable from outside at all, for the
/// short-circuit). `uses_local`: some path uses node-local endpoints.
pub fn categorize(endpoints: &[Endpoint], uses_cluster: bool, uses_local: bool, ctx: TopologyContext) -> Categorized {
    let mut cluster: Vec<u32> = Vec::new();
    let mut local: Vec<u32> = Vec::new();
    let mut out = Categorized {
        sets: Box::default(),
        cluster_len: 0,
        cluster_choice: EndpointChoice::Empty,
        local_choice: EndpointChoice::Empty,
        has_any: false,
        topology: TopologyMode::None,
        topology_reason: TopologyReason::NoReadyEndpoints,
    };
    let pick = |f: &dyn Fn(&Endpoint) -> bool| -> Vec<u32> {
        endpoints.iter().enumerate().filter(|(_, e)| f(e)).map(|(i, _)| i as u32).collect()
    };

    if uses_cluster {
        let (mode, reason) = topology_mode(endpoints, ctx);
        cluster = pick(&|e| e.is_ready() && available_for_topology(e, &mode, ctx));
        out.topology = mode;
        out.topology_reason = reason;
        out.cluster_choice = EndpointChoice::Ready;
        // Topology is already ignored when no ready endpoint matches it, so an
        // empty set here means nothing is ready anywhere.
        if cluster.is_empty() {
            cluster = pick(&|e| e.is_serving_terminating());
            out.cluster_choice = EndpointChoice::ServingTerminating;
        }
        if cluster.is_empty() {
            out.cluster_choice = EndpointChoice::Empty;
        } else {
            out.has_any = true;
        }
    }
    if !uses_local {
        out.set_indexes(&cluster, &[]);
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
        local = pick(&|e| e.local && e.is_ready());
        out.local_choice = EndpointChoice::Ready;
    } else if local_serving_terminating {
        local = pick(&|e| e.local && e.is_serving_terminating());
        out.local_choice = EndpointChoice::ServingTerminating;
    }
    out.set_indexes(&cluster, &local);
    out
}
