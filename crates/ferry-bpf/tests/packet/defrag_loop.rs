//! The defrag loop's decisions (`bpf/lib/loop.h`): which fragments the programs send into the
//! loop (a later fragment without a verdict and the rest of its datagram; fragmented SCTP whose
//! length is unknown), what they do without a loop (as before: `frag_miss`, `drop_unsupported`),
//! and how `ferry_from_loop` hands a fragment back to the device its source is reached through.
//! What the loop itself does (the kernel reassembling, the datagram coming back in order, the
//! SCTP length noted) needs real packets: the lab test `packet_shapes.rs` shows it.
//!
//! Same rig and services as `shapes.rs`; the loop's ifindex is a made-up one (test-run performs
//! no redirect, it reports it).

use crate::shapes::*;
use crate::{Dp, Hook, PROTO_SCTP as IPPROTO_SCTP, PROTO_UDP as IPPROTO_UDP, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use libbpf_rs::{MapCore, MapFlags};
use std::collections::BTreeMap;

/// The loop's far end: where fragments sent into the loop are addressed (`LOOP_FAR_MAC`).
const FAR_MAC: [u8; 6] = [0x02, 0x66, 0x65, 0x72, 0x72, 0x02];
/// The loop's node end (`LOOP_NODE_MAC`): what comes back is addressed to it.
const NODE_END_MAC: [u8; 6] = [0x02, 0x66, 0x65, 0x72, 0x72, 0x01];
/// eth0's MAC in the rig, and the default gateway's, given a permanent neighbour entry here.
const ETH0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const LOOP_IFINDEX: u32 = 4242;

impl Dp<'_> {
    /// Points the programs at a loop (`ifindex` 0: no loop).
    fn set_loop(&self, ifindex: u32) {
        self.skel
            .maps
            .ferry_loop
            .update(&0u32.to_ne_bytes(), &ifindex.to_ne_bytes(), MapFlags::ANY)
            .expect("writing ferry_loop");
    }
}

/// Runs `ip args` in the rig's namespace (the calling thread's: a child inherits it).
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `frame` as it would leave into the loop: only the Ethernet destination changed.
fn into_loop(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&FAR_MAC);
    f
}

#[test]
fn a_later_fragment_that_overtook_its_first_takes_its_whole_datagram_into_the_loop() {
    with_services(|dp| {
        dp.set_loop(LOOP_IFINDEX);
        let payload: Vec<u8> = (0..48u8).collect();
        let datagram = udp(CLIENT, NODE, 40001, UDP_NODE_PORT, &payload);
        let (head, tail) = datagram.split_at(24);
        let first = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x4321, 0, true, head);
        let later = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x4321, 3, false, tail);

        // The later fragment first: nothing to translate it by; into the loop, untouched.
        let r = dp.run_from_netdev(&later);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "the later fragment goes into the loop: {:?}", r.moved);
        assert_eq!(r.out, into_loop(&later), "addressed to the loop's far end, nothing else changed");
        assert_eq!(r.moved, BTreeMap::from([("frag_loop", 1)]));

        // Its first fragment follows it there (the loop reassembles only whole datagrams), also untouched.
        let r = dp.run_from_netdev(&first);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "the first fragment follows: {:?}", r.moved);
        assert_eq!(r.out, into_loop(&first), "not translated here: it will be, in order, on its way back");
        assert_eq!(r.moved, BTreeMap::from([("frag_loop", 1), ("frag_first", 1)]));

        // A retransmitted later fragment of the same datagram goes the same way.
        let r = dp.run_from_netdev(&later);
        assert_eq!((r.verdict, r.moved), (TC_ACT_REDIRECT, BTreeMap::from([("frag_loop", 1)])));

        // The same on a pod-facing device (hairpin: a pod sending to a NodePort).
        let stray = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x7777, 3, false, tail);
        let r = dp.run(Hook::FromPods, dp.pods0, &stray);
        assert_eq!((r.verdict, r.moved), (TC_ACT_REDIRECT, BTreeMap::from([("frag_loop", 1)])));

        // The egress program never sends into the loop.
        let stray = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x7778, 3, false, tail);
        let r = dp.run(Hook::ToNetdev, dp.eth0, &stray);
        assert_eq!((r.verdict, r.moved), (TC_ACT_OK, BTreeMap::from([("frag_miss", 1)])));

        // A protocol whose first fragment gets no verdict (here GRE) would wait there forever: passed.
        let gre = ipv4(CLIENT, NODE, 47, 0x7779, 3, false, tail);
        let r = dp.run_from_netdev(&gre);
        assert_eq!((r.verdict, r.moved), (TC_ACT_OK, BTreeMap::from([("frag_miss", 1)])));

        // IPv6: a later fragment without its first goes in as well.
        let later6 =
            ipv6(CLIENT6, NODE6, NH_FRAGMENT, &[frag6(IPPROTO_UDP, 4, false, 0x0102_0304), tail.to_vec()].concat());
        let r = dp.run_from_netdev(&later6);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "IPv6 later fragment: {:?}", r.moved);
        assert_eq!(r.out, into_loop(&later6));
        assert_eq!(r.moved, BTreeMap::from([("frag_loop", 1)]));
    });
}

#[test]
fn without_a_loop_fragments_are_counted_as_before() {
    with_services(|dp| {
        dp.set_loop(0);
        let payload: Vec<u8> = (0..48u8).collect();
        let datagram = udp(CLIENT, NODE, 40002, UDP_NODE_PORT, &payload);
        let later = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x5555, 3, false, &datagram[24..]);
        let r = dp.run_from_netdev(&later);
        assert_eq!((r.verdict, &r.out, r.moved), (TC_ACT_OK, &later, BTreeMap::from([("frag_miss", 1)])));

        // Fragmented SCTP with a port change: the length is unknown, so the CRC32c cannot be fixed.
        let init = sctp_init(50100, SCTP_NODE_PORT, 64);
        let first = ipv4(CLIENT, NODE, IPPROTO_SCTP, 0x5556, 0, true, &init[..48]);
        let r = dp.run_from_netdev(&first);
        assert_eq!(r.verdict, TC_ACT_SHOT);
        assert_eq!(r.moved, BTreeMap::from([("drop_unsupported", 1), ("frag_first", 1)]));
    });
}

#[test]
fn fragmented_sctp_goes_into_the_loop_for_its_length() {
    with_services(|dp| {
        dp.set_loop(LOOP_IFINDEX);
        let init = sctp_init(50101, SCTP_NODE_PORT, 64);
        let (head, tail) = init.split_at(48);
        let first = ipv4(CLIENT, NODE, IPPROTO_SCTP, 0x6666, 0, true, head);
        let later = ipv4(CLIENT, NODE, IPPROTO_SCTP, 0x6666, 6, false, tail);
        let r = dp.run_from_netdev(&first);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "{:?}", r.moved);
        assert_eq!(r.out, into_loop(&first), "untouched: its CRC32c is corrected on the way back");
        assert_eq!(r.moved, BTreeMap::from([("frag_loop", 1), ("frag_first", 1)]));
        let r = dp.run_from_netdev(&later);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "the rest follows: {:?}", r.moved);
        assert_eq!(r.out, into_loop(&later));
        assert_eq!(r.moved, BTreeMap::from([("frag_loop", 1)]));

        // Unfragmented SCTP never goes there: translated at once.
        let whole = ipv4(CLIENT, NODE, IPPROTO_SCTP, 0x6667, 0, false, &sctp_init(50102, SCTP_NODE_PORT, 64));
        let r = dp.run_from_netdev(&whole);
        assert_eq!(r.verdict, TC_ACT_REDIRECT);
        assert_eq!(r.moved.get("frag_loop"), None, "{:?}", r.moved);
        assert_eq!(r.moved.get("sctp_csum_fix"), Some(&1), "{:?}", r.moved);
    });
}

#[test]
fn what_comes_back_from_the_loop_reenters_where_its_source_is_reached() {
    with_services(|dp| {
        // As the loop's forwarding sends it: to the node end, TTL / hop limit one lower (the loop is
        // a hop, and stays one).
        let back = |mut f: Vec<u8>, v6: bool| {
            f[..6].copy_from_slice(&NODE_END_MAC);
            f[6..12].copy_from_slice(&FAR_MAC);
            if v6 {
                f[ETH + 7] -= 1;
            } else {
                f[ETH + 8] -= 1;
                f[ETH + 10..ETH + 12].fill(0);
                let c = inet_csum(&f[ETH..ETH + 20]);
                f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
            }
            f
        };
        let tail: Vec<u8> = (0..32u8).collect();
        // The gateway's neighbour entry is known: the fragment is addressed as if it came in on eth0.
        ip(&["neigh", "replace", "192.0.2.254", "lladdr", "02:00:00:00:00:fe", "dev", "eth0", "nud", "permanent"]);
        let sent = ipv4(CLIENT, NODE, IPPROTO_UDP, 0x1111, 3, false, &tail);
        let r = dp.run(Hook::FromLoop, dp.pods0, &back(sent.clone(), false));
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "handed to eth0's ingress: {:?}", r.moved);
        assert_ip_csum(&r.out, "back from the loop");
        assert_eq!(&r.out[ETH..], &back(sent.clone(), false)[ETH..], "the IP packet as the loop sent it");
        assert_eq!((&r.out[..6], &r.out[6..12]), (&ETH0_MAC[..], &GW_MAC[..]), "to eth0, from its gateway");
        assert_eq!(r.moved, BTreeMap::from([("loop_return", 1)]));

        // IPv6, no neighbour known for the route's gateway: handed on as it came (MACs included).
        let sent6 = ipv6(CLIENT6, NODE6, NH_FRAGMENT, &[frag6(IPPROTO_UDP, 4, false, 9), tail.clone()].concat());
        let r = dp.run(Hook::FromLoop, dp.pods0, &back(sent6.clone(), true));
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "{:?}", r.moved);
        assert_eq!(r.out, back(sent6, true));
        assert_eq!(r.moved, BTreeMap::from([("loop_return", 1)]));

        // No route back to the source: dropped, counted.
        let lost = ipv4("203.0.113.9".parse().unwrap(), NODE, IPPROTO_UDP, 0x1112, 3, false, &tail);
        ip(&["route", "del", "default"]);
        let r = dp.run(Hook::FromLoop, dp.pods0, &back(lost, false));
        assert_eq!((r.verdict, r.moved), (TC_ACT_SHOT, BTreeMap::from([("drop_no_route", 1)])));
    });
}
