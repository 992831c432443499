//! Faults mid-apply, on the real kernel's maps (needs root; never skipped).
//!
//! For every index k of a realistic incremental sync, the k-th map operation
//! fails (`Maps::apply_failing_at`: the operations before it are in the
//! kernel, the rest are not). The agent's recovery is then run as
//! `Proxier::sync` does it: the mirror is rebuilt from the kernel
//! (`Programmer::adopt(dump)`) and the next sync is a full one. Afterwards
//! the pinned maps must serve exactly what the Plan says: the same view (each
//! frontend resolved to its service's name, actions and live backends, plus
//! the node entries) as a datapath that applied the sync without a fault.

use ferry_bpf::entries::*;
use ferry_bpf::{MapDump, Maps, Programmer, install};
use ferry_model::{ClusterState, Plan, StateChange, build_plan};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

mod support;
use support::{cfg, rt};

/// `services` LoadBalancer Services (source ranges, NodePorts, Local and
/// Cluster policies); service 0's endpoints are `first`, the others have
/// `per_service` endpoints each.
fn cluster(services: usize, first: &[&str], per_service: usize) -> ClusterState {
    let mut s = ClusterState::default();
    for i in 0..services {
        let svc = json!({"metadata": {"name": format!("s{i}"), "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": format!("172.30.0.{}", i + 1),
                     "externalTrafficPolicy": if i % 2 == 0 { "Local" } else { "Cluster" },
                     "loadBalancerSourceRanges": ["203.0.113.0/24"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30000 + i}]},
            "status": {"loadBalancer": {"ingress": [{"ip": format!("5.5.0.{}", i + 1)}]}}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let eps: Vec<_> = if i == 0 {
            first.iter().map(|ip| json!({"addresses": [ip], "nodeName": "node-a"})).collect()
        } else {
            (0..per_service)
                .map(|j| json!({"addresses": [format!("10.1.{i}.{}", j + 1)], "nodeName": if j == 0 { "node-a" } else { "node-b" }}))
                .collect()
        };
        let slice = json!({"metadata": {"name": format!("s{i}-1"), "namespace": "ns", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": 8080}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
    }
    s
}

/// What the datapath does, independent of the ids chosen.
fn view(d: &MapDump) -> BTreeSet<String> {
    let services: BTreeMap<u32, SvcVal> = d.services.iter().copied().collect();
    let slots: BTreeMap<SlotKey, u32> = d.slots.iter().copied().collect();
    let backends: BTreeMap<u32, Backend> = d.backends.iter().copied().collect();
    let names: BTreeMap<u32, String> = d.names.iter().cloned().collect();
    let backend = |id: &u32| match backends.get(id) {
        Some(b) => format!("{}:{}/{}", ip_of(&b.addr, b.family), b.port, b.flags),
        None => format!("MISSING backend {id}"),
    };
    let service = |id: u32| {
        let Some(s) = services.get(&id) else { return format!("MISSING service {id}") };
        let sets: Vec<Vec<String>> = (0..2u8)
            .map(|set| {
                (0..s.count[set as usize])
                    .map(|slot| match slots.get(&SlotKey { service: id, rev: s.rev, set, slot }) {
                        Some(b) => backend(b),
                        None => "MISSING slot".into(),
                    })
                    .collect()
            })
            .collect();
        let members: BTreeSet<String> = d
            .members
            .iter()
            .filter(|(m, _)| m.service == id)
            .map(|(m, s)| format!("{}={s}", backend(&m.backend)))
            .collect();
        let fw: BTreeSet<String> =
            d.firewall.iter().filter(|f| f.service == id).map(|f| format!("{:?}/{}", f.addr, f.prefixlen)).collect();
        format!(
            "{:?} action={:?} flags={} affinity={} sets={sets:?} members={members:?} fw={fw:?}",
            names.get(&id),
            s.action,
            s.flags,
            s.affinity_timeout
        )
    };
    let mut out = BTreeSet::new();
    for (fk, fv) in &d.frontends {
        if fv.kind == FE_CLUSTER_IP_ANY_PORT {
            out.insert(format!("marker {fk:?}"));
        } else {
            out.insert(format!("fe {fk:?} kind={} flags={} -> {}", fv.kind, fv.flags, service(fv.service)));
        }
    }
    let mut all: Vec<String> = names.values().cloned().collect();
    all.sort();
    out.insert(format!("services {all:?} ({} entries)", services.len()));
    out.insert(format!("locals {:?} ranges {:?} config {:?} devices {:?}", d.locals, d.ranges, d.config, d.devices));
    out.insert(format!("maglev tables {}", d.maglev.len()));
    out
}

/// Entries nothing uses: backends in no slot, slots, members, names of no service.
fn leftovers(d: &MapDump) -> Vec<String> {
    let services: BTreeSet<u32> = d.services.iter().map(|(id, _)| *id).collect();
    let used: BTreeSet<u32> = d.slots.iter().map(|(_, b)| *b).collect();
    let mut out = Vec::new();
    out.extend(d.backends.iter().filter(|(id, _)| !used.contains(id)).map(|(id, _)| format!("backend {id}")));
    out.extend(d.slots.iter().filter(|(k, _)| !services.contains(&k.service)).map(|(k, _)| format!("slot {k:?}")));
    out.extend(d.members.iter().filter(|(k, _)| !services.contains(&k.service)).map(|(k, _)| format!("member {k:?}")));
    out.extend(d.names.iter().filter(|(id, _)| !services.contains(id)).map(|(id, _)| format!("name {id}")));
    out
}

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = install::uninstall(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

#[test]
fn a_failure_at_any_operation_is_repaired_by_the_next_full_sync() {
    let pins = Pins(PathBuf::from("/sys/fs/bpf").join(format!("ferry-fault-{}", std::process::id())));
    let mut storage = std::mem::MaybeUninit::uninit();
    let _skel = install::load_packet_programs(&mut storage, &pins.0).expect("loading the datapath (root?)");
    let maps = Maps::open(&pins.0).unwrap();

    // Before: 5 services; after: service 0's endpoints replaced, every other
    // service's set grown from 2 to 3 endpoints, services 5 and 6 added.
    let before = build_plan(&cluster(5, &["10.2.0.1", "10.2.0.2"], 2), &cfg());
    let after = build_plan(&cluster(7, &["10.2.0.3"], 3), &cfg());
    let diff = Plan::diff(&before, &after);

    let mut p = Programmer::new();
    maps.apply(&p.sync(&before, None, &rt())).unwrap();
    let want_before = view(&maps.dump());
    maps.apply(&p.sync(&after, Some(&diff), &rt())).unwrap();
    let want_after = view(&maps.dump());
    assert_ne!(want_before, want_after);
    assert!(leftovers(&maps.dump()).is_empty(), "{:?}", leftovers(&maps.dump()));

    // Back to `before`, as an agent would (adopt + full sync).
    let reset = |to: &Plan| {
        let mut p = Programmer::adopt(&maps.dump());
        maps.apply(&p.sync(to, None, &rt())).unwrap();
        p
    };
    let mut p = reset(&before);
    assert_eq!(view(&maps.dump()), want_before);
    let n = p.sync(&after, Some(&diff), &rt()).len();
    assert!(n > 30, "a realistic sync: {n} operations");
    let mut p = reset(&before);

    for k in 0..n {
        // The kernel holds `before`; the agent's mirror agrees.
        assert_eq!(view(&maps.dump()), want_before, "k={k}: reset");
        let ops = p.sync(&after, Some(&diff), &rt());
        assert_eq!(ops.len(), n, "k={k}: the same sync each time");
        let failed = maps.apply_failing_at(&ops, k);
        assert!(failed.is_err(), "k={k}: the injected failure");
        // The agent: rebuild the mirror from the kernel, then a full sync (its retry).
        let mut retry = Programmer::adopt(&maps.dump());
        maps.apply(&retry.sync(&after, None, &rt())).unwrap_or_else(|e| panic!("k={k}: the retry: {e}"));
        let got = view(&maps.dump());
        if got != want_after {
            let missing: Vec<_> = want_after.difference(&got).collect();
            let extra: Vec<_> = got.difference(&want_after).collect();
            panic!(
                "k={k} ({:?}): after the retry the kernel differs from the Plan\nmissing {missing:#?}\nextra {extra:#?}",
                ops[k]
            );
        }
        assert!(leftovers(&maps.dump()).is_empty(), "k={k}: leftovers {:?}", leftovers(&maps.dump()));
        // A further sync has nothing to do.
        assert!(retry.sync(&after, None, &rt()).is_empty(), "k={k}: the retry left work undone");
        p = reset(&before);
    }
    eprintln!("{n} operations, a failure injected at each: every retry left the kernel equal to the Plan");
}

/// The agent's own path: the sync as a [`ferry_bpf::program::Batch`]
/// (`Maps::apply_batch`, each service port on its own) with the k-th write
/// failing; the failing service port is refused, the others are written,
/// and the retry (adopt + full sync) leaves the kernel equal to the Plan.
#[test]
fn a_failure_at_any_write_of_a_batch_is_refused_then_repaired_by_the_retry() {
    let pins = Pins(PathBuf::from("/sys/fs/bpf").join(format!("ferry-fault-batch-{}", std::process::id())));
    let mut storage = std::mem::MaybeUninit::uninit();
    let _skel = install::load_packet_programs(&mut storage, &pins.0).expect("loading the datapath (root?)");
    let maps = Maps::open(&pins.0).unwrap();

    let before = build_plan(&cluster(5, &["10.2.0.1", "10.2.0.2"], 2), &cfg());
    let after = build_plan(&cluster(7, &["10.2.0.3"], 3), &cfg());
    let diff = Plan::diff(&before, &after);
    let reset = |to: &Plan| {
        let mut p = Programmer::adopt(&maps.dump());
        assert!(maps.apply_batch(&p.sync_batch(to, None, &rt())).is_empty());
        p
    };
    reset(&after);
    let want_after = view(&maps.dump());
    let mut p = reset(&before);
    let want_before = view(&maps.dump());
    assert_ne!(want_before, want_after);
    let n = p.sync_batch(&after, Some(&diff), &rt()).len();
    assert!(n > 30, "a realistic sync: {n} operations");
    // The mirror moved on with that sync; the kernel did not.
    let mut p = reset(&before);
    let mut refusals = 0;
    for k in 0..n {
        assert_eq!(view(&maps.dump()), want_before, "k={k}: reset");
        let batch = p.sync_batch(&after, Some(&diff), &rt());
        assert_eq!(batch.len(), n, "k={k}: the same sync each time");
        let refused = maps.apply_batch_failing_at(&batch, k);
        for r in &refused {
            assert!(!r.owner.is_empty(), "k={k}: a refusal names its owner: {r:?}");
        }
        refusals += refused.len();
        let mut retry = Programmer::adopt(&maps.dump());
        let again = maps.apply_batch(&retry.sync_batch(&after, None, &rt()));
        assert!(again.is_empty(), "k={k}: the retry was refused: {again:?}");
        let got = view(&maps.dump());
        if got != want_after {
            let missing: Vec<_> = want_after.difference(&got).collect();
            let extra: Vec<_> = got.difference(&want_after).collect();
            panic!("k={k}: after the retry the kernel differs from the Plan\nmissing {missing:#?}\nextra {extra:#?}");
        }
        assert!(leftovers(&maps.dump()).is_empty(), "k={k}: leftovers {:?}", leftovers(&maps.dump()));
        assert!(retry.sync_batch(&after, None, &rt()).is_empty(), "k={k}: the retry left work undone");
        p = reset(&before);
    }
    assert!(refusals > 0, "the injected failures were refused");
    eprintln!("{n} operations, a write failure injected at each: every retry left the kernel equal to the Plan");
}
