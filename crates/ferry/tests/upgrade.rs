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

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectOpts, Endpoint, Observation, ServeOpts};
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

fn write_meta(pin_dir: &std::path::Path, layout: u32) {
    let meta = MapHandle::from_pinned_path(pin_dir.join("ferry_meta")).expect("ferry_meta");
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&layout.to_ne_bytes());
    meta.update(&0u32.to_ne_bytes(), &v, MapFlags::ANY).unwrap();
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
    // Retired: ferry_frags (its shape changed) and the conntrack tables, which
    // changed in layout 2 (confirmed flows in a hash, unconfirmed ones in ferry_ct_new).
    let retired: std::collections::BTreeSet<&str> = log
        .lines()
        .rev()
        .find_map(|l| l.split("retired=[").nth(1))
        .and_then(|r| r.split(']').next())
        .map(|r| r.split(',').collect())
        .unwrap_or_default();
    assert!(
        log.contains("migrated_from_layout=0")
            && retired == ["ferry_ct", "ferry_ct_new", "ferry_frags"].into_iter().collect(),
        "the agent did not say it migrated layout 0 (retiring ferry_frags and the conntrack tables only):\n{log}"
    );
    assert_eq!(ferry_bpf::install::pinned_layout(&pin_dir), Some(ferry_bpf::layout::LAYOUT));
    let frags = MapHandle::from_pinned_path(pin_dir.join("ferry_frags")).unwrap();
    assert_eq!(frags.value_size(), value_size, "ferry_frags was not re-created in this build's layout");
    assert!(!pin_dir.join("retired").exists(), "the retired maps were not removed");
    assert_eq!(exchange(&mut stdin, &replies), Ok("be21".into()), "the held connection after the upgrade");
    assert_eq!(new_connection(&lab), "be21", "a new connection after the upgrade");

    // A downgrade: the pinned datapath is of a newer layout than this build knows.
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
    assert_eq!(exchange(&mut stdin, &replies), Ok("be21".into()), "the held connection after the refusal");
    assert_eq!(new_connection(&lab), "be21", "a new connection after the refusal");
}
