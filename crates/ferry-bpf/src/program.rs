//! `Programmer`: Plan (or PlanDiff) in, ordered map operations out. Pure.
//!
//! It mirrors what is programmed, so one endpoint change produces the few
//! operations of that one service port. Operations come out in an order that
//! keeps the datapath consistent at every instant:
//!
//! 1. deletions of frontends no service port writes any more, and of whole
//!    removed service ports (frontends, then service entry and name, then
//!    slots, memberships, source ranges): first, so that removing one and
//!    adding one at a full map frees room before it is needed;
//! 2. new backends;
//! 3. the service's *inactive* slot revision, memberships, source ranges;
//! 4. the service entry, which flips the live revision in one atomic update;
//! 5. frontends and node entries;
//! 6. the remaining deletions (the inactive revision's surplus, node entries,
//!    a removed service port whose frontend another one takes over), backends
//!    last.
//!
//! Every operation is tagged with the service port it belongs to
//! ([`Batch`]), so each service port has its own commit point (its service
//! entry) and [`Batch::apply`] can write the others when one fails.
//!
//! The previous revision's slots are left in place (and counted as
//! references) until the next change overwrites them, so a reader holding the
//! old service entry always finds its slots and backends.
//!
//! Service ports are keyed by identity (`ServicePortId`), never by their
//! display name: the names map holds a name cut to 119 bytes, for `ferry
//! status` only. After a restart the mirror is rebuilt from the pinned maps
//! (`adopt`) and each service port of the next Plan takes back the id that
//! its frontends point at in the kernel (as Cilium restores its service ids),
//! so an unchanged Plan rewrites nothing. A frontend is only ever deleted if
//! no service port writes it in the same sync: when a frontend moves from
//! one service port to another, the new owner's write is the whole change.

use crate::entries::*;
use ferry_model::{
    EndpointSet, FrontendAddr, FrontendKey, FrontendKind, LocalDetector, Plan, PlanDiff, Route, ServicePort,
    ServicePortId,
};
use foldhash::{HashMap, HashMapExt, HashSet};
use std::collections::{BTreeMap, BTreeSet};

/// Connection-tracking lifetimes of the packet path, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_close: u32,
    pub udp: u32,
}

impl Default for CtTimeouts {
    /// The kernel's own conntrack defaults (what kube-proxy leaves in place),
    /// except TCP established: kube-proxy's 24 hours.
    fn default() -> Self {
        CtTimeouts { tcp_syn: 60, tcp_established: 86400, tcp_close: 10, udp: 30 }
    }
}

/// Facts about the running node and datapath settings that are not in the Plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRuntime {
    /// Network-namespace cookie of the host: sockets there are the host itself.
    pub host_netns_cookie: u64,
    pub timeouts: CtTimeouts,
    /// Inclusive SNAT source-port range.
    pub nat_ports: (u16, u16),
    /// Devices the tc programs are attached to, by ifindex.
    pub devices: BTreeMap<u32, Device>,
    /// Maglev for services without a `ferry.io/lb-algorithm` annotation.
    pub maglev_default: bool,
    /// Slots of every Maglev table (a prime from `ferry_model::maglev::TABLE_SIZES`).
    pub maglev_size: u32,
    /// The pass-through sets are complete (the agent filled them after the
    /// install, `crate::pass`): the config turns the fast path on.
    pub fast_pass: bool,
}

/// The name under which a service port is programmed (and shown by `ferry status`).
pub fn canonical_name(id: &ServicePortId) -> String {
    format!("{}/{}:{}/{}/{}", id.service.namespace(), id.service.name(), id.port_name, id.protocol, id.family)
}

/// What is programmed for one service port: ids, and the keys needed to
/// change or delete its entries. Kept small (a full sync keeps one per
/// service port): exactly sized lists, and what only some services have in
/// one optional box. The canonical name follows from the id, so it is not
/// kept (it was ~70 bytes per service port); a name found by `adopt` waits
/// in `Programmer::adopted_names`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Programmed {
    id: u32,
    svc: SvcVal,
    /// Its service entry is in the kernel (a refused new service port may
    /// have its name and slots there, and no service entry yet).
    has_service: bool,
    slots: Slots,
    /// Sorted by key.
    frontends: Box<[(FeKey, FeVal)]>,
    rare: Option<Box<Rare>>,
}

/// A service port's slot lists, `[rev][set]` -> backend ids in slot order,
/// in one exactly sized list: four boxed lists took 64 bytes in every
/// service port's record, most of them empty.
#[derive(Debug, Clone, Default, PartialEq)]
struct Slots {
    ids: Box<[u32]>,
    /// Lengths of the lists in `[rev][set]` order (a set never exceeds [`MAX_SET`]).
    lens: [u16; 4],
}

impl Slots {
    fn from_lists(lists: [[Vec<u32>; 2]; 2]) -> Slots {
        let mut slots = Slots::default();
        for (i, list) in lists.iter().flatten().enumerate() {
            slots.lens[i] = slot_no(list.len());
        }
        slots.ids = lists.into_iter().flatten().flatten().collect();
        slots
    }

    fn range(&self, rev: usize, set: usize) -> std::ops::Range<usize> {
        let i = rev * 2 + set;
        let start: usize = self.lens[..i].iter().map(|n| usize::from(*n)).sum();
        start..start + usize::from(self.lens[i])
    }

    fn get(&self, rev: usize, set: usize) -> &[u32] {
        &self.ids[self.range(rev, set)]
    }

    /// Puts `new` in place of one list.
    fn replace(&mut self, rev: usize, set: usize, new: &[u32]) {
        let at = self.range(rev, set);
        let mut ids = Vec::with_capacity(self.ids.len() - at.len() + new.len());
        ids.extend_from_slice(&self.ids[..at.start]);
        ids.extend_from_slice(new);
        ids.extend_from_slice(&self.ids[at.end..]);
        self.ids = ids.into_boxed_slice();
        self.lens[rev * 2 + set] = slot_no(new.len());
    }

    /// Every list with its `(rev, set)`.
    fn lists(&self) -> impl Iterator<Item = (usize, usize, &[u32])> {
        (0..4).map(|i| (i / 2, i % 2, self.get(i / 2, i % 2)))
    }
}

/// The entries only some service ports have: memberships (session
/// affinity), a source-range firewall, Maglev tables.
#[derive(Debug, Clone, Default, PartialEq)]
struct Rare {
    /// Sorted by key (a service has a few: a `BTreeMap` would allocate a whole node for each).
    members: Vec<(u32, u8)>,
    firewall: BTreeSet<FwKey>,
    /// Maglev tables per set, when the service uses Maglev.
    maglev: [Option<Box<[u32]>>; 2],
}

static NOTHING_RARE: Rare = Rare { members: Vec::new(), firewall: BTreeSet::new(), maglev: [None, None] };

impl Programmed {
    fn rare(&self) -> &Rare {
        self.rare.as_deref().unwrap_or(&NOTHING_RARE)
    }

    fn set_rare(&mut self, rare: Rare) {
        self.rare = (rare != NOTHING_RARE).then(|| Box::new(rare));
    }
}

#[derive(Debug, Clone, Default)]
struct IdPool {
    next: u32,
    free: Vec<u32>,
    /// Released during the current sync; reusable only after it, so a delete
    /// issued late in the batch never hits an id reissued early in it.
    released: Vec<u32>,
}

impl IdPool {
    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        })
    }
    fn release(&mut self, id: u32) {
        self.released.push(id);
    }
    fn settle(&mut self) {
        self.free.append(&mut self.released);
    }
    fn mark_used(&mut self, id: u32) {
        self.next = self.next.max(id);
        self.free.retain(|f| *f != id);
    }
}

/// Backends by id, with their reference counts, and their ids by address.
#[derive(Debug, Clone, Default)]
struct BackendTable {
    entries: BackendEntries,
    /// Backend ids, hashed by the address of the entry each names: the
    /// address is not stored twice (as a key it took 24 bytes a backend).
    by_addr: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    ids: IdPool,
}

/// A rank per kind of operation, to group a phase's operations by kind.
/// A new service port's name goes first: whatever else of it reaches the
/// kernel before a failure can then be found by `adopt` (it keys on names).
/// Values of [`kind_order`].
const KINDS: usize = 14;

fn kind_order(op: &MapOp) -> u8 {
    match op {
        MapOp::PutBackend(..) => 0,
        MapOp::PutName(..) => 1,
        MapOp::PutSlot(..) => 2,
        MapOp::PutMember(..) => 3,
        MapOp::PutFirewall(..) => 4,
        MapOp::PutMaglev(..) => 5,
        MapOp::PutService(..) => 6,
        MapOp::PutFrontend(..) => 7,
        MapOp::PutLocal(..) => 8,
        MapOp::PutRange(..) => 9,
        MapOp::PutConfig(..) => 10,
        MapOp::PutDevice(..) => 11,
        MapOp::PutAddr(..) => 12,
        _ => 13,
    }
}

/// Phases of a sync's operations, in the order they are emitted.
mod phase {
    /// Frontends no service port writes any more (moved ones are dropped).
    pub const DEL_FRONTEND: usize = 0;
    /// Removed service ports: their service entry and name, then the rest.
    /// Early, so remove-one-add-one at a full map frees room before it is needed.
    pub const REMOVE_SERVICE: usize = 1;
    pub const REMOVE_REST: usize = 2;
    pub const PUT_BACKEND: usize = 3;
    pub const PUT_INACTIVE: usize = 4;
    pub const PUT_SERVICE: usize = 5;
    pub const PUT_FRONTEND: usize = 6;
    pub const DEL_NODE: usize = 7;
    /// Removed service ports one of whose frontends another service port
    /// takes over in the same sync: after that write, never before.
    pub const LATE_REMOVE_SERVICE: usize = 8;
    pub const DEL_REST: usize = 9;
    pub const DEL_BACKEND: usize = 10;
    pub const COUNT: usize = 11;
}

/// Operations of one kind in one phase, in the order pushed, each with its
/// owner (an index into the batch's owners).
#[derive(Debug, Default)]
struct Group {
    ops: Vec<MapOp>,
    owners: Vec<u32>,
}

impl Group {
    fn push(&mut self, op: MapOp, owner: u32) {
        self.ops.push(op);
        self.owners.push(owner);
    }
    fn retain(&mut self, mut keep: impl FnMut(&MapOp, u32) -> bool) {
        let mut kept = 0;
        for i in 0..self.ops.len() {
            if keep(&self.ops[i], self.owners[i]) {
                self.ops.swap(kept, i);
                self.owners.swap(kept, i);
                kept += 1;
            }
        }
        self.ops.truncate(kept);
        self.owners.truncate(kept);
    }
    /// Moves out the operations of the owners `go` picks; both parts keep their order.
    fn split_off_owned(&mut self, go: impl Fn(u32) -> bool) -> Group {
        let mut out = Group::default();
        let ops = std::mem::take(&mut self.ops);
        let owners = std::mem::take(&mut self.owners);
        for (op, owner) in ops.into_iter().zip(owners) {
            if go(owner) { out.push(op, owner) } else { self.push(op, owner) }
        }
        out
    }
    /// Puts `front`'s operations before this group's.
    fn prepend(&mut self, mut front: Group) {
        front.ops.append(&mut self.ops);
        front.owners.append(&mut self.owners);
        *self = front;
    }
}

/// Operations grouped by phase and tagged with their owner; emitted in phase order.
#[derive(Debug, Default)]
struct Ops {
    /// `[phase][kind]`: order inside a phase carries no meaning, and grouping
    /// by kind (`kind_order`) lets `Maps::apply` write each run with one
    /// batch syscall. Grouped as they are pushed: sorting a million
    /// operations afterwards cost time and another copy of them all.
    phases: [[Group; KINDS]; phase::COUNT],
    /// Frontends written by this sync, with their writer: a deletion of one
    /// of them is dropped (the frontend moved to another service port, whose
    /// write replaces it).
    frontends_written: HashMap<FeKey, u32>,
    /// The owner of the operations pushed now (index into `owners`; 0: the node).
    owner: u32,
    /// The current owner is being removed whole.
    removing: bool,
    /// The owners; index 0 is the node's own entries.
    owners: Vec<Owner>,
    /// Addresses written into `ferry_addrs` by this sync (each once per owner).
    addrs_written: HashSet<(u32, LocalKey)>,
}

impl Ops {
    fn new() -> Ops {
        Ops { owners: vec![Owner::Node], ..Default::default() }
    }
    /// Operations pushed from now on belong to `owner`.
    fn begin(&mut self, owner: Owner, removing: bool) {
        self.owners.push(owner);
        self.owner = (self.owners.len() - 1) as u32;
        self.removing = removing;
    }
    /// Operations pushed from now on are the node's own.
    fn node(&mut self) {
        self.owner = 0;
        self.removing = false;
    }
    fn push(&mut self, op: MapOp) {
        if let MapOp::PutFrontend(k, _) = &op {
            self.frontends_written.insert(*k, self.owner);
        }
        // Every address a frontend or a node entry names goes into the
        // pass-through set first, so no packet to it is ever waved through
        // once the entry is live (removal: `crate::pass`).
        // Each owner writes its own (an address two service ports share must
        // not depend on the one that may be refused). A ClusterIP's any-port
        // marker needs none: its service ports write the address.
        let families = [FAM_V4, FAM_V6];
        match &op {
            MapOp::PutFrontend(k, v) if v.kind != FE_CLUSTER_IP_ANY_PORT => self.put_addr(k.addr, k.family),
            MapOp::PutLocal(k, _) => self.put_addr(k.addr, k.family),
            MapOp::PutDevice(_, d) => families.iter().zip(d.snat).for_each(|(f, a)| self.put_addr(a, *f)),
            MapOp::PutConfig(c) => families.iter().zip(c.primary).for_each(|(f, a)| self.put_addr(a, *f)),
            _ => {}
        }
        let removing = self.removing;
        let phase = match &op {
            MapOp::DelFrontend(..) => phase::DEL_FRONTEND,
            MapOp::DelService(..) | MapOp::DelName(..) if removing => phase::REMOVE_SERVICE,
            MapOp::DelService(..) | MapOp::DelName(..) => phase::LATE_REMOVE_SERVICE,
            MapOp::DelSlot(..) | MapOp::DelMember(..) | MapOp::DelFirewall(..) | MapOp::DelMaglev(..) if removing => {
                phase::REMOVE_REST
            }
            MapOp::DelSlot(..) | MapOp::DelMember(..) | MapOp::DelFirewall(..) | MapOp::DelMaglev(..) => {
                phase::DEL_REST
            }
            MapOp::PutBackend(..) => phase::PUT_BACKEND,
            MapOp::PutSlot(..)
            | MapOp::PutMember(..)
            | MapOp::PutFirewall(..)
            | MapOp::PutName(..)
            | MapOp::PutMaglev(..) => phase::PUT_INACTIVE,
            MapOp::PutService(..) => phase::PUT_SERVICE,
            MapOp::PutAddr(..) => phase::PUT_INACTIVE,
            MapOp::PutFrontend(..)
            | MapOp::PutLocal(..)
            | MapOp::PutRange(..)
            | MapOp::PutTunnel(..)
            | MapOp::PutTunnel6(..)
            | MapOp::PutConfig(..)
            | MapOp::PutDevice(..) => phase::PUT_FRONTEND,
            MapOp::DelLocal(..)
            | MapOp::DelRange(..)
            | MapOp::DelTunnel(..)
            | MapOp::DelTunnel6(..)
            | MapOp::DelDevice(..) => phase::DEL_NODE,
            MapOp::DelBackend(..) => phase::DEL_BACKEND,
        };
        let owner = self.owner;
        self.phases[phase][usize::from(kind_order(&op))].push(op, owner);
    }
    /// Queues `addr` for `ferry_addrs` (none for the NodePort wildcard or an unset SNAT address).
    fn put_addr(&mut self, addr: Words, family: u8) {
        let k = LocalKey { addr, family };
        if addr != [0; 4] && self.addrs_written.insert((self.owner, k)) {
            self.phases[phase::PUT_INACTIVE][usize::from(kind_order(&MapOp::PutAddr(k)))]
                .push(MapOp::PutAddr(k), self.owner);
        }
    }
    fn into_batch(mut self) -> Batch {
        let written = &self.frontends_written;
        // A removed service port whose frontend moves to another one keeps
        // its entries until that write is done (the frontend must never
        // point at a deleted service), and is refused with its taker.
        let mut late: HashMap<u32, Vec<(u32, FeKey)>> = HashMap::new();
        let removed: HashSet<u32> =
            self.phases[phase::REMOVE_SERVICE].iter().flat_map(|g| g.owners.iter().copied()).collect();
        for group in &mut self.phases[phase::DEL_FRONTEND] {
            group.retain(|op, owner| match op {
                MapOp::DelFrontend(k) => match written.get(k) {
                    Some(writer) => {
                        if removed.contains(&owner) {
                            late.entry(owner).or_default().push((*writer, *k));
                        }
                        false
                    }
                    None => true,
                },
                _ => true,
            });
        }
        if !late.is_empty() {
            for (from, to) in
                [(phase::REMOVE_SERVICE, phase::LATE_REMOVE_SERVICE), (phase::REMOVE_REST, phase::DEL_REST)]
            {
                for kind in 0..KINDS {
                    let go = self.phases[from][kind].split_off_owned(|o| late.contains_key(&o));
                    self.phases[to][kind].prepend(go);
                }
            }
        }
        // The groups become the batch as they are: a full sync is a million
        // operations, and a flat copy of them held both at once.
        let groups: Vec<Group> = self.phases.into_iter().flatten().filter(|g| !g.ops.is_empty()).collect();
        let mut depends = Vec::new();
        if !late.is_empty() {
            let mut put_at: HashMap<(u32, FeKey), usize> = HashMap::new();
            let in_order = groups.iter().flat_map(|g| g.ops.iter().zip(g.owners.iter().copied()));
            for (i, (op, owner)) in in_order.enumerate() {
                if let MapOp::PutFrontend(k, _) = op {
                    put_at.insert((owner, *k), i);
                }
            }
            for (removed, takers) in late {
                for (taker, k) in takers {
                    if let Some(&at) = put_at.get(&(taker, k)) {
                        depends.push(Dependency { removed, taker, at });
                    }
                }
            }
        }
        Batch { groups, owners: self.owners, depends }
    }
}

/// The owner name of the node's own entries (config, local addresses, ranges, devices, markers).
pub const NODE_OWNER: &str = "node";

/// Who a batch's operations belong to. Named only when refused: a full
/// sync has a hundred thousand owners and (nearly always) refuses none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The node's own entries ([`NODE_OWNER`]).
    Node,
    /// A service port of the Plan: its canonical name.
    Port(ServicePortId),
    /// A service port only the kernel knew (by the name found there), or
    /// [`HALF_WRITTEN_OWNER`].
    Named(String),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Node => f.write_str(NODE_OWNER),
            Owner::Port(id) => f.write_str(&canonical_name(id)),
            Owner::Named(name) => f.write_str(name),
        }
    }
}

/// The owner name of the deletions of half-written services found by
/// [`Programmer::adopt`] (left by an interrupted write of a new service).
pub const HALF_WRITTEN_OWNER: &str = "half-written services";

/// A removed service port whose frontend `taker` writes at op `at`: if the
/// taker is refused before that write, the removal must wait too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dependency {
    pub removed: u32,
    pub taker: u32,
    pub at: usize,
}

/// One sync's operations, each tagged with the service port it belongs to.
///
/// Each service port's own operations come in the consistent order (its
/// backends and inactive slots, then its service entry, then its
/// frontends), so each has its own commit point; [`Batch::apply`] skips the
/// rest of a service port once one of its operations fails and carries on
/// with the others. Operations of many service ports are grouped by kind so
/// that runs of puts into one map still go down in one batch syscall.
#[derive(Debug, Default)]
pub struct Batch {
    /// The operations in order, in groups of one kind and phase (see [`Batch::ops`]).
    groups: Vec<Group>,
    /// The owners; index 0 is the node ([`Owner::Node`]).
    pub owners: Vec<Owner>,
    pub depends: Vec<Dependency>,
}

/// A service port (or the node's entries) that could not be programmed this sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its display name (`namespace/name:port/protocol/family`), or [`NODE_OWNER`].
    pub owner: String,
    /// The operation that failed (or that was not attempted because of it).
    pub op: String,
    /// Why, short and stable (a metric label): `ferry_frontends full`, `shared backend refused`, ...
    pub cause: String,
    /// Why, in the operator's words.
    pub reason: String,
}

/// A failed map operation's short cause, for [`Refused::cause`].
pub trait Cause: std::fmt::Display {
    fn cause(&self) -> String;
}

impl Cause for &str {
    fn cause(&self) -> String {
        self.to_string()
    }
}

/// Most operations one run carries (bounds the buffers a batch syscall copies in).
pub const RUN: usize = 4096;

impl Batch {
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.ops.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.ops.is_empty())
    }

    /// The operations, in the order they are applied.
    pub fn ops(&self) -> impl Iterator<Item = &MapOp> {
        self.groups.iter().flat_map(|g| &g.ops)
    }

    /// The owner of each operation (an index into `owners`), in the order of [`Batch::ops`].
    pub fn owner_of(&self) -> impl Iterator<Item = u32> + '_ {
        self.groups.iter().flat_map(|g| g.owners.iter().copied())
    }

    /// The operations, in the order they are applied.
    pub fn into_ops(self) -> Vec<MapOp> {
        self.groups.into_iter().flat_map(|g| g.ops).collect()
    }

    /// Applies the operations in order, each service port on its own: once
    /// one of a service port's operations fails, its later ones are skipped
    /// (its service entry never flips to half-written slots) and every other
    /// service port carries on. `run` writes a run of operations of one kind
    /// at once and returns false if it could not (then each is written with
    /// `one`, which says which failed). A backend that failed to be written
    /// refuses every service port that puts it into a slot; deletions of
    /// backends are skipped once anything failed (the retry's adopt finds
    /// them orphaned and removes them). Returns the refused owners.
    pub fn apply<E: Cause>(
        &self,
        mut run: impl FnMut(&[MapOp]) -> bool,
        mut one: impl FnMut(&MapOp) -> Result<(), E>,
    ) -> Vec<Refused> {
        let mut st = ApplyState { failed: vec![false; self.owners.len()], ..Default::default() };
        // `at`: the index of a group's first operation in the whole batch.
        let mut at = 0;
        for g in &self.groups {
            let (ops, owners) = (&g.ops, &g.owners);
            let mut i = 0;
            while i < ops.len() {
                if !st.may_run(self, &ops[i], owners[i], at + i) {
                    i += 1;
                    continue;
                }
                let kind = std::mem::discriminant(&ops[i]);
                let mut j = i + 1;
                while j < ops.len()
                    && j - i < RUN
                    && std::mem::discriminant(&ops[j]) == kind
                    && st.may_run(self, &ops[j], owners[j], at + j)
                {
                    j += 1;
                }
                if j - i > 1 && run(&ops[i..j]) {
                    i = j;
                    continue;
                }
                for k in i..j {
                    let op = &ops[k];
                    if !st.may_run(self, op, owners[k], at + k) {
                        continue;
                    }
                    if let Err(e) = one(op) {
                        if let MapOp::PutBackend(id, _) = op {
                            st.failed_backends.insert(*id);
                        }
                        st.fail(self, owners[k], at + k, format!("{op:?}"), e.cause(), e.to_string());
                    }
                }
                i = j;
            }
            at += ops.len();
        }
        st.refused
    }
}

#[derive(Default)]
struct ApplyState {
    failed: Vec<bool>,
    failed_backends: HashSet<u32>,
    any_failed: bool,
    refused: Vec<Refused>,
}

impl ApplyState {
    /// Whether op `i` may be written now; refuses its owner if it needs a refused backend.
    fn may_run(&mut self, b: &Batch, op: &MapOp, owner: u32, i: usize) -> bool {
        if self.failed[owner as usize] {
            // Another service port may share this backend: it is missing for them too.
            if let MapOp::PutBackend(id, _) = op {
                self.failed_backends.insert(*id);
            }
            return false;
        }
        let needs_refused = match op {
            MapOp::DelBackend(..) => return !self.any_failed,
            MapOp::PutSlot(_, be) => self.failed_backends.contains(be).then_some(*be),
            MapOp::PutMaglev(_, t) if !self.failed_backends.is_empty() => {
                t.iter().find(|be| self.failed_backends.contains(be)).copied()
            }
            _ => None,
        };
        match needs_refused {
            Some(be) => {
                let reason =
                    format!("its backend {be} could not be written (another service port's write of it failed)");
                self.fail(b, owner, i, format!("{op:?}"), "shared backend refused".into(), reason);
                false
            }
            None => true,
        }
    }

    fn fail(&mut self, b: &Batch, owner: u32, at: usize, op: String, cause: String, reason: String) {
        self.any_failed = true;
        if std::mem::replace(&mut self.failed[owner as usize], true) {
            return;
        }
        self.refused.push(Refused { owner: b.owners[owner as usize].to_string(), op, cause, reason });
        for d in &b.depends {
            if d.taker == owner && at <= d.at && !self.failed[d.removed as usize] {
                let taker = &b.owners[owner as usize];
                let reason = format!("its frontend moves to {taker}, which was refused: the removal waits for it");
                self.fail(b, d.removed, at, "(removal)".into(), "frontend taker refused".into(), reason);
            }
        }
    }
}

/// What identifies a backend: its address (its flags may change in place).
fn backend_addr(be: &Backend) -> (Words, u16, u8) {
    (be.addr, be.port, be.family)
}

/// Backends with their reference counts, indexed by id. Ids are handed out
/// densely from 1 ([`IdPool`]), so a list serves where a hash table cost
/// 38 bytes a backend. A vacant place has family [`VACANT`].
#[derive(Debug, Clone, Default)]
struct BackendEntries(Vec<(Backend, u32)>);

/// The family of a vacant place in [`BackendEntries`] (real ones are `FAM_V4` / `FAM_V6`).
const VACANT: u8 = u8::MAX;

/// Ids above this are not ferry's (it issues them densely from 1): `adopt`
/// deletes such a backend rather than reserve room up to its id.
const MAX_BACKEND_ID: u32 = 1 << 24;

impl BackendEntries {
    fn get(&self, id: &u32) -> Option<&(Backend, u32)> {
        self.0.get(*id as usize).filter(|e| e.0.family != VACANT)
    }

    fn get_mut(&mut self, id: &u32) -> Option<&mut (Backend, u32)> {
        self.0.get_mut(*id as usize).filter(|e| e.0.family != VACANT)
    }

    fn insert(&mut self, id: u32, entry: (Backend, u32)) {
        let at = id as usize;
        if at >= self.0.len() {
            // A quarter more at a time rather than double: ids are dense, so
            // the list grows with the backends it holds, and churn (the
            // previous revision keeps its backends) grows it by a fraction.
            if at >= self.0.capacity() {
                self.0.reserve_exact((at + 1 - self.0.len()).max(self.0.len() / 4));
            }
            self.0.resize(at + 1, (Backend { addr: [0; 4], port: 0, family: VACANT, flags: 0 }, 0));
        }
        self.0[at] = entry;
    }

    fn remove(&mut self, id: &u32) -> Option<(Backend, u32)> {
        let found = *self.get(id)?;
        self.0[*id as usize].0.family = VACANT;
        while self.0.last().is_some_and(|e| e.0.family == VACANT) {
            self.0.pop();
        }
        Some(found)
    }

    /// Gives back the room a first sync's growth left (up to a quarter of the
    /// list), after a full sync: incremental ones grow it by a few.
    fn trim(&mut self) {
        if self.0.capacity() > self.0.len() + self.0.len() / 16 {
            self.0.shrink_to_fit();
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &(Backend, u32))> {
        self.0.iter().enumerate().filter(|(_, e)| e.0.family != VACANT).map(|(id, e)| (id as u32, e))
    }
}

impl std::ops::Index<&u32> for BackendEntries {
    type Output = (Backend, u32);
    fn index(&self, id: &u32) -> &(Backend, u32) {
        self.get(id).expect("backend table consistent")
    }
}

impl BackendTable {
    fn addr_hash(&self, be: &Backend) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(backend_addr(be))
    }

    /// The id of the backend at `be`'s address.
    fn find(&self, be: &Backend) -> Option<u32> {
        let entries = &self.entries;
        self.by_addr
            .find(self.addr_hash(be), |id| entries.get(id).is_some_and(|e| backend_addr(&e.0) == backend_addr(be)))
            .copied()
    }

    /// Records a backend under a new id, with `refs` references.
    fn insert(&mut self, id: u32, be: Backend, refs: u32) {
        let hash = self.addr_hash(&be);
        self.entries.insert(id, (be, refs));
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.by_addr.insert_unique(hash, id, |id| {
            use std::hash::BuildHasher;
            entries.get(id).map_or(0, |e| hasher.hash_one(backend_addr(&e.0)))
        });
    }

    /// Forgets backend `id`; returns it.
    fn forget(&mut self, id: u32) -> Option<Backend> {
        let hash = self.addr_hash(&self.entries.get(&id)?.0);
        if let Ok(found) = self.by_addr.find_entry(hash, |x| *x == id) {
            found.remove();
        }
        self.entries.remove(&id).map(|e| e.0)
    }

    fn acquire(&mut self, be: Backend, ops: &mut Ops) -> u32 {
        if let Some(id) = self.find(&be) {
            let entry = self.entries.get_mut(&id).expect("backend table consistent");
            entry.1 += 1;
            if entry.0 != be {
                entry.0 = be;
                ops.push(MapOp::PutBackend(id, be));
            }
            return id;
        }
        let id = self.ids.take();
        self.insert(id, be, 1);
        ops.push(MapOp::PutBackend(id, be));
        id
    }

    fn release(&mut self, id: u32, ops: &mut Ops) {
        let Some(entry) = self.entries.get_mut(&id) else { return };
        entry.1 -= 1;
        if entry.1 == 0 {
            self.forget(id);
            self.ids.release(id);
            ops.push(MapOp::DelBackend(id));
        }
    }
}

/// Everything read back from the kernel maps, for adopting a live datapath.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapDump {
    pub names: Vec<(u32, String)>,
    pub services: Vec<(u32, SvcVal)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub members: Vec<(MemberKey, u8)>,
    pub firewall: Vec<FwKey>,
    pub frontends: Vec<(FeKey, FeVal)>,
    pub backends: Vec<(u32, Backend)>,
    pub locals: Vec<(LocalKey, u8)>,
    pub ranges: Vec<RangeKey>,
    pub config: Option<Config>,
    pub devices: Vec<(u32, Device)>,
    pub maglev: Vec<(u64, Vec<u32>)>,
    /// `ferry_addrs` (the pass-through set the agent writes), sorted.
    pub addrs: Vec<LocalKey>,
    /// `ferry_tunnels` (DSR: remote backend range -> node address).
    pub tunnels: Vec<(TunnelKey, u32)>,
    /// `ferry_tunnels6` (the same for IPv6).
    pub tunnels6: Vec<(TunnelKey6, Words)>,
}

/// Service ports read back by `adopt` that no Plan has claimed yet.
#[derive(Debug, Clone, Default)]
struct Adopted {
    by_id: HashMap<u32, Box<Programmed>>,
    by_frontend: HashMap<FeKey, u32>,
    by_name: HashMap<String, Vec<u32>>,
}

impl Adopted {
    /// Takes an adopted service port out; `names` holds its name as found.
    fn take(&mut self, id: u32, names: &HashMap<u32, Box<str>>) -> Option<Box<Programmed>> {
        let prog = self.by_id.remove(&id)?;
        for (k, _) in prog.frontends.iter() {
            self.by_frontend.remove(k);
        }
        if let Some(ids) = names.get(&id).and_then(|name| self.by_name.get_mut(&**name)) {
            ids.retain(|i| *i != id);
        }
        Some(prog)
    }
}

/// Most backends in one set: slot numbers and counts are 16 bits.
const MAX_SET: usize = ferry_model::ServiceLimits::SLOT_CEILING as usize;

/// A slot number or count as the map stores it; never wraps (sets are capped at [`MAX_SET`]).
fn slot_no(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

/// Mirror of the programmed datapath; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Programmer {
    /// Boxed: the table's spare capacity then costs a pointer per slot, not a whole record.
    services: HashMap<ServicePortId, Box<Programmed>>,
    adopted: Adopted,
    /// The display name `adopt` found for a service id, until the first
    /// sync compares it with the canonical one (rewriting it if it differs).
    adopted_names: HashMap<u32, Box<str>>,
    service_ids: IdPool,
    backends: BackendTable,
    /// The ClusterIPs whose any-port markers are in the kernel. After a
    /// sync it is the Plan's own `cluster_ips` (a persistent set: the clone
    /// shares its nodes), so it costs next to nothing per ClusterIP; a copy
    /// of its own took ~30 bytes a Service.
    markers: imbl::OrdSet<std::net::IpAddr>,
    locals: BTreeMap<LocalKey, u8>,
    ranges: BTreeSet<RangeKey>,
    /// DSR tunnels (`ferry_tunnels`).
    tunnels: BTreeMap<TunnelKey, u32>,
    /// IPv6 DSR tunnels (`ferry_tunnels6`).
    tunnels6: BTreeMap<TunnelKey6, Words>,
    config: Option<Config>,
    devices: BTreeMap<u32, Device>,
    /// Entries of services left half-written by a failed apply or a crash
    /// (no name, or no service entry), found by `adopt`: deleted by the first
    /// sync after it, their ids reused only after that sync.
    half_written: (Vec<MapOp>, Vec<u32>),
}

/// The config flags of `loadBalancing.mode` (`ferry_model::dsr`; the datapath's `dsr_wanted`).
fn dsr_flags(mode: ferry_model::LoadBalancingMode) -> u8 {
    use ferry_model::LoadBalancingMode as M;
    match mode {
        M::Snat => 0,
        M::Hybrid => CFG_DSR_TCP,
        M::Dsr => CFG_DSR_TCP | CFG_DSR_DGRAM,
    }
}

fn action(route: &Route) -> u8 {
    match route {
        Route::Forward { set, masquerade, .. } => {
            let base = match set {
                EndpointSet::Cluster => ACT_FORWARD_CLUSTER,
                EndpointSet::Local => ACT_FORWARD_LOCAL,
            };
            if masquerade.masquerades() { base | ACT_MASQ } else { base }
        }
        Route::Drop { .. } => ACT_DROP,
        Route::Reject { .. } => ACT_REJECT,
    }
}

fn kind_code(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => FE_CLUSTER_IP,
        FrontendKind::NodePort => FE_NODE_PORT,
        FrontendKind::LoadBalancer => FE_LOAD_BALANCER,
        FrontendKind::ExternalIp => FE_EXTERNAL_IP,
    }
}

fn fe_key(key: &FrontendKey) -> FeKey {
    let (addr, family) = match key.addr {
        FrontendAddr::Ip(ip) => (words(&ip), family_of(&ip)),
        FrontendAddr::NodePort(f) => ([0; 4], family_code(f)),
    };
    FeKey { addr, port: key.port, proto: key.protocol.number(), family }
}

/// The frontend keys a service port may own (the Plan decides which it does own).
fn candidate_frontends(sp: &ServicePort) -> Vec<FrontendKey> {
    let mut out = vec![FrontendKey { addr: FrontendAddr::Ip(sp.cluster_ip), port: sp.port, protocol: sp.id.protocol }];
    for ip in sp.external_ips().iter().chain(sp.load_balancer_ips()) {
        out.push(FrontendKey { addr: FrontendAddr::Ip(*ip), port: sp.port, protocol: sp.id.protocol });
    }
    if let Some(np) = sp.node_port {
        out.push(FrontendKey { addr: FrontendAddr::NodePort(sp.id.family), port: np, protocol: sp.id.protocol });
    }
    out
}

fn fw_key(service: u32, net: &ipnet::IpNet) -> FwKey {
    FwKey { prefixlen: 32 + u32::from(net.prefix_len()), service, addr: words(&net.network()) }
}

impl Programmer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The id a service port is programmed under.
    pub fn service_id(&self, id: &ServicePortId) -> Option<u32> {
        self.services.get(id).map(|p| p.id)
    }

    /// Number of service ports programmed (adopted ones included).
    pub fn service_count(&self) -> usize {
        self.services.len() + self.adopted.by_id.len()
    }

    /// Rebuilds the mirror from the kernel's maps (agent restart). The next
    /// `sync` (a full one) gives each service port of its Plan the id its
    /// frontends have in the kernel, then changes only what differs.
    pub fn adopt(dump: &MapDump) -> Programmer {
        let mut p = Programmer::default();
        let services: HashMap<u32, SvcVal> = dump.services.iter().copied().collect();
        // A service is whole once both its name and its service entry are in;
        // anything else of an id that is not whole was left by an interrupted
        // write of a new service: it is deleted, not adopted.
        let whole: HashSet<u32> = dump.names.iter().map(|(id, _)| *id).filter(|id| services.contains_key(id)).collect();
        p.half_written = half_written(dump, &whole);
        for id in &p.half_written.1 {
            p.service_ids.mark_used(*id);
        }
        /// A service port as it is read back, entry by entry.
        #[derive(Default)]
        struct Draft {
            svc: Option<SvcVal>,
            slots: [[Vec<u32>; 2]; 2],
            frontends: Vec<(FeKey, FeVal)>,
            rare: Rare,
        }
        let mut drafts: HashMap<u32, Draft> = HashMap::new();
        for (id, _) in dump.names.iter().filter(|(id, _)| whole.contains(id)) {
            p.service_ids.mark_used(*id);
            drafts.insert(*id, Draft { svc: services.get(id).copied(), ..Default::default() });
        }
        let mut slots: Vec<(SlotKey, u32)> = dump.slots.clone();
        slots.sort();
        for (k, be) in slots {
            if let Some(d) = drafts.get_mut(&k.service) {
                let list = &mut d.slots[usize::from(k.rev & 1)][usize::from(k.set & 1)];
                if usize::from(k.slot) == list.len() {
                    list.push(be);
                }
            }
        }
        for (k, sets) in &dump.members {
            if let Some(d) = drafts.get_mut(&k.service) {
                d.rare.members.push((k.backend, *sets));
            }
        }
        for k in &dump.firewall {
            if let Some(d) = drafts.get_mut(&k.service) {
                d.rare.firewall.insert(*k);
            }
        }
        for (key, table) in &dump.maglev {
            let (service, set) = ((key >> 8) as u32, (key & 1) as usize);
            if let Some(d) = drafts.get_mut(&service) {
                d.rare.maglev[set] = Some(table.as_slice().into());
            }
        }
        for (k, v) in &dump.frontends {
            if v.kind == FE_CLUSTER_IP_ANY_PORT {
                p.markers.insert(ip_of(&k.addr, k.family));
            } else if let Some(d) = drafts.get_mut(&v.service) {
                d.frontends.push((*k, *v));
            }
        }
        let mut by_id: HashMap<u32, Box<Programmed>> = HashMap::with_capacity(drafts.len());
        for (id, mut d) in drafts {
            d.rare.members.sort_unstable();
            d.rare.members.dedup_by_key(|m| m.0);
            d.frontends.sort_unstable_by_key(|f| f.0);
            d.frontends.dedup_by_key(|f| f.0);
            let mut prog = Programmed {
                id,
                svc: d.svc.unwrap_or_default(),
                has_service: d.svc.is_some(),
                slots: Slots::from_lists(d.slots),
                frontends: d.frontends.into(),
                rare: None,
            };
            prog.set_rare(d.rare);
            by_id.insert(id, Box::new(prog));
        }
        let mut refs: HashMap<u32, u32> = HashMap::new();
        for prog in by_id.values() {
            for (_, _, list) in prog.slots.lists() {
                for be in list {
                    *refs.entry(*be).or_default() += 1;
                }
            }
        }
        for (id, be) in &dump.backends {
            if *id > MAX_BACKEND_ID {
                p.half_written.0.push(MapOp::DelBackend(*id));
                continue;
            }
            p.backends.ids.mark_used(*id);
            let n = refs.get(id).copied().unwrap_or(0);
            p.backends.insert(*id, *be, n);
        }
        for (id, name) in &dump.names {
            if let Some(prog) = by_id.remove(id) {
                p.adopted_names.insert(*id, name.as_str().into());
                for (k, _) in prog.frontends.iter() {
                    p.adopted.by_frontend.insert(*k, *id);
                }
                p.adopted.by_name.entry(name.clone()).or_default().push(*id);
                p.adopted.by_id.insert(*id, prog);
            }
        }
        p.locals = dump.locals.iter().copied().collect();
        p.ranges = dump.ranges.iter().copied().collect();
        p.tunnels = dump.tunnels.iter().copied().collect();
        p.tunnels6 = dump.tunnels6.iter().copied().collect();
        p.config = dump.config;
        p.devices = dump.devices.iter().copied().collect();
        p
    }

    /// Backends no slot references any more (left behind by a crash between
    /// two phases). Returned as deletions by the first sync after `adopt`.
    fn orphan_backends(&mut self, ops: &mut Ops) {
        let orphans: Vec<u32> = self.backends.entries.iter().filter(|(_, (_, n))| *n == 0).map(|(id, _)| id).collect();
        for id in orphans {
            if self.backends.forget(id).is_some() {
                self.backends.ids.release(id);
                ops.push(MapOp::DelBackend(id));
            }
        }
    }

    /// The operations that bring the datapath from what was programmed to
    /// `plan`. With `diff`, only the service ports it names are examined;
    /// without (or right after `adopt`), everything is.
    pub fn sync(&mut self, plan: &Plan, diff: Option<&PlanDiff>, rt: &NodeRuntime) -> Vec<MapOp> {
        self.sync_batch(plan, diff, rt).into_ops()
    }

    /// [`Programmer::sync`], with each operation tagged with the service
    /// port it belongs to, for [`Batch::apply`].
    pub fn sync_batch(&mut self, plan: &Plan, diff: Option<&PlanDiff>, rt: &NodeRuntime) -> Batch {
        let mut ops = Ops::new();
        let full = diff.is_none() || !self.adopted.by_id.is_empty() || !self.half_written.0.is_empty();
        let mut touched: Vec<(ServicePortId, Option<&std::sync::Arc<ServicePort>>)> = if full {
            let (dels, ids) = std::mem::take(&mut self.half_written);
            if !dels.is_empty() {
                // Removed whole, early (nothing of the plan references them).
                ops.begin(Owner::Named(HALF_WRITTEN_OWNER.to_string()), true);
                for op in dels {
                    ops.push(op);
                }
                ops.node();
            }
            for id in ids {
                self.service_ids.release(id);
            }
            self.orphan_backends(&mut ops);
            // Sized once for a first sync rather than rehashed on the way up.
            self.services.reserve(plan.services.len().saturating_sub(self.services.len()));
            self.claim_adopted(plan);
            // Each service port with what the Plan has for it, looked up once.
            let mut all: Vec<_> = plan.services.iter().map(|(id, sp)| (id.clone(), Some(sp))).collect();
            all.extend(self.services.keys().filter(|id| !plan.services.contains_key(*id)).map(|id| (id.clone(), None)));
            all
        } else {
            let d = diff.expect("not full");
            let mut t: Vec<&ServicePortId> = d.touched().into_iter().collect();
            t.extend(d.frontends_added.iter().chain(&d.frontends_removed).map(|(_, f)| &f.service));
            t.into_iter().map(|id| (id.clone(), plan.services.get(id))).collect()
        };
        // In id order (the Plan's order already, so nearly free), whatever the source.
        touched.sort_by(|a, b| a.0.cmp(&b.0));
        touched.dedup_by(|a, b| a.0 == b.0);
        for (id, sp) in &touched {
            match sp {
                Some(sp) => {
                    ops.begin(Owner::Port(id.clone()), false);
                    self.upsert(sp, plan, rt, &mut ops)
                }
                None => {
                    ops.begin(Owner::Port(id.clone()), true);
                    self.remove(id, &mut ops)
                }
            }
        }
        // Whatever was pinned and no service port of the Plan took back.
        let leftover: Vec<u32> = self.adopted.by_id.keys().copied().collect();
        for id in leftover {
            if let Some(prog) = self.adopted.take(id, &self.adopted_names) {
                let name = self.adopted_names.remove(&id).unwrap_or_default();
                ops.begin(Owner::Named(name.into()), true);
                self.remove_programmed(&prog, &mut ops);
            }
        }
        // What adopt read back and the sync has claimed or removed: the
        // emptied tables go too (they keep their size: ~10 MiB at 100k services).
        if self.adopted.by_id.is_empty() {
            self.adopted = Adopted::default();
        }
        if self.adopted_names.is_empty() {
            self.adopted_names = HashMap::new();
        }
        ops.node();
        match diff {
            Some(d) if !full && !d.node_changed => {
                self.sync_markers(plan, &d.cluster_ips_added, &d.cluster_ips_removed, &mut ops)
            }
            _ => self.sync_node(plan, rt, &mut ops),
        }
        self.service_ids.settle();
        self.backends.ids.settle();
        if full {
            self.backends.entries.trim();
        }
        ops.into_batch()
    }

    /// Every address the programmed entries name, for `ferry_addrs`
    /// (frontends but the NodePort wildcard, node addresses, SNAT addresses):
    /// what the agent writes before it turns the fast path on, since a sync
    /// only writes the addresses of the entries it changes, and what its
    /// collection keeps (`crate::pass`; there, from a Programmer just adopted
    /// from the maps).
    pub fn pass_addrs(&self) -> BTreeSet<LocalKey> {
        // Adopted service ports no sync has claimed yet count too: their
        // frontends are in the kernel (right after `adopt`, all of them are).
        let ports = self.services.values().chain(self.adopted.by_id.values());
        let frontends =
            ports.flat_map(|p| p.frontends.iter().map(|(k, _)| *k)).chain(self.markers.iter().map(marker_key));
        let mut out: BTreeSet<LocalKey> =
            frontends.map(|k| LocalKey { addr: k.addr, family: k.family }).filter(|k| k.addr != [0; 4]).collect();
        out.extend(self.locals.keys().copied());
        let families = [FAM_V4, FAM_V6];
        let snat = self.devices.values().flat_map(|d| families.into_iter().zip(d.snat));
        let primary = self.config.iter().flat_map(|c| families.into_iter().zip(c.primary));
        out.extend(snat.chain(primary).filter(|(_, a)| *a != [0; 4]).map(|(family, addr)| LocalKey { addr, family }));
        out
    }

    /// After `adopt`: each service port of `plan` takes back the id one of
    /// its frontends has in the kernel, else the id registered under its
    /// display name (when only one has it).
    fn claim_adopted(&mut self, plan: &Plan) {
        if self.adopted.by_id.is_empty() {
            return;
        }
        for (key, owner) in plan.frontends.iter() {
            if self.services.contains_key(&owner.service) {
                continue;
            }
            if let Some(&id) = self.adopted.by_frontend.get(&fe_key(key))
                && let Some(prog) = self.adopted.take(id, &self.adopted_names)
            {
                self.services.insert(owner.service.clone(), prog);
            }
        }
        for id in plan.services.keys() {
            if self.services.contains_key(id) {
                continue;
            }
            let name = truncate_name(canonical_name(id));
            let found = match self.adopted.by_name.get(&name).map(Vec::as_slice) {
                Some([only]) => Some(*only),
                _ => None,
            };
            if let Some(prog) = found.and_then(|n| self.adopted.take(n, &self.adopted_names)) {
                self.services.insert(id.clone(), prog);
            }
        }
    }

    fn upsert(&mut self, sp: &ServicePort, plan: &Plan, rt: &NodeRuntime, ops: &mut Ops) {
        let mut prog = self.services.remove(&sp.id).unwrap_or_default();
        let is_new = prog.id == 0;
        if is_new {
            prog.id = self.service_ids.take();
            prog.svc.rev = 1; // so the first write goes to revision 0
        }
        // Named only where a name is compared or written (new, or just adopted).
        let adopted = self.adopted_names.remove(&prog.id);
        if is_new || adopted.is_some() {
            let name = truncate_name(canonical_name(&sp.id));
            if adopted.is_none_or(|a| *a != *name) {
                ops.push(MapOp::PutName(prog.id, name.into()));
            }
        }
        let id = prog.id;

        // Desired slot lists, as backends.
        let backend_of = |e: &ferry_model::Endpoint| Backend {
            addr: words(&e.ip),
            port: e.port,
            family: family_of(&e.ip),
            flags: if e.local { BE_LOCAL } else { 0 },
        };
        // The planner refuses a Service with a larger set (ServiceLimits); the
        // cap only makes the 16-bit slot numbers below impossible to wrap.
        let want: [Vec<Backend>; 2] = [
            sp.endpoint_set(EndpointSet::Cluster).map(backend_of).take(MAX_SET).collect(),
            sp.endpoint_set(EndpointSet::Local).map(backend_of).take(MAX_SET).collect(),
        ];
        let live = usize::from(prog.svc.rev & 1);
        let same = !is_new
            && (0..2).all(|set| {
                let have = prog.slots.get(live, set);
                have.len() == want[set].len()
                    && have
                        .iter()
                        .zip(&want[set])
                        .all(|(id, be)| self.backends.entries.get(id).map(|e| e.0) == Some(*be))
            });
        let mut rev = prog.svc.rev & 1;
        if !same {
            rev ^= 1;
            let r = usize::from(rev);
            for (set, wanted) in want.iter().enumerate() {
                let old = prog.slots.get(r, set).to_vec();
                let mut new = Vec::with_capacity(wanted.len());
                for (i, be) in wanted.iter().enumerate() {
                    let bid = self.backends.acquire(*be, ops);
                    new.push(bid);
                    if old.get(i) != Some(&bid) {
                        let key = SlotKey { service: id, rev, set: set as u8, slot: slot_no(i) };
                        ops.push(MapOp::PutSlot(key, bid));
                    }
                }
                for (i, bid) in old.iter().enumerate() {
                    if i >= new.len() {
                        ops.push(MapOp::DelSlot(SlotKey { service: id, rev, set: set as u8, slot: slot_no(i) }));
                    }
                    self.backends.release(*bid, ops);
                }
                prog.slots.replace(r, set, &new);
            }
        }

        // Memberships of the live revision. Only session affinity reads them
        // (is the remembered backend still in the set?), so a service without
        // it has none: a fifth of a full sync's writes saved.
        let mut members: BTreeMap<u32, u8> = BTreeMap::new();
        for set in (0..2).filter(|_| sp.affinity_timeout_seconds.is_some()) {
            for bid in prog.slots.get(usize::from(rev), set) {
                *members.entry(*bid).or_default() |= 1 << set;
            }
        }
        let was = prog.rare.take().map(|r| *r).unwrap_or_default();
        for (bid, sets) in &members {
            if lookup(&was.members, bid) != Some(sets) {
                ops.push(MapOp::PutMember(MemberKey { service: id, backend: *bid }, *sets));
            }
        }
        for (bid, _) in &was.members {
            if !members.contains_key(bid) {
                ops.push(MapOp::DelMember(MemberKey { service: id, backend: *bid }));
            }
        }
        let mut rare = Rare { members: members.into_iter().collect(), ..Rare::default() };

        rare.firewall = sp.firewall().into_iter().flatten().map(|n| fw_key(id, n)).collect();
        for k in rare.firewall.difference(&was.firewall) {
            ops.push(MapOp::PutFirewall(*k));
        }
        for k in was.firewall.difference(&rare.firewall) {
            ops.push(MapOp::DelFirewall(*k));
        }

        let r = usize::from(rev);
        let use_maglev = sp.maglev.unwrap_or(rt.maglev_default) && rt.maglev_size > 0;
        for set in 0..2 {
            let want = if use_maglev && !prog.slots.get(r, set).is_empty() {
                let ids = prog.slots.get(r, set);
                let names: Vec<String> = ids
                    .iter()
                    .map(|id| {
                        let b = self.backends.entries[id].0;
                        format!("{}:{}", ip_of(&b.addr, b.family), b.port)
                    })
                    .collect();
                let idx = ferry_model::maglev::table(&names, rt.maglev_size);
                Some(idx.into_iter().map(|i| ids[i as usize]).collect::<Box<[u32]>>())
            } else {
                None
            };
            if want != was.maglev[set] {
                match &want {
                    Some(t) => ops.push(MapOp::PutMaglev(maglev_key(id, set as u8), t.clone())),
                    None => ops.push(MapOp::DelMaglev(maglev_key(id, set as u8))),
                }
            }
            rare.maglev[set] = want;
        }
        prog.set_rare(rare);
        let svc = SvcVal {
            count: [slot_no(prog.slots.get(r, 0).len()), slot_no(prog.slots.get(r, 1).len())],
            action: [
                [action(&sp.internal.pod), action(&sp.internal.host), action(&sp.internal.external)],
                [action(&sp.external.pod), action(&sp.external.host), action(&sp.external.external)],
            ],
            flags: if sp.affinity_timeout_seconds.is_some() { SVC_AFFINITY } else { 0 }
                | if use_maglev { SVC_MAGLEV } else { 0 },
            rev,
            affinity_timeout: sp.affinity_timeout_seconds.map_or(0, |t| t.get()),
        };
        if is_new || !prog.has_service || svc != prog.svc {
            ops.push(MapOp::PutService(id, svc));
            prog.has_service = true;
        }
        prog.svc = svc;

        // Sorted by key, as `prog.frontends` is (a list: a map allocated a
        // whole node for the one or two frontends of nearly every port).
        let mut frontends: Vec<(FeKey, FeVal)> = Vec::new();
        for key in candidate_frontends(sp) {
            let Some(owner) = plan.frontends.get(&key) else { continue };
            if owner.service != sp.id {
                continue;
            }
            let flags =
                if owner.kind == FrontendKind::LoadBalancer && sp.firewall().is_some() { FE_FIREWALL } else { 0 };
            frontends.push((fe_key(&key), FeVal { service: id, kind: kind_code(owner.kind), flags }));
        }
        // A key listed twice (an ExternalIP equal to the ClusterIP) has one owner, so one value.
        frontends.sort_unstable_by_key(|f| f.0);
        frontends.dedup_by_key(|f| f.0);
        for (k, v) in &frontends {
            if lookup(&prog.frontends, k) != Some(v) {
                ops.push(MapOp::PutFrontend(*k, *v));
            }
        }
        for (k, _) in prog.frontends.iter() {
            if lookup(&frontends, k).is_none() {
                ops.push(MapOp::DelFrontend(*k));
            }
        }
        prog.frontends = frontends.into_boxed_slice();
        self.services.insert(sp.id.clone(), prog);
    }

    fn remove(&mut self, id: &ServicePortId, ops: &mut Ops) {
        if let Some(prog) = self.services.remove(id) {
            self.remove_programmed(&prog, ops);
        }
    }

    fn remove_programmed(&mut self, prog: &Programmed, ops: &mut Ops) {
        let id = prog.id;
        self.adopted_names.remove(&id);
        for (k, _) in prog.frontends.iter() {
            ops.push(MapOp::DelFrontend(*k));
        }
        if prog.has_service {
            ops.push(MapOp::DelService(id));
        }
        ops.push(MapOp::DelName(id));
        for (rev, set, list) in prog.slots.lists() {
            for (i, bid) in list.iter().enumerate() {
                ops.push(MapOp::DelSlot(SlotKey { service: id, rev: rev as u8, set: set as u8, slot: slot_no(i) }));
                self.backends.release(*bid, ops);
            }
        }
        let rare = prog.rare();
        for (bid, _) in &rare.members {
            ops.push(MapOp::DelMember(MemberKey { service: id, backend: *bid }));
        }
        for k in &rare.firewall {
            ops.push(MapOp::DelFirewall(*k));
        }
        for (set, table) in rare.maglev.iter().enumerate() {
            if table.is_some() {
                ops.push(MapOp::DelMaglev(maglev_key(id, set as u8)));
            }
        }
        self.service_ids.release(id);
    }

    fn sync_node(&mut self, plan: &Plan, rt: &NodeRuntime, ops: &mut Ops) {
        let node = &plan.node;
        let mut locals = BTreeMap::new();
        for ip in &node.local_addresses {
            locals.insert(LocalKey { addr: words(ip), family: family_of(ip) }, LOCAL_HOST);
        }
        for ip in &node.node_port_addresses {
            *locals.entry(LocalKey { addr: words(ip), family: family_of(ip) }).or_default() |= LOCAL_NODEPORT;
        }
        for (k, v) in &locals {
            if self.locals.get(k) != Some(v) {
                ops.push(MapOp::PutLocal(*k, *v));
            }
        }
        for k in self.locals.keys() {
            if !locals.contains_key(k) {
                ops.push(MapOp::DelLocal(*k));
            }
        }
        self.locals = locals;

        let range = |kind: u8, net: &ipnet::IpNet| RangeKey {
            prefixlen: 32 + u32::from(net.prefix_len()),
            kind,
            family: family_of(&net.addr()),
            addr: words(&net.network()),
        };
        let mut ranges = BTreeSet::new();
        if matches!(node.local_detector, LocalDetector::ClusterCidr | LocalDetector::NodeCidr) {
            ranges.extend(node.pod_ranges.iter().map(|n| range(RANGE_POD, n)));
        }
        ranges.extend(node.service_cidrs.iter().map(|n| range(RANGE_SERVICE, n)));
        let masq_bpf = node.masquerade == ferry_model::MasqueradeMode::Bpf;
        if masq_bpf {
            ranges.extend(node.masquerade_sources.iter().map(|n| range(RANGE_MASQ_SOURCE, n)));
            ranges.extend(node.masquerade_exempt.iter().map(|(n, _)| range(RANGE_NO_MASQ, n)));
            ranges.extend(node.other_node_addresses.iter().map(|ip| range(RANGE_NO_MASQ, &ipnet::IpNet::from(*ip))));
        }
        for k in ranges.difference(&self.ranges) {
            ops.push(MapOp::PutRange(*k));
        }
        for k in self.ranges.difference(&ranges) {
            ops.push(MapOp::DelRange(*k));
        }
        self.ranges = ranges;
        self.sync_tunnels(node, ops);

        let class = |f| if node.detects_pods(f) { CLASS_POD } else { CLASS_EXTERNAL };
        let primary = |f| node.primary_ips.get(&f).map(words).unwrap_or([0; 4]);
        let flags = match node.local_detector {
            LocalDetector::ClusterCidr | LocalDetector::NodeCidr => CFG_PODS_BY_RANGE,
            LocalDetector::InterfaceNamePrefix(_) | LocalDetector::BridgeInterface(_) => CFG_PODS_BY_DEVICE,
            LocalDetector::None => 0,
        } | if masq_bpf { CFG_MASQ_BPF } else { 0 }
            | if rt.fast_pass { CFG_FAST_PASS } else { 0 }
            | dsr_flags(node.load_balancing);
        let config = Config {
            host_netns: rt.host_netns_cookie,
            pod_class: [class(ferry_model::IpFamily::V4), class(ferry_model::IpFamily::V6)],
            flags,
            primary: [primary(ferry_model::IpFamily::V4), primary(ferry_model::IpFamily::V6)],
            tcp_syn_timeout: rt.timeouts.tcp_syn,
            tcp_established_timeout: rt.timeouts.tcp_established,
            tcp_close_timeout: rt.timeouts.tcp_close,
            udp_timeout: rt.timeouts.udp,
            nat_port_min: rt.nat_ports.0,
            nat_port_max: rt.nat_ports.1,
            maglev_size: rt.maglev_size,
        };
        if self.config != Some(config) {
            ops.push(MapOp::PutConfig(Box::new(config)));
        }
        self.config = Some(config);

        for (ifindex, d) in &rt.devices {
            if self.devices.get(ifindex) != Some(d) {
                ops.push(MapOp::PutDevice(*ifindex, Box::new(*d)));
            }
        }
        for ifindex in self.devices.keys() {
            if !rt.devices.contains_key(ifindex) {
                ops.push(MapOp::DelDevice(*ifindex));
            }
        }
        self.devices = rt.devices.clone();

        for ip in plan.cluster_ips.iter().filter(|ip| !self.markers.contains(*ip)) {
            ops.push(MapOp::PutFrontend(marker_key(ip), FeVal { service: 0, kind: FE_CLUSTER_IP_ANY_PORT, flags: 0 }));
        }
        for ip in self.markers.iter().filter(|ip| !plan.cluster_ips.contains(*ip)) {
            ops.push(MapOp::DelFrontend(marker_key(ip)));
        }
        self.markers = plan.cluster_ips.clone();
    }

    /// ClusterIPs that came into or went out of use: their any-port markers.
    /// `ferry_tunnels` and `ferry_tunnels6` from the model's tunnel table
    /// (empty in snat mode), each family's rows into its own map.
    fn sync_tunnels(&mut self, node: &ferry_model::NodeFacts, ops: &mut Ops) {
        let want: BTreeMap<TunnelKey, u32> = node
            .tunnels
            .iter()
            .filter_map(|t| match (t.prefix, t.via) {
                (ipnet::IpNet::V4(n), std::net::IpAddr::V4(via)) => Some((
                    TunnelKey { prefixlen: u32::from(n.prefix_len()), addr: u32::from_ne_bytes(n.network().octets()) },
                    u32::from_ne_bytes(via.octets()),
                )),
                _ => None,
            })
            .collect();
        let want6: BTreeMap<TunnelKey6, Words> = node
            .tunnels
            .iter()
            .filter_map(|t| match (t.prefix, t.via) {
                (ipnet::IpNet::V6(n), via @ std::net::IpAddr::V6(_)) => Some((
                    TunnelKey6 {
                        prefixlen: u32::from(n.prefix_len()),
                        addr: words(&std::net::IpAddr::V6(n.network())),
                    },
                    words(&via),
                )),
                _ => None,
            })
            .collect();
        for (k, v) in &want6 {
            if self.tunnels6.get(k) != Some(v) {
                ops.push(MapOp::PutTunnel6(Box::new((*k, *v))));
            }
        }
        for k in self.tunnels6.keys() {
            if !want6.contains_key(k) {
                ops.push(MapOp::DelTunnel6(*k));
            }
        }
        self.tunnels6 = want6;
        for (k, v) in &want {
            if self.tunnels.get(k) != Some(v) {
                ops.push(MapOp::PutTunnel(*k, *v));
            }
        }
        for k in self.tunnels.keys() {
            if !want.contains_key(k) {
                ops.push(MapOp::DelTunnel(*k));
            }
        }
        self.tunnels = want;
    }

    /// The markers of the ClusterIPs a diff names; the set then becomes the
    /// Plan's (which is the old set with the diff applied: the planner
    /// derives both from the same change), sharing its nodes again.
    fn sync_markers(&mut self, plan: &Plan, added: &[std::net::IpAddr], removed: &[std::net::IpAddr], ops: &mut Ops) {
        for ip in removed {
            if self.markers.remove(ip).is_some() {
                ops.push(MapOp::DelFrontend(marker_key(ip)));
            }
        }
        for ip in added {
            if self.markers.insert(*ip).is_none() {
                ops.push(MapOp::PutFrontend(
                    marker_key(ip),
                    FeVal { service: 0, kind: FE_CLUSTER_IP_ANY_PORT, flags: 0 },
                ));
            }
        }
        self.markers = plan.cluster_ips.clone();
    }
}

/// The frontend that marks an address as a ClusterIP (other ports are rejected).
fn marker_key(ip: &std::net::IpAddr) -> FeKey {
    FeKey { addr: words(ip), port: 0, proto: 0, family: family_of(ip) }
}

/// The value of `key` in a list sorted by key.
fn lookup<'a, K: Ord, V>(list: &'a [(K, V)], key: &K) -> Option<&'a V> {
    list.binary_search_by(|(k, _)| k.cmp(key)).ok().map(|i| &list[i].1)
}

/// Names longer than the map's field are cut; they are for display only.
fn truncate_name(name: String) -> String {
    let mut s = name;
    while s.len() >= NAME_LEN {
        s.pop();
    }
    s
}

/// Deletions of every entry of a service id that is not whole (see
/// `Programmer::adopt`), and those ids.
fn half_written(dump: &MapDump, whole: &HashSet<u32>) -> (Vec<MapOp>, Vec<u32>) {
    let mut ops = Vec::new();
    let mut ids = BTreeSet::new();
    let mut orphan = |id: u32, op: MapOp| {
        if !whole.contains(&id) {
            ids.insert(id);
            ops.push(op);
        }
    };
    for (id, _) in &dump.names {
        orphan(*id, MapOp::DelName(*id));
    }
    for (id, _) in &dump.services {
        orphan(*id, MapOp::DelService(*id));
    }
    for (k, _) in &dump.slots {
        orphan(k.service, MapOp::DelSlot(*k));
    }
    for (k, _) in &dump.members {
        orphan(k.service, MapOp::DelMember(*k));
    }
    for k in &dump.firewall {
        orphan(k.service, MapOp::DelFirewall(*k));
    }
    for (key, _) in &dump.maglev {
        orphan((key >> 8) as u32, MapOp::DelMaglev(*key));
    }
    for (k, v) in &dump.frontends {
        if v.kind != FE_CLUSTER_IP_ANY_PORT {
            orphan(v.service, MapOp::DelFrontend(*k));
        }
    }
    (ops, ids.into_iter().collect())
}
