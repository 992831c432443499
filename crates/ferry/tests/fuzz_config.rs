//! Fuzzing the node config and KubeProxyConfiguration readers with proptest:
//! arbitrary and mutated files are refused with an error naming a key, never
//! a panic. Bounded by `PROPTEST_CASES` (`make fuzz`).

use ferry::config::{NodeFlags, build, kubeproxy, parse_file};
use proptest::prelude::*;

const SEEDS: &[&str] = &[
    include_str!("../../../fuzz/corpus/node.yaml"),
    include_str!("../../../fuzz/corpus/kube-proxy-config.yaml"),
    "externalIPs: {allowedCIDRs: [203.0.113.0/24]}\nlimits: {maxFrontendsPerService: 8, maxEndpointsPerService: 70000}\nmanifests: {maxFileBytes: 0}\n",
];

fn read(text: &str) {
    let Ok(doc) = serde_saphyr::from_str::<serde_json::Value>(text) else {
        let _ = parse_file("f.yaml", text);
        return;
    };
    if kubeproxy::is_kube_proxy_config(&doc) {
        if let Err(e) = kubeproxy::translate("f.yaml", &doc) {
            assert!(!e.problems.is_empty(), "an error names at least one key");
        }
    } else if let Ok(file) = parse_file("f.yaml", text) {
        let _ = build("f.yaml", file, &NodeFlags::default());
    }
}

fn mutated() -> impl Strategy<Value = String> {
    (0..SEEDS.len(), prop::collection::vec((any::<usize>(), any::<char>(), 0u8..3), 0..16)).prop_map(|(i, edits)| {
        let mut chars: Vec<char> = SEEDS[i].chars().collect();
        for (at, c, op) in edits {
            if chars.is_empty() {
                chars.push(c);
                continue;
            }
            let at = at % chars.len();
            match op {
                0 => chars[at] = c,
                1 => {
                    chars.remove(at);
                }
                _ => chars.insert(at, c),
            }
        }
        chars.into_iter().collect()
    })
}

proptest! {
    #[test]
    fn mutated_configs_never_panic(text in mutated()) {
        read(&text);
    }

    #[test]
    fn arbitrary_text_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        read(&String::from_utf8_lossy(&bytes));
    }
}
