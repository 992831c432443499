//! Address parsing the way kube-proxy does it.
//!
//! Kubernetes objects written before 1.20 may carry IPv4 addresses with leading
//! zeros ("010.000.000.001"). kube-proxy parses those "sloppily" as decimal and
//! programs the canonical form; ferry does the same, so a legacy object behaves
//! identically instead of being rejected.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The two IP families a node may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        Self::of(&net.addr())
    }

    /// The family's name as Kubernetes spells it (`IPv4`, `IPv6`).
    pub fn as_k8s(&self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    pub fn from_k8s(s: &str) -> Option<IpFamily> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    pub fn loopback(&self) -> IpAddr {
        match self {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }

    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// Parses an IP address, accepting IPv4 octets with leading zeros as decimal
/// (Go's `netutils.ParseIPSloppy`). Surrounding whitespace is not accepted.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    parse_ipv4_leading_zeros(s).map(IpAddr::V4)
}

fn parse_ipv4_leading_zeros(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse::<u16>().ok().filter(|v| *v <= 255)? as u8;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// Parses a CIDR sloppily (leading zeros allowed, surrounding whitespace trimmed,
/// as kube-proxy does for `loadBalancerSourceRanges`) and returns the network
/// with host bits cleared.
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let (ip, len) = s.split_once('/')?;
    let ip = parse_ip_sloppy(ip)?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

/// A single address as a host-length network (`/32` or `/128`).
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Formats `ip:port` with IPv6 in brackets, as the acceptance cases and
/// Kubernetes tooling write it.
pub fn fmt_addr_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ipv4_reads_leading_zeros_as_decimal() {
        assert_eq!(parse_ip_sloppy("172.30.0.041"), Some("172.30.0.41".parse().unwrap()));
        assert_eq!(parse_ip_sloppy("010.180.00.001"), Some("10.180.0.1".parse().unwrap()));
        assert_eq!(parse_ip_sloppy("1.2.3.256"), None);
        assert_eq!(parse_ip_sloppy("1.2.3"), None);
        assert_eq!(parse_ip_sloppy("1.2.3.4.5"), None);
        assert_eq!(parse_ip_sloppy(" 1.2.3.4"), None);
        assert_eq!(parse_ip_sloppy("fd00::1"), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn sloppy_cidr_trims_and_masks() {
        assert_eq!(parse_cidr_sloppy(" 203.0.113.000/025"), Some("203.0.113.0/25".parse().unwrap()));
        assert_eq!(parse_cidr_sloppy("10.0.0.7/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_cidr_sloppy("10.0.0.0/33"), None);
        assert_eq!(parse_cidr_sloppy("10.0.0.0"), None);
        assert_eq!(parse_cidr_sloppy("2001:db8::1/64"), Some("2001:db8::/64".parse().unwrap()));
    }

    #[test]
    fn addr_port_brackets_ipv6() {
        assert_eq!(fmt_addr_port(&"fd00::1".parse().unwrap(), 80), "[fd00::1]:80");
        assert_eq!(fmt_addr_port(&"10.0.0.1".parse().unwrap(), 80), "10.0.0.1:80");
    }
}
