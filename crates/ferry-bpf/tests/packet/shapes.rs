//! Packet shapes (the lab test `crates/ferry/tests/packet_shapes.rs` runs them with real traffic):
//! fragment translation and the SCTP CRC32c correction, checked byte by byte against checksums
//! recomputed here from scratch (CRC32c by a bitwise reference implementation, not the
//! datapath's table method). Cilium's three steps: build a packet, set up the maps, run the
//! program and check the verdict and the bytes it left.
//!
//! Same rig as every packet test (`main.rs`): the node's namespace and pins, the fast path on.
//!
//! ```text
//!  node netns:  eth0 (veth) 192.0.2.1/24, 2001:db8:1::1/64
//!               10.244.2.0/24 via 192.0.2.2, fd00:244:2::/64 via 2001:db8:1::2 (another node's pods)
//!  NodePort 30053/udp -> 10.244.2.5:5353 and [fd00:244:2::5]:5353, 30077/sctp -> 10.244.2.5:7000
//!  (masqueraded to the node's address)
//! ```

use crate::{Dp, Hook, PROTO_SCTP as IPPROTO_SCTP, PROTO_UDP as IPPROTO_UDP, Ran, Rig, TC_ACT_OK, TC_ACT_REDIRECT};
use ferry_bpf::MapOp;
use ferry_bpf::entries::*;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(crate) const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub(crate) const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
pub(crate) const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub(crate) const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 5);
pub(crate) const UDP_NODE_PORT: u16 = 30053;
const UDP_TARGET: u16 = 5353;
pub(crate) const SCTP_NODE_PORT: u16 = 30077;
const SCTP_TARGET: u16 = 7000;

fn w(ip: Ipv4Addr) -> Words {
    words(&IpAddr::V4(ip))
}

fn w6(ip: Ipv6Addr) -> Words {
    words(&IpAddr::V6(ip))
}

/// Services 1-3: NodePort 30053/udp (IPv4 and IPv6) and 30077/sctp on any node address, external
/// traffic forwarded to a backend on another node and masqueraded (eth0's SNAT address: [`device`]).
fn service_maps() -> Vec<MapOp> {
    let fwd = ACT_FORWARD_CLUSTER | ACT_MASQ;
    let mut ops = vec![
        MapOp::PutConfig(Box::new(Config {
            primary: [w(NODE), w6(NODE6)],
            udp_timeout: 30,
            tcp_syn_timeout: 30,
            tcp_established_timeout: 300,
            tcp_close_timeout: 10,
            nat_port_min: 1024,
            nat_port_max: 29999,
            ..Config::default()
        })),
        MapOp::PutLocal(LocalKey { addr: w(NODE), family: FAM_V4 }, LOCAL_HOST | LOCAL_NODEPORT),
        MapOp::PutLocal(LocalKey { addr: w6(NODE6), family: FAM_V6 }, LOCAL_HOST | LOCAL_NODEPORT),
    ];
    // One service per protocol and family: a backend has one port.
    for (service, family, proto, node_port, target) in [
        (1, FAM_V4, IPPROTO_UDP, UDP_NODE_PORT, UDP_TARGET),
        (2, FAM_V4, IPPROTO_SCTP, SCTP_NODE_PORT, SCTP_TARGET),
        (3, FAM_V6, IPPROTO_UDP, UDP_NODE_PORT, UDP_TARGET),
    ] {
        let backend = 6 + service;
        let addr = if family == FAM_V4 { w(BACKEND) } else { w6(BACKEND6) };
        ops.push(MapOp::PutBackend(backend, Backend { addr, port: target, family, flags: 0 }));
        ops.push(MapOp::PutSlot(SlotKey { service, rev: 0, set: SET_CLUSTER, slot: 0 }, backend));
        ops.push(MapOp::PutMember(MemberKey { service, backend }, 1 << SET_CLUSTER));
        ops.push(MapOp::PutService(
            service,
            SvcVal { count: [1, 0], action: [[fwd; 3]; 2], flags: 0, rev: 0, affinity_timeout: 0 },
        ));
        ops.push(MapOp::PutFrontend(
            FeKey { addr: [0; 4], port: node_port, proto, family },
            FeVal { service, kind: FE_NODE_PORT, flags: 0 },
        ));
    }
    ops
}

/// eth0 as an uplink whose SNAT addresses are the node's (its ifindex is known inside the rig).
fn device(eth0: u32) -> MapOp {
    MapOp::PutDevice(eth0, Box::new(Device { snat: [w(NODE), w6(NODE6)], flags: DEV_EXTERNAL }))
}

/// Runs `f` in the packet rig with the services above.
pub(crate) fn with_services(f: impl FnOnce(&Dp) + Send) {
    let rig = Rig::new();
    rig.run(&service_maps(), |dp| {
        dp.maps.apply(&[device(dp.eth0)]).expect("writing eth0's device entry");
        f(dp)
    })
}

impl Dp<'_> {
    /// Runs the uplink's ingress program on `frame`, as if it arrived on eth0.
    pub(crate) fn run_from_netdev(&self, frame: &[u8]) -> Ran {
        self.run(Hook::FromNetdev, self.eth0, frame)
    }
}

// ---- packets ----

pub(crate) const ETH: usize = 14;

/// The Internet checksum of `data` (ones' complement of the ones' complement sum).
pub(crate) fn inet_csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// CRC32c, bit by bit (RFC 3309): the reference the datapath's correction must agree with.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Ethernet + IPv4 header (no options) around `l4`: identification `id`, fragment offset
/// `offset` (in 8-byte units), more-fragments flag `more`.
pub(crate) fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, offset: u16, more: bool, l4: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    let total = (20 + l4.len()) as u16;
    let frag = offset | if more { 0x2000 } else { 0 };
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&id.to_be_bytes());
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = inet_csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend_from_slice(l4);
    f
}

/// A UDP datagram (header + payload) with its checksum over the IPv4 pseudo-header.
pub(crate) fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut d = Vec::new();
    d.extend_from_slice(&sport.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let c = udp_csum(src, dst, &d);
    d[6..8].copy_from_slice(&c.to_be_bytes());
    d
}

fn udp_csum(src: Ipv4Addr, dst: Ipv4Addr, datagram_with_zero_csum: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&(datagram_with_zero_csum.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(datagram_with_zero_csum);
    match inet_csum(&pseudo) {
        0 => 0xffff,
        c => c,
    }
}

/// An SCTP packet: common header with a correct CRC32c, one INIT chunk, `extra` bytes of padding
/// parameters (so the port bytes are far from the end).
pub(crate) fn sctp_init(sport: u16, dport: u16, extra: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0; 8]); // verification tag 0 (INIT), checksum
    let params: Vec<u8> = (0..extra).map(|i| (i * 7 + 3) as u8).collect();
    let chunk_len = (20 + 4 + params.len()) as u16;
    p.extend_from_slice(&[1, 0]);
    p.extend_from_slice(&chunk_len.to_be_bytes());
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65535u32.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0, 1]);
    p.extend_from_slice(&1u32.to_be_bytes());
    // An unrecognized-but-skippable parameter (type 0x8000 | n) carrying the filler.
    p.extend_from_slice(&0x8abcu16.to_be_bytes());
    p.extend_from_slice(&((4 + params.len()) as u16).to_be_bytes());
    p.extend_from_slice(&params);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    let c = crc32c(&p);
    p[8..12].copy_from_slice(&c.to_le_bytes());
    p
}

/// Ethernet + IPv6 header around `rest` (extension headers and transport), first header `next`.
pub(crate) fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, rest: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(rest);
    f
}

/// An 8-byte extension header (hop-by-hop, routing or destination options) whose next header is `next`.
fn ext8(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header: next header `next`, offset in 8-byte units, more-fragments flag, identification.
pub(crate) fn frag6(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

fn udp6_csum(src: Ipv6Addr, dst: Ipv6Addr, datagram_with_zero_csum: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(datagram_with_zero_csum.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
    pseudo.extend_from_slice(datagram_with_zero_csum);
    match inet_csum(&pseudo) {
        0 => 0xffff,
        c => c,
    }
}

pub(crate) fn addr6(b: &[u8], at: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).unwrap())
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Checks the IPv4 header checksum of a frame's header.
pub(crate) fn assert_ip_csum(frame: &[u8], what: &str) {
    assert_eq!(inet_csum(&frame[ETH..ETH + 20]), 0, "{what}: IPv4 header checksum");
}

#[test]
fn later_fragments_are_translated_as_their_first_fragment_was() {
    with_services(|dp| {
        // A 48-byte UDP payload in two fragments: UDP header + 16 bytes, then 32 bytes at offset 24.
        let payload: Vec<u8> = (0..48u8).collect();
        let datagram = udp(CLIENT, NODE, 40000, UDP_NODE_PORT, &payload);
        let (head, tail) = datagram.split_at(24);
        let first = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x1234, 0, true, head);
        let later = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x1234, 3, false, tail);

        let r = dp.run_from_netdev(&first);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "the first fragment goes out to the backend's node");
        assert_ip_csum(&r.out, "first fragment");
        let (src, dst) = (addr(&r.out, ETH + 12), addr(&r.out, ETH + 16));
        assert_eq!((src, dst), (NODE, BACKEND), "first fragment: SNAT to the node, DNAT to the backend");
        let l4 = ETH + 20;
        let sport = be16(&r.out, l4);
        assert_eq!(be16(&r.out, l4 + 2), UDP_TARGET, "first fragment: the backend's port");
        assert_eq!(be16(&r.out, ETH + 6), 0x2000, "offset 0, MF set");
        // The UDP checksum covers the whole datagram: recompute it over the translated header,
        // the first fragment's data as it left and the later fragment's data.
        let mut whole = r.out[l4..].to_vec();
        let stored = be16(&whole, 6);
        whole[6..8].copy_from_slice(&[0, 0]);
        whole.extend_from_slice(tail);
        assert_eq!(stored, udp_csum(NODE, BACKEND, &whole), "the UDP checksum after translation");
        assert_eq!(r.moved.get("frag_first"), Some(&1), "{:?}", r.moved);
        assert_eq!(r.moved.get("pkt_new_flow"), Some(&1), "{:?}", r.moved);
        assert!(sport >= 1024, "a NAT port: {sport}");

        let r = dp.run_from_netdev(&later);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "the later fragment follows the first");
        assert_ip_csum(&r.out, "later fragment");
        assert_eq!((addr(&r.out, ETH + 12), addr(&r.out, ETH + 16)), (NODE, BACKEND), "later fragment");
        assert_eq!(&r.out[ETH + 20..], tail, "the later fragment's data is untouched");
        assert_eq!(r.out[ETH + 8], 63, "TTL decremented as for the first fragment");
        assert_eq!(r.moved, BTreeMap::from([("frag_forward", 1)]), "counted as a translated later fragment");

        // A later fragment whose first fragment was never seen: passed on untouched, counted.
        let stray = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x9999, 3, false, tail);
        let r = dp.run_from_netdev(&stray);
        assert_eq!(r.verdict, TC_ACT_OK);
        assert_eq!(r.out, stray, "untouched");
        assert_eq!(r.moved, BTreeMap::from([("frag_miss", 1)]));
    });
}

#[test]
fn sctp_port_translation_keeps_the_crc32c_right() {
    with_services(|dp| {
        // Short and long packets: the correction's shift covers few and many bits of the distance.
        for (k, extra) in [0usize, 1, 37, 1200].into_iter().enumerate() {
            let what = format!("INIT with {extra} filler bytes");
            let sport = 50000 + k as u16;
            let init = sctp_init(sport, SCTP_NODE_PORT, extra);
            let r = dp.run_from_netdev(&ipv4(CLIENT, NODE, IPPROTO_SCTP, 1, 0, false, &init));
            assert_eq!(r.verdict, TC_ACT_REDIRECT, "{what}: forwarded, {:?}", r.moved);
            let l4 = ETH + 20;
            assert_eq!((addr(&r.out, ETH + 12), addr(&r.out, ETH + 16)), (NODE, BACKEND), "{what}");
            assert_eq!((be16(&r.out, l4), be16(&r.out, l4 + 2)), (sport, SCTP_TARGET), "{what}: ports");
            let mut sctp = r.out[l4..].to_vec();
            let stored = u32::from_le_bytes([sctp[8], sctp[9], sctp[10], sctp[11]]);
            sctp[8..12].fill(0);
            assert_eq!(stored, crc32c(&sctp), "{what}: CRC32c after DNAT");
            assert_eq!(r.moved.get("sctp_csum_fix"), Some(&1), "{what}: {:?}", r.moved);

            // The backend's answer comes back to the node (SCTP SNAT keeps the source port) and
            // leaves with the NodePort as its source port.
            let answer = sctp_init(SCTP_TARGET, sport, extra);
            let r = dp.run_from_netdev(&ipv4(BACKEND, NODE, IPPROTO_SCTP, 2, 0, false, &answer));
            assert_eq!((addr(&r.out, ETH + 12), addr(&r.out, ETH + 16)), (NODE, CLIENT), "{what}: reply");
            assert_eq!((be16(&r.out, l4), be16(&r.out, l4 + 2)), (SCTP_NODE_PORT, sport), "{what}: reply ports");
            let mut sctp = r.out[l4..].to_vec();
            let stored = u32::from_le_bytes([sctp[8], sctp[9], sctp[10], sctp[11]]);
            sctp[8..12].fill(0);
            assert_eq!(stored, crc32c(&sctp), "{what}: CRC32c after the reverse translation");
        }
    });
}

const NH_HOPOPTS: u8 = 0;
const NH_ROUTING: u8 = 43;
pub(crate) const NH_FRAGMENT: u8 = 44;
const NH_DSTOPTS: u8 = 60;

#[test]
fn ipv6_extension_headers_are_walked_and_fragments_tracked() {
    with_services(|dp| {
        // The datagram: destination options (8) + UDP header (8) + 48 bytes, fragmented after 32
        // bytes of the fragmentable part: [frag | dstopts | udp hdr | 16 bytes], [frag | 32 bytes].
        let payload: Vec<u8> = (100..148u8).collect();
        let mut dgram = vec![0u8; 8];
        dgram[0..2].copy_from_slice(&40000u16.to_be_bytes());
        dgram[2..4].copy_from_slice(&UDP_NODE_PORT.to_be_bytes());
        dgram[4..6].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        dgram.extend_from_slice(&payload);
        let c = udp6_csum(CLIENT6, NODE6, &dgram);
        dgram[6..8].copy_from_slice(&c.to_be_bytes());
        let fragmentable: Vec<u8> = ext8(IPPROTO_UDP).iter().copied().chain(dgram.iter().copied()).collect();
        let (head, tail) = fragmentable.split_at(32);
        let first =
            ipv6(CLIENT6, NODE6, NH_FRAGMENT, &[frag6(NH_DSTOPTS, 0, true, 0xabcd_ef01), head.to_vec()].concat());
        let later =
            ipv6(CLIENT6, NODE6, NH_FRAGMENT, &[frag6(NH_DSTOPTS, 4, false, 0xabcd_ef01), tail.to_vec()].concat());

        let r = dp.run_from_netdev(&first);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "first fragment through fragment + destination options: {:?}", r.moved);
        assert_eq!((addr6(&r.out, ETH + 8), addr6(&r.out, ETH + 24)), (NODE6, BACKEND6), "first fragment: NAT");
        let udp_at = ETH + 40 + 8 + 8;
        assert_eq!(be16(&r.out, udp_at + 2), UDP_TARGET, "first fragment: the backend's port");
        let mut whole = r.out[udp_at..].to_vec();
        let stored = be16(&whole, 6);
        whole[6..8].copy_from_slice(&[0, 0]);
        whole.extend_from_slice(tail);
        assert_eq!(stored, udp6_csum(NODE6, BACKEND6, &whole), "the UDP checksum after translation");
        assert_eq!(r.moved.get("frag_first"), Some(&1), "{:?}", r.moved);

        let r = dp.run_from_netdev(&later);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "the later fragment follows the first");
        assert_eq!((addr6(&r.out, ETH + 8), addr6(&r.out, ETH + 24)), (NODE6, BACKEND6), "later fragment");
        assert_eq!(&r.out[ETH + 48..], tail, "the later fragment's data is untouched");
        assert_eq!(r.moved, BTreeMap::from([("frag_forward", 1)]));

        // Unfragmented, with a destination-options header: translated.
        let small = ipv6(CLIENT6, NODE6, NH_DSTOPTS, &[ext8(IPPROTO_UDP).to_vec(), dgram.clone()].concat());
        let r = dp.run_from_netdev(&small);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "destination options, unfragmented: {:?}", r.moved);
        assert_eq!(be16(&r.out, ETH + 48 + 2), UDP_TARGET);

        // Five extension headers, one more than the walk's bound: passed untouched, counted.
        let chain =
            [ext8(NH_DSTOPTS), ext8(NH_ROUTING), ext8(NH_DSTOPTS), ext8(NH_DSTOPTS), ext8(IPPROTO_UDP)].concat();
        let long = ipv6(CLIENT6, NODE6, NH_HOPOPTS, &[chain, dgram].concat());
        let r = dp.run_from_netdev(&long);
        assert_eq!(r.verdict, TC_ACT_OK, "left to the kernel");
        assert_eq!(r.out, long, "untouched");
        assert_eq!(r.moved, BTreeMap::from([("ipv6_ext_limit", 1)]));
    });
}
