//! The disruption suite (short form; `make disruption` runs more rounds), on the
//! real kernel (needs root; never skipped).
//!
//! One node, its agent (`ferry run`) serving a manifest directory that changes
//! every round: endpoints of a steady service added and removed, a `churn`
//! service added and deleted, and a random half of 200 filler services
//! replaced, so each sync is thousands of map writes. While that goes on, two
//! background clients open new TCP connections without pause (a pod to the
//! steady ClusterIP through socket-LB, an outside host to its NodePort through
//! the tc programs), and two connections stay open on a `held` service (one of
//! each path). Each round the agent is SIGKILLed at a pseudo-random point after
//! the manifests change (during the sync or just after it), then restarted.
//! After every round:
//! - `ferry status --verify` finds no difference between the maps and the Plan;
//! - both held connections still answer;
//! - no new connection to the steady service failed, and new ones reach only
//!   its current endpoints;
//! - the `churn` service answers from its endpoints when the manifests have
//!   it, and does not answer at all when they do not (the only connections
//!   the model says must fail).
//!
//! Then `--verify` itself is shown to see drift: entries removed from and added
//! to the pinned maps behind the agent's back are each reported, exit code 1.
//!
//! Seed: `FERRY_DISRUPTION_SEED` (printed either way); rounds:
//! `FERRY_DISRUPTION_ROUNDS` (default 4).

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectMode, ConnectOpts, Endpoint, Observation, ServeOpts};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const NODE: usize = 0;
const POD_CLIENT: At = At::Pod(0, 0);
const OUTSIDE: At = At::External(0);
/// Backends of the steady and churn services (be21 is always a steady endpoint).
const BACKENDS: [u8; 4] = [21, 22, 23, 24];
const FILLERS: u16 = 200;
const STEADY: &str = "10.96.0.20:80";
const HELD: &str = "10.96.0.21:80";
const CHURN: &str = "10.96.0.30:80";
const STEADY_NODE_PORT: u16 = 30080;
const HELD_NODE_PORT: u16 = 30081;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod_ip(n: u8) -> IpAddr {
    ip(&format!("10.244.1.{n}"))
}

/// splitmix64: a seeded sequence, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// What the manifests say this round (the model the checks compare with).
#[derive(Debug, Clone)]
struct Model {
    steady: BTreeSet<u8>,
    /// `None`: the churn service is deleted.
    churn: Option<BTreeSet<u8>>,
    fillers: Vec<(u16, BTreeSet<u8>)>,
}

impl Model {
    fn first() -> Model {
        Model {
            steady: BTreeSet::from([21, 22]),
            churn: Some(BTreeSet::from([23])),
            fillers: (0..FILLERS).map(|i| (i, BTreeSet::from([BACKENDS[usize::from(i) % 4]]))).collect(),
        }
    }

    fn subset(rng: &mut Rng) -> BTreeSet<u8> {
        let mut s: BTreeSet<u8> = BACKENDS.iter().copied().filter(|_| rng.coin()).collect();
        if s.is_empty() {
            s.insert(BACKENDS[rng.below(4) as usize]);
        }
        s
    }

    /// The next round: steady endpoints changed, churn toggled, half the fillers replaced.
    fn next(&self, rng: &mut Rng) -> Model {
        let mut steady = Model::subset(rng);
        steady.insert(21);
        let churn = match &self.churn {
            Some(_) if rng.coin() => None,
            _ => Some(Model::subset(rng)),
        };
        // Every filler is deleted with probability 1/8 (and comes back in a later round under the
        // same name); the others keep or replace their endpoints.
        let mut fillers = Vec::new();
        for i in 0..FILLERS {
            if rng.below(8) == 0 {
                continue;
            }
            match self.fillers.iter().find(|(j, _)| *j == i) {
                Some((_, eps)) if rng.coin() => fillers.push((i, eps.clone())),
                _ => fillers.push((i, Model::subset(rng))),
            }
        }
        Model { steady, churn, fillers }
    }

    fn yaml(&self) -> String {
        let mut out = String::new();
        service(&mut out, "held", "10.96.0.21", Some(HELD_NODE_PORT), &BTreeSet::from([21]));
        service(&mut out, "steady", "10.96.0.20", Some(STEADY_NODE_PORT), &self.steady);
        if let Some(eps) = &self.churn {
            service(&mut out, "churn", "10.96.0.30", None, eps);
        }
        for (i, eps) in &self.fillers {
            service(&mut out, &format!("filler-{i}"), &format!("10.96.{}.{}", 1 + i / 250, 1 + i % 250), None, eps);
        }
        out
    }
}

fn service(out: &mut String, name: &str, cluster_ip: &str, node_port: Option<u16>, eps: &BTreeSet<u8>) {
    let (kind, np) = match node_port {
        Some(p) => ("NodePort", format!(", nodePort: {p}")),
        None => ("ClusterIP", String::new()),
    };
    let endpoints: Vec<String> =
        eps.iter().map(|n| format!("{{addresses: [\"{}\"], nodeName: node-a}}", pod_ip(*n))).collect();
    out.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  type: {kind}\n  \
         clusterIP: \"{cluster_ip}\"\n  clusterIPs: [\"{cluster_ip}\"]\n  ipFamilies: [IPv4]\n  \
         ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080{np}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nendpoints: [{}]\nports: [{{name: http, port: 8080, protocol: TCP}}]\n",
        endpoints.join(", ")
    ));
}

/// A client opening new connections one after another in the background; its
/// observations are read from its output file while it runs.
struct Stream {
    pid: u32,
    output: PathBuf,
}

fn stream(lab: &mut Lab, at: At, target: SocketAddr, bind: Option<IpAddr>, name: &str) -> Stream {
    let mut opts = ConnectOpts::new(Endpoint::tcp(target));
    opts.bind = bind;
    let output = lab.state.join(name);
    let host = lab.host(at).clone();
    let cgroup = match at {
        At::Pod(n, _) | At::Node(n) => Some(lab.nodes[n].cgroup.clone()),
        At::External(_) => None,
    };
    let mut cmd = lab.sb.command(&host, &lab.probe.program);
    cmd.args(&lab.probe.leading_args)
        .args(opts.to_args(ConnectMode::Count(1_000_000)))
        .stdin(Stdio::null())
        .stdout(File::create(&output).unwrap())
        .stderr(Stdio::null());
    let pid = lab.sb.spawn_in(&host, cgroup.as_deref(), cmd).unwrap();
    Stream { pid, output }
}

/// The stream's observations so far (complete lines only).
fn observed(s: &Stream) -> Vec<Observation> {
    let text = std::fs::read_to_string(&s.output).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client output line {l:?}: {e}")))
        .collect()
}

/// A held connection: one exchange per line written to it.
struct Held {
    stdin: std::process::ChildStdin,
    replies: Receiver<String>,
}

fn hold(lab: &mut Lab, at: At, target: SocketAddr) -> Held {
    let (_pid, stdin, stdout) =
        lab.spawn_held(at, &ConnectOpts::new(Endpoint::tcp(target)), Duration::from_secs(3600)).unwrap();
    let (tx, replies) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut h = Held { stdin, replies };
    assert_eq!(h.answer(false), Ok("be21".into()), "the held connection to {target} did not open");
    h
}

impl Held {
    /// One more exchange (or just the first one): the server that answered, or what went wrong.
    fn answer(&mut self, send: bool) -> Result<String, String> {
        if send {
            self.stdin.write_all(b"x\n").map_err(|e| format!("writing to the held client: {e}"))?;
            self.stdin.flush().map_err(|e| format!("writing to the held client: {e}"))?;
        }
        // A guard against a hung client, not a timing assertion.
        match self.replies.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let o: Observation = serde_json::from_str(&line).map_err(|e| format!("{line:?}: {e}"))?;
                o.reply().map(|r| r.server.clone()).ok_or_else(|| format!("{o:?}"))
            }
            Err(RecvTimeoutError::Timeout) => Err("no answer from the held client".into()),
            Err(RecvTimeoutError::Disconnected) => Err("the held client exited".into()),
        }
    }
}

/// Where a kill landed, by the maps left behind: 0 still equal to the previous
/// Plan, 1 equal to neither (half way), 2 equal to the new Plan.
fn landing(lab: &Lab, previous: &std::path::Path, next: &std::path::Path) -> usize {
    match (verify_against(lab, previous).0, verify_against(lab, next).0) {
        (0, _) => 0,
        (_, 0) => 2,
        _ => 1,
    }
}

const KILLED: [&str; 3] = ["before any write", "half way through a sync", "after the sync"];

/// Starts the node's agent as `Lab::start_agent` does, without waiting for its first sync.
fn spawn_unwaited(lab: &mut Lab, log: &std::path::Path) -> u32 {
    let n = &lab.nodes[NODE];
    let host = n.host.clone();
    let log = File::create(log).unwrap();
    let mut cmd = lab.sb.command(&host, FERRY);
    cmd.args(["run", "--manifests"])
        .arg(&n.manifests)
        .arg("--node-config")
        .arg(&n.config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    lab.sb.spawn_in(&host, None, cmd).unwrap()
}

/// `ferry status --verify` on the node, as an operator runs it: (exit code, output).
fn verify(lab: &Lab) -> (i32, String) {
    verify_against(lab, &lab.nodes[NODE].manifests)
}

/// `ferry status --verify` against the manifests in `dir`.
fn verify_against(lab: &Lab, dir: &std::path::Path) -> (i32, String) {
    let n = &lab.nodes[NODE];
    let out = lab
        .sb
        .command(&n.host, FERRY)
        .args(["status", "--verify", "--manifests"])
        .arg(dir)
        .arg("--node-config")
        .arg(&n.config)
        .output()
        .expect("running ferry status --verify");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn servers(obs: &[Observation]) -> Result<BTreeSet<String>, String> {
    obs.iter().map(|o| o.reply().map(|r| r.server.clone()).ok_or_else(|| format!("{o:?}"))).collect()
}

fn names(eps: &BTreeSet<u8>) -> BTreeSet<String> {
    eps.iter().map(|n| format!("be{n}")).collect()
}

#[test]
fn sigkill_at_random_points_of_changing_syncs_leaves_the_plan_in_the_maps_and_no_connection_broken() {
    let seed: u64 = match std::env::var("FERRY_DISRUPTION_SEED") {
        Ok(s) => s.parse().expect("FERRY_DISRUPTION_SEED is a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    let rounds: usize = std::env::var("FERRY_DISRUPTION_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    eprintln!("disruption: seed {seed} (FERRY_DISRUPTION_SEED={seed} to replay), {rounds} rounds");
    let mut rng = Rng(seed);

    let mut lab = Lab::new("dsr", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    // The outside host's stream uses .10, its per-round checks .11 (see below).
    lab.add_external("outside", &[ip("203.0.113.10"), ip("203.0.113.11")], node).unwrap();
    lab.add_pod(node, "client", &[ip("10.244.1.10")]).unwrap();
    for n in BACKENDS {
        let name = format!("be{n}");
        let p = lab.add_pod(node, &name, &[pod_ip(n)]).unwrap();
        let mut serve = ServeOpts::new(&name, vec![Endpoint::tcp(SocketAddr::new(pod_ip(n), 8080))]);
        serve.echo_lines = true;
        serve.idle_timeout = Duration::from_secs(3600);
        lab.serve_with(At::Pod(node, p), serve).unwrap();
    }
    // minSyncPeriod 1ms: a change is synced as soon as it is seen, so the kill
    // delays below span the sync instead of the agent's batching wait.
    let config = "datapath: bpf\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\nminSyncPeriod: 1ms\n";
    lab.write_node_config(node, config).unwrap();
    let mut model = Model::first();
    lab.write_manifests(node, &model.yaml()).unwrap();
    lab.start_agent(node).unwrap();
    let (code, text) = verify(&lab);
    assert_eq!(code, 0, "--verify after the first sync:\n{text}");

    // The clients open thousands of connections a second from one address to one
    // destination: without TIME_WAIT reuse and the full port range they run out of
    // local ports (EADDRNOTAVAIL before any packet is sent), which is the client's
    // limit, not the datapath's.
    for at in [POD_CLIENT, OUTSIDE] {
        for (key, value) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "1024 65000")] {
            let out = lab.sb.command(lab.host(at), "sysctl").args(["-qw", &format!("{key}={value}")]).output().unwrap();
            assert!(out.status.success(), "sysctl {key} in {at:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let node_ip = IpAddr::V4(lab.nodes[node].primary_v4);
    let mut held_pod = hold(&mut lab, POD_CLIENT, HELD.parse().unwrap());
    let mut held_outside = hold(&mut lab, OUTSIDE, SocketAddr::new(node_ip, HELD_NODE_PORT));
    let steady_np = SocketAddr::new(node_ip, STEADY_NODE_PORT);
    let streams = [
        ("pod -> ClusterIP (socket-LB)", stream(&mut lab, POD_CLIENT, STEADY.parse().unwrap(), None, "stream-cip.out")),
        ("outside -> NodePort (tc)", stream(&mut lab, OUTSIDE, steady_np, Some(ip("203.0.113.10")), "stream-np.out")),
    ];
    let mut checked = [0usize; 2];
    // Where the kills landed: maps still equal to the previous round's Plan, half
    // way between the two Plans, or already equal to the new one.
    let mut landed = [0usize; 3];
    let (previous, next) = (lab.state.join("previous"), lab.state.join("next"));
    std::fs::create_dir_all(&previous).unwrap();
    std::fs::create_dir_all(&next).unwrap();

    for round in 1..=rounds {
        std::fs::write(previous.join("cluster.yaml"), model.yaml()).unwrap();
        model = model.next(&mut rng);
        std::fs::write(next.join("cluster.yaml"), model.yaml()).unwrap();
        lab.write_manifests(node, &model.yaml()).unwrap();
        // The kill lands anywhere from before the agent read the change to after it
        // applied it: a delay from one of three bands (< 10 ms, < 100 ms, < 500 ms; the
        // agent reads and parses the changed file for a good part of that).
        let band = [10_000, 100_000, 500_000][rng.below(3) as usize];
        std::thread::sleep(Duration::from_micros(rng.below(band)));
        lab.kill_agent(node).unwrap();
        let at = landing(&lab, &previous, &next);
        landed[at] += 1;
        // A second kill, aimed at the restarted agent's first sync (a full one: adopt,
        // then every difference from the new Plan written): started by hand, killed at
        // a pseudo-random point 0.6 to 1.4 s after it listed the manifests (installing
        // the datapath takes most of a second; the sync follows).
        let restart_log = lab.state.join(format!("restart-{round}.log"));
        let pid = spawn_unwaited(&mut lab, &restart_log);
        let listed = lab.wait_until(Duration::from_secs(30), |_| {
            std::fs::read_to_string(&restart_log).unwrap_or_default().contains("Services and EndpointSlices synced")
        });
        assert!(
            listed,
            "round {round}: the restarted agent never listed its manifests:\n{}",
            std::fs::read_to_string(&restart_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_micros(600_000 + rng.below(800_000)));
        let _ = lab.sb.kill(pid);
        let at2 = landing(&lab, &previous, &next);
        landed[at2] += 1;
        lab.start_agent(node).unwrap_or_else(|e| panic!("round {round}: restarting the agent: {e:#}"));

        let (code, text) = verify(&lab);
        assert_eq!(code, 0, "round {round} (seed {seed}): --verify after the restart found drift:\n{text}");
        assert_eq!(held_pod.answer(true), Ok("be21".into()), "round {round}: the held pod connection");
        assert_eq!(held_outside.answer(true), Ok("be21".into()), "round {round}: the held NodePort connection");

        // Every connection the streams made so far answered (none had to fail).
        for (i, (what, s)) in streams.iter().enumerate() {
            let obs = observed(s);
            let failed: Vec<&Observation> = obs.iter().filter(|o| o.reply().is_none()).collect();
            assert!(
                failed.is_empty(),
                "round {round} (seed {seed}): {} of {} new connections {what} failed, e.g. {:?}",
                failed.len(),
                obs.len(),
                failed.first()
            );
            assert!(obs.len() > checked[i], "round {round}: the stream {what} made no new connection");
            checked[i] = obs.len();
        }
        // New connections reach only the current endpoints.
        let want = names(&model.steady);
        // From the outside, from an address the stream does not use: the stream reuses its
        // TIME_WAIT 4-tuples (tcp_tw_reuse), and a reused tuple whose conntrack entry is
        // still there goes to that entry's backend (see the README).
        let checks = [(POD_CLIENT, STEADY.parse().unwrap(), None), (OUTSIDE, steady_np, Some(ip("203.0.113.11")))];
        for (at, target, bind) in checks {
            let mut opts = ConnectOpts::new(Endpoint::tcp(target));
            opts.bind = bind;
            let got = servers(&lab.connect_many(at, &opts, 8).unwrap());
            let got = got.unwrap_or_else(|e| panic!("round {round}: a new connection to {target} failed: {e}"));
            assert!(got.is_subset(&want), "round {round}: {target} answered from {got:?}, endpoints are {want:?}");
        }
        let mut churn = ConnectOpts::new(Endpoint::tcp(CHURN.parse().unwrap()));
        churn.timeout = Duration::from_secs(1);
        let o = lab.connect(POD_CLIENT, &churn).unwrap();
        match &model.churn {
            Some(eps) => {
                let server = o.reply().map(|r| r.server.clone());
                assert!(
                    server.as_ref().is_some_and(|s| names(eps).contains(s)),
                    "round {round}: the churn service ({eps:?}) answered {o:?}"
                );
            }
            None => assert!(o.reply().is_none(), "round {round}: the deleted churn service answered: {o:?}"),
        }
        eprintln!(
            "round {round}: steady {:?}, churn {:?}, {} fillers; killed {}, then {}; verify clean; {} + {} new connections so far, 0 failed",
            model.steady,
            model.churn,
            model.fillers.len(),
            KILLED[at],
            KILLED[at2],
            checked[0],
            checked[1]
        );
    }
    for (_, s) in streams {
        let _ = lab.sb.kill(s.pid);
    }
    eprintln!(
        "disruption: {} kills in {rounds} rounds: before any write {}, half way through a sync {}, after the sync {}",
        2 * rounds,
        landed[0],
        landed[1],
        landed[2]
    );

    // --verify sees drift: with the agent down, a frontend is removed, an extra one
    // added and a backend no slot uses written behind its back.
    lab.kill_agent(node).unwrap();
    let pin_dir = lab.nodes[node].pin_dir.clone();
    let maps = ferry_bpf::Maps::open(&pin_dir).unwrap();
    let dump = maps.dump();
    let steady_key = ferry_bpf::entries::FeKey {
        addr: ferry_bpf::entries::words(&ip("10.96.0.20")),
        port: 80,
        proto: 6,
        family: ferry_bpf::entries::family_of(&ip("10.96.0.20")),
    };
    let (_, steady_val) = *dump.frontends.iter().find(|(k, _)| *k == steady_key).expect("the steady frontend");
    let extra_key = ferry_bpf::entries::FeKey { port: 81, ..steady_key };
    let stray = ferry_bpf::entries::Backend {
        addr: ferry_bpf::entries::words(&ip("10.244.1.99")),
        port: 8080,
        family: steady_key.family,
        flags: 0,
    };
    let free_id = dump.backends.iter().map(|(id, _)| *id).max().unwrap_or(0) + 1;
    maps.apply(&[
        ferry_bpf::MapOp::DelFrontend(steady_key),
        ferry_bpf::MapOp::PutFrontend(extra_key, steady_val),
        ferry_bpf::MapOp::PutBackend(free_id, stray),
    ])
    .unwrap();
    drop(maps);
    let (code, text) = verify(&lab);
    eprintln!("--verify on a tampered datapath:\n{text}");
    assert_eq!(code, 1, "--verify must exit 1 on drift:\n{text}");
    for (kind, map, entry) in [
        ("missing", "ferry_frontends", "10.96.0.20:80/TCP"),
        ("extra", "ferry_frontends", "10.96.0.20:81/TCP"),
        ("orphaned", "ferry_backends", "10.244.1.99:8080"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(kind) && l.contains(map) && l.contains(entry)),
            "--verify did not report {kind} {map} {entry}:\n{text}"
        );
    }
    // The restarted agent repairs it, and --verify agrees.
    lab.start_agent(node).unwrap();
    let (code, text) = verify(&lab);
    assert_eq!(code, 0, "--verify after the agent repaired the drift:\n{text}");
    assert_eq!(held_pod.answer(true), Ok("be21".into()), "the held pod connection at the end");
    assert_eq!(held_outside.answer(true), Ok("be21".into()), "the held NodePort connection at the end");
}

// ---- UDP clients and an endpoint rollout (issue 13 §6) ----

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
