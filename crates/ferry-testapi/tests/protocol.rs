//! The fake API server's wire protocol, checked with kube-rs's raw `Api` calls.
//!
//! These pin down what the ferry-k8s source tests rely on: lists with
//! selectors and a resourceVersion, watches resuming after a version, 410 for
//! a forgotten version, BOOKMARKs, `timeoutSeconds`, outages and the request log.

use ferry_testapi::{FakeApi, FakeApiOptions, ResourceType};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn service(ns: &str, name: &str) -> Service {
    Service {
        metadata: ObjectMeta { namespace: Some(ns.into()), name: Some(name.into()), ..Default::default() },
        ..Default::default()
    }
}

fn slice(name: &str, headless: bool) -> EndpointSlice {
    let mut labels = std::collections::BTreeMap::from([("kubernetes.io/service-name".to_string(), "s".to_string())]);
    if headless {
        labels.insert("service.kubernetes.io/headless".into(), String::new());
    }
    EndpointSlice {
        metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..Default::default() },
        address_type: "IPv4".into(),
        endpoints: None,
        ports: None,
    }
}

fn node(name: &str) -> Node {
    Node { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() }
}

/// Reads watch events until `n` arrived (bookmarks skipped unless `keep_bookmarks`).
async fn take_events<K: Clone + serde::de::DeserializeOwned + std::fmt::Debug>(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
    n: usize,
    keep_bookmarks: bool,
) -> Vec<WatchEvent<K>> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        while out.len() < n {
            let ev = stream.try_next().await.expect("watch stream error").expect("watch ended early");
            if keep_bookmarks || !matches!(ev, WatchEvent::Bookmark(_)) {
                out.push(ev);
            }
        }
    })
    .await
    .expect("timed out reading watch events");
    out
}

fn summary<K: kube::Resource>(events: &[WatchEvent<K>]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
            WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
            WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
            WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
            WatchEvent::Error(s) => format!("ERROR {} {}", s.code, s.reason),
        })
        .collect()
}

#[tokio::test]
async fn lists_filter_by_namespace_labels_and_fields() {
    let api = FakeApi::start().await;
    api.apply(&service("default", "a"));
    api.apply(&service("kube-system", "dns"));
    api.apply(&slice("plain", false));
    api.apply(&slice("headless", true));
    api.apply(&node("node-a"));
    let last = api.apply(&node("node-b"));
    let client = api.client();

    let all = Api::<Service>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    assert_eq!(all.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["a", "dns"]);
    assert_eq!(all.metadata.resource_version, Some(last.to_string()));
    let ns = Api::<Service>::namespaced(client.clone(), "kube-system").list(&ListParams::default()).await.unwrap();
    assert_eq!(ns.items.len(), 1);

    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default().labels("!service.kubernetes.io/headless"))
        .await
        .unwrap();
    assert_eq!(slices.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["plain"]);
    let labelled = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default().labels("kubernetes.io/service-name=s"))
        .await
        .unwrap();
    assert_eq!(labelled.items.len(), 2);

    let nodes =
        Api::<Node>::all(client.clone()).list(&ListParams::default().fields("metadata.name=node-b")).await.unwrap();
    assert_eq!(nodes.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(), ["node-b"]);

    // Single GETs, and a Status 404 for a missing object.
    let a = Api::<Service>::namespaced(client.clone(), "default").get("a").await.unwrap();
    assert!(a.metadata.uid.is_some() && a.metadata.resource_version.is_some());
    match Api::<Service>::namespaced(client.clone(), "default").get("nope").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected a 404, got {other:?}"),
    }
    // The request log records what the client asked for, decoded.
    let log = api.requests();
    let slice_list = log.iter().find(|r| r.resource() == Some(ResourceType::EndpointSlices)).unwrap();
    assert!(slice_list.is_list());
    assert_eq!(slice_list.param("labelSelector"), Some("!service.kubernetes.io/headless"));
}

/// A list read a page at a time, as kube-runtime's watcher reads it
/// (500 per page by default): every object once, in order, each page with
/// the first page's resourceVersion, even when the store changes between pages.
#[tokio::test]
async fn lists_come_in_pages_with_the_first_pages_version() {
    let api = FakeApi::start().await;
    for i in 0..5 {
        api.apply(&service("default", &format!("s{i}")));
    }
    let listed_at = api.apply(&service("kube-system", "dns"));
    let services = Api::<Service>::all(api.client());
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    for page in 1..=10 {
        let list = services.list(&params).await.unwrap();
        assert!(list.items.len() <= 2, "page {page} has {} items", list.items.len());
        assert_eq!(list.metadata.resource_version, Some(listed_at.to_string()), "page {page}");
        names.extend(list.items.iter().map(|s| s.name_any()));
        if page == 1 {
            // A change between pages: the pages still report the list's version.
            api.apply(&service("default", "s9"));
        }
        match list.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s9", "dns"]);
    match services.list(&ListParams::default().continue_token("zz")).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 400),
        other => panic!("expected a 400 for a bad continue token, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_resumes_after_a_version_and_follows_selectors() {
    let api = FakeApi::start().await;
    api.apply(&slice("before", false));
    let client = api.client();
    let slices = Api::<EndpointSlice>::all(client);
    let listed = slices.list(&ListParams::default().labels("!service.kubernetes.io/headless")).await.unwrap();
    let rv = listed.metadata.resource_version.unwrap();
    let mut watch =
        slices.watch(&WatchParams::default().labels("!service.kubernetes.io/headless"), &rv).await.unwrap().boxed();

    api.apply(&slice("x", false));
    api.apply(&slice("x", false));
    api.apply(&slice("x", true)); // now headless: gone from this watch
    api.apply(&slice("hidden", true)); // never visible
    api.apply(&slice("x", false)); // back
    api.delete::<EndpointSlice>("default", "x");
    let events = take_events(&mut watch, 5, false).await;
    assert_eq!(summary(&events), ["ADDED x", "MODIFIED x", "DELETED x", "ADDED x", "DELETED x"]);
}

#[tokio::test]
async fn watch_from_a_forgotten_version_gets_410() {
    let api = FakeApi::start_with(FakeApiOptions { history_limit: 2, ..Default::default() }).await;
    let start = api.resource_version().to_string();
    for name in ["a", "b", "c"] {
        api.apply(&service("default", name));
    }
    let services = Api::<Service>::all(api.client());
    let mut watch = services.watch(&WatchParams::default(), &start).await.unwrap().boxed();
    let events = take_events(&mut watch, 1, false).await;
    assert_eq!(summary(&events), ["ERROR 410 Expired"]);
    let end = tokio::time::timeout(WAIT, watch.next()).await.expect("the stream must end after the error");
    assert!(end.is_none());

    // Within the retained history a resume still works; after expire_history it does not.
    let rv_b = (api.resource_version() - 1).to_string();
    let mut watch = services.watch(&WatchParams::default(), &rv_b).await.unwrap().boxed();
    assert_eq!(summary(&take_events(&mut watch, 1, false).await), ["ADDED c"]);
    api.expire_history();
    let now = api.resource_version().to_string();
    let mut stale = services.watch(&WatchParams::default(), &rv_b).await.unwrap().boxed();
    assert_eq!(summary(&take_events(&mut stale, 1, false).await), ["ERROR 410 Expired"]);
    // A fresh list's version is watchable again.
    let listed = services.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.metadata.resource_version.as_deref(), Some(now.as_str()));
    let mut fresh = services.watch(&WatchParams::default(), &now).await.unwrap().boxed();
    api.apply(&service("default", "d"));
    assert_eq!(summary(&take_events(&mut fresh, 1, false).await), ["ADDED d"]);
}

#[tokio::test]
async fn bookmarks_timeouts_and_dropped_watches() {
    let options = FakeApiOptions { bookmark_interval: Duration::from_millis(50), ..Default::default() };
    let api = FakeApi::start_with(options).await;
    let rv = api.apply(&service("default", "a")).to_string();
    let services = Api::<Service>::all(api.client());

    let mut watch = services.watch(&WatchParams { bookmarks: true, ..Default::default() }, &rv).await.unwrap().boxed();
    let events = take_events(&mut watch, 1, true).await;
    assert_eq!(summary(&events), [format!("BOOKMARK {rv}")]);

    // drop_watches ends open streams.
    assert_eq!(api.open_watches(), 1);
    api.drop_watches();
    let end = tokio::time::timeout(WAIT, async { while watch.try_next().await.unwrap().is_some() {} }).await;
    assert!(end.is_ok(), "drop_watches must end the stream");

    // timeoutSeconds ends the stream by itself.
    let mut short = services.watch(&WatchParams::default().timeout(1), &rv).await.unwrap().boxed();
    let end = tokio::time::timeout(WAIT, async { while short.try_next().await.unwrap().is_some() {} }).await;
    assert!(end.is_ok(), "timeoutSeconds must end the stream");
}

#[tokio::test]
async fn an_outage_answers_503_and_closes_watches() {
    let api = FakeApi::start().await;
    let rv = api.apply(&service("default", "a")).to_string();
    let services = Api::<Service>::all(api.client());
    let mut watch = services.watch(&WatchParams::default(), &rv).await.unwrap().boxed();

    api.set_down(true);
    let end = tokio::time::timeout(WAIT, async { while watch.try_next().await.unwrap().is_some() {} }).await;
    assert!(end.is_ok(), "an outage must close open watches");
    match services.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 503),
        other => panic!("expected 503, got {other:?}"),
    }
    api.set_down(false);
    assert_eq!(services.list(&ListParams::default()).await.unwrap().items.len(), 1);

    // One resource type down, the others still served.
    api.set_resource_down(ResourceType::Services, true);
    assert!(services.list(&ListParams::default()).await.is_err());
    assert!(Api::<Node>::all(api.client()).list(&ListParams::default()).await.is_ok());
}

#[tokio::test]
async fn dropping_the_server_ends_its_watches() {
    let api = FakeApi::start().await;
    let rv = api.apply(&service("default", "a")).to_string();
    let services = Api::<Service>::all(api.client());
    let mut watch = services.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    drop(api);
    let end = tokio::time::timeout(WAIT, async { while let Ok(Some(_)) = watch.try_next().await {} }).await;
    assert!(end.is_ok(), "dropping FakeApi must end open watches");
}

/// A stopped server refuses connections and keeps its objects; restarted on
/// the same port, it lists them at the same resourceVersion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_refuses_connections_and_a_restarted_one_serves_the_same_objects() {
    let api = FakeApi::start().await;
    api.apply(&service("demo", "web"));
    let services: Api<Service> = Api::all(api.client());
    let before = services.list(&ListParams::default()).await.expect("listing before the stop");
    api.stop();
    let refused = tokio::time::timeout(WAIT, async {
        // The listener goes once the serving task sees the stop (bounded).
        for _ in 0..200 {
            if services.list(&ListParams::default()).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    })
    .await
    .expect("timed out");
    assert!(refused, "a stopped server still answered");
    // restart() waits on the server's runtime: off this task's thread.
    let api = tokio::task::spawn_blocking(move || {
        api.restart().expect("restarting on the same port");
        api
    })
    .await
    .unwrap();
    let after = Api::<Service>::all(api.client()).list(&ListParams::default()).await.expect("listing after");
    assert_eq!(after.items.len(), 1);
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version);
}
