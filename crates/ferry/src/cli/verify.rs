//! `ferry status --verify`: the pinned maps compared with the Plan the agent
//! would program from the same manifests and node config.
//!
//! The comparison is the agent's own restart path, not a second reading of the
//! layouts: `Programmer::adopt` reads the maps back, and a full `sync` against
//! the Plan lists the writes that would bring them to it. A datapath equal to
//! the Plan needs none; every write it would need is one difference.
//!
//! XDP acceleration is checked apart (`xdp_differences`): the pinned XDP
//! links against the node config's `acceleration` and external devices.

use ferry_bpf::acceleration::{DeviceXdp, Fallback, XdpMode};
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

/// The map name of XDP differences (they are pinned links, not map entries).
pub const XDP_LINK: &str = "XDP link";

/// Every way ferry's XDP links (`devs`, read from the pins) differ from the
/// node config: `native` wants ferry's program in driver mode on every
/// external device; `best-effort` the same, except on a device the agent
/// recorded it could not attach (`fallbacks`); `disabled` wants none. An XDP
/// link on a device that is no external device of the config is extra.
pub fn xdp_differences(
    acceleration: ferry_model::Acceleration,
    externals: &[String],
    devs: &[DeviceXdp],
    fallbacks: &[Fallback],
) -> Vec<Difference> {
    use ferry_model::Acceleration::*;
    let mut out = Vec::new();
    let diff = |kind, entry| Difference { kind, map: XDP_LINK, entry };
    for name in externals {
        let link = devs.iter().find(|d| &d.device == name).and_then(|d| d.xdp.as_ref());
        let fell_back = fallbacks.iter().any(|f| &f.device == name);
        match (acceleration, link) {
            (Disabled, None) => {}
            (Disabled, Some(x)) => out.push(diff(
                "extra",
                format!(
                    "{name}: program {} (link {}) attached while acceleration is disabled",
                    x.program_id, x.link_id
                ),
            )),
            (Native, None) | (BestEffort, None) if !(acceleration == BestEffort && fell_back) => out
                .push(diff("missing", format!("{name}: no ferry XDP program attached (acceleration {acceleration})"))),
            (_, None) => {}
            (_, Some(x)) if x.ifindex == 0 => {
                out.push(diff("wrong", format!("{name}: link {} detached (its device went away)", x.link_id)))
            }
            (_, Some(x)) if x.mode.is_some_and(|m| m != XdpMode::Native) => out.push(diff(
                "wrong",
                format!(
                    "{name}: link {} attached, but the device runs it as: {}",
                    x.link_id,
                    x.mode.unwrap_or(XdpMode::Other)
                ),
            )),
            (_, Some(_)) => {}
        }
    }
    for d in devs.iter().filter(|d| !externals.contains(&d.device)) {
        if let Some(x) = &d.xdp {
            out.push(diff(
                "extra",
                format!(
                    "{}: program {} (link {}) on a device that is not an external device of the node config",
                    d.device, x.program_id, x.link_id
                ),
            ));
        }
    }
    out
}

/// Every difference between `dump` (read from the kernel) and `plan` on a node of `rt`.
/// Empty when the datapath is exactly what the agent would program.
pub fn differences(dump: &MapDump, plan: &Plan, rt: &NodeRuntime) -> Vec<Difference> {
    let mut programmer = Programmer::adopt(dump);
    let ops = programmer.sync(plan, None, rt);
    let view = Present::of(dump);
    let present = |k: &LocalKey| dump.addrs.binary_search(k).is_ok();
    let mut out: Vec<Difference> =
        ops.iter().filter(|op| !matches!(op, MapOp::PutAddr(k) if present(k))).map(|op| view.describe(op)).collect();
    // With the fast path on, an address missing from the pass-through set
    // would have its packets waved through untranslated.
    if rt.fast_pass {
        let reported: BTreeSet<LocalKey> =
            ops.iter().filter_map(|op| if let MapOp::PutAddr(k) = op { Some(*k) } else { None }).collect();
        for k in programmer.pass_addrs() {
            if !present(&k) && !reported.contains(&k) {
                out.push(view.describe(&MapOp::PutAddr(k)));
            }
        }
    }
    out
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
            MapOp::PutAddr(k) => ("missing", "ferry_addrs", ip_of(&k.addr, k.family).to_string()),
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
            MapOp::PutTunnel(k, via) => (
                Self::put(d.tunnels.iter().any(|(t, _)| t == k)),
                "ferry_tunnels",
                format!(
                    "{}/{} -> {}",
                    std::net::Ipv4Addr::from(k.addr.to_ne_bytes()),
                    k.prefixlen,
                    std::net::Ipv4Addr::from(via.to_ne_bytes())
                ),
            ),
            MapOp::DelTunnel(k) => (
                "extra",
                "ferry_tunnels",
                format!("{}/{}", std::net::Ipv4Addr::from(k.addr.to_ne_bytes()), k.prefixlen),
            ),
            MapOp::PutTunnel6(kv) => (
                Self::put(d.tunnels6.iter().any(|(t, _)| *t == kv.0)),
                "ferry_tunnels6",
                format!("{}/{} -> {}", ip_of(&kv.0.addr, FAM_V6), kv.0.prefixlen, ip_of(&kv.1, FAM_V6)),
            ),
            MapOp::DelTunnel6(k) => ("extra", "ferry_tunnels6", format!("{}/{}", ip_of(&k.addr, FAM_V6), k.prefixlen)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{ClusterState, NodeConfig, StateChange, build_plan};
    use serde_json::json;

    fn plan() -> Plan {
        let mut s = ClusterState::default();
        let svc = json!({"metadata": {"name": "web", "namespace": "demo"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.20",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}});
        s.apply(StateChange::ServiceApplied(Box::new(serde_json::from_value(svc).unwrap())));
        let slice = json!({"metadata": {"name": "web-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.1.21"], "nodeName": "node-a"}, {"addresses": ["10.244.1.22"]}]});
        s.apply(StateChange::EndpointSliceApplied(Box::new(serde_json::from_value(slice).unwrap())));
        let cfg = NodeConfig {
            node_name: "node-a".into(),
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        build_plan(&s, &cfg)
    }

    fn rt() -> NodeRuntime {
        NodeRuntime { host_netns_cookie: 4242, nat_ports: (61000, 65535), ..Default::default() }
    }

    /// The maps a fresh agent writes for `plan` (a fresh sync only puts).
    fn programmed(plan: &Plan) -> MapDump {
        let mut d = MapDump::default();
        for op in Programmer::new().sync(plan, None, &rt()) {
            match op {
                MapOp::PutBackend(id, b) => d.backends.push((id, b)),
                MapOp::PutSlot(k, v) => d.slots.push((k, v)),
                MapOp::PutMember(k, v) => d.members.push((k, v)),
                MapOp::PutFirewall(k) => d.firewall.push(k),
                MapOp::PutService(id, v) => d.services.push((id, v)),
                MapOp::PutName(id, n) => d.names.push((id, n.into())),
                MapOp::PutFrontend(k, v) => d.frontends.push((k, v)),
                MapOp::PutLocal(k, v) => d.locals.push((k, v)),
                MapOp::PutRange(k) => d.ranges.push(k),
                MapOp::PutConfig(c) => d.config = Some(*c),
                MapOp::PutDevice(i, v) => d.devices.push((i, *v)),
                MapOp::PutMaglev(k, t) => d.maglev.push((k, t.into())),
                MapOp::PutAddr(k) => d.addrs.push(k),
                MapOp::PutTunnel(k, v) => d.tunnels.push((k, v)),
                MapOp::PutTunnel6(kv) => d.tunnels6.push(*kv),
                other => panic!("a fresh sync deleted something: {other:?}"),
            }
        }
        d.addrs.sort_unstable();
        d
    }

    #[test]
    fn xdp_links_are_checked_against_the_acceleration_setting() {
        use ferry_bpf::acceleration::XdpLink;
        use ferry_model::Acceleration::*;
        let link = |mode| XdpLink { link_id: 7, program_id: 70, ifindex: 2, mode };
        let dev = |name: &str, external, xdp| DeviceXdp { device: name.into(), external, xdp };
        let ext = vec!["eth0".to_string(), "eth1".to_string()];
        let both = [dev("eth0", true, Some(link(Some(XdpMode::Native)))), dev("eth1", true, Some(link(None)))];
        assert_eq!(xdp_differences(Native, &ext, &both, &[]), vec![]);
        assert_eq!(xdp_differences(BestEffort, &ext, &both, &[]), vec![]);
        let off = xdp_differences(Disabled, &ext, &both, &[]);
        assert_eq!(off.iter().map(|d| d.kind).collect::<Vec<_>>(), ["extra", "extra"], "{off:#?}");
        assert!(off[0].entry.contains("eth0: program 70 (link 7) attached while acceleration is disabled"), "{off:#?}");

        let one = [dev("eth0", true, Some(link(Some(XdpMode::Native)))), dev("eth1", true, None)];
        let missing = xdp_differences(Native, &ext, &one, &[]);
        assert_eq!(missing.len(), 1, "{missing:#?}");
        assert_eq!((missing[0].kind, missing[0].map), ("missing", XDP_LINK));
        assert!(missing[0].entry.starts_with("eth1: no ferry XDP program attached (acceleration native)"));
        assert_eq!(xdp_differences(BestEffort, &ext, &one, &[]).len(), 1, "best-effort without a recorded fallback");
        let fell = [Fallback { device: "eth1".into(), reason: "Operation not supported".into() }];
        assert_eq!(xdp_differences(BestEffort, &ext, &one, &fell), vec![], "a recorded fallback is no drift");
        assert_eq!(xdp_differences(Native, &ext, &one, &fell).len(), 1, "native has no fallback");
        assert_eq!(xdp_differences(Disabled, &ext, &[dev("eth0", true, None)], &[]), vec![]);

        let odd = [
            dev("eth0", true, Some(XdpLink { ifindex: 0, ..link(None) })),
            dev("eth1", true, Some(link(Some(XdpMode::Generic)))),
            dev("eth9", false, Some(link(Some(XdpMode::Native)))),
        ];
        let got = xdp_differences(Native, &ext, &odd, &[]);
        let kinds: Vec<_> = got.iter().map(|d| (d.kind, d.entry.split(':').next().unwrap_or(""))).collect();
        assert_eq!(kinds, [("wrong", "eth0"), ("wrong", "eth1"), ("extra", "eth9")], "{got:#?}");
    }

    #[test]
    fn the_maps_a_fresh_agent_writes_have_no_difference() {
        let plan = plan();
        assert_eq!(differences(&programmed(&plan), &plan, &rt()), vec![]);
    }

    #[test]
    fn every_kind_of_drift_is_named() {
        let plan = plan();
        let mut d = programmed(&plan);
        // A frontend lost, a service entry changed, a stray backend, a service left half-written.
        let cip = d.frontends.iter().position(|(k, _)| k.port == 80).unwrap();
        d.frontends.remove(cip);
        d.services[0].1.count[0] += 1;
        let stray: std::net::IpAddr = "10.244.1.99".parse().unwrap();
        d.backends.push((77, Backend { addr: words(&stray), port: 8080, family: family_of(&stray), flags: 0 }));
        d.slots.push((SlotKey { service: 55, rev: 0, set: 0, slot: 0 }, 77));
        let diffs = differences(&d, &plan, &rt());
        let has = |kind: &str, map: &str, entry: &str| {
            diffs.iter().any(|x| x.kind == kind && x.map == map && x.entry.contains(entry))
        };
        assert!(has("missing", "ferry_frontends", "10.96.0.20:80/TCP -> demo/web:http"), "{diffs:#?}");
        assert!(has("wrong", "ferry_services", "demo/web:http"), "{diffs:#?}");
        assert!(has("orphaned", "ferry_slots", "#55 rev 0 set 0 slot 0"), "{diffs:#?}");
        assert!(has("orphaned", "ferry_backends", "10.244.1.99:8080"), "{diffs:#?}");
        assert!(diffs.iter().all(|x| x.map != "ferry_frontends" || x.kind == "missing"), "{diffs:#?}");
    }
}
