//! Every acceptance flow on the real datapaths: `ferry conformance
//! --datapath bpf|nftables` builds each case from network namespaces with a
//! real agent and sends real connections. Needs root; never skipped.
//!
//! The lab reports what it observed (masquerade from what changed on the way,
//! see `conformance::kernel`), so two kinds of result are expected on bpf and
//! named here, each with its reason; anything else fails:
//!
//! - not covered: a host flow from the node's primary address that socket-LB
//!   translated without touching the source; masqueraded or not look alike
//!   (the SNAT address is the source address), so the lab does not guess;
//! - failed: the node itself, bound to a LoadBalancer IP it holds, to that IP:
//!   kube-proxy masquerades it (the endpoint sees the node's address), ferry's
//!   socket-LB keeps the LB IP as the source. A real difference the old "any
//!   node address" reading hid; when the datapath masquerades such sockets,
//!   this list must shrink (the test checks the list exactly).

use std::process::Command;

/// Flows the bpf datapath does not pass yet, by label.
const KNOWN_BPF_FAILURES: &[&str] = &[
    "loadbalancer/source-ranges / packet sourced from the LB IP itself is allowed because the node IP is in range",
    "loadbalancer/source-ranges / packet sourced from LB IP #2 to LB IP #2 likewise allowed",
];

fn run(datapath: &str) -> (String, bool) {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/kube-proxy-flows.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--datapath", datapath, "--cases", cases])
        .output()
        .expect("running ferry conformance");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!stdout.is_empty(), "{datapath}: no output: {}", String::from_utf8_lossy(&out.stderr));
    (stdout, out.status.success())
}

#[test]
fn every_acceptance_flow_passes_on_the_nftables_datapath() {
    let (stdout, ok) = run("nftables");
    assert_eq!(stdout.lines().last(), Some("198 passed, 0 failed"), "nftables:\n{stdout}");
    assert!(ok);
}

#[test]
fn acceptance_flows_on_the_bpf_datapath_pass_or_are_known() {
    let (stdout, ok) = run("bpf");
    let failed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL    "))
        .map(|l| l.split(": expected ").next().unwrap())
        .collect();
    assert_eq!(failed, KNOWN_BPF_FAILURES, "bpf failures other than the known ones:\n{stdout}");
    let gaps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("not covered")).collect();
    assert!(
        gaps.iter().all(|l| l.contains("masquerading is not observable")),
        "not covered for another reason:\n{stdout}"
    );
    let summary =
        format!("{} passed, {} failed, {} not covered", 198 - failed.len() - gaps.len(), failed.len(), gaps.len());
    assert_eq!(stdout.lines().last(), Some(summary.as_str()), "bpf:\n{stdout}");
    assert_eq!(gaps.len(), 28, "host flows from the primary address (socket-LB keeps the source):\n{stdout}");
    assert!(!ok, "a run with failures or gaps exits non-zero");
}

/// `--lb-mode dsr|hybrid`: the same flows with DSR on, the DSR expectation
/// (the client's own address) checked where the model says DSR carries a
/// flow; every flow snat mode passes passes here too (the backend's node
/// takes the endpoint the balancing node chose: topology hints hold), and
/// the known bpf failures and gaps are those of snat mode.
fn acceptance_flows_in_lb_mode(mode: &str) {
    acceptance_flows_with(&["--lb-mode", mode]);
}

/// The bpf datapath run with `args` (`--lb-mode`, `--acceleration`) passes
/// exactly what the plain snat run passes.
fn acceptance_flows_with(args: &[&str]) {
    let mode = args.join(" ");
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/kube-proxy-flows.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--datapath", "bpf", "--cases", cases])
        .args(args)
        .output()
        .expect("running ferry conformance");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let failed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL    "))
        .map(|l| l.split(": expected ").next().unwrap())
        .collect();
    assert_eq!(failed, KNOWN_BPF_FAILURES, "{mode}: failures other than the known ones:\n{stdout}");
    let gaps = stdout.lines().filter(|l| l.starts_with("not covered")).count();
    assert_eq!(gaps, 28, "{mode}: gaps other than snat mode's:\n{stdout}");
    assert_eq!(stdout.lines().last(), Some("168 passed, 2 failed, 28 not covered"), "{mode}:\n{stdout}");
}

#[test]
fn acceptance_flows_on_the_bpf_datapath_in_dsr_mode() {
    acceptance_flows_in_lb_mode("dsr");
}

#[test]
fn acceptance_flows_on_the_bpf_datapath_in_hybrid_mode() {
    acceptance_flows_in_lb_mode("hybrid");
}

/// `--acceleration native`: the node under test's uplink runs the XDP
/// program in driver mode (what it takes and what it passes to tc: README,
/// XDP acceleration); every flow comes out as without it, in snat and in
/// dsr mode.
#[test]
fn acceleration_flows_on_the_bpf_datapath_with_xdp_native() {
    acceptance_flows_with(&["--acceleration", "native"]);
}

#[test]
fn acceleration_flows_on_the_bpf_datapath_with_xdp_native_in_dsr_mode() {
    acceptance_flows_with(&["--acceleration", "native", "--lb-mode", "dsr"]);
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
