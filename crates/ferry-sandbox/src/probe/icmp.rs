//! ICMP echo ("ping") over raw sockets, for proving that echo requests are
//! translated both ways (masquerading). The far end's kernel answers by
//! itself, so there is no server view: a reply arriving at all is the
//! observation, and `client_peer` says whom it came from.

use super::{Observation, ProbeError, Reply, Stage};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from(chunk[0]) << 8 };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One echo request to `target`; the reply (or its absence) is the observation.
pub fn ping(target: IpAddr, bind: Option<IpAddr>, timeout: Duration) -> Result<Observation, ProbeError> {
    let v6 = target.is_ipv6();
    let fail = |doing: &str, e: std::io::Error| Observation::Error { errno: None, message: format!("{doing}: {e}") };
    let (domain, proto, request, reply) =
        if v6 { (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8) } else { (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8) };
    let socket = match Socket::new(domain, Type::RAW, Some(proto)) {
        Ok(s) => s,
        Err(e) => return Ok(fail("opening a raw ICMP socket", e)),
    };
    if let Some(ip) = bind
        && let Err(e) = socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))
    {
        return Ok(fail("binding", e));
    }
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut msg = vec![request, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(b"ferry-probe");
    if !v6 {
        // The kernel fills in ICMPv6 checksums itself; ICMPv4 ones are ours.
        let c = checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
    }
    if let Err(e) = socket.send_to(&msg, &SockAddr::from(SocketAddr::new(target, 0))) {
        return Ok(fail("sending the echo request", e));
    }
    let _ = socket.set_nonblocking(true);
    let deadline = Instant::now() + timeout;
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    while Instant::now() < deadline {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            // SAFETY: recv_from initialised the first `n` bytes.
            let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            // IPv4 raw sockets deliver the IP header too.
            let icmp = if v6 { data } else { data.get(usize::from(data[0] & 0x0f) * 4..).unwrap_or(&[]) };
            if icmp.len() >= 8 && icmp[0] == reply && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
                let from = from.as_socket().map(|a| a.ip()).unwrap_or(target);
                return Ok(Observation::Reply(Reply {
                    server: "icmp-echo".into(),
                    server_local: SocketAddr::new(target, 0),
                    server_peer: SocketAddr::new(bind.unwrap_or(target), 0),
                    client_local: SocketAddr::new(bind.unwrap_or(target), 0),
                    client_peer: SocketAddr::new(from, 0),
                }));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Observation::Timeout { stage: Stage::Reply })
}
