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
//!
//! The stale-UDP rule past the seed (kubernetes/kubernetes#139629, #141371),
//! with a pod client to the ClusterIP and an outside client to the NodePort,
//! each sending from one fixed source port as a resolver or statsd does:
//!
//! - a Service that loses **all** its endpoints: after the sync no datagram
//!   reaches the old pod, the clients are refused (REJECT) instead. Before
//!   the rule changed, the kernel conntrack entry (nftables) and the BPF flow
//!   (NodePort on bpf) kept them on the old pod for as long as they sent.
//! - a Service deleted while a new one takes its ClusterIP and NodePort in the
//!   same batch: after the sync every answer comes from the new Service's pod.

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
    service(f, "dns", None, backend)
}

/// A UDP Service `name` on the family's ClusterIP, port 53 (and `node_port`), whose one
/// EndpointSlice lists pod `backend` on port 5353 (none: no endpoints).
fn service(f: &Family, name: &str, node_port: Option<u16>, backend: Option<&str>) -> String {
    let endpoints = match backend {
        Some(b) => format!("[{{addresses: [\"{}\"], nodeName: node-a}}]", (f.pod)(b)),
        None => "[]".into(),
    };
    let (kind, np) = match node_port {
        Some(p) => ("NodePort", format!(", nodePort: {p}")),
        None => ("ClusterIP", String::new()),
    };
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  type: {kind}
  clusterIP: "{ip}"
  clusterIPs: ["{ip}"]
  ipFamilies: [{fam}]
  ports: [{{name: dns, port: 53, protocol: UDP, targetPort: 5353{np}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}
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
    let mechanism = if datapath.starts_with("bpf") { "destroyed connected UDP sockets" } else { "conntrack" };
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

const NODE_PORT: u16 = 30053;
/// The source port both clients of the tests below send from, whatever socket they use.
const SOURCE_PORT: u16 = 40053;

/// The lab of the tests below: node-a running `datapath`, a client pod, pods be21 and be22
/// serving UDP 5353 (both stay up, whatever the Services say), an outside host (also the node's
/// default gateway), and the manifests `initial`.
fn udp_lab(datapath: &str, initial: &str) -> Lab {
    let mut lab = Lab::new("udp", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_pod(node, "client", &[ip(&(V4.pod)("10")), ip(&(V6.pod)("10"))]).unwrap();
    for b in ["21", "22"] {
        let ips = [ip(&(V4.pod)(b)), ip(&(V6.pod)(b))];
        let p = lab.add_pod(node, &format!("be{b}"), &ips).unwrap();
        let listen = ips.iter().map(|a| Endpoint::udp(SocketAddr::new(*a, 5353))).collect();
        lab.serve_with(At::Pod(node, p), ServeOpts::new(&format!("be{b}"), listen)).unwrap();
    }
    let outside = [ip("203.0.113.2"), ip("2001:db8::2")];
    lab.add_external("outside", &outside, node).unwrap();
    // As on a real node, a default route: without one, a datagram to a ClusterIP without
    // endpoints fails the node's routing (ICMP net unreachable) before the forward hook's REJECT.
    lab.set_default_route(node, &outside).unwrap();
    lab.write_node_config(
        node,
        &format!(
            "datapath: {datapath}\nclusterCIDRs: [10.244.0.0/16, \"fd00:244::/48\"]\n\
             serviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n"
        ),
    )
    .unwrap();
    lab.write_manifests(node, initial).unwrap();
    lab.start_agent(node).unwrap();
    lab
}

/// A pod client to the ClusterIP and an outside client to the NodePort on the node's primary
/// address: one connected UDP socket each (replaced when it fails, always bound to
/// `SOURCE_PORT`); run with `ConnectMode::UdpStream`, one datagram every 100 ms.
fn udp_clients(lab: &Lab, f: &Family) -> Vec<(&'static str, At, ConnectOpts)> {
    let node_ip = if f.address_type == "IPv4" {
        IpAddr::V4(lab.nodes[0].primary_v4)
    } else {
        IpAddr::V6(lab.nodes[0].primary_v6)
    };
    let targets = [
        ("pod to ClusterIP", CLIENT, SocketAddr::new(ip(f.cluster_ip), 53)),
        ("outside to NodePort", At::External(0), SocketAddr::new(node_ip, NODE_PORT)),
    ];
    targets
        .into_iter()
        .map(|(what, at, target)| {
            let mut opts = ConnectOpts::new(Endpoint::udp(target));
            opts.connected_udp = true;
            opts.source_port = Some(SOURCE_PORT);
            (what, at, opts)
        })
        .collect()
}

fn server(o: &Observation) -> Option<String> {
    o.reply().map(|r| r.server.clone())
}

fn summary(ticks: &[Observation]) -> Vec<String> {
    ticks.iter().map(|o| server(o).unwrap_or_else(|| format!("{o:?}").chars().take(40).collect())).collect()
}

/// The tick by which a sync that finished at `synced` had happened (the clients started a
/// little after `started`, so this is generous by their start-up time plus one tick).
fn tick_of(started: Instant, synced: Instant) -> usize {
    (synced.duration_since(started).as_millis() / TICK.as_millis()) as usize + 1
}

/// Every answer came from `SOURCE_PORT`: the clients really kept one source port.
fn assert_one_source_port(label: &str, ticks: &[Observation]) {
    for r in ticks.iter().filter_map(Observation::reply) {
        assert_eq!(r.client_local.port(), SOURCE_PORT, "{label}: an answer to another source port: {r:?}");
    }
}

fn last_endpoint_removed_while_udp_clients_keep_sending(datapath: &str, f: &Family) {
    let mut lab = udp_lab(datapath, &service(f, "dns", Some(NODE_PORT), Some("21")));
    let started = Instant::now();
    let clients: Vec<_> = udp_clients(&lab, f)
        .into_iter()
        .map(|(what, at, opts)| {
            (what, lab.spawn_client(at, &opts, ConnectMode::UdpStream(Duration::from_secs(5))).unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // The only pod is deleted; nothing replaces it. The pod itself stays up and keeps answering.
    let removed = apply(&lab, &service(f, "dns", Some(NODE_PORT), None));
    let synced_tick = tick_of(started, removed);
    for (what, client) in clients {
        let ticks = lab.finish_client(client, Duration::from_secs(30)).unwrap();
        let label = format!("{datapath} {} {what}", f.address_type);
        let summary = summary(&ticks);
        assert!(ticks.len() >= 40, "{label}: only {} ticks: {summary:?}", ticks.len());
        assert_one_source_port(&label, &ticks);
        assert!(
            ticks[..synced_tick.min(ticks.len())].iter().any(|o| server(o).as_deref() == Some("be21")),
            "{label}: be21 never answered before its removal: {summary:?}\n{}",
            lab.agent_log(0)
        );
        let after = &ticks[synced_tick.min(ticks.len())..];
        assert!(after.len() >= 20, "{label}: only {} ticks after the sync at ~{synced_tick}: {summary:?}", after.len());
        // Not one datagram sent after the sync reached the removed pod (or anyone else)...
        assert!(
            after.iter().all(|o| o.reply().is_none()),
            "{label}: answered after the sync at tick ~{synced_tick} left the Service without endpoints \
             (a stale flow): {summary:?}\n{}",
            lab.agent_log(0)
        );
        // ...and the client is told so: REJECT (ICMP port unreachable, or a refused connect on
        // socket-LB). The kernel rate-limits its ICMP errors, so some datagrams just go unanswered.
        let refused = after.iter().filter(|o| matches!(o, Observation::Refused { .. })).count();
        assert!(refused >= 1, "{label}: never refused after the sync: {summary:?}");
        eprintln!(
            "{label}: {} ticks, last be21 answer at tick {:?}, sync by tick {synced_tick}, {refused} of the {} \
             datagrams after it refused",
            ticks.len(),
            ticks.iter().rposition(|o| server(o).as_deref() == Some("be21")),
            after.len()
        );
    }
}

#[test]
fn bpf_udp_clients_are_refused_once_the_last_endpoint_is_gone() {
    last_endpoint_removed_while_udp_clients_keep_sending("bpf", &V4);
}

#[test]
fn bpf_udp_clients_are_refused_once_the_last_endpoint_is_gone_ipv6() {
    last_endpoint_removed_while_udp_clients_keep_sending("bpf", &V6);
}

#[test]
fn nftables_udp_clients_are_refused_once_the_last_endpoint_is_gone() {
    last_endpoint_removed_while_udp_clients_keep_sending("nftables", &V4);
}

#[test]
fn nftables_udp_clients_are_refused_once_the_last_endpoint_is_gone_ipv6() {
    last_endpoint_removed_while_udp_clients_keep_sending("nftables", &V6);
}

fn deleted_service_hands_its_cluster_ip_to_a_new_one(datapath: &str, f: &Family) {
    let mut lab = udp_lab(datapath, &service(f, "dns", Some(NODE_PORT), Some("21")));
    let started = Instant::now();
    let clients: Vec<_> = udp_clients(&lab, f)
        .into_iter()
        .map(|(what, at, opts)| {
            (what, lab.spawn_client(at, &opts, ConnectMode::UdpStream(Duration::from_secs(5))).unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // One batch: Service dns (and its slice) deleted, Service resolver created on the same
    // ClusterIP and NodePort, served by be22.
    let handed_over = apply(&lab, &service(f, "resolver", Some(NODE_PORT), Some("22")));
    let synced_tick = tick_of(started, handed_over);
    for (what, client) in clients {
        let ticks = lab.finish_client(client, Duration::from_secs(30)).unwrap();
        let label = format!("{datapath} {} {what}", f.address_type);
        let summary = summary(&ticks);
        assert!(ticks.len() >= 40, "{label}: only {} ticks: {summary:?}", ticks.len());
        assert_one_source_port(&label, &ticks);
        let last_old = ticks.iter().rposition(|o| server(o).as_deref() == Some("be21"));
        let first_new = ticks.iter().position(|o| server(o).as_deref() == Some("be22"));
        let (Some(last_old), Some(first_new)) = (last_old, first_new) else {
            panic!("{label}: the client never moved from be21 to be22: {summary:?}\n{}", lab.agent_log(0));
        };
        assert!(
            last_old < synced_tick,
            "{label}: the deleted Service's pod be21 still answered at tick {last_old}, after the sync at tick \
             ~{synced_tick}: {summary:?}\n{}",
            lab.agent_log(0)
        );
        assert!(last_old < first_new, "{label}: be21 answered after be22 did: {summary:?}");
        // From the move on, every answer is be22's and most datagrams get one (an answer has
        // 100 ms, so a loaded machine may miss a few).
        let tail = &ticks[first_new..];
        assert!(
            tail.iter().filter_map(server).all(|s| s == "be22"),
            "{label}: after be22 someone else answered: {summary:?}"
        );
        let answered = tail.iter().filter(|o| o.reply().is_some()).count();
        assert!(
            answered * 10 >= tail.len() * 8,
            "{label}: after moving to be22 the client kept losing answers: {summary:?}"
        );
        eprintln!(
            "{label}: {} ticks, last be21 answer at tick {last_old}, sync by tick {synced_tick}, first be22 answer \
             at tick {first_new}",
            ticks.len()
        );
    }
}

#[test]
fn bpf_udp_clients_follow_a_cluster_ip_handed_to_a_new_service() {
    deleted_service_hands_its_cluster_ip_to_a_new_one("bpf", &V4);
}

#[test]
fn nftables_udp_clients_follow_a_cluster_ip_handed_to_a_new_service() {
    deleted_service_hands_its_cluster_ip_to_a_new_one("nftables", &V4);
}

/// A backend removed while no agent ran: the client's connected UDP socket
/// still points at it (the removed pod keeps answering), and the restarted
/// agent's first full sync compares the adopted maps' backends with the Plan
/// and destroys the socket, so the client's reconnect reaches the new backend.
#[test]
fn bpf_udp_client_moves_off_a_backend_removed_while_the_agent_was_down() {
    let f = &V4;
    let mut lab = Lab::new("udpout", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_pod(node, "client", &[ip(&(f.pod)("10"))]).unwrap();
    for b in ["21", "22"] {
        let p = lab.add_pod(node, &format!("be{b}"), &[ip(&(f.pod)(b))]).unwrap();
        let addr = SocketAddr::new(ip(&(f.pod)(b)), 5353);
        lab.serve_with(At::Pod(node, p), ServeOpts::new(&format!("be{b}"), vec![Endpoint::udp(addr)])).unwrap();
    }
    lab.write_node_config(node, "datapath: bpf\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\n")
        .unwrap();
    lab.write_manifests(node, &manifests(f, Some("21"))).unwrap();
    lab.start_agent(node).unwrap();

    let mut opts = ConnectOpts::new(Endpoint::udp(f.target.parse().unwrap()));
    opts.connected_udp = true;
    let client = lab.spawn_client(CLIENT, &opts, ConnectMode::UdpStream(Duration::from_secs(5))).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    lab.kill_agent(node).unwrap();
    lab.write_manifests(node, &manifests(f, Some("22"))).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent(node).unwrap();
    let ticks = lab.finish_client(client, Duration::from_secs(30)).unwrap();

    let server = |o: &Observation| o.reply().map(|r| r.server.clone());
    let summary: Vec<String> =
        ticks.iter().map(|o| server(o).unwrap_or_else(|| format!("{o:?}").chars().take(40).collect())).collect();
    let last_old = ticks.iter().rposition(|o| server(o).as_deref() == Some("be21"));
    let first_new = ticks.iter().position(|o| server(o).as_deref() == Some("be22"));
    let (Some(last_old), Some(first_new)) = (last_old, first_new) else {
        panic!("the client never moved from be21 to be22: {summary:?}\n{}", lab.agent_log(0));
    };
    assert!(last_old < first_new, "be21 answered after be22 did: {summary:?}");
    assert!(
        ticks[first_new..].iter().filter_map(server).all(|s| s == "be22"),
        "after be22 someone else answered: {summary:?}"
    );
    let log = lab.agent_log(0);
    assert!(log.contains("adopted=true"), "the restarted agent did not adopt the datapath:\n{log}");
    assert!(log.contains("destroyed connected UDP sockets"), "no socket was destroyed:\n{log}");
    eprintln!("agent down and restarted: last answer from be21 at tick {last_old}, first from be22 at {first_new}");
}
