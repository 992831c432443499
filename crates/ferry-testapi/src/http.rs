//! The HTTP face of the fake API server: GET, list and watch as kube-apiserver answers them.
//!
//! One fallback handler parses the URL itself (see `resource::parse_path`), so
//! every request, served or not, lands in the request log. Errors are `Status`
//! objects with the HTTP code kube-apiserver would use, because kube-rs decodes
//! them into `kube::Error::Api` and decides on retries and relists from them.

use crate::resource::{ResourceType, Target, parse_path};
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::store::event_for;
use crate::{RequestRecord, Shared};
use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a watch without `timeoutSeconds` stays open.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let record = RequestRecord {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        params,
    };
    tracing::debug!(request = %record, "fake API server");
    let target = parse_path(uri.path());
    let down = {
        let mut inner = shared.lock();
        inner.log.push(record.clone());
        Shared::is_down(&inner, target.as_ref().map(|t| t.resource))
    };
    if down {
        return error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the fake API server is down (set_down)");
    }
    if method != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "the fake API server only serves GET");
    }
    let Some(target) = target else {
        return error(StatusCode::NOT_FOUND, "NotFound", &format!("the fake API server does not serve {}", uri.path()));
    };
    let selectors = match selectors(&record) {
        Ok(s) => s,
        Err(message) => return error(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    if let Some(name) = &target.name {
        let found = shared.lock().store.get(target.resource, target.namespace.as_deref().unwrap_or(""), name);
        return match found {
            Some(obj) => Json(obj).into_response(),
            None => {
                error(StatusCode::NOT_FOUND, "NotFound", &format!("{} {name:?} not found", target.resource.plural()))
            }
        };
    }
    if record.param("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(shared, target, selectors, &record);
    }
    // Paginated as kube-apiserver does (`limit`, `continue`): clients read a
    // large list a page at a time. Every page reports the first page's
    // resourceVersion, so a watch from it replays whatever changed while the
    // pages were read (unlike etcd, later pages show the current objects, not
    // a snapshot: a change then arrives twice, which clients must bear anyway).
    let limit = record.param("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let (rv, after) = match record.param("continue").filter(|c| !c.is_empty()) {
        None => (shared.lock().store.resource_version(), None),
        Some(token) => match parse_continue(token) {
            Some((rv, key)) => (rv, Some(key)),
            None => return error(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid continue token {token:?}")),
        },
    };
    let (items, last) =
        shared.lock().store.list_page(target.resource, target.namespace.as_deref(), &selectors, after.as_ref(), limit);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(key) = last {
        metadata["continue"] = json!(continue_token(rv, &key));
    }
    Json(json!({
        "kind": format!("{}List", target.resource.kind()),
        "apiVersion": target.resource.api_version(),
        "metadata": metadata,
        "items": items,
    }))
    .into_response()
}

/// A continue token: the list's resourceVersion and the last key served, hex-encoded.
fn continue_token(rv: u64, (namespace, name): &crate::store::Key) -> String {
    let text = format!("{rv}\n{namespace}\n{name}");
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_continue(token: &str) -> Option<(u64, crate::store::Key)> {
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '\n');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (parts.next()?.to_string(), parts.next()?.to_string())))
}

fn selectors(record: &RequestRecord) -> Result<Selectors, String> {
    Ok(Selectors {
        labels: LabelSelector::parse(record.param("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(record.param("fieldSelector").unwrap_or(""))?,
    })
}

/// A `Status` object, as kube-apiserver sends for failures (also inside watch ERROR events).
fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response {
    (code, Json(status(code, reason, message))).into_response()
}

fn line(event_type: &str, object: &Value) -> String {
    let mut text = json!({"type": event_type, "object": object}).to_string();
    text.push('\n');
    text
}

fn watch(shared: Arc<Shared>, target: Target, selectors: Selectors, record: &RequestRecord) -> Response {
    let since = match record.param("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        rv => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return error(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid resourceVersion {rv:?}")),
        },
    };
    let timeout = record.param("timeoutSeconds").and_then(|t| t.parse().ok()).map(Duration::from_secs);
    let bookmarks = record.param("allowWatchBookmarks") == Some("true");
    let now = Instant::now();
    let mut inner = shared.lock();
    let mut stream = WatchStream {
        resource: target.resource,
        namespace: target.namespace,
        selectors,
        cursor: since.unwrap_or(0),
        pending: VecDeque::new(),
        finished: false,
        epoch: inner.watch_epoch,
        wake: shared.wake.subscribe(),
        deadline: now + timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT),
        bookmark_every: bookmarks.then_some(shared.options.bookmark_interval),
        next_bookmark: now + shared.options.bookmark_interval,
        _open: OpenWatch::new(&shared, &mut inner.open_watches),
        shared: shared.clone(),
    };
    if since.is_none() {
        // resourceVersion unset or "0": start with synthetic ADDED events for
        // what exists now, as kube-apiserver does.
        let (items, rv) = inner.store.list(stream.resource, stream.namespace.as_deref(), &stream.selectors);
        stream.pending.extend(items.iter().map(|obj| line("ADDED", obj)));
        stream.cursor = rv;
    }
    drop(inner);
    let body = Body::from_stream(futures::stream::unfold(stream, WatchStream::next_line));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Counts an open watch for `FakeApi::open_watches` for as long as its stream lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: &Arc<Shared>, count: &mut usize) -> Self {
        *count += 1;
        OpenWatch(shared.clone())
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.lock().open_watches -= 1;
    }
}

/// One open watch: the events it still has to send and where it is in the history.
struct WatchStream {
    shared: Arc<Shared>,
    resource: ResourceType,
    namespace: Option<String>,
    selectors: Selectors,
    /// Every change up to this resourceVersion has been looked at.
    cursor: u64,
    pending: VecDeque<String>,
    /// Set after an ERROR event: send what is pending, then end.
    finished: bool,
    /// The server's watch epoch when this watch opened; a newer one ends it.
    epoch: u64,
    wake: watch::Receiver<u64>,
    deadline: Instant,
    bookmark_every: Option<Duration>,
    next_bookmark: Instant,
    _open: OpenWatch,
}

enum Woken {
    Changed,
    Bookmark,
    Ended,
}

impl WatchStream {
    async fn next_line(mut self) -> Option<(Result<String, std::io::Error>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(line), self));
            }
            if self.finished {
                return None;
            }
            // Mark the wake-up seen before looking, so a write after the look still wakes us.
            self.wake.borrow_and_update();
            if !self.collect() {
                return None;
            }
            if !self.pending.is_empty() {
                continue;
            }
            let (deadline, next_bookmark) = (self.deadline, self.next_bookmark);
            let woken = tokio::select! {
                changed = self.wake.changed() => if changed.is_ok() { Woken::Changed } else { Woken::Ended },
                _ = tokio::time::sleep_until(next_bookmark), if self.bookmark_every.is_some() => Woken::Bookmark,
                // timeoutSeconds: end the stream; the client re-watches from its last version.
                _ = tokio::time::sleep_until(deadline) => Woken::Ended,
            };
            match woken {
                Woken::Changed => {}
                Woken::Ended => return None,
                Woken::Bookmark => {
                    let bookmark = json!({
                        "kind": self.resource.kind(),
                        "apiVersion": self.resource.api_version(),
                        "metadata": {"resourceVersion": self.cursor.to_string()},
                    });
                    self.pending.push_back(line("BOOKMARK", &bookmark));
                    self.next_bookmark = Instant::now() + self.bookmark_every.unwrap_or_default();
                }
            }
        }
    }

    /// Queues the events after the cursor; false when this watch must end now.
    fn collect(&mut self) -> bool {
        let inner = self.shared.lock();
        if inner.closed || Shared::is_down(&inner, Some(self.resource)) || inner.watch_epoch != self.epoch {
            return false;
        }
        match inner.store.changes_since(self.resource, self.cursor) {
            Err(expired) => {
                let message =
                    format!("too old resource version: {} ({})", expired.requested, expired.oldest.saturating_add(1));
                self.pending.push_back(line("ERROR", &status(StatusCode::GONE, "Expired", &message)));
                self.finished = true;
            }
            Ok(changes) => {
                for change in &changes {
                    let ns = change.object["metadata"]["namespace"].as_str().unwrap_or("");
                    if self.namespace.as_deref().is_some_and(|want| want != ns) {
                        continue;
                    }
                    if let Some((event_type, object)) = event_for(change, &self.selectors) {
                        self.pending.push_back(line(event_type, &object));
                    }
                }
                self.cursor = self.cursor.max(inner.store.resource_version());
            }
        }
        true
    }
}
