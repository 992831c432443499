//! XDP acceleration (`ferry_xdp`, `bpf/lib/xdp.h`), driven packet by packet
//! with `BPF_PROG_TEST_RUN` like the tc programs: the frame XDP sends (every
//! address, port, TTL and checksum recomputed here from scratch, and the MAC
//! addresses of the next hop the FIB gave), its verdict, and exactly which
//! counters moved. The tc program then sees the same conntrack state.
//!
//! Same rig as every packet test (`main.rs`), plus what XDP needs that tc
//! does not: the next hops' neighbour entries (XDP writes the MAC addresses
//! itself; tc leaves that to `bpf_redirect_neigh`). XDP sends only back out
//! of the device a packet came in by (eth0 here), with a redirect
//! (`XDP_REDIRECT`; xdp.h says why not XDP_TX).

use crate::wire::*;
use crate::{
    Be, Dp, Hook, NODE4, NODE6, Ran, Rig, TC_ACT_REDIRECT, every_class, frontend, ip, moved, node_setup, nodeport,
    service, ttl,
};
use ferry_bpf::MapOp;
use ferry_bpf::entries::*;
use libbpf_rs::ProgramInput;
use std::collections::BTreeMap;
use std::net::IpAddr;

const XDP_PASS: i32 = 2;
const XDP_REDIRECT: i32 = 4;

const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:100::7";
const REMOTE4: &str = "10.244.2.5";
const REMOTE6: &str = "fd00:244:2::5";
const POD4: &str = "10.244.1.5";
/// The next hops' MAC addresses (neighbour entries the rig adds).
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// eth0's own MAC address (main.rs sets it), the source of every frame XDP sends.
const ETH0_MAC: [u8; 6] = NODE_MAC;

impl Rig {
    /// Neighbour entries for the next hops, so the FIB answers with MAC addresses.
    pub(crate) fn neighbours(&self) {
        for (addr, mac) in [
            ("192.0.2.2", "02:00:00:00:00:02"),
            ("192.0.2.254", "02:00:00:00:00:fe"),
            ("2001:db8:1::2", "02:00:00:00:00:02"),
            ("2001:db8:1::fe", "02:00:00:00:00:fe"),
        ] {
            let dev = "eth0";
            self.sandbox
                .ip(&self.node, &["neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent"])
                .unwrap_or_else(|e| panic!("neighbour {addr}: {e}"));
        }
        self.sandbox
            .ip(&self.node, &["neigh", "replace", "10.244.1.77", "lladdr", "02:00:00:00:00:77", "dev", "pods0"])
            .expect("neighbour on pods0");
    }
}

impl Dp<'_> {
    /// Runs ferry_xdp on `frame` as if it arrived on eth0 (queue 0).
    pub(crate) fn xdp(&self, frame: &[u8]) -> Ran {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.eth0.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let before = self.counters();
        let input = ProgramInput {
            data_in: Some(frame),
            context_in: Some(&mut ctx),
            data_out: Some(&mut out),
            ..ProgramInput::default()
        };
        let output = self.skel.progs.ferry_xdp.test_run(input).expect("BPF_PROG_TEST_RUN (xdp)");
        let verdict = output.return_value as i32;
        let len = output.data.map(|d| d.len()).unwrap_or(0);
        out.truncate(len);
        let after = self.counters();
        let (tables, moved): (BTreeMap<_, _>, BTreeMap<_, _>) = ferry_bpf::stats::NAMES
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a != b)
            .map(|(n, (b, a))| (*n, a - b))
            .partition(|(n, _)| crate::TABLE_COUNTERS.contains(n));
        Ran { verdict, out, moved, tables }
    }
}

fn seg(proto: u8, sport: u16, dport: u16, flags: u8) -> L4 {
    if proto == PROTO_TCP { tcp(sport, dport, flags, b"ferry") } else { udp(sport, dport, b"ferry udp payload") }
}

/// `want` (a frame from the client's MAC to the node's) as XDP sends it to `next_hop`.
fn sent_to(next_hop: [u8; 6], want: Vec<u8>) -> Vec<u8> {
    eth(next_hop, ETH0_MAC, &want[14..])
}

/// NodePort to a backend on another node at XDP: DNAT + SNAT, TTL - 1,
/// checksums, the next hop's MAC addresses, sent back out of eth0
/// (a redirect to eth0); the backend's reply turned back into (frontend -> client) the
/// same way; the next packet follows the flow. tc then finds the same flow
/// (shared conntrack): its next packet is a tracked one. IPv4 and IPv6, TCP
/// and UDP.
#[test]
fn xdp_nodeport_remote_backend_dnat_snat_and_reply() {
    let rig = Rig::new();
    rig.neighbours();
    let mut setup = node_setup();
    let cases = [
        (1, PROTO_TCP, NODE4, CLIENT4, REMOTE4, 30080),
        (2, PROTO_UDP, NODE4, CLIENT4, REMOTE4, 30053),
        (3, PROTO_TCP, NODE6, CLIENT6, REMOTE6, 30080),
        (4, PROTO_UDP, NODE6, CLIENT6, REMOTE6, 30053),
    ];
    for (id, proto, node, _, backend, port) in cases {
        setup.extend(service(
            id,
            every_class(ACT_FORWARD_CLUSTER | ACT_MASQ),
            0,
            &[Be(100 + id, backend, 8080, false)],
        ));
        let family = if ip(node).is_ipv4() { FAM_V4 } else { FAM_V6 };
        setup.push(nodeport(port, proto, family, id));
    }
    rig.run(&setup, |dp| {
        for (id, proto, node, client, backend, port) in cases {
            let cport = 20000 + id as u16;
            let what = format!("service {id} proto {proto} {client} -> {node}:{port}");
            let ran = dp.xdp(&frame(ip(client), ip(node), &seg(proto, cport, port, 0x02), IpOpts::default()));
            assert_eq!(ran.verdict, XDP_REDIRECT, "{what}: sent back out of eth0 at XDP");
            check(&ran.out);
            let want = frame(ip(node), ip(backend), &seg(proto, cport, 8080, 0x02), ttl(63));
            assert_eq!(ran.out, sent_to(PEER_MAC, want), "{what}: DNAT + SNAT, TTL - 1, next hop's MACs");
            assert_eq!(ran.moved, moved(&[("xdp_new_flow", 1)]), "{what}: counters");

            let reply = frame(ip(backend), ip(node), &seg(proto, 8080, cport, 0x12), IpOpts::default());
            let ran = dp.xdp(&reply);
            assert_eq!(ran.verdict, XDP_REDIRECT, "{what}: reply sent at XDP");
            check(&ran.out);
            let want = frame(ip(node), ip(client), &seg(proto, port, cport, 0x12), ttl(63));
            assert_eq!(ran.out, sent_to(GATEWAY_MAC, want), "{what}: reply from the frontend to the client");
            assert_eq!(ran.moved, moved(&[("xdp_forward", 1)]), "{what}: counters");

            let next = frame(ip(client), ip(node), &seg(proto, cport, port, 0x10), IpOpts::default());
            let ran = dp.xdp(&next);
            assert_eq!(ran.verdict, XDP_REDIRECT, "{what}: next packet at XDP");
            let want = frame(ip(node), ip(backend), &seg(proto, cport, 8080, 0x10), ttl(63));
            assert_eq!(ran.out, sent_to(PEER_MAC, want.clone()), "{what}: tracked at XDP");
            assert_eq!(ran.moved, moved(&[("xdp_forward", 1)]), "{what}: counters");

            // tc (had XDP passed the packet) follows the very same flow.
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &next);
            assert_eq!(ran.out, want, "{what}: tc finds the flow XDP made");
            assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "{what}: tc counters");
        }
    });
}

/// What XDP leaves to tc goes up untouched (the frame as it came) and is
/// counted by why; a packet not sent to an address ferry serves is not
/// counted at all.
#[test]
fn xdp_passes_what_it_leaves_to_tc_untouched() {
    let rig = Rig::new();
    rig.neighbours();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    setup.push(nodeport(30053, PROTO_UDP, FAM_V4, 1));
    setup.extend(service(2, every_class(ACT_FORWARD_CLUSTER), 0, &[Be(20, POD4, 8080, true)]));
    setup.push(nodeport(30081, PROTO_TCP, FAM_V4, 2));
    setup.extend(service(3, every_class(ACT_REJECT), 0, &[]));
    setup.push(nodeport(30082, PROTO_TCP, FAM_V4, 3));
    // A backend behind a next hop without a neighbour entry.
    setup.extend(service(4, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(40, "192.0.2.77", 8080, false)]));
    setup.push(nodeport(30083, PROTO_TCP, FAM_V4, 4));
    // A remote backend whose next hop (resolved) is out of pods0, not eth0.
    setup.extend(service(6, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(60, "10.244.1.77", 8080, false)]));
    setup.push(nodeport(30084, PROTO_TCP, FAM_V4, 6));
    // Source ranges: only 192.0.2.0/24 may use 203.0.113.10:80.
    setup.extend(service(5, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(50, REMOTE4, 8080, false)]));
    setup.push(frontend("203.0.113.10", 80, PROTO_TCP, FE_LOAD_BALANCER, FE_FIREWALL, 5));
    setup.push(MapOp::PutFirewall(FwKey { prefixlen: 32 + 24, service: 5, addr: crate::words_of("192.0.2.0") }));
    rig.run(&setup, |dp| {
        let syn = |dport: u16| frame(ip(CLIENT4), ip(NODE4), &tcp(40000, dport, 0x02, b""), IpOpts::default());
        let pass = |what: &str, f: &[u8], why: &[(&'static str, u64)]| {
            let ran = dp.xdp(f);
            assert_eq!(ran.verdict, XDP_PASS, "{what}: passed to tc");
            assert_eq!(ran.out, f, "{what}: untouched");
            assert_eq!(ran.moved, moved(why), "{what}: counters");
            assert!(ran.tables.is_empty(), "{what}: no conntrack entry: {:?}", ran.tables);
        };
        pass("egress by another device than the way in", &syn(30084), &[("xdp_pass_fib", 1)]);

        let mut first_fragment =
            frame(ip(CLIENT4), ip(NODE4), &udp(40000, 30053, b"ferry udp payload"), IpOpts::default());
        first_fragment[14 + 6] = 0x20; // more fragments
        let c = fold(sum16(
            &{
                let mut h = first_fragment[14..34].to_vec();
                h[10] = 0;
                h[11] = 0;
                h
            },
            0,
        ));
        first_fragment[24..26].copy_from_slice(&c.to_be_bytes());
        pass("first fragment", &first_fragment, &[("xdp_pass_shape", 1)]);
        let echo = frame(ip(CLIENT4), ip(NODE4), &icmp(PROTO_ICMP, 8, 0, [0, 7, 0, 1], b"ping"), IpOpts::default());
        pass("ICMP echo", &echo, &[("xdp_pass_shape", 1)]);
        pass("local backend", &syn(30081), &[("xdp_pass_tc", 1)]);
        pass("reject", &syn(30082), &[("xdp_pass_tc", 1)]);
        pass("unresolved next hop", &syn(30083), &[("xdp_pass_fib", 1)]);
        pass(
            "source outside loadBalancerSourceRanges",
            &frame(ip(CLIENT4), ip("203.0.113.10"), &tcp(40000, 80, 0x02, b""), IpOpts::default()),
            &[("xdp_pass_tc", 1)],
        );
        pass(
            "mid-flow TCP without conntrack",
            &frame(ip(CLIENT4), ip(NODE4), &tcp(40000, 30080, 0x10, b""), IpOpts::default()),
            &[("xdp_pass_tc", 1)],
        );
        pass("not to an address ferry serves", &syn_to("192.0.2.99"), &[]);
        pass("the node's own port, no frontend", &syn(22), &[]);

        // And tc still does its part with what XDP passed: the local backend.
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn(30081));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "local backend: sent to the pod's device by tc");
        assert_eq!(ran.moved, moved(&[("pkt_new_flow", 1)]));
    });
}

fn syn_to(dst: &str) -> Vec<u8> {
    frame(ip(CLIENT4), ip(dst), &tcp(40000, 30080, 0x02, b""), IpOpts::default())
}

/// DSR at XDP: a new flow to a remote backend is tunnelled (IPIP, the
/// endpoint tag as Identification, inner TTL - 1, the next hop's MACs, room
/// made with bpf_xdp_adjust_head); the rest of the flow follows from
/// ferry_dsr, and tc tunnels the same flow the same way.
#[test]
fn xdp_dsr_tunnels_a_new_flow_and_the_rest_of_it() {
    let rig = Rig::new();
    rig.neighbours();
    let mut setup = node_setup();
    if let MapOp::PutConfig(c) = &mut setup[0] {
        c.flags |= CFG_DSR_TCP | CFG_DSR_DGRAM;
    }
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(101, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    let peer: std::net::Ipv4Addr = "192.0.2.2".parse().unwrap();
    for (cidr, len) in [("10.244.2.0", 24), ("192.0.2.2", 32)] {
        let a: std::net::Ipv4Addr = cidr.parse().unwrap();
        setup.push(MapOp::PutTunnel(
            TunnelKey { prefixlen: len, addr: u32::from_ne_bytes(a.octets()) },
            u32::from_ne_bytes(peer.octets()),
        ));
    }
    rig.run(&setup, |dp| {
        for (i, (flags, want)) in [
            (0x02, moved(&[("xdp_new_flow", 1), ("xdp_dsr_encap", 1), ("dsr_new_flow", 1)])),
            (0x18, moved(&[("xdp_dsr_encap", 1)])),
        ]
        .into_iter()
        .enumerate()
        {
            let l4 = tcp(41000, 30080, flags, b"GET /");
            let ran = dp.xdp(&frame(ip(CLIENT4), ip(NODE4), &l4, IpOpts::default()));
            assert_eq!(ran.verdict, XDP_REDIRECT, "packet {i}: tunnelled at XDP");
            assert_eq!(ran.out[..12], [PEER_MAC, ETH0_MAC].concat(), "packet {i}: to the peer node's MAC");
            let (src, dst, outer_ttl, df, inner) = check_ipip(&ran.out);
            assert_eq!((src, dst), (ip(NODE4), IpAddr::V4(peer)), "packet {i}: outer header");
            assert_eq!((outer_ttl, df), (64, true), "packet {i}: outer TTL 64, don't fragment");
            assert_eq!(u16::from_be_bytes([ran.out[18], ran.out[19]]), 0x0205, "packet {i}: endpoint tag");
            check(&inner);
            assert_eq!(inner[14..], frame(ip(CLIENT4), ip(NODE4), &l4, ttl(63))[14..], "packet {i}: inner packet");
            assert_eq!(ran.moved, want, "packet {i}: counters");
            assert!(ran.tables.is_empty(), "packet {i}: no conntrack entry: {:?}", ran.tables);
        }
        let l4 = tcp(41000, 30080, 0x10, b"");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &frame(ip(CLIENT4), ip(NODE4), &l4, IpOpts::default()));
        assert_eq!(ran.moved, moved(&[("dsr_encap", 1)]), "tc follows the DSR flow XDP made");
    });
}
