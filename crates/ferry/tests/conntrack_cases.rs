//! Every conntrack cleanup case on the real kernel: `ferry conformance
//! --conntrack-cases` creates each case's entries in a network namespace of
//! its own, runs the conntrack reconciler and checks what is left. Needs root
//! and conntrack-tools; never skipped.

use std::process::Command;

#[test]
fn every_conntrack_cleanup_case_passes_on_the_kernel() {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/conntrack-cleanup-cases.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--conntrack-cases", cases])
        .output()
        .expect("running ferry conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    // One check per entry plus one per case (its deleted count): 72 + 1, 2 + 1, 4 + 1 (the
    // deleted service), and the scale case at the default --scale of 100,000 per group:
    // 100,002 + 1.
    assert_eq!(last, "100084 passed, 0 failed", "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
}

#[test]
fn a_scale_case_left_out_is_reported_as_not_run_and_fails_the_run() {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/conntrack-cleanup-cases.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--conntrack-cases", cases, "--scale", "0", "--only", "at scale"])
        .output()
        .expect("running ferry conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("not run reconcile at scale"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("0 passed, 0 failed, 1 not run"), "{stdout}");
    assert!(!out.status.success(), "a case that did not run is not a pass");
}

#[test]
fn a_wrong_expectation_is_caught() {
    // The first case with its first entry's expectation flipped: the runner must see the kernel
    // disagree, or it proves nothing.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/conntrack-cleanup-cases.json");
    let mut file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let first = &mut file["cases"][0]["entries"][0];
    assert_eq!(first["expect"], "delete");
    first["expect"] = "keep".into();
    let mutated = std::env::temp_dir().join(format!("ferry-ct-cases-{}.json", std::process::id()));
    std::fs::write(&mutated, serde_json::to_string(&file).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--conntrack-cases"])
        .arg(&mutated)
        .args(["--only", "one serving and one non-serving"])
        .output()
        .expect("running ferry conformance");
    std::fs::remove_file(&mutated).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL    reconcile: service with one serving and one non-serving endpoint / UDP 172.30.1.1:8000 <- 10.240.0.4:8080: expected keep, got deleted"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("72 passed, 1 failed"), "{stdout}");
    assert!(!out.status.success());
}

#[test]
fn the_deleted_service_case_needs_its_deleted_services() {
    // Without `deletedServices` the runner knows nothing of the deleted Service and must see the
    // kernel keep its flows: proof that the kernel run reads them.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../acceptance/conntrack-cleanup-cases.json");
    let mut file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = file["cases"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c.get("deletedServices").is_some())
        .expect("the file has a case with deletedServices");
    case.as_object_mut().unwrap().remove("deletedServices");
    let name = case["name"].as_str().unwrap().to_string();
    let mutated = std::env::temp_dir().join(format!("ferry-ct-cases-deleted-{}.json", std::process::id()));
    std::fs::write(&mutated, serde_json::to_string(&file).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["conformance", "--conntrack-cases"])
        .arg(&mutated)
        .args(["--only", &name])
        .output()
        .expect("running ferry conformance");
    std::fs::remove_file(&mutated).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("FAIL    {name} / UDP 172.30.9.9:514 <- 10.240.3.7:5140: expected delete, got kept")),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("2 passed, 3 failed"), "{stdout}");
    assert!(!out.status.success());
}
