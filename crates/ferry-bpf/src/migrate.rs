//! Copying the live entries of a map retired by an upgrade into this layout's
//! maps (the [`Migration`]s that [`crate::layout::CARRY`] names), so that an
//! upgrade across a layout change keeps every tracked flow.
//!
//! `install` runs a copy twice: once after the new objects are loaded (their
//! maps created and pinned) and before any link switches, and once right
//! after the switch, adding only flows the new maps do not know yet: those
//! the old programs created while the first copy ran. Where each flow goes is
//! a pure decision ([`table_for`]); the rest is reading and writing maps.

use crate::entries::{CT_CLOSING, CT_ORIGINAL, CT_REPLIED, CT_REPLY};
use crate::layout::Migration;
use crate::maps::{bytes, from_bytes};
use crate::skel::sock::types as t;
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

/// What copying one retired map did: the install report's and the log's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// The retired map the entries came from.
    pub map: String,
    /// Entries written into the table of confirmed flows (`ferry_ct`).
    pub confirmed: u64,
    /// Entries written into the table of unconfirmed flows (`ferry_ct_new`):
    /// unconfirmed flows, and confirmed ones whose other entry was gone.
    pub unconfirmed: u64,
    /// Entries of confirmed flows written into `ferry_ct_new` instead, because
    /// `ferry_ct` was full (the datapath does the same: `ct_confirm_full`).
    /// Counted in `unconfirmed` too.
    pub confirm_full: u64,
    /// Entries past their deadline, left behind (the old datapath treated them as misses).
    pub expired: u64,
    /// Entries that could not be written anywhere: their flows are balanced
    /// again on their next packet (a SNATed one is reset).
    pub not_copied: u64,
    /// Live entries left behind because the key of their flow's other entry
    /// is held by another flow ([`crate::stale::stranded_flows`]): a flow
    /// that is over, or whose NAT port was given to a new one. Copied, such
    /// an entry would live on in `ferry_ct` and send a client reusing the
    /// tuple to the other flow's translation.
    pub stranded: u64,
    /// Of the entries written, those the second pass added after the links
    /// switched (flows the old programs created while the first copy ran).
    pub late: u64,
    /// Flows the incoming programs found in the retired table themselves
    /// while the links switched, before the second pass ([`lend_retired`]):
    /// moved over by the datapath (`ct_adopted`), not counted above.
    pub adopted: u64,
}

impl Carried {
    fn add(&mut self, late: &Carried) {
        self.confirmed += late.confirmed;
        self.unconfirmed += late.unconfirmed;
        self.confirm_full += late.confirm_full;
        self.not_copied += late.not_copied;
        self.stranded += late.stranded;
        self.late += late.confirmed + late.unconfirmed;
    }
}

/// The conntrack table a flow of the old single table belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `ferry_ct`: never evicted.
    Confirmed,
    /// `ferry_ct_new`: an LRU a SYN flood may evict.
    Unconfirmed,
}

/// Where a flow of a layout-0/1 `ferry_ct` goes, from the flags of its
/// entries (both, OR-ed). Layout 2 confirms a flow on its first reply (UDP and
/// the rest) or when the TCP handshake completes; the old table recorded only
/// `CT_REPLIED`, set on the first reply, which for TCP is the SYN-ACK, so an
/// established TCP flow and a half-open one (SYN-ACK sent, no ACK yet) look
/// the same. Both go to `ferry_ct`: putting an established flow into the LRU
/// is exactly the loss the split exists to prevent (a later SYN flood evicts
/// it, and a SNATed flow is then reset), while a half-open flow wrongly
/// confirmed only holds a `ferry_ct` slot until its deadline. A flow that saw
/// no reply (a SYN in flight, a one-way UDP sender such as statsd, a flow
/// reset before its reply) stays unconfirmed, as layout 2 would keep it.
pub fn table_for(flags: u8) -> Table {
    if flags & CT_REPLIED != 0 { Table::Confirmed } else { Table::Unconfirmed }
}

/// Errors of a copy: what failed, on which map.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("opening {path} to copy its entries: {source}")]
    Open { path: std::path::PathBuf, source: libbpf_rs::Error },
    #[error("map {path} has {what} size {found}, the copy expects {expected}")]
    Size { path: std::path::PathBuf, what: &'static str, found: u32, expected: usize },
}

/// Opens a pinned conntrack table, refusing one whose entries are not this build's.
pub(crate) fn open_ct(path: &Path) -> Result<MapHandle, MigrateError> {
    let h = MapHandle::from_pinned_path(path).map_err(|source| MigrateError::Open { path: path.into(), source })?;
    for (what, found, expected) in [
        ("key", h.key_size(), std::mem::size_of::<t::ct_key>()),
        ("value", h.value_size(), std::mem::size_of::<t::ct_val>()),
    ] {
        if found as usize != expected {
            return Err(MigrateError::Size { path: path.into(), what, found, expected });
        }
    }
    Ok(h)
}

/// Runs `m` for the retired map `name` (its pin in `retired_dir`) into the
/// maps pinned in `pin_dir`. With `late`, only flows neither new table holds
/// are added, and nothing already there is overwritten (the new programs may
/// have updated it since the first pass).
pub fn carry(
    m: Migration,
    name: &str,
    retired_dir: &Path,
    pin_dir: &Path,
    late: bool,
) -> Result<Carried, MigrateError> {
    match m {
        Migration::ConntrackSplit => {
            let old = open_ct(&retired_dir.join(name))?;
            let ct = open_ct(&pin_dir.join("ferry_ct"))?;
            let ct_new = open_ct(&pin_dir.join("ferry_ct_new"))?;
            let (mut c, inserted) = split_conntrack(&old, &ct, &ct_new, crate::stale::monotonic_ns(), late);
            c.map = name.to_string();
            // The datapath counts every entry written into ferry_ct_new; so
            // does the copy, or these would read as evictions later.
            if inserted > 0
                && let Ok(maps) = crate::maps::Maps::open(pin_dir)
            {
                maps.add_counter("ct_new_insert", inserted);
            }
            Ok(c)
        }
    }
}

/// Both runs of a copy, as `install` does them around the link switch:
/// `first` before it, `late` after it.
pub fn merge(mut first: Carried, late: &Carried) -> Carried {
    first.add(late);
    first
}

/// Hands the retired conntrack table of a [`Migration::ConntrackSplit`] in
/// `copy` to the incoming tc programs for the link switch: `slot` is their
/// `ferry_ct_prev` (bpf/lib/maps.h), in which a flow they miss is looked up
/// and moved over. Without it, a flow the outgoing programs opened after the
/// first copy is unknown to the incoming ones until the second pass copies
/// it, and a reply of it meeting them first (seen: the server's answer 2 ms
/// into the connection) went to the node's stack, which reset it. Returns
/// the datapath's `ct_adopted` count so far (for [`take_back`]), or `None`
/// when nothing was lent (no such copy, or a retired table the slot does
/// not take: logged; the second pass still copies those flows).
pub(crate) fn lend_retired(
    slot: &impl MapCore,
    copy: &[(String, Migration)],
    retired_dir: &Path,
    pin_dir: &Path,
) -> Option<u64> {
    let (name, _) = copy.iter().find(|(_, m)| *m == Migration::ConntrackSplit)?;
    let path = retired_dir.join(name);
    let lent = open_ct(&path).map_err(|e| e.to_string()).and_then(|old| {
        let fd = old.as_fd().as_raw_fd() as u32;
        slot.update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY).map_err(|e| e.to_string())
    });
    match lent {
        Ok(()) => Some(adopted_so_far(pin_dir)),
        Err(e) => {
            tracing::warn!(
                "the retired {} is not handed to the new programs ({e}): a flow opened while the links switch \
                 may lose a reply until the second copy",
                path.display()
            );
            None
        }
    }
}

/// Empties the slot [`lend_retired`] filled (the retired table can go) and
/// returns how many flows the datapath moved over meanwhile.
pub(crate) fn take_back(slot: &impl MapCore, before: u64, pin_dir: &Path) -> u64 {
    if let Err(e) = slot.delete(&0u32.to_ne_bytes()) {
        tracing::warn!("emptying ferry_ct_prev: {e}");
    }
    adopted_so_far(pin_dir).saturating_sub(before)
}

/// The datapath's `ct_adopted` counter, summed over CPUs (0 if unreadable).
fn adopted_so_far(pin_dir: &Path) -> u64 {
    crate::maps::Maps::open(pin_dir)
        .ok()
        .and_then(|m| {
            let i = crate::stats::NAMES.iter().position(|n| *n == "ct_adopted")?;
            m.counters().get(i).copied()
        })
        .unwrap_or(0)
}

/// Whether the open flow `theirs` of the retired table, under the same
/// original-direction key as this side's closing `ours` but with another
/// translation, is the outgoing programs' opening the tuple again (a client
/// reusing a TIME_WAIT port, re-balanced) after the first pass copied its
/// predecessor. As `ct_reopened` in `bpf/lib/ct.h` (whose
/// `ct_forget_retired` removes a flow this side closed and opened again
/// itself from the retired table, so that its stale open state is not taken
/// for this).
fn reopened(theirs: &t::ct_val, ours: &t::ct_val) -> bool {
    let same = (theirs.new_src, theirs.new_dst, theirs.new_sport, theirs.new_dport)
        == (ours.new_src, ours.new_dst, ours.new_sport, ours.new_dport);
    theirs.flags & CT_CLOSING == 0 && ours.flags & CT_CLOSING != 0 && !same
}

/// The keys (as the tables hold them) of the stranded entries among one
/// table's `entries` ([`crate::stale::stranded_flows`]).
pub(crate) fn stranded_keys<'a>(
    entries: impl Iterator<Item = (&'a Vec<u8>, &'a t::ct_val)>,
    now: u64,
) -> HashSet<Vec<u8>> {
    let flows: Vec<_> =
        entries.map(|(k, v)| crate::stale::CtEntry::from_raw(false, &from_bytes::<t::ct_key>(k), v)).collect();
    crate::stale::stranded_flows(&flows, now).iter().map(|e| bytes(&e.raw_key()).to_vec()).collect()
}

/// The key of a flow's other entry, as `ct_partner_key` in `bpf/lib/ct.h`.
fn partner_key(k: &t::ct_key, v: &t::ct_val) -> t::ct_key {
    t::ct_key {
        src: v.new_dst,
        dst: v.new_src,
        sport: v.new_dport,
        dport: v.new_sport,
        proto: k.proto,
        family: k.family,
        dir: if k.dir == CT_ORIGINAL { CT_REPLY } else { CT_ORIGINAL },
        pad: 0,
    }
}

/// Copies every live flow of the single conntrack table `old` into `ct` or
/// `ct_new` ([`table_for`]), both entries of a flow into the same table (the
/// datapath looks a flow's partner up in the table it found the flow in).
/// Returns the figures and the entries written into `ct_new` (which the
/// caller adds to `ct_new_insert`, so that its evictions still add up).
fn split_conntrack(old: &MapHandle, ct: &MapHandle, ct_new: &MapHandle, now: u64, late: bool) -> (Carried, u64) {
    let mut c = Carried::default();
    let entries: HashMap<Vec<u8>, t::ct_val> = old
        .keys()
        .filter_map(|k| {
            let v = old.lookup(&k, MapFlags::ANY).ok().flatten()?;
            Some((k, from_bytes::<t::ct_val>(&v)))
        })
        .collect();
    let stranded = stranded_keys(entries.iter(), now);
    let mut done: HashSet<Vec<u8>> = HashSet::new();
    let mut new_inserts = 0;
    for (kb, v) in &entries {
        if done.contains(kb) {
            continue;
        }
        if stranded.contains(kb) {
            c.stranded += 1;
            continue;
        }
        let k = from_bytes::<t::ct_key>(kb);
        let pk = partner_key(&k, v);
        let pkb = bytes(&pk).to_vec();
        done.insert(kb.clone());
        // A flow whose other entry was evicted is copied as it is (the old
        // datapath served it that way too), but into ferry_ct_new: in
        // ferry_ct, which never evicts, the datapath would keep it for as
        // long as packets refresh it (a SYN reusing its tuple opens it anew,
        // `ct_orphan_syn`, but nothing else would end it).
        let mut flow = vec![(kb.clone(), *v)];
        let orphan = pkb != *kb && !entries.contains_key(&pkb);
        if let Some(pv) = entries.get(&pkb)
            && pkb != *kb
        {
            done.insert(pkb.clone());
            flow.push((pkb, *pv));
        }
        let flags = flow.iter().fold(0, |f, (_, v)| f | v.flags);
        let held = flow.len() as u64;
        let live: Vec<(Vec<u8>, t::ct_val)> = flow.into_iter().filter(|(_, v)| v.expires_ns >= now).collect();
        if late {
            // A closing flow of this side that the old programs opened again
            // since gives way (both its entries), so the open flow is written.
            // It is then written whatever else the new tables hold: leaving
            // it out would leave the flow in neither (its next segment
            // re-balanced, `ct_lost`).
            let original = live.iter().find(|(k, _)| from_bytes::<t::ct_key>(k).dir == CT_ORIGINAL);
            let mut replaced = false;
            if let Some((k, theirs)) = original {
                for table in [ct, ct_new] {
                    let Some(ours) = table.lookup(k, MapFlags::ANY).ok().flatten() else { continue };
                    let ours = from_bytes::<t::ct_val>(&ours);
                    if reopened(theirs, &ours) {
                        let _ = table.delete(bytes(&partner_key(&from_bytes(k), &ours)));
                        let _ = table.delete(k);
                        replaced = true;
                    }
                    break;
                }
            }
            let known = live.iter().any(|(k, _)| {
                ct.lookup(k, MapFlags::ANY).ok().flatten().is_some()
                    || ct_new.lookup(k, MapFlags::ANY).ok().flatten().is_some()
            });
            if known && !replaced {
                continue;
            }
        } else {
            c.expired += held - live.len() as u64;
        }
        if live.is_empty() {
            continue;
        }
        let how = if late { MapFlags::NO_EXIST } else { MapFlags::ANY };
        let n = live.len() as u64;
        if table_for(flags) == Table::Confirmed && !orphan {
            let mut written = Vec::new();
            for (k, v) in &live {
                if ct.update(k, bytes(v), how).is_err() {
                    break;
                }
                written.push(k);
            }
            if written.len() == live.len() {
                c.confirmed += n;
                continue;
            }
            // ferry_ct is full: the flow goes on from ferry_ct_new, as a
            // confirmation the datapath finds no room for.
            for k in written {
                let _ = ct.delete(k);
            }
            c.confirm_full += n;
        }
        let mut written = 0;
        for (k, v) in &live {
            if ct_new.update(k, bytes(v), how).is_ok() {
                written += 1;
            }
        }
        c.unconfirmed += written;
        c.not_copied += n - written;
        new_inserts += written;
    }
    (c, new_inserts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entries::CT_SNAT;

    #[test]
    fn a_flow_that_saw_a_reply_is_confirmed_and_one_that_did_not_stays_unconfirmed() {
        // (flags of the flow, where it goes)
        let cases = [
            (0, Table::Unconfirmed),                               // a SYN in flight, a one-way UDP sender
            (CT_SNAT, Table::Unconfirmed),                         // the same, SNATed
            (CT_CLOSING, Table::Unconfirmed),                      // reset before any reply
            (CT_REPLIED, Table::Confirmed),                        // established (or a SYN-ACK'd half-open flow)
            (CT_REPLIED | CT_SNAT, Table::Confirmed),              // established to a remote backend
            (CT_REPLIED | CT_CLOSING | CT_SNAT, Table::Confirmed), // closing after it was established
        ];
        for (flags, want) in cases {
            assert_eq!(table_for(flags), want, "flags {flags:#x}");
        }
    }

    #[test]
    fn only_an_open_flow_with_another_translation_replaces_a_closing_copy() {
        let entry = |flags, port: u16| t::ct_val { flags, new_sport: port.to_be(), ..Default::default() };
        // (theirs: the retired table's, ours: the new tables', replaced?)
        let cases = [
            (entry(CT_REPLIED, 2000), entry(CT_REPLIED | CT_CLOSING, 1000), true), // the old programs reopened it
            (entry(0, 2000), entry(CT_REPLIED | CT_CLOSING, 1000), true),          // ... and its SYN is in flight
            (entry(CT_REPLIED, 1000), entry(CT_REPLIED | CT_CLOSING, 1000), false), // the same flow, closed here
            (entry(CT_CLOSING, 2000), entry(CT_REPLIED | CT_CLOSING, 1000), false), // theirs closed too
            (entry(CT_REPLIED, 2000), entry(CT_REPLIED, 1000), false),             // ours open: ours was written here
        ];
        for (i, (theirs, ours, want)) in cases.iter().enumerate() {
            assert_eq!(reopened(theirs, ours), *want, "case {i}");
        }
    }

    #[test]
    fn the_partner_key_is_the_one_the_datapath_looks_up() {
        let k = t::ct_key {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            sport: 1000u16.to_be(),
            dport: 30080u16.to_be(),
            proto: 6,
            family: 2,
            dir: CT_ORIGINAL,
            pad: 0,
        };
        let v = t::ct_val {
            new_src: [3, 0, 0, 0],
            new_dst: [4, 0, 0, 0],
            new_sport: 2000u16.to_be(),
            new_dport: 8080u16.to_be(),
            ..Default::default()
        };
        let p = partner_key(&k, &v);
        assert_eq!((p.src, p.dst), ([4, 0, 0, 0], [3, 0, 0, 0]));
        assert_eq!((u16::from_be(p.sport), u16::from_be(p.dport)), (8080, 2000));
        assert_eq!((p.proto, p.family, p.dir), (6, 2, CT_REPLY));
    }
}
