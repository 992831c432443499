//! `ferry run`'s contract with scripts and the scenario runner: the ready file
//! is rewritten after every successful sync as `synced <generation>
//! <input_unix_nanos>`, and SIGHUP makes the agent resync and rewrite it.
//! Runs a real agent in a lab of network namespaces; needs root; never skipped.

use ferry::lab::Lab;
use std::time::{Duration, SystemTime};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn manifests(cluster_ip: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: 80}}]
"#
    )
}

/// (generation, input time in ns since the epoch) of the ready file, if it says `synced`.
fn synced(lab: &Lab) -> Option<(u64, u128)> {
    let text = std::fs::read_to_string(lab.ready_file(0)).ok()?;
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["synced", g, t] => Some((g.parse().ok()?, t.parse().ok()?)),
        _ => None,
    }
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()
}

/// Waits (bounded, so a broken agent cannot hang the test) for a sync whose input was read after `after`.
fn wait_for_sync_after(lab: &Lab, after: u128, what: &str) -> (u64, u128) {
    let mut last = None;
    lab.wait_until(Duration::from_secs(60), |lab| {
        last = synced(lab);
        last.is_some_and(|(_, t)| t > after)
    });
    last.filter(|(_, t)| *t > after).unwrap_or_else(|| {
        panic!("no sync of {what} was reported (ready file: {last:?})\nagent log:\n{}", lab.agent_log(0))
    })
}

fn ready_file_follows_every_sync(datapath: &str) {
    let mut lab = Lab::new("ready", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.write_node_config(node, &format!("datapath: {datapath}\nserviceCIDRs: [10.96.0.0/16]\n")).unwrap();
    lab.write_manifests(node, &manifests("10.96.0.10")).unwrap();
    let start = nanos(SystemTime::now());
    lab.start_agent(node).unwrap();
    let (g1, t1) = wait_for_sync_after(&lab, start, "the first sync");
    assert!(g1 >= 1);

    let before = nanos(SystemTime::now());
    lab.write_manifests(node, &manifests("10.96.0.11")).unwrap();
    let (g2, t2) = wait_for_sync_after(&lab, before, "a manifest change");
    assert!(g2 > g1 && t2 > t1, "generation and input time grow: {g1} {t1} -> {g2} {t2}");

    let before = nanos(SystemTime::now());
    lab.hangup_agent(node).unwrap();
    let (g3, _) = wait_for_sync_after(&lab, before, "SIGHUP (resync)");
    assert!(g3 > g2, "a resync is a new generation: {g2} -> {g3}");
}

#[test]
fn ready_file_follows_every_sync_on_the_bpf_datapath() {
    ready_file_follows_every_sync("bpf");
}

#[test]
fn ready_file_follows_every_sync_on_the_nftables_datapath() {
    ready_file_follows_every_sync("nftables");
}
