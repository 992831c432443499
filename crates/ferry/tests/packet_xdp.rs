//! XDP acceleration on the real kernel (`acceleration: native`), in the
//! two-node lab: node-a's uplink runs `ferry_xdp` in driver mode (veth's
//! native XDP), the fabric's end of that link has GRO on so it takes the
//! frames XDP sends back out (README: XDP acceleration).
//!
//! ```text
//!  client 203.0.113.10 ──┐ fabric              default route: node-a
//!  node-a 192.168.50.10 ─┤  XDP on eth0: NodePort / LB IP traffic from outside
//!  node-b 192.168.50.11 ─┘
//!   pods a21 (10.244.1.21) on node-a, b21 (10.244.2.21) on node-b
//! ```
//!
//! Which program did the work is read from node-a's counters: `xdp_*` move
//! for what XDP handled, `pkt_*` / `dsr_encap` (tc's) stay put; what XDP
//! leaves to tc shows up in `xdp_pass_*` and tc's own counters. Needs root;
//! never skipped.

use ferry::lab::{At, Lab, counters_moved as moved};
use ferry_sandbox::probe::{ConnectOpts, Endpoint, Observation, Proto, ServeOpts};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const NODE_A: usize = 0;
const NODE_B: usize = 1;
const CLIENT: At = At::External(0);
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client_ip() -> IpAddr {
    ip("203.0.113.10")
}

/// A pod `n` on `node`, at 10.244.<node+1>.<n> and fd00:244:<node+1>::<n>.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PodRef(usize, u8);

impl PodRef {
    fn name(self) -> String {
        format!("{}{}", if self.0 == NODE_A { "a" } else { "b" }, self.1)
    }
    fn ip(self) -> IpAddr {
        ip(&format!("10.244.{}.{}", self.0 + 1, self.1))
    }
    fn ip6(self) -> IpAddr {
        ip(&format!("fd00:244:{}::{}", self.0 + 1, self.1))
    }
}

const A21: PodRef = PodRef(NODE_A, 21);
const B21: PodRef = PodRef(NODE_B, 21);

/// A dual-stack LoadBalancer Service `name` (ClusterIP 10.96.0.<n> and
/// fd00:96::<n>, LB IP 198.18.0.<n>), eTP Cluster, TCP 80 -> 8080 on
/// NodePort `np`, UDP 53 -> 5353 on NodePort `np + 1`, with `endpoints`,
/// and its slices.
fn service(name: &str, n: u8, np: u16, endpoints: &[PodRef]) -> String {
    let mut out = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.{n}\n  clusterIPs: [10.96.0.{n}, \"fd00:96::{n}\"]\n  ipFamilies: [IPv4, IPv6]\n  \
         ipFamilyPolicy: RequireDualStack\n  externalTrafficPolicy: Cluster\n  ports:\n  \
         - {{name: http, port: 80, protocol: TCP, targetPort: {TCP_TARGET}, nodePort: {np}}}\n  \
         - {{name: dns, port: 53, protocol: UDP, targetPort: {UDP_TARGET}, nodePort: {}}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: 198.18.0.{n}}}]\n",
        np + 1,
    );
    for (family, of) in [("IPv4", PodRef::ip as fn(PodRef) -> IpAddr), ("IPv6", PodRef::ip6)] {
        let eps: Vec<String> = endpoints
            .iter()
            .map(|p| {
                let node = if p.0 == NODE_A { "node-a" } else { "node-b" };
                format!("- {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: true}}}}", of(*p))
            })
            .collect();
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{}, namespace: test, \
             labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nendpoints:\n{}\nports: [{{name: \
             http, port: {TCP_TARGET}, protocol: TCP}}, {{name: dns, port: {UDP_TARGET}, protocol: UDP}}]\n",
            family.to_lowercase(),
            eps.join("\n"),
        ));
    }
    out
}

/// NodePorts: `far` (b21, on node-b) 30090/30091, `near` (a21, on node-a)
/// 30070/30071, `closed` (b21's UDP port 5399, where nothing listens) 30095.
const FAR: u16 = 30090;
const NEAR: u16 = 30070;
const CLOSED: u16 = 30095;

/// The Service `closed`: UDP 54 -> b21:5399 (nothing listens there), NodePort 30095.
fn closed_service() -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: closed, namespace: test}}\nspec:\n  type: NodePort\n  \
         clusterIP: 10.96.0.5\n  ipFamilies: [IPv4]\n  ports:\n  \
         - {{name: dns, port: 54, protocol: UDP, targetPort: 5399, nodePort: {CLOSED}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: closed-v4, namespace: test, \
         labels: {{kubernetes.io/service-name: closed}}}}\naddressType: IPv4\nendpoints:\n\
         - {{addresses: [\"{}\"], nodeName: node-b, conditions: {{ready: true}}}}\n\
         ports: [{{name: dns, port: 5399, protocol: UDP}}]\n",
        B21.ip()
    )
}

/// node-a (acceleration native) and node-b in `mode`, the client, a21 and
/// b21 serving, the Services `far` and `near`, the Node objects.
fn cluster(tag: &str, mode: &str) -> Lab {
    let mut lab = Lab::new(tag, FERRY.as_ref()).expect("creating the lab");
    assert_eq!((lab.add_node("node-a").unwrap(), lab.add_node("node-b").unwrap()), (NODE_A, NODE_B));
    lab.add_external("client", &[client_ip(), ip("2001:db8::10")], NODE_A).unwrap();
    for p in [A21, B21] {
        let j = lab.add_pod(p.0, &p.name(), &[p.ip(), p.ip6()]).unwrap();
        let listen = [p.ip(), p.ip6()]
            .iter()
            .flat_map(|a| {
                [Endpoint::tcp(SocketAddr::new(*a, TCP_TARGET)), Endpoint::udp(SocketAddr::new(*a, UDP_TARGET))]
            })
            .collect();
        let mut opts = ServeOpts::new(&p.name(), listen);
        opts.echo_lines = true;
        lab.serve_with(At::Pod(p.0, j), opts).unwrap();
    }
    let mut manifests = service("far", 9, FAR, &[B21]);
    manifests.push_str(&closed_service());
    manifests.push_str(&service("near", 7, NEAR, &[A21]));
    manifests.push_str(&lab.node_object(NODE_A, &["10.244.1.0/24", "fd00:244:1::/64"]));
    manifests.push_str(&lab.node_object(NODE_B, &["10.244.2.0/24", "fd00:244:2::/64"]));
    lab.accelerate_fabric(NODE_A).expect("GRO on node-a's fabric port");
    for node in [NODE_A, NODE_B] {
        let acceleration = if node == NODE_A { "native" } else { "disabled" };
        let extra = format!(
            "clusterCIDRs: [10.244.0.0/16, \"fd00:244::/32\"]\nserviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n\
             loadBalancing: {{mode: {mode}}}\nacceleration: {acceleration}\n"
        );
        lab.write_node_config(node, &extra).unwrap();
        lab.write_manifests(node, &manifests).unwrap();
        lab.start_agent(node).unwrap_or_else(|e| panic!("starting the agent of node {node}: {e:#}"));
    }
    // XDP sends only to resolved neighbours (tc resolves the first one:
    // xdp_pass_fib); node-a knows node-b's MAC address from here on, as a
    // node on a busy network does.
    let b = &lab.nodes[NODE_B];
    for addr in [IpAddr::V4(b.primary_v4), IpAddr::V6(b.primary_v6)] {
        let mut hello = ConnectOpts::new(Endpoint::udp(SocketAddr::new(addr, 9)));
        hello.connected_udp = true;
        let o = lab.connect(At::Node(NODE_A), &hello).unwrap();
        assert!(matches!(o, Observation::Refused { .. }), "node-a cannot reach node-b at {addr}: {o:?}");
    }
    lab
}

fn opts(proto: Proto, target: SocketAddr) -> ConnectOpts {
    let mut o = ConnectOpts::new(Endpoint { addr: target, proto });
    o.bind = Some(if target.is_ipv4() { client_ip() } else { ip("2001:db8::10") });
    o
}

fn counters(lab: &Lab, node: usize) -> BTreeMap<String, u64> {
    lab.counters(node).unwrap_or_else(|e| panic!("reading node {node}'s counters: {e:#}"))
}

fn diag(lab: &Lab) -> String {
    lab.report(&[NODE_A, NODE_B])
}

/// `ferry status` on node-a, in its namespace as an operator runs it; with
/// `verify`, `--verify` against node-a's own manifests and node config:
/// (exit code, output).
fn status(lab: &Lab, verify: bool) -> (i32, String) {
    let n = &lab.nodes[NODE_A];
    let mut cmd = lab.sb.command(&n.host, FERRY);
    cmd.arg("status").arg("--pin-dir").arg(&n.pin_dir);
    if verify {
        cmd.args(["--verify", "--manifests"]).arg(&n.manifests).arg("--node-config").arg(&n.config);
    }
    let out = cmd.output().expect("running ferry status");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The id of the XDP program on node-a's eth0, as `ip` reports it.
fn xdp_prog_id(lab: &Lab) -> String {
    let out = lab.ip(At::Node(NODE_A), &["-d", "link", "show", "dev", "eth0"]).unwrap();
    let id = out.split("prog/xdp id ").nth(1).and_then(|s| s.split_whitespace().next());
    id.unwrap_or_else(|| panic!("no XDP program id on eth0:\n{out}")).to_string()
}

fn node_a(lab: &Lab) -> IpAddr {
    IpAddr::V4(lab.nodes[NODE_A].primary_v4)
}

/// The XDP program sits on node-a's eth0 in driver mode, through a pinned link.
fn assert_xdp_attached(lab: &Lab) {
    let out = lab.ip(At::Node(NODE_A), &["-d", "link", "show", "dev", "eth0"]).unwrap();
    assert!(out.contains("xdp") && out.contains("prog/xdp"), "no native XDP program on node-a's eth0:\n{out}");
    assert!(!out.contains("xdpgeneric"), "XDP in generic mode, not native:\n{out}");
    let pin = lab.nodes[NODE_A].pin_dir.join("links/xdp_ext_eth0");
    assert!(pin.exists(), "no pinned XDP link at {}", pin.display());
}

/// snat mode: NodePort (IPv4 and IPv6) and LB IP to a backend on node-b are handled at XDP
/// on node-a in both directions (DNAT + SNAT out, the reply back to the
/// client), tc translating none of it; to a backend on node-a, XDP passes
/// the packets to tc, which delivers them; fragmented UDP and an ICMP error
/// pass to tc as well and still work.
#[test]
fn nodeport_to_a_remote_and_a_local_backend_with_xdp() {
    let lab = cluster("xdpnp", "snat");
    assert_xdp_attached(&lab);
    let na = node_a(&lab);
    for proto in [Proto::Tcp, Proto::Udp] {
        let port = |np: u16| if proto == Proto::Tcp { np } else { np + 1 };
        let lb_port = if proto == Proto::Tcp { 80 } else { 53 };
        let na6 = IpAddr::V6(lab.nodes[NODE_A].primary_v6);
        for fe in [
            SocketAddr::new(na, port(FAR)),
            SocketAddr::new(ip("198.18.0.9"), lb_port),
            SocketAddr::new(na6, port(FAR)),
        ] {
            let what = format!("{fe}/{proto} (remote backend)");
            let na = if fe.is_ipv4() { na } else { na6 };
            let a0 = counters(&lab, NODE_A);
            let o = lab.connect(CLIENT, &opts(proto, fe)).unwrap();
            let r = o.reply().unwrap_or_else(|| panic!("{what}: no reply: {o:?}\n{}", diag(&lab)));
            let a = moved(&a0, &counters(&lab, NODE_A));
            assert_eq!((r.server.as_str(), r.server_peer.ip(), r.client_peer), ("b21", na, fe), "{what}");
            assert_eq!(a.get("xdp_new_flow"), Some(&1), "{what}: balanced at XDP: {a:?}");
            assert!(a.get("xdp_forward").copied().unwrap_or(0) >= 1, "{what}: the flow's packets at XDP: {a:?}");
            for tc in ["pkt_new_flow", "pkt_forward"] {
                assert_eq!(a.get(tc), None, "{what}: tc's {tc} moved (a packet XDP should have sent): {a:?}");
            }
        }
        let fe = SocketAddr::new(na, port(NEAR));
        let what = format!("{fe}/{proto} (local backend)");
        let a0 = counters(&lab, NODE_A);
        let o = lab.connect(CLIENT, &opts(proto, fe)).unwrap();
        let r = o.reply().unwrap_or_else(|| panic!("{what}: no reply: {o:?}\n{}", diag(&lab)));
        let a = moved(&a0, &counters(&lab, NODE_A));
        assert_eq!(r.server, "a21", "{what}");
        assert!(a.get("xdp_pass_tc").copied().unwrap_or(0) >= 1, "{what}: passed to tc: {a:?}");
        assert_eq!(a.get("pkt_new_flow"), Some(&1), "{what}: tc balanced it: {a:?}");
        if proto == Proto::Tcp {
            // The client's later packets (ACK, request, FIN, ACK) find the
            // flow at XDP, whose FIB lookup leads to the pod's device, not
            // back out of eth0: passed as xdp_pass_fib (the bench's count).
            assert!(a.get("xdp_pass_fib").copied().unwrap_or(0) >= 3, "{what}: the flow's later packets: {a:?}");
        }
        assert_eq!(a.get("xdp_new_flow"), None, "{what}: {a:?}");
    }

    // A UDP datagram of 3000 bytes leaves the client in fragments: XDP passes them, tc forwards them.
    let fe = SocketAddr::new(na, FAR + 1);
    let a0 = counters(&lab, NODE_A);
    let mut o = opts(Proto::Udp, fe);
    o.pad = 3000;
    let got = lab.connect(CLIENT, &o).unwrap();
    let r = got.reply().unwrap_or_else(|| panic!("fragmented {fe}/udp: no reply: {got:?}\n{}", diag(&lab)));
    assert_eq!(r.server, "b21");
    let a = moved(&a0, &counters(&lab, NODE_A));
    assert!(a.get("xdp_pass_shape").copied().unwrap_or(0) >= 2, "fragments passed to tc: {a:?}");
    assert!(a.get("frag_first").copied().unwrap_or(0) >= 1, "tc handled the fragments: {a:?}");

    // ICMP: b21 answers a datagram to a port nothing listens on with a port
    // unreachable, which comes back to node-a's SNAT address: XDP passes it,
    // tc turns it back into one about the client's own flow.
    let fe = SocketAddr::new(na, CLOSED);
    let a0 = counters(&lab, NODE_A);
    let mut o = opts(Proto::Udp, fe);
    o.connected_udp = true;
    let got = lab.connect(CLIENT, &o).unwrap();
    assert!(matches!(got, Observation::Refused { .. }), "{fe}/udp to a closed port: {got:?}\n{}", diag(&lab));
    let a = moved(&a0, &counters(&lab, NODE_A));
    assert!(a.get("xdp_pass_shape").copied().unwrap_or(0) >= 1, "ICMP error passed to tc: {a:?}");
    assert_eq!(a.get("icmp_error_rev"), Some(&1), "tc translated the ICMP error back: {a:?}");
}

/// dsr mode: a new connection to a backend on node-b is tunnelled by XDP
/// (node-a's tc tunnels nothing), IPv4 in IPv4 and IPv6 in IPv6, the
/// endpoint sees the client's address, and node-b unwraps every packet
/// node-a tunnelled.
#[test]
fn dsr_tunnels_at_xdp() {
    let lab = cluster("xdpdsr", "dsr");
    assert_xdp_attached(&lab);
    let node_a6 = IpAddr::V6(lab.nodes[NODE_A].primary_v6);
    let cases = [node_a(&lab), node_a6].into_iter().flat_map(|n| [(n, Proto::Tcp), (n, Proto::Udp)]);
    for (node, proto) in cases {
        let fe = SocketAddr::new(node, if proto == Proto::Tcp { FAR } else { FAR + 1 });
        let client = opts(proto, fe).bind.unwrap();
        let what = format!("{fe}/{proto}");
        let (a0, b0) = (counters(&lab, NODE_A), counters(&lab, NODE_B));
        let o = lab.connect(CLIENT, &opts(proto, fe)).unwrap();
        let r = o.reply().unwrap_or_else(|| panic!("{what}: no reply: {o:?}\n{}", diag(&lab)));
        let a = moved(&a0, &counters(&lab, NODE_A));
        assert_eq!((r.server.as_str(), r.server_peer.ip(), r.client_peer), ("b21", client, fe), "{what}");
        assert_eq!((a.get("xdp_new_flow"), a.get("dsr_new_flow")), (Some(&1), Some(&1)), "{what}: {a:?}");
        for tc in ["dsr_encap", "pkt_new_flow", "pkt_forward"] {
            assert_eq!(a.get(tc), None, "{what}: tc's {tc} moved: {a:?}");
        }
        let encap = a["xdp_dsr_encap"];
        let arrived = lab.wait_until(Duration::from_secs(5), |lab| {
            counters(lab, NODE_B)["dsr_decap"] - b0.get("dsr_decap").copied().unwrap_or(0) >= encap
        });
        assert!(arrived, "{what}: node-b unwrapped fewer than the {encap} packets XDP tunnelled\n{}", diag(&lab));
    }
}

/// A held connection through XDP survives node-a's agent restarting: the
/// restarted agent adopts the pinned maps and swaps the program inside the
/// pinned XDP link, and the connection keeps answering from b21 at XDP.
/// Then `acceleration: disabled` detaches the XDP program, and the same
/// connection goes on through tc; `best-effort` with a second uplink that has
/// no native XDP (a bridge) attaches to eth0 again and leaves the bridge to tc.
/// `ferry status` and `--verify` are checked at each stage.
#[test]
fn an_agent_restart_keeps_a_flow_handled_at_xdp() {
    use std::io::{BufRead, BufReader, Write};
    let mut lab = cluster("xdprst", "snat");
    let fe = SocketAddr::new(node_a(&lab), FAR);
    let (_pid, mut stdin, stdout) = lab.spawn_held(CLIENT, &opts(Proto::Tcp, fe), Duration::from_secs(120)).unwrap();
    let (tx, replies) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().take(1000) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut exchange = |first: bool| -> Result<String, String> {
        if !first {
            stdin.write_all(b"x\n").and_then(|_| stdin.flush()).map_err(|e| format!("writing: {e}"))?;
        }
        // A guard against a hung client, not a timing assertion.
        let line = replies.recv_timeout(Duration::from_secs(20)).map_err(|e| format!("no answer: {e}"))?;
        let o: ferry_sandbox::probe::Observation = serde_json::from_str(&line).map_err(|e| format!("{line}: {e}"))?;
        o.reply().map(|r| r.server.clone()).ok_or_else(|| format!("{o:?}"))
    };
    assert_eq!(exchange(true), Ok("b21".into()), "the held connection did not open\n{}", diag(&lab));
    lab.kill_agent(NODE_A).unwrap();
    lab.start_agent(NODE_A).unwrap_or_else(|e| panic!("restarting node-a's agent: {e:#}"));
    assert_xdp_attached(&lab);
    let log = lab.agent_log(NODE_A);
    assert!(log.contains("acceleration=native[eth0]"), "the restarted agent names the XDP device:\n{log}");
    // `ferry status` names the device, the mode and the program; --verify finds no drift.
    let (code, out) = status(&lab, false);
    let line = format!("eth0  XDP native, program {} (link ", xdp_prog_id(&lab));
    assert!(code == 0 && out.contains("acceleration native (the agent's node config)"), "{out}");
    assert!(out.contains(&line), "status shows {line:?}:\n{out}");
    let (code, out) = status(&lab, true);
    assert_eq!(code, 0, "no drift with XDP attached as configured:\n{out}");
    let a0 = counters(&lab, NODE_A);
    for i in 0..3 {
        assert_eq!(exchange(false), Ok("b21".into()), "exchange {i} after the restart\n{}", diag(&lab));
    }
    let a = moved(&a0, &counters(&lab, NODE_A));
    assert!(a.get("xdp_forward").copied().unwrap_or(0) >= 3, "after the restart, at XDP: {a:?}");
    assert_eq!(a.get("xdp_new_flow"), None, "the held flow was not balanced again: {a:?}");

    // acceleration: disabled detaches the program; the flow goes on through tc.
    let extra = "clusterCIDRs: [10.244.0.0/16, \"fd00:244::/32\"]\nserviceCIDRs: [10.96.0.0/16, \"fd00:96::/112\"]\n\
                 loadBalancing: {mode: snat}\nacceleration: disabled\n";
    lab.write_node_config(NODE_A, extra).unwrap();
    // Before the agent reads it, --verify reports the XDP link the config no longer wants.
    let (code, out) = status(&lab, true);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("extra    XDP link") && out.contains("eth0: program"), "{out}");
    assert!(out.contains("attached while acceleration is disabled"), "{out}");
    lab.kill_agent(NODE_A).unwrap();
    lab.start_agent(NODE_A).unwrap_or_else(|e| panic!("restarting node-a's agent: {e:#}"));
    let link = lab.ip(At::Node(NODE_A), &["-d", "link", "show", "dev", "eth0"]).unwrap();
    assert!(!link.contains("prog/xdp"), "acceleration disabled left an XDP program on eth0:\n{link}");
    assert!(!lab.nodes[NODE_A].pin_dir.join("links/xdp_ext_eth0").exists(), "the XDP link pin is left");
    let (code, out) = status(&lab, false);
    assert!(code == 0 && out.contains("acceleration disabled") && out.contains("eth0  tc only"), "{out}");
    assert_eq!(status(&lab, true).0, 0, "disabled and detached: no drift");
    // The other way round: a config asking for native while no XDP link is there.
    lab.write_node_config(NODE_A, &extra.replace("acceleration: disabled", "acceleration: native")).unwrap();
    let (code, out) = status(&lab, true);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing  XDP link") && out.contains("eth0: no ferry XDP program attached"), "{out}");
    lab.write_node_config(NODE_A, extra).unwrap();
    let a0 = counters(&lab, NODE_A);
    assert_eq!(exchange(false), Ok("b21".into()), "after disabling XDP\n{}", diag(&lab));
    let a = moved(&a0, &counters(&lab, NODE_A));
    assert!(a.get("pkt_forward").copied().unwrap_or(0) >= 1, "tc carries the flow now: {a:?}");
    assert_eq!(a.get("xdp_forward"), None, "{a:?}");

    // best-effort with a second uplink whose driver has no native XDP (a
    // bridge): eth0 runs XDP again, the bridge tc only, and status says why.
    lab.ip(At::Node(NODE_A), &["link", "add", "ferry-nox0", "type", "bridge"]).unwrap();
    lab.ip(At::Node(NODE_A), &["link", "set", "ferry-nox0", "up"]).unwrap();
    lab.write_node_config(NODE_A, &extra.replace("acceleration: disabled", "acceleration: best-effort")).unwrap();
    let config = std::fs::read_to_string(&lab.nodes[NODE_A].config).unwrap();
    let two = config.replace("devices: [eth0]", "devices: [eth0, ferry-nox0]");
    assert_ne!(config, two, "the lab's node config names its uplink as expected:\n{config}");
    std::fs::write(&lab.nodes[NODE_A].config, two).unwrap();
    lab.kill_agent(NODE_A).unwrap();
    lab.start_agent(NODE_A).unwrap_or_else(|e| panic!("restarting node-a's agent: {e:#}"));
    let (code, out) = status(&lab, false);
    let line = |dev: &str| out.lines().find(|l| l.trim_start().starts_with(dev)).unwrap_or_default().to_string();
    assert!(code == 0 && out.contains("acceleration best-effort (the agent's node config)"), "{out}");
    assert!(line("eth0 ").contains(&format!("XDP native, program {} (link", xdp_prog_id(&lab))), "{out}");
    let bridge = line("ferry-nox0 ");
    assert!(bridge.contains("tc only: best-effort fell back (") && bridge.contains("driver mode"), "{out}");
    let (code, out) = status(&lab, true);
    assert_eq!(code, 0, "best-effort's recorded fallback is no drift:\n{out}");
    let a0 = counters(&lab, NODE_A);
    assert_eq!(exchange(false), Ok("b21".into()), "with best-effort\n{}", diag(&lab));
    let a = moved(&a0, &counters(&lab, NODE_A));
    assert!(a.get("xdp_forward").copied().unwrap_or(0) >= 1, "XDP carries the flow again: {a:?}");
}
