//! What can go wrong talking to the kernel's conntrack table, and what to do about it.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "opening a ctnetlink socket: {source} (ferry needs root or CAP_NET_ADMIN, and a kernel with \
         nf_conntrack_netlink)"
    )]
    Open { source: io::Error },

    #[error("entering the network namespace {}: {source} (does it exist? are you root?)", path.display())]
    EnterNetns { path: PathBuf, source: io::Error },

    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error },

    #[error("the kernel refused {what}: {source}")]
    Kernel { what: &'static str, source: io::Error },

    #[error("unreadable ctnetlink reply while {what}: {detail} (please report this with `uname -r`)")]
    Malformed { what: &'static str, detail: String },

    #[error(
        "replies to {what} were lost (netlink receive buffer overrun): the counts are unknown; the next \
         reconcile sees what is left"
    )]
    RepliesLost { what: &'static str },

    #[error("{entry}: ferry writes only TCP, UDP and SCTP entries over ctnetlink")]
    Unsupported { entry: String },

    #[error("this socket stopped in the middle of a dump after an earlier error; open a new one")]
    Broken,
}

impl Error {
    pub(crate) fn kernel(what: &'static str, errno: i32) -> Error {
        Error::Kernel { what, source: io::Error::from_raw_os_error(errno.abs()) }
    }
}
