//! Pod egress masquerading on the real kernel, with the BPF datapath and with
//! the nftables fallback, and with masquerading off: the setup of the seed
//! (seeds/cilium-masquerading-troubleshooting): an "internet" server that can
//! only answer the node's addresses, and a database on a routed network that
//! must see pod addresses.

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const P1: At = At::Pod(0, 0);
const P2: At = At::Pod(0, 1);
const INTERNET: [&str; 2] = ["1.2.3.4", "2001:db8:99::4"];
const DB: [&str; 2] = ["10.20.30.40", "fd00:2030::40"];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(self::ip(ip), port)
}

fn lab(tag: &str, masquerade: &str) -> Lab {
    let mut lab = Lab::new(tag, FERRY.as_ref()).unwrap();
    let a = lab.add_node("node-a").unwrap();
    lab.add_node("node-b").unwrap();
    lab.add_pod(a, "p1", &[ip("10.244.0.10"), ip("fd00:244::10")]).unwrap();
    lab.add_pod(a, "p2", &[ip("10.244.0.11"), ip("fd00:244::11")]).unwrap();
    let internet = lab.add_external("internet", &INTERNET.map(ip), a).unwrap();
    // The internet does not route pod addresses: only the node's own can be answered.
    lab.sb.ip_batch(lab.host(At::External(internet)), &["route del default".into(), "route del ::/0".into()]).unwrap();
    let db = lab.add_external("db", &DB.map(ip), a).unwrap();
    for addr in INTERNET {
        let listen = vec![Endpoint::tcp(sa(addr, 80)), Endpoint::udp(sa(addr, 53))];
        lab.serve(At::External(internet), "internet", listen).unwrap();
    }
    lab.serve(At::External(db), "db", DB.iter().map(|a| Endpoint::tcp(sa(a, 5432))).collect()).unwrap();
    lab.write_node_config(
        a,
        &format!(
            "clusterCIDRs: [10.244.0.0/16, \"fd00:244::/48\"]\npodCIDRs: [10.244.0.0/24, \"fd00:244::/64\"]\n\
             serviceCIDRs: [10.96.0.0/16]\nmasquerade: {masquerade}\n\
             nonMasqueradeCIDRs: [10.20.30.0/24, \"fd00:2030::/64\"]\n"
        ),
    )
    .unwrap();
    lab.write_manifests(a, "").unwrap();
    lab.start_agent(a).unwrap();
    lab
}

fn node_a(lab: &Lab, v6: bool) -> IpAddr {
    let n = &lab.nodes[0];
    if v6 { n.primary_v6.into() } else { n.primary_v4.into() }
}

fn reply(o: &Observation) -> &ferry_sandbox::probe::Reply {
    o.reply().unwrap_or_else(|| panic!("expected a reply, got {o:?}"))
}

fn masqueraded_egress_works(lab: &Lab) {
    for (v6, addr) in INTERNET.iter().enumerate().map(|(i, a)| (i == 1, *a)) {
        let me = if v6 { ip("fd00:244::10") } else { ip("10.244.0.10") };
        for target in [Endpoint::tcp(sa(addr, 80)), Endpoint::udp(sa(addr, 53))] {
            let o = lab.connect(P1, &ConnectOpts::new(target)).unwrap();
            let r = reply(&o);
            assert_eq!(r.server_peer.ip(), node_a(lab, v6), "{target}: the internet sees the node, not {me}");
            assert_eq!(r.client_peer, target.addr, "{target}: the reply reaches the pod from the server");
        }
        // ICMP echo: the internet can only answer it because it was masqueraded.
        let o = lab
            .connect(P1, &ConnectOpts::new(Endpoint { addr: sa(addr, 0), proto: ferry_sandbox::probe::Proto::Icmp }));
        assert_eq!(reply(&o.unwrap()).client_peer.ip(), ip(addr), "echo reply from {addr}");
        // An ICMP error about a masqueraded flow reaches the pod: the closed port is refused at once.
        let closed = lab.connect(P1, &ConnectOpts::new(Endpoint::udp(sa(addr, 9)))).unwrap();
        assert!(matches!(closed, Observation::Refused { .. }), "{addr}:9/udp: {closed:?}");
    }
    // The database network routes pod addresses (nonMasqueradeCIDRs): it sees the pod itself.
    for (v6, addr) in DB.iter().enumerate().map(|(i, a)| (i == 1, *a)) {
        let o = lab.connect(P1, &ConnectOpts::new(Endpoint::tcp(sa(addr, 5432)))).unwrap();
        let want = if v6 { ip("fd00:244::10") } else { ip("10.244.0.10") };
        assert_eq!(reply(&o).server_peer.ip(), want, "{addr}: the database sees the pod address");
    }
}

/// Two pods using the same source port to the same server at the same time: two NAT tuples.
fn same_source_ports_do_not_collide(lab: &mut Lab) {
    let mut opts = ConnectOpts::new(Endpoint::udp(sa(INTERNET[0], 53)));
    opts.source_port = Some(40000);
    let c1 = lab.spawn_client(P1, &opts, ConnectMode::Count(20)).unwrap();
    let c2 = lab.spawn_client(P2, &opts, ConnectMode::Count(20)).unwrap();
    let o1 = lab.finish_client(c1, Duration::from_secs(30)).unwrap();
    let o2 = lab.finish_client(c2, Duration::from_secs(30)).unwrap();
    assert_eq!(o1.len(), 20);
    assert_eq!(o2.len(), 20);
    let seen: BTreeSet<SocketAddr> = o1.iter().chain(&o2).map(|o| reply(o).server_peer).collect();
    assert_eq!(seen.len(), 2, "one NAT tuple per pod, never shared: {seen:?}");
    assert!(seen.iter().all(|p| p.ip() == node_a(lab, false)));
}

fn status_json(lab: &Lab) -> serde_json::Value {
    let out = std::process::Command::new(FERRY)
        .args(["status", "--json", "--pin-dir"])
        .arg(&lab.nodes[0].pin_dir)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bpf_masquerading() {
    let mut lab = lab("masqbpf", "bpf");
    masqueraded_egress_works(&lab);
    same_source_ports_do_not_collide(&mut lab);
    let s = status_json(&lab);
    assert!(s["masquerade"].as_str().unwrap().starts_with("masquerade  bpf:"), "{s}");
    assert!(s["counters"]["masq_new_flow"].as_u64().unwrap() >= 6, "{s}");
    assert!(s["counters"]["icmp_error_rev"].as_u64().unwrap() >= 2, "{s}");
    assert!(s["natEntries"].as_u64().unwrap() >= 2, "{s}");
    assert!(lab.agent_log(0).contains("masquerade: pod egress"), "the agent states its masquerade settings");
}

#[test]
fn nftables_masquerading_gives_the_same_results() {
    let mut lab = lab("masqnft", "nftables");
    masqueraded_egress_works(&lab);
    same_source_ports_do_not_collide(&mut lab);
    let out =
        lab.sb.command(lab.host(At::Node(0)), "nft").args(["list", "table", "inet", "ferry-masq"]).output().unwrap();
    assert!(out.status.success(), "ferry's table exists");
    assert_eq!(status_json(&lab)["counters"]["masq_new_flow"].as_u64(), Some(0), "BPF masquerading stays off");
}

#[test]
fn masquerading_off_keeps_pod_addresses() {
    let lab = lab("masqoff", "\"off\"");
    // The internet cannot answer a pod address: nothing comes back.
    let mut opts = ConnectOpts::new(Endpoint::tcp(sa(INTERNET[0], 80)));
    opts.timeout = Duration::from_millis(800);
    assert!(matches!(lab.connect(P1, &opts).unwrap(), Observation::Timeout { .. }));
    let o = lab.connect(P1, &ConnectOpts::new(Endpoint::tcp(sa(DB[0], 5432)))).unwrap();
    assert_eq!(reply(&o).server_peer.ip(), ip("10.244.0.10"));
    assert!(lab.agent_log(0).contains("masquerade: off"));
}

#[test]
fn a_renamed_masquerade_key_is_refused_with_its_replacement() {
    let dir = std::env::temp_dir().join(format!("ferry-masqkey-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("m")).unwrap();
    std::fs::write(dir.join("node.yaml"), "nodeName: a\nenableIPv4Masquerade: false\n").unwrap();
    let out = std::process::Command::new(FERRY)
        .args(["explain", "--manifests"])
        .arg(dir.join("m"))
        .arg("--node-config")
        .arg(dir.join("node.yaml"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("enableIPv4Masquerade: this key was renamed: use masquerade: bpf | nftables | off"), "{err}");
}
