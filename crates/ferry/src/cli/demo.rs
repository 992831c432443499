//! `ferry demo`: a live tour of the datapath in a sandbox of network
//! namespaces (what `make demo` runs). A node with a client pod and three
//! backend pods, a real `ferry run` agent, real connections to a ClusterIP
//! and to a NodePort from outside; a backend is removed and traffic moves;
//! one flow is explained; everything is removed at the end.

use crate::lab::{At, Lab};
use anyhow::Context;
use clap::Args;
use ferry_sandbox::probe::{ConnectOpts, Endpoint, Observation};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Datapath the demo node runs: bpf or nftables.
    #[arg(long, default_value = "bpf", value_parser = ["bpf", "nftables"])]
    pub datapath: String,
    /// Connections per round.
    #[arg(long, default_value_t = 60)]
    pub connections: u32,
}

const CLIENT: At = At::Pod(0, 0);
const BACKENDS: [&str; 3] = ["web-1", "web-2", "web-3"];

fn say(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn manifests(backends: &[&str]) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| {
            let n = &b[4..];
            format!("- {{addresses: [10.244.0.2{n}], nodeName: node-a, targetRef: {{kind: Pod, name: {b}}}}}")
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
{}
ports: [{{name: http, port: 8080}}]
"#,
        if endpoints.is_empty() { "[]".to_string() } else { endpoints.join("\n") }
    )
}

/// Connects `count` times and prints how the connections spread over backends.
fn spread(lab: &Lab, from: At, target: &str, count: u32) -> anyhow::Result<BTreeMap<String, u32>> {
    let opts = ConnectOpts::new(Endpoint::tcp(target.parse()?));
    let mut tally: BTreeMap<String, u32> = BTreeMap::new();
    let mut seen_as = None;
    for o in lab.connect_many(from, &opts, count)? {
        let key = match &o {
            Observation::Reply(r) => {
                seen_as.get_or_insert(r.server_peer.ip());
                r.server.clone()
            }
            other => format!("{other:?}"),
        };
        *tally.entry(key).or_default() += 1;
    }
    for (server, n) in &tally {
        println!("  {server:<8} {n:>4}  {}", "#".repeat(*n as usize));
    }
    if let Some(ip) = seen_as {
        println!("  (the backends saw the client as {ip})");
    }
    Ok(tally)
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let ferry = std::env::current_exe().context("locating the ferry binary")?;
    say(&format!("Building a sandbox node (network namespaces, datapath: {})", args.datapath));
    let mut lab = Lab::new("demo", &ferry)?;
    let node = lab.add_node("node-a")?;
    lab.add_pod(node, "client", &[ip("10.244.0.10")])?;
    for b in BACKENDS {
        let addr = format!("10.244.0.2{}", &b[4..]);
        let p = lab.add_pod(node, b, &[ip(&addr)])?;
        lab.serve(At::Pod(node, p), b, vec![Endpoint::tcp(SocketAddr::new(ip(&addr), 8080))])?;
        println!("  pod {b} at {addr}, serving TCP 8080");
    }
    let outside = lab.add_external("outside client", &[ip("198.51.100.7")], node)?;
    println!("  client pod at 10.244.0.10; an outside client at 198.51.100.7");
    lab.write_node_config(
        node,
        &format!("datapath: {}\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\n", args.datapath),
    )?;
    lab.write_manifests(node, &manifests(&BACKENDS))?;
    println!("  Service demo/web: ClusterIP 10.96.0.10:80, NodePort 30080 -> {} on 8080", BACKENDS.join(", "));
    lab.start_agent(node)?;
    println!("  `ferry run` started on node-a and programmed the datapath");
    let node_ip = lab.nodes[node].primary_v4;

    say(&format!("The client pod connects to the ClusterIP {} times", args.connections));
    spread(&lab, CLIENT, "10.96.0.10:80", args.connections)?;

    say(&format!("The outside client connects to the NodePort {node_ip}:30080 {} times", args.connections));
    spread(&lab, At::External(outside), &format!("{node_ip}:30080"), args.connections)?;
    println!("  (externalTrafficPolicy: Cluster, so the node SNATs outside clients to its own address)");

    say("web-2 is removed from the EndpointSlice");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    lab.write_manifests(node, &manifests(&["web-1", "web-3"]))?;
    // The agent says when a sync that read the new file is programmed.
    if !lab.wait_until(Duration::from_secs(10), |lab| lab.synced_input(node).is_some_and(|t| t > before)) {
        anyhow::bail!("the agent did not program the change within 10 s; agent log:\n{}", lab.agent_log(node));
    }
    let moved = lab.wait_until(Duration::from_secs(10), |lab| {
        let opts = ConnectOpts::new(Endpoint::tcp("10.96.0.10:80".parse().expect("constant")));
        lab.connect_many(CLIENT, &opts, 10)
            .map(|obs| obs.iter().all(|o| o.reply().is_some_and(|r| r.server != "web-2")))
            .unwrap_or(false)
    });
    if !moved {
        anyhow::bail!("traffic did not leave web-2 within 10 s; agent log:\n{}", lab.agent_log(node));
    }
    println!("  the agent re-programmed the datapath; the client connects {} times again:", args.connections);
    let tally = spread(&lab, CLIENT, "10.96.0.10:80", args.connections)?;
    if tally.contains_key("web-2") {
        anyhow::bail!("web-2 still got connections after it was removed; agent log:\n{}", lab.agent_log(node));
    }

    if args.datapath == "bpf" {
        say("ferry status: what the datapath holds now");
        let status = std::process::Command::new(&ferry)
            .args(["status", "--pin-dir"])
            .arg(&lab.nodes[node].pin_dir)
            .output()
            .context("running ferry status")?;
        print!("{}", String::from_utf8_lossy(&status.stdout));
    }

    say("ferry explain: why a pod's connection to the ClusterIP goes where it goes");
    let explain = std::process::Command::new(&ferry)
        .args(["explain", "--from", "10.244.0.10", "--to", "10.96.0.10:80", "--manifests"])
        .arg(&lab.nodes[node].manifests)
        .arg("--node-config")
        .arg(&lab.nodes[node].config)
        .output()
        .context("running ferry explain")?;
    print!("{}", String::from_utf8_lossy(&explain.stdout));

    say("Cleaning up: agent, datapath pins, namespaces and cgroups");
    let pins: PathBuf = lab.nodes[node].pin_dir.clone();
    drop(lab);
    println!("  removed (pin directory {} exists: {})", pins.display(), pins.exists());
    Ok(ExitCode::SUCCESS)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("constant address")
}
