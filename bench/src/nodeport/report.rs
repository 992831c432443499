//! The results of a NodePort run: one JSON document (`nodeport.json`) and the
//! same numbers as Markdown tables (`nodeport.md`), ratios to the floors included.

use super::measure::{ArmResult, DatapathResult, Sampling};
use crate::machine::Machine;
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub benchmark: &'static str,
    pub machine: Machine,
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub sampling: Sampling,
    /// The BPF lab's `natPortRange`, when the run set one (else ferry's default).
    pub nat_port_range: Option<String>,
    pub datapaths: Vec<DatapathResult>,
}

/// What each arm is, for the tables.
fn describe(arm: &str) -> &'static str {
    match arm {
        "nodeport-local" => "NodePort on node-a → pod a on node-a",
        "nodeport-remote" => "NodePort on node-a → pod b on node-b",
        "direct-local" => "direct → pod a (via node-a)",
        "direct-remote" => "direct → pod b (via node-b)",
        "direct-remote-via-a" => "direct → pod b via node-a (same hops as NodePort remote)",
        _ => "",
    }
}

impl Results {
    fn arm_names(&self) -> Vec<&str> {
        self.datapaths.first().map(|d| d.arms.iter().map(|a| a.name.as_str()).collect()).unwrap_or_default()
    }

    fn arm(d: &DatapathResult, name: &str) -> Option<ArmResult> {
        d.arms.iter().find(|a| a.name == name).cloned()
    }

    /// Rows: arms; columns: each figure per datapath.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let names: Vec<&str> = self.datapaths.iter().map(|d| d.datapath.name()).collect();
        let _ = write!(s, "| path |");
        for fig in ["new conn p50 µs", "p99 µs", "conn/s", "held req/s"] {
            for n in &names {
                let _ = write!(s, " {fig} ({n}) |");
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|{}", "---:|".repeat(4 * names.len()));
        for arm in self.arm_names() {
            let _ = write!(s, "| {} |", describe(arm));
            type Fig = fn(&ArmResult) -> String;
            let figs: [Fig; 4] = [
                |a| format!("{:.1}", a.connect.p50_us),
                |a| format!("{:.1}", a.connect.p99_us),
                |a| format!("{:.0}", a.conns_per_s),
                |a| format!("{:.0}", a.requests_per_s),
            ];
            for fig in figs {
                for d in &self.datapaths {
                    let v = Self::arm(d, arm).map(|a| fig(&a)).unwrap_or_else(|| "-".into());
                    let _ = write!(s, " {v} |");
                }
            }
            let _ = writeln!(s);
        }
        s
    }

    /// The human-readable tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let p = &self.sampling;
        let _ = writeln!(s, "# NodePort benchmark results\n");
        let _ = writeln!(s, "Machine: {}  ", m.describe());
        let _ = writeln!(
            s,
            "Run: {:.0} s; per datapath {} rounds x {} new connections and {} held-connection requests per arm \
             (after {} warm-up connections); BPF `natPortRange`: {}.\n",
            self.duration_s,
            p.rounds,
            p.per_round,
            p.requests_per_round,
            p.warmup,
            self.nat_port_range.as_deref().unwrap_or("ferry's default (1024-29999)")
        );

        let _ = writeln!(s, "## Summary\n");
        s.push_str(&self.summary());

        let _ = writeln!(s, "\n## Against the floors (same lab, interleaved)\n");
        let _ = writeln!(
            s,
            "| datapath | arm | against | p50 | p90 | p99 | mean | conn/s | held: request p50 | held: req/s |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for d in &self.datapaths {
            for r in &d.ratios {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                    d.datapath.name(),
                    r.arm,
                    r.floor,
                    r.p50,
                    r.p90,
                    r.p99,
                    r.mean,
                    r.conns_per_s,
                    r.request_p50,
                    r.requests_per_s
                );
            }
        }

        let _ = writeln!(s, "\n## New connections (socket → connect → request → reply), sequential\n");
        let _ = writeln!(
            s,
            "| datapath | arm | pod saw | samples | p50 µs | p90 µs | p99 µs | mean µs | max µs | over 500 ms | failed | conn/s |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for d in &self.datapaths {
            for a in &d.arms {
                let c = &a.connect;
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} | {:.0} |",
                    d.datapath.name(),
                    a.name,
                    a.source_seen,
                    c.samples,
                    c.p50_us,
                    c.p90_us,
                    c.p99_us,
                    c.mean_us,
                    c.max_us,
                    a.connect_over_500ms,
                    a.connect_failed,
                    a.conns_per_s,
                );
            }
        }
        let _ = writeln!(
            s,
            "\n\"pod saw\": the source address of the connection at the pod (the client is {}). \
             \"over 500 ms\": connections that lost a packet (a SYN is resent after 1 s). \"failed\": no reply \
             within 2 s; not timed, not in the percentiles or conn/s.\n",
            super::cluster::CLIENT_IP
        );

        let _ = writeln!(s, "## One held connection per arm (request → reply), sequential\n");
        let _ = writeln!(
            s,
            "| datapath | arm | samples | p50 µs | p90 µs | p99 µs | mean µs | req/s | broken connections |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for d in &self.datapaths {
            for a in &d.arms {
                let q = &a.request;
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
                    d.datapath.name(),
                    a.name,
                    q.samples,
                    q.p50_us,
                    q.p90_us,
                    q.p99_us,
                    q.mean_us,
                    a.requests_per_s,
                    a.held_failed,
                );
            }
        }
        for d in &self.datapaths {
            if d.node_a_counters.is_empty() {
                continue;
            }
            let nonzero: Vec<String> =
                d.node_a_counters.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("`{k}` {v}")).collect();
            let _ = writeln!(
                s,
                "\nnode-a's {} datapath after the run: {} SNATed flows in its conntrack; counters {}.",
                d.datapath.name(),
                d.node_a_nat_entries,
                nonzero.join(", ")
            );
        }
        s
    }
}
