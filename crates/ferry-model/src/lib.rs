//! ferry's model: Kubernetes Services and EndpointSlices plus a node's
//! configuration in, a `Plan` out. Pure functions, no I/O.
//!
//! ```text
//! changes --Planner::apply--> dirty Services --Planner::sync--> (Arc<Plan>, PlanDiff) --> backends
//! ClusterState + NodeConfig --build_plan--> Plan   (the same Plan from scratch: the planner's oracle)
//!                                             \--explain(flow)--> Explanation
//! ```
//!
//! All of kube-proxy's service semantics live in this crate, once: traffic
//! policies, topology, terminating endpoints, masquerading, NodePort
//! addresses, source ranges, session affinity. Datapath backends only
//! translate a Plan into kernel state.

pub mod acceptance;
pub mod addr;
pub mod diff;
pub mod dsr;
pub mod egress;
pub mod endpoints;
pub mod explain;
pub mod intern;
pub mod maglev;
pub mod node_config;
pub mod node_info;
pub mod plan;
pub mod planner;
pub mod policy;
pub mod problem;
pub mod protocol;
pub mod route;
pub mod service;
pub mod stale;
pub mod state;
pub mod topology;

pub use addr::IpFamily;
pub use diff::{PlanDiff, ServicePortChange};
pub use dsr::LoadBalancingMode;
pub use endpoints::Endpoint;
pub use explain::{Explanation, Flow, Verdict, explain};
pub use node_config::{Acceleration, LocalDetector, MasqueradeMode, NodeConfig, NodePortAddresses, ServiceLimits};
pub use plan::{
    Claim, Frontend, FrontendAddr, FrontendKey, FrontendKind, NodeFacts, Plan, ServicePort, ServicePortId, build_plan,
};
pub use planner::Planner;
pub use problem::{Consequence, ObjectError, ObjectKind};
pub use protocol::Protocol;
pub use route::{EndpointSet, MasqReason, PerSource, Route, RouteReason, SourceClass};
pub use state::{ClusterState, ObjectKey, StateChange};
