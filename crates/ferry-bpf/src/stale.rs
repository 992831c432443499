//! Stale flows in the packet path's connection tracking: which entries still
//! send traffic to a backend that is no longer serving.
//!
//! The rule is kube-proxy's conntrack reconciler rule (its current form,
//! `ferry_model::stale`), applied to ferry's own table: a UDP flow of a
//! service is stale when its backend is not a serving endpoint of that
//! service any more. A service left without any serving endpoint loses all
//! its UDP flows (kubernetes/kubernetes#139629: the next packet is rejected
//! instead of going to a pod that is gone), and so does a deleted service
//! (kubernetes/kubernetes#141371: nothing else would ever clean them). TCP
//! and SCTP flows are never touched (they end by themselves, and a
//! terminating endpoint keeps its established connections).
//!
//! The same rule holds for the flows a balancing node carries by Direct
//! Server Return (`ferry_dsr`, [`DsrEntry`]): they name their service and
//! backend as conntrack entries do. Deleted, the flow's next datagram is
//! balanced anew (or refused when nothing serves), as a SNATed one's is.

use crate::entries::{FAM_V4, Words};
use crate::skel::sock::types as t;
use std::collections::{BTreeSet, HashMap};

pub use crate::entries::{CT_ORIGINAL, CT_REPLY, CT_SNAT};
const UDP: u8 = 17;

/// One entry of `ferry_ct`, in Rust terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// In `ferry_ct_new` (unconfirmed flows) rather than `ferry_ct`.
    pub unconfirmed: bool,
    pub src: Words,
    pub dst: Words,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub new_src: Words,
    pub new_dst: Words,
    pub new_sport: u16,
    pub new_dport: u16,
    pub service: u32,
    pub backend: u32,
    /// `CT_SNAT` etc. (bpf/lib/maps.h).
    pub flags: u8,
    /// CLOCK_MONOTONIC deadline in nanoseconds.
    pub expires_ns: u64,
}

/// Now on the clock of the conntrack deadlines (`bpf_ktime_get_ns`: CLOCK_MONOTONIC).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Live flows with a rewritten source among `entries`: the NAT ports in use.
pub fn nat_entries_in_use(entries: &[CtEntry], now: u64) -> usize {
    entries.iter().filter(|e| e.flags & CT_SNAT != 0 && e.is_live(now)).count()
}

/// A conntrack key in Rust terms: (src, dst, sport, dport, proto, family, dir).
type FlowKey = (Words, Words, u16, u16, u8, u8, u8);

impl CtEntry {
    /// From a table's raw key and value (`unconfirmed`: read from `ferry_ct_new`).
    pub fn from_raw(unconfirmed: bool, k: &t::ct_key, v: &t::ct_val) -> Self {
        CtEntry {
            unconfirmed,
            src: k.src,
            dst: k.dst,
            sport: u16::from_be(k.sport),
            dport: u16::from_be(k.dport),
            proto: k.proto,
            family: k.family,
            dir: k.dir,
            new_src: v.new_src,
            new_dst: v.new_dst,
            new_sport: u16::from_be(v.new_sport),
            new_dport: u16::from_be(v.new_dport),
            service: v.service,
            backend: v.backend,
            flags: v.flags,
            expires_ns: v.expires_ns,
        }
    }

    /// The entry's key as the tables hold it.
    pub fn raw_key(&self) -> t::ct_key {
        t::ct_key {
            src: self.src,
            dst: self.dst,
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            family: self.family,
            dir: self.dir,
            pad: 0,
        }
    }

    fn key(&self) -> FlowKey {
        (self.src, self.dst, self.sport, self.dport, self.proto, self.family, self.dir)
    }

    /// The key of the flow's other entry (`ct_partner_key` in bpf/lib/ct.h).
    fn partner(&self) -> FlowKey {
        let dir = if self.dir == CT_ORIGINAL { CT_REPLY } else { CT_ORIGINAL };
        (self.new_dst, self.new_src, self.new_dport, self.new_sport, self.proto, self.family, dir)
    }

    /// Whether the entry has not expired at `now` (see [`monotonic_ns`]). The
    /// datapath removes an expired entry only when a packet meets it.
    pub fn is_live(&self, now: u64) -> bool {
        self.expires_ns >= now
    }

    /// The backend this flow goes to: where the original direction is sent,
    /// where the reply direction comes from.
    pub fn backend_addr(&self) -> (Words, u16) {
        if self.dir == CT_ORIGINAL { (self.new_dst, self.new_dport) } else { (self.src, self.sport) }
    }
}

/// One entry of `ferry_dsr` (IPv4) or `ferry_dsr6` (IPv6): a flow the
/// balancing node tunnels to its backend's node (Direct Server Return),
/// keyed by its original direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DsrEntry {
    pub src: Words,
    pub dst: Words,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub service: u32,
    pub backend: u32,
    /// The backend's address (IPv4 in the first word) and port; zero from a build
    /// that did not note them (the flow is then never found stale).
    pub backend_addr: Words,
    pub backend_port: u16,
    /// CLOCK_MONOTONIC deadline in nanoseconds.
    pub expires_ns: u64,
}

impl DsrEntry {
    /// Whether the entry has not expired at `now` (see [`monotonic_ns`]).
    pub fn is_live(&self, now: u64) -> bool {
        self.expires_ns >= now
    }
}

/// The DSR flows to delete, by the rule of [`stale_udp_flows`].
pub fn stale_udp_dsr_flows(entries: &[DsrEntry], services: &HashMap<u32, Serving>) -> Vec<DsrEntry> {
    entries
        .iter()
        .filter(|e| e.backend_addr != [0; 4] || e.backend_port != 0)
        .filter(|e| is_stale(e.proto, e.service, (e.backend_addr, e.backend_port), services))
        .copied()
        .collect()
}

/// The rule: a UDP flow of an examined service whose backend is not serving it.
fn is_stale(proto: u8, service: u32, backend: (Words, u16), services: &HashMap<u32, Serving>) -> bool {
    proto == UDP
        && match services.get(&service) {
            None => false,
            Some(Serving::Deleted) => true,
            Some(Serving::Endpoints(set)) => !set.contains(&backend),
        }
}

/// What the purge knows about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    /// The service is gone: all its UDP flows are stale.
    Deleted,
    /// Its serving endpoints now (address words, port); none: every UDP flow is stale.
    Endpoints(BTreeSet<(Words, u16)>),
}

/// The entries to delete. Only services named in `services` are examined.
pub fn stale_udp_flows(entries: &[CtEntry], services: &HashMap<u32, Serving>) -> Vec<CtEntry> {
    entries.iter().filter(|e| is_stale(e.proto, e.service, e.backend_addr(), services)).copied().collect()
}

/// Live entries stranded by another flow: the key of their flow's other
/// entry is held by a live entry of a *different* flow (whose own partner is
/// not this entry). The datapath never makes such a pair: a reply tuple is
/// given to a new flow only when nothing live holds it, and both entries of
/// a flow share one deadline. A copy between table layouts can (an entry
/// carried across an upgrade whose flow closed, or whose NAT port another
/// flow took, while the copy was not looking). Left in `ferry_ct`, which
/// never evicts, such an entry would send a client reusing its 4-tuple hours
/// later to the old translation, and the replies to the other flow's client:
/// a connection that never opens. An entry whose partner is simply gone is
/// not stranded (a one-way flow's reply entry may be; the datapath serves it).
/// Of two live entries under one key, the one in `ferry_ct` is the one the
/// datapath finds (it looks there first).
pub fn stranded_flows(entries: &[CtEntry], now: u64) -> Vec<CtEntry> {
    let mut by_key: HashMap<FlowKey, &CtEntry> = HashMap::new();
    for e in entries.iter().filter(|e| e.is_live(now)) {
        let held = by_key.entry(e.key()).or_insert(e);
        if held.unconfirmed && !e.unconfirmed {
            *held = e;
        }
    }
    by_key.values().filter(|e| by_key.get(&e.partner()).is_some_and(|p| p.partner() != e.key())).map(|e| **e).collect()
}

/// Whether an address belongs to the family code (helper for callers building sets).
pub fn same_family(family: u8, v4: bool) -> bool {
    (family == FAM_V4) == v4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(last: u32) -> Words {
        [u32::from_ne_bytes([10, 0, 0, last as u8]), 0, 0, 0]
    }

    fn entry(proto: u8, dir: u8, backend: u32, service: u32) -> CtEntry {
        let (src, sport, new_dst, new_dport) =
            if dir == CT_ORIGINAL { (w(99), 5000, w(backend), 53) } else { (w(backend), 53, w(99), 5000) };
        CtEntry {
            unconfirmed: false,
            src,
            dst: w(1),
            sport,
            dport: 53,
            proto,
            family: FAM_V4,
            dir,
            new_src: w(1),
            new_dst,
            new_sport: 53,
            new_dport,
            service,
            backend: 0,
            flags: 0,
            expires_ns: u64::MAX,
        }
    }

    /// A SNATed TCP flow from client port `cport` to the frontend 10.0.0.1:80,
    /// sent to backend 10.0.0.`backend`:8080 from the node's port `nport`.
    fn flow(cport: u16, backend: u32, nport: u16) -> [CtEntry; 2] {
        let orig = CtEntry {
            unconfirmed: false,
            src: w(99),
            dst: w(1),
            sport: cport,
            dport: 80,
            proto: 6,
            family: FAM_V4,
            dir: CT_ORIGINAL,
            new_src: w(2),
            new_dst: w(backend),
            new_sport: nport,
            new_dport: 8080,
            service: 1,
            backend,
            flags: CT_SNAT,
            expires_ns: 1_000,
        };
        let reply = CtEntry {
            dir: CT_REPLY,
            src: w(backend),
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

    #[test]
    fn an_entry_whose_partner_belongs_to_another_flow_is_stranded() {
        let [a, a_reply] = flow(40000, 4, 30000);
        // An old flow from another client port whose NAT port 30000 went to `a`.
        let [old, _] = flow(40001, 4, 30000);
        // A one-way flow whose reply entry is gone: served as it is.
        let [lone, _] = flow(40002, 5, 30002);
        let entries = vec![a, a_reply, old, lone];
        assert_eq!(stranded_flows(&entries, 10), vec![old]);
        // Past its deadline it is not the collection of stranded entries' business.
        assert_eq!(stranded_flows(&entries, 2_000), vec![]);
        // Nor is a partner past its deadline: the newer flow is over too.
        let expired_reply = CtEntry { expires_ns: 5, ..a_reply };
        assert_eq!(stranded_flows(&[a, expired_reply, old], 10), vec![]);
    }

    #[test]
    fn the_partner_the_datapath_finds_first_decides() {
        let [a, a_reply] = flow(40000, 4, 30000);
        let [old, old_reply] = flow(40001, 4, 30000);
        // The same reply key in both tables: ferry_ct's (the old flow's) is
        // the one a lookup finds, so `a` is the stranded one.
        let in_new = |e: CtEntry| CtEntry { unconfirmed: true, ..e };
        let entries = vec![in_new(a), in_new(a_reply), old, old_reply];
        assert_eq!(stranded_flows(&entries, 10), vec![in_new(a)]);
        assert!(stranded_flows(&[a, a_reply], 10).is_empty(), "a consistent pair is never stranded");
    }

    #[test]
    fn only_udp_flows_to_non_serving_backends_of_examined_services() {
        let entries = vec![
            entry(UDP, CT_ORIGINAL, 4, 1), // serving: keep
            entry(UDP, CT_REPLY, 4, 1),    // serving: keep
            entry(UDP, CT_ORIGINAL, 5, 1), // not serving: delete
            entry(UDP, CT_REPLY, 5, 1),    // not serving: delete
            entry(6, CT_ORIGINAL, 5, 1),   // TCP: keep
            entry(UDP, CT_ORIGINAL, 5, 2), // service 2 has no serving endpoints: delete
            entry(UDP, CT_REPLY, 5, 2),    // both directions
            entry(6, CT_ORIGINAL, 5, 2),   // TCP of it: keep
            entry(UDP, CT_ORIGINAL, 5, 3), // service 3 not examined: keep
            entry(UDP, CT_ORIGINAL, 4, 9), // service 9 deleted: delete
        ];
        let services = HashMap::from([
            (1, Serving::Endpoints(BTreeSet::from([(w(4), 53)]))),
            (2, Serving::Endpoints(BTreeSet::new())),
            (9, Serving::Deleted),
        ]);
        let stale = stale_udp_flows(&entries, &services);
        assert_eq!(stale, vec![entries[2], entries[3], entries[5], entries[6], entries[9]]);
    }

    fn dsr(proto: u8, backend: u32, service: u32) -> DsrEntry {
        DsrEntry {
            src: w(99),
            dst: w(1),
            sport: 5000,
            dport: 53,
            proto,
            family: FAM_V4,
            service,
            backend: 7,
            backend_addr: w(backend),
            backend_port: 53,
            expires_ns: u64::MAX,
        }
    }

    /// DSR flows go by the same rule as conntrack entries.
    #[test]
    fn dsr_flows_are_stale_by_the_same_rule() {
        let entries = vec![
            dsr(UDP, 4, 1), // serving: keep
            dsr(UDP, 5, 1), // not serving: delete
            dsr(6, 5, 1),   // TCP: keep
            dsr(UDP, 5, 2), // service 2 has no serving endpoints: delete
            dsr(UDP, 5, 3), // service 3 not examined: keep
            dsr(UDP, 4, 9), // service 9 deleted: delete
            // Backend not noted (an older build): never found stale.
            DsrEntry { backend_addr: [0; 4], backend_port: 0, ..dsr(UDP, 0, 9) },
        ];
        let services = HashMap::from([
            (1, Serving::Endpoints(BTreeSet::from([(w(4), 53)]))),
            (2, Serving::Endpoints(BTreeSet::new())),
            (9, Serving::Deleted),
        ]);
        assert_eq!(stale_udp_dsr_flows(&entries, &services), vec![entries[1], entries[3], entries[5]]);
    }

    #[test]
    fn a_port_change_makes_a_flow_stale() {
        let e = entry(UDP, CT_ORIGINAL, 4, 1);
        let services = HashMap::from([(1, Serving::Endpoints(BTreeSet::from([(w(4), 5353)])))]);
        assert_eq!(stale_udp_flows(&[e], &services), vec![e]);
    }
}
