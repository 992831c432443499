//! No UDP flow stays stuck on a removed backend, on either datapath: a client
//! pod sends to a ClusterIP once every 100 ms on one connected UDP socket
//! while its only backend is deleted and replaced. The removed backend keeps
//! answering (a terminating pod that is still up, the worst case), so a flow
//! still pinned to it would show. Needs root; never skipped.
//!
//! - bpf: socket-LB connected the socket to the backend; ferry destroys it
//!   (bpf_sock_destroy) and the client's reconnect picks the new backend.
//! - nftables: the kernel conntrack entry DNATs to the old backend; the
//!   conntrack reconciler deletes it and the next datagram is DNATed anew.

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation, ServeOpts};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const CLIENT: At = At::Pod(0, 0);
const TICK: Duration = Duration::from_millis(100);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Addresses of one IP family in the lab.
struct Family {
    pod: fn(&str) -> String,
    cluster_ip: &'static str,
    address_type: &'static str,
    target: &'static str,
}

const V4: Family = Family {
    pod: |n| format!("10.244.0.{n}"),
    cluster_ip: "10.96.0.10",
    address_type: "IPv4",
    target: "10.96.0.10:53",
};
const V6: Family = Family {
    pod: |n| format!("fd00:244::{n}"),
    cluster_ip: "fd00:96::10",
    address_type: "IPv6",
    target: "[fd00:96::10]:53",
};

fn manifests(f: &Family, backend: Option<&str>) -> String {
    let endpoints = match backend {
        Some(b) => format!("[{{addresses: [\"{}\"], nodeName: node-a}}]", (f.pod)(b)),
        None => "[]".into(),
    };
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: demo}}
spec:
  clusterIP: "{ip}"
  clusterIPs: ["{ip}"]
  ipFamilies: [{fam}]
  ports: [{{name: dns, port: 53, protocol: UDP, targetPort: 5353}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-1, namespace: demo, labels: {{kubernetes.io/service-name: dns}}}}
addressType: {fam}
endpoints: {endpoints}
ports: [{{name: dns, port: 5353, protocol: UDP}}]
"#,
        ip = f.cluster_ip,
        fam = f.address_type,
    )
}

fn syncs(lab: &Lab) -> usize {
    lab.agent_log(0).matches(" synced ").count()
}

/// Writes `yaml` and waits until the agent logged one more sync; returns when that was.
fn apply(lab: &Lab, yaml: &str) -> Instant {
    let before = syncs(lab);
    lab.write_manifests(0, yaml).unwrap();
    assert!(
        lab.wait_until(Duration::from_secs(10), |lab| syncs(lab) > before),
        "the agent did not sync the change:\n{}",
        lab.agent_log(0)
    );
    Instant::now()
}

fn backend_replaced_while_a_udp_client_keeps_sending(datapath: &str, f: &Family) {
    let mut lab = Lab::new("udp", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_pod(node, "client", &[ip(&(V4.pod)("10")), ip(&(V6.pod)("10"))]).unwrap();
    for b in ["21", "22"] {
        let p = lab.add_pod(node, &format!("be{b}"), &[ip(&(V4.pod)(b)), ip(&(V6.pod)(b))]).unwrap();
        let addr = SocketAddr::new(ip(&(f.pod)(b)), 5353);
        lab.serve_with(At::Pod(node, p), ServeOpts::new(&format!("be{b}"), vec![Endpoint::udp(addr)])).unwrap();
    }
    lab.write_node_config(
        node,
        &format!(
            "datapath: {datapath}\nclusterCIDRs: [10.244.0.0/16, \"fd00:244::/48\"]\n\
             serviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n"
        ),
    )
    .unwrap();
    lab.write_manifests(node, &manifests(f, Some("21"))).unwrap();
    lab.start_agent(node).unwrap();

    let mut opts = ConnectOpts::new(Endpoint::udp(f.target.parse().unwrap()));
    opts.connected_udp = true;
    let started = Instant::now();
    let client = lab.spawn_client(CLIENT, &opts, ConnectMode::UdpStream(Duration::from_secs(6))).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The pod is deleted (no endpoints for a moment), then its replacement is ready.
    apply(&lab, &manifests(f, None));
    std::thread::sleep(Duration::from_millis(300));
    let replaced = apply(&lab, &manifests(f, Some("22")));
    let ticks = lab.finish_client(client, Duration::from_secs(30)).unwrap();

    let server = |o: &Observation| o.reply().map(|r| r.server.clone());
    let last_old = ticks.iter().rposition(|o| server(o).as_deref() == Some("be21"));
    let first_new = ticks.iter().position(|o| server(o).as_deref() == Some("be22"));
    let summary: Vec<String> =
        ticks.iter().map(|o| server(o).unwrap_or_else(|| format!("{o:?}").chars().take(40).collect())).collect();
    let (Some(last_old), Some(first_new)) = (last_old, first_new) else {
        panic!("{datapath}: the client never moved from be21 to be22: {summary:?}\n{}", lab.agent_log(0));
    };
    let gap = TICK * (first_new - last_old) as u32;
    let datapath = format!("{datapath} {}", f.address_type);
    eprintln!(
        "{datapath}: {} ticks; last answer from the removed backend at tick {last_old}, first from its \
         replacement at tick {first_new}: the client went {} ms without an answer",
        ticks.len(),
        gap.as_millis()
    );
    // The sync that added the replacement happened by this tick (the client started a little after
    // `started`, so this is generous by its start-up time plus one tick).
    let synced_tick = (replaced.duration_since(started).as_millis() / TICK.as_millis()) as usize + 1;
    assert!(
        last_old <= synced_tick,
        "{datapath}: be21 still answered at tick {last_old}, after the sync at tick ~{synced_tick}: {summary:?}"
    );
    assert!(last_old < first_new, "{datapath}: be21 answered after be22 did: {summary:?}");
    // After the move the client stays on be22. A tick may time out on a loaded machine (its
    // answer has 100 ms), so a few misses are tolerated, but every answer is be22's.
    let tail = &ticks[first_new..];
    let answered = tail.iter().filter(|o| server(o).as_deref() == Some("be22")).count();
    assert!(
        answered * 10 >= tail.len() * 8,
        "{datapath}: after moving to be22 the client kept losing answers: {summary:?}"
    );
    assert!(
        tail.iter().filter_map(server).all(|s| s == "be22"),
        "{datapath}: after be22 someone else answered: {summary:?}"
    );
    assert!(ticks.len() >= 50, "{datapath}: only {} ticks: {summary:?}", ticks.len());
    let mechanism = if datapath == "bpf" { "destroyed connected UDP sockets" } else { "conntrack" };
    assert!(
        lab.agent_log(0).contains(mechanism),
        "{datapath}: the agent never said {mechanism:?}:\n{}",
        lab.agent_log(0)
    );
}

#[test]
fn bpf_udp_client_moves_off_a_removed_backend() {
    backend_replaced_while_a_udp_client_keeps_sending("bpf", &V4);
}

#[test]
fn bpf_udp_client_moves_off_a_removed_backend_ipv6() {
    backend_replaced_while_a_udp_client_keeps_sending("bpf", &V6);
}

#[test]
fn nftables_udp_client_moves_off_a_removed_backend() {
    backend_replaced_while_a_udp_client_keeps_sending("nftables", &V4);
}

#[test]
fn nftables_udp_client_moves_off_a_removed_backend_ipv6() {
    backend_replaced_while_a_udp_client_keeps_sending("nftables", &V6);
}
