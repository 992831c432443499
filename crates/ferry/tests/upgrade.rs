//! Upgrades across map layouts, on the real kernel (needs root; never skipped).
//!
//! A node's agent programs a TCP ClusterIP; a pod holds one connection through
//! it. The agent is SIGKILLed and its pinned datapath is made to look like an
//! older build's: `ferry_meta` removed (layout 0, before versioning) and
//! `ferry_frags` replaced by a map of another value size (what an older object
//! would have pinned). The restarted agent migrates it (the changed map is
//! re-created, the rest adopted, the links switched in place) and the held
//! connection keeps answering. Then the pinned layout is made *newer* than
//! this build (a downgrade): the agent refuses with a message saying what to
//! do (not "needs root"), touches nothing, and the old programs keep serving.
//!
//! The second test runs the real previous datapath: layout 1's objects, built
//! from the git history by the test itself, serve NodePort flows to a local
//! and a remote (SNATed) pod through their single conntrack LRU; the upgrade
//! to this build copies those flows into the split tables, and not one held
//! connection fails. Then the way back: `ferry datapath downgrade --to-layout
//! 1` merges the tables into a layout-1 `ferry_ct`, the layout-1 programs
//! adopt it and take the links over, and again not one held connection fails.

#[path = "common/layout_1.rs"]
mod layout_1;

use ferry::lab::{At, BackgroundClient, Lab};
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation, ServeOpts};
use layout_1::{Conntrack, build_layout_1, serve_with_layout_1, write_meta};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const CLIENT: At = At::Pod(0, 0);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: "10.96.0.20"
  clusterIPs: ["10.96.0.20"]
  ipFamilies: [IPv4]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: ["10.244.0.21"], nodeName: node-a}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

/// One more exchange on the held connection: the server that answered, or what went wrong.
fn exchange(stdin: &mut std::process::ChildStdin, replies: &Receiver<String>) -> Result<String, String> {
    stdin.write_all(b"x\n").map_err(|e| format!("writing to the held client: {e}"))?;
    stdin.flush().map_err(|e| format!("writing to the held client: {e}"))?;
    next(replies)
}

fn next(replies: &Receiver<String>) -> Result<String, String> {
    // A guard against a hung client, not a timing assertion.
    match replies.recv_timeout(Duration::from_secs(20)) {
        Ok(line) => {
            let o: Observation = serde_json::from_str(&line).map_err(|e| format!("{line:?}: {e}"))?;
            o.reply().map(|r| r.server.clone()).ok_or_else(|| format!("{o:?}"))
        }
        Err(RecvTimeoutError::Timeout) => Err("no answer from the held client".into()),
        Err(RecvTimeoutError::Disconnected) => Err("the held client exited".into()),
    }
}

fn new_connection(lab: &Lab) -> String {
    let opts = ConnectOpts::new(Endpoint::tcp("10.96.0.20:80".parse().unwrap()));
    match lab.connect(CLIENT, &opts) {
        Ok(o) => o.reply().map(|r| r.server.clone()).unwrap_or_else(|| format!("{o:?}")),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn an_older_layout_is_migrated_and_a_newer_one_refused_while_a_connection_is_held() {
    let mut lab = Lab::new("upg", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_pod(node, "client", &[ip("10.244.0.10")]).unwrap();
    let be = lab.add_pod(node, "be21", &[ip("10.244.0.21")]).unwrap();
    let mut serve = ServeOpts::new("be21", vec![Endpoint::tcp(SocketAddr::new(ip("10.244.0.21"), 8080))]);
    serve.echo_lines = true; // the held connection stays open
    serve.idle_timeout = Duration::from_secs(600);
    lab.serve_with(At::Pod(node, be), serve).unwrap();
    lab.write_node_config(node, "datapath: bpf\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\n")
        .unwrap();
    lab.write_manifests(node, MANIFESTS).unwrap();
    lab.start_agent(node).unwrap();
    let pin_dir = lab.nodes[node].pin_dir.clone();
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(ferry_bpf::layout::LAYOUT));

    let opts = ConnectOpts::new(Endpoint::tcp("10.96.0.20:80".parse().unwrap()));
    let (_pid, mut stdin, stdout) = lab.spawn_held(CLIENT, &opts, Duration::from_secs(600)).unwrap();
    let (tx, replies) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().take(10_000) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(next(&replies), Ok("be21".into()), "the held connection did not open");

    // An older build's datapath: no ferry_meta, and a ferry_frags of another shape.
    lab.kill_agent(node).unwrap();
    std::fs::remove_file(pin_dir.join("ferry_meta")).unwrap();
    let frags = MapHandle::from_pinned_path(pin_dir.join("ferry_frags")).unwrap();
    let (key_size, value_size) = (frags.key_size(), frags.value_size());
    drop(frags);
    std::fs::remove_file(pin_dir.join("ferry_frags")).unwrap();
    let opts0 = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let mut old = MapHandle::create(MapType::LruHash, Some("ferry_frags"), key_size, value_size + 8, 1024, &opts0)
        .expect("creating the old-layout ferry_frags");
    old.pin(pin_dir.join("ferry_frags")).unwrap();
    drop(old);
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(0));
    assert_eq!(exchange(&mut stdin, &replies), Ok("be21".into()), "while the agent was down");

    lab.start_agent(node).unwrap();
    let log = lab.agent_log(node);
    // Retired: ferry_frags (its shape changed), the conntrack tables, which
    // changed in layout 2 (confirmed flows in a hash, unconfirmed ones in
    // ferry_ct_new), the pass-through sets, new in layout 3, the DSR maps,
    // new in layout 4, and the IPv6 ones, new in layout 6 (this build pinned
    // them before the test made the datapath look like layout 0), and the
    // counters, 128 slots since layout 5.
    let retired: std::collections::BTreeSet<&str> = log
        .lines()
        .rev()
        .find_map(|l| l.split("retired=[").nth(1))
        .and_then(|r| r.split(']').next())
        .map(|r| r.split(',').collect())
        .unwrap_or_default();
    assert!(
        log.contains("migrated_from_layout=0")
            && retired
                == [
                    "ferry_addrs",
                    "ferry_ct",
                    "ferry_ct_new",
                    "ferry_dsr",
                    "ferry_dsr6",
                    "ferry_frags",
                    "ferry_peers",
                    "ferry_stats",
                    "ferry_tunnels",
                    "ferry_tunnels6"
                ]
                .into_iter()
                .collect(),
        "the agent did not say it migrated layout 0 (retiring ferry_frags, the conntrack tables, the \
         pass-through sets, the DSR maps and the counters only):\n{log}"
    );
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(ferry_bpf::layout::LAYOUT));
    let frags = MapHandle::from_pinned_path(pin_dir.join("ferry_frags")).unwrap();
    assert_eq!(frags.value_size(), value_size, "ferry_frags was not re-created in this build's layout");
    assert!(!pin_dir.join("retired").exists(), "the retired maps were not removed");
    assert_eq!(exchange(&mut stdin, &replies), Ok("be21".into()), "the held connection after the upgrade");
    assert_eq!(new_connection(&lab), "be21", "a new connection after the upgrade");

    // A downgrade: the pinned datapath is of a newer layout than this build knows.
    assert_refused(&mut lab, node);
    assert_eq!(exchange(&mut stdin, &replies), Ok("be21".into()), "the held connection after the refusal");
    assert_eq!(new_connection(&lab), "be21", "a new connection after the refusal");
}

/// Held connections per NodePort (each flow is two conntrack entries).
const HELD_PER_PATH: usize = 8;

/// A held connection: one exchange per line written to it.
struct Held {
    what: String,
    stdin: std::process::ChildStdin,
    replies: Receiver<String>,
}

impl Held {
    fn open(lab: &mut Lab, at: At, opts: &ConnectOpts, what: String) -> Held {
        let (_pid, stdin, stdout) = lab.spawn_held(at, opts, Duration::from_secs(600)).unwrap();
        let (tx, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().take(10_000) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Held { what, stdin, replies }
    }

    fn exchange(&mut self) -> Result<String, String> {
        exchange(&mut self.stdin, &self.replies)
    }
}

/// A client opening new connections from `bind` to the remote NodePort one
/// after another in the background, once it has made 50 of them.
fn remote_stream(lab: &mut Lab, outside: At, node_ip: IpAddr, bind: &str) -> BackgroundClient {
    let mut opts = ConnectOpts::new(Endpoint::tcp(SocketAddr::new(node_ip, 30081)));
    opts.bind = Some(ip(bind));
    let client = lab.spawn_client(outside, &opts, ConnectMode::Count(1_000_000)).unwrap();
    let running = lab.wait_until(Duration::from_secs(20), |_| client.observed().len() >= 50);
    assert!(running, "the stream from {bind} did not get going: {:?}", client.observed().first());
    client
}

/// A datapath counter, summed over CPUs, read from the pinned `ferry_stats`
/// (not through `ferry status`, which needs this layout's maps). Counters are
/// only ever appended, so the index is the same in layouts 1 and 2.
fn counter(pin_dir: &std::path::Path, name: &str) -> u64 {
    let i = ferry_bpf::stats::NAMES.iter().position(|n| *n == name).expect("a known counter") as u32;
    let stats = MapHandle::from_pinned_path(pin_dir.join("ferry_stats")).unwrap();
    let per_cpu = stats.lookup_percpu(&i.to_ne_bytes(), MapFlags::ANY).unwrap().unwrap_or_default();
    per_cpu.iter().map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap())).sum()
}

/// A figure of the agent's "copied the live entries" line.
fn copied(log: &str, field: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("copied the live entries of the retired ferry_ct"))?;
    line.split(&format!("{field}=")).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

const NODE_PORTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: local, namespace: demo}
spec:
  type: NodePort
  clusterIP: "10.96.0.30"
  clusterIPs: ["10.96.0.30"]
  ipFamilies: [IPv4]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: demo, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
endpoints: [{addresses: ["10.244.0.21"], nodeName: node-a}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: demo}
spec:
  type: NodePort
  clusterIP: "10.96.0.31"
  clusterIPs: ["10.96.0.31"]
  ipFamilies: [IPv4]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: remote-1, namespace: demo, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
endpoints: [{addresses: ["10.244.1.31"], nodeName: node-b}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

/// The upgrade across the conntrack split, with the real layout-1 datapath.
///
/// node-a serves two NodePorts from a layout-1 datapath built from
/// `layout_1::LAYOUT_1_COMMIT`: `local` (its pod be21) and `remote` (be31 on node-b,
/// SNATed to node-a). An outside client holds connections on both, and a
/// second address opens new connections to `remote` without pause. A
/// layout-2 agent then starts: it copies the old table's flows into
/// `ferry_ct` / `ferry_ct_new` before switching the links. Every held
/// connection answers afterwards (none reset; retiring the table without a
/// copy resets the SNATed ones and re-balances the local ones, `ct_lost`),
/// no new connection failed, and the log counts the copied entries. Then a
/// newer layout pinned is refused and the flows still answer. Then the way
/// back, under a new stream: with no agent running, `ferry datapath
/// downgrade --to-layout 1` rebuilds `ferry_ct` as layout 1's LRU with the
/// flows of both tables, the layout-1 programs adopt it and take the links
/// over (as the previous release's agent does), this build's programs write
/// the flows they create meanwhile into it too and the command adds any it
/// lacks: every held connection answers, none reset, and no new connection
/// fails.
#[test]
fn nodeport_flows_of_a_layout_1_datapath_survive_the_upgrade_and_the_downgrade_back() {
    let mut lab = Lab::new("upg1", FERRY.as_ref()).expect("lab");
    let a = lab.add_node("node-a").unwrap();
    let b = lab.add_node("node-b").unwrap();
    let outside =
        lab.add_external("outside", &[ip("203.0.113.10"), ip("203.0.113.11"), ip("203.0.113.12")], a).unwrap();
    let outside = At::External(outside);
    for (node, name, addr) in [(a, "be21", "10.244.0.21"), (b, "be31", "10.244.1.31")] {
        let p = lab.add_pod(node, name, &[ip(addr)]).unwrap();
        let mut serve = ServeOpts::new(name, vec![Endpoint::tcp(SocketAddr::new(ip(addr), 8080))]);
        serve.echo_lines = true;
        serve.idle_timeout = Duration::from_secs(600);
        lab.serve_with(At::Pod(node, p), serve).unwrap();
    }
    lab.write_node_config(a, "datapath: bpf\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\n").unwrap();
    lab.write_manifests(a, NODE_PORTS).unwrap();
    let objects = build_layout_1(&lab.state);
    // The agent programs the service maps (their layout is the same in 1 and 2), then stops.
    lab.start_agent(a).unwrap();
    lab.kill_agent(a).unwrap();
    let pin_dir = lab.nodes[a].pin_dir.clone();
    serve_with_layout_1(&pin_dir, &objects, Conntrack::Fresh);
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(1));
    let old_ct = MapHandle::from_pinned_path(pin_dir.join("ferry_ct")).unwrap();
    assert_eq!(old_ct.map_type(), MapType::LruHash, "the layout-1 ferry_ct is one LRU");
    for (key, value) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "1024 65000")] {
        let out =
            lab.sb.command(lab.host(outside), "sysctl").args(["-qw", &format!("{key}={value}")]).output().unwrap();
        assert!(out.status.success(), "sysctl {key}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let node_ip = IpAddr::V4(lab.nodes[a].primary_v4);
    let mut held = Vec::new();
    for (port, server) in [(30080, "be21"), (30081, "be31")] {
        let mut opts = ConnectOpts::new(Endpoint::tcp(SocketAddr::new(node_ip, port)));
        opts.bind = Some(ip("203.0.113.10"));
        for i in 0..HELD_PER_PATH {
            let mut h = Held::open(&mut lab, outside, &opts, format!("held #{i} to {server} (NodePort {port})"));
            assert_eq!(next(&h.replies), Ok(server.to_string()), "{} did not open (layout-1 datapath)", h.what);
            assert_eq!(h.exchange(), Ok(server.to_string()), "{}: the handshake's ACK and one more exchange", h.what);
            held.push((server, h));
        }
    }
    let old_entries = old_ct.keys().count();
    assert!(old_entries >= 4 * HELD_PER_PATH, "the layout-1 ferry_ct holds {old_entries} entries");
    drop(old_ct);
    // The upgrade creates ferry_stats afresh (it grew in layout 5): the
    // incoming programs count their misses from zero.
    let lost_before = 0;

    let client = remote_stream(&mut lab, outside, node_ip, "203.0.113.11");

    // The upgrade, under that load.
    lab.start_agent(a).unwrap();
    let log = lab.agent_log(a);
    // ferry_ct changed in layout 2; the pass-through sets (layout 3) and the
    // DSR maps (layouts 4 and 6) were pinned by this build's first start,
    // before the layout-1 objects took over; ferry_stats grew in layout 5.
    assert!(
        log.contains("migrated_from_layout=1")
            && log.contains("retired=[ferry_addrs,ferry_ct,ferry_dsr,ferry_dsr6,ferry_peers,ferry_stats,ferry_tunnels,ferry_tunnels6]"),
        "the agent did not say it migrated layout 1 by retiring ferry_ct (and the pass-through sets and \
         DSR maps):\n{log}"
    );
    assert_held_answer(&mut held, "the upgrade");
    let late = copied(&log, "late").unwrap_or(0);
    stream_verdict(&mut lab, &client, lost_before, late, "the upgrade");

    // Then what the agent says it did (the figures of the install report).
    let (confirmed, not_copied) = (copied(&log, "confirmed"), copied(&log, "not_copied"));
    eprintln!("upgrade: {}", log.lines().rev().find(|l| l.contains("copied the live entries")).unwrap_or_default());
    assert!(
        confirmed.is_some_and(|c| c >= (4 * HELD_PER_PATH) as u64) && not_copied == Some(0),
        "the agent did not copy the {} entries of the held flows into ferry_ct:\n{log}",
        4 * HELD_PER_PATH
    );
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(ferry_bpf::layout::LAYOUT));
    let ct = MapHandle::from_pinned_path(pin_dir.join("ferry_ct")).unwrap();
    assert_eq!(ct.map_type(), MapType::Hash, "ferry_ct of layout 2 is a hash");
    drop(ct);
    assert!(!pin_dir.join("retired").exists(), "the retired ferry_ct was not removed");

    // A newer layout than the agent's: it refuses; the flows keep their entries.
    assert_refused(&mut lab, a);
    for (server, h) in &mut held {
        assert_eq!(h.exchange(), Ok(server.to_string()), "{} after the refused downgrade", h.what);
    }
    write_meta(&pin_dir, ferry_bpf::layout::LAYOUT);

    // The way back, under load: a new stream, then the conversion with no
    // agent running, then the layout-1 programs adopt it and switch the links.
    let client = remote_stream(&mut lab, outside, node_ip, "203.0.113.12");
    // The downgrade retires this layout's ferry_stats and the layout-1
    // objects create their own: they count their misses from zero.
    let lost_before = 0;
    let mut down = std::process::Command::new(FERRY)
        .args(["datapath", "downgrade", "--to-layout", "1", "--wait", "120", "--pin-dir"])
        .arg(&pin_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running ferry datapath downgrade");
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = down.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().take(100) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut said = Vec::new();
    // A guard against a hung command, not a timing assertion.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) {
        let waiting = line.starts_with("start the layout-1 agent now");
        said.push(line);
        if waiting {
            break;
        }
    }
    let converted = said.iter().find(|l| l.starts_with("converted ")).cloned();
    assert!(
        said.last().is_some_and(|l| l.starts_with("start the layout-1 agent now")),
        "the downgrade did not convert the datapath: {said:#?}\n{}",
        down.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default()
    );
    eprintln!("downgrade: {}", converted.as_deref().unwrap_or_default());
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(1));
    let ct = MapHandle::from_pinned_path(pin_dir.join("ferry_ct")).unwrap();
    assert_eq!(ct.map_type(), MapType::LruHash, "the converted ferry_ct is layout 1's one LRU");
    let ct_entries = ct.keys().count();
    drop(ct);
    assert!(!pin_dir.join("ferry_ct_new").exists(), "ferry_ct_new is still pinned after the downgrade");
    // The layout-2 programs still serve, from the tables they hold.
    for (server, h) in &mut held {
        assert_eq!(h.exchange(), Ok(server.to_string()), "{} after the conversion", h.what);
    }
    let at_conversion = client.observed().len();
    serve_with_layout_1(&pin_dir, &objects, Conntrack::Adopted);
    let at_switch = client.observed().len();
    let finished = down.wait_with_output().expect("waiting for ferry datapath downgrade");
    // Every line the command wrote: the reader ends at its stdout's end (it exited), so this
    // cannot miss a last line still on its way through the reader.
    let rest: Vec<String> = lines.iter().collect();
    let switched = rest.iter().find(|l| l.starts_with("the links switched")).cloned();
    assert!(
        finished.status.success() && switched.is_some(),
        "the downgrade did not see the links switch ({}): {rest:#?}\n{}",
        finished.status,
        String::from_utf8_lossy(&finished.stderr)
    );
    eprintln!("downgrade: {}", switched.as_deref().unwrap_or_default());
    assert_held_answer(&mut held, "the downgrade");
    let late = switched.as_deref().and_then(|l| figure(l, "late")).unwrap_or(0);
    eprintln!(
        "downgrade: {ct_entries} entries in the converted ferry_ct; {at_conversion} connections of the stream \
         made by the conversion, {at_switch} by the switch"
    );
    stream_verdict(&mut lab, &client, lost_before, late, "the downgrade");
    let converted = converted.unwrap_or_default();
    let mirrored = switched.as_deref().and_then(|l| figure(l, "mirrored")).unwrap_or(0);
    assert!(mirrored > 0, "this build's programs wrote no new flow into the rebuilt ferry_ct: {switched:?}");
    let copied = figure(&converted, "confirmed").unwrap_or(0) + figure(&converted, "unconfirmed").unwrap_or(0);
    assert!(
        copied >= (4 * HELD_PER_PATH) as u64 && figure(&converted, "not_copied") == Some(0),
        "the downgrade did not copy the {} entries of the held flows: {converted}",
        4 * HELD_PER_PATH
    );
    assert!(!pin_dir.join("downgrade").exists(), "the downgrade left its staging directory");
}

/// Every held connection answers, from its own server, after `what`.
fn assert_held_answer(held: &mut [(&str, Held)], what: &str) {
    let mut failed = Vec::new();
    for (server, h) in held.iter_mut() {
        match h.exchange() {
            Ok(s) if s == *server => {}
            other => failed.push(format!("{}: {other:?}", h.what)),
        }
    }
    let resets = failed.iter().filter(|f| f.contains("RESET") || f.contains("reset")).count();
    assert!(
        failed.is_empty(),
        "{} of {} held connections broke across {what} ({resets} reset): {failed:#?}",
        failed.len(),
        held.len()
    );
}

/// A few more connections of the stream `pid` after `what` switched the
/// links, then its verdict: not one failed, and no segment met a program
/// that did not know its flow (`ct_lost` 0). Every flow that existed before
/// the first copy was copied before the switch; a flow the outgoing programs
/// created after it is found by the incoming ones all the same: on an
/// upgrade they look it up in the retired table (`ct_adopted`), on a
/// downgrade the outgoing programs wrote it into the rebuilt one
/// (`ct_mirrored`). Without those, one new connection in 3,000-9,000 across a
/// switch failed in about half the runs (the server's reply, a few
/// milliseconds into the connection, met an incoming program before the next
/// copy: the node's stack reset the flow).
fn stream_verdict(lab: &mut Lab, client: &BackgroundClient, lost_before: u64, late: u64, what: &str) {
    let pin_dir = lab.nodes[0].pin_dir.clone(); // node-a, the one upgraded and downgraded
    let total = client.observed().len();
    let more = lab.wait_until(Duration::from_secs(20), |_| client.observed().len() >= total + 50);
    let _ = lab.sb.kill(client.pid);
    assert!(more, "the stream made no new connection after {what}");
    let obs = client.observed();
    let broken: Vec<(usize, &Observation)> = obs.iter().enumerate().filter(|(_, o)| o.reply().is_none()).collect();
    let lost = counter(&pin_dir, "ct_lost") - lost_before;
    eprintln!(
        "{what}: {} new connections to the remote NodePort across it, {} failed {broken:?}; ct_lost {lost}; \
         late flows {late}",
        obs.len(),
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "{} of {} new connections failed across {what} (late flows: {late}), e.g. {:?}",
        broken.len(),
        obs.len(),
        broken.first()
    );
    assert_eq!(lost, 0, "segments found no conntrack entry after {what} (late flows: {late})");
}

/// A figure `field=N` of a line the downgrade printed.
fn figure(line: &str, field: &str) -> Option<u64> {
    line.split(&format!(" {field}=")).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Makes the pinned layout newer than this build, starts the agent and checks
/// it refuses (and says what to do) without touching the datapath.
fn assert_refused(lab: &mut Lab, node: usize) {
    let pin_dir = lab.nodes[node].pin_dir.clone();
    lab.kill_agent(node).unwrap();
    let newer = ferry_bpf::layout::LAYOUT + 1;
    write_meta(&pin_dir, newer);
    let links_before: Vec<_> =
        std::fs::read_dir(pin_dir.join("links")).unwrap().flatten().map(|e| e.file_name()).collect();
    // The ready file says the first sync failed; the agent then exits by itself (bounded wait).
    let _ = lab.start_agent(node);
    let mut exited = false;
    for _ in 0..600 {
        if lab.agent_exited(node) {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(exited, "the agent kept running on a newer layout:\n{}", lab.agent_log(node));
    let log = lab.agent_log(node);
    assert!(
        log.contains(&format!("map layout {newer}")) && log.contains("ferry cleanup"),
        "the refusal does not say what was found and what to do:\n{log}"
    );
    assert!(!log.contains("needs root"), "the refusal blames permissions:\n{log}");
    eprintln!("the refusal: {}", log.lines().rev().find(|l| l.contains("newer than this ferry")).unwrap_or_default());
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(newer), "the refused datapath was modified");
    let links_after: Vec<_> =
        std::fs::read_dir(pin_dir.join("links")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(links_before, links_after);
}
