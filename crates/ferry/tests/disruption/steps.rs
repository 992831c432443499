//! The disruption suite's measured steps (issue 13 §6), on both datapaths.
//!
//! One node, its agent serving a manifest directory; clients run without
//! pause: TCP streams of new connections from a pod to a ClusterIP
//! (socket-LB on bpf) and from an outside host to a NodePort, a
//! request/response UDP client to a ClusterIP (from the pod) and to a UDP
//! NodePort (from outside), and a one-way UDP sender (statsd-like) to a
//! ClusterIP. Each step is measured while they go on: agent SIGKILL +
//! restart, an endpoint rollout (ready, terminating, removed), a node-config
//! change (the agent restarted on a new config, which reinstalls the
//! datapath: programs reloaded and links swapped on bpf, the ruleset
//! replaced on nftables), and 2,000 endpoint changes in 10 s; on bpf also
//! the way back and forth across a map layout change: `ferry datapath
//! downgrade --to-layout 1` with the previous release's layout-1 programs
//! taking the links over, then this build's agent upgrading it again. A second run
//! per datapath feeds the agent (`ferry agent`) from the fake API server
//! (ferry-testapi: the real HTTP list/watch protocol, in the node's network
//! namespace) and stops that server for 30 s, then restarts it. With
//! `FERRY_DISRUPTION_RESULTS=FILE` each run writes its table into FILE
//! (`make disruption`: `bench/results/disruption.md`).

use super::*;

/// New TCP connections a downgrade or upgrade step may lose per path (see the assertions).
const LAYOUT_SWITCH_GAP: usize = 3;
/// Endpoints of the `burst` service (never served: only their map entries change).
const BURST_SIZE: usize = 100;
/// Addresses the burst window moves over.
const BURST_SPACE: usize = 500;
/// One write of the burst step: the window moves this far (that many
/// endpoints removed and as many added).
const BURST_SHIFT: usize = 50;
/// Writes of the burst step, one every `BURST_EVERY`: 40 x (50 + 50) = 4,000
/// endpoint changes over 10 s would be twice the target; 20 x 100 = 2,000.
const BURST_WRITES: usize = 20;
const BURST_EVERY: Duration = Duration::from_millis(500);

fn burst_ip(j: usize) -> String {
    let j = j % BURST_SPACE;
    format!("10.244.{}.{}", 2 + j / 250, 1 + j % 250)
}

/// What the manifests say: the rollout's ready and terminating pods (for
/// `web`, `dns` and `statsd`) and where the `burst` window starts.
#[derive(Debug, Clone, Default)]
struct Scene {
    ready: BTreeSet<u8>,
    terminating: BTreeSet<u8>,
    burst: usize,
}

impl Scene {
    /// Services: TCP `web` (ClusterIP + NodePort), request/response UDP `dns`
    /// (ClusterIP + NodePort), one-way UDP `statsd` and TCP `burst`.
    fn yaml(&self) -> String {
        let mut out = String::new();
        let endpoints: Vec<String> = self
            .ready
            .iter()
            .map(|n| format!("{{addresses: [\"{}\"], nodeName: node-a, conditions: {{ready: true}}}}", pod_ip(*n)))
            .chain(self.terminating.iter().map(|n| {
                format!(
                    "{{addresses: [\"{}\"], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}",
                    pod_ip(*n)
                )
            }))
            .collect();
        let burst: Vec<String> = (self.burst..self.burst + BURST_SIZE)
            .map(|j| format!("{{addresses: [\"{}\"], nodeName: node-a}}", burst_ip(j)))
            .collect();
        for (name, ip, proto, port, target, np, eps) in [
            ("web", "10.96.0.20", "TCP", 80, 8080, ", nodePort: 30080", &endpoints),
            ("dns", "10.96.0.53", "UDP", 53, 5353, ", nodePort: 30053", &endpoints),
            ("statsd", "10.96.0.25", "UDP", 8125, 8125, "", &endpoints),
            ("burst", "10.96.0.40", "TCP", 80, 8080, "", &burst),
        ] {
            let kind = if np.is_empty() { "ClusterIP" } else { "NodePort" };
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  type: {kind}\n  \
                 clusterIP: \"{ip}\"\n  clusterIPs: [\"{ip}\"]\n  ipFamilies: [IPv4]\n  \
                 ports: [{{name: p, port: {port}, protocol: {proto}, targetPort: {target}{np}}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nendpoints: [{}]\nports: [{{name: p, port: {target}, protocol: {proto}}}]\n",
                eps.join(", ")
            ));
        }
        out
    }
}

/// The node config: `datapath`, and with `changed` other conntrack lifetimes
/// (a change the restarted agent installs: a new `ferry_config` on bpf).
fn node_config(datapath: &str, changed: bool) -> String {
    let mut c = format!(
        "datapath: {datapath}\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\nminSyncPeriod: 1ms\n"
    );
    if changed {
        c.push_str("conntrack: {tcpEstablishedTimeout: 12h, udpTimeout: 45s}\n");
    }
    c
}

/// Datagrams each backend pod received on the one-way port (statsd, 8125), counted by
/// a thread in the pod's network namespace that never answers.
fn one_way_receiver(netns: PathBuf, addr: SocketAddr, count: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::os::fd::AsRawFd;
    let file = File::open(netns).expect("opening the pod's namespace");
    std::thread::spawn(move || {
        // SAFETY: setns on a valid fd changes only this thread's namespace.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        let socket = std::net::UdpSocket::bind(addr).expect("binding the one-way receiver");
        let mut buf = [0u8; 2048];
        // Bounded: at 10 datagrams a second this outlives any run of the suite.
        for _ in 0..10_000_000u64 {
            if socket.recv_from(&mut buf).is_ok() {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
}

/// What one TCP stream did during a step.
#[derive(Debug, Default, Clone)]
struct PathResult {
    connections: usize,
    failed: usize,
    resets: usize,
    /// The longest time the stream made no progress, in ms (its output file
    /// sampled every 20 ms; a measurement, never asserted).
    longest_gap_ms: u128,
}

/// One row of a datapath's table in `bench/results/disruption.md`.
#[derive(Debug, Default, Clone)]
struct StepResult {
    step: String,
    /// The measured window, in ms (the step and 2 s of traffic after it).
    window_ms: u128,
    /// Per TCP stream, in the order of `Clients::tcp`.
    tcp: Vec<PathResult>,
    /// Request/response UDP through the ClusterIP (from the pod): requests without an answer.
    udp_lost: usize,
    udp_sent: usize,
    /// Request/response UDP through the NodePort (from outside).
    udp_np_lost: usize,
    udp_np_sent: usize,
    /// One-way UDP: datagrams sent and not received by any pod.
    one_way_lost: i64,
    one_way_sent: usize,
    /// One-way datagrams that reached a removed pod after the agent reported the sync that
    /// removed it and the sender's next two datagrams were delivered.
    to_removed: u64,
    /// Those that reached it between the report and those two datagrams.
    tail: u64,
}

/// Where each background client writes its observations.
struct Clients {
    tcp: Vec<(String, PathBuf)>,
    udp: PathBuf,
    udp_np: PathBuf,
    one_way: PathBuf,
}

fn lines_of(path: &std::path::Path) -> Vec<Observation> {
    ferry::lab::observed_in(path)
}

/// Where the complete lines of a client's output end now (a byte offset).
fn end_of(path: &std::path::Path) -> usize {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1)
}

/// The observations written after the byte offset `from` (complete lines
/// only): a TCP stream writes millions of lines in a long run, and parsing
/// them all at every step made the later steps' windows longer.
fn lines_since(path: &std::path::Path, from: usize) -> Vec<Observation> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[from.min(end)..end]);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client output line {l:?}: {e}")))
        .collect()
}

fn is_reset(o: &Observation) -> bool {
    format!("{o:?}").contains("RESET")
}

/// Samples the TCP streams' output sizes until `stop`: the longest time each made no progress.
fn gap_sampler(paths: Vec<PathBuf>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<Duration> {
    let mut last: Vec<(u64, std::time::Instant)> =
        paths.iter().map(|p| (std::fs::metadata(p).map(|m| m.len()).unwrap_or(0), std::time::Instant::now())).collect();
    let mut longest = vec![Duration::ZERO; paths.len()];
    for _ in 0..100_000 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        for (i, p) in paths.iter().enumerate() {
            let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            if size != last[i].0 {
                longest[i] = longest[i].max(last[i].1.elapsed());
                last[i] = (size, std::time::Instant::now());
            }
        }
    }
    // A stream still stalled at the end counts too.
    for (i, (_, since)) in last.iter().enumerate() {
        longest[i] = longest[i].max(since.elapsed());
    }
    longest
}

/// New observations of `path` since `before`: (sent, without an answer).
fn sent_and_lost(path: &std::path::Path, before: usize) -> (usize, usize) {
    let obs = lines_of(path);
    let new = &obs[before.min(obs.len())..];
    (new.len(), new.iter().filter(|o| o.reply().is_none()).count())
}

/// Runs `step` while the clients go on, and measures it: what each client did
/// from the step's start to its end (the end waits for at least 2 s more of
/// traffic after `step` returns, so the clients see the state it left).
fn measure(
    lab: &mut Lab,
    c: &Clients,
    name: &str,
    received: &dyn Fn() -> u64,
    step: impl FnOnce(&mut Lab) -> (u64, u64),
) -> StepResult {
    let started = std::time::Instant::now();
    let tcp_before: Vec<usize> = c.tcp.iter().map(|(_, p)| end_of(p)).collect();
    let (udp_before, np_before, ow_before, rx_before) =
        (lines_of(&c.udp).len(), lines_of(&c.udp_np).len(), lines_of(&c.one_way).len(), received());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, paths) = (stop.clone(), c.tcp.iter().map(|(_, p)| p.clone()).collect());
        std::thread::spawn(move || gap_sampler(paths, stop))
    };
    // One-way datagrams to removed pods: (the tail, after it); see the rollout step.
    let (tail, to_removed) = step(lab);
    // At least 20 more request/response ticks (2 s) after the step, so its effects are seen.
    let udp_mark = lines_of(&c.udp).len();
    let _ = lab.wait_until(Duration::from_secs(30), |_| lines_of(&c.udp).len() >= udp_mark + 20);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gaps = sampler.join().unwrap();
    let mut r = StepResult {
        step: name.into(),
        window_ms: started.elapsed().as_millis(),
        to_removed,
        tail,
        ..Default::default()
    };
    for (((_, p), before), gap) in c.tcp.iter().zip(tcp_before).zip(gaps) {
        let new = lines_since(p, before);
        r.tcp.push(PathResult {
            connections: new.len(),
            failed: new.iter().filter(|o| o.reply().is_none()).count(),
            resets: new.iter().filter(|o| is_reset(o)).count(),
            longest_gap_ms: gap.as_millis(),
        });
    }
    (r.udp_sent, r.udp_lost) = sent_and_lost(&c.udp, udp_before);
    (r.udp_np_sent, r.udp_np_lost) = sent_and_lost(&c.udp_np, np_before);
    // The one-way sender waits 100 ms for an answer that never comes: each Timeout is one
    // datagram sent; anything else is a send that failed (counted as lost).
    let ow = lines_of(&c.one_way);
    let new = &ow[ow_before.min(ow.len())..];
    r.one_way_sent = new.len();
    // Sends that failed (a socket destroyed under the sender) sent nothing: lost too. In-flight
    // datagrams at either end of the window make this ±1.
    r.one_way_lost = new.len() as i64 - (received() - rx_before) as i64;
    r
}

fn results_table(title: &str, note: &str, paths: &[(String, PathBuf)], rows: &[StepResult]) -> String {
    let mut out = format!("## {title}\n\n{note}\n\n| step |");
    for (what, _) in paths {
        out.push_str(&format!(" {what}: new (per s) | failed / resets | longest gap (ms) |"));
    }
    out.push_str(
        " UDP ClusterIP req/resp: sent / lost | UDP NodePort req/resp: sent / lost | one-way: sent / lost | \
         to a removed pod: tail / after |\n|---|",
    );
    out.push_str(&"---|".repeat(3 * paths.len() + 4));
    out.push('\n');
    for r in rows {
        out.push_str(&format!("| {} |", r.step));
        for p in &r.tcp {
            let rate = p.connections as u128 * 1000 / r.window_ms.max(1);
            out.push_str(&format!(
                " {} ({rate}) | {} / {} | {} |",
                p.connections, p.failed, p.resets, p.longest_gap_ms
            ));
        }
        out.push_str(&format!(
            " {} / {} | {} / {} | {} / {} | {} / {} |\n",
            r.udp_sent, r.udp_lost, r.udp_np_sent, r.udp_np_lost, r.one_way_sent, r.one_way_lost, r.tail, r.to_removed
        ));
    }
    out
}

/// Puts `section` (a datapath's table) into the results file at `path`,
/// replacing that datapath's earlier one, so each test writes its own part.
fn write_section(path: &str, datapath: &str, section: &str) {
    const HEADER: &str = "# Disruption suite: results\n\nGenerated by `make disruption` \
         (`crates/ferry/tests/disruption/steps.rs`, one table per datapath); do not edit by hand.\n";
    let (begin, end) = (format!("<!-- {datapath} -->\n"), format!("<!-- /{datapath} -->\n"));
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut text = if old.starts_with(HEADER) { old } else { HEADER.to_string() };
    let block = format!("{begin}{section}{end}");
    match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => text.replace_range(b..e + end.len(), &block),
        _ => {
            text.push('\n');
            text.push_str(&block);
        }
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {path}: {e}"));
}

/// A request/response UDP client (one connected socket, one datagram every
/// 100 ms, no retries) from `at` to `target`; from a pod it is in the node's
/// cgroup, so through socket-LB on bpf.
fn udp_client(lab: &mut Lab, at: At, target: SocketAddr, name: &str) -> (u32, PathBuf) {
    let mut opts = ConnectOpts::new(Endpoint::udp(target));
    opts.connected_udp = true;
    let output = lab.state.join(name);
    let host = lab.host(at).clone();
    let mut cmd = lab.sb.command(&host, &lab.probe.program);
    cmd.args(&lab.probe.leading_args)
        .args(opts.to_args(ConnectMode::UdpStream(Duration::from_secs(3600))))
        .stdin(Stdio::null())
        .stdout(File::create(&output).unwrap())
        .stderr(Stdio::null());
    let cgroup = match at {
        At::Pod(n, _) => Some(lab.nodes[n].cgroup.clone()),
        _ => None,
    };
    let pid = lab.sb.spawn_in(&host, cgroup.as_deref(), cmd).unwrap();
    (pid, output)
}

/// How long the API server is down in the outage step.
const OUTAGE: Duration = Duration::from_secs(30);

/// Where the agent reads the cluster from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// `ferry run` on a manifest directory.
    Manifests,
    /// `ferry agent` on the fake API server.
    Api,
}

/// Creates or replaces every object of `yaml` (Services and EndpointSlices) in the API server.
fn apply_yaml(api: &ferry_testapi::FakeApi, yaml: &str) {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    for doc in yaml.split("---\n").filter(|d| !d.trim().is_empty()) {
        if doc.contains("\nkind: Service\n") {
            api.apply(&serde_saphyr::from_str::<Service>(doc).unwrap_or_else(|e| panic!("{e}\n{doc}")));
        } else {
            api.apply(&serde_saphyr::from_str::<EndpointSlice>(doc).unwrap_or_else(|e| panic!("{e}\n{doc}")));
        }
    }
}

/// Every measured step on `datapath`: with manifests, rounds of (agent
/// SIGKILL + restart, endpoint rollout, node-config change, 2,000 endpoint
/// changes in 10 s), then on bpf a downgrade to layout 1 and the upgrade
/// back; with the API server, its outage.
fn steps_on(datapath: &str, tag: &str, source: Source) {
    let rounds: usize = std::env::var("FERRY_DISRUPTION_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4) / 4;
    let rounds = rounds.max(1);
    let mut lab = Lab::new(tag, FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_external("outside", &[ip("203.0.113.10"), ip("203.0.113.11")], node).unwrap();
    lab.add_pod(node, "client", &[ip("10.244.1.10")]).unwrap();
    let mut received = Vec::new();
    for n in BACKENDS {
        let name = format!("be{n}");
        let p = lab.add_pod(node, &name, &[pod_ip(n)]).unwrap();
        let listen =
            vec![Endpoint::tcp(SocketAddr::new(pod_ip(n), 8080)), Endpoint::udp(SocketAddr::new(pod_ip(n), 5353))];
        let mut serve = ServeOpts::new(&name, listen);
        serve.echo_lines = true;
        serve.idle_timeout = Duration::from_secs(3600);
        lab.serve_with(At::Pod(node, p), serve).unwrap();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        one_way_receiver(
            lab.sb.netns_path(lab.host(At::Pod(node, p))),
            SocketAddr::new(pod_ip(n), 8125),
            count.clone(),
        );
        received.push((n, count));
    }
    let mut config_changed = false;
    lab.write_node_config(node, &node_config(datapath, config_changed)).unwrap();
    // The previous release's datapath (map layout 1), for the way back and forth.
    let layout_1 = (datapath == "bpf" && source == Source::Manifests).then(|| layout_1::build_layout_1(&lab.state));
    let mut scene = Scene { ready: BTreeSet::from([21, 22]), ..Default::default() };
    let api = (source == Source::Api).then(|| {
        ferry_testapi::NetnsApi::start(lab.sb.netns_path(&lab.nodes[node].host), Default::default())
            .expect("starting the fake API server in the node")
    });
    match &api {
        None => {
            lab.write_manifests(node, &scene.yaml()).unwrap();
            lab.start_agent(node).unwrap();
        }
        Some(server) => {
            let api = server.api();
            api.apply(
                &serde_saphyr::from_str::<k8s_openapi::api::core::v1::Node>("metadata: {name: node-a}\n").unwrap(),
            );
            apply_yaml(api, &scene.yaml());
            let config = lab.write_kubeconfig(&api.url()).unwrap();
            lab.start_api_agent(node, &config, Duration::from_secs(60)).unwrap();
        }
    }
    for at in [POD_CLIENT, OUTSIDE] {
        tune_client(&lab, at);
    }
    let node_ip = IpAddr::V4(lab.nodes[node].primary_v4);
    let cip_path = if datapath == "bpf" { "pod -> ClusterIP TCP (socket-LB)" } else { "pod -> ClusterIP TCP" };
    let tcp = [
        (cip_path, stream(&mut lab, POD_CLIENT, "10.96.0.20:80".parse().unwrap(), None, "u-cip.out")),
        (
            "outside -> NodePort TCP",
            stream(&mut lab, OUTSIDE, SocketAddr::new(node_ip, 30080), Some(ip("203.0.113.10")), "u-np.out"),
        ),
    ];
    let (udp_pid, udp_out) = udp_client(&mut lab, POD_CLIENT, "10.96.0.53:53".parse().unwrap(), "u-dns.out");
    let (np_pid, np_out) = udp_client(&mut lab, OUTSIDE, SocketAddr::new(node_ip, 30053), "u-dns-np.out");
    let (ow_pid, ow_out) = udp_client(&mut lab, POD_CLIENT, "10.96.0.25:8125".parse().unwrap(), "u-statsd.out");
    let clients = Clients {
        tcp: tcp.iter().map(|(w, s)| (w.to_string(), s.output.clone())).collect(),
        udp: udp_out,
        udp_np: np_out,
        one_way: ow_out,
    };
    let going = lab.wait_until(Duration::from_secs(30), |_| {
        [&clients.udp, &clients.udp_np, &clients.one_way].iter().all(|p| lines_of(p).len() >= 10)
    });
    assert!(
        going,
        "the UDP clients did not get going: {:?} / {:?}",
        lines_of(&clients.udp).first(),
        lines_of(&clients.udp_np).first()
    );
    let total_rx = || received.iter().map(|(_, c)| c.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();
    let rx_of = |n: u8| received.iter().find(|(m, _)| *m == n).unwrap().1.load(std::sync::atomic::Ordering::Relaxed);
    // Waits until the agent reports a sync that read what was written after `before`.
    let synced_since = |lab: &Lab, before: u128, what: &str| {
        let done = lab.wait_until(Duration::from_secs(30), |l| l.synced_input(node).is_some_and(|t| t > before));
        assert!(done, "the agent did not sync {what}:\n{}", lab.agent_log(node));
    };
    let now_ns = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();

    let mut rows = Vec::new();
    if let Some(server) = &api {
        // The API server stops (connections refused, watches cut) for 30 s and comes
        // back with the same objects; then a change must arrive through the agent's
        // relist or resumed watch.
        let api = server.api();
        rows.push(measure(&mut lab, &clients, "API server stopped 30 s, restarted", &total_rx, |lab| {
            api.stop();
            std::thread::sleep(OUTAGE);
            api.restart().expect("restarting the fake API server");
            scene.ready = BTreeSet::from([21, 22, 23]);
            let before = now_ns();
            apply_yaml(api, &scene.yaml());
            let done = lab.wait_until(Duration::from_secs(120), |l| l.synced_input(node).is_some_and(|t| t > before));
            assert!(done, "the agent did not sync a change made after the outage:\n{}", lab.agent_log(node));
            (0, 0)
        }));
    }
    let (old, new) = (BTreeSet::from([21u8, 22]), BTreeSet::from([23u8, 24]));
    for i in 0..if source == Source::Manifests { rounds } else { 0 } {
        rows.push(measure(&mut lab, &clients, "agent SIGKILL + restart", &total_rx, |lab| {
            lab.kill_agent(node).unwrap();
            // Down for a moment, as a DaemonSet restart is.
            std::thread::sleep(Duration::from_millis(500));
            lab.start_agent(node).unwrap();
            (0, 0)
        }));
        // The rollout, each phase synced before the next (the agent's ready file says so).
        let (from, to) = if i % 2 == 0 { (&old, &new) } else { (&new, &old) };
        let row = measure(&mut lab, &clients, "endpoint rollout (ready, terminating, removed)", &total_rx, |lab| {
            let both: BTreeSet<u8> = from.union(to).copied().collect();
            for (r, t) in [(both, BTreeSet::new()), (to.clone(), from.clone()), (to.clone(), BTreeSet::new())] {
                (scene.ready, scene.terminating) = (r, t);
                let before = now_ns();
                lab.write_manifests(node, &scene.yaml()).unwrap();
                synced_since(lab, before, "a rollout phase");
            }
            // The old pods are removed. What reached them between the agent's report of the
            // sync and the sender's next two datagrams is the tail (reported); from there on
            // none of them may receive a datagram (asserted, over 20 more).
            let at_report: Vec<u64> = from.iter().map(|n| rx_of(*n)).collect();
            let mark = total_rx();
            let settled = lab.wait_until(Duration::from_secs(30), |_| total_rx() >= mark + 2);
            let at_settle: Vec<u64> = from.iter().map(|n| rx_of(*n)).collect();
            let more = lab.wait_until(Duration::from_secs(30), |_| total_rx() >= mark + 22);
            assert!(settled && more, "the one-way sender's datagrams stopped arriving after the rollout");
            let tail: u64 = at_settle.iter().zip(&at_report).map(|(s, r)| s - r).sum();
            let after: u64 = from.iter().zip(&at_settle).map(|(n, c)| rx_of(*n) - c).sum();
            (tail, after)
        });
        rows.push(row);
        // A new node config: the agent is restarted on it (as a DaemonSet's pods are
        // when their ConfigMap changes) and installs the datapath again.
        rows.push(measure(&mut lab, &clients, "node-config change, agent restarted (reinstall)", &total_rx, |lab| {
            config_changed = !config_changed;
            lab.kill_agent(node).unwrap();
            lab.write_node_config(node, &node_config(datapath, config_changed)).unwrap();
            lab.start_agent(node).unwrap();
            let log = lab.agent_log(node);
            assert!(log.contains("installed"), "the restarted agent did not install the datapath:\n{log}");
            (0, 0)
        }));
        // 2,000 endpoint changes in 10 s: the burst window moves by 50 of its 100
        // endpoints every 500 ms, each write synced on its own (minSyncPeriod 1ms).
        rows.push(measure(&mut lab, &clients, "2,000 endpoint changes in 10 s", &total_rx, |lab| {
            let mut last = 0;
            for _ in 0..BURST_WRITES {
                scene.burst = (scene.burst + BURST_SHIFT) % BURST_SPACE;
                last = now_ns();
                lab.write_manifests(node, &scene.yaml()).unwrap();
                std::thread::sleep(BURST_EVERY);
            }
            synced_since(lab, last, "the last burst write");
            (0, 0)
        }));
        if let Some(objects) = &layout_1 {
            layout_cycle(&mut lab, &clients, &total_rx, node, objects, &mut rows);
        }
    }
    for pid in [udp_pid, np_pid, ow_pid] {
        let _ = lab.sb.kill(pid);
    }
    for (_, s) in &tcp {
        let _ = lab.sb.kill(s.pid);
    }
    for r in &rows {
        eprintln!("disruption ({datapath}): {r:?}");
    }
    if let Ok(path) = std::env::var("FERRY_DISRUPTION_RESULTS")
        && source == Source::Api
    {
        let note = format!(
            "`ferry agent` fed by the fake API server (ferry-testapi, real HTTP list/watch, in the node's \
             network namespace), which is stopped (port closed, watches cut) for {} s and restarted with the \
             same objects; then one EndpointSlice change, which the agent must sync. The same clients as in \
             the `ferry run` tables.",
            OUTAGE.as_secs()
        );
        let title = format!("Datapath `{datapath}`, `ferry agent` on the API server");
        write_section(&path, &format!("{datapath}-api"), &results_table(&title, &note, &clients.tcp, &rows));
        eprintln!("disruption: results written to {path}");
    } else if let Ok(path) = std::env::var("FERRY_DISRUPTION_RESULTS") {
        let note = format!(
            "{rounds} rounds of the four steps on one node (2 cores, shared), `minSyncPeriod: 1ms`{}. TCP: new \
             connections one after another, per stream: how many in the step's window (the step and 2 s after \
             it) and per second, and the longest time the stream made no progress (sampled every 20 ms). UDP: \
             one connected socket per client, one datagram every 100 ms; request/response to a ClusterIP from \
             the pod and to a NodePort from outside; one-way (`statsd`) counted by the receiving pods. The \
             burst step moves 50 of the `burst` service's 100 endpoints every 500 ms ({BURST_WRITES} writes, \
             {} endpoint changes).{}",
            if layout_1.is_some() { ", each round ending with the two layout steps" } else { "" },
            BURST_WRITES * 2 * BURST_SHIFT,
            if layout_1.is_some() {
                format!(
                    " The layout steps: `ferry datapath downgrade --to-layout 1` with the agent stopped, the \
                     previous release's programs (layout 1, built from {}) taking every link over once it \
                     has converted the datapath, then this build's agent migrating it back.",
                    &layout_1::LAYOUT_1_COMMIT[..7]
                )
            } else {
                String::new()
            }
        );
        let title = format!("Datapath `{datapath}`, `ferry run` on manifests");
        write_section(&path, datapath, &results_table(&title, &note, &clients.tcp, &rows));
        eprintln!("disruption: results written to {path}");
    }
    for r in &rows {
        for (p, (what, _)) in r.tcp.iter().zip(&clients.tcp) {
            // Across a layout change under this suite's load (a NodePort stream reusing its
            // TIME_WAIT ports, each NAT port probed twice on average), a few connections
            // caught in the link switch can still fail (README "Disruption suite"): bounded,
            // so a switch that breaks connections wholesale fails. upgrade.rs asserts none.
            let allowed = if r.step.contains("layout 1") { LAYOUT_SWITCH_GAP } else { 0 };
            assert!(p.failed <= allowed, "{} ({datapath}): {what}: TCP connections failed: {r:?}", r.step);
            assert!(p.connections > 0, "{} ({datapath}): {what}: no TCP connection made: {r:?}", r.step);
        }
        assert_eq!(
            r.to_removed, 0,
            "{} ({datapath}): one-way datagrams reached a removed pod after the sync: {r:?}",
            r.step
        );
    }
}

/// The way back and forth across a map layout change, two measured steps on
/// `node`'s bpf datapath: this build converts the datapath to layout 1 while
/// it serves and the previous release's programs (`objects`) take the links
/// over, as its agent's install does (no agent runs until the next step);
/// then this build's agent migrates the layout-1 datapath.
fn layout_cycle(
    lab: &mut Lab,
    clients: &Clients,
    total_rx: &dyn Fn() -> u64,
    node: usize,
    objects: &[PathBuf; 2],
    rows: &mut Vec<StepResult>,
) {
    rows.push(measure(lab, clients, "downgrade to layout 1 (previous release's programs)", total_rx, |lab| {
        lab.kill_agent(node).unwrap();
        downgrade_to_layout_1(lab, node, objects);
        (0, 0)
    }));
    rows.push(measure(lab, clients, "upgrade from layout 1 (agent migrates)", total_rx, |lab| {
        let before = lab.agent_log(node).len();
        lab.start_agent(node).unwrap();
        let log = lab.agent_log(node);
        let log = log.get(before..).unwrap_or(&log);
        assert!(log.contains("migrated_from_layout=1"), "the agent did not migrate layout 1:\n{log}");
        for line in log.lines().filter(|l| l.contains("copied the live entries")) {
            eprintln!("disruption: {line}");
        }
        (0, 0)
    }));
}

/// Runs `ferry datapath downgrade --to-layout 1` on `node`'s datapath (its
/// agent stopped), lets the layout-1 `objects` take every link over once it is
/// converted, and waits for the command to see the switch and exit 0.
fn downgrade_to_layout_1(lab: &mut Lab, node: usize, objects: &[PathBuf; 2]) {
    let pin_dir = lab.nodes[node].pin_dir.clone();
    let mut down = std::process::Command::new(FERRY)
        .args(["datapath", "downgrade", "--to-layout", "1", "--wait", "120", "--pin-dir"])
        .arg(&pin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ferry datapath downgrade");
    let mut lines = BufReader::new(down.stdout.take().unwrap()).lines();
    // Bounded by the command's output: it waits (at most --wait) after this line.
    let mut said = Vec::new();
    for line in lines.by_ref().take(10).map_while(Result::ok) {
        let waiting = line.starts_with("start the layout-1 agent now");
        said.push(line);
        if waiting {
            break;
        }
    }
    assert!(
        said.last().is_some_and(|l| l.starts_with("start the layout-1 agent now")),
        "the downgrade did not convert the datapath: {said:#?}"
    );
    layout_1::serve_with_layout_1(&pin_dir, objects, layout_1::Conntrack::Adopted);
    let rest: Vec<String> = lines.take(10).map_while(Result::ok).collect();
    let finished = down.wait_with_output().expect("waiting for ferry datapath downgrade");
    assert!(
        finished.status.success() && rest.iter().any(|l| l.starts_with("the links switched")),
        "the downgrade did not see the links switch ({}): {rest:#?}\n{}",
        finished.status,
        String::from_utf8_lossy(&finished.stderr)
    );
    eprintln!("disruption: {}", rest.join(" / "));
}

/// The measured steps on the eBPF datapath.
#[test]
fn measured_steps_on_the_bpf_datapath() {
    steps_on("bpf", "dsu", Source::Manifests);
}

/// The same steps on the nftables datapath.
#[test]
fn measured_steps_on_the_nftables_datapath() {
    steps_on("nftables", "dsn", Source::Manifests);
}

/// An API server outage of 30 s under the agent on the eBPF datapath.
#[test]
fn an_api_server_outage_on_the_bpf_datapath() {
    steps_on("bpf", "dsa", Source::Api);
}

/// An API server outage of 30 s under the agent on the nftables datapath.
#[test]
fn an_api_server_outage_on_the_nftables_datapath() {
    steps_on("nftables", "dsb", Source::Api);
}
