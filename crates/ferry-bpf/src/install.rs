//! Installing the datapath into the kernel: load the BPF objects with their
//! maps pinned by name, attach the socket programs to a cgroup through pinned
//! links, and remove all of it again (`ferry cleanup`).
//!
//! Everything lives under one pin directory. A second install over a live one
//! (agent restart or upgrade) reuses the pinned maps and swaps the programs
//! inside the existing links (`bpf_link_update`), so no connection notices.

use crate::layout::{CARRY, CHANGED_IN, LAYOUT, MapShape, Migration, Upgrade, plan_upgrade};
use crate::maps::{MAP_NAMES, MapError, Maps};
use crate::migrate::Carried;
use crate::skel::netdev::{NetdevSkelBuilder, OpenNetdevSkel};
use crate::skel::sock::{OpenSockSkel, SockSkelBuilder};
use crate::system::{self, SystemError};
use ferry_model::Acceleration;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{AsRawLibbpf, Link, MapCore, MapFlags, MapHandle, OpenMapMut, ProgramMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

/// The role of a node device the tc programs are attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceRole {
    /// An uplink: ingress (from outside) and egress programs.
    External,
    /// Faces pods (a bridge, or a pod veth): ingress program only.
    Pod,
}

impl DeviceRole {
    fn tag(&self) -> &'static str {
        match self {
            DeviceRole::External => "ext",
            DeviceRole::Pod => "pod",
        }
    }
}

/// Where the datapath is installed.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Pin directory on bpffs, e.g. /sys/fs/bpf/ferry.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory whose sockets are load-balanced (the cgroup2 root on a real node).
    pub cgroup: PathBuf,
    /// Devices (by name) that get the per-packet programs.
    pub devices: Vec<(String, DeviceRole)>,
    /// Capacity (max_entries) per map name, for maps created by this
    /// install; maps not named keep the size compiled into `bpf/lib/maps.h`.
    /// A map that is already pinned keeps its own capacity (see [`install`]).
    pub capacities: Vec<(String, u32)>,
    /// Make (or adopt) the defrag loop (`bpf.defragLoop`); false removes one
    /// an earlier install made, and fragments it would reassemble are
    /// counted and passed or dropped as without it.
    pub defrag_loop: bool,
    /// XDP on the external devices (`acceleration`): `Native` attaches
    /// `ferry_xdp` in driver mode and fails the install if a device refuses
    /// it; `BestEffort` does the same but runs that device on tc only (logged
    /// with the reason); `Disabled` detaches what an earlier install attached.
    pub acceleration: ferry_model::Acceleration,
}

/// A device the tc programs are attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDevice {
    pub name: String,
    pub ifindex: u32,
    pub role: DeviceRole,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    System(#[from] SystemError),
    #[error("pin directory {0} is not on bpffs ({bpffs}); choose a path below it", bpffs = system::BPFFS)]
    PinDirNotBpffs(PathBuf),
    #[error("creating pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("opening cgroup {path}: {source} (it must be a cgroup v2 directory; see `bpf.cgroupPath`)")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("{step}: {source}")]
    Libbpf { step: String, source: libbpf_rs::Error },
    #[error(transparent)]
    Maps(#[from] MapError),
    #[error(
        "the datapath pinned in {pin_dir} has map layout {found}, newer than this ferry's layout {ours} \
         (a downgrade across a layout change); ferry left it untouched and still serving. Run the newer \
         ferry again, or remove the datapath with `ferry cleanup --pin-dir {pin_dir}` (drops tracked \
         NodePort flows; socket-LB connections stay) and start this version"
    )]
    NewerLayout { pin_dir: PathBuf, found: u32, ours: u32 },
    #[error(
        "copying the live entries of the retired map {map} into this layout's maps: {source}; the old \
         datapath was left serving"
    )]
    Migrate { map: String, source: crate::migrate::MigrateError },
    #[error("device {0} does not exist in this network namespace (check bpf.devices / bpf.podDevices)")]
    NoDevice(String),
}

fn lb(step: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> InstallError {
    let step = step.into();
    move |source| InstallError::Libbpf { step, source }
}

/// What `install` found and did.
pub struct Installed {
    pub maps: Maps,
    /// The maps already existed: a previous agent's state was adopted.
    pub adopted: bool,
    /// The pinned datapath had this older layout and was migrated ([`crate::layout`]).
    pub migrated_from: Option<u32>,
    /// Maps of the older layout that were re-created (the first full sync
    /// refills those holding Plan state; see `carried` for the others).
    pub retired: Vec<String>,
    /// Retired maps whose live entries were copied into the new maps
    /// ([`crate::layout::CARRY`]), with what the copy did.
    pub carried: Vec<Carried>,
    /// Links that were swapped to the new programs in place.
    pub links_updated: usize,
    /// Links that were newly attached.
    pub links_attached: usize,
    /// Devices carrying the per-packet programs.
    pub devices: Vec<AttachedDevice>,
    /// External devices whose XDP program is attached (driver mode).
    pub accelerated: Vec<String>,
    /// `best-effort`: external devices left to tc, each with why the XDP attach failed.
    pub xdp_fallbacks: Vec<crate::acceleration::Fallback>,
    /// Adopted maps whose capacity differs from `InstallOptions::capacities`:
    /// they keep their pinned capacity (resizing means recreating them,
    /// which drops tracked flows: `ferry cleanup`, then start again).
    pub capacity_kept: Vec<CapacityKept>,
}

macro_rules! map_list {
    ($maps:expr) => {
        [
            ("ferry_frontends", &mut $maps.ferry_frontends),
            ("ferry_services", &mut $maps.ferry_services),
            ("ferry_slots", &mut $maps.ferry_slots),
            ("ferry_backends", &mut $maps.ferry_backends),
            ("ferry_members", &mut $maps.ferry_members),
            ("ferry_sock_rev", &mut $maps.ferry_sock_rev),
            ("ferry_affinity", &mut $maps.ferry_affinity),
            ("ferry_firewall", &mut $maps.ferry_firewall),
            ("ferry_locals", &mut $maps.ferry_locals),
            ("ferry_ranges", &mut $maps.ferry_ranges),
            ("ferry_config", &mut $maps.ferry_config),
            ("ferry_names", &mut $maps.ferry_names),
            ("ferry_stats", &mut $maps.ferry_stats),
            ("ferry_devices", &mut $maps.ferry_devices),
            ("ferry_ct", &mut $maps.ferry_ct),
            ("ferry_ct_new", &mut $maps.ferry_ct_new),
            ("ferry_maglev", &mut $maps.ferry_maglev),
            ("ferry_frags", &mut $maps.ferry_frags),
            ("ferry_meta", &mut $maps.ferry_meta),
            ("ferry_addrs", &mut $maps.ferry_addrs),
            ("ferry_peers", &mut $maps.ferry_peers),
            ("ferry_tunnels", &mut $maps.ferry_tunnels),
            ("ferry_dsr", &mut $maps.ferry_dsr),
            ("ferry_tunnels6", &mut $maps.ferry_tunnels6),
            ("ferry_dsr6", &mut $maps.ferry_dsr6),
        ]
    };
}

/// A map whose pinned capacity differs from the one asked for: the pinned
/// one is kept (see [`install`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityKept {
    pub map: String,
    pub pinned: u32,
    pub asked: u32,
}

/// Gives each map its capacity before load: a map already pinned in `dir`
/// keeps its pinned capacity (libbpf reuses a pinned map only if its
/// definition matches; a different asked one is reported in `kept`), any
/// other gets its entry in `capacities` or keeps its compiled size.
/// Returns the compiled sizes (for [`resize_retired`]).
fn size_maps(
    all: Vec<(&str, &mut OpenMapMut)>,
    dir: &Path,
    capacities: &[(String, u32)],
    kept: &mut Vec<CapacityKept>,
) -> Result<Vec<(String, u32)>, InstallError> {
    let mut compiled = Vec::new();
    for (name, map) in all {
        compiled.push((name.to_string(), map.max_entries()));
        let asked = capacities.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
        let pinned = libbpf_rs::MapHandle::from_pinned_path(dir.join(name)).ok().map(|m| m.max_entries());
        match (pinned, asked) {
            (Some(p), _) => {
                if let Some(a) = asked.filter(|a| *a != p) {
                    kept.push(CapacityKept { map: name.to_string(), pinned: p, asked: a });
                }
                map.set_max_entries(p).map_err(lb(format!("setting capacity of {name}")))?;
            }
            (None, Some(a)) => map.set_max_entries(a).map_err(lb(format!("setting capacity of {name} to {a}")))?,
            (None, None) => {}
        }
    }
    Ok(compiled)
}

/// The maps in `retire` are created anew: with the asked capacity (or the
/// compiled one), not the capacity of the pinned map they replace.
fn resize_retired(
    all: Vec<(&str, &mut OpenMapMut)>,
    retire: &[String],
    capacities: &[(String, u32)],
    compiled: &[(String, u32)],
) -> Result<(), InstallError> {
    for (name, map) in all {
        if !retire.iter().any(|r| r == name) {
            continue;
        }
        let size = capacities.iter().chain(compiled).find(|(n, _)| n == name).map(|(_, c)| *c);
        if let Some(c) = size {
            map.set_max_entries(c).map_err(lb(format!("setting capacity of {name} to {c}")))?;
        }
    }
    Ok(())
}

fn set_pin_paths(all: Vec<(&str, &mut OpenMapMut)>, dir: &Path) -> Result<(), InstallError> {
    for (name, map) in all {
        map.set_pin_path(dir.join(name)).map_err(lb(format!("setting pin path of {name}")))?;
    }
    Ok(())
}

fn pin_netdev_maps(open: &mut OpenNetdevSkel, dir: &Path) -> Result<(), InstallError> {
    // The socket object created the maps (or they were adopted): reuse them as pinned.
    size_maps(map_list!(open.maps).into(), dir, &[], &mut Vec::new())?;
    set_pin_paths(map_list!(open.maps).into(), dir)
}

/// The inode of a cgroup directory, which is its cgroup id on cgroup v2.
fn cgroup_id(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Attaches `prog` to the cgroup through a link pinned at `pin`, or swaps the
/// program inside an existing pinned link on the same cgroup.
fn attach_cgroup(prog: &ProgramMut, cgroup_fd: i32, cgroup: &Path, pin: &Path) -> Result<bool, InstallError> {
    if pin.exists() {
        let mut link = Link::open(pin).map_err(lb(format!("opening pinned link {}", pin.display())))?;
        let same_cgroup = match link.info().map(|i| i.info) {
            Ok(libbpf_rs::query::LinkTypeInfo::Cgroup(c)) => Some(c.cgroup_id) == cgroup_id(cgroup),
            _ => false,
        };
        if same_cgroup && link.update_prog(prog).is_ok() {
            return Ok(true);
        }
        // Attached elsewhere (the configured cgroup changed) or not updatable: replace it.
        let _ = link.detach();
        let _ = link.unpin();
    }
    let mut link = prog.attach_cgroup(cgroup_fd).map_err(lb(format!("attaching to cgroup {}", cgroup.display())))?;
    link.pin(pin).map_err(lb(format!("pinning link {}", pin.display())))?;
    Ok(false)
}

/// The layout version recorded in the datapath pinned in `pin_dir`: None when
/// nothing is pinned, 0 when it predates `ferry_meta`.
pub fn pinned_layout(pin_dir: &Path) -> Option<u32> {
    if !is_installed(pin_dir) {
        return None;
    }
    let Ok(meta) = MapHandle::from_pinned_path(pin_dir.join("ferry_meta")) else { return Some(0) };
    let value = meta.lookup(&0u32.to_ne_bytes(), MapFlags::ANY).ok().flatten();
    Some(value.and_then(|v| v.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))).unwrap_or(0))
}

/// Records `layout` as the pinned datapath's layout version.
pub(crate) fn write_layout(pin_dir: &Path, layout: u32) -> Result<(), InstallError> {
    let meta = MapHandle::from_pinned_path(pin_dir.join("ferry_meta")).map_err(lb("opening ferry_meta"))?;
    let mut value = [0u8; 8];
    value[..4].copy_from_slice(&layout.to_ne_bytes());
    meta.update(&0u32.to_ne_bytes(), &value, MapFlags::ANY).map_err(lb("writing the layout version to ferry_meta"))
}

fn shape_of(m: &impl MapCore) -> MapShape {
    MapShape {
        map_type: u32::from(m.map_type()),
        key_size: m.key_size(),
        value_size: m.value_size(),
        max_entries: m.max_entries(),
    }
}

/// The shape of every map pinned directly in `pin_dir` (`ferry_*` pins).
fn pinned_shapes(pin_dir: &Path) -> Vec<(String, MapShape)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ferry_")
                && let Ok(h) = MapHandle::from_pinned_path(e.path())
            {
                out.push((name, shape_of(&h)));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The shape of every map the socket object declares (the tc object shares them).
fn wanted_shapes(open: &OpenSockSkel) -> Vec<(String, MapShape)> {
    let mut out = Vec::new();
    for m in open.open_object().maps() {
        let name = m.name().to_string_lossy().into_owned();
        if MAP_NAMES.contains(&name.as_str()) {
            out.push((
                name,
                MapShape {
                    map_type: u32::from(m.map_type()),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: m.max_entries(),
                },
            ));
        }
    }
    out
}

/// Moves the pins of `names` into `retired` (and back, with `back`).
fn move_pins(from: &Path, to: &Path, names: &[String]) -> Result<(), InstallError> {
    std::fs::create_dir_all(to).map_err(|source| InstallError::PinDir { path: to.to_path_buf(), source })?;
    for name in names {
        let src = from.join(name);
        if src.exists() {
            std::fs::rename(&src, to.join(name)).map_err(|source| InstallError::PinDir { path: src, source })?;
        }
    }
    Ok(())
}

/// Loads, pins and attaches the socket-LB and tc programs. Idempotent.
///
/// A datapath already pinned in `pin_dir` is compared with this build's
/// layout first ([`crate::layout`]): the same layout is adopted; an older one
/// is migrated (maps that changed move to `pin_dir/retired`, new ones are
/// created in their place, the live entries of those [`CARRY`] names are
/// copied into them, the links switch to the new programs, the retired maps
/// are removed); a newer one is refused with
/// [`InstallError::NewerLayout`] before anything is loaded. Both objects pass
/// the verifier before any link is switched.
///
/// Maps are created with `opts.capacities` (libbpf `set_max_entries`
/// before load). An already pinned map is reused with its own capacity
/// even if another is asked for, and reported in
/// [`Installed::capacity_kept`]: adopting keeps every programmed service and
/// tracked flow across a restart, and a resize would have to recreate the
/// map (dropping them), which is the operator's call, not a restart's. A
/// capacity difference alone therefore never retires a map in an upgrade;
/// a map retired for its layout is re-created with the asked capacity.
pub fn install(opts: &InstallOptions) -> Result<Installed, InstallError> {
    system::ensure_bpffs()?;
    if !system::is_under_bpffs(&opts.pin_dir) {
        return Err(InstallError::PinDirNotBpffs(opts.pin_dir.clone()));
    }
    let links_dir = opts.pin_dir.join("links");
    std::fs::create_dir_all(&links_dir).map_err(|source| InstallError::PinDir { path: links_dir.clone(), source })?;
    let found = pinned_layout(&opts.pin_dir);
    let adopted = found.is_some();

    let mut storage = MaybeUninit::uninit();
    let mut open = SockSkelBuilder::default().open(&mut storage).map_err(lb("opening the socket BPF object"))?;
    // Capacities first, so the wanted shapes are what this install creates; a
    // pinned map keeps its own (a capacity alone never retires a map).
    let mut capacity_kept = Vec::new();
    let compiled = size_maps(map_list!(open.maps).into(), &opts.pin_dir, &opts.capacities, &mut capacity_kept)?;
    let upgrade = plan_upgrade(found, LAYOUT, CHANGED_IN, CARRY, &pinned_shapes(&opts.pin_dir), &wanted_shapes(&open));
    let retired_dir = opts.pin_dir.join("retired");
    let (migrated_from, retired, copy) = match upgrade {
        Upgrade::Refuse { found } => {
            return Err(InstallError::NewerLayout { pin_dir: opts.pin_dir.clone(), found, ours: LAYOUT });
        }
        Upgrade::Migrate { from, retire, copy } => {
            // A retired map is created anew: with the asked capacity, not the pinned one.
            resize_retired(map_list!(open.maps).into(), &retire, &opts.capacities, &compiled)?;
            capacity_kept.retain(|k| !retire.contains(&k.map));
            move_pins(&opts.pin_dir, &retired_dir, &retire)?;
            (Some(from), retire, copy)
        }
        Upgrade::Fresh | Upgrade::Adopt => (None, Vec::new(), Vec::new()),
    };
    // Load both objects (the verifier) before any link is switched; a
    // failure puts the retired pins back, so the old datapath stays whole.
    let loaded = (|| {
        set_pin_paths(map_list!(open.maps).into(), &opts.pin_dir)?;
        let skel = open.load().map_err(lb("loading the socket BPF programs (verifier)"))?;
        let mut tc_storage = MaybeUninit::uninit();
        let tc = if opts.devices.is_empty() {
            None
        } else {
            let mut open_tc =
                NetdevSkelBuilder::default().open(&mut tc_storage).map_err(lb("opening the tc BPF object"))?;
            pin_netdev_maps(&mut open_tc, &opts.pin_dir)?;
            Some(open_tc.load().map_err(lb("loading the tc BPF programs (verifier)"))?)
        };
        // The new maps exist now and no program uses them yet: copy the
        // entries the new layout must keep, so the new programs start with
        // every tracked flow (a failure leaves the old datapath serving).
        let first = carry_all(&copy, &retired_dir, &opts.pin_dir, false)?;
        let lent = tc
            .as_ref()
            .and_then(|t| crate::migrate::lend_retired(&t.maps.ferry_ct_prev, &copy, &retired_dir, &opts.pin_dir));
        fast_pass_off(&opts.pin_dir)?;
        let attached = attach_all(opts, &links_dir, &skel, tc.as_ref())?;
        // The old programs ran until the switch: a flow they created during
        // the first copy is added now (nothing the new programs wrote is
        // overwritten). A failure here cannot be undone: those flows are
        // balanced again, which the log says.
        let mut carried = match carry_all(&copy, &retired_dir, &opts.pin_dir, true) {
            Ok(late) => first.into_iter().zip(late).map(|(f, l)| crate::migrate::merge(f, &l)).collect(),
            Err(e) => {
                tracing::warn!("{e} (after the links switched: flows created during the copy are balanced again)");
                first
            }
        };
        if let (Some(before), Some(t)) = (lent, tc.as_ref()) {
            let adopted = crate::migrate::take_back(&t.maps.ferry_ct_prev, before, &opts.pin_dir);
            if let Some(c) = carried.iter_mut().find(|c| c.map == "ferry_ct") {
                c.adopted = adopted;
            }
        }
        // Recorded last: a failure above leaves the old version in place.
        write_layout(&opts.pin_dir, LAYOUT)?;
        Ok((attached, carried))
    })();
    let ((updated, attached, (devices, accelerated, xdp_fallbacks)), carried) = match loaded {
        Ok(r) => r,
        Err(e) => {
            if !retired.is_empty() {
                for name in &retired {
                    let _ = std::fs::remove_file(opts.pin_dir.join(name));
                }
                let _ = move_pins(&retired_dir, &opts.pin_dir, &retired);
                let _ = std::fs::remove_dir(&retired_dir);
            }
            return Err(e);
        }
    };
    // The links hold the new programs now: the retired maps go with the old ones.
    for name in &retired {
        let _ = std::fs::remove_file(retired_dir.join(name));
    }
    let _ = std::fs::remove_dir(&retired_dir);
    let maps = Maps::open(&opts.pin_dir)?;
    Ok(Installed {
        maps,
        adopted,
        migrated_from,
        retired,
        carried,
        links_updated: updated,
        links_attached: attached,
        devices,
        accelerated,
        xdp_fallbacks,
        capacity_kept,
    })
}

/// Turns the pass-through fast path off in the pinned config before any
/// link switches. The new programs may find pass-through sets this install
/// created empty (an upgrade from a layout without them, or a datapath an
/// older layout's agent served after a newer one had turned the flag on);
/// with the flag on they would wave every packet through. The agent turns it
/// on again once it has filled them (`crate::pass`); until then every packet
/// takes the full path, which is always correct.
fn fast_pass_off(pin_dir: &Path) -> Result<(), InstallError> {
    let Ok(config) = MapHandle::from_pinned_path(pin_dir.join("ferry_config")) else { return Ok(()) };
    let key = 0u32.to_ne_bytes();
    let Ok(Some(mut value)) = config.lookup(&key, MapFlags::ANY) else { return Ok(()) };
    let at = std::mem::offset_of!(crate::skel::sock::types::config, flags);
    if value.get(at).is_some_and(|f| f & crate::entries::CFG_FAST_PASS != 0) {
        value[at] &= !crate::entries::CFG_FAST_PASS;
        config.update(&key, &value, MapFlags::ANY).map_err(lb("turning the fast path off in ferry_config"))?;
    }
    Ok(())
}

/// Runs every copy of a migration ([`crate::migrate`]); `late`: the pass after the links switched.
fn carry_all(
    copy: &[(String, Migration)],
    retired_dir: &Path,
    pin_dir: &Path,
    late: bool,
) -> Result<Vec<Carried>, InstallError> {
    copy.iter()
        .map(|(map, m)| {
            crate::migrate::carry(*m, map, retired_dir, pin_dir, late)
                .map_err(|source| InstallError::Migrate { map: map.clone(), source })
        })
        .collect()
}

/// Attaches (or swaps in place) every link, socket programs first.
fn attach_all(
    opts: &InstallOptions,
    links_dir: &Path,
    skel: &crate::skel::sock::SockSkel,
    tc: Option<&crate::skel::netdev::NetdevSkel>,
) -> Result<(usize, usize, DevicesAttached), InstallError> {
    let cg = std::fs::File::open(&opts.cgroup)
        .map_err(|source| InstallError::Cgroup { path: opts.cgroup.clone(), source })?;
    let progs = &skel.progs;
    let all: [(&str, &ProgramMut); 9] = [
        ("connect4", &progs.ferry_connect4),
        ("sendmsg4", &progs.ferry_sendmsg4),
        ("recvmsg4", &progs.ferry_recvmsg4),
        ("getpeername4", &progs.ferry_getpeername4),
        ("connect6", &progs.ferry_connect6),
        ("sendmsg6", &progs.ferry_sendmsg6),
        ("recvmsg6", &progs.ferry_recvmsg6),
        ("getpeername6", &progs.ferry_getpeername6),
        ("release", &progs.ferry_sock_release),
    ];
    let (mut updated, mut attached) = (0, 0);
    for (name, prog) in all {
        if attach_cgroup(prog, cg.as_raw_fd(), &opts.cgroup, &links_dir.join(format!("sock_{name}")))? {
            updated += 1;
        } else {
            attached += 1;
        }
    }
    let devices = attach_devices(opts, links_dir, tc, &mut updated, &mut attached)?;
    Ok((updated, attached, devices))
}

/// Loads the tcx programs with their maps pinned in `pin_dir` (created if
/// missing), attached nowhere: for driving them with `BPF_PROG_TEST_RUN`
/// (`crates/ferry-bpf/tests/packet.rs`). Needs root; Linux 6.6+ (tcx).
///
/// ```no_run
/// let mut storage = std::mem::MaybeUninit::uninit();
/// let skel = ferry_bpf::install::load_packet_programs(&mut storage, "/sys/fs/bpf/ferry-test".as_ref())?;
/// let maps = ferry_bpf::Maps::open("/sys/fs/bpf/ferry-test".as_ref())?;
/// # let _ = (skel, maps);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_packet_programs<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pin_dir: &Path,
) -> Result<crate::skel::netdev::NetdevSkel<'obj>, InstallError> {
    system::ensure_bpffs()?;
    if !system::is_under_bpffs(pin_dir) {
        return Err(InstallError::PinDirNotBpffs(pin_dir.to_path_buf()));
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| InstallError::PinDir { path: pin_dir.to_path_buf(), source })?;
    let mut open = NetdevSkelBuilder::default().open(storage).map_err(lb("opening the tc BPF object"))?;
    pin_netdev_maps(&mut open, pin_dir)?;
    open.load().map_err(lb("loading the tc BPF programs (verifier)"))
}

pub(crate) fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// A link pinned at `pin` that is still attached where `on_device` says:
/// `prog` is swapped in place (true), so packets never meet a moment
/// without a program. Any other link there is detached and its pin removed
/// (false: the caller attaches anew).
fn swap_pinned_link(
    pin: &Path,
    prog: &ProgramMut,
    on_device: impl Fn(&libbpf_rs::query::LinkTypeInfo) -> bool,
) -> bool {
    if !pin.exists() {
        return false;
    }
    if let Ok(mut link) = Link::open(pin) {
        let here = link.info().is_ok_and(|i| on_device(&i.info));
        if here && link.update_prog(prog).is_ok() {
            return true;
        }
        let _ = link.detach();
        let _ = link.unpin();
    }
    let _ = std::fs::remove_file(pin);
    false
}

/// Attaches `prog` at tcx `ingress`/egress of `ifindex` through a link pinned at `pin`.
fn attach_tcx(prog: &ProgramMut, ifindex: u32, pin: &Path) -> Result<bool, InstallError> {
    let on_device = |i: &libbpf_rs::query::LinkTypeInfo| matches!(i, libbpf_rs::query::LinkTypeInfo::Tcx(t) if t.ifindex == ifindex);
    if swap_pinned_link(pin, prog, on_device) {
        return Ok(true);
    }
    let mut link = attach_tcx_unpinned(prog, ifindex)?;
    link.pin(pin).map_err(lb(format!("pinning link {}", pin.display())))?;
    Ok(false)
}

/// Attaches `prog` at tcx on `ifindex` (of this thread's network namespace)
/// without pinning the link: the program is detached when the link is
/// dropped. The agent pins what it attaches; benchmarks switch the packet
/// programs on and off with this.
pub fn attach_tcx_unpinned(prog: &ProgramMut, ifindex: u32) -> Result<Link, InstallError> {
    let opts =
        libbpf_sys::bpf_tcx_opts { sz: std::mem::size_of::<libbpf_sys::bpf_tcx_opts>() as _, ..Default::default() };
    // SAFETY: the program pointer is valid for the skeleton's lifetime; libbpf
    // returns a new link or NULL (errno set). libbpf-rs has no safe tcx wrapper.
    let raw = unsafe { libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), ifindex as i32, &opts) };
    let Some(ptr) = std::ptr::NonNull::new(raw) else {
        return Err(InstallError::Libbpf {
            step: format!("attaching tcx program to ifindex {ifindex}"),
            source: libbpf_rs::Error::from(std::io::Error::last_os_error()),
        });
    };
    // SAFETY: `ptr` is a valid, owned bpf_link from libbpf.
    Ok(unsafe { Link::from_ptr(ptr) })
}

/// The devices carrying the per-packet programs, the names of those whose
/// XDP program is attached too, and those best-effort left to tc.
type DevicesAttached = (Vec<AttachedDevice>, Vec<String>, Vec<crate::acceleration::Fallback>);

fn attach_devices(
    opts: &InstallOptions,
    links_dir: &Path,
    tc: Option<&crate::skel::netdev::NetdevSkel>,
    updated: &mut usize,
    attached: &mut usize,
) -> Result<DevicesAttached, InstallError> {
    let mut wanted = std::collections::BTreeSet::new();
    let mut devices = Vec::new();
    let mut accelerated = Vec::new();
    let mut fallbacks = Vec::new();
    if let Some(skel) = tc {
        // The defrag loop first: the device programs send fragments into it as soon as they run.
        if !opts.defrag_loop {
            drop_defrag_loop(links_dir);
        } else if attach_defrag_loop(skel, links_dir, updated, attached)? {
            wanted.insert(LOOP_LINK.to_string());
        }
        for (name, role) in &opts.devices {
            let idx = ifindex(name).ok_or_else(|| InstallError::NoDevice(name.clone()))?;
            let mut progs: Vec<(&str, &ProgramMut)> = vec![match role {
                DeviceRole::External => ("in", &skel.progs.ferry_from_netdev),
                DeviceRole::Pod => ("in", &skel.progs.ferry_from_pods),
            }];
            if *role == DeviceRole::External {
                progs.push(("out", &skel.progs.ferry_to_netdev));
            }
            for (dir, prog) in progs {
                let file = format!("tcx_{}_{}_{dir}", role.tag(), name);
                wanted.insert(file.clone());
                if attach_tcx(prog, idx, &links_dir.join(&file))? {
                    *updated += 1;
                } else {
                    *attached += 1;
                }
            }
            if *role == DeviceRole::External && opts.acceleration != Acceleration::Disabled {
                let file = crate::acceleration::xdp_link_file(name);
                match attach_xdp(&skel.progs.ferry_xdp, name, idx, &links_dir.join(&file)) {
                    Ok(swapped) => {
                        wanted.insert(file);
                        accelerated.push(name.clone());
                        if swapped {
                            *updated += 1;
                        } else {
                            *attached += 1;
                        }
                    }
                    Err(e) if opts.acceleration == Acceleration::BestEffort => {
                        tracing::warn!(
                            device = %name,
                            "acceleration best-effort: no XDP in driver mode on {name} ({e}); this device runs on tc only"
                        );
                        fallbacks.push(crate::acceleration::Fallback { device: name.clone(), reason: e.to_string() });
                    }
                    Err(e) => return Err(e),
                }
            }
            devices.push(AttachedDevice { name: name.clone(), ifindex: idx, role: *role });
        }
    }
    // Devices no longer configured lose their programs.
    if let Ok(entries) = std::fs::read_dir(links_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with("tcx_") || name.starts_with("xdp_")) && !wanted.contains(&name) {
                if let Ok(mut link) = Link::open(e.path()) {
                    let _ = link.detach();
                    let _ = link.unpin();
                }
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok((devices, accelerated, fallbacks))
}

/// Attaches `prog` as the XDP program of `ifindex` in driver mode through a
/// link pinned at `pin`, or swaps the program inside an existing pinned link
/// on the same device (a restart: no packet sees a device without it).
/// Returns whether an existing link was swapped. Driver mode only: generic
/// XDP runs after the skb is made and would cost more than tc alone.
fn attach_xdp(prog: &ProgramMut, device: &str, ifindex: u32, pin: &Path) -> Result<bool, InstallError> {
    let on_device = |i: &libbpf_rs::query::LinkTypeInfo| matches!(i, libbpf_rs::query::LinkTypeInfo::Xdp(x) if x.ifindex == ifindex);
    if swap_pinned_link(pin, prog, on_device) {
        return Ok(true);
    }
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        flags: libbpf_sys::XDP_FLAGS_DRV_MODE,
        ..Default::default()
    };
    let step = || {
        format!(
            "attaching the XDP program to {device} in driver mode (acceleration; best-effort runs a device \
             without native XDP on tc only)"
        )
    };
    // SAFETY: a valid program fd; libbpf returns a new link fd or a negative errno.
    // libbpf-rs has no driver-mode XDP link (its attach_xdp lets the kernel pick generic mode).
    let fd =
        unsafe { libbpf_sys::bpf_link_create(prog.as_fd().as_raw_fd(), ifindex as i32, libbpf_sys::BPF_XDP, &opts) };
    if fd < 0 {
        return Err(InstallError::Libbpf { step: step(), source: libbpf_rs::Error::from_raw_os_error(-fd) });
    }
    // SAFETY: `fd` is a new link fd this function owns.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let c = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).map_err(|_| InstallError::PinDir {
        path: pin.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: a valid fd and NUL-terminated path.
    let rc = unsafe { libbpf_sys::bpf_obj_pin(link.as_raw_fd(), c.as_ptr()) };
    if rc < 0 {
        return Err(InstallError::Libbpf {
            step: format!("pinning link {}", pin.display()),
            source: libbpf_rs::Error::from_raw_os_error(-rc),
        });
    }
    // The pin holds the link (and the program on the device) from here on.
    Ok(false)
}

/// The pinned link of `ferry_from_loop` on the defrag loop's node end.
const LOOP_LINK: &str = "tcx_loop_in";

/// Creates or adopts this node's defrag loop ([`crate::defrag_loop`]),
/// attaches `ferry_from_loop` to its node end and `ferry_defrag_note` in its
/// namespace, and tells the tc programs where it is (`ferry_loop`). Without
/// a loop (it could not be made: logged) the programs count what would have
/// gone there as before (`frag_miss`, `drop_unsupported`). Returns whether
/// the loop is in use.
fn attach_defrag_loop(
    skel: &crate::skel::netdev::NetdevSkel,
    links_dir: &Path,
    updated: &mut usize,
    attached: &mut usize,
) -> Result<bool, InstallError> {
    let ready = crate::defrag_loop::ensure().and_then(|l| {
        crate::defrag_loop::attach_note(&skel.progs.ferry_defrag_note, &l.netns, links_dir)?;
        Ok(l)
    });
    let lp = match ready {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "{e}; running without the defrag loop: fragments it would reassemble are counted (frag_miss, drop_unsupported) and passed or dropped"
            );
            detach_loop_note(links_dir);
            return Ok(false);
        }
    };
    if attach_tcx(&skel.progs.ferry_from_loop, lp.ifindex, &links_dir.join(LOOP_LINK))? {
        *updated += 1;
    } else {
        *attached += 1;
    }
    skel.maps
        .ferry_loop
        .update(&0u32.to_ne_bytes(), &lp.ifindex.to_ne_bytes(), MapFlags::ANY)
        .map_err(lb("writing ferry_loop"))?;
    tracing::info!(netns = %lp.netns, device = crate::defrag_loop::NODE_DEVICE, "defrag loop ready");
    Ok(true)
}

/// The netfilter links of the loop's note program go (their namespace may be gone already).
fn detach_loop_note(links_dir: &Path) {
    for file in ["nf_loop_v4", "nf_loop_v6"] {
        if let Ok(link) = Link::open(links_dir.join(file)) {
            let _ = link.detach();
        }
        let _ = std::fs::remove_file(links_dir.join(file));
    }
}

/// `bpf.defragLoop: false`: the loop an earlier install made goes (its tc
/// link is not wanted any more, so the caller's sweep detaches it).
fn drop_defrag_loop(links_dir: &Path) {
    detach_loop_note(links_dir);
    match crate::defrag_loop::remove() {
        Ok(Some(netns)) => tracing::info!(%netns, "defrag loop removed (bpf.defragLoop: false)"),
        Ok(None) => {}
        Err(e) => tracing::warn!("bpf.defragLoop is false, but the loop an earlier install made stays: {e}"),
    }
}

/// What `uninstall` removed.
#[derive(Debug, Default, Clone)]
pub struct Removed {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Detaches every link and removes every pin that ferry created under
/// `pin_dir`, and nothing else.
pub fn uninstall(pin_dir: &Path) -> Result<Removed, InstallError> {
    let mut removed = Removed::default();
    let links_dir = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links_dir) {
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(mut link) = Link::open(&path) {
                let _ = link.detach();
                let _ = link.unpin();
            }
            let _ = std::fs::remove_file(&path);
            removed.links.push(name);
        }
        let _ = std::fs::remove_dir(&links_dir);
    }
    // Maps of an older layout left by an interrupted migration.
    let retired = pin_dir.join("retired");
    if let Ok(entries) = std::fs::read_dir(&retired) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
            removed.maps.push(format!("retired/{}", e.file_name().to_string_lossy()));
        }
        let _ = std::fs::remove_dir(&retired);
    }
    for name in MAP_NAMES {
        let path = pin_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| InstallError::PinDir { path: path.clone(), source })?;
            removed.maps.push(name.to_string());
        }
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}

/// Whether a datapath is installed in `pin_dir`.
pub fn is_installed(pin_dir: &Path) -> bool {
    pin_dir.join("ferry_frontends").exists()
}
