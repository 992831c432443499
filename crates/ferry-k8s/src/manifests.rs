//! Reading a directory of Kubernetes manifests into a `ClusterState`.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file below the directory is read, in
//! path order. A file may hold several YAML documents and `kind: List`
//! objects. A document that cannot be read is reported with its file and
//! position and skipped; every other document is still loaded.

use ferry_model::state::{ClusterState, ObjectKey};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use std::collections::btree_map::Entry;
use std::fmt;
use std::path::{Path, PathBuf};

/// A manifest document that was skipped, or an informational note about one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    pub file: PathBuf,
    /// 1-based document number within the file (and item number for `List`s).
    pub document: String,
    pub message: String,
    /// True when the document was skipped; false for notes (e.g. kinds ferry does not read).
    pub skipped: bool,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tail = if self.skipped { " (document skipped; the others are loaded)" } else { "" };
        write!(f, "{} document {}: {}{tail}", self.file.display(), self.document, self.message)
    }
}

/// What a directory held.
#[derive(Debug, Clone, Default)]
pub struct LoadedManifests {
    pub state: ClusterState,
    pub problems: Vec<ManifestProblem>,
    pub files: usize,
}

/// Failure to read the directory itself (not one document in it).
#[derive(Debug, thiserror::Error)]
pub enum ManifestDirError {
    #[error("cannot read manifest directory {path}: {source} (check that it exists and is readable)")]
    Unreadable { path: PathBuf, source: std::io::Error },
}

/// Loads every manifest below `dir`.
pub fn load_dir(dir: &Path) -> Result<LoadedManifests, ManifestDirError> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)
        .map_err(|source| ManifestDirError::Unreadable { path: dir.to_path_buf(), source })?;
    files.sort();
    let mut out = LoadedManifests { files: files.len(), ..Default::default() };
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_text(&file, &text, &mut out),
            Err(e) => out.problems.push(ManifestProblem {
                file: file.clone(),
                document: "-".into(),
                message: format!("cannot read file: {e}"),
                skipped: true,
            }),
        }
    }
    Ok(out)
}

pub(crate) fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
    Ok(())
}

/// Loads the documents of one file's text.
pub fn load_text(file: &Path, text: &str, out: &mut LoadedManifests) {
    let is_json = file.extension().and_then(|e| e.to_str()) == Some("json");
    if is_json && load_json(file, "1", text, out).is_ok() {
        return;
    }
    let docs: Result<Vec<Value>, String> = if is_json {
        serde_json::from_str::<Value>(text).map(|v| vec![v]).map_err(|e| e.to_string())
    } else {
        serde_saphyr::from_multiple::<Value>(text).map_err(|e| e.to_string())
    };
    let docs = match docs {
        Ok(d) => d,
        Err(message) => {
            out.problems.push(ManifestProblem {
                file: file.to_path_buf(),
                document: "-".into(),
                message: format!("not valid {}: {message}", if is_json { "JSON" } else { "YAML" }),
                skipped: true,
            });
            return;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        load_document(file, &format!("{}", i + 1), doc, out);
    }
}

/// Adds a Service; a second definition of the same key is refused (the message says so).
fn add_service(svc: Service, state: &mut ClusterState) -> Option<String> {
    match state.services.entry(ObjectKey::of_meta(&svc.metadata)) {
        Entry::Occupied(e) => Some(format!("Service {} is defined twice; the first definition is kept", e.key())),
        Entry::Vacant(e) => {
            e.insert(svc);
            None
        }
    }
}

/// Adds an EndpointSlice; a second definition of the same key is refused.
fn add_slice(slice: EndpointSlice, state: &mut ClusterState) -> Option<String> {
    match state.endpoint_slices.entry(ObjectKey::of_meta(&slice.metadata)) {
        Entry::Occupied(e) => Some(format!("EndpointSlice {} is defined twice; the first definition is kept", e.key())),
        Entry::Vacant(e) => {
            e.insert(slice);
            None
        }
    }
}

fn add_node(node: Node, state: &mut ClusterState) {
    state.nodes.insert(node.metadata.name.clone().unwrap_or_default(), node);
}

/// The fields a JSON document is dispatched on, read without building the
/// whole document (`List` items stay raw text until their kind is known).
#[derive(serde::Deserialize)]
struct JsonHead<'a> {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(borrow, default)]
    items: Option<Vec<&'a serde_json::value::RawValue>>,
}

/// JSON files: each object is parsed straight from its text into its API
/// type. A `Value` tree is built only for kinds ferry does not read and for
/// objects that fail to parse (to say why, as the YAML path does).
fn load_json(file: &Path, position: &str, text: &str, out: &mut LoadedManifests) -> Result<(), String> {
    let head: JsonHead = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match (head.api_version.as_deref(), head.kind.as_deref(), head.items) {
        (Some("v1"), Some("List"), Some(items)) => {
            for (j, item) in items.into_iter().enumerate() {
                let at = format!("{position} item {}", j + 1);
                if load_json(file, &at, item.get(), out).is_err() {
                    let doc = serde_json::from_str::<Value>(item.get()).unwrap_or(Value::Null);
                    load_document(file, &at, doc, out);
                }
            }
            Ok(())
        }
        (Some("v1"), Some("Service"), _) => read_typed(file, position, text, out, add_service),
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice"), _) => read_typed(file, position, text, out, add_slice),
        (Some("v1"), Some("Node"), _) => read_typed(file, position, text, out, |node, state| {
            add_node(node, state);
            None
        }),
        _ => Err("not one of the kinds read directly".into()),
    }
}

/// Parses one object of a known kind from its JSON text and adds it; a
/// refusal (a second definition) becomes a problem. Err: it did not parse.
fn read_typed<T: serde::de::DeserializeOwned>(
    file: &Path,
    position: &str,
    text: &str,
    out: &mut LoadedManifests,
    add: impl FnOnce(T, &mut ClusterState) -> Option<String>,
) -> Result<(), String> {
    let object = serde_json::from_str::<T>(text).map_err(|e| e.to_string())?;
    if let Some(message) = add(object, &mut out.state) {
        out.problems.push(ManifestProblem {
            file: file.to_path_buf(),
            document: position.into(),
            message,
            skipped: true,
        });
    }
    Ok(())
}

fn load_document(file: &Path, position: &str, doc: Value, out: &mut LoadedManifests) {
    let mut problem = |message: String, skipped: bool| {
        out.problems.push(ManifestProblem {
            file: file.to_path_buf(),
            document: position.to_string(),
            message,
            skipped,
        });
    };
    if doc.is_null() {
        return; // an empty document (e.g. a trailing `---`)
    }
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    if api_version.is_empty() || kind.is_empty() {
        problem("has no apiVersion or kind, so it is not a Kubernetes object".into(), true);
        return;
    }
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<unnamed>").to_string();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = doc.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                load_document(file, &format!("{position} item {}", j + 1), item, out);
            }
        }
        ("v1", "Service") => match serde_json::from_value::<Service>(doc) {
            Ok(svc) => {
                if let Some(m) = add_service(svc, &mut out.state) {
                    problem(m, true)
                }
            }
            Err(e) => problem(format!("Service {name}: {e}"), true),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match serde_json::from_value::<EndpointSlice>(doc) {
            Ok(slice) => {
                if let Some(m) = add_slice(slice, &mut out.state) {
                    problem(m, true)
                }
            }
            Err(e) => problem(format!("EndpointSlice {name}: {e}"), true),
        },
        ("v1", "Node") => match serde_json::from_value::<Node>(doc) {
            Ok(node) => add_node(node, &mut out.state),
            Err(e) => problem(format!("Node {name}: {e}"), true),
        },
        (v, "EndpointSlice") => {
            problem(format!("EndpointSlice {name} has apiVersion {v}; ferry reads discovery.k8s.io/v1"), true)
        }
        (_, "Endpoints") => problem(
            format!("Endpoints {name} ignored: ferry reads EndpointSlices (discovery.k8s.io/v1), as kube-proxy does"),
            false,
        ),
        (v, k) => problem(format!("{k} {name} ({v}) is not a kind ferry reads; ignored"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_and_lists_load() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.1.5]}]
  ports: [{port: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;
        let mut out = LoadedManifests::default();
        load_text(Path::new("x.yaml"), text, &mut out);
        assert_eq!(out.state.services.len(), 1);
        assert_eq!(out.state.endpoint_slices.len(), 1);
        assert_eq!(out.problems.len(), 1);
        assert!(!out.problems[0].skipped, "{}", out.problems[0]);
        assert!(out.problems[0].to_string().contains("Deployment web"));
    }

    #[test]
    fn a_broken_document_is_reported_and_the_rest_loads() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: \"eighty\"}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2}\n";
        let mut out = LoadedManifests::default();
        load_text(Path::new("svc.yaml"), text, &mut out);
        assert_eq!(out.state.services.len(), 1);
        let p = &out.problems[0];
        assert!(p.skipped);
        assert!(p.to_string().starts_with("svc.yaml document 1: Service a:"), "{p}");
    }

    /// JSON Lists are read item by item straight into API types; what cannot
    /// be read is reported exactly as on the YAML path.
    #[test]
    fn a_json_list_reports_bad_items_and_loads_the_rest() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": "eighty"}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"clusterIP": "10.96.0.2"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"clusterIP": "10.96.0.3"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "b-1"}, "addressType": "IPv4", "endpoints": []}
        ]}"#;
        let mut out = LoadedManifests::default();
        load_text(Path::new("all.json"), text, &mut out);
        assert_eq!(out.state.services.len(), 1);
        assert_eq!(out.state.endpoint_slices.len(), 1);
        let shown: Vec<String> = out.problems.iter().map(ToString::to_string).collect();
        assert!(shown[0].starts_with("all.json document 1 item 1: Service a:"), "{shown:?}");
        assert!(shown[1].contains("item 3: Service default/b is defined twice"), "{shown:?}");
        assert!(shown[2].contains("item 4: ConfigMap c (v1) is not a kind ferry reads"), "{shown:?}");
        assert_eq!(
            out.state.services[&ObjectKey::new("default", "b")].spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.2")
        );
    }

    #[test]
    fn invalid_yaml_names_the_file() {
        let mut out = LoadedManifests::default();
        load_text(Path::new("bad.yaml"), "kind: [unclosed", &mut out);
        assert!(out.problems[0].to_string().contains("bad.yaml"));
        assert!(out.problems[0].message.contains("not valid YAML"));
    }
}
