//! Routes: what a service port does with a new connection, per source class.
//!
//! kube-proxy's traffic-policy and masquerade rules are decided here, once,
//! as plain data. Backends translate a `Route` into map entries or nft rules;
//! they never re-derive it.

use serde::Serialize;
use std::fmt;

/// Where a connection comes from, as far as the proxy rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum SourceClass {
    /// A pod, as the local traffic detector tells it.
    Pod,
    /// The node itself (a source address configured on the node).
    Host,
    /// Anything else: a client outside the cluster, another node.
    External,
}

impl SourceClass {
    pub const ALL: [SourceClass; 3] = [SourceClass::Pod, SourceClass::Host, SourceClass::External];
}

impl fmt::Display for SourceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceClass::Pod => "pod",
            SourceClass::Host => "host",
            SourceClass::External => "external",
        })
    }
}

/// A value for each source class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PerSource<T> {
    pub pod: T,
    pub host: T,
    pub external: T,
}

impl<T> PerSource<T> {
    pub fn from_fn(mut f: impl FnMut(SourceClass) -> T) -> Self {
        PerSource { pod: f(SourceClass::Pod), host: f(SourceClass::Host), external: f(SourceClass::External) }
    }

    pub fn get(&self, class: SourceClass) -> &T {
        match class {
            SourceClass::Pod => &self.pod,
            SourceClass::Host => &self.host,
            SourceClass::External => &self.external,
        }
    }
}

/// The two endpoint sets a service port keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum EndpointSet {
    /// Cluster-wide endpoints (topology-filtered).
    Cluster,
    /// Endpoints on this node.
    Local,
}

/// Why a route is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RouteReason {
    /// No endpoint anywhere is ready or serving.
    NoEndpoints,
    /// internalTrafficPolicy=Local and this node has no endpoint.
    InternalLocalNoLocalEndpoints,
    /// externalTrafficPolicy=Local and this node has no endpoint.
    ExternalLocalNoLocalEndpoints,
    InternalPolicyCluster,
    InternalPolicyLocal,
    ExternalPolicyCluster,
    /// externalTrafficPolicy=Local, client outside: node-local endpoints, client IP kept.
    ExternalPolicyLocal,
    /// externalTrafficPolicy=Local, but pod traffic goes to every endpoint
    /// (as if it had gone out to the load balancer and back).
    PodShortCircuit,
    /// externalTrafficPolicy=Local, but the node's own traffic goes to every endpoint.
    HostShortCircuit,
}

impl fmt::Display for RouteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteReason::NoEndpoints => "no endpoint is ready or serving anywhere in the cluster: REJECT",
            RouteReason::InternalLocalNoLocalEndpoints => {
                "internalTrafficPolicy=Local and this node has no usable endpoint (others exist elsewhere): DROP"
            }
            RouteReason::ExternalLocalNoLocalEndpoints => {
                "externalTrafficPolicy=Local and this node has no usable endpoint (others exist elsewhere): DROP"
            }
            RouteReason::InternalPolicyCluster => "internalTrafficPolicy=Cluster: any cluster endpoint",
            RouteReason::InternalPolicyLocal => "internalTrafficPolicy=Local: only endpoints on this node",
            RouteReason::ExternalPolicyCluster => "externalTrafficPolicy=Cluster: any cluster endpoint",
            RouteReason::ExternalPolicyLocal => {
                "externalTrafficPolicy=Local: only endpoints on this node, client IP preserved"
            }
            RouteReason::PodShortCircuit => {
                "externalTrafficPolicy=Local, but traffic from a pod is short-circuited to every cluster endpoint"
            }
            RouteReason::HostShortCircuit => {
                "externalTrafficPolicy=Local, but traffic from the node itself is short-circuited to every cluster endpoint"
            }
        })
    }
}

/// Why a connection is or is not masqueraded (SNATed to the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum MasqReason {
    MasqueradeAll,
    /// A ClusterIP reached from outside the pod network: the reply must come back through this node.
    NotFromPod,
    /// externalTrafficPolicy=Cluster: the endpoint may be on another node.
    ExternalPolicyCluster,
    /// The node's own traffic to an externalTrafficPolicy=Local frontend.
    HostToExternalLocal,
    /// The endpoint is the client itself (hairpin): without SNAT the reply would skip the un-NAT.
    Hairpin,
    /// Pod traffic keeps its address.
    FromPod,
    /// No local traffic detector: pod traffic cannot be told apart, so nothing is masqueraded.
    NoLocalDetector,
    /// externalTrafficPolicy=Local keeps the client address.
    ClientIpPreserved,
}

impl MasqReason {
    pub fn masquerades(&self) -> bool {
        matches!(
            self,
            MasqReason::MasqueradeAll
                | MasqReason::NotFromPod
                | MasqReason::ExternalPolicyCluster
                | MasqReason::HostToExternalLocal
                | MasqReason::Hairpin
        )
    }
}

impl fmt::Display for MasqReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MasqReason::MasqueradeAll => "masqueradeAll is on",
            MasqReason::NotFromPod => "the source is not a pod, so the reply must return through this node",
            MasqReason::ExternalPolicyCluster => "externalTrafficPolicy=Cluster: the endpoint may be on another node",
            MasqReason::HostToExternalLocal => "the node's own traffic to an external frontend is masqueraded",
            MasqReason::Hairpin => "hairpin: the endpoint is the client itself",
            MasqReason::FromPod => "the source is a pod and keeps its address",
            MasqReason::NoLocalDetector => "no local traffic detector is configured, so nothing is masqueraded",
            MasqReason::ClientIpPreserved => "externalTrafficPolicy=Local preserves the client address",
        })
    }
}

/// What a service port does with a new connection from one source class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Route {
    Forward { set: EndpointSet, masquerade: MasqReason, reason: RouteReason },
    Drop { reason: RouteReason },
    Reject { reason: RouteReason },
}

impl Route {
    pub fn reason(&self) -> RouteReason {
        match self {
            Route::Forward { reason, .. } | Route::Drop { reason } | Route::Reject { reason } => *reason,
        }
    }
}
