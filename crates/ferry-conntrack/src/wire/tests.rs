use super::*;

/// What Linux 6.18 sent for `conntrack -L` in a namespace holding one entry
/// (captured with strace): a UDP flow 10.0.0.7:40000 -> 10.96.0.10:53 DNATed to
/// 10.244.1.5:5353, in zone 7, then NLMSG_DONE. It also carries status, mark,
/// id, use, timeout and the CTA_PROTOINFO-like nest 0x18, which must be skipped.
const KERNEL_DUMP_REPLY: [u8; 220] = [
    0xc8, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x7f, 0x78, 0x04, 0x6b, 0xa2, 0x63, 0x00, 0x00, //
    0x02, 0x00, 0x00, 0x00, 0x34, 0x00, 0x01, 0x80, 0x14, 0x00, 0x01, 0x80, 0x08, 0x00, 0x01, 0x00, //
    0x0a, 0x00, 0x00, 0x07, 0x08, 0x00, 0x02, 0x00, 0x0a, 0x60, 0x00, 0x0a, 0x1c, 0x00, 0x02, 0x80, //
    0x05, 0x00, 0x01, 0x00, 0x11, 0x00, 0x00, 0x00, 0x06, 0x00, 0x02, 0x00, 0x9c, 0x40, 0x00, 0x00, //
    0x06, 0x00, 0x03, 0x00, 0x00, 0x35, 0x00, 0x00, 0x34, 0x00, 0x02, 0x80, 0x14, 0x00, 0x01, 0x80, //
    0x08, 0x00, 0x01, 0x00, 0x0a, 0xf4, 0x01, 0x05, 0x08, 0x00, 0x02, 0x00, 0x0a, 0x00, 0x00, 0x07, //
    0x1c, 0x00, 0x02, 0x80, 0x05, 0x00, 0x01, 0x00, 0x11, 0x00, 0x00, 0x00, 0x06, 0x00, 0x02, 0x00, //
    0x14, 0xe9, 0x00, 0x00, 0x06, 0x00, 0x03, 0x00, 0x9c, 0x40, 0x00, 0x00, 0x06, 0x00, 0x12, 0x00, //
    0x00, 0x07, 0x00, 0x00, 0x08, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x08, 0x00, 0x08, 0x00, //
    0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x0c, 0x00, 0x7a, 0x99, 0x45, 0xed, 0x08, 0x00, 0x0b, 0x00, //
    0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x3b, 0x1c, 0x00, 0x18, 0x80, //
    0x08, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x08, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x03, 0x00, 0x02, 0x00, //
    0x7f, 0x78, 0x04, 0x6b, 0xa2, 0x63, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

const UDP: u8 = 17;
const TCP: u8 = 6;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn dnat_v4() -> Entry {
    Entry::new(UDP, sa("10.0.0.7:40000"), sa("10.96.0.10:53"), sa("10.244.1.5:5353"))
}

fn dnat_v6() -> Entry {
    Entry::new(UDP, sa("[fd00::7]:40000"), sa("[fd00:96::10]:53"), sa("[fd00:244::5]:5353"))
}

fn only_message(buf: &[u8]) -> (u16, u16, &[u8]) {
    let mut all: Vec<_> = messages(buf).collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), 1);
    let m = all.pop().unwrap();
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    match m.reply {
        Reply::Other => (kind, m.flags, &buf[NLMSG_HDRLEN..]),
        Reply::Entry(p) => (kind, m.flags, p),
        other => panic!("unexpected {other:?}"),
    }
}

fn top_attributes(payload: &[u8]) -> Vec<(u16, Vec<u8>)> {
    attributes(&payload[NFGENMSG_LEN..]).map(|a| a.map(|(k, v)| (k, v.to_vec()))).collect::<Result<_, _>>().unwrap()
}

#[test]
fn a_kernel_dump_reply_is_read() {
    let replies: Vec<Message> = messages(&KERNEL_DUMP_REPLY).collect::<Result<_, _>>().unwrap();
    assert_eq!(replies.len(), 2);
    assert!(replies.iter().all(|m| m.seq == 1_795_455_103));
    assert_eq!(replies[1].reply, Reply::Done(0));
    let Reply::Entry(payload) = replies[0].reply else { panic!("{:?}", replies[0]) };
    let entry = parse_entry(payload).unwrap();
    assert_eq!(entry, Entry { zone: Some(7), id: Some(0x7a99_45ed), ..dnat_v4() });
    assert_eq!(entry.to_string(), "udp 10.0.0.7:40000 -> 10.96.0.10:53 reply 10.244.1.5:5353 -> 10.0.0.7:40000 zone=7");
}

#[test]
fn a_dump_request_names_its_family_and_filters_the_protocol_in_the_kernel() {
    let mut buf = Vec::new();
    dump_request(&mut buf, IpFamily::V6, 9, None);
    let (kind, flags, payload) = only_message(&buf);
    assert_eq!(kind, 0x0101, "IPCTNL_MSG_CT_GET of ctnetlink");
    assert_eq!(flags, NLM_F_REQUEST | NLM_F_DUMP);
    assert_eq!(payload, [10, 0, 0, 0], "AF_INET6, no attributes: every entry");

    buf.clear();
    dump_request(&mut buf, IpFamily::V4, 9, Some(UDP));
    let (_, _, payload) = only_message(&buf);
    assert_eq!(payload[0], 2, "AF_INET");
    let raw_filter = buf.windows(4).position(|w| w == [0x0c, 0x00, 0x19, 0x80]);
    assert!(raw_filter.is_some(), "CTA_FILTER carries NLA_F_NESTED (the kernel parses it strictly): {buf:02x?}");
    let attrs = top_attributes(payload);
    assert_eq!(attrs.len(), 2);
    let (_, orig) = &attrs[0];
    assert_eq!(attrs[0].0, CTA_TUPLE_ORIG);
    let proto: Vec<_> = attributes(orig).map(|a| a.unwrap()).collect();
    assert_eq!(proto.len(), 1);
    assert_eq!(proto[0].0, CTA_TUPLE_PROTO);
    let num: Vec<_> = attributes(proto[0].1).map(|a| a.unwrap()).collect();
    assert_eq!(num, [(CTA_PROTO_NUM, &[UDP][..])]);
    assert_eq!(attrs[1].0, CTA_FILTER);
    let filter: Vec<_> = attributes(&attrs[1].1).map(|a| a.unwrap()).collect();
    assert_eq!(filter, [(CTA_FILTER_ORIG_FLAGS, &(1u32 << 3).to_ne_bytes()[..])]);
}

#[test]
fn a_delete_always_names_the_original_tuple_never_flushing_the_table() {
    for entry in [dnat_v4(), dnat_v6(), Entry { zone: Some(3), id: Some(0xdead_beef), ..dnat_v4() }] {
        let mut buf = Vec::new();
        delete_request(&mut buf, &entry, 5, false);
        let (kind, flags, payload) = only_message(&buf);
        assert_eq!(kind, 0x0102, "IPCTNL_MSG_CT_DELETE of ctnetlink");
        assert_eq!(flags, NLM_F_REQUEST);
        assert_eq!(payload[0], if entry.family() == IpFamily::V4 { 2 } else { 10 });
        let attrs = top_attributes(payload);
        assert_eq!(attrs[0].0, CTA_TUPLE_ORIG);
        assert_eq!(parse_tuple(&attrs[0].1).unwrap(), (UDP, entry.orig));
        assert!(attrs.iter().all(|(k, _)| *k != CTA_TUPLE_REPLY), "deleted by the original tuple only");
        let find = |k: u16| attrs.iter().find(|(kind, _)| *kind == k).map(|(_, v)| v.clone());
        assert_eq!(find(CTA_ZONE), entry.zone.map(|z| z.to_be_bytes().to_vec()));
        assert_eq!(find(CTA_ID), entry.id.map(|i| i.to_be_bytes().to_vec()));
    }
}

#[test]
fn a_created_entry_reads_back_as_itself() {
    // A New request has the layout of a dump reply: what ferry creates is what it will list.
    for entry in [dnat_v4(), dnat_v6(), Entry { zone: Some(9), ..dnat_v4() }] {
        let mut buf = Vec::new();
        create_request(&mut buf, &entry, 60, 1, false);
        let (kind, flags, payload) = only_message(&buf);
        assert_eq!(kind, 0x0100, "IPCTNL_MSG_CT_NEW of ctnetlink");
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL);
        assert_eq!(parse_entry(payload).unwrap(), entry);
        let attrs = top_attributes(payload);
        assert!(attrs.iter().all(|(k, _)| *k != 4), "no CTA_PROTOINFO for UDP");
    }
    let tcp = Entry::new(TCP, sa("10.0.0.7:40000"), sa("10.96.0.10:80"), sa("10.244.1.5:8080"));
    let mut buf = Vec::new();
    create_request(&mut buf, &tcp, 60, 1, false);
    let (_, _, payload) = only_message(&buf);
    let protoinfo = top_attributes(payload).into_iter().find(|(k, _)| *k == 4).expect("TCP carries CTA_PROTOINFO");
    let tcp_info: Vec<_> = attributes(&protoinfo.1).map(|a| a.unwrap().0).collect();
    assert_eq!(tcp_info, [1], "CTA_PROTOINFO_TCP");
}

#[test]
fn only_the_last_request_of_a_batch_asks_for_an_ack() {
    let mut buf = Vec::new();
    delete_request(&mut buf, &dnat_v4(), 1, false);
    let last = buf.len();
    delete_request(&mut buf, &dnat_v6(), 2, false);
    request_ack(&mut buf, last);
    let flags: Vec<(u32, u16)> = messages(&buf).map(|m| m.unwrap()).map(|m| (m.seq, m.flags)).collect();
    assert_eq!(flags, [(1, NLM_F_REQUEST), (2, NLM_F_REQUEST | NLM_F_ACK)]);
}

#[test]
fn acks_and_errors_are_told_apart() {
    let ack = |seq: u32, code: i32| {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    };
    let mut buf = ack(7, -libc::ENOENT);
    buf.extend(ack(8, 0));
    let replies: Vec<(u32, Reply)> = messages(&buf).map(|m| m.unwrap()).map(|m| (m.seq, m.reply)).collect();
    assert_eq!(replies, [(7, Reply::Ack(-libc::ENOENT)), (8, Reply::Ack(0))]);
}

#[test]
fn malformed_replies_are_errors_not_panics() {
    // Cut anywhere: never a panic, and a cut inside the first message is an error.
    for cut in 1..KERNEL_DUMP_REPLY.len() {
        let parsed: Vec<_> = messages(&KERNEL_DUMP_REPLY[..cut]).collect();
        if cut < 200 {
            assert!(parsed[0].is_err(), "cut at {cut}");
        }
        for m in parsed.into_iter().flatten() {
            if let Reply::Entry(p) = m.reply {
                let _ = parse_entry(p);
            }
        }
    }
    // An entry payload cut inside its attributes.
    let payload = &KERNEL_DUMP_REPLY[NLMSG_HDRLEN..200];
    for cut in 0..payload.len() {
        let _ = parse_entry(&payload[..cut]);
    }
    assert!(parse_entry(&payload[..60]).is_err(), "inside the original tuple");
    assert!(parse_entry(&payload[..4 + 52]).is_err(), "no reply tuple");
    assert!(parse_entry(&[]).is_err());
}
