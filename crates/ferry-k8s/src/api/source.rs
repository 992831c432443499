//! The Kubernetes API source: kube-runtime watchers for Services, EndpointSlices and this node,
//! turned into [`SourceEvent`]s on a channel.
//!
//! Each kind has its own `watcher` (list, then watch from the list's
//! resourceVersion; relist on 410 Gone; resume after a dropped connection) with
//! kube's default backoff, so API errors never end the source. The watchers'
//! `Init .. InitApply* .. InitDone` runs are streamed: each object goes out
//! as a `ListItem` as it arrives, and `InitDone` becomes one `Listed` with the
//! keys of the whole set, which is how objects deleted while the watch was
//! down disappear. Only keys are held, never a whole list of objects.

use crate::api::event::{Kind, Listing, SourceEvent, node_key};
use ferry_model::state::{ObjectKey, StateChange};
use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use std::future::Future;
use tokio::sync::mpsc;

/// One kind of object the source reads from the API server, in RBAC terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchedResource {
    /// The API group (`""` for the core group).
    pub api_group: &'static str,
    /// The resource's plural name, as a ClusterRole names it.
    pub resource: &'static str,
    /// What the source does with it: kube-runtime's watcher lists, then watches.
    pub verbs: &'static [&'static str],
}

/// Everything [`ApiSource`] reads, and nothing else: a ClusterRole granting
/// exactly these rules is all ferry's service account needs.
pub const WATCHED_RESOURCES: &[WatchedResource] = &[
    WatchedResource { api_group: "", resource: "services", verbs: &["list", "watch"] },
    WatchedResource { api_group: "discovery.k8s.io", resource: "endpointslices", verbs: &["list", "watch"] },
    WatchedResource { api_group: "", resource: "nodes", verbs: &["list", "watch"] },
];

/// kube-proxy's server-side filter for EndpointSlices: headless Services get no
/// proxy rules, so their slices need not cross the wire at all.
pub const ENDPOINT_SLICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/headless";

/// Watches Services (all namespaces), EndpointSlices (all namespaces, not
/// headless) and, if named, this node's Node object.
///
/// Services are deliberately not filtered by `service.kubernetes.io/service-proxy-name`
/// on the server: the model needs both unlabelled Services and those labelled
/// for this node's proxy name, and decides itself.
///
/// ```no_run
/// # async fn demo() -> Result<(), ferry_k8s::api::ApiError> {
/// use ferry_k8s::api::{ApiSource, SourceEvent, apply_event, client};
/// let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
/// let source = ApiSource::new(client(None).await?).node_name("node-a");
/// tokio::spawn(source.run(tx, std::future::pending()));
/// let mut state = ferry_model::state::ClusterState::default();
/// while let Some(event) = rx.recv().await {
///     apply_event(&mut state, &event);
///     if matches!(event, SourceEvent::Synced) { /* first plan may be written now */ }
/// }
/// # Ok(()) }
/// ```
pub struct ApiSource {
    client: Client,
    node_name: Option<String>,
}

/// Why [`ApiSource::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future completed.
    Shutdown,
    /// The receiving end of the channel was dropped.
    ReceiverDropped,
}

impl ApiSource {
    pub fn new(client: Client) -> Self {
        ApiSource { client, node_name: None }
    }

    /// Also watch the Node called `name` (field selector `metadata.name=<name>`).
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = Some(name.into());
        self
    }

    /// Runs until `shutdown` completes or the receiver is dropped. API errors
    /// are reported as `WatchError` events and retried; they never end the run.
    pub async fn run(self, events: mpsc::Sender<SourceEvent>, shutdown: impl Future<Output = ()>) -> Stopped {
        let services = watcher(Api::<Service>::all(self.client.clone()), watcher::Config::default())
            .default_backoff()
            .map(Observed::Service)
            .boxed();
        let slices = watcher(
            Api::<EndpointSlice>::all(self.client.clone()),
            watcher::Config::default().labels(ENDPOINT_SLICE_LABEL_SELECTOR),
        )
        .default_backoff()
        .map(Observed::EndpointSlice)
        .boxed();
        let mut watches: Vec<BoxStream<'static, Observed>> = vec![services, slices];
        if let Some(node) = &self.node_name {
            let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
            watches.push(
                watcher(Api::<Node>::all(self.client.clone()), config).default_backoff().map(Observed::Node).boxed(),
            );
        }
        // Watchers never end; the pending tail keeps `next()` from ever returning None regardless.
        let mut watches = stream::select_all(watches).chain(stream::pending());
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tracker = Tracker::default();
        tracing::info!(node = self.node_name.as_deref().unwrap_or("-"), "watching the Kubernetes API");
        loop {
            let observed = tokio::select! {
                biased;
                () = &mut shutdown => return Stopped::Shutdown,
                () = events.closed() => return Stopped::ReceiverDropped,
                next = watches.next() => next,
            };
            let Some(observed) = observed else { continue };
            for event in tracker.observe(observed) {
                // A slow consumer holds the watchers back (the channel is the
                // backpressure), but must not hold back shutdown.
                tokio::select! {
                    biased;
                    () = &mut shutdown => return Stopped::Shutdown,
                    sent = events.send(event) => if sent.is_err() { return Stopped::ReceiverDropped },
                }
            }
        }
    }
}

/// One item from one of the watchers.
#[expect(clippy::large_enum_variant, reason = "one value lives at a time, moved straight into the tracker")]
enum Observed {
    Service(watcher::Result<watcher::Event<Service>>),
    EndpointSlice(watcher::Result<watcher::Event<EndpointSlice>>),
    Node(watcher::Result<watcher::Event<Node>>),
}

/// A kind the source watches: how its objects become changes and snapshots.
trait Watched: Sized {
    const KIND: Kind;
    fn key(&self) -> ObjectKey;
    fn applied(self) -> StateChange;
    fn deleted(self) -> StateChange;
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    fn key(&self) -> ObjectKey {
        ObjectKey::of_meta(&self.metadata)
    }
    fn applied(self) -> StateChange {
        StateChange::ServiceApplied(Box::new(self))
    }
    fn deleted(self) -> StateChange {
        StateChange::ServiceDeleted(ObjectKey::of_meta(&self.metadata))
    }
}

impl Watched for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn key(&self) -> ObjectKey {
        ObjectKey::of_meta(&self.metadata)
    }
    fn applied(self) -> StateChange {
        StateChange::EndpointSliceApplied(Box::new(self))
    }
    fn deleted(self) -> StateChange {
        StateChange::EndpointSliceDeleted(ObjectKey::of_meta(&self.metadata))
    }
}

impl Watched for Node {
    const KIND: Kind = Kind::Node;
    fn key(&self) -> ObjectKey {
        node_key(self.metadata.name.as_deref().unwrap_or_default())
    }
    fn applied(self) -> StateChange {
        StateChange::NodeApplied(Box::new(self))
    }
    fn deleted(self) -> StateChange {
        StateChange::NodeDeleted(self.metadata.name.unwrap_or_default())
    }
}

/// Where one kind's watcher is: inside a (re)list or not, and listed yet or not.
struct KindState<K> {
    /// `Some` between `Init` and `InitDone`: the keys of the list so far.
    listing: Option<Vec<ObjectKey>>,
    listed: bool,
    kind: std::marker::PhantomData<K>,
}

impl<K> Default for KindState<K> {
    fn default() -> Self {
        KindState { listing: None, listed: false, kind: std::marker::PhantomData }
    }
}

impl<K: Watched> KindState<K> {
    fn observe(&mut self, result: watcher::Result<watcher::Event<K>>) -> Option<SourceEvent> {
        match result {
            Ok(watcher::Event::Init) => {
                // A second Init before InitDone means the list failed half-way and
                // started over: the keys gathered so far are incomplete. (The
                // objects already sent are real versions; sending them was harmless.)
                self.listing = Some(Vec::new());
                None
            }
            Ok(watcher::Event::InitApply(object)) => {
                self.listing.get_or_insert_with(Vec::new).push(object.key());
                Some(SourceEvent::ListItem(object.applied()))
            }
            Ok(watcher::Event::InitDone) => {
                let keys = self.listing.take().unwrap_or_default();
                tracing::info!(kind = %K::KIND, objects = keys.len(), relist = self.listed, "list complete");
                self.listed = true;
                Some(SourceEvent::Listed(Listing { kind: K::KIND, keys }))
            }
            Ok(watcher::Event::Apply(object)) => Some(SourceEvent::Change(object.applied())),
            Ok(watcher::Event::Delete(object)) => Some(SourceEvent::Change(object.deleted())),
            Err(error) => {
                let message = describe(K::KIND, &error);
                if status_code(&error) == Some(410) {
                    tracing::info!(kind = %K::KIND, "{message}");
                } else {
                    tracing::warn!(kind = %K::KIND, "{message}");
                }
                Some(SourceEvent::WatchError { kind: K::KIND, message })
            }
        }
    }
}

/// Turns watcher events into source events, and decides when the first sync is complete.
#[derive(Default)]
struct Tracker {
    services: KindState<Service>,
    slices: KindState<EndpointSlice>,
    nodes: KindState<Node>,
    synced: bool,
}

impl Tracker {
    fn observe(&mut self, observed: Observed) -> Vec<SourceEvent> {
        let event = match observed {
            Observed::Service(r) => self.services.observe(r),
            Observed::EndpointSlice(r) => self.slices.observe(r),
            Observed::Node(r) => self.nodes.observe(r),
        };
        let mut out: Vec<SourceEvent> = event.into_iter().collect();
        // The Node is not waited for: a missing or slow Node object must not
        // keep every Service unprogrammed.
        if !self.synced && self.services.listed && self.slices.listed {
            self.synced = true;
            tracing::info!("Services and EndpointSlices synced");
            out.push(SourceEvent::Synced);
        }
        out
    }
}

fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// A watch error in the operator's words, with what to do about it.
fn describe(kind: Kind, error: &watcher::Error) -> String {
    let resource = match kind {
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices.discovery.k8s.io",
        Kind::Node => "nodes",
    };
    match status_code(error) {
        Some(401) => format!("{kind} watch: {error}; the credentials were rejected, check the kubeconfig or token"),
        Some(403) => format!(
            "{kind} watch: {error}; ferry's service account needs list and watch on {resource} \
             (check its ClusterRole and ClusterRoleBinding; deploy/rbac.yaml has the rules)"
        ),
        Some(410) => format!("{kind} watch: {error}; the watch fell behind the API server's history, relisting"),
        _ => format!("{kind} watch: {error}; retrying with backoff"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::core::Status;
    use watcher::Event;

    fn svc(name: &str) -> Service {
        Service {
            metadata: ObjectMeta { namespace: Some("default".into()), name: Some(name.into()), ..Default::default() },
            ..Default::default()
        }
    }

    fn slice(name: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta { namespace: Some("default".into()), name: Some(name.into()), ..Default::default() },
            ..Default::default()
        }
    }

    /// A compact description of source events for table assertions.
    fn show(events: &[SourceEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                SourceEvent::Change(StateChange::ServiceApplied(s)) => {
                    format!("+svc {}", s.metadata.name.clone().unwrap())
                }
                SourceEvent::Change(StateChange::ServiceDeleted(k)) => format!("-svc {k}"),
                SourceEvent::Change(c) => format!("{c:?}"),
                SourceEvent::ListItem(StateChange::ServiceApplied(s)) => {
                    format!("list svc {}", s.metadata.name.clone().unwrap())
                }
                SourceEvent::ListItem(StateChange::EndpointSliceApplied(s)) => {
                    format!("list slice {}", s.metadata.name.clone().unwrap())
                }
                SourceEvent::ListItem(c) => format!("list {c:?}"),
                SourceEvent::Listed(l) => format!("listed {} x{}", l.kind, l.len()),
                SourceEvent::Synced => "synced".into(),
                SourceEvent::WatchError { kind, .. } => format!("error {kind}"),
                SourceEvent::Checkpoint(_) => "checkpoint".into(),
            })
            .collect()
    }

    fn gone() -> watcher::Error {
        watcher::Error::WatchError(Box::new(Status::failure("too old resource version", "Expired").with_code(410)))
    }

    #[test]
    fn synced_waits_for_services_and_slices_but_not_the_node() {
        let mut t = Tracker::default();
        let mut out = vec![];
        let steps = [
            Observed::Node(Ok(Event::Init)),
            Observed::Service(Ok(Event::Init)),
            Observed::Service(Ok(Event::InitApply(svc("a")))),
            Observed::Service(Ok(Event::InitDone)),
            Observed::EndpointSlice(Ok(Event::Init)),
            Observed::EndpointSlice(Ok(Event::InitApply(slice("a-1")))),
            Observed::EndpointSlice(Ok(Event::InitDone)),
            Observed::Service(Ok(Event::Apply(svc("b")))),
            Observed::Service(Ok(Event::Delete(svc("a")))),
            // A relist after 410: Init again, and Synced is not sent twice.
            Observed::Service(Err(gone())),
            Observed::Service(Ok(Event::Init)),
            Observed::Service(Ok(Event::InitApply(svc("b")))),
            Observed::Service(Ok(Event::InitDone)),
        ];
        for step in steps {
            out.extend(t.observe(step));
        }
        assert_eq!(
            show(&out),
            [
                "list svc a",
                "listed Service x1",
                "list slice a-1",
                "listed EndpointSlice x1",
                "synced",
                "+svc b",
                "-svc default/a",
                "error Service",
                "list svc b",
                "listed Service x1",
            ]
        );
    }

    #[test]
    fn a_restarted_list_lists_only_what_the_new_one_returned() {
        let mut k = KindState::<Service>::default();
        assert!(k.observe(Ok(Event::Init)).is_none());
        assert!(matches!(k.observe(Ok(Event::InitApply(svc("stale")))), Some(SourceEvent::ListItem(_))));
        assert!(k.observe(Ok(Event::Init)).is_none());
        assert!(matches!(k.observe(Ok(Event::InitApply(svc("fresh")))), Some(SourceEvent::ListItem(_))));
        match k.observe(Ok(Event::InitDone)) {
            Some(SourceEvent::Listed(l)) => {
                assert_eq!(l.kind, Kind::Service);
                assert_eq!(l.keys, [ObjectKey::new("default", "fresh")], "stale is not listed, so it is deleted");
            }
            other => panic!("expected a Services listing, got {other:?}"),
        }
    }

    #[test]
    fn watched_resources_are_the_kinds_the_watchers_use() {
        use k8s_openapi::Resource;
        fn rule<K: Resource>() -> (&'static str, &'static str) {
            (K::GROUP, K::URL_PATH_SEGMENT)
        }
        let listed: Vec<(&str, &str)> = WATCHED_RESOURCES.iter().map(|w| (w.api_group, w.resource)).collect();
        assert_eq!(listed, [rule::<Service>(), rule::<EndpointSlice>(), rule::<Node>()]);
        assert!(WATCHED_RESOURCES.iter().all(|w| w.verbs == ["list", "watch"]));
    }

    #[test]
    fn errors_say_what_to_do() {
        let forbidden = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
            Status::failure("no", "Forbidden").with_code(403),
        )));
        let msg = describe(Kind::EndpointSlice, &forbidden);
        assert!(msg.contains("endpointslices.discovery.k8s.io") && msg.contains("ClusterRole"), "{msg}");
        assert!(describe(Kind::Service, &gone()).contains("relisting"));
    }
}
