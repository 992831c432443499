//! SCTP without an SCTP stack: the probe speaks just enough SCTP over raw
//! sockets (an INIT, answered by an INIT-ACK whose state cookie carries the
//! server's JSON view) to send a real SCTP first packet through a datapath and
//! learn where it arrived.
//!
//! Kernels built without SCTP (`CONFIG_IP_SCTP` unset) cannot open SCTP
//! sockets, but raw sockets still carry protocol 132 both ways. No SCTP
//! library does this handshake-only exchange, hence this module.

use super::{Endpoint, Observation, ProbeError, Reply, ServerReply, Stage};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

pub const IPPROTO_SCTP: i32 = 132;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const PARAM_STATE_COOKIE: u16 = 7;
/// RFC 4820's Padding parameter: its high bits (10) tell a receiver to skip it, so it only makes
/// the chunk (and the packet) as long as a test wants, e.g. longer than the MTU, so it fragments.
const PARAM_PADDING: u16 = 0x8005;
/// The longest SCTP packet read (a padded INIT is IP-fragmented and read whole after reassembly).
const MAX_PACKET: usize = 65536;

/// A Padding parameter of `len` bytes (4-byte header included, at least 4), or nothing for 0.
fn padding_param(len: usize) -> Vec<u8> {
    if len == 0 {
        return Vec::new();
    }
    let len = len.clamp(4, 60000) & !3;
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&PARAM_PADDING.to_be_bytes());
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.resize(len, 0);
    p
}

fn raw_socket(family: Domain, protocol: i32) -> io::Result<Socket> {
    Socket::new(family, Type::RAW, Some(Protocol::from(protocol)))
}

/// Fills in the SCTP checksum (CRC32c over the packet with the field zeroed,
/// stored little-endian as Linux does).
fn seal(packet: &mut [u8]) {
    packet[8..12].fill(0);
    let crc = crc32c::crc32c(packet);
    packet[8..12].copy_from_slice(&crc.to_le_bytes());
}

fn common_header(sport: u16, dport: u16, vtag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

fn init_chunk(kind: u8, init_tag: u32, params: &[u8]) -> Vec<u8> {
    let len = 20 + params.len();
    let mut c = vec![kind, 0];
    c.extend_from_slice(&(len as u16).to_be_bytes());
    c.extend_from_slice(&init_tag.to_be_bytes());
    c.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    c.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    c.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    c.extend_from_slice(&init_tag.to_be_bytes()); // initial TSN
    c.extend_from_slice(params);
    while c.len() % 4 != 0 {
        c.push(0);
    }
    c
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into the buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_ne_bytes(b).max(1)
}

/// The SCTP part of a received datagram (IPv4 raw sockets include the IP header; IPv6 ones do not).
fn sctp_payload(buf: &[u8], v6: bool) -> Option<&[u8]> {
    if v6 {
        return Some(buf);
    }
    let ihl = usize::from(*buf.first()? & 0x0f) * 4;
    buf.get(ihl..)
}

struct Parsed {
    sport: u16,
    dport: u16,
    vtag: u32,
    chunk: u8,
    init_tag: u32,
    cookie: Option<Vec<u8>>,
}

/// Whether the packet's CRC32c is right, as an SCTP stack checks before anything else: a NAT that
/// changes a port without correcting it gets its packets ignored here, as a real receiver would.
fn checksum_ok(p: &[u8]) -> bool {
    let Some(stored) = p.get(8..12) else { return false };
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&p[..8]), &[0; 4]);
    crc32c::crc32c_append(crc, &p[12..]) == stored
}

/// The packet's fields, or None when it is too short or its checksum is wrong.
fn parse(p: &[u8]) -> Option<Parsed> {
    if p.len() < 12 + 20 || !checksum_ok(p) {
        return None;
    }
    let be16 = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
    let be32 = |o: usize| u32::from_be_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
    let chunk = p[12];
    let chunk_len = usize::from(be16(14));
    let mut cookie = None;
    let mut off = 12 + 20;
    while off + 4 <= (12 + chunk_len).min(p.len()) {
        let (ty, len) = (be16(off), usize::from(be16(off + 2)));
        if len < 4 || off + len > p.len() {
            break;
        }
        if ty == PARAM_STATE_COOKIE {
            cookie = Some(p[off + 4..off + len].to_vec());
        }
        off += len.div_ceil(4) * 4;
    }
    Some(Parsed { sport: be16(0), dport: be16(2), vtag: be32(4), chunk, init_tag: be32(16), cookie })
}

fn recv(socket: &Socket, buf: &mut [MaybeUninit<u8>]) -> io::Result<(usize, SocketAddr)> {
    let (n, from) = socket.recv_from(buf)?;
    let from = from.as_socket().ok_or_else(|| io::Error::other("raw datagram without an IP source"))?;
    Ok((n, from))
}

fn init_bytes(buf: &[MaybeUninit<u8>], n: usize) -> &[u8] {
    // SAFETY: recv_from initialised the first `n` bytes.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) }
}

/// Serves SCTP on `endpoint` (a raw socket bound to its address) until an
/// error; calls `ready` once the socket is bound.
pub fn serve(name: &str, endpoint: Endpoint, ready: impl FnOnce()) -> io::Result<()> {
    let v6 = endpoint.addr.is_ipv6();
    let socket = bind_raw(endpoint.addr.ip())?;
    ready();
    let mut buf = vec![MaybeUninit::<u8>::uninit(); MAX_PACKET];
    loop {
        let (n, from) = match recv(&socket, &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Some(request) = sctp_payload(init_bytes(&buf, n), v6) else { continue };
        let request_len = request.len();
        let Some(p) = parse(request) else { continue };
        if p.chunk != CHUNK_INIT || p.dport != endpoint.addr.port() {
            continue;
        }
        let peer = SocketAddr::new(from.ip(), p.sport);
        let reply = ServerReply { server: name.to_owned(), local: endpoint.addr, peer };
        let json = serde_json::to_vec(&reply).expect("replies always serialize");
        let mut param = Vec::new();
        param.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
        param.extend_from_slice(&((4 + json.len()) as u16).to_be_bytes());
        param.extend_from_slice(&json);
        while param.len() % 4 != 0 {
            param.push(0);
        }
        // As long as the INIT: a padded (fragmented) INIT gets a fragmented INIT-ACK.
        let short = 12 + 20 + param.len();
        if request_len > short + 4 {
            param.extend(padding_param(request_len - short));
        }
        let mut out = common_header(p.dport, p.sport, p.init_tag);
        out.extend(init_chunk(CHUNK_INIT_ACK, random_u32(), &param));
        seal(&mut out);
        socket.send_to(&out, &SockAddr::from(SocketAddr::new(from.ip(), 0)))?;
    }
}

fn bind_raw(ip: IpAddr) -> io::Result<Socket> {
    let domain = if ip.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let socket = raw_socket(domain, IPPROTO_SCTP)?;
    socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    Ok(socket)
}

/// The source address the kernel would pick towards `dst` (a connected UDP socket's name).
fn source_towards(dst: IpAddr) -> Option<IpAddr> {
    let any: SocketAddr = if dst.is_ipv6() { "[::]:0".parse().ok()? } else { "0.0.0.0:0".parse().ok()? };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(SocketAddr::new(dst, 9)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Whether an ICMP(v6) error quotes our SCTP packet (by source port), and if so what it says.
fn icmp_verdict(buf: &[u8], v6: bool, sport: u16) -> Option<Observation> {
    let (ty, code, inner) = if v6 {
        (*buf.first()?, *buf.get(1)?, buf.get(8..)?)
    } else {
        let ihl = usize::from(*buf.first()? & 0x0f) * 4;
        let icmp = buf.get(ihl..)?;
        (*icmp.first()?, *icmp.get(1)?, icmp.get(8..)?)
    };
    let (inner_proto, l4) = if v6 {
        (*inner.get(6)?, inner.get(40..)?)
    } else {
        let ihl = usize::from(*inner.first()? & 0x0f) * 4;
        (*inner.get(9)?, inner.get(ihl..)?)
    };
    if i32::from(inner_proto) != IPPROTO_SCTP || u16::from_be_bytes([*l4.first()?, *l4.get(1)?]) != sport {
        return None;
    }
    let port_unreachable = if v6 { ty == 1 && code == 4 } else { ty == 3 && code == 3 };
    if port_unreachable {
        Some(Observation::Refused { errno: "ECONNREFUSED".into() })
    } else if (v6 && ty == 1) || (!v6 && ty == 3) {
        Some(Observation::Unreachable { errno: "EHOSTUNREACH".into() })
    } else {
        None
    }
}

/// One SCTP attempt: an INIT to `target` (`pad` bytes longer, in a Padding parameter: longer than
/// the MTU, the kernel sends it as IP fragments), waiting for an INIT-ACK or an ICMP error.
pub fn connect(
    target: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
    pad: usize,
) -> Result<Observation, ProbeError> {
    let v6 = target.is_ipv6();
    let fail = |doing: &str, e: io::Error| Observation::Error { errno: None, message: format!("{doing}: {e}") };
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = match raw_socket(domain, IPPROTO_SCTP) {
        Ok(s) => s,
        Err(e) => return Ok(fail("opening a raw SCTP socket", e)),
    };
    let icmp = match raw_socket(domain, if v6 { libc::IPPROTO_ICMPV6 } else { libc::IPPROTO_ICMP }) {
        Ok(s) => s,
        Err(e) => return Ok(fail("opening a raw ICMP socket", e)),
    };
    if let Some(ip) = bind
        && let Err(e) = socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))
    {
        return Ok(fail("binding", e));
    }
    let local_ip = bind.or_else(|| source_towards(target.ip())).unwrap_or(target.ip());
    let sport = 49152 + (random_u32() % 16384) as u16;
    let tag = random_u32();
    let mut init = common_header(sport, target.port(), 0);
    init.extend(init_chunk(CHUNK_INIT, tag, &padding_param(pad)));
    seal(&mut init);
    if let Err(e) = socket.send_to(&init, &SockAddr::from(SocketAddr::new(target.ip(), 0))) {
        return Ok(fail("sending the INIT", e));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = vec![MaybeUninit::<u8>::uninit(); MAX_PACKET];
    for s in [&socket, &icmp] {
        let _ = s.set_nonblocking(true);
    }
    while Instant::now() < deadline {
        if let Ok((n, from)) = recv(&socket, &mut buf)
            && let Some(p) = sctp_payload(init_bytes(&buf, n), v6).and_then(parse)
            && p.chunk == CHUNK_INIT_ACK
            && p.dport == sport
            && p.sport == target.port()
            && p.vtag == tag
        {
            let Some(reply) = p.cookie.as_deref().and_then(|c| {
                let end = c.iter().position(|b| *b == 0).unwrap_or(c.len());
                serde_json::from_slice::<ServerReply>(&c[..end]).ok()
            }) else {
                return Ok(Observation::Error { errno: None, message: "INIT-ACK without a readable cookie".into() });
            };
            return Ok(Observation::Reply(Reply {
                server: reply.server,
                server_local: reply.local,
                server_peer: reply.peer,
                client_local: SocketAddr::new(local_ip, sport),
                client_peer: SocketAddr::new(from.ip(), p.sport),
            }));
        }
        if let Ok((n, _)) = recv(&icmp, &mut buf)
            && let Some(obs) = icmp_verdict(init_bytes(&buf, n), v6, sport)
        {
            return Ok(obs);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Observation::Timeout { stage: Stage::Connect })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_init_ack_round_trip() {
        let mut p = common_header(40000, 53, 0);
        p.extend(init_chunk(CHUNK_INIT, 0xdead_beef, &[]));
        seal(&mut p);
        let parsed = parse(&p).unwrap();
        assert_eq!((parsed.sport, parsed.dport, parsed.chunk, parsed.init_tag), (40000, 53, CHUNK_INIT, 0xdead_beef));

        let json = br#"{"x":1}"#;
        let mut param = PARAM_STATE_COOKIE.to_be_bytes().to_vec();
        param.extend_from_slice(&((4 + json.len()) as u16).to_be_bytes());
        param.extend_from_slice(json);
        param.push(0);
        let mut ack = common_header(53, 40000, 0xdead_beef);
        ack.extend(init_chunk(CHUNK_INIT_ACK, 7, &param));
        seal(&mut ack);
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.vtag, 0xdead_beef);
        assert_eq!(&parsed.cookie.unwrap()[..json.len()], json);
    }

    #[test]
    fn a_padded_init_parses_and_keeps_its_length() {
        let mut p = common_header(40000, 53, 0);
        p.extend(init_chunk(CHUNK_INIT, 0xdead_beef, &padding_param(3000)));
        seal(&mut p);
        assert_eq!(p.len(), 12 + 20 + 3000);
        assert_eq!(parse(&p).unwrap().chunk, CHUNK_INIT);
    }

    #[test]
    fn a_wrong_checksum_is_ignored() {
        let mut p = common_header(40000, 53, 0);
        p.extend(init_chunk(CHUNK_INIT, 0xdead_beef, &[]));
        seal(&mut p);
        assert!(parse(&p).is_some());
        p[3] ^= 1; // the destination port changed, the checksum did not
        assert!(parse(&p).is_none());
    }

    #[test]
    fn checksum_matches_rfc_crc32c() {
        // CRC32c of "123456789" is 0xE3069283 (RFC 3720 check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
