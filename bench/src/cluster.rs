//! The synthetic cluster: N single-port ClusterIP Services with two endpoints
//! each, as JSON manifests (a `kind: List` file for `ferry run`) and as a
//! `ClusterState` (for programming the datapath in-process).
//!
//! ```text
//! service i        svc-NNNNNN.bench, ClusterIP 10.96.0.10 + i, port 80/TCP -> targetPort 8080
//! sampled (100)    i = k * N / 100: endpoints 10.129.0.(k+1) and 10.129.1.(k+1) on node-a,
//!                  carried by the lab's backend pods be0 and be1 (they really answer)
//! every other i    endpoints 10.130.0.0 + 2i + {0,1} on node-b (unreachable: they only fill the maps)
//! client pod       10.128.0.10; cluster CIDR 10.128.0.0/9, service CIDR 10.96.0.0/12
//! ```

use ferry_model::{ClusterState, LocalDetector, NodeConfig, StateChange};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr};

/// How many services the latency client spreads its connections over.
pub const SAMPLED: usize = 100;
pub const NAMESPACE: &str = "bench";
/// The lab node's name; sampled endpoints are local to it.
pub const NODE: &str = "node-a";
/// Where every non-sampled endpoint claims to live (no such node exists).
pub const REMOTE_NODE: &str = "node-b";
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 10);
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

fn add(base: Ipv4Addr, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + u32::try_from(offset).expect("offset fits in an IPv4 address"))
}

/// The addresses backend pod `j` (0 or 1) carries: endpoint `j` of every sampled service.
pub fn live_addresses(j: usize) -> Vec<IpAddr> {
    (0..SAMPLED).map(|k| IpAddr::V4(live_endpoint(k, j))).collect()
}

/// Endpoint `j` of the `k`-th sampled service.
pub fn live_endpoint(k: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 129, j as u8, (k + 1) as u8)
}

/// The node config keys (beyond the lab's name, addresses and bpf paths) every agent gets.
pub fn node_config_yaml() -> String {
    format!("clusterCIDRs: [{CLUSTER_CIDR}]\nserviceCIDRs: [{SERVICE_CIDR}]\n")
}

/// The same node config as `ferry run` reads from `node_config_yaml`, for in-process planning.
pub fn node_config(node_ips: &[IpAddr]) -> NodeConfig {
    NodeConfig {
        node_name: NODE.into(),
        node_ips: node_ips.to_vec(),
        cluster_cidrs: vec![CLUSTER_CIDR.parse().expect("valid CIDR")],
        service_cidrs: vec![SERVICE_CIDR.parse().expect("valid CIDR")],
        local_detector: LocalDetector::ClusterCidr,
        ..NodeConfig::default()
    }
}

/// A cluster of `services` services.
#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    pub services: usize,
}

impl Synthetic {
    /// `services` must be a multiple of `SAMPLED` (100), at most 500,000.
    pub fn new(services: usize) -> anyhow::Result<Synthetic> {
        anyhow::ensure!(
            services >= SAMPLED && services.is_multiple_of(SAMPLED) && services <= 500_000,
            "a size must be a multiple of {SAMPLED} between {SAMPLED} and 500000, not {services}"
        );
        Ok(Synthetic { services })
    }

    fn stride(&self) -> usize {
        self.services / SAMPLED
    }

    /// Index (0..100) among the sampled services, if service `i` is one.
    pub fn sampled_index(&self, i: usize) -> Option<usize> {
        i.is_multiple_of(self.stride()).then(|| i / self.stride())
    }

    /// The service index of the `k`-th sampled service.
    pub fn sampled_service(&self, k: usize) -> usize {
        k * self.stride()
    }

    pub fn name(i: usize) -> String {
        format!("svc-{i:06}")
    }

    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        add(Ipv4Addr::new(10, 96, 0, 10), i)
    }

    /// The two endpoints of service `i` and the node each is on.
    pub fn endpoints(&self, i: usize) -> [(Ipv4Addr, &'static str); 2] {
        match self.sampled_index(i) {
            Some(k) => [(live_endpoint(k, 0), NODE), (live_endpoint(k, 1), NODE)],
            None => {
                let base = Ipv4Addr::new(10, 130, 0, 0);
                [(add(base, 2 * i), REMOTE_NODE), (add(base, 2 * i + 1), REMOTE_NODE)]
            }
        }
    }

    /// An address no other endpoint uses, for the `n`-th one-endpoint change.
    pub fn changed_endpoint(n: usize) -> Ipv4Addr {
        add(Ipv4Addr::new(10, 134, 0, 1), n)
    }

    /// The service that the one-endpoint change edits: a non-sampled one in the middle.
    pub fn changed_service(&self) -> usize {
        self.services / 2 + 1
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
                "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}],
            },
        })
    }

    fn slice_json(i: usize, endpoints: [(Ipv4Addr, &str); 2]) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(ip, node)| json!({"addresses": [ip.to_string()], "nodeName": node, "conditions": {"ready": true}}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-a", Self::name(i)),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": Self::name(i)},
            },
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        })
    }

    /// The endpoints of the changed service after `changes` one-endpoint changes.
    fn endpoints_after(&self, i: usize, changes: usize) -> [(Ipv4Addr, &'static str); 2] {
        let mut eps = self.endpoints(i);
        if changes > 0 && i == self.changed_service() {
            eps[1].0 = Self::changed_endpoint(changes);
        }
        eps
    }

    /// The initial state as the model reads it.
    pub fn cluster_state(&self) -> anyhow::Result<ClusterState> {
        let mut state = ClusterState::default();
        for i in 0..self.services {
            let svc: Service = serde_json::from_value(Self::service_json(i))?;
            state.apply(StateChange::ServiceApplied(Box::new(svc)));
            state.apply(self.slice_change(i, 0)?);
        }
        Ok(state)
    }

    /// The watch event of the `n`-th change of one endpoint of `changed_service()`.
    pub fn endpoint_change(&self, n: usize) -> anyhow::Result<StateChange> {
        self.slice_change(self.changed_service(), n)
    }

    /// The watch event that creates service `i`.
    pub fn service_change(i: usize) -> anyhow::Result<StateChange> {
        let svc: Service = serde_json::from_value(Self::service_json(i))?;
        Ok(StateChange::ServiceApplied(Box::new(svc)))
    }

    /// Services `range` and their slices as one JSON `kind: List` (a manifest file of a chunked directory).
    pub fn manifest_chunk(&self, range: std::ops::Range<usize>, changes: usize) -> String {
        let mut items = Vec::with_capacity(2 * range.len());
        for i in range {
            items.push(Self::service_json(i));
            items.push(Self::slice_json(i, self.endpoints_after(i, changes)));
        }
        serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
            .expect("serialising JSON values cannot fail")
    }

    /// Service `i` as the API server serves it.
    pub fn service_object(i: usize) -> anyhow::Result<Service> {
        Ok(serde_json::from_value(Self::service_json(i))?)
    }

    /// Service `i`'s EndpointSlice after `changes` one-endpoint changes, as the API server serves it.
    pub fn slice_object(&self, i: usize, changes: usize) -> anyhow::Result<EndpointSlice> {
        Ok(serde_json::from_value(Self::slice_json(i, self.endpoints_after(i, changes)))?)
    }

    /// Service `i`'s EndpointSlice with its second endpoint moved to the `n`-th
    /// changed address (churn: any service, any number of times).
    pub fn churned_slice(&self, i: usize, n: usize) -> anyhow::Result<EndpointSlice> {
        let mut eps = self.endpoints(i);
        eps[1].0 = Self::changed_endpoint(n);
        Ok(serde_json::from_value(Self::slice_json(i, eps))?)
    }

    /// The watch event that writes service `i`'s slice after `changes` one-endpoint changes.
    pub fn slice_change(&self, i: usize, changes: usize) -> anyhow::Result<StateChange> {
        let slice: EndpointSlice = serde_json::from_value(Self::slice_json(i, self.endpoints_after(i, changes)))?;
        Ok(StateChange::EndpointSliceApplied(Box::new(slice)))
    }
}
