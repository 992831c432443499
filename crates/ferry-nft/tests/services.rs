//! The nftables service datapath as text: what a first sync writes, and that
//! a later change rewrites only what it must (one endpoint change touches
//! only that service's chains and map elements). The kernel side is
//! `ferry conformance --datapath nftables` (crates/ferry/tests/conformance_kernel.rs).

use ferry_model::{ClusterState, IpFamily, NodeConfig, Plan, build_plan};
use ferry_nft::services::Renderer;
use std::path::Path;

fn state(web_backends: &[&str]) -> ClusterState {
    let eps: Vec<String> = web_backends.iter().map(|b| format!("- {{addresses: [{b}], nodeName: node-a}}")).collect();
    let yaml = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
{}
ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: kube-system}}
spec:
  clusterIP: 10.96.0.53
  ports: [{{name: dns, port: 53, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
endpoints: [{{addresses: [10.244.0.53], nodeName: node-a}}]
ports: [{{name: dns, port: 53, protocol: UDP}}]
"#,
        eps.join("\n")
    );
    let mut out = ferry_k8s::manifests::LoadedManifests::default();
    ferry_k8s::manifests::load_text(Path::new("cluster.yaml"), &yaml, &mut out);
    assert!(out.problems.iter().all(|p| !p.skipped), "{:?}", out.problems);
    out.state
}

fn node() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ip_families: vec![IpFamily::V4],
        local_detector: ferry_model::LocalDetector::ClusterCidr,
        ..NodeConfig::default()
    }
}

fn plan(backends: &[&str]) -> Plan {
    build_plan(&state(backends), &node())
}

/// Syncs `renderer` to `new` (a diff against `old` when given) and returns the IPv4 script.
fn sync(renderer: &mut Renderer, old: Option<&Plan>, new: &Plan) -> String {
    let diff = old.map(|o| Plan::diff(o, new));
    let mut scripts = renderer.sync(new, diff.as_ref());
    let (family, script, table) = scripts.pop().expect("one family changed");
    assert!(scripts.is_empty());
    assert_eq!(family, IpFamily::V4);
    renderer.applied(family, table);
    script
}

#[test]
fn the_first_sync_replaces_the_table_whole_in_one_script() {
    let mut r = Renderer::default();
    let script = sync(&mut r, None, &plan(&["10.244.0.21", "10.244.0.22"]));
    // Whatever was there goes, in the same transaction.
    assert!(script.starts_with("add table ip ferry\ndelete table ip ferry\nadd table ip ferry\n"), "{script}");
    for needle in [
        "type nat hook prerouting",
        "add element ip ferry service-ips { 10.96.0.10 . tcp . 80 : goto svc-",
        "10.96.0.53 . udp . 53 : goto svc-",
        "dnat to 10.244.0.21:8080",
        "dnat to 10.244.0.22:8080",
        // Two endpoints: a cascade, as kube-proxy's iptables statistic rules (no per-service set).
        "numgen random mod 2 == 0 goto ep-",
        "masquerade fully-random",
    ] {
        assert!(script.contains(needle), "missing {needle:?} in\n{script}");
    }
}

#[test]
fn one_endpoint_change_touches_only_that_service() {
    let mut r = Renderer::default();
    let before = plan(&["10.244.0.21", "10.244.0.22"]);
    sync(&mut r, None, &before);
    let after = plan(&["10.244.0.21", "10.244.0.23"]);
    let script = sync(&mut r, Some(&before), &after);
    let changes: Vec<&str> = script.lines().skip(1).collect(); // the first line only ensures the table exists
    assert!(!changes.is_empty());
    for line in &changes {
        assert!(line.contains("demo/web"), "a line outside demo/web's chains: {line:?}\n{script}");
        assert!(!line.contains("table ip ferry\n") && !line.starts_with("delete table"), "{line:?}");
    }
    assert!(script.contains("dnat to 10.244.0.23:8080"), "{script}");
    assert!(script.contains("delete chain ip ferry ep-") && script.contains("10.244.0.22-8080"), "{script}");
    // Nothing of kube-system/dns was rewritten.
    assert!(!script.contains("kube-system"), "{script}");
}

#[test]
fn an_unchanged_plan_writes_nothing() {
    let mut r = Renderer::default();
    let p = plan(&["10.244.0.21"]);
    sync(&mut r, None, &p);
    let again = plan(&["10.244.0.21"]);
    assert!(r.sync(&again, Some(&Plan::diff(&p, &again))).is_empty());
}

#[test]
fn losing_every_endpoint_rejects_instead_of_forwarding() {
    let mut r = Renderer::default();
    let before = plan(&["10.244.0.21"]);
    sync(&mut r, None, &before);
    let after = plan(&[]);
    let script = sync(&mut r, Some(&before), &after);
    assert!(
        script.contains("add element ip ferry no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }"),
        "{script}"
    );
    assert!(!script.contains("dnat to"), "{script}");
}

/// The table a fresh renderer programs for `p` (a full sync).
fn fresh_table(p: &Plan) -> ferry_nft::ruleset::Table {
    let mut r = Renderer::default();
    sync(&mut r, None, p);
    r.programmed[&IpFamily::V4].clone()
}

#[test]
fn after_incremental_syncs_the_programmed_table_is_what_a_full_sync_programs() {
    let steps: [&[&str]; 5] = [
        &["10.244.0.21", "10.244.0.22"],
        &["10.244.0.21", "10.244.0.23"],
        &["10.244.0.21", "10.244.0.23", "10.244.0.24"],
        &[],
        &["10.244.0.25"],
    ];
    let mut r = Renderer::default();
    let mut old = plan(steps[0]);
    sync(&mut r, None, &old);
    for step in &steps[1..] {
        let new = plan(step);
        sync(&mut r, Some(&old), &new);
        assert_eq!(r.programmed[&IpFamily::V4], fresh_table(&new), "after the step to {step:?}");
        old = new;
    }
}

#[test]
fn many_endpoints_are_picked_through_a_named_map_not_a_cascade() {
    let many: Vec<String> = (0..=ferry_nft::services::CASCADE_MAX).map(|i| format!("10.244.1.{}", i + 1)).collect();
    let refs: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
    let mut r = Renderer::default();
    let p = plan(&refs);
    let script = sync(&mut r, None, &p);
    let n = many.len();
    assert!(script.contains(&format!("numgen random mod {n} vmap @pick-")), "{script}");
    assert!(script.contains("typeof numgen random mod 2 : verdict;"), "{script}");
    assert!(!script.contains(&format!("numgen random mod {n} == 0")), "{script}");
    // Back to two endpoints: the map goes, the cascade comes back, in one transition.
    let two = plan(&["10.244.0.21", "10.244.0.22"]);
    let script = sync(&mut r, Some(&p), &two);
    assert!(script.contains("delete map ip ferry pick-"), "{script}");
    assert!(script.contains("numgen random mod 2 == 0 goto ep-"), "{script}");
    assert_eq!(r.programmed[&IpFamily::V4], fresh_table(&two));
}

#[test]
fn pod_traffic_is_matched_through_one_named_set() {
    let mut r = Renderer::default();
    let script = sync(&mut r, None, &plan(&["10.244.0.21"]));
    assert!(script.contains("add set ip ferry pod-ranges { type ipv4_addr; flags interval; }"), "{script}");
    assert!(script.contains("add element ip ferry pod-ranges { 10.244.0.0/16 }"), "{script}");
    // Pods are not masqueraded, everyone else is: one mark rule, then the endpoint is picked in the same chain.
    assert!(
        script
            .contains("svc-bba7a516-int-demo/web/tcp/http ip saddr != @pod-ranges meta mark set meta mark or 0x4000\n"),
        "{script}"
    );
    // No anonymous set in any service chain (each would cost the kernel a walk of the whole transaction).
    for line in
        script.lines().filter(|l| l.starts_with("add rule ip ferry svc-") || l.starts_with("add rule ip ferry ep-"))
    {
        assert!(!line.contains('{'), "an anonymous set or map in a service rule: {line}");
    }
}

/// Names that never passed an API server (the model does not check them):
/// chain names carry a hash and a sanitized, capped readable part, never the
/// user's text, so one such Service cannot break the `nft -f` transaction.
#[test]
fn hostile_names_never_reach_the_ruleset() {
    let mut state = state(&["10.244.0.5"]);
    let web = state.services.values().next().unwrap().clone();
    let slice = state.endpoint_slices.values().next().unwrap().clone();
    for (i, name) in ["a b; flush ruleset", "caf\u{e9}\u{1F600}", &"x".repeat(5000), "q\"uote}{"].iter().enumerate() {
        let mut svc = web.clone();
        svc.metadata.name = Some(name.to_string());
        svc.spec.as_mut().unwrap().cluster_ip = Some(format!("10.96.1.{}", i + 1));
        svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].name = Some(format!("{name}-port"));
        state.services.insert(ferry_model::ObjectKey::of_meta(&svc.metadata), svc.clone());
        let mut sl = slice.clone();
        sl.metadata.name = Some(format!("hostile-{i}"));
        sl.metadata.labels.as_mut().unwrap().insert("kubernetes.io/service-name".into(), name.to_string());
        sl.ports.as_mut().unwrap()[0].name = Some(format!("{name}-port"));
        state.endpoint_slices.insert(ferry_model::ObjectKey::of_meta(&sl.metadata), sl);
    }
    let plan = build_plan(&state, &node());
    assert_eq!(plan.services.len(), 6, "{:?}", plan.problems);
    for sp in plan.services.values() {
        let parts = ferry_nft::services::render_service(sp, &plan);
        for chain in parts.chains.keys() {
            assert!(chain.len() <= 256, "{} bytes: {chain}", chain.len());
            assert!(
                chain.chars().all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c)),
                "chain name with user text: {chain:?}"
            );
        }
    }
}
