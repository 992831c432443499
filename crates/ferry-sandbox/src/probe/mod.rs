//! The traffic probe: a server that tells each client how it saw the connection, and a client that
//! reports what happened to one attempt as an [`Observation`].
//!
//! Both halves run as separate processes inside sandbox hosts (`ferry-probe serve|connect ...`, or
//! `ferry probe serve|connect ...`); [`main_from_args`] is their shared command line.
//!
//! Wire format: the client sends one line; the server answers one line of JSON
//! `{"server":NAME,"local":"ip:port as accepted","peer":"client ip:port as seen"}` ([`ServerReply`]).

mod args;
mod connect;
mod errno;
mod harness;
mod icmp;
mod sctp;
mod serve;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use args::{ConnectMode, main_from_args};
pub use connect::{ConnectOpts, MAX_HELD_EXCHANGES, connect, connect_many, held, keep_open, udp_stream};
pub use harness::ProbeCommand;
pub use serve::{ServeOpts, serve};

/// Transport protocol of an [`Endpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// Spoken over raw sockets (see `sctp`), so it works without kernel SCTP.
    Sctp,
    /// ICMP echo (client only; the port is ignored).
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
            Proto::Icmp => "icmp",
        })
    }
}

/// An address, port and protocol, written `198.18.0.2:80/tcp` or `[fd00::2]:53/udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl Endpoint {
    /// A TCP endpoint.
    pub fn tcp(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, proto: Proto::Tcp }
    }

    /// A UDP endpoint.
    pub fn udp(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, proto: Proto::Udp }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

impl FromStr for Endpoint {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Endpoint, ProbeError> {
        let bad = || ProbeError::Usage(format!("{s:?} is not an endpoint like 198.18.0.2:80/tcp or [fd00::2]:53/udp"));
        let (addr, proto) = s.rsplit_once('/').ok_or_else(bad)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => Proto::Sctp,
            "icmp" => Proto::Icmp,
            _ => return Err(bad()),
        };
        Ok(Endpoint { addr: addr.parse().map_err(|_| bad())?, proto })
    }
}

/// The server's one-line JSON answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReply {
    /// The server's `--name`.
    pub server: String,
    /// The server-side address of the connection (for UDP: the bound address).
    pub local: SocketAddr,
    /// The client address as the server saw it (after any NAT).
    pub peer: SocketAddr,
}

/// Both ends' view of a successful exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Which server answered.
    pub server: String,
    /// The server-side address of the connection, as the server saw it.
    pub server_local: SocketAddr,
    /// The client's address as the server saw it: shows source NAT / masquerading.
    pub server_peer: SocketAddr,
    /// The client socket's own address (getsockname).
    pub client_local: SocketAddr,
    /// Whom the client believes it talks to: getpeername for TCP and connected UDP, the reply's source
    /// address for unconnected UDP. Shows whether reverse translation happened.
    pub client_peer: SocketAddr,
}

/// Which step of an attempt went unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The TCP handshake.
    Connect,
    /// Waiting for the answer to the line sent.
    Reply,
}

/// What one attempt observed; printed by `connect` as one JSON line, e.g.
/// `{"result":"refused","errno":"ECONNREFUSED"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Observation {
    /// The server answered.
    Reply(Reply),
    /// Actively refused: TCP RST, ICMP port unreachable for UDP, or connect() itself returning
    /// ECONNREFUSED / EPERM (a cgroup connect hook rejecting the address).
    Refused { errno: String },
    /// No answer within the timeout: the packets were dropped somewhere.
    Timeout { stage: Stage },
    /// EHOSTUNREACH / ENETUNREACH: no route, a reject route, or failed neighbour resolution.
    Unreachable { errno: String },
    /// Anything else, with the errno name when there is one.
    Error { errno: Option<String>, message: String },
}

impl Observation {
    /// The reply, if the server answered.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Observation::Reply(reply) => Some(reply),
            _ => None,
        }
    }

    /// The observation as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("observations always serialize")
    }
}

/// Why the probe could not run at all (as opposed to observing a failure, which is an [`Observation`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Bad command-line arguments.
    #[error("{0}")]
    Usage(String),
    /// A listening socket could not be created or bound.
    #[error(
        "listening on {endpoint} failed: {source} (is {ip} assigned to an interface in this network namespace? \
         is the port already taken?)", ip = endpoint.addr.ip()
    )]
    Listen {
        endpoint: Endpoint,
        #[source]
        source: std::io::Error,
    },
    /// A listener stopped accepting or receiving.
    #[error("serving {endpoint} stopped: {source}")]
    Serving {
        endpoint: Endpoint,
        #[source]
        source: std::io::Error,
    },
    /// The ready file could not be written.
    #[error("writing ready file {} failed: {source} (does its directory exist?)", path.display())]
    ReadyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Observations could not be written to stdout.
    #[error("writing the observation failed: {0}")]
    Output(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        for text in ["198.18.0.2:80/tcp", "[fd00::2]:53/udp", "1.2.3.4:80/sctp"] {
            let ep: Endpoint = text.parse().unwrap();
            assert_eq!(ep.to_string(), text);
        }
        for bad in ["198.18.0.2:80", "198.18.0.2/tcp", "fd00::2:53/udp", "1.2.3.4:80/gre"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn observations_are_tagged_json() {
        let refused = Observation::Refused { errno: "ECONNREFUSED".into() };
        assert_eq!(refused.to_json_line(), r#"{"result":"refused","errno":"ECONNREFUSED"}"#);
        let timeout = Observation::Timeout { stage: Stage::Connect };
        assert_eq!(timeout.to_json_line(), r#"{"result":"timeout","stage":"connect"}"#);
        let reply = Observation::Reply(Reply {
            server: "s".into(),
            server_local: "[fd00::2]:80".parse().unwrap(),
            server_peer: "[fd00::1]:4000".parse().unwrap(),
            client_local: "[fd00::1]:4000".parse().unwrap(),
            client_peer: "[fd00::2]:80".parse().unwrap(),
        });
        let line = reply.to_json_line();
        assert!(line.starts_with(r#"{"result":"reply","server":"s","server_local":"[fd00::2]:80""#), "{line}");
        assert_eq!(serde_json::from_str::<Observation>(&line).unwrap(), reply);
    }
}
