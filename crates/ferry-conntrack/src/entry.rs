//! One kernel conntrack entry as plain data: its two tuples, zone and id.

use ferry_model::{IpFamily, Protocol};
use std::fmt;
use std::net::SocketAddr;

/// IANA protocol number of UDP, the only protocol the reconciler deletes.
pub const IPPROTO_UDP: u8 = 17;

/// One direction of a flow: who sent, to whom.
///
/// Ports are 0 for protocols without ports (ICMP and the like).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// A kernel conntrack entry.
///
/// `orig` is the flow as the client sent it (to a Service address, before
/// DNAT); `reply` is what the answer looks like (from the backend, after DNAT).
/// For a DNATed UDP flow to a ClusterIP:
///
/// ```text
/// orig:  10.0.0.7:40000 -> 10.96.0.10:53      (client -> ClusterIP)
/// reply: 10.244.1.5:53  -> 10.0.0.7:40000     (backend -> client)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// IP protocol number ([`Protocol::number`] for TCP, UDP and SCTP).
    pub protocol: u8,
    pub orig: Tuple,
    pub reply: Tuple,
    /// The conntrack zone, when not the default zone 0.
    pub zone: Option<u16>,
    /// The kernel's id of the entry (`CTA_ID`), when read from the kernel.
    /// A delete that carries it leaves alone an entry re-created since the dump.
    pub id: Option<u32>,
}

impl Entry {
    /// A flow from `client` to `orig_dst`, answered by `reply_src` (the DNAT
    /// target; `orig_dst` itself for a flow that was never translated).
    pub fn new(protocol: u8, client: SocketAddr, orig_dst: SocketAddr, reply_src: SocketAddr) -> Entry {
        Entry {
            protocol,
            orig: Tuple { src: client, dst: orig_dst },
            reply: Tuple { src: reply_src, dst: client },
            zone: None,
            id: None,
        }
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.orig.src.ip())
    }

    /// The Service protocol, when the entry is TCP, UDP or SCTP.
    pub fn service_protocol(&self) -> Option<Protocol> {
        Protocol::from_number(self.protocol)
    }

    /// The original tuple and zone: what identifies the entry to the kernel.
    pub fn key(&self) -> (u8, Tuple, Option<u16>) {
        (self.protocol, self.orig, self.zone)
    }
}

impl fmt::Display for Entry {
    /// `udp 10.0.0.7:40000 -> 10.96.0.10:53 reply 10.244.1.5:53 -> 10.0.0.7:40000`, like `conntrack -L`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.service_protocol() {
            Some(p) => write!(f, "{}", p.as_k8s().to_ascii_lowercase())?,
            None => write!(f, "proto-{}", self.protocol)?,
        }
        write!(f, " {} -> {} reply {} -> {}", self.orig.src, self.orig.dst, self.reply.src, self.reply.dst)?;
        if let Some(z) = self.zone {
            write!(f, " zone={z}")?;
        }
        Ok(())
    }
}
