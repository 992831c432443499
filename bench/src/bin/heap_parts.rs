//! Where the agent's kept heap goes, part by part, at one size: the
//! planner's compact Services and EndpointSlices, its Plan and claims, the
//! Programmer's mirror, and `ferry run`'s manifest-source bookkeeping; and
//! the process's RSS before and after the allocator gives free pages back.
//! A diagnostic beside `control_plane_bpf` (whose report has the totals):
//!
//! ```text
//! heap_parts [SERVICES [CHURN_ROUNDS]]     (default 100000 and 3; SERVICES a multiple of 100)
//! ```

use ferry_bench::cluster::{self, Synthetic};
use ferry_bench::heap;
use ferry_model::Planner;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[global_allocator]
static ALLOC: heap::CountingAlloc = heap::CountingAlloc;

/// Changes per churn round (CHURN_ROUNDS of them, 3 unless told).
const CHURN_STEP: usize = 20_000;

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().map_err(|e| anyhow::anyhow!("SERVICES must be a number, not {s:?}: {e}"))?,
        None => 100_000,
    };
    let synthetic = Synthetic::new(n)?;
    let per = |bytes: i64| bytes as f64 / n as f64;
    let cfg = cluster::node_config(&["10.0.0.1".parse()?]);
    let rt = ferry_bench::programming::runtime()?;

    heap::start();
    let base = heap::live_bytes();
    let mut planner = Planner::new(cfg);
    for i in 0..n {
        planner.apply(Synthetic::service_change(i)?);
    }
    let services = heap::live_bytes() - base;
    for i in 0..n {
        planner.apply(synthetic.slice_change(i, 0)?);
    }
    let slices = heap::live_bytes() - base - services;
    let (plan, diff) = planner.sync();
    drop(diff);
    let planned = heap::live_bytes() - base - services - slices;
    let mut programmer = ferry_bpf::Programmer::new();
    let batch = programmer.sync_batch(&plan, None, &rt);
    drop(batch);
    let programmed = heap::live_bytes() - base - services - slices - planned;
    let peak = heap::peak_bytes() - base;
    let kept = heap::live_bytes() - base;
    println!("{n} services, kept heap per service:");
    println!(
        "  planner: Services {:.0} B, EndpointSlices {:.0} B, Plan and claims {:.0} B",
        per(services),
        per(slices),
        per(planned)
    );
    println!("  programmer: {:.0} B", per(programmed));
    println!("  total {:.0} B ({} MiB); highest on the way {} MiB", per(kept), kept >> 20, peak >> 20);
    println!("  RSS {} MiB; after mi_collect {} MiB", rss_mib()?, {
        // SAFETY: mi_collect only releases free memory.
        unsafe { libmimalloc_sys::mi_collect(true) };
        rss_mib()?
    });
    // Churn as the benchmark's: one endpoint of another service per change,
    // 26 changes a sync (what `ferry agent` batched at 1,000 changes/s).
    let mut plan = plan;
    let rounds: usize = match std::env::args().nth(2) {
        Some(s) => s.parse().map_err(|e| anyhow::anyhow!("CHURN_ROUNDS must be a number, not {s:?}: {e}"))?,
        None => 3,
    };
    for round in 1..=rounds {
        for k in (round - 1) * CHURN_STEP..round * CHURN_STEP {
            let i = (k * 7919) % n;
            planner.apply(ferry_model::StateChange::EndpointSliceApplied(Box::new(synthetic.churned_slice(i, k)?)));
            if k % 26 == 25 {
                let (next, diff) = planner.sync();
                drop(programmer.sync_batch(&next, Some(&diff), &rt));
                plan = next;
            }
        }
        println!(
            "  after {} churn changes: total {:.0} B/service (RSS {} MiB)",
            round * CHURN_STEP,
            per(heap::live_bytes() - base),
            rss_mib()?
        );
    }
    drop((planner, programmer, plan));
    heap::stop();
    let source = source_heap(&synthetic)?;
    println!("  `ferry run`'s manifest source (100 files): {:.0} B per service", per(source));
    Ok(())
}

/// What a manifest source keeps after reading a chunked directory of `synthetic`.
fn source_heap(synthetic: &Synthetic) -> anyhow::Result<i64> {
    let dir = std::env::temp_dir().join(format!("ferry-heap-parts-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let size = synthetic.services / 100;
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("chunk-{f:04}.json")),
                synthetic.manifest_chunk(f * size..(f + 1) * size, 0),
            )?;
        }
        heap::start();
        let base = heap::live_bytes();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, watched) = (stop.clone(), dir.clone());
        let source = std::thread::spawn(move || ferry_k8s::ManifestSource::new(watched).run_blocking(tx, stopped));
        // The whole directory, then Synced (bounded by the directory's size).
        while let Some(event) = rx.blocking_recv() {
            if matches!(event, ferry_k8s::api::SourceEvent::Synced) {
                break;
            }
        }
        let kept = heap::live_bytes() - base;
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        let _ = source.join();
        heap::stop();
        anyhow::Ok(kept)
    })();
    std::fs::remove_dir_all(&dir)?;
    result
}

fn rss_mib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kib >> 10)
}
