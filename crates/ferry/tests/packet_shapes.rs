//! The packet shapes kube-proxy's netfilter path carries, carried by both of ferry's datapaths on
//! the per-packet path (NodePort, LoadBalancer IP, ExternalIP from outside the cluster), in a
//! two-node lab on the real kernel, IPv4 and IPv6:
//!
//! - a 4,000-byte UDP datagram (fragmented on the 1500-byte links) to a local and to a remote
//!   endpoint arrives whole, and its reply (as long, so fragmented too) comes back from the frontend;
//!   also from a pod through its own node's NodePort (hairpin when the endpoint is the pod itself);
//! - IPv6 datagrams with a destination-options header, small and fragmented;
//! - the same datagram with its fragments sent last first (the eBPF datapath's defrag loop puts
//!   them back in order), IPv4 and IPv6, from the client and from pod a21;
//! - SCTP whose endpoint port (7000) differs from the service port: the INIT and the INIT-ACK are
//!   translated with a corrected CRC32c, which both raw-socket ends check (the kernel has no SCTP
//!   module here, so the probe is the SCTP receiver and ignores a packet with a bad checksum),
//!   unfragmented and padded past the MTU so that both travel as IP fragments;
//! - path MTU: a bulk TCP transfer to a remote endpoint behind a 1280-byte link completes, which
//!   needs node-b's "fragmentation needed" / "packet too big" to reach the client translated.
//!
//! ```text
//!  client 203.0.113.10, 2001:db8::10 ── fabric ── node-a 192.168.50.10 ── br0 ── a21 (10.244.1.21)
//!        (default route: node-a)                ── node-b 192.168.50.11 ── br0 ── b21 (10.244.2.21)
//! ```
//!
//! On the eBPF datapath the fragment, extension-header and checksum counters must show the work.
//! Needs root; never skipped.

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectOpts, Endpoint, Observation, Proto, ServeOpts};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const NODE_A: usize = 0;
const NODE_B: usize = 1;
const CLIENT: At = At::External(0);
/// What the pods serve: UDP 5353, SCTP 7000, TCP 8080.
const UDP_TARGET: u16 = 5353;
const SCTP_TARGET: u16 = 7000;
const TCP_TARGET: u16 = 8080;
/// Service ports: UDP 53, SCTP 7777, TCP 80.
const UDP_PORT: u16 = 53;
const SCTP_PORT: u16 = 7777;
const TCP_PORT: u16 = 80;
/// The UDP request's length: "ferry-probe", the filler, the newline.
const DATAGRAM: usize = 4000;
const PAD: usize = DATAGRAM - "ferry-probe".len() - 1;
/// The Padding parameter of a fragmented SCTP INIT (about 3 fragments on a 1500-byte link).
const SCTP_PAD: usize = 4000;
/// The bulk TCP transfer of the path MTU lab.
const BULK: usize = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

const FAMILIES: [Fam; 2] = [Fam::V4, Fam::V6];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("{s:?} is not an address"))
}

fn pick(fam: Fam, v4: &str, v6: &str) -> IpAddr {
    ip(if fam == Fam::V4 { v4 } else { v6 })
}

fn client_ip(fam: Fam) -> IpAddr {
    pick(fam, "203.0.113.10", "2001:db8::10")
}

/// Pod 21 of a node: a21 on node-a, b21 on node-b.
fn pod_ip(node: usize, fam: Fam) -> IpAddr {
    ip(&if fam == Fam::V4 { format!("10.244.{}.21", node + 1) } else { format!("fd00:244:{}::21", node + 1) })
}

fn pod_name(node: usize) -> &'static str {
    if node == NODE_A { "a21" } else { "b21" }
}

fn node_ip(lab: &Lab, node: usize, fam: Fam) -> IpAddr {
    let n = &lab.nodes[node];
    if fam == Fam::V4 { IpAddr::V4(n.primary_v4) } else { IpAddr::V6(n.primary_v6) }
}

/// Service `n`: ClusterIP 10.96.0.<n>, LB IP 198.18.0.<n>, ExternalIP 198.19.0.<n> (and IPv6
/// peers), NodePorts 30<n>0 (TCP), 30<n>1 (UDP), 30<n>7 (SCTP); endpoints on pod 21 of `node`.
fn service(name: &str, n: u8, node: usize) -> String {
    let np = |k: u16| 30000 + 10 * u16::from(n) + k;
    let mut out = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.{n}\n  clusterIPs: [10.96.0.{n}, \"fd00:96::{n}\"]\n  ipFamilies: [IPv4, IPv6]\n  \
         ipFamilyPolicy: RequireDualStack\n  externalIPs: [198.19.0.{n}, \"fd00:199::{n}\"]\n  ports:\n  \
         - {{name: http, port: {TCP_PORT}, protocol: TCP, targetPort: {TCP_TARGET}, nodePort: {}}}\n  \
         - {{name: dns, port: {UDP_PORT}, protocol: UDP, targetPort: {UDP_TARGET}, nodePort: {}}}\n  \
         - {{name: sig, port: {SCTP_PORT}, protocol: SCTP, targetPort: {SCTP_TARGET}, nodePort: {}}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: 198.18.0.{n}}}, {{ip: \"fd00:198::{n}\"}}]\n",
        np(0),
        np(1),
        np(7)
    );
    for fam in FAMILIES {
        let family = if fam == Fam::V4 { "IPv4" } else { "IPv6" };
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{}, namespace: test, \
             labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nendpoints:\n\
             - {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: true}}}}\nports: [{{name: http, port: \
             {TCP_TARGET}, protocol: TCP}}, {{name: dns, port: {UDP_TARGET}, protocol: UDP}}, {{name: sig, port: \
             {SCTP_TARGET}, protocol: SCTP}}]\n",
            family.to_lowercase(),
            pod_ip(node, fam),
            if node == NODE_A { "node-a" } else { "node-b" },
        ));
    }
    out
}

/// The frontends of service `n` for a protocol's service port: NodePort on node-a, LB IP, ExternalIP.
fn frontends(lab: &Lab, n: u8, fam: Fam, proto: Proto) -> [SocketAddr; 3] {
    let (port, np) = match proto {
        Proto::Tcp => (TCP_PORT, 0),
        Proto::Udp => (UDP_PORT, 1),
        _ => (SCTP_PORT, 7),
    };
    let node_port = 30000 + 10 * u16::from(n) + np;
    [
        SocketAddr::new(node_ip(lab, NODE_A, fam), node_port),
        SocketAddr::new(pick(fam, &format!("198.18.0.{n}"), &format!("fd00:198::{n}")), port),
        SocketAddr::new(pick(fam, &format!("198.19.0.{n}"), &format!("fd00:199::{n}")), port),
    ]
}

fn node_config(lab: &Lab, node: usize, datapath: &str) -> String {
    let n = &lab.nodes[node];
    let ips: Vec<String> = lab.node_ips(node).iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "datapath: {datapath}\nnodeName: {}\nnodeIPs: [{}]\nprimaryIPs: [\"{}\", \"{}\"]\n\
         clusterCIDRs: [10.244.0.0/16, \"fd00:244::/32\"]\nserviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n\
         bpf:\n  pinPath: {}\n  cgroupPath: {}\n  devices: [eth0]\n  podDevices: [br0]\n",
        n.name,
        ips.join(", "),
        n.primary_v4,
        n.primary_v6,
        n.pin_dir.display(),
        n.cgroup.display()
    )
}

/// Two nodes, the client, pod 21 on each node (serving TCP, UDP and SCTP on both families), and
/// both agents on `datapath` with `manifests`. `before_agents` may change the lab first.
fn cluster(tag: &str, datapath: &str, manifests: &str, before_agents: impl FnOnce(&mut Lab)) -> Lab {
    let mut lab = Lab::new(tag, FERRY.as_ref()).expect("creating the lab");
    assert_eq!(lab.add_node("node-a").unwrap(), NODE_A);
    assert_eq!(lab.add_node("node-b").unwrap(), NODE_B);
    lab.add_external("client", &FAMILIES.map(client_ip), NODE_A).unwrap();
    for node in [NODE_A, NODE_B] {
        let ips = FAMILIES.map(|f| pod_ip(node, f));
        let j = lab.add_pod(node, pod_name(node), &ips).unwrap();
        let listen = ips
            .iter()
            .flat_map(|ip| {
                [
                    Endpoint::tcp(SocketAddr::new(*ip, TCP_TARGET)),
                    Endpoint::udp(SocketAddr::new(*ip, UDP_TARGET)),
                    Endpoint { addr: SocketAddr::new(*ip, SCTP_TARGET), proto: Proto::Sctp },
                ]
            })
            .collect();
        lab.serve_with(At::Pod(node, j), ServeOpts::new(pod_name(node), listen)).unwrap();
    }
    before_agents(&mut lab);
    for node in [NODE_A, NODE_B] {
        std::fs::write(&lab.nodes[node].config, node_config(&lab, node, datapath)).unwrap();
        lab.write_manifests(node, manifests).unwrap();
        lab.start_agent(node).unwrap_or_else(|e| panic!("starting the agent of node {node}: {e:#}"));
    }
    lab
}

/// What a node's datapath counted so far (`ferry status --json`).
fn counters(lab: &Lab, node: usize) -> BTreeMap<String, u64> {
    lab.counters(node).unwrap_or_else(|e| panic!("reading node {node}'s counters: {e:#}"))
}

fn diag(lab: &Lab, datapath: &str) -> String {
    let mut out = String::new();
    for node in [NODE_A, NODE_B] {
        if datapath == "bpf" {
            out.push_str(&format!("--- {} counters: {:?}\n", lab.nodes[node].name, counters(lab, node)));
        }
        out.push_str(&format!("--- {} agent log:\n{}\n", lab.nodes[node].name, lab.agent_log(node)));
    }
    out
}

/// Sends one attempt from the client and checks that pod 21 of `node` answered it through `fe`.
fn expect_answer(lab: &Lab, datapath: &str, o: &ConnectOpts, node: usize, what: &str) {
    expect_answer_from(lab, CLIENT, datapath, o, node, what);
}

fn expect_answer_from(lab: &Lab, from: At, datapath: &str, o: &ConnectOpts, node: usize, what: &str) {
    let fe = o.target.addr;
    let got = lab.connect(from, o).unwrap();
    let Observation::Reply(r) = &got else {
        panic!("{datapath}: {what} to {fe}/{}: expected a reply, got {got:?}\n{}", o.target.proto, diag(lab, datapath))
    };
    assert_eq!(r.server, pod_name(node), "{datapath}: {what} to {fe}: the endpoint answers");
    let target = match o.target.proto {
        Proto::Tcp => TCP_TARGET,
        Proto::Udp => UDP_TARGET,
        _ => SCTP_TARGET,
    };
    let fam = if fe.is_ipv4() { Fam::V4 } else { Fam::V6 };
    assert_eq!(r.server_local, SocketAddr::new(pod_ip(node, fam), target), "{datapath}: {what} to {fe}: DNAT");
    assert_eq!(r.client_peer, fe, "{datapath}: {what} to {fe}: the reply comes from the frontend");
}

fn grew(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

/// Fragmented UDP, IPv6 destination options and SCTP with a port change, to a local (service 1,
/// a21) and a remote (service 2, b21) endpoint, through every external frontend kind.
fn fragments_extension_headers_and_sctp(datapath: &str) {
    let manifests = service("near", 1, NODE_A) + &service("far", 2, NODE_B);
    let lab = cluster(&format!("shp{}", &datapath[..2]), datapath, &manifests, |_| {});
    let before = if datapath == "bpf" { counters(&lab, NODE_A) } else { BTreeMap::new() };
    for fam in FAMILIES {
        for (n, node) in [(1, NODE_A), (2, NODE_B)] {
            for fe in frontends(&lab, n, fam, Proto::Udp) {
                let mut o = ConnectOpts::new(Endpoint::udp(fe));
                o.bind = Some(client_ip(fam));
                o.pad = PAD;
                expect_answer(&lab, datapath, &o, node, "a 4000-byte UDP datagram");
                // Last fragment first: netfilter defragments before NAT; the eBPF datapath sends
                // the fragments through its defrag loop, which gives them back in order.
                let mut r = o.clone();
                r.reverse_fragments = true;
                expect_answer(&lab, datapath, &r, node, "a 4000-byte UDP datagram, its last fragment first");
                if fam == Fam::V6 {
                    o.ipv6_dstopts = true;
                    expect_answer(&lab, datapath, &o, node, "a 4000-byte UDP datagram with destination options");
                    o.pad = 0;
                    expect_answer(&lab, datapath, &o, node, "a UDP datagram with destination options");
                }
            }
            // Hairpin: pod a21 through node-a's NodePort, to itself and to b21.
            let np = frontends(&lab, n, fam, Proto::Udp)[0];
            let mut o = ConnectOpts::new(Endpoint::udp(np));
            o.pad = PAD;
            expect_answer_from(&lab, At::Pod(NODE_A, 0), datapath, &o, node, "a 4000-byte UDP datagram from pod a21");
            // The same, last fragment first: on bpf through the pod-facing device's program and the loop.
            o.bind = Some(pod_ip(NODE_A, fam));
            o.reverse_fragments = true;
            let what = "a 4000-byte UDP datagram from pod a21, its last fragment first";
            expect_answer_from(&lab, At::Pod(NODE_A, 0), datapath, &o, node, what);
            for fe in frontends(&lab, n, fam, Proto::Sctp) {
                let mut o = ConnectOpts::new(Endpoint { addr: fe, proto: Proto::Sctp });
                o.bind = Some(client_ip(fam));
                expect_answer(&lab, datapath, &o, node, "an SCTP INIT (service port != endpoint port)");
                // Longer than the MTU: the INIT and its INIT-ACK (as long) travel as IP fragments,
                // and each end checks the CRC32c of the reassembled packet.
                o.pad = SCTP_PAD;
                expect_answer(&lab, datapath, &o, node, "a fragmented SCTP INIT (service port != endpoint port)");
            }
        }
    }
    if datapath == "bpf" {
        let after = counters(&lab, NODE_A);
        // 12 fragmented requests from the client (2 families x 2 services x 3 frontends) + 6 IPv6
        // ones with destination options + 4 from pod a21, each answered by a fragmented reply:
        // every one has a first fragment and at least two later ones in each direction.
        let (first, later) = (grew(&before, &after, "frag_first"), grew(&before, &after, "frag_forward"));
        assert!(first >= 2 * 22, "frag_first grew by {first}\n{}", diag(&lab, datapath));
        assert!(later >= 4 * 22, "frag_forward grew by {later}\n{}", diag(&lab, datapath));
        assert_eq!(grew(&before, &after, "frag_miss"), 0, "no fragment lost its tracking\n{}", diag(&lab, datapath));
        // 12 INITs in, 12 INIT-ACKs out, each with its port changed; as many fragmented ones.
        let fixed = grew(&before, &after, "sctp_csum_fix");
        assert!(fixed >= 48, "sctp_csum_fix grew by {fixed}\n{}", diag(&lab, datapath));
        assert_eq!(grew(&before, &after, "drop_unsupported"), 0, "{}", diag(&lab, datapath));
        // Through the defrag loop: 12 reversed datagrams from the client and 4 from pod a21 (4
        // fragments each, all of which go in), 12 fragmented INITs and 12 INIT-ACKs (3 fragments
        // each, all of which go in), every fragment coming back.
        let (went, back) = (grew(&before, &after, "frag_loop"), grew(&before, &after, "loop_return"));
        assert!(went >= 4 * 16 + 3 * 24, "frag_loop grew by {went}\n{}", diag(&lab, datapath));
        assert!(back >= went, "loop_return grew by {back}, frag_loop by {went}\n{}", diag(&lab, datapath));
        eprintln!(
            "node-a: frag_first +{first}, frag_forward +{later}, frag_loop +{went}, loop_return +{back}, \
             loop_sctp_len +{}, sctp_csum_fix +{fixed}",
            grew(&before, &after, "loop_sctp_len")
        );
    }
}

#[test]
fn bpf_carries_fragments_extension_headers_and_sctp_port_changes() {
    fragments_extension_headers_and_sctp("bpf");
}

#[test]
fn nftables_carries_fragments_extension_headers_and_sctp_port_changes() {
    fragments_extension_headers_and_sctp("nftables");
}

/// A bulk TCP transfer through node-a's NodePort (and LB IP) to b21, whose link on node-b has an
/// MTU of 1280: b21 advertises a 1460-byte MSS (its own side of the link is 1500), so the client's
/// full-size segments meet node-b's router, whose "fragmentation needed" / "packet too big" goes to
/// node-a (the SNAT source) and must reach the client translated back for the transfer to finish.
fn bulk_tcp_over_a_smaller_path_mtu(datapath: &str) {
    let manifests = service("bulk", 3, NODE_B);
    let lab = cluster(&format!("mtu{}", &datapath[..2]), datapath, &manifests, |lab| {
        // v0 is node-b's side of b21's link (the lab names pod links v<index>).
        let host = lab.node_host(NODE_B).clone();
        for dev in ["v0", "br0"] {
            lab.sb.ip(&host, &["link", "set", "dev", dev, "mtu", "1280"]).unwrap();
        }
    });
    let before = if datapath == "bpf" { counters(&lab, NODE_A) } else { BTreeMap::new() };
    for fam in FAMILIES {
        for fe in frontends(&lab, 3, fam, Proto::Tcp).into_iter().take(2) {
            let mut o = ConnectOpts::new(Endpoint::tcp(fe));
            o.bind = Some(client_ip(fam));
            o.pad = BULK;
            // The probe's own bound on the attempt: a stalled transfer is observed as a timeout.
            o.timeout = Duration::from_secs(20);
            expect_answer(&lab, datapath, &o, NODE_B, "a 2 MiB TCP upload over a 1280-byte link");
        }
    }
    if datapath == "bpf" {
        let after = counters(&lab, NODE_A);
        let translated = grew(&before, &after, "icmp_error_rev");
        assert!(translated >= 4, "icmp_error_rev grew by {translated}\n{}", diag(&lab, datapath));
    }
}

#[test]
fn bpf_bulk_tcp_completes_over_a_smaller_path_mtu() {
    bulk_tcp_over_a_smaller_path_mtu("bpf");
}

#[test]
fn nftables_bulk_tcp_completes_over_a_smaller_path_mtu() {
    bulk_tcp_over_a_smaller_path_mtu("nftables");
}
