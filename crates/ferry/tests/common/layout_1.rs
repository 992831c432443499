//! The previous release's datapath for tests: map layout 1's BPF objects,
//! built from the git history, and playing that release's install on a
//! pinned datapath (`upgrade.rs`, the disruption suite's upgrade and
//! downgrade steps). Included by `#[path]`: not a test of its own.

use libbpf_rs::{MapCore, MapFlags, MapHandle};
use std::io::Write;

/// The last commit whose `bpf/` is map layout 1 (one LRU `ferry_ct` of every
/// flow), before layout 2 split conntrack in two (34dd53a).
pub const LAYOUT_1_COMMIT: &str = "d849f56a5cfd8fff89782b69c07ce18a4155705f";

/// Writes the layout recorded in the pinned `ferry_meta`.
pub fn write_meta(pin_dir: &std::path::Path, layout: u32) {
    let meta = MapHandle::from_pinned_path(pin_dir.join("ferry_meta")).expect("ferry_meta");
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&layout.to_ne_bytes());
    meta.update(&0u32.to_ne_bytes(), &v, MapFlags::ANY).unwrap();
}

/// Builds the layout-1 socket and tc objects from `LAYOUT_1_COMMIT`'s `bpf/`
/// (git archive, then clang as `crates/ferry-bpf/build.rs` runs it) into `dir`.
pub fn build_layout_1(dir: &std::path::Path) -> [std::path::PathBuf; 2] {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let archive = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["archive", "--format=tar", LAYOUT_1_COMMIT, "bpf"])
        .output()
        .expect("running git archive");
    assert!(
        archive.status.success(),
        "the layout-1 datapath is built from commit {LAYOUT_1_COMMIT}, which this checkout lacks \
         (a shallow clone? fetch the history): {}",
        String::from_utf8_lossy(&archive.stderr)
    );
    let mut tar = std::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("running tar");
    tar.stdin.take().unwrap().write_all(&archive.stdout).unwrap();
    assert!(tar.wait().unwrap().success(), "unpacking the layout-1 sources");
    let maps_h = std::fs::read_to_string(dir.join("bpf/lib/maps.h")).unwrap();
    assert!(maps_h.contains("#define FERRY_LAYOUT 1\n"), "{LAYOUT_1_COMMIT} is not layout 1");
    // libbpf's headers, as libbpf-cargo gives them to the main build.
    let include = dir.join("include");
    std::fs::create_dir_all(include.join("bpf")).unwrap();
    for (name, text) in libbpf_sys::API_HEADERS {
        std::fs::write(include.join("bpf").join(name), text).unwrap();
    }
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    let (arch, multiarch) = match std::env::consts::ARCH {
        "x86_64" => ("x86", "x86_64-linux-gnu"),
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        other => panic!("unsupported architecture {other} for the BPF build"),
    };
    ["sock", "netdev"].map(|obj| {
        let out = dir.join(format!("{obj}.bpf.o"));
        let built = std::process::Command::new(&clang)
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(dir.join("bpf"))
            .arg(format!("-I/usr/include/{multiarch}"))
            .args(["-mcpu=v3", "-Wall", "-g", "-O2", "-target", "bpf", &format!("-D__TARGET_ARCH_{arch}"), "-c"])
            .arg(dir.join(format!("bpf/{obj}.bpf.c")))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("running {clang}: {e}"));
        assert!(
            built.status.success(),
            "building the layout-1 {obj} object: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        out
    })
}

/// How the layout-1 programs find their conntrack table.
#[derive(PartialEq)]
pub enum Conntrack {
    /// Created empty, as on a node that ran the previous release all along
    /// (the layout-2 conntrack pins go first).
    Fresh,
    /// Adopted as pinned, as the previous release's agent adopts a datapath
    /// that `ferry datapath downgrade` converted to layout 1.
    Adopted,
}

/// Puts a layout-1 datapath in place of the (stopped) agent's one,
/// as the previous release's install does: the layout-1 objects are loaded
/// against the pinned maps, every pinned link is switched to their programs,
/// and `ferry_meta` says 1. The service maps the agent programmed are
/// unchanged between the layouts and stay (the previous agent's first sync
/// would write them as they are).
pub fn serve_with_layout_1(pin_dir: &std::path::Path, objects: &[std::path::PathBuf; 2], ct: Conntrack) {
    if ct == Conntrack::Fresh {
        for name in ["ferry_ct", "ferry_ct_new"] {
            std::fs::remove_file(pin_dir.join(name)).unwrap();
        }
    }
    let mut loaded = Vec::new();
    for path in objects {
        let mut open = libbpf_rs::ObjectBuilder::default().open_file(path).expect("opening a layout-1 object");
        for mut map in open.maps_mut() {
            let name = map.name().to_string_lossy().into_owned();
            // Pinned by name as that release's install pinned them (its map list is this one
            // without ferry_ct_new); per-CPU scratch maps stay unpinned.
            if !ferry_bpf::maps::MAP_NAMES.contains(&name.as_str()) {
                continue;
            }
            // A pinned map is reused only with its own capacity.
            if let Ok(pinned) = MapHandle::from_pinned_path(pin_dir.join(&name)) {
                map.set_max_entries(pinned.max_entries()).unwrap();
            }
            map.set_pin_path(pin_dir.join(&name)).unwrap();
        }
        loaded.push(open.load().unwrap_or_else(|e| panic!("loading the layout-1 {}: {e}", path.display())));
    }
    let mut switched = 0;
    for e in std::fs::read_dir(pin_dir.join("links")).unwrap().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        // Layout 1 had no defrag loop: its links go, as an older agent would never have made them.
        if file == "tcx_loop_in" || file.starts_with("nf_loop_") {
            if let Ok(link) = libbpf_rs::Link::open(e.path()) {
                let _ = link.detach();
            }
            std::fs::remove_file(e.path()).unwrap();
            continue;
        }
        let prog = if let Some(hook) = file.strip_prefix("sock_") {
            if hook == "release" { "ferry_sock_release".to_string() } else { format!("ferry_{hook}") }
        } else if file.starts_with("tcx_ext_") && file.ends_with("_in") {
            "ferry_from_netdev".into()
        } else if file.starts_with("tcx_ext_") && file.ends_with("_out") {
            "ferry_to_netdev".into()
        } else if file.starts_with("tcx_pod_") {
            "ferry_from_pods".into()
        } else {
            panic!("unknown pinned link {file}");
        };
        let p = loaded
            .iter()
            .flat_map(|o| o.progs())
            .find(|p| p.name().to_string_lossy() == prog)
            .unwrap_or_else(|| panic!("the layout-1 objects have no program {prog}"));
        let mut link = libbpf_rs::Link::open(e.path()).unwrap();
        link.update_prog(&p).unwrap_or_else(|err| panic!("switching {file} to the layout-1 {prog}: {err}"));
        switched += 1;
    }
    assert!(switched >= 12, "only {switched} links switched to the layout-1 programs");
    write_meta(pin_dir, 1);
}
