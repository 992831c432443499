//! The tcx programs of `bpf/netdev.bpf.c`, driven packet by packet with
//! `BPF_PROG_TEST_RUN` on the real kernel, the way Cilium's `bpf/tests` do:
//! build a packet, set up the maps, run the program, then check the verdict,
//! every byte of the packet it left (addresses, ports, TTL, and every
//! checksum recomputed here from scratch, see `wire.rs`) and exactly which
//! datapath counters moved.
//!
//! Each test gets its own network namespace (`ferry-pkt-<pid>-<seq>-node`,
//! where the programs' FIB lookups see routes like a node's) and its own pin
//! directory under bpffs; both are removed afterwards, also on failure. No
//! packet is sent anywhere: test-run returns the packet and the verdict
//! (a redirect is reported, not performed).
//!
//! ```text
//!  node netns:  eth0 (veth)   192.0.2.1/24  2001:db8:1::1/64   default via .254 / ::fe
//!                             10.244.2.0/24 via 192.0.2.2, fd00:244:2::/64 via 2001:db8:1::2 (another node's pods)
//!               pods0 (veth) 10.244.1.1/24 fd00:244:1::1/64   (this node's pods)
//! ```
//!
//! Needs root (BPF, netns); never skipped.

mod defrag_loop;
mod dsr;
mod dsr6;
mod shapes;
mod wire;
mod xdp;

use ferry_bpf::MapOp;
use ferry_bpf::entries::*;
use ferry_bpf::skel::netdev::NetdevSkel;
use ferry_bpf::{Maps, install};
use ferry_sandbox::{Host, Sandbox};
use libbpf_rs::ProgramInput;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use wire::*;

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const NODE4: &str = "192.0.2.1";
const NODE6: &str = "2001:db8:1::1";
const CLIENT4: &str = "198.51.100.7";
const CLIENT6: &str = "2001:db8:100::7";
/// A pod on another node (reached through eth0).
const REMOTE4: &str = "10.244.2.5";
const REMOTE6: &str = "fd00:244:2::5";
/// A pod on this node (reached through pods0).
const POD4: &str = "10.244.1.5";
const POD6: &str = "fd00:244:1::5";
const NAT_MIN: u16 = 1024;
const NAT_MAX: u16 = 29999;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The node of one test: its network namespace and pin directory, removed on drop.
struct Rig {
    // Dropped after the pins are removed (fields drop in order, after Drop::drop).
    sandbox: Sandbox,
    node: Host,
    pin: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let mut sandbox = Sandbox::new("pkt").expect("creating the sandbox (root?)");
        let node = sandbox.add_host("node").expect("creating the node namespace");
        let pin = PathBuf::from("/sys/fs/bpf").join(sandbox.id());
        let rig = Rig { sandbox, node, pin };
        for cmd in [
            "link add eth0 type veth peer name eth0-peer",
            "link set eth0 address 02:00:00:00:00:01",
            "link set eth0 up",
            "link set eth0-peer up",
            "link add pods0 type veth peer name pods0-peer",
            "link set pods0 up",
            "link set pods0-peer up",
            "addr add 192.0.2.1/24 dev eth0",
            "addr add 2001:db8:1::1/64 dev eth0 nodad",
            "addr add 10.244.1.1/24 dev pods0",
            "addr add fd00:244:1::1/64 dev pods0 nodad",
            "route add 10.244.2.0/24 via 192.0.2.2 dev eth0",
            "route add default via 192.0.2.254 dev eth0",
            "route add fd00:244:2::/64 via 2001:db8:1::2 dev eth0",
            "route add default via 2001:db8:1::fe dev eth0",
        ] {
            let args: Vec<&str> = cmd.split(' ').collect();
            rig.sandbox.ip(&rig.node, &args).unwrap_or_else(|e| panic!("ip {cmd}: {e}"));
        }
        rig.sandbox.set_forwarding(&rig.node, true).expect("forwarding on");
        rig
    }

    /// Pins the conntrack tables with these capacities before the programs
    /// load (the loader keeps a pinned map's capacity), so a test can fill them.
    fn small_conntrack(&self, confirmed: u32, unconfirmed: u32) {
        std::fs::create_dir_all(&self.pin).expect("creating the pin directory");
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        // struct ct_key is 40 bytes, struct ct_val 56 (bpf/lib/maps.h).
        for (name, kind, cap) in [
            ("ferry_ct", libbpf_rs::MapType::Hash, confirmed),
            ("ferry_ct_new", libbpf_rs::MapType::LruHash, unconfirmed),
        ] {
            let mut m = libbpf_rs::MapHandle::create(kind, Some(name), 40, 56, cap, &opts)
                .unwrap_or_else(|e| panic!("creating {name}: {e}"));
            m.pin(self.pin.join(name)).unwrap_or_else(|e| panic!("pinning {name}: {e}"));
        }
    }

    /// Pins a `ferry_peers` of `capacity` entries before the programs load,
    /// so a test can fill it.
    fn small_peers(&self, capacity: u32) {
        std::fs::create_dir_all(&self.pin).expect("creating the pin directory");
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: libbpf_sys::BPF_F_NO_PREALLOC,
            ..Default::default()
        };
        // struct local_key is 20 bytes, the value one (bpf/lib/maps.h).
        let mut m = libbpf_rs::MapHandle::create(libbpf_rs::MapType::Hash, Some("ferry_peers"), 20, 1, capacity, &opts)
            .expect("creating ferry_peers");
        m.pin(self.pin.join("ferry_peers")).expect("pinning ferry_peers");
    }

    /// Runs `f` on a thread inside the node's namespace with the programs
    /// loaded and the maps set to `setup`.
    fn run<R: Send>(&self, setup: &[MapOp], f: impl FnOnce(&Dp) -> R + Send) -> R {
        let netns = self.sandbox.netns_path(&self.node);
        let pin = self.pin.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&netns);
                let mut storage = std::mem::MaybeUninit::uninit();
                let skel = install::load_packet_programs(&mut storage, &pin).expect("loading the tcx programs");
                let maps = Maps::open(&pin).expect("opening the pinned maps");
                maps.apply(&with_fast_pass(setup)).expect("writing the test's map entries");
                let dp = Dp { skel, maps, eth0: ifindex("eth0"), pods0: ifindex("pods0") };
                f(&dp)
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.pin.exists()
            && let Err(e) = install::uninstall(&self.pin)
        {
            eprintln!("removing {}: {e}", self.pin.display());
        }
    }
}

/// `setup` as the agent leaves a datapath: the pass-through fast path on,
/// `ferry_addrs` holding every address a frontend, node entry or the config
/// names (what the Programmer writes with them), so every test also checks
/// that the fast path waves through none of its packets.
fn with_fast_pass(setup: &[MapOp]) -> Vec<MapOp> {
    let mut out = Vec::with_capacity(setup.len() * 2);
    let addr = |addr: Words, family: u8, out: &mut Vec<MapOp>| {
        if addr != [0; 4] {
            out.push(MapOp::PutAddr(LocalKey { addr, family }));
        }
    };
    for op in setup {
        match op {
            MapOp::PutConfig(c) => {
                let mut c = c.clone();
                c.flags |= CFG_FAST_PASS;
                addr(c.primary[0], FAM_V4, &mut out);
                addr(c.primary[1], FAM_V6, &mut out);
                out.push(MapOp::PutConfig(c));
                continue;
            }
            MapOp::PutFrontend(k, v) if v.kind != FE_CLUSTER_IP_ANY_PORT => addr(k.addr, k.family, &mut out),
            MapOp::PutLocal(k, _) => addr(k.addr, k.family, &mut out),
            _ => {}
        }
        out.push(op.clone());
    }
    out
}

/// Moves this thread (only) into the namespace at `netns`, and checks it did.
fn enter(netns: &Path) {
    let f = File::open(netns).expect("opening the namespace");
    // SAFETY: setns on a valid fd; it changes this thread's namespace only.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
    let want = std::fs::metadata(netns).unwrap();
    let now = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
    assert_eq!((want.dev(), want.ino()), (now.dev(), now.ino()), "the thread is not in the node's namespace");
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no device {name} in the node namespace");
    i
}

#[derive(Debug, Clone, Copy)]
enum Hook {
    /// tcx ingress of an uplink.
    FromNetdev,
    /// tcx ingress of a pod-facing device.
    FromPods,
    /// tcx egress of an uplink.
    ToNetdev,
    /// tcx ingress of the defrag loop's node end.
    FromLoop,
}

/// The loaded programs and maps of one test.
struct Dp<'obj> {
    skel: NetdevSkel<'obj>,
    maps: Maps,
    eth0: u32,
    pods0: u32,
}

/// What one run returned.
struct Ran {
    verdict: i32,
    out: Vec<u8>,
    /// Counters that moved, by name, but the tables' bookkeeping.
    moved: BTreeMap<&'static str, u64>,
    /// The tables' bookkeeping counters that moved ([`TABLE_COUNTERS`]).
    tables: BTreeMap<&'static str, u64>,
}

/// Counters of what went into and out of the conntrack tables: they move
/// with every new flow, so tests about other decisions leave them aside and
/// the table tests check them.
const TABLE_COUNTERS: &[&str] = &["ct_new_insert", "ct_new_delete", "ct_confirm", "ct_confirm_full"];

impl Dp<'_> {
    fn counters(&self) -> Vec<u64> {
        self.maps.counters()
    }

    /// Runs `hook` on `frame` as if it arrived on (or left through) `ifindex`.
    fn run(&self, hook: Hook, ifindex: u32, frame: &[u8]) -> Ran {
        let prog = match hook {
            Hook::FromNetdev => &self.skel.progs.ferry_from_netdev,
            Hook::FromPods => &self.skel.progs.ferry_from_pods,
            Hook::ToNetdev => &self.skel.progs.ferry_to_netdev,
            Hook::FromLoop => &self.skel.progs.ferry_from_loop,
        };
        // struct __sk_buff: ingress_ifindex at 36, ifindex at 40; the rest zero.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let before = self.counters();
        let input = ProgramInput {
            data_in: Some(frame),
            context_in: Some(&mut ctx),
            data_out: Some(&mut out),
            ..ProgramInput::default()
        };
        let output = prog.test_run(input).expect("BPF_PROG_TEST_RUN");
        let verdict = output.return_value as i32;
        let len = output.data.map(|d| d.len()).unwrap_or(0);
        out.truncate(len);
        let after = self.counters();
        let (tables, moved) = ferry_bpf::stats::NAMES
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a != b)
            .map(|(n, (b, a))| (*n, a - b))
            .partition(|(n, _)| TABLE_COUNTERS.contains(n));
        Ran { verdict, out, moved, tables }
    }
}

fn moved(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

// ---- map contents of the scenarios, written through the agent's own MapOp encoding ----

fn words_of(s: &str) -> Words {
    words(&ip(s))
}

fn fam(s: &str) -> u8 {
    family_of(&ip(s))
}

fn prefix(kind: u8, cidr: &str) -> RangeKey {
    let (a, len) = cidr.split_once('/').unwrap();
    RangeKey { prefixlen: 32 + len.parse::<u32>().unwrap(), kind, family: fam(a), addr: words_of(a) }
}

/// The node: addresses, primary addresses, pod ranges (ClusterCIDR detector), service CIDR.
fn node_setup() -> Vec<MapOp> {
    let mut ops = vec![MapOp::PutConfig(Box::new(Config {
        host_netns: 1,
        pod_class: [CLASS_POD; 2],
        flags: CFG_PODS_BY_RANGE,
        primary: [words_of(NODE4), words_of(NODE6)],
        tcp_syn_timeout: 60,
        tcp_established_timeout: 86400,
        tcp_close_timeout: 10,
        udp_timeout: 30,
        nat_port_min: NAT_MIN,
        nat_port_max: NAT_MAX,
        maglev_size: 0,
    }))];
    for a in [NODE4, NODE6] {
        ops.push(MapOp::PutLocal(LocalKey { addr: words_of(a), family: fam(a) }, LOCAL_HOST | LOCAL_NODEPORT));
    }
    for (kind, cidr) in [
        (RANGE_POD, "10.244.0.0/16"),
        (RANGE_POD, "fd00:244::/32"),
        (RANGE_SERVICE, "10.96.0.0/16"),
        (RANGE_SERVICE, "fd00:96::/108"),
    ] {
        ops.push(MapOp::PutRange(prefix(kind, cidr)));
    }
    ops
}

/// One backend of a service: id, address, port, on this node or not.
struct Be<'a>(u32, &'a str, u16, bool);

/// A service port `id` with `backends`, its route per (path, class) in `action`.
fn service(id: u32, action: [[u8; 3]; 2], flags: u8, backends: &[Be]) -> Vec<MapOp> {
    let mut ops = Vec::new();
    let mut count = [0u16; 2];
    for Be(bid, addr, port, local) in backends {
        ops.push(MapOp::PutBackend(
            *bid,
            Backend { addr: words_of(addr), port: *port, family: fam(addr), flags: if *local { BE_LOCAL } else { 0 } },
        ));
        let mut sets = 1 << SET_CLUSTER;
        ops.push(MapOp::PutSlot(SlotKey { service: id, rev: 0, set: SET_CLUSTER, slot: count[0] }, *bid));
        count[0] += 1;
        if *local {
            sets |= 1 << SET_LOCAL;
            ops.push(MapOp::PutSlot(SlotKey { service: id, rev: 0, set: SET_LOCAL, slot: count[1] }, *bid));
            count[1] += 1;
        }
        ops.push(MapOp::PutMember(MemberKey { service: id, backend: *bid }, sets));
    }
    ops.push(MapOp::PutService(id, SvcVal { count, action, flags, rev: 0, affinity_timeout: 0 }));
    ops
}

/// The same route for every source class on external frontends (and ClusterIP).
fn every_class(act: u8) -> [[u8; 3]; 2] {
    [[act; 3], [act; 3]]
}

fn nodeport(port: u16, proto: u8, family: u8, service: u32) -> MapOp {
    MapOp::PutFrontend(FeKey { addr: [0; 4], port, proto, family }, FeVal { service, kind: FE_NODE_PORT, flags: 0 })
}

fn frontend(addr: &str, port: u16, proto: u8, kind: u8, flags: u8, service: u32) -> MapOp {
    MapOp::PutFrontend(FeKey { addr: words_of(addr), port, proto, family: fam(addr) }, FeVal { service, kind, flags })
}

fn seg(proto: u8, sport: u16, dport: u16, syn: bool) -> L4 {
    match proto {
        PROTO_TCP => tcp(sport, dport, if syn { 0x02 } else { 0x12 }, b"ferry"),
        PROTO_UDP => udp(sport, dport, b"ferry udp payload"),
        PROTO_SCTP => sctp_init(sport, dport),
        _ => unreachable!(),
    }
}

fn ttl(n: u8) -> IpOpts {
    IpOpts { ttl: n, ..IpOpts::default() }
}

// ---- the tests ----

/// NodePort to a backend on another node: DNAT to the backend, SNAT to the
/// node (the client's port kept: it is free and inside natPortRange), TTL
/// decremented, sent on with a redirect; then the backend's reply is turned
/// back into (frontend -> client). IPv4 and IPv6, TCP and UDP.
#[test]
fn nodeport_remote_backend_dnat_snat_and_reply() {
    let rig = Rig::new();
    let mut setup = node_setup();
    let cases = [
        (1, PROTO_TCP, NODE4, CLIENT4, REMOTE4, 30080),
        (2, PROTO_UDP, NODE4, CLIENT4, REMOTE4, 30053),
        (3, PROTO_TCP, NODE6, CLIENT6, REMOTE6, 30080),
        (4, PROTO_UDP, NODE6, CLIENT6, REMOTE6, 30053),
    ];
    for (id, proto, node, _, backend, port) in cases {
        setup.extend(service(
            id,
            every_class(ACT_FORWARD_CLUSTER | ACT_MASQ),
            0,
            &[Be(100 + id, backend, 8080, false)],
        ));
        setup.push(nodeport(port, proto, fam(node), id));
    }
    rig.run(&setup, |dp| {
        for (id, proto, node, client, backend, port) in cases {
            let cport = 20000 + id as u16;
            let what = format!("service {id} proto {proto} {client} -> {node}:{port}");
            let first = frame(ip(client), ip(node), &seg(proto, cport, port, true), IpOpts::default());
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &first);
            assert_eq!(ran.verdict, TC_ACT_REDIRECT, "{what}: forwarded with a redirect");
            let want = frame(ip(node), ip(backend), &seg(proto, cport, 8080, true), ttl(63));
            check(&ran.out);
            assert_eq!(ran.out, want, "{what}: DNAT + SNAT, TTL - 1, checksums recomputed");
            assert_eq!(ran.moved, moved(&[("pkt_new_flow", 1)]), "{what}: counters");

            // The reply, as the backend sends it to the node's NAT tuple.
            let reply = frame(ip(backend), ip(node), &seg(proto, 8080, cport, false), IpOpts::default());
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &reply);
            assert_eq!(ran.verdict, TC_ACT_REDIRECT, "{what}: reply forwarded");
            let want = frame(ip(node), ip(client), &seg(proto, port, cport, false), ttl(63));
            check(&ran.out);
            assert_eq!(ran.out, want, "{what}: reply from the frontend to the client");
            assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "{what}: counters");

            // The next packet of the flow takes the tracked path too.
            let ran = dp.run(
                Hook::FromNetdev,
                dp.eth0,
                &frame(ip(client), ip(node), &seg(proto, cport, port, false), IpOpts::default()),
            );
            assert_eq!(
                ran.out,
                frame(ip(node), ip(backend), &seg(proto, cport, 8080, false), ttl(63)),
                "{what}: tracked"
            );
            assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "{what}: counters");
        }
    });
}

/// A client port outside natPortRange gets a port from the range; the reply
/// to that port comes back to the client's own port.
#[test]
fn snat_picks_a_port_inside_the_nat_range() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    rig.run(&setup, |dp| {
        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(CLIENT4), ip(NODE4), &tcp(45000, 30080, 0x02, b""), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let seen = check(&ran.out);
        assert!((NAT_MIN..=NAT_MAX).contains(&seen.sport), "SNAT port {} outside {NAT_MIN}-{NAT_MAX}", seen.sport);
        assert_eq!(ran.out, frame(ip(NODE4), ip(REMOTE4), &tcp(seen.sport, 8080, 0x02, b""), ttl(63)));
        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(REMOTE4), ip(NODE4), &tcp(8080, seen.sport, 0x12, b""), IpOpts::default()),
        );
        assert_eq!(ran.out, frame(ip(NODE4), ip(CLIENT4), &tcp(30080, 45000, 0x12, b""), ttl(63)));
    });
}

/// externalTrafficPolicy: Local to a pod of this node: DNAT only, the client
/// address kept; a UDP datagram without checksum keeps "no checksum".
#[test]
fn local_backend_keeps_the_client_address() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10, POD4, 5353, true)]));
    setup.push(nodeport(30053, PROTO_UDP, FAM_V4, 1));
    setup.extend(service(2, every_class(ACT_FORWARD_LOCAL), 0, &[Be(20, POD6, 8080, true)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V6, 2));
    rig.run(&setup, |dp| {
        let none = IpOpts { udp_no_csum: true, ..IpOpts::default() };
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &frame(ip(CLIENT4), ip(NODE4), &udp(40000, 30053, b"q"), none));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(ran.out, frame(ip(CLIENT4), ip(POD4), &udp(40000, 5353, b"q"), IpOpts { ttl: 63, ..none }));
        assert_eq!(&ran.out[14 + 20 + 6..14 + 20 + 8], &[0, 0], "a zero UDP checksum stays zero");
        assert_eq!(ran.moved, moved(&[("pkt_new_flow", 1)]));

        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(CLIENT6), ip(NODE6), &tcp(40001, 30080, 0x02, b"x"), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        check(&ran.out);
        assert_eq!(ran.out, frame(ip(CLIENT6), ip(POD6), &tcp(40001, 8080, 0x02, b"x"), ttl(63)));

        // The pod's reply, on the pod-facing device.
        let ran = dp.run(
            Hook::FromPods,
            dp.pods0,
            &frame(ip(POD6), ip(CLIENT6), &tcp(8080, 40001, 0x12, b""), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(ran.out, frame(ip(NODE6), ip(CLIENT6), &tcp(30080, 40001, 0x12, b""), ttl(63)));
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]));
    });
}

/// SCTP is translated by address only (its CRC32c covers the ports, not the
/// addresses): the CRC stays valid untouched; SNAT keeps the source port.
#[test]
fn sctp_without_port_change() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 30132, false)]));
    setup.push(nodeport(30132, PROTO_SCTP, FAM_V4, 1));
    setup.extend(service(2, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(20, REMOTE6, 30132, false)]));
    setup.push(nodeport(30132, PROTO_SCTP, FAM_V6, 2));
    rig.run(&setup, |dp| {
        for (node, client, backend) in [(NODE4, CLIENT4, REMOTE4), (NODE6, CLIENT6, REMOTE6)] {
            let ran = dp.run(
                Hook::FromNetdev,
                dp.eth0,
                &frame(ip(client), ip(node), &sctp_init(45000, 30132), IpOpts::default()),
            );
            assert_eq!(ran.verdict, TC_ACT_REDIRECT, "{client}");
            check(&ran.out);
            assert_eq!(ran.out, frame(ip(node), ip(backend), &sctp_init(45000, 30132), ttl(63)), "{client}");
            assert_eq!(ran.moved, moved(&[("pkt_new_flow", 1)]));
        }
    });
}

/// A backend that is the client itself (a pod reaching its own service)
/// is SNATed to the node, or its reply would skip the reverse translation.
#[test]
fn hairpin_is_snated() {
    let rig = Rig::new();
    let mut setup = node_setup();
    let internal_only = [[ACT_FORWARD_CLUSTER; 3], [0; 3]];
    setup.extend(service(1, internal_only, 0, &[Be(10, POD4, 8080, true)]));
    setup.push(frontend("10.96.0.10", 80, PROTO_TCP, FE_CLUSTER_IP, 0, 1));
    rig.run(&setup, |dp| {
        let ran = dp.run(
            Hook::FromPods,
            dp.pods0,
            &frame(ip(POD4), ip("10.96.0.10"), &tcp(20000, 80, 0x02, b""), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        check(&ran.out);
        assert_eq!(ran.out, frame(ip(NODE4), ip(POD4), &tcp(20000, 8080, 0x02, b""), ttl(63)));
        let ran = dp.run(
            Hook::FromPods,
            dp.pods0,
            &frame(ip(POD4), ip(NODE4), &tcp(8080, 20000, 0x12, b""), IpOpts::default()),
        );
        assert_eq!(ran.out, frame(ip("10.96.0.10"), ip(POD4), &tcp(80, 20000, 0x12, b""), ttl(63)));
    });
}

/// An ICMP error about a NAT flow is turned back into what the client sent:
/// outer destination the client, quoted packet (client -> frontend) with its
/// own header checksum, the ICMP checksum valid. IPv4: "fragmentation
/// needed" from a router on the way (outer source kept); IPv6: port
/// unreachable from the backend itself (outer source becomes the frontend).
#[test]
fn icmp_errors_of_nat_flows_are_translated_back() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    setup.extend(service(2, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(20, REMOTE6, 5353, false)]));
    setup.push(nodeport(30053, PROTO_UDP, FAM_V6, 2));
    rig.run(&setup, |dp| {
        // IPv4 TCP: the flow, then an error quoting its translated first packet.
        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(CLIENT4), ip(NODE4), &tcp(20001, 30080, 0x02, b""), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let sent = ip_packet(ip(NODE4), ip(REMOTE4), &tcp(20001, 8080, 0x02, b""), ttl(63));
        let mtu = [0, 0, 0x05, 0x00];
        let err = frame(ip("192.0.2.254"), ip(NODE4), &icmp(PROTO_ICMP, 3, 4, mtu, &sent[..28]), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &err);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let client_sent = ip_packet(ip(CLIENT4), ip(NODE4), &tcp(20001, 30080, 0x02, b""), ttl(63));
        let want = frame(ip("192.0.2.254"), ip(CLIENT4), &icmp(PROTO_ICMP, 3, 4, mtu, &client_sent[..28]), ttl(63));
        check(&ran.out);
        assert_eq!(ran.out, want, "IPv4 ICMP error: outer and quoted header");
        assert_eq!(ran.moved, moved(&[("icmp_error_rev", 1)]));

        // IPv6 UDP: port unreachable from the backend.
        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(CLIENT6), ip(NODE6), &udp(20002, 30053, b"query"), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let sent = ip_packet(ip(NODE6), ip(REMOTE6), &udp(20002, 5353, b"query"), ttl(63));
        let err = frame(ip(REMOTE6), ip(NODE6), &icmp(PROTO_ICMPV6, 1, 4, [0; 4], &sent), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &err);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        // The quoted UDP checksum is the translated packet's: nobody checks a quoted checksum, ferry leaves it.
        let mut client_sent = ip_packet(ip(CLIENT6), ip(NODE6), &udp(20002, 30053, b"query"), ttl(63));
        client_sent[46..48].copy_from_slice(&sent[46..48]);
        let want = frame(ip(NODE6), ip(CLIENT6), &icmp(PROTO_ICMPV6, 1, 4, [0; 4], &client_sent), ttl(63));
        check(&ran.out);
        assert_eq!(ran.out, want, "ICMPv6 error: outer and quoted header");
        assert_eq!(ran.moved, moved(&[("icmp_error_rev", 1)]));

        // An error about a flow nobody translated passes untouched.
        let stranger = ip_packet(ip(NODE4), ip("10.244.2.99"), &tcp(33333, 80, 0x02, b""), IpOpts::default());
        let err =
            frame(ip("192.0.2.254"), ip(NODE4), &icmp(PROTO_ICMP, 3, 1, [0; 4], &stranger[..28]), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &err);
        assert_eq!((ran.verdict, &ran.out, ran.moved.len()), (TC_ACT_OK, &err, 0));
    });
}

/// REJECT (no endpoints): the packet becomes an ICMP / ICMPv6 port
/// unreachable quoting it, MACs swapped, sent back out of the same device.
#[test]
fn reject_answers_port_unreachable() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_REJECT), 0, &[]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    setup.extend(service(2, every_class(ACT_REJECT), 0, &[]));
    setup.push(nodeport(30053, PROTO_UDP, FAM_V6, 2));
    rig.run(&setup, |dp| {
        let sent = ip_packet(ip(CLIENT4), ip(NODE4), &tcp(40000, 30080, 0x02, b"hello"), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &eth(NODE_MAC, CLIENT_MAC, &sent));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT, "sent back out");
        let icmp4 = icmp(PROTO_ICMP, 3, 3, [0; 4], &sent[..28]);
        let want = eth(
            CLIENT_MAC,
            NODE_MAC,
            &ip_packet(ip(NODE4), ip(CLIENT4), &icmp4, IpOpts { id: 0, frag: 0, ..IpOpts::default() }),
        );
        check(&ran.out);
        assert_eq!(ran.out, want, "ICMP port unreachable quoting the IP header and 8 bytes");
        assert_eq!(ran.moved, moved(&[("pkt_reject", 1)]));

        let sent =
            ip_packet(ip(CLIENT6), ip(NODE6), &udp(40000, 30053, b"a question of some length"), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &eth(NODE_MAC, CLIENT_MAC, &sent));
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let icmp6 = icmp(PROTO_ICMPV6, 1, 4, [0; 4], &sent[..48]);
        let want = eth(CLIENT_MAC, NODE_MAC, &ip_packet(ip(NODE6), ip(CLIENT6), &icmp6, IpOpts::default()));
        check(&ran.out);
        assert_eq!(ran.out, want, "ICMPv6 port unreachable quoting 48 bytes");
        assert_eq!(ran.moved, moved(&[("pkt_reject", 1)]));

        // An IPv4 header with options is not quoted: dropped and counted.
        let mut opt = ip_packet(ip(CLIENT4), ip(NODE4), &tcp(40001, 30080, 0x02, b""), IpOpts::default());
        opt[0] = 0x46;
        opt.splice(20..20, [1, 1, 1, 0]); // NOP NOP NOP EOL
        let tot = opt.len() as u16;
        opt[2..4].copy_from_slice(&tot.to_be_bytes());
        opt[10..12].fill(0);
        let c = fold(sum16(&opt[..24], 0));
        opt[10..12].copy_from_slice(&c.to_be_bytes());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &eth(NODE_MAC, CLIENT_MAC, &opt));
        assert_eq!(ran.verdict, TC_ACT_SHOT);
        assert_eq!(ran.moved, moved(&[("drop_reject_failed", 1)]));
    });
}

/// loadBalancerSourceRanges: a source inside the ranges is load-balanced, one
/// outside is dropped and counted, its bytes untouched.
#[test]
fn source_ranges_drop_other_sources() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(frontend("203.0.113.10", 80, PROTO_TCP, FE_LOAD_BALANCER, FE_FIREWALL, 1));
    setup.push(MapOp::PutFirewall(FwKey { prefixlen: 32 + 24, service: 1, addr: words_of("198.51.100.0") }));
    rig.run(&setup, |dp| {
        let inside = frame(ip(CLIENT4), ip("203.0.113.10"), &tcp(20000, 80, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &inside);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(ran.out, frame(ip(NODE4), ip(REMOTE4), &tcp(20000, 8080, 0x02, b""), ttl(63)));

        let outside = frame(ip("192.0.2.77"), ip("203.0.113.10"), &tcp(20000, 80, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &outside);
        assert_eq!(ran.verdict, TC_ACT_SHOT);
        assert_eq!(ran.out, outside, "a dropped packet is not rewritten");
        assert_eq!(ran.moved, moved(&[("drop_firewall", 1)]));
    });
}

/// Two frontends of one service reached by the same client tuple without
/// SNAT lead to the same backend-side tuple: the second flow is refused
/// (counted as a clash) instead of hijacking the first flow's replies.
#[test]
fn ct_clash_is_dropped_and_counted() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10, POD4, 8080, true)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    setup.push(frontend("203.0.113.10", 80, PROTO_TCP, FE_LOAD_BALANCER, 0, 1));
    rig.run(&setup, |dp| {
        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(CLIENT4), ip(NODE4), &tcp(40000, 30080, 0x02, b""), IpOpts::default()),
        );
        assert_eq!((ran.verdict, ran.moved), (TC_ACT_REDIRECT, moved(&[("pkt_new_flow", 1)])));
        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(CLIENT4), ip("203.0.113.10"), &tcp(40000, 80, 0x02, b""), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_SHOT);
        assert_eq!(ran.moved, moved(&[("drop_ct_clash", 1)]));
    });
}

/// A one-port natPortRange held by one confirmed flow: the next flow to the
/// same backend tries its own port, then walks the range twice (free ports,
/// then ports of unconfirmed flows: none), then is dropped as NAT exhaustion.
/// While the holder was unconfirmed, the newcomer took its port over instead
/// (netfilter's early drop of an unassured flow), counted as `ct_early_drop`.
#[test]
fn nat_port_exhaustion_is_dropped_and_counted() {
    let rig = Rig::new();
    let mut setup = node_setup();
    if let MapOp::PutConfig(c) = &mut setup[0] {
        c.nat_port_min = 2000;
        c.nat_port_max = 2000;
    }
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    rig.run(&setup, |dp| {
        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(CLIENT4), ip(NODE4), &tcp(2000, 30080, 0x02, b""), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(check(&ran.out).sport, 2000);
        // A second client while the first flow is half-open: it takes the port.
        let second = frame(ip("198.51.100.8"), ip(NODE4), &tcp(2000, 30080, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &second);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(check(&ran.out).sport, 2000);
        assert_eq!(ran.moved, moved(&[("ct_early_drop", 1), ("nat_retry", 2), ("pkt_new_flow", 1)]));
        assert_eq!(ran.tables, moved(&[("ct_new_delete", 2), ("ct_new_insert", 2)]), "the old flow's two entries out");
        assert_eq!(tables(dp), (0, 2), "only the second flow is tracked");
        // The second flow completes its handshake: confirmed, its port is safe.
        let back = frame(ip(REMOTE4), ip(NODE4), &tcp(8080, 2000, SYN_ACK, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &back);
        assert_eq!(ran.out, frame(ip(NODE4), ip("198.51.100.8"), &tcp(30080, 2000, SYN_ACK, b""), ttl(63)));
        let ack = frame(ip("198.51.100.8"), ip(NODE4), &tcp(2000, 30080, ACK, b""), IpOpts::default());
        assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &ack).tables.get("ct_confirm"), Some(&1));
        let third = frame(ip("198.51.100.9"), ip(NODE4), &tcp(2000, 30080, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &third);
        assert_eq!(ran.verdict, TC_ACT_SHOT);
        assert_eq!(ran.moved, moved(&[("nat_retry", 3), ("drop_nat_exhausted", 1)]));
    });
}

/// Drops with their reasons: policy Local without a local endpoint, an
/// unallocated service-CIDR address, a TTL that runs out while forwarding.
#[test]
fn drops_are_counted_by_reason() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_DROP), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    setup.extend(service(2, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(20, REMOTE4, 8080, false)]));
    setup.push(nodeport(30081, PROTO_TCP, FAM_V4, 2));
    rig.run(&setup, |dp| {
        let cases = [
            (frame(ip(CLIENT4), ip(NODE4), &tcp(40000, 30080, 0x02, b""), IpOpts::default()), "drop_no_endpoint"),
            (frame(ip(CLIENT4), ip("10.96.5.5"), &tcp(40000, 80, 0x02, b""), IpOpts::default()), "drop_service_cidr"),
            (frame(ip(CLIENT4), ip(NODE4), &tcp(20000, 30081, 0x02, b""), ttl(1)), "drop_ttl_exceeded"),
        ];
        for (pkt, reason) in cases {
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &pkt);
            assert_eq!(ran.verdict, TC_ACT_SHOT, "{reason}");
            // The TTL case was load-balanced first; only the drop reason is asked for here.
            assert_eq!(ran.moved.get(reason), Some(&1), "{reason}: {:?}", ran.moved);
        }
    });
}

/// Traffic that is not a service's passes every hook untouched, no counter moves.
#[test]
fn other_traffic_passes_untouched() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    rig.run(&setup, |dp| {
        let pkts = [
            frame(ip(CLIENT4), ip(NODE4), &tcp(40000, 22, 0x02, b""), IpOpts::default()),
            frame(ip(CLIENT6), ip(NODE6), &udp(40000, 53, b"q"), IpOpts::default()),
            frame(ip(POD4), ip(REMOTE4), &tcp(40000, 8080, 0x02, b""), IpOpts::default()),
        ];
        for (hook, dev) in [(Hook::FromNetdev, dp.eth0), (Hook::FromPods, dp.pods0), (Hook::ToNetdev, dp.eth0)] {
            for pkt in &pkts {
                let ran = dp.run(hook, dev, pkt);
                assert_eq!((ran.verdict, &ran.out), (TC_ACT_OK, pkt), "{hook:?}");
                assert!(ran.moved.is_empty(), "{hook:?}: {:?}", ran.moved);
            }
        }
    });
}

/// The pass-through fast path (`bpf/lib/maps.h`): a new flow sent to a local
/// backend without SNAT notes the backend in `ferry_peers` (its replies carry
/// the backend's own address and must be translated back), a SNATed one does
/// not (its replies come to a node address). A packet that neither goes to
/// an address in `ferry_addrs` nor comes from a peer leaves without any
/// conntrack lookup: with its peer entry taken away, a reply of a tracked
/// flow is waved through untranslated (which no agent lets happen: peers go
/// only with their flows), and translated again once the fast path is off.
/// The service CIDR is never waved through.
#[test]
fn the_fast_path_skips_the_conntrack_only_for_packets_no_flow_needs() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10, POD4, 8080, true)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    setup.extend(service(2, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(20, REMOTE4, 8080, false)]));
    setup.push(nodeport(30081, PROTO_TCP, FAM_V4, 2));
    let slow_config = setup[0].clone();
    rig.run(&setup, |dp| {
        use ferry_bpf::pass::PassSet;
        let peer = LocalKey { addr: words_of(POD4), family: FAM_V4 };
        assert!(dp.maps.pass_set(PassSet::Peers).is_empty());
        let syn = |port| frame(ip(CLIENT4), ip(NODE4), &tcp(40000, port, 0x02, b""), IpOpts::default());
        assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &syn(30080)).verdict, TC_ACT_REDIRECT);
        assert_eq!(dp.maps.pass_set(PassSet::Peers), vec![peer], "the unSNATed flow's backend is noted");
        assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &syn(30081)).verdict, TC_ACT_REDIRECT);
        assert_eq!(dp.maps.pass_set(PassSet::Peers), vec![peer], "a SNATed flow's backend is not");

        let reply = frame(ip(POD4), ip(CLIENT4), &tcp(8080, 40000, 0x12, b""), IpOpts::default());
        let translated = frame(ip(NODE4), ip(CLIENT4), &tcp(30080, 40000, 0x12, b""), ttl(63));
        let ran = dp.run(Hook::FromPods, dp.pods0, &reply);
        assert_eq!((ran.verdict, &ran.out), (TC_ACT_REDIRECT, &translated));

        assert_eq!(dp.maps.delete_pass_set(PassSet::Peers, &[peer]), 1);
        let ran = dp.run(Hook::FromPods, dp.pods0, &reply);
        assert_eq!((ran.verdict, &ran.out), (TC_ACT_OK, &reply), "waved through: the conntrack was not consulted");
        assert!(ran.moved.is_empty() && ran.tables.is_empty(), "{:?} {:?}", ran.moved, ran.tables);

        dp.maps.apply(std::slice::from_ref(&slow_config)).unwrap();
        let ran = dp.run(Hook::FromPods, dp.pods0, &reply);
        assert_eq!((ran.verdict, &ran.out), (TC_ACT_REDIRECT, &translated), "the full path still has the flow");

        let mut fast = with_fast_pass(std::slice::from_ref(&slow_config));
        fast.retain(|op| matches!(op, MapOp::PutConfig(_)));
        dp.maps.apply(&fast).unwrap();
        let unallocated = frame(ip(POD4), ip("10.96.5.5"), &tcp(40000, 80, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromPods, dp.pods0, &unallocated);
        assert_eq!(ran.verdict, TC_ACT_SHOT);
        assert_eq!(ran.moved, moved(&[("drop_service_cidr", 1)]));
    });
}

/// A full `ferry_peers` refuses a new flow to a backend it cannot note
/// (its replies would be waved through untranslated), counted as
/// `drop_peers_full`; flows to noted backends and SNATed flows go on.
#[test]
fn a_full_peers_map_refuses_only_flows_whose_backend_it_cannot_note() {
    let rig = Rig::new();
    rig.small_peers(2);
    let mut setup = node_setup();
    for (id, port, pod) in [(1, 30081, "10.244.1.5"), (2, 30082, "10.244.1.6"), (3, 30083, "10.244.1.7")] {
        setup.extend(service(id, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10 + id, pod, 8080, true)]));
        setup.push(nodeport(port, PROTO_TCP, FAM_V4, id));
    }
    setup.extend(service(4, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(20, REMOTE4, 8080, false)]));
    setup.push(nodeport(30084, PROTO_TCP, FAM_V4, 4));
    rig.run(&setup, |dp| {
        let syn = |sport, port| frame(ip(CLIENT4), ip(NODE4), &tcp(sport, port, 0x02, b""), IpOpts::default());
        for port in [30081, 30082] {
            assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &syn(40000, port)).verdict, TC_ACT_REDIRECT);
        }
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn(40000, 30083));
        assert_eq!(ran.verdict, TC_ACT_SHOT, "a third backend does not fit a 2-entry ferry_peers");
        assert_eq!(ran.moved, moved(&[("drop_peers_full", 1)]));
        // A backend already noted, and a SNATed flow, need no new entry.
        assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &syn(40001, 30081)).verdict, TC_ACT_REDIRECT);
        assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &syn(40002, 30084)).verdict, TC_ACT_REDIRECT);
    });
}

/// `masquerade: bpf`: a pod's new connection to the outside leaves with the
/// node's address (tcx egress of the uplink); the reply and an ICMP error
/// about the flow come back to the pod. No SNAT address for a family: the
/// packet leaves unmasqueraded and the give-up is counted.
#[test]
fn pod_egress_is_masqueraded() {
    let rig = Rig::new();
    let mut setup = node_setup();
    if let MapOp::PutConfig(c) = &mut setup[0] {
        c.flags |= CFG_MASQ_BPF;
        c.primary[1] = [0; 4]; // no IPv6 SNAT address
    }
    for (kind, cidr) in
        [(RANGE_MASQ_SOURCE, "10.244.1.0/24"), (RANGE_MASQ_SOURCE, "fd00:244:1::/64"), (RANGE_NO_MASQ, "10.0.0.0/8")]
    {
        setup.push(MapOp::PutRange(prefix(kind, cidr)));
    }
    rig.run(&setup, |dp| {
        let out = "203.0.113.99";
        let ran =
            dp.run(Hook::ToNetdev, dp.eth0, &frame(ip(POD4), ip(out), &tcp(20000, 443, 0x02, b""), IpOpts::default()));
        assert_eq!(ran.verdict, TC_ACT_OK, "egress: the kernel sends it on");
        check(&ran.out);
        assert_eq!(ran.out, frame(ip(NODE4), ip(out), &tcp(20000, 443, 0x02, b""), IpOpts::default()));
        assert_eq!(ran.moved, moved(&[("masq_new_flow", 1)]));

        let ran = dp.run(
            Hook::FromNetdev,
            dp.eth0,
            &frame(ip(out), ip(NODE4), &tcp(443, 20000, 0x12, b""), IpOpts::default()),
        );
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(ran.out, frame(ip(out), ip(POD4), &tcp(443, 20000, 0x12, b""), ttl(63)));
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]));

        let sent = ip_packet(ip(NODE4), ip(out), &tcp(20000, 443, 0x02, b""), IpOpts::default());
        let err = frame(ip("192.0.2.254"), ip(NODE4), &icmp(PROTO_ICMP, 11, 0, [0; 4], &sent[..28]), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &err);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        let pod_sent = ip_packet(ip(POD4), ip(out), &tcp(20000, 443, 0x02, b""), IpOpts::default());
        let want = frame(ip("192.0.2.254"), ip(POD4), &icmp(PROTO_ICMP, 11, 0, [0; 4], &pod_sent[..28]), ttl(63));
        check(&ran.out);
        assert_eq!(ran.out, want, "time exceeded, back to the pod");
        assert_eq!(ran.moved, moved(&[("icmp_error_rev", 1)]));

        // Inside the exempt ranges: untouched.
        let inside = frame(ip(POD4), ip(REMOTE4), &tcp(20001, 8080, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::ToNetdev, dp.eth0, &inside);
        assert_eq!((ran.verdict, &ran.out, ran.moved.len()), (TC_ACT_OK, &inside, 0));

        // IPv6 without an SNAT address: left as it is, counted.
        let v6 = frame(ip(POD6), ip("2001:db8:ff::1"), &udp(20002, 53, b"q"), IpOpts::default());
        let ran = dp.run(Hook::ToNetdev, dp.eth0, &v6);
        assert_eq!((ran.verdict, &ran.out), (TC_ACT_OK, &v6));
        assert_eq!(ran.moved, moved(&[("giveup_masq_no_addr", 1)]));
    });
}

/// A frontend whose service entry is missing (between two updates) is passed
/// on untranslated, and counted.
#[test]
fn a_frontend_without_its_service_is_passed_on_and_counted() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 9));
    rig.run(&setup, |dp| {
        let pkt = frame(ip(CLIENT4), ip(NODE4), &tcp(40000, 30080, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &pkt);
        assert_eq!((ran.verdict, &ran.out), (TC_ACT_OK, &pkt));
        assert_eq!(ran.moved, moved(&[("giveup_no_service", 1)]));
    });
}

/// A pinned map of another layout (a datapath pinned by another ferry
/// version) is refused when the maps are opened, naming the map and both
/// sizes, instead of being read with padding.
#[test]
fn a_pinned_map_of_another_layout_is_refused() {
    let rig = Rig::new();
    let pin = rig.pin.clone();
    rig.run(&node_setup(), |_dp| {
        let path = pin.join("ferry_devices");
        std::fs::remove_file(&path).expect("unpinning ferry_devices");
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        let mut other = libbpf_rs::MapHandle::create(libbpf_rs::MapType::Hash, Some("ferry_devices"), 4, 8, 16, &opts)
            .expect("creating a map of another layout");
        other.pin(&path).expect("pinning it in place of ferry_devices");
        let err = Maps::open(&pin).err().expect("opening must fail");
        let text = err.to_string();
        assert!(
            text.contains("ferry_devices") && text.contains("value size 8") && text.contains("ferry cleanup"),
            "{text}"
        );
    });
}

/// A tracked NodePort flow whose conntrack entries are gone (evicted by LRU
/// pressure, expired or purged): its next mid-flow TCP segment (no SYN) is
/// load-balanced anew, and counted as `ct_lost`; a SYN is not.
#[test]
fn a_mid_flow_tcp_segment_without_conntrack_is_counted_as_ct_lost() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10, POD4, 8080, true)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    rig.run(&setup, |dp| {
        let syn = frame(ip(CLIENT4), ip(NODE4), &tcp(40001, 30080, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn);
        assert_eq!((ran.verdict, ran.moved), (TC_ACT_REDIRECT, moved(&[("pkt_new_flow", 1)])));
        let ack = frame(ip(CLIENT4), ip(NODE4), &tcp(40001, 30080, 0x10, b"more"), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &ack);
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "tracked");

        let entries = dp.maps.ct_entries();
        assert_eq!(dp.maps.delete_ct(&entries), 2, "the flow's two entries");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &ack);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(ran.moved, moved(&[("ct_lost", 1), ("pkt_new_flow", 1)]), "lost, re-balanced");
    });
}

/// A SYN that reuses the 4-tuple of a closing flow (a client's TIME_WAIT
/// reuse) is a new flow, balanced again as netfilter does, not sent after the
/// old backend; a SYN retransmitted while the flow is open follows it.
#[test]
fn a_syn_reopening_a_closed_flow_is_balanced_again() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10, POD4, 8080, true)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    rig.run(&setup, |dp| {
        let syn = frame(ip(CLIENT4), ip(NODE4), &tcp(40001, 30080, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn);
        assert_eq!((ran.verdict, ran.moved), (TC_ACT_REDIRECT, moved(&[("pkt_new_flow", 1)])));
        assert_eq!(ran.out, frame(ip(CLIENT4), ip(POD4), &tcp(40001, 8080, 0x02, b""), ttl(63)));
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn);
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "a retransmitted SYN follows the open flow");

        let fin = frame(ip(CLIENT4), ip(NODE4), &tcp(40001, 30080, 0x11, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &fin);
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "the client closes");
        // The service moves to another backend while the old flow lingers in conntrack.
        dp.maps.apply(&service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(11, POD4, 9090, true)])).unwrap();

        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(ran.moved, moved(&[("pkt_new_flow", 1)]), "balanced again");
        assert_eq!(ran.out, frame(ip(CLIENT4), ip(POD4), &tcp(40001, 9090, 0x02, b""), ttl(63)));
        assert_eq!(dp.maps.ct_entries().len(), 2, "the old flow's entries are gone, the new flow's are in");
    });
}

/// A SYN that meets an open flow whose reply entry is gone (evicted from
/// `ferry_ct_new`, or left behind by a copy across map layouts) opens a new
/// flow instead of following it: followed, its SYN-ACK would meet nothing
/// that turns it back (the node's stack resets it), for every connection
/// that reuses the tuple. A SYN retransmitted while both entries are there
/// still follows the flow.
#[test]
fn a_syn_meeting_a_flow_without_its_reply_entry_opens_it_anew() {
    let rig = Rig::new();
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10, POD4, 8080, true)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    rig.run(&setup, |dp| {
        let syn = frame(ip(CLIENT4), ip(NODE4), &tcp(40001, 30080, 0x02, b""), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn);
        assert_eq!((ran.verdict, ran.moved), (TC_ACT_REDIRECT, moved(&[("pkt_new_flow", 1)])));
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn);
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "a retransmitted SYN follows the whole flow");

        let reply: Vec<_> = dp.maps.ct_entries().into_iter().filter(|e| e.dir == CT_REPLY).collect();
        assert_eq!(dp.maps.delete_ct(&reply), 1, "the flow's reply entry");
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &syn);
        assert_eq!(ran.verdict, TC_ACT_REDIRECT);
        assert_eq!(ran.moved, moved(&[("ct_orphan_syn", 1), ("pkt_new_flow", 1)]), "opened anew");
        assert_eq!(ran.out, frame(ip(CLIENT4), ip(POD4), &tcp(40001, 8080, 0x02, b""), ttl(63)));
        let entries = dp.maps.ct_entries();
        assert_eq!(entries.len(), 2, "the new flow has both entries: {entries:?}");
        // Its SYN-ACK is turned back to the client.
        let syn_ack = frame(ip(POD4), ip(CLIENT4), &tcp(8080, 40001, 0x12, b""), IpOpts::default());
        let ran = dp.run(Hook::FromPods, dp.pods0, &syn_ack);
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]));
        assert_eq!(ran.out, frame(ip(NODE4), ip(CLIENT4), &tcp(30080, 40001, 0x12, b""), ttl(63)));
    });
}

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;
const FIN_ACK: u8 = 0x11;

/// How many entries of each table: (confirmed in `ferry_ct`, unconfirmed in `ferry_ct_new`).
fn tables(dp: &Dp) -> (usize, usize) {
    let e = dp.maps.ct_entries();
    let unconfirmed = e.iter().filter(|e| e.unconfirmed).count();
    (e.len() - unconfirmed, unconfirmed)
}

/// A NodePort TCP flow to the local pod: client SYN, the pod's SYN-ACK, and
/// `third` from the client (the handshake's ACK, or an RST).
fn handshake(dp: &Dp, cport: u16, third: u8) -> [Ran; 3] {
    let c = |flags| frame(ip(CLIENT4), ip(NODE4), &tcp(cport, 30080, flags, b""), IpOpts::default());
    let syn = dp.run(Hook::FromNetdev, dp.eth0, &c(SYN));
    let reply = frame(ip(POD4), ip(CLIENT4), &tcp(8080, cport, SYN_ACK, b""), IpOpts::default());
    let syn_ack = dp.run(Hook::FromPods, dp.pods0, &reply);
    let last = dp.run(Hook::FromNetdev, dp.eth0, &c(third));
    [syn, syn_ack, last]
}

fn local_nodeport() -> Vec<MapOp> {
    let mut setup = node_setup();
    setup.extend(service(1, every_class(ACT_FORWARD_LOCAL), 0, &[Be(10, POD4, 8080, true)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    setup.push(nodeport(30053, PROTO_UDP, FAM_V4, 1));
    setup
}

/// A new flow's two entries go into `ferry_ct_new`; a TCP flow moves to
/// `ferry_ct` when the client's ACK completes the handshake (not on the
/// SYN-ACK, and never on an RST, which is how a SYN flood's client answers a
/// SYN-ACK it did not ask for); UDP moves on its first reply. Every insert,
/// removal and confirmation is counted.
#[test]
fn flows_are_confirmed_into_ferry_ct_when_the_handshake_completes_or_on_the_first_reply() {
    let rig = Rig::new();
    rig.run(&local_nodeport(), |dp| {
        let [syn, syn_ack, ack] = handshake(dp, 40001, ACK);
        assert_eq!(
            (syn.verdict, syn.moved, syn.tables),
            (TC_ACT_REDIRECT, moved(&[("pkt_new_flow", 1)]), moved(&[("ct_new_insert", 2)]))
        );
        assert_eq!(syn_ack.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            (syn_ack.moved, syn_ack.tables),
            (moved(&[("pkt_forward", 1)]), moved(&[])),
            "a SYN-ACK confirms nothing"
        );
        assert_eq!(
            ack.out,
            frame(ip(CLIENT4), ip(POD4), &tcp(40001, 8080, ACK, b""), ttl(63)),
            "the ACK is translated as before"
        );
        assert_eq!(ack.moved, moved(&[("pkt_forward", 1)]));
        assert_eq!(
            ack.tables,
            moved(&[("ct_confirm", 1), ("ct_new_delete", 2)]),
            "the handshake's ACK confirms the flow"
        );
        assert_eq!(tables(dp), (2, 0), "both entries in ferry_ct, none left in ferry_ct_new");
        let now = ferry_bpf::stale::monotonic_ns();
        for e in dp.maps.ct_entries() {
            assert!(e.expires_ns > now + 3600 * 1_000_000_000, "confirmed: tcpEstablishedTimeout (24h) {e:?}");
        }
        let data = frame(ip(CLIENT4), ip(NODE4), &tcp(40001, 30080, ACK, b"data"), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &data);
        assert_eq!(
            (ran.verdict, ran.moved, ran.tables),
            (TC_ACT_REDIRECT, moved(&[("pkt_forward", 1)]), moved(&[])),
            "tracked from ferry_ct"
        );
        let reply = frame(ip(POD4), ip(CLIENT4), &tcp(8080, 40001, ACK, b"back"), IpOpts::default());
        let ran = dp.run(Hook::FromPods, dp.pods0, &reply);
        assert_eq!(ran.out, frame(ip(NODE4), ip(CLIENT4), &tcp(30080, 40001, ACK, b"back"), ttl(63)));

        // A half-open flow answered with an RST stays unconfirmed.
        let [_, _, rst] = handshake(dp, 40002, RST);
        assert_eq!(rst.tables, moved(&[]), "an RST confirms nothing");
        assert_eq!(tables(dp), (2, 2));
        let [_, syn_ack, _] = handshake(dp, 40004, SYN);
        assert_eq!(syn_ack.tables, moved(&[]));
        let now = ferry_bpf::stale::monotonic_ns();
        for e in dp.maps.ct_entries().iter().filter(|e| e.unconfirmed && (e.sport == 40004 || e.dport == 40004)) {
            assert!(e.expires_ns <= now + 60 * 1_000_000_000, "half-open after its SYN-ACK: tcpSynTimeout {e:?}");
        }
        assert_eq!(tables(dp), (2, 4));

        // UDP: confirmed by its first reply.
        let q = frame(ip(CLIENT4), ip(NODE4), &udp(40003, 30053, b"q"), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &q);
        assert_eq!(ran.tables, moved(&[("ct_new_insert", 2)]));
        let a = frame(ip(POD4), ip(CLIENT4), &udp(8080, 40003, b"a"), IpOpts::default());
        let ran = dp.run(Hook::FromPods, dp.pods0, &a);
        assert_eq!(ran.out, frame(ip(NODE4), ip(CLIENT4), &udp(30053, 40003, b"a"), ttl(63)));
        assert_eq!(ran.tables, moved(&[("ct_confirm", 1), ("ct_new_delete", 2)]));
        assert_eq!(tables(dp), (4, 4));
    });
}

/// A SYN flood through a small `ferry_ct_new` (32 entries) evicts only
/// unconfirmed flows: the established flows in `ferry_ct` (room for 4 flows)
/// keep being translated, no segment of theirs is lost (`ct_lost` 0), and
/// the evictions are counted exactly (inserts - removals - entries held).
/// When `ferry_ct` is full, a completed handshake is refused there
/// (`ct_confirm_full`) and its flow goes on from `ferry_ct_new`.
#[test]
fn a_syn_flood_evicts_only_unconfirmed_flows_and_every_eviction_is_counted() {
    let rig = Rig::new();
    rig.small_conntrack(8, 32);
    rig.run(&local_nodeport(), |dp| {
        for cport in 41000..41004 {
            let [_, _, ack] = handshake(dp, cport, ACK);
            assert_eq!(ack.tables.get("ct_confirm"), Some(&1), "flow {cport} confirmed");
        }
        assert_eq!(tables(dp), (8, 0), "ferry_ct is full");
        let before = dp.maps.counters();

        let flood = 200u16;
        for i in 0..flood {
            let src = format!("198.51.100.{}", 10 + i % 200);
            let pkt = frame(ip(&src), ip(NODE4), &tcp(50000 + i, 30080, SYN, b""), IpOpts::default());
            assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &pkt).verdict, TC_ACT_REDIRECT);
        }
        let (confirmed, unconfirmed) = tables(dp);
        assert_eq!(confirmed, 8, "not one established entry was evicted");
        assert!(unconfirmed <= 32, "{unconfirmed} entries in a 32-entry LRU");
        let held = dp.maps.lru_evictions(unconfirmed as u64, 0, 0);
        assert_eq!(held.ct_new, 2 * flood as u64 - unconfirmed as u64, "every eviction counted");
        let after = dp.maps.counters();
        let delta = |name: &str| {
            let i = ferry_bpf::stats::NAMES.iter().position(|n| *n == name).unwrap();
            after[i] - before[i]
        };
        assert_eq!((delta("ct_new_insert"), delta("ct_new_delete")), (2 * flood as u64, 0));

        for cport in 41000..41004 {
            let pkt = frame(ip(CLIENT4), ip(NODE4), &tcp(cport, 30080, ACK, b"still"), IpOpts::default());
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &pkt);
            assert_eq!(
                ran.out,
                frame(ip(CLIENT4), ip(POD4), &tcp(cport, 8080, ACK, b"still"), ttl(63)),
                "flow {cport}"
            );
            assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "flow {cport}: tracked, not lost");
        }

        // A fifth established flow finds ferry_ct full: counted, and still served.
        let [_, _, ack] = handshake(dp, 41004, ACK);
        assert_eq!(ack.verdict, TC_ACT_REDIRECT);
        assert_eq!(ack.tables, moved(&[("ct_confirm_full", 1)]));
        let pkt = frame(ip(CLIENT4), ip(NODE4), &tcp(41004, 30080, ACK, b"more"), IpOpts::default());
        let ran = dp.run(Hook::FromNetdev, dp.eth0, &pkt);
        assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "served from ferry_ct_new");
    });
}

/// natPortRange of 64 ports and 200 flows from one client address to one
/// remote backend: the walk over the range finds every free port, so exactly
/// 64 flows get one (all 64 ports, each once) and exactly 136 are dropped as
/// `drop_nat_exhausted`. The 64 are confirmed into `ferry_ct` (the walk must
/// see ports held there too). Once they close and the close timeout (1 s)
/// passes, their ports serve 64 new flows, and the 65th is dropped again.
#[test]
fn a_64_port_nat_range_takes_64_flows_to_one_backend_drops_the_rest_exactly_and_recovers() {
    let rig = Rig::new();
    let mut setup = node_setup();
    if let MapOp::PutConfig(c) = &mut setup[0] {
        c.nat_port_min = 2000;
        c.nat_port_max = 2063;
        c.tcp_close_timeout = 1;
    }
    setup.extend(service(1, every_class(ACT_FORWARD_CLUSTER | ACT_MASQ), 0, &[Be(10, REMOTE4, 8080, false)]));
    setup.push(nodeport(30080, PROTO_TCP, FAM_V4, 1));
    rig.run(&setup, |dp| {
        let c = |cport: u16, flags| frame(ip(CLIENT4), ip(NODE4), &tcp(cport, 30080, flags, b""), IpOpts::default());
        // Opens flows from client ports `ports` (outside the NAT range);
        // returns the SNAT ports of those that got one, and the drops.
        let open = |ports: std::ops::Range<u16>| {
            let (mut nat, mut dropped) = (Vec::new(), 0u64);
            for cport in ports {
                let ran = dp.run(Hook::FromNetdev, dp.eth0, &c(cport, SYN));
                if ran.verdict == TC_ACT_SHOT {
                    assert_eq!(ran.moved.get("drop_nat_exhausted"), Some(&1), "{cport}: {:?}", ran.moved);
                    assert_eq!(
                        ran.moved.get("nat_retry"),
                        Some(&128),
                        "{cport}: every port of the range tried twice (free, then held by an unconfirmed flow)"
                    );
                    dropped += 1;
                    continue;
                }
                assert_eq!(ran.verdict, TC_ACT_REDIRECT);
                let port = check(&ran.out).sport;
                let back = frame(ip(REMOTE4), ip(NODE4), &tcp(8080, port, SYN_ACK, b""), IpOpts::default());
                assert_eq!(dp.run(Hook::FromNetdev, dp.eth0, &back).verdict, TC_ACT_REDIRECT);
                let ack = dp.run(Hook::FromNetdev, dp.eth0, &c(cport, ACK));
                assert_eq!(ack.tables.get("ct_confirm"), Some(&1), "{cport} confirmed");
                nat.push((cport, port));
            }
            (nat, dropped)
        };
        let (nat, dropped) = open(40000..40200);
        let ports: std::collections::BTreeSet<u16> = nat.iter().map(|(_, p)| *p).collect();
        assert_eq!((nat.len(), dropped), (64, 136), "64 flows served, 136 dropped");
        assert_eq!(ports, (2000..=2063).collect(), "every port of the range, each once");
        assert_eq!(tables(dp), (128, 0));

        for (cport, _) in &nat {
            let ran = dp.run(Hook::FromNetdev, dp.eth0, &c(*cport, FIN_ACK));
            assert_eq!(ran.moved, moved(&[("pkt_forward", 1)]), "{cport} closes");
        }
        // Waits out the close timeout (1 s) and the clock's granularity; nothing is timed.
        std::thread::sleep(std::time::Duration::from_millis(2500));
        let (nat, dropped) = open(41000..41065);
        assert_eq!((nat.len(), dropped), (64, 1), "the closed flows' ports serve new flows");
    });
}
