//! Fixtures the real-maps tests of ferry-bpf share: one node's config and runtime.

use ferry_bpf::NodeRuntime;
use ferry_model::NodeConfig;

pub fn cfg() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        ..Default::default()
    }
}

pub fn rt() -> NodeRuntime {
    NodeRuntime { host_netns_cookie: 4242, nat_ports: (61000, 65535), ..Default::default() }
}
