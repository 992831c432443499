//! `ferry agent` against the fake Kubernetes API server and the real eBPF
//! datapath, in a lab of network namespaces. Needs root; never skipped.
//!
//! The fake API server (ferry-testapi, the real list/watch protocol) runs on
//! a thread that has joined the lab node's network namespace, so the agent
//! inside that namespace reaches it on 127.0.0.1 through a plain kubeconfig,
//! exactly as it would reach a real API server. The tests change objects,
//! drop watches, expire the watch history and take the server down, and
//! check what real connections from a pod do, plus the agent's /healthz,
//! /livez, /metrics and health-check node port. Every wait is bounded and
//! nothing asserts on elapsed time.

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectOpts, Endpoint};
use ferry_testapi::{FakeApi, NetnsApi, ResourceType};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const CLIENT: At = At::Pod(0, 0);
/// The bound on any one wait: kube's watcher backs off up to 30 s after errors.
const WAIT: Duration = Duration::from_secs(60);
const VIP: &str = "10.96.0.10:80";

/// Joins the network namespace at `path` (this thread only).
fn enter_netns(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: setns on a valid fd; it changes only the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns into {}: {}", path.display(), std::io::Error::last_os_error());
}

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn node_object(lab: &Lab, deleting: bool) -> Node {
    let n = &lab.nodes[0];
    let mut node: Node = yaml("metadata: {name: node-a}\n");
    node.status = Some(NodeStatus {
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".into(), address: n.primary_v4.to_string() },
            NodeAddress { type_: "InternalIP".into(), address: n.primary_v6.to_string() },
        ]),
        ..Default::default()
    });
    if deleting {
        node.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    }
    node
}

fn web_service() -> Service {
    yaml(
        "metadata: {name: web, namespace: demo}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
    )
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` and a health-check node port.
fn local_service() -> Service {
    yaml(
        "metadata: {name: lb, namespace: demo}\n\
         spec: {type: LoadBalancer, clusterIP: 10.96.0.20, externalTrafficPolicy: Local, healthCheckNodePort: 32100,\n\
         \x20 ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]}\n",
    )
}

/// An EndpointSlice of `service` with backends 10.244.0.<b> on node-a, stamped
/// with the time of the change that caused it.
fn slice(name: &str, service: &str, backends: &[&str]) -> EndpointSlice {
    let eps: Vec<String> =
        backends.iter().map(|b| format!("{{addresses: [10.244.0.{b}], nodeName: node-a}}")).collect();
    let mut s: EndpointSlice = yaml(&format!(
        "metadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nendpoints: [{}]\nports: [{{name: http, port: 8080}}]\n",
        eps.join(", ")
    ));
    s.metadata.annotations =
        Some([("endpoints.kubernetes.io/last-change-trigger-time".to_string(), Timestamp::now().to_string())].into());
    s
}

/// A node, a client pod (.10) and three backends (.21-.23) serving TCP 8080.
fn lab() -> Lab {
    let mut lab = Lab::new("agent", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    lab.add_pod(node, "client", &["10.244.0.10".parse().unwrap()]).unwrap();
    for b in ["21", "22", "23"] {
        let ip: IpAddr = format!("10.244.0.{b}").parse().unwrap();
        let p = lab.add_pod(node, &format!("be{b}"), &[ip]).unwrap();
        lab.serve(At::Pod(node, p), &format!("be{b}"), vec![Endpoint::tcp(SocketAddr::new(ip, 8080))]).unwrap();
    }
    lab
}

/// The running agent: its pid, log and ready file.
struct Agent {
    pid: u32,
    log: PathBuf,
    ready: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_ready(&self) -> bool {
        self.ready.exists()
    }
}

/// Starts `ferry agent` in node 0 with a kube-proxy config (the agent's
/// periods, cluster CIDR, node name) plus a ferry node config (addresses,
/// pins, service CIDR), pointed at `api` through a kubeconfig. No primaryIPs:
/// the agent takes them from the Node object.
fn start_agent(lab: &mut Lab, api: &FakeApi) -> Agent {
    let n = &lab.nodes[0];
    let dir = lab.state.join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = lab.write_kubeconfig(&api.url()).unwrap();
    let kube_proxy = dir.join("kube-proxy.yaml");
    std::fs::write(
        &kube_proxy,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         hostnameOverride: node-a\nclusterCIDR: 10.244.0.0/16\nmode: nftables\n\
         nftables: {minSyncPeriod: 100ms, syncPeriod: 2s}\noomScoreAdj: -999\n",
    )
    .unwrap();
    let ips: Vec<String> = lab.node_ips(0).iter().map(|ip| format!("\"{ip}\"")).collect();
    let node_config = dir.join("node.yaml");
    std::fs::write(
        &node_config,
        format!(
            "nodeIPs: [{}]\nserviceCIDRs: [10.96.0.0/16]\nbpf: {{pinPath: {}, cgroupPath: {}}}\n",
            ips.join(", "),
            n.pin_dir.display(),
            n.cgroup.display()
        ),
    )
    .unwrap();
    let log_path = dir.join("agent.log");
    let log = File::create(&log_path).unwrap();
    let mut cmd = lab.sb.command(&n.host, FERRY);
    cmd.arg("agent")
        .arg("--config")
        .arg(&kube_proxy)
        .arg("--node-config")
        .arg(&node_config)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--ready-file")
        .arg(dir.join("ready"))
        .env("FERRY_LOG", "info,kube=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let host = n.host.clone();
    let pid = lab.sb.spawn_in(&host, None, cmd).unwrap();
    Agent { pid, log: log_path, ready: dir.join("ready") }
}

fn tcp(target: &str) -> ConnectOpts {
    let mut o = ConnectOpts::new(Endpoint::tcp(target.parse().unwrap()));
    o.timeout = Duration::from_secs(2);
    o
}

/// Which backends `count` new connections to the VIP reached ("-" for no reply).
fn servers(lab: &Lab, count: u32) -> BTreeSet<String> {
    let obs = lab.connect_many(CLIENT, &tcp(VIP), count).unwrap();
    obs.iter().map(|o| o.reply().map_or_else(|| "-".to_string(), |r| r.server.clone())).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Waits until connections to the VIP reach exactly `want`.
fn converge(lab: &Lab, agent: &Agent, want: &[&str], what: &str) {
    let ok = lab.wait_until(WAIT, |lab| servers(lab, 30) == set(want));
    assert!(ok, "{what}: traffic never reached exactly {want:?}; last {:?}\n{}", servers(lab, 30), agent.log());
}

/// An HTTP GET from inside node 0's namespace: (status, headers, body), or
/// `None` if nothing answers.
fn http_get(lab: &Lab, addr: SocketAddr, path: &str) -> Option<(u16, String, String)> {
    let netns = lab.sb.netns_path(&lab.nodes[0].host);
    let path = path.to_string();
    std::thread::spawn(move || {
        enter_netns(&netns);
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.get(9..12)?.parse().ok()?;
        Some((status, head.to_lowercase(), body.to_string()))
    })
    .join()
    .unwrap()
}

fn healthz(lab: &Lab, path: &str) -> Option<(u16, serde_json::Value)> {
    let (status, _, body) = http_get(lab, "127.0.0.1:10256".parse().unwrap(), path)?;
    Some((status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} body {body:?}: {e}"))))
}

fn metrics(lab: &Lab) -> String {
    http_get(lab, "127.0.0.1:10249".parse().unwrap(), "/metrics").expect("/metrics answers").2
}

/// The value of the first sample line starting with `series` (name plus labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

fn lists_of(api: &FakeApi, resource: ResourceType) -> usize {
    api.requests().iter().filter(|r| r.is_list() && r.resource() == Some(resource)).count()
}

#[test]
fn nothing_is_programmed_before_sync_then_changes_follow() {
    let mut lab = lab();
    let node_api = NetnsApi::start(lab.sb.netns_path(&lab.nodes[0].host), Default::default())
        .expect("starting the fake API server in the node");
    let api = node_api.api();
    api.apply(&node_object(&lab, false));
    api.apply(&web_service());
    api.apply(&local_service());
    api.apply(&slice("web-1", "web", &["21", "22"]));
    api.apply(&slice("lb-1", "lb", &["21"]));
    // Hold the EndpointSlices back: the Services are listed, their endpoints are not.
    api.set_resource_down(ResourceType::EndpointSlices, true);
    let agent = start_agent(&mut lab, api);

    let seen = lab.wait_until(WAIT, |_| {
        lists_of(api, ResourceType::Services) >= 1 && lists_of(api, ResourceType::EndpointSlices) >= 2
    });
    assert!(seen, "the agent never listed Services and tried EndpointSlices\n{}", agent.log());
    let o = lab.connect(CLIENT, &tcp(VIP)).unwrap();
    assert!(o.reply().is_none(), "the VIP must not be load-balanced before EndpointSlices are listed: {o:?}");
    assert!(!agent.is_ready(), "nothing may be programmed before Synced\n{}", agent.log());
    let (status, body) = healthz(&lab, "/healthz").expect("/healthz answers while starting");
    assert_eq!(status, 200, "a starting proxy is healthy: {body}");

    api.set_resource_down(ResourceType::EndpointSlices, false);
    assert!(lab.wait_until(WAIT, |_| agent.is_ready()), "no first sync\n{}", agent.log());
    converge(&lab, &agent, &["be21", "be22"], "first sync");
    let log = agent.log();
    assert!(log.contains("oomScoreAdj is ignored"), "ignored kube-proxy fields are reported\n{log}");
    assert!(log.contains("primary addresses from the Node object"), "{log}");

    // A second slice of the same Service is merged with the first.
    api.apply(&slice("web-2", "web", &["23"]));
    converge(&lab, &agent, &["be21", "be22", "be23"], "slice added");
    // An update removes a backend; a delete removes a slice.
    api.apply(&slice("web-1", "web", &["21"]));
    converge(&lab, &agent, &["be21", "be23"], "slice updated");
    api.delete::<EndpointSlice>("demo", "web-2");
    converge(&lab, &agent, &["be21"], "slice deleted");

    // The health-check node port answers on the node's addresses, as kube-proxy's does.
    let hc = SocketAddr::new(IpAddr::V4(lab.nodes[0].primary_v4), 32100);
    let (status, headers, body) = http_get(&lab, hc, "/").expect("the health-check node port answers");
    assert_eq!(status, 200, "{body}");
    assert!(headers.contains("x-content-type-options: nosniff"), "{headers}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"service": {"namespace": "demo", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    api.apply(&slice("lb-1", "lb", &[]));
    let drained = lab.wait_until(WAIT, |lab| http_get(lab, hc, "/").is_some_and(|(s, _, _)| s == 503));
    assert!(drained, "no local endpoints must answer 503\n{}", agent.log());

    // /metrics: kube-proxy's names, and the datapath's own counters.
    let m = metrics(&lab);
    for series in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_network_programming_duration_seconds_count",
        "ferry_service_ports",
        "ferry_datapath_counter_total{name=\"sock_xlate\"}",
        "ferry_map_entries{map=\"ferry_frontends\"}",
        "ferry_map_capacity{map=\"ferry_ct\"}",
    ] {
        let v = sample(&m, series).unwrap_or_else(|| panic!("{series} missing from /metrics:\n{m}"));
        assert!(v > 0.0, "{series} is {v}:\n{m}");
    }
    assert!(sample(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending").is_some(), "{m}");
    // The NAT engine's figures (issue #5): present even when zero.
    for series in ["ferry_nat_entries", "ferry_nat_allocation_retries_total", "ferry_nat_allocation_failures_total"] {
        assert!(sample(&m, series).is_some(), "{series} missing from /metrics:\n{m}");
    }

    // The Service goes away: its VIP is no longer load-balanced.
    api.delete::<Service>("demo", "web");
    let gone = lab.wait_until(WAIT, |lab| lab.connect(CLIENT, &tcp(VIP)).is_ok_and(|o| o.reply().is_none()));
    assert!(gone, "a deleted Service must stop being served\n{}", agent.log());

    // A node being deleted fails /healthz (load balancers drain it) but not /livez.
    api.apply(&node_object(&lab, true));
    let draining = lab.wait_until(WAIT, |lab| healthz(lab, "/healthz").is_some_and(|(s, _)| s == 503));
    assert!(draining, "/healthz must fail on a node being deleted\n{}", agent.log());
    let (_, body) = healthz(&lab, "/healthz").unwrap();
    assert_eq!(body["nodeEligible"], false, "{body}");
    let (status, body) = healthz(&lab, "/livez").unwrap();
    assert_eq!(status, 200, "/livez ignores the node: {body}");
}

#[test]
fn dropped_watches_relists_and_outages_keep_the_datapath_serving() {
    let mut lab = lab();
    let node_api = NetnsApi::start(lab.sb.netns_path(&lab.nodes[0].host), Default::default())
        .expect("starting the fake API server in the node");
    let api = node_api.api();
    api.apply(&node_object(&lab, false));
    api.apply(&web_service());
    api.apply(&slice("web-1", "web", &["21", "22"]));
    let agent = start_agent(&mut lab, api);
    assert!(lab.wait_until(WAIT, |_| agent.is_ready()), "no first sync\n{}", agent.log());
    converge(&lab, &agent, &["be21", "be22"], "first sync");

    // A network blip: the watches resume from their resourceVersion.
    api.drop_watches();
    api.apply(&slice("web-1", "web", &["21", "22", "23"]));
    converge(&lab, &agent, &["be21", "be22", "be23"], "after a dropped watch");

    // The history is compacted: resuming gets 410 Gone, and the agent relists.
    let lists = lists_of(api, ResourceType::EndpointSlices);
    api.expire_history();
    api.apply(&slice("web-1", "web", &["22"]));
    api.drop_watches();
    converge(&lab, &agent, &["be22"], "after a 410 relist");
    let relisted = lab.wait_until(WAIT, |_| lists_of(api, ResourceType::EndpointSlices) > lists);
    assert!(relisted, "no relist after 410 Gone: {:?}", api.requests());

    // The API server goes away: the datapath keeps serving exactly what it had.
    api.set_down(true);
    let failing = lab.wait_until(WAIT, |lab| {
        sample(&metrics(lab), "ferry_api_watch_errors_total{kind=\"EndpointSlice\"}").is_some_and(|v| v > 0.0)
    });
    assert!(failing, "the agent never noticed the outage\n{}", agent.log());
    for _ in 0..5 {
        assert_eq!(servers(&lab, 10), set(&["be22"]), "the datapath changed during an API outage\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, body) = healthz(&lab, "/healthz").unwrap();
    assert_eq!(status, 200, "nothing is pending during an outage: {body}");

    // Back up: changes made meanwhile arrive through the relist.
    api.set_down(false);
    api.apply(&slice("web-1", "web", &["21", "23"]));
    converge(&lab, &agent, &["be21", "be23"], "after the outage");

    // SIGTERM (the kubelet stopping the pod) ends the agent cleanly and leaves the datapath serving.
    // SAFETY: kill(2) on the agent's pid, which the sandbox has not reaped yet.
    assert_eq!(unsafe { libc::kill(agent.pid as i32, libc::SIGTERM) }, 0);
    let start = std::time::Instant::now();
    let mut status = None;
    while status.is_none() && start.elapsed() < WAIT {
        status = lab.sb.try_wait(agent.pid).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = status.unwrap_or_else(|| panic!("the agent did not stop on SIGTERM\n{}", agent.log()));
    assert!(status.success(), "{status}\n{}", agent.log());
    assert!(agent.log().contains("the datapath stays installed"), "{}", agent.log());
    assert_eq!(servers(&lab, 20), set(&["be21", "be23"]), "the datapath must outlive the agent");
}
