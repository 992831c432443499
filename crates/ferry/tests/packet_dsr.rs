//! Direct Server Return on the real kernel (`loadBalancing.mode: dsr` and
//! `hybrid`), in the two-node lab's DSR variant: both agents in that mode,
//! the Node objects (addresses, pod CIDRs) in the manifests (README: Direct
//! Server Return).
//!
//! ```text
//!  client 203.0.113.10 ──┐ fabric              default route: node-a
//!  client 2001:db8::10 ──┤
//!  node-a 192.168.50.10 ─┤  receives NodePort / LB IP traffic, tunnels it (IPIP, IPv6 in IPv6) to node-b
//!         fd00:50::a     │
//!  node-b 192.168.50.11 ─┘  decapsulates, DNATs to b21, answers the client itself
//!         fd00:50::b
//!   pods 10.244.1.<n> on node-a, 10.244.2.<n> on node-b (podCIDRs 10.244.1.0/24, 10.244.2.0/24),
//!        fd00:244:1::<n> and fd00:244:2::<n> (podCIDRs fd00:244:1::/64, fd00:244:2::/64)
//! ```
//!
//! What the endpoint saw decides (`server_peer`: the client's own address
//! with DSR, node-a's with SNAT), and the datapath counters of both nodes
//! show which way the packets went: node-a tunnels every client packet
//! (`dsr_encap`) and translates nothing (`pkt_forward`, `pkt_new_flow`
//! unchanged: no reply ever reaches it), node-b unwraps each of them
//! (`dsr_decap`). Needs root; never skipped.

use ferry::lab::{At, Lab, counters_moved as moved};
use ferry_sandbox::probe::{ConnectOpts, Endpoint, Proto, ServeOpts};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const NODE_A: usize = 0;
const NODE_B: usize = 1;
const CLIENT: At = At::External(0);
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
/// The fabric's MTU (veth default).
const UPLINK_MTU: usize = 1500;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client_ip() -> IpAddr {
    ip("203.0.113.10")
}

fn client_ip6() -> IpAddr {
    ip("2001:db8::10")
}

fn lb_ip() -> IpAddr {
    ip("198.18.0.9")
}

fn lb_ip6() -> IpAddr {
    ip("2001:db8:18::9")
}

/// TCP 80 -> 8080 (NodePort 30090), UDP 53 -> 5353 (NodePort 30091).
fn service_port(proto: Proto) -> u16 {
    if proto == Proto::Tcp { 80 } else { 53 }
}

fn node_port(proto: Proto) -> u16 {
    if proto == Proto::Tcp { 30090 } else { 30091 }
}

/// A pod: `n` on `node`, named a<n> / b<n>, at 10.244.<node+1>.<n> and fd00:244:<node+1>::<n>.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PodRef(usize, u8);

impl PodRef {
    fn name(self) -> String {
        format!("{}{}", if self.0 == NODE_A { "a" } else { "b" }, self.1)
    }
    fn ips(self) -> [IpAddr; 2] {
        [ip(&format!("10.244.{}.{}", self.0 + 1, self.1)), ip(&format!("fd00:244:{}::{}", self.0 + 1, self.1))]
    }
}

const A21: PodRef = PodRef(NODE_A, 21);
const A22: PodRef = PodRef(NODE_A, 22);
const B21: PodRef = PodRef(NODE_B, 21);

/// A dual-stack LoadBalancer Service `name` (ClusterIP 10.96.0.<n>, LB IPs
/// 198.18.0.9 and 2001:db8:18::9), eTP Cluster, with `endpoints`, and its slices.
fn service(name: &str, n: u8, endpoints: &[PodRef]) -> String {
    let ports = "  - {name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30090}\n  \
                 - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30091}\n";
    let mut out = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.{n}\n  clusterIPs: [10.96.0.{n}, \"fd00:96::{n}\"]\n  ipFamilies: [IPv4, IPv6]\n  \
         ipFamilyPolicy: RequireDualStack\n  externalTrafficPolicy: Cluster\n  ports:\n{ports}\
         status:\n  loadBalancer:\n    ingress: [{{ip: {}}}, {{ip: \"{}\"}}]\n",
        lb_ip(),
        lb_ip6()
    );
    for (i, family) in ["IPv4", "IPv6"].iter().enumerate() {
        let eps: Vec<String> = endpoints
            .iter()
            .map(|p| {
                let node = if p.0 == NODE_A { "node-a" } else { "node-b" };
                format!("- {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: true}}}}", p.ips()[i])
            })
            .collect();
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{}, namespace: test, \
             labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nendpoints:\n{}\nports: [{{name: \
             http, port: {TCP_TARGET}, protocol: TCP}}, {{name: dns, port: {UDP_TARGET}, protocol: UDP}}]\n",
            family.to_lowercase(),
            eps.join("\n"),
        ));
    }
    out
}

/// node-a and node-b in `mode`, the client, `pods` serving TCP 8080 and UDP
/// 5353, one Service `far` with `endpoints`, and the Node objects.
struct Cluster {
    lab: Lab,
    pods: BTreeMap<PodRef, At>,
}

fn cluster(tag: &str, mode: &str, pods: &[PodRef], endpoints: &[PodRef]) -> Cluster {
    let mut lab = Lab::new(tag, FERRY.as_ref()).expect("creating the lab");
    assert_eq!((lab.add_node("node-a").unwrap(), lab.add_node("node-b").unwrap()), (NODE_A, NODE_B));
    lab.add_external("client", &[client_ip(), client_ip6()], NODE_A).unwrap();
    let mut at = BTreeMap::new();
    for p in pods {
        let ips = p.ips();
        let j = lab.add_pod(p.0, &p.name(), &ips).unwrap();
        let listen = ips
            .iter()
            .flat_map(|a| {
                [Endpoint::tcp(SocketAddr::new(*a, TCP_TARGET)), Endpoint::udp(SocketAddr::new(*a, UDP_TARGET))]
            })
            .collect();
        let mut opts = ServeOpts::new(&p.name(), listen);
        opts.echo_lines = true;
        lab.serve_with(At::Pod(p.0, j), opts).unwrap();
        at.insert(*p, At::Pod(p.0, j));
    }
    let mut manifests = service("far", 9, endpoints);
    manifests.push_str(&lab.node_object(NODE_A, &["10.244.1.0/24", "fd00:244:1::/64"]));
    manifests.push_str(&lab.node_object(NODE_B, &["10.244.2.0/24", "fd00:244:2::/64"]));
    for node in [NODE_A, NODE_B] {
        let extra = format!(
            "clusterCIDRs: [10.244.0.0/16, \"fd00:244::/32\"]\nserviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n\
             loadBalancing: {{mode: {mode}}}\n"
        );
        lab.write_node_config(node, &extra).unwrap();
        lab.write_manifests(node, &manifests).unwrap();
        lab.start_agent(node).unwrap_or_else(|e| panic!("starting the agent of node {node}: {e:#}"));
    }
    Cluster { lab, pods: at }
}

fn opts(proto: Proto, target: SocketAddr, bind: Option<IpAddr>) -> ConnectOpts {
    let mut o = ConnectOpts::new(Endpoint { addr: target, proto });
    o.bind = bind;
    o
}

/// What a node's datapath counted so far (`ferry status --json`).
fn counters(lab: &Lab, node: usize) -> BTreeMap<String, u64> {
    lab.counters(node).unwrap_or_else(|e| panic!("reading node {node}'s counters: {e:#}"))
}

fn diag(lab: &Lab) -> String {
    lab.report(&[NODE_A, NODE_B])
}

fn node_a(lab: &Lab) -> IpAddr {
    IpAddr::V4(lab.nodes[NODE_A].primary_v4)
}

fn node_a6(lab: &Lab) -> IpAddr {
    IpAddr::V6(lab.nodes[NODE_A].primary_v6)
}

/// Every packet node-a tunnelled reached node-b's datapath (polled: the
/// last ones may still be on the wire when node-a's counters are read).
fn assert_every_tunnelled_packet_arrived(lab: &Lab, encap: u64, decap_before: u64, what: &str) {
    let arrived = lab.wait_until(Duration::from_secs(5), |lab| {
        counters(lab, NODE_B).get("dsr_decap").copied().unwrap_or(0) - decap_before >= encap
    });
    assert!(arrived, "{what}: node-b unwrapped fewer packets than node-a tunnelled ({encap})\n{}", diag(lab));
}

/// eTP Cluster to a backend on another node, dsr mode: the endpoint sees the
/// client's own address (IPv4 and IPv6, TCP and UDP, NodePort and LB IP),
/// the client sees the frontend it dialled, and no reply comes back through
/// node-a: its datapath translated nothing and tunnelled every packet it
/// got, and node-b unwrapped every one of them.
#[test]
fn dsr_keeps_the_client_address_and_the_reply_skips_the_balancing_node() {
    let c = cluster("dsrkeep", "dsr", &[A21, B21], &[B21]);
    let lab = &c.lab;
    let families = [(client_ip(), node_a(lab), lb_ip()), (client_ip6(), node_a6(lab), lb_ip6())];
    for ((client, node, lb), proto) in families.iter().flat_map(|f| [(f, Proto::Tcp), (f, Proto::Udp)]) {
        for fe in [SocketAddr::new(*node, node_port(proto)), SocketAddr::new(*lb, service_port(proto))] {
            let what = format!("{client} -> {fe}/{proto}");
            let (a0, b0) = (counters(lab, NODE_A), counters(lab, NODE_B));
            let o = lab.connect(CLIENT, &opts(proto, fe, Some(*client))).unwrap();
            let r = o.reply().unwrap_or_else(|| panic!("{what}: no reply: {o:?}\n{}", diag(lab)));
            let a = moved(&a0, &counters(lab, NODE_A));
            assert_eq!(r.server, B21.name(), "{what}");
            assert_eq!(r.server_peer.ip(), *client, "{what}: the endpoint sees the client's address\n{a:?}");
            assert_eq!(r.client_peer, fe, "{what}: the reply comes from the frontend");
            assert_eq!(a.get("dsr_new_flow"), Some(&1), "{what}: one DSR flow on node-a: {a:?}");
            for c in ["pkt_forward", "pkt_new_flow", "drop_dsr_too_big", "dsr_no_tunnel"] {
                assert_eq!(a.get(c), None, "{what}: node-a's {c} moved (a reply came back through it?): {a:?}");
            }
            let encap = a["dsr_encap"];
            assert_every_tunnelled_packet_arrived(lab, encap, b0.get("dsr_decap").copied().unwrap_or(0), &what);
        }
    }
}

/// hybrid mode: TCP is carried by DSR (client address kept), UDP by SNAT
/// (node-a's address, and node-a translates the reply); both families.
#[test]
fn hybrid_carries_tcp_by_dsr_and_udp_by_snat() {
    let c = cluster("dsrhyb", "hybrid", &[A21, B21], &[B21]);
    let lab = &c.lab;
    let cases = [
        (client_ip(), node_a(lab), Proto::Tcp, client_ip(), "dsr_new_flow"),
        (client_ip(), node_a(lab), Proto::Udp, node_a(lab), "pkt_new_flow"),
        (client_ip6(), node_a6(lab), Proto::Tcp, client_ip6(), "dsr_new_flow"),
        (client_ip6(), node_a6(lab), Proto::Udp, node_a6(lab), "pkt_new_flow"),
    ];
    for (client, node, proto, peer, counter) in cases {
        let fe = SocketAddr::new(node, node_port(proto));
        let a0 = counters(lab, NODE_A);
        let o = lab.connect(CLIENT, &opts(proto, fe, Some(client))).unwrap();
        let r = o.reply().unwrap_or_else(|| panic!("{fe}/{proto}: no reply: {o:?}\n{}", diag(lab)));
        let a = moved(&a0, &counters(lab, NODE_A));
        assert_eq!((r.server.as_str(), r.server_peer.ip(), r.client_peer), (B21.name().as_str(), peer, fe), "{proto}");
        assert_eq!(a.get(counter), Some(&1), "{proto}: {a:?}");
    }
}

/// An MTU-sized request is not lost: a TCP request of many full-sized
/// segments arrives whole and is answered whole, by DSR: node-b lowered the
/// MSS its endpoint announced by the tunnel's 20 bytes (`dsr_mss_clamp`), so
/// none of the client's segments was too big for node-a to tunnel. A
/// full-sized UDP datagram (1472 bytes of payload, sent with DF as Linux
/// does) cannot be made smaller: dsr mode answers it with ICMP
/// "fragmentation needed" (`dsr_frag_needed`, README), which reaches the
/// client (its kernel caches the path MTU 1480); hybrid mode carries it by SNAT.
#[test]
fn an_mtu_sized_request_is_not_lost() {
    let c = cluster("dsrmtu", "dsr", &[B21], &[B21]);
    let lab = &c.lab;
    let fe = SocketAddr::new(node_a(lab), node_port(Proto::Tcp));
    let (a0, b0) = (counters(lab, NODE_A), counters(lab, NODE_B));
    let mut o = opts(Proto::Tcp, fe, Some(client_ip()));
    o.pad = 16 * UPLINK_MTU;
    let got = lab.connect(CLIENT, &o).unwrap();
    let r = got.reply().unwrap_or_else(|| panic!("{fe}: a {}-byte request was lost: {got:?}\n{}", o.pad, diag(lab)));
    assert_eq!((r.server.as_str(), r.server_peer.ip()), (B21.name().as_str(), client_ip()));
    let (a, b) = (moved(&a0, &counters(lab, NODE_A)), moved(&b0, &counters(lab, NODE_B)));
    assert_eq!(a.get("drop_dsr_too_big"), None, "{a:?}");
    assert_eq!(a.get("dsr_new_flow"), Some(&1), "{a:?}");
    assert_eq!(b.get("dsr_mss_clamp"), Some(&1), "node-b lowered the SYN-ACK's MSS: {b:?}");

    // 11 bytes of message, the filler, a newline: 1472 bytes of UDP payload, a 1500-byte packet.
    let full = |fe: SocketAddr| {
        let mut o = opts(Proto::Udp, fe, Some(client_ip()));
        o.pad = UPLINK_MTU - 20 - 8 - o.message.len() - 1;
        o.timeout = Duration::from_millis(1500);
        o
    };
    let fe = SocketAddr::new(node_a(lab), node_port(Proto::Udp));
    let a0 = counters(lab, NODE_A);
    let got = lab.connect(CLIENT, &full(fe)).unwrap();
    assert!(got.reply().is_none(), "dsr mode: a full-sized UDP datagram cannot be tunnelled: {got:?}");
    let a = moved(&a0, &counters(lab, NODE_A));
    assert_eq!(a.get("dsr_frag_needed"), Some(&1), "dsr mode: answered with fragmentation needed: {a:?}");
    assert_eq!(a.get("drop_dsr_too_big"), None, "{a:?}");
    // The ICMP error reached the client: its kernel now knows the path MTU.
    let route = lab.ip(CLIENT, &["route", "get", &node_a(lab).to_string()]).unwrap();
    assert!(route.contains("mtu 1480"), "the client learnt the tunnel's MTU (1500 - 20): {route}");
    drop(c);
    let c = cluster("dsrmtuh", "hybrid", &[B21], &[B21]);
    let fe = SocketAddr::new(node_a(&c.lab), node_port(Proto::Udp));
    let got = c.lab.connect(CLIENT, &full(fe)).unwrap();
    let r = got.reply().unwrap_or_else(|| panic!("hybrid: a full-sized datagram was lost: {got:?}\n{}", diag(&c.lab)));
    assert_eq!(r.server_peer.ip(), node_a(&c.lab), "hybrid: UDP by SNAT");
}

/// The same over IPv6, whose outer header costs 40 bytes: a TCP request of
/// many full-sized segments arrives whole, by DSR (node-b lowered its
/// endpoint's MSS by the tunnel's 40 bytes, `dsr_mss_clamp`); a full-sized
/// UDP datagram (1452 bytes of payload) is answered with ICMPv6 "packet too
/// big" (`dsr_pkt_too_big`), which reaches the client: its kernel caches
/// the path MTU 1460.
#[test]
fn an_mtu_sized_ipv6_request_is_not_lost() {
    let c = cluster("dsrmtu6", "dsr", &[B21], &[B21]);
    let lab = &c.lab;
    let fe = SocketAddr::new(node_a6(lab), node_port(Proto::Tcp));
    let (a0, b0) = (counters(lab, NODE_A), counters(lab, NODE_B));
    let mut o = opts(Proto::Tcp, fe, Some(client_ip6()));
    o.pad = 16 * UPLINK_MTU;
    let got = lab.connect(CLIENT, &o).unwrap();
    let r = got.reply().unwrap_or_else(|| panic!("{fe}: a {}-byte request was lost: {got:?}\n{}", o.pad, diag(lab)));
    assert_eq!((r.server.as_str(), r.server_peer.ip()), (B21.name().as_str(), client_ip6()));
    let (a, b) = (moved(&a0, &counters(lab, NODE_A)), moved(&b0, &counters(lab, NODE_B)));
    for c in ["drop_dsr_too_big", "dsr_pkt_too_big", "pkt_forward", "pkt_new_flow"] {
        assert_eq!(a.get(c), None, "node-a's {c}: {a:?}");
    }
    assert_eq!(a.get("dsr_new_flow"), Some(&1), "{a:?}");
    assert_eq!(b.get("dsr_mss_clamp"), Some(&1), "node-b lowered the SYN-ACK's MSS: {b:?}");

    // 11 bytes of message, the filler, a newline: 1452 bytes of UDP payload, a 1500-byte packet.
    let fe = SocketAddr::new(node_a6(lab), node_port(Proto::Udp));
    let mut o = opts(Proto::Udp, fe, Some(client_ip6()));
    o.pad = UPLINK_MTU - 40 - 8 - o.message.len() - 1;
    o.timeout = Duration::from_millis(1500);
    let a0 = counters(lab, NODE_A);
    let got = lab.connect(CLIENT, &o).unwrap();
    assert!(got.reply().is_none(), "a full-sized IPv6 datagram cannot be tunnelled: {got:?}");
    let a = moved(&a0, &counters(lab, NODE_A));
    assert_eq!(a.get("dsr_pkt_too_big"), Some(&1), "answered with packet too big: {a:?}");
    assert_eq!(a.get("drop_dsr_too_big"), None, "{a:?}");
    let route = lab.ip(CLIENT, &["-6", "route", "get", &node_a6(lab).to_string()]).unwrap();
    assert!(route.contains("mtu 1460"), "the client learnt the tunnel's MTU (1500 - 40): {route}");
}

/// In dsr mode, what DSR does not carry works as in snat mode: a pod
/// reaching its own service, a pod reaching node-a's NodePort with a local
/// and with a remote endpoint, and the endpoint itself through its node's
/// NodePort (hairpin), all masqueraded to node-a.
#[test]
fn hairpin_and_pod_to_nodeport_still_work_in_dsr_mode() {
    let c = cluster("dsrhair", "dsr", &[A21, A22, B21], &[B21]);
    let lab = &c.lab;
    // A second Service with the pod a21 as its only endpoint, for the hairpin.
    let mut manifests = service("far", 9, &[B21]);
    manifests.push_str(
        &service("self", 7, &[A21])
            .replace("30090", "30070")
            .replace("30091", "30071")
            .replace("198.18.0.9", "198.18.0.7")
            .replace("2001:db8:18::9", "2001:db8:18::7"),
    );
    manifests.push_str(&lab.node_object(NODE_A, &["10.244.1.0/24", "fd00:244:1::/64"]));
    manifests.push_str(&lab.node_object(NODE_B, &["10.244.2.0/24", "fd00:244:2::/64"]));
    for node in [NODE_A, NODE_B] {
        lab.write_manifests(node, &manifests).unwrap();
    }
    let na = node_a(lab);
    let programmed = lab.wait_until(Duration::from_secs(10), |lab| {
        let o = lab.connect(c.pods[&A22], &opts(Proto::Tcp, SocketAddr::new(na, 30070), None)).unwrap();
        o.reply().is_some()
    });
    assert!(programmed, "the second Service was never served\n{}", diag(lab));
    for proto in [Proto::Tcp, Proto::Udp] {
        let np_self = if proto == Proto::Tcp { 30070 } else { 30071 };
        let flows = [
            (A21, SocketAddr::new(ip("10.96.0.7"), service_port(proto)), A21),
            (A22, SocketAddr::new(na, np_self), A21),
            (A22, SocketAddr::new(na, node_port(proto)), B21),
            (A21, SocketAddr::new(na, np_self), A21),
        ];
        for (from, fe, to) in flows {
            let what = format!("pod {} -> {fe}/{proto}", from.name());
            let o = lab.connect(c.pods[&from], &opts(proto, fe, None)).unwrap();
            let r = o.reply().unwrap_or_else(|| panic!("{what}: no reply: {o:?}\n{}", diag(lab)));
            assert_eq!(r.server, to.name(), "{what}");
            assert_eq!(r.server_peer.ip(), na, "{what}: masqueraded to node-a, as in snat mode");
            assert_eq!(r.client_peer, fe, "{what}: the reply comes from the frontend");
        }
    }
}

/// Held DSR connections, one per family, survive both agents restarting:
/// node-a's `ferry_dsr` and `ferry_dsr6` entries and node-b's conntrack
/// entries are pinned, the restarted agents adopt them (and `ferry_tunnels`,
/// `ferry_tunnels6`), and both connections keep answering from b21 with the
/// client's address, through the tunnel.
#[test]
fn an_agent_restart_keeps_dsr_flows() {
    use std::io::{BufRead, BufReader, Write};
    let mut c = cluster("dsrrst", "dsr", &[B21], &[B21]);
    let lab = &mut c.lab;
    // Each held connection: its client address, stdin, and the lines it printed.
    let mut held = Vec::new();
    for (client, node) in [(client_ip(), node_a(lab)), (client_ip6(), node_a6(lab))] {
        let fe = SocketAddr::new(node, node_port(Proto::Tcp));
        let (_pid, stdin, stdout) =
            lab.spawn_held(CLIENT, &opts(Proto::Tcp, fe, Some(client)), Duration::from_secs(120)).unwrap();
        let (tx, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().take(1000) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        held.push((client, stdin, replies));
    }
    // One exchange: the server that answered and the client address it saw.
    let exchange = |stdin: &mut std::process::ChildStdin,
                    replies: &std::sync::mpsc::Receiver<String>,
                    first: bool|
     -> Result<(String, IpAddr), String> {
        if !first {
            stdin.write_all(b"x\n").and_then(|_| stdin.flush()).map_err(|e| format!("writing: {e}"))?;
        }
        // A guard against a hung client, not a timing assertion.
        let line = replies.recv_timeout(Duration::from_secs(20)).map_err(|e| format!("no answer: {e}"))?;
        let o: ferry_sandbox::probe::Observation = serde_json::from_str(&line).map_err(|e| format!("{line}: {e}"))?;
        o.reply().map(|r| (r.server.clone(), r.server_peer.ip())).ok_or_else(|| format!("{o:?}"))
    };
    for (client, stdin, replies) in held.iter_mut() {
        let want = Ok((B21.name(), *client));
        assert_eq!(exchange(stdin, replies, true), want, "{client}: did not open by DSR\n{}", diag(lab));
    }
    let a0 = counters(lab, NODE_A);
    assert_eq!(a0["dsr_new_flow"], 2, "one DSR flow per family: {a0:?}");
    for node in [NODE_A, NODE_B] {
        lab.kill_agent(node).unwrap();
        lab.start_agent(node).unwrap_or_else(|e| panic!("restarting the agent of node {node}: {e:#}"));
    }
    for (client, stdin, replies) in held.iter_mut() {
        let want = Ok((B21.name(), *client));
        for i in 0..3 {
            assert_eq!(
                exchange(stdin, replies, false),
                want,
                "{client}: exchange {i} after the restarts\n{}",
                diag(lab)
            );
        }
    }
    let a = counters(lab, NODE_A);
    assert!(a["dsr_encap"] >= a0["dsr_encap"] + 6, "the exchanges after the restart went through the tunnel: {a:?}");
    assert_eq!(a["dsr_new_flow"], 2, "the held flows were not balanced again: {a:?}");
}

/// The pass-through fast path keeps out of a DSR flow's way: node-a's
/// collection (`ferry_bpf::pass`) keeps a deleted Service's LB IP in
/// `ferry_addrs` while node-a tunnels a held connection to it (its next
/// packets are found by the full path only), and the connection keeps
/// answering through the tunnel after collections have run; once it has
/// closed and its `ferry_dsr` entry expired, a collection removes the LB IP.
/// (The same for conntrack flows: packet_lb.rs,
/// `a_deleted_services_held_flow_keeps_the_fast_path_out_of_its_way`.)
#[test]
fn a_deleted_services_dsr_flow_keeps_the_fast_path_out_of_its_way() {
    use ferry::lab::BackgroundClient;
    use ferry_bpf::entries::{LocalKey, family_of, words};
    use ferry_bpf::pass::PassSet;
    use ferry_sandbox::probe::ConnectMode;
    let mut c = cluster("dsrpass", "dsr", &[B21], &[B21]);
    let lab = &mut c.lab;
    // A collection every second; a closed flow's entries expire after 2 s.
    let extra = "clusterCIDRs: [10.244.0.0/16, \"fd00:244::/32\"]\nserviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n\
                 loadBalancing: {mode: dsr}\nsyncPeriod: 1s\nconntrack: {tcpCloseWaitTimeout: 2s}\n";
    lab.write_node_config(NODE_A, extra).unwrap();
    lab.kill_agent(NODE_A).unwrap();
    lab.start_agent(NODE_A).unwrap();
    let lb = LocalKey { addr: words(&lb_ip()), family: family_of(&lb_ip()) };
    let pin_dir = lab.nodes[NODE_A].pin_dir.clone();
    let lb_in_addrs = move || {
        let maps = ferry_bpf::Maps::open(&pin_dir).expect("node-a's maps");
        maps.pass_set(PassSet::Addrs).contains(&lb)
    };

    let target = opts(Proto::Tcp, SocketAddr::new(lb_ip(), service_port(Proto::Tcp)), Some(client_ip()));
    let held: BackgroundClient =
        lab.spawn_client(CLIENT, &target, ConnectMode::KeepOpen(Duration::from_secs(60))).unwrap();
    let started = lab.wait_until(Duration::from_secs(10), |_| held.observed().len() >= 5);
    assert!(started, "the held connection never got going: {:?}\n{}", held.observed(), diag(lab));
    assert!(lb_in_addrs(), "the LB IP in ferry_addrs");
    let encap0 = counters(lab, NODE_A)["dsr_encap"];

    // node-a forgets the Service (the Node objects stay).
    let mut nodes = lab.node_object(NODE_A, &["10.244.1.0/24", "fd00:244:1::/64"]);
    nodes.push_str(&lab.node_object(NODE_B, &["10.244.2.0/24", "fd00:244:2::/64"]));
    lab.write_manifests(NODE_A, &nodes).unwrap();
    let pin_dir = lab.nodes[NODE_A].pin_dir.clone();
    let gone = lab.wait_until(Duration::from_secs(10), |_| {
        ferry_bpf::Maps::open(&pin_dir).is_ok_and(|m| m.dump().frontends.iter().all(|(k, _)| k.addr != lb.addr))
    });
    assert!(gone, "the deleted Service's frontends stayed\n{}", diag(lab));
    // Three collections later, the flow still answers, through the tunnel.
    let before = held.observed().len();
    let kept = lab.wait_until(Duration::from_secs(10), |_| held.observed().len() >= before + 30);
    assert!(kept, "the held connection stalled after its Service went: {:?}\n{}", held.observed().last(), diag(lab));
    assert!(lb_in_addrs(), "a collection removed the LB IP a live DSR flow needs");
    for o in held.observed() {
        let r = o.reply().unwrap_or_else(|| panic!("an exchange on the held connection: {o:?}\n{}", diag(lab)));
        assert_eq!((r.server.as_str(), r.server_peer.ip()), (B21.name().as_str(), client_ip()), "by DSR");
    }
    let a = counters(lab, NODE_A);
    assert!(a["dsr_encap"] >= encap0 + 30, "the exchanges went through the tunnel: {a:?}");

    // The flow closes; its entry expires; a collection takes the address out.
    let _ = lab.sb.kill(held.pid);
    let emptied = lab.wait_until(Duration::from_secs(20), |_| !lb_in_addrs());
    assert!(emptied, "ferry_addrs still holds the LB IP\n{}", diag(lab));
}

/// A UDP flow node-a carries by DSR to b21 while the Service's endpoint
/// moves to a21 (on node-a): at the sync, node-a's stale-flow rule deletes
/// its `ferry_dsr` entry as it would a SNATed flow's conntrack entries, and
/// the next datagrams on the same connected socket are balanced anew, to
/// a21, instead of going on to node-b, which has no endpoint of the
/// Service left and would drop them (blackholed).
#[test]
fn a_udp_dsr_flow_moves_off_a_removed_backend() {
    use ferry_sandbox::probe::{ConnectMode, Observation};
    let mut c = cluster("dsrstale", "dsr", &[A21, B21], &[B21]);
    let lab = &mut c.lab;
    let mut target = opts(Proto::Udp, SocketAddr::new(node_a(lab), node_port(Proto::Udp)), Some(client_ip()));
    target.connected_udp = true;
    let client = lab.spawn_client(CLIENT, &target, ConnectMode::UdpStream(Duration::from_secs(6))).unwrap();
    let started = lab.wait_until(Duration::from_secs(10), |_| client.observed().len() >= 10);
    assert!(started, "the UDP stream never got going: {:?}\n{}", client.observed(), diag(lab));
    let mut moved_away = service("far", 9, &[A21]);
    moved_away.push_str(&lab.node_object(NODE_A, &["10.244.1.0/24", "fd00:244:1::/64"]));
    moved_away.push_str(&lab.node_object(NODE_B, &["10.244.2.0/24", "fd00:244:2::/64"]));
    for node in [NODE_A, NODE_B] {
        lab.write_manifests(node, &moved_away).unwrap();
    }
    let ticks = lab.finish_client(client, Duration::from_secs(30)).unwrap();

    let server = |o: &Observation| o.reply().map(|r| r.server.clone());
    let summary: Vec<String> =
        ticks.iter().map(|o| server(o).unwrap_or_else(|| format!("{o:?}").chars().take(40).collect())).collect();
    let first_new = ticks.iter().position(|o| server(o).as_deref() == Some(A21.name().as_str()));
    let Some(first_new) = first_new else {
        panic!("the flow never moved off the removed backend (blackholed): {summary:?}\n{}", diag(lab));
    };
    assert!(
        ticks[..first_new]
            .iter()
            .filter_map(|o| o.reply())
            .all(|r| r.server == B21.name() && r.server_peer.ip() == client_ip()),
        "before the move: b21, by DSR (client address kept): {summary:?}"
    );
    assert!(first_new >= 10, "it started on b21: {summary:?}");
    // After the move every answer is a21's; a tick may time out on a loaded machine.
    let tail = &ticks[first_new..];
    let answered = tail.iter().filter(|o| server(o).as_deref() == Some(A21.name().as_str())).count();
    assert!(
        answered == tail.iter().filter(|o| o.reply().is_some()).count() && answered * 10 >= tail.len() * 8,
        "after the move the flow stays on a21: {summary:?}"
    );
}
