//! The synthetic services of the control-plane benchmark: N ClusterIP
//! services with M endpoints each, as data the three rule layouts share and
//! as the `ClusterState` ferry plans from.
//!
//! ```text
//! service i     bench/svc-NNNNNN, ClusterIP 10.96.0.10 + i, port "http" 80/TCP -> 8080
//! endpoint j    10.130.0.0 + i*M + j, on node-b (not this node), ready; slices of at most 100
//! change n      endpoint 1 of service N/2 becomes 10.200.0.0 + n (endpoint 0 when M = 1)
//! node          clusterCIDRs 10.128.0.0/9, serviceCIDRs 10.96.0.0/12 (bench/src/cluster.rs)
//! ```

use ferry_model::{ClusterState, StateChange};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::net::Ipv4Addr;

pub const NAMESPACE: &str = "bench";
pub const PORT_NAME: &str = "http";
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// Endpoints per EndpointSlice, as the EndpointSlice controller's default.
pub const SLICE_SIZE: usize = 100;

fn add(base: Ipv4Addr, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + u32::try_from(offset).expect("offset fits in an IPv4 address"))
}

/// N services with M endpoints each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub services: usize,
    pub endpoints: usize,
}

impl Shape {
    /// At most 1,000,000 services and 2,000,000 endpoints in all (the addresses stay in 10.130.0.0/15).
    pub fn new(services: usize, endpoints: usize) -> anyhow::Result<Shape> {
        anyhow::ensure!(
            (1..=1_000_000).contains(&services) && endpoints >= 1 && services * endpoints <= 2_000_000,
            "a shape needs 1..=1000000 services and at most 2000000 endpoints in all, not {services} x {endpoints}"
        );
        Ok(Shape { services, endpoints })
    }

    /// `1000x2`, the form `--shapes` takes.
    pub fn parse(text: &str) -> anyhow::Result<Shape> {
        let (n, m) =
            text.split_once('x').ok_or_else(|| anyhow::anyhow!("a shape is SERVICESxENDPOINTS, not {text}"))?;
        Shape::new(n.trim().parse()?, m.trim().parse()?)
    }

    pub fn label(&self) -> String {
        format!("{}x{}", self.services, self.endpoints)
    }

    pub fn name(i: usize) -> String {
        format!("svc-{i:06}")
    }

    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        add(Ipv4Addr::new(10, 96, 0, 10), i)
    }

    /// The service whose endpoint the one-endpoint changes replace.
    pub fn changed_service(&self) -> usize {
        self.services / 2
    }

    fn changed_index(&self) -> usize {
        usize::from(self.endpoints > 1)
    }

    /// The endpoints of service `i` after `changes` one-endpoint changes.
    pub fn endpoints(&self, i: usize, changes: usize) -> Vec<Ipv4Addr> {
        let base = Ipv4Addr::new(10, 130, 0, 0);
        let mut eps: Vec<Ipv4Addr> = (0..self.endpoints).map(|j| add(base, i * self.endpoints + j)).collect();
        if changes > 0 && i == self.changed_service() {
            eps[self.changed_index()] = add(Ipv4Addr::new(10, 200, 0, 0), changes);
        }
        eps
    }

    fn service_json(i: usize) -> Value {
        let ip = Self::cluster_ip(i).to_string();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": Self::name(i), "namespace": NAMESPACE},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": ip,
                "clusterIPs": [ip],
                "ipFamilies": ["IPv4"],
                "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}],
            },
        })
    }

    fn slice_json(i: usize, k: usize, endpoints: &[Ipv4Addr]) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|ip| json!({"addresses": [ip.to_string()], "nodeName": "node-b", "conditions": {"ready": true}}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-{k}", Self::name(i)),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": Self::name(i)},
            },
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": PORT_NAME, "port": TARGET_PORT, "protocol": "TCP"}],
        })
    }

    fn slice_changes(&self, i: usize, changes: usize) -> anyhow::Result<Vec<StateChange>> {
        let eps = self.endpoints(i, changes);
        eps.chunks(SLICE_SIZE)
            .enumerate()
            .map(|(k, chunk)| {
                let slice: EndpointSlice = serde_json::from_value(Self::slice_json(i, k, chunk))?;
                Ok(StateChange::EndpointSliceApplied(Box::new(slice)))
            })
            .collect()
    }

    /// Every service and slice, as the model reads them.
    pub fn cluster_state(&self) -> anyhow::Result<ClusterState> {
        let mut state = ClusterState::default();
        for i in 0..self.services {
            let svc: Service = serde_json::from_value(Self::service_json(i))?;
            state.apply(StateChange::ServiceApplied(Box::new(svc)));
            for change in self.slice_changes(i, 0)? {
                state.apply(change);
            }
        }
        Ok(state)
    }

    /// The watch event of the `n`-th one-endpoint change: the slice holding the changed endpoint.
    pub fn endpoint_change(&self, n: usize) -> anyhow::Result<StateChange> {
        let k = self.changed_index() / SLICE_SIZE;
        let mut changes = self.slice_changes(self.changed_service(), n)?;
        Ok(changes.swap_remove(k))
    }
}

/// One service as the peer layouts render it.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// `bench/svc-000001`.
    pub namespaced_name: String,
    pub cluster_ip: Ipv4Addr,
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServiceSpec {
    pub fn of(shape: &Shape, i: usize, changes: usize) -> ServiceSpec {
        ServiceSpec {
            namespaced_name: format!("{NAMESPACE}/{}", Shape::name(i)),
            cluster_ip: Shape::cluster_ip(i),
            endpoints: shape.endpoints(i, changes),
        }
    }
}

/// A short stable hash of `text` in kube-proxy's alphabet (base32, upper case),
/// `len` characters: kube-proxy names chains by a SHA-256 prefix; any stable hash does here.
pub fn chain_hash(text: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut out = String::with_capacity(len);
    let mut x = h;
    for k in 0..len {
        if k == 12 {
            x = h.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
        }
        out.push(ALPHABET[(x & 31) as usize] as char);
        x >>= 5;
    }
    out
}
