//! The Programmer against an in-memory model of the kernel maps: the end state
//! equals the Plan, an endpoint change touches one service, an adopted mirror
//! needs no operations, and every prefix of every operation batch leaves the
//! datapath consistent (no frontend without its service, no live slot without
//! its backend).

use ferry_bpf::entries::*;
use ferry_bpf::{MapDump, MapOp, NodeRuntime, Programmer};
use ferry_model::{ClusterState, NodeConfig, Plan, StateChange, build_plan};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default, PartialEq)]
struct Kernel {
    frontends: BTreeMap<FeKey, FeVal>,
    services: BTreeMap<u32, SvcVal>,
    names: BTreeMap<u32, String>,
    slots: BTreeMap<SlotKey, u32>,
    members: BTreeMap<MemberKey, u8>,
    backends: BTreeMap<u32, Backend>,
    firewall: BTreeSet<FwKey>,
    locals: BTreeMap<LocalKey, u8>,
    ranges: BTreeSet<RangeKey>,
    config: Option<Config>,
    devices: BTreeMap<u32, Device>,
    maglev: BTreeMap<u64, Vec<u32>>,
    /// `ferry_addrs`: only ever grows under the Programmer (the agent's collection shrinks it).
    addrs: BTreeSet<LocalKey>,
    /// `ferry_tunnels` (DSR).
    tunnels: BTreeMap<TunnelKey, u32>,
    /// `ferry_tunnels6` (IPv6 DSR).
    tunnels6: BTreeMap<TunnelKey6, Words>,
}

impl Kernel {
    fn apply(&mut self, op: &MapOp) {
        match op.clone() {
            MapOp::PutBackend(id, b) => drop(self.backends.insert(id, b)),
            MapOp::DelBackend(id) => assert!(self.backends.remove(&id).is_some(), "delete of missing backend {id}"),
            MapOp::PutSlot(k, v) => drop(self.slots.insert(k, v)),
            MapOp::DelSlot(k) => assert!(self.slots.remove(&k).is_some(), "delete of missing slot {k:?}"),
            MapOp::PutMember(k, v) => drop(self.members.insert(k, v)),
            MapOp::DelMember(k) => assert!(self.members.remove(&k).is_some()),
            MapOp::PutFirewall(k) => drop(self.firewall.insert(k)),
            MapOp::DelFirewall(k) => assert!(self.firewall.remove(&k)),
            MapOp::PutService(id, v) => drop(self.services.insert(id, v)),
            MapOp::DelService(id) => assert!(self.services.remove(&id).is_some()),
            MapOp::PutName(id, n) => drop(self.names.insert(id, n.into())),
            MapOp::DelName(id) => assert!(self.names.remove(&id).is_some()),
            MapOp::PutFrontend(k, v) => drop(self.frontends.insert(k, v)),
            MapOp::DelFrontend(k) => assert!(self.frontends.remove(&k).is_some(), "delete of missing frontend"),
            MapOp::PutLocal(k, v) => drop(self.locals.insert(k, v)),
            MapOp::DelLocal(k) => assert!(self.locals.remove(&k).is_some()),
            MapOp::PutRange(k) => drop(self.ranges.insert(k)),
            MapOp::DelRange(k) => assert!(self.ranges.remove(&k)),
            MapOp::PutConfig(c) => self.config = Some(*c),
            MapOp::PutDevice(i, d) => drop(self.devices.insert(i, *d)),
            MapOp::DelDevice(i) => assert!(self.devices.remove(&i).is_some()),
            MapOp::PutMaglev(k, t) => {
                assert!(t.iter().all(|id| self.backends.contains_key(id)), "Maglev table names a missing backend");
                drop(self.maglev.insert(k, t.into()))
            }
            MapOp::DelMaglev(k) => assert!(self.maglev.remove(&k).is_some()),
            MapOp::PutAddr(k) => drop(self.addrs.insert(k)),
            MapOp::PutTunnel(k, v) => drop(self.tunnels.insert(k, v)),
            MapOp::DelTunnel(k) => assert!(self.tunnels.remove(&k).is_some(), "delete of missing tunnel {k:?}"),
            MapOp::PutTunnel6(kv) => drop(self.tunnels6.insert(kv.0, kv.1)),
            MapOp::DelTunnel6(k) => assert!(self.tunnels6.remove(&k).is_some(), "delete of missing tunnel {k:?}"),
        }
    }

    /// What the datapath may see at any instant must be whole.
    fn assert_consistent(&self, context: &str) {
        for (k, fe) in &self.frontends {
            // The fast path waves through a packet to an address not in
            // ferry_addrs. (A ClusterIP's any-port marker has its address
            // from its service ports, and the service CIDR is never waved through.)
            let addr = LocalKey { addr: k.addr, family: k.family };
            let needs = k.addr != [0; 4] && fe.kind != FE_CLUSTER_IP_ANY_PORT;
            assert!(!needs || self.addrs.contains(&addr), "{context}: frontend {k:?} live before its address");
        }
        for (k, fe) in &self.frontends {
            if fe.kind == FE_CLUSTER_IP_ANY_PORT {
                continue;
            }
            let svc =
                self.services.get(&fe.service).unwrap_or_else(|| panic!("{context}: frontend {k:?} without service"));
            for set in 0..2u8 {
                for slot in 0..svc.count[set as usize] {
                    let key = SlotKey { service: fe.service, rev: svc.rev, set, slot };
                    let be = self.slots.get(&key).unwrap_or_else(|| panic!("{context}: live slot {key:?} missing"));
                    assert!(self.backends.contains_key(be), "{context}: slot {key:?} -> missing backend {be}");
                }
            }
        }
        // The previous revision stays readable too, for readers holding the old service entry.
        for (k, be) in &self.slots {
            assert!(self.backends.contains_key(be), "{context}: slot {k:?} -> missing backend {be}");
        }
    }

    fn dump(&self) -> MapDump {
        MapDump {
            names: self.names.iter().map(|(k, v)| (*k, v.clone())).collect(),
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            members: self.members.iter().map(|(k, v)| (*k, *v)).collect(),
            firewall: self.firewall.iter().copied().collect(),
            frontends: self.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            locals: self.locals.iter().map(|(k, v)| (*k, *v)).collect(),
            ranges: self.ranges.iter().copied().collect(),
            config: self.config,
            devices: self.devices.iter().map(|(k, v)| (*k, *v)).collect(),
            maglev: self.maglev.iter().map(|(k, v)| (*k, v.clone())).collect(),
            addrs: self.addrs.iter().copied().collect(),
            tunnels: self.tunnels.iter().map(|(k, v)| (*k, *v)).collect(),
            tunnels6: self.tunnels6.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    fn apply_all(&mut self, ops: &[MapOp]) {
        for (i, op) in ops.iter().enumerate() {
            self.apply(op);
            self.assert_consistent(&format!("after op {i} {op:?}"));
        }
    }

    /// The backends a frontend resolves to right now.
    fn resolve(&self, fe: &FeKey, set: u8) -> BTreeSet<(std::net::IpAddr, u16)> {
        let v = &self.frontends[fe];
        let svc = &self.services[&v.service];
        (0..svc.count[set as usize])
            .map(|slot| {
                let b = &self.backends[&self.slots[&SlotKey { service: v.service, rev: svc.rev, set, slot }]];
                (ip_of(&b.addr, b.family), b.port)
            })
            .collect()
    }
}

fn cfg() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        ..Default::default()
    }
}

fn cluster(services: usize, first: &[&str]) -> ClusterState {
    let mut s = ClusterState::default();
    for i in 0..services {
        let svc = json!({"metadata": {"name": format!("s{i}"), "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": format!("172.30.{}.{}", i / 250, i % 250 + 1),
                     "externalTrafficPolicy": if i % 2 == 0 { "Local" } else { "Cluster" },
                     "loadBalancerSourceRanges": ["203.0.113.0/24"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30000 + i}]},
            "status": {"loadBalancer": {"ingress": [{"ip": format!("5.5.{}.{}", i / 250, i % 250 + 1)}]}}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let eps: Vec<_> = if i == 0 {
            first.iter().map(|ip| json!({"addresses": [ip], "nodeName": "node-a"})).collect()
        } else {
            vec![
                json!({"addresses": [format!("10.1.{}.{}", i / 250, i % 250 + 1)]}),
                json!({"addresses": ["10.9.9.9"], "nodeName": "node-a"}),
            ]
        };
        let slice = json!({"metadata": {"name": format!("s{i}-1"), "namespace": "ns", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": 8080}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
    }
    s
}

fn fe(ip: &str, port: u16) -> FeKey {
    let ip = ip.parse().unwrap();
    FeKey { addr: words(&ip), port, proto: 6, family: family_of(&ip) }
}

fn rt() -> NodeRuntime {
    NodeRuntime { host_netns_cookie: 4242, nat_ports: (61000, 65535), ..Default::default() }
}

#[test]
fn full_sync_programs_the_plan() {
    let plan = build_plan(&cluster(5, &["10.2.0.1", "10.2.0.2"]), &cfg());
    let mut p = Programmer::new();
    let mut k = Kernel::default();
    k.apply_all(&p.sync(&plan, None, &rt()));
    assert_eq!(k.services.len(), 5);
    assert_eq!(k.resolve(&fe("172.30.0.1", 80), SET_CLUSTER).len(), 2);
    // NodePort frontend (any address), LB frontend with firewall, ClusterIP marker.
    let np = FeKey { addr: [0; 4], port: 30000, proto: 6, family: FAM_V4 };
    assert_eq!(k.frontends[&np].kind, FE_NODE_PORT);
    assert_eq!(k.frontends[&fe("5.5.0.1", 80)].flags, FE_FIREWALL);
    let marker = FeKey { addr: words(&"172.30.0.1".parse().unwrap()), port: 0, proto: 0, family: FAM_V4 };
    assert_eq!(k.frontends[&marker].kind, FE_CLUSTER_IP_ANY_PORT);
    // The shared backend 10.9.9.9:8080 exists once.
    assert_eq!(k.backends.values().filter(|b| ip_of(&b.addr, b.family).to_string() == "10.9.9.9").count(), 1);
    assert_eq!(k.config.unwrap().host_netns, 4242);
    assert!(!k.firewall.is_empty());
    // A second sync of the same plan changes nothing.
    assert!(p.sync(&plan, None, &rt()).is_empty());
}

#[test]
fn one_endpoint_change_touches_only_that_service() {
    let cfg = cfg();
    let a = build_plan(&cluster(200, &["10.2.0.1", "10.2.0.2"]), &cfg);
    let b = build_plan(&cluster(200, &["10.2.0.1", "10.2.0.3"]), &cfg);
    let mut p = Programmer::new();
    let mut k = Kernel::default();
    k.apply_all(&p.sync(&a, None, &rt()));
    let diff = Plan::diff(&a, &b);
    let ops = p.sync(&b, Some(&diff), &rt());
    k.apply_all(&ops);
    let touched: BTreeSet<u32> = ops
        .iter()
        .filter_map(|op| match op {
            MapOp::PutSlot(k, _) | MapOp::DelSlot(k) => Some(k.service),
            MapOp::PutService(id, _) => Some(*id),
            MapOp::PutMember(m, _) | MapOp::DelMember(m) => Some(m.service),
            _ => None,
        })
        .collect();
    assert_eq!(touched.len(), 1, "{ops:#?}");
    assert!(ops.len() <= 10, "{} ops for one endpoint: {ops:#?}", ops.len());
    let got: Vec<String> = k.resolve(&fe("172.30.0.1", 80), SET_CLUSTER).iter().map(|(ip, _)| ip.to_string()).collect();
    assert_eq!(got, ["10.2.0.1", "10.2.0.3"]);
    // The PutService flip comes after the new slots and before any deletion.
    let flip = ops.iter().position(|o| matches!(o, MapOp::PutService(..))).unwrap();
    assert!(ops[..flip].iter().all(|o| !matches!(o, MapOp::DelSlot(..) | MapOp::DelBackend(..))));
    // Same result as a full sync from scratch.
    let mut fresh = Kernel::default();
    fresh.apply_all(&Programmer::new().sync(&b, None, &rt()));
    assert_eq!(fresh.resolve(&fe("172.30.0.1", 80), SET_CLUSTER), k.resolve(&fe("172.30.0.1", 80), SET_CLUSTER));
}

#[test]
fn changes_in_sequence_stay_consistent_and_clean_up() {
    let cfg = cfg();
    let steps: Vec<ClusterState> = vec![
        cluster(3, &["10.2.0.1"]),
        cluster(3, &["10.2.0.1", "10.2.0.2", "10.2.0.3"]),
        cluster(3, &[]),
        cluster(5, &["10.2.0.4"]),
        cluster(1, &["10.2.0.4"]),
        cluster(0, &[]),
    ];
    let mut p = Programmer::new();
    let mut k = Kernel::default();
    let mut prev: Option<Plan> = None;
    for (i, st) in steps.iter().enumerate() {
        let plan = build_plan(st, &cfg);
        let ops = match &prev {
            Some(old) => p.sync(&plan, Some(&Plan::diff(old, &plan)), &rt()),
            None => p.sync(&plan, None, &rt()),
        };
        k.apply_all(&ops);
        assert_eq!(k.services.len(), plan.services.len(), "step {i}");
        prev = Some(plan);
    }
    // Nothing left but node entries.
    assert!(k.services.is_empty() && k.slots.is_empty() && k.backends.is_empty() && k.members.is_empty());
    assert!(k.firewall.is_empty() && k.names.is_empty());
    assert!(k.frontends.is_empty());
}

#[test]
fn an_adopted_datapath_needs_no_operations() {
    let plan = build_plan(&cluster(20, &["10.2.0.1", "10.2.0.2"]), &cfg());
    let mut first = Programmer::new();
    let mut k = Kernel::default();
    k.apply_all(&first.sync(&plan, None, &rt()));
    // Churn once so both revisions are populated.
    let plan2 = build_plan(&cluster(20, &["10.2.0.1", "10.2.0.5"]), &cfg());
    k.apply_all(&first.sync(&plan2, Some(&Plan::diff(&plan, &plan2)), &rt()));

    let mut adopted = Programmer::adopt(&k.dump());
    assert_eq!(adopted.service_count(), 20);
    let ops = adopted.sync(&plan2, None, &rt());
    assert!(ops.is_empty(), "{ops:#?}");
    // ...and keeps working incrementally afterwards.
    let plan3 = build_plan(&cluster(20, &["10.2.0.7"]), &cfg());
    k.apply_all(&adopted.sync(&plan3, Some(&Plan::diff(&plan2, &plan3)), &rt()));
    let got: Vec<String> = k.resolve(&fe("172.30.0.1", 80), SET_CLUSTER).iter().map(|(ip, _)| ip.to_string()).collect();
    assert_eq!(got, ["10.2.0.7"]);
}

#[test]
fn maglev_tables_follow_the_backends() {
    let plan = build_plan(&cluster(3, &["10.2.0.1", "10.2.0.2", "10.2.0.3"]), &cfg());
    let rt = NodeRuntime { maglev_default: true, maglev_size: 251, ..rt() };
    let mut p = Programmer::new();
    let mut k = Kernel::default();
    k.apply_all(&p.sync(&plan, None, &rt));
    let s0 = k.frontends[&fe("172.30.0.1", 80)].service;
    assert_eq!(k.services[&s0].flags & SVC_MAGLEV, SVC_MAGLEV);
    let table = &k.maglev[&maglev_key(s0, SET_CLUSTER)];
    assert_eq!(table.len(), 251);
    assert_eq!(table.iter().collect::<BTreeSet<_>>().len(), 3, "every backend owns slots");
    // One backend fewer: a new table with two backends, swapped in.
    let plan2 = build_plan(&cluster(3, &["10.2.0.1", "10.2.0.3"]), &cfg());
    k.apply_all(&p.sync(&plan2, Some(&Plan::diff(&plan, &plan2)), &rt));
    assert_eq!(k.maglev[&maglev_key(s0, SET_CLUSTER)].iter().collect::<BTreeSet<_>>().len(), 2);
    // Adoption reads the tables back: nothing to do.
    let mut adopted = Programmer::adopt(&k.dump());
    assert!(adopted.sync(&plan2, None, &rt).is_empty());
    // Removing the services removes their tables.
    let empty = build_plan(&cluster(0, &[]), &cfg());
    k.apply_all(&p.sync(&empty, Some(&Plan::diff(&plan2, &empty)), &rt));
    assert!(k.maglev.is_empty());
}

#[test]
fn routes_become_actions() {
    let plan = build_plan(&cluster(2, &["10.2.0.1"]), &cfg());
    let mut k = Kernel::default();
    k.apply_all(&Programmer::new().sync(&plan, None, &rt()));
    // s0: eTP Local with a local endpoint; s1: eTP Cluster.
    let s0 = &k.services[&k.frontends[&fe("172.30.0.1", 80)].service];
    assert_eq!(s0.action[1][2], ACT_FORWARD_LOCAL, "outside -> local endpoints, client IP kept");
    assert_eq!(s0.action[1][1], ACT_FORWARD_CLUSTER | ACT_MASQ, "host short-circuit, masqueraded");
    assert_eq!(s0.action[0][0], ACT_FORWARD_CLUSTER, "pod -> ClusterIP, no SNAT");
    let s1 = &k.services[&k.frontends[&fe("172.30.0.2", 80)].service];
    assert_eq!(s1.action[1][0], ACT_FORWARD_CLUSTER | ACT_MASQ, "eTP Cluster masquerades pods too");
}

/// What the datapath does, independent of the ids chosen: each frontend
/// resolved to its service's name, actions and live backends, plus the node
/// entries. Two kernels with equal views serve every packet alike.
fn view(k: &Kernel) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let backend = |id: &u32| {
        let b = &k.backends[id];
        format!("{}:{}/{}", ip_of(&b.addr, b.family), b.port, b.flags)
    };
    let service = |id: u32| {
        let s = &k.services[&id];
        let sets: Vec<Vec<String>> = (0..2u8)
            .map(|set| {
                (0..s.count[set as usize])
                    .map(|slot| backend(&k.slots[&SlotKey { service: id, rev: s.rev, set, slot }]))
                    .collect()
            })
            .collect();
        let members: BTreeSet<String> = k
            .members
            .iter()
            .filter(|(m, _)| m.service == id)
            .map(|(m, sets)| format!("{}={sets}", backend(&m.backend)))
            .collect();
        let fw: BTreeSet<String> =
            k.firewall.iter().filter(|f| f.service == id).map(|f| format!("{:?}/{}", f.addr, f.prefixlen)).collect();
        format!(
            "{} action={:?} flags={} affinity={} sets={sets:?} members={members:?} fw={fw:?}",
            k.names[&id], s.action, s.flags, s.affinity_timeout
        )
    };
    for (fk, fv) in &k.frontends {
        if fv.kind == FE_CLUSTER_IP_ANY_PORT {
            out.insert(format!("marker {fk:?}"));
        } else {
            out.insert(format!("fe {fk:?} kind={} flags={} -> {}", fv.kind, fv.flags, service(fv.service)));
        }
    }
    let mut names: Vec<&String> = k.names.values().collect();
    names.sort();
    out.insert(format!("services {names:?}"));
    out.insert(format!("locals {:?} ranges {:?} config {:?} devices {:?}", k.locals, k.ranges, k.config, k.devices));
    out
}

/// Nothing programmed that nothing uses: every backend in a slot, every slot,
/// member and name of a service that exists.
fn assert_no_leftovers(k: &Kernel) {
    let used: BTreeSet<u32> = k.slots.values().copied().collect();
    assert!(k.backends.keys().all(|b| used.contains(b)), "unreferenced backends");
    assert!(k.slots.keys().all(|s| k.services.contains_key(&s.service)), "slots of a missing service");
    assert!(k.members.keys().all(|m| k.services.contains_key(&m.service)), "members of a missing service");
    assert_eq!(k.names.keys().collect::<Vec<_>>(), k.services.keys().collect::<Vec<_>>(), "names and services differ");
}

mod properties {
    use super::*;
    use ferry_model::Planner;
    use proptest::prelude::*;

    const LONG_NS: &str = "a-namespace-name-that-is-exactly-sixty-three-characters-long-xx";
    const LONG_NAME: &str = "a-service-name-that-is-also-exactly-sixty-three-characters-yyyy";

    /// One Service of a small universe where names are long, ClusterIPs and
    /// external addresses collide and move, and endpoints come and go.
    /// (extra ports, ClusterIP, external IPs, NodePort?, endpoints); `None`: deleted.
    type ServiceState = Option<(usize, &'static str, Vec<&'static str>, bool, Vec<&'static str>)>;

    fn service_state() -> impl Strategy<Value = ServiceState> {
        prop::option::of((
            0usize..3,
            prop::sample::select(&["172.30.0.1", "172.30.0.2", "172.30.0.3"][..]),
            prop::collection::vec(prop::sample::select(&["172.30.0.1", "203.0.113.7"][..]), 0..2),
            any::<bool>(),
            prop::collection::vec(prop::sample::select(&["10.1.0.1", "10.1.0.2", "10.1.0.3"][..]), 0..3),
        ))
    }

    fn names(i: usize) -> (&'static str, &'static str) {
        [("ns", "a"), ("ns", "b"), (LONG_NS, LONG_NAME)][i]
    }

    /// The changes that take the cluster to `states` (one entry per Service slot).
    fn changes(states: &[ServiceState]) -> Vec<StateChange> {
        let mut out = Vec::new();
        for (slot, st) in states.iter().enumerate() {
            let (ns, name) = names(slot);
            match st {
                None => {
                    out.push(StateChange::ServiceDeleted(ferry_model::ObjectKey::new(ns, name)));
                    out.push(StateChange::EndpointSliceDeleted(ferry_model::ObjectKey::new(ns, format!("{name}-1"))));
                }
                Some((ports, cip, eips, node_port, eps)) => {
                    let port_list: Vec<_> = (0..=*ports)
                        .map(|p| {
                            let pname = if p == 0 { "a-port-name-15c".to_string() } else { format!("p{p}") };
                            json!({"name": pname, "port": 80 + p as i64, "protocol": if p == 2 { "UDP" } else { "TCP" },
                                   "nodePort": if *node_port { json!(30080 + p as i64) } else { json!(null) }})
                        })
                        .collect();
                    let svc = json!({"metadata": {"name": name, "namespace": ns},
                        "spec": {"type": if *node_port { "NodePort" } else { "ClusterIP" }, "clusterIP": cip,
                                 "externalIPs": eips, "ports": port_list}});
                    let slice_ports: Vec<_> = (0..=*ports)
                        .map(|p| {
                            let pname = if p == 0 { "a-port-name-15c".to_string() } else { format!("p{p}") };
                            json!({"name": pname, "port": 8080 + p as i64, "protocol": if p == 2 { "UDP" } else { "TCP" }})
                        })
                        .collect();
                    let endpoints: Vec<_> =
                        eps.iter().map(|ip| json!({"addresses": [ip], "nodeName": "node-a"})).collect();
                    let slice = json!({"metadata": {"name": format!("{name}-1"), "namespace": ns,
                                                    "labels": {"kubernetes.io/service-name": name}},
                        "addressType": "IPv4", "endpoints": endpoints, "ports": slice_ports});
                    out.push(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
                    out.push(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// After any sequence of Plans: incremental syncs, one fresh full sync
        /// and adopt + full sync all leave the same datapath; adopt + sync of
        /// an unchanged Plan writes nothing; and every prefix of every batch is
        /// consistent (checked by `apply_all`).
        #[test]
        fn incremental_fresh_and_adopted_datapaths_agree(
            steps in prop::collection::vec(prop::collection::vec(service_state(), 3), 1..8)
        ) {
            let mut planner = Planner::new(cfg());
            let mut p = Programmer::new();
            let mut k = Kernel::default();
            let mut first = true;
            for states in &steps {
                for c in changes(states) {
                    planner.apply(c);
                }
                let (plan, diff) = planner.sync();
                let ops = if first { p.sync(&plan, None, &rt()) } else { p.sync(&plan, Some(&diff), &rt()) };
                first = false;
                k.apply_all(&ops);
                assert_no_leftovers(&k);

                let mut fresh = Kernel::default();
                fresh.apply_all(&Programmer::new().sync(&plan, None, &rt()));
                prop_assert_eq!(view(&k), view(&fresh), "incremental and fresh datapaths differ");

                let mut adopted = Programmer::adopt(&k.dump());
                let ops = adopted.sync(&plan, None, &rt());
                prop_assert!(ops.is_empty(), "adopt + sync of the programmed Plan wrote {:#?}", ops);
                // The agent carries on with the adopted mirror half the time.
                if steps.len() % 2 == 0 {
                    p = adopted;
                }
            }
        }

        /// Puts fail at random (a full map, say): each failing service port
        /// is refused by name and the others are programmed as a fresh full
        /// sync would; every prefix stays consistent; and the agent's retry
        /// (adopt what the kernel holds, then a full sync) leaves the
        /// datapath a fresh full sync leaves.
        #[test]
        fn injected_failures_then_retry_equal_a_fresh_sync(
            steps in prop::collection::vec(prop::collection::vec(service_state(), 3), 1..6),
            seed in any::<u64>(),
            one_in in 2u64..8,
        ) {
            let mut planner = Planner::new(cfg());
            let mut p = Programmer::new();
            let mut k = Kernel::default();
            let mut first = true;
            let fails = |op: &MapOp| {
                use std::hash::{Hash, Hasher};
                let is_put = format!("{op:?}").starts_with("Put");
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (seed, format!("{op:?}")).hash(&mut h);
                is_put && h.finish().is_multiple_of(one_in)
            };
            for states in &steps {
                for c in changes(states) {
                    planner.apply(c);
                }
                let (plan, diff) = planner.sync();
                let batch = if first { p.sync_batch(&plan, None, &rt()) } else { p.sync_batch(&plan, Some(&diff), &rt()) };
                first = false;
                let kernel = std::cell::RefCell::new(&mut k);
                let refused = batch.apply(
                    |run| {
                        if run.iter().any(fails) {
                            return false;
                        }
                        let mut k = kernel.borrow_mut();
                        for op in run {
                            k.apply(op);
                            k.assert_consistent(&format!("after {op:?}"));
                        }
                        true
                    },
                    |op| {
                        if fails(op) {
                            return Err("injected failure");
                        }
                        let mut k = kernel.borrow_mut();
                        k.apply(op);
                        k.assert_consistent(&format!("after {op:?}"));
                        Ok(())
                    },
                );
                let mut fresh = Kernel::default();
                fresh.apply_all(&Programmer::new().sync(&plan, None, &rt()));
                // Every service port not refused is served as a fresh sync serves it.
                if !refused.iter().any(|r| r.owner == ferry_bpf::program::NODE_OWNER) {
                    let now = view(&k);
                    for line in view(&fresh).iter().filter(|l| l.starts_with("fe ")) {
                        let name = line.split(" -> ").nth(1).and_then(|r| r.split(" action=").next()).unwrap();
                        if refused.iter().any(|r| r.owner.starts_with(name)) {
                            continue;
                        }
                        prop_assert!(now.contains(line), "not refused, yet not programmed: {line}\nrefused: {refused:?}");
                    }
                }
                for r in &refused {
                    prop_assert!(r.reason.contains("injected") || r.reason.contains("backend") || r.reason.contains("frontend moves"), "{r:?}");
                }
                if refused.is_empty() {
                    prop_assert_eq!(view(&k), view(&fresh), "nothing refused, yet not the Plan");
                } else {
                    // The agent's retry: the mirror from the kernel, then a full sync.
                    p = Programmer::adopt(&k.dump());
                    k.apply_all(&p.sync(&plan, None, &rt()));
                    prop_assert_eq!(view(&k), view(&fresh), "retry after refusals differs from a fresh sync");
                    first = false;
                }
                assert_no_leftovers(&k);
            }
        }
    }
}

/// A frontend handed from a deleted Service to a new one in one sync stays
/// programmed (the old owner's removal used to delete the new owner's write).
#[test]
fn a_cluster_ip_moved_to_another_service_in_one_sync_keeps_its_frontend() {
    let svc = |name: &str| {
        json!({"metadata": {"name": name, "namespace": "ns"},
               "spec": {"clusterIP": "172.30.0.1", "ports": [{"name": "http", "port": 80}]}})
    };
    let slice = |name: &str, ip: &str| {
        json!({"metadata": {"name": format!("{name}-1"), "namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4", "endpoints": [{"addresses": [ip]}], "ports": [{"name": "http", "port": 8080}]})
    };
    let mut planner = ferry_model::Planner::new(cfg());
    planner.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc("old")).unwrap())));
    planner
        .apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice("old", "10.1.0.1")).unwrap())));
    let (plan, _) = planner.sync();
    let mut p = Programmer::new();
    let mut k = Kernel::default();
    k.apply_all(&p.sync(&plan, None, &rt()));

    planner.apply(StateChange::ServiceDeleted(ferry_model::ObjectKey::new("ns", "old")));
    planner.apply(StateChange::EndpointSliceDeleted(ferry_model::ObjectKey::new("ns", "old-1")));
    planner.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc("new")).unwrap())));
    planner
        .apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice("new", "10.1.0.2")).unwrap())));
    let (plan, diff) = planner.sync();
    k.apply_all(&p.sync(&plan, Some(&diff), &rt()));
    let got: Vec<String> = k.resolve(&fe("172.30.0.1", 80), SET_CLUSTER).iter().map(|(ip, _)| ip.to_string()).collect();
    assert_eq!(got, ["10.1.0.2"]);
    assert!(k.names.values().any(|n| n.starts_with("ns/new:http")), "{:?}", k.names);
}

/// A service port whose name does not fit the names map keeps its id and
/// its frontend across adopt + resync (it used to be re-created, and its
/// frontend deleted, after every restart).
#[test]
fn a_long_named_service_port_survives_adopt_and_resync() {
    let ns = "a-namespace-name-that-is-exactly-sixty-three-characters-long-xx";
    let name = "a-service-name-that-is-also-exactly-sixty-three-characters-yyyy";
    let svc = json!({"metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "172.30.0.1", "ports": [{"name": "a-port-name-15c", "port": 80}]}});
    let slice = json!({"metadata": {"name": "s-1", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.1"]}], "ports": [{"name": "a-port-name-15c", "port": 8080}]});
    let mut state = ClusterState::default();
    state.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
    state.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
    let plan = build_plan(&state, &cfg());
    assert!(ferry_bpf::canonical_name(plan.services.keys().next().unwrap()).len() > NAME_LEN);
    let mut k = Kernel::default();
    k.apply_all(&Programmer::new().sync(&plan, None, &rt()));
    for round in 0..3 {
        let mut adopted = Programmer::adopt(&k.dump());
        let ops = adopted.sync(&plan, None, &rt());
        assert!(ops.is_empty(), "round {round}: {ops:#?}");
        k.apply_all(&ops);
        assert_eq!(k.resolve(&fe("172.30.0.1", 80), SET_CLUSTER).len(), 1, "round {round}");
    }
}

/// No silent 16-bit wrap (issue 12): a backend set larger than a slot number
/// can count is refused by the planner by name, and even a Plan built by hand
/// with one is programmed with distinct slot numbers and a saturated count,
/// never slot 0 written twice.
#[test]
fn backend_sets_past_16_bits_never_wrap() {
    let n = 70_000usize;
    let ip = |i: usize| format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
    // The planner: refused by name, whatever maxEndpointsPerService says.
    let mut state = cluster(1, &["10.2.0.1"]);
    for chunk in 0..n / 1000 {
        let eps: Vec<_> = (chunk * 1000..(chunk + 1) * 1000).map(|i| json!({"addresses": [ip(i)]})).collect();
        let slice = json!({"metadata": {"name": format!("big-{chunk}"), "namespace": "ns", "labels": {"kubernetes.io/service-name": "s0"}},
            "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": 8080}]});
        state.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
    }
    let mut config = cfg();
    config.service_limits.max_endpoints = 1_000_000;
    let plan = build_plan(&state, &config);
    assert!(plan.services.is_empty(), "a 70,000-endpoint service port was planned");
    assert!(
        plan.problems.iter().any(|p| p.object.name() == "s0" && p.message.contains("at most 65535 per service port")),
        "{:?}",
        plan.problems
    );

    // The Programmer, handed such a Plan anyway.
    let small = build_plan(&cluster(1, &["10.2.0.1"]), &cfg());
    let mut plan = small.clone();
    let (id, sp) = small.services.iter().next().unwrap();
    let mut sp = (**sp).clone();
    let template = sp.endpoints[0].clone();
    sp.endpoints = (0..n)
        .map(|i| {
            let mut e = template.clone();
            e.ip = ip(i).parse().unwrap();
            e
        })
        .collect();
    sp.categorized.set_indexes(&(0..n as u32).collect::<Vec<_>>(), &[]);
    plan.services.insert(id.clone(), std::sync::Arc::new(sp));
    let ops = Programmer::new().sync(&plan, None, &rt());
    let slots: Vec<u16> = ops
        .iter()
        .filter_map(|op| match op {
            MapOp::PutSlot(k, _) if k.set == SET_CLUSTER => Some(k.slot),
            _ => None,
        })
        .collect();
    let distinct: BTreeSet<u16> = slots.iter().copied().collect();
    assert_eq!(slots.len(), distinct.len(), "a slot number was written twice (wrapped)");
    assert_eq!(distinct.len(), 65_535);
    let counts: Vec<[u16; 2]> =
        ops.iter().filter_map(|op| if let MapOp::PutService(_, v) = op { Some(v.count) } else { None }).collect();
    assert_eq!(counts, vec![[65_535, 0]]);
}

/// DSR's tunnel table goes to the map of its family: the other nodes' IPv4
/// rows into `ferry_tunnels`, their IPv6 rows into `ferry_tunnels6`, a node
/// without an IPv6 address has none there; adopted back, nothing to do; a
/// Node losing its IPv6 address takes exactly its IPv6 rows away.
#[test]
fn dsr_tunnels_of_each_family_go_to_their_own_map() {
    let node = |name: &str, cidrs: &[&str], addrs: &[&str]| {
        let addrs: Vec<_> = addrs.iter().map(|a| json!({"type": "InternalIP", "address": a})).collect();
        let n = json!({"metadata": {"name": name}, "spec": {"podCIDRs": cidrs}, "status": {"addresses": addrs}});
        StateChange::NodeApplied(Box::new(serde_json::from_value(n).unwrap()))
    };
    let mut s = cluster(1, &["10.2.0.1"]);
    s.apply(node("node-b", &["10.244.2.0/24", "fd00:244:2::/64"], &["192.168.0.3", "fd00:50::3"]));
    s.apply(node("node-c", &["10.244.3.0/24", "fd00:244:3::/64"], &["192.168.0.4"]));
    let cfg = NodeConfig { load_balancing: ferry_model::LoadBalancingMode::Dsr, ..cfg() };
    let plan = build_plan(&s, &cfg);
    let mut p = Programmer::new();
    let mut k = Kernel::default();
    k.apply_all(&p.sync(&plan, None, &rt()));
    let v4: BTreeSet<String> = k
        .tunnels
        .iter()
        .map(|(t, via)| {
            let (a, v) = (std::net::Ipv4Addr::from(t.addr.to_ne_bytes()), std::net::Ipv4Addr::from(via.to_ne_bytes()));
            format!("{a}/{} -> {v}", t.prefixlen)
        })
        .collect();
    let v6 = |k: &Kernel| -> BTreeSet<String> {
        k.tunnels6
            .iter()
            .map(|(t, via)| format!("{}/{} -> {}", ip_of(&t.addr, FAM_V6), t.prefixlen, ip_of(via, FAM_V6)))
            .collect()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        v4,
        set(&[
            "10.244.2.0/24 -> 192.168.0.3",
            "10.244.3.0/24 -> 192.168.0.4",
            "192.168.0.3/32 -> 192.168.0.3",
            "192.168.0.4/32 -> 192.168.0.4"
        ])
    );
    assert_eq!(v6(&k), set(&["fd00:244:2::/64 -> fd00:50::3", "fd00:50::3/128 -> fd00:50::3"]), "node-c has no IPv6");
    assert!(Programmer::adopt(&k.dump()).sync(&plan, None, &rt()).is_empty(), "adopted: nothing to do");

    s.apply(node("node-b", &["10.244.2.0/24", "fd00:244:2::/64"], &["192.168.0.3"]));
    let plan2 = build_plan(&s, &cfg);
    let ops = p.sync(&plan2, Some(&Plan::diff(&plan, &plan2)), &rt());
    assert!(ops.iter().all(|op| matches!(op, MapOp::DelTunnel6(_))) && ops.len() == 2, "{ops:#?}");
    k.apply_all(&ops);
    assert!(v6(&k).is_empty() && k.tunnels.len() == 4);
}
