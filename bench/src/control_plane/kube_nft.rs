//! kube-proxy's nftables rule layout (pkg/proxy/nftables), as the `nft -f`
//! transactions its proxier writes for ClusterIP services.
//!
//! ```text
//! table ip kube-proxy
//!   nat-prerouting / nat-output -> services: ip daddr . meta l4proto . th dport vmap @service-ips
//!   service-<hash>-ns/svc/tcp/port    ip daddr VIP tcp dport P ip saddr != clusterCIDR jump mark-for-masquerade
//!                                     numgen random mod n vmap { 0 : goto endpoint-..., ... }
//!   endpoint-<hash>-ns/svc/tcp/port__ip/port   ip saddr ip jump mark-for-masquerade; dnat to ip:port
//!   filter hooks: firewall-check, service-endpoints-check, nodeport-endpoints-check, cluster-ips-check
//!   nat-postrouting -> masquerading: marked -> masquerade fully-random
//! ```
//!
//! Every sync re-declares the table's fixed chains and rules (kube-proxy's
//! `setupNFTables`); a full sync flushes the maps and writes every service;
//! a partial sync (one endpoint changed) writes only the changed service's
//! chains and elements and deletes the endpoint chain that went away.
//! Objects are added and flushed one command a line, as knftables writes them.

use super::shape::{SERVICE_PORT, ServiceSpec, TARGET_PORT, chain_hash};
use std::fmt::Write as _;

pub const TABLE: &str = "ip kube-proxy";

fn svc_chain(s: &ServiceSpec) -> String {
    let base = format!("{}/tcp/http", s.namespaced_name);
    format!("service-{}-{base}", chain_hash(&base, 8))
}

fn ep_chain(s: &ServiceSpec, ep: &std::net::Ipv4Addr) -> String {
    let base = format!("{}/tcp/http__{ep}/{TARGET_PORT}", s.namespaced_name);
    format!("endpoint-{}-{base}", chain_hash(&base, 8))
}

/// The fixed part every kube-proxy sync writes.
fn base(out: &mut String, service_cidr: &str) {
    let t = TABLE;
    let _ = writeln!(out, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let chain = |out: &mut String, name: &str, hook: Option<&str>, rules: &[&str]| {
        match hook {
            Some(h) => {
                let _ = writeln!(out, "add chain {t} {name} {{ {h} ; }}");
            }
            None => {
                let _ = writeln!(out, "add chain {t} {name}");
            }
        }
        let _ = writeln!(out, "flush chain {t} {name}");
        for r in rules {
            let _ = writeln!(out, "add rule {t} {name} {r}");
        }
    };
    for (name, decl) in [
        ("cluster-ips", "type ipv4_addr ; comment \"Active ClusterIPs\" ;"),
        ("nodeport-ips", "type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ;"),
    ] {
        let _ = writeln!(out, "add set {t} {name} {{ {decl} }}");
    }
    for (name, key) in [
        ("service-ips", "ipv4_addr . inet_proto . inet_service"),
        ("service-nodeports", "inet_proto . inet_service"),
        ("no-endpoint-services", "ipv4_addr . inet_proto . inet_service"),
        ("no-endpoint-nodeports", "inet_proto . inet_service"),
        ("firewall-ips", "ipv4_addr . inet_proto . inet_service"),
    ] {
        let _ = writeln!(out, "add map {t} {name} {{ type {key} : verdict ; }}");
    }
    chain(out, "mark-for-masquerade", None, &["mark set mark or 0x4000"]);
    chain(
        out,
        "masquerading",
        None,
        &["mark and 0x4000 == 0 return", "mark set mark xor 0x4000", "masquerade fully-random"],
    );
    chain(out, "reject-chain", None, &["reject"]);
    chain(
        out,
        "services",
        None,
        &[
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ],
    );
    chain(out, "firewall-check", None, &["ip daddr . meta l4proto . th dport vmap @firewall-ips"]);
    chain(out, "service-endpoints-check", None, &["ip daddr . meta l4proto . th dport vmap @no-endpoint-services"]);
    chain(
        out,
        "nodeport-endpoints-check",
        None,
        &["ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"],
    );
    let drop_unallocated =
        format!("ip daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\"");
    chain(
        out,
        "cluster-ips-check",
        None,
        &["ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"", &drop_unallocated],
    );
    chain(
        out,
        "filter-prerouting",
        Some("type filter hook prerouting priority -110"),
        &["ct state new jump firewall-check"],
    );
    chain(
        out,
        "filter-input",
        Some("type filter hook input priority -110"),
        &["ct state new jump nodeport-endpoints-check", "ct state new jump service-endpoints-check"],
    );
    chain(
        out,
        "filter-forward",
        Some("type filter hook forward priority -110"),
        &["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"],
    );
    chain(
        out,
        "filter-output",
        Some("type filter hook output priority -110"),
        &["ct state new jump service-endpoints-check", "ct state new jump firewall-check"],
    );
    chain(
        out,
        "filter-output-post-dnat",
        Some("type filter hook output priority -90"),
        &["ct state new jump cluster-ips-check"],
    );
    chain(out, "nat-prerouting", Some("type nat hook prerouting priority -100"), &["jump services"]);
    chain(out, "nat-output", Some("type nat hook output priority -100"), &["jump services"]);
    chain(out, "nat-postrouting", Some("type nat hook postrouting priority 100"), &["jump masquerading"]);
}

fn service(out: &mut String, s: &ServiceSpec, cluster_cidr: &str) {
    let t = TABLE;
    let eps: Vec<String> = s.endpoints.iter().map(|ep| ep_chain(s, ep)).collect();
    for (ep, chain) in s.endpoints.iter().zip(&eps) {
        let _ = writeln!(out, "add chain {t} {chain}\nflush chain {t} {chain}");
        let _ = writeln!(out, "add rule {t} {chain} ip saddr {ep} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule {t} {chain} meta l4proto tcp dnat to {ep}:{TARGET_PORT}");
    }
    let svc = svc_chain(s);
    let _ = writeln!(out, "add chain {t} {svc}\nflush chain {t} {svc}");
    let _ = writeln!(
        out,
        "add rule {t} {svc} ip daddr {} tcp dport {SERVICE_PORT} ip saddr != {cluster_cidr} jump mark-for-masquerade",
        s.cluster_ip
    );
    let _ = write!(out, "add rule {t} {svc} numgen random mod {} vmap {{ ", eps.len());
    for (i, chain) in eps.iter().enumerate() {
        let _ = write!(out, "{}{i} : goto {chain}", if i == 0 { "" } else { ", " });
    }
    out.push_str(" }\n");
    let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", s.cluster_ip);
    let _ = writeln!(out, "add element {t} service-ips {{ {} . tcp . {SERVICE_PORT} : goto {svc} }}", s.cluster_ip);
}

/// The full-sync transaction (`nft -f -` input).
pub fn full(services: &[ServiceSpec], cluster_cidr: &str, service_cidr: &str) -> String {
    let per = 700 + 400 * services.first().map_or(0, |s| s.endpoints.len());
    let mut out = String::with_capacity(services.len() * per + 8192);
    base(&mut out, service_cidr);
    for m in ["cluster-ips", "nodeport-ips"] {
        let _ = writeln!(out, "flush set {TABLE} {m}");
    }
    for m in ["service-ips", "service-nodeports", "no-endpoint-services", "no-endpoint-nodeports", "firewall-ips"] {
        let _ = writeln!(out, "flush map {TABLE} {m}");
    }
    for s in services {
        service(&mut out, s, cluster_cidr);
    }
    out
}

/// The partial-sync transaction after one service's endpoints changed from `before` to `after`.
pub fn partial(before: &ServiceSpec, after: &ServiceSpec, cluster_cidr: &str, service_cidr: &str) -> String {
    let mut out = String::with_capacity(16384);
    base(&mut out, service_cidr);
    service(&mut out, after, cluster_cidr);
    for ep in before.endpoints.iter().filter(|ep| !after.endpoints.contains(ep)) {
        let chain = ep_chain(before, ep);
        let _ = writeln!(out, "flush chain {TABLE} {chain}\ndelete chain {TABLE} {chain}");
    }
    out
}
