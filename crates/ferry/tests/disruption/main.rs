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

/// Lets a client open thousands of connections a second from one address to
/// one destination (in its own namespace only): TIME_WAIT reuse and a wide
/// port range, without which it runs out of local ports (EADDRNOTAVAIL before
/// any packet is sent: the client's limit, not the datapath's). An outside
/// client's ports stay inside the node's `natPortRange` (1024-29999 by
/// default): SNAT keeps such a port, and a reused 4-tuple takes over its
/// predecessor's. A port outside it is given a NAT port that the closed flow
/// then holds for the close timeout, which bounds SNATed connections to about
/// 2,900 a second per backend (README `natPortRange`); a one-address stream
/// at this rate met that bound (`drop_nat_exhausted`): a capacity limit, not
/// a disruption.
fn tune_client(lab: &Lab, at: At) {
    let range = if matches!(at, At::External(_)) { "1024 29999" } else { "1024 65000" };
    for (key, value) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", range)] {
        let out = lab.sb.command(lab.host(at), "sysctl").args(["-qw", &format!("{key}={value}")]).output().unwrap();
        assert!(out.status.success(), "sysctl {key} in {at:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
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
        // Bounded, and far beyond a long run: the pod's stream makes up to ~9,000 a
        // second, so a million ran out in the middle of `make disruption`.
        .args(opts.to_args(ConnectMode::Count(100_000_000)))
        .stdin(Stdio::null())
        .stdout(File::create(&output).unwrap())
        .stderr(Stdio::null());
    let pid = lab.sb.spawn_in(&host, cgroup.as_deref(), cmd).unwrap();
    Stream { pid, output }
}

/// The stream's observations so far (complete lines only).
fn observed(s: &Stream) -> Vec<Observation> {
    ferry::lab::observed_in(&s.output)
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

    for at in [POD_CLIENT, OUTSIDE] {
        tune_client(&lab, at);
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

#[path = "../common/layout_1.rs"]
mod layout_1;
mod steps;
