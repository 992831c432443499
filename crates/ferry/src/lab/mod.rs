//! The lab: a small cluster made of network namespaces, with ferry agents on
//! its nodes and pods that serve and send real traffic.
//!
//! ```text
//!  ext hosts ──┐
//!              fabric (L2 bridge, its own netns)
//!  node-0 eth0 ┘└ node-1 eth0 ...        one netns per node, one cgroup per node
//!     br0 (pod gateway)                   pods: one netns each, /32 (/128) addresses,
//!      ├ pod a  ├ pod b                   default route via the node's bridge
//! ```
//!
//! Nothing lives in the root namespace and no namespace has a route off the
//! machine. Pod processes run in their node's cgroup, so the node's agent
//! load-balances their sockets. Everything (netns, cgroups, bpffs pins) is
//! named `ferry-<tag>-<pid>-<seq>-*` and removed on drop, or by
//! `sweep_stale` after a crash.

mod agent;
mod traffic;

pub use traffic::At;

use anyhow::Context;
use ferry_sandbox::probe::ProbeCommand;
use ferry_sandbox::{Host, Sandbox};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// One node of the lab.
#[derive(Debug)]
pub struct LabNode {
    /// The Kubernetes node name.
    pub name: String,
    pub host: Host,
    /// The node's cgroup: its host processes and its pods run here.
    pub cgroup: PathBuf,
    /// Where this node's agent pins its datapath.
    pub pin_dir: PathBuf,
    pub fabric_v4: Ipv4Addr,
    pub fabric_v6: Ipv6Addr,
    /// Pod gateway addresses on the node's bridge.
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
    pub manifests: PathBuf,
    pub config: PathBuf,
    agent: Option<u32>,
    pub pods: Vec<LabPod>,
}

/// One pod.
#[derive(Debug)]
pub struct LabPod {
    pub name: String,
    pub host: Host,
    pub ips: Vec<IpAddr>,
}

/// A host outside the cluster, on the fabric.
#[derive(Debug)]
pub struct LabExternal {
    pub name: String,
    pub host: Host,
    pub ips: Vec<IpAddr>,
}

/// The lab; see the module documentation.
pub struct Lab {
    pub sb: Sandbox,
    pub ferry: PathBuf,
    pub probe: ProbeCommand,
    pub state: PathBuf,
    fabric: Host,
    pub nodes: Vec<LabNode>,
    pub externals: Vec<LabExternal>,
}

/// Removes what earlier labs of dead processes left behind: namespaces and
/// cgroups (ferry-sandbox) and bpffs pin directories (here).
pub fn sweep_stale() {
    let _ = ferry_sandbox::sweep_stale();
    let Ok(entries) = std::fs::read_dir(ferry_bpf::system::BPFFS) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(owned) = ferry_sandbox::naming::parse(&name)
            && !Path::new(&format!("/proc/{}", owned.owner_pid)).exists()
        {
            let _ = ferry_bpf::uninstall(&e.path());
        }
    }
}

fn v4(ip: IpAddr) -> bool {
    ip.is_ipv4()
}

impl Lab {
    /// An empty lab: just the fabric. `ferry` is the binary to run agents and probes with.
    pub fn new(tag: &str, ferry: &Path) -> anyhow::Result<Lab> {
        sweep_stale();
        let mut sb = Sandbox::new(tag)?;
        let state = sb.state_dir()?;
        let fabric = sb.add_host("fabric")?;
        sb.add_bridge(&fabric, "fab0")?;
        Ok(Lab {
            sb,
            ferry: ferry.to_path_buf(),
            probe: ProbeCommand::with_leading_args(ferry, &["probe"]),
            state,
            fabric,
            nodes: Vec::new(),
            externals: Vec::new(),
        })
    }

    /// Adds node `i` (its index): fabric address 192.168.50.(10+i) / fd00:50::(10+i),
    /// pod gateway 10.244.i.1 / fd00:244:0:i::1 on bridge br0.
    pub fn add_node(&mut self, name: &str) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let host = self.sb.add_host(&format!("n{i}"))?;
        let cgroup = self.sb.cgroup(&format!("n{i}"))?;
        self.sb.set_forwarding(&host, true)?;
        // Replies to pods may leave by another interface than requests came in (SNAT, hairpin).
        self.sb.sysctl(&host, "net.ipv4.conf.all.rp_filter", "0")?;
        self.sb.sysctl(&host, "net.ipv4.conf.default.rp_filter", "0")?;
        let fabric_v4 = Ipv4Addr::new(192, 168, 50, 10 + i as u8);
        let fabric_v6: Ipv6Addr = format!("fd00:50::{:x}", 10 + i).parse().unwrap();
        let gateway_v4 = Ipv4Addr::new(10, 244, i as u8, 1);
        let gateway_v6: Ipv6Addr = format!("fd00:244:0:{i:x}::1").parse().unwrap();
        let port = format!("p{i}");
        self.sb.link(&host, "eth0", &self.fabric, &port)?;
        self.sb.attach_to_bridge(&self.fabric, &port, "fab0")?;
        self.sb.add_address(&host, "eth0", &format!("{fabric_v4}/24"))?;
        self.sb.add_address(&host, "eth0", &format!("{fabric_v6}/64"))?;
        self.sb.add_bridge(&host, "br0")?;
        self.sb.add_address(&host, "br0", &format!("{gateway_v4}/32"))?;
        self.sb.add_address(&host, "br0", &format!("{gateway_v6}/128"))?;
        let dir = self.state.join(format!("node-{i}"));
        std::fs::create_dir_all(dir.join("manifests"))?;
        let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(format!("{}-n{i}", self.sb.id()));
        self.nodes.push(LabNode {
            name: name.to_string(),
            host,
            cgroup,
            pin_dir,
            fabric_v4,
            fabric_v6,
            gateway_v4,
            gateway_v6,
            manifests: dir.join("manifests"),
            config: dir.join("node.yaml"),
            agent: None,
            pods: Vec::new(),
        });
        // Every node reaches every other node's pods through that node (native routing).
        Ok(i)
    }

    /// Adds a pod with these addresses to `node`. Returns its index on the node.
    pub fn add_pod(&mut self, node: usize, name: &str, ips: &[IpAddr]) -> anyhow::Result<usize> {
        let j = self.nodes[node].pods.len();
        let host = self.sb.add_host(&format!("n{node}p{j}"))?;
        let n = &self.nodes[node];
        let peer = format!("v{j}");
        self.sb.link(&host, "eth0", &n.host, &peer)?;
        self.sb.attach_to_bridge(&n.host, &peer, "br0")?;
        let mut pod_lines = Vec::new();
        let mut node_lines = Vec::new();
        for ip in ips {
            let len = if v4(*ip) { 32 } else { 128 };
            pod_lines.push(format!("addr add {ip}/{len} dev eth0{}", if v4(*ip) { "" } else { " nodad" }));
            node_lines.push(format!("route replace {ip}/{len} dev br0"));
        }
        let has_v4 = ips.iter().any(|ip| v4(*ip));
        let has_v6 = ips.iter().any(|ip| !v4(*ip));
        if has_v4 {
            pod_lines.push(format!("route add {}/32 dev eth0", n.gateway_v4));
            pod_lines.push(format!("route add default via {} dev eth0", n.gateway_v4));
        }
        if has_v6 {
            pod_lines.push(format!("route add {}/128 dev eth0", n.gateway_v6));
            pod_lines.push(format!("route add default via {} dev eth0", n.gateway_v6));
        }
        self.sb.ip_batch(&host, &pod_lines)?;
        self.sb.ip_batch(&n.host, &node_lines)?;
        // The other nodes and external hosts reach this pod through its node.
        let (via4, via6) = (n.fabric_v4.to_string(), n.fabric_v6.to_string());
        for (k, other) in self.nodes.iter().enumerate() {
            if k == node {
                continue;
            }
            let lines: Vec<String> = ips
                .iter()
                .map(|ip| format!("route replace {ip} via {}", if v4(*ip) { &via4 } else { &via6 }))
                .collect();
            self.sb.ip_batch(&other.host, &lines)?;
        }
        self.nodes[node].pods.push(LabPod { name: name.to_string(), host, ips: ips.to_vec() });
        Ok(j)
    }

    /// Adds a host outside the cluster on the fabric, with these addresses,
    /// whose traffic goes to `gateway_node` (its default route).
    pub fn add_external(&mut self, name: &str, ips: &[IpAddr], gateway_node: usize) -> anyhow::Result<usize> {
        let k = self.externals.len();
        let host = self.sb.add_host(&format!("x{k}"))?;
        let port = format!("x{k}");
        self.sb.link(&host, "eth0", &self.fabric, &port)?;
        self.sb.attach_to_bridge(&self.fabric, &port, "fab0")?;
        let g = &self.nodes[gateway_node];
        let mut lines = Vec::new();
        for ip in ips {
            let len = if v4(*ip) { 32 } else { 128 };
            lines.push(format!("addr add {ip}/{len} dev eth0{}", if v4(*ip) { "" } else { " nodad" }));
        }
        lines.push(format!("route add {} dev eth0", g.fabric_v4));
        lines.push(format!("route add default via {} dev eth0", g.fabric_v4));
        lines.push(format!("route add {} dev eth0", g.fabric_v6));
        lines.push(format!("route add default via {} dev eth0", g.fabric_v6));
        self.sb.ip_batch(&host, &lines)?;
        // Every node answers it directly on the fabric.
        for n in &self.nodes {
            let lines: Vec<String> = ips.iter().map(|ip| format!("route replace {ip} dev eth0")).collect();
            self.sb.ip_batch(&n.host, &lines)?;
        }
        self.externals.push(LabExternal { name: name.to_string(), host, ips: ips.to_vec() });
        Ok(k)
    }

    /// Adds an address to a node (e.g. a load-balancer VIP configured locally).
    pub fn add_node_address(&mut self, node: usize, ip: IpAddr) -> anyhow::Result<()> {
        let len = if v4(ip) { 32 } else { 128 };
        self.sb.ip(&self.nodes[node].host, &["addr", "add", &format!("{ip}/{len}"), "dev", "lo"])?;
        Ok(())
    }

    /// Every address of a node as its config's `nodeIPs` should list them.
    pub fn node_ips(&self, node: usize) -> Vec<IpAddr> {
        let n = &self.nodes[node];
        vec![n.fabric_v4.into(), n.fabric_v6.into(), n.gateway_v4.into(), n.gateway_v6.into()]
    }

    pub fn node_host(&self, node: usize) -> &Host {
        &self.nodes[node].host
    }

    /// Runs `ip ...` in a host (debugging aid for tests).
    pub fn ip(&self, at: At, args: &[&str]) -> anyhow::Result<String> {
        let out = self.sb.ip(self.host(at), args).context("running ip")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(pid) = n.agent.take() {
                let _ = self.sb.kill(pid);
            }
            let _ = ferry_bpf::uninstall(&n.pin_dir);
        }
    }
}
