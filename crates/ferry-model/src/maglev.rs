//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of
//! prime size M whose slots name backends so that (a) every backend owns
//! about M/N slots and (b) removing one backend of N moves only about 1/N of
//! the slots. Every node computes the same table from the same backends, so
//! a flow lands on the same backend whichever node receives it.
//!
//! The hashes must never change between versions or nodes, so they are
//! spelled out here (FNV-1a, 64-bit) rather than taken from `std::hash`,
//! whose output is allowed to change.

/// Table sizes ferry accepts: primes, as Maglev requires, roughly doubling.
pub const TABLE_SIZES: &[u32] = &[251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071];

/// The default table size: at most ~0.5% imbalance between backends for up to ~100 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Builds the table: `table[slot]` is an index into `backends`. `backends`
/// are names that identify backends stably (e.g. "10.0.0.1:80"); their order
/// does not matter. Empty when there are no backends.
pub fn table(backends: &[String], size: u32) -> Vec<u32> {
    let m = size as u64;
    if backends.is_empty() || m == 0 {
        return Vec::new();
    }
    // Sort so that the result does not depend on the order backends were listed in.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|a, b| backends[*a].cmp(&backends[*b]));
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let name = backends[i].as_bytes();
            let offset = fnv1a(0, name) % m;
            let skip = fnv1a(0x9e37_79b9_7f4a_7c15, name) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (k, &(offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[k] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[k] += 1;
                c = (offset + next[k] * skip) % m;
            }
            table[c as usize] = order[k] as u32;
            next[k] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256)).collect()
    }

    #[test]
    fn every_size_is_prime() {
        for &m in TABLE_SIZES {
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
        }
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        let all = names(10);
        let before = table(&all, 16381);
        let mut fewer = all.clone();
        fewer.remove(3);
        let after = table(&fewer, 16381);
        let moved = before.iter().zip(&after).filter(|(b, a)| all[**b as usize] != fewer[**a as usize]).count();
        let share = moved as f64 / before.len() as f64;
        // Ideal: exactly the removed backend's 10%; Maglev stays close to it.
        assert!(share > 0.09 && share < 0.13, "moved {share:.3}");
    }

    proptest! {
        #[test]
        fn tables_are_full_and_balanced(n in 1usize..60, size_idx in 0usize..4) {
            let m = TABLE_SIZES[size_idx + 2];
            let backends = names(n);
            let t = table(&backends, m);
            prop_assert_eq!(t.len(), m as usize);
            let mut count = vec![0u32; n];
            for s in &t {
                prop_assert!((*s as usize) < n);
                count[*s as usize] += 1;
            }
            let ideal = m as f64 / n as f64;
            for c in count {
                // Maglev guarantees each backend within a few slots of the ideal share.
                prop_assert!((c as f64 - ideal).abs() <= ideal * 0.05 + 2.0, "{} vs ideal {}", c, ideal);
            }
        }

        #[test]
        fn listing_order_does_not_matter(n in 2usize..20, seed in any::<u64>()) {
            let backends = names(n);
            let mut shuffled = backends.clone();
            let len = shuffled.len();
            shuffled.rotate_left((seed as usize) % len);
            let a: Vec<&String> = table(&backends, 1021).iter().map(|i| &backends[*i as usize]).collect();
            let b: Vec<&String> = table(&shuffled, 1021).iter().map(|i| &shuffled[*i as usize]).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn removing_one_backend_disrupts_little(n in 5usize..40, victim in any::<prop::sample::Index>()) {
            let all = names(n);
            let before = table(&all, 4093);
            let v = victim.index(n);
            let mut fewer = all.clone();
            fewer.remove(v);
            let after = table(&fewer, 4093);
            let moved_other = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b as usize != v && all[**b as usize] != fewer[**a as usize])
                .count();
            // Slots of surviving backends that moved anyway: a small fraction of the table.
            prop_assert!((moved_other as f64) / (before.len() as f64) < 0.06, "{} of {}", moved_other, before.len());
        }
    }
}
