//! Every acceptance flow on the real datapaths: `ferry conformance
//! --datapath bpf|nftables` builds each case from network namespaces with a
//! real agent and sends real connections. Needs root; never skipped.

use std::process::Command;

fn every_flow_passes_on(datapath: &str) {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/kube-proxy-flows.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--datapath", datapath, "--cases", cases])
        .output()
        .expect("running ferry conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert_eq!(last, "198 passed, 0 failed", "{datapath}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
}

#[test]
fn every_acceptance_flow_passes_on_the_bpf_datapath() {
    every_flow_passes_on("bpf");
}

#[test]
fn every_acceptance_flow_passes_on_the_nftables_datapath() {
    every_flow_passes_on("nftables");
}

/// ferry's own isolation cases (issue 12): the ClusterIP owner keeps its flow
/// whichever Service sorts first, special ExternalIPs are ignored, and an
/// over-limit Service is refused while the one next to it is served.
fn every_isolation_flow_passes_on(datapath: &str) {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/ferry-isolation-flows.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--datapath", datapath, "--cases", cases])
        .output()
        .expect("running ferry conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert_eq!(last, "23 passed, 0 failed", "{datapath}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
}

#[test]
fn every_isolation_flow_passes_on_the_bpf_datapath() {
    every_isolation_flow_passes_on("bpf");
}

#[test]
fn every_isolation_flow_passes_on_the_nftables_datapath() {
    every_isolation_flow_passes_on("nftables");
}
