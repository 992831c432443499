//! Maglev on the real kernel: two nodes pick the same backend for the same
//! flow, and removing one backend of ten moves only a small share of flows.

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectOpts, Endpoint};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const CLIENT_IP: &str = "203.0.113.10";
const FLOWS: u16 = 100;

fn manifests(backends: &[usize]) -> String {
    let eps: Vec<String> = backends
        .iter()
        .map(|i| format!("- {{addresses: [10.244.{}.{}], nodeName: node-{}}}", i % 2, 10 + i, ["a", "b"][i % 2]))
        .collect();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  annotations: {{ferry.io/lb-algorithm: maglev}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  ports: [{{name: dns, port: 53, protocol: UDP, nodePort: 30053}}]
status:
  loadBalancer: {{ingress: [{{ip: 5.5.5.5}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
{}
ports: [{{name: dns, port: 5353, protocol: UDP}}]
"#,
        eps.join("\n")
    )
}

/// Which backend each client source port lands on.
fn round(lab: &Lab) -> BTreeMap<u16, SocketAddr> {
    let mut out = BTreeMap::new();
    for sport in 40000..40000 + FLOWS {
        let mut opts = ConnectOpts::new(Endpoint::udp("5.5.5.5:53".parse().unwrap()));
        opts.bind = Some(CLIENT_IP.parse().unwrap());
        opts.source_port = Some(sport);
        let o = lab.connect(At::External(0), &opts).unwrap();
        let r = o.reply().unwrap_or_else(|| panic!("flow from port {sport}: {o:?}"));
        assert_eq!(r.client_peer, "5.5.5.5:53".parse::<SocketAddr>().unwrap(), "reply comes from the VIP");
        out.insert(sport, r.server_local);
    }
    out
}

fn via(lab: &Lab, node: usize) {
    let n = &lab.nodes[node];
    lab.sb
        .ip_batch(lab.host(At::External(0)), &[format!("route replace default via {} dev eth0", n.primary_v4)])
        .unwrap();
}

#[test]
fn maglev_is_consistent_across_nodes_and_disrupts_little() {
    let mut lab = Lab::new("maglev", FERRY.as_ref()).unwrap();
    let a = lab.add_node("node-a").unwrap();
    let b = lab.add_node("node-b").unwrap();
    for i in 0..10usize {
        let node = i % 2;
        let ip: IpAddr = format!("10.244.{node}.{}", 10 + i).parse().unwrap();
        let p = lab.add_pod(node, &format!("be{i}"), &[ip]).unwrap();
        lab.serve(At::Pod(node, p), &format!("be{i}"), vec![Endpoint::udp(SocketAddr::new(ip, 5353))]).unwrap();
    }
    lab.add_external("client", &[CLIENT_IP.parse().unwrap()], a).unwrap();
    let all: Vec<usize> = (0..10).collect();
    for node in [a, b] {
        lab.write_node_config(
            node,
            "clusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\nconntrack: {udpTimeout: 1s}\n",
        )
        .unwrap();
        lab.write_manifests(node, &manifests(&all)).unwrap();
        lab.start_agent(node).unwrap();
    }

    via(&lab, a);
    let first = round(&lab);
    via(&lab, b);
    let second = round(&lab);
    assert_eq!(first, second, "both nodes pick the same backend for the same flow");
    let used: std::collections::BTreeSet<_> = first.values().collect();
    assert!(used.len() >= 8, "{FLOWS} flows spread over only {} of 10 backends", used.len());

    // Remove backend 3 everywhere; wait until its flows have moved (old flow state expires after 1s).
    let removed: SocketAddr = "10.244.1.13:5353".parse().unwrap();
    let fewer: Vec<usize> = all.iter().copied().filter(|i| *i != 3).collect();
    for node in [a, b] {
        lab.write_manifests(node, &manifests(&fewer)).unwrap();
    }
    let victim = *first.iter().find(|(_, be)| **be == removed).expect("some flow used backend 3").0;
    let moved = lab.wait_until(Duration::from_secs(15), |lab| {
        let mut opts = ConnectOpts::new(Endpoint::udp("5.5.5.5:53".parse().unwrap()));
        opts.bind = Some(CLIENT_IP.parse().unwrap());
        opts.source_port = Some(victim);
        lab.connect(At::External(0), &opts).unwrap().reply().is_some_and(|r| r.server_local != removed)
    });
    assert!(moved, "flows of the removed backend never moved:\n{}", lab.agent_log(b));
    std::thread::sleep(Duration::from_millis(1500)); // let the other flows' state expire too
    let third = round(&lab);
    let survivors: Vec<u16> = first.iter().filter(|(_, be)| **be != removed).map(|(p, _)| *p).collect();
    let disrupted = survivors.iter().filter(|p| first[p] != third[p]).count();
    assert!(third.values().all(|be| *be != removed));
    // Maglev's promise: flows of surviving backends mostly stay (the ideal is none).
    assert!(disrupted * 10 <= survivors.len(), "{disrupted} of {} flows of surviving backends moved", survivors.len());
}
