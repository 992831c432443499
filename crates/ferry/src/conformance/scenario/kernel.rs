//! Scenarios on a kernel datapath: one lab and one real `ferry run` agent per
//! scenario; each step's changes are written to the agent's manifest
//! directory as one atomic rewrite, and the step's flows and every held
//! connection are checked once the agent says the sync landed.
//!
//! ```text
//!  step j:  changes ─► manifests (write aside + rename) ─► wait for `synced G T` with T after the write
//!           [restartAgent: SIGKILL + start on the pinned datapath] [resync: SIGHUP, wait again]
//!           held connections of steps < j: one request each ─► same endpoint while it still serves
//!           flows of step j (as flow cases) ─► TCP flows to endpoints also held from now on
//! ```

use super::format::ParsedScenario;
use super::{Check, Outcome, changes};
use crate::conformance::FlowOutcome;
use crate::conformance::dsr;
use crate::conformance::kernel::{
    Built, KernelRunner, LabSpec, NODE_UNDER_TEST, REMOTE_NODE, connect_opts, debug_dump, dsr_expectation,
    matches_in_mode, observe_held, remote_addresses, run_flow,
};
use crate::lab::At;
use anyhow::Context;
use ferry_model::acceptance::{Expected, Observed, ParsedFlow};
use ferry_model::{Plan, Protocol, ServicePortId, build_plan};
use ferry_sandbox::probe::Observation;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

/// How long a change may take to land (the agent's sync, written to its ready file).
const SYNC_LIMIT: Duration = Duration::from_secs(30);
/// Polls of the ready file within `SYNC_LIMIT`.
const SYNC_POLLS: u32 = 1500;
/// How long one request on a held connection may take (the probe's own timeout is shorter).
const HELD_REPLY: Duration = Duration::from_secs(5);
/// A held client exits by itself after this long (the lab kills it earlier, on drop).
const HELD_LIFETIME: Duration = Duration::from_secs(1800);

/// A connection opened by a flow and kept open across later steps.
struct Held {
    /// The step (0-based) whose flow opened it.
    step: usize,
    pid: u32,
    stdin: std::process::ChildStdin,
    replies: Receiver<String>,
    flow: ParsedFlow,
    /// The endpoint that answered when it was opened.
    endpoint: SocketAddr,
    /// The service port the flow reached when it was opened.
    service: Option<ServicePortId>,
}

/// `sc` in `runner`'s `loadBalancing.mode` and `acceleration` (over the scenario's). In dsr and
/// hybrid, every step's state also holds the remote node's Node object, its
/// pod ranges the endpoints any step places on other nodes (as for a flow
/// case: `crate::conformance::dsr`), so the node under test can tunnel to it.
fn in_mode(runner: &KernelRunner, sc: &ParsedScenario) -> ParsedScenario {
    let mut sc = sc.clone();
    sc.cfg.load_balancing = runner.lb_mode;
    sc.cfg.acceleration = runner.acceleration;
    if runner.lb_mode == ferry_model::LoadBalancingMode::Snat {
        return sc;
    }
    let mut far: Vec<_> = sc.steps.iter().flat_map(|s| dsr::remote_endpoints(&build_plan(&s.state, &sc.cfg))).collect();
    far.sort();
    far.dedup();
    let remote = remote_addresses();
    sc.node_state = dsr::for_node_under_test(&sc.node_state, &far, &remote);
    for step in &mut sc.steps {
        step.state = dsr::for_node_under_test(&step.state, &far, &remote);
    }
    sc
}

/// Runs every step of `sc` on `runner`'s datapath, in its `loadBalancing.mode`.
pub fn run(runner: &KernelRunner, sc: &ParsedScenario) -> Vec<Check> {
    let sc = &in_mode(runner, sc);
    let plans: Vec<Plan> = sc.steps.iter().map(|s| build_plan(&s.state, &sc.cfg)).collect();
    let steps = plans.iter().zip(&sc.steps).map(|(p, s)| (p, s.flows.as_slice())).collect();
    let spec = LabSpec { name: &sc.name, cfg: &sc.cfg, initial: &sc.node_state, steps, held: true };
    let mut b = match runner.build(&spec) {
        Ok(b) => b,
        Err(e) => {
            // The lab could not be built: nothing was observed, so nothing is passed or failed.
            let why = format!("the lab for this scenario could not be built: {e:#}");
            return sc
                .steps
                .iter()
                .enumerate()
                .flat_map(|(j, st)| st.flows.iter().map(move |f| (j, f)))
                .map(|(j, f)| Check { label: sc.label(j, &f.name), outcome: Outcome::NotCovered(why.clone()) })
                .collect();
        }
    };
    let mut out = Vec::new();
    out.extend(xdp_attached(&b, sc, 0, "the agent's start"));
    let mut held: Vec<Held> = Vec::new();
    let mut current = sc.node_state.clone();
    for (j, step) in sc.steps.iter().enumerate() {
        let plan = &plans[j];
        let batch = changes::between(&current, &step.state);
        if !batch.is_empty() {
            for c in batch {
                current.apply(c);
            }
            if current != step.state {
                // The runner's own diff is wrong: never let that pass as a datapath result.
                out.push(Check {
                    label: sc.label(j, "apply the step's changes"),
                    outcome: Outcome::NotCovered("the step's changes did not produce the step's state".into()),
                });
            } else if let Err(e) = apply(&mut b, &current, &sc.cfg) {
                out.push(Check {
                    label: sc.label(j, "apply the step's changes"),
                    outcome: Outcome::Failed(format!("{e:#}")),
                });
            }
        }
        if step.restart_agent {
            match restart(&mut b) {
                Ok(()) => out.extend(xdp_attached(&b, sc, j, "the restart")),
                Err(e) => out.push(Check {
                    label: sc.label(j, "restart the agent"),
                    outcome: Outcome::Failed(format!("{e:#}")),
                }),
            }
        }
        if step.resync
            && let Err(e) = resync(&mut b)
        {
            out.push(Check { label: sc.label(j, "resync"), outcome: Outcome::Failed(format!("{e:#}")) });
        }
        held.retain_mut(|h| {
            let (check, keep) = check_held(&mut b, h, plan, j, sc);
            out.push(check);
            keep
        });
        for f in &step.flows {
            let mut label = sc.label(j, &f.name);
            if connect_opts(&b, f).is_some_and(|(at, _)| dsr_expectation(plan, at, f).is_some()) {
                // Said, so a run in dsr or hybrid shows which flows DSR carried.
                label.push_str(" [DSR: the endpoint sees the client's address]");
            }
            let outcome = run_flow(&mut b, plan, f).unwrap_or_else(|e| FlowOutcome::Failed {
                expected: f.expected.clone(),
                got: Observed::Unexpected("the lab could not run the flow".into()),
                detail: format!("{e:#}"),
            });
            let mut outcome = Outcome::from(outcome);
            if matches!(outcome, Outcome::Passed)
                && f.protocol == Protocol::Tcp
                && matches!(f.expected, Expected::Endpoints { .. })
            {
                match open_held(&mut b, plan, f, j) {
                    Ok(h) => held.push(h),
                    Err(e) => outcome = Outcome::Failed(format!("the flow's held connection: {e:#}")),
                }
            }
            out.push(Check { label, outcome });
        }
    }
    if std::env::var_os("FERRY_CONFORMANCE_AGENT_LOG").is_some() {
        debug_dump(&b, &sc.name);
    }
    for h in held {
        let _ = b.lab.sb.kill(h.pid);
    }
    out
}

/// With `acceleration: native`, the check that the node under test's uplink
/// runs ferry's XDP program in driver mode through its pinned link after
/// `when` (a scenario passing on tc alone would prove nothing about XDP).
fn xdp_attached(b: &Built, sc: &ParsedScenario, step: usize, when: &str) -> Option<Check> {
    if sc.cfg.acceleration == ferry_model::Acceleration::Disabled {
        return None;
    }
    let label = sc.label(step, &format!("XDP in driver mode on the node's uplink after {when}"));
    let link = b.lab.ip(At::Node(NODE_UNDER_TEST), &["-d", "link", "show", "dev", "eth0"]);
    let pin = b.lab.nodes[NODE_UNDER_TEST].pin_dir.join("links/xdp_ext_eth0");
    let outcome = match link {
        Ok(l) if l.contains("prog/xdp") && !l.contains("xdpgeneric") && pin.exists() => Outcome::Passed,
        Ok(l) => Outcome::Failed(format!("no native XDP program with a pinned link ({}) on eth0:\n{l}", pin.display())),
        Err(e) => Outcome::Failed(format!("reading eth0: {e:#}")),
    };
    Some(Check { label, outcome })
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Waits until `node`'s agent reports a sync whose input was read after `since`.
fn wait_synced(b: &mut Built, node: usize, since: SystemTime, what: &str) -> anyhow::Result<()> {
    let since = nanos(since);
    let start = Instant::now();
    let mut exited = false;
    for _ in 0..SYNC_POLLS {
        if b.lab.synced_input(node).is_some_and(|t| t > since) {
            return Ok(());
        }
        exited = b.lab.agent_exited(node);
        if exited || start.elapsed() > SYNC_LIMIT {
            break;
        }
        std::thread::sleep(SYNC_LIMIT / SYNC_POLLS);
    }
    let why = if exited { "the agent exited".to_string() } else { format!("no report within {SYNC_LIMIT:?}") };
    let tail: Vec<String> = b.lab.agent_log(node).lines().rev().take(15).map(str::to_string).collect();
    anyhow::bail!(
        "the agent did not report a sync of {what}: {why} (ready file: {:?}); last agent log lines:\n{}",
        std::fs::read_to_string(b.lab.ready_file(node)).unwrap_or_default().trim(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Hands the agent the new state as one atomic manifest rewrite and waits for it to land.
/// In dsr and hybrid the remote node's agent gets its view of the state first
/// (`dsr::for_remote_node`), so it knows an endpoint before any flow is tunnelled to it.
fn apply(b: &mut Built, state: &ferry_model::ClusterState, cfg: &ferry_model::NodeConfig) -> anyhow::Result<()> {
    if cfg.load_balancing != ferry_model::LoadBalancingMode::Snat {
        let theirs = dsr::for_remote_node(state, cfg, &b.lab.node_ips(NODE_UNDER_TEST));
        let before =
            b.lab.replace_manifests_json(REMOTE_NODE, &theirs).context("rewriting the remote node's manifests")?;
        wait_synced(b, REMOTE_NODE, before, "the step's changes on the remote node")?;
    }
    let before = b.lab.replace_manifests_json(NODE_UNDER_TEST, state).context("rewriting the agent's manifests")?;
    wait_synced(b, NODE_UNDER_TEST, before, "the step's changes")
}

/// SIGKILL and start again on the pinned datapath (start_agent waits for the first sync).
fn restart(b: &mut Built) -> anyhow::Result<()> {
    b.lab.kill_agent(NODE_UNDER_TEST)?;
    let before = SystemTime::now();
    b.lab.start_agent(NODE_UNDER_TEST).context("starting the agent again")?;
    wait_synced(b, NODE_UNDER_TEST, before, "the restarted agent's first sync")
}

/// SIGHUP: a full resync, then wait for the ready file to say so.
fn resync(b: &mut Built) -> anyhow::Result<()> {
    let before = SystemTime::now();
    b.lab.hangup_agent(NODE_UNDER_TEST)?;
    wait_synced(b, NODE_UNDER_TEST, before, "the resync")
}

/// Opens the held connection of a passed TCP flow: its first exchange must be what the flow expects.
fn open_held(b: &mut Built, plan: &Plan, f: &ParsedFlow, step: usize) -> anyhow::Result<Held> {
    let (at, opts) = connect_opts(b, f).context("no host for the flow's source")?;
    let dsr = dsr_expectation(plan, at, f);
    let (pid, stdin, stdout) = b.lab.spawn_held(at, &opts, HELD_LIFETIME)?;
    let (tx, replies) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().take(100_000) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let service = plan.frontend_for(f.dst, f.port, f.protocol).map(|(_, fe)| fe.service.clone());
    let first = next_reply(&replies);
    let got = match &first {
        Ok(o) => observe_held(b, o, f),
        Err(e) => Observed::Unexpected(e.clone()),
    };
    let endpoint = match (&got, matches_in_mode(dsr.as_ref(), &f.expected, &got)) {
        (Observed::Endpoint { addr, .. }, true) => *addr,
        _ => {
            let _ = b.lab.sb.kill(pid);
            anyhow::bail!("opened, it was answered with {got} instead of {}", f.expected);
        }
    };
    Ok(Held { step, pid, stdin, replies, flow: f.clone(), endpoint, service })
}

fn next_reply(replies: &Receiver<String>) -> Result<Observation, String> {
    match replies.recv_timeout(HELD_REPLY) {
        Ok(line) => serde_json::from_str(&line).map_err(|e| format!("the client printed {line:?}: {e}")),
        Err(RecvTimeoutError::Timeout) => Err(format!("no answer from the held client within {HELD_REPLY:?}")),
        Err(RecvTimeoutError::Disconnected) => Err("the held client has exited".into()),
    }
}

/// One request on a held connection at step `j`: one check, and whether to keep holding it.
fn check_held(b: &mut Built, h: &mut Held, plan: &Plan, j: usize, sc: &ParsedScenario) -> (Check, bool) {
    let what = format!("held since step {}: {} (to {})", h.step + 1, h.flow.name, h.endpoint);
    let mut label = sc.label(j, &what);
    let still_serving = h
        .service
        .as_ref()
        .and_then(|id| plan.services.get(id))
        .is_some_and(|sp| sp.serving_addrs().contains(&h.endpoint));
    let sent = h.stdin.write_all(b"ping\n").and_then(|()| h.stdin.flush());
    let got = match sent {
        Err(e) => Observed::Unexpected(format!("the held client is gone ({e})")),
        Ok(()) => match next_reply(&h.replies) {
            Ok(o) => observe_held(b, &o, &h.flow),
            Err(e) => Observed::Unexpected(e),
        },
    };
    let same = matches!(&got, Observed::Endpoint { addr, .. } if *addr == h.endpoint);
    let outcome = if same {
        Outcome::Passed
    } else if let Observed::Endpoint { addr, .. } = &got {
        // An established connection cannot move to another endpoint, whatever the step did.
        Outcome::Failed(format!("answered by {addr}, but the connection was made with {}", h.endpoint))
    } else if still_serving {
        Outcome::Failed(format!("{} still serves this service port, but the connection failed: {got}", h.endpoint))
    } else {
        // Its endpoint stopped serving: the connection may fail, and is dropped from the set.
        label.push_str(&format!(" [its endpoint stopped serving; it failed as allowed ({got}) and is dropped]"));
        Outcome::Passed
    };
    if !same {
        let _ = b.lab.sb.kill(h.pid);
    }
    (Check { label, outcome }, same)
}
