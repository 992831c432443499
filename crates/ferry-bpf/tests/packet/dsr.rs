//! Direct Server Return (`bpf/lib/dsr.h`), driven packet by packet: the
//! balancing node's encapsulation and the backend node's decapsulation, every
//! header (the outer one and the inner packet's) and checksum checked here
//! from scratch (`wire.rs`), and exactly which counters moved.
//!
//! Same rig as every packet test (`main.rs`): the node's namespace, pins and
//! the fast path on. In these tests the node is either end of the tunnel:
//!
//! ```text
//!  balancing:  client 198.51.100.7 -> 192.0.2.1:30080 (NodePort) -> backend 10.244.2.5:8080 on
//!              the node 192.0.2.2 (ferry_tunnels 10.244.2.0/24 -> 192.0.2.2): IPIP 192.0.2.1 -> 192.0.2.2,
//!              Identification 0x0205 (the endpoint's low 16 bits)
//!  backend's:  IPIP 192.0.2.2 -> 192.0.2.1, Identification 0x0105, carrying client -> 192.0.2.2:30080,
//!              DNAT to the local pod 10.244.1.5:8080; its reply leaves as 192.0.2.2:30080 -> client
//! ```

use crate::wire::*;
use crate::{
    Be, Dp, Hook, NODE4, Ran, Rig, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, every_class, ip, moved, node_setup,
    nodeport, service, ttl,
};
use ferry_bpf::MapOp;
use ferry_bpf::entries::*;
use ferry_bpf::stale::{Serving, stale_udp_dsr_flows};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

const CLIENT: &str = "198.51.100.7";
/// The other node: the backend's (for the balancing tests), the balancing one (for the backend's).
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const REMOTE_POD: &str = "10.244.2.5";
const LOCAL_POD: &str = "10.244.1.5";
const NP_TCP: u16 = 30080;
const NP_UDP: u16 = 30053;

fn tunnel(cidr: &str, via: Ipv4Addr) -> MapOp {
    let (a, len) = cidr.split_once('/').unwrap();
    let a: Ipv4Addr = a.parse().unwrap();
    MapOp::PutTunnel(
        TunnelKey { prefixlen: len.parse().unwrap(), addr: u32::from_ne_bytes(a.octets()) },
        u32::from_ne_bytes(via.octets()),
    )
}

/// The node config with `flags` added (the mode's CFG_DSR_*).
pub(crate) fn node_with(flags: u8) -> Vec<MapOp> {
    let mut setup = node_setup();
    if let MapOp::PutConfig(c) = &mut setup[0] {
        c.flags |= flags;
    }
    setup
}

/// The balancing node: NodePorts 30080/tcp (service 1) and 30053/udp
/// (service 2) to a backend on the other node, SNAT in snat mode
/// (eTP Cluster), and the tunnel table when `tunnels`.
fn balancing(flags: u8, tunnels: bool) -> Vec<MapOp> {
    let mut setup = node_with(flags);
    for (id, proto, port, target) in [(1, PROTO_TCP, NP_TCP, 8080), (2, PROTO_UDP, NP_UDP, 5353)] {
        setup.extend(service(
            id,
            every_class(ACT_FORWARD_CLUSTER | ACT_MASQ),
            0,
            &[Be(100 + id, REMOTE_POD, target, false)],
        ));
        setup.push(nodeport(port, proto, FAM_V4, id));
    }
    if tunnels {
        setup.push(tunnel("10.244.2.0/24", PEER_NODE));
        setup.push(tunnel("192.0.2.2/32", PEER_NODE));
    }
    setup
}

fn client_packet(l4: &L4) -> Vec<u8> {
    frame(ip(CLIENT), ip(NODE4), l4, IpOpts::default())
}

/// The outer header's Identification: the endpoint the balancing node chose.
fn outer_id(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[14 + 4], frame[14 + 5]])
}

/// What the outer header carries for an endpoint: its address's low 16 bits.
fn tag_of(endpoint: &str) -> u16 {
    let o = endpoint.parse::<Ipv4Addr>().unwrap().octets();
    u16::from_be_bytes([o[2], o[3]])
}

/// Checks `ran` is the client's packet `sent` tunnelled to the peer node:
/// the outer header from this node naming REMOTE_POD, the inner packet the
/// client's own with its TTL one less (checksums recomputed here).
fn assert_tunnelled(ran: &Ran, l4: &L4, what: &str) {
    assert_tunnelled_to(ran, l4, REMOTE_POD, what)
}

fn assert_tunnelled_to(ran: &Ran, l4: &L4, endpoint: &str, what: &str) {
    assert_eq!(ran.verdict, TC_ACT_REDIRECT, "{what}: sent on with a redirect");
    let (src, dst, outer_ttl, df, inner) = check_ipip(&ran.out);
    assert_eq!((src, dst), (ip(NODE4), IpAddr::V4(PEER_NODE)), "{what}: outer header from this node to the backend's");
    assert_eq!((outer_ttl, df), (64, true), "{what}: outer TTL 64, don't fragment");
    assert_eq!(outer_id(&ran.out), tag_of(endpoint), "{what}: the Identification names the endpoint {endpoint}");
    check(&inner);
    let want = frame(ip(CLIENT), ip(NODE4), l4, ttl(63));
    assert_eq!(inner, want, "{what}: the inner packet is the client's, untranslated, TTL - 1");
}

/// dsr mode: a client's TCP connection and UDP flow to a NodePort whose
/// backend is on another node are tunnelled, client address and frontend
/// untouched; the next packets of each follow the same way (no new flow,
/// no conntrack entry on this node: it never sees the replies).
#[test]
fn dsr_tunnels_a_new_flow_and_the_rest_of_it() {
    let rig = Rig::new();
    rig.run(&balancing(CFG_DSR_TCP | CFG_DSR_DGRAM, true), |dp: &Dp| {
        let syn = tcp(41000, NP_TCP, 0x02, b"");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&syn));
        assert_tunnelled(&ran, &syn, "SYN");
        assert_eq!(ran.moved, moved(&[("dsr_new_flow", 1), ("dsr_encap", 1)]), "SYN");
        assert!(ran.tables.is_empty(), "no conntrack entry on the balancing node: {:?}", ran.tables);

        let data = tcp(41000, NP_TCP, 0x18, b"GET / HTTP/1.1\r\n\r\n");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&data));
        assert_tunnelled(&ran, &data, "data segment");
        assert_eq!(ran.moved, moved(&[("dsr_encap", 1)]), "data segment: the flow's entry, not a new flow");

        let dgram = udp(42000, NP_UDP, b"ferry udp payload");
        for (i, want) in
            [moved(&[("dsr_new_flow", 1), ("dsr_encap", 1)]), moved(&[("dsr_encap", 1)])].iter().enumerate()
        {
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&dgram));
            assert_tunnelled(&ran, &dgram, &format!("UDP datagram {i}"));
            assert_eq!(&ran.moved, want, "UDP datagram {i}");
        }
    });
}

/// hybrid mode: TCP is tunnelled, UDP is SNATed as in snat mode; a backend
/// whose node is unknown (no tunnel entry) is SNATed too, and counted.
#[test]
fn hybrid_snats_udp_and_an_unknown_node_falls_back_to_snat() {
    let rig = Rig::new();
    rig.run(&balancing(CFG_DSR_TCP, true), |dp: &Dp| {
        let syn = tcp(41001, NP_TCP, 0x02, b"");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&syn));
        assert_tunnelled(&ran, &syn, "hybrid TCP");
        let dgram = udp(42001, NP_UDP, b"ferry udp payload");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&dgram));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let seen = check(&ran.out);
        assert_eq!((seen.src, seen.dst, seen.proto), (ip(NODE4), ip(REMOTE_POD), PROTO_UDP), "hybrid UDP: SNAT + DNAT");
        assert_eq!(ran.moved, moved(&[("pkt_new_flow", 1)]), "hybrid UDP");
    });
    let rig = Rig::new();
    rig.run(&balancing(CFG_DSR_TCP | CFG_DSR_DGRAM, false), |dp: &Dp| {
        let syn = tcp(41002, NP_TCP, 0x02, b"");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&syn));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let seen = check(&ran.out);
        assert_eq!((seen.src, seen.dst, seen.dport), (ip(NODE4), ip(REMOTE_POD), 8080), "no tunnel: SNAT + DNAT");
        assert_eq!(ran.moved, moved(&[("dsr_no_tunnel", 1), ("pkt_new_flow", 1)]));
    });
}

/// A packet that would not fit eth0's MTU (1500) with the 20-byte outer
/// header is never sent half-way: sent with DF (TCP, and UDP of a stack doing
/// path MTU discovery) it is answered as a router answers it, ICMP
/// "fragmentation needed" with the MTU left inside the tunnel (1480), back
/// out of eth0 to the client; without DF it is dropped (tc cannot fragment).
/// Both counted. One that fits exactly (1480 bytes of IP, what a pod MTU of
/// 1480 lets TCP send) is tunnelled.
#[test]
fn dsr_answers_or_drops_what_the_tunnel_cannot_carry_and_counts_it() {
    let rig = Rig::new();
    rig.run(&balancing(CFG_DSR_TCP | CFG_DSR_DGRAM, true), |dp: &Dp| {
        // 1480 bytes of IP: 20 + 20 (TCP) + 1440 of payload.
        let fits = tcp(41003, NP_TCP, 0x02, &[7u8; 1440]);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&fits));
        assert_tunnelled(&ran, &fits, "1480-byte packet");
        assert_eq!(ran.out.len(), 14 + 1500, "exactly the MTU once tunnelled");

        let big = udp(42003, NP_UDP, &[7u8; 1472]);
        let sent = client_packet(&big);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &sent);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "1500-byte datagram with DF: answered, back out of eth0");
        assert_eq!(ran.moved, moved(&[("dsr_frag_needed", 1), ("dsr_new_flow", 1)]));
        let icmp = &ran.out[14..];
        assert_eq!(ran.out.len(), 14 + 20 + 8 + 28, "the IP header, the ICMP header, the quote");
        assert_eq!(
            (&icmp[12..16], &icmp[16..20]),
            (&sent[14 + 16..14 + 20], &sent[14 + 12..14 + 16]),
            "frontend -> client"
        );
        assert_eq!((icmp[9], icmp[20], icmp[21]), (PROTO_ICMP, 3, 4), "destination unreachable, fragmentation needed");
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1480, "the next-hop MTU: 1500 less the tunnel's 20");
        assert_eq!(&icmp[28..56], &sent[14..14 + 28], "quotes the client's header and first 8 bytes, untranslated");
        assert_eq!(crate::shapes::inet_csum(&icmp[..20]), 0, "IPv4 header checksum");
        assert_eq!(crate::shapes::inet_csum(&icmp[20..]), 0, "ICMP checksum");

        let unfragmentable = IpOpts { frag: 0, ..IpOpts::default() };
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &frame(ip(CLIENT), ip(NODE4), &big, unfragmentable));
        assert_eq!(ran.verdict, TC_ACT_SHOT, "1500-byte datagram without DF");
        assert_eq!(ran.moved, moved(&[("drop_dsr_too_big", 1)]));
    });
}

/// The backend's node: a NodePort 30080/tcp with a local endpoint
/// 10.244.1.5:8080 (and DSR on), the balancing node 192.0.2.2 known.
fn backend_node() -> Vec<MapOp> {
    let mut setup = node_with(CFG_DSR_TCP | CFG_DSR_DGRAM);
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(101, LOCAL_POD, 8080, true)]));
    setup.push(nodeport(NP_TCP, PROTO_TCP, FAM_V4, 1));
    setup.push(tunnel("10.244.2.0/24", PEER_NODE));
    setup.push(tunnel("192.0.2.2/32", PEER_NODE));
    setup
}

/// A SYN-ACK whose only option is an MSS of `mss` (data offset 6).
pub(crate) fn syn_ack_with_mss(sport: u16, dport: u16, mss: u16) -> L4 {
    let mut l4 = tcp(sport, dport, 0x12, b"");
    l4.bytes[12] = 0x60;
    l4.bytes.splice(20..20, [2, 4, (mss >> 8) as u8, mss as u8]);
    l4
}

/// The client's packet to the other node's NodePort, as that node tunnels it
/// here having chosen LOCAL_POD.
fn tunnelled_to_us(l4: &L4) -> Vec<u8> {
    tunnelled_naming(l4, tag_of(LOCAL_POD))
}

/// The same, the outer Identification `tag`.
fn tunnelled_naming(l4: &L4, tag: u16) -> Vec<u8> {
    let inner = ip_packet(ip(CLIENT), IpAddr::V4(PEER_NODE), l4, ttl(63));
    let mut outer = ipip(PEER_NODE, NODE4.parse().unwrap(), &inner);
    outer[4..6].copy_from_slice(&tag.to_be_bytes());
    outer[10..12].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&outer[..20], 0));
    outer[10..12].copy_from_slice(&c.to_be_bytes());
    eth(NODE_MAC, CLIENT_MAC, &outer)
}

/// The backend's node takes the outer header off, DNATs the client's packet
/// to its own endpoint (client address kept) and tracks it; the pod's reply
/// leaves from the frontend the client used (the other node's address and
/// NodePort) straight to the client, through eth0.
#[test]
fn the_backends_node_decapsulates_and_answers_from_the_frontend() {
    let rig = Rig::new();
    rig.run(&backend_node(), |dp: &Dp| {
        let syn = tcp(41004, NP_TCP, 0x02, b"");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &tunnelled_to_us(&syn));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "to the pod");
        let seen = check(&ran.out);
        assert_eq!(
            (seen.src, seen.sport, seen.dst, seen.dport, seen.ttl),
            (ip(CLIENT), 41004, ip(LOCAL_POD), 8080, 62),
            "decapsulated, DNAT to the local endpoint, client kept, TTL - 1"
        );
        assert_eq!(ran.moved, moved(&[("dsr_decap", 1), ("pkt_new_flow", 1)]));

        let data = tcp(41004, NP_TCP, 0x10, b"more");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &tunnelled_to_us(&data));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let seen = check(&ran.out);
        assert_eq!((seen.src, seen.dst, seen.dport), (ip(CLIENT), ip(LOCAL_POD), 8080), "the flow's next packet");
        assert_eq!(ran.moved, moved(&[("dsr_decap", 1), ("pkt_forward", 1)]));

        let reply = syn_ack_with_mss(8080, 41004, 1460);
        let from_pod = frame(ip(LOCAL_POD), ip(CLIENT), &reply, IpOpts::default());
        let ran = dp.run(Hook::FromPods, dp.pods0, &from_pod);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "out of eth0, towards the client");
        let seen = check(&ran.out);
        assert_eq!(
            (seen.src, seen.sport, seen.dst, seen.dport),
            (IpAddr::V4(PEER_NODE), NP_TCP, ip(CLIENT), 41004),
            "the reply comes from the frontend the client used"
        );
        let mss = u16::from_be_bytes([ran.out[14 + 20 + 22], ran.out[14 + 20 + 23]]);
        assert_eq!(mss, 1500 - 20 - 40, "the SYN-ACK's MSS lowered to fit the tunnel (eth0 MTU 1500)");
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1), ("dsr_mss_clamp", 1)]));

        // An MSS that fits already is left as it is.
        let small = syn_ack_with_mss(8080, 41004, 1400);
        let ran = dp.run(Hook::FromPods, dp.pods0, &frame(ip(LOCAL_POD), ip(CLIENT), &small, IpOpts::default()));
        check(&ran.out);
        assert_eq!(u16::from_be_bytes([ran.out[14 + 20 + 22], ran.out[14 + 20 + 23]]), 1400);
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]));
    });
}

/// IPIP from an address that is not a node's, or with DSR off (snat mode),
/// is none of ferry's business: passed on untouched (the kernel, without
/// an ipip device, drops it).
#[test]
fn ipip_from_a_stranger_or_in_snat_mode_is_left_alone() {
    let stranger = Ipv4Addr::new(192, 0, 2, 99);
    let syn = tcp(41005, NP_TCP, 0x02, b"");
    let inner = ip_packet(ip(CLIENT), IpAddr::V4(PEER_NODE), &syn, ttl(63));
    let from_stranger = eth(NODE_MAC, CLIENT_MAC, &ipip(stranger, NODE4.parse().unwrap(), &inner));
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
        let packet = tunnelled_to_us(&syn);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &packet);
        assert_eq!((ran.verdict, ran.out.as_slice()), (TC_ACT_OK, packet.as_slice()), "snat mode");
        assert!(ran.moved.is_empty(), "{:?}", ran.moved);
    });
}

/// The backend's node sends a tunnelled flow to exactly the endpoint the
/// outer Identification names (10.244.1.6 of two local endpoints, for
/// every one of 16 flows: a pick of its own would miss it half the time);
/// a tag naming none of its endpoints, or two (host-network endpoints
/// share the node's address), and a tag of 0 fall back to a pick among its
/// own endpoints, counted.
#[test]
fn the_backends_node_takes_the_endpoint_the_balancing_node_chose() {
    const OTHER_POD: &str = "10.244.1.6";
    let mut setup = node_with(CFG_DSR_TCP | CFG_DSR_DGRAM);
    setup.extend(service(
        1,
        every_class(ACT_FORWARD_CLUSTER | ACT_MASQ),
        0,
        &[Be(101, LOCAL_POD, 8080, true), Be(102, OTHER_POD, 8080, true)],
    ));
    setup.push(nodeport(NP_TCP, PROTO_TCP, FAM_V4, 1));
    // Two host-network endpoints on this node's address, service 2.
    setup.extend(service(
        2,
        every_class(ACT_FORWARD_CLUSTER | ACT_MASQ),
        0,
        &[Be(201, NODE4, 9001, true), Be(202, NODE4, 9002, true)],
    ));
    setup.push(nodeport(30090, PROTO_TCP, FAM_V4, 2));
    setup.push(tunnel("10.244.2.0/24", PEER_NODE));
    setup.push(tunnel("192.0.2.2/32", PEER_NODE));
    let rig = Rig::new();
    rig.run(&setup, |dp: &Dp| {
        for sport in 41100..41116 {
            let syn = tcp(sport, NP_TCP, 0x02, b"");
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &tunnelled_naming(&syn, tag_of(OTHER_POD)));
            assert_eq!(ran.verdict, TC_ACT_REDIRECT, "flow {sport}");
            let seen = check(&ran.out);
            assert_eq!((seen.src, seen.dst, seen.dport), (ip(CLIENT), ip(OTHER_POD), 8080), "flow {sport}");
            assert_eq!(ran.moved, moved(&[("dsr_decap", 1), ("pkt_new_flow", 1)]), "flow {sport}: no fallback");
        }
        for (sport, dport, tag, what) in [
            (41200, NP_TCP, tag_of("10.244.9.9"), "a tag naming no local endpoint"),
            (41201, NP_TCP, 0, "no tag"),
            (41202, 30090, tag_of(NODE4), "a tag naming two endpoints"),
        ] {
            let syn = tcp(sport, dport, 0x02, b"");
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &tunnelled_naming(&syn, tag));
            let seen = check(&ran.out);
            assert_eq!(seen.src, ip(CLIENT), "{what}: still carried, client kept");
            let want = if dport == NP_TCP { [LOCAL_POD, OTHER_POD] } else { [NODE4, NODE4] };
            assert!(want.iter().any(|w| seen.dst == ip(w)), "{what}: one of this node's endpoints, got {:?}", seen.dst);
            assert_eq!(
                ran.moved,
                moved(&[("dsr_decap", 1), ("pkt_new_flow", 1), ("dsr_endpoint_fallback", 1)]),
                "{what}"
            );
        }
    });
}

/// A UDP flow the balancing node carries by DSR to a backend that went away
/// is stale by the conntrack rule (ferry_bpf::stale); once the agent deletes
/// it, the next datagram is balanced anew, to the backend serving now,
/// instead of still going to the old one. With no endpoint left it meets
/// the service's verdict (here: rejected) as a SNATed flow would.
#[test]
fn a_dsr_flow_to_a_removed_backend_is_balanced_anew_once_purged() {
    const NEW_POD: &str = "10.244.2.6";
    let rig = Rig::new();
    rig.run(&balancing(CFG_DSR_TCP | CFG_DSR_DGRAM, true), |dp: &Dp| {
        let dgram = udp(42100, NP_UDP, b"ferry udp payload");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&dgram));
        assert_tunnelled(&ran, &dgram, "first datagram");
        // The endpoint moves: 10.244.2.5 goes, 10.244.2.6 serves.
        let ops = service(2, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(103, NEW_POD, 5353, false)]);
        dp.maps.apply(&ops).unwrap();
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&dgram));
        assert_tunnelled(&ran, &dgram, "unpurged: still the old backend");

        let serving = |eps: &[&str]| {
            let set: BTreeSet<_> = eps.iter().map(|e| (words(&ip(e)), 5353)).collect();
            HashMap::from([(2, Serving::Endpoints(set))])
        };
        let held = dp.maps.dsr_entries();
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!((held[0].backend_addr, held[0].backend_port), (words(&ip(REMOTE_POD)), 5353));
        assert!(stale_udp_dsr_flows(&held, &serving(&[REMOTE_POD])).is_empty(), "serving: not stale");
        let stale = stale_udp_dsr_flows(&held, &serving(&[NEW_POD]));
        assert_eq!(dp.maps.delete_dsr(&stale), 1);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&dgram));
        assert_tunnelled_to(&ran, &dgram, NEW_POD, "purged: balanced anew");
        assert_eq!(ran.moved, moved(&[("dsr_new_flow", 1), ("dsr_encap", 1)]));

        // No endpoint left: the agent's action for it is reject.
        let mut ops = service(2, every_class(ACT_REJECT), 0, &[]);
        ops.push(MapOp::DelBackend(103));
        dp.maps.apply(&ops).unwrap();
        let stale = stale_udp_dsr_flows(&dp.maps.dsr_entries(), &serving(&[]));
        assert_eq!(dp.maps.delete_dsr(&stale), 1);
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &client_packet(&dgram));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "the port unreachable, sent back out");
        assert_eq!(ran.out[14 + 9], PROTO_ICMP, "an ICMP error, not a tunnel packet");
        assert_eq!(ran.moved, moved(&[("pkt_reject", 1)]), "refused as a SNATed flow would be");
    });
}
