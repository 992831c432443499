//! ferry-conntrack against the real kernel, in a network namespace of its own:
//! create, list, delete (v4, v6, zones, ids), and reconcile. Needs root; never skipped.

use ferry_conntrack::{Conntrack, Entry};
use ferry_model::stale::StaleFlowIndex;
use ferry_model::stale::cases::{ConntrackCaseFile, NodeAddresses};
use ferry_model::{IpFamily, Protocol};
use ferry_sandbox::Sandbox;
use std::net::SocketAddr;
use std::time::Duration;

const UDP: u8 = 17;
const TCP: u8 = 6;
const MINUTE: Duration = Duration::from_secs(60);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A fresh namespace and a socket on its table.
fn table(sb: &mut Sandbox) -> Conntrack {
    let host = sb.add_host("t").unwrap();
    Conntrack::open_in_netns(&sb.netns_path(&host)).unwrap()
}

fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
    for e in &mut v {
        e.id = None;
    }
    v.sort_by_key(|e| format!("{e}"));
    v
}

#[test]
fn created_entries_are_listed_with_both_tuples_and_deleted_by_tuple() {
    let mut sb = Sandbox::new("ctlib").unwrap();
    let mut ct = table(&mut sb);
    let dnat = Entry::new(UDP, sa("10.0.0.7:40000"), sa("10.96.0.10:53"), sa("10.244.1.5:5353"));
    let tcp = Entry::new(TCP, sa("10.0.0.7:40001"), sa("10.96.0.10:53"), sa("10.244.1.5:5353"));
    let v6 = Entry::new(UDP, sa("[fd00::7]:40000"), sa("[fd00:96::10]:53"), sa("[fd00:244::5]:53"));
    let zoned = Entry { zone: Some(7), ..Entry::new(UDP, sa("10.0.0.8:1"), sa("10.96.0.10:53"), sa("10.244.1.6:53")) };
    let created = ct.create(&[dnat.clone(), tcp.clone(), v6.clone(), zoned.clone()], MINUTE).unwrap();
    assert_eq!(created.created, 4, "{created:?}");

    // Creating again: every one exists.
    let again = ct.create(std::slice::from_ref(&dnat), MINUTE).unwrap();
    assert_eq!((again.created, again.existed), (0, 1));

    let v4 = ct.dump(IpFamily::V4).unwrap();
    assert!(v4.iter().all(|e| e.id.is_some()), "the kernel reports ids");
    assert_eq!(sorted(v4), sorted(vec![dnat.clone(), tcp.clone(), zoned.clone()]));
    assert_eq!(sorted(ct.dump(IpFamily::V6).unwrap()), vec![v6.clone()]);

    // The UDP-only listing leaves TCP out (in the kernel on 5.8+, and here anyway).
    let udp = ct.list(IpFamily::V4, Some(Protocol::Udp), |_| true).unwrap();
    assert_eq!(udp.listed, 2, "the kernel filtered the dump to UDP");
    assert!(udp.complete);

    // Deleting by tuple: the zone matters, the id (when given) must match.
    assert!(!ct.delete(&Entry { zone: None, ..zoned.clone() }).unwrap(), "zone 0 has no such entry");
    assert!(ct.delete(&zoned).unwrap());
    let listed = ct.dump(IpFamily::V4).unwrap();
    let live = listed.iter().find(|e| e.protocol == UDP).unwrap().clone();
    assert!(!ct.delete(&Entry { id: live.id.map(|i| i ^ 1), ..live.clone() }).unwrap(), "another id is another entry");
    assert!(ct.delete(&live).unwrap());
    assert!(ct.delete(&v6).unwrap());
    assert!(!ct.delete(&v6).unwrap(), "already gone");
    assert_eq!(sorted(ct.dump(IpFamily::V4).unwrap()), vec![tcp]);
    assert!(ct.dump(IpFamily::V6).unwrap().is_empty());
    sb.close().unwrap();
}

#[test]
fn batches_of_many_thousand_entries_are_created_and_deleted() {
    let mut sb = Sandbox::new("ctlib").unwrap();
    let mut ct = table(&mut sb);
    let entries: Vec<Entry> = (0..20_000u32)
        .map(|i| {
            let client = SocketAddr::new([10, 1, (i >> 8) as u8, i as u8].into(), 1024 + (i % 50_000) as u16);
            Entry::new(UDP, client, sa("10.96.0.10:53"), sa("10.244.1.5:53"))
        })
        .collect();
    let created = ct.create(&entries, MINUTE).unwrap();
    assert_eq!(created.created, entries.len(), "{created:?}");
    let listed = ct.list(IpFamily::V4, Some(Protocol::Udp), |e| e.orig.src.port() % 2 == 0).unwrap();
    assert_eq!(listed.listed, entries.len());
    let deleted = ct.delete_all(&listed.entries).unwrap();
    assert_eq!(deleted.deleted, entries.len() / 2, "{deleted:?}");
    assert_eq!(ct.dump(IpFamily::V4).unwrap().len(), entries.len() / 2);
    sb.close().unwrap();
}

#[test]
fn reconcile_deletes_only_stale_udp_flows_in_both_families() {
    // The first acceptance case's objects, plus IPv6 entries against an index with no IPv6 service.
    let file = ConntrackCaseFile::parse(include_str!("../../../acceptance/conntrack-cleanup-cases.json")).unwrap();
    let case = &file.cases[0];
    let index = StaleFlowIndex::from_plan(&case.plan(NodeAddresses::default()).unwrap());
    let mut sb = Sandbox::new("ctlib").unwrap();
    let mut ct = table(&mut sb);
    let stale = Entry::new(UDP, sa("10.0.0.1:1000"), sa("172.30.1.1:8000"), sa("10.240.1.5:9090"));
    let serving = Entry::new(UDP, sa("10.0.0.1:1001"), sa("172.30.1.1:8000"), sa("10.240.0.4:9090"));
    let tcp = Entry::new(TCP, sa("10.0.0.1:1002"), sa("172.30.1.1:8000"), sa("10.240.1.5:9090"));
    let v6 = Entry::new(UDP, sa("[fd00::1]:1000"), sa("[fd00::30]:8000"), sa("[fd00::5]:9090"));
    ct.create(&[stale.clone(), serving.clone(), tcp.clone(), v6.clone()], MINUTE).unwrap();
    let report = ct.reconcile(&index, &[IpFamily::V4, IpFamily::V6]);
    assert_eq!(report.families.len(), 2);
    let v4 = &report.families[0];
    assert_eq!((v4.family, v4.listed, v4.stale, v4.deleted, v4.error.as_deref()), (IpFamily::V4, 2, 1, 1, None));
    assert_eq!((report.families[1].listed, report.families[1].deleted), (1, 0));
    assert_eq!(sorted(ct.dump(IpFamily::V4).unwrap()), sorted(vec![serving, tcp]));
    assert_eq!(sorted(ct.dump(IpFamily::V6).unwrap()), vec![v6]);
    sb.close().unwrap();
}
