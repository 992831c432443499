//! Per-packet load balancing on the real kernel, in a two-node lab: NodePort,
//! LoadBalancer IPs, traffic policies, source ranges, session affinity, REJECT,
//! hairpin and an agent restart, seen from a client outside the cluster.
//!
//! ```text
//!  client (203.0.113.10/.11, 2001:db8::10/::11) ──┐        default route: node-a
//!  outside server (203.0.113.50, 2001:db8::50) ───┤ fabric
//!  node-a 192.168.50.10 fd00:50::a eth0 ──────────┤        LB IPs 198.18.0.<n> / fd00:198::<n> are
//!  node-b 192.168.50.11 fd00:50::b eth0 ──────────┘        routed by the client to node-a
//!   br0: pods 10.244.1.<n> / fd00:244:1::<n> on node-a, 10.244.2.<n> / fd00:244:2::<n> on node-b
//! ```
//!
//! Both nodes run `ferry run` with the same manifests and `bpf.devices: [eth0]`,
//! `bpf.podDevices: [br0]`. What the endpoint saw decides: which pod answered
//! (`server`), the source it saw (`server_peer`: client address kept, or SNAT to
//! a node), and whether the client saw the reply come from the frontend it
//! dialled (`client_peer`: reverse translation). Drops are checked against the
//! datapath counter of their reason (`ferry status --json`). Needs root; never
//! skipped.

use ferry::lab::{At, BackgroundClient, Lab};
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation, Proto, ServeOpts};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const NODE_A: usize = 0;
const NODE_B: usize = 1;
/// The outside client host (external 0); the outside server is external 1.
const CLIENT: At = At::External(0);
/// How long silence must last to count as a drop.
const SILENCE: Duration = Duration::from_millis(1500);
/// Every port a pod serves: TCP 8080 and UDP 5353, both families.
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

const FAMILIES: [Fam; 2] = [Fam::V4, Fam::V6];
const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("{s:?} is not an address"))
}

fn pick(fam: Fam, v4: String, v6: String) -> IpAddr {
    ip(&if fam == Fam::V4 { v4 } else { v6 })
}

/// The outside client's address `k` (0 or 1) of a family.
fn client_ip(k: u8, fam: Fam) -> IpAddr {
    pick(fam, format!("203.0.113.{}", 10 + k), format!("2001:db8::{}", 10 + k))
}

/// A pod's address: pod `n` of node `node`.
fn pod_ip(node: usize, n: u8, fam: Fam) -> IpAddr {
    pick(fam, format!("10.244.{}.{n}", node + 1), format!("fd00:244:{}::{n}", node + 1))
}

fn cluster_ip(n: u8, fam: Fam) -> IpAddr {
    pick(fam, format!("10.96.0.{n}"), format!("fd00:96::{n}"))
}

fn lb_ip(n: u8, fam: Fam) -> IpAddr {
    pick(fam, format!("198.18.0.{n}"), format!("fd00:198::{n}"))
}

/// The service port of a protocol: TCP 80 (-> 8080), UDP 53 (-> 5353).
fn service_port(proto: Proto) -> u16 {
    if proto == Proto::Tcp { 80 } else { 53 }
}

/// The port pods serve a protocol on.
fn target_port(proto: Proto) -> u16 {
    if proto == Proto::Tcp { TCP_TARGET } else { UDP_TARGET }
}

/// Service `n`'s NodePort of a protocol: 30<n>0 for TCP, 30<n>1 for UDP.
fn node_port(n: u8, proto: Proto) -> u16 {
    30000 + 10 * u16::from(n) + u16::from(proto == Proto::Udp)
}

fn node_ip(lab: &Lab, node: usize, fam: Fam) -> IpAddr {
    let n = &lab.nodes[node];
    if fam == Fam::V4 { IpAddr::V4(n.primary_v4) } else { IpAddr::V6(n.primary_v6) }
}

/// A pod of the lab: pod `n` on node `node`, named `a<n>` / `b<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PodRef {
    node: usize,
    n: u8,
}

const fn on_a(n: u8) -> PodRef {
    PodRef { node: NODE_A, n }
}

const fn on_b(n: u8) -> PodRef {
    PodRef { node: NODE_B, n }
}

impl PodRef {
    fn name(self) -> String {
        format!("{}{}", if self.node == NODE_A { "a" } else { "b" }, self.n)
    }

    fn ip(self, fam: Fam) -> IpAddr {
        pod_ip(self.node, self.n, fam)
    }
}

/// One dual-stack service of the test cluster: ClusterIP 10.96.0.<n> / fd00:96::<n>,
/// TCP 80 -> 8080 and UDP 53 -> 5353; NodePorts and LB ingress IPs for the types that have them.
struct Svc {
    name: &'static str,
    n: u8,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    kind: &'static str,
    /// More `spec` keys, one per line, without indentation.
    spec: &'static str,
    endpoints: Vec<PodRef>,
}

impl Svc {
    fn yaml(&self) -> String {
        let (name, n) = (self.name, self.n);
        let node_ports = self.kind != "ClusterIP";
        let port = |p: Proto| -> String {
            let (pname, proto, target) =
                if p == Proto::Tcp { ("http", "TCP", TCP_TARGET) } else { ("dns", "UDP", UDP_TARGET) };
            let np = if node_ports { format!(", nodePort: {}", node_port(n, p)) } else { String::new() };
            format!("  - {{name: {pname}, port: {}, protocol: {proto}, targetPort: {target}{np}}}", service_port(p))
        };
        let spec: String = self.spec.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("  {l}\n")).collect();
        let status = if self.kind == "LoadBalancer" {
            format!(
                "status:\n  loadBalancer:\n    ingress: [{{ip: {}}}, {{ip: \"{}\"}}]\n",
                lb_ip(n, Fam::V4),
                lb_ip(n, Fam::V6)
            )
        } else {
            String::new()
        };
        let mut out = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  type: {}\n  \
             clusterIP: {}\n  clusterIPs: [{}, \"{}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  \
             ports:\n{}\n{}\n{spec}{status}",
            self.kind,
            cluster_ip(n, Fam::V4),
            cluster_ip(n, Fam::V4),
            cluster_ip(n, Fam::V6),
            port(Proto::Tcp),
            port(Proto::Udp),
        );
        for (fam, family) in [(Fam::V4, "IPv4"), (Fam::V6, "IPv6")] {
            let eps: Vec<String> = self
                .endpoints
                .iter()
                .map(|p| {
                    format!(
                        "- {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: true}}}}",
                        p.ip(fam),
                        if p.node == NODE_A { "node-a" } else { "node-b" }
                    )
                })
                .collect();
            out.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{}, namespace: test, \
                 labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nendpoints:{}\nports: [{{name: \
                 http, port: {TCP_TARGET}, protocol: TCP}}, {{name: dns, port: {UDP_TARGET}, protocol: UDP}}]\n",
                family.to_lowercase(),
                if eps.is_empty() { " []".to_string() } else { format!("\n{}", eps.join("\n")) },
            ));
        }
        out
    }
}

/// The two-node lab with its agents running, and where each pod lives.
struct Cluster {
    lab: Lab,
    pods: BTreeMap<PodRef, At>,
}

/// Node config: the lab's addresses and pins, pod and service ranges, and the per-packet programs on
/// eth0 (uplink) and br0 (pods). Written whole: `Lab::write_node_config` cannot add keys under `bpf`.
fn node_config(lab: &Lab, node: usize) -> String {
    let n = &lab.nodes[node];
    let ips: Vec<String> = lab.node_ips(node).iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "nodeName: {}\nnodeIPs: [{}]\nprimaryIPs: [\"{}\", \"{}\"]\nclusterCIDRs: [10.244.0.0/16, \"fd00:244::/32\"]\n\
         serviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\nbpf:\n  pinPath: {}\n  cgroupPath: {}\n  devices: [eth0]\n  \
         podDevices: [br0]\n",
        n.name,
        ips.join(", "),
        n.primary_v4,
        n.primary_v6,
        n.pin_dir.display(),
        n.cgroup.display()
    )
}

/// Builds the lab: node-a, node-b, the outside client and server, `pods` (each serving TCP 8080
/// and UDP 5353 on both of its addresses, answering every line), then both agents with `services`.
fn cluster(tag: &str, pods: &[PodRef], services: &[Svc]) -> Cluster {
    let mut lab = Lab::new(tag, FERRY.as_ref()).expect("creating the lab");
    let a = lab.add_node("node-a").unwrap();
    let b = lab.add_node("node-b").unwrap();
    assert_eq!((a, b), (NODE_A, NODE_B));
    let client: Vec<IpAddr> = [0, 1].iter().flat_map(|k| FAMILIES.map(|f| client_ip(*k, f))).collect();
    lab.add_external("client", &client, NODE_A).unwrap();
    let outside = [ip("203.0.113.50"), ip("2001:db8::50")];
    let o = lab.add_external("outside", &outside, NODE_A).unwrap();
    let listen = |ips: &[IpAddr]| -> Vec<Endpoint> {
        ips.iter()
            .flat_map(|ip| {
                [Endpoint::tcp(SocketAddr::new(*ip, TCP_TARGET)), Endpoint::udp(SocketAddr::new(*ip, UDP_TARGET))]
            })
            .collect()
    };
    lab.serve(At::External(o), "outside", listen(&outside)).unwrap();

    let mut at = BTreeMap::new();
    for p in pods {
        let ips = FAMILIES.map(|f| p.ip(f));
        let j = lab.add_pod(p.node, &p.name(), &ips).unwrap();
        let mut opts = ServeOpts::new(&p.name(), listen(&ips));
        opts.echo_lines = true;
        lab.serve_with(At::Pod(p.node, j), opts).unwrap();
        at.insert(*p, At::Pod(p.node, j));
    }
    let manifests: String = services.iter().map(Svc::yaml).collect();
    for node in [NODE_A, NODE_B] {
        std::fs::write(&lab.nodes[node].config, node_config(&lab, node)).unwrap();
        lab.write_manifests(node, &manifests).unwrap();
        lab.start_agent(node).unwrap_or_else(|e| panic!("starting the agent of node {node}: {e:#}"));
    }
    Cluster { lab, pods: at }
}

/// Connection options: `proto` to `target`, bound to `bind` when given.
fn opts(proto: Proto, target: SocketAddr, bind: Option<IpAddr>) -> ConnectOpts {
    let mut o = ConnectOpts::new(Endpoint { addr: target, proto });
    o.bind = bind;
    o
}

/// What a node's datapath counted so far (`ferry status --json`).
fn counters(lab: &Lab, node: usize) -> BTreeMap<String, u64> {
    lab.counters(node).unwrap_or_else(|e| panic!("reading node {node}'s counters: {e:#}"))
}

fn counter(lab: &Lab, node: usize, name: &str) -> u64 {
    *counters(lab, node).get(name).unwrap_or_else(|| panic!("ferry status has no counter {name}"))
}

/// Everything useful when a flow went wrong on a node: counters, routes, the agent's log.
fn diag(lab: &Lab, node: usize) -> String {
    let routes4 = lab.ip(At::Node(node), &["-4", "route"]).unwrap_or_default();
    let routes6 = lab.ip(At::Node(node), &["-6", "route"]).unwrap_or_default();
    format!(
        "--- node {} counters: {:?}\n--- routes:\n{routes4}{routes6}--- agent log:\n{}",
        lab.nodes[node].name,
        counters(lab, node),
        lab.agent_log(node)
    )
}

/// The reply of an attempt that must have been answered.
fn answered<'a>(o: &'a Observation, what: &str, lab: &Lab) -> &'a ferry_sandbox::probe::Reply {
    o.reply()
        .unwrap_or_else(|| panic!("{what}: expected a reply, got {o:?}\n{}\n{}", diag(lab, NODE_A), diag(lab, NODE_B)))
}

fn tcp_and_udp_on_both_families() -> impl Iterator<Item = (Fam, Proto)> {
    FAMILIES.into_iter().flat_map(|f| PROTOS.map(|p| (f, p)))
}

#[test]
fn etp_local_preserves_the_client_ip() {
    let ep = on_a(21);
    let c = cluster(
        "pketpl",
        &[ep, on_b(21)],
        &[Svc { name: "local", n: 1, kind: "LoadBalancer", spec: "externalTrafficPolicy: Local", endpoints: vec![ep] }],
    );
    let lab = &c.lab;
    for (fam, proto) in tcp_and_udp_on_both_families() {
        let client = client_ip(0, fam);
        let frontends = [
            SocketAddr::new(node_ip(lab, NODE_A, fam), node_port(1, proto)),
            SocketAddr::new(lb_ip(1, fam), service_port(proto)),
        ];
        for fe in frontends {
            let what = format!("{client} -> {fe}/{proto}");
            let o = lab.connect(CLIENT, &opts(proto, fe, Some(client))).unwrap();
            let r = answered(&o, &what, lab);
            assert_eq!(r.server, ep.name(), "{what}: the only endpoint answers");
            assert_eq!(r.server_local, SocketAddr::new(ep.ip(fam), target_port(proto)), "{what}: DNAT to the endpoint");
            assert_eq!(r.server_peer.ip(), client, "{what}: externalTrafficPolicy=Local keeps the client's address");
            assert_eq!(r.client_peer, fe, "{what}: the reply comes from the frontend");
        }
    }

    // node-b has no local endpoint: its NodePort drops (kube-proxy: DROP, not REJECT).
    for (fam, proto) in tcp_and_udp_on_both_families() {
        let before = counter(lab, NODE_B, "drop_no_endpoint");
        let fe = SocketAddr::new(node_ip(lab, NODE_B, fam), node_port(1, proto));
        let mut o = opts(proto, fe, Some(client_ip(0, fam)));
        o.timeout = SILENCE;
        let got = lab.connect(CLIENT, &o).unwrap();
        assert!(matches!(got, Observation::Timeout { .. }), "{fe}/{proto} via node-b: expected a drop, got {got:?}");
        let after = counter(lab, NODE_B, "drop_no_endpoint");
        assert!(after > before, "{fe}/{proto}: dropped, but not counted as drop_no_endpoint\n{}", diag(lab, NODE_B));
    }
}

#[test]
fn etp_cluster_snats_to_the_node_for_remote_backends() {
    let ep = on_b(21);
    let c = cluster(
        "pketpc",
        &[on_a(21), ep],
        &[Svc {
            name: "remote",
            n: 2,
            kind: "LoadBalancer",
            spec: "externalTrafficPolicy: Cluster",
            endpoints: vec![ep],
        }],
    );
    let lab = &c.lab;
    let new_flows = counter(lab, NODE_A, "pkt_new_flow");
    for (fam, proto) in tcp_and_udp_on_both_families() {
        let client = client_ip(0, fam);
        let frontends = [
            SocketAddr::new(node_ip(lab, NODE_A, fam), node_port(2, proto)),
            SocketAddr::new(lb_ip(2, fam), service_port(proto)),
        ];
        for fe in frontends {
            let what = format!("{client} -> {fe}/{proto}");
            let o = lab.connect(CLIENT, &opts(proto, fe, Some(client))).unwrap();
            let r = answered(&o, &what, lab);
            assert_eq!(r.server, ep.name(), "{what}: the only endpoint (on node-b) answers");
            assert_eq!(
                r.server_peer.ip(),
                node_ip(lab, NODE_A, fam),
                "{what}: a remote endpoint sees the connection SNATed to node-a"
            );
            assert_eq!(r.client_peer, fe, "{what}: the reply comes from the frontend");
        }
    }
    assert!(counter(lab, NODE_A, "pkt_new_flow") >= new_flows + 8, "{}", diag(lab, NODE_A));
}

#[test]
fn load_balancer_source_ranges_block_outsiders() {
    let eps = [on_a(21), on_b(21)];
    let c = cluster(
        "pkfw",
        &eps,
        &[Svc {
            name: "fw",
            n: 3,
            kind: "LoadBalancer",
            spec: "loadBalancerSourceRanges: [203.0.113.10/32, \"2001:db8::10/128\"]",
            endpoints: eps.to_vec(),
        }],
    );
    let lab = &c.lab;
    let names: BTreeSet<String> = eps.iter().map(|p| p.name()).collect();
    for (fam, proto) in tcp_and_udp_on_both_families() {
        let (allowed, other) = (client_ip(0, fam), client_ip(1, fam));
        let lb = SocketAddr::new(lb_ip(3, fam), service_port(proto));
        let o = lab.connect(CLIENT, &opts(proto, lb, Some(allowed))).unwrap();
        let r = answered(&o, &format!("{allowed} -> {lb}/{proto} (in range)"), lab);
        assert!(names.contains(&r.server), "{r:?}");
        assert_eq!(r.client_peer, lb);

        let before = counter(lab, NODE_A, "drop_firewall");
        let mut blocked = opts(proto, lb, Some(other));
        blocked.timeout = SILENCE;
        let got = lab.connect(CLIENT, &blocked).unwrap();
        assert!(matches!(got, Observation::Timeout { .. }), "{other} -> {lb}/{proto} (out of range): {got:?}");
        let after = counter(lab, NODE_A, "drop_firewall");
        assert!(after > before, "{other} -> {lb}/{proto}: dropped, but not counted as drop_firewall\n{}", diag(lab, 0));

        // Source ranges guard the load balancer only: the NodePort stays open to everyone (kube-proxy).
        let np = SocketAddr::new(node_ip(lab, NODE_A, fam), node_port(3, proto));
        for client in [allowed, other] {
            let o = lab.connect(CLIENT, &opts(proto, np, Some(client))).unwrap();
            let r = answered(&o, &format!("{client} -> {np}/{proto} (NodePort)"), lab);
            assert!(names.contains(&r.server), "{r:?}");
            assert_eq!(r.client_peer, np);
        }
    }
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let eps = [on_a(21), on_a(22), on_b(21), on_b(22)];
    let c = cluster(
        "pkaff",
        &eps,
        &[Svc {
            name: "sticky",
            n: 4,
            kind: "LoadBalancer",
            spec: "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}",
            endpoints: eps.to_vec(),
        }],
    );
    let lab = &c.lab;
    let names: BTreeSet<String> = eps.iter().map(|p| p.name()).collect();
    let hits = counter(lab, NODE_A, "affinity_hit");
    let new_flows = counter(lab, NODE_A, "pkt_new_flow");
    let inserts = counter(lab, NODE_A, "affinity_insert");
    let mut chosen = Vec::new();
    for (fam, proto) in tcp_and_udp_on_both_families() {
        for k in [0, 1] {
            let client = client_ip(k, fam);
            let lb = SocketAddr::new(lb_ip(4, fam), service_port(proto));
            let obs = lab.connect_many(CLIENT, &opts(proto, lb, Some(client)), 20).unwrap();
            let what = format!("{client} -> {lb}/{proto}");
            let servers: BTreeSet<String> = obs.iter().map(|o| answered(o, &what, lab).server.clone()).collect();
            assert_eq!(servers.len(), 1, "{what}: 20 connections of one client reached {servers:?}");
            let server = servers.into_iter().next().unwrap();
            assert!(names.contains(&server), "{what}: {server}");
            chosen.push(format!("{}/{proto}: {server}", client_ip(k, fam)));
        }
    }
    // 8 clients (address x protocol x family) made 20 connections each: every new flow but each
    // client's first was an affinity hit. (A UDP client that happens to reuse a source port within
    // the flow's lifetime continues its existing flow instead: no new flow, no affinity lookup.)
    let hits = counter(lab, NODE_A, "affinity_hit") - hits;
    let new_flows = counter(lab, NODE_A, "pkt_new_flow") - new_flows;
    // One ferry_affinity entry per (client address, service port): 2 addresses x 4 service ports.
    let inserts = counter(lab, NODE_A, "affinity_insert") - inserts;
    assert_eq!(inserts, 8, "ferry_affinity entries written\n{}", diag(lab, NODE_A));
    assert!(new_flows >= 8 * 19, "only {new_flows} new flows for 160 connections\n{}", diag(lab, NODE_A));
    assert!(
        hits + 8 >= new_flows,
        "affinity_hit grew by {hits} for {new_flows} new flows of 8 clients\n{}",
        diag(lab, NODE_A)
    );
    // Affinity pins a client, not the service: 8 independent first picks out of 4 endpoints all
    // landing on one endpoint has a probability of 4^-7.
    let distinct: BTreeSet<&str> = chosen.iter().map(|c| c.rsplit(' ').next().unwrap()).collect();
    assert!(distinct.len() >= 2, "every client was pinned to the same endpoint: {chosen:?}");
}

/// A TCP connection held open in the background, one exchange every 100 ms
/// for `hold`; its observations are read while it runs (`BackgroundClient::observed`).
fn hold_open(lab: &mut Lab, at: At, opts: &ConnectOpts, hold: Duration) -> BackgroundClient {
    lab.spawn_client(at, opts, ConnectMode::KeepOpen(hold)).unwrap()
}

#[test]
fn established_tcp_flows_survive_an_agent_restart() {
    let ep = on_b(21);
    let mut c = cluster(
        "pkrst",
        &[on_a(21), ep],
        &[Svc { name: "steady", n: 5, kind: "NodePort", spec: "", endpoints: vec![ep] }],
    );
    let lab = &mut c.lab;
    let client = client_ip(0, Fam::V4);
    let np = SocketAddr::new(node_ip(lab, NODE_A, Fam::V4), node_port(5, Proto::Tcp));
    let target = opts(Proto::Tcp, np, Some(client));
    let new_connections_work = |lab: &Lab, when: &str| {
        for o in lab.connect_many(CLIENT, &target, 5).unwrap() {
            let r = answered(&o, &format!("a new connection {when}"), lab);
            assert_eq!(r.server, ep.name());
            assert_eq!(r.server_peer.ip(), node_ip(lab, NODE_A, Fam::V4), "{when}: SNAT to node-a");
        }
    };

    // One exchange every 100 ms for up to 60 s; the test ends it once it has seen enough.
    let held = hold_open(lab, CLIENT, &target, Duration::from_secs(60));
    let started = lab.wait_until(Duration::from_secs(10), |_| held.observed().len() >= 5);
    assert!(started, "the held connection never got going: {:?}\n{}", held.observed(), diag(lab, NODE_A));

    lab.kill_agent(NODE_A).unwrap();
    // The datapath is pinned: with no agent at all, new flows are still balanced and SNATed.
    new_connections_work(lab, "while node-a has no agent");
    let during = held.observed().len();
    let kept = lab.wait_until(Duration::from_secs(10), |_| held.observed().len() >= during + 5);
    assert!(kept, "the held connection stalled without an agent: {:?}", held.observed().last());

    lab.start_agent(NODE_A).unwrap();
    new_connections_work(lab, "after the restart");
    let restarted = held.observed().len();
    let kept = lab.wait_until(Duration::from_secs(10), |_| held.observed().len() >= restarted + 10);
    let _ = lab.sb.kill(held.pid);
    let seen = held.observed();
    assert!(kept, "the held connection stalled after the restart: {:?}\n{}", seen.last(), diag(lab, NODE_A));
    for o in &seen {
        let r = answered(o, "an exchange on the held connection", lab);
        assert_eq!(r.server, ep.name(), "one connection, one backend");
        assert_eq!(r.client_peer, np);
        assert_eq!(r.server_peer.ip(), node_ip(lab, NODE_A, Fam::V4));
    }
    let local_ports: BTreeSet<u16> = seen.iter().map(|o| o.reply().unwrap().client_local.port()).collect();
    assert_eq!(local_ports.len(), 1, "all exchanges were on one connection");
    assert!(
        lab.agent_log(NODE_A).contains("adopted=true"),
        "the restarted agent rebuilt the datapath:\n{}",
        diag(lab, 0)
    );
}

#[test]
fn icmp_reject_for_services_without_endpoints() {
    let c = cluster(
        "pkrej",
        &[on_a(21)],
        &[Svc { name: "empty", n: 6, kind: "LoadBalancer", spec: "", endpoints: vec![] }],
    );
    let lab = &c.lab;
    let rejects = counter(lab, NODE_A, "pkt_reject");
    for (fam, proto) in tcp_and_udp_on_both_families() {
        let frontends = [
            SocketAddr::new(node_ip(lab, NODE_A, fam), node_port(6, proto)),
            SocketAddr::new(lb_ip(6, fam), service_port(proto)),
        ];
        for fe in frontends {
            let mut o = opts(proto, fe, Some(client_ip(0, fam)));
            o.timeout = SILENCE;
            let got = lab.connect(CLIENT, &o).unwrap();
            assert!(
                matches!(&got, Observation::Refused { errno } if errno == "ECONNREFUSED"),
                "{fe}/{proto}: a service without endpoints must be refused, got {got:?}\n{}",
                diag(lab, NODE_A)
            );
        }
    }
    assert!(counter(lab, NODE_A, "pkt_reject") >= rejects + 8, "{}", diag(lab, NODE_A));
}

#[test]
fn hairpin_and_pod_to_nodeport_are_masqueraded() {
    let (me, client, remote) = (on_a(21), on_a(22), on_b(21));
    let c = cluster(
        "pkhair",
        &[me, client, remote],
        &[
            Svc { name: "self", n: 7, kind: "NodePort", spec: "", endpoints: vec![me] },
            Svc { name: "far", n: 8, kind: "NodePort", spec: "", endpoints: vec![remote] },
        ],
    );
    let lab = &c.lab;
    for (fam, proto) in tcp_and_udp_on_both_families() {
        let node_a = node_ip(lab, NODE_A, fam);
        let mut flows = vec![
            // A pod reaching itself through its own service.
            (me, SocketAddr::new(cluster_ip(7, fam), service_port(proto)), me),
            // A pod reaching node-a's NodePort: local and remote endpoint (eTP Cluster masquerades).
            (client, SocketAddr::new(node_a, node_port(7, proto)), me),
            (client, SocketAddr::new(node_a, node_port(8, proto)), remote),
        ];
        // The endpoint itself through its node's NodePort: hairpin on the packet path too.
        flows.push((me, SocketAddr::new(node_a, node_port(7, proto)), me));
        // Traffic for no service passes untouched: a pod reaches the outside server.
        let outside = SocketAddr::new(pick(fam, "203.0.113.50".into(), "2001:db8::50".into()), target_port(proto));
        let o = lab.connect(c.pods[&client], &opts(proto, outside, None)).unwrap();
        let r = answered(&o, &format!("pod {} -> {outside}/{proto}", client.name()), lab);
        assert_eq!((r.server.as_str(), r.client_peer), ("outside", outside));
        for (from, fe, to) in flows {
            let what = format!("pod {} -> {fe}/{proto}", from.name());
            let o = lab.connect(c.pods[&from], &opts(proto, fe, None)).unwrap();
            let r = answered(&o, &what, lab);
            assert_eq!(r.server, to.name(), "{what}");
            assert_eq!(r.server_peer.ip(), node_a, "{what}: the endpoint must see node-a's address");
            assert_eq!(r.client_peer, fe, "{what}: the reply comes from the frontend");
        }
    }
}

// Maglev: a test that removing one backend of ten moves only a small share of
// flows (issue 4) belongs here; it is being written separately.

/// The pass-through fast path's sets (`ferry_addrs`, `ferry_peers`) shrink
/// only at the agent's collection, never under a flow that needs them: a held
/// connection to a LoadBalancer IP (`externalTrafficPolicy: Local`, no SNAT,
/// so the datapath notes the pod in `ferry_peers`) keeps answering after its
/// Service is deleted and collections have run; once it has closed and its
/// entries expired, a collection removes the LB IP and the pod.
#[test]
fn a_deleted_services_held_flow_keeps_the_fast_path_out_of_its_way() {
    use ferry_bpf::entries::{LocalKey, family_of, words};
    use ferry_bpf::pass::PassSet;
    let ep = on_a(21);
    let svc = Svc { name: "lb", n: 7, kind: "LoadBalancer", spec: "externalTrafficPolicy: Local", endpoints: vec![ep] };
    let mut c = cluster("pkpass", &[ep], &[svc]);
    let lab = &mut c.lab;
    // A collection every second; a closed flow's entries expire after 2 s.
    let config = format!("{}syncPeriod: 1s\nconntrack: {{tcpCloseWaitTimeout: 2s}}\n", node_config(lab, NODE_A));
    std::fs::write(&lab.nodes[NODE_A].config, config).unwrap();
    lab.kill_agent(NODE_A).unwrap();
    lab.start_agent(NODE_A).unwrap();
    let key = |ip: IpAddr| LocalKey { addr: words(&ip), family: family_of(&ip) };
    let (lb, pod) = (key(lb_ip(7, Fam::V4)), key(ep.ip(Fam::V4)));
    let pin_dir = lab.nodes[NODE_A].pin_dir.clone();
    let sets = move || {
        let maps = ferry_bpf::Maps::open(&pin_dir).expect("node-a's maps");
        (maps.pass_set(PassSet::Addrs).contains(&lb), maps.pass_set(PassSet::Peers).contains(&pod))
    };

    let target =
        opts(Proto::Tcp, SocketAddr::new(lb_ip(7, Fam::V4), service_port(Proto::Tcp)), Some(client_ip(0, Fam::V4)));
    let held = hold_open(lab, CLIENT, &target, Duration::from_secs(60));
    let started = lab.wait_until(Duration::from_secs(10), |_| held.observed().len() >= 5);
    assert!(started, "the held connection never got going: {:?}\n{}", held.observed(), diag(lab, NODE_A));
    assert_eq!(sets(), (true, true), "the LB IP in ferry_addrs, the unSNATed flow's pod in ferry_peers");

    lab.write_manifests(NODE_A, "").unwrap();
    let pin_dir = lab.nodes[NODE_A].pin_dir.clone();
    let gone = lab.wait_until(Duration::from_secs(10), |_| {
        ferry_bpf::Maps::open(&pin_dir).is_ok_and(|m| m.dump().frontends.iter().all(|(k, _)| k.addr != lb.addr))
    });
    assert!(gone, "the deleted Service's frontends stayed\n{}", diag(lab, NODE_A));
    // Three collections later, the flow still answers and still has both entries.
    let before = held.observed().len();
    let kept = lab.wait_until(Duration::from_secs(10), |_| held.observed().len() >= before + 30);
    assert!(
        kept,
        "the held connection stalled after its Service went: {:?}\n{}",
        held.observed().last(),
        diag(lab, NODE_A)
    );
    assert_eq!(sets(), (true, true), "a collection removed an entry a live flow needs");
    for o in held.observed() {
        let r = answered(&o, "an exchange on the held connection", lab);
        assert_eq!(r.server, ep.name());
        assert_eq!(r.server_peer.ip(), client_ip(0, Fam::V4), "the client address kept (no SNAT)");
    }

    // The flow closes; its entries expire; a collection takes both addresses out.
    let _ = lab.sb.kill(held.pid);
    let emptied = lab.wait_until(Duration::from_secs(20), |_| sets() == (false, false));
    assert!(emptied, "the sets still hold the LB IP / the pod: {:?}\n{}", sets(), diag(lab, NODE_A));
}
