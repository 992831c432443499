//! Real TCP and UDP between sandbox hosts: the probe's observations for replies, refusals, drops and
//! unreachable destinations, over IPv4 and IPv6.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, ep, pair, probe};
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation, Reply, ServeOpts, Stage};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A reply over a path without NAT: both ends agree on both addresses.
fn assert_direct(observation: &Observation, target: Endpoint, client_ip: &str) -> Reply {
    let reply = observation.reply().unwrap_or_else(|| panic!("expected a reply from {target}, got {observation:?}"));
    assert_eq!(reply.server_local, target.addr, "{reply:?}");
    assert_eq!(reply.client_peer, target.addr, "{reply:?}");
    assert_eq!(reply.server_peer.ip(), ip(client_ip), "{reply:?}");
    assert_eq!(reply.server_peer.port(), reply.client_local.port(), "{reply:?}");
    reply.clone()
}

fn check_family(tag: &str, server_ip: &str, client_ip: &str, v6: bool) {
    let p = pair(tag);
    let mut sb = p.sb;
    let fmt = |port: u16, proto: &str| {
        let addr = SocketAddr::new(ip(server_ip), port);
        ep(&format!("{addr}/{proto}"))
    };
    let (tcp, udp) = (fmt(8080, "tcp"), fmt(5353, "udp"));
    sb.start_probe_server(&p.server, None, &probe(), &ServeOpts::new("backend-a", vec![tcp, udp])).unwrap();

    let tcp_reply =
        assert_direct(&sb.probe_connect(&p.client, None, &probe(), &ConnectOpts::new(tcp)).unwrap(), tcp, client_ip);
    assert_eq!(tcp_reply.server, "backend-a");
    assert_eq!(tcp_reply.client_local.ip(), ip(client_ip), "TCP getsockname shows the chosen source");

    let unconnected = sb.probe_connect(&p.client, None, &probe(), &ConnectOpts::new(udp)).unwrap();
    let reply = assert_direct(&unconnected, udp, client_ip);
    assert!(reply.client_local.ip().is_unspecified(), "an unconnected, unbound UDP socket has a wildcard address");
    assert_eq!(reply.client_local.is_ipv6(), v6);

    let mut connected = ConnectOpts::new(udp);
    connected.connected_udp = true;
    let reply = assert_direct(&sb.probe_connect(&p.client, None, &probe(), &connected).unwrap(), udp, client_ip);
    assert_eq!(reply.client_local.ip(), ip(client_ip), "a connected UDP socket has a concrete source");
    sb.close().unwrap();
}

#[test]
fn tcp_and_udp_over_ipv4() {
    check_family("tv4", SERVER_V4, CLIENT_V4, false);
}

#[test]
fn tcp_and_udp_over_ipv6() {
    check_family("tv6", SERVER_V6, CLIENT_V6, true);
}

/// SCTP over raw sockets: the INIT reaches the server, whose INIT-ACK carries its view back.
#[test]
fn sctp_over_raw_sockets_both_families() {
    let p = pair("sctp");
    let mut sb = p.sb;
    let v4 = ep(&format!("{SERVER_V4}:53/sctp"));
    let v6 = ep(&format!("[{SERVER_V6}]:53/sctp"));
    sb.start_probe_server(&p.server, None, &probe(), &ServeOpts::new("sctp-a", vec![v4, v6])).unwrap();
    for (target, client) in [(v4, CLIENT_V4), (v6, CLIENT_V6)] {
        let observed = sb.probe_connect(&p.client, None, &probe(), &ConnectOpts::new(target)).unwrap();
        let reply = assert_direct(&observed, target, client);
        assert_eq!(reply.server, "sctp-a");
    }
    // Nothing listens on this port: the INIT goes unanswered (no kernel SCTP stack to ABORT it).
    let closed =
        ConnectOpts { timeout: Duration::from_millis(300), ..ConnectOpts::new(ep(&format!("{SERVER_V4}:54/sctp"))) };
    let observed = sb.probe_connect(&p.client, None, &probe(), &closed).unwrap();
    assert!(matches!(observed, Observation::Timeout { .. } | Observation::Refused { .. }), "{observed:?}");
    sb.close().unwrap();
}

#[test]
fn closed_ports_are_refused() {
    let p = pair("refuse");
    // No server runs at all: the server host's kernel answers with RST / ICMP port unreachable.
    for target in [format!("{SERVER_V4}:9"), format!("[{SERVER_V6}]:9")] {
        let tcp = ConnectOpts::new(ep(&format!("{target}/tcp")));
        let observed = p.sb.probe_connect(&p.client, None, &probe(), &tcp).unwrap();
        assert_eq!(observed, Observation::Refused { errno: "ECONNREFUSED".into() }, "tcp {target}");

        let mut udp = ConnectOpts::new(ep(&format!("{target}/udp")));
        let observed = p.sb.probe_connect(&p.client, None, &probe(), &udp).unwrap();
        assert_eq!(observed, Observation::Refused { errno: "ECONNREFUSED".into() }, "unconnected udp {target}");
        udp.connected_udp = true;
        let observed = p.sb.probe_connect(&p.client, None, &probe(), &udp).unwrap();
        assert_eq!(observed, Observation::Refused { errno: "ECONNREFUSED".into() }, "connected udp {target}");
    }
}

/// A genuine silent drop: the client resolves the target to a MAC address nobody owns (a permanent
/// neighbour entry), so frames reach the server host's veth, are not addressed to it, and are discarded
/// without any ICMP. (A blackhole route would not do: connect() fails at once with EINVAL.)
#[test]
fn dropped_packets_are_a_timeout() {
    let p = pair("drop");
    for (lost, table) in [("198.18.0.99", "-4"), ("fd00:fe::99", "-6")] {
        p.sb.ip(
            &p.client,
            &[table, "neigh", "replace", lost, "lladdr", "02:00:00:00:00:99", "nud", "permanent", "dev", "eth0"],
        )
        .unwrap();
        let addr = SocketAddr::new(ip(lost), 80);
        let mut tcp = ConnectOpts::new(ep(&format!("{addr}/tcp")));
        tcp.timeout = Duration::from_millis(300);
        let observed = p.sb.probe_connect(&p.client, None, &probe(), &tcp).unwrap();
        assert_eq!(observed, Observation::Timeout { stage: Stage::Connect }, "tcp {addr}");

        let mut udp = ConnectOpts::new(ep(&format!("{addr}/udp")));
        udp.timeout = Duration::from_millis(300);
        let observed = p.sb.probe_connect(&p.client, None, &probe(), &udp).unwrap();
        assert_eq!(observed, Observation::Timeout { stage: Stage::Reply }, "udp {addr}");
    }
}

#[test]
fn destinations_without_a_route_are_unreachable() {
    let p = pair("noroute");
    // The hosts have only their link routes, so documentation addresses have no route at all.
    for target in ["192.0.2.1:80/tcp", "[2001:db8::1]:80/tcp", "192.0.2.1:53/udp"] {
        let observed = p.sb.probe_connect(&p.client, None, &probe(), &ConnectOpts::new(ep(target))).unwrap();
        assert_eq!(observed, Observation::Unreachable { errno: "ENETUNREACH".into() }, "{target}");
    }
}

#[test]
fn bound_source_address_is_what_the_server_sees() {
    let p = pair("bind");
    let mut sb = p.sb;
    sb.add_address(&p.client, "eth0", "198.18.0.11/24").unwrap();
    sb.add_address(&p.client, "eth0", "fd00:fe::11/64").unwrap();
    let targets = [
        ep(&format!("{SERVER_V4}:80/tcp")),
        ep(&format!("{SERVER_V4}:53/udp")),
        ep(&format!("[{SERVER_V6}]:80/tcp")),
        ep(&format!("[{SERVER_V6}]:53/udp")),
    ];
    sb.start_probe_server(&p.server, None, &probe(), &ServeOpts::new("s", targets.to_vec())).unwrap();
    for target in targets {
        let source = if target.addr.is_ipv6() { "fd00:fe::11" } else { "198.18.0.11" };
        let mut opts = ConnectOpts::new(target);
        opts.bind = Some(ip(source));
        let reply = assert_direct(&sb.probe_connect(&p.client, None, &probe(), &opts).unwrap(), target, source);
        assert_eq!(reply.client_local.ip(), ip(source));
    }
}

#[test]
fn count_and_keep_open_report_every_exchange() {
    let p = pair("series");
    let mut sb = p.sb;
    let target = ep(&format!("{SERVER_V4}:7000/tcp"));
    let mut serve = ServeOpts::new("echo", vec![target]);
    serve.echo_lines = true;
    sb.start_probe_server(&p.server, None, &probe(), &serve).unwrap();
    let opts = ConnectOpts::new(target);

    let series = sb.probe_connect_mode(&p.client, None, &probe(), &opts, ConnectMode::Count(5)).unwrap();
    assert_eq!(series.len(), 5);
    for observed in &series {
        assert_direct(observed, target, CLIENT_V4);
    }

    let held = ConnectMode::KeepOpen(Duration::from_millis(300));
    let exchanges = sb.probe_connect_mode(&p.client, None, &probe(), &opts, held).unwrap();
    assert!(exchanges.len() >= 2, "keep-open makes at least two exchanges: {exchanges:?}");
    let first = assert_direct(&exchanges[0], target, CLIENT_V4);
    for observed in &exchanges {
        let reply = assert_direct(observed, target, CLIENT_V4);
        assert_eq!(reply.client_local, first.client_local, "all exchanges use one connection");
    }
}

/// Without `--echo-lines` the server closes after one answer, so a kept-open connection reports the
/// close instead of hanging.
#[test]
fn keep_open_reports_a_closed_connection() {
    let p = pair("closed");
    let mut sb = p.sb;
    let target = ep(&format!("{SERVER_V4}:7001/tcp"));
    sb.start_probe_server(&p.server, None, &probe(), &ServeOpts::new("once", vec![target])).unwrap();
    let held = ConnectMode::KeepOpen(Duration::from_millis(300));
    let exchanges = sb.probe_connect_mode(&p.client, None, &probe(), &ConnectOpts::new(target), held).unwrap();
    assert_eq!(exchanges.len(), 2, "{exchanges:?}");
    assert_direct(&exchanges[0], target, CLIENT_V4);
    assert!(matches!(exchanges[1], Observation::Error { .. }), "{exchanges:?}");
}

/// client -- router -- server with forwarding on in the router only, routes on both ends, and the
/// server side built with one `ip -batch` call behind a bridge.
#[test]
fn routed_and_bridged_topology_carries_traffic() {
    let mut sb = ferry_sandbox::Sandbox::new("routed").unwrap();
    let client = sb.add_host("client").unwrap();
    let router = sb.add_host("router").unwrap();
    let server = sb.add_host("server").unwrap();
    sb.set_forwarding(&router, true).unwrap();
    sb.link(&client, "eth0", &router, "c0").unwrap();
    sb.link(&server, "eth0", &router, "s0").unwrap();
    sb.add_bridge(&router, "br0").unwrap();
    sb.attach_to_bridge(&router, "s0", "br0").unwrap();
    sb.add_address(&client, "eth0", "198.18.1.2/24").unwrap();
    sb.add_address(&router, "c0", "198.18.1.1/24").unwrap();
    sb.ip_batch(&router, &["addr add 198.18.2.1/24 dev br0".into(), "addr add fd00:2::1/64 dev br0 nodad".into()])
        .unwrap();
    sb.ip_batch(&server, &["addr add 198.18.2.2/24 dev eth0".into(), "addr add fd00:2::2/64 dev eth0 nodad".into()])
        .unwrap();
    sb.add_address(&client, "eth0", "fd00:1::2/64").unwrap();
    sb.add_address(&router, "c0", "fd00:1::1/64").unwrap();
    sb.add_route(&client, "default", Some("198.18.1.1"), None).unwrap();
    sb.add_route(&client, "default", Some("fd00:1::1"), None).unwrap();
    sb.add_route(&server, "198.18.1.0/24", Some("198.18.2.1"), Some("eth0")).unwrap();
    sb.add_route(&server, "fd00:1::/64", Some("fd00:2::1"), None).unwrap();

    let targets = [ep("198.18.2.2:80/tcp"), ep("[fd00:2::2]:53/udp")];
    sb.start_probe_server(&server, None, &probe(), &ServeOpts::new("far", targets.to_vec())).unwrap();
    assert_direct(
        &sb.probe_connect(&client, None, &probe(), &ConnectOpts::new(targets[0])).unwrap(),
        targets[0],
        "198.18.1.2",
    );
    assert_direct(
        &sb.probe_connect(&client, None, &probe(), &ConnectOpts::new(targets[1])).unwrap(),
        targets[1],
        "fd00:1::2",
    );
    sb.close().unwrap();
}
