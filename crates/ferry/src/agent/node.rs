//! Who this node is: its name, and its primary addresses from its Node object
//! when the config does not name them (pure).

use k8s_openapi::api::core::v1::Node;
use std::net::IpAddr;

/// The node's name: configured (`nodeName`, `hostnameOverride`, a flag), else
/// `NODE_NAME` (the DaemonSet sets it from the downward API), else the
/// hostname. Lowercased and trimmed, as kube-proxy does.
pub fn node_name(
    configured: &str,
    env: Option<String>,
    hostname: impl FnOnce() -> std::io::Result<String>,
) -> anyhow::Result<String> {
    let pick = |s: &str| Some(s.trim().to_lowercase()).filter(|s| !s.is_empty());
    if let Some(n) = pick(configured) {
        return Ok(n);
    }
    if let Some(n) = env.as_deref().and_then(pick) {
        return Ok(n);
    }
    let host = hostname().map_err(|e| {
        anyhow::anyhow!(
            "no node name configured and the hostname cannot be read ({e}); pass --hostname-override or set NODE_NAME"
        )
    })?;
    pick(&host).ok_or_else(|| anyhow::anyhow!("the hostname is empty; pass --hostname-override or set NODE_NAME"))
}

/// The machine's hostname (uname's nodename).
pub fn hostname() -> std::io::Result<String> {
    // SAFETY: uname fills a zeroed struct; nodename is NUL-terminated by the kernel.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let name = std::ffi::CStr::from_ptr(u.nodename.as_ptr());
        Ok(name.to_string_lossy().into_owned())
    }
}

/// The Node's primary address per family, as kube-proxy reads it
/// (`GetNodeHostIPs`): the first InternalIP of each family, else the first
/// ExternalIP of that family. IPv4 first.
pub fn primary_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
    let of = |kind: &str, v4: bool| {
        addresses
            .iter()
            .filter(|a| a.type_ == kind)
            .filter_map(|a| ferry_model::addr::parse_ip_sloppy(a.address.trim()))
            .find(|ip| ip.is_ipv4() == v4)
    };
    [true, false].into_iter().filter_map(|v4| of("InternalIP", v4).or_else(|| of("ExternalIP", v4))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    #[test]
    fn name_order_is_config_env_hostname() {
        let host = || Ok("Host-1".to_string());
        assert_eq!(node_name(" Node-A ", Some("env".into()), host).unwrap(), "node-a");
        assert_eq!(node_name("", Some("Env-B".into()), host).unwrap(), "env-b");
        assert_eq!(node_name("", Some(" ".into()), host).unwrap(), "host-1");
        let e = node_name("", None, || Err(std::io::Error::other("no"))).unwrap_err().to_string();
        assert!(e.contains("--hostname-override"), "{e}");
    }

    #[test]
    fn primary_ips_prefer_internal_per_family() {
        let addr = |t: &str, a: &str| NodeAddress { type_: t.into(), address: a.into() };
        let node = Node {
            status: Some(NodeStatus {
                addresses: Some(vec![
                    addr("Hostname", "node-a"),
                    addr("ExternalIP", "203.0.113.5"),
                    addr("ExternalIP", "2001:db8::5"),
                    addr("InternalIP", "10.0.0.5"),
                    addr("InternalIP", "10.0.0.6"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ips: Vec<String> = primary_ips(&node).iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.0.0.5", "2001:db8::5"]);
        assert!(primary_ips(&Node::default()).is_empty());
    }
}
