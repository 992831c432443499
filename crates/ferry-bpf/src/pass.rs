//! The pass-through sets of the packet path (`ferry_addrs`, `ferry_peers`; see
//! "the pass-through fast path" in `bpf/lib/maps.h`): what they must hold,
//! and bringing the pinned maps there.
//!
//! Both sets only ever grow between collections: every sync writes the
//! address of each frontend and node entry it writes (`MapOp::PutAddr`), and
//! the datapath notes each backend it sends a flow to without SNAT. Removal
//! happens here alone, at the agent's periodic collection, on the sync
//! thread, from one reading of the maps: an address goes when nothing
//! programmed names it and no tracked flow was sent to it (or answered from
//! it), nor a flow this node carries by DSR was sent to it. No sync runs meanwhile, so no frontend or backend can appear between
//! the reading and the removal; a flow the datapath creates meanwhile goes to
//! a backend or frontend that is programmed, which is kept.
//!
//! The same reconciliation fills both sets after an install or an upgrade
//! from a layout without them, before the agent turns `CFG_FAST_PASS` on.

use crate::entries::{CT_ORIGINAL, CT_REPLY, CT_SNAT, LocalKey, Words};
use crate::maps::{MapError, Maps};
use crate::program::MapDump;
use crate::stale::{CtEntry, DsrEntry};
use std::collections::BTreeSet;

/// One of the two pinned sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassSet {
    /// `ferry_addrs`: destinations the packet path must look at.
    Addrs,
    /// `ferry_peers`: sources whose packets may be replies of translated flows.
    Peers,
}

/// What a reconciliation adds and removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassChanges {
    pub add_addrs: Vec<LocalKey>,
    pub del_addrs: Vec<LocalKey>,
    pub add_peers: Vec<LocalKey>,
    pub del_peers: Vec<LocalKey>,
}

impl PassChanges {
    pub fn is_empty(&self) -> bool {
        self.add_addrs.is_empty() && self.del_addrs.is_empty() && self.add_peers.is_empty() && self.del_peers.is_empty()
    }
}

fn key(addr: Words, family: u8) -> LocalKey {
    LocalKey { addr, family }
}

/// The addresses `ferry_addrs` must hold: `programmed` (every address the
/// programmed entries name, [`crate::Programmer::pass_addrs`]: frontends but
/// the NodePort wildcard, node addresses, SNAT addresses) and the frontend
/// every tracked translated flow was sent to (a deleted Service's flows keep
/// being translated), and the frontend of every flow this node tunnels by
/// DSR (`dsr`: their next packets are found by the full path only).
pub fn wanted_addrs(programmed: &BTreeSet<LocalKey>, flows: &[CtEntry], dsr: &[DsrEntry]) -> BTreeSet<LocalKey> {
    let mut out = programmed.clone();
    // Masqueraded pod egress (backend 0) is sent to the outside world: its
    // replies come back to a node address, which is in the set already.
    out.extend(flows.iter().filter(|e| e.dir == CT_ORIGINAL && e.backend != 0).map(|e| key(e.dst, e.family)));
    out.extend(dsr.iter().map(|e| key(e.dst, e.family)));
    out
}

/// The backends whose replies a tracked flow needs translated: the reply
/// direction's source of every flow sent to a backend without SNAT (with
/// SNAT, replies come to a node address).
pub fn needed_peers(flows: &[CtEntry]) -> BTreeSet<LocalKey> {
    flows
        .iter()
        .filter(|e| e.dir == CT_REPLY && e.backend != 0 && e.flags & CT_SNAT == 0)
        .map(|e| key(e.src, e.family))
        .collect()
}

/// What the programmed state says, for [`changes`]: the addresses its
/// entries name and its backends' addresses.
#[derive(Debug, Clone, Default)]
pub struct Programmed {
    pub addrs: BTreeSet<LocalKey>,
    pub backends: BTreeSet<LocalKey>,
}

impl Programmed {
    /// From a reading of the maps and the Programmer adopted from it.
    pub fn of(dump: &MapDump, programmer: &crate::Programmer) -> Programmed {
        let backends = dump.backends.iter().map(|(_, b)| key(b.addr, b.family)).collect();
        Programmed { addrs: programmer.pass_addrs(), backends }
    }
}

/// From what the sets hold now: what to add and what to remove. A peer that
/// is still a programmed backend is kept even without flows (the datapath
/// may send it one at any moment and would find it noted already).
pub fn changes(
    programmed: &Programmed,
    flows: &[CtEntry],
    dsr: &[DsrEntry],
    addrs_now: &BTreeSet<LocalKey>,
    peers_now: &BTreeSet<LocalKey>,
) -> PassChanges {
    let addrs = wanted_addrs(&programmed.addrs, flows, dsr);
    let peers = needed_peers(flows);
    PassChanges {
        add_addrs: addrs.difference(addrs_now).copied().collect(),
        del_addrs: addrs_now.difference(&addrs).copied().collect(),
        add_peers: peers.difference(peers_now).copied().collect(),
        del_peers: peers_now
            .iter()
            .filter(|k| !peers.contains(k) && !programmed.backends.contains(k))
            .copied()
            .collect(),
    }
}

/// Brings both pinned sets to what `programmed`, `flows` and `dsr` (read
/// just before, on the sync thread) say. Additions first: a failure leaves
/// the sets larger than needed, never smaller.
pub fn reconcile(
    maps: &Maps,
    programmed: &Programmed,
    flows: &[CtEntry],
    dsr: &[DsrEntry],
) -> Result<PassChanges, MapError> {
    let addrs_now = maps.pass_set(PassSet::Addrs).into_iter().collect();
    let peers_now = maps.pass_set(PassSet::Peers).into_iter().collect();
    let c = changes(programmed, flows, dsr, &addrs_now, &peers_now);
    maps.put_pass_set(PassSet::Addrs, &c.add_addrs)?;
    maps.put_pass_set(PassSet::Peers, &c.add_peers)?;
    maps.delete_pass_set(PassSet::Addrs, &c.del_addrs);
    maps.delete_pass_set(PassSet::Peers, &c.del_peers);
    Ok(c)
}

/// Fills both sets before the fast path is turned on (after an install, or
/// an upgrade from a layout without them): every address the programmed
/// entries name, the frontends of tracked and DSR flows and the backends
/// answering untranslated ones. Nothing is removed (that waits for
/// [`reconcile`]). Returns how many addresses and peers were written.
pub fn fill(
    maps: &Maps,
    programmed: &BTreeSet<LocalKey>,
    flows: &[CtEntry],
    dsr: &[DsrEntry],
) -> Result<(usize, usize), MapError> {
    let addrs: Vec<LocalKey> = wanted_addrs(programmed, flows, dsr).into_iter().collect();
    let peers: Vec<LocalKey> = needed_peers(flows).into_iter().collect();
    maps.put_pass_set(PassSet::Addrs, &addrs)?;
    maps.put_pass_set(PassSet::Peers, &peers)?;
    Ok((addrs.len(), peers.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entries::*;
    use std::net::IpAddr;

    fn k(s: &str) -> LocalKey {
        let ip: IpAddr = s.parse().unwrap();
        LocalKey { addr: words(&ip), family: family_of(&ip) }
    }

    fn flow(dir: u8, src: &str, dst: &str, backend: u32, flags: u8) -> CtEntry {
        let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        CtEntry {
            unconfirmed: false,
            src: words(&s),
            dst: words(&d),
            sport: 1,
            dport: 2,
            proto: 6,
            family: family_of(&s),
            dir,
            new_src: [0; 4],
            new_dst: [0; 4],
            new_sport: 0,
            new_dport: 0,
            service: u32::from(backend != 0),
            backend,
            flags,
            expires_ns: 0,
        }
    }

    /// The programmed state of a node: a ClusterIP (v4 and v6), a NodePort, a
    /// node address, a device's SNAT address, two backends; read back from
    /// the maps as the agent's resync does.
    fn programmed() -> Programmed {
        let mut d = MapDump::default();
        let fe = |s: &str, port| {
            let ip: IpAddr = s.parse().unwrap();
            (
                FeKey { addr: words(&ip), port, proto: 6, family: family_of(&ip) },
                FeVal { service: 1, kind: 0, flags: 0 },
            )
        };
        d.names.push((1, "test/s:http/TCP/IPv4".into()));
        d.services.push((1, SvcVal::default()));
        d.frontends.push(fe("10.96.0.10", 80));
        d.frontends.push(fe("0.0.0.0", 30080)); // a NodePort: any node address
        d.frontends.push(fe("fd00::10", 80));
        d.locals.push((k("192.168.1.10"), LOCAL_HOST));
        let b = |s: &str| {
            let ip: IpAddr = s.parse().unwrap();
            Backend { addr: words(&ip), port: 8080, family: family_of(&ip), flags: 0 }
        };
        d.backends.push((1, b("10.244.1.5")));
        d.backends.push((2, b("10.244.1.6")));
        d.devices.push((3, Device { snat: [words(&"192.168.2.10".parse().unwrap()), [0; 4]], flags: DEV_EXTERNAL }));
        Programmed::of(&d, &crate::Programmer::adopt(&d))
    }

    #[test]
    fn frontends_node_and_snat_addresses_are_wanted_not_the_nodeport_wildcard() {
        let got = wanted_addrs(&programmed().addrs, &[], &[]);
        let want: BTreeSet<_> = ["10.96.0.10", "fd00::10", "192.168.1.10", "192.168.2.10"].map(k).into();
        assert_eq!(got, want);
    }

    #[test]
    fn a_deleted_frontend_stays_while_a_flow_was_sent_to_it() {
        let flows =
            [flow(CT_ORIGINAL, "203.0.113.7", "10.96.0.99", 1, 0), flow(CT_REPLY, "10.244.1.5", "203.0.113.7", 1, 0)];
        assert!(wanted_addrs(&programmed().addrs, &flows, &[]).contains(&k("10.96.0.99")));
        // Masqueraded pod egress (no backend) adds no outside address.
        let masq = [flow(CT_ORIGINAL, "10.244.1.5", "1.2.3.4", 0, CT_SNAT)];
        assert!(!wanted_addrs(&programmed().addrs, &masq, &[]).contains(&k("1.2.3.4")));
    }

    /// A deleted LoadBalancer IP stays while this node tunnels a DSR flow to
    /// it: its next packets must not take the fast path past `dsr_tracked`.
    #[test]
    fn a_deleted_frontend_stays_while_a_dsr_flow_was_sent_to_it() {
        let f = flow(CT_ORIGINAL, "203.0.113.7", "192.0.2.99", 1, 0);
        let d = DsrEntry {
            src: f.src,
            dst: f.dst,
            sport: 1,
            dport: 80,
            proto: 6,
            family: f.family,
            service: 1,
            backend: 1,
            backend_addr: k("10.244.2.5").addr,
            backend_port: 8080,
            expires_ns: 0,
        };
        let now: BTreeSet<_> = ["192.0.2.99"].map(k).into();
        let c = changes(&programmed(), &[], std::slice::from_ref(&d), &now, &BTreeSet::new());
        assert!(!c.del_addrs.contains(&k("192.0.2.99")), "kept while the DSR flow lives");
        let c = changes(&programmed(), &[], &[], &now, &BTreeSet::new());
        assert_eq!(c.del_addrs, vec![k("192.0.2.99")], "removed once it is gone");
        let c = changes(&programmed(), &[], &[d], &BTreeSet::new(), &BTreeSet::new());
        assert!(c.add_addrs.contains(&k("192.0.2.99")), "added when missing");
    }

    #[test]
    fn peers_are_backends_answering_unsnated_flows_and_stay_while_programmed() {
        let flows = [
            flow(CT_REPLY, "10.244.1.5", "203.0.113.7", 1, 0),
            flow(CT_REPLY, "10.244.9.9", "192.168.1.10", 7, CT_SNAT), // SNATed: replies come to the node
        ];
        assert_eq!(needed_peers(&flows), BTreeSet::from([k("10.244.1.5")]));
        let now: BTreeSet<_> = ["10.244.1.6", "10.244.7.7", "10.244.1.5"].map(k).into();
        let c = changes(&programmed(), &flows, &[], &BTreeSet::new(), &now);
        // 10.244.1.6 is a programmed backend: kept; 10.244.7.7 is neither: removed.
        assert_eq!(c.del_peers, vec![k("10.244.7.7")]);
        assert!(c.add_peers.is_empty());
        let c = changes(&programmed(), &flows, &[], &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(c.add_peers, vec![k("10.244.1.5")]);
    }

    #[test]
    fn an_address_nothing_names_is_removed_and_a_missing_one_added() {
        let now: BTreeSet<_> = ["10.96.0.10", "10.96.0.77"].map(k).into();
        let c = changes(&programmed(), &[], &[], &now, &BTreeSet::new());
        assert_eq!(c.del_addrs, vec![k("10.96.0.77")]);
        assert_eq!(c.add_addrs.len(), 3);
        assert!(!c.add_addrs.contains(&k("10.96.0.10")));
    }
}
