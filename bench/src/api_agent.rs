//! `ferry agent` against a Kubernetes API server (issue #11's targets): the
//! fake API server of `ferry-testapi`, which speaks the real HTTP list/watch
//! protocol, serves N services from inside a lab node, and a real `ferry
//! agent` in that node lists, watches and programs its eBPF datapath.
//!
//! ```text
//! start       agent start -> ready file's first sync; RSS after ready, peak (VmHWM)
//! one change  one EndpointSlice rewritten in the server -> the ready file reports the sync, p50/p99
//! churn       R slice changes/s (each a different service) for S seconds: event -> datapath
//!             p50/p99/max, RSS every second
//! ```
//!
//! How a change is known to be programmed: the agent rewrites its ready file
//! after every sync with the time that sync started (`synced GEN INPUT_NANOS`;
//! the API source has no checkpoints of its own). A lone change is in the
//! first sync that starts after it was sent (the bench sets `syncPeriod` to an
//! hour so no periodic resync runs in between). Under churn a sync can start
//! while a change is still on the watch stream, so a change is credited to the
//! *second* sync that starts after it was sent: an upper bound, never an
//! underestimate.

use crate::cluster::{NODE, Synthetic};
use crate::stats::{Summary, summarize};
use anyhow::Context;
use ferry::lab::Lab;
use ferry_testapi::{FakeApiOptions, NetnsApi};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// How long the agent may take to list N services and program them.
const READY_LIMIT: Duration = Duration::from_secs(600);
/// The pause before each lone change: more than the agent's minSyncPeriod (10 ms).
pub const IDLE_GAP: Duration = Duration::from_millis(25);
/// How long one change may take to show up in the ready file.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize)]
pub struct ApiAgent {
    pub services: usize,
    /// Process start to the ready file's first `synced` line (list + plan + program).
    pub start_to_ready_s: f64,
    pub rss_after_ready_kib: u64,
    /// VmHWM: the highest RSS so far, start-up included.
    pub peak_rss_kib: u64,
    pub rss_after_changes_kib: u64,
    /// One slice rewritten in the API server -> the datapath programmed (ns).
    pub event_to_datapath: Summary,
    pub churn: Option<Churn>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    /// Changes asked per second, and for how long.
    pub rate_per_s: u64,
    pub seconds: u64,
    pub changes: usize,
    /// Changes actually sent per second (the sender sleeps between changes).
    pub sent_per_s: f64,
    /// Syncs the agent ran during the churn.
    pub syncs: u64,
    /// Sent -> programmed, upper bound (see the module comment), ns.
    pub event_to_datapath: Summary,
    /// The agent's RSS once a second during the churn (KiB).
    pub rss_kib: Vec<u64>,
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// The ready file's `synced GEN INPUT` line.
fn synced(ready: &Path) -> Option<(u64, u128)> {
    let text = std::fs::read_to_string(ready).ok()?;
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["synced", g, t] => Some((g.parse().ok()?, t.parse().ok()?)),
        _ => None,
    }
}

fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: bench\n\
         clusters: [{{name: bench, cluster: {{server: '{url}'}}}}]\n\
         users: [{{name: bench, user: {{token: bench}}}}]\n\
         contexts: [{{name: bench, context: {{cluster: bench, user: bench}}}}]\n"
    )
}

fn node_object(lab: &Lab, node: usize) -> Node {
    let n = &lab.nodes[node];
    let mut obj = Node::default();
    obj.metadata.name = Some(NODE.into());
    obj.status = Some(NodeStatus {
        addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: n.primary_v4.to_string() }]),
        ..Default::default()
    });
    obj
}

/// Runs `ferry agent` in `lab`'s node `node` against a fake API server holding
/// `synthetic`; then `changes` lone changes and, if `churn` is `Some((rate, seconds))`, a churn.
pub fn run(
    lab: &mut Lab,
    node: usize,
    synthetic: &Synthetic,
    changes: usize,
    churn: Option<(u64, u64)>,
) -> anyhow::Result<ApiAgent> {
    let n = synthetic.services;
    // The whole churn stays in the watch history, so no watch is ever told to relist.
    let history_limit = churn.map_or(0, |(rate, secs)| (rate * secs) as usize) + changes + 1000;
    let options = FakeApiOptions { history_limit, ..FakeApiOptions::default() };
    let server = NetnsApi::start(lab.sb.netns_path(&lab.nodes[node].host), options)
        .context("starting the fake API server in the lab node")?;
    let api = server.api();
    eprintln!("[{n}] ferry agent: loading {n} services and their slices into the API server");
    api.apply(&node_object(lab, node));
    for i in 0..n {
        api.apply(&Synthetic::service_object(i)?);
        api.apply(&synthetic.slice_object(i, 0)?);
    }
    let kubeconfig_path = lab.state.join("bench-kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig(&api.url()))?;
    // 10 ms batches a burst and lets a lone change through at once (kube-proxy's
    // default of 1 s would make every change wait); no periodic resync, see above.
    lab.write_node_config(
        node,
        &format!("{}minSyncPeriod: 10ms\nsyncPeriod: 1h\n", crate::cluster::node_config_yaml()),
    )?;
    let t = Instant::now();
    lab.start_api_agent(node, &kubeconfig_path, READY_LIMIT)?;
    let ready = lab.ready_file(node);
    anyhow::ensure!(synced(&ready).is_some(), "the agent's first sync failed:\n{}", lab.agent_log(node));
    let start_to_ready_s = t.elapsed().as_secs_f64();
    let pid = lab.agent_pid(node).context("the agent is not running")?;
    let after_ready = crate::agent::proc_memory(pid)?;
    eprintln!(
        "[{n}] ferry agent: ready in {start_to_ready_s:.2} s, RSS {} MiB (peak {} MiB)",
        after_ready.vm_rss_kib / 1024,
        after_ready.vm_hwm_kib / 1024
    );

    let changed = synthetic.changed_service();
    let mut samples = Vec::with_capacity(changes);
    for rep in 1..=changes {
        // Past minSyncPeriod since the last sync, so the change meets an idle agent
        // rather than the rate limit (back to back, every change would wait ~10 ms).
        std::thread::sleep(IDLE_GAP);
        let slice = synthetic.slice_object(changed, rep)?;
        let before = nanos(SystemTime::now());
        let t = Instant::now();
        api.apply(&slice);
        loop {
            if synced(&ready).is_some_and(|(_, input)| input > before) {
                samples.push(t.elapsed().as_nanos() as u64);
                break;
            }
            anyhow::ensure!(
                t.elapsed() < CHANGE_LIMIT,
                "change {rep} was not programmed within {CHANGE_LIMIT:?}:\n{}",
                lab.agent_log(node)
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    let event_to_datapath = summarize(&samples);
    eprintln!(
        "[{n}] ferry agent: event to datapath p50 {:.2} ms, p99 {:.2} ms ({changes} changes)",
        event_to_datapath.p50_us / 1e3,
        event_to_datapath.p99_us / 1e3
    );
    let churn = match churn {
        Some((rate, seconds)) => Some(run_churn(lab, node, api, synthetic, rate, seconds, pid)?),
        None => None,
    };
    let after_changes = crate::agent::proc_memory(pid)?;
    lab.kill_agent(node)?;
    drop(server);
    Ok(ApiAgent {
        services: n,
        start_to_ready_s,
        rss_after_ready_kib: after_ready.vm_rss_kib,
        peak_rss_kib: after_ready.vm_hwm_kib,
        rss_after_changes_kib: after_changes.vm_rss_kib,
        event_to_datapath,
        churn,
    })
}

/// `rate` slice changes a second for `seconds`, each to the next service.
fn run_churn(
    lab: &Lab,
    node: usize,
    api: &ferry_testapi::FakeApi,
    synthetic: &Synthetic,
    rate: u64,
    seconds: u64,
    pid: u32,
) -> anyhow::Result<Churn> {
    let n = synthetic.services;
    let total = (rate * seconds) as usize;
    eprintln!("[{n}] ferry agent: churn, {rate} changes/s for {seconds} s");
    // Built up front so the sender's pace is the API server's, not serde's.
    let slices: Vec<_> =
        (0..total).map(|k| synthetic.churned_slice((k * 7919) % n, 100_000 + k)).collect::<anyhow::Result<_>>()?;
    let ready = lab.ready_file(node);
    let (first_gen, _) = synced(&ready).context("no ready file before the churn")?;
    let mut sent = Vec::with_capacity(total);
    // (observed at, sync start) of every sync seen, in order.
    let mut syncs: Vec<(u128, u128)> = Vec::new();
    let mut last_gen = first_gen;
    let mut rss_kib = Vec::new();
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    let mut next_rss = start;
    let observe = |syncs: &mut Vec<(u128, u128)>, last_gen: &mut u64| {
        if let Some((g, input)) = synced(&ready)
            && g != *last_gen
        {
            *last_gen = g;
            syncs.push((nanos(SystemTime::now()), input));
        }
    };
    for (k, slice) in slices.iter().enumerate() {
        let due = start + period * k as u32;
        while Instant::now() < due {
            observe(&mut syncs, &mut last_gen);
            std::thread::sleep(Duration::from_micros(100).min(due.saturating_duration_since(Instant::now())));
        }
        sent.push(nanos(SystemTime::now()));
        api.apply(slice);
        if Instant::now() >= next_rss {
            rss_kib.push(crate::agent::proc_memory(pid)?.vm_rss_kib);
            next_rss += Duration::from_secs(1);
        }
    }
    let sent_per_s = total as f64 / start.elapsed().as_secs_f64();
    // Wait for two syncs that start after the last change (see the module comment).
    let last = *sent.last().context("no change sent")?;
    let t = Instant::now();
    while syncs.iter().filter(|(_, input)| *input > last).count() < 2 {
        anyhow::ensure!(
            t.elapsed() < CHANGE_LIMIT,
            "the churn's last change was not programmed within {CHANGE_LIMIT:?}:\n{}",
            lab.agent_log(node)
        );
        observe(&mut syncs, &mut last_gen);
        // With nothing left to send, a second sync only comes with another change.
        if syncs.iter().any(|(_, input)| *input > last) {
            api.apply(&synthetic.churned_slice(0, 99_999)?);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    rss_kib.push(crate::agent::proc_memory(pid)?.vm_rss_kib);
    // Each change: the second sync that started after it was sent, when it was seen done.
    let mut latencies = Vec::with_capacity(total);
    let mut j = 0;
    for s in &sent {
        while j < syncs.len() && syncs[j].1 <= *s {
            j += 1;
        }
        let (done, _) = syncs.get(j + 1).context("a change without a second sync after it")?;
        latencies.push(done.saturating_sub(*s) as u64);
    }
    let event_to_datapath = summarize(&latencies);
    let syncs = syncs.len() as u64;
    eprintln!(
        "[{n}] ferry agent churn: {sent_per_s:.0} changes/s sent, {syncs} syncs, event to datapath p50 {:.1} ms p99 {:.1} ms max {:.1} ms; RSS {} -> {} MiB",
        event_to_datapath.p50_us / 1e3,
        event_to_datapath.p99_us / 1e3,
        event_to_datapath.max_us / 1e3,
        rss_kib.first().copied().unwrap_or(0) / 1024,
        rss_kib.last().copied().unwrap_or(0) / 1024,
    );
    Ok(Churn { rate_per_s: rate, seconds, changes: total, sent_per_s, syncs, event_to_datapath, rss_kib })
}
