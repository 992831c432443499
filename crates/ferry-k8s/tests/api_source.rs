//! The Kubernetes API source against the fake API server, through the real kube-rs client.
//!
//! Each test starts a `FakeApi`, runs `ApiSource` on it, folds every event into
//! a `ClusterState` with `apply_event`, and checks the events and the state
//! while the server changes objects, drops watches, forgets history or goes
//! down. Every wait is bounded; nothing asserts on elapsed time.

use ferry_k8s::api::{ApiSource, Kind, SourceEvent, Stopped, apply_event};
use ferry_model::state::{ClusterState, ObjectKey, StateChange};
use ferry_testapi::{FakeApi, ResourceType};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The bound on any single wait. Generous: kube's default backoff after an
/// error starts at 0.8 s and doubles, and CI machines are slow.
const WAIT: Duration = Duration::from_secs(60);

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: ns.map(Into::into),
        name: Some(name.into()),
        labels: (!labels.is_empty()).then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

fn service(name: &str, port: i32) -> Service {
    Service {
        metadata: meta(Some("default"), name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort { port, ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(name: &str, service: &str, ips: &[&str], extra_labels: &[(&str, &str)]) -> EndpointSlice {
    let mut labels = vec![("kubernetes.io/service-name", service)];
    labels.extend_from_slice(extra_labels);
    EndpointSlice {
        metadata: meta(Some("default"), name, &labels),
        address_type: "IPv4".into(),
        endpoints: Some(
            ips.iter().map(|ip| Endpoint { addresses: vec![ip.to_string()], ..Default::default() }).collect(),
        ),
        ports: None,
    }
}

fn node(name: &str) -> Node {
    Node { metadata: meta(None, name, &[]), ..Default::default() }
}

/// A running source, the events it sent, and the state they add up to.
struct Harness {
    rx: mpsc::Receiver<SourceEvent>,
    state: ClusterState,
    events: Vec<SourceEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Stopped>,
}

impl Harness {
    fn start(api: &FakeApi, node_name: Option<&str>) -> Harness {
        let (tx, rx) = mpsc::channel(64);
        let (stop, stopped) = oneshot::channel::<()>();
        let mut source = ApiSource::new(api.client());
        if let Some(n) = node_name {
            source = source.node_name(n);
        }
        let task = tokio::spawn(source.run(tx, async {
            let _ = stopped.await;
        }));
        Harness { rx, state: ClusterState::default(), events: Vec::new(), stop: Some(stop), task }
    }

    /// Receives events, applying each, until `done` holds for the newest event
    /// and the state; returns the events received meanwhile.
    async fn until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&SourceEvent, &ClusterState) -> bool,
    ) -> Vec<SourceEvent> {
        let start = self.events.len();
        let wait = async {
            loop {
                let event = self.rx.recv().await.expect("the source stopped while a test waited on it");
                apply_event(&mut self.state, &event);
                self.events.push(event);
                if done(self.events.last().expect("just pushed"), &self.state) {
                    break;
                }
            }
        };
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            panic!("timed out waiting for {what}; events since: {:#?}", show(&self.events[start..]));
        }
        self.events[start..].to_vec()
    }

    async fn until_state(&mut self, what: &str, done: impl Fn(&ClusterState) -> bool) -> Vec<SourceEvent> {
        if done(&self.state) {
            return Vec::new();
        }
        self.until(what, |_, s| done(s)).await
    }

    async fn stop(mut self) {
        let _ = self.stop.take().expect("stopped once").send(());
        let stopped = tokio::time::timeout(WAIT, &mut self.task).await.expect("the source must stop on shutdown");
        assert_eq!(stopped.expect("the source task must not panic"), Stopped::Shutdown);
    }
}

/// One line per event, for assertions and failure messages.
fn show(events: &[SourceEvent]) -> Vec<String> {
    events.iter().map(describe).collect()
}

fn describe(event: &SourceEvent) -> String {
    fn rv(m: &ObjectMeta) -> String {
        format!("{}@{}", m.name.as_deref().unwrap_or("?"), m.resource_version.as_deref().unwrap_or("?"))
    }
    match event {
        SourceEvent::Change(StateChange::ServiceApplied(s)) => format!("+svc {}", s.metadata.name.as_deref().unwrap()),
        SourceEvent::Change(StateChange::ServiceDeleted(k)) => format!("-svc {}", k.name()),
        SourceEvent::Change(StateChange::EndpointSliceApplied(s)) => {
            format!("+slice {}", s.metadata.name.as_deref().unwrap())
        }
        SourceEvent::Change(StateChange::EndpointSliceDeleted(k)) => format!("-slice {}", k.name()),
        SourceEvent::Change(StateChange::NodeApplied(n)) => format!("+node {}", rv(&n.metadata)),
        SourceEvent::Change(StateChange::NodeDeleted(n)) => format!("-node {n}"),
        // Each object of a list arrives on its own; the listing closes it.
        SourceEvent::ListItem(c) => format!("list {c:?}"),
        SourceEvent::Listed(listing) => {
            let mut names: Vec<String> = listing.keys.iter().map(|k| k.name().to_string()).collect();
            names.sort();
            format!("replace {} [{}]", listing.kind, names.join(" "))
        }
        SourceEvent::Synced => "synced".into(),
        SourceEvent::WatchError { kind, .. } => format!("error {kind}"),
        SourceEvent::Checkpoint(_) => "checkpoint".into(),
    }
}

/// The events of one kind (or Synced), in order.
fn of_kind(events: &[SourceEvent], kind: Kind) -> Vec<String> {
    let prefix = match kind {
        Kind::Service => ["+svc", "-svc", "replace Service"],
        Kind::EndpointSlice => ["+slice", "-slice", "replace EndpointSlice"],
        Kind::Node => ["+node", "-node", "replace Node"],
    };
    show(events).into_iter().filter(|e| prefix.iter().any(|p| e.starts_with(p))).collect()
}

fn is_listed(kind: Kind) -> impl Fn(&SourceEvent, &ClusterState) -> bool {
    move |e, _| matches!(e, SourceEvent::Listed(l) if l.kind == kind)
}

/// Checks the folded state against what the fake serves now (resourceVersions included).
async fn assert_state_matches(state: &ClusterState, api: &FakeApi) {
    let client = api.client();
    let lp = kube::api::ListParams::default();
    let want_services: BTreeMap<ObjectKey, Option<String>> = Api::<Service>::all(client.clone())
        .list(&lp)
        .await
        .expect("list services")
        .items
        .into_iter()
        .map(|o| (ObjectKey::of_meta(&o.metadata), o.metadata.resource_version))
        .collect();
    let want_slices: BTreeMap<ObjectKey, Option<String>> = Api::<EndpointSlice>::all(client)
        .list(&lp.clone().labels("!service.kubernetes.io/headless"))
        .await
        .expect("list endpointslices")
        .items
        .into_iter()
        .map(|o| (ObjectKey::of_meta(&o.metadata), o.metadata.resource_version))
        .collect();
    let have_services: BTreeMap<_, _> =
        state.services.iter().map(|(k, o)| (k.clone(), o.metadata.resource_version.clone())).collect();
    let have_slices: BTreeMap<_, _> =
        state.endpoint_slices.iter().map(|(k, o)| (k.clone(), o.metadata.resource_version.clone())).collect();
    assert_eq!(have_services, want_services, "services in the state vs the API");
    assert_eq!(have_slices, want_slices, "endpoint slices in the state vs the API");
}

fn service_rv(state: &ClusterState, name: &str) -> Option<u64> {
    state.services.get(&ObjectKey::new("default", name))?.metadata.resource_version.as_deref()?.parse().ok()
}

fn slice_rv(state: &ClusterState, name: &str) -> Option<u64> {
    state.endpoint_slices.get(&ObjectKey::new("default", name))?.metadata.resource_version.as_deref()?.parse().ok()
}

#[tokio::test]
async fn synced_only_after_services_and_slices_are_listed() {
    let api = FakeApi::start().await;
    api.apply(&service("web", 80));
    api.apply(&service("db", 5432));
    api.apply(&slice("web-1", "web", &["10.244.0.5"], &[]));
    api.apply(&slice("dns-1", "dns", &["10.244.0.9"], &[("service.kubernetes.io/headless", "")]));
    api.apply(&node("node-a"));
    api.apply(&node("node-b"));
    // Hold back the EndpointSlice list: Services alone must not make the source synced.
    api.set_resource_down(ResourceType::EndpointSlices, true);

    let mut h = Harness::start(&api, Some("node-a"));
    let mut seen_services = false;
    let mut seen_slice_error = false;
    h.until("the Services list and an EndpointSlice error", |e, _| {
        seen_services |= matches!(e, SourceEvent::Listed(l) if l.kind == Kind::Service);
        seen_slice_error |= matches!(e, SourceEvent::WatchError { kind: Kind::EndpointSlice, .. });
        seen_services && seen_slice_error
    })
    .await;
    assert!(!h.events.iter().any(|e| matches!(e, SourceEvent::Synced)), "synced too early: {:#?}", show(&h.events));

    api.set_resource_down(ResourceType::EndpointSlices, false);
    h.until("synced", |e, _| matches!(e, SourceEvent::Synced)).await;
    h.until_state("node-a", |s| s.nodes.contains_key("node-a")).await;

    // The initial Replaces carry what existed before the start; the headless
    // slice is filtered out by the API server, node-b by the field selector.
    let shown = show(&h.events);
    let pos = |want: &str| shown.iter().position(|e| e == want).unwrap_or_else(|| panic!("no {want:?} in {shown:#?}"));
    assert!(pos("replace Service [db web]") < pos("synced"));
    assert!(pos("replace EndpointSlice [web-1]") < pos("synced"));
    pos("replace Node [node-a]");
    assert_eq!(shown.iter().filter(|e| *e == "synced").count(), 1);
    assert_eq!(h.state.nodes.keys().collect::<Vec<_>>(), ["node-a"]);
    assert_state_matches(&h.state, &api).await;
    h.stop().await;
}

#[tokio::test]
async fn a_missing_node_does_not_hold_back_sync() {
    let api = FakeApi::start().await;
    api.apply(&service("web", 80));
    let mut h = Harness::start(&api, Some("node-that-does-not-exist"));
    // Synced and the empty Node list come in either order.
    let (mut synced, mut node_listed) = (false, false);
    h.until("synced and the (empty) Node list", |e, _| {
        synced |= matches!(e, SourceEvent::Synced);
        node_listed |= is_listed(Kind::Node)(e, &ClusterState::default());
        synced && node_listed
    })
    .await;
    assert!(h.state.nodes.is_empty());

    // The node appears later: its events still flow.
    api.apply(&node("node-that-does-not-exist"));
    h.until_state("the node", |s| s.nodes.contains_key("node-that-does-not-exist")).await;
    h.stop().await;
}

#[tokio::test]
async fn changes_arrive_in_order_per_kind() {
    let api = FakeApi::start().await;
    let mut h = Harness::start(&api, None);
    h.until("synced", |e, _| matches!(e, SourceEvent::Synced)).await;
    let start = h.events.len();

    api.apply(&service("web", 80));
    api.apply(&slice("web-1", "web", &["10.244.0.5"], &[]));
    api.apply(&slice("web-2", "web", &["10.244.1.6"], &[]));
    h.until_state("web and both slices", |s| {
        s.services.len() == 1 && slice_rv(s, "web-1").is_some() && slice_rv(s, "web-2").is_some()
    })
    .await;

    let svc_rv = api.apply(&service("web", 8080));
    let slice_rv_new = api.apply(&slice("web-1", "web", &["10.244.0.5", "10.244.0.7"], &[]));
    h.until_state("the updates", |s| {
        service_rv(s, "web") == Some(svc_rv) && slice_rv(s, "web-1") == Some(slice_rv_new)
    })
    .await;
    let web = &h.state.services[&ObjectKey::new("default", "web")];
    assert_eq!(web.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 8080);
    assert_eq!(h.state.endpoint_slices[&ObjectKey::new("default", "web-1")].endpoints.as_ref().map_or(0, Vec::len), 2);

    // A slice that becomes headless leaves the filtered watch: the API server
    // sends DELETED, so it leaves the state too.
    api.apply(&slice("web-1", "web", &["10.244.0.5"], &[("service.kubernetes.io/headless", "")]));
    api.delete::<EndpointSlice>("default", "web-2");
    api.delete::<Service>("default", "web");
    h.until_state("the deletes", |s| s.services.is_empty() && s.endpoint_slices.is_empty()).await;

    let events = &h.events[start..];
    assert_eq!(of_kind(events, Kind::Service), ["+svc web", "+svc web", "-svc web"]);
    assert_eq!(
        of_kind(events, Kind::EndpointSlice),
        ["+slice web-1", "+slice web-2", "+slice web-1", "-slice web-1", "-slice web-2"]
    );
    assert_state_matches(&h.state, &api).await;
    h.stop().await;
}

#[tokio::test]
async fn a_dropped_watch_resumes_without_loss_or_duplicates() {
    let api = FakeApi::start().await;
    api.apply(&service("a", 80));
    api.apply(&service("b", 80));
    api.apply(&slice("a-1", "a", &["10.244.0.5"], &[]));
    let mut h = Harness::start(&api, None);
    h.until("synced", |e, _| matches!(e, SourceEvent::Synced)).await;
    let start = h.events.len();
    let mark = api.requests().len();

    api.drop_watches();
    // Changes while the client reconnects: it resumes from its resourceVersion and gets them.
    api.apply(&service("c", 80));
    api.delete::<Service>("default", "a");
    let rv = api.apply(&slice("a-1", "a", &["10.244.0.6"], &[]));
    h.until_state("the changes made while disconnected", |s| {
        service_rv(s, "c").is_some() && service_rv(s, "a").is_none() && slice_rv(s, "a-1") == Some(rv)
    })
    .await;

    // Exactly the three changes, no relist and no replays of older events.
    let events = &h.events[start..];
    assert_eq!(show(events).iter().filter(|e| !e.starts_with("error")).count(), 3, "{:#?}", show(events));
    assert_eq!(of_kind(events, Kind::Service), ["+svc c", "-svc a"]);
    assert_eq!(of_kind(events, Kind::EndpointSlice), ["+slice a-1"]);
    let after: Vec<_> = api.requests().into_iter().skip(mark).collect();
    assert!(after.iter().all(|r| !r.is_list()), "no relist expected: {after:#?}");
    assert!(after.iter().any(|r| r.is_watch() && r.resource() == Some(ResourceType::Services)), "{after:#?}");
    assert_state_matches(&h.state, &api).await;
    h.stop().await;
}

#[tokio::test]
async fn gone_makes_the_source_relist_and_forget_deleted_objects() {
    let api = FakeApi::start().await;
    api.apply(&service("a", 80));
    api.apply(&service("b", 80));
    api.apply(&slice("a-1", "a", &["10.244.0.5"], &[]));
    let mut h = Harness::start(&api, None);
    h.until("synced", |e, _| matches!(e, SourceEvent::Synced)).await;
    let start = h.events.len();
    let mark = api.requests().len();

    // History lost while disconnected; `a` and its slice are deleted in that window.
    api.expire_history();
    api.drop_watches();
    api.delete::<Service>("default", "a");
    api.delete::<EndpointSlice>("default", "a-1");
    api.apply(&service("c", 80));
    h.until("the Services relist", is_listed(Kind::Service)).await;
    h.until_state("the slices relist", |s| s.endpoint_slices.is_empty()).await;

    assert_eq!(h.state.services.keys().map(|k| k.name()).collect::<Vec<_>>(), ["b", "c"]);
    let events = &h.events[start..];
    // The deletion is learnt from the relist, not from a (lost) watch event.
    assert!(!show(events).iter().any(|e| e == "-svc a"), "{:#?}", show(events));
    assert!(show(events).contains(&"replace Service [b c]".to_string()), "{:#?}", show(events));
    assert!(!events.iter().any(|e| matches!(e, SourceEvent::Synced)), "Synced is sent once per run");

    // The request log shows the failed resume and then a fresh list.
    let after: Vec<_> = api.requests().into_iter().skip(mark).collect();
    let is_services = |r: &&ferry_testapi::RequestRecord| r.resource() == Some(ResourceType::Services);
    let watch = after.iter().filter(is_services).position(|r| r.is_watch()).expect("a services watch after the drop");
    let list = after.iter().filter(is_services).position(|r| r.is_list()).expect("a services relist");
    assert!(watch < list, "the relist follows the failed watch: {after:#?}");
    assert_state_matches(&h.state, &api).await;
    h.stop().await;
}

#[tokio::test]
async fn an_outage_is_retried_and_recovered_from() {
    let api = FakeApi::start().await;
    api.apply(&service("a", 80));
    api.apply(&service("b", 80));
    api.apply(&slice("a-1", "a", &["10.244.0.5"], &[]));
    let mut h = Harness::start(&api, Some("node-a"));
    h.until("synced", |e, _| matches!(e, SourceEvent::Synced)).await;

    api.set_down(true);
    // Keep the API down until each kind has failed twice: the source keeps trying.
    let mut errors: BTreeMap<Kind, usize> = BTreeMap::new();
    h.until("repeated watch errors for every kind", |e, _| {
        if let SourceEvent::WatchError { kind, .. } = e {
            *errors.entry(*kind).or_default() += 1;
        }
        [Kind::Service, Kind::EndpointSlice, Kind::Node].iter().all(|k| errors.get(k).copied().unwrap_or(0) >= 2)
    })
    .await;
    assert!(!h.task.is_finished(), "the source must outlive an outage");

    // The cluster moves on while ferry cannot see it.
    api.delete::<Service>("default", "b");
    let rv = api.apply(&slice("a-1", "a", &["10.244.0.9"], &[]));
    api.apply(&node("node-a"));
    api.set_down(false);
    h.until_state("recovery", |s| {
        service_rv(s, "b").is_none() && slice_rv(s, "a-1") == Some(rv) && s.nodes.contains_key("node-a")
    })
    .await;
    assert_state_matches(&h.state, &api).await;
    h.stop().await;
}

#[tokio::test]
async fn the_source_stops_when_the_receiver_is_dropped() {
    let api = FakeApi::start().await;
    let mut h = Harness::start(&api, None);
    h.until("synced", |e, _| matches!(e, SourceEvent::Synced)).await;
    let Harness { rx, mut task, stop, .. } = h;
    drop(rx);
    let stopped = tokio::time::timeout(WAIT, &mut task).await.expect("the source must notice the dropped receiver");
    assert_eq!(stopped.unwrap(), Stopped::ReceiverDropped);
    drop(stop);
}
