//! Every acceptance flow on the real eBPF datapath: `ferry conformance
//! --datapath bpf` builds each case from network namespaces with a real
//! agent and sends real connections. Needs root; never skipped.

use std::process::Command;

#[test]
fn every_acceptance_flow_passes_on_the_bpf_datapath() {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/kube-proxy-flows.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--datapath", "bpf", "--cases", cases])
        .output()
        .expect("running ferry conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert_eq!(last, "198 passed, 0 failed", "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
}
