//! Health-check node ports: for every Service with `externalTrafficPolicy:
//! Local` and a `healthCheckNodePort`, an HTTP server on that port that tells
//! an external load balancer whether this node has local endpoints for it.
//!
//! Semantics are kube-proxy's `ServiceHealthServer`: 200 when the service has
//! at least one local ready endpoint and the proxy is healthy, 503 otherwise,
//! on any path; the body is `{"service":{"namespace":..,"name":..},
//! "localEndpoints":N,"serviceProxyHealthy":bool}` with `X-Content-Type-Options:
//! nosniff`. Endpoints are counted by distinct IP (an endpoint serving two
//! ports counts once). Listeners are bound on the node's NodePort addresses (on
//! every address when that set is empty) and opened and closed as Services come
//! and go: [`ServiceHealthServer::update`] is called after every sync.

use super::proxy_health::json_response;
use axum::http::StatusCode;
use axum::response::Response;
use ferry_model::{IpFamily, ObjectKey, Plan};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

/// One Service's health check, as the Plan decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    /// Distinct IPs of this node's ready endpoints of the Service (in the
    /// family that has most of them, since kube-proxy counts per family).
    pub local_endpoints: usize,
}

/// Every health check this node serves, and where (pure data from a Plan).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthChecks {
    /// Addresses to listen on; empty: every address.
    pub addresses: Vec<IpAddr>,
    pub services: BTreeMap<ObjectKey, HealthCheck>,
}

impl HealthChecks {
    /// What `plan` asks for.
    pub fn from_plan(plan: &Plan) -> HealthChecks {
        let mut services = BTreeMap::new();
        for (port, key) in &plan.health_check_node_ports {
            let mut per_family: BTreeMap<IpFamily, BTreeSet<IpAddr>> = BTreeMap::new();
            for sp in plan.ports_of(key) {
                let ips = per_family.entry(sp.id.family).or_default();
                // Terminating endpoints may still serve, but a node with only those must fail the check.
                ips.extend(sp.endpoints.iter().filter(|e| e.local && e.is_ready()).map(|e| e.ip));
            }
            let local_endpoints = per_family.values().map(BTreeSet::len).max().unwrap_or(0);
            services.insert(key.clone(), HealthCheck { port: *port, local_endpoints });
        }
        HealthChecks { addresses: plan.node.node_port_addresses.iter().copied().collect(), services }
    }
}

/// What the HTTP handlers read: local endpoint counts by Service.
type Counts = Arc<RwLock<BTreeMap<ObjectKey, usize>>>;

/// Whether the proxy keeps up (kube-proxy's `serviceProxyHealthy`).
pub type ProxyHealthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// An open health check: its port and the listeners serving it.
struct Instance {
    port: u16,
    addresses: Vec<IpAddr>,
    /// Dropping a sender stops its listener.
    _stop: Vec<oneshot::Sender<()>>,
}

/// The health-check servers of one node; see the module documentation.
pub struct ServiceHealthServer {
    handle: Handle,
    /// Set when the server owns its runtime (`ferry run` has no other).
    _runtime: Option<Runtime>,
    proxy_healthy: ProxyHealthy,
    counts: Counts,
    open: BTreeMap<ObjectKey, Instance>,
    /// Failed binds already logged (logged again only if they change).
    failed: BTreeMap<ObjectKey, (u16, String)>,
}

impl ServiceHealthServer {
    /// Serves on `handle`'s runtime.
    pub fn new(handle: Handle, proxy_healthy: ProxyHealthy) -> ServiceHealthServer {
        ServiceHealthServer {
            handle,
            _runtime: None,
            proxy_healthy,
            counts: Arc::default(),
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Serves on a small runtime of its own, for callers without one; the
    /// proxy always counts as healthy.
    pub fn standalone() -> std::io::Result<ServiceHealthServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-health-checks")
            .enable_all()
            .build()?;
        let mut s = ServiceHealthServer::new(runtime.handle().clone(), Arc::new(|| true));
        s._runtime = Some(runtime);
        Ok(s)
    }

    /// The Services whose health check is being served, with their ports.
    pub fn serving(&self) -> BTreeMap<ObjectKey, u16> {
        self.open.iter().map(|(k, i)| (k.clone(), i.port)).collect()
    }

    /// Opens, keeps or closes listeners so they match `want`, and publishes the
    /// new endpoint counts. A port that cannot be bound is logged and retried on
    /// the next update (as kube-proxy does).
    pub fn update(&mut self, want: &HealthChecks) {
        {
            let mut counts = self.counts.write().unwrap_or_else(|p| p.into_inner());
            *counts = want.services.iter().map(|(k, hc)| (k.clone(), hc.local_endpoints)).collect();
        }
        self.open.retain(|key, inst| {
            let keep =
                want.services.get(key).is_some_and(|hc| hc.port == inst.port) && inst.addresses == want.addresses;
            if !keep {
                tracing::info!(service = %key, port = inst.port, "closing health-check node port");
            }
            keep
        });
        self.failed.retain(|key, _| want.services.contains_key(key));
        for (key, hc) in &want.services {
            if self.open.contains_key(key) {
                continue;
            }
            match self.listen(key, hc.port, &want.addresses) {
                Ok(inst) => {
                    tracing::info!(service = %key, port = hc.port, "serving health-check node port");
                    self.failed.remove(key);
                    self.open.insert(key.clone(), inst);
                }
                Err(e) => {
                    let message = e.to_string();
                    if self.failed.get(key) != Some(&(hc.port, message.clone())) {
                        tracing::error!(
                            service = %key,
                            port = hc.port,
                            "cannot serve the health-check node port: {message}; load balancers will see this node \
                             as unhealthy for the service until the port is free (retried on every sync)"
                        );
                        self.failed.insert(key.clone(), (hc.port, message));
                    }
                }
            }
        }
    }

    fn listen(&self, key: &ObjectKey, port: u16, addresses: &[IpAddr]) -> std::io::Result<Instance> {
        let mut listeners = Vec::new();
        if addresses.is_empty() {
            listeners.push(bind_any(port)?);
        } else {
            for ip in addresses {
                let l = bind(SocketAddr::new(*ip, port), false).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("binding {}: {e}", SocketAddr::new(*ip, port)))
                })?;
                listeners.push(l);
            }
        }
        let _guard = self.handle.enter();
        let mut stop = Vec::new();
        for l in listeners {
            let listener = tokio::net::TcpListener::from_std(l)?;
            let (tx, rx) = oneshot::channel::<()>();
            let app = router(key.clone(), self.counts.clone(), self.proxy_healthy.clone());
            self.handle.spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = serve.await {
                    tracing::warn!("health-check server stopped: {e}");
                }
            });
            stop.push(tx);
        }
        Ok(Instance { port, addresses: addresses.to_vec(), _stop: stop })
    }
}

fn router(key: ObjectKey, counts: Counts, proxy_healthy: ProxyHealthy) -> axum::Router {
    axum::Router::new().fallback(move || {
        let (key, counts, proxy_healthy) = (key.clone(), counts.clone(), proxy_healthy.clone());
        async move {
            let count = counts.read().unwrap_or_else(|p| p.into_inner()).get(&key).copied().unwrap_or(0);
            respond(&key, count, proxy_healthy())
        }
    })
}

/// kube-proxy's answer for one Service.
pub fn respond(key: &ObjectKey, local_endpoints: usize, proxy_healthy: bool) -> Response {
    let status = if local_endpoints > 0 && proxy_healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "service": {"namespace": key.namespace(), "name": key.name()},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    json_response(status, body.to_string())
}

/// A listening TCP socket (non-blocking, SO_REUSEADDR so a restarted agent
/// rebinds at once).
pub fn bind(addr: SocketAddr, dual_stack: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Every address of both families on `port`: `[::]` dual-stack, or `0.0.0.0`
/// where IPv6 is off.
pub fn bind_any(port: u16) -> std::io::Result<std::net::TcpListener> {
    match bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port), true) {
        Ok(l) => Ok(l),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) || e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port), false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::state::ClusterState;
    use ferry_model::{NodeConfig, build_plan};
    use std::io::{Read, Write};

    fn plan(yaml: &str) -> Plan {
        let dir = std::env::temp_dir().join(format!("ferry-hc-{}-{}", std::process::id(), yaml.len()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.yaml"), yaml).unwrap();
        let state: ClusterState = ferry_k8s::load_dir(&dir).unwrap().state;
        std::fs::remove_dir_all(&dir).unwrap();
        let cfg = NodeConfig {
            node_name: "node-a".into(),
            node_ips: vec!["127.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        build_plan(&state, &cfg)
    }

    const LOCAL_SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30080}, {name: https, port: 443, nodePort: 30443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.0.5], nodeName: node-a}
- {addresses: [10.244.0.6], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.1.7], nodeName: node-b}
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
"#;

    #[test]
    fn local_ready_endpoints_are_counted_once_per_ip() {
        let hc = HealthChecks::from_plan(&plan(LOCAL_SVC));
        let want = HealthCheck { port: 32000, local_endpoints: 1 };
        assert_eq!(hc.services, BTreeMap::from([(ObjectKey::new("shop", "web"), want)]));
    }

    fn get(addr: SocketAddr) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        write!(s, "GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        assert!(text.to_lowercase().contains("x-content-type-options: nosniff"), "{text}");
        (status, text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
    }

    /// A free loopback port (bound and released; good enough in a test).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn listeners_follow_the_plan_and_answer_like_kube_proxy() {
        let mut server = ServiceHealthServer::standalone().unwrap();
        let key = ObjectKey::new("shop", "web");
        let port = free_port();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mut want = HealthChecks {
            addresses: vec![lo],
            services: BTreeMap::from([(key.clone(), HealthCheck { port, local_endpoints: 2 })]),
        };
        server.update(&want);
        let (status, body) = get(SocketAddr::new(lo, port));
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );

        want.services.get_mut(&key).unwrap().local_endpoints = 0;
        server.update(&want);
        assert_eq!(get(SocketAddr::new(lo, port)).0, 503);

        want.services.clear();
        server.update(&want);
        assert!(server.serving().is_empty());
        let closed = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            std::net::TcpStream::connect(SocketAddr::new(lo, port)).is_err()
        });
        assert!(closed, "the listener of a removed service must close");
    }

    #[test]
    fn an_unhealthy_proxy_fails_every_check() {
        let r = respond(&ObjectKey::new("a", "b"), 3, false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
