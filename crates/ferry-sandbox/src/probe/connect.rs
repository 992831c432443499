//! The probe client: one attempt (or a series) against an endpoint, reported as [`Observation`]s.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::errno::observe;
use super::{Endpoint, Observation, ProbeError, Proto, Reply, ServerReply, Stage};

/// Default time one attempt may take before it counts as [`Observation::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between exchanges of [`keep_open`].
pub const KEEP_OPEN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest reply read: a UDP server pads its reply to the request's length (see [`ConnectOpts::pad`]).
const MAX_REPLY: u64 = 65536;
/// The most filler [`ConnectOpts::pad`] may add.
pub const MAX_PAD: usize = 64 << 20;

/// Options of one `connect` attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOpts {
    /// Where to connect.
    pub target: Endpoint,
    /// Source address to bind before connecting (port chosen by the kernel).
    pub bind: Option<IpAddr>,
    /// Source port to bind (TCP/UDP), for tests that need the same 5-tuple again.
    pub source_port: Option<u16>,
    /// Time allowed for the whole attempt.
    pub timeout: Duration,
    /// UDP only: connect() the socket and use send/recv instead of sendto/recvfrom.
    pub connected_udp: bool,
    /// The line sent to the server (without newline).
    pub message: String,
    /// Filler bytes (`.`) appended to the line: a UDP request this much longer is fragmented (the
    /// server pads its reply to the same length, so the reply is too); a TCP request is a bulk
    /// transfer that the reply shows arrived whole (the server answers once it read the newline);
    /// an SCTP INIT gets a Padding parameter of this many bytes (fragmented when longer than the
    /// MTU), and the server's INIT-ACK is padded to the INIT's length.
    pub pad: usize,
    /// IPv6 only: every packet carries a destination-options header (one PadN option), so the
    /// datapath must walk an extension header to find the transport header.
    pub ipv6_dstopts: bool,
    /// UDP only (IPv4 or IPv6): the request leaves as IP fragments written on a raw socket, the
    /// last fragment first (as some senders emit them), from the bound address and the UDP
    /// socket's port, on which the reply is read. Needs `bind`, a `pad` that makes it fragment,
    /// CAP_NET_RAW.
    pub reverse_fragments: bool,
}

impl ConnectOpts {
    /// One unbound attempt at `target` with the default timeout.
    pub fn new(target: Endpoint) -> ConnectOpts {
        ConnectOpts {
            target,
            bind: None,
            source_port: None,
            timeout: DEFAULT_TIMEOUT,
            connected_udp: false,
            message: "ferry-probe".into(),
            pad: 0,
            ipv6_dstopts: false,
            reverse_fragments: false,
        }
    }

    fn check(&self) -> Result<(), ProbeError> {
        if let Some(ip) = self.bind
            && ip.is_ipv6() != self.target.addr.is_ipv6()
        {
            return Err(ProbeError::Usage(format!(
                "--bind {ip} and target {} are of different address families",
                self.target
            )));
        }
        if self.message.contains('\n') {
            return Err(ProbeError::Usage("the message must be a single line".into()));
        }
        if self.timeout.is_zero() {
            return Err(ProbeError::Usage("the timeout must be positive".into()));
        }
        if self.ipv6_dstopts && !self.target.addr.is_ipv6() {
            return Err(ProbeError::Usage("--ipv6-dstopts needs an IPv6 target".into()));
        }
        if self.reverse_fragments && (self.target.proto != Proto::Udp || self.bind.is_none() || self.connected_udp) {
            return Err(ProbeError::Usage("--reverse-fragments sends unconnected UDP from a --bind address".into()));
        }
        if self.pad > MAX_PAD {
            return Err(ProbeError::Usage(format!("--pad takes at most {MAX_PAD} bytes")));
        }
        Ok(())
    }

    /// The request as sent: the message, the filler, a newline.
    fn request(&self) -> Vec<u8> {
        let mut r = Vec::with_capacity(self.message.len() + self.pad + 1);
        r.extend_from_slice(self.message.as_bytes());
        r.resize(self.message.len() + self.pad, b'.');
        r.push(b'\n');
        r
    }
}

/// Makes one attempt. Network failures are observations; only invalid options are errors.
pub fn connect(opts: &ConnectOpts) -> Result<Observation, ProbeError> {
    opts.check()?;
    let attempt = match opts.target.proto {
        Proto::Tcp => open_tcp(opts).and_then(|mut conn| conn.exchange(&opts.request())),
        Proto::Udp if opts.connected_udp => udp_connected(opts),
        Proto::Udp => udp_unconnected(opts),
        Proto::Sctp => return super::sctp::connect(opts.target.addr, opts.bind, opts.timeout, opts.pad),
        Proto::Icmp => return super::icmp::ping(opts.target.addr.ip(), opts.bind, opts.timeout),
    };
    Ok(attempt.unwrap_or_else(|failure| failure.observation()))
}

/// Makes `count` sequential attempts, each with a new socket, handing each observation to `report`.
pub fn connect_many(
    opts: &ConnectOpts,
    count: u32,
    mut report: impl FnMut(&Observation) -> io::Result<()>,
) -> Result<(), ProbeError> {
    opts.check()?;
    for _ in 0..count {
        report(&connect(opts)?).map_err(ProbeError::Output)?;
    }
    Ok(())
}

/// Opens one TCP connection and exchanges a line on it every [`KEEP_OPEN_INTERVAL`] for `hold` (at
/// least twice), reporting each exchange; stops at the first exchange that is not a reply. Needs a server started
/// with `echo_lines`. Used to show that an established connection survives a datapath change.
pub fn keep_open(
    opts: &ConnectOpts,
    hold: Duration,
    mut report: impl FnMut(&Observation) -> io::Result<()>,
) -> Result<(), ProbeError> {
    opts.check()?;
    if opts.target.proto != Proto::Tcp {
        return Err(ProbeError::Usage("--keep-open needs a tcp endpoint".into()));
    }
    let mut conn = match open_tcp(opts) {
        Ok(conn) => conn,
        Err(failure) => return report(&failure.observation()).map_err(ProbeError::Output),
    };
    let end = Instant::now() + hold;
    // At least two exchanges, however short `hold` or slow the machine: one exchange alone would not
    // show that the connection stayed usable.
    let max_exchanges = (hold.as_millis() / KEEP_OPEN_INTERVAL.as_millis() + 1).max(2);
    for i in 0..max_exchanges {
        if i > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() && i >= 2 {
                break;
            }
            thread::sleep(if left.is_zero() { KEEP_OPEN_INTERVAL } else { KEEP_OPEN_INTERVAL.min(left) });
        }
        let observation = conn.exchange(&opts.request()).unwrap_or_else(|failure| failure.observation());
        report(&observation).map_err(ProbeError::Output)?;
        if observation.reply().is_none() {
            break;
        }
    }
    Ok(())
}

/// Exchanges one [`held`] connection answers at most (one per command line).
pub const MAX_HELD_EXCHANGES: usize = 100_000;

/// Opens one TCP connection, exchanges a line at once and then one more for every line read from
/// `commands` (a caller's "ping"), reporting each exchange. Ends when `commands` closes, after
/// `lifetime`, after [`MAX_HELD_EXCHANGES`], or at the first exchange that is not a reply. Needs a
/// server started with `echo_lines` (and an idle timeout longer than the pauses between commands).
/// Used to check that an established connection survives changes applied while it is held.
pub fn held(
    opts: &ConnectOpts,
    lifetime: Duration,
    commands: impl BufRead + Send + 'static,
    mut report: impl FnMut(&Observation) -> io::Result<()>,
) -> Result<(), ProbeError> {
    opts.check()?;
    if opts.target.proto != Proto::Tcp {
        return Err(ProbeError::Usage("--held needs a tcp endpoint".into()));
    }
    let end = Instant::now() + lifetime;
    let mut conn = match open_tcp(opts) {
        Ok(conn) => conn,
        Err(failure) => return report(&failure.observation()).map_err(ProbeError::Output),
    };
    // Commands are read by a thread so that the lifetime bounds the wait for the next one.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in commands.lines().take(MAX_HELD_EXCHANGES) {
            if line.is_err() || tx.send(()).is_err() {
                break;
            }
        }
    });
    for i in 0..MAX_HELD_EXCHANGES {
        if i > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || rx.recv_timeout(left).is_err() {
                break;
            }
        }
        let observation = conn.exchange(&opts.request()).unwrap_or_else(|failure| failure.observation());
        report(&observation).map_err(ProbeError::Output)?;
        if observation.reply().is_none() {
            break;
        }
    }
    Ok(())
}

/// A UDP client that keeps one connected socket and sends a line every
/// [`KEEP_OPEN_INTERVAL`] for `hold`, reporting each exchange (a reply, or a
/// timeout when none came within the interval). When the socket fails (e.g.
/// ECONNABORTED because ferry destroyed it), the failure is reported and a new
/// socket is connected, as a resolver would. Used to measure how long a UDP
/// client is stuck when its backend is removed.
pub fn udp_stream(
    opts: &ConnectOpts,
    hold: Duration,
    mut report: impl FnMut(&Observation) -> io::Result<()>,
) -> Result<(), ProbeError> {
    opts.check()?;
    if opts.target.proto != Proto::Udp {
        return Err(ProbeError::Usage("--udp-stream needs a udp endpoint".into()));
    }
    let open = || -> Result<UdpSocket, Failure> {
        let socket = bind_for_udp(new_socket(opts)?, opts)?;
        socket.connect(opts.target.addr).map_err(failed(Stage::Connect, format!("connecting to {}", opts.target)))?;
        socket.set_read_timeout(Some(KEEP_OPEN_INTERVAL)).map_err(failed(Stage::Connect, "SO_RCVTIMEO"))?;
        Ok(socket)
    };
    let ticks = (hold.as_millis() / KEEP_OPEN_INTERVAL.as_millis()).max(1);
    let start = Instant::now();
    let mut socket: Option<UdpSocket> = None;
    for i in 0..ticks {
        let due = start + KEEP_OPEN_INTERVAL * i as u32;
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let s = match socket.take().map(Ok).unwrap_or_else(&open) {
            Ok(s) => s,
            Err(failure) => {
                report(&failure.observation()).map_err(ProbeError::Output)?;
                continue;
            }
        };
        let exchange = || -> Result<Observation, Failure> {
            s.send(&opts.request()).map_err(failed(Stage::Reply, "sending"))?;
            let mut buf = vec![0u8; MAX_REPLY as usize];
            let len = s.recv(&mut buf).map_err(failed(Stage::Reply, "waiting for the reply"))?;
            let local = s.local_addr().map_err(failed(Stage::Reply, "getsockname"))?;
            let peer = s.peer_addr().map_err(failed(Stage::Reply, "getpeername"))?;
            Ok(to_observation(&String::from_utf8_lossy(&buf[..len]), local, peer))
        };
        match exchange() {
            Ok(o) => {
                report(&o).map_err(ProbeError::Output)?;
                socket = Some(s);
            }
            Err(failure) => {
                let o = failure.observation();
                report(&o).map_err(ProbeError::Output)?;
                // A timeout keeps the socket (the server may just be slow); any other error replaces it.
                if matches!(o, Observation::Timeout { .. }) {
                    socket = Some(s);
                }
            }
        }
    }
    Ok(())
}

/// A step that failed, kept as the error and its context until it becomes an [`Observation`].
struct Failure {
    error: io::Error,
    stage: Stage,
    doing: String,
}

impl Failure {
    fn observation(&self) -> Observation {
        observe(&self.error, self.stage, &self.doing)
    }
}

/// `map_err` adapter: `.map_err(failed(Stage::Reply, "reading the reply"))`.
fn failed(stage: Stage, doing: impl Into<String>) -> impl FnOnce(io::Error) -> Failure {
    move |error| Failure { error, stage, doing: doing.into() }
}

/// An established TCP connection and how long each exchange on it may take.
struct TcpConn {
    reader: BufReader<TcpStream>,
    timeout: Duration,
}

fn open_tcp(opts: &ConnectOpts) -> Result<TcpConn, Failure> {
    let socket = new_socket(opts)?;
    let target = opts.target;
    socket
        .connect_timeout(&target.addr.into(), opts.timeout)
        .map_err(failed(Stage::Connect, format!("connecting to {target}")))?;
    Ok(TcpConn { reader: BufReader::new(socket.into()), timeout: opts.timeout })
}

impl TcpConn {
    /// Sends one line and reads one reply line, within the timeout.
    fn exchange(&mut self, request: &[u8]) -> Result<Observation, Failure> {
        let deadline = Instant::now() + self.timeout;
        let stream = self.reader.get_mut();
        stream
            .set_write_timeout(Some(remaining(deadline)))
            .and_then(|()| stream.write_all(request))
            .map_err(failed(Stage::Reply, "sending the request line"))?;
        let mut line = String::new();
        self.reader
            .get_ref()
            .set_read_timeout(Some(remaining(deadline)))
            .and_then(|()| (&mut self.reader).take(MAX_REPLY).read_line(&mut line))
            .map_err(failed(Stage::Reply, "reading the reply line"))?;
        let stream = self.reader.get_ref();
        let local = stream.local_addr().map_err(failed(Stage::Reply, "getsockname"))?;
        let peer = stream.peer_addr().map_err(failed(Stage::Reply, "getpeername"))?;
        Ok(to_observation(&line, local, peer))
    }
}

fn udp_unconnected(opts: &ConnectOpts) -> Result<Observation, Failure> {
    let deadline = Instant::now() + opts.timeout;
    let socket = bind_for_udp(new_socket(opts)?, opts)?;
    let target = opts.target;
    if opts.reverse_fragments {
        let local = socket.local_addr().map_err(failed(Stage::Connect, "getsockname"))?;
        send_reversed_fragments(local, target.addr, &opts.request())
            .map_err(failed(Stage::Reply, format!("sending fragments to {target}")))?;
    } else {
        socket.send_to(&opts.request(), target.addr).map_err(failed(Stage::Reply, format!("sending to {target}")))?;
    }
    let mut buf = vec![0u8; MAX_REPLY as usize];
    let (len, from) = socket
        .set_read_timeout(Some(remaining(deadline)))
        .and_then(|()| socket.recv_from(&mut buf))
        .map_err(failed(Stage::Reply, format!("waiting for the reply from {target}")))?;
    let local = socket.local_addr().map_err(failed(Stage::Reply, "getsockname"))?;
    Ok(to_observation(&String::from_utf8_lossy(&buf[..len]), local, from))
}

fn udp_connected(opts: &ConnectOpts) -> Result<Observation, Failure> {
    let deadline = Instant::now() + opts.timeout;
    let socket = bind_for_udp(new_socket(opts)?, opts)?;
    let target = opts.target;
    socket.connect(target.addr).map_err(failed(Stage::Connect, format!("connecting to {target}")))?;
    socket.send(&opts.request()).map_err(failed(Stage::Reply, format!("sending to {target}")))?;
    let mut buf = vec![0u8; MAX_REPLY as usize];
    let len = socket
        .set_read_timeout(Some(remaining(deadline)))
        .and_then(|()| socket.recv(&mut buf))
        .map_err(failed(Stage::Reply, format!("waiting for the reply from {target}")))?;
    let local = socket.local_addr().map_err(failed(Stage::Reply, "getsockname"))?;
    let peer = socket.peer_addr().map_err(failed(Stage::Reply, "getpeername"))?;
    Ok(to_observation(&String::from_utf8_lossy(&buf[..len]), local, peer))
}

/// Sends `payload` as one UDP datagram from `from` to `to` (same family), cut into IP fragments
/// of at most 1,232 data bytes, written on a raw socket last fragment first. The kernel has no
/// way to send a datagram's fragments out of order, so they are built here (RFC 791, RFC 8200
/// 4.5, RFC 768).
fn send_reversed_fragments(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
    let sum16 = |data: &[u8], mut acc: u32| {
        for c in data.chunks(2) {
            acc += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
        }
        acc
    };
    let fold = |mut acc: u32| {
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    };
    let (src, dst) = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets().to_vec(), d.octets().to_vec()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (s.octets().to_vec(), d.octets().to_vec()),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "source and target of different families")),
    };
    let v6 = to.is_ipv6();
    let len = u16::try_from(8 + payload.len()).map_err(|_| io::Error::other("datagram too long"))?;
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&from.port().to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = sum16(&src, sum16(&dst, 17 + u32::from(len)));
    let csum = match fold(sum16(&udp, pseudo)) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&csum.to_be_bytes());
    const PIECE: usize = 1232; // a multiple of 8, well under a 1,500-byte MTU with its headers
    let id = (std::process::id() as u16) ^ from.port();
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    // IPPROTO_RAW: the IP header is ours (IP_HDRINCL, and for IPv6 IPV6_HDRINCL, implied).
    let raw = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
    let pieces: Vec<&[u8]> = udp.chunks(PIECE).collect();
    for (i, piece) in pieces.iter().enumerate().rev() {
        let more = i + 1 < pieces.len();
        let offset = (i * PIECE / 8) as u16;
        let mut ip = Vec::with_capacity(48 + piece.len());
        if v6 {
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[44, 64]); // next header: fragment; hop limit
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&dst);
            ip.extend_from_slice(&[17, 0]);
            ip.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
            ip.extend_from_slice(&u32::from(id).to_be_bytes());
        } else {
            let total = (20 + piece.len()) as u16;
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&id.to_be_bytes());
            ip.extend_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
            ip.extend_from_slice(&[64, 17, 0, 0]);
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&dst);
            let c = fold(sum16(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
        ip.extend_from_slice(piece);
        let dest = SocketAddr::new(to.ip(), 0);
        raw.send_to(&ip, &dest.into())?;
    }
    Ok(())
}

/// Creates the client socket, bound to the requested source address if any.
fn new_socket(opts: &ConnectOpts) -> Result<Socket, Failure> {
    let (kind, protocol) = match opts.target.proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp | Proto::Sctp | Proto::Icmp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(opts.target.addr), kind, Some(protocol))
        .map_err(failed(Stage::Connect, "creating the socket"))?;
    if opts.bind.is_some() || opts.source_port.is_some() {
        let v6 = opts.target.addr.is_ipv6();
        let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let source = SocketAddr::new(opts.bind.unwrap_or(any), opts.source_port.unwrap_or(0));
        // A test reusing a 5-tuple right after the previous socket closed.
        socket.set_reuse_address(true).map_err(failed(Stage::Connect, "SO_REUSEADDR"))?;
        if opts.source_port.is_none() && opts.target.proto == Proto::Tcp {
            // The port is then chosen by connect(), for this destination, where
            // tcp_tw_reuse may take a TIME_WAIT port; bind() would choose it
            // alone, scanning the range for a port no socket holds, which
            // grows with the TIME_WAIT sockets of a stream of connections
            // (the disruption suite's NodePort stream fell to ~150/s).
            set_bind_address_no_port(&socket).map_err(failed(Stage::Connect, "IP_BIND_ADDRESS_NO_PORT"))?;
        }
        socket.bind(&source.into()).map_err(failed(Stage::Connect, format!("binding to {source}")))?;
    }
    if opts.ipv6_dstopts {
        set_ipv6_dstopts(&socket).map_err(failed(Stage::Connect, "IPV6_DSTOPTS"))?;
    }
    Ok(socket)
}

/// Leaves the source port of a socket bound to an address to connect()
/// (IP_BIND_ADDRESS_NO_PORT; for IPv6 sockets too). socket2 has no setter.
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Adds a destination-options header to every packet of the socket: 8 bytes, one PadN option
/// (RFC 8200 4.6). Needs CAP_NET_RAW.
fn set_ipv6_dstopts(socket: &Socket) -> io::Result<()> {
    /// linux/in6.h: the sticky destination options after any routing header.
    const IPV6_DSTOPTS: libc::c_int = 59;
    // next header (filled in by the kernel), length 0 (8 bytes), PadN of 4 bytes.
    let hdr: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: setsockopt reads `hdr.len()` bytes from a live buffer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            IPV6_DSTOPTS,
            hdr.as_ptr().cast(),
            hdr.len() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Binds a UDP socket (to the wildcard if no source was asked for) so getsockname shows the port, and
/// asks for ICMP errors: without IP_RECVERR Linux never reports port-unreachable to an *unconnected* UDP
/// socket, and a closed port would look like a silent drop.
fn bind_for_udp(socket: Socket, opts: &ConnectOpts) -> Result<UdpSocket, Failure> {
    let v6 = opts.target.addr.is_ipv6();
    if opts.bind.is_none() && opts.source_port.is_none() {
        let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let source = SocketAddr::new(any, 0);
        socket.bind(&source.into()).map_err(failed(Stage::Connect, format!("binding to {source}")))?;
    }
    let (level, name) = if v6 { (libc::SOL_IPV6, libc::IPV6_RECVERR) } else { (libc::SOL_IP, libc::IP_RECVERR) };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(failed(Stage::Connect, "enabling IP_RECVERR")(io::Error::last_os_error()));
    }
    Ok(socket.into())
}

fn remaining(deadline: Instant) -> Duration {
    // Zero would mean "no timeout" to set_read_timeout (and is rejected by std), so keep a floor.
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn to_observation(line: &str, client_local: SocketAddr, client_peer: SocketAddr) -> Observation {
    let line = line.trim();
    if line.is_empty() {
        return Observation::Error { errno: None, message: "the server closed the connection without replying".into() };
    }
    match serde_json::from_str::<ServerReply>(line) {
        Ok(reply) => Observation::Reply(Reply {
            server: reply.server,
            server_local: reply.local,
            server_peer: reply.peer,
            client_local,
            client_peer,
        }),
        Err(e) => Observation::Error { errno: None, message: format!("unexpected reply {line:?}: {e}") },
    }
}

#[cfg(test)]
mod held_tests {
    use super::*;
    use crate::probe::{ServeOpts, serve};

    /// A loopback echo-lines server on a kernel-chosen port; returns its address.
    fn echo_server(dir: &std::path::Path) -> SocketAddr {
        let ready = dir.join("ready");
        let mut opts = ServeOpts::new("held-test", vec![Endpoint::tcp("127.0.0.1:0".parse().unwrap())]);
        opts.echo_lines = true;
        opts.ready_file = Some(ready.clone());
        opts.lifetime = Duration::from_secs(10);
        thread::spawn(move || serve(&opts));
        for _ in 0..500 {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let ep: Endpoint = v["listening"][0].as_str().unwrap().parse().unwrap();
                return ep.addr;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("the test server never became ready");
    }

    #[test]
    fn held_answers_once_at_open_and_once_per_command() {
        let dir = std::env::temp_dir().join(format!("ferry-held-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = echo_server(&dir);
        let opts = ConnectOpts::new(Endpoint::tcp(addr));
        let mut seen = Vec::new();
        let commands = std::io::Cursor::new(b"ping\nping\n".to_vec());
        held(&opts, Duration::from_secs(5), commands, |o| {
            seen.push(o.clone());
            Ok(())
        })
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(seen.len(), 3, "{seen:?}");
        let first = seen[0].reply().expect("a reply").client_local;
        for o in &seen {
            let r = o.reply().unwrap_or_else(|| panic!("not a reply: {o:?}"));
            assert_eq!(r.server, "held-test");
            assert_eq!(r.client_local, first, "every exchange is on the same connection");
        }
    }

    #[test]
    fn held_needs_tcp() {
        let opts = ConnectOpts::new(Endpoint::udp("127.0.0.1:9".parse().unwrap()));
        let r = held(&opts, Duration::from_secs(1), std::io::Cursor::new(Vec::new()), |_| Ok(()));
        assert!(matches!(r, Err(ProbeError::Usage(_))));
    }
}
