//! kube-proxy's iptables rule layout (pkg/proxy/iptables), as the
//! `iptables-restore` input its proxier writes for ClusterIP services.
//!
//! ```text
//! nat    PREROUTING/OUTPUT -> KUBE-SERVICES -> KUBE-SVC-<hash>  (one rule per service port)
//!        KUBE-SVC-<hash>   ! -s clusterCIDR -j KUBE-MARK-MASQ; statistic random 1/n, 1/(n-1), ... -> KUBE-SEP-<hash>
//!        KUBE-SEP-<hash>   -s ep -j KUBE-MARK-MASQ; DNAT --to-destination ep:port
//!        POSTROUTING -> KUBE-POSTROUTING: marked -> MASQUERADE --random-fully
//! filter KUBE-FORWARD (invalid drop, marked accept, established accept), empty
//!        KUBE-SERVICES / KUBE-EXTERNAL-SERVICES / KUBE-NODEPORTS / KUBE-PROXY-FIREWALL
//! ```
//!
//! A full sync writes every chain; a one-endpoint change is kube-proxy's
//! partial sync (`MinimizeIPTablesRestore`, on by default since 1.27): the
//! top-level chains whole, plus the changed service's chains, `-X` for the
//! endpoint chain that went away, all with `iptables-restore --noflush`.

use super::shape::{SERVICE_PORT, ServiceSpec, TARGET_PORT, chain_hash};
use std::fmt::Write as _;

/// The restore command kube-proxy runs (`--noflush`: tables it does not mention stay).
pub const RESTORE_ARGS: &[&str] = &["--noflush", "--counters"];

const MASQ_MARK: &str = "0x4000";

fn svc_port_name(s: &ServiceSpec) -> String {
    format!("{}:http", s.namespaced_name)
}

fn svc_chain(s: &ServiceSpec) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{}tcp", svc_port_name(s)), 16))
}

fn sep_chain(s: &ServiceSpec, ep: &std::net::Ipv4Addr) -> String {
    format!("KUBE-SEP-{}", chain_hash(&format!("{}tcp{ep}:{TARGET_PORT}", svc_port_name(s)), 16))
}

/// The jumps from the built-in chains that kube-proxy ensures before its first
/// restore (one `iptables -I` each in kube-proxy; one restore here, untimed).
pub fn setup() -> String {
    "*filter\n:KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
COMMIT\n"
        .to_string()
}

fn filter_table(out: &mut String) {
    out.push_str("*filter\n");
    for c in ["KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL"] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n");
}

fn nat_header(out: &mut String) {
    for c in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
}

fn nat_fixed_rules(out: &mut String) {
    let _ = writeln!(out, "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN");
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
}

fn services_rules(out: &mut String, services: &[ServiceSpec]) {
    for s in services {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {SERVICE_PORT} -j {}",
            svc_port_name(s),
            s.cluster_ip,
            svc_chain(s)
        );
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
}

fn service_chain_decls(out: &mut String, s: &ServiceSpec) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
    for ep in &s.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, ep));
    }
}

fn service_chain_rules(out: &mut String, s: &ServiceSpec, cluster_cidr: &str) {
    let (name, svc) = (svc_port_name(s), svc_chain(s));
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport {SERVICE_PORT} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
        s.cluster_ip
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(s, ep);
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -m statistic --mode random --probability {p:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(out, "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -j {sep}");
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, ep);
        let _ = writeln!(out, "-A {sep} -m comment --comment {name} -s {ep}/32 -j KUBE-MARK-MASQ");
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ep}:{TARGET_PORT}"
        );
    }
}

/// The full restore input for `services` (what kube-proxy writes on a full sync).
pub fn full(services: &[ServiceSpec], cluster_cidr: &str) -> String {
    let mut out =
        String::with_capacity(services.len() * (600 + 450 * services.first().map_or(0, |s| s.endpoints.len())));
    filter_table(&mut out);
    out.push_str("*nat\n");
    nat_header(&mut out);
    for s in services {
        service_chain_decls(&mut out, s);
    }
    nat_fixed_rules(&mut out);
    services_rules(&mut out, services);
    for s in services {
        service_chain_rules(&mut out, s, cluster_cidr);
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's partial sync after one service's endpoints changed from
/// `before` to `after` (`services` already holds `after`).
pub fn partial(services: &[ServiceSpec], before: &ServiceSpec, after: &ServiceSpec, cluster_cidr: &str) -> String {
    let mut out = String::with_capacity(services.len() * 200);
    filter_table(&mut out);
    out.push_str("*nat\n");
    nat_header(&mut out);
    service_chain_decls(&mut out, after);
    let gone: Vec<String> =
        before.endpoints.iter().filter(|ep| !after.endpoints.contains(ep)).map(|ep| sep_chain(before, ep)).collect();
    for c in &gone {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    nat_fixed_rules(&mut out);
    services_rules(&mut out, services);
    service_chain_rules(&mut out, after, cluster_cidr);
    for c in &gone {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}
