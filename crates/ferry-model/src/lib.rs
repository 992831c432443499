//! ferry's model: Kubernetes Services and EndpointSlices plus a node's
//! configuration in, a `Plan` out. Pure functions, no I/O.
//!
//! ```text
//! ClusterState + NodeConfig --build_plan--> Plan --Plan::diff--> PlanDiff --> backends
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
pub mod egress;
pub mod endpoints;
pub mod explain;
pub mod maglev;
pub mod node_config;
pub mod plan;
pub mod problem;
pub mod protocol;
pub mod route;
pub mod service;
pub mod stale;
pub mod state;
pub mod topology;

pub use addr::IpFamily;
pub use diff::{PlanDiff, ServicePortChange};
pub use endpoints::Endpoint;
pub use explain::{Explanation, Flow, Verdict, explain};
pub use node_config::{LocalDetector, MasqueradeMode, NodeConfig, NodePortAddresses};
pub use plan::{
    Frontend, FrontendAddr, FrontendKey, FrontendKind, NodeFacts, Plan, ServicePort, ServicePortId, build_plan,
};
pub use problem::{Consequence, ObjectError, ObjectKind};
pub use protocol::Protocol;
pub use route::{EndpointSet, MasqReason, PerSource, Route, RouteReason, SourceClass};
pub use state::{ClusterState, ObjectKey, StateChange};
