//! The results of a run: one JSON document (`socket-lb.json`) and the same
//! numbers as Markdown tables (`socket-lb.md`), ratios against the floor included.

use crate::agent::AgentResult;
use crate::latency::{LatencyResult, Sampling};
use crate::machine::Machine;
use crate::programming::ProgrammingResult;
use serde::Serialize;
use std::fmt::Write;

/// Everything measured at one size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub services: usize,
    pub programming: ProgrammingResult,
    pub agent: AgentResult,
    pub latency: LatencyResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub benchmark: &'static str,
    pub machine: Machine,
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub sampling: Sampling,
    pub change_repetitions: usize,
    pub sizes: Vec<SizeResult>,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Results {
    /// The human-readable tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# socket-LB benchmark results\n");
        let _ = writeln!(s, "Machine: {}  ", m.describe());
        let _ = writeln!(
            s,
            "Run: {:.0} s; {} rounds x {} connections per arm per size (after {} warm-up), {} one-endpoint changes.\n",
            self.duration_s,
            self.sampling.rounds,
            self.sampling.per_round,
            self.sampling.warmup,
            self.change_repetitions
        );

        let _ = writeln!(s, "## (a) New-connection latency (socket -> connect -> request -> reply), sequential\n");
        let _ = writeln!(
            s,
            "| services | arm | samples | p50 µs | p90 µs | p99 µs | mean µs | conn/s | p50 ratio | p99 ratio | conn/s ratio |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for z in &self.sizes {
            let l = &z.latency;
            let floor = &l.arms[1];
            for a in &l.arms {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.3} | {:.3} | {:.3} |",
                    z.services,
                    a.name,
                    a.latency.samples,
                    a.latency.p50_us,
                    a.latency.p90_us,
                    a.latency.p99_us,
                    a.latency.mean_us,
                    a.conns_per_s,
                    a.latency.p50_us / floor.latency.p50_us,
                    a.latency.p99_us / floor.latency.p99_us,
                    a.conns_per_s / floor.conns_per_s,
                );
            }
        }
        let _ = writeln!(
            s,
            "\nRatios are against `direct` (the floor: the same backends by pod IP, same process, interleaved). \
             `direct-nohook` runs in a cgroup without ferry's programs, in alternate blocks of {} connections. \
             `clusterip+tcx` and `direct+tcx` are `clusterip` and `direct` in a third kind of block, during which \
             ferry's pod-facing packet program (`ferry_from_pods`, on the agent's maps, pass-through fast path on) \
             is attached at tcx ingress of the node's bridge, which every packet of these connections crosses; \
             `clusterip+tcx` against `direct` is what socket-LB plus the per-packet program cost against a node \
             without ferry.\n",
            self.sampling.per_round
        );
        for z in &self.sizes {
            let _ = writeln!(
                s,
                "- {} services: `ferry_sock_rev` held {} entries after the run (one per translated TCP connection).",
                z.services, z.latency.sock_rev_entries_after
            );
        }
        let _ = writeln!(s);

        let _ = writeln!(s, "## (b) Programming a pinned datapath in-process\n");
        let _ = writeln!(
            s,
            "| services | full: build_plan ms | sync ms | apply ms | total ms | map ops | µs/op (apply) | 1 change: build_plan ms | diff ms | sync ms | apply ms | total ms | map ops |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for z in &self.sizes {
            let f = &z.programming.full;
            let c = &z.programming.change.median;
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} | {} |",
                z.services,
                f.build_plan_ms,
                f.sync_ms,
                f.apply_ms,
                f.total_ms,
                f.map_ops,
                f.apply_us_per_op,
                c.build_plan_ms,
                c.diff_ms,
                c.sync_ms,
                c.apply_ms,
                c.total_ms,
                c.map_ops
            );
        }
        let _ = writeln!(s, "\nOne-change figures are medians of {} changes.\n", self.change_repetitions);

        let _ = writeln!(s, "## (c) `ferry run` agent and kernel map memory\n");
        let _ = writeln!(
            s,
            "| services | manifest MB | ready s | first sync plan ms | apply ms | map ops | VmRSS MiB | VmHWM MiB | BPF maps MiB | 1 change: wall ms | plan ms | apply ms | VmHWM after MiB |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for z in &self.sizes {
            let a = &z.agent;
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.2} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.2} | {:.1} |",
                z.services,
                a.manifest_bytes as f64 / 1e6,
                a.ready_s,
                a.first_sync.plan_ms,
                a.first_sync.apply_ms,
                a.first_sync.map_ops,
                a.memory_after_first_sync.vm_rss_kib as f64 / 1024.0,
                a.memory_after_first_sync.vm_hwm_kib as f64 / 1024.0,
                mib(a.maps_memlock_total_bytes),
                a.one_change_wall_ms,
                a.one_change_sync.plan_ms,
                a.one_change_sync.apply_ms,
                a.memory_after_one_change.vm_hwm_kib as f64 / 1024.0,
            );
        }
        let _ = writeln!(
            s,
            "\n### Heap held by ferry's data structures (the agent's first sync replayed with a counting allocator)\n"
        );
        let _ = writeln!(
            s,
            "| services | reading manifests, peak MiB | ClusterState MiB | Plan MiB | Programmer MiB | map ops (transient) MiB | kept between syncs MiB | kept per service KiB |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for z in &self.sizes {
            let h = &z.agent.heap;
            let m = |b: i64| b as f64 / (1024.0 * 1024.0);
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                z.services,
                m(h.load_peak_bytes),
                m(h.cluster_state_bytes),
                m(h.plan_bytes),
                m(h.programmer_bytes),
                m(h.map_ops_bytes),
                m(h.kept_between_syncs_bytes),
                h.kept_between_syncs_bytes as f64 / 1024.0 / z.services as f64,
            );
        }
        let _ = writeln!(s, "\n### BPF maps per size (kernel `memlock`, entries)\n");
        let names: Vec<&str> =
            self.sizes.first().map(|z| z.agent.maps.iter().map(|m| m.name.as_str()).collect()).unwrap_or_default();
        let _ = write!(s, "| map | max entries |");
        for z in &self.sizes {
            let _ = write!(s, " {} svc: entries | KiB |", z.services);
        }
        let _ = writeln!(s);
        let _ = write!(s, "|---|---:|");
        for _ in &self.sizes {
            let _ = write!(s, "---:|---:|");
        }
        let _ = writeln!(s);
        for name in names {
            let max = self.sizes[0].agent.maps.iter().find(|m| m.name == name).map(|m| m.max_entries).unwrap_or(0);
            let _ = write!(s, "| {name} | {max} |");
            for z in &self.sizes {
                match z.agent.maps.iter().find(|m| m.name == name) {
                    Some(m) => {
                        let _ = write!(s, " {} | {:.0} |", m.entries, m.memlock_bytes as f64 / 1024.0);
                    }
                    None => {
                        let _ = write!(s, " - | - |");
                    }
                }
            }
            let _ = writeln!(s);
        }
        s
    }
}
