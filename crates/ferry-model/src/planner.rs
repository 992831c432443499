//! The incremental planner: changes in, `(Arc<Plan>, PlanDiff)` out.
//!
//! ```text
//! StateChange --apply--> compact objects (ServiceRead, SliceRead, NodeInfo) + dirty Services
//!                        sync: re-plan the dirty Services only --> Plan (persistent maps) + PlanDiff
//! ```
//!
//! What kube-proxy's change trackers do, in ferry's terms. An event is read
//! at once into the compact form planning needs (the API object is dropped)
//! and marks its Service dirty; an EndpointSlice marks the Service it
//! belongs to (before and after the change). A sync re-plans only the dirty
//! Services with the same per-Service function `build_plan` uses
//! (`plan_service`), re-decides ownership of only the frontends their claims
//! touch, and returns what changed. A change that leaves a Service's planned
//! values equal (an annotation, a resourceVersion) changes nothing
//! downstream: the old `Arc<ServicePort>` stays.
//!
//! Node changes re-plan every Service only when they change facts a service
//! port's decisions read (this node's zone, pod ranges, addresses); another
//! node's address only changes `NodeFacts`. The result is always the Plan
//! `build_plan` would make from the same objects; the property tests in
//! `tests/planner.rs` check exactly that.

use crate::diff::{PlanDiff, ServicePortChange};
use crate::endpoints::{SliceRead, merge_slices, read_slice};
use crate::node_config::NodeConfig;
use crate::node_info::NodeInfo;
use crate::plan::{
    Claim, FrontendKey, NodeFacts, Plan, PlannedService, ServicePort, ServicePortId, frontend_claims,
    health_check_clash, node_facts, orphan_slice, plan_service,
};
use crate::problem::ObjectError;
use crate::service::{IgnoreReason, ServiceInfo, ServiceRead, read_service_as};
use crate::state::{ObjectKey, StateChange};
use crate::topology::TopologyContext;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// A Service as the planner keeps it: read and validated, never the API
/// object. One pointer and a tag: the rare cases are boxed, so the table
/// of every Service does not hold their size in each slot.
#[derive(Debug, Clone, PartialEq)]
enum StoredService {
    Served(Arc<ServiceInfo>),
    Ignored(Box<IgnoreReason>),
    // Boxed on purpose: a pointer in the slot, not a list's three words.
    #[allow(clippy::box_collection)]
    Invalid(Box<Vec<ObjectError>>),
}

impl From<ServiceRead> for StoredService {
    fn from(read: ServiceRead) -> Self {
        match read {
            ServiceRead::Served(info) => StoredService::Served(Arc::new(*info)),
            ServiceRead::Ignored(r) => StoredService::Ignored(Box::new(r)),
            ServiceRead::Invalid(e) => StoredService::Invalid(Box::new(e)),
        }
    }
}

/// Where a problem comes from, so that re-planning one thing replaces only its own problems.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ProblemSource {
    /// Read errors, or warnings from planning the Service.
    Service(ObjectKey),
    /// Read errors, and "its Service does not exist".
    Slice(ObjectKey),
    /// Claims that lost the frontend to another service port.
    Frontend(FrontendKey),
    /// Services that lost a health-check node port to another.
    HealthCheck(u16),
}

/// What a Service without service ports contributed to the Plan at its last
/// planning. A Service with ports needs no record: its ports in the Plan say
/// it all (`Plan::ports_of`).
#[derive(Debug, Clone, Default)]
struct Contribution {
    cluster_ips: Few<IpAddr>,
    health_check: Option<u16>,
}

/// The planner's settings that change how objects are *read* (which node
/// endpoints are local, which objects belong to another proxy). The compact
/// objects depend on them, so changing them needs a new `Planner`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nodeName or serviceProxyName changed ({0}); objects must be read again: restart the agent")]
pub struct ReadSettingsChanged(String);

/// A small sorted set: one item lives inline (no allocation), as nearly
/// every frontend has one claimant and every Service one slice.
type Few<T> = SmallVec<[T; 1]>;

/// How many Services use `ip`: its count in `other_counts`, else 1 when
/// the Plan has it. A count that drops to 0 stays recorded (as 0) until the
/// end of the sync takes the address out of the Plan.
fn ip_refs(other_counts: &HashMap<IpAddr, u32>, in_plan: &imbl::OrdSet<IpAddr>, ip: &IpAddr) -> u32 {
    other_counts.get(ip).copied().unwrap_or_else(|| u32::from(in_plan.contains(ip)))
}

fn set_ip_refs(other_counts: &mut HashMap<IpAddr, u32>, ip: IpAddr, n: u32) {
    if n == 1 {
        other_counts.remove(&ip);
    } else {
        other_counts.insert(ip, n);
    }
}

/// Inserts into a sorted, duplicate-free list (the sets here hold one or two
/// items; a `BTreeSet` would allocate a whole node for each).
fn sorted_insert<T: Ord, A: smallvec::Array<Item = T>>(v: &mut SmallVec<A>, item: T) {
    if let Err(at) = v.binary_search(&item) {
        v.insert(at, item);
    }
}

fn sorted_remove<T: Ord, A: smallvec::Array<Item = T>>(v: &mut SmallVec<A>, item: &T) {
    if let Ok(at) = v.binary_search(item) {
        v.remove(at);
    }
}

/// The incremental planner; see the module documentation.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: NodeConfig,
    nodes: BTreeMap<String, NodeInfo>,
    services: HashMap<ObjectKey, StoredService>,
    slices: HashMap<ObjectKey, SliceRead>,
    /// Owner Service -> its slices, in key order (the order they merge in).
    slices_of: HashMap<ObjectKey, Few<ObjectKey>>,
    /// Services planned without any service port (rare), see [`Contribution`].
    portless: HashMap<ObjectKey, Contribution>,
    /// How many Services use a ClusterIP, for those not used by exactly one
    /// ([`ip_refs`]): nearly every ClusterIP has one Service, and a count of
    /// them all cost 31 bytes a Service.
    cluster_ip_refs: HashMap<IpAddr, u32>,
    /// The claims on frontends claimed more than once, smallest (the owner)
    /// first. A frontend with one claim keeps it only in the Plan's frontend
    /// table, where its owner *is* that claim: nearly every frontend has one,
    /// and a second table of them all cost 60 bytes a frontend.
    contested: HashMap<FrontendKey, Few<Claim>>,
    health_check_claims: BTreeMap<u16, Few<ObjectKey>>,
    problems: BTreeMap<ProblemSource, Vec<ObjectError>>,
    node: Arc<NodeFacts>,
    plan: Plan,
    /// Unordered: a sync's outputs are sorted at its end (a B-tree here cost
    /// ~4% of a 100k-service start-up in key comparisons).
    dirty: HashSet<ObjectKey>,
    node_dirty: bool,
    /// Re-plan everything at the next sync.
    everything: bool,
}

impl Planner {
    /// A planner with no objects; its first sync plans the node alone.
    pub fn new(cfg: NodeConfig) -> Planner {
        let nodes = BTreeMap::new();
        let node = Arc::new(node_facts(&nodes, &cfg));
        let plan = Plan {
            node: node.clone(),
            services: Default::default(),
            frontends: Default::default(),
            cluster_ips: Default::default(),
            health_check_node_ports: Default::default(),
            problems: Vec::new(),
            ignored: Default::default(),
        };
        Planner {
            cfg,
            nodes,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            portless: HashMap::new(),
            cluster_ip_refs: HashMap::new(),
            contested: HashMap::new(),
            health_check_claims: BTreeMap::new(),
            problems: BTreeMap::new(),
            node,
            plan,
            dirty: HashSet::new(),
            node_dirty: false,
            everything: true,
        }
    }

    /// The Plan of the last sync.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Services, EndpointSlices and Nodes held.
    pub fn object_count(&self) -> usize {
        self.services.len() + self.slices.len() + self.nodes.len()
    }

    /// Services with changes the next sync will plan.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// Changes the node's configuration; the next sync re-plans what it
    /// affects. Settings that change how objects are read are refused.
    pub fn reconfigure(&mut self, cfg: NodeConfig) -> Result<(), ReadSettingsChanged> {
        if cfg.node_name != self.cfg.node_name {
            return Err(ReadSettingsChanged(format!("nodeName {} -> {}", self.cfg.node_name, cfg.node_name)));
        }
        if cfg.service_proxy_name != self.cfg.service_proxy_name {
            return Err(ReadSettingsChanged(format!(
                "serviceProxyName {:?} -> {:?}",
                self.cfg.service_proxy_name, cfg.service_proxy_name
            )));
        }
        if cfg != self.cfg {
            self.cfg = cfg;
            self.node_dirty = true;
        }
        Ok(())
    }

    /// Re-plan everything at the next sync (kube-proxy's full sync), e.g.
    /// after the datapath refused an apply.
    pub fn replan_everything(&mut self) {
        self.everything = true;
    }

    /// Applies one change. Cheap: the object is read into its compact form
    /// and its Service marked dirty; planning waits for `sync`.
    pub fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::ServiceApplied(svc) => self.apply_service(&svc),
            StateChange::ServiceDeleted(key) => self.delete_service(&key),
            StateChange::EndpointSliceApplied(slice) => self.apply_slice(&slice),
            StateChange::EndpointSliceDeleted(key) => self.delete_slice(&key),
            StateChange::NodeApplied(node) => self.apply_node(&node),
            StateChange::NodeDeleted(name) => {
                if self.nodes.remove(&name).is_some() {
                    self.node_dirty = true;
                }
            }
        }
    }

    pub fn apply_service(&mut self, svc: &Service) {
        let key = ObjectKey::of_meta(&svc.metadata);
        // An update shares the key the table already holds (the table keeps its own on insert).
        let key = self.services.get_key_value(&key).map_or(key, |(k, _)| k.clone());
        let stored = StoredService::from(read_service_as(&key, svc, &self.cfg));
        match self.services.get(&key) {
            Some(old) if *old == stored => {}
            Some(_) => {
                self.services.insert(key.clone(), stored);
                self.dirty.insert(key);
            }
            None => {
                self.services.insert(key.clone(), stored);
                self.refresh_slice_problems_of(&key);
                self.dirty.insert(key);
            }
        }
    }

    pub fn delete_service(&mut self, key: &ObjectKey) {
        if self.services.remove(key).is_some() {
            self.refresh_slice_problems_of(key);
            self.dirty.insert(key.clone());
        }
    }

    pub fn apply_slice(&mut self, slice: &EndpointSlice) {
        let key = ObjectKey::of_meta(&slice.metadata);
        // An update shares the key the table already holds (its owner's list
        // would otherwise hold a second copy).
        let key = self.slices.get_key_value(&key).map_or(key, |(k, _)| k.clone());
        let mut read = read_slice(&key, slice, &self.cfg);
        // The owner's key shares the Service's strings rather than holding its own copy.
        if let Some(owner) = &mut read.owner
            && let Some((service, _)) = self.services.get_key_value(&owner.service)
        {
            owner.service = service.clone();
        }
        if self.slices.get(&key) == Some(&read) {
            return;
        }
        self.unlink_slice(&key);
        if let Some(owner) = &read.owner {
            sorted_insert(self.slices_of.entry(owner.service.clone()).or_default(), key.clone());
            self.dirty.insert(owner.service.clone());
        }
        self.slices.insert(key.clone(), read);
        self.refresh_slice_problems(&key);
    }

    pub fn delete_slice(&mut self, key: &ObjectKey) {
        self.unlink_slice(key);
        self.slices.remove(key);
        self.problems.remove(&ProblemSource::Slice(key.clone()));
    }

    pub fn apply_node(&mut self, node: &Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let info = NodeInfo::read(node);
        if self.nodes.get(&name) != Some(&info) {
            self.nodes.insert(name, info);
            self.node_dirty = true;
        }
    }

    /// Replaces every Service with `services` (a relist): those not in it are deleted.
    pub fn replace_services<'a>(&mut self, services: impl IntoIterator<Item = &'a Service>) {
        let mut seen = HashSet::new();
        for svc in services {
            seen.insert(ObjectKey::of_meta(&svc.metadata));
            self.apply_service(svc);
        }
        self.keep_only_services(|k| seen.contains(k));
    }

    /// Replaces every EndpointSlice with `slices` (a relist).
    pub fn replace_slices<'a>(&mut self, slices: impl IntoIterator<Item = &'a EndpointSlice>) {
        let mut seen = HashSet::new();
        for slice in slices {
            seen.insert(ObjectKey::of_meta(&slice.metadata));
            self.apply_slice(slice);
        }
        self.keep_only_slices(|k| seen.contains(k));
    }

    /// Deletes the Services `listed` says a (re)list no longer has (their
    /// objects were applied one by one as the list streamed in).
    pub fn keep_only_services(&mut self, listed: impl Fn(&ObjectKey) -> bool) {
        let gone: Vec<ObjectKey> = self.services.keys().filter(|k| !listed(k)).cloned().collect();
        for key in gone {
            self.delete_service(&key);
        }
    }

    /// Deletes the EndpointSlices `listed` says a (re)list no longer has.
    pub fn keep_only_slices(&mut self, listed: impl Fn(&ObjectKey) -> bool) {
        let gone: Vec<ObjectKey> = self.slices.keys().filter(|k| !listed(k)).cloned().collect();
        for key in gone {
            self.delete_slice(&key);
        }
    }

    /// Deletes the Nodes `listed` says a (re)list no longer has.
    pub fn keep_only_nodes(&mut self, listed: impl Fn(&str) -> bool) {
        let before = self.nodes.len();
        self.nodes.retain(|name, _| listed(name));
        if self.nodes.len() != before {
            self.node_dirty = true;
        }
    }

    /// Removes a slice from its owner's list and marks the owner dirty.
    fn unlink_slice(&mut self, key: &ObjectKey) {
        let Some(owner) = self.slices.get(key).and_then(|r| r.owner.as_ref()) else { return };
        let service = owner.service.clone();
        if let Some(list) = self.slices_of.get_mut(&service) {
            sorted_remove(list, key);
            if list.is_empty() {
                self.slices_of.remove(&service);
            }
        }
        self.dirty.insert(service);
    }

    fn refresh_slice_problems(&mut self, key: &ObjectKey) {
        let Some(read) = self.slices.get(key) else { return };
        let mut problems = read.problems().to_vec();
        if let Some(owner) = &read.owner
            && !self.services.contains_key(&owner.service)
        {
            problems.push(orphan_slice(key, &owner.service));
        }
        set_problems(&mut self.problems, ProblemSource::Slice(key.clone()), problems);
    }

    /// A Service appeared or went away: its slices' "does not exist" warnings change.
    fn refresh_slice_problems_of(&mut self, service: &ObjectKey) {
        let keys = self.slices_of.get(service).cloned().unwrap_or_default();
        for key in keys {
            self.refresh_slice_problems(&key);
        }
    }

    /// Plans what changed since the last sync. Returns the new Plan (cheap
    /// to clone and to send to another thread) and what differs from the
    /// previous one.
    pub fn sync(&mut self) -> (Arc<Plan>, PlanDiff) {
        let mut diff = PlanDiff::default();
        if self.node_dirty || self.everything {
            let facts = node_facts(&self.nodes, &self.cfg);
            if facts != *self.node {
                diff.node_changed = true;
                if facts.planning_view() != self.node.planning_view() {
                    self.everything = true;
                }
                self.node = Arc::new(facts);
                self.plan.node = self.node.clone();
            }
            self.node_dirty = false;
        }
        if std::mem::take(&mut self.everything) {
            self.dirty.extend(self.services.keys().cloned());
            self.dirty.extend(self.portless.keys().cloned());
            self.dirty.extend(self.plan.services.keys().map(|id| id.service.clone()));
        }
        let dirty = std::mem::take(&mut self.dirty);
        // The claims on every frontend this sync touches, as they stand now.
        let mut touched_frontends: HashMap<FrontendKey, Few<Claim>> = HashMap::new();
        if self.plan.services.is_empty() {
            // The first sync: sized once rather than rehashed a dozen times on the way up.
            touched_frontends.reserve(dirty.len());
        }
        let ctx = self.node.topology(&self.cfg);
        let dirty: Vec<ObjectKey> = dirty.into_iter().collect();
        let mut planned_ahead = Vec::new().into_iter();
        let plan = &mut self.plan;

        let mut before: HashMap<ServicePortId, Arc<ServicePort>> = HashMap::new();
        // What each dirty Service now has, with its Arc (no second lookup in the Plan).
        let mut after: Vec<Arc<ServicePort>> = Vec::new();
        let mut touched_health_checks: BTreeSet<u16> = BTreeSet::new();
        let mut released_ips: Vec<IpAddr> = Vec::new();
        // An empty Plan (the first sync) has nothing to take back: no seek per
        // Service. Decided once: the loop fills the Plan, but only with the
        // ports of Services it has already passed.
        let first_plan = plan.services.is_empty();
        for (i, key) in dirty.iter().enumerate() {
            if i % PLAN_AHEAD_BLOCK == 0 {
                // The next block of a large batch, planned on all cores first.
                // A block at a time: all of them at once held the whole
                // cluster's planned ports twice at start-up.
                let block = &dirty[i..dirty.len().min(i + PLAN_AHEAD_BLOCK)];
                planned_ahead =
                    plan_ahead(&self.services, &self.slices_of, &self.slices, &self.node, block, ctx).into_iter();
            }
            let ahead = planned_ahead.next().flatten();
            // Take back what the Service contributed last time.
            let old_ports: Vec<Arc<ServicePort>> =
                if first_plan { Vec::new() } else { plan.ports_of(key).cloned().collect() };
            let mut old = self.portless.remove(key).unwrap_or_default();
            for sp in old_ports {
                plan.services.remove(&sp.id);
                for (fk, claim) in frontend_claims(&sp) {
                    sorted_remove(claims_now(&mut touched_frontends, &mut self.contested, plan, fk), &claim);
                }
                sorted_insert(&mut old.cluster_ips, sp.cluster_ip);
                old.health_check = old.health_check.or(sp.health_check_node_port);
                before.insert(sp.id.clone(), sp);
            }
            for ip in old.cluster_ips {
                let n = ip_refs(&self.cluster_ip_refs, &plan.cluster_ips, &ip);
                if n > 0 {
                    set_ip_refs(&mut self.cluster_ip_refs, ip, n - 1);
                    if n == 1 {
                        released_ips.push(ip);
                    }
                }
            }
            if let Some(hc) = old.health_check {
                if let Some(list) = self.health_check_claims.get_mut(&hc) {
                    sorted_remove(list, key);
                    if list.is_empty() {
                        self.health_check_claims.remove(&hc);
                    }
                }
                touched_health_checks.insert(hc);
            }
            plan.ignored.remove(key);
            self.problems.remove(&ProblemSource::Service(key.clone()));

            match self.services.get(key) {
                None => {}
                Some(StoredService::Ignored(reason)) => {
                    plan.ignored.insert(key.clone(), (**reason).clone());
                }
                Some(StoredService::Invalid(errors)) => {
                    set_problems(&mut self.problems, ProblemSource::Service(key.clone()), (**errors).clone());
                }
                Some(StoredService::Served(info)) => {
                    let planned = ahead.unwrap_or_else(|| {
                        plan_from_compact(&self.node, &self.slices_of, &self.slices, key, info, ctx)
                    });
                    set_problems(&mut self.problems, ProblemSource::Service(key.clone()), planned.problems);
                    for ip in &planned.cluster_ips {
                        let n = ip_refs(&self.cluster_ip_refs, &plan.cluster_ips, ip);
                        set_ip_refs(&mut self.cluster_ip_refs, *ip, n + 1);
                        if plan.cluster_ips.insert(*ip).is_none() {
                            diff.cluster_ips_added.push(*ip);
                        }
                    }
                    if planned.ports.is_empty() {
                        let c = Contribution {
                            cluster_ips: planned.cluster_ips.into(),
                            health_check: info.health_check_node_port(),
                        };
                        self.portless.insert(key.clone(), c);
                    }
                    for sp in planned.ports {
                        for (fk, claim) in frontend_claims(&sp) {
                            sorted_insert(claims_now(&mut touched_frontends, &mut self.contested, plan, fk), claim);
                        }
                        // Equal values keep the old Arc: nothing downstream sees a
                        // change. A changed one keeps the old id's allocation, which
                        // the Plan's table and the programmer's mirror hold.
                        let sp = match before.get(&sp.id) {
                            Some(old) if **old == sp => old.clone(),
                            Some(old) => {
                                let mut sp = sp;
                                sp.id = old.id.clone();
                                Arc::new(sp)
                            }
                            None => Arc::new(sp),
                        };
                        plan.services.insert(sp.id.clone(), sp.clone());
                        if !first_plan {
                            after.push(sp);
                        }
                    }
                    if let Some(hc) = info.health_check_node_port() {
                        sorted_insert(self.health_check_claims.entry(hc).or_default(), key.clone());
                        touched_health_checks.insert(hc);
                    }
                }
            }
        }

        for ip in released_ips {
            if ip_refs(&self.cluster_ip_refs, &plan.cluster_ips, &ip) == 0 {
                self.cluster_ip_refs.remove(&ip);
                if plan.cluster_ips.remove(&ip).is_some() {
                    diff.cluster_ips_removed.push(ip);
                }
            }
        }
        diff.cluster_ips_added.sort();
        diff.cluster_ips_removed.sort();
        diff.cluster_ips_removed.dedup();

        for (id, old) in &before {
            match plan.services.get(id) {
                None => diff.removed.push(old.clone()),
                Some(new) if Arc::ptr_eq(old, new) => {}
                Some(new) => diff.changed.push(ServicePortChange::between(old, new)),
            }
        }
        if first_plan {
            // Everything is new, and the Plan's table is already in id order.
            diff.added = plan.services.values().cloned().collect();
        }
        for sp in after {
            if !before.contains_key(&sp.id) {
                diff.added.push(sp);
            }
        }

        for (fk, claims) in touched_frontends {
            let owner = claims.first();
            let now = owner.map(Claim::frontend);
            let was = plan.frontends.get(&fk).cloned();
            if now != was {
                if let Some(f) = was {
                    diff.frontends_removed.push((fk, f));
                }
                match &now {
                    Some(f) => {
                        diff.frontends_added.push((fk, f.clone()));
                        plan.frontends.insert(fk, f.clone());
                    }
                    None => {
                        plan.frontends.remove(&fk);
                    }
                }
            }
            let lost: Vec<ObjectError> = match owner {
                Some(o) => claims[1..].iter().filter_map(|l| l.lost_to(&fk, o)).collect(),
                None => Vec::new(),
            };
            set_problems(&mut self.problems, ProblemSource::Frontend(fk), lost);
            if claims.len() > 1 {
                self.contested.insert(fk, claims);
            }
        }

        for port in touched_health_checks {
            let claimants = self.health_check_claims.get(&port);
            let owner = claimants.and_then(|c| c.first());
            if plan.health_check_node_ports.get(&port) != owner {
                diff.health_checks_changed = true;
                match owner {
                    Some(o) => {
                        plan.health_check_node_ports.insert(port, o.clone());
                    }
                    None => {
                        plan.health_check_node_ports.remove(&port);
                    }
                }
            }
            let clashes = match (claimants, owner) {
                (Some(c), Some(o)) => c[1..].iter().map(|s| health_check_clash(s, port, o)).collect(),
                _ => Vec::new(),
            };
            set_problems(&mut self.problems, ProblemSource::HealthCheck(port), clashes);
        }

        let mut problems: Vec<ObjectError> = self.problems.values().flatten().cloned().collect();
        problems.sort();
        problems.dedup();
        plan.problems = problems;

        // Ids and frontend keys are unique here: the unstable sorts are deterministic.
        if !first_plan {
            diff.added.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        }
        diff.removed.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        diff.changed.sort_unstable_by(|a, b| a.new.id.cmp(&b.new.id));
        diff.frontends_added.sort_unstable_by_key(|a| a.0);
        diff.frontends_removed.sort_unstable_by_key(|a| a.0);
        (Arc::new(self.plan.clone()), diff)
    }
}

/// The claims on `fk` as this sync has them: taken, the first time the sync
/// touches `fk`, from the contested table or else from the Plan's owner of
/// `fk` (a frontend's only claim), as the sync began.
fn claims_now<'a>(
    touched: &'a mut HashMap<FrontendKey, Few<Claim>>,
    contested: &mut HashMap<FrontendKey, Few<Claim>>,
    plan: &Plan,
    fk: FrontendKey,
) -> &'a mut Few<Claim> {
    touched.entry(fk).or_insert_with(|| {
        contested.remove(&fk).unwrap_or_else(|| plan.frontends.get(&fk).map(Claim::of).into_iter().collect())
    })
}

/// Batches of at least this many Services are planned on several threads first,
/// this many at a time.
const PLAN_AHEAD_BLOCK: usize = 4096;

/// Threads to plan on (asked once: the standard library reads cgroup files to answer).
fn planning_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8))
}

/// For a full block of a large batch (the first sync, a full re-plan), plans
/// every served Service of `keys` on the machine's threads, in `keys`' order
/// (`None`: not served, or a short block, planned in the loop). Planning
/// reads only the compact objects, so it splits cleanly; taking back old
/// ports and deciding ownership stay sequential.
fn plan_ahead(
    services: &HashMap<ObjectKey, StoredService>,
    slices_of: &HashMap<ObjectKey, Few<ObjectKey>>,
    slices: &HashMap<ObjectKey, SliceRead>,
    node: &NodeFacts,
    keys: &[ObjectKey],
    ctx: TopologyContext,
) -> Vec<Option<PlannedService>> {
    if keys.len() < PLAN_AHEAD_BLOCK || planning_threads() < 2 {
        return Vec::new();
    }
    let plan_chunk = |chunk: &[ObjectKey]| -> Vec<Option<PlannedService>> {
        chunk
            .iter()
            .map(|key| match services.get(key) {
                Some(StoredService::Served(info)) => Some(plan_from_compact(node, slices_of, slices, key, info, ctx)),
                _ => None,
            })
            .collect()
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .chunks(keys.len().div_ceil(planning_threads()))
            .map(|chunk| scope.spawn(move || plan_chunk(chunk)))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// Plans one served Service from the compact objects (a pure function of them).
fn plan_from_compact(
    node: &NodeFacts,
    slices_of: &HashMap<ObjectKey, Few<ObjectKey>>,
    slices: &HashMap<ObjectKey, SliceRead>,
    key: &ObjectKey,
    info: &ServiceInfo,
    ctx: TopologyContext,
) -> PlannedService {
    let of_service = slices_of.get(key).into_iter().flatten().filter_map(|k| slices.get(k));
    plan_service(node, info, &merge_slices(of_service), ctx)
}

fn set_problems(
    map: &mut BTreeMap<ProblemSource, Vec<ObjectError>>,
    source: ProblemSource,
    problems: Vec<ObjectError>,
) {
    if problems.is_empty() {
        map.remove(&source);
    } else {
        map.insert(source, problems);
    }
}
