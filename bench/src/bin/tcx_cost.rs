//! `tcx_cost`: what one packet costs in ferry's tcx programs, by kind, at
//! 1,000, 10,000 and 100,000 services, measured by the kernel itself
//! (`BPF_PROG_TEST_RUN`: the run time of the program alone, no network stack
//! around it). Each figure is the median of `--runs` single runs on a fresh
//! copy of the packet (`repeat` would run the program again on the packet it
//! already rewrote).
//!
//! Packet kinds, each a TCP segment on an uplink:
//!
//! - `pass/ingress`, `pass/egress`: traffic that is not a service's (pod to
//!   a pod of another node, on `ferry_from_netdev` / `ferry_to_netdev`): what
//!   the pass-through fast path (issue 15, item 4) is for;
//! - `tracked`: a packet of a NodePort flow already in the conntrack;
//! - `nodeport-miss`: to a node address, a port no NodePort uses.
//!
//! Each kind is measured twice in the same run: on the full path (the
//! datapath as a fresh install leaves it) and once the agent has filled the
//! pass-through sets and turned `CFG_FAST_PASS` on (as it does after its
//! first sync): pass-through traffic should get cheaper, service traffic pays
//! the two extra lookups.
//!
//! Every service has a ClusterIP frontend (port 80) and a NodePort (30000 + i
//! mod 2768 for the first 2768), two backends on another node. The maps are
//! written through the agent's own `MapOp`s into a `ferry-bench-*` pin
//! directory, the programs run in a `ferry-bench-*` network namespace (for
//! their FIB lookups); both are removed at the end, also on error. Needs
//! root. Prints a table on stdout; writes `bench/results/tcx-cost.md`.

use anyhow::Context;
use clap::Parser;
use ferry_bpf::MapOp;
use ferry_bpf::entries::*;
use ferry_bpf::{Maps, install};
use ferry_sandbox::Sandbox;
use libbpf_rs::ProgramInput;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

#[derive(Parser)]
#[command(about = "Per-packet cost of ferry's tcx programs by packet kind (root)")]
struct Args {
    /// Numbers of services.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<u32>,
    /// Single runs per figure (the median is reported).
    #[arg(long, default_value_t = 20_000)]
    runs: u32,
}

fn w(ip: &str) -> Words {
    words(&ip.parse().unwrap())
}

fn sum16(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        acc += (u64::from(c[0]) << 8) | u64::from(*c.get(1).unwrap_or(&0));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An Ethernet + IPv4 + TCP frame with valid checksums.
fn frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    tcp.extend_from_slice(b"0123456789abcdef");
    let mut ps = sum16(&src.octets(), 0);
    ps = sum16(&dst.octets(), ps) + 6 + tcp.len() as u64;
    let c = fold(sum16(&tcp, ps));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

fn setup(n: u32) -> Vec<MapOp> {
    let mut ops = vec![MapOp::PutConfig(Box::new(Config {
        host_netns: 1,
        pod_class: [CLASS_POD; 2],
        flags: CFG_PODS_BY_RANGE,
        primary: [w("192.0.2.1"), [0; 4]],
        tcp_syn_timeout: 60,
        tcp_established_timeout: 86400,
        tcp_close_timeout: 10,
        udp_timeout: 30,
        nat_port_min: 1024,
        nat_port_max: 29999,
        maglev_size: 0,
    }))];
    ops.push(MapOp::PutLocal(LocalKey { addr: w("192.0.2.1"), family: FAM_V4 }, LOCAL_HOST | LOCAL_NODEPORT));
    ops.push(MapOp::PutRange(RangeKey { prefixlen: 32 + 16, kind: RANGE_POD, family: FAM_V4, addr: w("10.244.0.0") }));
    ops.push(MapOp::PutRange(RangeKey {
        prefixlen: 32 + 12,
        kind: RANGE_SERVICE,
        family: FAM_V4,
        addr: w("10.96.0.0"),
    }));
    let act = ACT_FORWARD_CLUSTER | ACT_MASQ;
    for i in 0..n {
        let id = i + 1;
        for k in 0..2u32 {
            let bid = id * 2 + k;
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + bid);
            ops.push(MapOp::PutBackend(
                bid,
                Backend { addr: words(&IpAddr::V4(addr)), port: 8080, family: FAM_V4, flags: 0 },
            ));
            ops.push(MapOp::PutSlot(SlotKey { service: id, rev: 0, set: SET_CLUSTER, slot: k as u16 }, bid));
            ops.push(MapOp::PutMember(MemberKey { service: id, backend: bid }, 1 << SET_CLUSTER));
        }
        ops.push(MapOp::PutService(
            id,
            SvcVal { count: [2, 0], action: [[act; 3]; 2], flags: 0, rev: 0, affinity_timeout: 0 },
        ));
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + id);
        ops.push(MapOp::PutFrontend(
            FeKey { addr: words(&IpAddr::V4(vip)), port: 80, proto: 6, family: FAM_V4 },
            FeVal { service: id, kind: FE_CLUSTER_IP, flags: 0 },
        ));
        if i < 2768 {
            ops.push(MapOp::PutFrontend(
                FeKey { addr: [0; 4], port: 30000 + i as u16, proto: 6, family: FAM_V4 },
                FeVal { service: id, kind: FE_NODE_PORT, flags: 0 },
            ));
        }
    }
    ops
}

/// What the agent writes before it turns the fast path on: every frontend
/// and node address in `ferry_addrs`, then `CFG_FAST_PASS` in the config.
fn fast_pass(n: u32) -> Vec<MapOp> {
    let mut ops = vec![MapOp::PutAddr(LocalKey { addr: w("192.0.2.1"), family: FAM_V4 })];
    for i in 0..n {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1);
        ops.push(MapOp::PutAddr(LocalKey { addr: words(&IpAddr::V4(vip)), family: FAM_V4 }));
    }
    if let Some(MapOp::PutConfig(c)) = setup(0).into_iter().next() {
        let mut c = c;
        c.flags |= CFG_FAST_PASS;
        ops.push(MapOp::PutConfig(c));
    }
    ops
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut sb = Sandbox::new("bench").context("creating the sandbox (root?)")?;
    let node = sb.add_host("tcx")?;
    for cmd in [
        "link add eth0 type veth peer name eth0-peer",
        "link set eth0 up",
        "link set eth0-peer up",
        "addr add 192.0.2.1/24 dev eth0",
        "route add 10.244.0.0/16 via 192.0.2.2 dev eth0",
        "route add 10.245.0.0/16 via 192.0.2.2 dev eth0",
        "route add default via 192.0.2.254 dev eth0",
    ] {
        sb.ip(&node, &cmd.split(' ').collect::<Vec<_>>())?;
    }
    sb.set_forwarding(&node, true)?;
    let netns = sb.netns_path(&node);
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let pin = std::path::PathBuf::from("/sys/fs/bpf").join(format!("{}-p{n}", sb.id()));
        let runs = args.runs;
        let netns = netns.clone();
        let pin2 = pin.clone();
        let result = std::thread::spawn(move || -> anyhow::Result<Vec<(String, u32, u32)>> {
            let f = File::open(&netns)?;
            // SAFETY: setns on a valid fd, this thread only.
            anyhow::ensure!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0, "setns");
            let mut storage = std::mem::MaybeUninit::uninit();
            let skel = install::load_packet_programs(&mut storage, &pin2)?;
            let maps = Maps::open(&pin2)?;
            maps.apply(&setup(n))?;
            let ifindex = {
                let c = std::ffi::CString::new("eth0")?;
                // SAFETY: NUL-terminated name.
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            };
            let once = |prog: &libbpf_rs::ProgramMut, pkt: &[u8]| -> anyhow::Result<u32> {
                let mut ctx = [0u8; 192];
                ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
                let mut out = vec![0u8; pkt.len() + 64];
                let input = ProgramInput {
                    data_in: Some(pkt),
                    context_in: Some(&mut ctx),
                    data_out: Some(&mut out),
                    ..ProgramInput::default()
                };
                Ok(prog.test_run(input)?.duration.as_nanos() as u32)
            };
            let run = |prog: &libbpf_rs::ProgramMut, pkt: &[u8], runs: u32| -> anyhow::Result<u32> {
                let mut all = (0..runs.max(1)).map(|_| once(prog, pkt)).collect::<anyhow::Result<Vec<u32>>>()?;
                all.sort_unstable();
                Ok(all[all.len() / 2])
            };
            let p = &skel.progs;
            let client = Ipv4Addr::new(198, 51, 100, 7);
            let node = Ipv4Addr::new(192, 0, 2, 1);
            let pod = Ipv4Addr::new(10, 244, 1, 5);
            let other = Ipv4Addr::new(10, 244, 2, 9);
            // The tracked flow: its first packet creates it (SNAT keeps port 20000).
            once(&p.ferry_from_netdev, &frame(client, node, 20000, 30000, 0x02))?;
            let kinds: [(&str, &libbpf_rs::ProgramMut, Vec<u8>); 4] = [
                ("pass/ingress", &p.ferry_from_netdev, frame(other, pod, 8080, 40000, 0x10)),
                ("pass/egress", &p.ferry_to_netdev, frame(pod, other, 40000, 8080, 0x10)),
                ("tracked", &p.ferry_from_netdev, frame(client, node, 20000, 30000, 0x10)),
                ("nodeport-miss", &p.ferry_from_netdev, frame(client, node, 20001, 22, 0x02)),
            ];
            let mut full = Vec::new();
            for (_, prog, pkt) in &kinds {
                full.push(run(prog, pkt, runs)?);
            }
            // The same packets once the agent has filled the pass-through sets.
            maps.apply(&fast_pass(n))?;
            let mut out = Vec::new();
            for ((kind, prog, pkt), full) in kinds.iter().zip(full) {
                out.push((kind.to_string(), full, run(prog, pkt, runs)?));
            }
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the measuring thread panicked"));
        let _ = install::uninstall(&pin);
        for (kind, full, fast) in result?? {
            rows.push((n, kind, full, fast));
        }
    }
    let mut md = String::from(
        "| services | packet | full path ns | with the fast path ns | ratio |\n|---:|---|---:|---:|---:|\n",
    );
    for (n, kind, full, fast) in &rows {
        let ratio = f64::from(*fast) / f64::from((*full).max(1));
        md.push_str(&format!("| {n} | {kind} | {full} | {fast} | {ratio:.2} |\n"));
    }
    print!("{md}");
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/results/tcx-cost.md");
    std::fs::write(out, format!("# tcx_cost (BPF_PROG_TEST_RUN, median of {} single runs)\n\n{md}", args.runs))?;
    sb.close()?;
    Ok(())
}
