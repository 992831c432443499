//! Capacity isolation on the real kernel: a pinned datapath whose service
//! map holds 8 entries. One service port too many is refused by name while
//! the others are programmed; removing one and adding one at capacity works
//! in one sync (removals run first). Needs root; pin directory and cgroup
//! are `ferry-cap-<pid>-*` and removed even when the test fails.

use ferry_bpf::entries::*;
use ferry_bpf::{InstallOptions, MapOp, Maps, Programmer, Refused};
use ferry_model::{ClusterState, Plan, StateChange, build_plan};
use serde_json::json;
use std::path::PathBuf;

const CAPACITY: u32 = 8;

/// A datapath installed for one test; uninstalled (and its cgroup removed) on drop.
struct Datapath {
    pin_dir: PathBuf,
    cgroup: PathBuf,
    maps: Option<Maps>,
}

impl Datapath {
    fn install(tag: &str) -> Datapath {
        let id = format!("ferry-cap-{}-{tag}", std::process::id());
        let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(&id);
        let cgroup = ferry_bpf::system::cgroup2_mount().expect("cgroup v2 mount").join(&id);
        std::fs::create_dir_all(&cgroup).expect("creating the test cgroup");
        let mut dp = Datapath { pin_dir: pin_dir.clone(), cgroup: cgroup.clone(), maps: None };
        let installed = ferry_bpf::install(&InstallOptions {
            pin_dir,
            cgroup,
            devices: Vec::new(),
            capacities: vec![("ferry_services".into(), CAPACITY)],
            defrag_loop: true,
            acceleration: Default::default(),
        })
        .expect("installing the datapath");
        assert!(installed.capacity_kept.is_empty());
        assert_eq!(installed.maps.capacity("ferry_services"), Some(CAPACITY), "set_max_entries before load");
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
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

mod support;
use support::{cfg, rt};

/// ClusterIP Services `s<i>` for each i, one port, one endpoint each.
fn plan(services: impl IntoIterator<Item = usize>) -> Plan {
    let mut s = ClusterState::default();
    for i in services {
        let svc = json!({"metadata": {"name": format!("s{i}"), "namespace": "ns"},
            "spec": {"clusterIP": format!("172.30.0.{}", i + 1), "ports": [{"name": "http", "port": 80}]}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let slice = json!({"metadata": {"name": format!("s{i}-1"), "namespace": "ns",
                                        "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4", "endpoints": [{"addresses": [format!("10.1.0.{}", i + 1)]}],
            "ports": [{"name": "http", "port": 8080}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
    }
    build_plan(&s, &cfg())
}

fn name(i: usize) -> String {
    format!("ns/s{i}:http/TCP/IPv4")
}

/// Service names whose ClusterIP frontend resolves to a whole service in the kernel.
fn served(maps: &Maps) -> Vec<String> {
    let d = maps.dump();
    let mut out = Vec::new();
    for (k, v) in &d.frontends {
        if v.kind != FE_CLUSTER_IP {
            continue;
        }
        let svc = d.services.iter().find(|(id, _)| *id == v.service).map(|(_, s)| *s);
        let name = d.names.iter().find(|(id, _)| *id == v.service).map(|(_, n)| n.clone());
        let (Some(svc), Some(name)) = (svc, name) else { panic!("frontend {k:?} without its service") };
        let slot = SlotKey { service: v.service, rev: svc.rev, set: 0, slot: 0 };
        let be = d.slots.iter().find(|(s, _)| *s == slot).map(|(_, b)| *b).expect("live slot");
        assert!(d.backends.iter().any(|(id, _)| *id == be), "{name}: live slot without backend");
        out.push(name);
    }
    out.sort();
    out
}

#[test]
fn one_service_port_past_capacity_is_refused_by_name_and_the_others_are_programmed() {
    let dp = Datapath::install("full");
    let mut p = Programmer::new();
    let full = plan(0..CAPACITY as usize + 1);
    let refused: Vec<Refused> = dp.maps().apply_batch(&p.sync_batch(&full, None, &rt()));
    assert_eq!(refused.len(), 1, "exactly one service port refused: {refused:#?}");
    let r = &refused[0];
    assert_eq!(r.cause, "ferry_services full", "{r:?}");
    assert!(r.reason.contains("ferry_services is full (8 entries)"), "{r:?}");
    let mut want: Vec<String> = (0..=CAPACITY as usize).map(name).filter(|n| *n != r.owner).collect();
    want.sort();
    assert_eq!(served(dp.maps()), want, "every service port but the refused one is programmed");

    // The agent's retry: mirror from the kernel, full sync. Still full: the
    // same one is refused again and nothing else changes.
    let mut p = Programmer::adopt(&dp.maps().dump());
    let again = dp.maps().apply_batch(&p.sync_batch(&full, None, &rt()));
    assert_eq!(again.iter().map(|r| &r.owner).collect::<Vec<_>>(), vec![&r.owner]);
    assert_eq!(served(dp.maps()), want);

    // One Service goes away: the retry programs the refused one.
    let gone = if r.owner == name(0) { 1 } else { 0 };
    let fewer = plan((0..=CAPACITY as usize).filter(|i| *i != gone));
    let mut p = Programmer::adopt(&dp.maps().dump());
    let refused = dp.maps().apply_batch(&p.sync_batch(&fewer, None, &rt()));
    assert!(refused.is_empty(), "{refused:#?}");
    let mut want: Vec<String> = (0..=CAPACITY as usize).filter(|i| *i != gone).map(name).collect();
    want.sort();
    assert_eq!(served(dp.maps()), want);
}

#[test]
fn remove_one_add_one_at_capacity_works_in_one_sync() {
    let dp = Datapath::install("swap");
    let mut p = Programmer::new();
    let before = plan(0..CAPACITY as usize);
    assert!(dp.maps().apply_batch(&p.sync_batch(&before, None, &rt())).is_empty());
    assert_eq!(served(dp.maps()).len(), CAPACITY as usize, "the map is full");
    // s0 leaves, s8 arrives, in one incremental sync.
    let after = plan(1..=CAPACITY as usize);
    let diff = Plan::diff(&before, &after);
    let refused = dp.maps().apply_batch(&p.sync_batch(&after, Some(&diff), &rt()));
    assert!(refused.is_empty(), "remove-one-add-one at capacity refused {refused:#?}");
    let mut want: Vec<String> = (1..=CAPACITY as usize).map(name).collect();
    want.sort();
    assert_eq!(served(dp.maps()), want);
}

#[test]
fn an_adopted_map_keeps_its_pinned_capacity_and_says_so() {
    let dp = Datapath::install("adopt");
    let again = ferry_bpf::install(&InstallOptions {
        pin_dir: dp.pin_dir.clone(),
        cgroup: dp.cgroup.clone(),
        devices: Vec::new(),
        capacities: vec![("ferry_services".into(), 64), ("ferry_names".into(), 1024)],
        defrag_loop: true,
        acceleration: Default::default(),
    })
    .expect("re-installing over the pinned maps");
    assert!(again.adopted);
    assert_eq!(
        again.capacity_kept,
        vec![
            ferry_bpf::CapacityKept { map: "ferry_services".into(), pinned: CAPACITY, asked: 64 },
            ferry_bpf::CapacityKept { map: "ferry_names".into(), pinned: 262_144, asked: 1024 },
        ]
    );
    assert_eq!(again.maps.capacity("ferry_services"), Some(CAPACITY));
}

/// A datapath an older layout pinned lacks the maps later layouts added
/// (`ferry_ct_new` before layout 2, the pass-through sets before layout 3,
/// the DSR maps before layout 4):
/// this build still opens and reads it (`ferry status` before the agent
/// upgrades it), and a write into a missing map says what to do.
#[test]
fn maps_of_an_older_layout_open_without_the_maps_it_lacks() {
    let dp = Datapath::install("older");
    for name in ["ferry_ct_new", "ferry_addrs", "ferry_peers", "ferry_tunnels", "ferry_dsr"] {
        std::fs::remove_file(dp.pin_dir.join(name)).unwrap_or_else(|e| panic!("unpinning {name}: {e}"));
    }
    let maps = Maps::open(&dp.pin_dir).expect("an older layout's maps open");
    let dump = maps.dump();
    assert!(dump.addrs.is_empty());
    assert!(maps.ct_entries().is_empty());
    assert!(maps.pass_set(ferry_bpf::pass::PassSet::Peers).is_empty());
    assert_eq!(maps.capacity("ferry_addrs"), None);
    let key = LocalKey { addr: [1, 0, 0, 0], family: FAM_V4 };
    let err = maps.put_pass_set(ferry_bpf::pass::PassSet::Addrs, &[key]).unwrap_err();
    assert!(err.to_string().contains("no ferry_addrs") && err.to_string().contains("agent"), "{err}");
    let err = maps.apply(&[MapOp::PutAddr(key)]).unwrap_err();
    assert!(matches!(err, ferry_bpf::maps::MapError::Missing { map: "ferry_addrs" }), "{err}");
    assert!(dump.tunnels.is_empty());
    let tunnel = TunnelKey { prefixlen: 24, addr: u32::from_ne_bytes([10, 244, 2, 0]) };
    let err = maps.apply(&[MapOp::PutTunnel(tunnel, 1)]).unwrap_err();
    assert!(matches!(err, ferry_bpf::maps::MapError::Missing { map: "ferry_tunnels" }), "{err}");
}
