//! The manifest-directory source: a directory of YAML/JSON manifests, watched
//! with inotify (the `notify` crate), turned into the same [`SourceEvent`]s
//! as the Kubernetes API source.
//!
//! ```text
//! start:   read every file -> Applied per object -> Synced, Checkpoint(t)
//! change:  t = now; re-read only the files inotify named -> Applied (new or changed objects),
//!          Deleted (objects gone from the file, or the file gone) -> Checkpoint(t)
//! ```
//!
//! Files are read one at a time, each file's events are sent before the
//! next is read, and only object keys and a digest of each object are
//! remembered (about 60 bytes an object), so a large directory is never held in memory. A changed file whose object is byte-for-byte the same (after
//! parsing) sends nothing for it. Without inotify events for a while (or on
//! an inotify queue overflow) the directory is rescanned by modification
//! time, so no change is lost.

use crate::api::{Kind, SourceEvent};
use crate::manifests::{LoadLimits, LoadedManifests, ManifestProblem, collect_files, load_text_with};
use ferry_model::state::{ObjectKey, StateChange};
use notify::Watcher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// How long a quiet watch waits before checking the directory by modification times anyway.
const RESCAN: Duration = Duration::from_secs(10);
/// Changes arriving this close together are read as one batch (a tool writing several files).
const SETTLE: Duration = Duration::from_millis(2);

/// One object a file serves, as remembered between reads: its kind, its
/// key as `namespace/name` in one allocation (a Node: `/name`), and a digest
/// of its content. (An `ObjectKey` per object, in a B-tree per file and a
/// hash map of owners, was 190 bytes an object: 36 MiB at 100k Services.)
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    kind: Kind,
    key: Box<str>,
    digest: u64,
}

impl Kept {
    fn new(kind: Kind, key: &ObjectKey, digest: u64) -> Kept {
        Kept { kind, key: format!("{}/{}", key.namespace(), key.name()).into_boxed_str(), digest }
    }
    fn id(&self) -> (Kind, &str) {
        (self.kind, &self.key)
    }
    fn object_key(&self) -> ObjectKey {
        let (namespace, name) = self.key.split_once('/').unwrap_or(("", &self.key));
        ObjectKey::new(namespace, name)
    }
    fn deleted(&self) -> StateChange {
        match self.kind {
            Kind::Service => StateChange::ServiceDeleted(self.object_key()),
            Kind::EndpointSlice => StateChange::EndpointSliceDeleted(self.object_key()),
            Kind::Node => StateChange::NodeDeleted(self.object_key().name().to_string()),
        }
    }
}

/// What one file held when last read.
#[derive(Debug, Clone, Default)]
struct FileState {
    modified: Option<SystemTime>,
    len: u64,
    /// The objects it serves, sorted by `Kept::id`.
    objects: Vec<Kept>,
}

impl FileState {
    fn find(&self, id: (Kind, &str)) -> Option<&Kept> {
        self.objects.binary_search_by(|k| k.id().cmp(&id)).ok().map(|i| &self.objects[i])
    }
}

/// Failure to watch the directory at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestSourceError {
    #[error("cannot read manifest directory {path}: {source} (check that it exists and is readable)")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot watch manifest directory {path} for changes: {source} (inotify limits: see fs.inotify.max_user_watches)"
    )]
    Watch { path: PathBuf, source: notify::Error },
}

/// Watches a manifest directory; see the module documentation.
pub struct ManifestSource {
    dir: PathBuf,
    /// By file number: what the file held when last read (`None`: gone, or never read).
    files: Vec<Option<FileState>>,
    /// Which file serves each object (the first reader wins; a second
    /// definition is reported), as (file number, index in its `objects`):
    /// 8 bytes an object, hashed and compared through the entry it names.
    owners: hashbrown::HashTable<(u32, u32)>,
    hasher: foldhash::fast::RandomState,
    file_numbers: HashMap<PathBuf, u32>,
    file_names: Vec<PathBuf>,
    limits: LoadLimits,
    /// Walk problems already logged, so a rescan does not repeat them.
    walk_problems: BTreeSet<String>,
    /// Called while the watcher waits, for a few seconds after it sent
    /// something (see [`ManifestSource::on_idle`]).
    on_idle: fn(),
}

/// How long after sending events the watcher keeps calling its idle hook
/// when it wakes with nothing to do: the consumer frees the objects it was
/// sent some time after they were sent.
const IDLE_HOOK_FOR: Duration = Duration::from_secs(5);

/// A digest of an object's content, to tell a rewritten-but-equal object from a changed one.
fn digest(object: &impl serde::Serialize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(object).unwrap_or_default().hash(&mut h);
    h.finish()
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> ManifestSource {
        ManifestSource {
            dir: dir.into(),
            files: Vec::new(),
            owners: hashbrown::HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            file_numbers: HashMap::new(),
            file_names: Vec::new(),
            limits: LoadLimits::default(),
            walk_problems: BTreeSet::new(),
            on_idle: || {},
        }
    }

    /// Calls `hook` on the watching thread when it waits with nothing to do,
    /// shortly after it sent events (the `ferry` binary gives its freed
    /// pages back to the kernel there; the hook limits its own rate).
    pub fn on_idle(mut self, hook: fn()) -> ManifestSource {
        self.on_idle = hook;
        self
    }

    /// Reads files within `limits` (size cap, documents per file).
    pub fn with_limits(mut self, limits: LoadLimits) -> ManifestSource {
        self.limits = limits;
        self
    }

    /// Runs on the calling thread until `stop` is set or the receiver is
    /// dropped. Problems with single documents are logged (the rest is
    /// served); only an unreadable or unwatchable directory is an error.
    pub fn run_blocking(
        mut self,
        events: mpsc::Sender<SourceEvent>,
        stop: Arc<AtomicBool>,
    ) -> Result<(), ManifestSourceError> {
        let (tx, rx) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(move |e| {
            let _ = tx.send(e);
        })
        .map_err(|source| ManifestSourceError::Watch { path: self.dir.clone(), source })?;
        watcher
            .watch(&self.dir, notify::RecursiveMode::Recursive)
            .map_err(|source| ManifestSourceError::Watch { path: self.dir.clone(), source })?;

        // Each file's events go out as soon as it is read: the whole
        // directory is never held as events (at 100k services that was
        // ~600 MB of API objects waiting for the planner).
        let mut send = |out: &mut Vec<SourceEvent>| send_all(&events, std::mem::take(out));
        let at = SystemTime::now();
        let mut out = Vec::new();
        self.rescan(&mut out, &mut send)?;
        out.push(SourceEvent::Synced);
        out.push(SourceEvent::Checkpoint(at));
        if !send_all(&events, out) {
            return Ok(());
        }
        let mut last_look = std::time::Instant::now();
        let mut last_sent = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let first = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(e) => Some(e),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if first.is_none() && last_sent.elapsed() < IDLE_HOOK_FOR {
                (self.on_idle)();
            }
            let Some(first) = first else {
                if last_look.elapsed() >= RESCAN {
                    last_look = std::time::Instant::now();
                    let at = SystemTime::now();
                    let mut out = Vec::new();
                    let mut sent = false;
                    self.rescan(&mut out, &mut |out| {
                        sent |= !out.is_empty();
                        send(out)
                    })?;
                    if sent || !out.is_empty() {
                        last_sent = std::time::Instant::now();
                        out.push(SourceEvent::Checkpoint(at));
                        if !send_all(&events, out) {
                            break;
                        }
                    }
                }
                continue;
            };
            last_look = std::time::Instant::now();
            std::thread::sleep(SETTLE);
            let at = SystemTime::now();
            let mut changed: BTreeSet<PathBuf> = BTreeSet::new();
            let mut rescan = false;
            for e in std::iter::once(first).chain(rx.try_iter()) {
                match e {
                    Ok(e) if e.need_rescan() => rescan = true,
                    Ok(e) if only_read(&e) => {}
                    Ok(e) => changed.extend(e.paths),
                    Err(err) => {
                        tracing::warn!("manifest watch: {err}; rescanning {}", self.dir.display());
                        rescan = true;
                    }
                }
            }
            if changed.is_empty() && !rescan {
                continue;
            }
            let mut out = Vec::new();
            if rescan || changed.iter().any(|p| p.is_dir() || p == &self.dir) {
                self.rescan(&mut out, &mut send)?;
            } else {
                for path in changed.into_iter().filter(|p| is_manifest(p)) {
                    self.read_file(&path, &mut out);
                    if !send(&mut out) {
                        break;
                    }
                }
            }
            out.push(SourceEvent::Checkpoint(at));
            last_sent = std::time::Instant::now();
            if !send_all(&events, out) {
                break;
            }
        }
        drop(watcher);
        Ok(())
    }

    /// Reads what changed in the whole directory (by modification time and
    /// length), and what vanished. After each file, `flush` takes what is in
    /// `out`; it returns false when no one listens any more, and the scan stops.
    fn rescan(
        &mut self,
        out: &mut Vec<SourceEvent>,
        flush: &mut dyn FnMut(&mut Vec<SourceEvent>) -> bool,
    ) -> Result<(), ManifestSourceError> {
        let mut files = Vec::new();
        let mut problems = Vec::new();
        collect_files(&self.dir, &mut files, &mut problems)
            .map_err(|source| ManifestSourceError::Unreadable { path: self.dir.clone(), source })?;
        let shown: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
        for p in shown.difference(&self.walk_problems) {
            tracing::warn!("{p}");
        }
        self.walk_problems = shown;
        files.sort();
        let present: BTreeSet<PathBuf> = files.iter().cloned().collect();
        let gone: Vec<PathBuf> = (self.file_names.iter().zip(&self.files))
            .filter(|(p, f)| f.is_some() && !present.contains(*p))
            .map(|(p, _)| p.clone())
            .collect();
        for path in gone {
            self.read_file(&path, out);
            if !flush(out) {
                return Ok(());
            }
        }
        for path in files {
            let meta = std::fs::metadata(&path).ok();
            let unchanged =
                self.file_numbers.get(&path).and_then(|n| self.files[*n as usize].as_ref()).is_some_and(|f| {
                    meta.as_ref().is_some_and(|m| f.modified == m.modified().ok() && f.len == m.len())
                });
            if !unchanged {
                self.read_file(&path, out);
                if !flush(out) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Re-reads one file (gone: its objects are deleted) and emits what changed.
    fn read_file(&mut self, path: &Path, out: &mut Vec<SourceEvent>) {
        let number = match self.file_numbers.get(path) {
            Some(n) => *n,
            None => {
                let n = self.file_names.len() as u32;
                self.file_names.push(path.to_path_buf());
                self.file_numbers.insert(path.to_path_buf(), n);
                self.files.push(None);
                n
            }
        };
        let old = self.files[number as usize].take().unwrap_or_default();
        // The file's objects leave the owners table; those it still serves come back below.
        for (i, kept) in old.objects.iter().enumerate() {
            let hash = self.hasher.hash_one(kept.id());
            if let Ok(entry) = self.owners.find_entry(hash, |e| *e == (number, i as u32)) {
                entry.remove();
            }
        }
        let mut now = FileState::default();
        let mut loaded = LoadedManifests::default();
        if let Ok(meta) = std::fs::metadata(path) {
            now.modified = meta.modified().ok();
            now.len = meta.len();
            match crate::manifests::read_file(path, self.limits.max_file_bytes) {
                Ok(text) => load_text_with(path, &text, self.limits, &mut loaded),
                Err(message) => loaded.problems.push(ManifestProblem::entry(path, message)),
            }
        }
        for p in loaded.problems.iter().filter(|p| p.skipped) {
            tracing::warn!("{p}");
        }
        let state = loaded.state;
        let mut applied = Vec::new();
        for (key, svc) in state.services {
            let kept = Kept::new(Kind::Service, &key, digest(&svc));
            applied.push((kept, StateChange::ServiceApplied(Box::new(svc))));
        }
        for (key, slice) in state.endpoint_slices {
            let kept = Kept::new(Kind::EndpointSlice, &key, digest(&slice));
            applied.push((kept, StateChange::EndpointSliceApplied(Box::new(slice))));
        }
        for (name, node) in state.nodes {
            let kept = Kept::new(Kind::Node, &ObjectKey::new("", name), digest(&node));
            applied.push((kept, StateChange::NodeApplied(Box::new(node))));
        }
        applied.sort_by(|a, b| a.0.id().cmp(&b.0.id()));
        for (kept, change) in applied {
            let hash = self.hasher.hash_one(kept.id());
            let files = &self.files;
            let owner = self.owners.find(hash, |&(f, i)| {
                files[f as usize].as_ref().is_some_and(|s| s.objects[i as usize].id() == kept.id())
            });
            if let Some(&(owner, _)) = owner {
                tracing::warn!(
                    "{} {} is defined in {} and in {}; the first is served (delete one of them)",
                    kept.kind,
                    kept.object_key(),
                    self.file_names[owner as usize].display(),
                    path.display()
                );
                continue;
            }
            if old.find(kept.id()).map(|k| k.digest) != Some(kept.digest) {
                out.push(SourceEvent::Change(change));
            }
            now.objects.push(kept);
        }
        for kept in old.objects.iter().filter(|k| now.find(k.id()).is_none()) {
            out.push(SourceEvent::Change(kept.deleted()));
        }
        if now.modified.is_none() {
            return;
        }
        now.objects.shrink_to_fit();
        self.files[number as usize] = Some(now);
        let files = &self.files;
        let hasher = &self.hasher;
        let rehash = |&(f, i): &(u32, u32)| {
            files[f as usize].as_ref().map_or(0, |s| hasher.hash_one(s.objects[i as usize].id()))
        };
        let served = files[number as usize].as_ref().map_or(&[][..], |s| &s.objects[..]);
        for (i, kept) in served.iter().enumerate() {
            self.owners.insert_unique(hasher.hash_one(kept.id()), (number, i as u32), rehash);
        }
    }
}

/// An event that changes nothing: a file opened, read or closed unwritten.
/// inotify reports the watcher's own reads too, so re-reading a file on
/// such an event read it again every few milliseconds, for ever.
fn only_read(e: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(e.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
}

fn is_manifest(path: &Path) -> bool {
    crate::manifests::is_manifest_name(path)
}

/// Sends every event; false once the receiver is gone.
fn send_all(events: &mpsc::Sender<SourceEvent>, out: Vec<SourceEvent>) -> bool {
    out.into_iter().all(|e| events.blocking_send(e).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(events: &[SourceEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                SourceEvent::Change(StateChange::ServiceApplied(s)) => {
                    format!("+svc {}", ObjectKey::of_meta(&s.metadata))
                }
                SourceEvent::Change(StateChange::ServiceDeleted(k)) => format!("-svc {k}"),
                SourceEvent::Change(StateChange::EndpointSliceApplied(s)) => {
                    format!("+slice {}", ObjectKey::of_meta(&s.metadata))
                }
                SourceEvent::Change(StateChange::EndpointSliceDeleted(k)) => format!("-slice {k}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    const A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

    #[test]
    fn only_what_changed_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), A).unwrap();
        std::fs::write(dir.path().join("b.yaml"), B).unwrap();
        let mut src = ManifestSource::new(dir.path());
        let mut out = Vec::new();
        src.rescan(&mut out, &mut |_| true).unwrap();
        assert_eq!(show(&out), ["+svc ns/a", "+svc ns/b"]);

        // The same content written again: nothing.
        let mut out = Vec::new();
        std::fs::write(dir.path().join("a.yaml"), A).unwrap();
        src.read_file(&dir.path().join("a.yaml"), &mut out);
        assert!(out.is_empty(), "{:?}", show(&out));

        // One file changed: only its object; a file removed: its objects deleted.
        let mut out = Vec::new();
        std::fs::write(dir.path().join("a.yaml"), A.replace("10.96.0.1", "10.96.0.3")).unwrap();
        src.read_file(&dir.path().join("a.yaml"), &mut out);
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        src.read_file(&dir.path().join("b.yaml"), &mut out);
        assert_eq!(show(&out), ["+svc ns/a", "-svc ns/b"]);
    }

    #[test]
    fn an_object_defined_twice_is_served_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.yaml"), A).unwrap();
        std::fs::write(dir.path().join("2.yaml"), A.replace("10.96.0.1", "10.96.0.9")).unwrap();
        let mut src = ManifestSource::new(dir.path());
        let mut out = Vec::new();
        src.rescan(&mut out, &mut |_| true).unwrap();
        assert_eq!(show(&out), ["+svc ns/a"]);
        // Removing the second definition deletes nothing.
        let mut out = Vec::new();
        std::fs::remove_file(dir.path().join("2.yaml")).unwrap();
        src.rescan(&mut out, &mut |_| true).unwrap();
        assert!(out.is_empty(), "{:?}", show(&out));
    }

    #[test]
    fn deleted_objects_are_named_whole_and_an_object_may_move_to_another_file() {
        const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.yaml"), format!("{A}---\n{NODE}")).unwrap();
        std::fs::write(dir.path().join("2.yaml"), B).unwrap();
        let mut src = ManifestSource::new(dir.path());
        let mut out = Vec::new();
        src.rescan(&mut out, &mut |_| true).unwrap();
        assert_eq!(out.len(), 3, "{:?}", show(&out));

        // A moves from 1.yaml to 2.yaml, and the Node goes.
        std::fs::write(dir.path().join("1.yaml"), "").unwrap();
        std::fs::write(dir.path().join("2.yaml"), format!("{B}---\n{A}")).unwrap();
        let mut out = Vec::new();
        src.read_file(&dir.path().join("1.yaml"), &mut out);
        src.read_file(&dir.path().join("2.yaml"), &mut out);
        let shown = show(&out);
        assert_eq!(shown[0], "-svc ns/a");
        assert!(matches!(&out[1], SourceEvent::Change(StateChange::NodeDeleted(n)) if n == "node-1"), "{shown:?}");
        assert_eq!(shown[2..], ["+svc ns/a"]);

        // 2.yaml now serves A: a third definition is reported, not served.
        std::fs::write(dir.path().join("3.yaml"), A).unwrap();
        let mut out = Vec::new();
        src.read_file(&dir.path().join("3.yaml"), &mut out);
        assert!(out.is_empty(), "{:?}", show(&out));
        // 2.yaml rewritten unchanged: nothing; removed: both its objects deleted.
        let mut out = Vec::new();
        src.read_file(&dir.path().join("2.yaml"), &mut out);
        assert!(out.is_empty(), "{:?}", show(&out));
        std::fs::remove_file(dir.path().join("2.yaml")).unwrap();
        src.read_file(&dir.path().join("2.yaml"), &mut out);
        assert_eq!(show(&out), ["-svc ns/a", "-svc ns/b"]);
    }

    #[test]
    fn the_watch_sends_a_change_and_a_checkpoint_and_nothing_for_its_own_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), A).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let stop = Arc::new(AtomicBool::new(false));
        let src = ManifestSource::new(dir.path());
        let stopper = stop.clone();
        let thread = std::thread::spawn(move || src.run_blocking(tx, stopper));
        let first: Vec<SourceEvent> = (0..3).map(|_| rx.blocking_recv().unwrap()).collect();
        assert_eq!(show(&first[..2]), ["+svc ns/a", "Synced"]);
        assert!(matches!(first[2], SourceEvent::Checkpoint(_)));
        let before = SystemTime::now();
        std::fs::write(dir.path().join("b.tmp"), B).unwrap();
        std::fs::rename(dir.path().join("b.tmp"), dir.path().join("b.yaml")).unwrap();
        let mut got = Vec::new();
        // Bounded: the watch answers within a few events, or the test fails on a closed channel.
        for _ in 0..10 {
            let e = rx.blocking_recv().expect("the source keeps running");
            let done = matches!(&e, SourceEvent::Checkpoint(t) if *t >= before);
            got.push(e);
            if done {
                break;
            }
        }
        assert!(show(&got).contains(&"+svc ns/b".to_string()), "{:?}", show(&got));
        // Nothing else changes: the watcher's own read of b.yaml (an open, which inotify
        // reports) is no reason to read it again (it did, every ~2 ms, for ever).
        std::thread::sleep(Duration::from_millis(500));
        let mut more = Vec::new();
        while let Ok(e) = rx.try_recv() {
            more.push(e);
        }
        assert!(more.is_empty(), "the watcher woke itself up: {:?}", show(&more));
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap().unwrap();
    }
}
