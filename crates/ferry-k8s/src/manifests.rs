//! Reading a directory of Kubernetes manifests into a `ClusterState`.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file below the directory is read, in
//! path order. A file may hold several YAML documents and `kind: List`
//! objects. A document that cannot be read is reported with its file and
//! position and skipped; every other document is still loaded.
//!
//! The loader cannot be wedged by what it finds: the walk follows symlinks
//! (a ConfigMap volume is made of them) but never into a directory it has
//! already seen, nor deeper than [`MAX_DEPTH`]; only regular files are opened
//! (a FIFO is reported, never read); an unreadable entry is reported by name
//! and the rest is read; a file over [`LoadLimits::max_file_bytes`] is refused
//! before it is parsed; YAML documents are split first and parsed one at a
//! time, each under its own budget, so one bad document costs only itself;
//! at most [`LoadLimits::max_documents`] per file; booleans follow YAML 1.2
//! (`y`, `yes`, `on` are strings).

use ferry_model::state::{ClusterState, ObjectKey};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use std::collections::BTreeSet;
use std::collections::btree_map::Entry;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// How deep below the manifest directory the walk goes.
pub const MAX_DEPTH: usize = 32;

/// Bounds on what one manifest file may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// A larger file is refused whole, by name, before it is read.
    pub max_file_bytes: u64,
    /// YAML documents (`---`) read from one file; the rest are reported.
    pub max_documents: usize,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits { max_file_bytes: 64 * 1024 * 1024, max_documents: 10_000 }
    }
}

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
        if self.document == "-" {
            let tail = if self.skipped { " (skipped; every other file is loaded)" } else { "" };
            return write!(f, "{}: {}{tail}", self.file.display(), self.message);
        }
        let tail = if self.skipped { " (document skipped; the others are loaded)" } else { "" };
        write!(f, "{} document {}: {}{tail}", self.file.display(), self.document, self.message)
    }
}

impl ManifestProblem {
    /// A problem with a whole file or directory entry (not one document).
    pub fn entry(path: &Path, message: String) -> ManifestProblem {
        ManifestProblem { file: path.to_path_buf(), document: "-".into(), message, skipped: true }
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
    load_dir_with(dir, LoadLimits::default())
}

/// Loads every manifest below `dir` within `limits`.
pub fn load_dir_with(dir: &Path, limits: LoadLimits) -> Result<LoadedManifests, ManifestDirError> {
    let mut files = Vec::new();
    let mut out = LoadedManifests::default();
    collect_files(dir, &mut files, &mut out.problems)
        .map_err(|source| ManifestDirError::Unreadable { path: dir.to_path_buf(), source })?;
    files.sort();
    out.files = files.len();
    for file in files {
        match read_file(&file, limits.max_file_bytes) {
            Ok(text) => load_text_with(&file, &text, limits, &mut out),
            Err(message) => out.problems.push(ManifestProblem::entry(&file, message)),
        }
    }
    Ok(out)
}

/// Whether a path names a manifest: `*.yaml`, `*.yml` or `*.json`, not hidden.
pub fn is_manifest_name(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    !hidden && matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Every manifest file below `dir`. Only `dir` itself being unreadable is an
/// error; an unreadable subdirectory, a loop, a FIFO or a dangling link is a
/// problem naming the entry, and the walk goes on.
pub fn collect_files(dir: &Path, out: &mut Vec<PathBuf>, problems: &mut Vec<ManifestProblem>) -> std::io::Result<()> {
    let mut seen = BTreeSet::new();
    let meta = std::fs::metadata(dir)?;
    seen.insert(file_id(&meta));
    let entries = std::fs::read_dir(dir)?;
    walk(entries, 1, &mut seen, out, problems);
    Ok(())
}

fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

fn walk(
    entries: std::fs::ReadDir,
    depth: usize,
    seen: &mut BTreeSet<(u64, u64)>,
    out: &mut Vec<PathBuf>,
    problems: &mut Vec<ManifestProblem>,
) {
    let mut listed = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => listed.push(e.path()),
            Err(e) => problems.push(ManifestProblem::entry(
                Path::new("(directory entry)"),
                format!("cannot list a directory entry: {e}"),
            )),
        }
    }
    listed.sort();
    for path in listed {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks: a ConfigMap volume links every file into `..data`.
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                if is_manifest_name(&path) || path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    problems.push(ManifestProblem::entry(&path, format!("cannot read: {e}")));
                }
                continue;
            }
        };
        if meta.is_dir() {
            if depth >= MAX_DEPTH {
                problems.push(ManifestProblem::entry(
                    &path,
                    format!("is more than {MAX_DEPTH} directories deep; not read"),
                ));
                continue;
            }
            if !seen.insert(file_id(&meta)) {
                problems.push(ManifestProblem::entry(
                    &path,
                    "leads to a directory already read (a symlink loop or a second link); not read again".into(),
                ));
                continue;
            }
            match std::fs::read_dir(&path) {
                Ok(entries) => walk(entries, depth + 1, seen, out, problems),
                Err(e) => problems.push(ManifestProblem::entry(&path, format!("cannot read directory: {e}"))),
            }
        } else if is_manifest_name(&path) {
            if meta.is_file() {
                out.push(path);
            } else {
                problems.push(ManifestProblem::entry(
                    &path,
                    "is not a regular file (a FIFO, socket or device); not read".into(),
                ));
            }
        }
    }
}

/// Reads one manifest file: a regular file only (opened non-blocking, so a
/// FIFO put in its place cannot hang the reader), at most `max_bytes`.
pub fn read_file(path: &Path, max_bytes: u64) -> Result<String, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read file: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read file: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file (a FIFO, socket or device); not read".into());
    }
    if meta.len() > max_bytes {
        return Err(format!(
            "is {} bytes, over the manifest size limit of {max_bytes} bytes; split it into several files",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read file: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(format!("grew over the manifest size limit of {max_bytes} bytes while being read"));
    }
    String::from_utf8(bytes).map_err(|e| format!("is not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

/// The YAML reading options: YAML 1.2 core booleans, a budget per document.
fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options
}

/// One YAML document of a stream: its 1-based line and its text.
struct YamlDocument<'a> {
    line: usize,
    text: &'a str,
}

/// Splits a YAML stream at its document markers (`---` and `...` at the start
/// of a line, which end a document wherever they appear), so that each
/// document is parsed, and fails, on its own. Documents holding only
/// comments and blank lines are dropped, and so are directives (`%YAML`,
/// `%TAG`: manifests do not use them, and YAML 1.2 is what is read anyway).
/// Each document's line is its first line of content.
fn split_documents(text: &str) -> Vec<YamlDocument<'_>> {
    let is_marker = |line: &str, m: &str| {
        line.strip_prefix(m).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    fn push<'a>(docs: &mut Vec<YamlDocument<'a>>, chunk: &'a str, line: usize) {
        let meaningful = chunk.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
        });
        if meaningful {
            docs.push(YamlDocument { line, text: chunk });
        }
    }
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_marker(bare, "---") {
            push(&mut docs, &text[start..offset], start_line);
            start = offset + 3;
            // The document's first line: the marker's own when it carries content (`--- {a: 1}`).
            start_line = if bare[3..].trim().is_empty() { n + 2 } else { n + 1 };
        } else if is_marker(bare, "...") {
            push(&mut docs, &text[start..offset], start_line);
            start = offset + line.len();
            start_line = n + 2;
        }
        offset += line.len();
    }
    push(&mut docs, &text[start.min(text.len())..], start_line);
    docs
}

/// Loads the documents of one file's text.
pub fn load_text(file: &Path, text: &str, out: &mut LoadedManifests) {
    load_text_with(file, text, LoadLimits::default(), out)
}

/// Loads the documents of one file's text within `limits`.
pub fn load_text_with(file: &Path, text: &str, limits: LoadLimits, out: &mut LoadedManifests) {
    let is_json = file.extension().and_then(|e| e.to_str()) == Some("json");
    if is_json {
        if load_json(file, "1", text, out).is_ok() {
            return;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(doc) => load_document(file, "1", doc, out),
            Err(e) => out.problems.push(ManifestProblem::entry(file, format!("not valid JSON: {e}"))),
        }
        return;
    }
    let docs = split_documents(text);
    if docs.len() > limits.max_documents {
        out.problems.push(ManifestProblem::entry(
            file,
            format!(
                "holds {} YAML documents, over the limit of {} per file; documents {} and later are not read \
                 (split the file)",
                docs.len(),
                limits.max_documents,
                limits.max_documents + 1
            ),
        ));
    }
    for (i, doc) in docs.into_iter().take(limits.max_documents).enumerate() {
        let position = format!("{}", i + 1);
        match serde_saphyr::from_str_with_options::<Value>(doc.text, yaml_options()) {
            Ok(value) => load_document(file, &position, value, out),
            Err(e) => out.problems.push(ManifestProblem {
                file: file.to_path_buf(),
                document: position,
                message: format!("not valid YAML (document starts at line {}): {e}", doc.line),
                skipped: true,
            }),
        }
    }
}

/// The message for an object whose names the API server would refuse; the
/// object's own name is shown only once it is known to be sane.
fn refused(kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, e: String) -> String {
    if e.starts_with("metadata.") {
        format!("{kind}: {e}; not loaded")
    } else {
        format!("{kind} {}: {e}; not loaded", ObjectKey::of_meta(meta))
    }
}

/// Adds a Service; a second definition of the same key is refused (the message says so).
fn add_service(svc: Service, state: &mut ClusterState) -> Option<String> {
    if let Err(e) = crate::names::check_service(&svc) {
        return Some(refused("Service", &svc.metadata, e));
    }
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
    if let Err(e) = crate::names::check_slice(&slice) {
        return Some(refused("EndpointSlice", &slice.metadata, e));
    }
    match state.endpoint_slices.entry(ObjectKey::of_meta(&slice.metadata)) {
        Entry::Occupied(e) => Some(format!("EndpointSlice {} is defined twice; the first definition is kept", e.key())),
        Entry::Vacant(e) => {
            e.insert(slice);
            None
        }
    }
}

fn add_node(node: Node, state: &mut ClusterState) -> Option<String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    if let Err(e) = crate::names::check_node_name(&name) {
        return Some(format!("Node: {e}"));
    }
    state.nodes.insert(name, node);
    None
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
        (Some("v1"), Some("Node"), _) => read_typed(file, position, text, out, add_node),
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
            Ok(node) => {
                if let Some(m) = add_node(node, &mut out.state) {
                    problem(m, true)
                }
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

    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: NAME}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

    #[test]
    fn a_syntax_error_costs_only_its_own_document() {
        let text = format!("{}---\nkind: [unclosed\n---\n{}", SVC.replace("NAME", "a"), SVC.replace("NAME", "b"));
        let mut out = LoadedManifests::default();
        load_text(Path::new("x.yaml"), &text, &mut out);
        assert_eq!(out.state.services.len(), 2, "{:?}", out.problems);
        assert_eq!(out.problems.len(), 1);
        assert_eq!(out.problems[0].document, "2");
        assert!(out.problems[0].message.contains("line 6"), "{}", out.problems[0]);
    }

    #[test]
    fn ten_thousand_documents_load_and_more_are_reported() {
        let many: String = (0..10_000).map(|i| format!("---\n{}", SVC.replace("NAME", &format!("s{i}")))).collect();
        let mut out = LoadedManifests::default();
        load_text(Path::new("x.yaml"), &many, &mut out);
        assert_eq!(out.state.services.len(), 10_000);
        assert!(out.problems.is_empty(), "{:?}", out.problems.first());
        let limits = LoadLimits { max_documents: 3, ..LoadLimits::default() };
        let mut out = LoadedManifests::default();
        load_text_with(Path::new("x.yaml"), &many, limits, &mut out);
        assert_eq!(out.state.services.len(), 3);
        assert!(out.problems[0].message.contains("documents 4 and later are not read"), "{}", out.problems[0]);
    }

    #[test]
    fn names_the_api_server_would_refuse_are_refused_by_name() {
        let long = "x".repeat(5000);
        let text = format!(
            "{}---\n{}---\n{}---\n{}",
            SVC.replace("NAME", "\"a b; flush ruleset\""),
            SVC.replace("NAME", "caf\u{e9}"),
            SVC.replace("NAME", &long),
            SVC.replace("NAME", "good").replace("{port: 80}", "{port: 80, name: \"http;drop\"}")
        );
        let mut out = LoadedManifests::default();
        load_text(Path::new("x.yaml"), &text, &mut out);
        assert!(out.state.services.is_empty());
        let shown: Vec<String> = out.problems.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 4, "{shown:?}");
        assert!(shown[0].contains("metadata.name: \"a b; flush ruleset\" is not a DNS-1035 label"), "{shown:?}");
        assert!(shown[2].contains("(5000 bytes)"), "{shown:?}");
        assert!(shown[3].contains("Service default/good: spec.ports[0].name"), "{shown:?}");
    }

    #[test]
    fn booleans_are_yaml_1_2() {
        let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\nports: [{name: y, port: 80}, {name: on, port: 81}]\n";
        let mut out = LoadedManifests::default();
        load_text(Path::new("x.yaml"), text, &mut out);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let slice = &out.state.endpoint_slices[&ObjectKey::new("default", "s")];
        let names: Vec<_> = slice.ports.iter().flatten().map(|p| p.name.clone().unwrap_or_default()).collect();
        assert_eq!(names, ["y", "on"]);
    }

    #[test]
    fn a_yaml_bomb_is_refused_and_the_next_document_loads() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let text = format!("{bomb}---\n{}", SVC.replace("NAME", "a"));
        let mut out = LoadedManifests::default();
        load_text(Path::new("x.yaml"), &text, &mut out);
        assert_eq!(out.state.services.len(), 1);
        assert_eq!(out.problems[0].document, "1");
    }

    #[test]
    fn document_markers_split_like_yaml() {
        let docs = split_documents("# header\n%YAML 1.2\n---\na: 1\n...\n---\nb: 2\n--- \nc: 3\n");
        let texts: Vec<&str> = docs.iter().map(|d| d.text.trim()).collect();
        assert_eq!(texts, ["a: 1", "b: 2", "c: 3"]);
        assert_eq!(docs.iter().map(|d| d.line).collect::<Vec<_>>(), [4, 7, 9]);
        assert_eq!(split_documents("a: '---x'\n").len(), 1);
    }
}
