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

pub use agent::counters_moved;
pub use traffic::{At, BackgroundClient, observed_in};

use anyhow::Context;
use ferry_sandbox::probe::ProbeCommand;
use ferry_sandbox::{Host, Sandbox};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Pod default gateway on every node's bridge (link-local, as Calico does, so
/// it can never collide with an address a test case uses).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

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
    /// Addresses on the node's uplink (eth0, on the fabric). The first of each
    /// family is the primary address.
    pub addresses: Vec<IpAddr>,
    pub primary_v4: Ipv4Addr,
    pub primary_v6: Ipv6Addr,
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

    /// Adds node `i` (its index) with fabric addresses 192.168.50.(10+i) and fd00:50::(10+i).
    pub fn add_node(&mut self, name: &str) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 168, 50, 10 + i as u8));
        let v6: IpAddr = format!("fd00:50::{:x}", 10 + i).parse().unwrap();
        self.add_node_with(name, &[v4, v6])
    }

    /// Adds a node whose uplink carries `addresses` (each as a host address;
    /// the first of each family is primary; both families are required).
    pub fn add_node_with(&mut self, name: &str, addresses: &[IpAddr]) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let primary_v4 = addresses
            .iter()
            .find_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                _ => None,
            })
            .context("a lab node needs an IPv4 address")?;
        let primary_v6 = addresses
            .iter()
            .find_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                _ => None,
            })
            .context("a lab node needs an IPv6 address")?;
        let host = self.sb.add_host(&format!("n{i}"))?;
        let cgroup = self.sb.cgroup(&format!("n{i}"))?;
        self.sb.set_forwarding(&host, true)?;
        // A node forwarding back out of its uplink (the lab routes everything via
        // the fabric) would send an ICMP redirect first, which uses up the peer's
        // ICMP rate-limit token: a REJECT right after it would never be sent.
        for dev in ["all", "default"] {
            self.sb.sysctl(&host, &format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
        }
        // Replies to pods may leave by another interface than requests came in (SNAT, hairpin).
        self.sb.sysctl(&host, "net.ipv4.conf.all.rp_filter", "0")?;
        self.sb.sysctl(&host, "net.ipv4.conf.default.rp_filter", "0")?;
        let port = format!("p{i}");
        self.sb.link(&host, "eth0", &self.fabric, &port)?;
        self.sb.attach_to_bridge(&self.fabric, &port, "fab0")?;
        let mut lines: Vec<String> = addresses
            .iter()
            .map(|a| {
                format!("addr add {a}/{} dev eth0{}", if v4(*a) { 32 } else { 128 }, if v4(*a) { "" } else { " nodad" })
            })
            .collect();
        lines.push(format!("addr add {GATEWAY_V4}/32 dev br0"));
        lines.push(format!("addr add {GATEWAY_V6}/64 dev br0 nodad"));
        self.sb.add_bridge(&host, "br0")?;
        self.sb.ip_batch(&host, &lines)?;
        // Existing nodes and external hosts reach this node on the fabric, and it reaches them.
        let mut here = Vec::new();
        for other in &self.nodes {
            let there: Vec<String> = addresses.iter().map(|a| format!("route replace {a} dev eth0")).collect();
            self.sb.ip_batch(&other.host, &there)?;
            here.extend(other.addresses.iter().map(|a| format!("route replace {a} dev eth0")));
            for p in &other.pods {
                here.extend(p.ips.iter().map(|ip| {
                    let via = if v4(*ip) { IpAddr::V4(other.primary_v4) } else { IpAddr::V6(other.primary_v6) };
                    format!("route replace {ip} via {via} dev eth0")
                }));
            }
        }
        for x in &self.externals {
            here.extend(x.ips.iter().map(|ip| format!("route replace {ip} dev eth0")));
        }
        self.sb.ip_batch(&host, &here)?;
        let dir = self.state.join(format!("node-{i}"));
        std::fs::create_dir_all(dir.join("manifests"))?;
        let pin_dir = PathBuf::from(ferry_bpf::system::BPFFS).join(format!("{}-n{i}", self.sb.id()));
        self.nodes.push(LabNode {
            name: name.to_string(),
            host,
            cgroup,
            pin_dir,
            addresses: addresses.to_vec(),
            primary_v4,
            primary_v6,
            manifests: dir.join("manifests"),
            config: dir.join("node.yaml"),
            agent: None,
            pods: Vec::new(),
        });
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
        // As the bridge CNI's hairpinMode: a pod reaching itself through a Service
        // (nftables DNAT on the node) gets its packet back out of the port it came in on.
        self.sb.ip(&n.host, &["link", "set", "dev", &peer, "type", "bridge_slave", "hairpin", "on"])?;
        let mut pod_lines = Vec::new();
        let mut node_lines = Vec::new();
        for ip in ips {
            let (len, src) = if v4(*ip) { (32, IpAddr::V4(n.primary_v4)) } else { (128, IpAddr::V6(n.primary_v6)) };
            pod_lines.push(format!("addr add {ip}/{len} dev eth0{}", if v4(*ip) { "" } else { " nodad" }));
            // The node talks to its pods from its primary address, not the link-local gateway.
            node_lines.push(format!("route replace {ip}/{len} dev br0 src {src}"));
        }
        if ips.iter().any(|ip| v4(*ip)) {
            pod_lines.push(format!("route add {GATEWAY_V4}/32 dev eth0"));
            pod_lines.push(format!("route add default via {GATEWAY_V4} dev eth0"));
        }
        if ips.iter().any(|ip| !v4(*ip)) {
            pod_lines.push(format!("route add default via {GATEWAY_V6} dev eth0"));
        }
        self.sb.ip_batch(&host, &pod_lines)?;
        self.sb.ip_batch(&n.host, &node_lines)?;
        // The other nodes reach this pod through its node (native routing).
        let (via4, via6) = (IpAddr::V4(n.primary_v4), IpAddr::V6(n.primary_v6));
        for (k, other) in self.nodes.iter().enumerate() {
            if k == node {
                continue;
            }
            let lines: Vec<String> = ips
                .iter()
                .map(|ip| format!("route replace {ip} via {} dev eth0", if v4(*ip) { via4 } else { via6 }))
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
        // Every node address is on the fabric; everything else goes through the gateway node.
        for n in &self.nodes {
            lines.extend(n.addresses.iter().map(|a| format!("route replace {a} dev eth0")));
        }
        lines.push(format!("route add default via {} dev eth0", g.primary_v4));
        lines.push(format!("route add default via {} dev eth0", g.primary_v6));
        self.sb.ip_batch(&host, &lines)?;
        // Every node answers it directly on the fabric.
        for n in &self.nodes {
            let lines: Vec<String> = ips.iter().map(|ip| format!("route replace {ip} dev eth0")).collect();
            self.sb.ip_batch(&n.host, &lines)?;
        }
        self.externals.push(LabExternal { name: name.to_string(), host, ips: ips.to_vec() });
        Ok(k)
    }

    /// Readies the lab for node `node`'s XDP acceleration (README, XDP
    /// acceleration): its uplink's peer (the fabric port) takes the frames
    /// XDP sends back out of the uplink (XDP_TX) only with GRO on
    /// (`Sandbox::veth_gro`), and every pod and external host sends complete
    /// checksums (`Sandbox::tx_checksum_off`; nodes too: host-network
    /// endpoints), as packets from a real
    /// network arrive: a veth's checksum left to offload would be wrong once
    /// XDP rewrote and sent the frame. Call it once the pods and external
    /// hosts are added.
    pub fn accelerate_fabric(&self, node: usize) -> anyhow::Result<()> {
        self.sb.veth_gro(&self.fabric, &format!("p{node}"))?;
        let pods = self.nodes.iter().flat_map(|n| n.pods.iter().map(|p| &p.host));
        let nodes = self.nodes.iter().map(|n| &n.host);
        for host in pods.chain(nodes).chain(self.externals.iter().map(|x| &x.host)) {
            self.sb.tx_checksum_off(host, "eth0")?;
        }
        Ok(())
    }

    /// Adds an address to a node (e.g. a load-balancer VIP configured locally).
    pub fn add_node_address(&mut self, node: usize, ip: IpAddr) -> anyhow::Result<()> {
        let len = if v4(ip) { 32 } else { 128 };
        self.sb.ip(&self.nodes[node].host, &["addr", "add", &format!("{ip}/{len}"), "dev", "lo"])?;
        Ok(())
    }

    /// Every address of a node as its config's `nodeIPs` should list them.
    pub fn node_ips(&self, node: usize) -> Vec<IpAddr> {
        self.nodes[node].addresses.clone()
    }

    /// Points a node's default routes at another host's address on the fabric
    /// (e.g. an external "world" host), so unmatched traffic has somewhere to go.
    pub fn set_default_route(&self, node: usize, via: &[IpAddr]) -> anyhow::Result<()> {
        let lines: Vec<String> = via.iter().map(|ip| format!("route replace default via {ip} dev eth0")).collect();
        self.sb.ip_batch(&self.nodes[node].host, &lines)?;
        Ok(())
    }

    /// The Node object of `node` as a manifest: its uplink addresses as
    /// `InternalIP`s and `pod_cidrs` as `spec.podCIDRs`. DSR finds a remote
    /// backend's node from these (`ferry_model::dsr::tunnels`).
    pub fn node_object(&self, node: usize, pod_cidrs: &[&str]) -> String {
        let n = &self.nodes[node];
        let addrs: Vec<String> =
            n.addresses.iter().map(|a| format!("{{type: InternalIP, address: \"{a}\"}}")).collect();
        let cidrs: Vec<String> = pod_cidrs.iter().map(|c| format!("\"{c}\"")).collect();
        format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDRs: [{}]}}\nstatus: {{addresses: [{}]}}\n",
            n.name,
            cidrs.join(", "),
            addrs.join(", ")
        )
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
            crate::agent::sync::remove_run_files(&n.pin_dir);
            // The node's defrag loop lives in a namespace of its own, which outlives the node's.
            if let Ok(meta) = std::fs::metadata(self.sb.netns_path(&n.host)) {
                use std::os::unix::fs::MetadataExt;
                let _ = ferry_bpf::defrag_loop::remove_for(meta.ino());
            }
        }
    }
}
