//! The NodePort lab: two nodes, each running a real `ferry run` agent on one
//! datapath (for BPF: in one `loadBalancing.mode` and one `acceleration`),
//! backend pods on node-b and node-a, and a client host outside the cluster
//! that reaches the pods directly (native routing) or through node-a's
//! NodePorts.
//!
//! ```text
//!  client 203.0.113.10 ──┐ fabric     routes: 10.244.1.0/24 via node-a, 10.244.2.0/24 via node-b,
//!                        │                    10.244.2.11, .12, .21 via node-a, node addresses on the fabric
//!  node-a 192.168.50.10 ─┤ eth0 ── br0 ── pod a 10.244.1.10 :8080          (endpoint of np-local,  NodePort 30080)
//!  node-b 192.168.50.11 ─┘ eth0 ── br0 ── pod b 10.244.2.10, .11, .12 :8080 (endpoint of np-remote, NodePort 30081;
//!                                 │                                          a server on each address)
//!                                 └───── pod c 10.244.2.20, .21 UDP 5300   (endpoint of np-udp, NodePort 30082;
//!                                                                           drops every datagram at its eth0)
//!          node-b: replies from 10.244.2.11 to the client go via node-a (source rule); from .12, straight to it
//! ```
//!
//! Both agents get the same manifests (with the Node objects, which DSR needs
//! to find node-b); the client only dials node-a's NodePorts, so np-remote is
//! DNATed by node-a and forwarded to node-b: with SNAT (its replies come back
//! through node-a), or with DSR (tunnelled; node-b answers the client
//! itself). Pod b's second address (10.244.2.11, not an endpoint of anything)
//! is routed through node-a in both directions: the same hops as the remote
//! NodePort path in SNAT mode, without translation; its third (10.244.2.12)
//! through node-a there and straight back: the hops of DSR, untranslated.
//! Pod c is the sink of the UDP flood (`super::flood`).

use crate::conn::Arm;
use anyhow::Context;
use ferry::lab::Lab;
use serde::{Deserialize, Serialize};
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

/// `loadBalancing.mode` of both agents of a BPF lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LbMode {
    /// Remote backends are SNATed by node-a; replies come back through it.
    Snat,
    /// Remote backends get the client's packets tunnelled (IPIP); node-b answers the client itself.
    Dsr,
}

impl LbMode {
    pub fn name(self) -> &'static str {
        match self {
            LbMode::Snat => "snat",
            LbMode::Dsr => "dsr",
        }
    }
}

/// `acceleration` of both agents of a BPF lab: the NodePort path at tc, or at XDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Acceleration {
    /// The tc programs only (ferry's default; the key is left out of the node config).
    Disabled,
    /// `acceleration: native`: NodePort traffic from outside handled at XDP on eth0 (veth supports native XDP).
    Native,
}

impl Acceleration {
    pub fn name(self) -> &'static str {
        match self {
            Acceleration::Disabled => "disabled",
            Acceleration::Native => "native",
        }
    }
}

/// What both agents of one lab run: a datapath, and for BPF a mode and an acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    pub datapath: Datapath,
    pub lb_mode: LbMode,
    pub acceleration: Acceleration,
}

impl Variant {
    /// `bpf`, `bpf-dsr`, `bpf-xdp`, `bpf-dsr-xdp`, `nftables`.
    pub fn name(&self) -> String {
        let mut n = self.datapath.name().to_string();
        if self.lb_mode == LbMode::Dsr {
            n.push_str("-dsr");
        }
        if self.acceleration == Acceleration::Native {
            n.push_str("-xdp");
        }
        n
    }

    /// The sandbox tag of this variant's lab (at most 8 characters).
    fn tag(&self) -> String {
        match self.datapath {
            Datapath::Nftables => "npnft".into(),
            Datapath::Bpf => format!(
                "np{}{}",
                if self.lb_mode == LbMode::Dsr { "dsr" } else { "bpf" },
                if self.acceleration == Acceleration::Native { "x" } else { "" }
            ),
        }
    }

    /// Every combination asked for: nftables once (it has neither a mode nor XDP), BPF in each mode and acceleration.
    pub fn all(datapaths: &[Datapath], modes: &[LbMode], accelerations: &[Acceleration]) -> Vec<Variant> {
        let mut out = Vec::new();
        for dp in datapaths {
            match dp {
                Datapath::Nftables => {
                    out.push(Variant { datapath: *dp, lb_mode: LbMode::Snat, acceleration: Acceleration::Disabled })
                }
                Datapath::Bpf => {
                    for a in accelerations {
                        for m in modes {
                            out.push(Variant { datapath: *dp, lb_mode: *m, acceleration: *a });
                        }
                    }
                }
            }
        }
        out
    }
}

/// Which datapath both agents of a lab run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
/// Pod b's third address: routed via node-a towards it, its replies straight to the client (DSR's hops).
pub const POD_B_DSR_HOPS: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 12);
/// The UDP sink on node-b (its address dialled directly, via node-b).
pub const POD_C: Pod = Pod { name: "c", node: NODE_B, node_name: "node-b", ip: Ipv4Addr::new(10, 244, 2, 20) };
/// Pod c's second address, routed via node-a (plain forwarding by the balancing node, untranslated).
pub const POD_C_VIA_A: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 21);
/// What pod c's sink drops (np-udp's targetPort).
pub const UDP_TARGET_PORT: u16 = 5300;
/// node-b's routing table for replies from [`POD_B_VIA_A`].
const VIA_A_TABLE: &str = "100";

/// A NodePort service with one endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Svc {
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub node_port: u16,
    pub pod: Pod,
    /// `TCP` (port 80 -> 8080) or `UDP` (port 53 -> 5300).
    pub protocol: &'static str,
}

/// Its endpoint is on node-a, the node the client dials.
pub const LOCAL: Svc =
    Svc { name: "np-local", cluster_ip: Ipv4Addr::new(10, 96, 0, 10), node_port: 30080, pod: POD_A, protocol: "TCP" };
/// Its endpoint is on node-b: node-a forwards.
pub const REMOTE: Svc =
    Svc { name: "np-remote", cluster_ip: Ipv4Addr::new(10, 96, 0, 11), node_port: 30081, pod: POD_B, protocol: "TCP" };
/// The UDP flood's NodePort: its endpoint is pod c on node-b.
pub const UDP_REMOTE: Svc =
    Svc { name: "np-udp", cluster_ip: Ipv4Addr::new(10, 96, 0, 12), node_port: 30082, pod: POD_C, protocol: "UDP" };

impl Svc {
    fn yaml(&self) -> String {
        let Svc { name, cluster_ip, node_port, pod, protocol } = *self;
        let (port, target) = if protocol == "UDP" { (53, UDP_TARGET_PORT) } else { (SERVICE_PORT, TARGET_PORT) };
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  type: NodePort\n  \
             clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ipFamilies: [IPv4]\n  ipFamilyPolicy: SingleStack\n  \
             ports:\n  - {{name: p, port: {port}, protocol: {protocol}, targetPort: {target}, nodePort: {node_port}}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-ipv4, namespace: bench, \
             labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nendpoints:\n\
             - {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: true}}}}\n\
             ports: [{{name: p, port: {target}, protocol: {protocol}}}]\n",
            pod.ip, pod.node_name
        )
    }
}

/// The services and their endpoints both agents read (the lab adds the Node objects).
pub fn manifests() -> String {
    [LOCAL, REMOTE, UDP_REMOTE].iter().map(Svc::yaml).collect()
}

/// Node config keys after the lab's own (name, addresses, pins, cgroup,
/// devices); `nat_port_range` (BPF SNAT ports, `FIRST-LAST`) if given.
pub fn node_config_extra(variant: &Variant, node: usize, nat_port_range: Option<&str>) -> String {
    let mut extra = format!(
        "datapath: {}\nclusterCIDRs: [10.244.0.0/16]\npodCIDRs: [10.244.{}.0/24]\nserviceCIDRs: [10.96.0.0/16]\n",
        variant.datapath.name(),
        node + 1
    );
    if variant.datapath == Datapath::Bpf {
        extra.push_str(&format!("loadBalancing: {{mode: {}}}\n", variant.lb_mode.name()));
        if let Some(range) = nat_port_range {
            extra.push_str(&format!("natPortRange: {range}\n"));
        }
        // Left out when disabled, so the bench also runs on a ferry without the key.
        if variant.acceleration != Acceleration::Disabled {
            extra.push_str(&format!("acceleration: {}\n", variant.acceleration.name()));
        }
    }
    extra
}

/// One variant's lab with both agents running.
pub struct NodePortLab {
    pub variant: Variant,
    pub lab: Lab,
}

impl NodePortLab {
    /// Builds the lab, starts the pods' servers and sink and both agents, and
    /// checks the agents really run the variant's datapath.
    pub fn build(
        variant: Variant,
        ferry: &Path,
        self_exe: &Path,
        nat_port_range: Option<&str>,
        pin_cpu: Option<usize>,
    ) -> anyhow::Result<NodePortLab> {
        let mut lab = Lab::new(&variant.tag(), ferry).context("creating the lab")?;
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
        for via_a in [POD_B_VIA_A, POD_B_DSR_HOPS, POD_C_VIA_A] {
            routes.push(format!("route replace {via_a}/32 via {node_a} dev eth0"));
        }
        lab.sb.ip_batch(&lab.externals[CLIENT].host, &routes)?;
        for pod in [POD_A, POD_B] {
            let mut ips = vec![IpAddr::V4(pod.ip)];
            if pod.name == POD_B.name {
                ips.extend([IpAddr::V4(POD_B_VIA_A), IpAddr::V4(POD_B_DSR_HOPS)]);
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
                    .args(pin_cpu.map(|c| format!("--cpu={c}")))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log);
                let pid = lab.sb.spawn_in(&host, Some(&cgroup), cmd)?;
                lab.sb.wait_for_file(pid, &ready, Duration::from_secs(10))?;
            }
        }
        // Pod c drops the flood's datagrams as they arrive (nftables ingress hook
        // of its eth0), before any socket lookup: the sink costs next to nothing.
        let j = lab.add_pod(POD_C.node, POD_C.name, &[IpAddr::V4(POD_C.ip), IpAddr::V4(POD_C_VIA_A)])?;
        let sink = format!(
            "table netdev ferry-sink {{\n  chain in {{\n    type filter hook ingress device eth0 priority 0;\n    \
             udp dport {UDP_TARGET_PORT} drop\n  }}\n}}\n"
        );
        let file = lab.state.join("sink.nft");
        std::fs::write(&file, sink)?;
        let host = lab.nodes[POD_C.node].pods[j].host.clone();
        let out = lab.sb.run_in(&host, None, Command::new("nft").arg("-f").arg(&file))?;
        anyhow::ensure!(out.status.success(), "pod c's sink: nft -f: {}", String::from_utf8_lossy(&out.stderr));
        // node-b sends replies from pod b's second address back through node-a
        // (its third: the default, straight to the client on the fabric).
        lab.sb.ip_batch(
            &lab.nodes[NODE_B].host,
            &[
                format!("rule add from {POD_B_VIA_A}/32 lookup {VIA_A_TABLE} priority 100"),
                format!("route replace {CLIENT_IP}/32 via {node_a} dev eth0 table {VIA_A_TABLE}"),
            ],
        )?;
        // DSR finds node-b (the tunnel's far end) from its Node object.
        let mut manifests = manifests();
        manifests.push_str(&lab.node_object(NODE_A, &["10.244.1.0/24"]));
        manifests.push_str(&lab.node_object(NODE_B, &["10.244.2.0/24"]));
        let nat = if variant.datapath == Datapath::Bpf { nat_port_range } else { None };
        if variant.acceleration == Acceleration::Native {
            // veth takes XDP's frames only with GRO on at the uplinks' fabric ends, and
            // XDP needs complete checksums from every sender (README, XDP acceleration).
            for node in [NODE_A, NODE_B] {
                lab.accelerate_fabric(node).context("readying the fabric for XDP")?;
            }
        }
        for node in [NODE_A, NODE_B] {
            lab.write_node_config(node, &node_config_extra(&variant, node, nat))?;
            lab.write_manifests(node, &manifests)?;
            lab.start_agent(node).with_context(|| format!("starting the {} agent of node {node}", variant.name()))?;
        }
        let np = NodePortLab { variant, lab };
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
            let want = (self.variant.datapath == Datapath::Nftables, self.variant.datapath == Datapath::Bpf);
            anyhow::ensure!(
                (has_table, has_pins) == want,
                "node {node} should run the {} datapath, but nftables table ip ferry with the NodePort: {has_table}, \
                 BPF pins: {has_pins}\n{}",
                self.variant.datapath.name(),
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
    /// dialled through node-a (the remote path's hops, untranslated: SNAT's
    /// with replies back through node-a, DSR's with replies straight to the client).
    pub fn arms(&self) -> Vec<(Arm, ArmSpec)> {
        let node_a = IpAddr::V4(self.node_a_ip());
        let arm = |name: &str, addr: SocketAddr| Arm { name: name.to_string(), targets: vec![addr] };
        let pod_addr = |ip: Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), TARGET_PORT);
        // With DSR the remote pod must see the client itself: the proof the tunnel carried it.
        let remote_sees = (self.variant.lb_mode == LbMode::Dsr).then_some(CLIENT_IP);
        let spec = |pod: Pod, translated: bool, sees: Option<Ipv4Addr>| ArmSpec { pod, translated, sees };
        vec![
            (arm(NODEPORT_LOCAL, SocketAddr::new(node_a, LOCAL.node_port)), spec(POD_A, true, None)),
            (arm(NODEPORT_REMOTE, SocketAddr::new(node_a, REMOTE.node_port)), spec(POD_B, true, remote_sees)),
            (arm(DIRECT_LOCAL, pod_addr(POD_A.ip)), spec(POD_A, false, None)),
            (arm(DIRECT_REMOTE, pod_addr(POD_B.ip)), spec(POD_B, false, None)),
            (arm(DIRECT_REMOTE_VIA_A, pod_addr(POD_B_VIA_A)), spec(POD_B, false, None)),
            (arm(DIRECT_REMOTE_DSR_HOPS, pod_addr(POD_B_DSR_HOPS)), spec(POD_B, false, None)),
        ]
    }

    /// A node's eth0 MAC address (the flood writes its own Ethernet headers).
    pub fn mac(&self, host: &ferry_sandbox::Host) -> anyhow::Result<String> {
        let out = self.lab.sb.run_in(host, None, Command::new("ip").args(["-j", "link", "show", "dev", "eth0"]))?;
        anyhow::ensure!(out.status.success(), "ip link show: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading ip -j link")?;
        v[0]["address"].as_str().map(str::to_string).context("ip -j link: no address")
    }

    /// Packets pod c's eth0 received (the flood's delivered count; they are dropped right after).
    pub fn sink_received(&self) -> anyhow::Result<u64> {
        let pod = self.lab.nodes[POD_C.node].pods.iter().find(|p| p.name == POD_C.name).context("no pod c")?;
        let out = self.lab.sb.run_in(
            &pod.host,
            None,
            Command::new("ip").args(["-s", "-j", "link", "show", "dev", "eth0"]),
        )?;
        anyhow::ensure!(out.status.success(), "ip -s link show: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading ip -s -j link")?;
        v[0]["stats64"]["rx"]["packets"].as_u64().context("ip -s -j link: no rx packets")
    }

    /// A node's BPF datapath counters and SNATed flows (`ferry status --json`); nothing for nftables.
    pub fn status(&self, node: usize) -> anyhow::Result<(std::collections::BTreeMap<String, u64>, u64)> {
        if self.variant.datapath != Datapath::Bpf {
            return Ok(Default::default());
        }
        let out = Command::new(&self.lab.ferry)
            .args(["status", "--json", "--pin-dir"])
            .arg(&self.lab.nodes[node].pin_dir)
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
pub const DIRECT_REMOTE_DSR_HOPS: &str = "direct-remote-dsr-hops";

/// Which arm is compared with which floor: each NodePort arm with the pod it
/// leads to dialled directly, and the remote one also with the same hops
/// untranslated (SNAT's and DSR's).
pub const COMPARISONS: [(&str, &str); 4] = [
    (NODEPORT_LOCAL, DIRECT_LOCAL),
    (NODEPORT_REMOTE, DIRECT_REMOTE),
    (NODEPORT_REMOTE, DIRECT_REMOTE_VIA_A),
    (NODEPORT_REMOTE, DIRECT_REMOTE_DSR_HOPS),
];

/// What an arm expects.
#[derive(Debug, Clone)]
pub struct ArmSpec {
    /// The pod that must answer.
    pub pod: Pod,
    /// Goes through ferry (a NodePort); else the pod must see the client's own address.
    pub translated: bool,
    /// The source the pod must see on a translated arm, where the mode fixes it (DSR: the client).
    pub sees: Option<Ipv4Addr>,
}
