//! `/healthz` and `/livez` with kube-proxy's meaning: is the proxy keeping up
//! with the API server, and (for `/healthz` only) is this node staying in the
//! cluster.
//!
//! As in kube-proxy's `ProxyHealthServer`: the proxy is healthy while it starts
//! up, while nothing is waiting to be programmed, and while the oldest change
//! not yet programmed is younger than the timeout (kube-proxy: twice the sync
//! period). `/healthz` is also unhealthy when this node's Node object is being
//! deleted or carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
//! taint, so load balancers drain the node first; `/livez` ignores the node, so
//! the kubelet does not restart a proxy that is fine on a node going away.
//!
//! Bodies are kube-proxy's JSON fields (`lastUpdated`, `currentTime`,
//! `nodeEligible`), with RFC 3339 timestamps.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether `node` is staying: not being deleted and not marked for deletion.
pub fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
    !taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT)
}

#[derive(Debug)]
struct State {
    /// When the datapath last matched the API (a sync finished).
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet programmed arrived.
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

/// One health verdict, as the handlers report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
    pub node_eligible: bool,
}

/// The proxy's health, shared by the sync loop (writer) and the HTTP handlers.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<State>,
}

impl ProxyHealth {
    /// `timeout`: how long a change may wait to be programmed before the proxy
    /// counts as unhealthy (kube-proxy uses twice its sync period).
    pub fn new(timeout: Duration) -> Arc<ProxyHealth> {
        Arc::new(ProxyHealth {
            timeout,
            // The node is eligible until its Node object says otherwise.
            state: Mutex::new(State { last_updated: None, oldest_pending: None, node_eligible: true }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change arrived that the datapath does not have yet.
    pub fn queued_update(&self, now: Instant) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(now);
    }

    /// A sync finished. `still_pending_since`: the first change that arrived
    /// while it ran (it is not programmed yet), if any.
    pub fn updated(&self, wall: SystemTime, still_pending_since: Option<Instant>) {
        let mut s = self.lock();
        s.last_updated = Some(wall);
        s.oldest_pending = still_pending_since;
    }

    /// Reads this node's Node object (deletion, autoscaler taint).
    pub fn sync_node(&self, node: &Node) {
        self.lock().node_eligible = node_eligible(node);
    }

    /// Whether the proxy keeps up (ignoring the node), as the service health
    /// checks report it in `serviceProxyHealthy`.
    pub fn is_healthy(&self) -> bool {
        self.verdict(Instant::now()).healthy
    }

    /// The verdict at `now`, ignoring the node.
    pub fn verdict(&self, now: Instant) -> Verdict {
        let s = self.lock();
        let healthy = match s.oldest_pending {
            None => true,
            Some(since) => now.saturating_duration_since(since) < self.timeout,
        };
        Verdict { healthy, last_updated: s.last_updated, node_eligible: s.node_eligible }
    }

    /// `/healthz`: the proxy keeps up and the node is staying.
    pub fn healthz(&self) -> Response {
        let v = self.verdict(Instant::now());
        respond(v.healthy && v.node_eligible, v.last_updated, Some(v.node_eligible))
    }

    /// `/livez`: the proxy keeps up (the node's fate does not matter).
    pub fn livez(&self) -> Response {
        let v = self.verdict(Instant::now());
        respond(v.healthy, v.last_updated, None)
    }
}

fn rfc3339(t: SystemTime) -> String {
    Timestamp::try_from(t).map(|ts| ts.to_string()).unwrap_or_default()
}

/// kube-proxy's response: 200 or 503 and a small JSON body. When healthy,
/// `lastUpdated` is "now", as kube-proxy reports it for compatibility with
/// clients that compare it with the current time.
fn respond(healthy: bool, last_updated: Option<SystemTime>, node_eligible: Option<bool>) -> Response {
    let now = SystemTime::now();
    let last = if healthy { Some(now) } else { last_updated };
    let mut body = serde_json::json!({
        "lastUpdated": last.map(rfc3339).unwrap_or_default(),
        "currentTime": rfc3339(now),
    });
    if let Some(eligible) = node_eligible {
        body["nodeEligible"] = eligible.into();
    }
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, body.to_string())
}

/// A JSON response with kube-proxy's headers.
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn healthy_while_starting_and_while_changes_are_recent() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(h.verdict(t0).healthy, "healthy before anything happened");
        h.queued_update(t0);
        assert!(h.verdict(t0 + Duration::from_secs(59)).healthy, "a recent change is not late yet");
        h.queued_update(t0 + Duration::from_secs(30));
        assert!(!h.verdict(t0 + Duration::from_secs(61)).healthy, "the oldest change counts, not the newest");
        h.updated(SystemTime::now(), None);
        assert!(h.verdict(t0 + Duration::from_secs(600)).healthy, "synced: healthy however long nothing changes");
    }

    #[test]
    fn a_change_during_a_sync_stays_pending() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        h.queued_update(t0);
        h.updated(SystemTime::now(), Some(t0 + Duration::from_secs(1)));
        assert!(h.verdict(t0 + Duration::from_secs(60)).healthy);
        assert!(!h.verdict(t0 + Duration::from_secs(62)).healthy);
    }

    #[test]
    fn a_node_being_deleted_or_drained_by_the_autoscaler_is_not_eligible() {
        let mut node = Node::default();
        assert!(node_eligible(&node));
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(!node_eligible(&node));
        node.spec = None;
        node.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert!(!node_eligible(&node));

        let h = ProxyHealth::new(Duration::from_secs(60));
        h.sync_node(&node);
        assert_eq!(h.healthz().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.livez().status(), StatusCode::OK, "/livez does not care about the node");
    }

    #[tokio::test]
    async fn bodies_carry_kube_proxys_fields_and_headers() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let r = h.healthz();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["nodeEligible"], true);
        assert!(v["lastUpdated"].as_str().unwrap().parse::<Timestamp>().is_ok(), "{v}");
        assert!(v["currentTime"].as_str().unwrap().parse::<Timestamp>().is_ok(), "{v}");
        let body = axum::body::to_bytes(h.livez().into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v.get("nodeEligible").is_none(), "{v}");
    }
}
