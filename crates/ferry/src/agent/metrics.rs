//! The agent's Prometheus metrics: kube-proxy's names where ferry measures the
//! same thing, so existing dashboards and alerts keep working, and ferry's own
//! (`ferry_*`) for the eBPF datapath.
//!
//! kube-proxy's: `kubeproxy_sync_proxy_rules_duration_seconds`,
//! `kubeproxy_sync_proxy_rules_last_timestamp_seconds`,
//! `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`,
//! `kubeproxy_network_programming_duration_seconds`,
//! `kubeproxy_sync_proxy_rules_{endpoint,service}_changes_{pending,total}`,
//! `kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family,traffic_policy}`,
//! `kubeproxy_proxy_{healthz,livez}_total{code}`,
//! `kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family}`,
//! `kubeproxy_conntrack_reconciler_sync_duration_seconds{ip_family}`.
//!
//! ferry's: `ferry_datapath_counter_total{name}` (every datapath counter, drops
//! by reason among them, read from the kernel at scrape time),
//! `ferry_service_ports`, `ferry_map_operations_total`,
//! `ferry_sync_failures_total`, `ferry_resync_corrections_total`,
//! `ferry_map_entries{map}`, `ferry_map_capacity{map}` and
//! `ferry_map_evictions{map}` (counted at every periodic resync),
//! `ferry_api_watch_errors_total{kind}`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NoLocalLabels {
    pub ip_family: String,
    /// `internal` (internalTrafficPolicy: Local) or `external` (externalTrafficPolicy: Local).
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    /// `IPv4` or `IPv6`.
    pub ip_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// A problem's object kind and what ferry did about it (`ferry_object_problems`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProblemLabels {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: String,
    /// `skipped` (the whole object), `entry_skipped` (one address or endpoint) or `warning`.
    pub consequence: String,
}

/// One refused object (`ferry_refused`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `ServicePort` (the datapath refused it), `Service` or `EndpointSlice` (the planner did).
    pub kind: String,
    pub object: String,
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// How full one pinned map is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

/// Where scrapes read the kernel's figures: the datapath's counters (live) and
/// the last counted map fill levels.
#[derive(Default)]
pub struct DatapathView {
    /// Opened once the datapath is installed.
    pub maps: Mutex<Option<ferry_bpf::Maps>>,
    pub fill: Mutex<Vec<MapFill>>,
    /// Flows with a rewritten source (NAT ports in use), counted with `fill`.
    pub nat_entries: Mutex<Option<u64>>,
    /// Entries each LRU map evicted (map, count), counted with `fill`
    /// (`crate::agent::sync::lru_evictions`).
    pub evictions: Mutex<Vec<(String, u64)>>,
}

impl std::fmt::Debug for DatapathView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathView")
    }
}

impl Collector for DatapathView {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters: Vec<(&str, u64)> = match &*self.maps.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(maps) => ferry_bpf::stats::NAMES.iter().copied().zip(maps.counters()).collect(),
            None => Vec::new(),
        };
        if !counters.is_empty() {
            let mut family = encoder.encode_descriptor(
                "ferry_datapath_counter",
                "Events counted by the eBPF datapath (translations, drops by reason, NAT retries), since it was loaded",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, value) in &counters {
                let labels = [("name", *name)];
                ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
            }
            // The NAT engine's figures under their own names, for alerting without label filters.
            for (metric, counter, help) in [
                ("ferry_nat_allocation_retries", "nat_retry", "SNAT source-port allocations that collided and retried"),
                (
                    "ferry_nat_allocation_failures",
                    "drop_nat_exhausted",
                    "SNAT source-port allocations that found no free port (the packet was dropped)",
                ),
            ] {
                let value = counters.iter().find(|(n, _)| *n == counter).map_or(0, |(_, v)| *v);
                let encoder =
                    encoder.encode_descriptor(metric, help, None, prometheus_client::metrics::MetricType::Counter)?;
                ConstCounter::new(value).encode(encoder)?;
            }
        }
        if let Some(n) = *self.nat_entries.lock().unwrap_or_else(|p| p.into_inner()) {
            let encoder = encoder.encode_descriptor(
                "ferry_nat_entries",
                "Connection-tracking entries of flows whose source was rewritten (NAT ports in use), counted at the last periodic resync",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(n as i64).encode(encoder)?;
        }
        let fill = self.fill.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !fill.is_empty() {
            let mut family = encoder.encode_descriptor(
                "ferry_map_entries",
                "Entries in each pinned datapath map, counted at the last periodic resync",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for f in &fill {
                ConstGauge::new(f.entries as i64).encode(family.encode_family(&[("map", f.map.as_str())])?)?;
            }
            let mut family = encoder.encode_descriptor(
                "ferry_map_capacity",
                "Maximum entries of each pinned datapath map",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for f in &fill {
                ConstGauge::new(f.capacity as i64).encode(family.encode_family(&[("map", f.map.as_str())])?)?;
            }
        }
        let evictions = self.evictions.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !evictions.is_empty() {
            let mut family = encoder.encode_descriptor(
                "ferry_map_evictions",
                "Entries each LRU map evicted since the datapath was installed (entries written - removed - held), counted at the last periodic resync",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, n) in &evictions {
                ConstGauge::new(*n as i64).encode(family.encode_family(&[("map", map.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// Every metric the agent exports, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub last_queued: Gauge<f64, AtomicU64>,
    pub network_programming: Histogram,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub no_local_endpoints: Family<NoLocalLabels, Gauge>,
    pub healthz_total: Family<CodeLabels, Counter>,
    pub livez_total: Family<CodeLabels, Counter>,
    pub service_ports: Gauge,
    pub map_operations: Counter,
    pub sync_failures: Counter,
    pub resync_corrections: Counter,
    pub watch_errors: Family<KindLabels, Counter>,
    pub object_problems: Family<ProblemLabels, Gauge>,
    pub refused: Family<RefusedLabels, Gauge>,
    pub conntrack_deleted: Family<FamilyLabels, Counter>,
    pub conntrack_duration: Family<FamilyLabels, Histogram>,
    pub datapath: Arc<DatapathView>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        // kube-proxy's buckets, so histograms compare bucket by bucket.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let network_programming = Histogram::new(
            linear_buckets(0.25, 0.25, 2)
                .chain(linear_buckets(1.0, 1.0, 59))
                .chain(linear_buckets(60.0, 5.0, 12))
                .chain(linear_buckets(120.0, 30.0, 7)),
        );
        let m = Metrics {
            registry: Registry::default(),
            sync_duration,
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            network_programming,
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            service_ports: Gauge::default(),
            map_operations: Counter::default(),
            sync_failures: Counter::default(),
            resync_corrections: Counter::default(),
            watch_errors: Family::default(),
            object_problems: Family::default(),
            refused: Family::default(),
            conntrack_deleted: Family::default(),
            // kube-proxy's buckets (1 ms to 16 s).
            conntrack_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 15))),
            datapath: Arc::new(DatapathView::default()),
        };
        let r = &mut registry;
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        // prometheus-client appends `_total` to counter names.
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        r.register("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", m.healthz_total.clone());
        r.register("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", m.livez_total.clone());
        r.register(
            "ferry_service_ports",
            "Service ports (per IP family) in the programmed Plan",
            m.service_ports.clone(),
        );
        r.register(
            "ferry_map_operations",
            "Map updates and deletes written to the datapath by syncs",
            m.map_operations.clone(),
        );
        r.register(
            "ferry_sync_failures",
            "Syncs that failed to program the datapath (retried)",
            m.sync_failures.clone(),
        );
        r.register(
            "ferry_resync_corrections",
            "Map entries rewritten by periodic resyncs because the kernel had drifted from the Plan",
            m.resync_corrections.clone(),
        );
        r.register(
            "ferry_api_watch_errors",
            "Failed lists and watches of the Kubernetes API, by kind (retried with backoff)",
            m.watch_errors.clone(),
        );
        r.register(
            "ferry_object_problems",
            "Problems with objects in the current Plan (refused Services, ignored ExternalIPs, lost frontends), by kind and consequence; `ferry explain` names each",
            m.object_problems.clone(),
        );
        r.register(
            "ferry_refused",
            "Objects refused now, by name and cause (1 each): service ports the datapath could not program (a full map; retried with backoff) and Services or EndpointSlices the planner skipped whole",
            m.refused.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            m.conntrack_deleted.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            m.conntrack_duration.clone(),
        );
        r.register_collector(Box::new(m.datapath.clone()));
        Arc::new(Metrics { registry, ..m })
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records a conntrack reconciler run: entries deleted and time taken, per family it listed.
    /// Sets `ferry_refused` to exactly the objects refused now.
    pub fn set_refused(&self, refused: &[super::sync::RefusedObject]) {
        self.refused.clear();
        for r in refused {
            let labels = RefusedLabels { kind: r.kind.clone(), object: r.object.clone(), cause: r.cause.clone() };
            self.refused.get_or_create(&labels).set(1);
        }
    }

    /// Sets `ferry_object_problems` to the current counts (kinds absent from `counts` go to 0).
    pub fn set_object_problems(&self, counts: &[((ferry_model::ObjectKind, ferry_model::Consequence), usize)]) {
        use ferry_model::{Consequence, ObjectKind};
        for kind in [ObjectKind::Service, ObjectKind::EndpointSlice, ObjectKind::Node] {
            for c in [Consequence::ObjectSkipped, Consequence::EntrySkipped, Consequence::Warning] {
                let n = counts.iter().find(|(k, _)| *k == (kind, c)).map_or(0, |(_, n)| *n);
                let consequence = match c {
                    Consequence::ObjectSkipped => "skipped",
                    Consequence::EntrySkipped => "entry_skipped",
                    Consequence::Warning => "warning",
                };
                let labels = ProblemLabels { kind: kind.to_string(), consequence: consequence.into() };
                self.object_problems.get_or_create(&labels).set(n as i64);
            }
        }
    }

    pub fn record_conntrack(&self, report: &ferry_conntrack::ReconcileReport) {
        for f in &report.families {
            let labels = FamilyLabels { ip_family: f.family.as_k8s().into() };
            self.conntrack_deleted.get_or_create(&labels).inc_by(f.deleted as u64);
            self.conntrack_duration.get_or_create(&labels).observe(f.duration.as_secs_f64());
        }
    }

    /// Records the Services whose Local policies find no local endpoint.
    pub fn set_no_local_endpoints(&self, counts: &[(NoLocalLabels, i64)]) {
        self.no_local_endpoints.clear();
        for (labels, n) in counts {
            self.no_local_endpoints.get_or_create(labels).set(*n);
        }
    }
}

/// Counts, per family and policy, the service ports whose Local traffic policy
/// finds no local endpoint while other endpoints exist (kube-proxy drops that
/// traffic; with no endpoints at all it rejects, and does not count). Kept up
/// to date from each PlanDiff, so a sync costs what it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoLocalCounts {
    /// [family][internal, external]
    counts: [[i64; 2]; 2],
}

impl NoLocalCounts {
    fn contribution(sp: &ferry_model::ServicePort) -> (usize, [i64; 2]) {
        let family = usize::from(sp.id.family == ferry_model::IpFamily::V6);
        let c = &sp.categorized;
        let has_endpoints = !c.cluster().is_empty() || !c.local().is_empty();
        if !has_endpoints || !c.local().is_empty() {
            return (family, [0, 0]);
        }
        let internal = i64::from(sp.internal_policy_local);
        let external = i64::from(sp.external_policy_local && sp.externally_accessible);
        (family, [internal, external])
    }

    fn add(&mut self, sp: &ferry_model::ServicePort, sign: i64) {
        let (family, c) = Self::contribution(sp);
        for (slot, n) in self.counts[family].iter_mut().zip(c) {
            *slot += sign * n;
        }
    }

    /// Counts of a whole Plan.
    pub fn of_plan(plan: &ferry_model::Plan) -> NoLocalCounts {
        let mut counts = NoLocalCounts::default();
        for sp in plan.services.values() {
            counts.add(sp, 1);
        }
        counts
    }

    /// Follows one diff of the planner.
    pub fn update(&mut self, diff: &ferry_model::PlanDiff) {
        for sp in &diff.added {
            self.add(sp, 1);
        }
        for sp in &diff.removed {
            self.add(sp, -1);
        }
        for c in &diff.changed {
            self.add(&c.old, -1);
            self.add(&c.new, 1);
        }
    }

    /// The gauge's samples.
    pub fn samples(&self) -> Vec<(NoLocalLabels, i64)> {
        let mut out = Vec::new();
        for (family, name) in [(0, "IPv4"), (1, "IPv6")] {
            for (policy, n) in [("internal", self.counts[family][0]), ("external", self.counts[family][1])] {
                out.push((NoLocalLabels { ip_family: name.into(), traffic_policy: policy.into() }, n));
            }
        }
        out
    }
}

/// [`NoLocalCounts`] of a whole Plan, as gauge samples.
pub fn no_local_endpoints(plan: &ferry_model::Plan) -> Vec<(NoLocalLabels, i64)> {
    NoLocalCounts::of_plan(plan).samples()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_names_render() {
        let m = Metrics::new();
        m.sync_duration.observe(0.02);
        m.endpoint_changes_total.inc();
        m.healthz_total.get_or_create(&CodeLabels { code: "200".into() }).inc();
        m.set_no_local_endpoints(&[(NoLocalLabels { ip_family: "IPv4".into(), traffic_policy: "external".into() }, 2)]);
        m.record_conntrack(&ferry_conntrack::ReconcileReport {
            families: vec![ferry_conntrack::FamilyReconcile {
                family: ferry_model::IpFamily::V4,
                listed: 30,
                stale: 14,
                deleted: 14,
                already_gone: 0,
                failed: 0,
                duration: std::time::Duration::from_millis(3),
                partial: false,
                error: None,
            }],
        });
        m.set_object_problems(&[((ferry_model::ObjectKind::Service, ferry_model::Consequence::ObjectSkipped), 3)]);
        let text = m.render();
        for name in [
            "ferry_object_problems{kind=\"Service\",consequence=\"skipped\"} 3",
            "ferry_object_problems{kind=\"EndpointSlice\",consequence=\"warning\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"}",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"}",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 2",
            "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 14",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket{le=\"0.004\",ip_family=\"IPv4\"} 1",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "ferry_map_operations_total 0",
            "ferry_service_ports 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        // No datapath yet: no datapath series rather than zeros that look real.
        assert!(!text.contains("ferry_datapath_counter_total"), "{text}");
        m.datapath.fill.lock().unwrap().push(MapFill { map: "ferry_ct".into(), entries: 3, capacity: 10 });
        m.datapath.evictions.lock().unwrap().push(("ferry_ct_new".into(), 7));
        let text = m.render();
        assert!(text.contains("ferry_map_entries{map=\"ferry_ct\"} 3"), "{text}");
        assert!(text.contains("ferry_map_evictions{map=\"ferry_ct_new\"} 7"), "{text}");
        assert!(text.contains("ferry_map_capacity{map=\"ferry_ct\"} 10"), "{text}");

        let refused = |object: &str| super::super::sync::RefusedObject {
            kind: "ServicePort".into(),
            object: object.into(),
            cause: "ferry_services full".into(),
            reason: "map ferry_services is full".into(),
        };
        m.set_refused(&[refused("ns/a:http/TCP/IPv4"), refused("ns/b:http/TCP/IPv4")]);
        m.set_refused(&[refused("ns/b:http/TCP/IPv4")]);
        let text = m.render();
        let line = "ferry_refused{kind=\"ServicePort\",object=\"ns/b:http/TCP/IPv4\",cause=\"ferry_services full\"} 1";
        assert!(text.contains(line), "{text}");
        assert!(!text.contains("ns/a:http"), "a service port no longer refused is gone: {text}");
    }
}
