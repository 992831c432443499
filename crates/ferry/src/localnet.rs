//! `net.ipv4.conf.all.route_localnet`, set safely (CVE-2020-8558).
//!
//! NodePorts on 127.0.0.1 (`localhostNodePorts`, nftables datapath only)
//! need the kernel to route packets with loopback addresses off the host.
//! That switch also makes the node accept packets *to* 127.0.0.0/8 arriving
//! on any interface, so a neighbour could reach services bound to localhost.
//! ferry therefore (1) turns it on only after its nftables table holds the
//! guard rule (drop what is addressed to 127.0.0.0/8, did not come in on
//! `lo` and was not DNATed; the rule kube-proxy installs), and (2) remembers
//! the value it found, per network namespace, so `ferry cleanup` restores it.
//! The eBPF datapath never needs it.

use anyhow::Context;
use std::path::PathBuf;

const SYSCTL: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";
/// Where the value found before ferry changed it is kept (tmpfs: a reboot
/// resets both the sysctl and the record).
const STATE_DIR: &str = "/run/ferry";

/// The record of the previous value, one per network namespace.
fn state_file() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/self/ns/net").context("reading this network namespace's id")?;
    Ok(PathBuf::from(STATE_DIR).join(format!("route_localnet.{}", ns.ino())))
}

/// Turns route_localnet on, recording the value it had (only the first
/// time: a restarted agent must not record its own "1").
pub fn enable() -> anyhow::Result<()> {
    let record = state_file()?;
    if !record.exists() {
        let before = std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        std::fs::write(&record, before.trim()).with_context(|| format!("writing {}", record.display()))?;
    }
    std::fs::write(SYSCTL, "1").context("enabling net.ipv4.conf.all.route_localnet for localhostNodePorts")
}

/// Puts back the value recorded by [`enable`] in this network namespace;
/// returns it, or `None` when ferry never changed it here.
pub fn restore() -> anyhow::Result<Option<String>> {
    let record = state_file()?;
    let before = match std::fs::read_to_string(&record) {
        Ok(v) => v.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", record.display())),
    };
    if before != "0" && before != "1" {
        anyhow::bail!("{} holds {before:?}, not 0 or 1; set {SYSCTL} by hand", record.display());
    }
    std::fs::write(SYSCTL, &before).with_context(|| format!("restoring {SYSCTL} to {before}"))?;
    std::fs::remove_file(&record).with_context(|| format!("removing {}", record.display()))?;
    Ok(Some(before))
}

/// Whether a node configuration serves NodePorts on 127.0.0.1 (and so needs route_localnet).
pub fn needed(cfg: &ferry_model::NodeConfig) -> bool {
    let facts = ferry_model::plan::node_facts(&Default::default(), cfg);
    facts.node_port_addresses.iter().any(|a| a.is_loopback() && a.is_ipv4())
}
