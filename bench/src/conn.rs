//! The two ends of the latency benchmarks, run inside the lab's pods and
//! hosts by re-executing the bench binary (`socket_lb client ...`,
//! `nodeport serve ...`).
//!
//! The client times, for each connection on a fresh TCP socket: `socket()`,
//! `connect()`, a one-line request and the one-line reply. It then closes
//! with `SO_LINGER {on, 0}`, which sends a RST: neither end keeps a
//! TIME_WAIT socket, so the ephemeral port range never runs out however many
//! connections are made. The server (one connection at a time) reads the
//! request, writes `pong <name>\n` (with `tell_peer`: `pong <name> <peer
//! address>\n`) and closes.
//!
//! A *held* connection starts with the request `keep`: the server answers it
//! and every later line on that connection, in a thread of its own, until the
//! client closes. The held client ([`run_held`]) times each request/reply on
//! one such connection per arm.
//!
//! Several *arms* (e.g. ClusterIP and direct pod IP) are interleaved
//! connection by connection (request by request on held connections), so a
//! slow second of the machine hits every arm alike.

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Bounds a connect (Linux honours SO_SNDTIMEO in connect) and each read.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Reads allowed for one line; a reply is a few bytes and arrives in one.
const MAX_READS: usize = 16;
/// A run stops early once this many connections failed.
const MAX_ERRORS: u64 = 50;

/// One kind of connection: a name and the addresses it cycles through.
#[derive(Debug, Clone)]
pub struct Arm {
    pub name: String,
    pub targets: Vec<SocketAddr>,
}

impl Arm {
    /// `NAME=ADDR,ADDR,...`, as on the client's command line.
    pub fn parse(s: &str) -> anyhow::Result<Arm> {
        let (name, list) = s.split_once('=').ok_or_else(|| anyhow::anyhow!("an arm is NAME=ADDR,ADDR,..., not {s}"))?;
        let targets = list.split(',').map(str::parse).collect::<Result<Vec<SocketAddr>, _>>()?;
        anyhow::ensure!(!targets.is_empty(), "arm {name} has no targets");
        Ok(Arm { name: name.to_string(), targets })
    }

    pub fn to_arg(&self) -> String {
        let list: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        format!("{}={}", self.name, list.join(","))
    }
}

/// What one arm measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ArmSamples {
    pub name: String,
    /// socket() -> reply received, per successful connection.
    pub latency_ns: Vec<u64>,
    /// Time spent in this arm's full cycles (socket() -> close() returned), successes only.
    pub cycle_ns_total: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Replies per answering server (`pong <name>`; with a server that tells
    /// the peer it saw: `<name> <peer address>`).
    pub servers: BTreeMap<String, u64>,
}

impl ArmSamples {
    /// Adds another run's samples of the same arm.
    pub fn merge(&mut self, other: ArmSamples) {
        self.latency_ns.extend(other.latency_ns);
        self.cycle_ns_total += other.cycle_ns_total;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        for (k, v) in other.servers {
            *self.servers.entry(k).or_default() += v;
        }
    }
}

fn read_line(s: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    for _ in 0..MAX_READS {
        let k = s.read(&mut buf[n..])?;
        if k == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a full line"));
        }
        n += k;
        if buf[..n].contains(&b'\n') || n == buf.len() {
            return Ok(n);
        }
    }
    Err(std::io::Error::other("no full line after 16 reads"))
}

/// One connection: returns (latency, cycle, server name).
fn one(target: SocketAddr, buf: &mut [u8]) -> std::io::Result<(u64, u64, String)> {
    let t0 = Instant::now();
    let mut s = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    s.set_linger(Some(Duration::ZERO))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.connect(&target.into())?;
    s.write_all(b"ping\n")?;
    let n = read_line(&mut s, buf)?;
    let latency = t0.elapsed();
    drop(s);
    let cycle = t0.elapsed();
    Ok((latency.as_nanos() as u64, cycle.as_nanos() as u64, server_of(&buf[..n])))
}

/// The server named in a reply line (`pong <name>[ <peer>]` -> `<name>[ <peer>]`).
fn server_of(line: &[u8]) -> String {
    String::from_utf8_lossy(line).trim().strip_prefix("pong ").unwrap_or("?").to_string()
}

/// Pins the calling process to one CPU (`None`: leave it where the scheduler puts it).
pub fn pin_to_cpu(cpu: Option<usize>) -> anyhow::Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only read and write that local value.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// xorshift64: a fixed-seed pseudo-random sequence, so runs are repeatable.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Makes `count` connections per arm, interleaved (arm 0, arm 1, ..., arm 0, ...),
/// after `warmup` unrecorded ones per arm. Each connection goes to a target
/// picked uniformly at random from its arm's list, as the load balancer picks
/// a backend, so no arm gets a more regular pattern of servers than another.
pub fn run_client(arms: &[Arm], count: usize, warmup: usize) -> Vec<ArmSamples> {
    let mut out: Vec<ArmSamples> = arms
        .iter()
        .map(|a| ArmSamples { name: a.name.clone(), latency_ns: Vec::with_capacity(count), ..Default::default() })
        .collect();
    let mut buf = [0u8; 256];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..warmup + count {
        for (a, arm) in arms.iter().enumerate() {
            let target = arm.targets[rng.below(arm.targets.len())];
            let result = one(target, &mut buf);
            if round < warmup && result.is_ok() {
                continue;
            }
            let rec = &mut out[a];
            match result {
                Ok((lat, cycle, server)) => {
                    rec.latency_ns.push(lat);
                    rec.cycle_ns_total += cycle;
                    *rec.servers.entry(server).or_default() += 1;
                }
                Err(e) => {
                    rec.errors += 1;
                    rec.first_error.get_or_insert_with(|| format!("{target}: {e}"));
                }
            }
        }
        if out.iter().map(|r| r.errors).sum::<u64>() >= MAX_ERRORS {
            break;
        }
    }
    out
}

/// One held connection per arm (each to its arm's first target), then
/// `warmup + count` request/reply exchanges per arm, interleaved (arm 0, arm 1,
/// ..., arm 0, ...), the first `warmup` unrecorded. `latency_ns` holds each
/// exchange (write `ping` -> reply read), `cycle_ns_total` their sum. A failed
/// exchange ends that arm's connection: its remaining requests are not made.
pub fn run_held(arms: &[Arm], count: usize, warmup: usize) -> Vec<ArmSamples> {
    let mut out: Vec<ArmSamples> = arms
        .iter()
        .map(|a| ArmSamples { name: a.name.clone(), latency_ns: Vec::with_capacity(count), ..Default::default() })
        .collect();
    let mut buf = [0u8; 256];
    let mut conns: Vec<Option<Socket>> = Vec::new();
    for (arm, rec) in arms.iter().zip(out.iter_mut()) {
        let target = arm.targets[0];
        let opened = (|| -> std::io::Result<Socket> {
            let mut s = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
            s.set_tcp_nodelay(true)?;
            s.set_linger(Some(Duration::ZERO))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.connect(&target.into())?;
            s.write_all(b"keep\n")?;
            read_line(&mut s, &mut buf)?;
            Ok(s)
        })();
        match opened {
            Ok(s) => conns.push(Some(s)),
            Err(e) => {
                rec.errors += 1;
                rec.first_error = Some(format!("{target}: opening the held connection: {e}"));
                conns.push(None);
            }
        }
    }
    for round in 0..warmup + count {
        for (a, slot) in conns.iter_mut().enumerate() {
            let Some(s) = slot else { continue };
            let t0 = Instant::now();
            let result = s.write_all(b"ping\n").and_then(|()| read_line(s, &mut buf));
            let rtt = t0.elapsed().as_nanos() as u64;
            let rec = &mut out[a];
            match result {
                Ok(n) if round >= warmup => {
                    rec.latency_ns.push(rtt);
                    rec.cycle_ns_total += rtt;
                    *rec.servers.entry(server_of(&buf[..n])).or_default() += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    rec.errors += 1;
                    rec.first_error.get_or_insert_with(|| format!("{}: request {round}: {e}", arms[a].targets[0]));
                    *slot = None;
                }
            }
        }
    }
    out
}

/// Answers every line of a held connection until the client closes it.
fn answer_held(mut conn: Socket, reply: String) {
    let _ = conn.set_tcp_nodelay(true);
    // A held connection may sit idle between client runs' phases; it ends when the client closes.
    let _ = conn.set_read_timeout(None);
    let mut buf = [0u8; 256];
    while conn.write_all(reply.as_bytes()).is_ok() {
        if read_line(&mut conn, &mut buf).is_err() {
            break;
        }
    }
}

/// Serves `pong <name>` (`tell_peer`: `pong <name> <peer address>`) on
/// `listen` until `lifetime` has passed, one connection at a time; a held
/// connection (first line `keep`) is answered in a thread of its own.
/// Creates `ready` (if given) once listening.
pub fn serve(
    listen: SocketAddr,
    name: &str,
    tell_peer: bool,
    lifetime: Duration,
    ready: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let sock = Socket::new(Domain::for_address(listen), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&listen.into())?;
    sock.listen(1024)?;
    // accept() honours SO_RCVTIMEO, so the loop checks its deadline at least once a second.
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    if let Some(f) = ready {
        std::fs::write(f, b"ready\n")?;
    }
    let fixed_reply = format!("pong {name}\n");
    let deadline = Instant::now() + lifetime;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        let (mut conn, peer) = match sock.accept() {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => {
                eprintln!("serve {name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let told;
        let reply = match peer.as_socket() {
            Some(p) if tell_peer => {
                told = format!("pong {name} {}\n", p.ip());
                &told
            }
            _ => &fixed_reply,
        };
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        match read_line(&mut conn, &mut buf) {
            Ok(n) if buf[..n].starts_with(b"keep") => {
                let reply = reply.clone();
                std::thread::spawn(move || answer_held(conn, reply));
                continue;
            }
            Ok(_) => {
                let _ = conn.write_all(reply.as_bytes());
            }
            Err(_) => {}
        }
        // Closing now sends a FIN; the client's RST then ends the connection
        // in FIN_WAIT, so this end keeps no TIME_WAIT socket either.
        drop(conn);
    }
    Ok(())
}
