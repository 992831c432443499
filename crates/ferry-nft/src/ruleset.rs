//! An nftables table as data (sets, maps, chains), and the script that turns
//! one version into the next in a single transaction.
//!
//! Renderers build `Table`s; `Table::transition(old, new)` emits only what
//! differs: new chains first (so references resolve), then chain bodies,
//! then elements, then deletions of what nothing references any more.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// A set or a map's declaration and elements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Collection {
    /// The declaration body, e.g. `type ipv4_addr . inet_proto . inet_service : verdict;`.
    pub declaration: String,
    /// Elements: key -> value (`None` for sets).
    pub elements: BTreeMap<String, Option<String>>,
}

/// One nftables table ferry owns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    pub family: String,
    pub name: String,
    pub collections: BTreeMap<String, Collection>,
    /// Chain name -> (declaration line such as `type nat hook ...;`, rules).
    pub chains: BTreeMap<String, (String, Vec<String>)>,
}

/// Names are written bare: nft 1.0 (Debian 12) refuses quoted set and map
/// names, so renderers only make names from identifier characters.
fn quote(name: &str) -> String {
    name.to_string()
}

impl Table {
    pub fn new(family: &str, name: &str) -> Table {
        Table { family: family.into(), name: name.into(), ..Default::default() }
    }

    fn target(&self) -> String {
        format!("{} {}", self.family, self.name)
    }

    /// The script that makes the kernel's table (described by `old`, `None`
    /// when absent) equal to `self`.
    pub fn transition(&self, old: Option<&Table>) -> String {
        let empty = Table::new(&self.family, &self.name);
        let t = self.target();
        let mut s = String::new();
        let _ = writeln!(s, "add table {t}");
        if old.is_none() {
            // Unknown kernel state (first sync, restart, resync): replace the table whole,
            // in this same transaction, so nothing stale survives and nothing is ever missing.
            let _ = writeln!(s, "delete table {t}\nadd table {t}");
        }
        let old = old.unwrap_or(&empty);
        // Collections: declare new ones (a changed declaration needs a fresh object).
        let redeclared: BTreeSet<&String> = self
            .collections
            .iter()
            .filter(|(n, c)| old.collections.get(*n).is_some_and(|o| o.declaration != c.declaration))
            .map(|(n, _)| n)
            .collect();
        for (name, c) in &self.collections {
            if !old.collections.contains_key(name) {
                let kind = if c.declaration.contains(':') { "map" } else { "set" };
                let _ = writeln!(s, "add {kind} {t} {} {{ {} }}", quote(name), c.declaration);
            }
        }
        // Chains: create all new ones (base chains with their hook) first, so rules may jump to them.
        for (name, (decl, _)) in &self.chains {
            if !old.chains.contains_key(name) {
                if decl.is_empty() {
                    let _ = writeln!(s, "add chain {t} {}", quote(name));
                } else {
                    let _ = writeln!(s, "add chain {t} {} {{ {decl} }}", quote(name));
                }
            }
        }
        // Elements that go away or change value, before chains they point to are deleted.
        for (name, c) in &old.collections {
            let new = self.collections.get(name);
            if new.is_none() || redeclared.contains(name) {
                continue;
            }
            let new = new.expect("checked");
            let gone: Vec<&String> =
                c.elements.iter().filter(|(k, v)| new.elements.get(*k) != Some(v)).map(|(k, _)| k).collect();
            if !gone.is_empty() {
                let list: Vec<&str> = gone.iter().map(|k| k.as_str()).collect();
                let _ = writeln!(s, "delete element {t} {} {{ {} }}", quote(name), list.join(", "));
            }
        }
        // Chain bodies.
        for (name, (decl, rules)) in &self.chains {
            if old.chains.get(name).is_some_and(|(d, r)| d == decl && r == rules) {
                continue;
            }
            if old.chains.contains_key(name) {
                let _ = writeln!(s, "flush chain {t} {}", quote(name));
                if old.chains[name].0 != *decl && !decl.is_empty() {
                    // Base chain properties changed (e.g. a priority): redefine in place.
                    let _ = writeln!(s, "chain {t} {} {{ {decl} }}", quote(name));
                }
            }
            for r in rules {
                let _ = writeln!(s, "add rule {t} {} {r}", quote(name));
            }
        }
        // Redeclared collections: delete (their referencing rules were just rewritten) and re-add.
        for name in &redeclared {
            let c = &self.collections[*name];
            let kind = if c.declaration.contains(':') { "map" } else { "set" };
            let _ = writeln!(s, "delete {kind} {t} {}", quote(name));
            let _ = writeln!(s, "add {kind} {t} {} {{ {} }}", quote(name), c.declaration);
        }
        // New and changed elements.
        for (name, c) in &self.collections {
            let fresh = redeclared.contains(name) || !old.collections.contains_key(name);
            let old_elems = old.collections.get(name).map(|o| &o.elements);
            let added: Vec<String> = c
                .elements
                .iter()
                .filter(|(k, v)| fresh || old_elems.and_then(|o| o.get(*k)) != Some(v))
                .map(|(k, v)| match v {
                    Some(v) => format!("{k} : {v}"),
                    None => k.clone(),
                })
                .collect();
            for chunk in added.chunks(1000) {
                let _ = writeln!(s, "add element {t} {} {{ {} }}", quote(name), chunk.join(", "));
            }
        }
        // Chains that are gone: flush everyone first (they may jump to each other), then delete.
        let gone: Vec<&String> = old.chains.keys().filter(|n| !self.chains.contains_key(*n)).collect();
        for name in &gone {
            let _ = writeln!(s, "flush chain {t} {}", quote(name));
        }
        for name in &gone {
            let _ = writeln!(s, "delete chain {t} {}", quote(name));
        }
        for (name, c) in &old.collections {
            if !self.collections.contains_key(name) {
                let kind = if c.declaration.contains(':') { "map" } else { "set" };
                let _ = writeln!(s, "delete {kind} {t} {}", quote(name));
            }
        }
        s
    }

    /// Whether a transition would change nothing.
    pub fn same_as(&self, old: &Table) -> bool {
        self == old
    }
}
