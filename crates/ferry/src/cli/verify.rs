//! `ferry status --verify`: the pinned maps compared with the Plan the agent
//! would program from the same manifests and node config.
//!
//! The comparison is the agent's own restart path, not a second reading of the
//! layouts: `Programmer::adopt` reads the maps back, and a full `sync` against
//! the Plan lists the writes that would bring them to it. A datapath equal to
//! the Plan needs none; every write it would need is one difference.

use ferry_bpf::entries::*;
use ferry_bpf::{MapDump, MapOp, NodeRuntime, Programmer};
use ferry_model::Plan;
use ferry_model::addr::fmt_addr_port;
use std::collections::{BTreeMap, BTreeSet};

/// One way the kernel's maps differ from what the Plan requires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// `missing` (the Plan needs it, the map lacks it), `wrong` (present with
    /// another value), `extra` (the Plan has no such entry) or `orphaned` (an
    /// entry of a half-written service, or a backend no slot references).
    pub kind: &'static str,
    /// The pinned map, e.g. `ferry_frontends`.
    pub map: &'static str,
    /// The entry, in the words of `ferry status`.
    pub entry: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<8} {:<16} {}", self.kind, self.map, self.entry)
    }
}

/// Every difference between `dump` (read from the kernel) and `plan` on a node of `rt`.
/// Empty when the datapath is exactly what the agent would program.
pub fn differences(dump: &MapDump, plan: &Plan, rt: &NodeRuntime) -> Vec<Difference> {
    let ops = Programmer::adopt(dump).sync(plan, None, rt);
    let view = Present::of(dump);
    ops.iter().map(|op| view.describe(op)).collect()
}

/// What the dump holds, by key, to tell a missing entry from a wrong one.
struct Present<'a> {
    dump: &'a MapDump,
    names: BTreeMap<u32, &'a str>,
    /// Service ids with both a name and a service entry (see `Programmer::adopt`).
    whole: BTreeSet<u32>,
}

fn backend_words(b: &Backend) -> String {
    fmt_addr_port(&ip_of(&b.addr, b.family), b.port).to_string()
}

fn frontend_words(k: &FeKey) -> String {
    let proto = match k.proto {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    };
    if k.addr == [0; 4] {
        format!("NodePort *:{}/{proto} (family {})", k.port, k.family)
    } else {
        format!("{}/{proto}", fmt_addr_port(&ip_of(&k.addr, k.family), k.port))
    }
}

impl<'a> Present<'a> {
    fn of(dump: &'a MapDump) -> Present<'a> {
        let names: BTreeMap<u32, &str> = dump.names.iter().map(|(id, n)| (*id, n.as_str())).collect();
        let services: BTreeSet<u32> = dump.services.iter().map(|(id, _)| *id).collect();
        let whole = names.keys().copied().filter(|id| services.contains(id)).collect();
        Present { dump, names, whole }
    }

    fn service(&self, id: u32) -> String {
        match self.names.get(&id) {
            Some(n) => format!("{n} (#{id})"),
            None => format!("#{id}"),
        }
    }

    fn backend(&self, id: u32) -> String {
        match self.dump.backends.iter().find(|(b, _)| *b == id) {
            Some((_, b)) => format!("backend #{id} {}", backend_words(b)),
            None => format!("backend #{id}"),
        }
    }

    /// `missing` or `wrong` for a write, by whether the key is there.
    fn put(present: bool) -> &'static str {
        if present { "wrong" } else { "missing" }
    }

    /// `extra` for a deletion of a whole service's entry, `orphaned` otherwise.
    fn del(&self, service: Option<u32>) -> &'static str {
        match service {
            Some(id) if !self.whole.contains(&id) => "orphaned",
            _ => "extra",
        }
    }

    fn describe(&self, op: &MapOp) -> Difference {
        let d = self.dump;
        let (kind, map, entry) = match op {
            MapOp::PutBackend(id, b) => (
                Self::put(d.backends.iter().any(|(i, _)| i == id)),
                "ferry_backends",
                format!("backend #{id} {}", backend_words(b)),
            ),
            MapOp::DelBackend(id) => ("orphaned", "ferry_backends", format!("{} (no slot uses it)", self.backend(*id))),
            MapOp::PutSlot(k, be) => (
                Self::put(d.slots.iter().any(|(s, _)| s == k)),
                "ferry_slots",
                format!(
                    "{} rev {} set {} slot {} -> {}",
                    self.service(k.service),
                    k.rev,
                    k.set,
                    k.slot,
                    self.backend(*be)
                ),
            ),
            MapOp::DelSlot(k) => (
                self.del(Some(k.service)),
                "ferry_slots",
                format!("{} rev {} set {} slot {}", self.service(k.service), k.rev, k.set, k.slot),
            ),
            MapOp::PutMember(k, sets) => (
                Self::put(d.members.iter().any(|(m, _)| m == k)),
                "ferry_members",
                format!("{} has {} (sets {sets:#x})", self.service(k.service), self.backend(k.backend)),
            ),
            MapOp::DelMember(k) => (
                self.del(Some(k.service)),
                "ferry_members",
                format!("{} has {}", self.service(k.service), self.backend(k.backend)),
            ),
            MapOp::PutFirewall(k) => (
                Self::put(d.firewall.contains(k)),
                "ferry_firewall",
                format!("{} allows {:?}/{}", self.service(k.service), k.addr, k.prefixlen.saturating_sub(32)),
            ),
            MapOp::DelFirewall(k) => (
                self.del(Some(k.service)),
                "ferry_firewall",
                format!("{} allows {:?}/{}", self.service(k.service), k.addr, k.prefixlen.saturating_sub(32)),
            ),
            MapOp::PutService(id, v) => (
                Self::put(d.services.iter().any(|(i, _)| i == id)),
                "ferry_services",
                format!("{}: {v:?}", self.service(*id)),
            ),
            MapOp::DelService(id) => (self.del(Some(*id)), "ferry_services", self.service(*id)),
            MapOp::PutName(id, name) => {
                (Self::put(self.names.contains_key(id)), "ferry_names", format!("#{id} named {name}"))
            }
            MapOp::DelName(id) => (self.del(Some(*id)), "ferry_names", self.service(*id)),
            MapOp::PutFrontend(k, v) => (
                Self::put(d.frontends.iter().any(|(f, _)| f == k)),
                "ferry_frontends",
                format!("{} -> {}", frontend_words(k), self.service(v.service)),
            ),
            MapOp::DelFrontend(k) => {
                let owner = d.frontends.iter().find(|(f, _)| f == k).map(|(_, v)| v.service);
                let to = owner.map(|id| format!(" -> {}", self.service(id))).unwrap_or_default();
                ("extra", "ferry_frontends", format!("{}{to}", frontend_words(k)))
            }
            MapOp::PutLocal(k, v) => (
                Self::put(d.locals.iter().any(|(l, _)| l == k)),
                "ferry_locals",
                format!("{} ({v:#x})", ip_of(&k.addr, k.family)),
            ),
            MapOp::DelLocal(k) => ("extra", "ferry_locals", ip_of(&k.addr, k.family).to_string()),
            MapOp::PutRange(k) => (
                Self::put(d.ranges.contains(k)),
                "ferry_ranges",
                format!("{}/{} kind {}", ip_of(&k.addr, k.family), k.prefixlen.saturating_sub(32), k.kind),
            ),
            MapOp::DelRange(k) => (
                "extra",
                "ferry_ranges",
                format!("{}/{} kind {}", ip_of(&k.addr, k.family), k.prefixlen.saturating_sub(32), k.kind),
            ),
            MapOp::PutConfig(c) => (Self::put(d.config.is_some()), "ferry_config", format!("{c:?}")),
            MapOp::PutDevice(i, v) => {
                (Self::put(d.devices.iter().any(|(x, _)| x == i)), "ferry_devices", format!("ifindex {i}: {v:?}"))
            }
            MapOp::DelDevice(i) => ("extra", "ferry_devices", format!("ifindex {i}")),
            MapOp::PutMaglev(k, _) => (
                Self::put(d.maglev.iter().any(|(m, _)| m == k)),
                "ferry_maglev",
                format!("{} set {} table", self.service((k >> 8) as u32), k & 1),
            ),
            MapOp::DelMaglev(k) => (
                self.del(Some((k >> 8) as u32)),
                "ferry_maglev",
                format!("{} set {} table", self.service((k >> 8) as u32), k & 1),
            ),
        };
        Difference { kind, map, entry }
    }
}
