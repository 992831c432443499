//! Every case of `acceptance/conntrack-cleanup-cases.json` (schema version 2)
//! against the pure stale-flow rule, with each case's `deletedServices`: each
//! entry's `expect` (delete/keep) and each case's `expectedDeletedCount`.
//! `expectUnderSeedRule` only documents what the seed's rule would do; it is
//! never the expectation. The kernel side runs the same cases in
//! `ferry conformance --conntrack-cases`.

use ferry_model::stale::StaleFlowIndex;
use ferry_model::stale::cases::{ConntrackCaseFile, EntrySpec, Expect, NodeAddresses};

const CASES: &str = include_str!("../../../acceptance/conntrack-cleanup-cases.json");

fn verdict(index: &StaleFlowIndex, e: &EntrySpec) -> Expect {
    if index.is_stale(e.protocol, e.orig_dst, e.orig_dst_port, e.reply_src, e.reply_src_port) {
        Expect::Delete
    } else {
        Expect::Keep
    }
}

#[test]
fn every_literal_entry_gets_its_expected_verdict() {
    let file = ConntrackCaseFile::parse(CASES).expect("case file parses");
    let nodes = NodeAddresses::default();
    let mut checked = 0;
    for case in file.cases.iter().filter(|c| c.generator.is_none()) {
        let index = case.index(nodes).unwrap();
        let entries = case.entry_specs(nodes).unwrap();
        assert!(!entries.is_empty(), "{}: no entries", case.name);
        let mut failures = Vec::new();
        for e in &entries {
            if verdict(&index, e) != e.expect {
                failures.push(format!("{} expected {} ({})", e.describe(), e.expect, e.reason));
            }
        }
        assert!(failures.is_empty(), "{}:\n{}", case.name, failures.join("\n"));
        let deleted = entries.iter().filter(|e| verdict(&index, e) == Expect::Delete).count() as u64;
        assert_eq!(Some(deleted), case.expected_deleted_count, "{}: deleted count", case.name);
        checked += entries.len();
    }
    assert!(checked >= 78, "only {checked} entries checked");
}

#[test]
fn the_file_states_the_current_rule() {
    let file = ConntrackCaseFile::parse(CASES).unwrap();
    assert_eq!(file.schema_version, 2);
    let nodes = NodeAddresses::default();
    // Where the seed's rule differs, the entries say so; ferry follows `expect`.
    let differing: Vec<_> =
        file.cases.iter().flat_map(|c| &c.entries).filter(|e| e.expect_under_seed_rule.is_some()).collect();
    assert!(differing.len() >= 4, "{} entries differ from the seed rule", differing.len());
    assert!(differing.iter().all(|e| e.expect_under_seed_rule.as_deref() != Some(e.expect.as_str())));
    // The deleted-service case needs its deletedServices: without them its deletions are not found.
    let case = file.cases.iter().find(|c| !c.deleted_services.is_empty()).expect("a case with deletedServices");
    let without = StaleFlowIndex::from_plan(&case.plan(nodes).unwrap());
    let with = case.index(nodes).unwrap();
    let entries = case.entry_specs(nodes).unwrap();
    let count = |idx: &StaleFlowIndex| entries.iter().filter(|e| verdict(idx, e) == Expect::Delete).count() as u64;
    assert_eq!(Some(count(&with)), case.expected_deleted_count);
    assert!(count(&without) < count(&with));
}

#[test]
fn unset_reply_ports_give_the_same_verdicts_as_their_mapping() {
    // replySrcPort 0 is mapped to origDstPort; the literal 0 must not change a verdict either.
    let file = ConntrackCaseFile::parse(CASES).unwrap();
    let nodes = NodeAddresses::default();
    for case in &file.cases {
        let index = case.index(nodes).unwrap();
        for (raw, e) in case.entries.iter().zip(case.entry_specs(nodes).unwrap()) {
            if raw.reply_src_port == 0 {
                assert_eq!(e.reply_src_port, e.orig_dst_port);
                let literal = index.is_stale(e.protocol, e.orig_dst, e.orig_dst_port, e.reply_src, 0);
                assert_eq!(literal, e.expect == Expect::Delete, "{}", e.describe());
            }
        }
    }
}

#[test]
fn the_scale_case_generator_deletes_exactly_the_port_8000_entries() {
    let file = ConntrackCaseFile::parse(CASES).unwrap();
    let nodes = NodeAddresses::default();
    let case = file.cases.iter().find(|c| c.generator.is_some()).expect("the file has a scale case");
    assert_eq!(case.generated_count(), 1_000_002);
    let index = case.index(nodes).unwrap();
    let (entries, capped) = case.generate(nodes, None).unwrap();
    assert!(!capped);
    assert_eq!(entries.len(), 1_000_002);
    let mut deleted = 0;
    for e in &entries {
        assert_eq!(verdict(&index, e), e.expect, "{}", e.describe());
        deleted += usize::from(e.expect == Expect::Delete);
    }
    // The two literal entries plus the random ones that happened to hit 8000.
    let random_hits = entries[2..].iter().filter(|e| e.orig_dst_port == 8000).count();
    assert_eq!(deleted, 1 + random_hits);
    let (small, capped) = case.generate(nodes, Some(1000)).unwrap();
    assert!(capped);
    assert_eq!(small.len(), 1002);
}
