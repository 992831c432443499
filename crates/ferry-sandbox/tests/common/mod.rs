//! Shared setup for the integration tests: a client host and a server host on one veth link.
//!
//! Addresses come from the benchmarking range 198.18.0.0/15 and a ULA prefix; they exist only inside the
//! sandbox namespaces, which have no link to the machine's real interfaces.

#![allow(dead_code)] // each test file uses a different part of this module

use ferry_sandbox::probe::{Endpoint, ProbeCommand};
use ferry_sandbox::{Host, Sandbox};

pub const CLIENT_V4: &str = "198.18.0.1";
pub const SERVER_V4: &str = "198.18.0.2";
pub const CLIENT_V6: &str = "fd00:fe::1";
pub const SERVER_V6: &str = "fd00:fe::2";

/// The probe binary built from this crate.
pub fn probe() -> ProbeCommand {
    ProbeCommand::new(env!("CARGO_BIN_EXE_ferry-probe"))
}

pub fn ep(text: &str) -> Endpoint {
    text.parse().unwrap_or_else(|e| panic!("bad endpoint {text}: {e}"))
}

/// A sandbox with `client` and `server` linked by `eth0` <-> `eth0`, dual-stack.
pub struct Pair {
    pub sb: Sandbox,
    pub client: Host,
    pub server: Host,
}

pub fn pair(tag: &str) -> Pair {
    let mut sb = Sandbox::new(tag).expect("sandbox");
    let client = sb.add_host("client").expect("client host");
    let server = sb.add_host("server").expect("server host");
    sb.link(&client, "eth0", &server, "eth0").expect("veth");
    for (host, v4, v6) in [(&client, CLIENT_V4, CLIENT_V6), (&server, SERVER_V4, SERVER_V6)] {
        sb.add_address(host, "eth0", &format!("{v4}/24")).expect("v4 address");
        sb.add_address(host, "eth0", &format!("{v6}/64")).expect("v6 address");
    }
    Pair { sb, client, server }
}
