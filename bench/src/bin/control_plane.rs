//! `control_plane`: how long ferry's nftables datapath and kube-proxy's
//! iptables and nftables rule layouts take to load the same services into the
//! kernel: the full sync from empty and one-endpoint changes (p50 / p99), for
//! each shape (services x endpoints), each proxy in its own empty network
//! namespace. Writes `bench/results/control-plane.json`, `control-plane.md`
//! and the charts `control-plane-full-sync.svg`, `control-plane-one-change.svg`.
//! Needs root, `nft` (nftables) and `iptables-nft-restore` (iptables).
//! Module `ferry_bench::control_plane` holds the layouts and the chart.

use anyhow::Context;
use clap::Parser;
use ferry_bench::cluster;
use ferry_bench::control_plane::chart::{self, Point, Series};
use ferry_bench::control_plane::exec::{Outcome, run_with_input};
use ferry_bench::control_plane::shape::{ServiceSpec, Shape};
use ferry_bench::control_plane::{kube_iptables, kube_nft};
use ferry_bench::machine::Machine;
use ferry_bench::stats::percentile;
use ferry_model::Planner;
use ferry_nft::services::Renderer;
use ferry_sandbox::{Host, Sandbox};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const FERRY: &str = "ferry nftables";
const KUBE_IPTABLES: &str = "kube-proxy iptables";
const KUBE_NFT: &str = "kube-proxy nftables";
/// The iptables binary the kube-proxy iptables layout is loaded with (Debian's default backend).
const IPTABLES_RESTORE: &str = "iptables-nft-restore";
const IPTABLES_SAVE: &str = "iptables-nft-save";
/// Up to this many endpoints in all, the rules in the kernel are listed and
/// their DNATs counted after the full sync (beyond, listing them takes longer than loading them).
const VERIFY_MAX: usize = 20_000;

#[derive(Parser)]
#[command(
    name = "control_plane",
    about = "ferry nftables vs kube-proxy iptables/nftables: full sync and one-change time"
)]
struct Cli {
    /// Shapes as SERVICESxENDPOINTS, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["1000x2".to_string(), "10000x2".into(), "100000x2".into(), "1x10000".into(), "10000x100".into()])]
    shapes: Vec<String>,
    /// Which series to run: ferry-nft, kube-iptables, kube-nft (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["ferry-nft".to_string(), "kube-iptables".into(), "kube-nft".into()])]
    series: Vec<String>,
    /// One-endpoint changes timed per series and shape (at most).
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Stop timing changes of a series after this many seconds (at least 3 changes are timed).
    #[arg(long, default_value_t = 60)]
    change_budget_s: u64,
    /// A full sync still running after this many seconds is stopped and reported as not finished.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Where the results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out_dir: PathBuf,
    /// File name stem of the results (`NAME.json`, `NAME.md`, `NAME-*.svg`).
    #[arg(long, default_value = "control-plane")]
    name: String,
    /// Also write each series' full-sync script and first one-change script into this directory.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Measure nothing: read `OUT_DIR/NAME.json` and write the report and charts again
    /// (after editing the JSON, e.g. to add a series measured elsewhere).
    #[arg(long)]
    replot: bool,
}

/// Writes `script` as `DIR/<series>-<shape>-<what>.txt` when `--dump DIR` is given.
fn dump(cli: &Cli, series: &str, shape: &Shape, what: &str, script: &str) -> anyhow::Result<()> {
    if let Some(dir) = &cli.dump {
        std::fs::create_dir_all(dir)?;
        let file = dir.join(format!("{}-{}-{what}.txt", series.replace(' ', "-"), shape.label()));
        std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FullSync {
    /// Spawn of nft / iptables-restore to its exit: loading the rules into the kernel.
    load_ms: f64,
    script_bytes: usize,
    script_lines: usize,
    /// ferry only: Planner::sync and Renderer::sync (the script's rendering).
    plan_ms: Option<f64>,
    render_ms: Option<f64>,
    /// DNAT rules found in the kernel afterwards (one per endpoint is expected); counted
    /// up to VERIFY_MAX endpoints (the kernel's rule dump is quadratic in the chains).
    dnat_rules_in_kernel: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Changes {
    samples: usize,
    load_p50_ms: f64,
    load_p99_ms: f64,
    load_max_ms: f64,
    /// ferry only: Planner::apply + sync (plan and diff), and Renderer::sync, medians.
    plan_p50_ms: Option<f64>,
    render_p50_ms: Option<f64>,
    script_lines_p50: usize,
    load_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SeriesResult {
    series: String,
    tool: String,
    full: Option<FullSync>,
    /// Set when the full sync did not finish within the timeout (it was stopped).
    full_stopped_after_s: Option<f64>,
    /// Why nothing was measured, when so.
    note: Option<String>,
    changes: Option<Changes>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShapeResult {
    shape: Shape,
    series: Vec<SeriesResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Results {
    machine: Machine,
    nft_version: String,
    iptables_version: String,
    started_unix_s: u64,
    duration_s: f64,
    timeout_s: u64,
    shapes: Vec<ShapeResult>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn tool_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "not found".into())
}

/// Counts `needle` in a command's output inside the namespace (untimed checks), for
/// shapes of at most VERIFY_MAX endpoints; checks that it is one per endpoint.
fn count_in_output(
    sb: &Sandbox,
    host: &Host,
    shape: &Shape,
    (program, args, needle): (&str, &[&str], &str),
) -> anyhow::Result<Option<usize>> {
    let expected = shape.services * shape.endpoints;
    if expected > VERIFY_MAX {
        return Ok(None);
    }
    let out = sb
        .run_in_with_timeout(host, None, sb.command(host, program).args(args), Duration::from_secs(600))
        .with_context(|| format!("running {program} {args:?}"))?;
    anyhow::ensure!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let found = String::from_utf8_lossy(&out.stdout).matches(needle).count();
    anyhow::ensure!(found == expected, "{program} {args:?}: {found} {needle:?} in the kernel, {expected} endpoints");
    Ok(Some(found))
}

/// Times one-endpoint changes: `step(n)` applies the n-th and returns (load, plan, render, lines).
fn time_changes(
    count: usize,
    budget: Duration,
    mut step: impl FnMut(usize) -> anyhow::Result<(Duration, Option<Duration>, Option<Duration>, usize)>,
) -> anyhow::Result<Changes> {
    let started = Instant::now();
    let (mut load, mut plan, mut render, mut lines) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 1..=count.max(1) {
        if n > 3 && started.elapsed() > budget {
            break;
        }
        let (l, p, r, s) = step(n)?;
        load.push(l.as_nanos() as u64);
        plan.extend(p.map(|d| d.as_nanos() as u64));
        render.extend(r.map(|d| d.as_nanos() as u64));
        lines.push(s as u64);
    }
    let sorted = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    let (l, p, r, s) = (sorted(&load), sorted(&plan), sorted(&render), sorted(&lines));
    let p50 = |v: &[u64]| (!v.is_empty()).then(|| percentile(v, 50.0) as f64 / 1e6);
    Ok(Changes {
        samples: l.len(),
        load_p50_ms: percentile(&l, 50.0) as f64 / 1e6,
        load_p99_ms: percentile(&l, 99.0) as f64 / 1e6,
        load_max_ms: l.last().copied().unwrap_or(0) as f64 / 1e6,
        plan_p50_ms: p50(&p),
        render_p50_ms: p50(&r),
        script_lines_p50: percentile(&s, 50.0) as usize,
        load_ms: load.iter().map(|x| *x as f64 / 1e6).collect(),
    })
}

fn lines(s: &str) -> usize {
    s.bytes().filter(|b| *b == b'\n').count()
}

fn ferry_series(sb: &Sandbox, host: &Host, shape: &Shape, cli: &Cli) -> anyhow::Result<SeriesResult> {
    let label = shape.label();
    eprintln!("[{label}] {FERRY}: building the ClusterState");
    let cfg = cluster::node_config(&["192.168.50.10".parse().expect("valid address")]);
    // The agent's own path: the incremental Planner, fed the objects as its source would.
    let state = shape.cluster_state()?;
    let mut planner = Planner::new(cfg.clone());
    planner.replace_services(state.services.values());
    planner.replace_slices(state.endpoint_slices.values());
    drop(state);
    let t = Instant::now();
    let (plan, _) = planner.sync();
    let plan_ms = ms(t.elapsed());
    anyhow::ensure!(plan.problems.is_empty(), "the synthetic cluster has problems: {:?}", &plan.problems[..1]);
    let mut renderer = Renderer::default();
    let t = Instant::now();
    let scripts = renderer.sync(&plan, None);
    let render_ms = ms(t.elapsed());
    let (bytes, nlines) = scripts.iter().fold((0, 0), |(b, l), (_, s, _)| (b + s.len(), l + lines(s)));
    eprintln!("[{label}] {FERRY}: plan {plan_ms:.0} ms, render {render_ms:.0} ms, {nlines} lines; loading");
    for (family, script, _) in &scripts {
        dump(cli, FERRY, shape, &format!("full-{}", family.as_k8s()), script)?;
    }
    let t = Instant::now();
    for (family, script, table) in scripts {
        ferry_nft::nft::apply_with(sb.command(host, "nft"), ferry_nft::services::TABLE, &script)?;
        renderer.applied(family, table);
    }
    let load_ms = ms(t.elapsed());
    let dnat =
        count_in_output(sb, host, shape, ("nft", &["list", "table", "ip", ferry_nft::services::TABLE], "dnat to"))?;
    eprintln!("[{label}] {FERRY}: full sync loaded in {load_ms:.0} ms ({dnat:?} dnat rules)");
    let full = FullSync {
        load_ms,
        script_bytes: bytes,
        script_lines: nlines,
        plan_ms: Some(plan_ms),
        render_ms: Some(render_ms),
        dnat_rules_in_kernel: dnat,
    };
    let changes = time_changes(cli.changes, Duration::from_secs(cli.change_budget_s), |n| {
        let change = shape.endpoint_change(n)?;
        let t = Instant::now();
        planner.apply(change);
        let (new, diff) = planner.sync();
        let planned = t.elapsed();
        anyhow::ensure!(diff.changed.len() == 1, "one endpoint change changed {} service ports", diff.changed.len());
        let t = Instant::now();
        let scripts = renderer.sync(&new, Some(&diff));
        let rendered = t.elapsed();
        let nlines = scripts.iter().map(|(_, s, _)| lines(s)).sum();
        if n == 1 {
            scripts.iter().try_for_each(|(f, s, _)| dump(cli, FERRY, shape, &format!("change-{}", f.as_k8s()), s))?;
        }
        let t = Instant::now();
        for (family, script, table) in scripts {
            ferry_nft::nft::apply_with(sb.command(host, "nft"), ferry_nft::services::TABLE, &script)?;
            renderer.applied(family, table);
        }
        let loaded = t.elapsed();
        Ok((loaded, Some(planned), Some(rendered), nlines))
    })?;
    eprintln!(
        "[{label}] {FERRY}: one change p50 {:.1} ms, p99 {:.1} ms ({} changes)",
        changes.load_p50_ms, changes.load_p99_ms, changes.samples
    );
    Ok(SeriesResult {
        series: FERRY.into(),
        tool: "nft -f - (ferry_nft::nft::apply_with)".into(),
        full: Some(full),
        full_stopped_after_s: None,
        note: None,
        changes: Some(changes),
    })
}

/// Runs a peer: `full_script`, then `change(n, specs)` scripts, with `program args`.
#[allow(clippy::too_many_arguments)]
fn peer_series(
    sb: &Sandbox,
    host: &Host,
    shape: &Shape,
    cli: &Cli,
    name: &str,
    program: &str,
    args: &[&str],
    full_script: String,
    verify: (&str, &[&str], &str),
    mut change: impl FnMut(&ServiceSpec, &ServiceSpec) -> String,
) -> anyhow::Result<SeriesResult> {
    let label = shape.label();
    let tool = format!("{program} {}", args.join(" "));
    let (bytes, nlines) = (full_script.len(), lines(&full_script));
    dump(cli, name, shape, "full", &full_script)?;
    eprintln!("[{label}] {name}: loading {nlines} lines with {tool}");
    let cmd = || {
        let mut c = sb.command(host, program);
        c.args(args);
        c
    };
    let outcome = run_with_input(cmd(), &full_script, Duration::from_secs(cli.timeout_s))?;
    drop(full_script);
    let load = match outcome {
        Outcome::Done(d) => d,
        Outcome::TimedOut => {
            eprintln!("[{label}] {name}: full sync not finished after {} s: stopped", cli.timeout_s);
            return Ok(SeriesResult {
                series: name.into(),
                tool,
                full: None,
                full_stopped_after_s: Some(cli.timeout_s as f64),
                note: Some(format!("full sync stopped after {} s; no changes timed", cli.timeout_s)),
                changes: None,
            });
        }
    };
    let dnat = count_in_output(sb, host, shape, verify)?;
    eprintln!("[{label}] {name}: full sync loaded in {:.0} ms ({dnat:?} dnat rules)", ms(load));
    let full = FullSync {
        load_ms: ms(load),
        script_bytes: bytes,
        script_lines: nlines,
        plan_ms: None,
        render_ms: None,
        dnat_rules_in_kernel: dnat,
    };
    let i = shape.changed_service();
    let changes = time_changes(cli.changes, Duration::from_secs(cli.change_budget_s), |n| {
        let (before, after) = (ServiceSpec::of(shape, i, n - 1), ServiceSpec::of(shape, i, n));
        let script = change(&before, &after);
        if n == 1 {
            dump(cli, name, shape, "change", &script)?;
        }
        match run_with_input(cmd(), &script, Duration::from_secs(cli.timeout_s))? {
            Outcome::Done(d) => Ok((d, None, None, lines(&script))),
            Outcome::TimedOut => anyhow::bail!("{name}: one change not finished after {} s", cli.timeout_s),
        }
    })?;
    eprintln!(
        "[{label}] {name}: one change p50 {:.1} ms, p99 {:.1} ms ({} changes)",
        changes.load_p50_ms, changes.load_p99_ms, changes.samples
    );
    Ok(SeriesResult {
        series: name.into(),
        tool,
        full: Some(full),
        full_stopped_after_s: None,
        note: None,
        changes: Some(changes),
    })
}

fn run_shape(shape: &Shape, cli: &Cli) -> anyhow::Result<ShapeResult> {
    let mut sb = Sandbox::new("bench")?;
    sb.set_run_timeout(Duration::from_secs(120));
    let result = (|| -> anyhow::Result<ShapeResult> {
        let mut series = Vec::new();
        for which in &cli.series {
            match which.as_str() {
                "ferry-nft" => {
                    let host = sb.add_host("fnft")?;
                    series.push(ferry_series(&sb, &host, shape, cli)?);
                }
                "kube-iptables" => {
                    let host = sb.add_host("kipt")?;
                    let mut specs: Vec<ServiceSpec> =
                        (0..shape.services).map(|i| ServiceSpec::of(shape, i, 0)).collect();
                    let setup = run_with_input(
                        {
                            let mut c = sb.command(&host, IPTABLES_RESTORE);
                            c.args(kube_iptables::RESTORE_ARGS);
                            c
                        },
                        &kube_iptables::setup(),
                        Duration::from_secs(60),
                    )?;
                    anyhow::ensure!(matches!(setup, Outcome::Done(_)), "iptables setup timed out");
                    let full = kube_iptables::full(&specs, cluster::CLUSTER_CIDR);
                    let i = shape.changed_service();
                    series.push(peer_series(
                        &sb,
                        &host,
                        shape,
                        cli,
                        KUBE_IPTABLES,
                        IPTABLES_RESTORE,
                        kube_iptables::RESTORE_ARGS,
                        full,
                        (IPTABLES_SAVE, &["-t", "nat"], "-j DNAT"),
                        |before, after| {
                            specs[i] = after.clone();
                            kube_iptables::partial(&specs, before, after, cluster::CLUSTER_CIDR)
                        },
                    )?);
                }
                "kube-nft" => {
                    let host = sb.add_host("knft")?;
                    let specs: Vec<ServiceSpec> = (0..shape.services).map(|i| ServiceSpec::of(shape, i, 0)).collect();
                    let full = kube_nft::full(&specs, cluster::CLUSTER_CIDR, cluster::SERVICE_CIDR);
                    drop(specs);
                    series.push(peer_series(
                        &sb,
                        &host,
                        shape,
                        cli,
                        KUBE_NFT,
                        "nft",
                        &["-f", "-"],
                        full,
                        ("nft", &["list", "table", "ip", "kube-proxy"], "dnat to"),
                        |before, after| kube_nft::partial(before, after, cluster::CLUSTER_CIDR, cluster::SERVICE_CIDR),
                    )?);
                }
                other => anyhow::bail!("unknown series {other:?} (ferry-nft, kube-iptables, kube-nft)"),
            }
        }
        Ok(ShapeResult { shape: *shape, series })
    })();
    eprintln!("[{}] removing the namespaces", shape.label());
    let closed = sb.close();
    let result = result?;
    closed?;
    Ok(result)
}

/// The chart series of one measure over the N x 2 shapes: every series name in order of appearance.
fn chart_series(results: &Results, measure: impl Fn(&SeriesResult) -> Option<Point>) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for shape in results.shapes.iter().filter(|s| s.shape.endpoints == 2) {
        for s in &shape.series {
            let Some(mut p) = measure(s) else { continue };
            p.x = shape.shape.services as f64;
            match out.iter_mut().find(|o| o.name == s.series) {
                Some(o) => o.points.push(p),
                None => out.push(Series::new(&s.series, vec![p])),
            }
        }
    }
    out
}

fn full_point(s: &SeriesResult) -> Option<Point> {
    match (&s.full, s.full_stopped_after_s) {
        (Some(f), _) => Some(Point::at(0.0, f.load_ms)),
        (None, Some(t)) => Some(Point::at_least(0.0, t * 1e3)),
        _ => None,
    }
}

fn change_point(s: &SeriesResult) -> Option<Point> {
    s.changes.as_ref().map(|c| Point::at(0.0, c.load_p50_ms))
}

fn fmt_ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn markdown(r: &Results, name: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Control plane: ferry nftables vs kube-proxy iptables / nftables\n");
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} ({} CPUs as `nproc` counts them), {} MiB RAM, Linux {}, {}; ferry {}.  ",
        m.cpu_model, m.cpus, m.memory_mib, m.kernel, m.os, m.ferry_commit
    );
    let _ = writeln!(
        s,
        "Tools: {}; {} (`{IPTABLES_RESTORE}`, the nf_tables backend).  ",
        r.nft_version, r.iptables_version
    );
    let _ = writeln!(
        s,
        "Run: {:.0} s; a full sync still running after {} s is stopped (≥ in the tables).\n",
        r.duration_s, r.timeout_s
    );
    let _ = writeln!(
        s,
        "**load** is the wall time of the `nft -f -` / `iptables-nft-restore --noflush` process, spawn to exit, \
         script on stdin: what the kernel and the tool take to load the rules. ferry's time to plan and render \
         the script is given beside it; kube-proxy's own computation is not part of its figures. \
         One change: one endpoint of one service replaced; p99 over that many samples is the largest but a few.\n"
    );
    for shape in &r.shapes {
        let _ = writeln!(s, "## {} services × {} endpoints\n", shape.shape.services, shape.shape.endpoints);
        let _ = writeln!(
            s,
            "| series | full sync: load | × ferry | script lines | ferry plan + render | 1 change: load p50 | p99 | × ferry (p50) | changes | lines | ferry plan + render p50 |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let ferry = shape.series.iter().find(|x| x.series == FERRY);
        for x in &shape.series {
            let (full, ratio, nlines, pr) = match (&x.full, x.full_stopped_after_s) {
                (Some(f), _) => (
                    fmt_ms(f.load_ms),
                    ferry
                        .and_then(|fe| fe.full.as_ref())
                        .map_or("".into(), |fe| format!("{:.2}", f.load_ms / fe.load_ms)),
                    f.script_lines.to_string(),
                    match (f.plan_ms, f.render_ms) {
                        (Some(p), Some(rd)) => format!("{} + {}", fmt_ms(p), fmt_ms(rd)),
                        _ => String::new(),
                    },
                ),
                (None, Some(t)) => (
                    format!("≥ {t:.0} s (stopped)"),
                    ferry
                        .and_then(|fe| fe.full.as_ref())
                        .map_or("".into(), |fe| format!("≥ {:.0}", t * 1e3 / fe.load_ms)),
                    String::new(),
                    String::new(),
                ),
                _ => (x.note.clone().unwrap_or_default(), String::new(), String::new(), String::new()),
            };
            let (p50, p99, cratio, n, cl, cpr) = match &x.changes {
                Some(c) => (
                    fmt_ms(c.load_p50_ms),
                    fmt_ms(c.load_p99_ms),
                    ferry
                        .and_then(|fe| fe.changes.as_ref())
                        .map_or("".into(), |fe| format!("{:.2}", c.load_p50_ms / fe.load_p50_ms)),
                    c.samples.to_string(),
                    c.script_lines_p50.to_string(),
                    match (c.plan_p50_ms, c.render_p50_ms) {
                        (Some(p), Some(rd)) => format!("{} + {}", fmt_ms(p), fmt_ms(rd)),
                        _ => String::new(),
                    },
                ),
                None => Default::default(),
            };
            let _ = writeln!(
                s,
                "| {} | {full} | {ratio} | {nlines} | {pr} | {p50} | {p99} | {cratio} | {n} | {cl} | {cpr} |",
                x.series
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Charts (N services × 2 endpoints)\n");
    let _ = writeln!(s, "![full sync]({name}-full-sync.svg)\n");
    let _ = writeln!(s, "![one change]({name}-one-change.svg)\n");
    s
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.replot {
        let file = cli.out_dir.join(format!("{}.json", cli.name));
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let results: Results = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        write(&results, &cli)?;
        print!("{}", markdown(&results, &cli.name));
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "control_plane needs root (network namespaces, nftables)");
    let shapes = cli.shapes.iter().map(|s| Shape::parse(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let report = ferry_sandbox::sweep_stale()?;
    if !report.is_empty() {
        eprintln!("control_plane: removed what earlier runs left: {report:?}");
    }
    let machine = Machine::detect();
    eprintln!("control_plane: {}", machine.describe());
    let started = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
    let mut results = Results {
        machine,
        nft_version: tool_version("nft", "--version"),
        iptables_version: tool_version("iptables-nft", "--version"),
        started_unix_s,
        duration_s: 0.0,
        timeout_s: cli.timeout_s,
        shapes: Vec::new(),
    };
    for shape in &shapes {
        results.shapes.push(run_shape(shape, &cli)?);
        results.duration_s = started.elapsed().as_secs_f64();
        write(&results, &cli)?;
    }
    print!("{}", markdown(&results, &cli.name));
    Ok(())
}

/// ferry's eBPF datapath from `control_plane_bpf`'s last results (the
/// in-process full sync: plan + program + map writes; one change: event to
/// map writes, p50), when they are there.
fn bpf_series(file: &std::path::Path) -> Option<(Series, Series)> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    let rows = json.get("in_process")?.as_array()?;
    let point = |r: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> Option<f64>| {
        Some(Point::at(r.get("services")?.as_f64()?, f(r)?))
    };
    let full: Vec<Point> = rows.iter().filter_map(|r| point(r, &|r| r.get("full_sync_ms")?.as_f64())).collect();
    let change: Vec<Point> =
        rows.iter().filter_map(|r| point(r, &|r| Some(r.get("one_change")?.get("p50_us")?.as_f64()? / 1e3))).collect();
    (!full.is_empty()).then(|| (Series::new("ferry bpf", full), Series::new("ferry bpf", change)))
}

/// Writes the JSON, the report and the charts (after every shape, so a long run keeps what it measured).
fn write(results: &Results, cli: &Cli) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cli.out_dir)?;
    let base = cli.out_dir.join(&cli.name);
    std::fs::write(base.with_extension("json"), serde_json::to_string_pretty(results)? + "\n")?;
    std::fs::write(base.with_extension("md"), markdown(results, &cli.name))?;
    let mut full = chart_series(results, full_point);
    let mut change = chart_series(results, change_point);
    let dir = &cli.out_dir;
    if let Some((bpf_full, bpf_change)) = bpf_series(&dir.join("incremental.json")) {
        full.push(bpf_full);
        change.push(bpf_change);
    }
    std::fs::write(
        dir.join(format!("{}-full-sync.svg", cli.name)),
        chart::svg("Full sync from empty: time to load the rules", "load time", &full),
    )?;
    std::fs::write(
        dir.join(format!("{}-one-change.svg", cli.name)),
        chart::svg("One endpoint change: load time, p50", "load time", &change),
    )?;
    Ok(())
}
