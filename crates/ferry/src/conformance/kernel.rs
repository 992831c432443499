//! The kernel datapath: each case built as a lab and its flows sent as real
//! connections through a real `ferry run` agent.
//!
//! ```text
//!  client host (external sources) ─┐
//!  world (everything "routed as usual") ─ fabric ─ node under test (agent, case addresses)
//!                                              └── remote node (endpoints on other nodes)
//!  node under test: client pods (pod sources), local endpoint pods, a responder for local destinations
//! ```
//!
//! What the endpoint saw decides the verdict: which endpoint answered, and
//! whether the source was translated on the way (masqueraded: the endpoint
//! saw another address or port than the client sent); a refusal is REJECT,
//! silence is DROP, an answer from the untouched destination is PASS. Every
//! node address a flow targets has a listener (a responder, or the agent's
//! health server where it really listens), so a refusal there is ferry's
//! REJECT, never the node's stack answering a closed port. A host client that
//! already holds the address SNAT would give it, and keeps its port, looks the
//! same masqueraded or not: such a flow is reported not covered, with the
//! reason, never guessed.

use super::FlowOutcome;
use crate::lab::{At, Lab};
use anyhow::Context;
use ferry_model::acceptance::{Case, Expected, Observed, ParsedFlow, matches};
use ferry_model::explain::classify_source;
use ferry_model::{IpFamily, Plan, Protocol, SourceClass, build_plan};
use ferry_sandbox::probe::{ConnectOpts, Endpoint, Observation, Proto, ServeOpts};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Server name of endpoint pods.
const ENDPOINT: &str = "endpoint";
/// Server name of the hosts answering untranslated traffic.
const PASSED: &str = "passed";
/// How long silence must last to count as a drop.
const TIMEOUT: Duration = Duration::from_millis(1500);
/// Enough attempts to see every endpoint of a set by chance (4 endpoints: miss one with p < 1e-4).
const MAX_ATTEMPTS: usize = 40;

const REMOTE_V4: &str = "198.18.0.2";
const REMOTE_V6: &str = "fd00:ffff::2";
/// The lab's node indices: the node under test, and the remote node (endpoints on other nodes).
pub(crate) const NODE_UNDER_TEST: usize = 0;
pub(crate) const REMOTE_NODE: usize = 1;

/// The remote node's fabric addresses (its Node object's, for the node under test in DSR).
pub(crate) fn remote_addresses() -> [IpAddr; 2] {
    [ip(REMOTE_V4), ip(REMOTE_V6)]
}
const WORLD_V4: &str = "198.18.0.1";
const WORLD_V6: &str = "fd00:ffff::1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("constant address")
}

/// Runs cases on a kernel datapath with agents started from `ferry` (the binary).
pub struct KernelRunner {
    pub ferry: PathBuf,
    /// The `datapath:` the agent runs: `bpf` or `nftables`.
    pub datapath: &'static str,
    /// `loadBalancing.mode` of the node under test, over the case's (`--lb-mode`;
    /// `dsr` and `hybrid`: see `super::dsr`).
    pub lb_mode: ferry_model::LoadBalancingMode,
    /// `acceleration` of the node under test, over the case's (`--acceleration`).
    pub acceleration: ferry_model::Acceleration,
}

/// Where a flow starts.
#[derive(Debug, Clone, Copy)]
struct Source {
    at: At,
    bind: Option<IpAddr>,
}

pub(crate) struct Built {
    pub(crate) lab: Lab,
    sources: BTreeMap<IpAddr, Source>,
    /// What SNAT to the node under test turns a source into: its primary address of each family.
    snat_addresses: BTreeSet<IpAddr>,
    /// UDP flows with at most one allowed endpoint (or a verdict) reuse one source port per
    /// (source, destination), as a resolver does, so a stale conntrack entry shows.
    stable_udp_ports: bool,
}

/// What the lab is built for: the Plans and flows of one case, or of every step of a scenario.
pub(crate) struct LabSpec<'a> {
    /// A label for errors.
    pub name: &'a str,
    pub cfg: &'a ferry_model::NodeConfig,
    /// The objects the agent starts with.
    pub initial: &'a ferry_model::ClusterState,
    /// Every (Plan, flows) the lab must be able to serve and send.
    pub steps: Vec<(&'a Plan, &'a [ParsedFlow])>,
    /// Endpoint servers keep connections open and answer every line (held connections).
    pub held: bool,
}

/// Endpoint servers of held connections wait this long for the next line.
const HELD_IDLE: Duration = Duration::from_secs(900);

fn proto(p: Protocol) -> Option<Proto> {
    match p {
        Protocol::Tcp => Some(Proto::Tcp),
        Protocol::Udp => Some(Proto::Udp),
        Protocol::Sctp => Some(Proto::Sctp),
    }
}

/// Service addresses a connection can be sourced from on the node (VIPs configured locally).
fn frontend_addresses(plan: &Plan) -> BTreeSet<IpAddr> {
    plan.services
        .values()
        .flat_map(|sp| sp.load_balancer_ips().iter().chain(sp.external_ips()).chain(sp.proxied_load_balancer_ips()))
        .copied()
        .collect()
}

impl KernelRunner {
    /// Builds the case and runs its flows.
    pub fn run_case(&self, case: &Case, flows: &[ParsedFlow]) -> anyhow::Result<Vec<FlowOutcome>> {
        let mut cfg = case.node_config()?;
        cfg.load_balancing = self.lb_mode;
        cfg.acceleration = self.acceleration;
        let mut state = case.cluster_state()?;
        let mut plan = build_plan(&state, &cfg);
        if cfg.load_balancing != ferry_model::LoadBalancingMode::Snat {
            // DSR: the remote node, known to the node under test (super::dsr).
            let far = super::dsr::remote_endpoints(&plan);
            state = super::dsr::for_node_under_test(&state, &far, &remote_addresses());
            plan = build_plan(&state, &cfg);
        }
        let spec = LabSpec { name: &case.name, cfg: &cfg, initial: &state, steps: vec![(&plan, flows)], held: false };
        let mut b = self.build(&spec)?;
        let mut out = Vec::new();
        for f in flows {
            out.push(run_flow(&mut b, &plan, f).unwrap_or_else(|e| FlowOutcome::Failed {
                expected: f.expected.clone(),
                got: Observed::Unexpected("the lab could not run the flow".into()),
                detail: format!("{e:#}"),
            }));
        }
        if std::env::var_os("FERRY_CONFORMANCE_AGENT_LOG").is_some() {
            // For debugging a datapath: what the agent of the node under test said.
            debug_dump(&b, &case.name);
        }
        Ok(out)
    }

    pub(crate) fn build(&self, spec: &LabSpec) -> anyhow::Result<Built> {
        let cfg = spec.cfg;
        let Some(&(first, _)) = spec.steps.first() else { anyhow::bail!("{}: nothing to build a lab for", spec.name) };
        let plans = || spec.steps.iter().map(|(p, _)| *p);
        let all_flows = || spec.steps.iter().flat_map(|(_, f)| f.iter());
        let mut lab = Lab::new("conf", Path::new(&self.ferry))?;
        let mut addrs = cfg.node_ips.clone();
        for fam in [IpFamily::V6, IpFamily::V4] {
            if let Some(p) = cfg.primary_ip(fam) {
                addrs.retain(|a| *a != p);
                addrs.insert(0, p);
            }
        }
        let node = lab.add_node_with(&cfg.node_name, &addrs)?;
        let remote = lab.add_node_with("ferry-remote", &remote_addresses())?;
        anyhow::ensure!(
            (node, remote) == (NODE_UNDER_TEST, REMOTE_NODE),
            "the lab numbered its nodes {node}, {remote}"
        );
        let world_ips = [ip(WORLD_V4), ip(WORLD_V6)];
        let world = lab.add_external("world", &world_ips, node)?;
        lab.set_default_route(node, &world_ips)?;
        lab.set_default_route(
            remote,
            &[IpAddr::V4(lab.nodes[node].primary_v4), IpAddr::V6(lab.nodes[node].primary_v6)],
        )?;

        // Endpoint pods, where their nodeName puts them, serving every port they are listed with
        // (in any step: a pod is placed once, so it must stay on one node).
        let mut serving: BTreeMap<IpAddr, (bool, BTreeSet<(u16, Protocol)>)> = BTreeMap::new();
        for plan in plans() {
            for sp in plan.services.values() {
                for e in sp.endpoints.iter() {
                    let entry = serving.entry(e.ip).or_insert((e.local, BTreeSet::new()));
                    if entry.0 != e.local {
                        anyhow::bail!(
                            "{}: endpoint {} is on this node in one step and on another node in another; \
                             the lab places each pod once (give the moved pod a new address)",
                            spec.name,
                            e.ip
                        );
                    }
                    entry.1.insert((e.port, sp.id.protocol));
                }
            }
        }
        let local_addresses = &first.node.local_addresses;
        let mut endpoint_pods = BTreeMap::new();
        for (ip, (local, ports)) in &serving {
            if local_addresses.contains(ip) {
                continue; // a host-network endpoint: the node's responder is not one; left uncovered
            }
            let on = if *local { node } else { remote };
            let p = lab.add_pod(on, &format!("ep {ip}"), &[*ip])?;
            let listen: Vec<Endpoint> = ports
                .iter()
                .filter_map(|(port, pr)| proto(*pr).map(|pr| Endpoint { addr: SocketAddr::new(*ip, *port), proto: pr }))
                .collect();
            if !listen.is_empty() {
                let mut opts = ServeOpts::new(ENDPOINT, listen);
                if spec.held {
                    opts.echo_lines = true;
                    opts.idle_timeout = HELD_IDLE;
                }
                lab.serve_with(At::Pod(on, p), opts)?;
            }
            endpoint_pods.insert(*ip, (on, p));
        }

        // Sources: the node itself, pods, or a client outside the cluster.
        let vips: BTreeSet<IpAddr> = plans().flat_map(frontend_addresses).collect();
        let mut sources = BTreeMap::new();
        let mut external = Vec::new();
        for f in all_flows() {
            if sources.contains_key(&f.src) || external.contains(&f.src) {
                continue;
            }
            let (class, _) = classify_source(&first.node, &f.src, None);
            let src = if let Some((n, p)) = endpoint_pods.get(&f.src) {
                Source { at: At::Pod(*n, *p), bind: None }
            } else if f.src.is_loopback() {
                // A local client of localhost does not bind: the kernel picks the source,
                // and a socket bound to loopback may not leave the host at all.
                Source { at: At::Node(node), bind: None }
            } else if class == SourceClass::Host || local_addresses.contains(&f.src) {
                Source { at: At::Node(node), bind: Some(f.src) }
            } else if vips.contains(&f.src) {
                // A VIP configured on the node: node-originated traffic loops back with it as source.
                lab.add_node_address(node, f.src)?;
                Source { at: At::Node(node), bind: Some(f.src) }
            } else if class == SourceClass::Pod {
                let p = lab.add_pod(node, &format!("client {}", f.src), &[f.src])?;
                Source { at: At::Pod(node, p), bind: None }
            } else {
                external.push(f.src);
                continue;
            };
            sources.insert(f.src, src);
        }
        if !external.is_empty() {
            let x = lab.add_external("clients", &external, node)?;
            // Replies from endpoints on the other node go back through the node under test.
            let via4 = IpAddr::V4(lab.nodes[node].primary_v4);
            let via6 = IpAddr::V6(lab.nodes[node].primary_v6);
            // With DSR, the remote node answers them itself, on the fabric.
            let dsr = cfg.load_balancing != ferry_model::LoadBalancingMode::Snat;
            let lines: Vec<String> = external
                .iter()
                .map(|a| match dsr {
                    true => format!("route replace {a} dev eth0"),
                    false => format!("route replace {a} via {} dev eth0", if a.is_ipv4() { via4 } else { via6 }),
                })
                .collect();
            lab.sb.ip_batch(lab.node_host(remote), &lines)?;
            for a in &external {
                sources.insert(*a, Source { at: At::External(x), bind: Some(*a) });
            }
        }

        // Responders: whoever owns a destination answers if the packet passes untranslated.
        let mut responders: BTreeMap<String, (At, Vec<Endpoint>)> = BTreeMap::new();
        let mut world_addrs = BTreeSet::new();
        for f in all_flows() {
            let Some(pr) = proto(f.protocol) else { continue };
            if plans().any(|plan| health_server_listens(plan, f)) {
                continue; // the agent's own health server listens there
            }
            let ep = Endpoint { addr: SocketAddr::new(f.dst, f.port), proto: pr };
            let at = if local_addresses.contains(&f.dst) || vips.contains(&f.dst) && sources_has_vip(&sources, &f.dst) {
                At::Node(node)
            } else if let Some((n, p)) = endpoint_pods.get(&f.dst) {
                if serving.get(&f.dst).is_some_and(|(_, ports)| ports.contains(&(f.port, f.protocol))) {
                    continue;
                }
                At::Pod(*n, *p)
            } else if let Some(s) = sources.get(&f.dst).filter(|s| matches!(s.at, At::Pod(..))) {
                s.at
            } else {
                world_addrs.insert(f.dst);
                At::External(world)
            };
            let list = &mut responders.entry(format!("{at:?}")).or_insert((at, Vec::new())).1;
            if !list.contains(&ep) {
                list.push(ep);
            }
        }
        let lines: Vec<String> = world_addrs
            .iter()
            .filter(|a| !world_ips.contains(a))
            .map(|a| {
                format!(
                    "addr add {a}/{} dev eth0{}",
                    if a.is_ipv4() { 32 } else { 128 },
                    if a.is_ipv4() { "" } else { " nodad" }
                )
            })
            .collect();
        if !lines.is_empty() {
            lab.sb.ip_batch(lab.host(At::External(world)), &lines)?;
        }

        // The agent of the node under test, with the case's own configuration.
        let extra = format!(
            "{}datapath: {}\nbpf:\n  pinPath: {}\n  cgroupPath: {}\n  devices: [eth0]\n  podDevices: [br0]\n",
            crate::config::write::node_config_yaml(cfg),
            self.datapath,
            lab.nodes[node].pin_dir.display(),
            lab.nodes[node].cgroup.display()
        );
        std::fs::write(&lab.nodes[node].config, extra)?;
        lab.write_manifests_json(node, spec.initial)?;
        if cfg.acceleration != ferry_model::Acceleration::Disabled {
            lab.accelerate_fabric(node)?;
        }
        lab.start_agent(node).with_context(|| format!("starting the agent for {:?}", spec.name))?;
        if cfg.load_balancing != ferry_model::LoadBalancingMode::Snat {
            // DSR: the remote node unwraps the tunnel and answers (super::dsr).
            let remote_cfg = super::dsr::remote_config(cfg, &lab.node_ips(remote));
            let text = format!(
                "{}datapath: bpf\nbpf:\n  pinPath: {}\n  cgroupPath: {}\n  devices: [eth0]\n  podDevices: [br0]\n",
                crate::config::write::node_config_yaml(&remote_cfg),
                lab.nodes[remote].pin_dir.display(),
                lab.nodes[remote].cgroup.display()
            );
            std::fs::write(&lab.nodes[remote].config, text)?;
            let theirs = super::dsr::for_remote_node(spec.initial, cfg, &lab.node_ips(node));
            lab.write_manifests_json(remote, &theirs)?;
            lab.start_agent(remote).with_context(|| format!("starting the remote node's agent for {:?}", spec.name))?;
        }

        for (_, (at, eps)) in responders {
            lab.serve(at, PASSED, eps)?;
        }
        let snat_addresses =
            [IpAddr::V4(lab.nodes[node].primary_v4), IpAddr::V6(lab.nodes[node].primary_v6)].into_iter().collect();
        Ok(Built { lab, sources, snat_addresses, stable_udp_ports: spec.held })
    }
}

/// A flow to a health-check node port on an address where ferry's health
/// server listens (`nodePortAddresses`, or every address when empty): the
/// server answers it. Elsewhere the lab puts a responder, so a packet let
/// through is answered and only ferry's REJECT refuses.
fn health_server_listens(plan: &Plan, f: &ParsedFlow) -> bool {
    f.protocol == Protocol::Tcp
        && plan.node.local_addresses.contains(&f.dst)
        && plan.health_check_node_ports.contains_key(&f.port)
        && (plan.node.node_port_addresses.is_empty() || plan.node.node_port_addresses.contains(&f.dst))
}

fn sources_has_vip(sources: &BTreeMap<IpAddr, Source>, ip: &IpAddr) -> bool {
    sources.get(ip).is_some_and(|s| matches!(s.at, At::Node(_)))
}

/// What the lab saw of a flow: a verdict, or why the verdict cannot be seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Judged {
    Seen(Observed),
    Unobservable(String),
}

/// Whether the endpoint saw a translated source: another address than the
/// flow's source, or another port than the client's socket had. `None` when
/// it cannot tell: nothing changed, and the source already is an address SNAT
/// to this node produces (`snat`), so masqueraded and not look the same.
pub(crate) fn masquerade_seen(
    flow_src: IpAddr,
    client_local: SocketAddr,
    server_peer: SocketAddr,
    snat: &BTreeSet<IpAddr>,
) -> Option<bool> {
    let translated = server_peer.ip() != flow_src || server_peer.port() != client_local.port();
    if translated {
        Some(true)
    } else if snat.contains(&flow_src) {
        None
    } else {
        Some(false)
    }
}

/// The verdict one observation stands for.
pub(crate) fn observe(o: &Observation, flow: &ParsedFlow, snat: &BTreeSet<IpAddr>) -> Judged {
    let dst = SocketAddr::new(flow.dst, flow.port);
    let seen = match o {
        Observation::Reply(r) if r.server == ENDPOINT => {
            if r.client_peer != dst {
                return Judged::Seen(Observed::Unexpected(format!(
                    "{} answered, but the client saw the reply come from {} instead of {dst}",
                    r.server_local, r.client_peer
                )));
            }
            match masquerade_seen(flow.src, r.client_local, r.server_peer, snat) {
                Some(masq) => Observed::Endpoint { addr: r.server_local, masq },
                None => {
                    return Judged::Unobservable(format!(
                        "{} answered, but masquerading is not observable: the source {} kept its address and \
                         port, and {} is what SNAT to this node would give it",
                        r.server_local, r.server_peer, flow.src
                    ));
                }
            }
        }
        Observation::Reply(r) if r.server == PASSED && r.server_local == dst => Observed::Pass,
        Observation::Reply(r) => Observed::Unexpected(format!(
            "answered by {} at {} (client seen as {})",
            r.server, r.server_local, r.server_peer
        )),
        Observation::Refused { .. } => Observed::Reject,
        Observation::Timeout { .. } => Observed::Drop,
        Observation::Unreachable { errno } => Observed::Unexpected(format!("unreachable ({errno})")),
        // ferry's health-check server answered in HTTP: the packet reached the node's own stack.
        Observation::Error { message, .. } if message.contains("HTTP/1.") => Observed::Pass,
        Observation::Error { errno, message } => {
            Observed::Unexpected(format!("error {}: {message}", errno.as_deref().unwrap_or("")))
        }
    };
    Judged::Seen(seen)
}

/// For debugging a datapath: what the agent of the node under test said, and its nftables.
pub(crate) fn debug_dump(b: &Built, name: &str) {
    eprintln!("--- agent log of {name:?}:\n{}", b.lab.agent_log(0));
    if let Ok(c) = b.lab.counters(0) {
        let moved: Vec<String> = c.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!("--- datapath counters of the node under test: {}", moved.join(" "));
    }
    let host = b.lab.nodes[0].host.clone();
    let mut cmd = b.lab.sb.command(&host, "nft");
    cmd.args(["list", "ruleset"]);
    if let Ok(o) = b.lab.sb.run_in(&host, None, &mut cmd) {
        eprintln!("--- nft list ruleset:\n{}", String::from_utf8_lossy(&o.stdout));
    }
}

/// A source port in 20000..29999 chosen from the flow's addresses: the same in every step.
fn stable_source_port(f: &ParsedFlow) -> u16 {
    let text = format!("{} {} {}", f.src, f.dst, f.port);
    let h = text.bytes().fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    20000 + (h % 10000) as u16
}

/// Where flow `f` starts and how the probe connects for it (None: the lab has no host for it).
pub(crate) fn connect_opts(b: &Built, f: &ParsedFlow) -> Option<(At, ConnectOpts)> {
    let pr = proto(f.protocol)?;
    let src = b.sources.get(&f.src).copied()?;
    let mut opts = ConnectOpts::new(Endpoint { addr: SocketAddr::new(f.dst, f.port), proto: pr });
    opts.bind = src.bind;
    opts.timeout = TIMEOUT;
    let single = match &f.expected {
        Expected::Endpoints { set, .. } => set.len() <= 1,
        _ => true,
    };
    if b.stable_udp_ports && pr == Proto::Udp && single {
        opts.source_port = Some(stable_source_port(f));
    }
    Some((src.at, opts))
}

/// What a reply on a held connection stands for (the same reading as a flow's;
/// a masquerade the lab cannot see makes it unexpected, with the reason).
pub(crate) fn observe_held(b: &Built, o: &Observation, f: &ParsedFlow) -> Observed {
    match observe(o, f, &b.snat_addresses) {
        Judged::Seen(got) => got,
        Judged::Unobservable(why) => Observed::Unexpected(why),
    }
}

/// DSR: where the model says DSR carries the flow to an endpoint, that
/// endpoint is expected to see the client's own address (super::dsr): per
/// endpoint, whether it sees the flow masqueraded; `None` keeps the case's
/// expectation. Only for a client outside the cluster: the lab's host clients
/// holding a LoadBalancer IP are "external" to the model (the IP is not a
/// node address) but leave through socket-LB on the node, never through DSR.
pub(crate) fn dsr_expectation(plan: &Plan, at: At, f: &ParsedFlow) -> Option<BTreeMap<SocketAddr, bool>> {
    match (plan.node.load_balancing, at) {
        (ferry_model::LoadBalancingMode::Snat, _) | (_, At::Pod(..) | At::Node(_)) => None,
        _ => super::dsr::expected_masquerade(
            plan,
            &ferry_model::Flow { src: f.src, dst: f.dst, port: f.port, protocol: f.protocol, in_interface: None },
        ),
    }
}

/// `matches`, but under a DSR expectation ([`dsr_expectation`]) an endpoint
/// of the set must show the masquerade the mode gives it.
pub(crate) fn matches_in_mode(dsr: Option<&BTreeMap<SocketAddr, bool>>, expected: &Expected, got: &Observed) -> bool {
    match (dsr, got) {
        (Some(want), Observed::Endpoint { addr, masq: m }) => {
            matches!(expected, Expected::Endpoints { set, .. } if set.contains(addr)) && want.get(addr) == Some(m)
        }
        _ => matches(expected, got),
    }
}

pub(crate) fn run_flow(b: &mut Built, plan: &Plan, f: &ParsedFlow) -> anyhow::Result<FlowOutcome> {
    if proto(f.protocol).is_none() {
        return Ok(FlowOutcome::NotCovered(format!("protocol {} cannot be probed", f.protocol)));
    }
    let Some((at, opts)) = connect_opts(b, f) else {
        return Ok(FlowOutcome::NotCovered(format!("no host for source {}", f.src)));
    };
    let fail = |got: Observed, detail: String| FlowOutcome::Failed { expected: f.expected.clone(), got, detail };

    let Expected::Endpoints { set, masq } = &f.expected else {
        let o = b.lab.connect(at, &opts)?;
        let mut got = match observe(&o, f, &b.snat_addresses) {
            Judged::Seen(got) => got,
            Judged::Unobservable(why) => return Ok(FlowOutcome::NotCovered(why)),
        };
        // An accepted health-check port and a packet that simply reached the node look alike from outside.
        if f.expected == Expected::Accept && got == Observed::Pass {
            got = Observed::Accept;
        }
        return Ok(if matches(&f.expected, &got) { FlowOutcome::Passed(got) } else { fail(got, format!("{o:?}")) });
    };

    let dsr = dsr_expectation(plan, at, f);
    let matches = |expected: &Expected, got: &Observed| matches_in_mode(dsr.as_ref(), expected, got);
    // Keep connecting until every endpoint of the set was seen (affinity pins one client to one).
    let affinity = plan
        .frontend_for(f.dst, f.port, f.protocol)
        .and_then(|(_, fe)| plan.services.get(&fe.service))
        .is_some_and(|sp| sp.affinity_timeout_seconds.is_some());
    let mut seen = BTreeSet::new();
    // What the endpoints saw, for the report: the case's `masq`, or under the
    // DSR expectation, what was seen when every endpoint saw the same.
    let mut seen_masq = BTreeSet::new();
    for _ in 0..MAX_ATTEMPTS {
        let o = b.lab.connect(at, &opts)?;
        let got = match observe(&o, f, &b.snat_addresses) {
            Judged::Seen(got) => got,
            Judged::Unobservable(why) => return Ok(FlowOutcome::NotCovered(why)),
        };
        if !matches(&f.expected, &got) {
            return Ok(fail(got, format!("{o:?}")));
        }
        if let Observed::Endpoint { addr, masq } = got {
            seen.insert(addr);
            seen_masq.insert(masq);
        }
        if affinity || seen == *set {
            break;
        }
    }
    if !affinity && seen != *set {
        return Ok(fail(
            Observed::Endpoints { set: seen.clone(), masq: *masq },
            format!("only these endpoints answered in {MAX_ATTEMPTS} attempts"),
        ));
    }
    let masq = match (&dsr, seen_masq.len()) {
        (Some(_), 1) => seen_masq.into_iter().next().unwrap_or(*masq),
        _ => *masq,
    };
    Ok(FlowOutcome::Passed(Observed::Endpoints { set: seen, masq }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn snat() -> BTreeSet<IpAddr> {
        [ip("192.168.0.2"), ip("2001:db8::1")].into_iter().collect()
    }

    #[test]
    fn masquerade_is_what_changed_on_the_way() {
        let snat = snat();
        // A pod whose connection arrives from the node: masqueraded.
        assert_eq!(masquerade_seen(ip("10.0.0.2"), sa("10.0.0.2:40000"), sa("192.168.0.2:40000"), &snat), Some(true));
        // A pod that kept its address and port: not masqueraded.
        assert_eq!(masquerade_seen(ip("10.0.0.2"), sa("10.0.0.2:40000"), sa("10.0.0.2:40000"), &snat), Some(false));
        // Same address, another port: the source was translated.
        assert_eq!(
            masquerade_seen(ip("192.168.0.2"), sa("192.168.0.2:40000"), sa("192.168.0.2:1234"), &snat),
            Some(true)
        );
        // localhost to a NodePort, seen from the node's address: masqueraded.
        assert_eq!(masquerade_seen(ip("127.0.0.1"), sa("127.0.0.1:40000"), sa("192.168.0.2:40000"), &snat), Some(true));
        // The host from a secondary address, kept: not masqueraded (SNAT would give the primary).
        assert_eq!(
            masquerade_seen(ip("192.168.1.2"), sa("192.168.1.2:40000"), sa("192.168.1.2:40000"), &snat),
            Some(false)
        );
    }

    #[test]
    fn a_host_source_that_already_is_the_snat_address_is_not_observable() {
        let snat = snat();
        assert_eq!(masquerade_seen(ip("192.168.0.2"), sa("192.168.0.2:40000"), sa("192.168.0.2:40000"), &snat), None);
        assert_eq!(
            masquerade_seen(ip("2001:db8::1"), sa("[2001:db8::1]:40000"), sa("[2001:db8::1]:40000"), &snat),
            None
        );
    }
}
