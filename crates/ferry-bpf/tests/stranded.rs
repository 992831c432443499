//! Conntrack entries stranded by another flow, on real maps: an upgrade's
//! copy of a layout-1 table leaves them behind, and the agent's periodic
//! collection removes any that the tables hold. A stranded entry is a flow's
//! entry whose partner key is held by a different, live flow (the flow is
//! over; its NAT port went to a newer one). Needs root; the pin directories
//! and cgroup are `ferry-strand-<pid>-*` and removed even when the test fails.

use ferry_bpf::layout::Migration;
use ferry_bpf::stale::{CT_ORIGINAL, CT_REPLY, CT_SNAT, CtEntry, monotonic_ns};
use ferry_bpf::{InstallOptions, Maps};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
use std::path::{Path, PathBuf};

/// A datapath installed for one test, and a directory for a retired table;
/// both removed on drop.
struct Datapath {
    pin_dir: PathBuf,
    retired_dir: PathBuf,
    cgroup: PathBuf,
    maps: Option<Maps>,
}

impl Datapath {
    fn install(tag: &str) -> Datapath {
        let id = format!("ferry-strand-{}-{tag}", std::process::id());
        let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(&id);
        let retired_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(format!("{id}-retired"));
        let cgroup = ferry_bpf::system::cgroup2_mount().expect("cgroup v2 mount").join(&id);
        std::fs::create_dir_all(&cgroup).expect("creating the test cgroup");
        std::fs::create_dir_all(&retired_dir).expect("creating the retired pin directory");
        let mut dp = Datapath { pin_dir: pin_dir.clone(), retired_dir, cgroup: cgroup.clone(), maps: None };
        let installed = ferry_bpf::install(&InstallOptions {
            pin_dir,
            cgroup,
            devices: Vec::new(),
            capacities: Vec::new(),
            defrag_loop: false,
            acceleration: Default::default(),
        })
        .expect("installing the datapath");
        dp.maps = Some(installed.maps);
        dp
    }

    fn maps(&self) -> &Maps {
        self.maps.as_ref().expect("installed")
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.maps = None;
        let _ = ferry_bpf::uninstall(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.pin_dir);
        let _ = std::fs::remove_file(self.retired_dir.join("ferry_ct"));
        let _ = std::fs::remove_dir(&self.retired_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn w(last: u8) -> [u32; 4] {
    [u32::from_ne_bytes([10, 0, 0, last]), 0, 0, 0]
}

/// Both entries of a SNATed TCP flow from client port `cport` to the
/// frontend 10.0.0.1:80, sent to backend 10.0.0.4:8080 from the node's port
/// `nport`, confirmed, alive for an hour.
fn flow(cport: u16, nport: u16) -> [CtEntry; 2] {
    let orig = CtEntry {
        unconfirmed: false,
        src: w(99),
        dst: w(1),
        sport: cport,
        dport: 80,
        proto: 6,
        family: ferry_bpf::entries::FAM_V4,
        dir: CT_ORIGINAL,
        new_src: w(2),
        new_dst: w(4),
        new_sport: nport,
        new_dport: 8080,
        service: 1,
        backend: 1,
        flags: CT_SNAT | ferry_bpf::entries::CT_REPLIED,
        expires_ns: monotonic_ns() + 3_600_000_000_000,
    };
    let reply = CtEntry {
        dir: CT_REPLY,
        src: w(4),
        dst: w(2),
        sport: 8080,
        dport: nport,
        new_src: w(1),
        new_dst: w(99),
        new_sport: 80,
        new_dport: cport,
        ..orig
    };
    [orig, reply]
}

/// A generated `#[repr(C)]` key or value as the map takes it.
fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: used for ct_key and ct_val only: generated #[repr(C)] structs
    // of integers with explicit padding fields, so every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn raw_value(e: &CtEntry) -> Vec<u8> {
    let v = ferry_bpf::skel::sock::types::ct_val {
        new_src: e.new_src,
        new_dst: e.new_dst,
        new_sport: e.new_sport.to_be(),
        new_dport: e.new_dport.to_be(),
        backend: e.backend,
        service: e.service,
        flags: e.flags,
        expires_ns: e.expires_ns,
        ..Default::default()
    };
    as_bytes(&v).to_vec()
}

fn put(map: &MapHandle, e: &CtEntry) {
    map.update(as_bytes(&e.raw_key()), &raw_value(e), MapFlags::ANY).expect("writing a conntrack entry");
}

fn held(map: &MapHandle, e: &CtEntry) -> bool {
    map.lookup(as_bytes(&e.raw_key()), MapFlags::ANY).ok().flatten().is_some()
}

fn pinned(dir: &Path, name: &str) -> MapHandle {
    MapHandle::from_pinned_path(dir.join(name)).expect("opening a pinned conntrack table")
}

#[test]
fn the_collection_removes_an_entry_stranded_by_another_flow_and_counts_it() {
    let dp = Datapath::install("collect");
    let ct = pinned(&dp.pin_dir, "ferry_ct");
    let [new_flow, new_reply] = flow(40000, 30000);
    // An older flow from port 40001 that closed long ago; its NAT port 30000
    // went to the new flow, but its original-direction entry still says open.
    let [stale, _] = flow(40001, 30000);
    for e in [&new_flow, &new_reply, &stale] {
        put(&ct, e);
    }
    let now = monotonic_ns();
    let live = dp.maps().ct_entries();
    assert_eq!(live.len(), 3);
    let removed = dp.maps().delete_stranded_ct(&live, now);
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!((removed[0].sport, removed[0].dir), (40001, CT_ORIGINAL));
    assert!(!held(&ct, &stale), "the stranded entry is gone from ferry_ct");
    assert!(held(&ct, &new_flow) && held(&ct, &new_reply), "the flow holding the tuple keeps both entries");
    let counter = |name: &str| {
        let i = ferry_bpf::stats::NAMES.iter().position(|n| *n == name).expect("a known counter");
        dp.maps().counters()[i]
    };
    assert_eq!(counter("ct_stranded"), 1);
    // A second collection finds nothing more.
    assert!(dp.maps().delete_stranded_ct(&dp.maps().ct_entries(), monotonic_ns()).is_empty());
    assert_eq!(counter("ct_stranded"), 1);
}

#[test]
fn an_upgrade_copy_leaves_a_stranded_entry_behind() {
    let dp = Datapath::install("copy");
    // The retired table: layout 1's one LRU ferry_ct (same entries).
    let key_size = std::mem::size_of::<ferry_bpf::skel::sock::types::ct_key>() as u32;
    let value_size = std::mem::size_of::<ferry_bpf::skel::sock::types::ct_val>() as u32;
    let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let mut old = MapHandle::create(MapType::LruHash, Some("ferry_ct"), key_size, value_size, 1024, &opts)
        .expect("creating a layout-1 conntrack table");
    old.pin(dp.retired_dir.join("ferry_ct")).expect("pinning the retired table");
    let [a, a_reply] = flow(40000, 30000);
    let [stale, _] = flow(40001, 30000);
    // A flow whose reply entry was evicted: copied as it is (the old
    // datapath served it that way), into ferry_ct_new.
    let [lone, _] = flow(40002, 30002);
    for e in [&a, &a_reply, &stale, &lone] {
        put(&old, e);
    }
    let c = ferry_bpf::migrate::carry(Migration::ConntrackSplit, "ferry_ct", &dp.retired_dir, &dp.pin_dir, false)
        .expect("copying the retired table");
    assert_eq!((c.confirmed, c.unconfirmed, c.stranded, c.not_copied), (2, 1, 1, 0), "{c:?}");
    let ct = pinned(&dp.pin_dir, "ferry_ct");
    let ct_new = pinned(&dp.pin_dir, "ferry_ct_new");
    assert!(held(&ct, &a) && held(&ct, &a_reply));
    assert!(!held(&ct, &stale) && !held(&ct_new, &stale), "the stranded entry must not live on");
    assert!(
        !held(&ct, &lone) && held(&ct_new, &lone),
        "a flow whose other entry is gone goes on from the table that may evict it, not from ferry_ct"
    );
}
