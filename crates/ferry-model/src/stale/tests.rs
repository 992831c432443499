//! Table tests of the stale-flow rule on hand-written cases, and of the case
//! format (the acceptance file's cases run in `tests/stale_cases.rs`).

use super::cases::{CaseFileError, ConntrackCase, ConntrackCaseFile, NodeAddresses};
use super::{StaleFlowIndex, StaleReason};
use crate::protocol::Protocol::{self, Sctp, Tcp, Udp};
use std::net::IpAddr;

fn index(services: &str, slices: &str) -> StaleFlowIndex {
    let json = format!(r#"{{"name": "t", "services": {services}, "endpointSlices": {slices}}}"#);
    let case: ConntrackCase = serde_json::from_str(&json).expect("test case parses");
    StaleFlowIndex::from_plan(&case.plan(NodeAddresses::default()).expect("plan"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const DNS: &str = r#"[{"namespace": "kube-system", "name": "dns", "type": "LoadBalancer", "clusterIP": "10.96.0.10",
    "externalIPs": ["192.0.2.10"], "loadBalancerIPs": ["203.0.113.10"],
    "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
              {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30054}]}]"#;

fn dns_slice(endpoints: &str) -> String {
    format!(
        r#"[{{"name": "dns-1", "service": "kube-system/dns", "addressType": "IPv4", "endpoints": {endpoints},
        "ports": [{{"name": "dns", "port": 5353, "protocol": "UDP"}}, {{"name": "dns-tcp", "port": 5353, "protocol": "TCP"}}]}}]"#
    )
}

/// (protocol, orig dst, orig dst port, reply src, reply src port, stale?)
type Row = (Protocol, &'static str, u16, &'static str, u16, Option<StaleReason>);

fn check(index: &StaleFlowIndex, rows: &[Row]) {
    for &(proto, dst, dport, rsrc, rport, want) in rows {
        let got = index.stale_reason(proto, ip(dst), dport, ip(rsrc), rport);
        assert_eq!(got, want, "{proto} {dst}:{dport} <- {rsrc}:{rport}");
        assert_eq!(index.is_stale(proto, ip(dst), dport, ip(rsrc), rport), want.is_some());
    }
}

#[test]
fn udp_frontends_keep_serving_backends_and_drop_the_rest() {
    let idx = index(DNS, &dns_slice(r#"[{"ip": "10.244.1.5"}, {"ip": "10.244.2.6", "serving": false}]"#));
    use StaleReason::*;
    check(
        &idx,
        &[
            (Udp, "10.96.0.10", 53, "10.244.1.5", 5353, None),
            (Udp, "192.0.2.10", 53, "10.244.1.5", 5353, None),
            (Udp, "203.0.113.10", 53, "10.244.1.5", 5353, None),
            // Not serving, gone, or the right IP with an old port.
            (Udp, "10.96.0.10", 53, "10.244.2.6", 5353, Some(Frontend)),
            (Udp, "10.96.0.10", 53, "10.244.9.9", 5353, Some(Frontend)),
            (Udp, "203.0.113.10", 53, "10.244.1.5", 53, Some(Frontend)),
            // Never DNATed: the reply comes from the ClusterIP itself.
            (Udp, "10.96.0.10", 53, "10.96.0.10", 53, Some(Frontend)),
            // NodePort on any address, including ones the node does not own.
            (Udp, "198.18.0.1", 30053, "10.244.2.6", 5353, Some(NodePort)),
            (Udp, "1.1.1.1", 30053, "10.244.2.6", 5353, Some(NodePort)),
            (Udp, "1.1.1.1", 30053, "10.244.1.5", 5353, None),
            // Other ports, other addresses, other protocols: not ours.
            (Udp, "10.96.0.10", 54, "10.244.9.9", 5353, None),
            (Udp, "10.96.0.11", 53, "10.244.9.9", 5353, None),
            (Tcp, "10.96.0.10", 53, "10.244.9.9", 5353, None),
            (Tcp, "1.1.1.1", 30054, "10.244.9.9", 5353, None),
            (Sctp, "10.96.0.10", 53, "10.244.9.9", 5353, None),
        ],
    );
}

#[test]
fn a_service_without_serving_endpoints_loses_every_udp_flow_to_its_frontends() {
    // kubernetes/kubernetes#139629: the allowed set is empty, so nothing to a frontend is kept.
    use StaleReason::*;
    for idx in [index(DNS, &dns_slice(r#"[{"ip": "10.244.2.6", "serving": false}]"#)), index(DNS, "[]")] {
        assert!(!idx.is_empty());
        assert!(idx.has_family(crate::addr::IpFamily::V4));
        check(
            &idx,
            &[
                (Udp, "10.96.0.10", 53, "10.244.2.6", 5353, Some(Frontend)),
                (Udp, "10.96.0.10", 53, "10.244.9.9", 5353, Some(Frontend)),
                (Udp, "192.0.2.10", 53, "10.244.2.6", 5353, Some(Frontend)),
                (Udp, "203.0.113.10", 53, "10.244.2.6", 5353, Some(Frontend)),
                (Udp, "10.96.0.10", 53, "10.96.0.10", 53, Some(Frontend)),
                (Udp, "1.1.1.1", 30053, "10.244.9.9", 5353, Some(NodePort)),
                // Still only UDP, and only the service's frontends.
                (Tcp, "10.96.0.10", 53, "10.244.2.6", 5353, None),
                (Tcp, "1.1.1.1", 30054, "10.244.2.6", 5353, None),
                (Udp, "10.96.0.10", 54, "10.244.2.6", 5353, None),
                (Udp, "10.96.0.11", 53, "10.244.2.6", 5353, None),
            ],
        );
    }
}

fn case(json: &str) -> ConntrackCase {
    serde_json::from_str(json).expect("test case parses")
}

const GONE: &str = r#"{"namespace": "ns", "name": "gone", "type": "LoadBalancer", "clusterIP": "10.96.0.40",
    "externalIPs": ["192.0.2.40"], "loadBalancerIPs": ["203.0.113.40"],
    "ports": [{"name": "u", "port": 53, "protocol": "UDP", "nodePort": 30040},
              {"name": "t", "port": 53, "protocol": "TCP", "nodePort": 30041}]}"#;

#[test]
fn a_deleted_udp_service_loses_the_flows_to_every_frontend_it_had() {
    // kubernetes/kubernetes#141371: as a service with no serving endpoint, for the frontends it had.
    let c = case(&format!(r#"{{"name": "t", "services": [], "deletedServices": [{GONE}]}}"#));
    let nodes = NodeAddresses::default();
    let deleted = c.deleted_service_ports(nodes).unwrap();
    assert_eq!(deleted.len(), 2, "the UDP and the TCP port");
    let plan = c.plan(nodes).unwrap();
    assert!(plan.services.is_empty());
    assert!(StaleFlowIndex::from_plan(&plan).is_empty(), "without the deleted ports nothing is known");
    let idx = StaleFlowIndex::new(&plan, &deleted);
    use StaleReason::*;
    check(
        &idx,
        &[
            (Udp, "10.96.0.40", 53, "10.244.1.5", 53, Some(Frontend)),
            (Udp, "192.0.2.40", 53, "10.244.1.5", 53, Some(Frontend)),
            (Udp, "203.0.113.40", 53, "10.244.1.5", 53, Some(Frontend)),
            (Udp, "198.18.0.1", 30040, "10.244.1.5", 53, Some(NodePort)),
            (Tcp, "10.96.0.40", 53, "10.244.1.5", 53, None),
            (Tcp, "198.18.0.1", 30041, "10.244.1.5", 53, None),
            (Udp, "10.96.0.40", 54, "10.244.1.5", 53, None),
        ],
    );
    assert_eq!(idx.stale_reason(Udp, ip("10.96.0.40"), 53, ip("10.244.1.5"), 53), Some(Frontend));
}

#[test]
fn a_frontend_of_a_deleted_service_that_a_live_one_owns_now_follows_the_live_rule() {
    // The ClusterIP and the NodePort went to a new Service in the same batch; the ExternalIP did not.
    let c = case(&format!(
        r#"{{"name": "t", "deletedServices": [{GONE}],
        "services": [{{"namespace": "ns", "name": "new", "type": "NodePort", "clusterIP": "10.96.0.40",
            "ports": [{{"name": "u", "port": 53, "protocol": "UDP", "nodePort": 30040}}]}}],
        "endpointSlices": [{{"name": "new-1", "service": "ns/new", "addressType": "IPv4",
            "endpoints": [{{"ip": "10.244.7.7"}}], "ports": [{{"name": "u", "port": 5353, "protocol": "UDP"}}]}}]}}"#
    ));
    let idx = c.index(NodeAddresses::default()).unwrap();
    use StaleReason::*;
    check(
        &idx,
        &[
            (Udp, "10.96.0.40", 53, "10.244.7.7", 5353, None),
            (Udp, "10.96.0.40", 53, "10.244.1.5", 53, Some(Frontend)),
            (Udp, "1.1.1.1", 30040, "10.244.7.7", 5353, None),
            (Udp, "1.1.1.1", 30040, "10.244.1.5", 53, Some(NodePort)),
            (Udp, "192.0.2.40", 53, "10.244.7.7", 5353, Some(Frontend)),
        ],
    );
}

#[test]
fn deleted_ports_the_plan_still_has_are_ignored() {
    // A caller passing a port that is live again must not lose its serving flows.
    let c = case(&format!(
        r#"{{"name": "t", "services": {DNS}, "endpointSlices": {}}}"#,
        dns_slice(r#"[{"ip": "10.244.1.5"}]"#)
    ));
    let plan = c.plan(NodeAddresses::default()).unwrap();
    let live: Vec<_> = plan.services.values().cloned().collect();
    let idx = StaleFlowIndex::new(&plan, &live);
    check(
        &idx,
        &[
            (Udp, "10.96.0.10", 53, "10.244.1.5", 5353, None),
            (Udp, "1.1.1.1", 30053, "10.244.1.5", 5353, None),
            (Udp, "10.96.0.10", 53, "10.244.9.9", 5353, Some(StaleReason::Frontend)),
        ],
    );
}

#[test]
fn a_live_port_passed_as_it_was_before_a_change_gives_up_only_the_frontends_it_lost() {
    // The agent passes the old form of a UDP port whose ExternalIP went away: flows to that
    // address have no service now; the ClusterIP keeps its live rule.
    let with_eip = case(&format!(
        r#"{{"name": "t", "services": {DNS}, "endpointSlices": {}}}"#,
        dns_slice(r#"[{"ip": "10.244.1.5"}]"#)
    ));
    let without_eip = DNS.replace(r#"["192.0.2.10"]"#, "[]");
    let now = case(&format!(
        r#"{{"name": "t", "services": {without_eip}, "endpointSlices": {}}}"#,
        dns_slice(r#"[{"ip": "10.244.1.5"}]"#)
    ));
    let nodes = NodeAddresses::default();
    let old: Vec<_> = with_eip.plan(nodes).unwrap().services.values().cloned().collect();
    let idx = StaleFlowIndex::new(&now.plan(nodes).unwrap(), &old);
    use StaleReason::*;
    check(
        &idx,
        &[
            (Udp, "192.0.2.10", 53, "10.244.1.5", 5353, Some(Frontend)),
            (Udp, "10.96.0.10", 53, "10.244.1.5", 5353, None),
            (Udp, "10.96.0.10", 53, "10.244.9.9", 5353, Some(Frontend)),
            (Udp, "1.1.1.1", 30053, "10.244.1.5", 5353, None),
            (Tcp, "192.0.2.10", 53, "10.244.1.5", 5353, None),
        ],
    );
}

#[test]
fn the_case_format_is_strict() {
    let file = |cases: &str| format!(r#"{{"schemaVersion": 2, "cases": [{cases}]}}"#);
    let ok = file(&format!(r#"{{"name": "a", "deletedServices": [{GONE}]}}"#));
    assert_eq!(ConntrackCaseFile::parse(&ok).unwrap().cases[0].deleted_services.len(), 1);
    for (bad, want) in [
        (file(r#"{"name": "a", "deletedService": []}"#), r#"cases[0] ("a"): unknown key "deletedService""#),
        (
            file(r#"{"name": "a", "deletedServices": [{"namespace": "n", "name": "s", "port": 53}]}"#),
            r#"cases[0] ("a").deletedServices[0] ("s"): unknown key "port""#,
        ),
        (
            file(
                r#"{"name": "a", "entries": [{"protocol": "UDP", "origDst": null, "origDstPort": 1,
                "replySrc": "10.0.0.1", "replySrcPort": 1, "expect": "keep", "expectUnderSeedRul": "keep"}]}"#,
            ),
            r#"cases[0] ("a").entries[0]: unknown key "expectUnderSeedRul""#,
        ),
        (r#"{"schemaVersion": 2, "cases": [], "extra": 1}"#.to_string(), r#"the file: unknown key "extra""#),
    ] {
        let err = ConntrackCaseFile::parse(&bad).unwrap_err().to_string();
        assert!(err.starts_with(want), "{err}");
    }
    let v1 = ConntrackCaseFile::parse(r#"{"schemaVersion": 1, "cases": []}"#).unwrap_err();
    assert!(matches!(v1, CaseFileError::SchemaVersion(1)), "{v1}");
    // A Service cannot be live and deleted at once.
    let both = case(&format!(r#"{{"name": "t", "services": [{GONE}], "deletedServices": [{GONE}]}}"#));
    assert!(both.deleted_service_ports(NodeAddresses::default()).is_err());
}

#[test]
fn terminating_but_serving_endpoints_and_not_ready_ones_follow_the_serving_condition() {
    // Serving+terminating counts (existing flows keep it); topology and policy are ignored.
    let idx = index(
        DNS,
        &dns_slice(
            r#"[{"ip": "10.244.1.5", "ready": false, "serving": true, "terminating": true, "nodeName": "elsewhere"},
                {"ip": "10.244.1.6", "ready": false, "serving": false, "terminating": true}]"#,
        ),
    );
    check(
        &idx,
        &[
            (Udp, "10.96.0.10", 53, "10.244.1.5", 5353, None),
            (Udp, "10.96.0.10", 53, "10.244.1.6", 5353, Some(StaleReason::Frontend)),
        ],
    );
}

#[test]
fn ipv6_frontends_and_node_ports_are_per_family() {
    let svc = r#"[{"namespace": "ns", "name": "v6", "type": "NodePort", "clusterIP": "fd00:96::10",
        "ports": [{"name": "u", "port": 53, "protocol": "UDP", "nodePort": 30053}]}]"#;
    let slices = r#"[{"name": "v6-1", "service": "ns/v6", "addressType": "IPv6", "endpoints": [{"ip": "fd00:244::5"}],
        "ports": [{"name": "u", "port": 53, "protocol": "UDP"}]}]"#;
    let idx = index(svc, slices);
    assert!(idx.has_family(crate::addr::IpFamily::V6));
    assert!(!idx.has_family(crate::addr::IpFamily::V4));
    check(
        &idx,
        &[
            (Udp, "fd00:96::10", 53, "fd00:244::5", 53, None),
            (Udp, "fd00:96::10", 53, "fd00:244::6", 53, Some(StaleReason::Frontend)),
            (Udp, "2001:db8::1", 30053, "fd00:244::6", 53, Some(StaleReason::NodePort)),
            // The IPv6 service's NodePort says nothing about IPv4 flows.
            (Udp, "192.0.2.1", 30053, "10.0.0.1", 53, None),
        ],
    );
}

#[test]
fn proxy_mode_load_balancer_addresses_are_not_frontends() {
    let svc = r#"[{"namespace": "ns", "name": "lb", "type": "LoadBalancer", "clusterIP": "10.96.0.20",
        "loadBalancerIPs": ["203.0.113.20", "203.0.113.21"], "loadBalancerIPMode": {"203.0.113.21": "Proxy"},
        "ports": [{"name": "u", "port": 53, "protocol": "UDP"}]}]"#;
    let slices = r#"[{"name": "lb-1", "service": "ns/lb", "addressType": "IPv4", "endpoints": [{"ip": "10.244.1.5"}],
        "ports": [{"name": "u", "port": 53, "protocol": "UDP"}]}]"#;
    let idx = index(svc, slices);
    check(
        &idx,
        &[
            (Udp, "203.0.113.20", 53, "10.244.9.9", 53, Some(StaleReason::Frontend)),
            (Udp, "203.0.113.21", 53, "10.244.9.9", 53, None),
        ],
    );
}

#[test]
fn a_frontend_claimed_twice_belongs_to_the_service_the_plan_programmed() {
    // Both services claim 192.0.2.50:53/UDP as an ExternalIP; the Plan keeps the first (ns/a).
    let svcs = r#"[
        {"namespace": "ns", "name": "a", "clusterIP": "10.96.0.30", "externalIPs": ["192.0.2.50"],
         "ports": [{"name": "u", "port": 53, "protocol": "UDP"}]},
        {"namespace": "ns", "name": "b", "clusterIP": "10.96.0.31", "externalIPs": ["192.0.2.50"],
         "ports": [{"name": "u", "port": 53, "protocol": "UDP"}]}]"#;
    let slices = r#"[
        {"name": "a-1", "service": "ns/a", "addressType": "IPv4", "endpoints": [{"ip": "10.244.1.1"}],
         "ports": [{"name": "u", "port": 53, "protocol": "UDP"}]},
        {"name": "b-1", "service": "ns/b", "addressType": "IPv4", "endpoints": [{"ip": "10.244.2.2"}],
         "ports": [{"name": "u", "port": 53, "protocol": "UDP"}]}]"#;
    let idx = index(svcs, slices);
    check(
        &idx,
        &[
            (Udp, "192.0.2.50", 53, "10.244.1.1", 53, None),
            (Udp, "192.0.2.50", 53, "10.244.2.2", 53, Some(StaleReason::Frontend)),
            (Udp, "10.96.0.31", 53, "10.244.2.2", 53, None),
        ],
    );
}
