//! Turning socket errors into observations: which errno means refused, dropped or unreachable.

use std::io;

use super::{Observation, Stage};

/// Classifies an error from connect/send/recv during `stage`.
pub(crate) fn observe(err: &io::Error, stage: Stage, doing: &str) -> Observation {
    if let Some(code) = err.raw_os_error() {
        let name = errno_name(code);
        return match code {
            libc::ECONNREFUSED | libc::EPERM => Observation::Refused { errno: name },
            libc::EHOSTUNREACH | libc::ENETUNREACH => Observation::Unreachable { errno: name },
            libc::ETIMEDOUT | libc::EAGAIN => Observation::Timeout { stage },
            _ => Observation::Error { errno: Some(name), message: format!("{doing}: {err}") },
        };
    }
    match err.kind() {
        // socket2's connect_timeout and std's read timeouts report these without an errno.
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Observation::Timeout { stage },
        _ => Observation::Error { errno: None, message: format!("{doing}: {err}") },
    }
}

/// The symbolic name of the errno values a network probe meets; others print as `errno N`.
pub(crate) fn errno_name(code: i32) -> String {
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::EPIPE => "EPIPE",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETRESET => "ENETRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        _ => return format!("errno {code}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_observations() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            observe(&os(libc::ECONNREFUSED), Stage::Connect, "x"),
            Observation::Refused { errno: "ECONNREFUSED".into() }
        );
        assert_eq!(observe(&os(libc::EPERM), Stage::Connect, "x"), Observation::Refused { errno: "EPERM".into() });
        assert_eq!(
            observe(&os(libc::ENETUNREACH), Stage::Connect, "x"),
            Observation::Unreachable { errno: "ENETUNREACH".into() }
        );
        assert_eq!(observe(&os(libc::EAGAIN), Stage::Reply, "x"), Observation::Timeout { stage: Stage::Reply });
        assert_eq!(
            observe(&io::Error::from(io::ErrorKind::TimedOut), Stage::Connect, "x"),
            Observation::Timeout { stage: Stage::Connect }
        );
        let Observation::Error { errno, .. } = observe(&os(libc::EADDRNOTAVAIL), Stage::Connect, "bind") else {
            panic!("EADDRNOTAVAIL is an error")
        };
        assert_eq!(errno.as_deref(), Some("EADDRNOTAVAIL"));
        assert_eq!(errno_name(4095), "errno 4095");
    }
}
