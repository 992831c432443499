//! The NodePort lab: two nodes, each running a real `ferry run` agent on one
//! datapath, one backend pod on each node, and a client host outside the
//! cluster that reaches the pods directly (native routing) or through node-a's
//! NodePorts.
//!
//! ```text
//!  client 203.0.113.10 ──┐ fabric     routes: 10.244.1.0/24 via node-a, 10.244.2.0/24 via node-b,
//!                        │                    10.244.2.11 via node-a, node addresses on the fabric
//!  node-a 192.168.50.10 ─┤ eth0 ── br0 ── pod a 10.244.1.10 :8080          (endpoint of np-local,  NodePort 30080)
//!  node-b 192.168.50.11 ─┘ eth0 ── br0 ── pod b 10.244.2.10, .11 :8080     (endpoint of np-remote, NodePort 30081;
//!                                                                           a server on each address)
//!                            node-b: replies from 10.244.2.11 to the client go via node-a (source rule)
//! ```
//!
//! Both agents get the same manifests; the client only dials node-a's
//! NodePorts, so np-remote is DNATed and SNATed by node-a and forwarded to
//! node-b, and its replies come back through node-a. Pod b's second address
//! (10.244.2.11, not an endpoint of anything) is routed through node-a in both
//! directions: the same hops as the remote NodePort path, without translation.

use crate::conn::Arm;
use anyhow::Context;
use ferry::lab::Lab;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const NODE_A: usize = 0;
pub const NODE_B: usize = 1;
/// The outside client (external host 0).
pub const CLIENT: usize = 0;
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// What the pods listen on (every service's targetPort).
pub const TARGET_PORT: u16 = 8080;
pub const SERVICE_PORT: u16 = 80;
/// Servers exit on their own after this long, even if nothing kills them.
const SERVER_LIFETIME_S: u64 = 3600;

/// Which datapath both agents of a lab run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    /// `datapath: bpf` (the default): tc programs on eth0 and br0, socket hooks in the node's cgroup.
    Bpf,
    /// `datapath: nftables`: the tables ip/ip6 `ferry` in each node's netns.
    Nftables,
}

impl Datapath {
    pub fn name(self) -> &'static str {
        match self {
            Datapath::Bpf => "bpf",
            Datapath::Nftables => "nftables",
        }
    }

    /// The sandbox tag of this datapath's lab (at most 8 characters).
    fn tag(self) -> &'static str {
        match self {
            Datapath::Bpf => "npbpf",
            Datapath::Nftables => "npnft",
        }
    }
}

/// A backend pod: the only endpoint of one service. It runs one server per address.
#[derive(Debug, Clone, Copy)]
pub struct Pod {
    /// What its server answers (`pong <name> <peer>`).
    pub name: &'static str,
    pub node: usize,
    pub node_name: &'static str,
    pub ip: Ipv4Addr,
}

pub const POD_A: Pod = Pod { name: "a", node: NODE_A, node_name: "node-a", ip: Ipv4Addr::new(10, 244, 1, 10) };
pub const POD_B: Pod = Pod { name: "b", node: NODE_B, node_name: "node-b", ip: Ipv4Addr::new(10, 244, 2, 10) };
/// Pod b's second address, routed via node-a both ways (the same hops as the remote NodePort path).
pub const POD_B_VIA_A: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
/// node-b's routing table for replies from [`POD_B_VIA_A`].
const VIA_A_TABLE: &str = "100";

/// A NodePort service with one endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Svc {
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub node_port: u16,
    pub pod: Pod,
}

/// Its endpoint is on node-a, the node the client dials.
pub const LOCAL: Svc = Svc { name: "np-local", cluster_ip: Ipv4Addr::new(10, 96, 0, 10), node_port: 30080, pod: POD_A };
/// Its endpoint is on node-b: node-a forwards.
pub const REMOTE: Svc =
    Svc { name: "np-remote", cluster_ip: Ipv4Addr::new(10, 96, 0, 11), node_port: 30081, pod: POD_B };

impl Svc {
    fn yaml(&self) -> String {
        let Svc { name, cluster_ip, node_port, pod } = *self;
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  type: NodePort\n  \
             clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ipFamilies: [IPv4]\n  ipFamilyPolicy: SingleStack\n  \
             ports:\n  - {{name: http, port: {SERVICE_PORT}, protocol: TCP, targetPort: {TARGET_PORT}, nodePort: {node_port}}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-ipv4, namespace: bench, \
             labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nendpoints:\n\
             - {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: true}}}}\n\
             ports: [{{name: http, port: {TARGET_PORT}, protocol: TCP}}]\n",
            pod.ip, pod.node_name
        )
    }
}

/// The manifests both agents read: the two services and their endpoints.
pub fn manifests() -> String {
    [LOCAL, REMOTE].iter().map(Svc::yaml).collect()
}

/// Node config keys after the lab's own (name, addresses, pins, cgroup,
/// devices); `nat_port_range` (BPF SNAT ports, `FIRST-LAST`) if given.
pub fn node_config_extra(datapath: Datapath, node: usize, nat_port_range: Option<&str>) -> String {
    let mut extra = format!(
        "datapath: {}\nclusterCIDRs: [10.244.0.0/16]\npodCIDRs: [10.244.{}.0/24]\nserviceCIDRs: [10.96.0.0/16]\n",
        datapath.name(),
        node + 1
    );
    if let Some(range) = nat_port_range {
        extra.push_str(&format!("natPortRange: {range}\n"));
    }
    extra
}

/// One datapath's lab with both agents running.
pub struct NodePortLab {
    pub datapath: Datapath,
    pub lab: Lab,
}

impl NodePortLab {
    /// Builds the lab, starts the pods' servers and both agents, and checks the
    /// agents really run `datapath`.
    pub fn build(
        datapath: Datapath,
        ferry: &Path,
        self_exe: &Path,
        nat_port_range: Option<&str>,
    ) -> anyhow::Result<NodePortLab> {
        let mut lab = Lab::new(datapath.tag(), ferry).context("creating the lab")?;
        let a = lab.add_node("node-a")?;
        let b = lab.add_node("node-b")?;
        anyhow::ensure!((a, b) == (NODE_A, NODE_B), "the lab numbered its nodes {a}, {b}");
        let x = lab.add_external("client", &[IpAddr::V4(CLIENT_IP)], NODE_A)?;
        anyhow::ensure!(x == CLIENT, "the lab numbered the client {x}");
        // Direct routing: the client reaches each node's pods through that node.
        let node_a = lab.nodes[NODE_A].primary_v4;
        let mut routes: Vec<String> = [POD_A, POD_B]
            .iter()
            .map(|p| format!("route replace 10.244.{}.0/24 via {} dev eth0", p.node + 1, lab.nodes[p.node].primary_v4))
            .collect();
        routes.push(format!("route replace {POD_B_VIA_A}/32 via {node_a} dev eth0"));
        lab.sb.ip_batch(&lab.externals[CLIENT].host, &routes)?;
        for pod in [POD_A, POD_B] {
            let mut ips = vec![IpAddr::V4(pod.ip)];
            if pod.name == POD_B.name {
                ips.push(IpAddr::V4(POD_B_VIA_A));
            }
            let j = lab.add_pod(pod.node, pod.name, &ips)?;
            let host = lab.nodes[pod.node].pods[j].host.clone();
            let cgroup = lab.nodes[pod.node].cgroup.clone();
            // One server per address, so that no two consecutive connections of
            // the interleaved arms wait for the same single-threaded server.
            for ip in ips {
                let ready = lab.state.join(format!("{}-{ip}.ready", pod.name));
                let log = std::fs::File::create(lab.state.join(format!("{}-{ip}.log", pod.name)))?;
                let mut cmd = lab.sb.command(&host, self_exe);
                cmd.args(["serve", "--listen", &format!("{ip}:{TARGET_PORT}"), "--name", pod.name, "--tell-peer"])
                    .arg("--ready")
                    .arg(&ready)
                    .args(["--lifetime-s", &SERVER_LIFETIME_S.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log);
                let pid = lab.sb.spawn_in(&host, Some(&cgroup), cmd)?;
                lab.sb.wait_for_file(pid, &ready, Duration::from_secs(10))?;
            }
        }
        // node-b sends replies from pod b's second address back through node-a.
        lab.sb.ip_batch(
            &lab.nodes[NODE_B].host,
            &[
                format!("rule add from {POD_B_VIA_A}/32 lookup {VIA_A_TABLE} priority 100"),
                format!("route replace {CLIENT_IP}/32 via {node_a} dev eth0 table {VIA_A_TABLE}"),
            ],
        )?;
        let manifests = manifests();
        let nat = if datapath == Datapath::Bpf { nat_port_range } else { None };
        for node in [NODE_A, NODE_B] {
            lab.write_node_config(node, &node_config_extra(datapath, node, nat))?;
            lab.write_manifests(node, &manifests)?;
            lab.start_agent(node).with_context(|| format!("starting the {} agent of node {node}", datapath.name()))?;
        }
        let np = NodePortLab { datapath, lab };
        np.check_datapath()?;
        Ok(np)
    }

    /// Fails unless both agents programmed the datapath this lab is for (and not the other one).
    fn check_datapath(&self) -> anyhow::Result<()> {
        for node in [NODE_A, NODE_B] {
            let nft = self.lab.sb.run_in(
                &self.lab.nodes[node].host,
                None,
                Command::new("nft").args(["list", "table", "ip", "ferry"]),
            )?;
            let has_table =
                nft.status.success() && String::from_utf8_lossy(&nft.stdout).contains(&LOCAL.node_port.to_string());
            let has_pins = self.lab.nodes[node].pin_dir.exists();
            let want = (self.datapath == Datapath::Nftables, self.datapath == Datapath::Bpf);
            anyhow::ensure!(
                (has_table, has_pins) == want,
                "node {node} should run the {} datapath, but nftables table ip ferry with the NodePort: {has_table}, \
                 BPF pins: {has_pins}\n{}",
                self.datapath.name(),
                self.lab.agent_log(node)
            );
        }
        Ok(())
    }

    pub fn node_a_ip(&self) -> Ipv4Addr {
        self.lab.nodes[NODE_A].primary_v4
    }

    /// The arms, in the order the client interleaves them: each NodePort on
    /// node-a, then the same pods dialled by pod IP (the floors), and pod b
    /// dialled through node-a (the remote path's hops, untranslated).
    pub fn arms(&self) -> Vec<(Arm, ArmSpec)> {
        let node_a = IpAddr::V4(self.node_a_ip());
        let arm = |name: &str, addr: SocketAddr| Arm { name: name.to_string(), targets: vec![addr] };
        let pod_addr = |ip: Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), TARGET_PORT);
        vec![
            (arm(NODEPORT_LOCAL, SocketAddr::new(node_a, LOCAL.node_port)), ArmSpec { pod: POD_A, translated: true }),
            (arm(NODEPORT_REMOTE, SocketAddr::new(node_a, REMOTE.node_port)), ArmSpec { pod: POD_B, translated: true }),
            (arm(DIRECT_LOCAL, pod_addr(POD_A.ip)), ArmSpec { pod: POD_A, translated: false }),
            (arm(DIRECT_REMOTE, pod_addr(POD_B.ip)), ArmSpec { pod: POD_B, translated: false }),
            (arm(DIRECT_REMOTE_VIA_A, pod_addr(POD_B_VIA_A)), ArmSpec { pod: POD_B, translated: false }),
        ]
    }

    /// node-a's BPF datapath counters and SNATed flows (`ferry status --json`); nothing for nftables.
    pub fn status(&self) -> anyhow::Result<(std::collections::BTreeMap<String, u64>, u64)> {
        if self.datapath != Datapath::Bpf {
            return Ok(Default::default());
        }
        let out = Command::new(&self.lab.ferry)
            .args(["status", "--json", "--pin-dir"])
            .arg(&self.lab.nodes[NODE_A].pin_dir)
            .output()
            .context("running ferry status")?;
        anyhow::ensure!(out.status.success(), "ferry status failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading ferry status --json")?;
        let counters = serde_json::from_value(v["counters"].clone()).context("ferry status: counters")?;
        Ok((counters, v["natEntries"].as_u64().unwrap_or(0)))
    }
}

pub const NODEPORT_LOCAL: &str = "nodeport-local";
pub const NODEPORT_REMOTE: &str = "nodeport-remote";
pub const DIRECT_LOCAL: &str = "direct-local";
pub const DIRECT_REMOTE: &str = "direct-remote";
pub const DIRECT_REMOTE_VIA_A: &str = "direct-remote-via-a";

/// Which arm is compared with which floor: each NodePort arm with the pod it
/// leads to dialled directly, and the remote one also with the same hops untranslated.
pub const COMPARISONS: [(&str, &str); 3] =
    [(NODEPORT_LOCAL, DIRECT_LOCAL), (NODEPORT_REMOTE, DIRECT_REMOTE), (NODEPORT_REMOTE, DIRECT_REMOTE_VIA_A)];

/// What an arm expects.
#[derive(Debug, Clone)]
pub struct ArmSpec {
    /// The pod that must answer.
    pub pod: Pod,
    /// Goes through ferry (a NodePort); else the pod must see the client's own address.
    pub translated: bool,
}
