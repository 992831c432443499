//! The API server's name rules, applied to manifests (which never passed
//! through an API server): namespaces and port names are DNS-1123 labels,
//! Service names DNS-1035 labels, EndpointSlice and Node names DNS-1123
//! subdomains. A manifest object that breaks one is refused by name before
//! it reaches the model or a backend.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const LABEL_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;

fn shown(value: &str) -> String {
    let cut: String = value.chars().take(80).collect();
    if cut.len() < value.len() { format!("{cut:?}... ({} bytes)", value.len()) } else { format!("{cut:?}") }
}

/// A DNS-1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn dns1123_label(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= LABEL_MAX
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a DNS-1123 label (1-{LABEL_MAX} lowercase letters, digits and '-', starting and ending with a letter or digit)",
            shown(value)
        ))
    }
}

/// A DNS-1035 label: a DNS-1123 label that starts with a letter.
pub fn dns1035_label(value: &str) -> Result<(), String> {
    dns1123_label(value).map_err(|_| {
        format!(
            "{} is not a DNS-1035 label (1-{LABEL_MAX} lowercase letters, digits and '-', starting with a letter)",
            shown(value)
        )
    })?;
    if value.starts_with(|c: char| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(format!("{} is not a DNS-1035 label (it must start with a letter)", shown(value)))
    }
}

/// A DNS-1123 subdomain: dot-separated DNS-1123 labels, at most 253 bytes.
pub fn dns1123_subdomain(value: &str) -> Result<(), String> {
    let ok =
        !value.is_empty() && value.len() <= SUBDOMAIN_MAX && value.split('.').all(|part| dns1123_label(part).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a DNS-1123 subdomain (at most {SUBDOMAIN_MAX} bytes of lowercase letters, digits, '-' and '.')",
            shown(value)
        ))
    }
}

fn check_meta(meta: &ObjectMeta, name_rule: fn(&str) -> Result<(), String>) -> Result<(), String> {
    if let Some(ns) = meta.namespace.as_deref() {
        dns1123_label(ns).map_err(|e| format!("metadata.namespace: {e}"))?;
    }
    name_rule(meta.name.as_deref().unwrap_or("")).map_err(|e| format!("metadata.name: {e}"))
}

/// The API server's name rules for a Service; `Err` names the field.
pub fn check_service(svc: &Service) -> Result<(), String> {
    check_meta(&svc.metadata, dns1035_label)?;
    for (i, p) in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).enumerate() {
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            dns1123_label(name).map_err(|e| format!("spec.ports[{i}].name: {e}"))?;
        }
    }
    Ok(())
}

/// The API server's name rules for an EndpointSlice; `Err` names the field.
pub fn check_slice(slice: &EndpointSlice) -> Result<(), String> {
    check_meta(&slice.metadata, dns1123_subdomain)?;
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            dns1123_label(name).map_err(|e| format!("ports[{i}].name: {e}"))?;
        }
    }
    Ok(())
}

/// The API server's name rule for a Node.
pub fn check_node_name(name: &str) -> Result<(), String> {
    dns1123_subdomain(name).map_err(|e| format!("metadata.name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_api_server() {
        assert!(dns1123_label("kube-dns").is_ok());
        assert!(dns1123_label("a").is_ok());
        for bad in ["", "-a", "a-", "A", "a b", "a;b", "ä", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad:?}");
        }
        assert!(dns1035_label("9lives").is_err());
        assert!(dns1123_subdomain("web-1.abc").is_ok());
        assert!(dns1123_subdomain("web..abc").is_err());
        assert!(dns1123_subdomain(&"a".repeat(254)).is_err());
        let long = "x".repeat(5000);
        assert!(dns1123_label(&long).unwrap_err().contains("(5000 bytes)"));
    }
}
