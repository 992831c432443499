//! The UDP flood: how many packets per second one core forwards through the
//! balancing node (node-a) for many small UDP flows to a backend on node-b,
//! and the CPU each million packets costs; on the tc path and, with
//! `acceleration: native`, at XDP.
//!
//! ```text
//!  client (generator pinned to CPU N)                       node-a              node-b        pod c
//!  AF_PACKET, 60-byte frames, F source ports ─► fabric ─► eth0 (tc | XDP) ─► fabric ─► eth0 ─► br0 ─► eth0: dropped
//!  arms: nodeport  node-a:30082 (np-udp, DNAT [+ SNAT | DSR])
//!        via-a     10.244.2.21 via node-a (plain forwarding by node-a: its floor)
//!        direct    10.244.2.20 via node-b (node-a not on the path: what the rest of the chain costs)
//! ```
//!
//! Everything is veth, so there are no interrupts and no other CPU: the
//! generator's own `sendmmsg` runs each frame through every hop, in softirq
//! raised and served on the generator's CPU (veth's transmit hands the packet
//! to the peer's backlog on the same CPU; with XDP on the receiving veth, to
//! its NAPI, also scheduled there). So the generator pinned to one CPU puts
//! the whole chain on that core, and what the chain costs per packet is that
//! core's time: the generator thread's run time (`/proc/thread-self/schedstat`,
//! in ns; softirq served on return from a syscall is charged to the thread)
//! plus what that CPU's `ksoftirqd` ran (softirq deferred to it). That is
//! exact whatever else runs on the machine; the wall-clock rate is not (other
//! work takes turns on the core). `/proc/stat`'s softirq time of that CPU is
//! tick-sampled (this kernel has no IRQ time accounting) and includes other
//! work's softirq: reported as the issue asks, with that caveat.
//!
//! The chain is more than node-a: the generator, two passes over the fabric
//! bridge, node-b's forwarding and the sink are in every arm alike. `direct`
//! measures them without node-a; `nodeport` minus `direct` is node-a's share
//! (plus one more fabric pass), the figure the tc-versus-XDP ratio is about.

use super::cluster::{CLIENT, CLIENT_IP, NODE_A, NODE_B, NodePortLab, POD_C, POD_C_VIA_A, UDP_REMOTE, UDP_TARGET_PORT};
use crate::stats::median;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Frames per `sendmmsg`.
const BATCH: usize = 64;
/// UDP payload: 14 + 20 + 8 + 18 = 60-byte frames, 64 bytes on a wire with the FCS.
const PAYLOAD: usize = 18;
const FRAME: usize = 14 + 20 + 8 + PAYLOAD;
/// The first source port; flow i uses FIRST_PORT + i.
const FIRST_PORT: u16 = 10000;
/// How long one generator run may take beyond its own duration.
const GEN_SLACK: Duration = Duration::from_secs(30);
/// Unrecorded seconds per arm before the runs (conntrack entries for every flow, neighbour caches).
const WARMUP_S: f64 = 1.0;

/// The hidden `flood` subcommand's work, inside the client host.
#[derive(Debug, Clone)]
pub struct GenSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub dst: Ipv4Addr,
    pub dst_port: u16,
    pub flows: u16,
    pub seconds: f64,
    pub cpu: usize,
    /// Stop after this many frames even if time is left.
    pub max_packets: u64,
}

/// What one generator run did.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GenReport {
    pub sent: u64,
    /// `sendmmsg` calls that failed (ENOBUFS and the like); the frames were not sent.
    pub send_errors: u64,
    pub elapsed_ns: u64,
    /// The generator thread's CPU time (ns), softirq served in its context included.
    pub runtime_ns: u64,
}

pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s}"))?;
    parts.try_into().map_err(|_| anyhow::anyhow!("MAC {s} is not 6 bytes"))
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

/// One Ethernet + IPv4 + UDP frame with correct checksums.
fn frame(spec: &GenSpec, src_port: u16) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[0..6].copy_from_slice(&spec.dst_mac);
    f[6..12].copy_from_slice(&spec.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + PAYLOAD) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&CLIENT_IP.octets());
    ip[16..20].copy_from_slice(&spec.dst.octets());
    let c = fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp_len = (8 + PAYLOAD) as u16;
    f[34..36].copy_from_slice(&src_port.to_be_bytes());
    f[36..38].copy_from_slice(&spec.dst_port.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = b'a' + (i % 26) as u8;
    }
    let mut pseudo = Vec::with_capacity(12 + usize::from(udp_len));
    pseudo.extend_from_slice(&CLIENT_IP.octets());
    pseudo.extend_from_slice(&spec.dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    pseudo.extend_from_slice(&f[34..]);
    let c = match fold(sum16(&pseudo)) {
        0 => 0xffff,
        c => c,
    };
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

fn thread_runtime_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn os_error(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// Pins the calling thread (and the threads it starts later) to `cpu`.
pub fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(os_error(&format!("pinning to CPU {cpu}")));
        }
    }
    Ok(())
}

/// Sends `spec`'s frames from eth0 as fast as one pinned thread can, for `spec.seconds`.
pub fn generate(spec: &GenSpec) -> anyhow::Result<GenReport> {
    anyhow::ensure!(
        spec.flows > 0 && usize::from(spec.flows).is_multiple_of(BATCH),
        "--flows must be a multiple of {BATCH}"
    );
    pin(spec.cpu)?;
    let name = std::ffi::CString::new("eth0")?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(ifindex != 0, "no eth0 in the client host");
    // Protocol 0: the socket sends only, it is handed no received frame.
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error("AF_PACKET socket"));
    }
    // SAFETY: fd was just opened and nothing else owns it; it is closed when `_guard` drops.
    let _guard = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll with the fields bind needs.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        if libc::bind(fd, (&raw const sll).cast(), len) != 0 {
            return Err(os_error("binding the AF_PACKET socket to eth0"));
        }
        // Straight to the driver: the client's qdisc is not what is measured.
        let one: libc::c_int = 1;
        let size = std::mem::size_of::<libc::c_int>() as u32;
        if libc::setsockopt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, (&raw const one).cast(), size) != 0 {
            return Err(os_error("PACKET_QDISC_BYPASS"));
        }
    }
    let mut frames: Vec<[u8; FRAME]> = (0..spec.flows).map(|i| frame(spec, FIRST_PORT + i)).collect();
    let mut iovs: Vec<libc::iovec> =
        frames.iter_mut().map(|f| libc::iovec { iov_base: f.as_mut_ptr().cast(), iov_len: FRAME }).collect();
    // SAFETY: zeroed mmsghdrs are valid (no name, no control); each points at one iovec that outlives it.
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| unsafe {
            let mut m: libc::mmsghdr = std::mem::zeroed();
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let batches = msgs.len() / BATCH;
    let limit = Duration::from_secs_f64(spec.seconds);
    let mut report = GenReport::default();
    let cpu0 = thread_runtime_ns();
    let t0 = Instant::now();
    let mut b = 0;
    // Bounded by time and by count; one clock read per batch.
    while report.sent < spec.max_packets && t0.elapsed() < limit {
        // SAFETY: BATCH valid mmsghdrs starting at batch b.
        let n = unsafe { libc::sendmmsg(fd, msgs[b * BATCH..].as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            report.send_errors += 1;
            std::thread::yield_now();
        } else {
            report.sent += n as u64;
        }
        b = (b + 1) % batches;
    }
    report.elapsed_ns = t0.elapsed().as_nanos() as u64;
    report.runtime_ns = thread_runtime_ns().saturating_sub(cpu0);
    Ok(report)
}

/// How the flood is run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FloodSampling {
    /// Recorded runs per arm and lab (labs and arms take turns).
    pub runs: usize,
    pub seconds: f64,
    /// Distinct source ports (flows), a multiple of 64.
    pub flows: u16,
    /// The CPU the generator, and so the whole chain, runs on.
    pub cpu: usize,
    pub frame_bytes: usize,
}

impl FloodSampling {
    pub fn new(runs: usize, seconds: f64, flows: u16, cpu: usize) -> FloodSampling {
        FloodSampling { runs, seconds, flows, cpu, frame_bytes: FRAME }
    }
}

/// One recorded run of one arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodRun {
    pub sent: u64,
    pub send_errors: u64,
    /// Frames pod c's eth0 received.
    pub delivered: u64,
    pub seconds: f64,
    /// Generator thread + the CPU's ksoftirqd, ns.
    pub chain_cpu_ns: u64,
    /// The pinned CPU's /proc/stat ticks over the run (USER_HZ): user, system, softirq, idle, other.
    pub ticks: [u64; 5],
}

impl FloodRun {
    pub fn delivered_pps(&self) -> f64 {
        if self.seconds > 0.0 { self.delivered as f64 / self.seconds } else { 0.0 }
    }

    /// The chain's CPU time per delivered packet, ns.
    pub fn ns_per_packet(&self) -> f64 {
        if self.delivered == 0 { 0.0 } else { self.chain_cpu_ns as f64 / self.delivered as f64 }
    }

    /// Softirq seconds of the pinned CPU (tick-sampled) per million delivered packets.
    pub fn softirq_s_per_mpkt(&self) -> f64 {
        if self.delivered == 0 { 0.0 } else { self.ticks[2] as f64 / clk_tck() / (self.delivered as f64 / 1e6) }
    }
}

/// Medians over an arm's runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodArm {
    pub name: String,
    pub target: String,
    pub runs: Vec<FloodRun>,
    /// Wall-clock delivered packets per second (shares the core with other work on the machine).
    pub delivered_pps: f64,
    /// The chain's CPU ns per packet.
    pub ns_per_packet: f64,
    /// What one core would forward if it did nothing else: 1e9 / ns_per_packet.
    pub per_core_pps: f64,
    /// Softirq CPU seconds (tick-sampled, the pinned CPU) per million packets.
    pub softirq_s_per_mpkt: f64,
    /// Frames sent but not delivered, over all runs.
    pub lost: u64,
}

/// The flood in one lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodResult {
    pub arms: Vec<FloodArm>,
    /// `nodeport` minus `direct`, ns per packet: node-a's NodePort work plus one fabric pass.
    pub node_a_ns_per_packet: f64,
    /// `via-a` minus `direct`: node-a forwarding untranslated plus one fabric pass.
    pub node_a_forward_ns_per_packet: f64,
}

pub const NODEPORT: &str = "nodeport";
pub const VIA_A: &str = "via-a";
pub const DIRECT: &str = "direct";

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (user+nice, system, softirq, idle+iowait, irq+steal) ticks of `cpu` from /proc/stat.
fn cpu_ticks(cpu: usize) -> anyhow::Result<[u64; 5]> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let key = format!("cpu{cpu}");
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some(key.as_str())).context("no such CPU")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    anyhow::ensure!(v.len() >= 8, "/proc/stat: short cpu line");
    Ok([v[0] + v[1], v[2], v[6], v[3] + v[4], v[5] + v[7]])
}

/// The pid of `ksoftirqd/<cpu>`.
fn ksoftirqd(cpu: usize) -> anyhow::Result<u32> {
    let want = format!("ksoftirqd/{cpu}");
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == want) {
            return Ok(pid);
        }
    }
    anyhow::bail!("no {want} thread")
}

fn runtime_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An arm's target: name, destination, its port, and the node whose MAC the frames are addressed to.
fn targets(np: &NodePortLab) -> [(&'static str, Ipv4Addr, u16, usize); 3] {
    [
        (NODEPORT, np.node_a_ip(), UDP_REMOTE.node_port, NODE_A),
        (VIA_A, POD_C_VIA_A, UDP_TARGET_PORT, NODE_A),
        (DIRECT, POD_C.ip, UDP_TARGET_PORT, NODE_B),
    ]
}

fn one_run(np: &NodePortLab, self_exe: &Path, args: &[String], s: &FloodSampling) -> anyhow::Result<FloodRun> {
    let soft = ksoftirqd(s.cpu)?;
    let (t0, k0, d0) = (cpu_ticks(s.cpu)?, runtime_of(soft), np.sink_received()?);
    let mut cmd = Command::new(self_exe);
    cmd.arg("flood").args(args);
    let limit = Duration::from_secs_f64(s.seconds) + GEN_SLACK;
    let out = np.lab.sb.run_in_with_timeout(&np.lab.externals[CLIENT].host, None, &mut cmd, limit)?;
    anyhow::ensure!(out.status.success(), "the flood generator failed: {}", String::from_utf8_lossy(&out.stderr));
    let (t1, k1, d1) = (cpu_ticks(s.cpu)?, runtime_of(soft), np.sink_received()?);
    let g: GenReport = serde_json::from_slice(&out.stdout).context("reading the generator's JSON")?;
    let ticks: [u64; 5] = std::array::from_fn(|i| t1[i].saturating_sub(t0[i]));
    Ok(FloodRun {
        sent: g.sent,
        send_errors: g.send_errors,
        delivered: d1.saturating_sub(d0),
        seconds: g.elapsed_ns as f64 / 1e9,
        chain_cpu_ns: g.runtime_ns + k1.saturating_sub(k0),
        ticks,
    })
}

/// The generator's command line for one arm of one lab.
fn gen_args(np: &NodePortLab, arm: usize, seconds: f64, s: &FloodSampling) -> anyhow::Result<Vec<String>> {
    let (_, dst, port, via) = targets(np)[arm];
    let src_mac = np.mac(&np.lab.externals[CLIENT].host)?;
    let dst_mac = np.mac(&np.lab.nodes[via].host)?;
    Ok(vec![
        format!("--src-mac={src_mac}"),
        format!("--dst-mac={dst_mac}"),
        format!("--dst={dst}"),
        format!("--dst-port={port}"),
        format!("--flows={}", s.flows),
        format!("--seconds={seconds}"),
        format!("--cpu={}", s.cpu),
    ])
}

/// Floods every lab: a warm-up per arm, then `runs` rounds in which every lab
/// (in alternating order) runs each arm once.
pub fn measure(labs: &[NodePortLab], self_exe: &Path, s: &FloodSampling) -> anyhow::Result<Vec<FloodResult>> {
    let mut args = Vec::new();
    for np in labs {
        let mut per_arm = Vec::new();
        for arm in 0..3 {
            per_arm.push(gen_args(np, arm, s.seconds, s)?);
            let warm = gen_args(np, arm, WARMUP_S, s)?;
            one_run(np, self_exe, &warm, s).with_context(|| format!("{}: flood warm-up", np.variant.name()))?;
        }
        args.push(per_arm);
    }
    let mut runs: Vec<Vec<Vec<FloodRun>>> = labs.iter().map(|_| vec![Vec::new(), Vec::new(), Vec::new()]).collect();
    for round in 0..s.runs {
        let mut order: Vec<usize> = (0..labs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            for arm in 0..3 {
                let r = one_run(&labs[i], self_exe, &args[i][arm], s)?;
                eprintln!(
                    "nodeport: flood {}/{} {:<11} {:<8} {:>9.0} pps delivered  {:>6.0} ns/packet (chain CPU)  sent {} lost {}",
                    round + 1,
                    s.runs,
                    labs[i].variant.name(),
                    targets(&labs[i])[arm].0,
                    r.delivered_pps(),
                    r.ns_per_packet(),
                    r.sent,
                    r.sent.saturating_sub(r.delivered)
                );
                runs[i][arm].push(r);
            }
        }
    }
    let mut out = Vec::new();
    for (np, lab_runs) in labs.iter().zip(runs) {
        let mut arms = Vec::new();
        for ((name, dst, port, _), rs) in targets(np).into_iter().zip(lab_runs) {
            let m = |f: fn(&FloodRun) -> f64| median(&rs.iter().map(f).collect::<Vec<_>>());
            let ns = m(FloodRun::ns_per_packet);
            arms.push(FloodArm {
                name: name.to_string(),
                target: format!("{dst}:{port}"),
                delivered_pps: m(FloodRun::delivered_pps),
                ns_per_packet: ns,
                per_core_pps: if ns > 0.0 { 1e9 / ns } else { 0.0 },
                softirq_s_per_mpkt: m(FloodRun::softirq_s_per_mpkt),
                lost: rs.iter().map(|r| r.sent.saturating_sub(r.delivered)).sum(),
                runs: rs,
            });
        }
        let ns = |n: &str| arms.iter().find(|a| a.name == n).map_or(0.0, |a| a.ns_per_packet);
        out.push(FloodResult {
            node_a_ns_per_packet: ns(NODEPORT) - ns(DIRECT),
            node_a_forward_ns_per_packet: ns(VIA_A) - ns(DIRECT),
            arms,
        });
    }
    Ok(out)
}
