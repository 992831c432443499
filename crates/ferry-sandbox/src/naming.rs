//! The naming rule that makes cleanup safe: every object is `ferry-<tag>-<owner pid>-<seq>-<object>`.
//!
//! Encoding the owning process id in the name is what lets `sweep_stale` tell the leftovers of a dead run
//! from the live objects of a concurrent one, without any state file.

use crate::SandboxError;

/// Every object a sandbox creates starts with this prefix.
pub const PREFIX: &str = "ferry-";

const MAX_TAG: usize = 8;
const MAX_OBJECT: usize = 12;
/// IFNAMSIZ is 16 including the terminating NUL.
const MAX_IFNAME: usize = 15;

/// A parsed sandbox object name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedName {
    /// The caller's tag (`Sandbox::new(tag)`).
    pub tag: String,
    /// Process id of the process that created the object.
    pub owner_pid: u32,
    /// Distinguishes sandboxes created by the same process.
    pub seq: u32,
    /// The host, cgroup or directory short name.
    pub object: String,
}

/// `ferry-<tag>-<pid>-<seq>`: the common prefix of all objects of one sandbox.
pub(crate) fn sandbox_id(tag: &str, pid: u32, seq: u32) -> String {
    format!("{PREFIX}{tag}-{pid}-{seq}")
}

/// `<sandbox id>-<object>`.
pub(crate) fn object_name(sandbox_id: &str, object: &str) -> String {
    format!("{sandbox_id}-{object}")
}

/// Parses a name made by [`object_name`]; anything else (including other `ferry-*` objects) is `None`,
/// so the sweeper never touches names it did not make.
pub fn parse(name: &str) -> Option<OwnedName> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(4, '-');
    let tag = parts.next()?;
    let pid = parts.next()?;
    let seq = parts.next()?;
    let object = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !is_tag(tag) || !digits(pid) || !digits(seq) || object.is_empty() {
        return None;
    }
    Some(OwnedName {
        tag: tag.to_owned(),
        owner_pid: pid.parse().ok()?,
        seq: seq.parse().ok()?,
        object: object.to_owned(),
    })
}

fn is_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= MAX_TAG && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A tag has no `-`, so the owner pid is always the second field of a name.
pub(crate) fn check_tag(tag: &str) -> Result<(), SandboxError> {
    if is_tag(tag) {
        return Ok(());
    }
    Err(SandboxError::InvalidName {
        kind: "sandbox tag",
        name: tag.to_owned(),
        reason: format!("use 1 to {MAX_TAG} characters from a-z and 0-9"),
    })
}

/// Host and cgroup short names: short, so that netns names stay readable in `ip netns list`.
pub(crate) fn check_object(kind: &'static str, name: &str) -> Result<(), SandboxError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_OBJECT
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        return Ok(());
    }
    Err(SandboxError::InvalidName {
        kind,
        name: name.to_owned(),
        reason: format!("use 1 to {MAX_OBJECT} characters from a-z, 0-9 and inner '-'"),
    })
}

/// Interface names: the kernel's own limits, checked before `ip` gives a vaguer error.
pub(crate) fn check_ifname(name: &str) -> Result<(), SandboxError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        return Ok(());
    }
    Err(SandboxError::InvalidName {
        kind: "interface",
        name: name.to_owned(),
        reason: format!("interface names have 1 to {MAX_IFNAME} printable characters, without '/', ':' or spaces"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let id = sandbox_id("demo", 4242, 3);
        let name = object_name(&id, "node-1");
        assert_eq!(name, "ferry-demo-4242-3-node-1");
        assert_eq!(
            parse(&name),
            Some(OwnedName { tag: "demo".into(), owner_pid: 4242, seq: 3, object: "node-1".into() })
        );
    }

    #[test]
    fn foreign_names_are_not_parsed() {
        for name in [
            "ferry",
            "ferry-",
            "ferry-agent",
            "ferry-demo-12-3",
            "ferry-demo-x12-3-node",
            "ferry-demo-12--node",
            "ferry-Demo-12-3-node",
            "spk-a",
            "ferry-demo-99999999999-3-node",
        ] {
            assert_eq!(parse(name), None, "{name}");
        }
    }

    #[test]
    fn name_checks() {
        assert!(check_tag("t1").is_ok());
        assert!(check_tag("with-dash").is_err());
        assert!(check_tag("muchtoolongtag").is_err());
        assert!(check_object("host", "pod-a").is_ok());
        assert!(check_object("host", "-pod").is_err());
        assert!(check_object("host", "Pod").is_err());
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("veth-0123456789").is_ok());
        assert!(check_ifname("veth-01234567890").is_err());
        assert!(check_ifname("a/b").is_err());
    }
}
