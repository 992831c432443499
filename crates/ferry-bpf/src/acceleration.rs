//! XDP acceleration as the kernel holds it: per external device of a pinned
//! datapath, whether ferry's XDP program runs there (its pinned link), in
//! which mode and as which program, for `ferry status` and `--verify`.

use libbpf_rs::Link;
use libbpf_rs::query::LinkTypeInfo;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file (under the pin directory's `links/`) of `device`'s XDP link.
pub fn xdp_link_file(device: &str) -> String {
    format!("xdp_ext_{device}")
}

/// An external device `best-effort` left to tc, and why its XDP attach failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub device: String,
    pub reason: String,
}

/// How the kernel runs an XDP program on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): what ferry attaches.
    Native,
    /// After the skb is made: never ferry's, and slower than tc alone.
    Generic,
    Offload,
    /// The device runs another program than the link's (or none).
    Other,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Offload => "offload",
            XdpMode::Other => "not this program",
        })
    }
}

/// A pinned XDP link of ferry's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdpLink {
    pub link_id: u32,
    pub program_id: u32,
    /// The device the link holds; 0 once the device is gone (the link is detached).
    pub ifindex: u32,
    /// As the device reports it; `None` when the device is not in this
    /// network namespace (the link's ifindex names another namespace's).
    pub mode: Option<XdpMode>,
}

impl XdpLink {
    /// The program runs on the device in driver mode (as far as this namespace can tell).
    pub fn runs_native(&self) -> bool {
        self.ifindex != 0 && self.mode.is_none_or(|m| m == XdpMode::Native)
    }
}

/// One external device of the datapath (it has a pinned tc link) or a
/// device with a pinned XDP link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceXdp {
    pub device: String,
    /// The device carries ferry's tc programs (an external device of the install).
    pub external: bool,
    pub xdp: Option<XdpLink>,
}

/// Every external device of the datapath in `pin_dir` and every pinned XDP
/// link, by device name, read from the pinned links.
pub fn devices(pin_dir: &Path) -> Vec<DeviceXdp> {
    let mut out: std::collections::BTreeMap<String, DeviceXdp> = Default::default();
    for e in std::fs::read_dir(pin_dir.join("links")).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(dev) = file.strip_prefix("tcx_ext_").and_then(|f| f.strip_suffix("_in")) {
            out.entry(dev.to_string())
                .or_insert_with(|| DeviceXdp { device: dev.to_string(), external: false, xdp: None })
                .external = true;
        } else if let Some(dev) = file.strip_prefix("xdp_ext_") {
            let xdp = read_link(&e.path(), dev);
            out.entry(dev.to_string())
                .or_insert_with(|| DeviceXdp { device: dev.to_string(), external: false, xdp: None })
                .xdp = xdp;
        }
    }
    out.into_values().collect()
}

fn read_link(pin: &Path, device: &str) -> Option<XdpLink> {
    let info = Link::open(pin).ok()?.info().ok()?;
    let LinkTypeInfo::Xdp(x) = info.info else { return None };
    let mode = (x.ifindex != 0 && crate::install::ifindex(device) == Some(x.ifindex))
        .then(|| mode_on(x.ifindex, info.prog_id))
        .flatten();
    Some(XdpLink { link_id: info.id, program_id: info.prog_id, ifindex: x.ifindex, mode })
}

/// How `ifindex` (of this namespace) runs program `prog_id`, from the kernel's own report.
fn mode_on(ifindex: u32, prog_id: u32) -> Option<XdpMode> {
    let mut q = libbpf_sys::bpf_xdp_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_xdp_query_opts>() as _,
        ..Default::default()
    };
    // SAFETY: a valid, sized options struct the call fills in.
    if unsafe { libbpf_sys::bpf_xdp_query(ifindex as i32, 0, &mut q) } < 0 {
        return None;
    }
    Some(if q.drv_prog_id == prog_id {
        XdpMode::Native
    } else if q.skb_prog_id == prog_id {
        XdpMode::Generic
    } else if q.hw_prog_id == prog_id {
        XdpMode::Offload
    } else {
        XdpMode::Other
    })
}
