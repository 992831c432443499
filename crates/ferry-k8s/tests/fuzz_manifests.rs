//! Fuzzing the manifest loader with proptest: arbitrary bytes and mutated
//! real manifests never panic, and every document is either loaded or
//! reported. Seeds: `fuzz/corpus`. Bounded by `PROPTEST_CASES` (`make fuzz`).

use ferry_k8s::manifests::{LoadLimits, LoadedManifests, load_text_with};
use proptest::prelude::*;
use std::path::Path;

const SEEDS: &[&str] = &[
    include_str!("../../../fuzz/corpus/dns.yaml"),
    include_str!("../../../fuzz/corpus/web.yaml"),
    include_str!("../../../fuzz/corpus/zz-broken-on-purpose.yaml"),
    "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}\n",
    "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n---\n%YAML 1.2\n---\n...\n",
    "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}, \"spec\": {\"clusterIP\": \"10.96.0.1\"}}",
];

/// A seed with some bytes replaced, some cut out and some spliced in.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (0..SEEDS.len(), prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 0..24)).prop_map(|(i, edits)| {
        let mut b = SEEDS[i].as_bytes().to_vec();
        for (at, byte, op) in edits {
            if b.is_empty() {
                b.push(byte);
                continue;
            }
            let at = at % b.len();
            match op {
                0 => b[at] = byte,
                1 => {
                    b.remove(at);
                }
                2 => b.insert(at, byte),
                _ => {
                    let tail = b[at..].to_vec();
                    b.extend_from_slice(&tail[..tail.len().min(64)]);
                }
            }
        }
        b
    })
}

fn load(name: &str, bytes: &[u8]) -> LoadedManifests {
    let text = String::from_utf8_lossy(bytes);
    let mut out = LoadedManifests::default();
    let limits = LoadLimits { max_documents: 64, ..LoadLimits::default() };
    load_text_with(Path::new(name), &text, limits, &mut out);
    out
}

proptest! {
    #[test]
    fn mutated_manifests_never_panic(bytes in mutated(), json in any::<bool>()) {
        let out = load(if json { "m.json" } else { "m.yaml" }, &bytes);
        for p in &out.problems {
            prop_assert!(!p.to_string().is_empty());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), json in any::<bool>()) {
        load(if json { "a.json" } else { "a.yaml" }, &bytes);
    }
}
