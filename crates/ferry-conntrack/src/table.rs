//! [`Conntrack`]: the kernel's conntrack table over one ctnetlink socket —
//! list it, delete entries in batches, create entries (tests and benchmarks).

use crate::entry::Entry;
use crate::error::Error;
use crate::wire::{self, Reply};
use ferry_model::{IpFamily, Protocol};
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// A dump interrupted by a concurrent change (NLM_F_DUMP_INTR) is repeated up
/// to this many times, then the last one is used; kube-proxy does the same
/// (`MaxAttemptsEINTR`).
pub const MAX_DUMP_ATTEMPTS: u32 = 5;

/// Socket buffers asked for (as root the limits in net.core.*mem_max do not apply).
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// Dump replies are at most 32 KiB (the kernel's cap); twice that, to be safe.
const RECV_BUFFER: usize = 64 << 10;
/// Most requests sent in one datagram.
const MAX_BATCH: usize = 1024;
/// Kernel memory one queued error reply may take (its skb's truesize), for sizing batches so that
/// even a batch where every request fails fits the receive buffer.
const REPLY_TRUESIZE: usize = 2048;

/// An open ctnetlink socket, bound to the network namespace it was created in.
///
/// A netlink socket belongs to the network namespace of the thread that
/// created it, for its whole life: every request goes to that namespace's
/// conntrack table, whichever thread or namespace later uses the socket. So
/// to work on another namespace's table, create the socket there
/// ([`Conntrack::open_in_netns`] does it in a short-lived thread that
/// `setns()`s first) and use it from anywhere.
///
/// Needs root or CAP_NET_ADMIN in that namespace; Linux 5.8+ filters dumps in
/// the kernel (older kernels send every entry and ferry filters them).
///
/// ```no_run
/// use ferry_conntrack::Conntrack;
/// use ferry_model::IpFamily;
/// let mut ct = Conntrack::open()?;
/// for entry in ct.dump(IpFamily::V4)? {
///     println!("{entry}");
/// }
/// # Ok::<(), ferry_conntrack::Error>(())
/// ```
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
    /// Requests per datagram, from the receive buffer the kernel granted.
    batch: usize,
    /// Bytes per datagram, from the send buffer the kernel granted.
    batch_bytes: usize,
    /// An error left a dump unfinished; the kernel refuses new dumps on this socket.
    mid_dump: bool,
}

/// One family's table as listed by [`Conntrack::list`].
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The entries the caller kept.
    pub entries: Vec<Entry>,
    /// Entries read in the pass that was used.
    pub listed: usize,
    /// Dump passes made (more than one when a change interrupted the dump).
    pub attempts: u32,
    /// False if every pass was interrupted: `entries` come from the last, partial one.
    pub complete: bool,
    /// Entries whose attributes could not be read (skipped).
    pub unreadable: usize,
}

/// What [`Conntrack::delete_all`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    pub deleted: usize,
    /// Already gone when the request arrived (expired, deleted by someone else, or re-created
    /// with a new id since the dump).
    pub already_gone: usize,
    pub failed: usize,
    /// The first failure, for the log.
    pub first_failure: Option<String>,
}

/// What [`Conntrack::create`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Created {
    pub created: usize,
    /// An entry with the same original or reply tuple existed.
    pub existed: usize,
    pub failed: usize,
    pub first_failure: Option<String>,
}

#[derive(Default)]
struct DumpPass {
    listed: usize,
    interrupted: bool,
    unreadable: usize,
}

/// Per-request errors of a batch: (index into the batch's entries, negative errno).
#[derive(Default)]
struct Failures(Vec<(usize, i32)>);

impl Conntrack {
    /// Opens a socket on the calling thread's network namespace.
    pub fn open() -> Result<Conntrack, Error> {
        let open = |source| Error::Open { source };
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(open)?;
        socket.bind_auto().map_err(open)?;
        socket.connect(&NetlinkAddr::new(0, 0)).map_err(open)?;
        // Error replies without a copy of the request: smaller, so more fit the buffer.
        let _ = socket.set_cap_ack(true);
        let fd = socket.as_raw_fd();
        for (forced, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
            if set_int_option(fd, forced, SOCKET_BUFFER).is_err() {
                let _ = set_int_option(fd, plain, SOCKET_BUFFER);
            }
        }
        let rcvbuf = get_int_option(fd, libc::SO_RCVBUF).unwrap_or(212_992);
        let sndbuf = get_int_option(fd, libc::SO_SNDBUF).unwrap_or(212_992);
        Ok(Conntrack {
            socket,
            seq: 0,
            recv_buf: vec![0; RECV_BUFFER],
            send_buf: Vec::new(),
            batch: (rcvbuf / REPLY_TRUESIZE).clamp(16, MAX_BATCH),
            batch_bytes: (sndbuf / 2).clamp(4096, 256 << 10),
            mid_dump: false,
        })
    }

    /// Opens a socket on the network namespace at `netns` (e.g. `/run/netns/NAME`
    /// or `/proc/PID/ns/net`), from a short-lived thread that joins it. The
    /// caller's own threads never change namespace.
    pub fn open_in_netns(netns: &Path) -> Result<Conntrack, Error> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter_netns(netns)?;
                    Conntrack::open()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::Io {
                        what: "opening the socket in a helper thread",
                        source: io::Error::other("panicked"),
                    })
                })
        })
    }

    /// Every entry of one family's table, all protocols. A dump that changes
    /// kept interrupting is returned as read on the last attempt (logged).
    pub fn dump(&mut self, family: IpFamily) -> Result<Vec<Entry>, Error> {
        Ok(self.list(family, None, |_| true)?.entries)
    }

    /// Lists one family's table, keeping the entries `keep` accepts. With
    /// `only`, the kernel sends only that protocol's entries (and entries of
    /// other protocols are dropped here too, for kernels that ignore the filter).
    ///
    /// Entries are checked as they are read, so listing a million entries to
    /// keep a few holds only the few.
    pub fn list(
        &mut self,
        family: IpFamily,
        only: Option<Protocol>,
        mut keep: impl FnMut(&Entry) -> bool,
    ) -> Result<Listing, Error> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut entries = Vec::new();
            let pass = self.dump_pass(family, only.map(|p| p.number()), &mut |e| {
                if only.is_none_or(|p| p.number() == e.protocol) && keep(&e) {
                    entries.push(e);
                }
            })?;
            if pass.interrupted && attempts < MAX_DUMP_ATTEMPTS {
                tracing::debug!(family = family.as_k8s(), attempts, "conntrack dump interrupted by a change; retrying");
                continue;
            }
            if pass.interrupted {
                tracing::warn!(
                    family = family.as_k8s(),
                    attempts,
                    listed = pass.listed,
                    "conntrack dump interrupted on every attempt; using the partial listing (the next sync sees the rest)"
                );
            }
            if pass.unreadable > 0 {
                tracing::warn!(
                    family = family.as_k8s(),
                    skipped = pass.unreadable,
                    "unreadable conntrack entries skipped"
                );
            }
            return Ok(Listing {
                entries,
                listed: pass.listed,
                attempts,
                complete: !pass.interrupted,
                unreadable: pass.unreadable,
            });
        }
    }

    fn dump_pass(
        &mut self,
        family: IpFamily,
        only: Option<u8>,
        visit: &mut dyn FnMut(Entry),
    ) -> Result<DumpPass, Error> {
        const WHAT: &str = "listing conntrack entries";
        if self.mid_dump {
            return Err(Error::Broken);
        }
        let seq = self.next_seq();
        self.send_buf.clear();
        wire::dump_request(&mut self.send_buf, family, seq, only);
        self.send(WHAT)?;
        self.mid_dump = true;
        let mut pass = DumpPass::default();
        loop {
            let n = match self.recv(0) {
                Ok(n) => n,
                // An overrun reported for an earlier batch: the dump itself carries on.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(source) => return Err(Error::Io { what: WHAT, source }),
            };
            for message in wire::messages(&self.recv_buf[..n]) {
                let m = message.map_err(|m| Error::Malformed { what: WHAT, detail: m.0 })?;
                if m.seq != seq {
                    continue;
                }
                if m.flags & netlink_packet_core::NLM_F_DUMP_INTR != 0 {
                    pass.interrupted = true;
                }
                match m.reply {
                    Reply::Entry(payload) => match wire::parse_entry(payload) {
                        Ok(entry) => {
                            pass.listed += 1;
                            visit(entry);
                        }
                        Err(e) => {
                            if pass.unreadable == 0 {
                                tracing::debug!("unreadable conntrack entry: {}", e.0);
                            }
                            pass.unreadable += 1;
                        }
                    },
                    Reply::Ack(0) => {}
                    Reply::Done(0) => {
                        self.mid_dump = false;
                        return Ok(pass);
                    }
                    Reply::Done(code) | Reply::Ack(code) if code == -libc::EINTR => {
                        self.mid_dump = false;
                        pass.interrupted = true;
                        return Ok(pass);
                    }
                    Reply::Done(code) | Reply::Ack(code) => {
                        self.mid_dump = false;
                        return Err(Error::kernel(WHAT, code));
                    }
                    Reply::Other => {}
                }
            }
        }
    }

    /// Deletes one entry; `false` if it was already gone.
    pub fn delete(&mut self, entry: &Entry) -> Result<bool, Error> {
        let d = self.delete_all(std::slice::from_ref(entry))?;
        match d.first_failure {
            Some(detail) => Err(Error::Kernel { what: "deleting a conntrack entry", source: io::Error::other(detail) }),
            None => Ok(d.deleted == 1),
        }
    }

    /// Deletes entries by original tuple and zone (and id, when read from the
    /// kernel), many requests per datagram: a million deletes take a few
    /// thousand system calls, not a million round trips.
    pub fn delete_all(&mut self, entries: &[Entry]) -> Result<Deleted, Error> {
        supported(entries)?;
        let failures = self
            .batched("deleting conntrack entries", entries, |buf, e, seq| wire::delete_request(buf, e, seq, false))?;
        let mut d = Deleted::default();
        for (i, code) in failures.0 {
            if code == -libc::ENOENT {
                d.already_gone += 1;
            } else {
                d.failed += 1;
                d.first_failure.get_or_insert_with(|| describe(&entries[i], code));
            }
        }
        d.deleted = entries.len() - d.already_gone - d.failed;
        Ok(d)
    }

    /// Creates entries (both tuples as given; TCP ones ESTABLISHED), batched
    /// like [`Conntrack::delete_all`]. For tests and benchmarks: a real node's
    /// entries come from real traffic.
    pub fn create(&mut self, entries: &[Entry], timeout: Duration) -> Result<Created, Error> {
        supported(entries)?;
        let timeout_s = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        let failures = self.batched("creating conntrack entries", entries, |buf, e, seq| {
            wire::create_request(buf, e, timeout_s, seq, false)
        })?;
        let mut c = Created::default();
        for (i, code) in failures.0 {
            if code == -libc::EEXIST {
                c.existed += 1;
            } else {
                c.failed += 1;
                c.first_failure.get_or_insert_with(|| describe(&entries[i], code));
            }
        }
        c.created = entries.len() - c.existed - c.failed;
        Ok(c)
    }

    /// Sends `entries` as requests, many per datagram, each datagram's last
    /// request asking for an acknowledgement; returns the requests that failed.
    ///
    /// The kernel handles a datagram's requests inside `send()`, queueing an
    /// error reply for each failure and the acknowledgement last, so after
    /// `send()` returns every reply is already waiting: they are read without
    /// blocking, and a missing acknowledgement means replies were dropped.
    fn batched(
        &mut self,
        what: &'static str,
        entries: &[Entry],
        mut encode: impl FnMut(&mut Vec<u8>, &Entry, u32),
    ) -> Result<Failures, Error> {
        let mut failures = Failures::default();
        let mut next = 0;
        while next < entries.len() {
            let first = next;
            let first_seq = self.seq.wrapping_add(1);
            let mut last_offset = 0;
            self.send_buf.clear();
            while next < entries.len() && next - first < self.batch && self.send_buf.len() < self.batch_bytes {
                last_offset = self.send_buf.len();
                let seq = self.next_seq();
                encode(&mut self.send_buf, &entries[next], seq);
                next += 1;
            }
            wire::request_ack(&mut self.send_buf, last_offset);
            let (count, last_seq) = (next - first, self.seq);
            self.send(what)?;
            let mut acknowledged = false;
            while !acknowledged {
                let n = match self.recv(libc::MSG_DONTWAIT) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Err(Error::RepliesLost { what }),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                    Err(source) => return Err(Error::Io { what, source }),
                };
                for message in wire::messages(&self.recv_buf[..n]) {
                    let m = message.map_err(|m| Error::Malformed { what, detail: m.0 })?;
                    let index = m.seq.wrapping_sub(first_seq) as usize;
                    let Reply::Ack(code) = m.reply else { continue };
                    if index >= count {
                        continue;
                    }
                    if code != 0 {
                        failures.0.push((first + index, code));
                    }
                    acknowledged |= m.seq == last_seq;
                }
            }
        }
        Ok(failures)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&mut self, what: &'static str) -> Result<(), Error> {
        loop {
            // SAFETY: the pointer and length describe `send_buf`, which outlives the call.
            let n =
                unsafe { libc::send(self.socket.as_raw_fd(), self.send_buf.as_ptr().cast(), self.send_buf.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::Io { what, source: e });
            }
        }
    }

    /// One datagram into `recv_buf`; its length.
    fn recv(&mut self, flags: libc::c_int) -> io::Result<usize> {
        loop {
            // SAFETY: the pointer and length describe `recv_buf`; MSG_TRUNC only makes the kernel
            // report the datagram's full length, it never writes past `len`.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.recv_buf.as_mut_ptr().cast(),
                    self.recv_buf.len(),
                    flags | libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n > self.recv_buf.len() {
                    return Err(io::Error::other(format!("a {n}-byte reply did not fit the receive buffer")));
                }
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn supported(entries: &[Entry]) -> Result<(), Error> {
    match entries.iter().find(|e| e.service_protocol().is_none()) {
        Some(e) => Err(Error::Unsupported { entry: e.to_string() }),
        None => Ok(()),
    }
}

fn describe(entry: &Entry, code: i32) -> String {
    format!("{entry}: {}", io::Error::from_raw_os_error(code.abs()))
}

fn set_int_option(fd: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to an int that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn get_int_option(fd: libc::c_int, option: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd, and pointers to an int and its length that live across the call.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, (&mut value as *mut libc::c_int).cast(), &mut len) };
    if rc == 0 { Ok(value.max(0) as usize) } else { Err(io::Error::last_os_error()) }
}

/// Joins the network namespace at `path` (this thread only) and checks that it did.
fn enter_netns(path: &Path) -> Result<(), Error> {
    let fail = |source| Error::EnterNetns { path: path.to_owned(), source };
    let file = File::open(path).map_err(fail)?;
    // SAFETY: setns on a valid fd; it changes only the calling (helper) thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    let identity = |p: &Path| fs::metadata(p).map(|m| (m.dev(), m.ino()));
    if identity(Path::new("/proc/thread-self/ns/net")).map_err(fail)? != identity(path).map_err(fail)? {
        return Err(fail(io::Error::other("setns returned success but the thread is not in the namespace")));
    }
    Ok(())
}
