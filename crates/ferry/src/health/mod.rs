//! Health endpoints kube-proxy users and load balancers rely on: the proxy's
//! own `/healthz` and `/livez` (`proxy_health`), and the per-Service
//! health-check node ports of `externalTrafficPolicy: Local` Services
//! (`service_health`).

pub mod proxy_health;
pub mod service_health;

pub use proxy_health::ProxyHealth;
pub use service_health::{HealthChecks, ServiceHealthServer};
