//! Hostile and broken input on a real node (issue 12), in a lab of network
//! namespaces: one writer per pin directory, `ferry cleanup` refusing paths
//! outside bpffs, the route_localnet guard (CVE-2020-8558) and its restore,
//! and a manifest directory that tries to wedge the loader. Needs root;
//! never skipped.

use ferry::lab::{At, Lab};
use ferry_sandbox::probe::{ConnectOpts, Endpoint, Proto};
use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.21], nodeName: node-a}]
ports: [{name: http, port: 8080}]
"#;

fn tcp(addr: &str) -> ConnectOpts {
    let mut o = ConnectOpts::new(Endpoint { addr: addr.parse::<SocketAddr>().unwrap(), proto: Proto::Tcp });
    o.timeout = Duration::from_secs(2);
    o
}

/// Runs `ferry ARGS` inside node `node`'s network namespace (bounded by the sandbox's timeout).
fn ferry_on(lab: &Lab, node: usize, args: &[&str]) -> Output {
    let host = lab.nodes[node].host.clone();
    let mut cmd = lab.sb.command(&host, FERRY);
    cmd.args(args);
    lab.sb.run_in(&host, None, &mut cmd).expect("running ferry in the lab")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A lab with node-a and one backend pod serving 10.244.0.21:8080.
fn lab(tag: &str, datapath: &str, extra: &str) -> Lab {
    let mut lab = Lab::new(tag, FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    let pod = lab.add_pod(node, "be", &["10.244.0.21".parse().unwrap()]).unwrap();
    let listen = vec![Endpoint { addr: "10.244.0.21:8080".parse().unwrap(), proto: Proto::Tcp }];
    lab.serve(At::Pod(node, pod), "be", listen).unwrap();
    lab.write_node_config(
        node,
        &format!("datapath: {datapath}\nserviceCIDRs: [10.96.0.0/16]\nclusterCIDRs: [10.244.0.0/16]\n{extra}"),
    )
    .unwrap();
    lab.write_manifests(node, WEB).unwrap();
    lab
}

#[test]
fn a_second_agent_on_the_same_pin_directory_exits_naming_the_first() {
    let mut lab = lab("pinlock", "bpf", "");
    lab.start_agent(0).unwrap();
    let pid = lab.agent_pid(0).unwrap();
    let n = &lab.nodes[0];
    let (manifests, config, pin) = (n.manifests.clone(), n.config.clone(), n.pin_dir.clone());
    let second = ferry_on(
        &lab,
        0,
        &["run", "--once", "--manifests", manifests.to_str().unwrap(), "--node-config", config.to_str().unwrap()],
    );
    assert!(!second.status.success(), "the second agent ran: {}", text(&second));
    assert!(text(&second).contains(&format!("in use by another ferry (pid {pid})")), "{}", text(&second));
    // The first agent still serves.
    let o = lab.connect(At::Node(0), &tcp("10.96.0.10:80")).unwrap();
    assert!(o.reply().is_some(), "{o:?}\n{}", lab.agent_log(0));

    // cleanup refuses to pull the datapath from under it, and refuses paths outside bpffs.
    let busy = ferry_on(&lab, 0, &["cleanup", "--pin-dir", pin.to_str().unwrap()]);
    assert!(!busy.status.success() && text(&busy).contains(&format!("(pid {pid})")), "{}", text(&busy));
    assert!(pin.join("ferry_frontends").exists(), "cleanup removed a held pin directory");
    let escape = format!("{}/../../../tmp", pin.display());
    for bad in [escape.as_str(), "/sys/fs/bpf", "/tmp", "sys/fs/bpf/x"] {
        let o = ferry_on(&lab, 0, &["cleanup", "--pin-dir", bad]);
        assert!(!o.status.success(), "cleanup accepted {bad}: {}", text(&o));
        assert!(text(&o).contains("refusing to remove anything there"), "{bad}: {}", text(&o));
    }

    // Once the agent is gone, cleanup works.
    lab.kill_agent(0).unwrap();
    let o = ferry_on(&lab, 0, &["cleanup", "--pin-dir", pin.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!pin.exists(), "pin directory left behind");
}

fn route_localnet(lab: &Lab, node: usize) -> String {
    let host = lab.nodes[node].host.clone();
    let mut cmd = lab.sb.command(&host, "cat");
    cmd.arg("/proc/sys/net/ipv4/conf/all/route_localnet");
    String::from_utf8_lossy(&lab.sb.run_in(&host, None, &mut cmd).unwrap().stdout).trim().to_string()
}

#[test]
fn route_localnet_is_guarded_and_restored() {
    let mut lab =
        lab("localnet", "nftables", "localhostNodePorts: true\nnodePortAddresses: [\"0.0.0.0/0\", \"::/0\"]\n");
    let node = 0;
    // A host service bound to localhost only, and a neighbour on the uplink.
    lab.serve(
        At::Node(node),
        "local-only",
        vec![Endpoint { addr: "127.0.0.1:9999".parse().unwrap(), proto: Proto::Tcp }],
    )
    .unwrap();
    let neighbour: IpAddr = "192.168.50.99".parse().unwrap();
    let x = lab.add_external("neighbour", &[neighbour], node).unwrap();
    // The neighbour sends to 127.0.0.1 through its uplink, as an attacker on
    // the node's L2 segment would: loopback routed out of eth0, via the node.
    let via = lab.nodes[node].primary_v4;
    lab.sb
        .ip_batch(
            lab.host(At::External(x)),
            &[
                // Without 127.0.0.1 of its own, a reply from 127.0.0.1 is not a martian to it.
                "addr del 127.0.0.1/8 dev lo".to_string(),
                format!("route add 127.0.0.1/32 via {via} dev eth0"),
            ],
        )
        .unwrap();
    let xhost = lab.host(At::External(x)).clone();
    for key in ["all", "eth0"] {
        let mut cmd = lab.sb.command(&xhost, "sysctl");
        cmd.args(["-qw", &format!("net.ipv4.conf.{key}.route_localnet=1")]);
        lab.sb.run_in(&xhost, None, &mut cmd).unwrap();
    }
    assert_eq!(route_localnet(&lab, node), "0", "a fresh namespace starts with route_localnet off");

    lab.start_agent(node).unwrap();
    assert_eq!(route_localnet(&lab, node), "1", "localhostNodePorts needs route_localnet\n{}", lab.agent_log(node));
    let mut probe = tcp("127.0.0.1:9999");
    probe.bind = Some(neighbour);
    let o = lab.connect(At::External(x), &probe).unwrap();
    assert!(o.reply().is_none(), "the localhost-only service answered a neighbour: {o:?}");

    // Control: without the guard rule the same packet reaches the service,
    // so the guard (not the lab) is what stopped it.
    let listing = {
        let mut cmd = lab.sb.command(&lab.nodes[node].host, "nft");
        cmd.args(["-a", "list", "chain", "ip", "ferry", "filter-input"]);
        String::from_utf8_lossy(&lab.sb.run_in(&lab.nodes[node].host, None, &mut cmd).unwrap().stdout).to_string()
    };
    let handle = listing
        .lines()
        .find(|l| l.contains("127.0.0.0/8"))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no guard rule in filter-input:\n{listing}"));
    let host = lab.nodes[node].host.clone();
    let mut cmd = lab.sb.command(&host, "nft");
    cmd.args(["delete", "rule", "ip", "ferry", "filter-input", "handle", &handle]);
    let out = lab.sb.run_in(&host, None, &mut cmd).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let o = lab.connect(At::External(x), &probe).unwrap();
    assert!(o.reply().is_some(), "control: without the guard the packet should arrive: {o:?}");

    lab.kill_agent(node).unwrap();
    let pin = lab.nodes[node].pin_dir.clone();
    let o = ferry_on(&lab, node, &["cleanup", "--pin-dir", pin.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("restored net.ipv4.conf.all.route_localnet to 0"), "{}", text(&o));
    assert_eq!(route_localnet(&lab, node), "0");
}

#[test]
fn a_hostile_manifest_directory_cannot_wedge_the_loader() {
    let mut lab = lab("loader", "bpf", "");
    let dir = lab.nodes[0].manifests.clone();
    // Two symlinks to the directory itself (an exponential walk if followed blindly),
    // a FIFO named like a manifest, a dangling link, a file over the size cap,
    // a broken document between two good ones, and YAML 1.1 booleans as names.
    std::os::unix::fs::symlink(".", dir.join("loop-a")).unwrap();
    std::os::unix::fs::symlink(".", dir.join("loop-b")).unwrap();
    let fifo = std::ffi::CString::new(dir.join("fifo.yaml").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
    std::os::unix::fs::symlink("/nonexistent/ferry", dir.join("dangling.yaml")).unwrap();
    std::fs::write(dir.join("huge.json"), vec![b' '; 2 * 1024 * 1024]).unwrap();
    let y = "apiVersion: v1\nkind: Service\nmetadata: {name: y, namespace: demo}\nspec: {clusterIP: 10.96.0.11, ports: [{name: y, port: 80}]}\n---\nkind: [broken\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: y-1, namespace: demo, labels: {kubernetes.io/service-name: y}}\naddressType: IPv4\nendpoints: [{addresses: [10.244.0.21]}]\nports: [{name: y, port: 8080}]\n";
    std::fs::write(dir.join("yes.yaml"), y).unwrap();
    let cfg = lab.nodes[0].config.clone();
    let mut text_cfg = std::fs::read_to_string(&cfg).unwrap();
    text_cfg.push_str("manifests: {maxFileBytes: 1048576}\n");
    std::fs::write(&cfg, text_cfg).unwrap();

    // explain terminates (bounded by the sandbox) and names what it skipped.
    let out =
        ferry_on(&lab, 0, &["explain", "--manifests", dir.to_str().unwrap(), "--node-config", cfg.to_str().unwrap()]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    for what in [
        "fifo.yaml: is not a regular file",
        "dangling.yaml: cannot read",
        "huge.json: is 2097152 bytes, over the manifest size limit of 1048576 bytes",
        "yes.yaml document 2: not valid YAML (document starts at line 6)",
        "leads to a directory already read",
    ] {
        assert!(shown.contains(what), "missing {what:?} in:\n{shown}");
    }
    assert!(shown.contains("demo/y:y/TCP"), "the Service named y (port y) is served:\n{shown}");

    // The agent starts (start_agent waits at most 30 s for its first sync) and serves both Services.
    lab.start_agent(0).unwrap();
    for vip in ["10.96.0.10:80", "10.96.0.11:80"] {
        let o = lab.connect(At::Node(0), &tcp(vip)).unwrap();
        assert!(o.reply().is_some(), "{vip}: {o:?}\n{}", lab.agent_log(0));
    }
}
