//! The disruption suite's measured steps (issue 13 §6).

use super::*;

/// Services of the UDP / rollout test: TCP `web` (ClusterIP + NodePort),
/// request/response UDP `dns` and one-way UDP `statsd`, each on `eps`
/// (ready ones, then terminating ones: ready false, serving true).
fn rollout_yaml(ready: &BTreeSet<u8>, terminating: &BTreeSet<u8>) -> String {
    let mut out = String::new();
    let endpoints: Vec<String> = ready
        .iter()
        .map(|n| format!("{{addresses: [\"{}\"], nodeName: node-a, conditions: {{ready: true}}}}", pod_ip(*n)))
        .chain(terminating.iter().map(|n| {
            format!(
                "{{addresses: [\"{}\"], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}",
                pod_ip(*n)
            )
        }))
        .collect();
    for (name, ip, proto, port, target, np) in [
        ("web", "10.96.0.20", "TCP", 80, 8080, ", nodePort: 30080"),
        ("dns", "10.96.0.53", "UDP", 53, 5353, ""),
        ("statsd", "10.96.0.25", "UDP", 8125, 8125, ""),
    ] {
        let kind = if np.is_empty() { "ClusterIP" } else { "NodePort" };
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  type: {kind}\n  \
             clusterIP: \"{ip}\"\n  clusterIPs: [\"{ip}\"]\n  ipFamilies: [IPv4]\n  \
             ports: [{{name: p, port: {port}, protocol: {proto}, targetPort: {target}{np}}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nendpoints: [{}]\nports: [{{name: p, port: {target}, protocol: {proto}}}]\n",
            endpoints.join(", ")
        ));
    }
    out
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

/// One row of `bench/results/disruption.md`.
#[derive(Debug, Default, Clone)]
struct StepResult {
    step: String,
    /// New TCP connections (both paths) during the step.
    connections: usize,
    failed: usize,
    resets: usize,
    /// Request/response UDP: requests without an answer.
    udp_lost: usize,
    udp_sent: usize,
    /// One-way UDP: datagrams sent and not received by any pod.
    one_way_lost: i64,
    one_way_sent: usize,
    /// One-way datagrams that reached a removed pod after the agent reported the sync that
    /// removed it and the sender's next two datagrams were delivered.
    to_removed: u64,
    /// Those that reached it between the report and those two datagrams.
    tail: u64,
    /// The longest time any TCP stream made no progress, in ms (sampled every 20 ms).
    longest_gap_ms: u128,
}

/// Where each background client stands: (TCP observations per stream, UDP request/response
/// observations, one-way observations).
struct Clients {
    tcp: Vec<(String, PathBuf)>,
    udp: PathBuf,
    one_way: PathBuf,
}

fn lines_of(path: &std::path::Path) -> Vec<Observation> {
    observed(&Stream { pid: 0, output: path.to_path_buf() })
}

fn is_reset(o: &Observation) -> bool {
    format!("{o:?}").contains("RESET")
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
    let tcp_before: Vec<usize> = c.tcp.iter().map(|(_, p)| lines_of(p).len()).collect();
    let (udp_before, ow_before, rx_before) = (lines_of(&c.udp).len(), lines_of(&c.one_way).len(), received());
    // Sampling the TCP streams' output sizes for the longest gap (a measurement, never asserted).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let paths: Vec<PathBuf> = c.tcp.iter().map(|(_, p)| p.clone()).collect();
        std::thread::spawn(move || {
            let mut last: Vec<(u64, std::time::Instant)> = paths
                .iter()
                .map(|p| (std::fs::metadata(p).map(|m| m.len()).unwrap_or(0), std::time::Instant::now()))
                .collect();
            let mut longest = Duration::ZERO;
            for _ in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
                for (i, p) in paths.iter().enumerate() {
                    let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                    if size != last[i].0 {
                        longest = longest.max(last[i].1.elapsed());
                        last[i] = (size, std::time::Instant::now());
                    }
                }
            }
            longest
        })
    };
    // One-way datagrams to removed pods: (the tail, after it); see the rollout step.
    let (tail, to_removed) = step(lab);
    // At least 20 more request/response ticks (2 s) after the step, so its effects are seen.
    let udp_mark = lines_of(&c.udp).len();
    let _ = lab.wait_until(Duration::from_secs(30), |_| lines_of(&c.udp).len() >= udp_mark + 20);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let longest = sampler.join().unwrap();
    let mut r =
        StepResult { step: name.into(), to_removed, tail, longest_gap_ms: longest.as_millis(), ..Default::default() };
    for ((_, p), before) in c.tcp.iter().zip(tcp_before) {
        let obs = lines_of(p);
        let new = &obs[before.min(obs.len())..];
        r.connections += new.len();
        r.failed += new.iter().filter(|o| o.reply().is_none()).count();
        r.resets += new.iter().filter(|o| is_reset(o)).count();
    }
    let udp = lines_of(&c.udp);
    let new = &udp[udp_before.min(udp.len())..];
    r.udp_sent = new.len();
    r.udp_lost = new.iter().filter(|o| o.reply().is_none()).count();
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

fn results_table(seed_note: &str, rows: &[StepResult]) -> String {
    let mut out = String::from(
        "# Disruption suite: results\n\nGenerated by `make disruption` (`crates/ferry/tests/disruption.rs`, \
         `udp_clients_and_an_endpoint_rollout_across_agent_restarts`); do not edit by hand.\n\n",
    );
    out.push_str(seed_note);
    out.push_str(
        "\n\n| step | TCP connections | failed | resets | UDP req/resp sent | lost | one-way sent | lost | to a removed pod: tail / after | longest gap (ms) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |\n",
            r.step,
            r.connections,
            r.failed,
            r.resets,
            r.udp_sent,
            r.udp_lost,
            r.one_way_sent,
            r.one_way_lost,
            r.tail,
            r.to_removed,
            r.longest_gap_ms
        ));
    }
    out
}

/// A request/response UDP client and a one-way UDP sender (statsd) through
/// ClusterIPs from a pod (socket-LB), next to the TCP streams, across an agent
/// SIGKILL + restart and an endpoint rollout (new pods ready, old ones
/// terminating, then removed, as a Deployment does). Each step is measured;
/// `FERRY_DISRUPTION_RESULTS=FILE` writes the table (`make disruption`).
#[test]
fn udp_clients_and_an_endpoint_rollout_across_agent_restarts() {
    let steps: usize = std::env::var("FERRY_DISRUPTION_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4) / 4;
    let steps = steps.max(1);
    let mut lab = Lab::new("dsu", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_external("outside", &[ip("203.0.113.10")], node).unwrap();
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
    let config = "datapath: bpf\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\nminSyncPeriod: 1ms\n";
    lab.write_node_config(node, config).unwrap();
    lab.write_manifests(node, &rollout_yaml(&BTreeSet::from([21, 22]), &BTreeSet::new())).unwrap();
    lab.start_agent(node).unwrap();
    for at in [POD_CLIENT, OUTSIDE] {
        for (key, value) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "1024 65000")] {
            let out = lab.sb.command(lab.host(at), "sysctl").args(["-qw", &format!("{key}={value}")]).output().unwrap();
            assert!(out.status.success(), "sysctl {key} in {at:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let node_ip = IpAddr::V4(lab.nodes[node].primary_v4);
    let tcp = [
        (
            "pod -> ClusterIP (socket-LB)",
            stream(&mut lab, POD_CLIENT, "10.96.0.20:80".parse().unwrap(), None, "u-cip.out"),
        ),
        ("outside -> NodePort (tc)", stream(&mut lab, OUTSIDE, SocketAddr::new(node_ip, 30080), None, "u-np.out")),
    ];
    // Both UDP clients: one connected socket each, one datagram every 100 ms, from the pod
    // (socket-LB); the one-way one targets a port nobody answers on, so each tick is one
    // datagram sent and a Timeout.
    let udp_client = |lab: &mut Lab, target: &str, name: &str| -> (u32, PathBuf) {
        let mut opts = ConnectOpts::new(Endpoint::udp(target.parse().unwrap()));
        opts.connected_udp = true;
        let output = lab.state.join(name);
        let host = lab.host(POD_CLIENT).clone();
        let mut cmd = lab.sb.command(&host, &lab.probe.program);
        cmd.args(&lab.probe.leading_args)
            .args(opts.to_args(ConnectMode::UdpStream(Duration::from_secs(3600))))
            .stdin(Stdio::null())
            .stdout(File::create(&output).unwrap())
            .stderr(Stdio::null());
        let cgroup = lab.nodes[NODE].cgroup.clone();
        let pid = lab.sb.spawn_in(&host, Some(&cgroup), cmd).unwrap();
        (pid, output)
    };
    let (udp_pid, udp_out) = udp_client(&mut lab, "10.96.0.53:53", "u-dns.out");
    let (ow_pid, ow_out) = udp_client(&mut lab, "10.96.0.25:8125", "u-statsd.out");
    let clients = Clients {
        tcp: tcp.iter().map(|(w, s)| (w.to_string(), s.output.clone())).collect(),
        udp: udp_out,
        one_way: ow_out,
    };
    let going = lab.wait_until(Duration::from_secs(30), |_| {
        lines_of(&clients.udp).len() >= 10 && lines_of(&clients.one_way).len() >= 10
    });
    assert!(going, "the UDP clients did not get going: {:?}", lines_of(&clients.udp).first());
    let total_rx = || received.iter().map(|(_, c)| c.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();
    let rx_of = |n: u8| received.iter().find(|(m, _)| *m == n).unwrap().1.load(std::sync::atomic::Ordering::Relaxed);

    let mut rows = Vec::new();
    let (old, new) = (BTreeSet::from([21u8, 22]), BTreeSet::from([23u8, 24]));
    for i in 0..steps {
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
                let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
                lab.write_manifests(node, &rollout_yaml(&r, &t)).unwrap();
                // The agent says when a sync that read the new file is programmed.
                let done =
                    lab.wait_until(Duration::from_secs(30), |l| l.synced_input(node).is_some_and(|t| t > before));
                assert!(done, "the agent did not sync a rollout phase:\n{}", lab.agent_log(node));
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
    }
    for pid in [udp_pid, ow_pid] {
        let _ = lab.sb.kill(pid);
    }
    for (_, s) in &tcp {
        let _ = lab.sb.kill(s.pid);
    }
    for r in &rows {
        eprintln!("disruption: {r:?}");
    }
    if let Ok(path) = std::env::var("FERRY_DISRUPTION_RESULTS") {
        let note = format!(
            "{} steps of each kind on one node (2 cores, shared), `minSyncPeriod: 1ms`; TCP streams: a pod to a \
             ClusterIP (socket-LB) and an outside host to a NodePort (tc), new connections one after another; UDP: \
             a pod's connected socket to a ClusterIP, one datagram every 100 ms, request/response (`dns`) and \
             one-way (`statsd`, counted by the receiving pods).",
            steps
        );
        std::fs::write(&path, results_table(&note, &rows)).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        eprintln!("disruption: results written to {path}");
    }
    for r in &rows {
        assert_eq!(r.failed, 0, "{}: TCP connections failed: {r:?}", r.step);
        assert!(r.connections > 0, "{}: no TCP connection made: {r:?}", r.step);
        assert_eq!(r.to_removed, 0, "{}: one-way datagrams reached a removed pod after the sync: {r:?}", r.step);
    }
}
