//! Map keys and values in Rust terms, one type per map, mirroring `bpf/lib/maps.h`.
//!
//! These are what the pure `Programmer` computes and what `Maps` encodes
//! through the skeleton's generated types. Addresses are kept as the C side
//! stores them: four 32-bit words in network byte order, IPv4 in the first.

use ferry_model::IpFamily;
use std::net::IpAddr;

/// An address as four network-order words (`__u32 addr[4]`).
pub type Words = [u32; 4];

pub const FAM_V4: u8 = 0;
pub const FAM_V6: u8 = 1;

pub const CLASS_POD: u8 = 0;
pub const CLASS_HOST: u8 = 1;
pub const CLASS_EXTERNAL: u8 = 2;

pub const FE_CLUSTER_IP: u8 = 0;
pub const FE_NODE_PORT: u8 = 1;
pub const FE_LOAD_BALANCER: u8 = 2;
pub const FE_EXTERNAL_IP: u8 = 3;
pub const FE_CLUSTER_IP_ANY_PORT: u8 = 4;
pub const FE_FIREWALL: u8 = 1;

pub const ACT_FORWARD_CLUSTER: u8 = 1;
pub const ACT_FORWARD_LOCAL: u8 = 2;
pub const ACT_DROP: u8 = 3;
pub const ACT_REJECT: u8 = 4;
pub const ACT_MASK: u8 = 0x0f;
pub const ACT_MASQ: u8 = 0x80;

pub const SVC_AFFINITY: u8 = 1;
pub const SVC_MAGLEV: u8 = 2;
pub const SET_CLUSTER: u8 = 0;
pub const SET_LOCAL: u8 = 1;
pub const BE_LOCAL: u8 = 1;

pub const LOCAL_HOST: u8 = 1;
pub const LOCAL_NODEPORT: u8 = 2;
pub const RANGE_POD: u8 = 1;
pub const RANGE_SERVICE: u8 = 2;
pub const RANGE_MASQ_SOURCE: u8 = 3;
pub const RANGE_NO_MASQ: u8 = 4;

/// Length of `struct svc_name.name` including the terminating NUL.
pub const NAME_LEN: usize = 120;

pub fn words(ip: &IpAddr) -> Words {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

pub fn ip_of(words: &Words, family: u8) -> IpAddr {
    if family == FAM_V4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

pub fn family_code(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => FAM_V4,
        IpFamily::V6 => FAM_V6,
    }
}

pub fn family_of(ip: &IpAddr) -> u8 {
    family_code(IpFamily::of(ip))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeKey {
    pub addr: Words,
    /// Host byte order; encoded big-endian.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeVal {
    pub service: u32,
    pub kind: u8,
    pub flags: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SvcVal {
    pub count: [u16; 2],
    pub action: [[u8; 3]; 2],
    pub flags: u8,
    pub rev: u8,
    pub affinity_timeout: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub service: u32,
    pub rev: u8,
    pub set: u8,
    pub slot: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: Words,
    /// Host byte order; encoded big-endian.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberKey {
    pub service: u32,
    pub backend: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FwKey {
    pub prefixlen: u32,
    pub service: u32,
    pub addr: Words,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalKey {
    pub addr: Words,
    pub family: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeKey {
    pub prefixlen: u32,
    pub kind: u8,
    pub family: u8,
    pub addr: Words,
}

pub const CFG_PODS_BY_RANGE: u8 = 1;
pub const CFG_PODS_BY_DEVICE: u8 = 2;
pub const CFG_MASQ_BPF: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Config {
    pub host_netns: u64,
    pub pod_class: [u8; 2],
    pub flags: u8,
    pub primary: [Words; 2],
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    pub tcp_close_timeout: u32,
    pub udp_timeout: u32,
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub maglev_size: u32,
}

/// Key of a Maglev table in `ferry_maglev`: service << 8 | set.
pub fn maglev_key(service: u32, set: u8) -> u64 {
    (u64::from(service) << 8) | u64::from(set)
}

pub const DEV_EXTERNAL: u8 = 1;
pub const DEV_POD: u8 = 2;

/// A node device the tc programs are attached to (`struct device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Device {
    /// SNAT address per family for traffic leaving through it; zero: the primary address.
    pub snat: [Words; 2],
    pub flags: u8,
}

/// One write to or delete from a datapath map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    DelBackend(u32),
    PutSlot(SlotKey, u32),
    DelSlot(SlotKey),
    PutMember(MemberKey, u8),
    DelMember(MemberKey),
    PutFirewall(FwKey),
    DelFirewall(FwKey),
    PutService(u32, SvcVal),
    DelService(u32),
    PutName(u32, String),
    DelName(u32),
    PutFrontend(FeKey, FeVal),
    DelFrontend(FeKey),
    PutLocal(LocalKey, u8),
    DelLocal(LocalKey),
    PutRange(RangeKey),
    DelRange(RangeKey),
    PutConfig(Config),
    PutDevice(u32, Device),
    DelDevice(u32),
    /// A whole Maglev table (backend ids by slot), swapped in atomically.
    PutMaglev(u64, Vec<u32>),
    DelMaglev(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_both_families() {
        for s in ["10.1.2.3", "fd00::1:2", "::ffff:1.2.3.4", "255.255.255.255"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_of(&words(&ip), family_of(&ip)), ip);
        }
        // Network order: the first byte in memory is the first octet.
        let w = words(&"10.1.2.3".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [10, 1, 2, 3]);
    }
}
