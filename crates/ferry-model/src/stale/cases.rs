//! The conntrack cleanup case format (`acceptance/conntrack-cleanup-cases.json`)
//! and its translation into a Plan plus concrete conntrack entries.
//!
//! Services and EndpointSlices reuse the flow-case conversions
//! ([`CaseService::to_service`], [`CaseSlice::to_slice`]), so a case exercises the
//! same path from Kubernetes objects to Plan as everything else. The format has
//! no node or proxy configuration; [`ConntrackCase::plan`] supplies a node with
//! the addresses the caller used for NodePort entries. `deletedServices` (schema
//! version 2) are Services deleted since the previous sync:
//! [`ConntrackCase::deleted_service_ports`] gives their service ports as
//! `PlanDiff::removed` gives them to the agent, and [`ConntrackCase::index`]
//! compiles the rule from both.
//!
//! Parsing is strict, like the scenario format's: a key the format does not
//! define is an error naming its place (a misspelt `deletedServices` would
//! otherwise turn a case into one that checks nothing new), and only schema
//! version 2 is read (version 1 states the seed's rule, which ferry no longer
//! follows).
//!
//! Two conventions of the file are mapped here, once, for every runner:
//! - `origDst: null` means "any address" (the NodePort half of the rule matches
//!   on the port alone); a real entry needs an address, so the caller's node
//!   address is used.
//! - `replySrcPort: 0` means the upstream test left the port unset. The only
//!   such entries are never-DNATed flows (reply source = the service IP), whose
//!   real reply tuple is the inverse of the original one, so the port becomes
//!   `origDstPort`.

use super::StaleFlowIndex;
use crate::acceptance::{CaseError, CaseService, CaseSlice};
use crate::addr::{IpFamily, parse_ip_sloppy};
use crate::node_config::{LocalDetector, NodeConfig, NodePortAddresses};
use crate::plan::{Plan, ServicePort, build_plan};
use crate::protocol::Protocol;
use crate::state::{ClusterState, ObjectKey};
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;
use std::sync::Arc;

/// The schema version this module reads (`rule.current` of that version is the rule ferry follows).
pub const SCHEMA_VERSION: u32 = 2;

/// A file of conntrack cleanup cases.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackCaseFile {
    pub schema_version: u32,
    #[serde(default)]
    pub cases: Vec<ConntrackCase>,
}

/// Why a conntrack case file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CaseFileError {
    /// Not JSON, or a value of the wrong shape (the message names the position).
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A key the format does not define.
    #[error("{at}: unknown key {key:?} (known keys: {known})")]
    UnknownKey { at: String, key: String, known: String },
    /// Another schema version than [`SCHEMA_VERSION`].
    #[error(
        "schemaVersion {0}: ferry reads schema version {SCHEMA_VERSION} (the stale-flow rule of \
         kubernetes/kubernetes#139629 and #141371); take the file from ../shared/acceptance/"
    )]
    SchemaVersion(u32),
}

impl ConntrackCaseFile {
    /// Parses a case file: unknown keys and other schema versions are errors,
    /// and a malformed value's error names its JSON position.
    pub fn parse(json: &str) -> Result<ConntrackCaseFile, CaseFileError> {
        let doc: Value = serde_json::from_str(json)?;
        check_keys(&doc)?;
        let file: ConntrackCaseFile = serde_json::from_str(json)?;
        if file.schema_version != SCHEMA_VERSION {
            return Err(CaseFileError::SchemaVersion(file.schema_version));
        }
        Ok(file)
    }
}

/// One case: objects, then either literal `entries` or a `generator` (the scale case).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackCase {
    pub name: String,
    #[serde(default)]
    pub services: Vec<CaseService>,
    /// Services deleted since the previous sync (same shape as `services`).
    #[serde(default)]
    pub deleted_services: Vec<CaseService>,
    #[serde(default)]
    pub endpoint_slices: Vec<CaseSlice>,
    #[serde(default)]
    pub entries: Vec<CaseEntry>,
    pub expected_deleted_count: Option<u64>,
    pub generator: Option<Generator>,
    #[serde(default)]
    pub assertions: Vec<String>,
}

/// A literal conntrack entry and what the reconciler must do with it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseEntry {
    pub protocol: String,
    /// `None`: any address (NodePort entries).
    pub orig_dst: Option<String>,
    pub orig_dst_port: u16,
    pub reply_src: String,
    /// 0: left unset by the upstream test.
    pub reply_src_port: u16,
    pub expect: String,
    #[serde(default)]
    pub reason: String,
    /// What the seed's copy of the rule would do where it differs (documentation
    /// only: ferry follows the current rule, and runners check `expect`).
    pub expect_under_seed_rule: Option<String>,
    /// What the rule before the reply-port comparison would do where it differs
    /// (documentation only, as above).
    pub expect_under_earlier_rule: Option<String>,
}

/// The scale case's recipe: groups of entries, each repeated `count` times.
#[derive(Debug, Clone, Deserialize)]
pub struct Generator {
    pub entries: Vec<GeneratorEntry>,
}

/// One group of generated entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorEntry {
    pub count: u64,
    pub protocol: String,
    pub orig_dst: Option<String>,
    /// A number, or `"uniform random A..B"`.
    pub orig_dst_port: serde_json::Value,
    pub reply_src: String,
    pub reply_src_port: u16,
    /// `keep`, `delete`, or `delete iff origDstPort == N, else keep`.
    pub expect: String,
}

/// What must happen to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Delete,
    Keep,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expect::Delete => "delete",
            Expect::Keep => "keep",
        })
    }
}

/// A case entry with concrete addresses, ready to be created in a kernel table
/// or checked against [`super::StaleFlowIndex`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySpec {
    pub protocol: Protocol,
    pub orig_dst: IpAddr,
    pub orig_dst_port: u16,
    pub reply_src: IpAddr,
    pub reply_src_port: u16,
    pub expect: Expect,
    /// Why, from the case file (empty for generated entries).
    pub reason: String,
}

impl EntrySpec {
    /// One line for reports: `UDP 172.30.1.1:8000 <- 10.240.0.4:8080`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} <- {}",
            self.protocol,
            crate::addr::fmt_addr_port(&self.orig_dst, self.orig_dst_port),
            crate::addr::fmt_addr_port(&self.reply_src, self.reply_src_port)
        )
    }
}

/// Node addresses that stand in for `origDst: null`, one per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddresses {
    pub v4: IpAddr,
    pub v6: IpAddr,
}

impl Default for NodeAddresses {
    /// Benchmarking ranges (RFC 2544 / RFC 5180-ish), never used by a case.
    fn default() -> Self {
        NodeAddresses { v4: IpAddr::from([198, 18, 0, 1]), v6: "2001:2::1".parse().expect("valid literal") }
    }
}

impl NodeAddresses {
    pub fn for_family(&self, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.v4,
            IpFamily::V6 => self.v6,
        }
    }
}

impl ConntrackCase {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> CaseError {
        CaseError { case: self.name.clone(), field: field.into(), message: message.into() }
    }

    /// The case's Services and EndpointSlices as real Kubernetes objects.
    pub fn cluster_state(&self) -> Result<ClusterState, CaseError> {
        let mut state = ClusterState::default();
        for s in &self.services {
            state.services.insert(ObjectKey::new(&s.namespace, &s.name), s.to_service());
        }
        for (i, sl) in self.endpoint_slices.iter().enumerate() {
            let (ns, svc) = sl
                .service
                .split_once('/')
                .ok_or_else(|| self.err(format!("endpointSlices[{i}].service"), "expected namespace/name"))?;
            state.endpoint_slices.insert(ObjectKey::new(ns, &sl.name), sl.to_slice(ns, svc));
        }
        Ok(state)
    }

    /// A dual-stack node owning `nodes`' addresses and serving NodePorts on all of them.
    pub fn node_config(&self, nodes: NodeAddresses) -> NodeConfig {
        NodeConfig {
            node_name: "conntrack-node".into(),
            node_ips: vec![nodes.v4, nodes.v6],
            ip_families: vec![IpFamily::V4, IpFamily::V6],
            node_port_addresses: NodePortAddresses::all(),
            local_detector: LocalDetector::None,
            ..NodeConfig::default()
        }
    }

    /// The Plan the reconciler runs with.
    pub fn plan(&self, nodes: NodeAddresses) -> Result<Plan, CaseError> {
        Ok(build_plan(&self.cluster_state()?, &self.node_config(nodes)))
    }

    /// The service ports of `deletedServices` as they were programmed before
    /// the deletion (a Plan of those Services alone; their endpoints do not
    /// matter, a deleted port has none): what `PlanDiff::removed` hands the
    /// agent's reconciler.
    pub fn deleted_service_ports(&self, nodes: NodeAddresses) -> Result<Vec<Arc<ServicePort>>, CaseError> {
        if self.deleted_services.is_empty() {
            return Ok(Vec::new());
        }
        let mut before = ClusterState::default();
        for s in &self.deleted_services {
            let key = ObjectKey::new(&s.namespace, &s.name);
            if self.services.iter().any(|l| l.namespace == s.namespace && l.name == s.name) {
                return Err(self.err(
                    format!("deletedServices[{}/{}]", s.namespace, s.name),
                    "also in services: a Service is either live or deleted",
                ));
            }
            before.services.insert(key, s.to_service());
        }
        Ok(build_plan(&before, &self.node_config(nodes)).services.values().cloned().collect())
    }

    /// The stale-flow rule of this case: its Plan, and its deleted Services' ports.
    pub fn index(&self, nodes: NodeAddresses) -> Result<StaleFlowIndex, CaseError> {
        Ok(StaleFlowIndex::new(&self.plan(nodes)?, &self.deleted_service_ports(nodes)?))
    }

    /// The literal entries with concrete addresses (see the module doc for the mapping).
    pub fn entry_specs(&self, nodes: NodeAddresses) -> Result<Vec<EntrySpec>, CaseError> {
        let mut out = Vec::with_capacity(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            let field = |f: &str| format!("entries[{i}].{f}");
            let protocol: Protocol = e.protocol.parse().map_err(|m: String| self.err(field("protocol"), m))?;
            let reply_src = self.ip(&field("replySrc"), &e.reply_src)?;
            let orig_dst = match &e.orig_dst {
                Some(s) => self.ip(&field("origDst"), s)?,
                None => nodes.for_family(IpFamily::of(&reply_src)),
            };
            let expect = match e.expect.as_str() {
                "delete" => Expect::Delete,
                "keep" => Expect::Keep,
                other => return Err(self.err(field("expect"), format!("{other:?} is not delete or keep"))),
            };
            for (name, other) in [
                ("expectUnderSeedRule", &e.expect_under_seed_rule),
                ("expectUnderEarlierRule", &e.expect_under_earlier_rule),
            ] {
                if let Some(v) = other.as_deref().filter(|v| !matches!(*v, "delete" | "keep")) {
                    return Err(self.err(field(name), format!("{v:?} is not delete or keep")));
                }
            }
            out.push(EntrySpec {
                protocol,
                orig_dst,
                orig_dst_port: e.orig_dst_port,
                reply_src,
                reply_src_port: if e.reply_src_port == 0 { e.orig_dst_port } else { e.reply_src_port },
                expect,
                reason: e.reason.clone(),
            });
        }
        Ok(out)
    }

    /// Expands the generator. `cap` limits each group's count (a smaller run of
    /// the scale case); random ports come from a fixed-seed generator, so a run
    /// is reproducible. Returns the entries and whether any group was capped.
    pub fn generate(&self, nodes: NodeAddresses, cap: Option<u64>) -> Result<(Vec<EntrySpec>, bool), CaseError> {
        let Some(generator) = &self.generator else { return Ok((Vec::new(), false)) };
        let mut rng = SplitMix64(0x5eed_c0a7_7a6c_0001);
        let mut out = Vec::new();
        let mut capped = false;
        for (i, g) in generator.entries.iter().enumerate() {
            let field = |f: &str| format!("generator.entries[{i}].{f}");
            let protocol: Protocol = g.protocol.parse().map_err(|m: String| self.err(field("protocol"), m))?;
            let reply_src = self.ip(&field("replySrc"), &g.reply_src)?;
            let orig_dst = match &g.orig_dst {
                Some(s) => self.ip(&field("origDst"), s)?,
                None => nodes.for_family(IpFamily::of(&reply_src)),
            };
            let ports = PortRecipe::parse(&g.orig_dst_port).map_err(|m| self.err(field("origDstPort"), m))?;
            let expect = ExpectRecipe::parse(&g.expect).map_err(|m| self.err(field("expect"), m))?;
            let count = match cap {
                Some(c) if g.count > c => {
                    capped = true;
                    c
                }
                _ => g.count,
            };
            for _ in 0..count {
                let port = ports.next(&mut rng);
                out.push(EntrySpec {
                    protocol,
                    orig_dst,
                    orig_dst_port: port,
                    reply_src,
                    reply_src_port: if g.reply_src_port == 0 { port } else { g.reply_src_port },
                    expect: expect.for_port(port),
                    reason: String::new(),
                });
            }
        }
        Ok((out, capped))
    }

    /// Total number of entries the generator describes (uncapped).
    pub fn generated_count(&self) -> u64 {
        self.generator.iter().flat_map(|g| &g.entries).map(|e| e.count).sum()
    }

    fn ip(&self, field: &str, s: &str) -> Result<IpAddr, CaseError> {
        parse_ip_sloppy(s).ok_or_else(|| self.err(field, format!("{s:?} is not an IP address")))
    }
}

enum PortRecipe {
    Fixed(u16),
    Uniform(u16, u16),
}

impl PortRecipe {
    fn parse(v: &serde_json::Value) -> Result<PortRecipe, String> {
        if let Some(n) = v.as_u64() {
            return u16::try_from(n).map(PortRecipe::Fixed).map_err(|_| format!("{n} is not a port"));
        }
        let s = v.as_str().unwrap_or_default();
        let range = s.strip_prefix("uniform random ").and_then(|r| r.split_once(".."));
        match range.map(|(a, b)| (a.trim().parse::<u16>(), b.trim().parse::<u16>())) {
            Some((Ok(a), Ok(b))) if a <= b => Ok(PortRecipe::Uniform(a, b)),
            _ => Err(format!("{v} is neither a port nor \"uniform random A..B\"")),
        }
    }

    fn next(&self, rng: &mut SplitMix64) -> u16 {
        match *self {
            PortRecipe::Fixed(p) => p,
            PortRecipe::Uniform(a, b) => a + (rng.next() % (u64::from(b - a) + 1)) as u16,
        }
    }
}

enum ExpectRecipe {
    Always(Expect),
    /// Delete iff the destination port equals this, else keep.
    DeleteIffPort(u16),
}

impl ExpectRecipe {
    fn parse(s: &str) -> Result<ExpectRecipe, String> {
        match s.trim() {
            "delete" => return Ok(ExpectRecipe::Always(Expect::Delete)),
            "keep" => return Ok(ExpectRecipe::Always(Expect::Keep)),
            _ => {}
        }
        let port = s
            .strip_prefix("delete iff origDstPort ==")
            .and_then(|rest| rest.split(',').next())
            .and_then(|p| p.trim().parse::<u16>().ok());
        match port {
            Some(p) if s.trim_end().ends_with("else keep") => Ok(ExpectRecipe::DeleteIffPort(p)),
            _ => Err(format!("{s:?} is not keep, delete or \"delete iff origDstPort == N, else keep\"")),
        }
    }

    fn for_port(&self, port: u16) -> Expect {
        match *self {
            ExpectRecipe::Always(e) => e,
            ExpectRecipe::DeleteIffPort(p) if p == port => Expect::Delete,
            ExpectRecipe::DeleteIffPort(_) => Expect::Keep,
        }
    }
}

/// A tiny deterministic generator (SplitMix64): reproducible runs without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

const TOP: &[&str] = &["schemaVersion", "title", "upstream", "rule", "legacyRules", "cases"];
const CASE: &[&str] = &[
    "name",
    "source_test",
    "evidence",
    "note",
    "metric",
    "services",
    "deletedServices",
    "endpointSlices",
    "entries",
    "expectedDeletedCount",
    "generator",
    "assertions",
];
const ENTRY: &[&str] = &[
    "protocol",
    "origDst",
    "origDstPort",
    "replySrc",
    "replySrcPort",
    "expect",
    "reason",
    "expectUnderSeedRule",
    "expectUnderEarlierRule",
];
const GENERATOR: &[&str] = &["entries"];
const GENERATOR_ENTRY: &[&str] = &["count", "protocol", "origDst", "origDstPort", "replySrc", "replySrcPort", "expect"];
use crate::acceptance::keys::{ENDPOINT, HINTS, SERVICE, SERVICE_PORT, SLICE, SLICE_PORT};

fn keys(v: &Value, at: &str, known: &[&str]) -> Result<(), CaseFileError> {
    // A value of the wrong shape is left to the typed parse, which names its position.
    let Some(obj) = v.as_object() else { return Ok(()) };
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(CaseFileError::UnknownKey { at: at.to_string(), key: k.clone(), known: known.join(", ") }),
        None => Ok(()),
    }
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

fn name_of(v: &Value) -> String {
    v.get("name").and_then(Value::as_str).map(|n| format!(" ({n:?})")).unwrap_or_default()
}

/// Rejects every key the format does not define, naming where it is.
fn check_keys(doc: &Value) -> Result<(), CaseFileError> {
    keys(doc, "the file", TOP)?;
    for (i, case) in list(doc, "cases").iter().enumerate() {
        let at = format!("cases[{i}]{}", name_of(case));
        keys(case, &at, CASE)?;
        for field in ["services", "deletedServices"] {
            for (k, s) in list(case, field).iter().enumerate() {
                let at = format!("{at}.{field}[{k}]{}", name_of(s));
                keys(s, &at, SERVICE)?;
                for (p, port) in list(s, "ports").iter().enumerate() {
                    keys(port, &format!("{at}.ports[{p}]"), SERVICE_PORT)?;
                }
            }
        }
        for (k, s) in list(case, "endpointSlices").iter().enumerate() {
            let at = format!("{at}.endpointSlices[{k}]{}", name_of(s));
            keys(s, &at, SLICE)?;
            for (e, ep) in list(s, "endpoints").iter().enumerate() {
                keys(ep, &format!("{at}.endpoints[{e}]"), ENDPOINT)?;
                if let Some(h) = ep.get("hints") {
                    keys(h, &format!("{at}.endpoints[{e}].hints"), HINTS)?;
                }
            }
            for (p, port) in list(s, "ports").iter().enumerate() {
                keys(port, &format!("{at}.ports[{p}]"), SLICE_PORT)?;
            }
        }
        for (k, e) in list(case, "entries").iter().enumerate() {
            keys(e, &format!("{at}.entries[{k}]"), ENTRY)?;
        }
        if let Some(g) = case.get("generator") {
            keys(g, &format!("{at}.generator"), GENERATOR)?;
            for (k, e) in list(g, "entries").iter().enumerate() {
                keys(e, &format!("{at}.generator.entries[{k}]"), GENERATOR_ENTRY)?;
            }
        }
    }
    Ok(())
}
