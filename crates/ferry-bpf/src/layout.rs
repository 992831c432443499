//! The layout version of a pinned datapath, and which pinned maps an agent of
//! this build may adopt from an older one (pure decisions; `install` acts on them).
//!
//! Every pinned datapath carries its layout version in `ferry_meta`
//! (`FERRY_LAYOUT` in `bpf/lib/maps.h`; a datapath pinned before versioning has
//! no `ferry_meta` and is layout 0). [`CHANGED_IN`] records, for each map, the
//! last layout version that changed its key, value or meaning. An agent that
//! finds an older layout keeps the pinned maps that did not change since then
//! (and whose shape is still the same), and *retires* the others: their pins
//! move aside, the new objects create fresh maps in their place, the links
//! switch to the new programs, and the retired pins are removed. What becomes
//! of a retired map's entries is stated per map in [`CARRY`]: Plan state is
//! simply re-programmed by the agent's first full sync (retire), while state
//! the Plan cannot rebuild (tracked flows) is copied by a [`Migration`] into
//! the new maps before the links switch. A newer layout than this build knows
//! (a downgrade) is refused before anything is loaded.
//!
//! The way back is the newer build's job (an older build cannot know what
//! came after it): [`plan_downgrade`] decides how `ferry datapath downgrade`
//! turns a pinned datapath into an older layout's, in place, for the older
//! agent to adopt. Maps unchanged since the target layout stay; a changed map
//! named in [`REVERT`] is rebuilt in the older shape with its live entries
//! (tracked flows); any other changed map is retired (unpinned), and the older
//! agent creates it anew and refills it from its Plan.

use crate::entries::FERRY_LAYOUT;

/// This build's layout version.
pub const LAYOUT: u32 = FERRY_LAYOUT;

/// For each pinned map: the last layout version that changed it. A map not
/// listed here is retired on any upgrade (the safe default).
pub const CHANGED_IN: &[(&str, u32)] = &[
    ("ferry_frontends", 0),
    ("ferry_services", 0),
    ("ferry_slots", 0),
    ("ferry_backends", 0),
    ("ferry_members", 0),
    ("ferry_sock_rev", 0),
    ("ferry_affinity", 0),
    ("ferry_firewall", 0),
    ("ferry_locals", 0),
    ("ferry_ranges", 0),
    ("ferry_config", 0),
    ("ferry_names", 0),
    // Layout 5: ferry_stats grew from 64 to 128 slots (the counters outgrew
    // it; a pinned map keeps its capacity, so only a fresh map has room).
    // Counters are neither Plan nor flow state: retired both ways, they
    // start again from zero, as after a restart of the node.
    ("ferry_stats", 5),
    ("ferry_devices", 0),
    ("ferry_ct", 2),
    ("ferry_ct_new", 2),
    ("ferry_maglev", 0),
    ("ferry_frags", 0),
    ("ferry_meta", 1),
    ("ferry_addrs", 3),
    ("ferry_peers", 3),
    // Layout 4 (DSR, issue 14): two new maps. ferry_config gained two flags
    // (CFG_DSR_*) that older programs ignore and whose absence means snat,
    // and ferry_stats seven counters in slots older programs never touch: both
    // stay adoptable both ways. ferry_dsr holds the balancing node's DSR flows;
    // a downgrade below 4 retires it (an older build cannot carry a DSR flow
    // on, README: Upgrades), so it is not FLOW_STATE and needs no REVERT row.
    ("ferry_tunnels", 4),
    ("ferry_dsr", 4),
    // XDP acceleration (issue 14) added no map and changed none: its six
    // counters are slots of ferry_stats's 128 (layout 5), additive.
    // Layout 6 (IPv6 DSR, issue 14): two new maps, the IPv6 counterparts of
    // ferry_tunnels and ferry_dsr, added rather than a family put into those
    // (which stay as layout 4 made them, adopted both ways). ferry_stats
    // gained one counter (dsr_pkt_too_big) in a slot older programs never
    // touch, and ferry_config no flag: IPv6 is carried under the same
    // CFG_DSR_* flags, which a layout-5 program reads as "IPv4 only". A
    // downgrade below 6 retires both (an older build cannot carry an IPv6
    // DSR flow on; its agent SNATs the next ones), so neither is FLOW_STATE.
    ("ferry_tunnels6", 6),
    ("ferry_dsr6", 6),
];

/// A copy of a retired map's live entries into this layout's maps
/// (implemented in [`crate::migrate`]), run before the links switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// Layouts 0 and 1 kept every flow in one LRU `ferry_ct`; layout 2 keeps
    /// confirmed flows in `ferry_ct` (a hash) and unconfirmed ones in
    /// `ferry_ct_new` (an LRU). Same entry format, so each flow is copied as
    /// it is into the table its state says.
    ConntrackSplit,
}

/// For each map whose entries outlive a layout change: from which older
/// layouts (inclusive) a [`Migration`] carries them. A retired map not listed
/// (or retired from a layout outside its range) is re-created empty: every map
/// holding Plan state is refilled by the agent's first full sync, and
/// `ferry_frags` (fragments in flight, milliseconds) is not worth a copy. A
/// future layout change adds a row here when the new map cannot be rebuilt
/// from the Plan, or states by its absence that retiring is enough.
pub const CARRY: &[(&str, std::ops::RangeInclusive<u32>, Migration)] =
    &[("ferry_ct", 0..=1, Migration::ConntrackSplit)];

/// A rebuild of one map in an older layout's shape from this layout's live
/// entries (implemented in [`crate::downgrade`]): a [`Migration`] backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reversion {
    /// The reverse of [`Migration::ConntrackSplit`]: the flows of `ferry_ct`
    /// (confirmed, a hash) and `ferry_ct_new` (unconfirmed, an LRU) merged
    /// into the one LRU `ferry_ct` of layouts 0 and 1.
    ConntrackMerge,
}

/// For each map whose entries a downgrade must keep: to which older layouts
/// (inclusive) a [`Reversion`] rebuilds it. A map changed since the target
/// layout and not listed here is retired by the downgrade (unpinned; the
/// running programs keep it until their links switch) and the older agent
/// creates and refills it from its Plan, which is right for every map that
/// only holds Plan state: a change of such a map's meaning needs no row. A
/// map that only exists in newer layouts (`ferry_ct_new` before 2) is retired
/// the same way, after the rows that read it. A future layout change that
/// alters a map the Plan cannot rebuild adds a row here next to its [`CARRY`]
/// row.
pub const REVERT: &[(&str, std::ops::RangeInclusive<u32>, Reversion)] =
    &[("ferry_ct", 0..=1, Reversion::ConntrackMerge)];

/// What the kernel says about a map (pinned) or what a BPF object declares (new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapShape {
    /// The same type, key and value sizes: the entries of one fit the other.
    /// `max_entries` is not compared (a pinned map keeps its capacity).
    pub fn same_entries(&self, other: &MapShape) -> bool {
        (self.map_type, self.key_size, self.value_size) == (other.map_type, other.key_size, other.value_size)
    }
}

/// What to do with the datapath pinned in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// Nothing pinned: install fresh.
    Fresh,
    /// Same layout: adopt every pinned map.
    Adopt,
    /// An older layout: these pinned maps are retired and re-created; the rest
    /// are adopted. Of the retired ones, those in `copy` have their live
    /// entries copied into the new maps by the [`Migration`] named.
    Migrate { from: u32, retire: Vec<String>, copy: Vec<(String, Migration)> },
    /// A newer layout than this build knows: refuse (nothing is touched).
    Refuse { found: u32 },
}

/// Decides what to do with a pinned datapath of layout `found` (None: nothing
/// pinned) whose maps have the shapes `pinned`, for a build whose objects
/// declare `wanted` (by map name) at layout `ours`; `carry` is [`CARRY`].
pub fn plan_upgrade(
    found: Option<u32>,
    ours: u32,
    changed_in: &[(&str, u32)],
    carry: &[(&str, std::ops::RangeInclusive<u32>, Migration)],
    pinned: &[(String, MapShape)],
    wanted: &[(String, MapShape)],
) -> Upgrade {
    let Some(found) = found else { return Upgrade::Fresh };
    if found > ours {
        return Upgrade::Refuse { found };
    }
    let mut retire = Vec::new();
    let mut copy = Vec::new();
    for (name, shape) in pinned {
        let unchanged = changed_in.iter().any(|(n, v)| n == name && *v <= found);
        let same_shape = wanted.iter().any(|(n, s)| n == name && s.same_entries(shape));
        // The entries must keep their shape too, or libbpf would refuse the
        // pinned map; retire it rather than fail. A capacity difference alone
        // is not a reason: `install` keeps a pinned map's own capacity.
        if !(same_shape && (found == ours || unchanged)) {
            retire.push(name.clone());
            // A copy reads the old entries with this build's key and value
            // types, so their sizes must be this build's (the map type may differ).
            let same_entry_size = wanted
                .iter()
                .any(|(n, s)| n == name && (s.key_size, s.value_size) == (shape.key_size, shape.value_size));
            if let Some((_, _, m)) = carry.iter().find(|(n, from, _)| n == name && from.contains(&found))
                && same_entry_size
            {
                copy.push((name.clone(), *m));
            }
        }
    }
    if found == ours && retire.is_empty() { Upgrade::Adopt } else { Upgrade::Migrate { from: found, retire, copy } }
}

/// What `ferry datapath downgrade --to-layout N` does to a pinned datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downgrade {
    /// The datapath already has the asked layout.
    Nothing,
    /// Rebuild `rebuild` in the target layout's shape (their live entries
    /// copied by the [`Reversion`] named), then unpin `retire`, then record
    /// the target layout (unless `ferry_meta` itself is retired: layout 0).
    Convert { from: u32, to: u32, rebuild: Vec<(String, Reversion)>, retire: Vec<String> },
    /// Not possible from here; the reason says what to do instead.
    Refuse(DowngradeRefusal),
}

/// Why a downgrade is refused (nothing is touched).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DowngradeRefusal {
    #[error("no ferry datapath is pinned there: there is nothing to downgrade")]
    NothingPinned,
    #[error(
        "the pinned datapath has layout {found}, which this ferry (layout {ours}) does not know; run the \
         downgrade of a ferry build that has layout {found} or newer"
    )]
    Unknown { found: u32, ours: u32 },
    #[error(
        "the pinned datapath has layout {found}, older than {to}: that is an upgrade, which the newer \
         agent does itself when it starts"
    )]
    Upgrade { found: u32, to: u32 },
    #[error(
        "map {map} changed in layout {changed} in a way this ferry cannot undo for layout {to} (no \
         REVERT row and it holds more than Plan state)"
    )]
    NoReversion { map: String, changed: u32, to: u32 },
}

/// Maps whose entries the Plan cannot rebuild: retiring them would drop
/// flows, so a downgrade that changes one needs a [`REVERT`] row.
pub const FLOW_STATE: &[&str] = &["ferry_ct", "ferry_sock_rev", "ferry_affinity"];

/// Decides how to turn the datapath pinned at layout `found` (None: nothing
/// pinned), whose pinned maps are `pinned` (names), into layout `to`, for a
/// build of layout `ours`; `revert` is [`REVERT`].
pub fn plan_downgrade(
    found: Option<u32>,
    to: u32,
    ours: u32,
    changed_in: &[(&str, u32)],
    revert: &[(&str, std::ops::RangeInclusive<u32>, Reversion)],
    pinned: &[String],
) -> Downgrade {
    let Some(found) = found else { return Downgrade::Refuse(DowngradeRefusal::NothingPinned) };
    if found > ours {
        return Downgrade::Refuse(DowngradeRefusal::Unknown { found, ours });
    }
    if found < to {
        return Downgrade::Refuse(DowngradeRefusal::Upgrade { found, to });
    }
    if found == to {
        return Downgrade::Nothing;
    }
    let (mut rebuild, mut retire) = (Vec::new(), Vec::new());
    for name in pinned {
        // A pin this build does not know is none of its business: left as it is.
        let Some((_, changed)) = changed_in.iter().find(|(n, _)| n == name) else { continue };
        if *changed <= to {
            continue;
        }
        match revert.iter().find(|(n, range, _)| n == name && range.contains(&to)) {
            Some((_, _, r)) => rebuild.push((name.clone(), *r)),
            None if FLOW_STATE.contains(&name.as_str()) => {
                return Downgrade::Refuse(DowngradeRefusal::NoReversion { map: name.clone(), changed: *changed, to });
            }
            None => retire.push(name.clone()),
        }
    }
    Downgrade::Convert { from: found, to, rebuild, retire }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(value_size: u32) -> MapShape {
        MapShape { map_type: 1, key_size: 4, value_size, max_entries: 16 }
    }
    fn named(v: &[(&str, MapShape)]) -> Vec<(String, MapShape)> {
        v.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn every_map_has_a_layout_version_and_the_table_ends_at_this_build() {
        for name in crate::maps::MAP_NAMES {
            assert!(CHANGED_IN.iter().any(|(n, _)| n == name), "{name} has no entry in CHANGED_IN");
        }
        assert!(CHANGED_IN.iter().all(|(_, v)| *v <= LAYOUT));
    }

    #[test]
    fn nothing_pinned_is_fresh_and_the_same_layout_is_adopted() {
        let w = named(&[("a", s(8)), ("b", s(8))]);
        assert_eq!(plan_upgrade(None, 2, &[("a", 0), ("b", 0)], &[], &[], &w), Upgrade::Fresh);
        assert_eq!(plan_upgrade(Some(2), 2, &[("a", 2), ("b", 0)], &[], &w, &w), Upgrade::Adopt);
    }

    #[test]
    fn a_same_size_change_of_meaning_is_not_adopted() {
        // "b" changed meaning in layout 2 without changing size.
        let w = named(&[("a", s(8)), ("b", s(8))]);
        let up = plan_upgrade(Some(1), 2, &[("a", 0), ("b", 2)], &[], &w, &w);
        assert_eq!(up, Upgrade::Migrate { from: 1, retire: vec!["b".into()], copy: vec![] });
    }

    #[test]
    fn a_changed_size_is_retired_even_when_the_table_forgot_it() {
        let w = named(&[("a", s(8)), ("b", s(8))]);
        let p = named(&[("a", s(8)), ("b", s(12))]);
        let up = plan_upgrade(Some(0), 1, &[("a", 0), ("b", 0)], &[], &p, &w);
        assert_eq!(up, Upgrade::Migrate { from: 0, retire: vec!["b".into()], copy: vec![] });
        // A map this build does not know any more is retired (removed) too.
        let p = named(&[("a", s(8)), ("gone", s(8))]);
        let up = plan_upgrade(Some(1), 1, &[("a", 0)], &[], &p, &w);
        assert_eq!(up, Upgrade::Migrate { from: 1, retire: vec!["gone".into()], copy: vec![] });
    }

    #[test]
    fn a_capacity_difference_alone_retires_nothing() {
        let w = named(&[("a", s(8)), ("b", s(8))]);
        let p = named(&[("a", s(8)), ("b", MapShape { max_entries: 4096, ..s(8) })]);
        // Same layout: adopted as pinned (install keeps the pinned capacity).
        assert_eq!(plan_upgrade(Some(1), 1, &[("a", 0), ("b", 0)], &[], &p, &w), Upgrade::Adopt);
        // Older layout: only what changed since is retired, not the resized map.
        let up = plan_upgrade(Some(0), 1, &[("a", 1), ("b", 0)], &[], &p, &w);
        assert_eq!(up, Upgrade::Migrate { from: 0, retire: vec!["a".into()], copy: vec![] });
        // A capacity difference next to a value-size change still retires.
        let p = named(&[("a", s(8)), ("b", MapShape { max_entries: 4096, ..s(12) })]);
        let up = plan_upgrade(Some(1), 1, &[("a", 0), ("b", 0)], &[], &p, &w);
        assert_eq!(up, Upgrade::Migrate { from: 1, retire: vec!["b".into()], copy: vec![] });
    }

    /// Layout 2 split conntrack in two: a layout-1 datapath (one LRU
    /// `ferry_ct`, no `ferry_ct_new`) keeps every other map but the counters
    /// (layout 5) and retires `ferry_ct`, which comes back as a hash next to a new `ferry_ct_new`,
    /// its live flows copied across (`ConntrackSplit`).
    #[test]
    fn layout_1_retires_the_conntrack_lru_and_keeps_the_rest() {
        const HASH: u32 = 1;
        const LRU: u32 = 9;
        let shape = |map_type| MapShape { map_type, key_size: 44, value_size: 64, max_entries: 16 };
        let maps_of = |up_to: u32| -> Vec<(String, MapShape)> {
            CHANGED_IN
                .iter()
                // ferry_stats existed from layout 0 (its size changed in 5).
                .filter(|(n, v)| !n.starts_with("ferry_ct") && (*v <= up_to || *n == "ferry_stats"))
                .map(|(n, _)| (n.to_string(), shape(HASH)))
                .collect()
        };
        // Layout 1 had the maps changed in layouts 0 and 1; later ones came after it.
        let mut pinned = maps_of(1);
        pinned.push(("ferry_ct".into(), shape(LRU)));
        let mut wanted = maps_of(LAYOUT);
        wanted.push(("ferry_ct".into(), shape(HASH)));
        wanted.push(("ferry_ct_new".into(), shape(LRU)));
        let split = vec![("ferry_ct".to_string(), Migration::ConntrackSplit)];
        let up = plan_upgrade(Some(1), LAYOUT, CHANGED_IN, CARRY, &pinned, &wanted);
        let retire = vec!["ferry_stats".to_string(), "ferry_ct".into()];
        assert_eq!(up, Upgrade::Migrate { from: 1, retire: retire.clone(), copy: split.clone() });
        // Even if the table forgot it, the changed map type alone retires it.
        let forgot: Vec<(&str, u32)> =
            CHANGED_IN.iter().map(|(n, v)| (*n, if *n == "ferry_ct" { 0 } else { *v })).collect();
        let up = plan_upgrade(Some(1), LAYOUT, &forgot, CARRY, &pinned, &wanted);
        assert_eq!(up, Upgrade::Migrate { from: 1, retire, copy: split });
    }

    /// Layout 3 added the pass-through sets: a layout-2 datapath keeps every
    /// map but the counters (layout 5) (the new ones are created, and filled
    /// by the agent before it turns the fast path on).
    #[test]
    fn layout_2_keeps_every_map_but_the_counters_and_gains_the_pass_through_sets() {
        let shape = MapShape { map_type: 1, key_size: 20, value_size: 1, max_entries: 16 };
        let layout_2: Vec<(String, MapShape)> = CHANGED_IN
            .iter()
            .filter(|(n, v)| *v <= 2 || *n == "ferry_stats")
            .map(|(n, _)| (n.to_string(), shape))
            .collect();
        let all: Vec<(String, MapShape)> = CHANGED_IN.iter().map(|(n, _)| (n.to_string(), shape)).collect();
        assert!(all.iter().any(|(n, _)| n == "ferry_addrs") && !layout_2.iter().any(|(n, _)| n == "ferry_peers"));
        let up = plan_upgrade(Some(2), LAYOUT, CHANGED_IN, CARRY, &layout_2, &all);
        assert_eq!(up, Upgrade::Migrate { from: 2, retire: vec!["ferry_stats".into()], copy: vec![] });
    }

    /// A copy reads old entries with this build's types: a retired map whose
    /// entries are of another size, or from a layout the copy does not know,
    /// is retired without one.
    #[test]
    fn a_copy_needs_the_entry_size_and_a_layout_it_knows() {
        let carry: &[(&str, std::ops::RangeInclusive<u32>, Migration)] = &[("b", 1..=1, Migration::ConntrackSplit)];
        let w = named(&[("a", s(8)), ("b", s(8))]);
        let lru = |v| MapShape { map_type: 9, ..s(v) };
        let up = plan_upgrade(Some(1), 2, &[("a", 0), ("b", 2)], carry, &named(&[("a", s(8)), ("b", lru(8))]), &w);
        let copy = vec![("b".to_string(), Migration::ConntrackSplit)];
        assert_eq!(up, Upgrade::Migrate { from: 1, retire: vec!["b".into()], copy });
        let up = plan_upgrade(Some(1), 2, &[("a", 0), ("b", 2)], carry, &named(&[("a", s(8)), ("b", lru(12))]), &w);
        assert_eq!(up, Upgrade::Migrate { from: 1, retire: vec!["b".into()], copy: vec![] });
        let up = plan_upgrade(Some(0), 2, &[("a", 0), ("b", 2)], carry, &named(&[("a", s(8)), ("b", lru(8))]), &w);
        assert_eq!(up, Upgrade::Migrate { from: 0, retire: vec!["b".into()], copy: vec![] });
    }

    /// Layout 6 back to 1: the two conntrack tables merge into one LRU
    /// `ferry_ct`; `ferry_stats` (128 slots since 5), `ferry_ct_new`, the
    /// pass-through sets (layout 3) and the DSR maps (layouts 4 and 6) go,
    /// every other map stays as it is. Back to 2: the counters, the
    /// pass-through sets and the DSR maps go; back to 3, the counters and the
    /// DSR maps; back to 4, the counters and the IPv6 DSR maps; back to 5,
    /// only the IPv6 DSR maps.
    #[test]
    fn a_downgrade_to_layout_1_merges_conntrack_and_keeps_the_rest() {
        let pinned: Vec<String> = CHANGED_IN.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(LAYOUT, 6);
        let names = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let dsr6 = ["ferry_tunnels6", "ferry_dsr6"];
        let with_dsr6 = |v: &[&str]| names(&[v, &dsr6[..]].concat());
        let down = plan_downgrade(Some(6), 1, LAYOUT, CHANGED_IN, REVERT, &pinned);
        let retire =
            with_dsr6(&["ferry_stats", "ferry_ct_new", "ferry_addrs", "ferry_peers", "ferry_tunnels", "ferry_dsr"]);
        assert_eq!(
            down,
            Downgrade::Convert {
                from: 6,
                to: 1,
                rebuild: vec![("ferry_ct".into(), Reversion::ConntrackMerge)],
                retire,
            }
        );
        let down = plan_downgrade(Some(6), 2, LAYOUT, CHANGED_IN, REVERT, &pinned);
        let retire = with_dsr6(&["ferry_stats", "ferry_addrs", "ferry_peers", "ferry_tunnels", "ferry_dsr"]);
        assert_eq!(down, Downgrade::Convert { from: 6, to: 2, rebuild: vec![], retire });
        let down = plan_downgrade(Some(6), 3, LAYOUT, CHANGED_IN, REVERT, &pinned);
        let retire = with_dsr6(&["ferry_stats", "ferry_tunnels", "ferry_dsr"]);
        assert_eq!(down, Downgrade::Convert { from: 6, to: 3, rebuild: vec![], retire });
        let down = plan_downgrade(Some(6), 4, LAYOUT, CHANGED_IN, REVERT, &pinned);
        assert_eq!(down, Downgrade::Convert { from: 6, to: 4, rebuild: vec![], retire: with_dsr6(&["ferry_stats"]) });
        let down = plan_downgrade(Some(6), 5, LAYOUT, CHANGED_IN, REVERT, &pinned);
        assert_eq!(down, Downgrade::Convert { from: 6, to: 5, rebuild: vec![], retire: with_dsr6(&[]) });
        // To layout 0 ferry_meta goes too (a layout-0 build has none).
        let Downgrade::Convert { retire, .. } = plan_downgrade(Some(6), 0, LAYOUT, CHANGED_IN, REVERT, &pinned) else {
            panic!("a downgrade to 0 is possible")
        };
        let want = with_dsr6(&[
            "ferry_stats",
            "ferry_ct_new",
            "ferry_meta",
            "ferry_addrs",
            "ferry_peers",
            "ferry_tunnels",
            "ferry_dsr",
        ]);
        assert_eq!(retire, want);
    }

    /// Layout 6 added the IPv6 DSR maps and nothing else: a layout-5
    /// datapath is adopted whole (counters and IPv4 DSR flows included) and
    /// gains ferry_tunnels6 and ferry_dsr6.
    #[test]
    fn layout_5_keeps_every_map_and_gains_the_ipv6_dsr_maps() {
        let shape = MapShape { map_type: 1, key_size: 20, value_size: 1, max_entries: 16 };
        let layout_5: Vec<(String, MapShape)> =
            CHANGED_IN.iter().filter(|(_, v)| *v <= 5).map(|(n, _)| (n.to_string(), shape)).collect();
        let all: Vec<(String, MapShape)> = CHANGED_IN.iter().map(|(n, _)| (n.to_string(), shape)).collect();
        assert!(!layout_5.iter().any(|(n, _)| n == "ferry_tunnels6" || n == "ferry_dsr6"));
        assert!(layout_5.iter().any(|(n, _)| n == "ferry_dsr"));
        let up = plan_upgrade(Some(5), LAYOUT, CHANGED_IN, CARRY, &layout_5, &all);
        assert_eq!(up, Upgrade::Migrate { from: 5, retire: vec![], copy: vec![] });
    }

    /// Layout 4 added the DSR maps, layout 5 room for more counters: a
    /// layout-3 datapath keeps every map but `ferry_stats` (ferry_config
    /// included: the new flags are additions older programs ignore), which is
    /// created afresh with 128 slots, and gains ferry_tunnels and ferry_dsr.
    #[test]
    fn layout_3_keeps_every_map_but_the_counters_and_gains_the_dsr_maps() {
        let shape = MapShape { map_type: 1, key_size: 20, value_size: 1, max_entries: 16 };
        let layout_3: Vec<(String, MapShape)> = CHANGED_IN
            .iter()
            .filter(|(n, v)| *v <= 3 || *n == "ferry_stats")
            .map(|(n, _)| (n.to_string(), shape))
            .collect();
        let all: Vec<(String, MapShape)> = CHANGED_IN.iter().map(|(n, _)| (n.to_string(), shape)).collect();
        assert!(!layout_3.iter().any(|(n, _)| n == "ferry_tunnels" || n == "ferry_dsr"));
        let up = plan_upgrade(Some(3), LAYOUT, CHANGED_IN, CARRY, &layout_3, &all);
        assert_eq!(up, Upgrade::Migrate { from: 3, retire: vec!["ferry_stats".into()], copy: vec![] });
    }

    /// A later layout that only changes the meaning of a Plan-state map (say
    /// `ferry_locals` gains a flag in layout 3) needs no [`REVERT`] row: the
    /// downgrade retires the map and the older agent refills it.
    #[test]
    fn a_plan_state_change_is_retired_and_a_flow_state_change_needs_a_row() {
        let pinned: Vec<String> =
            ["ferry_locals", "ferry_ct", "ferry_ct_new", "ferry_meta", "ferry_other_build"].map(String::from).to_vec();
        let changed: &[(&str, u32)] = &[("ferry_locals", 3), ("ferry_ct", 2), ("ferry_ct_new", 2), ("ferry_meta", 1)];
        let down = plan_downgrade(Some(3), 2, 3, changed, REVERT, &pinned);
        assert_eq!(down, Downgrade::Convert { from: 3, to: 2, rebuild: vec![], retire: vec!["ferry_locals".into()] });
        let down = plan_downgrade(Some(3), 1, 3, changed, REVERT, &pinned);
        assert_eq!(
            down,
            Downgrade::Convert {
                from: 3,
                to: 1,
                rebuild: vec![("ferry_ct".into(), Reversion::ConntrackMerge)],
                retire: vec!["ferry_locals".into(), "ferry_ct_new".into()],
            }
        );
        // Flows cannot be refilled from a Plan: without a row, refused.
        let changed: &[(&str, u32)] = &[("ferry_affinity", 3)];
        let down = plan_downgrade(Some(3), 2, 3, changed, REVERT, &["ferry_affinity".to_string()]);
        assert_eq!(
            down,
            Downgrade::Refuse(DowngradeRefusal::NoReversion { map: "ferry_affinity".into(), changed: 3, to: 2 })
        );
    }

    #[test]
    fn a_downgrade_needs_a_known_newer_datapath() {
        let p = vec!["ferry_ct".to_string()];
        let plan = |found, to| plan_downgrade(found, to, 2, CHANGED_IN, REVERT, &p);
        assert_eq!(plan(None, 1), Downgrade::Refuse(DowngradeRefusal::NothingPinned));
        assert_eq!(plan(Some(3), 1), Downgrade::Refuse(DowngradeRefusal::Unknown { found: 3, ours: 2 }));
        assert_eq!(plan(Some(1), 2), Downgrade::Refuse(DowngradeRefusal::Upgrade { found: 1, to: 2 }));
        assert_eq!(plan(Some(1), 1), Downgrade::Nothing);
    }

    #[test]
    fn a_newer_layout_is_refused() {
        let w = named(&[("a", s(8))]);
        assert_eq!(plan_upgrade(Some(3), 2, &[("a", 0)], &[], &w, &w), Upgrade::Refuse { found: 3 });
    }
}
