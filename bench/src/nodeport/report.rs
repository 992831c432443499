//! The results of a NodePort run: one JSON document (`nodeport.json`), the
//! same numbers as Markdown tables (`nodeport.md`), ratios to the floors and
//! the targets included, and the latency charts (SVG).

use super::chart::{self, Line};
use super::cluster::{
    Acceleration, DIRECT_REMOTE, DIRECT_REMOTE_DSR_HOPS, DIRECT_REMOTE_VIA_A, Datapath, LbMode, NODEPORT_REMOTE,
};
use super::flood::{FloodSampling, NODEPORT};
use super::measure::{ArmResult, CDF_PERCENTILES, DatapathResult, Sampling};
use crate::machine::Machine;
use serde::Serialize;
use std::fmt::Write;

/// DSR's p50 may be at most this times the untranslated remote path's (issue 14).
pub const DSR_TARGET: f64 = 1.05;
/// XDP should forward at least this times the tc path's packets per core (issue 14).
pub const XDP_TARGET: f64 = 2.0;

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub benchmark: &'static str,
    pub machine: Machine,
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub sampling: Sampling,
    /// The BPF lab's `natPortRange`, when the run set one (else ferry's default).
    pub nat_port_range: Option<String>,
    /// `/proc/loadavg`'s 1-minute figure when the run ended (the start's is in `machine`).
    pub load_average_end: String,
    /// How the UDP flood ran (absent: left out).
    pub flood: Option<FloodSampling>,
    pub datapaths: Vec<DatapathResult>,
}

/// What each arm is, for the tables.
fn describe(arm: &str) -> &'static str {
    match arm {
        "nodeport-local" => "NodePort on node-a → pod a on node-a",
        "nodeport-remote" => "NodePort on node-a → pod b on node-b",
        "direct-local" => "direct → pod a (via node-a)",
        "direct-remote" => "direct → pod b (via node-b)",
        "direct-remote-via-a" => "direct → pod b via node-a both ways (SNAT's hops, untranslated)",
        "direct-remote-dsr-hops" => "direct → pod b via node-a, replies straight back (DSR's hops, untranslated)",
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
        let names: Vec<&str> = self.datapaths.iter().map(|d| d.name.as_str()).collect();
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
        let _ = writeln!(s, "Machine: {}; load average {} at the end  ", m.describe(), self.load_average_end);
        let _ = writeln!(
            s,
            "Run: {:.0} s; labs: {}; per lab {} rounds x {} new connections and {} held-connection requests per arm \
             (after {} warm-up connections); BPF `natPortRange`: {}; {}.",
            self.duration_s,
            self.datapaths.iter().map(|d| format!("`{}`", d.name)).collect::<Vec<_>>().join(", "),
            p.rounds,
            p.per_round,
            p.requests_per_round,
            p.warmup,
            self.nat_port_range.as_deref().unwrap_or("ferry's default (1024-29999)"),
            match p.pin_cpu {
                Some(c) => format!("the client and the pods' servers pinned to CPU {c}"),
                None => "the client and the servers unpinned".into(),
            }
        );
        let _ = writeln!(
            s,
            "Other sessions build and test on this 2-core machine during the run: absolute figures are noisy; the \
             ratios within a lab (arms interleaved connection by connection) are what to read, the median over \
             rounds first.\n"
        );

        let _ = writeln!(s, "## Summary\n");
        s.push_str(&self.summary());

        s.push_str(&self.remote_path());
        s.push_str(&self.flood_section());

        let _ = writeln!(s, "\n## Against the floors (same lab, interleaved)\n");
        let _ = writeln!(
            s,
            "| lab | arm | against | p50 | p50, median of rounds | p90 | p99 | mean | conn/s | held: request p50 | \
             held: p50, median of rounds | held: p99 | held: req/s |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for d in &self.datapaths {
            for r in &d.ratios {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                    d.name,
                    r.arm,
                    r.floor,
                    r.p50,
                    r.p50_round_median,
                    r.p90,
                    r.p99,
                    r.mean,
                    r.conns_per_s,
                    r.request_p50,
                    r.request_p50_round_median,
                    r.request_p99,
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
                    d.name,
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
                    d.name, a.name, q.samples, q.p50_us, q.p90_us, q.p99_us, q.mean_us, a.requests_per_s, a.held_failed,
                );
            }
        }
        for d in &self.datapaths {
            if d.node_a_counters.is_empty() {
                continue;
            }
            let nonzero = |c: &std::collections::BTreeMap<String, u64>| {
                let l: Vec<String> = c.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("`{k}` {v}")).collect();
                if l.is_empty() { "all zero".to_string() } else { l.join(", ") }
            };
            let _ = writeln!(
                s,
                "\n`{}` after the run (flood included): node-a {} SNATed flows in its conntrack, counters {}; \
                 node-b counters {}.",
                d.name,
                d.node_a_nat_entries,
                nonzero(&d.node_a_counters),
                nonzero(&d.node_b_counters)
            );
        }
        s
    }

    fn find(&self, dp: Datapath, mode: LbMode, acc: Acceleration) -> Option<&DatapathResult> {
        self.datapaths
            .iter()
            .find(|d| (d.variant.datapath, d.variant.lb_mode, d.variant.acceleration) == (dp, mode, acc))
    }

    /// The remote path in each mode against the untranslated floors, between the modes, and the DSR target.
    fn remote_path(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\n## The remote path: SNAT, DSR and untranslated\n");
        let _ = writeln!(
            s,
            "An outside client through node-a's NodePort to pod b on node-b, in each lab, against pod b dialled \
             directly in the same lab (interleaved). `direct-remote`: client → node-b → pod b, replies the same \
             way (the issue's \"untranslated remote path\"; it does not cross node-a at all). \
             `direct-remote-via-a`: through node-a both ways (SNAT's hops). `direct-remote-dsr-hops`: through node-a \
             towards the pod, replies from node-b straight to the client (DSR's hops). Ratios: pooled p50, and in \
             brackets the median over rounds of each round's p50 ratio.\n"
        );
        let _ = writeln!(
            s,
            "| lab | held request p50 µs | p99 µs | req/s | vs direct-remote | vs SNAT's hops | vs DSR's hops | \
             new conn p50 µs | p99 µs | conn/s | vs direct-remote | vs DSR's hops |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for d in &self.datapaths {
            let Some(a) = Self::arm(d, NODEPORT_REMOTE) else { continue };
            let ratio = |floor: &str, held: bool| {
                d.ratios
                    .iter()
                    .find(|r| r.arm == NODEPORT_REMOTE && r.floor == floor)
                    .map(|r| match held {
                        true => format!("{:.3} ({:.3})", r.request_p50, r.request_p50_round_median),
                        false => format!("{:.3} ({:.3})", r.p50, r.p50_round_median),
                    })
                    .unwrap_or_else(|| "-".into())
            };
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {} | {} |",
                d.name,
                a.request.p50_us,
                a.request.p99_us,
                a.requests_per_s,
                ratio(DIRECT_REMOTE, true),
                ratio(DIRECT_REMOTE_VIA_A, true),
                ratio(DIRECT_REMOTE_DSR_HOPS, true),
                a.connect.p50_us,
                a.connect.p99_us,
                a.conns_per_s,
                ratio(DIRECT_REMOTE, false),
                ratio(DIRECT_REMOTE_DSR_HOPS, false),
            );
        }
        for acc in [Acceleration::Disabled, Acceleration::Native] {
            let (Some(snat), Some(dsr)) =
                (self.find(Datapath::Bpf, LbMode::Snat, acc), self.find(Datapath::Bpf, LbMode::Dsr, acc))
            else {
                continue;
            };
            let (Some(a), Some(b)) = (Self::arm(dsr, NODEPORT_REMOTE), Self::arm(snat, NODEPORT_REMOTE)) else {
                continue;
            };
            let _ = writeln!(
                s,
                "\n**DSR against SNAT** (`{}` / `{}`, two labs of the same run, alternating round by round): held \
                 request p50 {:.3}, p99 {:.3}, req/s {:.3}; new connection p50 {:.3}, p99 {:.3}, conn/s {:.3}; \
                 median over rounds of the held p50 ratio {:.3}.",
                dsr.name,
                snat.name,
                a.request.p50_us / b.request.p50_us,
                a.request.p99_us / b.request.p99_us,
                a.requests_per_s / b.requests_per_s,
                a.connect.p50_us / b.connect.p50_us,
                a.connect.p99_us / b.connect.p99_us,
                a.conns_per_s / b.conns_per_s,
                round_median_across(&a.request_round_p50_us, &b.request_round_p50_us),
            );
        }
        for d in self.datapaths.iter().filter(|d| d.variant.lb_mode == LbMode::Dsr) {
            let r = |floor: &str| d.ratios.iter().find(|r| r.arm == NODEPORT_REMOTE && r.floor == floor);
            let (Some(direct), Some(hops)) = (r(DIRECT_REMOTE), r(DIRECT_REMOTE_DSR_HOPS)) else { continue };
            let met = |x: f64| if x <= DSR_TARGET { "met" } else { "not met" };
            let extra_hop = match (Self::arm(d, DIRECT_REMOTE_DSR_HOPS), Self::arm(d, DIRECT_REMOTE)) {
                (Some(h), Some(f)) => h.request.p50_us / f.request.p50_us,
                _ => f64::NAN,
            };
            let _ = writeln!(
                s,
                "\n**Target (issue 14): DSR p50 within {DSR_TARGET}× of the untranslated remote path** (`{}`): held \
                 request p50 {:.3}× `direct-remote` (median of rounds {:.3}): **{}**; new connection p50 {:.3}× \
                 ({:.3}): **{}**. Against the same hops untranslated (`direct-remote-dsr-hops`): held {:.3}× \
                 ({:.3}): **{}**, new connection {:.3}× ({:.3}): **{}**. The difference is the hop itself: \
                 DSR's request crosses node-a and the fabric bridge once more than `direct-remote`, which costs \
                 {:.3}× untranslated (`direct-remote-dsr-hops` / `direct-remote`, held p50).",
                d.name,
                direct.request_p50,
                direct.request_p50_round_median,
                met(direct.request_p50_round_median),
                direct.p50,
                direct.p50_round_median,
                met(direct.p50_round_median),
                hops.request_p50,
                hops.request_p50_round_median,
                met(hops.request_p50_round_median),
                hops.p50,
                hops.p50_round_median,
                met(hops.p50_round_median),
                extra_hop,
            );
        }
        if !self.charts().is_empty() {
            let _ = writeln!(
                s,
                "\n![held-connection request latency, remote path](nodeport-request.svg)\n\n\
                 ![new-connection latency, remote path](nodeport-connect.svg)"
            );
        }
        s
    }

    /// The UDP flood: per lab and arm, and the XDP target.
    fn flood_section(&self) -> String {
        let mut s = String::new();
        let Some(f) = &self.flood else { return s };
        let _ = writeln!(s, "\n## UDP flood: packets per second through node-a, per core\n");
        let _ = writeln!(
            s,
            "One generator thread pinned to CPU {} in the client sends {}-byte frames (64 on a wire with the FCS) \
             over {} source ports (flows) for {} s per run, {} recorded runs per arm and lab (after a 1 s warm-up); \
             medians. Arms: `nodeport` (node-a's UDP NodePort, backend pod c on node-b), `via-a` (pod c through \
             node-a untranslated), `direct` (pod c through node-b only). On veth the whole chain (generator, \
             fabric bridge, node-a, node-b, pod c's drop) runs on the generator's CPU; \"chain ns/packet\" is that \
             CPU's time per delivered packet (generator thread + ksoftirqd, from schedstat: exact whatever else \
             runs); \"per core\" = 1e9 / that. \"node-a ns/packet\" = `nodeport` − `direct` (node-a's work and \
             one more fabric pass). Softirq s per Mpkt: the CPU's /proc/stat softirq time (tick-sampled, other \
             work's softirq included) per million delivered packets.\n",
            f.cpu, f.frame_bytes, f.flows, f.seconds, f.runs
        );
        if self.datapaths.iter().any(|d| d.variant.acceleration == Acceleration::Native) {
            let _ = writeln!(
                s,
                "XDP labs (`acceleration: native` on both nodes): the fabric's ends of the uplinks have GRO on and \
                 every host sends with complete checksums (`Lab::accelerate_fabric`: veth takes XDP's frames only \
                 so); their node-a counters below show what XDP carried (`xdp_forward`, `xdp_dsr_encap`).\n"
            );
        }
        let _ = writeln!(
            s,
            "| lab | arm | delivered pps (wall) | chain ns/packet | per core pps | softirq s / Mpkt | lost |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
        for d in &self.datapaths {
            let Some(fr) = &d.flood else { continue };
            for a in &fr.arms {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {} |",
                    d.name, a.name, a.delivered_pps, a.ns_per_packet, a.per_core_pps, a.softirq_s_per_mpkt, a.lost
                );
            }
        }
        let _ = writeln!(
            s,
            "\n| lab | node-a ns/packet (NodePort) | as pps per core | node-a ns/packet (forwarding, untranslated) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
        for d in &self.datapaths {
            let Some(fr) = &d.flood else { continue };
            let pps = if fr.node_a_ns_per_packet > 0.0 { 1e9 / fr.node_a_ns_per_packet } else { f64::NAN };
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {:.0} |",
                d.name, fr.node_a_ns_per_packet, pps, fr.node_a_forward_ns_per_packet
            );
        }
        let mut any = false;
        for mode in [LbMode::Snat, LbMode::Dsr] {
            let (Some(tc), Some(xdp)) = (
                self.find(Datapath::Bpf, mode, Acceleration::Disabled),
                self.find(Datapath::Bpf, mode, Acceleration::Native),
            ) else {
                continue;
            };
            let (Some(t), Some(x)) = (&tc.flood, &xdp.flood) else { continue };
            any = true;
            let np = |f: &super::flood::FloodResult| f.arms.iter().find(|a| a.name == NODEPORT).map(|a| a.per_core_pps);
            let chain = np(x).unwrap_or(0.0) / np(t).unwrap_or(f64::NAN);
            let share = t.node_a_ns_per_packet / x.node_a_ns_per_packet;
            let _ = writeln!(
                s,
                "\n**Target (issue 14): XDP ≥ {XDP_TARGET}× the tc path's packets per second per core** ({}): node-a's \
                 share {:.2}× (`{}` {:.0} ns/packet, `{}` {:.0}): **{}**; the whole chain on the core {:.2}× \
                 (diluted by the generator, the fabric and node-b, which XDP on node-a does not change).",
                mode.name(),
                share,
                tc.name,
                t.node_a_ns_per_packet,
                xdp.name,
                x.node_a_ns_per_packet,
                if share >= XDP_TARGET { "met" } else { "not met" },
                chain
            );
            let direct = |f: &super::flood::FloodResult| {
                f.arms.iter().find(|a| a.name == super::flood::DIRECT).map_or(f64::NAN, |a| a.ns_per_packet)
            };
            let _ = writeln!(
                s,
                "What attaching XDP costs on veth by itself, in the same labs: node-a's plain forwarding (`via-a` − \
                 `direct`, XDP passing the packet on to the stack) {:.0} ns/packet with XDP against {:.0} at tc; the \
                 `direct` arm (node-a not on the path; node-b runs XDP too) {:.0} against {:.0}.",
                x.node_a_forward_ns_per_packet,
                t.node_a_forward_ns_per_packet,
                direct(x),
                direct(t)
            );
        }
        if !any {
            let _ = writeln!(
                s,
                "\n**Target (issue 14): XDP ≥ {XDP_TARGET}× the tc path's packets per second per core**: not measured \
                 in this run: no pair of `acceleration: disabled` and `native` labs in the same mode \
                 (`--accelerations`)."
            );
        }
        s
    }

    /// The charts: file name and SVG (see [`charts`]).
    pub fn charts(&self) -> Vec<(String, String)> {
        charts(&self.datapaths)
    }
}

/// The charts of a run's labs: file name and SVG. The remote path in every lab, and the
/// untranslated floors of the DSR lab (or the first), dashed. `nodeport charts` draws them
/// again from a saved nodeport.json.
pub fn charts(datapaths: &[DatapathResult]) -> Vec<(String, String)> {
    let mut lines_req = Vec::new();
    let mut lines_conn = Vec::new();
    let mut add = |label: String, a: &ArmResult, dashed: bool| {
        let pts = |v: &[f64]| CDF_PERCENTILES.iter().copied().zip(v.iter().copied()).collect::<Vec<_>>();
        lines_req.push(Line { name: label.clone(), points: pts(&a.request_cdf_us), dashed });
        lines_conn.push(Line { name: label, points: pts(&a.connect_cdf_us), dashed });
    };
    for d in datapaths {
        if let Some(a) = Results::arm(d, NODEPORT_REMOTE) {
            let v = &d.variant;
            let how = match v.datapath {
                Datapath::Nftables => "nftables".to_string(),
                Datapath::Bpf => format!(
                    "bpf {}{}",
                    v.lb_mode.name().to_uppercase(),
                    if v.acceleration == Acceleration::Native { " XDP" } else { "" }
                ),
            };
            add(format!("NodePort, {how}"), &a, false);
        }
    }
    let dsr_tc = datapaths.iter().find(|d| {
        (d.variant.datapath, d.variant.lb_mode, d.variant.acceleration)
            == (Datapath::Bpf, LbMode::Dsr, Acceleration::Disabled)
    });
    if let Some(d) = dsr_tc.or(datapaths.first()) {
        for (arm, label) in [(DIRECT_REMOTE, "direct via node-b"), (DIRECT_REMOTE_DSR_HOPS, "direct, DSR's hops")] {
            if let Some(a) = Results::arm(d, arm) {
                add(format!("{label} ({})", d.name), &a, true);
            }
        }
    }
    if lines_req.is_empty() {
        return Vec::new();
    }
    vec![
        (
            "nodeport-request.svg".into(),
            chart::svg("Remote pod: request on a held connection, latency by percentile", &lines_req),
        ),
        ("nodeport-connect.svg".into(), chart::svg("Remote pod: new connection, latency by percentile", &lines_conn)),
    ]
}

/// Median over rounds of a / b (two labs' rounds, paired by index).
fn round_median_across(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).filter(|(x, y)| **x > 0.0 && **y > 0.0).map(|(x, y)| x / y).collect();
    crate::stats::median(&r)
}
