//! `Maps`: the pinned datapath maps, opened by path; applies `MapOp`s and reads state back.
//!
//! Works without the programs loaded (for `ferry status` and `ferry cleanup`)
//! because every map is pinned under the pin directory by its name. Each map
//! is declared once, as a [`Typed`] field of [`Maps`] with the skeleton's
//! generated `#[repr(C)]` key and value types, so the byte layout always
//! matches `bpf/lib/maps.h`; a pinned map of another size is refused when it
//! is opened, and a buffer of the wrong size is never padded or cut.

use crate::entries::*;
use crate::program::{Batch, MapDump, Refused};
use crate::skel::sock::types as t;
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// Every pinned map, by name.
pub const MAP_NAMES: &[&str] = &[
    "ferry_frontends",
    "ferry_services",
    "ferry_slots",
    "ferry_backends",
    "ferry_members",
    "ferry_sock_rev",
    "ferry_affinity",
    "ferry_firewall",
    "ferry_locals",
    "ferry_ranges",
    "ferry_config",
    "ferry_names",
    "ferry_stats",
    "ferry_devices",
    "ferry_ct",
    "ferry_ct_new",
    "ferry_maglev",
    "ferry_frags",
    "ferry_meta",
    "ferry_addrs",
    "ferry_peers",
    "ferry_tunnels",
    "ferry_dsr",
    "ferry_tunnels6",
    "ferry_dsr6",
];

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error(
        "opening pinned map {path}: {source} (is the datapath loaded? `ferry run` loads it; `ferry status` only reads it)"
    )]
    Open { path: PathBuf, source: libbpf_rs::Error },
    #[error("{op} on map {map} failed: {source}")]
    Op { op: String, map: &'static str, source: libbpf_rs::Error },
    #[error(
        "pinned map {map} has {what} size {found}, this ferry expects {expected}: it was created by another \
         version of the datapath; remove it with `ferry cleanup` (the next start re-creates it, dropping tracked flows)"
    )]
    Layout { map: &'static str, what: &'static str, expected: usize, found: usize },
    #[error("{op}: failure injected by a test")]
    Injected { op: String },
    #[error(
        "map {map} is full ({capacity} entries); raise its capacity in the node config (maps.*) or remove \
         objects (see `ferry status` for the fill of every map)"
    )]
    Full { map: &'static str, capacity: u32 },
    #[error(
        "the pinned datapath has no {map}: an older ferry installed it (see `ferry datapath layout`); start \
         this version's agent, which upgrades it in place"
    )]
    Missing { map: &'static str },
}

impl crate::program::Cause for MapError {
    fn cause(&self) -> String {
        match self {
            MapError::Full { map, .. } => format!("{map} full"),
            MapError::Op { map, source, .. } => format!("{map} {:?}", source.kind()),
            MapError::Open { .. } => "map not open".into(),
            MapError::Layout { map, .. } => format!("{map} layout"),
            MapError::Injected { .. } => "injected".into(),
            MapError::Missing { map } => format!("{map} missing"),
        }
    }
}

/// Plain-data types (`#[repr(C)]`, no padding holes) as bytes.
pub(crate) fn bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: every type passed here is a generated #[repr(C)] struct of
    // integers without implicit padding, so all its bytes are initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A plain-data value from exactly its bytes. `Maps::open` checked every
/// map's key and value sizes, so a short or long buffer means the kernel
/// returned something else entirely: it panics rather than pad or cut.
pub(crate) fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    assert_eq!(
        b.len(),
        std::mem::size_of::<T>(),
        "map entry of {} bytes read as {} ({} bytes)",
        b.len(),
        std::any::type_name::<T>(),
        std::mem::size_of::<T>()
    );
    let mut v = T::default();
    // SAFETY: copying exactly size_of::<T>() bytes into a plain-data value.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len()) };
    v
}

/// One pinned map with the key and value types of its C declaration (the
/// skeleton's generated `#[repr(C)]` types from `bpf/lib/maps.h`, or a plain
/// integer). Each map is declared once, as a field of [`Maps`]; opening it
/// checks the pinned map's key and value sizes against those types and
/// refuses another layout ([`MapError::Layout`]). Derefs to the raw handle.
pub struct Typed<K, V> {
    name: &'static str,
    handle: MapHandle,
    _kv: PhantomData<fn() -> (K, V)>,
}

impl<K: Copy + Default, V: Copy + Default> Typed<K, V> {
    fn open(dir: &Path, name: &'static str) -> Result<Self, MapError> {
        let path = dir.join(name);
        let handle = MapHandle::from_pinned_path(&path).map_err(|source| MapError::Open { path, source })?;
        let sizes = [
            ("key", std::mem::size_of::<K>(), handle.key_size()),
            ("value", std::mem::size_of::<V>(), handle.value_size()),
        ];
        for (what, expected, found) in sizes {
            if found as usize != expected {
                return Err(MapError::Layout { map: name, what, expected, found: found as usize });
            }
        }
        Ok(Typed { name, handle, _kv: PhantomData })
    }

    /// As [`Typed::open`], but a map not pinned at all is `None`.
    fn open_optional(dir: &Path, name: &'static str) -> Result<Option<Self>, MapError> {
        if !dir.join(name).exists() {
            return Ok(None);
        }
        Typed::open(dir, name).map(Some)
    }

    /// The map's name (its pin file).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Every entry, decoded (entries deleted while listing are skipped).
    fn entries(&self) -> Vec<(K, V)> {
        self.handle
            .keys()
            .filter_map(|k| {
                let v = self.handle.lookup(&k, MapFlags::ANY).ok().flatten()?;
                Some((from_bytes::<K>(&k), from_bytes::<V>(&v)))
            })
            .collect()
    }
}

impl<K, V> std::ops::Deref for Typed<K, V> {
    type Target = MapHandle;
    fn deref(&self) -> &MapHandle {
        &self.handle
    }
}

fn enc_fe_key(k: &FeKey) -> t::fe_key {
    t::fe_key { addr: k.addr, port: k.port.to_be(), proto: k.proto, family: k.family }
}
fn dec_fe_key(k: t::fe_key) -> FeKey {
    FeKey { addr: k.addr, port: u16::from_be(k.port), proto: k.proto, family: k.family }
}
fn enc_fe_val(v: &FeVal) -> t::fe_val {
    t::fe_val { service: v.service, kind: v.kind, flags: v.flags, pad: 0 }
}
fn enc_svc(v: &SvcVal) -> t::svc_val {
    t::svc_val { count: v.count, action: v.action, flags: v.flags, rev: v.rev, affinity_timeout: v.affinity_timeout }
}
fn dec_svc(v: t::svc_val) -> SvcVal {
    SvcVal { count: v.count, action: v.action, flags: v.flags, rev: v.rev, affinity_timeout: v.affinity_timeout }
}
fn enc_slot(k: &SlotKey) -> t::slot_key {
    t::slot_key { service: k.service, rev: k.rev, set: k.set, slot: k.slot }
}
fn enc_backend(b: &Backend) -> t::backend {
    t::backend { addr: b.addr, port: b.port.to_be(), family: b.family, flags: b.flags }
}
fn dec_backend(b: t::backend) -> Backend {
    Backend { addr: b.addr, port: u16::from_be(b.port), family: b.family, flags: b.flags }
}
fn enc_member(k: &MemberKey) -> t::member_key {
    t::member_key { service: k.service, backend: k.backend }
}
fn enc_fw(k: &FwKey) -> t::fw_key {
    t::fw_key { prefixlen: k.prefixlen, service: k.service, addr: k.addr }
}
fn enc_local(k: &LocalKey) -> t::local_key {
    t::local_key { addr: k.addr, family: k.family, pad: [0; 3] }
}
fn enc_range(k: &RangeKey) -> t::range_key {
    t::range_key { prefixlen: k.prefixlen, kind: k.kind, family: k.family, pad: 0, addr: k.addr }
}
fn enc_tunnel(k: &TunnelKey) -> t::tunnel_key {
    t::tunnel_key { prefixlen: k.prefixlen, addr: k.addr }
}
fn enc_tunnel6(k: &TunnelKey6) -> t::tunnel6_key {
    t::tunnel6_key { prefixlen: k.prefixlen, addr: k.addr }
}
fn enc_config(c: &Config) -> t::config {
    t::config {
        host_netns: c.host_netns,
        pod_class: c.pod_class,
        flags: c.flags,
        pad: [0; 5],
        primary: c.primary,
        tcp_syn_timeout: c.tcp_syn_timeout,
        tcp_established_timeout: c.tcp_established_timeout,
        tcp_close_timeout: c.tcp_close_timeout,
        udp_timeout: c.udp_timeout,
        nat_port_min: c.nat_port_min,
        nat_port_max: c.nat_port_max,
        maglev_size: c.maglev_size,
    }
}
fn dec_config(c: t::config) -> Config {
    Config {
        host_netns: c.host_netns,
        pod_class: c.pod_class,
        flags: c.flags,
        primary: c.primary,
        tcp_syn_timeout: c.tcp_syn_timeout,
        tcp_established_timeout: c.tcp_established_timeout,
        tcp_close_timeout: c.tcp_close_timeout,
        udp_timeout: c.udp_timeout,
        nat_port_min: c.nat_port_min,
        nat_port_max: c.nat_port_max,
        maglev_size: c.maglev_size,
    }
}
fn enc_device(d: &Device) -> t::device {
    t::device { snat: d.snat, flags: d.flags, pad: [0; 3] }
}
fn enc_name(s: &str) -> t::svc_name {
    let mut n = t::svc_name::default();
    for (dst, src) in n.name.iter_mut().zip(s.bytes().take(NAME_LEN - 1)) {
        *dst = src as i8;
    }
    n
}
fn dec_name(n: &t::svc_name) -> String {
    let raw: Vec<u8> = n.name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&raw).into_owned()
}

/// Every pinned map, each declared once with its key and value types.
pub struct Maps {
    pub dir: PathBuf,
    frontends: Typed<t::fe_key, t::fe_val>,
    services: Typed<u32, t::svc_val>,
    slots: Typed<t::slot_key, u32>,
    backends: Typed<u32, t::backend>,
    members: Typed<t::member_key, u8>,
    sock_rev: Typed<t::rev_key, t::rev_val>,
    affinity: Typed<t::aff_key, t::aff_val>,
    firewall: Typed<t::fw_key, u8>,
    locals: Typed<t::local_key, u8>,
    ranges: Typed<t::range_key, u8>,
    config: Typed<u32, t::config>,
    names: Typed<u32, t::svc_name>,
    stats: Typed<u32, u64>,
    devices: Typed<u32, t::device>,
    ct: Typed<t::ct_key, t::ct_val>,
    /// Optional, as the pass-through sets: `ferry status` of this build
    /// still reads a datapath an older layout pinned (before its agent
    /// upgrades it), which lacks them.
    ct_new: Option<Typed<t::ct_key, t::ct_val>>,
    maglev: Typed<u64, u32>,
    frags: Typed<t::frag_key, t::frag_val>,
    addrs: Option<Typed<t::local_key, u8>>,
    peers: Option<Typed<t::local_key, u8>>,
    /// Optional: a datapath of layout 3 or older (before DSR) lacks it.
    tunnels: Option<Typed<t::tunnel_key, u32>>,
    /// Optional, as `tunnels`: the balancing node's DSR flows.
    dsr: Option<Typed<t::ct_key, t::dsr_val>>,
    /// Optional: a datapath of layout 5 or older (before IPv6 DSR) lacks them.
    tunnels6: Option<Typed<t::tunnel6_key, t::tunnel6_val>>,
    dsr6: Option<Typed<t::ct_key, t::dsr6_val>>,
}

impl Maps {
    /// Opens the maps pinned in `dir` (e.g. /sys/fs/bpf/ferry).
    /// A pinned map whose key or value size differs from the types below is
    /// refused with [`MapError::Layout`].
    pub fn open(dir: &Path) -> Result<Maps, MapError> {
        Ok(Maps {
            dir: dir.to_path_buf(),
            frontends: Typed::open(dir, "ferry_frontends")?,
            services: Typed::open(dir, "ferry_services")?,
            slots: Typed::open(dir, "ferry_slots")?,
            backends: Typed::open(dir, "ferry_backends")?,
            members: Typed::open(dir, "ferry_members")?,
            sock_rev: Typed::open(dir, "ferry_sock_rev")?,
            affinity: Typed::open(dir, "ferry_affinity")?,
            firewall: Typed::open(dir, "ferry_firewall")?,
            locals: Typed::open(dir, "ferry_locals")?,
            ranges: Typed::open(dir, "ferry_ranges")?,
            config: Typed::open(dir, "ferry_config")?,
            names: Typed::open(dir, "ferry_names")?,
            stats: Typed::open(dir, "ferry_stats")?,
            devices: Typed::open(dir, "ferry_devices")?,
            ct: Typed::open(dir, "ferry_ct")?,
            ct_new: Typed::open_optional(dir, "ferry_ct_new")?,
            maglev: Typed::open(dir, "ferry_maglev")?,
            frags: Typed::open(dir, "ferry_frags")?,
            addrs: Typed::open_optional(dir, "ferry_addrs")?,
            peers: Typed::open_optional(dir, "ferry_peers")?,
            tunnels: Typed::open_optional(dir, "ferry_tunnels")?,
            dsr: Typed::open_optional(dir, "ferry_dsr")?,
            tunnels6: Typed::open_optional(dir, "ferry_tunnels6")?,
            dsr6: Typed::open_optional(dir, "ferry_dsr6")?,
        })
    }

    /// Applies operations in order; stops at the first failure.
    pub fn apply(&self, ops: &[MapOp]) -> Result<(), MapError> {
        let mut i = 0;
        while i < ops.len() {
            // A run of puts into one hash map goes down in one BPF_MAP_UPDATE_BATCH
            // syscall (a full sync is a million of them at 100k services). The run
            // is contiguous, so the order the Programmer chose (slots before the
            // service flip, ...) is kept.
            let Some(first) = self.put_entry(&ops[i]) else {
                self.apply_one(&ops[i])?;
                i += 1;
                continue;
            };
            let mut run = vec![first];
            while i + run.len() < ops.len() && run.len() < BATCH {
                match self.put_entry(&ops[i + run.len()]) {
                    Some(e) if std::ptr::eq(e.map, run[0].map) => run.push(e),
                    _ => break,
                }
            }
            if run.len() == 1 || !put_batch(&run) {
                for (e, op) in run.iter().zip(&ops[i..]) {
                    e.map.update(&e.key, &e.value, MapFlags::ANY).map_err(|source| MapError::Op {
                        op: format!("{op:?}"),
                        map: e.name,
                        source,
                    })?;
                }
            }
            i += run.len();
        }
        Ok(())
    }

    /// Test seam (fault injection): what [`Maps::apply`] leaves when the
    /// operation at index `fail_at` fails: the operations before it are
    /// applied, it and the rest are not, and an error is returned
    /// (`crates/ferry-bpf/tests/faults.rs` runs it for every index).
    #[doc(hidden)]
    pub fn apply_failing_at(&self, ops: &[MapOp], fail_at: usize) -> Result<(), MapError> {
        if fail_at >= ops.len() {
            return self.apply(ops);
        }
        self.apply(&ops[..fail_at])?;
        Err(MapError::Injected { op: format!("{:?}", ops[fail_at]) })
    }

    /// Applies a sync's operations each service port on its own
    /// ([`Batch::apply`]): runs of puts into one hash map still go down in
    /// one `BPF_MAP_UPDATE_BATCH`; one failing service port (its map is
    /// full, say) is skipped from there on and the others are written.
    /// Returns the refused service ports by name, with the reason.
    pub fn apply_batch(&self, batch: &Batch) -> Vec<Refused> {
        batch.apply(|run| self.put_run(run), |op| self.apply_op(op))
    }

    /// Test seam (fault injection) for the agent's path: [`Maps::apply_batch`]
    /// where the `fail_at`-th operation written to the kernel (counting
    /// from 0, in order; operations skipped for a refused service port are
    /// not written, so not counted) fails with [`MapError::Injected`]. A run
    /// holding that operation is written one by one.
    #[doc(hidden)]
    pub fn apply_batch_failing_at(&self, batch: &Batch, fail_at: usize) -> Vec<Refused> {
        let written = std::cell::Cell::new(0usize);
        batch.apply(
            |run| {
                let at = written.get();
                if (at..at + run.len()).contains(&fail_at) {
                    return false;
                }
                let ok = self.put_run(run);
                if ok {
                    written.set(at + run.len());
                }
                ok
            },
            |op| {
                let at = written.get();
                written.set(at + 1);
                if at == fail_at {
                    return Err(MapError::Injected { op: format!("{op:?}") });
                }
                self.apply_op(op)
            },
        )
    }

    /// A run of puts of one kind in one syscall; false if they are not puts
    /// into a hash map or the kernel refused the batch.
    fn put_run(&self, ops: &[MapOp]) -> bool {
        let run: Option<Vec<Put<'_>>> = ops.iter().map(|op| self.put_entry(op)).collect();
        run.is_some_and(|run| put_batch(&run))
    }

    /// One operation; a full map is reported as [`MapError::Full`].
    fn apply_op(&self, op: &MapOp) -> Result<(), MapError> {
        let result = match self.put_entry(op) {
            Some(e) => e.map.update(&e.key, &e.value, MapFlags::ANY).map_err(|source| MapError::Op {
                op: format!("{op:?}"),
                map: e.name,
                source,
            }),
            None => self.apply_one(op),
        };
        result.map_err(|e| match e {
            MapError::Op { map, source, .. } if source.kind() == libbpf_rs::ErrorKind::TooBig => {
                let capacity = self.capacity(map).unwrap_or(0);
                MapError::Full { map, capacity }
            }
            e => e,
        })
    }

    /// The capacity (max_entries) of a pinned map, by name.
    pub fn capacity(&self, map: &str) -> Option<u32> {
        let handle: &MapHandle = match map {
            "ferry_frontends" => &self.frontends,
            "ferry_services" => &self.services,
            "ferry_slots" => &self.slots,
            "ferry_backends" => &self.backends,
            "ferry_members" => &self.members,
            "ferry_firewall" => &self.firewall,
            "ferry_names" => &self.names,
            "ferry_maglev" => &self.maglev,
            "ferry_locals" => &self.locals,
            "ferry_ranges" => &self.ranges,
            "ferry_devices" => &self.devices,
            "ferry_addrs" => self.addrs.as_ref()?,
            "ferry_peers" => self.peers.as_ref()?,
            "ferry_tunnels" => self.tunnels.as_ref()?,
            "ferry_tunnels6" => self.tunnels6.as_ref()?,
            _ => return None,
        };
        Some(handle.max_entries())
    }

    /// A put into one of the plain hash maps, encoded; `None` for every other operation.
    fn put_entry(&self, op: &MapOp) -> Option<Put<'_>> {
        let (map, name, key, value): (&MapHandle, &'static str, Vec<u8>, Vec<u8>) = match op {
            MapOp::PutBackend(id, b) => {
                (&self.backends, "ferry_backends", id.to_ne_bytes().to_vec(), bytes(&enc_backend(b)).to_vec())
            }
            MapOp::PutSlot(k, be) => {
                (&self.slots, "ferry_slots", bytes(&enc_slot(k)).to_vec(), be.to_ne_bytes().to_vec())
            }
            MapOp::PutMember(k, sets) => (&self.members, "ferry_members", bytes(&enc_member(k)).to_vec(), vec![*sets]),
            MapOp::PutService(id, v) => {
                (&self.services, "ferry_services", id.to_ne_bytes().to_vec(), bytes(&enc_svc(v)).to_vec())
            }
            MapOp::PutName(id, n) => {
                (&self.names, "ferry_names", id.to_ne_bytes().to_vec(), bytes(&enc_name(n)).to_vec())
            }
            MapOp::PutFrontend(k, v) => {
                (&self.frontends, "ferry_frontends", bytes(&enc_fe_key(k)).to_vec(), bytes(&enc_fe_val(v)).to_vec())
            }
            MapOp::PutAddr(k) => (self.addrs.as_ref()?, "ferry_addrs", bytes(&enc_local(k)).to_vec(), vec![1]),
            _ => return None,
        };
        Some(Put { map, name, key, value })
    }

    fn apply_one(&self, op: &MapOp) -> Result<(), MapError> {
        let put = |m: &MapHandle, name: &'static str, k: &[u8], v: &[u8]| {
            m.update(k, v, MapFlags::ANY).map_err(|source| MapError::Op { op: format!("{op:?}"), map: name, source })
        };
        // A missing key on delete means the state is already what we want.
        let del = |m: &MapHandle, name: &'static str, k: &[u8]| match m.delete(k) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(MapError::Op { op: format!("{op:?}"), map: name, source }),
        };
        let one = [1u8];
        match op {
            MapOp::PutBackend(..)
            | MapOp::PutSlot(..)
            | MapOp::PutMember(..)
            | MapOp::PutService(..)
            | MapOp::PutName(..)
            | MapOp::PutFrontend(..) => unreachable!("apply writes puts into the hash maps itself"),
            MapOp::PutAddr(..) => Err(MapError::Missing { map: "ferry_addrs" }),
            MapOp::DelBackend(id) => del(&self.backends, "ferry_backends", &id.to_ne_bytes()),
            MapOp::DelSlot(k) => del(&self.slots, "ferry_slots", bytes(&enc_slot(k))),
            MapOp::DelMember(k) => del(&self.members, "ferry_members", bytes(&enc_member(k))),
            MapOp::PutFirewall(k) => put(&self.firewall, "ferry_firewall", bytes(&enc_fw(k)), &one),
            MapOp::DelFirewall(k) => del(&self.firewall, "ferry_firewall", bytes(&enc_fw(k))),
            MapOp::DelService(id) => del(&self.services, "ferry_services", &id.to_ne_bytes()),
            MapOp::DelName(id) => del(&self.names, "ferry_names", &id.to_ne_bytes()),
            MapOp::DelFrontend(k) => del(&self.frontends, "ferry_frontends", bytes(&enc_fe_key(k))),
            MapOp::PutLocal(k, v) => put(&self.locals, "ferry_locals", bytes(&enc_local(k)), &[*v]),
            MapOp::DelLocal(k) => del(&self.locals, "ferry_locals", bytes(&enc_local(k))),
            MapOp::PutRange(k) => put(&self.ranges, "ferry_ranges", bytes(&enc_range(k)), &one),
            MapOp::DelRange(k) => del(&self.ranges, "ferry_ranges", bytes(&enc_range(k))),
            MapOp::PutTunnel(k, via) => match &self.tunnels {
                Some(m) => put(m, "ferry_tunnels", bytes(&enc_tunnel(k)), &via.to_ne_bytes()),
                None => Err(MapError::Missing { map: "ferry_tunnels" }),
            },
            MapOp::DelTunnel(k) => match &self.tunnels {
                Some(m) => del(m, "ferry_tunnels", bytes(&enc_tunnel(k))),
                None => Ok(()),
            },
            MapOp::PutTunnel6(kv) => match &self.tunnels6 {
                Some(m) => put(m, "ferry_tunnels6", bytes(&enc_tunnel6(&kv.0)), bytes(&t::tunnel6_val { addr: kv.1 })),
                None => Err(MapError::Missing { map: "ferry_tunnels6" }),
            },
            MapOp::DelTunnel6(k) => match &self.tunnels6 {
                Some(m) => del(m, "ferry_tunnels6", bytes(&enc_tunnel6(k))),
                None => Ok(()),
            },
            MapOp::PutConfig(c) => put(&self.config, "ferry_config", &0u32.to_ne_bytes(), bytes(&enc_config(c))),
            MapOp::PutDevice(i, d) => put(&self.devices, "ferry_devices", &i.to_ne_bytes(), bytes(&enc_device(d))),
            MapOp::DelDevice(i) => del(&self.devices, "ferry_devices", &i.to_ne_bytes()),
            MapOp::PutMaglev(key, table) => self.put_maglev(*key, table).map_err(|source| MapError::Op {
                op: format!("PutMaglev({key:#x}, {} slots)", table.len()),
                map: "ferry_maglev",
                source,
            }),
            MapOp::DelMaglev(key) => del(&self.maglev, "ferry_maglev", &key.to_ne_bytes()),
        }
    }

    /// Builds a new inner table and swaps it in with one update of the outer map.
    fn put_maglev(&self, key: u64, table: &[u32]) -> Result<(), libbpf_rs::Error> {
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: libbpf_sys::BPF_F_INNER_MAP,
            ..Default::default()
        };
        let inner =
            MapHandle::create(libbpf_rs::MapType::Array, Some("ferry_maglev_t"), 4, 4, table.len() as u32, &opts)?;
        let keys: Vec<u8> = (0..table.len() as u32).flat_map(|i| i.to_ne_bytes()).collect();
        let values: Vec<u8> = table.iter().flat_map(|v| v.to_ne_bytes()).collect();
        inner.update_batch(&keys, &values, table.len() as u32, MapFlags::ANY, MapFlags::ANY)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&inner)) as u32;
        self.maglev.update(&key.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
    }

    fn maglev_tables(&self) -> Vec<(u64, Vec<u32>)> {
        let mut out = Vec::new();
        for k in self.maglev.keys() {
            let Ok(Some(id)) = self.maglev.lookup(&k, MapFlags::ANY) else { continue };
            let Ok(inner) = MapHandle::from_map_id(from_bytes::<u32>(&id)) else { continue };
            let size = inner.info().map(|i| i.info.max_entries).unwrap_or(0);
            let table: Vec<u32> = (0..size)
                .map(|i| {
                    inner.lookup(&i.to_ne_bytes(), MapFlags::ANY).ok().flatten().map(|v| from_bytes(&v)).unwrap_or(0)
                })
                .collect();
            out.push((from_bytes::<u64>(&k), table));
        }
        out
    }

    /// Reads every entry back (agent restart, `ferry status`).
    pub fn dump(&self) -> MapDump {
        let mut d = MapDump::default();
        for (k, v) in self.names.entries() {
            d.names.push((k, dec_name(&v)));
        }
        for (k, v) in self.services.entries() {
            d.services.push((k, dec_svc(v)));
        }
        for (k, v) in self.slots.entries() {
            d.slots.push((SlotKey { service: k.service, rev: k.rev, set: k.set, slot: k.slot }, v));
        }
        for (k, v) in self.members.entries() {
            d.members.push((MemberKey { service: k.service, backend: k.backend }, v));
        }
        for (k, _) in self.firewall.entries() {
            d.firewall.push(FwKey { prefixlen: k.prefixlen, service: k.service, addr: k.addr });
        }
        for (k, v) in self.frontends.entries() {
            d.frontends.push((dec_fe_key(k), FeVal { service: v.service, kind: v.kind, flags: v.flags }));
        }
        for (k, v) in self.backends.entries() {
            d.backends.push((k, dec_backend(v)));
        }
        for (k, v) in self.locals.entries() {
            d.locals.push((LocalKey { addr: k.addr, family: k.family }, v));
        }
        for (k, _) in self.ranges.entries() {
            d.ranges.push(RangeKey { prefixlen: k.prefixlen, kind: k.kind, family: k.family, addr: k.addr });
        }
        for (k, v) in self.devices.entries() {
            d.devices.push((k, Device { snat: v.snat, flags: v.flags }));
        }
        if let Some(m) = &self.tunnels {
            for (k, v) in m.entries() {
                d.tunnels.push((TunnelKey { prefixlen: k.prefixlen, addr: k.addr }, v));
            }
        }
        if let Some(m) = &self.tunnels6 {
            for (k, v) in m.entries() {
                d.tunnels6.push((TunnelKey6 { prefixlen: k.prefixlen, addr: k.addr }, v.addr));
            }
        }
        d.maglev = self.maglev_tables();
        d.addrs = self.pass_set(crate::pass::PassSet::Addrs);
        d.addrs.sort_unstable();
        if let Ok(Some(v)) = self.config.lookup(&0u32.to_ne_bytes(), MapFlags::ANY) {
            let c: t::config = from_bytes(&v);
            if c.host_netns != 0 {
                d.config = Some(dec_config(c));
            }
        }
        d
    }

    /// Per-counter totals over all CPUs, indexed like `stats::NAMES`.
    pub fn counters(&self) -> Vec<u64> {
        (0..crate::stats::NAMES.len() as u32)
            .map(|i| {
                self.stats
                    .lookup_percpu(&i.to_ne_bytes(), MapFlags::ANY)
                    .ok()
                    .flatten()
                    .map(|per_cpu| per_cpu.iter().map(|v| from_bytes::<u64>(v)).sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Entries currently held by the LRU maps (socket reverse NAT, affinity).
    pub fn lru_fill(&self) -> (usize, usize) {
        (self.sock_rev.keys().count(), self.affinity.keys().count())
    }

    /// Datagrams whose first fragment's verdict is held for their later fragments (`ferry_frags`, LRU).
    pub fn frag_fill(&self) -> usize {
        self.frags.keys().count()
    }

    /// Every entry of the packet path's connection tracking: confirmed
    /// flows (`ferry_ct`), then unconfirmed ones (`ferry_ct_new`).
    pub fn ct_entries(&self) -> Vec<crate::stale::CtEntry> {
        let confirmed = self.ct.entries().into_iter().map(|e| (false, e));
        let unconfirmed = self.ct_new.iter().flat_map(|m| m.entries()).map(|e| (true, e));
        confirmed
            .chain(unconfirmed)
            .map(|(unconfirmed, (k, v))| crate::stale::CtEntry::from_raw(unconfirmed, &k, &v))
            .collect()
    }

    /// Every flow this node carries by DSR (`ferry_dsr`, then `ferry_dsr6`;
    /// none on a datapath of layout 3 or older, no IPv6 one before 6).
    pub fn dsr_entries(&self) -> Vec<crate::stale::DsrEntry> {
        // The two maps' values differ only in the backend address's width.
        let entry =
            |k: &t::ct_key, service, backend, backend_addr, backend_port: u16, expires_ns| crate::stale::DsrEntry {
                src: k.src,
                dst: k.dst,
                sport: u16::from_be(k.sport),
                dport: u16::from_be(k.dport),
                proto: k.proto,
                family: k.family,
                service,
                backend,
                backend_addr,
                backend_port: u16::from_be(backend_port),
                expires_ns,
            };
        let v4 = self
            .dsr
            .iter()
            .flat_map(|m| m.entries())
            .map(|(k, v)| entry(&k, v.service, v.backend, [v.backend_addr, 0, 0, 0], v.backend_port, v.expires_ns));
        let v6 = self
            .dsr6
            .iter()
            .flat_map(|m| m.entries())
            .map(|(k, v)| entry(&k, v.service, v.backend, v.backend_addr, v.backend_port, v.expires_ns));
        v4.chain(v6).collect()
    }

    /// Deletes DSR flows (missing ones are fine: they expired); returns how many went.
    pub fn delete_dsr(&self, entries: &[crate::stale::DsrEntry]) -> usize {
        entries
            .iter()
            .filter(|e| {
                let k = ct_key(e.src, e.dst, e.sport, e.dport, e.proto, e.family, CT_ORIGINAL);
                let map: Option<&MapHandle> =
                    if e.family == FAM_V4 { self.dsr.as_deref() } else { self.dsr6.as_deref() };
                map.is_some_and(|m| m.delete(bytes(&k)).is_ok())
            })
            .count()
    }

    /// The addresses in one of the pass-through sets.
    pub fn pass_set(&self, set: crate::pass::PassSet) -> Vec<LocalKey> {
        let Ok(map) = self.pass_map(set) else { return Vec::new() };
        map.entries().into_iter().map(|(k, _)| LocalKey { addr: k.addr, family: k.family }).collect()
    }

    /// Adds addresses to a pass-through set; a full map is [`MapError::Full`].
    pub fn put_pass_set(&self, set: crate::pass::PassSet, keys: &[LocalKey]) -> Result<(), MapError> {
        let map = self.pass_map(set)?;
        // In batches: the first fill after an install writes every frontend address.
        for chunk in keys.chunks(BATCH) {
            let k: Vec<u8> = chunk.iter().flat_map(|k| bytes(&enc_local(k)).to_vec()).collect();
            let v = vec![1u8; chunk.len()];
            map.update_batch(&k, &v, chunk.len() as u32, MapFlags::ANY, MapFlags::ANY).map_err(|source| {
                if source.kind() == libbpf_rs::ErrorKind::TooBig {
                    MapError::Full { map: map.name(), capacity: map.max_entries() }
                } else {
                    MapError::Op { op: format!("adding {} addresses", chunk.len()), map: map.name(), source }
                }
            })?;
        }
        Ok(())
    }

    /// Removes addresses from a pass-through set (missing ones are fine); returns how many went.
    pub fn delete_pass_set(&self, set: crate::pass::PassSet, keys: &[LocalKey]) -> usize {
        let Ok(map) = self.pass_map(set) else { return 0 };
        keys.iter().filter(|k| map.delete(bytes(&enc_local(k))).is_ok()).count()
    }

    fn pass_map(&self, set: crate::pass::PassSet) -> Result<&Typed<t::local_key, u8>, MapError> {
        let (map, name) = match set {
            crate::pass::PassSet::Addrs => (&self.addrs, "ferry_addrs"),
            crate::pass::PassSet::Peers => (&self.peers, "ferry_peers"),
        };
        map.as_ref().ok_or(MapError::Missing { map: name })
    }

    /// Deletes connection-tracking entries (missing ones are fine: they
    /// expired). Those of `ferry_ct_new` are counted in `ct_new_agent_delete`,
    /// so that its evictions can be told apart (see [`Maps::lru_evictions`]).
    pub fn delete_ct(&self, entries: &[crate::stale::CtEntry]) -> usize {
        let (mut n, mut unconfirmed) = (0, 0);
        for e in entries {
            let k = ct_key(e.src, e.dst, e.sport, e.dport, e.proto, e.family, e.dir);
            let table = if e.unconfirmed { self.ct_new.as_ref() } else { Some(&self.ct) };
            if table.is_some_and(|t| t.delete(bytes(&k)).is_ok()) {
                n += 1;
                unconfirmed += u64::from(e.unconfirmed);
            }
        }
        if unconfirmed > 0 {
            self.add_counter("ct_new_agent_delete", unconfirmed);
        }
        n
    }

    /// Removes the entries of `live` (read by [`Maps::ct_entries`], none past
    /// `now`) that another flow has stranded ([`crate::stale::stranded_flows`])
    /// and counts them (`ct_stranded`). Returns those removed.
    pub fn delete_stranded_ct(&self, live: &[crate::stale::CtEntry], now: u64) -> Vec<crate::stale::CtEntry> {
        let stranded = crate::stale::stranded_flows(live, now);
        let removed: Vec<_> = stranded.into_iter().filter(|e| self.delete_ct(std::slice::from_ref(e)) == 1).collect();
        if !removed.is_empty() {
            self.add_counter("ct_stranded", removed.len() as u64);
        }
        removed
    }

    /// Adds `n` to a counter only the agent writes (the datapath never
    /// touches its slot, so the read-modify-write races with no one but
    /// another agent, which the pin directory's lock excludes).
    pub(crate) fn add_counter(&self, name: &str, n: u64) {
        let Some(i) = crate::stats::NAMES.iter().position(|c| *c == name) else { return };
        let key = (i as u32).to_ne_bytes();
        let Ok(Some(mut per_cpu)) = self.stats.lookup_percpu(&key, MapFlags::ANY) else { return };
        if let Some(first) = per_cpu.first_mut() {
            let v = from_bytes::<u64>(first) + n;
            first.copy_from_slice(bytes(&v));
        }
        if let Err(e) = self.stats.update_percpu(&key, &per_cpu, MapFlags::ANY) {
            tracing::warn!("counting {n} in {name}: {e}");
        }
    }

    /// Entries each LRU map evicted, as far as the counters tell: entries
    /// written - entries removed by the datapath or the agent - entries held
    /// now. Exact while nothing writes the map during the count; counters
    /// and map both start with a datapath installed by this layout (a map
    /// adopted from an older build held entries that were never counted, and
    /// this reads low, never below 0). `entries` is what [`Maps::lru_fill`]
    /// and a walk of `ferry_ct_new` found.
    pub fn lru_evictions(&self, ct_new_entries: u64, sock_rev_entries: u64, affinity_entries: u64) -> LruEvictions {
        let c: std::collections::HashMap<&str, u64> =
            crate::stats::NAMES.iter().copied().zip(self.counters()).collect();
        let left = |ins: &str, dels: &[&str], held: u64| {
            c[ins].saturating_sub(dels.iter().map(|d| c[d]).sum::<u64>()).saturating_sub(held)
        };
        LruEvictions {
            ct_new: left("ct_new_insert", &["ct_new_delete", "ct_new_agent_delete"], ct_new_entries),
            sock_rev: left("sock_rev_insert", &["sock_rev_delete"], sock_rev_entries),
            affinity: left("affinity_insert", &[], affinity_entries),
        }
    }
}

/// Entries evicted by each LRU map ([`Maps::lru_evictions`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LruEvictions {
    pub ct_new: u64,
    pub sock_rev: u64,
    pub affinity: u64,
}

/// Most entries one batch syscall carries (bounds the buffers the kernel copies in).
const BATCH: usize = 4096;

/// One encoded put into a hash map.
struct Put<'a> {
    map: &'a MapHandle,
    name: &'static str,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// A conntrack key (`ferry_ct`, `ferry_ct_new`, `ferry_dsr`) from host-order ports.
fn ct_key(src: Words, dst: Words, sport: u16, dport: u16, proto: u8, family: u8, dir: u8) -> t::ct_key {
    t::ct_key { src, dst, sport: sport.to_be(), dport: dport.to_be(), proto, family, dir, pad: 0 }
}

/// Writes a run of puts into one map with one syscall; false if the kernel
/// refused the batch (the caller then writes them one by one, which names
/// the failing entry).
fn put_batch(run: &[Put<'_>]) -> bool {
    let keys: Vec<u8> = run.iter().flat_map(|e| e.key.iter().copied()).collect();
    let values: Vec<u8> = run.iter().flat_map(|e| e.value.iter().copied()).collect();
    run[0].map.update_batch(&keys, &values, run.len() as u32, MapFlags::ANY, MapFlags::ANY).is_ok()
}
