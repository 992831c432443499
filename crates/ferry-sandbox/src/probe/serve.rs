//! The probe server: listens on exact addresses and tells every client how it saw the connection.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::{Endpoint, ProbeError, Proto, ServerReply};

/// How long a server lives unless told otherwise: long enough for any demo, short enough that a
/// forgotten server goes away by itself.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// A client line is read whole, however long (a bulk transfer), up to this many bytes.
const MAX_LINE: u64 = 64 << 20;
/// The largest UDP datagram.
const MAX_DATAGRAM: usize = 65536;
/// A connection that sends nothing for this long is closed (unless `ServeOpts::idle_timeout` says otherwise).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines answered on one `--echo-lines` connection (10 per second for 10 hours).
const MAX_EXCHANGES: usize = 360_000;
/// Connections served at once; more are closed unanswered rather than exhausting threads.
const MAX_CONNECTIONS: usize = 512;

/// Options of `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOpts {
    /// Echoed in every reply, so a client can tell which backend answered.
    pub name: String,
    /// Addresses to listen on; each socket is bound to exactly that address (IPv6 with IPV6_V6ONLY).
    pub listen: Vec<Endpoint>,
    /// Keep TCP connections open and answer every line, instead of answering one line and closing.
    pub echo_lines: bool,
    /// Written (atomically) once every socket is bound and listening.
    pub ready_file: Option<PathBuf>,
    /// The server exits by itself after this long.
    pub lifetime: Duration,
    /// A TCP connection that sends nothing for this long is closed (held connections need longer).
    pub idle_timeout: Duration,
}

impl ServeOpts {
    /// A one-line-per-connection server named `name` with the default lifetime and no ready file.
    pub fn new(name: &str, listen: Vec<Endpoint>) -> ServeOpts {
        ServeOpts {
            name: name.to_owned(),
            listen,
            echo_lines: false,
            ready_file: None,
            lifetime: DEFAULT_LIFETIME,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Serves until the lifetime ends (normally: until the sandbox kills it). Returns early only on error.
pub fn serve(opts: &ServeOpts) -> Result<(), ProbeError> {
    if opts.listen.is_empty() {
        return Err(ProbeError::Usage("serve needs at least one endpoint to listen on".into()));
    }
    if opts.listen.iter().any(|e| e.proto == Proto::Icmp) {
        return Err(ProbeError::Usage("icmp cannot be served: the kernel answers echo requests itself".into()));
    }
    let mut bound = Vec::with_capacity(opts.listen.len());
    let (failed, failure) = mpsc::channel();
    for endpoint in opts.listen.iter().filter(|e| e.proto == Proto::Sctp) {
        // Raw sockets: bind now so readiness means "listening", then serve in a thread.
        let (name, failed, endpoint) = (opts.name.clone(), failed.clone(), *endpoint);
        let (ready_tx, ready_rx) = mpsc::channel();
        thread::spawn(move || {
            let result = super::sctp::serve(&name, endpoint, || {
                let _ = ready_tx.send(Ok(()));
            });
            if let Err(source) = result {
                let _ = ready_tx.send(Err(io::Error::new(source.kind(), source.to_string())));
                let _ = failed.send(ProbeError::Serving { endpoint, source });
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => bound.push((endpoint, None)),
            Ok(Err(source)) => return Err(ProbeError::Listen { endpoint, source }),
            Err(_) => {
                return Err(ProbeError::Listen { endpoint, source: io::Error::other("raw SCTP socket never ready") });
            }
        }
    }
    for endpoint in opts.listen.iter().filter(|e| e.proto != Proto::Sctp) {
        let socket = bind(endpoint).map_err(|source| ProbeError::Listen { endpoint: *endpoint, source })?;
        let local = socket.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(endpoint.addr);
        bound.push((Endpoint { addr: local, proto: endpoint.proto }, Some(socket)));
    }
    if let Some(path) = &opts.ready_file {
        let endpoints: Vec<Endpoint> = bound.iter().map(|(e, _)| *e).collect();
        write_ready_file(path, &endpoints).map_err(|source| ProbeError::ReadyFile { path: path.clone(), source })?;
    }

    let active = Arc::new(AtomicUsize::new(0));
    for (endpoint, socket) in bound {
        let Some(socket) = socket else { continue };
        let (name, failed, active, echo) = (opts.name.clone(), failed.clone(), active.clone(), opts.echo_lines);
        let idle = opts.idle_timeout;
        thread::spawn(move || {
            let source = match endpoint.proto {
                Proto::Tcp => serve_tcp(socket.into(), &name, echo, idle, &active),
                Proto::Udp => serve_udp(socket.into(), &name),
                Proto::Sctp => unreachable!("SCTP endpoints are served by the sctp module"),
                Proto::Icmp => unreachable!("ICMP echo is answered by the kernel"),
            };
            let _ = failed.send(ProbeError::Serving { endpoint, source });
        });
    }
    match failure.recv_timeout(opts.lifetime) {
        Ok(err) => Err(err),
        Err(_) => Ok(()),
    }
}

fn bind(endpoint: &Endpoint) -> io::Result<Socket> {
    let (kind, protocol) = match endpoint.proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp | Proto::Sctp | Proto::Icmp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(endpoint.addr), kind, Some(protocol))?;
    if endpoint.addr.is_ipv6() {
        // Otherwise a v6 wildcard would also take v4 traffic and hide which family was used.
        socket.set_only_v6(true)?;
    }
    if endpoint.proto == Proto::Tcp {
        // A restarted server must not wait for TIME_WAIT connections of its predecessor.
        socket.set_reuse_address(true)?;
    }
    socket.bind(&endpoint.addr.into())?;
    if endpoint.proto == Proto::Tcp {
        socket.listen(1024)?;
    }
    Ok(socket)
}

/// Write-then-rename, so a waiter never reads a half-written file.
fn write_ready_file(path: &Path, endpoints: &[Endpoint]) -> io::Result<()> {
    let listening: Vec<String> = endpoints.iter().map(Endpoint::to_string).collect();
    let body = serde_json::json!({ "pid": std::process::id(), "listening": listening });
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{body}\n"))?;
    std::fs::rename(&tmp, path)
}

fn reply_line(name: &str, local: SocketAddr, peer: SocketAddr) -> String {
    let reply = ServerReply { server: name.to_owned(), local, peer };
    let mut line = serde_json::to_string(&reply).expect("replies always serialize");
    line.push('\n');
    line
}

/// A UDP reply as long as the request (spaces before the newline), so a large request gets a large
/// (fragmented) reply and both directions of the datapath carry fragments.
fn padded_reply(name: &str, local: SocketAddr, peer: SocketAddr, request_len: usize) -> Vec<u8> {
    let mut out = reply_line(name, local, peer).into_bytes();
    if out.len() < request_len {
        out.pop();
        out.resize(request_len - 1, b' ');
        out.push(b'\n');
    }
    out
}

/// Reads one line without keeping it (a bulk transfer may be megabytes): its length, 0 at the end.
fn skip_line(reader: &mut impl BufRead) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (used, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        reader.consume(used);
        total += used as u64;
        if done || total >= MAX_LINE {
            return Ok(total);
        }
    }
}

/// Errors that concern one connection or a momentary shortage, not the listening socket.
fn transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

/// Returns only when the listener fails for good.
fn serve_tcp(listener: TcpListener, name: &str, echo: bool, idle: Duration, active: &Arc<AtomicUsize>) -> io::Error {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if transient(&e) => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return e,
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (name, active) = (name.to_owned(), active.clone());
        thread::spawn(move || {
            let _ = answer_tcp(stream, &name, echo, idle);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn answer_tcp(stream: TcpStream, name: &str, echo: bool, idle: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    let reply = reply_line(name, stream.local_addr()?, stream.peer_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    for _ in 0..MAX_EXCHANGES {
        if skip_line(&mut reader)? == 0 {
            return Ok(());
        }
        writer.write_all(reply.as_bytes())?;
        if !echo {
            return Ok(());
        }
    }
    Ok(())
}

/// Replies from the socket bound to the exact address, so the reply's source is the server address.
/// Returns only when the socket fails for good.
fn serve_udp(socket: UdpSocket, name: &str) -> io::Error {
    let local = match socket.local_addr() {
        Ok(local) => local,
        Err(e) => return e,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((len, peer)) => {
                // A client that went away makes this fail; that is the client's business.
                let _ = socket.send_to(&padded_reply(name, local, peer, len), peer);
            }
            Err(e) if transient(&e) => thread::sleep(Duration::from_millis(1)),
            Err(e) => return e,
        }
    }
}
