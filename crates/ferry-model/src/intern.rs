//! One shared copy of the values many objects repeat: namespaces, port
//! names, node names, zones, an endpoint's placement. A cluster has few of
//! each, but every key, slice and endpoint used to hold its own copy (at
//! 100k services, tens of megabytes of identical short strings).
//!
//! Written by hand: the interning crates keep every value for the life of
//! the process (a hostile stream of unique node names would grow them
//! without bound) or hand out ids instead of shared pointers. Here values no
//! one holds any more are dropped whenever the table has doubled since the
//! last sweep, so it stays within twice what is in use.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex};

/// A table of shared values; see the module documentation.
pub struct Interner<T: ?Sized + Hash + Eq> {
    /// The values, and the size at which the next sweep happens.
    values: LazyLock<Mutex<(HashSet<Arc<T>>, usize)>>,
}

/// The table's first sweep happens at this size.
const FIRST_SWEEP: usize = 1024;

impl<T: ?Sized + Hash + Eq> Interner<T> {
    pub const fn new() -> Self {
        Interner { values: LazyLock::new(|| Mutex::new((HashSet::new(), FIRST_SWEEP))) }
    }

    /// The shared copy of `value`, made with `make` the first time.
    pub fn share(&self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        let mut guard = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (set, sweep_at) = &mut *guard;
        if let Some(shared) = set.get(value) {
            return shared.clone();
        }
        if set.len() >= *sweep_at {
            set.retain(|v| Arc::strong_count(v) > 1);
            *sweep_at = (set.len() * 2).max(FIRST_SWEEP);
        }
        let shared = make();
        set.insert(shared.clone());
        shared
    }

    /// Values held (test seam).
    #[doc(hidden)]
    pub fn held(&self) -> usize {
        self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0.len()
    }
}

impl<T: ?Sized + Hash + Eq> Default for Interner<T> {
    fn default() -> Self {
        Self::new()
    }
}

static STRINGS: Interner<str> = Interner::new();

/// The shared copy of a short, often repeated string (namespace, port name, node name, zone).
pub fn shared_str(s: &str) -> Arc<str> {
    STRINGS.share(s, || Arc::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy() {
        let t: Interner<str> = Interner::new();
        let a = t.share("default", || Arc::from("default"));
        let b = t.share("default", || Arc::from("default"));
        assert!(Arc::ptr_eq(&a, &b));
    }

    /// A stream of unique values (a hostile or churning cluster) does not
    /// grow the table past twice what is still held.
    #[test]
    fn values_no_one_holds_are_swept() {
        let t: Interner<str> = Interner::new();
        let kept: Vec<Arc<str>> =
            (0..100).map(|i| t.share(&format!("kept-{i}"), || Arc::from(format!("kept-{i}")))).collect();
        for i in 0..100_000 {
            let name = format!("gone-{i}");
            drop(t.share(&name, || Arc::from(name.as_str())));
        }
        assert!(t.held() <= 2 * FIRST_SWEEP, "{} values held", t.held());
        let again = t.share("kept-7", || Arc::from("kept-7"));
        assert!(Arc::ptr_eq(&again, &kept[7]), "a value still in use survives the sweeps");
    }
}
