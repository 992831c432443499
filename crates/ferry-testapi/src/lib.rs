//! An in-process fake Kubernetes API server for tests of ferry's API source.
//!
//! No real kube-apiserver can run on ferry's build machines, so tests point a
//! real kube-rs client at this server instead. It speaks the real HTTP
//! list/watch protocol for Services, EndpointSlices and Nodes: lists carry a
//! global resourceVersion, watches stream newline-delimited events after a
//! resourceVersion (with BOOKMARKs and `timeoutSeconds`), and a watch from
//! before the retained history gets a 410 `Status`, which is what makes a
//! client relist. Tests change objects and inject failures through [`FakeApi`].
//!
//! ```no_run
//! # async fn demo() {
//! use ferry_testapi::FakeApi;
//! use k8s_openapi::api::core::v1::Service;
//!
//! let api = FakeApi::start().await;
//! let client = api.client(); // a kube::Client for http://127.0.0.1:PORT
//! let mut svc = Service::default();
//! svc.metadata.name = Some("web".into());
//! api.apply(&svc); // namespace "default", watchers see ADDED
//! api.drop_watches(); // a network blip: clients resume from their resourceVersion
//! # }
//! ```
//!
//! Lists are paginated (`limit`, `continue`; see `http.rs` for how pages of a
//! changing store behave). Not served: writes over HTTP (tests write through
//! the handle), set-based label
//! selectors, field selectors other than `metadata.name`/`metadata.namespace`,
//! streaming lists (`sendInitialEvents`), protobuf, and kinds other than the three.

mod http;
mod netns;
mod resource;
mod selector;
mod store;

pub use netns::NetnsApi;
pub use resource::ResourceType;

use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use store::Store;
use tokio::sync::{oneshot, watch};

/// Tunables of a [`FakeApi`]; the defaults suit most tests.
#[derive(Debug, Clone)]
pub struct FakeApiOptions {
    /// Changes remembered per resource type for resuming watches; older resumes get 410 Gone.
    pub history_limit: usize,
    /// How often an idle watch that allowed bookmarks gets a BOOKMARK event
    /// (kube-apiserver: about a minute; shorter here so tests exercise them).
    pub bookmark_interval: Duration,
}

impl Default for FakeApiOptions {
    fn default() -> Self {
        FakeApiOptions { history_limit: 1000, bookmark_interval: Duration::from_secs(1) }
    }
}

/// One request the server received, for tests to assert on (e.g. "a relist happened").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw (percent-encoded) query string.
    pub query: String,
    /// The decoded query parameters, in order.
    pub params: Vec<(String, String)>,
}

impl RequestRecord {
    /// The decoded value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The resource type the path addresses, if served.
    pub fn resource(&self) -> Option<ResourceType> {
        resource::parse_path(&self.path).map(|t| t.resource)
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch").is_some_and(|w| w == "true" || w == "1")
    }

    /// A list (a GET of a collection that is not a watch).
    pub fn is_list(&self) -> bool {
        self.method == "GET" && !self.is_watch() && resource::parse_path(&self.path).is_some_and(|t| t.name.is_none())
    }
}

impl fmt::Display for RequestRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", self.query)?;
        }
        Ok(())
    }
}

/// State shared by the handle and the HTTP handlers.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every change that an open watch must look at.
    wake: watch::Sender<u64>,
    options: FakeApiOptions,
}

pub(crate) struct Inner {
    store: Store,
    down: bool,
    /// Resource types that answer 503 while the rest of the server works.
    down_resources: BTreeSet<ResourceType>,
    /// Open watches end when this moves past the value they started with.
    watch_epoch: u64,
    closed: bool,
    log: Vec<RequestRecord>,
    open_watches: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the server from the others.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether requests for `resource` get 503 now.
    fn is_down(inner: &Inner, resource: Option<ResourceType>) -> bool {
        inner.down || resource.is_some_and(|r| inner.down_resources.contains(&r))
    }

    fn change(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.lock());
        self.wake.send_modify(|n| *n += 1);
    }
}

/// A running fake API server on 127.0.0.1 and the test's controls over it.
///
/// Dropping it ends every open watch and shuts the server down.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Ends the serving task (None while stopped).
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    /// The runtime the server runs on: [`FakeApi::restart`] binds its port
    /// again from there (in the network namespace the server was started in).
    runtime: tokio::runtime::Handle,
}

impl FakeApi {
    /// Starts a server with default options on a random port.
    ///
    /// Panics if no loopback port can be bound (a test cannot go on without one).
    pub async fn start() -> FakeApi {
        FakeApi::start_with(FakeApiOptions::default()).await
    }

    /// Starts a server with the given options on a random port.
    pub async fn start_with(options: FakeApiOptions) -> FakeApi {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                store: Store::new(options.history_limit),
                down: false,
                down_resources: BTreeSet::new(),
                watch_epoch: 0,
                closed: false,
                log: Vec::new(),
                open_watches: 0,
            }),
            wake: watch::channel(0).0,
            options,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the fake API server needs a port on 127.0.0.1; is the loopback interface up?");
        let addr = listener.local_addr().expect("a bound listener has an address");
        let shutdown = serve(listener, shared.clone());
        FakeApi { shared, addr, shutdown: Mutex::new(Some(shutdown)), runtime: tokio::runtime::Handle::current() }
    }

    /// Stops the server as a stopped kube-apiserver is: open watches end and
    /// the port is closed (new connections are refused). The objects stay, as
    /// etcd keeps them; [`FakeApi::restart`] serves them again.
    pub fn stop(&self) {
        self.shared.change(|inner| inner.closed = true);
        if let Some(shutdown) = self.shutdown.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = shutdown.send(());
        }
    }

    /// Listens again on the same address, with the same objects and
    /// resourceVersions. Retries the bind while the stopped server still
    /// holds the port (bounded: about 10 s).
    pub fn restart(&self) -> std::io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (addr, shared) = (self.addr, self.shared.clone());
        self.runtime.spawn(async move {
            let mut bound = Err(std::io::Error::other("not tried"));
            for _ in 0..200 {
                bound = tokio::net::TcpListener::bind(addr).await;
                if bound.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = tx.send(bound.map(|listener| {
                shared.change(|inner| inner.closed = false);
                serve(listener, shared)
            }));
        });
        let shutdown = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| std::io::Error::other("the fake API server's runtime did not answer"))??;
        *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = Some(shutdown);
        Ok(())
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    ///
    /// kube's built-in retry of 503/429/504 is switched off so that every
    /// failure reaches the watcher (and so the code under test) at once; with
    /// it on, a short outage is retried silently inside the client.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("http://127.0.0.1:PORT is a valid URI"));
        config.default_retry = false;
        kube::Client::try_from(config).expect("a plain-HTTP kube client needs no TLS setup")
    }

    /// Creates or replaces an object (Service, EndpointSlice or Node) and tells
    /// open watches; returns its new resourceVersion. A namespaced object
    /// without a namespace goes to `default`.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, object: &K) -> u64 {
        let resource = served::<K>();
        let mut value = serde_json::to_value(object).expect("k8s-openapi objects serialize to JSON");
        // k8s-openapi writes apiVersion/kind itself; set them anyway so a watch always carries them.
        value["apiVersion"] = K::API_VERSION.into();
        value["kind"] = K::KIND.into();
        let mut rv = 0;
        self.shared.change(|inner| rv = inner.store.apply(resource, value));
        rv
    }

    /// Deletes an object and tells open watches; returns the deletion's
    /// resourceVersion, or `None` if there was no such object. `namespace` is
    /// ignored for Nodes.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> Option<u64> {
        let resource = served::<K>();
        let mut rv = None;
        self.shared.change(|inner| rv = inner.store.delete(resource, namespace, name));
        rv
    }

    /// Closes every open watch stream, as a network blip would. Clients resume
    /// from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.change(|inner| inner.watch_epoch += 1);
    }

    /// Forgets the watch history, like an etcd compaction: a watch resuming
    /// from before now gets a 410 Gone ERROR event and the client must relist.
    /// Open watches keep running until they next look at the history.
    pub fn expire_history(&self) {
        self.shared.change(|inner| inner.store.expire_history());
    }

    /// Takes the server down (every request gets 503, open watches are closed)
    /// or brings it back.
    pub fn set_down(&self, down: bool) {
        self.shared.change(|inner| {
            inner.down = down;
            if down {
                inner.watch_epoch += 1;
            }
        });
    }

    /// Takes one resource type down (503 for its requests, its open watches
    /// closed) or brings it back, e.g. to hold back one kind's initial list.
    pub fn set_resource_down(&self, resource: ResourceType, down: bool) {
        self.shared.change(|inner| {
            if down {
                inner.down_resources.insert(resource);
                inner.watch_epoch += 1;
            } else {
                inner.down_resources.remove(&resource);
            }
        });
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().store.resource_version()
    }

    /// How many watch streams are open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Open watch streams would otherwise hold the graceful shutdown open.
        self.stop();
    }
}

/// Serves `listener` on the current runtime until the returned sender fires.
fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> oneshot::Sender<()> {
    let app = axum::Router::new().fallback(http::handle).with_state(shared);
    let (shutdown, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "fake API server stopped with an error");
        }
    });
    shutdown
}

fn served<K: k8s_openapi::Resource>() -> ResourceType {
    ResourceType::of::<K>()
        .unwrap_or_else(|| panic!("the fake API server serves Services, EndpointSlices and Nodes, not {}", K::KIND))
}
