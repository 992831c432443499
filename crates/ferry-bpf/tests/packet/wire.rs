//! Packets on the wire, built and checked in the test, independently of the C
//! datapath: Ethernet + IPv4/IPv6 + TCP/UDP/SCTP/ICMP with every checksum
//! computed here from scratch (RFC 1071 sums, CRC32c for SCTP).

use std::net::IpAddr;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// One's-complement sum of 16-bit big-endian words (odd length padded with zero).
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    for chunk in data.chunks(2) {
        let hi = u64::from(chunk[0]) << 8;
        let lo = chunk.get(1).copied().map(u64::from).unwrap_or(0);
        acc += hi | lo;
    }
    acc
}

/// Folds a sum to 16 bits and complements it: the checksum field value.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The pseudo-header sum of TCP/UDP/ICMPv6 (RFC 793, 768, 8200).
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let mut acc = sum16(&octets(src), 0);
    acc = sum16(&octets(dst), acc);
    acc + u64::from(proto) + len as u64
}

/// An L4 segment: protocol, header and payload; its checksum is filled in by [`ip_packet`].
#[derive(Debug, Clone)]
pub struct L4 {
    pub proto: u8,
    pub bytes: Vec<u8>,
}

pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> L4 {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    b.extend_from_slice(&(if flags & 0x10 != 0 { 0x0a0b_0c0du32 } else { 0 }).to_be_bytes());
    b.push(0x50); // data offset 5
    b.push(flags);
    b.extend_from_slice(&64240u16.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    b.extend_from_slice(payload);
    L4 { proto: PROTO_TCP, bytes: b }
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> L4 {
    let mut b = Vec::with_capacity(8 + payload.len());
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(payload);
    L4 { proto: PROTO_UDP, bytes: b }
}

/// SCTP common header + an INIT chunk; the CRC32c is filled in by [`ip_packet`].
pub fn sctp_init(sport: u16, dport: u16) -> L4 {
    let mut b = Vec::new();
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]); // verification tag: 0 in INIT
    b.extend_from_slice(&[0, 0, 0, 0]); // checksum
    // INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, initial TSN.
    b.extend_from_slice(&[1, 0, 0, 20]);
    b.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    b.extend_from_slice(&65535u32.to_be_bytes());
    b.extend_from_slice(&[0, 10, 0, 10]);
    b.extend_from_slice(&0x5566_7788u32.to_be_bytes());
    L4 { proto: PROTO_SCTP, bytes: b }
}

/// An ICMP (v4 or v6, by `proto`) message of `typ`/`code` with 4 bytes of
/// `rest` and a body (the quoted packet for errors).
pub fn icmp(proto: u8, typ: u8, code: u8, rest: [u8; 4], body: &[u8]) -> L4 {
    let mut b = vec![typ, code, 0, 0];
    b.extend_from_slice(&rest);
    b.extend_from_slice(body);
    L4 { proto, bytes: b }
}

/// The CRC32c of an SCTP packet as stored in its header (checksum field zeroed first).
pub fn sctp_crc(seg: &[u8]) -> [u8; 4] {
    let mut z = seg.to_vec();
    z[8..12].fill(0);
    crc32c::crc32c(&z).to_le_bytes()
}

/// Options of the IP header the tests vary.
#[derive(Debug, Clone, Copy)]
pub struct IpOpts {
    pub ttl: u8,
    /// IPv4 identification and flags/fragment word.
    pub id: u16,
    pub frag: u16,
    /// A UDP checksum of zero over IPv4 ("none").
    pub udp_no_csum: bool,
}

impl Default for IpOpts {
    fn default() -> Self {
        IpOpts { ttl: 64, id: 0x1234, frag: 0x4000, udp_no_csum: false }
    }
}

/// The L4 segment with its checksum computed for (src, dst).
pub fn with_l4_csum(src: IpAddr, dst: IpAddr, l4: &L4, opts: IpOpts) -> Vec<u8> {
    let mut seg = l4.bytes.clone();
    let len = seg.len();
    match l4.proto {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 | PROTO_ICMP => {
            let off = match l4.proto {
                PROTO_TCP => 16,
                PROTO_UDP => 6,
                _ => 2,
            };
            seg[off..off + 2].fill(0);
            if l4.proto == PROTO_UDP && opts.udp_no_csum && src.is_ipv4() {
                return seg;
            }
            let base = if l4.proto == PROTO_ICMP { 0 } else { pseudo(src, dst, l4.proto, len) };
            let mut c = fold(sum16(&seg, base));
            if l4.proto == PROTO_UDP && c == 0 {
                c = 0xffff;
            }
            seg[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        PROTO_SCTP => {
            let crc = sctp_crc(&seg);
            seg[8..12].copy_from_slice(&crc);
        }
        _ => {}
    }
    seg
}

/// An IP packet (no Ethernet header) carrying `l4`, every checksum computed here.
pub fn ip_packet(src: IpAddr, dst: IpAddr, l4: &L4, opts: IpOpts) -> Vec<u8> {
    let seg = with_l4_csum(src, dst, l4, opts);
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.push(0x45);
            p.push(0);
            p.extend_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
            p.extend_from_slice(&opts.id.to_be_bytes());
            p.extend_from_slice(&opts.frag.to_be_bytes());
            p.push(opts.ttl);
            p.push(l4.proto);
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let c = fold(sum16(&p, 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            p.push(l4.proto);
            p.push(opts.ttl);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families {src} -> {dst}"),
    }
    p.extend_from_slice(&seg);
    p
}

/// Ethernet framing of an IP packet.
pub fn eth(dst_mac: [u8; 6], src_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + ip_packet.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    let ethertype: u16 = if ip_packet[0] >> 4 == 4 { 0x0800 } else { 0x86dd };
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip_packet);
    f
}

/// A frame from the client's MAC to the node's.
pub fn frame(src: IpAddr, dst: IpAddr, l4: &L4, opts: IpOpts) -> Vec<u8> {
    eth(NODE_MAC, CLIENT_MAC, &ip_packet(src, dst, l4, opts))
}

/// The fields of a frame the assertions name, read back from the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
}

/// Parses a frame and checks every checksum it carries from scratch: the
/// IPv4 header, the TCP/UDP/ICMP/ICMPv6 checksum (pseudo-header included),
/// SCTP's CRC32c. Panics naming the first one that is wrong.
pub fn check(frame: &[u8]) -> Seen {
    assert!(frame.len() >= 34, "frame too short: {} bytes", frame.len());
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let l3 = &frame[14..];
    let (src, dst, proto, ttl, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(l3[0] & 0x0f) * 4;
            let tot = usize::from(u16::from_be_bytes([l3[2], l3[3]]));
            assert_eq!(tot, l3.len(), "IPv4 total length against the frame");
            assert_eq!(fold(sum16(&l3[..ihl], 0)), 0, "IPv4 header checksum");
            let s: [u8; 4] = l3[12..16].try_into().unwrap();
            let d: [u8; 4] = l3[16..20].try_into().unwrap();
            (IpAddr::from(s), IpAddr::from(d), l3[9], l3[8], &l3[ihl..])
        }
        0x86dd => {
            let plen = usize::from(u16::from_be_bytes([l3[4], l3[5]]));
            assert_eq!(plen + 40, l3.len(), "IPv6 payload length against the frame");
            let s: [u8; 16] = l3[8..24].try_into().unwrap();
            let d: [u8; 16] = l3[24..40].try_into().unwrap();
            (IpAddr::from(s), IpAddr::from(d), l3[6], l3[7], &l3[40..])
        }
        other => panic!("not IP: ethertype {other:#06x}"),
    };
    let (mut sport, mut dport) = (0, 0);
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let off = if proto == PROTO_TCP { 16 } else { 6 };
            let stored = u16::from_be_bytes([l4[off], l4[off + 1]]);
            if !(proto == PROTO_UDP && stored == 0 && src.is_ipv4()) {
                assert_eq!(fold(sum16(l4, pseudo(src, dst, proto, l4.len()))), 0, "L4 checksum (proto {proto})");
            }
            sport = u16::from_be_bytes([l4[0], l4[1]]);
            dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        PROTO_ICMP => assert_eq!(fold(sum16(l4, 0)), 0, "ICMP checksum"),
        PROTO_ICMPV6 => {
            assert_eq!(fold(sum16(l4, pseudo(src, dst, proto, l4.len()))), 0, "ICMPv6 checksum")
        }
        PROTO_SCTP => {
            assert_eq!(l4[8..12], sctp_crc(l4), "SCTP CRC32c");
            sport = u16::from_be_bytes([l4[0], l4[1]]);
            dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        _ => {}
    }
    Seen { src, dst, proto, ttl, sport, dport }
}

/// A DSR tunnel packet (IPv4 in IPv4) built here: `inner` (an IP packet)
/// behind an outer header `src -> dst`, protocol 4, TTL 64, don't-fragment,
/// its checksum computed here.
pub fn ipip(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, inner[1]];
    p.extend_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = fold(sum16(&p, 0));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(inner);
    p
}

/// Parses a DSR tunnel frame: checks the outer header from scratch (version,
/// length, protocol 4, no options, header checksum) and returns its
/// addresses, TTL and don't-fragment bit with the inner packet re-framed
/// with the same MAC addresses, for [`check`].
pub fn check_ipip(frame: &[u8]) -> (IpAddr, IpAddr, u8, bool, Vec<u8>) {
    assert!(frame.len() >= 14 + 40, "frame too short for IPIP: {} bytes", frame.len());
    assert_eq!(u16::from_be_bytes([frame[12], frame[13]]), 0x0800, "outer ethertype");
    let l3 = &frame[14..];
    assert_eq!(l3[0], 0x45, "outer header: IPv4 without options");
    assert_eq!(usize::from(u16::from_be_bytes([l3[2], l3[3]])), l3.len(), "outer total length against the frame");
    assert_eq!(fold(sum16(&l3[..20], 0)), 0, "outer IPv4 header checksum");
    assert_eq!(l3[9], 4, "outer protocol IPIP");
    let s: [u8; 4] = l3[12..16].try_into().unwrap();
    let d: [u8; 4] = l3[16..20].try_into().unwrap();
    let df = u16::from_be_bytes([l3[6], l3[7]]) == 0x4000;
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(&l3[20..]);
    (IpAddr::from(s), IpAddr::from(d), l3[8], df, inner)
}

/// A DSR tunnel packet (IPv6 in IPv6) built here: `inner` (an IPv6 packet)
/// behind an outer header `src -> dst`, next header 41, hop limit 64, the
/// inner traffic class and flow label `label`.
pub fn ip6ip6(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, label: u32, inner: &[u8]) -> Vec<u8> {
    let tclass = u32::from(inner[0] & 0x0f) << 4 | u32::from(inner[1] >> 4);
    let first = 6 << 28 | tclass << 20 | (label & 0xfffff);
    let mut p = first.to_be_bytes().to_vec();
    p.extend_from_slice(&(inner.len() as u16).to_be_bytes());
    p.extend_from_slice(&[41, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(inner);
    p
}

/// What [`check_ip6ip6`] reads from an outer IPv6 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outer6 {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub hop_limit: u8,
    pub tclass: u8,
    pub label: u32,
}

/// Parses an IPv6-in-IPv6 DSR tunnel frame: checks the outer header from
/// scratch (ethertype, version, payload length against the frame, next
/// header 41) and returns its fields with the inner packet re-framed with
/// the same MAC addresses, for [`check`].
pub fn check_ip6ip6(frame: &[u8]) -> (Outer6, Vec<u8>) {
    assert!(frame.len() >= 14 + 80, "frame too short for IPv6 in IPv6: {} bytes", frame.len());
    assert_eq!(u16::from_be_bytes([frame[12], frame[13]]), 0x86dd, "outer ethertype");
    let l3 = &frame[14..];
    let first = u32::from_be_bytes([l3[0], l3[1], l3[2], l3[3]]);
    assert_eq!(first >> 28, 6, "outer header: IPv6");
    assert_eq!(
        usize::from(u16::from_be_bytes([l3[4], l3[5]])) + 40,
        l3.len(),
        "outer payload length against the frame"
    );
    assert_eq!(l3[6], 41, "outer next header: IPv6");
    let s: [u8; 16] = l3[8..24].try_into().unwrap();
    let d: [u8; 16] = l3[24..40].try_into().unwrap();
    let outer = Outer6 {
        src: IpAddr::from(s),
        dst: IpAddr::from(d),
        hop_limit: l3[7],
        tclass: (first >> 20) as u8,
        label: first & 0xfffff,
    };
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(&l3[40..]);
    (outer, inner)
}
