//! The resource types the fake API server serves, and how their URLs are spelled.
//!
//! Only what ferry watches is served: Services, EndpointSlices (discovery.k8s.io/v1)
//! and Nodes. A URL is parsed into a [`Target`] the same way kube-apiserver lays
//! them out (`/api/v1/...` for the core group, `/apis/GROUP/VERSION/...` otherwise).

/// A resource type the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Services,
    EndpointSlices,
    Nodes,
}

impl ResourceType {
    pub const ALL: [ResourceType; 3] = [ResourceType::Services, ResourceType::EndpointSlices, ResourceType::Nodes];

    /// `apiVersion` of the objects and lists.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceType::Services | ResourceType::Nodes => "v1",
            ResourceType::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    /// `kind` of one object.
    pub fn kind(self) -> &'static str {
        match self {
            ResourceType::Services => "Service",
            ResourceType::EndpointSlices => "EndpointSlice",
            ResourceType::Nodes => "Node",
        }
    }

    /// The URL path segment (plural name).
    pub fn plural(self) -> &'static str {
        match self {
            ResourceType::Services => "services",
            ResourceType::EndpointSlices => "endpointslices",
            ResourceType::Nodes => "nodes",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, ResourceType::Nodes)
    }

    /// The served resource type of a k8s-openapi type, if the fake serves it.
    pub fn of<K: k8s_openapi::Resource>() -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|r| r.api_version() == K::API_VERSION && r.kind() == K::KIND)
    }

    /// The path prefix of the group/version (`/api/v1`, `/apis/discovery.k8s.io/v1`).
    fn group_prefix(self) -> &'static str {
        match self {
            ResourceType::Services | ResourceType::Nodes => "/api/v1",
            ResourceType::EndpointSlices => "/apis/discovery.k8s.io/v1",
        }
    }
}

/// What a request URL addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub resource: ResourceType,
    /// `Some` for `/namespaces/{ns}/...` URLs; `None` means all namespaces (or a cluster-scoped kind).
    pub namespace: Option<String>,
    /// `Some` for a single-object URL.
    pub name: Option<String>,
}

/// Parses a request path; `None` when the fake does not serve it.
pub fn parse_path(path: &str) -> Option<Target> {
    let path = path.trim_end_matches('/');
    ResourceType::ALL.into_iter().find_map(|resource| {
        let rest = path.strip_prefix(resource.group_prefix())?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        let (namespace, tail) = match segments.as_slice() {
            ["namespaces", ns, tail @ ..] if resource.namespaced() && !tail.is_empty() => (Some(ns.to_string()), tail),
            tail => (None, tail),
        };
        match tail {
            [plural] if *plural == resource.plural() => Some(Target { resource, namespace, name: None }),
            [plural, name] if *plural == resource.plural() && !name.is_empty() => {
                Some(Target { resource, namespace, name: Some(name.to_string()) })
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn target(resource: ResourceType, namespace: Option<&str>, name: Option<&str>) -> Option<Target> {
        Some(Target { resource, namespace: namespace.map(Into::into), name: name.map(Into::into) })
    }

    #[test]
    fn parses_the_urls_kube_rs_requests() {
        use ResourceType::*;
        let cases = [
            ("/api/v1/services", target(Services, None, None)),
            ("/api/v1/namespaces/kube-system/services", target(Services, Some("kube-system"), None)),
            (
                "/api/v1/namespaces/kube-system/services/kube-dns",
                target(Services, Some("kube-system"), Some("kube-dns")),
            ),
            ("/apis/discovery.k8s.io/v1/endpointslices", target(EndpointSlices, None, None)),
            ("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/b", target(EndpointSlices, Some("a"), Some("b"))),
            ("/api/v1/nodes", target(Nodes, None, None)),
            ("/api/v1/nodes/node-a", target(Nodes, None, Some("node-a"))),
            // Nodes are cluster-scoped; pods and unknown groups are not served.
            ("/api/v1/namespaces/a/nodes", None),
            ("/api/v1/pods", None),
            ("/apis/discovery.k8s.io/v1beta1/endpointslices", None),
            ("/api/v1/services/a/b", None),
            ("/api", None),
        ];
        for (path, want) in cases {
            assert_eq!(parse_path(path), want, "{path}");
        }
    }

    #[test]
    fn maps_k8s_openapi_types() {
        assert_eq!(ResourceType::of::<Service>(), Some(ResourceType::Services));
        assert_eq!(ResourceType::of::<EndpointSlice>(), Some(ResourceType::EndpointSlices));
        assert_eq!(ResourceType::of::<Node>(), Some(ResourceType::Nodes));
        assert_eq!(ResourceType::of::<ConfigMap>(), None);
    }
}
