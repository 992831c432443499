//! ctnetlink on the wire: the requests ferry sends (dump, delete, create) and
//! the entries it reads back. Bytes in, bytes out; tested without a kernel.
//!
//! Requests are built from netlink-packet-netfilter's message types. Replies
//! are read with a zero-copy walk over their attributes (netlink-packet-core's
//! `NlasIterator`), because the crate's own parser allocates a `Vec` per nested
//! attribute and a million-entry dump would spend its time in the allocator.
//!
//! ```text
//! nlmsghdr | nfgenmsg {family, version 0, res_id 0} | attributes
//!   CTA_TUPLE_ORIG  { CTA_TUPLE_IP {src, dst}, CTA_TUPLE_PROTO {num, sport, dport} }
//!   CTA_TUPLE_REPLY { ...same... }
//!   CTA_ZONE (be16, absent for zone 0)   CTA_ID (be32)   CTA_STATUS, CTA_TIMEOUT, ...
//! ```

use crate::entry::{Entry, Tuple};
use ferry_model::IpFamily;
use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLA_HEADER_SIZE, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer,
    NlasIterator,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Status, Tuple as NlTuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
/// Dump replies carry each entry as a "new" message.
const CT_ENTRY: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

// enum ctattr_type (include/uapi/linux/netfilter/nfnetlink_conntrack.h)
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
// enum ctattr_filter, and the flag bit from the kernel's nf_internals.h (ABI, not exported)
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;

/// TCP_CONNTRACK_ESTABLISHED (include/uapi/linux/netfilter/nf_conntrack_tcp.h).
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;

/// A reply that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

fn nf_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// Appends one ctnetlink request to `buf`.
fn append(buf: &mut Vec<u8>, family: IpFamily, message: ConntrackMessage, flags: u16, seq: u32) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let inner = NetfilterMessage::new(NetfilterHeader::new(nf_family(family), 0, 0), message);
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(inner));
    packet.finalize();
    let start = buf.len();
    buf.resize(start + packet.buffer_len(), 0);
    packet.serialize(&mut buf[start..]);
}

fn tuple_attributes(protocol: u8, t: &Tuple) -> Vec<NlTuple> {
    vec![
        NlTuple::Ip(vec![IPTuple::SourceAddress(t.src.ip()), IPTuple::DestinationAddress(t.dst.ip())]),
        NlTuple::Proto(vec![
            ProtoTuple::Protocol(protocol.into()),
            ProtoTuple::SourcePort(t.src.port()),
            ProtoTuple::DestinationPort(t.dst.port()),
        ]),
    ]
}

fn zone_and_id(entry: &Entry, attrs: &mut Vec<ConntrackAttribute>) {
    if let Some(zone) = entry.zone {
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, zone.to_be_bytes().to_vec())));
    }
    if let Some(id) = entry.id {
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(CTA_ID, id.to_be_bytes().to_vec())));
    }
}

/// A dump of one family's table; with `only_protocol`, the kernel filters the
/// dump to that protocol (CTA_FILTER, Linux 5.8+; older kernels ignore it and
/// the caller filters again).
pub fn dump_request(buf: &mut Vec<u8>, family: IpFamily, seq: u32, only_protocol: Option<u8>) {
    let start = buf.len();
    let attrs = match only_protocol {
        Some(p) => vec![ConntrackAttribute::CtaTupleOrig(vec![NlTuple::Proto(vec![ProtoTuple::Protocol(p.into())])])],
        None => Vec::new(),
    };
    append(buf, family, ConntrackMessage::Get(attrs), NLM_F_REQUEST | NLM_F_DUMP, seq);
    if only_protocol.is_some() {
        // The flags are a host-order u32 (NLA_U32), unlike the big-endian conntrack fields.
        let flags = DefaultNla::new(CTA_FILTER_ORIG_FLAGS, CTA_FILTER_F_CTA_PROTO_NUM.to_ne_bytes().to_vec());
        let mut nested = vec![0; flags.buffer_len()];
        flags.emit(&mut nested);
        // By hand: the kernel parses CTA_FILTER strictly and wants NLA_F_NESTED, which
        // netlink-packet-netfilter's `ConntrackAttribute::Other` does not emit.
        append_attribute(buf, start, CTA_FILTER | NLA_F_NESTED, &nested);
    }
}

/// Appends one attribute to the message that starts at `start` (the last one in `buf`).
fn append_attribute(buf: &mut Vec<u8>, start: usize, kind: u16, value: &[u8]) {
    let len = NLA_HEADER_SIZE + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + (len.next_multiple_of(4) - len), 0);
    let total = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&total.to_ne_bytes());
}

/// Deletes `entry` by its original tuple, zone and (when known) id. Always
/// carries the tuple: a delete without one would flush the whole table.
pub fn delete_request(buf: &mut Vec<u8>, entry: &Entry, seq: u32, ack: bool) {
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple_attributes(entry.protocol, &entry.orig))];
    zone_and_id(entry, &mut attrs);
    let flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
    append(buf, entry.family(), ConntrackMessage::Delete(attrs), flags, seq);
}

/// Creates `entry` (both tuples given, so a DNATed flow is created as such),
/// seen in both directions, expiring after `timeout_s`. TCP entries are
/// created ESTABLISHED. Fails if the entry exists.
pub fn create_request(buf: &mut Vec<u8>, entry: &Entry, timeout_s: u32, seq: u32, ack: bool) {
    let mut attrs = vec![
        ConntrackAttribute::CtaTupleOrig(tuple_attributes(entry.protocol, &entry.orig)),
        ConntrackAttribute::CtaTupleReply(tuple_attributes(entry.protocol, &entry.reply)),
        ConntrackAttribute::CtaTimeout(timeout_s),
        // CONFIRMED as the kernel sets it on a created entry: a status that differs in it is refused (EBUSY).
        ConntrackAttribute::CtaStatus(Status::Confirmed | Status::SeenReply | Status::Assured),
    ];
    if entry.protocol == ferry_model::Protocol::Tcp.number() {
        attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(
            TCP_CONNTRACK_ESTABLISHED,
        )])]));
    }
    if let Some(zone) = entry.zone {
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, zone.to_be_bytes().to_vec())));
    }
    let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | if ack { NLM_F_ACK } else { 0 };
    append(buf, entry.family(), ConntrackMessage::New(attrs), flags, seq);
}

/// Sets NLM_F_ACK on the request that starts at `offset` in `buf`.
pub fn request_ack(buf: &mut [u8], offset: usize) {
    let flags = u16::from_ne_bytes([buf[offset + 6], buf[offset + 7]]) | NLM_F_ACK;
    buf[offset + 6..offset + 8].copy_from_slice(&flags.to_ne_bytes());
}

/// What one netlink message from the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A conntrack entry (the payload after the netlink header, for [`parse_entry`]).
    Entry(&'a [u8]),
    /// End of a dump; a negative errno if the dump failed.
    Done(i32),
    /// An acknowledgement (0) or an error (negative errno) for the request with this sequence number.
    Ack(i32),
    /// Anything else (NOOP, other message types).
    Other,
}

/// One netlink message: its header fields and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub seq: u32,
    pub flags: u16,
    pub reply: Reply<'a>,
}

/// The messages in one datagram from the kernel.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, Malformed>> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset >= buf.len() {
            return None;
        }
        let rest = &buf[offset..];
        if rest.len() < NLMSG_HDRLEN {
            offset = buf.len();
            return Some(Err(Malformed(format!("{} trailing bytes after the last message", rest.len()))));
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            offset = buf.len();
            return Some(Err(Malformed(format!("message length {len} with {} bytes left", rest.len()))));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        let payload = &rest[NLMSG_HDRLEN..len];
        offset += (len + 3) & !3;
        let code = || payload.get(0..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
        let reply = match kind {
            NLMSG_ERROR => Reply::Ack(code()),
            NLMSG_DONE => Reply::Done(code()),
            CT_ENTRY => Reply::Entry(payload),
            _ => Reply::Other,
        };
        Some(Ok(Message { seq, flags, reply }))
    })
}

fn attributes(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), Malformed>> {
    NlasIterator::new(buf).map(|nla| {
        let nla: NlaBuffer<&[u8]> = nla.map_err(|e| Malformed(e.to_string()))?;
        let (kind, len) = (nla.kind() & NLA_TYPE_MASK, nla.value_length());
        let bytes: &[u8] = nla.into_inner();
        Ok((kind, &bytes[NLA_HEADER_SIZE..NLA_HEADER_SIZE + len]))
    })
}

fn be16(v: &[u8], what: &str) -> Result<u16, Malformed> {
    v.try_into().map(u16::from_be_bytes).map_err(|_| Malformed(format!("{what}: {} bytes, expected 2", v.len())))
}

fn be32(v: &[u8], what: &str) -> Result<u32, Malformed> {
    v.try_into().map(u32::from_be_bytes).map_err(|_| Malformed(format!("{what}: {} bytes, expected 4", v.len())))
}

fn ip(v: &[u8], what: &str) -> Result<IpAddr, Malformed> {
    match v.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).expect("4 bytes")))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).expect("16 bytes")))),
        n => Err(Malformed(format!("{what}: {n} bytes is not an address"))),
    }
}

/// Reads CTA_TUPLE_ORIG or CTA_TUPLE_REPLY: the protocol number and the tuple.
fn parse_tuple(buf: &[u8]) -> Result<(u8, Tuple), Malformed> {
    let (mut src, mut dst, mut protocol, mut sport, mut dport) = (None, None, None, 0, 0);
    for attr in attributes(buf) {
        match attr? {
            (CTA_TUPLE_IP, v) => {
                for a in attributes(v) {
                    match a? {
                        (CTA_IP_V4_SRC | CTA_IP_V6_SRC, v) => src = Some(ip(v, "source address")?),
                        (CTA_IP_V4_DST | CTA_IP_V6_DST, v) => dst = Some(ip(v, "destination address")?),
                        _ => {}
                    }
                }
            }
            (CTA_TUPLE_PROTO, v) => {
                for a in attributes(v) {
                    match a? {
                        (CTA_PROTO_NUM, v) => protocol = v.first().copied(),
                        (CTA_PROTO_SRC_PORT, v) => sport = be16(v, "source port")?,
                        (CTA_PROTO_DST_PORT, v) => dport = be16(v, "destination port")?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match (src, dst, protocol) {
        (Some(src), Some(dst), Some(protocol)) => {
            Ok((protocol, Tuple { src: SocketAddr::new(src, sport), dst: SocketAddr::new(dst, dport) }))
        }
        _ => Err(Malformed("tuple without addresses or protocol".into())),
    }
}

/// Reads a conntrack entry from a dump reply's payload ([`Reply::Entry`]).
pub fn parse_entry(payload: &[u8]) -> Result<Entry, Malformed> {
    let attrs = payload.get(NFGENMSG_LEN..).ok_or_else(|| Malformed("shorter than nfgenmsg".into()))?;
    let (mut orig, mut reply, mut zone, mut id) = (None, None, None, None);
    for attr in attributes(attrs) {
        match attr? {
            (CTA_TUPLE_ORIG, v) => orig = Some(parse_tuple(v)?),
            (CTA_TUPLE_REPLY, v) => reply = Some(parse_tuple(v)?),
            (CTA_ZONE, v) => zone = Some(be16(v, "zone")?).filter(|z| *z != 0),
            (CTA_ID, v) => id = Some(be32(v, "id")?),
            _ => {}
        }
    }
    let ((protocol, orig), (_, reply)) =
        orig.zip(reply).ok_or_else(|| Malformed("entry without its original and reply tuples".into()))?;
    Ok(Entry { protocol, orig, reply, zone, id })
}

#[cfg(test)]
mod tests;
