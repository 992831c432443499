//! Table pressure never breaks established flows, on the real kernel (needs
//! root; never skipped).
//!
//! One node runs `ferry run` with small conntrack tables (`maps.conntrack:
//! 4096` confirmed entries, `maps.conntrackUnconfirmed: 1024`) and a NodePort
//! Service whose endpoint is a pod of the node. An outside client opens 1,000
//! real TCP connections through the NodePort (2,000 confirmed entries) and
//! exchanges a line on each. Then it floods the NodePort with 20,000 raw SYNs
//! from spoofed addresses that never complete a handshake (40,000 entries
//! asked of a 1,024-entry table: with the single LRU of layout 1 this evicted
//! the established flows, which were then re-balanced and reset). Afterwards
//! every one of the 1,000 connections answers again, none was reset, no
//! segment of theirs missed conntrack (`ct_lost` 0), `ferry_ct` still holds
//! their 2,000 entries, and `ferry status` counts the flood's evictions from
//! `ferry_ct_new`.
//!
//! ```text
//!  client 203.0.113.10 ── fabric ── node-a 192.168.50.10 (NodePort 30080) ── br0 ── pod be 10.244.0.21:8080
//!  flood: SYNs from 203.0.113.100-199 (nobody has them: the SYN-ACKs die at node-a, no route)
//! ```

use ferry::lab::{At, Lab};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const FLOWS: usize = 1000;
const FLOOD: u32 = 20_000;
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 21);
const NODE_PORT: u16 = 30080;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: "10.96.0.20"
  clusterIPs: ["10.96.0.20"]
  ipFamilies: [IPv4]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: ["10.244.0.21"], nodeName: node-a}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs `f` on a thread that has joined the network namespace at `netns`
/// (sockets it creates stay in that namespace wherever they are used).
fn in_netns<R: Send + 'static>(netns: &Path, f: impl FnOnce() -> R + Send + 'static) -> R {
    let file = std::fs::File::open(netns).expect("opening the namespace");
    std::thread::spawn(move || {
        // SAFETY: setns on a valid fd; it changes this thread's namespace only.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// An echo server in the pod: one small thread per connection, until `stop`.
fn echo_server(listener: TcpListener, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
                let _ = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                    let mut buf = [0u8; 64];
                    // Bounded: a connection gets at most 100 exchanges.
                    for _ in 0..100 {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// One exchange on a held connection: Ok, or what went wrong (a reset among them).
fn exchange(conn: &mut TcpStream, line: &[u8]) -> Result<(), std::io::Error> {
    conn.write_all(line)?;
    let mut back = vec![0u8; line.len()];
    conn.read_exact(&mut back)?;
    if back != line {
        return Err(std::io::Error::other(format!("echoed {back:?} for {line:?}")));
    }
    Ok(())
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP SYN from `src:sport` to `dst:dport`, checksums included.
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&sport.wrapping_mul(7919).to_be_bytes().repeat(2));
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let seed: u32 = pseudo.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    let tcp_sum = checksum(&p[20..], seed);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// Sends `count` SYNs to the NodePort from 100 spoofed addresses (a raw
/// socket: the kernel of the sender never hears of them). Returns how many were sent.
fn flood(count: u32) -> u32 {
    // SAFETY: plain socket calls on a descriptor this function owns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(NODE.octets()) },
        sin_zero: [0; 8],
    };
    let mut sent = 0;
    for i in 0..count {
        let src = Ipv4Addr::new(203, 0, 113, 100 + (i % 100) as u8);
        let pkt = syn(src, 1024 + (i / 100) as u16, NODE, NODE_PORT);
        // SAFETY: pkt and to outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n == pkt.len() as isize {
            sent += 1;
        } else {
            // The device queue is full: let it drain (bounded by the loop's count).
            std::thread::sleep(Duration::from_millis(1));
        }
        if i % 500 == 499 {
            // Paced so the 2-core machine's softirq keeps up: the flood must reach the datapath.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    sent
}

fn status(lab: &Lab) -> serde_json::Value {
    let out = std::process::Command::new(FERRY)
        .args(["status", "--json", "--pin-dir"])
        .arg(&lab.nodes[0].pin_dir)
        .output()
        .expect("running ferry status");
    assert!(out.status.success(), "ferry status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ferry status --json")
}

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {s}"))
}

fn map_entries(s: &serde_json::Value, map: &str) -> u64 {
    s["maps"].as_array().unwrap().iter().find(|m| m["map"] == map).and_then(|m| m["entries"].as_u64()).unwrap()
}

#[test]
fn a_syn_flood_that_fills_conntrack_breaks_none_of_1000_established_nodeport_flows() {
    let mut lab = Lab::new("press", FERRY.as_ref()).expect("lab");
    let node = lab.add_node("node-a").unwrap();
    let be = lab.add_pod(node, "be", &[IpAddr::V4(POD)]).unwrap();
    let client = lab.add_external("client", &[ip("203.0.113.10")], node).unwrap();
    lab.write_node_config(
        node,
        "datapath: bpf\nclusterCIDRs: [10.244.0.0/16]\nserviceCIDRs: [10.96.0.0/16]\n\
         maps: {conntrack: 4096, conntrackUnconfirmed: 1024}\n",
    )
    .unwrap();
    lab.write_manifests(node, MANIFESTS).unwrap();
    lab.start_agent(node).unwrap();

    let pod_ns = lab.sb.netns_path(lab.host(At::Pod(node, be)));
    let client_ns = lab.sb.netns_path(lab.host(At::External(client)));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = in_netns(&pod_ns, || TcpListener::bind(SocketAddr::new(IpAddr::V4(POD), 8080)).expect("listen"));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || echo_server(listener, stop))
    };
    // Stops the server even when an assertion fails (the lab removes the rest).
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = Stop(stop.clone());

    let frontend = SocketAddr::new(IpAddr::V4(NODE), NODE_PORT);
    let mut conns: Vec<TcpStream> = in_netns(&client_ns, move || {
        (0..FLOWS)
            .map(|i| {
                let mut c = TcpStream::connect_timeout(&frontend, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connection {i} through the NodePort: {e}"));
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                exchange(&mut c, b"hello\n").unwrap_or_else(|e| panic!("connection {i}, first exchange: {e}"));
                c
            })
            .collect()
    });
    let before = status(&lab);
    assert_eq!(map_entries(&before, "ferry_ct"), 2 * FLOWS as u64, "every flow confirmed into ferry_ct");
    assert!(counter(&before, "ct_confirm") >= FLOWS as u64);

    let sent = in_netns(&client_ns, || flood(FLOOD));
    assert!(sent >= FLOOD * 9 / 10, "only {sent} of {FLOOD} SYNs could be sent");

    let mut failed = Vec::new();
    let mut resets = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        if let Err(e) = exchange(c, b"again\n") {
            resets += usize::from(e.kind() == std::io::ErrorKind::ConnectionReset);
            failed.push(format!("connection {i}: {e}"));
        }
    }
    let after = status(&lab);
    let flooded = counter(&after, "ct_new_insert") - counter(&before, "ct_new_insert");
    let evicted = after["evictions"]["ferry_ct_new"].as_u64().unwrap();
    eprintln!(
        "flood: {sent} SYNs sent, {flooded} entries written to ferry_ct_new, {evicted} evicted, \
         ferry_ct_new holds {}, ferry_ct holds {}",
        map_entries(&after, "ferry_ct_new"),
        map_entries(&after, "ferry_ct")
    );
    assert!(
        failed.is_empty(),
        "{} of {FLOWS} connections broke ({resets} reset):\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(resets, 0);
    assert_eq!(counter(&after, "ct_lost"), 0, "a segment of an established flow missed conntrack");
    assert_eq!(map_entries(&after, "ferry_ct"), 2 * FLOWS as u64, "the established flows' entries are all there");
    assert!(flooded >= u64::from(sent), "the flood reached the datapath: {flooded} entries for {sent} SYNs");
    // Everything the flood wrote beyond what ferry_ct_new (1,024) holds was evicted, and counted.
    assert!(evicted >= flooded.saturating_sub(1024), "the flood's evictions: {evicted} counted of {flooded} written");
    assert_eq!(counter(&after, "ct_confirm_full"), 0);

    drop(conns);
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}
