//! Turning a pinned datapath into an older layout's, in place, while it
//! keeps serving (`ferry datapath downgrade`): the way back that an older
//! build cannot take by itself, since it does not know what came after it.
//!
//! [`convert`] does what [`crate::layout::plan_downgrade`] decided: each map
//! to rebuild is created in the older shape, filled with this layout's live
//! entries ([`Reversion`]) and pinned in place of the current one; the maps
//! to retire are unpinned; `ferry_meta` records the older layout. The running
//! programs never notice: they hold their maps by reference, not by pin, and
//! keep serving from them. The older agent then starts, adopts the pinned
//! maps (they are of its layout now) and switches the links to its programs.
//!
//! Between the conversion and that switch the running programs still create
//! and update flows in the maps they hold. [`Converted::refresh`] copies them
//! again (overwriting: nobody else writes the rebuilt maps yet), and
//! [`Converted::late`], once the links have switched, adds the flows the old
//! maps have and the rebuilt ones lack, without overwriting what the older
//! programs wrote since: the same two passes an upgrade makes
//! ([`crate::migrate`]), with the wait for the older agent in between.
//! Between two passes, though, the running programs write every flow they
//! create into the rebuilt conntrack table too ([`Converted::mirrored`]):
//! a flow created just before its link switched is known to the older
//! programs at its first packet, not only at the next pass.

use crate::layout::{CHANGED_IN, DowngradeRefusal, LAYOUT, REVERT, Reversion, plan_downgrade};
use crate::maps::{bytes, from_bytes};
use crate::migrate::open_ct;
use crate::skel::sock::types as t;
use libbpf_rs::query::{ProgInfoIter, ProgInfoQueryOptions};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// Errors of a downgrade: what failed, on which map, and what state it left.
#[derive(Debug, thiserror::Error)]
pub enum DowngradeError {
    #[error(transparent)]
    Refused(#[from] DowngradeRefusal),
    #[error("{0}; nothing was replaced: the datapath is unchanged and still serving")]
    Open(#[from] crate::migrate::MigrateError),
    #[error(
        "{step}: {source}; nothing was replaced yet: the datapath is unchanged (layout {from}) and still \
         serving"
    )]
    Build { step: String, from: u32, source: libbpf_rs::Error },
    #[error(
        "{step}: {source}; the datapath is still served by the layout-{from} programs, but its pins are \
         half converted: run the downgrade again, or start the layout-{from} agent (it migrates back)"
    )]
    Swap { step: String, from: u32, source: std::io::Error },
}

/// What a downgrade did to one rebuilt map: the command's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// The map rebuilt in the older shape.
    pub map: String,
    /// Its capacity (max_entries).
    pub capacity: u32,
    /// Entries copied from the table of confirmed flows (`ferry_ct`).
    pub confirmed: u64,
    /// Entries copied from the table of unconfirmed flows (`ferry_ct_new`).
    pub unconfirmed: u64,
    /// Entries past their deadline, left behind (the datapath treats them as misses).
    pub expired: u64,
    /// Entries that could not be written: their flows are balanced again on
    /// their next packet after the switch (a SNATed one is reset).
    pub not_copied: u64,
    /// Live entries left behind because their flow's other entry is held by
    /// another flow (`stranded`, as an upgrade's copy counts them).
    pub stranded: u64,
    /// Entries the refresh passes wrote while the links had not switched
    /// yet: flows created or updated since the pass before.
    pub refreshed: u64,
    /// Entries added after the links switched: flows the newer programs
    /// created after the last pass.
    pub late: u64,
    /// Flows the running programs wrote into it themselves as they created
    /// them (`ct_mirrored`), from the conversion until [`Converted::finish`].
    pub mirrored: u64,
}

/// The pinned datapath after [`convert`]: of the older layout, still served
/// by this layout's programs until the older agent switches the links.
pub struct Converted {
    pub from: u32,
    pub to: u32,
    /// Maps rebuilt in the older shape, with what their copy did.
    pub rebuilt: Vec<Rebuilt>,
    /// Maps unpinned (the older agent creates them anew and refills them).
    pub retired: Vec<String>,
    copies: Vec<Copy>,
    /// Every pinned link and the program it ran at the conversion.
    links: Vec<(PathBuf, u32)>,
    /// The running programs' `ferry_ct_next` / `ferry_ct_prev` slots holding
    /// the rebuilt conntrack table, and `ct_mirrored` when it was put there.
    mirrors: Vec<MapHandle>,
    mirrored_before: u64,
    /// The running programs' `ferry_stats` (held: a downgrade below layout 5
    /// unpins it).
    stats: Option<MapHandle>,
}

/// One rebuilt map and the maps of this layout it is filled from (held open:
/// their pins are gone, the running programs still write them).
struct Copy {
    reversion: Reversion,
    sources: Vec<MapHandle>,
    target: MapHandle,
    /// What the passes wrote, by key: a pass writes only what changed since.
    written: HashMap<Vec<u8>, Vec<u8>>,
}

/// Converts the datapath pinned in `pin_dir` to layout `to`. The caller holds
/// the pin directory's lock (no agent may program it meanwhile) and keeps the
/// result to run [`Converted::refresh`] / [`Converted::late`].
pub fn convert(pin_dir: &Path, to: u32) -> Result<Option<Converted>, DowngradeError> {
    let found = crate::install::pinned_layout(pin_dir);
    let pinned = pinned_names(pin_dir);
    let (from, to, rebuild, retire) = match plan_downgrade(found, to, LAYOUT, CHANGED_IN, REVERT, &pinned) {
        crate::layout::Downgrade::Nothing => return Ok(None),
        crate::layout::Downgrade::Refuse(r) => return Err(r.into()),
        crate::layout::Downgrade::Convert { from, to, rebuild, retire } => (from, to, rebuild, retire),
    };
    detach_xdp(pin_dir);
    let links = link_programs(pin_dir);
    // Build every rebuilt map, unpinned, before any pin changes: a failure
    // here leaves the datapath exactly as it was.
    let now = crate::stale::monotonic_ns();
    let mut copies = Vec::new();
    let mut rebuilt = Vec::new();
    for (name, r) in &rebuild {
        let (copy, mut report) = build(*r, pin_dir, from, now)?;
        report.map = name.clone();
        rebuilt.push(report);
        copies.push((name.clone(), copy));
    }
    // Then the pins: each rebuilt map is pinned beside its pin and renamed
    // over it (one atomic step on bpffs), the retired ones are unpinned, the
    // layout recorded last.
    let staging = pin_dir.join("downgrade");
    let swap = |step: String| move |source| DowngradeError::Swap { step, from, source };
    std::fs::create_dir_all(&staging).map_err(swap(format!("creating {}", staging.display())))?;
    for (name, copy) in &mut copies {
        let tmp = staging.join(name.as_str());
        let _ = std::fs::remove_file(&tmp);
        copy.target.pin(&tmp).map_err(|e| DowngradeError::Swap {
            step: format!("pinning the rebuilt {name} at {}", tmp.display()),
            from,
            source: std::io::Error::other(e),
        })?;
        std::fs::rename(&tmp, pin_dir.join(name.as_str()))
            .map_err(swap(format!("putting the rebuilt {name} in place")))?;
    }
    let _ = std::fs::remove_dir(&staging);
    // The running programs' counters, held before a retired ferry_stats
    // (layout 5 grew it) is unpinned: they count the mirrored flows there.
    let stats = MapHandle::from_pinned_path(pin_dir.join("ferry_stats")).ok();
    for name in &retire {
        let path = pin_dir.join(name);
        std::fs::remove_file(&path).map_err(swap(format!("unpinning {}", path.display())))?;
    }
    if !retire.iter().any(|n| n == "ferry_meta") {
        crate::install::write_layout(pin_dir, to).map_err(|e| DowngradeError::Swap {
            step: "recording the layout in ferry_meta".into(),
            from,
            source: std::io::Error::other(e),
        })?;
    }
    let mirrored_before = mirrored_so_far(stats.as_ref());
    let mirrors = copies
        .iter()
        .find(|(_, c)| c.reversion == Reversion::ConntrackMerge)
        .map(|(_, c)| mirror_into(&links, &c.target))
        .unwrap_or_default();
    Ok(Some(Converted {
        from,
        to,
        rebuilt,
        retired: retire,
        copies: copies.into_iter().map(|(_, c)| c).collect(),
        links,
        mirrors,
        mirrored_before,
        stats,
    }))
}

/// Puts the rebuilt conntrack table into the `ferry_ct_next` slot of every
/// program the pinned links run (bpf/lib/maps.h): from now on they write each
/// flow they create into it too. Without it, a flow created after the last
/// pass and before its link switched was unknown to the older programs until
/// the next pass (5 ms later): its reply met them first and went to the
/// node's stack, which reset it (seen once in 5,000-9,000 new connections
/// across a switch). It goes into their `ferry_ct_prev` slot as well, as an
/// upgrade's retired table does: a flow the older programs create once they
/// hold a first link is found by these on the links they still hold.
/// Programs without the slots (an older build) are passed over: the passes
/// alone carry their flows.
fn mirror_into(links: &[(PathBuf, u32)], target: &MapHandle) -> Vec<MapHandle> {
    let progs: HashSet<u32> = links.iter().map(|(_, id)| *id).collect();
    let fd = target.as_fd().as_raw_fd() as u32;
    let mut seen = HashSet::new();
    let mut slots = Vec::new();
    for prog in ProgInfoIter::with_query_opts(ProgInfoQueryOptions::default().include_map_ids(true)) {
        if !progs.contains(&prog.id) {
            continue;
        }
        for id in prog.map_ids {
            if !seen.insert(id) {
                continue;
            }
            let Ok(m) = MapHandle::from_map_id(id) else { continue };
            if !(m.name() == "ferry_ct_next" || m.name() == "ferry_ct_prev") || m.map_type() != MapType::ArrayOfMaps {
                continue;
            }
            match m.update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY) {
                Ok(()) => slots.push(m),
                Err(e) => tracing::warn!("handing the rebuilt ferry_ct to the running programs (map {id}): {e}"),
            }
        }
    }
    slots
}

/// The running programs' `ct_mirrored` counter, summed over CPUs (0 if unreadable).
fn mirrored_so_far(stats: Option<&MapHandle>) -> u64 {
    let Some(i) = crate::stats::NAMES.iter().position(|n| *n == "ct_mirrored") else { return 0 };
    let Some(stats) = stats else { return 0 };
    stats
        .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
        .ok()
        .flatten()
        .map(|per_cpu| per_cpu.iter().map(|v| from_bytes::<u64>(v)).sum())
        .unwrap_or(0)
}

impl Converted {
    /// How many of the pinned links run another program than at the
    /// conversion (the older agent switches them one by one), and of how
    /// many. A link that is gone counts as switched (an agent may re-attach
    /// a device's link).
    pub fn links_switched(&self) -> (usize, usize) {
        let switched =
            self.links.iter().filter(|(path, prog)| link_program(path).is_none_or(|now| now != *prog)).count();
        (switched, self.links.len())
    }

    /// Copies this layout's live entries again, overwriting: flows created or
    /// updated since the last pass (only before the links switch, while no
    /// older program writes the rebuilt maps). Returns the entries written.
    pub fn refresh(&mut self) -> u64 {
        self.pass(MapFlags::ANY, |r, n| r.refreshed += n)
    }

    /// After the links switched: adds the flows the rebuilt maps lack,
    /// overwriting nothing the older programs wrote. Returns the entries written.
    pub fn late(&mut self) -> u64 {
        self.pass(MapFlags::NO_EXIST, |r, n| r.late += n)
    }

    /// Whether the running programs write their new flows into the rebuilt
    /// conntrack table themselves (they have the slot: this build's or newer).
    pub fn mirrored(&self) -> bool {
        !self.mirrors.is_empty()
    }

    /// Takes the rebuilt table back from the running programs' slots and
    /// records how many flows they wrote into it. Also done on drop; call it
    /// for the figure, once the links have switched.
    pub fn finish(&mut self) {
        if self.mirrors.is_empty() {
            return;
        }
        for m in self.mirrors.drain(..) {
            let _ = m.delete(&0u32.to_ne_bytes());
        }
        let n = mirrored_so_far(self.stats.as_ref()).saturating_sub(self.mirrored_before);
        if let Some(r) = self
            .copies
            .iter()
            .zip(self.rebuilt.iter_mut())
            .find_map(|(c, r)| (c.reversion == Reversion::ConntrackMerge).then_some(r))
        {
            r.mirrored = n;
        }
    }

    fn pass(&mut self, how: MapFlags, count: impl Fn(&mut Rebuilt, u64)) -> u64 {
        let now = crate::stale::monotonic_ns();
        let mut total = 0;
        for (c, r) in self.copies.iter_mut().zip(self.rebuilt.iter_mut()) {
            let f = match c.reversion {
                Reversion::ConntrackMerge => merge_conntrack(&c.sources, &c.target, now, how, &mut c.written),
            };
            let n = f.confirmed + f.unconfirmed;
            count(r, n);
            total += n;
        }
        total
    }
}

impl Drop for Converted {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The names of the maps pinned directly in `pin_dir`.
fn pinned_names(pin_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ferry_"))
        .collect();
    out.sort();
    out
}

/// Detaches the XDP programs (`acceleration`) before a downgrade: no older
/// build knows them, so its agent would never switch their links, and they
/// would go on serving from this layout's maps while tc serves from the
/// older ones. tc does all they did, so traffic only takes the slower path.
fn detach_xdp(pin_dir: &Path) {
    for e in std::fs::read_dir(pin_dir.join("links")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("xdp_") {
            continue;
        }
        if let Ok(link) = libbpf_rs::Link::open(e.path()) {
            let _ = link.detach();
        }
        let _ = std::fs::remove_file(e.path());
        tracing::info!(link = %name, "XDP acceleration detached for the downgrade (older builds do not know it)");
    }
}

fn link_program(path: &Path) -> Option<u32> {
    libbpf_rs::Link::open(path).ok()?.info().ok().map(|i| i.prog_id)
}

fn link_programs(pin_dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out: Vec<(PathBuf, u32)> = std::fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| link_program(&e.path()).map(|p| (e.path(), p)))
        .collect();
    out.sort();
    out
}

/// Creates the map `r` rebuilds, in its older shape, and fills it.
fn build(r: Reversion, pin_dir: &Path, from: u32, now: u64) -> Result<(Copy, Rebuilt), DowngradeError> {
    match r {
        Reversion::ConntrackMerge => {
            // ferry_ct first: where a flow is in both (moving between them),
            // its confirmed entries are the newer.
            let sources = vec![open_ct(&pin_dir.join("ferry_ct"))?, open_ct(&pin_dir.join("ferry_ct_new"))?];
            let live = sources.iter().map(|m| m.keys().count() as u64).sum();
            let capacity = merged_capacity(sources[0].max_entries(), live);
            let opts = libbpf_sys::bpf_map_create_opts {
                sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            };
            // The shape of layouts 0 and 1 (bpf/lib/maps.h at d849f56): an LRU
            // hash of the same entries, no flags. An older agent adopts a
            // pinned map only in exactly its declared shape.
            let target = MapHandle::create(
                MapType::LruHash,
                Some("ferry_ct"),
                std::mem::size_of::<t::ct_key>() as u32,
                std::mem::size_of::<t::ct_val>() as u32,
                capacity,
                &opts,
            )
            .map_err(|source| DowngradeError::Build {
                step: format!("creating the layout-0/1 ferry_ct ({capacity} entries)"),
                from,
                source,
            })?;
            let mut written = HashMap::new();
            let mut report = merge_conntrack(&sources, &target, now, MapFlags::ANY, &mut written);
            report.capacity = capacity;
            Ok((Copy { reversion: r, sources, target, written }, report))
        }
    }
}

/// The capacity of the merged table: the confirmed table's (the operator's
/// `maps.conntrack`, which sized the single table in layout 1 too), or more
/// when the live flows of both tables would not fit in it with room to spare
/// (an LRU near full evicts).
pub fn merged_capacity(confirmed_capacity: u32, entries: u64) -> u32 {
    let needed = entries.saturating_add(entries / 4).min(u32::MAX as u64) as u32;
    confirmed_capacity.max(needed)
}

/// Which of two entries for one key of the old tables goes into the merged
/// one: the later deadline (the entry the datapath updated last), the first
/// table's on a tie.
pub fn newer<'a>(first: &'a t::ct_val, second: &'a t::ct_val) -> &'a t::ct_val {
    if second.expires_ns > first.expires_ns { second } else { first }
}

/// Every entry of `m`, read in batches (one system call per 4,096 entries,
/// so that a pass over a large table stays short), or one by one where the
/// kernel has no batch lookup for it.
fn entries_of(m: &MapHandle) -> Vec<(Vec<u8>, Vec<u8>)> {
    match m.lookup_batch(4096, MapFlags::ANY, MapFlags::ANY) {
        Ok(batches) => batches.collect(),
        Err(_) => m.keys().filter_map(|k| m.lookup(&k, MapFlags::ANY).ok().flatten().map(|v| (k, v))).collect(),
    }
}

/// Copies every live entry of `sources` (ferry_ct, then ferry_ct_new) into
/// `target`, as `how` allows (ANY overwrites, NO_EXIST only adds), except
/// those `written` says are there already as they are.
fn merge_conntrack(
    sources: &[MapHandle],
    target: &MapHandle,
    now: u64,
    how: MapFlags,
    written: &mut HashMap<Vec<u8>, Vec<u8>>,
) -> Rebuilt {
    let first = written.is_empty();
    let mut r = Rebuilt::default();
    let mut entries: HashMap<Vec<u8>, (usize, t::ct_val)> = HashMap::new();
    for (i, m) in sources.iter().enumerate() {
        for (k, v) in entries_of(m) {
            let v = from_bytes::<t::ct_val>(&v);
            match entries.get_mut(&k) {
                Some(e) => {
                    if std::ptr::eq(newer(&e.1, &v), &v) {
                        *e = (i, v);
                    }
                }
                None => {
                    entries.insert(k, (i, v));
                }
            }
        }
    }
    let stranded = crate::migrate::stranded_keys(entries.iter().map(|(k, (_, v))| (k, v)), now);
    for (k, (i, v)) in &entries {
        if v.expires_ns < now {
            r.expired += u64::from(first);
            continue;
        }
        if stranded.contains(k) {
            r.stranded += u64::from(first);
            continue;
        }
        if written.get(k).is_some_and(|w| w.as_slice() == bytes(v)) {
            continue;
        }
        match target.update(k, bytes(v), how) {
            Ok(()) => {
                written.insert(k.clone(), bytes(v).to_vec());
                if *i == 0 { r.confirmed += 1 } else { r.unconfirmed += 1 }
            }
            // Already there (NO_EXIST): the older programs have it.
            Err(_) if how == MapFlags::NO_EXIST => {}
            Err(_) => r.not_copied += 1,
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merged_table_keeps_the_operators_capacity_unless_the_flows_need_more() {
        assert_eq!(merged_capacity(524_288, 0), 524_288);
        assert_eq!(merged_capacity(524_288, 400_000), 524_288);
        // 4,096 confirmed slots, 5,000 live entries in both tables: room for all and a quarter.
        assert_eq!(merged_capacity(4096, 5000), 6250);
    }

    #[test]
    fn of_two_entries_for_one_flow_the_one_updated_last_is_kept() {
        let a = t::ct_val { expires_ns: 10, flags: 2, ..Default::default() };
        let b = t::ct_val { expires_ns: 20, ..Default::default() };
        assert_eq!(newer(&a, &b).expires_ns, 20);
        assert_eq!(newer(&b, &a).expires_ns, 20);
        // A tie keeps the first table's (ferry_ct: the confirmed entry).
        let c = t::ct_val { expires_ns: 10, ..Default::default() };
        assert_eq!(newer(&a, &c).flags, 2);
    }
}
