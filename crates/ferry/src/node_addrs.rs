//! Finding this node's addresses when the config does not list them.

use std::net::IpAddr;

/// Every address configured in the current network namespace, except
/// loopback and IPv6 link-local (they never identify the node to a peer).
pub fn detect() -> std::io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = by_device()?.into_iter().map(|(_, ip)| ip).filter(is_usable).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether an address can identify the node to a peer (not loopback, not link-local).
pub fn is_usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// Every (interface, address) pair of the current network namespace, in the kernel's order.
pub fn by_device() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs/freeifaddrs pair; every pointer is checked before use.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                let name = std::ffi::CStr::from_ptr((*cur).ifa_name).to_string_lossy().into_owned();
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push((name, IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push((name, IpAddr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}
