//! Every scenario (Service changes over time) on the model and on the real
//! datapaths: `ferry conformance --scenarios FILE --datapath model|bpf|nftables`
//! runs one agent per scenario in a lab of network namespaces, hands it each
//! step's changes, and checks every flow and every held connection; on bpf
//! also in `--lb-mode dsr` and `hybrid` (Direct Server Return) and with
//! `--acceleration native` (XDP on the node's uplink). Needs
//! root; never skipped. The lab names everything `ferry-*` and removes it
//! when the run ends (or, after a crash, at the start of the next run).

use std::process::Command;

/// The shared scenarios (a copy of `../shared/acceptance`, kept identical).
const KUBE_PROXY: &str = "kube-proxy-scenarios.json";
/// ferry's own scenarios, including regressions of known Programmer bugs.
const FERRY: &str = "ferry-scenarios.json";

/// Runs one scenario file and asserts that every check passed and none was left uncovered.
fn every_check_passes(file: &str, datapath: &str) {
    every_check_passes_in(file, datapath, "snat");
}

/// The same in a `loadBalancing.mode`; returns the output (every check listed).
fn every_check_passes_in(file: &str, datapath: &str, lb_mode: &str) -> String {
    every_check_passes_with(file, datapath, &["--lb-mode", lb_mode])
}

/// The same with more `ferry conformance` flags; returns the output (every check listed).
fn every_check_passes_with(file: &str, datapath: &str, flags: &[&str]) -> String {
    let path = format!("{}/../../acceptance/{file}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--verbose", "--datapath", datapath])
        .args(flags)
        .args(["--scenarios", &path])
        .output()
        .expect("running ferry conformance --scenarios");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context =
        format!("{file} on {datapath} ({}):\n{stdout}\n{}", flags.join(" "), String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    let passed: usize = last
        .strip_suffix(" passed, 0 failed")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected `N passed, 0 failed`, got {last:?}\n{context}"));
    assert!(passed > 0, "no check ran\n{context}");
    assert!(!stdout.contains("not covered"), "some checks were not covered\n{context}");
    assert!(out.status.success(), "{context}");
    stdout.into_owned()
}

/// In dsr and hybrid every check passes too, and the outside clients'
/// connections to endpoints on the other node are checked for DSR's
/// observation (the endpoint saw the client's own address): the scenarios
/// with such flows (a NodePort renumbered under a held connection, an
/// endpoint moving between nodes) carry them by DSR.
fn ferry_scenarios_pass_in(lb_mode: &str) {
    let out = every_check_passes_in(FERRY, "bpf", lb_mode);
    let dsr: Vec<&str> = out.lines().filter(|l| l.contains("[DSR: the endpoint sees the client's address]")).collect();
    assert!(!dsr.is_empty(), "{lb_mode}: no flow was carried by DSR:\n{out}");
    assert!(dsr.iter().all(|l| l.starts_with("ok ")), "{lb_mode}:\n{}", dsr.join("\n"));
}

#[test]
fn ferry_scenarios_pass_on_the_bpf_datapath_in_dsr_mode() {
    ferry_scenarios_pass_in("dsr");
}

#[test]
fn ferry_scenarios_pass_on_the_bpf_datapath_in_hybrid_mode() {
    ferry_scenarios_pass_in("hybrid");
}

#[test]
fn kube_proxy_scenarios_pass_on_the_bpf_datapath_in_dsr_mode() {
    every_check_passes_in(KUBE_PROXY, "bpf", "dsr");
}

/// With XDP on the node under test's uplink every check passes as on tc, and
/// each scenario checks that ferry's XDP program is attached in driver mode
/// after the agent starts and after every restart (listed as their own checks).
fn scenarios_pass_with_xdp(file: &str, lb_mode: &str) {
    let out = every_check_passes_with(file, "bpf", &["--acceleration", "native", "--lb-mode", lb_mode]);
    let xdp: Vec<&str> = out.lines().filter(|l| l.contains("XDP in driver mode on the node's uplink")).collect();
    let scenarios = out.lines().filter(|l| l.contains("after the agent's start")).count();
    assert!(scenarios > 0 && xdp.iter().all(|l| l.starts_with("ok ")), "{file} ({lb_mode}):\n{}", xdp.join("\n"));
}

#[test]
fn ferry_scenarios_pass_on_the_bpf_datapath_with_xdp_native() {
    scenarios_pass_with_xdp(FERRY, "snat");
}

#[test]
fn ferry_scenarios_pass_on_the_bpf_datapath_with_xdp_native_in_dsr_mode() {
    scenarios_pass_with_xdp(FERRY, "dsr");
}

/// The scenario whose outside client holds a connection to another node's
/// endpoint across an agent restart is carried at XDP, not only passed by
/// it: the node under test's counters (printed by the runner's
/// FERRY_CONFORMANCE_AGENT_LOG dump) show XDP balancing new flows and
/// forwarding (snat) or tunnelling (dsr) their packets.
#[test]
fn an_outside_clients_scenario_is_carried_at_xdp() {
    let path = format!("{}/../../acceptance/{FERRY}", env!("CARGO_MANIFEST_DIR"));
    for (lb_mode, sent) in [("snat", "xdp_forward="), ("dsr", "xdp_dsr_encap=")] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["conformance", "--datapath", "bpf", "--acceleration", "native", "--lb-mode", lb_mode])
            .args(["--only", "another node's endpoint", "--scenarios", &path])
            .env("FERRY_CONFORMANCE_AGENT_LOG", "1")
            .output()
            .expect("running ferry conformance --scenarios");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.ends_with(" passed, 0 failed\n"), "{lb_mode}:\n{stdout}\n{stderr}");
        let counters = stderr.lines().find(|l| l.starts_with("--- datapath counters of the node under test:"));
        let counters = counters.unwrap_or_else(|| panic!("{lb_mode}: no counter dump:\n{stderr}"));
        assert!(counters.contains("xdp_new_flow=") && counters.contains(sent), "{lb_mode}: {counters}");
    }
}

#[test]
fn kube_proxy_scenarios_pass_on_the_bpf_datapath_with_xdp_native() {
    scenarios_pass_with_xdp(KUBE_PROXY, "snat");
}

#[test]
fn kube_proxy_scenarios_pass_on_the_model() {
    every_check_passes(KUBE_PROXY, "model");
}

#[test]
fn ferry_scenarios_pass_on_the_model() {
    every_check_passes(FERRY, "model");
}

#[test]
fn kube_proxy_scenarios_pass_on_the_bpf_datapath() {
    every_check_passes(KUBE_PROXY, "bpf");
}

#[test]
fn ferry_scenarios_pass_on_the_bpf_datapath() {
    every_check_passes(FERRY, "bpf");
}

#[test]
fn kube_proxy_scenarios_pass_on_the_nftables_datapath() {
    every_check_passes(KUBE_PROXY, "nftables");
}

#[test]
fn ferry_scenarios_pass_on_the_nftables_datapath() {
    every_check_passes(FERRY, "nftables");
}
