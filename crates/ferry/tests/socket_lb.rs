//! Socket-level load balancing on the real kernel, in a lab of network
//! namespaces: one node running `ferry run`, a client pod and three backend
//! pods (two of them listed as endpoints). Needs root; never skipped.

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation, ServeOpts};
use libbpf_rs::MapCore;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const CLIENT: At = At::Pod(0, 0);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn manifests(backends: &[&str]) -> String {
    let v4: Vec<String> =
        backends.iter().map(|b| format!("- {{addresses: [10.244.0.{b}], nodeName: node-a}}")).collect();
    let v6: Vec<String> =
        backends.iter().map(|b| format!("- {{addresses: [\"fd00:244::{b}\"], nodeName: node-a}}")).collect();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v4, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
{}
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
endpoints:
{}
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{port: 80}}, {{name: dns, port: 53, protocol: UDP}}]
"#,
        if v4.is_empty() { "[]".to_string() } else { v4.join("\n") },
        if v6.is_empty() { "[]".to_string() } else { v6.join("\n") },
    )
}

/// A node with a client pod (.10) and backends be1..be3 (.21-.23) serving TCP 8080 and UDP 5353.
fn lab(echo_lines: bool) -> Lab {
    let mut lab = Lab::new("sock", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_pod(node, "client", &[ip("10.244.0.10"), ip("fd00:244::10")]).unwrap();
    for b in ["21", "22", "23"] {
        let p = lab
            .add_pod(node, &format!("be{b}"), &[ip(&format!("10.244.0.{b}")), ip(&format!("fd00:244::{b}"))])
            .unwrap();
        let listen = vec![
            Endpoint::tcp(sa(&format!("10.244.0.{b}:8080"))),
            Endpoint::udp(sa(&format!("10.244.0.{b}:5353"))),
            Endpoint::tcp(sa(&format!("[fd00:244::{b}]:8080"))),
        ];
        let mut opts = ServeOpts::new(&format!("be{b}"), listen);
        opts.echo_lines = echo_lines;
        lab.serve_with(At::Pod(node, p), opts).unwrap();
    }
    lab.write_node_config(
        node,
        "clusterCIDRs: [10.244.0.0/16, \"fd00:244::/48\"]\nserviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n",
    )
    .unwrap();
    lab.write_manifests(node, &manifests(&["21", "22"])).unwrap();
    lab.start_agent(node).unwrap();
    lab
}

fn servers(obs: &[Observation]) -> BTreeSet<String> {
    obs.iter().map(|o| o.reply().unwrap_or_else(|| panic!("expected a reply, got {o:?}")).server.clone()).collect()
}

fn tcp(target: &str) -> ConnectOpts {
    ConnectOpts::new(Endpoint::tcp(sa(target)))
}

fn udp(target: &str) -> ConnectOpts {
    ConnectOpts::new(Endpoint::udp(sa(target)))
}

#[test]
fn cluster_ip_tcp_and_udp_reach_only_listed_backends() {
    let lab = lab(false);
    let obs = lab.connect_many(CLIENT, &tcp("10.96.0.10:80"), 30).unwrap();
    assert_eq!(servers(&obs), BTreeSet::from(["be21".into(), "be22".into()]), "{}", lab.agent_log(0));
    for o in &obs {
        let r = o.reply().unwrap();
        assert_eq!(r.server_peer.ip(), ip("10.244.0.10"), "pod traffic to a ClusterIP is not masqueraded");
        assert_eq!(r.client_peer, sa("10.96.0.10:80"), "getpeername() shows the ClusterIP");
        assert_eq!(r.server_local.port(), 8080);
    }

    let obs = lab.connect_many(CLIENT, &udp("10.96.0.10:53"), 20).unwrap();
    assert!(servers(&obs).is_subset(&BTreeSet::from(["be21".into(), "be22".into()])));
    for o in &obs {
        assert_eq!(o.reply().unwrap().client_peer, sa("10.96.0.10:53"), "UDP replies come from the ClusterIP");
    }
    let mut connected = udp("10.96.0.10:53");
    connected.connected_udp = true;
    for o in lab.connect_many(CLIENT, &connected, 5).unwrap() {
        assert_eq!(o.reply().expect("reply").client_peer, sa("10.96.0.10:53"), "connected UDP: peer is the ClusterIP");
    }

    // Closed sockets leave no reverse translation behind (cgroup/sock_release):
    // only unconnected UDP sockets' entries stay, to age out of the LRU.
    let rev = libbpf_rs::MapHandle::from_pinned_path(lab.nodes[0].pin_dir.join("ferry_sock_rev")).unwrap();
    let left = rev.keys().count();
    assert!(left <= 20, "{left} reverse entries remain after 35 connected sockets and 20 unconnected ones closed");
    // Every socket's entry was counted in, every closed connected socket's
    // out, and what is left is what the map holds: nothing was evicted.
    let out = std::process::Command::new(FERRY)
        .args(["status", "--json", "--pin-dir"])
        .arg(&lab.nodes[0].pin_dir)
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ferry status --json");
    let c = |name: &str| s["counters"][name].as_u64().unwrap();
    assert_eq!(c("sock_rev_insert"), 55, "one entry per socket: 30 TCP, 20 unconnected and 5 connected UDP");
    assert_eq!(c("sock_rev_delete"), 35, "one per connected socket closed");
    assert_eq!(c("sock_rev_insert") - c("sock_rev_delete"), left as u64);
    assert_eq!(s["evictions"]["ferry_sock_rev"], 0, "{s}");

    // The node itself (host network namespace) uses the same ClusterIP.
    let obs = lab.connect_many(At::Node(0), &tcp("10.96.0.10:80"), 10).unwrap();
    assert!(servers(&obs).is_subset(&BTreeSet::from(["be21".into(), "be22".into()])));
}

#[test]
fn ipv6_cluster_ip_works() {
    let lab = lab(false);
    let obs = lab.connect_many(CLIENT, &tcp("[fd00:96::10]:80"), 20).unwrap();
    assert_eq!(servers(&obs), BTreeSet::from(["be21".into(), "be22".into()]), "{}", lab.agent_log(0));
    for o in &obs {
        let r = o.reply().unwrap();
        assert_eq!(r.client_peer, sa("[fd00:96::10]:80"));
        assert_eq!(r.server_peer.ip(), ip("fd00:244::10"));
    }
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    let lab = lab(false);
    for target in [tcp("10.96.0.20:80"), udp("10.96.0.20:53"), tcp("10.96.0.10:81")] {
        let o = lab.connect(CLIENT, &target).unwrap();
        assert!(matches!(&o, Observation::Refused { errno } if errno == "ECONNREFUSED"), "{target:?}: {o:?}");
    }
}

#[test]
fn removing_a_backend_stops_new_connections_to_it() {
    let lab = lab(false);
    lab.write_manifests(0, &manifests(&["21"])).unwrap();
    let moved = lab.wait_until(Duration::from_secs(10), |lab| {
        let obs = lab.connect_many(CLIENT, &tcp("10.96.0.10:80"), 10).unwrap();
        servers(&obs) == BTreeSet::from(["be21".into()])
    });
    assert!(moved, "traffic never left be22:\n{}", lab.agent_log(0));
    let obs = lab.connect_many(CLIENT, &tcp("10.96.0.10:80"), 30).unwrap();
    assert_eq!(servers(&obs), BTreeSet::from(["be21".into()]));
    // And a new backend gets traffic.
    lab.write_manifests(0, &manifests(&["21", "23"])).unwrap();
    let added = lab.wait_until(Duration::from_secs(10), |lab| {
        let obs = lab.connect_many(CLIENT, &tcp("10.96.0.10:80"), 20).unwrap();
        servers(&obs).contains("be23")
    });
    assert!(added, "be23 never got traffic");
}

#[test]
fn an_agent_restart_keeps_open_connections_and_new_ones_working() {
    let mut lab = lab(true);
    let held = lab.spawn_client(CLIENT, &tcp("10.96.0.10:80"), ConnectMode::KeepOpen(Duration::from_secs(4))).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.kill_agent(0).unwrap();
    // The datapath is pinned: with no agent at all, new connections still work.
    let obs = lab.connect_many(CLIENT, &tcp("10.96.0.10:80"), 5).unwrap();
    assert!(servers(&obs).is_subset(&BTreeSet::from(["be21".into(), "be22".into()])));
    lab.start_agent(0).unwrap();
    let obs = lab.connect_many(CLIENT, &tcp("10.96.0.10:80"), 10).unwrap();
    assert!(servers(&obs).is_subset(&BTreeSet::from(["be21".into(), "be22".into()])));
    let exchanges = lab.finish_client(held, Duration::from_secs(20)).unwrap();
    assert!(exchanges.len() >= 10, "the held connection made {} exchanges: {exchanges:?}", exchanges.len());
    assert!(exchanges.iter().all(|o| o.reply().is_some()), "the held connection broke: {exchanges:?}");
    assert_eq!(servers(&exchanges).len(), 1, "one connection, one backend");
    // The restarted agent adopted the datapath instead of rebuilding it.
    assert!(lab.agent_log(0).contains("adopted=true"), "{}", lab.agent_log(0));
}

#[test]
fn cleanup_removes_everything_ferry_installed() {
    let mut lab = lab(false);
    lab.kill_agent(0).unwrap();
    let pin = lab.nodes[0].pin_dir.clone();
    let out = std::process::Command::new(FERRY).args(["cleanup", "--pin-dir"]).arg(&pin).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!pin.exists(), "pin directory left behind");
    // Without the socket hooks the ClusterIP is just an unrouted address again.
    let o = lab.connect(CLIENT, &tcp("10.96.0.10:80")).unwrap();
    assert!(o.reply().is_none(), "{o:?}");
}
