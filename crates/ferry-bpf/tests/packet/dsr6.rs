//! IPv6 Direct Server Return (`bpf/lib/dsr.h`: IPv6 in IPv6), driven packet
//! by packet as `dsr.rs` does for IPv4: the balancing node's encapsulation
//! and the backend node's decapsulation, the outer header read back byte by
//! byte, the inner packet compared whole with the client's, every checksum
//! checked from scratch (`wire.rs`), and exactly which counters moved.
//!
//! ```text
//!  balancing:  client 2001:db8:100::7 -> [2001:db8:1::1]:30080 (NodePort) -> backend
//!              [fd00:244:2::a:1b05]:8080 on the node 2001:db8:1::2 (ferry_tunnels6
//!              fd00:244:2::/64 -> 2001:db8:1::2): IPv6 in IPv6 2001:db8:1::1 -> 2001:db8:1::2,
//!              flow label 0xa1b05 (the endpoint's low 20 bits)
//!  backend's:  IPv6 in IPv6 2001:db8:1::2 -> 2001:db8:1::1, flow label naming the endpoint,
//!              carrying client -> [2001:db8:1::2]:30080, DNAT to the local pod; its reply
//!              leaves as [2001:db8:1::2]:30080 -> client
//! ```

use crate::dsr::{node_with, syn_ack_with_mss};
use crate::wire::*;
use crate::{
    Be, Dp, Hook, NODE6, Ran, Rig, TC_ACT_OK, TC_ACT_REDIRECT, every_class, ip, moved, nodeport, service, ttl,
};
use ferry_bpf::MapOp;
use ferry_bpf::entries::*;
use ferry_bpf::stale::{Serving, stale_udp_dsr_flows};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr};

const CLIENT: &str = "2001:db8:100::7";
/// The other node (on eth0's link).
const PEER_NODE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// Low 20 bits 0xa1b05: more than the 16 an IPv4 Identification would hold.
const REMOTE_POD: &str = "fd00:244:2::a:1b05";
/// Two local pods whose low 16 bits are the same and whose low 20 are not.
const LOCAL_POD: &str = "fd00:244:1::c:2d05";
const OTHER_POD: &str = "fd00:244:1::d:2d05";
const NP_TCP: u16 = 30080;
const NP_UDP: u16 = 30053;
/// Expedited forwarding, to see the traffic class carried to the outer header.
const TCLASS: u8 = 0xb8;

fn tunnel6(cidr: &str, via: Ipv6Addr) -> MapOp {
    let (a, len) = cidr.split_once('/').unwrap();
    let key = TunnelKey6 { prefixlen: len.parse().unwrap(), addr: words(&ip(a)) };
    MapOp::PutTunnel6(Box::new((key, words(&IpAddr::V6(via)))))
}

/// The flow label naming an endpoint: its address's low 20 bits.
fn label_of(endpoint: &str) -> u32 {
    let o = endpoint.parse::<Ipv6Addr>().unwrap().octets();
    u32::from_be_bytes([o[12], o[13], o[14], o[15]]) & 0xfffff
}

/// An IPv6 packet (no Ethernet header) of traffic class TCLASS.
fn with_tclass(mut packet: Vec<u8>) -> Vec<u8> {
    packet[0] = 0x60 | TCLASS >> 4;
    packet[1] = (TCLASS & 0x0f) << 4 | (packet[1] & 0x0f);
    packet
}

/// The client's frame to this node's NodePort, hop limit `hops`.
fn client_frame(l4: &L4, hops: u8) -> Vec<u8> {
    eth(NODE_MAC, CLIENT_MAC, &with_tclass(ip_packet(ip(CLIENT), ip(NODE6), l4, ttl(hops))))
}

/// The balancing node: NodePorts 30080/tcp (service 1) and 30053/udp
/// (service 2) on IPv6 to a backend on the other node, and the IPv6 tunnel
/// table (the other node's pod range and its own address).
fn balancing(flags: u8) -> Vec<MapOp> {
    let mut setup = node_with(flags);
    for (id, proto, port, target) in [(1, PROTO_TCP, NP_TCP, 8080), (2, PROTO_UDP, NP_UDP, 5353)] {
        setup.extend(service(
            id,
            every_class(ACT_FORWARD_CLUSTER | ACT_MASQ),
            0,
            &[Be(100 + id, REMOTE_POD, target, false)],
        ));
        setup.push(nodeport(port, proto, FAM_V6, id));
    }
    setup.push(tunnel6("fd00:244:2::/64", PEER_NODE));
    setup.push(tunnel6("2001:db8:1::2/128", PEER_NODE));
    setup
}

/// Checks `ran` is the client's packet `l4` tunnelled to the peer node: the
/// outer header from this node, hop limit 64, the inner traffic class, the
/// flow label naming REMOTE_POD; the inner packet the client's own, byte for
/// byte, but for its hop limit one less.
fn assert_tunnelled(ran: &Ran, l4: &L4, what: &str) {
    assert_eq!(ran.verdict, TC_ACT_REDIRECT, "{what}: sent on with a redirect");
    let (outer, inner) = check_ip6ip6(&ran.out);
    let want = Outer6 {
        src: ip(NODE6),
        dst: IpAddr::V6(PEER_NODE),
        hop_limit: 64,
        tclass: TCLASS,
        label: label_of(REMOTE_POD),
    };
    assert_eq!(outer, want, "{what}: the outer header");
    assert_eq!(outer.label, 0xa1b05, "{what}: all 20 bits of the endpoint");
    check(&inner);
    assert_eq!(inner, client_frame(l4, 63), "{what}: the inner packet is the client's, untranslated, hop limit - 1");
}

/// dsr mode, IPv6: a TCP connection and a UDP flow to a NodePort whose
/// backend is on another node are tunnelled (IPv6 in IPv6), client address
/// and frontend untouched; their next packets follow from ferry_dsr6 (no new
/// flow, no conntrack entry on this node), which the agent reads back with
/// the endpoint's whole address.
#[test]
fn dsr6_tunnels_a_new_flow_and_the_rest_of_it() {
    let rig = Rig::new();
    rig.run(&balancing(CFG_DSR_TCP | CFG_DSR_DGRAM), |dp: &Dp| {
        let syn = tcp(41000, NP_TCP, 0x02, b"");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_frame(&syn, 64));
        assert_tunnelled(&ran, &syn, "SYN");
        assert_eq!(ran.moved, moved(&[("dsr_new_flow", 1), ("dsr_encap", 1)]), "SYN");
        assert!(ran.tables.is_empty(), "no conntrack entry on the balancing node: {:?}", ran.tables);

        let data = tcp(41000, NP_TCP, 0x18, b"GET / HTTP/1.1\r\n\r\n");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_frame(&data, 64));
        assert_tunnelled(&ran, &data, "data segment");
        assert_eq!(ran.moved, moved(&[("dsr_encap", 1)]), "data segment: the flow's entry, not a new flow");

        let dgram = udp(42000, NP_UDP, b"ferry udp payload");
        for (i, want) in
            [moved(&[("dsr_new_flow", 1), ("dsr_encap", 1)]), moved(&[("dsr_encap", 1)])].iter().enumerate()
        {
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_frame(&dgram, 64));
            assert_tunnelled(&ran, &dgram, &format!("UDP datagram {i}"));
            assert_eq!(&ran.moved, want, "UDP datagram {i}");
        }
        let held = dp.maps.dsr_entries();
        assert_eq!(held.len(), 2, "{held:?}");
        for e in &held {
            assert_eq!((e.family, e.backend_addr), (FAM_V6, words(&ip(REMOTE_POD))), "{e:?}");
        }
        // The stale-flow rule reaches ferry_dsr6: the UDP flow to an endpoint
        // no longer serving is deleted, and its next datagram is a new flow.
        let serving = HashMap::from([(2, Serving::Endpoints(BTreeSet::from([(words(&ip("fd00:244:2::6")), 5353)])))]);
        let stale = stale_udp_dsr_flows(&held, &serving);
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert_eq!(dp.maps.delete_dsr(&stale), 1);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_frame(&dgram, 64));
        assert_eq!(ran.moved, moved(&[("dsr_new_flow", 1), ("dsr_encap", 1)]), "balanced anew once purged");
    });
}

/// A packet that would not fit eth0's MTU (1500) with the 40-byte outer
/// header is answered as a router answers it: ICMPv6 "packet too big" with
/// the MTU left inside the tunnel (1460), from the frontend to the client,
/// back out of eth0, quoting the client's packet. One of exactly 1460 bytes
/// (what a pod MTU of 1460 lets TCP send) is tunnelled.
#[test]
fn dsr6_answers_packet_too_big_for_what_the_tunnel_cannot_carry() {
    let rig = Rig::new();
    rig.run(&balancing(CFG_DSR_TCP | CFG_DSR_DGRAM), |dp: &Dp| {
        // 1460 bytes of IPv6: 40 + 20 (TCP) + 1400 of payload.
        let fits = tcp(41003, NP_TCP, 0x02, &[7u8; 1400]);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_frame(&fits, 64));
        assert_tunnelled(&ran, &fits, "1460-byte packet");
        assert_eq!(ran.out.len(), 14 + 1500, "exactly the MTU once tunnelled");

        // 1500 bytes of IPv6: 40 + 8 + 1452.
        let big = udp(42003, NP_UDP, &[7u8; 1452]);
        let sent = client_frame(&big, 64);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &sent);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "answered, back out of eth0");
        assert_eq!(ran.moved, moved(&[("dsr_pkt_too_big", 1), ("dsr_new_flow", 1)]));
        assert_eq!(ran.out.len(), 14 + 40 + 8 + 48, "the IPv6 header, the ICMPv6 header, the quote");
        let seen = check(&ran.out);
        assert_eq!((seen.src, seen.dst, seen.proto), (ip(NODE6), ip(CLIENT), PROTO_ICMPV6), "frontend -> client");
        let icmp = &ran.out[14 + 40..];
        assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
        assert_eq!(u32::from_be_bytes(icmp[4..8].try_into().unwrap()), 1460, "the MTU: 1500 less the tunnel's 40");
        assert_eq!(&icmp[8..], &sent[14..14 + 48], "quotes the client's header and first 8 bytes, untranslated");
        assert_eq!((&ran.out[..6], &ran.out[6..12]), (&sent[6..12], &sent[..6]), "back to the sender's MAC");
    });
}

/// The backend's node, IPv6: a NodePort 30080/tcp with the local endpoints
/// LOCAL_POD and OTHER_POD (DSR on), the balancing node known.
fn backend_node() -> Vec<MapOp> {
    let mut setup = node_with(CFG_DSR_TCP | CFG_DSR_DGRAM);
    setup.extend(service(
        1,
        every_class(ACT_FORWARD_CLUSTER | ACT_MASQ),
        0,
        &[Be(101, LOCAL_POD, 8080, true), Be(102, OTHER_POD, 8080, true)],
    ));
    setup.push(nodeport(NP_TCP, PROTO_TCP, FAM_V6, 1));
    setup.push(tunnel6("fd00:244:2::/64", PEER_NODE));
    setup.push(tunnel6("2001:db8:1::2/128", PEER_NODE));
    setup
}

/// The client's packet to the other node's NodePort, as that node tunnels
/// it here from `from`, flow label `label`.
fn tunnelled(l4: &L4, from: Ipv6Addr, label: u32) -> Vec<u8> {
    let inner = with_tclass(ip_packet(ip(CLIENT), IpAddr::V6(PEER_NODE), l4, ttl(63)));
    eth(NODE_MAC, CLIENT_MAC, &ip6ip6(from, NODE6.parse().unwrap(), label, &inner))
}

/// The backend's node takes the outer header off, DNATs the client's packet
/// to exactly the endpoint the flow label names (OTHER_POD, for every one of
/// 16 flows: its low 16 bits are LOCAL_POD's too, so fewer than 20 bits, or
/// a pick of its own, would miss it) and tracks it; the pod's SYN-ACK leaves
/// from the frontend the client used straight to the client, its MSS lowered
/// to fit the IPv6 tunnel (1500 - 40 - 60).
#[test]
fn the_backends_node_decapsulates_ipv6_and_answers_from_the_frontend() {
    let rig = Rig::new();
    rig.run(&backend_node(), |dp: &Dp| {
        for sport in 41100..41116 {
            let syn = tcp(sport, NP_TCP, 0x02, b"");
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &tunnelled(&syn, PEER_NODE, label_of(OTHER_POD)));
            assert_eq!(ran.verdict, TC_ACT_REDIRECT, "flow {sport}: to the pod");
            let seen = check(&ran.out);
            assert_eq!(
                (seen.src, seen.sport, seen.dst, seen.dport, seen.ttl),
                (ip(CLIENT), sport, ip(OTHER_POD), 8080, 62),
                "flow {sport}: decapsulated, DNAT to the endpoint named, client kept, hop limit - 1"
            );
            assert_eq!(ran.moved, moved(&[("dsr_decap", 1), ("pkt_new_flow", 1)]), "flow {sport}: no fallback");
        }
        let data = tcp(41100, NP_TCP, 0x10, b"more");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &tunnelled(&data, PEER_NODE, label_of(OTHER_POD)));
        let seen = check(&ran.out);
        assert_eq!((seen.src, seen.dst, seen.dport), (ip(CLIENT), ip(OTHER_POD), 8080), "the flow's next packet");
        assert_eq!(ran.moved, moved(&[("dsr_decap", 1), ("pkt_forward", 1)]));

        let reply = syn_ack_with_mss(8080, 41100, 1440);
        let from_pod = frame(ip(OTHER_POD), ip(CLIENT), &reply, IpOpts::default());
        let ran = dp.run(Hook::FromPods, dp.pods0, &from_pod);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "out of eth0, towards the client");
        let seen = check(&ran.out);
        assert_eq!(
            (seen.src, seen.sport, seen.dst, seen.dport),
            (IpAddr::V6(PEER_NODE), NP_TCP, ip(CLIENT), 41100),
            "the reply comes from the frontend the client used"
        );
        let mss = u16::from_be_bytes([ran.out[14 + 40 + 22], ran.out[14 + 40 + 23]]);
        assert_eq!(mss, 1500 - 40 - 60, "the SYN-ACK's MSS lowered to fit the IPv6 tunnel (eth0 MTU 1500)");
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1), ("dsr_mss_clamp", 1)]));

        // A label naming no local endpoint, or none: chosen here, counted.
        for (sport, label, what) in
            [(41200, label_of("fd00:244:1::9:9999"), "a label naming no local endpoint"), (41201, 0, "no label")]
        {
            let syn = tcp(sport, NP_TCP, 0x02, b"");
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &tunnelled(&syn, PEER_NODE, label));
            let seen = check(&ran.out);
            assert_eq!(seen.src, ip(CLIENT), "{what}: still carried, client kept");
            assert!([LOCAL_POD, OTHER_POD].iter().any(|w| seen.dst == ip(w)), "{what}: got {:?}", seen.dst);
            assert_eq!(
                ran.moved,
                moved(&[("dsr_decap", 1), ("pkt_new_flow", 1), ("dsr_endpoint_fallback", 1)]),
                "{what}"
            );
        }
    });
}

/// IPv6 in IPv6 from an address that is not a node's, or with DSR off
/// (snat mode), is none of ferry's business: passed on untouched.
#[test]
fn ip6ip6_from_a_stranger_or_in_snat_mode_is_left_alone() {
    let syn = tcp(41005, NP_TCP, 0x02, b"");
    let from_stranger = tunnelled(&syn, "2001:db8:1::99".parse().unwrap(), label_of(LOCAL_POD));
    let rig = Rig::new();
    rig.run(&backend_node(), |dp: &Dp| {
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &from_stranger);
        assert_eq!((ran.verdict, ran.out.as_slice()), (TC_ACT_OK, from_stranger.as_slice()));
        assert!(ran.moved.is_empty(), "{:?}", ran.moved);
    });
    let mut snat = backend_node();
    if let MapOp::PutConfig(c) = &mut snat[0] {
        c.flags &= !(CFG_DSR_TCP | CFG_DSR_DGRAM);
    }
    let rig = Rig::new();
    rig.run(&snat, |dp: &Dp| {
        let packet = tunnelled(&syn, PEER_NODE, label_of(LOCAL_POD));
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &packet);
        assert_eq!((ran.verdict, ran.out.as_slice()), (TC_ACT_OK, packet.as_slice()), "snat mode");
        assert!(ran.moved.is_empty(), "{:?}", ran.moved);
    });
}

/// DSR at XDP, IPv6: a new flow to a remote backend is tunnelled at XDP
/// (IPv6 in IPv6, the flow label naming the endpoint, the inner hop limit
/// one less, the next hop's MACs, room made with bpf_xdp_adjust_head); the
/// next packet follows from ferry_dsr6; tc tunnels the same flow the same
/// way; a packet too big for the tunnel is left to tc (which answers it).
#[test]
fn xdp_tunnels_an_ipv6_dsr_flow() {
    const XDP_PASS: i32 = 2;
    const XDP_REDIRECT: i32 = 4;
    const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    let rig = Rig::new();
    rig.neighbours();
    rig.run(&balancing(CFG_DSR_TCP | CFG_DSR_DGRAM), |dp: &Dp| {
        for (i, flags, want) in [
            (0, 0x02, moved(&[("xdp_new_flow", 1), ("xdp_dsr_encap", 1), ("dsr_new_flow", 1)])),
            (1, 0x18, moved(&[("xdp_dsr_encap", 1)])),
        ] {
            let l4 = tcp(41000, NP_TCP, flags, b"GET /");
            let ran = dp.xdp(&client_frame(&l4, 64));
            assert_eq!(ran.verdict, XDP_REDIRECT, "packet {i}: tunnelled at XDP");
            assert_eq!(ran.out[..12], [PEER_MAC, NODE_MAC].concat(), "packet {i}: to the peer node's MAC");
            let (outer, inner) = check_ip6ip6(&ran.out);
            let want_outer = Outer6 {
                src: ip(NODE6),
                dst: IpAddr::V6(PEER_NODE),
                hop_limit: 64,
                tclass: TCLASS,
                label: label_of(REMOTE_POD),
            };
            assert_eq!(outer, want_outer, "packet {i}: the outer header");
            check(&inner);
            assert_eq!(inner[14..], client_frame(&l4, 63)[14..], "packet {i}: the inner packet, hop limit - 1");
            assert_eq!(ran.moved, want, "packet {i}: counters");
            assert!(ran.tables.is_empty(), "packet {i}: no conntrack entry: {:?}", ran.tables);
        }
        let l4 = tcp(41000, NP_TCP, 0x10, b"");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_frame(&l4, 64));
        assert_tunnelled(&ran, &l4, "tc follows the DSR flow XDP made");
        assert_eq!(ran.moved, moved(&[("dsr_encap", 1)]));

        // 1500 bytes of IPv6: too big for the tunnel; XDP leaves it to tc.
        let big = udp(42003, NP_UDP, &[7u8; 1452]);
        let sent = client_frame(&big, 64);
        let ran = dp.xdp(&sent);
        assert_eq!((ran.verdict, ran.out.as_slice()), (XDP_PASS, sent.as_slice()), "too big: passed untouched");
        assert_eq!(ran.moved, moved(&[("xdp_pass_fib", 1)]));
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &sent);
        assert_eq!(ran.moved, moved(&[("dsr_pkt_too_big", 1), ("dsr_new_flow", 1)]), "tc answers it");
    });
}
