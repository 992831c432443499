//! The scenario file format (`acceptance/README.md`, "kube-proxy-scenarios.json"):
//! parsing, strict key checking, and each step as a flow case.
//!
//! Flow case files tolerate unknown keys; a scenario file does not: a
//! misspelt `restartAgent` would silently turn a restart check into nothing.
//! Every error names the scenario, the step and the field.

use anyhow::{Context, bail};
use ferry_model::acceptance::{Case, CaseFlow, CaseNode, CaseService, CaseSlice, ParsedFlow, ProxyConfig};
use ferry_model::{ClusterState, NodeConfig};
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;
use std::path::Path;

/// A file of scenarios.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioFile {
    pub schema_version: u32,
    pub scenarios: Vec<Scenario>,
}

/// Service changes over time, run against one live agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scenario {
    pub name: String,
    pub proxy_config: ProxyConfig,
    pub node: CaseNode,
    pub steps: Vec<Step>,
}

/// One step: the whole desired state, what to do to the agent, the flows to send.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub name: String,
    #[serde(default)]
    pub services: Vec<CaseService>,
    #[serde(default)]
    pub endpoint_slices: Vec<CaseSlice>,
    #[serde(default)]
    pub flows: Vec<CaseFlow>,
    /// SIGKILL the agent after the step's changes landed and start it again on the pinned datapath.
    #[serde(default)]
    pub restart_agent: bool,
    /// Make the agent run a full resync before the flows.
    #[serde(default)]
    pub resync: bool,
}

/// A step made ready to run: its state, its Plan inputs and its parsed flows.
#[derive(Debug, Clone)]
pub struct ParsedStep {
    pub name: String,
    pub state: ClusterState,
    pub flows: Vec<ParsedFlow>,
    pub restart_agent: bool,
    pub resync: bool,
}

/// A scenario made ready to run.
#[derive(Debug, Clone)]
pub struct ParsedScenario {
    pub name: String,
    pub cfg: NodeConfig,
    /// The Node object (the same in every step).
    pub node_state: ClusterState,
    pub steps: Vec<ParsedStep>,
}

impl ParsedScenario {
    /// `scenario / step / flow`, the label of one check.
    pub fn label(&self, step: usize, what: &str) -> String {
        format!("{} / step {} {:?} / {what}", self.name, step + 1, self.steps[step].name)
    }
}

const TOP: &[&str] = &["schemaVersion", "title", "conventions", "scenarios", "summary"];
const SCENARIO: &[&str] = &["name", "evidence", "note", "proxyConfig", "node", "steps"];
const PROXY_CONFIG: &[&str] = &[
    "mode",
    "ipFamily",
    "masqueradeAll",
    "masqueradeMark",
    "localTrafficDetector",
    "nodePortAddresses",
    "localhostNodePorts",
    "serviceCIDRs",
    "featureGates",
];
const DETECTOR: &[&str] = &["mode", "cidrs", "interfaceNamePrefix", "bridgeInterface"];
const NODE: &[&str] = &["name", "ips", "primaryIPs", "podCIDR", "clusterCIDR", "labels"];
const STEP: &[&str] = &["name", "note", "services", "endpointSlices", "flows", "restartAgent", "resync"];
use ferry_model::acceptance::keys::{ENDPOINT, HINTS, SERVICE, SERVICE_PORT, SLICE, SLICE_PORT};
const FLOW: &[&str] = &["name", "sourceIP", "destIP", "destPort", "protocol", "expect", "masq"];

fn keys(v: &Value, at: &str, allowed: &[&str]) -> anyhow::Result<()> {
    let Some(obj) = v.as_object() else { bail!("{at}: expected an object") };
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            bail!("{at}: unknown key {k:?} (known keys: {})", allowed.join(", "));
        }
    }
    Ok(())
}

fn list<'a>(v: &'a Value, key: &str, at: &str) -> anyhow::Result<&'a [Value]> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => bail!("{at}.{key}: expected a list"),
    }
}

fn name_of(v: &Value) -> String {
    v.get("name").and_then(Value::as_str).map(|n| format!(" ({n:?})")).unwrap_or_default()
}

/// Rejects every key the format does not define, naming where it is.
fn check_keys(doc: &Value) -> anyhow::Result<()> {
    keys(doc, "the file", TOP)?;
    for (i, sc) in list(doc, "scenarios", "the file")?.iter().enumerate() {
        let at = format!("scenarios[{i}]{}", name_of(sc));
        keys(sc, &at, SCENARIO)?;
        if let Some(pc) = sc.get("proxyConfig") {
            keys(pc, &format!("{at}.proxyConfig"), PROXY_CONFIG)?;
            if let Some(d) = pc.get("localTrafficDetector").filter(|d| !d.is_null()) {
                keys(d, &format!("{at}.proxyConfig.localTrafficDetector"), DETECTOR)?;
            }
        }
        if let Some(n) = sc.get("node") {
            keys(n, &format!("{at}.node"), NODE)?;
        }
        for (j, st) in list(sc, "steps", &at)?.iter().enumerate() {
            let at = format!("{at}.steps[{j}]{}", name_of(st));
            keys(st, &at, STEP)?;
            for (k, s) in list(st, "services", &at)?.iter().enumerate() {
                let at = format!("{at}.services[{k}]{}", name_of(s));
                keys(s, &at, SERVICE)?;
                for (p, port) in list(s, "ports", &at)?.iter().enumerate() {
                    keys(port, &format!("{at}.ports[{p}]"), SERVICE_PORT)?;
                }
            }
            for (k, s) in list(st, "endpointSlices", &at)?.iter().enumerate() {
                let at = format!("{at}.endpointSlices[{k}]{}", name_of(s));
                keys(s, &at, SLICE)?;
                for (e, ep) in list(s, "endpoints", &at)?.iter().enumerate() {
                    keys(ep, &format!("{at}.endpoints[{e}]"), ENDPOINT)?;
                    if let Some(h) = ep.get("hints").filter(|h| !h.is_null()) {
                        keys(h, &format!("{at}.endpoints[{e}].hints"), HINTS)?;
                    }
                }
                for (p, port) in list(s, "ports", &at)?.iter().enumerate() {
                    keys(port, &format!("{at}.ports[{p}]"), SLICE_PORT)?;
                }
            }
            for (k, f) in list(st, "flows", &at)?.iter().enumerate() {
                keys(f, &format!("{at}.flows[{k}]{}", name_of(f)), FLOW)?;
            }
        }
    }
    Ok(())
}

/// Reads and checks a scenario file: unknown keys, malformed values and
/// references to unknown Services are errors naming the scenario, step and field.
pub fn load(path: &Path) -> anyhow::Result<Vec<ParsedScenario>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("{} is not a valid scenario file (see acceptance/README.md)", path.display()))
}

/// [`load`] from text.
pub fn parse(text: &str) -> anyhow::Result<Vec<ParsedScenario>> {
    let doc: Value = serde_json::from_str(text).context("not JSON")?;
    check_keys(&doc)?;
    let de = &mut serde_json::Deserializer::from_str(text);
    let file: ScenarioFile =
        serde_path_to_error::deserialize(de).map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e))?;
    if file.schema_version != 1 {
        bail!("schemaVersion {} is not supported (this ferry reads 1)", file.schema_version);
    }
    file.scenarios.iter().enumerate().map(|(i, sc)| sc.parse().with_context(|| format!("scenarios[{i}]"))).collect()
}

impl Scenario {
    /// The flow case that step `j` stands for (its whole state, its flows).
    pub fn step_case(&self, j: usize) -> Case {
        let st = &self.steps[j];
        Case {
            name: format!("{} / {}", self.name, st.name),
            proxy_config: self.proxy_config.clone(),
            node: self.node.clone(),
            services: st.services.clone(),
            endpoint_slices: st.endpoint_slices.clone(),
            flows: st.flows.clone(),
        }
    }

    fn parse(&self) -> anyhow::Result<ParsedScenario> {
        if self.steps.is_empty() {
            bail!("scenario {:?}: steps: a scenario needs at least one step", self.name);
        }
        let empty = Case {
            name: self.name.clone(),
            proxy_config: self.proxy_config.clone(),
            node: self.node.clone(),
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            flows: Vec::new(),
        };
        let cfg = empty.node_config()?;
        let node_state = empty.cluster_state()?;
        let mut steps = Vec::new();
        for (j, st) in self.steps.iter().enumerate() {
            let at = format!("scenario {:?}: steps[{j}] ({:?})", self.name, st.name);
            let mut seen = std::collections::BTreeSet::new();
            for (k, s) in st.services.iter().enumerate() {
                if !seen.insert((s.namespace.clone(), s.name.clone())) {
                    bail!("{at}: services[{k}]: {}/{} is listed twice", s.namespace, s.name);
                }
            }
            let mut slices = std::collections::BTreeSet::new();
            for (k, sl) in st.endpoint_slices.iter().enumerate() {
                let Some((ns, svc)) = sl.service.split_once('/') else {
                    bail!("{at}: endpointSlices[{k}] ({:?}).service: {:?} is not namespace/name", sl.name, sl.service)
                };
                if !seen.contains(&(ns.to_string(), svc.to_string())) {
                    bail!(
                        "{at}: endpointSlices[{k}] ({:?}).service: {:?} is not a Service of this step",
                        sl.name,
                        sl.service
                    );
                }
                if !slices.insert((ns.to_string(), sl.name.clone())) {
                    bail!("{at}: endpointSlices[{k}]: {ns}/{} is listed twice", sl.name);
                }
            }
            let case = self.step_case(j);
            let state = case.cluster_state().with_context(|| at.clone())?;
            let flows = st
                .flows
                .iter()
                .enumerate()
                .map(|(k, f)| f.parse().map_err(|e| anyhow::anyhow!("{at}: flows[{k}] ({:?}): {e}", f.name)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            steps.push(ParsedStep {
                name: st.name.clone(),
                state,
                flows,
                restart_agent: st.restart_agent,
                resync: st.resync,
            });
        }
        Ok(ParsedScenario { name: self.name.clone(), cfg, node_state, steps })
    }
}

/// Every address a scenario's flows start from (for building the lab once).
pub fn sources(sc: &ParsedScenario) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for st in &sc.steps {
        for f in &st.flows {
            if !out.contains(&f.src) {
                out.push(f.src);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"schemaVersion":1,"scenarios":[{"name":"s",
      "proxyConfig":{"mode":"nftables","ipFamily":"IPv4","serviceCIDRs":["172.30.0.0/16"]},
      "node":{"name":"n","ips":["192.168.0.2"],"primaryIPs":{"IPv4":"192.168.0.2"},"podCIDR":null,"clusterCIDR":"10.0.0.0/8"},
      "steps":[{"name":"one","services":[{"namespace":"a","name":"b","type":"ClusterIP","clusterIP":"172.30.0.1",
        "ports":[{"name":"p","port":80,"protocol":"TCP"}]}],
        "endpointSlices":[{"name":"b-1","service":"a/b","addressType":"IPv4","endpoints":[{"ip":"10.1.0.1"}],
        "ports":[{"name":"p","port":80,"protocol":"TCP"}]}],
        "flows":[{"name":"f","sourceIP":"10.0.0.2","destIP":"172.30.0.1","destPort":80,"protocol":"TCP","expect":"10.1.0.1:80"}]}]}]}"#;

    #[test]
    fn a_minimal_file_parses() {
        let sc = parse(MINIMAL).unwrap();
        assert_eq!(sc.len(), 1);
        assert_eq!(sc[0].steps[0].state.services.len(), 1);
        assert_eq!(sc[0].steps[0].flows.len(), 1);
    }

    #[test]
    fn unknown_keys_are_named_with_their_place() {
        let bad = MINIMAL.replace(r#""name":"one","#, r#""name":"one","restartAgnet":true,"#);
        let e = format!("{:#}", parse(&bad).unwrap_err());
        assert!(e.contains("scenarios[0] (\"s\").steps[0] (\"one\")") && e.contains("restartAgnet"), "{e}");
        let bad = MINIMAL.replace(r#""destPort":80"#, r#""destPort":80,"sourcePort":1"#);
        let e = format!("{:#}", parse(&bad).unwrap_err());
        assert!(e.contains("flows[0] (\"f\")") && e.contains("sourcePort"), "{e}");
    }

    #[test]
    fn a_slice_of_an_unknown_service_is_an_error() {
        let bad = MINIMAL.replace(r#""service":"a/b""#, r#""service":"a/c""#);
        let e = format!("{:#}", parse(&bad).unwrap_err());
        assert!(e.contains("endpointSlices[0] (\"b-1\").service") && e.contains("a/c"), "{e}");
    }

    #[test]
    fn a_bad_flow_names_its_step() {
        let bad = MINIMAL.replace(r#""destIP":"172.30.0.1""#, r#""destIP":"nope""#);
        let e = format!("{:#}", parse(&bad).unwrap_err());
        assert!(e.contains("steps[0]") && e.contains("flows[0]"), "{e}");
    }
}
