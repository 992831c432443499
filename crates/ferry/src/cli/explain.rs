//! `ferry explain`: the Plan in words, for one flow or for every service.

use crate::config::{self, NodeFlags};
use anyhow::{Context, bail};
use clap::Args;
use ferry_model::addr::{fmt_addr_port, parse_ip_sloppy};
use ferry_model::{EndpointSet, Flow, Plan, Protocol, Route, ServicePort, SourceClass, build_plan, explain};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Directory of Kubernetes manifests (Services, EndpointSlices, Nodes; YAML or JSON).
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Source address of the connection, e.g. 10.244.1.5.
    #[arg(long, value_name = "IP", requires = "to")]
    pub from: Option<String>,
    /// Destination, e.g. 10.96.0.10:53/UDP or [fd00::10]:80 (protocol defaults to TCP).
    #[arg(long, value_name = "IP:PORT[/PROTO]", requires = "from")]
    pub to: Option<String>,
    /// Interface the packet arrives on (only the interface-based local traffic detectors use it).
    #[arg(long, value_name = "NAME")]
    pub in_interface: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses `IP:PORT[/PROTO]`, with IPv6 in brackets.
pub fn parse_destination(s: &str) -> anyhow::Result<(IpAddr, u16, Protocol)> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p.parse::<Protocol>().map_err(anyhow::Error::msg)?),
        None => (s, Protocol::Tcp),
    };
    let (ip, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:").with_context(|| format!("{s:?}: expected [IPv6]:PORT"))?;
        (ip, port)
    } else {
        addr.rsplit_once(':').with_context(|| format!("{s:?}: expected IP:PORT, e.g. 10.96.0.10:53/UDP"))?
    };
    let ip = parse_ip_sloppy(ip).with_context(|| format!("{ip:?} is not an IP address"))?;
    let port: u16 = port.parse().with_context(|| format!("{port:?} is not a port number"))?;
    Ok((ip, port, proto))
}

pub fn run(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let settings = config::settings(&args.node)?;
    let cfg = settings.node;
    let state = super::load_manifests_with(&args.manifests, settings.manifests)?;
    let plan = build_plan(&state, &cfg);
    if let (Some(from), Some(to)) = (&args.from, &args.to) {
        let src = parse_ip_sloppy(from).with_context(|| format!("--from {from:?} is not an IP address"))?;
        let (dst, port, protocol) = parse_destination(to)?;
        if ferry_model::IpFamily::of(&src) != ferry_model::IpFamily::of(&dst) {
            bail!("--from {src} and --to {dst} are of different IP families");
        }
        let e = explain(&plan, &Flow { src, dst, port, protocol, in_interface: args.in_interface.clone() });
        if args.json {
            println!("{}", serde_json::to_string_pretty(&e)?);
        } else {
            print!("{e}");
            // Claims on this destination that were refused (a hijack attempt, an ignored ExternalIP).
            let key = ferry_model::FrontendKey { addr: ferry_model::FrontendAddr::Ip(dst), port, protocol };
            let (as_frontend, as_address) = (key.to_string(), format!("{dst} is "));
            for p in plan
                .problems
                .iter()
                .filter(|p| p.message.starts_with(&as_frontend) || p.message.starts_with(&as_address))
            {
                println!("refused   {p}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.json {
        let ports: Vec<&ServicePort> = plan.services.values().map(|s| s.as_ref()).collect();
        let out = serde_json::json!({
            "node": plan.node,
            "servicePorts": ports,
            "problems": plan.problems,
            "ignored": plan.ignored.iter().map(|(k, r)| (k.to_string(), r.to_string())).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", summary(&plan));
    }
    Ok(ExitCode::SUCCESS)
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items.into_iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

fn route_words(sp: &ServicePort, route: &Route) -> String {
    match route {
        Route::Reject { .. } => "REJECT".into(),
        Route::Drop { .. } => "DROP".into(),
        Route::Forward { set, masquerade, .. } => {
            let n = sp.endpoint_set(*set).count();
            let what = match set {
                EndpointSet::Cluster => format!("{n} endpoint{}", if n == 1 { "" } else { "s" }),
                EndpointSet::Local => format!("{n} local endpoint{}", if n == 1 { "" } else { "s" }),
            };
            if masquerade.masquerades() { format!("{what}, SNAT") } else { what }
        }
    }
}

/// The readable overview printed without a flow.
pub fn summary(plan: &Plan) -> String {
    let mut s = String::new();
    let n = &plan.node;
    let _ = writeln!(s, "node {}", if n.name.is_empty() { "(unnamed)" } else { &n.name });
    let node_ips: Vec<&IpAddr> = n.local_addresses.iter().filter(|ip| !ip.is_loopback()).collect();
    let _ = writeln!(
        s,
        "  addresses       {}",
        if node_ips.is_empty() { "none configured".into() } else { join(node_ips) }
    );
    let _ = writeln!(
        s,
        "  NodePorts on    {}",
        if n.node_port_addresses.is_empty() { "no address".into() } else { join(&n.node_port_addresses) }
    );
    let detector = match &n.local_detector {
        ferry_model::LocalDetector::None => "none (pod traffic is not told apart)".to_string(),
        d => format!("{d} {}", join(&n.pod_ranges)),
    };
    let _ = writeln!(s, "  pod detection   {detector}");
    if !n.service_cidrs.is_empty() {
        let _ = writeln!(s, "  service CIDRs   {}", join(&n.service_cidrs));
    }
    let _ = writeln!(s, "  masqueradeAll   {}", n.masquerade_all);
    let _ = writeln!(s, "\n{} service port(s)", plan.services.len());
    for sp in plan.services.values() {
        let _ = writeln!(s, "\n{}", sp.id);
        let mut fronts = vec![format!("ClusterIP {}", fmt_addr_port(&sp.cluster_ip, sp.port))];
        if let Some(np) = sp.node_port {
            fronts.push(format!("NodePort {np}"));
        }
        fronts.extend(sp.load_balancer_ips().iter().map(|ip| format!("LoadBalancer {}", fmt_addr_port(ip, sp.port))));
        fronts.extend(
            sp.proxied_load_balancer_ips()
                .iter()
                .map(|ip| format!("LoadBalancer {} (ipMode Proxy, not intercepted)", ip)),
        );
        fronts.extend(sp.external_ips().iter().map(|ip| format!("ExternalIP {}", fmt_addr_port(ip, sp.port))));
        let _ = writeln!(s, "  frontends   {}", fronts.join(" · "));
        let mut policy =
            vec![format!("internalTrafficPolicy={}", if sp.internal_policy_local { "Local" } else { "Cluster" })];
        if sp.externally_accessible {
            policy
                .push(format!("externalTrafficPolicy={}", if sp.external_policy_local { "Local" } else { "Cluster" }));
        }
        if let Some(t) = sp.affinity_timeout_seconds {
            policy.push(format!("sessionAffinity ClientIP {t}s"));
        }
        if !sp.source_ranges().is_empty() {
            policy.push(format!("loadBalancerSourceRanges {}", join(sp.source_ranges())));
        }
        if let Some(hc) = sp.health_check_node_port {
            policy.push(format!("healthCheckNodePort {hc}"));
        }
        let _ = writeln!(s, "  policy      {}", policy.join(", "));
        if sp.endpoints.is_empty() {
            let _ = writeln!(s, "  endpoints   none");
        }
        for (i, e) in sp.endpoints.iter().enumerate() {
            let state = match (e.ready, e.serving, e.terminating) {
                (true, _, _) => "ready",
                (false, true, true) => "serving, terminating",
                (false, _, true) => "terminating",
                _ => "not ready",
            };
            let node = match (e.node_name(), e.local) {
                (Some(n), true) => format!("{n} (this node)"),
                (Some(n), false) => n.to_string(),
                (None, _) => "-".into(),
            };
            let label = if i == 0 { "endpoints" } else { "" };
            let _ = writeln!(s, "  {label:<11} {:<26} {node:<20} {state}", fmt_addr_port(&e.ip, e.port));
        }
        let line = |routes: &ferry_model::PerSource<Route>| {
            SourceClass::ALL
                .iter()
                .map(|c| format!("{c} → {}", route_words(sp, routes.get(*c))))
                .collect::<Vec<_>>()
                .join(" · ")
        };
        let _ = writeln!(s, "  ClusterIP   {}", line(&sp.internal));
        if sp.externally_accessible {
            let _ = writeln!(s, "  external    {}", line(&sp.external));
        }
        if sp.firewall().is_some() {
            let _ = writeln!(
                s,
                "              (LoadBalancer IPs: any source outside loadBalancerSourceRanges is dropped, pods and nodes included)"
            );
        }
    }
    if !plan.ignored.is_empty() {
        let _ = writeln!(s, "\nnot proxied");
        for (k, r) in &plan.ignored {
            let _ = writeln!(s, "  {k}: {r}");
        }
    }
    if !plan.problems.is_empty() {
        let _ = writeln!(s, "\nproblems ({}; everything else is served)", plan.problems.len());
        for p in &plan.problems {
            let _ = writeln!(s, "  {p}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse() {
        assert_eq!(parse_destination("10.96.0.10:53/UDP").unwrap(), ("10.96.0.10".parse().unwrap(), 53, Protocol::Udp));
        assert_eq!(parse_destination("[fd00::1]:80").unwrap(), ("fd00::1".parse().unwrap(), 80, Protocol::Tcp));
        assert_eq!(parse_destination("10.0.0.1:80/sctp").unwrap().2, Protocol::Sctp);
        assert!(parse_destination("10.0.0.1").is_err());
        assert!(parse_destination("10.0.0.1:99999").is_err());
        assert!(parse_destination("10.0.0.1:80/ICMP").is_err());
    }
}
