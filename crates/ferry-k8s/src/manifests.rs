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
                let key = ObjectKey::of_meta(&svc.metadata);
                match out.state.services.entry(key) {
                    Entry::Occupied(e) => {
                        problem(format!("Service {} is defined twice; the first definition is kept", e.key()), true)
                    }
                    Entry::Vacant(e) => {
                        e.insert(svc);
                    }
                }
            }
            Err(e) => problem(format!("Service {name}: {e}"), true),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match serde_json::from_value::<EndpointSlice>(doc) {
            Ok(slice) => {
                let key = ObjectKey::of_meta(&slice.metadata);
                match out.state.endpoint_slices.entry(key) {
                    Entry::Occupied(e) => problem(
                        format!("EndpointSlice {} is defined twice; the first definition is kept", e.key()),
                        true,
                    ),
                    Entry::Vacant(e) => {
                        e.insert(slice);
                    }
                }
            }
            Err(e) => problem(format!("EndpointSlice {name}: {e}"), true),
        },
        ("v1", "Node") => match serde_json::from_value::<Node>(doc) {
            Ok(node) => {
                let key = node.metadata.name.clone().unwrap_or_default();
                out.state.nodes.insert(key, node);
            }
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

    #[test]
    fn invalid_yaml_names_the_file() {
        let mut out = LoadedManifests::default();
        load_text(Path::new("bad.yaml"), "kind: [unclosed", &mut out);
        assert!(out.problems[0].to_string().contains("bad.yaml"));
        assert!(out.problems[0].message.contains("not valid YAML"));
    }
}
