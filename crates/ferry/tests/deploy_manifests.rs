//! The manifests in deploy/ parse into the real Kubernetes types, carry no
//! field those types do not know, and agree with the code: the ClusterRole
//! grants exactly what the agent watches (`ferry::agent::WATCHED_RESOURCES`),
//! the DaemonSet mounts what the datapath needs and probes the agent's health
//! port, and the ConfigMap's node config is one the agent accepts.

use ferry::agent::WATCHED_RESOURCES;
use ferry::config::{self, NodeFlags};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every path of `original` must survive a round trip through the typed
/// object: a misspelled or misplaced field would be dropped silently otherwise.
fn assert_known_fields(original: &Value, typed: &Value, path: &str) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let p = format!("{path}.{k}");
                let t = t.get(k).unwrap_or_else(|| panic!("{p} is not a field of the Kubernetes type"));
                assert_known_fields(v, t, &p);
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            assert_eq!(o.len(), t.len(), "{path}");
            for (i, (o, t)) in o.iter().zip(t).enumerate() {
                assert_known_fields(o, t, &format!("{path}[{i}]"));
            }
        }
        _ => {}
    }
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, file: &str) -> T {
    let t: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_known_fields(doc, &serde_json::to_value(&t).unwrap(), file);
    t
}

/// Every object in deploy/*.yaml.
#[derive(Default)]
struct Manifests {
    daemonsets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            match (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or("")) {
                ("apps/v1", "DaemonSet") => m.daemonsets.push(typed(&doc, &name)),
                ("v1", "ServiceAccount") => m.service_accounts.push(typed(&doc, &name)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => m.cluster_roles.push(typed(&doc, &name)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => m.bindings.push(typed(&doc, &name)),
                ("v1", "ConfigMap") => m.config_maps.push(typed(&doc, &name)),
                (api, kind) => panic!("{name}: unexpected {api} {kind}; teach this test about it"),
            }
        }
    }
    m
}

fn only<'a, T>(v: &'a [T], what: &str) -> &'a T {
    assert_eq!(v.len(), 1, "expected exactly one {what}");
    &v[0]
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_watches() {
    let m = load();
    let role = only(&m.cluster_roles, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let needed: BTreeSet<(String, String, String)> = WATCHED_RESOURCES
        .iter()
        .flat_map(|w| w.verbs.iter().map(|v| (w.api_group.to_string(), w.resource.to_string(), v.to_string())))
        .collect();
    assert_eq!(granted, needed, "deploy/rbac.yaml must grant exactly ferry::agent::WATCHED_RESOURCES");

    let sa = only(&m.service_accounts, "ServiceAccount");
    let binding = only(&m.bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = only(binding.subjects.as_deref().unwrap_or_default(), "subject");
    assert_eq!((subject.kind.as_str(), Some(&subject.name)), ("ServiceAccount", sa.metadata.name.as_ref()));
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn the_daemonset_runs_privileged_on_the_host_network_with_bpffs_and_cgroup() {
    let m = load();
    let ds = only(&m.daemonsets, "DaemonSet");
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let sa = only(&m.service_accounts, "ServiceAccount");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    let tolerates_all = pod
        .tolerations
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none());
    assert!(tolerates_all, "the agent must run on every node, whatever its taints");

    let c = only(&pod.containers, "container");
    assert_eq!(c.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    let env = c.env.as_deref().unwrap_or_default();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME from the downward API");
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));

    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let host_path_of =
        |name: &str| volumes.iter().find(|v| v.name == name).and_then(|v| v.host_path.as_ref()).map(|h| h.path.clone());
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    let bpffs = mounts.iter().find(|m| host_path_of(&m.name).as_deref() == Some("/sys/fs/bpf")).expect("bpffs mount");
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"), "pins must reach the host's bpffs");
    let netns =
        mounts.iter().find(|m| host_path_of(&m.name).as_deref() == Some("/run/netns")).expect("/run/netns mount");
    assert_eq!(
        netns.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "the defrag loop's namespace must outlive the pod"
    );
    let cgroup = mounts
        .iter()
        .find(|m| host_path_of(&m.name).is_some_and(|p| p.starts_with("/sys/fs/cgroup")))
        .expect("the host's cgroup2 hierarchy is mounted");

    // Probes hit the agent's health server: /livez for liveness, /healthz for readiness.
    let probe = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        let g = p.and_then(|p| p.http_get.as_ref()).expect("an HTTP probe");
        (g.path.clone().unwrap_or_default(), serde_json::to_value(&g.port).unwrap())
    };
    let port = Value::from(ferry::config::agent::HEALTHZ_PORT);
    assert_eq!(probe(c.liveness_probe.as_ref()), ("/livez".to_string(), port.clone()));
    assert_eq!(probe(c.readiness_probe.as_ref()), ("/healthz".to_string(), port));

    // The node config the agent is started with is the ConfigMap's, and agrees with the mounts.
    let args = c.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("agent"));
    let cm = only(&m.config_maps, "ConfigMap");
    let cm_mount = mounts
        .iter()
        .find(|m| {
            volumes.iter().any(|v| {
                v.name == m.name && v.config_map.as_ref().is_some_and(|c| Some(&c.name) == cm.metadata.name.as_ref())
            })
        })
        .expect("the ConfigMap is mounted");
    let data = cm.data.as_ref().unwrap();
    for (flag, key) in [("--node-config", "node.yaml"), ("--kubeconfig", "kubeconfig.conf")] {
        let want = format!("{flag}={}/{key}", cm_mount.mount_path);
        assert!(args.contains(&want), "args {args:?} lack {want}");
        assert!(data.contains_key(key), "the ConfigMap lacks {key}");
    }
    let file = config::parse_file("deploy/configmap.yaml node.yaml", &data["node.yaml"]).unwrap();
    let settings = config::build("deploy/configmap.yaml node.yaml", file, &NodeFlags::default()).unwrap();
    assert_eq!(settings.bpf.cgroup_path.as_deref(), Some(Path::new(&cgroup.mount_path)));
    assert_eq!(settings.bpf.pin_path, Path::new(&bpffs.mount_path).join("ferry"));
    assert_eq!(settings.agent.healthz_bind_address.map(|a| a.port()), Some(ferry::config::agent::HEALTHZ_PORT));
    let kubeconfig: Value = serde_saphyr::from_str(&data["kubeconfig.conf"]).unwrap();
    assert_eq!(kubeconfig["kind"], "Config");
}

#[test]
fn the_containerfile_builds_ferry_and_ships_its_runtime_libraries() {
    let text = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    assert!(text.contains("cargo build --release --locked -p ferry"), "{text}");
    assert!(text.contains("clang-19"), "the eBPF programs need clang-19 at build time");
    for lib in ["libelf1", "zlib1g"] {
        assert!(text.contains(lib), "the runtime stage must install {lib}");
    }
    assert_eq!(text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")), 2, "a two-stage build");
}
