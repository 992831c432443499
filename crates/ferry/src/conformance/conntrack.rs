//! `ferry conformance --conntrack-cases`: the kernel conntrack reconciler
//! against `acceptance/conntrack-cleanup-cases.json`, each case in a network
//! namespace of its own.
//!
//! ```text
//! case ── plan(node addresses) + deletedServices' ports ──► StaleFlowIndex
//!   └── entries ──► netns ferry-ct-<pid>-<seq>-case:  `conntrack -I` per entry
//!                   (the scale case: batched ctnetlink creates, --scale entries per group)
//!                   ──► Conntrack::reconcile(index, [IPv4, IPv6]) ──► list again
//!                   ──► every entry kept or deleted as expected?  deleted count as expected?
//! ```
//!
//! Counting is per check: one per entry (its expect, `delete` or `keep`,
//! against whether it is still in the table) and one per case for the number
//! of entries the reconciler reported deleted. The scale case is run with
//! `--scale` entries per generator group (default 100,000, so 100,002 entries
//! and the table stays under the default `nf_conntrack_max`); `--scale 0`
//! leaves it out, reported as "not run", never as passed. The full million
//! runs in the `reconcile` benchmark (bench/README.md).
//!
//! Entries get distinct clients (`203.0.113.0/24`, `2001:db8::/64`, one port
//! each) so that no two share an original or a reply tuple.

use anyhow::Context;
use ferry_conntrack::{Conntrack, Entry};
use ferry_model::stale::cases::{ConntrackCase, ConntrackCaseFile, EntrySpec, Expect, NodeAddresses};
use ferry_model::{IpFamily, Protocol};
use ferry_sandbox::{Host, Sandbox};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// Default entries per generator group of the scale case.
pub const DEFAULT_SCALE: u64 = 100_000;
/// Created entries outlive any run; the namespace's deletion removes them.
const ENTRY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Client ports per client address.
const PORTS_PER_CLIENT: usize = 60_000;
/// Failing entries printed per case; the count covers the rest.
const MAX_FAILURE_LINES: usize = 50;

/// How to run a case file.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only cases whose name contains this.
    pub only: Option<String>,
    /// Entries per generator group of the scale case (0: do not run it).
    pub scale: u64,
    /// Print passing checks too.
    pub verbose: bool,
}

/// Checks of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    /// Cases not run (the scale case with `--scale 0`, or a table too small for it).
    pub not_run: usize,
}

impl Tally {
    pub fn summary(&self) -> String {
        if self.not_run > 0 {
            format!("{} passed, {} failed, {} not run", self.passed, self.failed, self.not_run)
        } else {
            format!("{} passed, {} failed", self.passed, self.failed)
        }
    }
}

/// The client of the `i`th entry of a case: one address:port per entry.
pub fn client(family: IpFamily, i: usize) -> SocketAddr {
    let (host, port) = (i / PORTS_PER_CLIENT, 1024 + (i % PORTS_PER_CLIENT) as u16);
    let ip = match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 113, 1)) + host as u32)),
        IpFamily::V6 => {
            IpAddr::V6(Ipv6Addr::from(u128::from("2001:db8::1".parse::<Ipv6Addr>().expect("literal")) + host as u128))
        }
    };
    SocketAddr::new(ip, port)
}

/// The kernel entry for a case entry: client `i` to `origDst`, answered by `replySrc`.
pub fn entry_for(spec: &EntrySpec, i: usize) -> Entry {
    Entry::new(
        spec.protocol.number(),
        client(IpFamily::of(&spec.orig_dst), i),
        SocketAddr::new(spec.orig_dst, spec.orig_dst_port),
        SocketAddr::new(spec.reply_src, spec.reply_src_port),
    )
}

/// Runs a case file; prints a line per failing check (every check with
/// `verbose`), progress on stderr, and the summary last.
pub fn run_file(path: &Path, opts: &Options) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = ConntrackCaseFile::parse(&text)
        .with_context(|| format!("{} is not a conntrack case file (see acceptance/README.md)", path.display()))?;
    let cases: Vec<&ConntrackCase> =
        file.cases.iter().filter(|c| opts.only.as_deref().is_none_or(|o| c.name.contains(o))).collect();
    let mut tally = Tally::default();
    for (n, case) in cases.iter().enumerate() {
        eprintln!("[{}/{}] {}", n + 1, cases.len(), case.name);
        if let Err(e) = run_case(case, opts, &mut tally) {
            println!("FAIL    {}: case cannot be run: {e:#}", case.name);
            tally.failed += 1;
        }
    }
    println!("{}", tally.summary());
    Ok(if tally.failed == 0 && tally.not_run == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What the kernel table looked like for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Kept,
    Deleted,
}

fn run_case(case: &ConntrackCase, opts: &Options, tally: &mut Tally) -> anyhow::Result<()> {
    let nodes = NodeAddresses::default();
    // The Plan of `services`, and the ports of `deletedServices` as PlanDiff::removed gives them.
    let index = case.index(nodes)?;
    let generated = case.generator.is_some();
    let specs = if generated {
        if opts.scale == 0 {
            println!("not run {}: scale case left out (--scale 0); see the reconcile benchmark", case.name);
            tally.not_run += 1;
            return Ok(());
        }
        let (specs, capped) = case.generate(nodes, Some(opts.scale))?;
        let max = nf_conntrack_max();
        if max.is_some_and(|m| (specs.len() as u64) > m) {
            println!(
                "not run {}: {} entries exceed net.netfilter.nf_conntrack_max ({}); lower --scale or raise it",
                case.name,
                specs.len(),
                max.unwrap_or_default()
            );
            tally.not_run += 1;
            return Ok(());
        }
        eprintln!(
            "    scale case: {} of {} entries{}",
            specs.len(),
            case.generated_count(),
            if capped { " (--scale; the full size runs in the reconcile benchmark)" } else { "" }
        );
        specs
    } else {
        case.entry_specs(nodes)?
    };
    let entries: Vec<Entry> = specs.iter().enumerate().map(|(i, s)| entry_for(s, i)).collect();

    let mut sb = Sandbox::new("ct")?;
    let result = (|| {
        let host = sb.add_host("case")?;
        let mut ct = Conntrack::open_in_netns(&sb.netns_path(&host))?;
        let t0 = Instant::now();
        let mut problems: Vec<Option<String>> = vec![None; entries.len()];
        if generated {
            let created = ct.create(&entries, ENTRY_TIMEOUT)?;
            anyhow::ensure!(
                created.created == entries.len(),
                "created {} of {} entries: {:?}",
                created.created,
                entries.len(),
                created.first_failure
            );
        } else {
            for (i, e) in entries.iter().enumerate() {
                problems[i] = insert_with_conntrack_tool(&sb, &host, e, specs[i].protocol).err();
            }
        }
        let before = keys(&mut ct)?;
        for (i, e) in entries.iter().enumerate() {
            if problems[i].is_none() && !before.contains(&e.key()) {
                problems[i] = Some("created but not listed by the kernel".into());
            }
        }
        let setup = t0.elapsed();
        let report = ct.reconcile(&index, &[IpFamily::V4, IpFamily::V6]);
        let after = keys(&mut ct)?;
        eprintln!(
            "    setup {:.0} ms, reconcile {:.0} ms: listed {}, deleted {}",
            setup.as_secs_f64() * 1e3,
            report.duration().as_secs_f64() * 1e3,
            report.families.iter().map(|f| f.listed).sum::<usize>(),
            report.deleted()
        );
        let seen = |e: &Entry| if after.contains(&e.key()) { Seen::Kept } else { Seen::Deleted };
        Ok::<_, anyhow::Error>((problems, entries.iter().map(seen).collect::<Vec<_>>(), report))
    })();
    let closed = sb.close();
    let (problems, seen, report) = result?;
    closed.context("removing the case's network namespace")?;

    let mut lines = 0;
    let mut print = |line: String| {
        if lines < MAX_FAILURE_LINES {
            println!("{line}");
        }
        lines += 1;
    };
    for e in report.errors() {
        print(format!("FAIL    {}: reconciler error: {e}", case.name));
    }
    for ((spec, problem), seen) in specs.iter().zip(&problems).zip(&seen) {
        let label = format!("{} / {}", case.name, spec.describe());
        let got = match seen {
            Seen::Kept => Expect::Keep,
            Seen::Deleted => Expect::Delete,
        };
        if let Some(p) = problem {
            tally.failed += 1;
            print(format!("FAIL    {label}: expected {}, entry could not be set up: {p}", spec.expect));
        } else if got != spec.expect {
            tally.failed += 1;
            let reason = if spec.reason.is_empty() { String::new() } else { format!(" ({})", spec.reason) };
            print(format!("FAIL    {label}: expected {}, got {}{reason}", spec.expect, verb(got)));
        } else {
            tally.passed += 1;
            if opts.verbose {
                println!("ok      {label}: {}", verb(got));
            }
        }
    }
    if lines > MAX_FAILURE_LINES {
        println!("        ... {} more failures in {}", lines - MAX_FAILURE_LINES, case.name);
    }
    let expected_deleted = case
        .expected_deleted_count
        .unwrap_or_else(|| specs.iter().filter(|s| s.expect == Expect::Delete).count() as u64);
    let deleted = report.deleted() as u64;
    if deleted == expected_deleted && report.errors().next().is_none() {
        tally.passed += 1;
        if opts.verbose {
            println!("ok      {}: {deleted} deleted", case.name);
        }
    } else {
        tally.failed += 1;
        println!("FAIL    {}: expected {expected_deleted} deleted, the reconciler reported {deleted}", case.name);
    }
    Ok(())
}

fn verb(e: Expect) -> &'static str {
    match e {
        Expect::Keep => "kept",
        Expect::Delete => "deleted",
    }
}

/// Original tuple and zone of every entry, both families.
fn keys(ct: &mut Conntrack) -> anyhow::Result<HashSet<(u8, ferry_conntrack::Tuple, Option<u16>)>> {
    let mut out = HashSet::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        out.extend(ct.dump(family)?.iter().map(Entry::key));
    }
    Ok(out)
}

/// Creates `e` with `conntrack -I`, as an operator (or kube-proxy's own tests) would.
fn insert_with_conntrack_tool(sb: &Sandbox, host: &Host, e: &Entry, protocol: Protocol) -> Result<(), String> {
    let mut cmd = Command::new("conntrack");
    cmd.args(["-I", "-p", &protocol.as_k8s().to_ascii_lowercase()]);
    cmd.args(["-s", &e.orig.src.ip().to_string(), "-d", &e.orig.dst.ip().to_string()]);
    cmd.args(["--sport", &e.orig.src.port().to_string(), "--dport", &e.orig.dst.port().to_string()]);
    cmd.args(["--reply-src", &e.reply.src.ip().to_string(), "--reply-port-src", &e.reply.src.port().to_string()]);
    cmd.args(["--reply-dst", &e.reply.dst.ip().to_string(), "--reply-port-dst", &e.reply.dst.port().to_string()]);
    cmd.args(["-t", &ENTRY_TIMEOUT.as_secs().to_string(), "-u", "SEEN_REPLY"]);
    match protocol {
        Protocol::Udp => {}
        Protocol::Tcp => {
            cmd.args(["--state", "ESTABLISHED"]);
        }
        // An established association needs its verification tags.
        Protocol::Sctp => {
            cmd.args(["--state", "ESTABLISHED", "--orig-vtag", "1", "--reply-vtag", "2"]);
        }
    }
    let out = sb
        .run_in(host, None, &mut cmd)
        .map_err(|e| format!("running conntrack -I: {e} (is conntrack-tools installed?)"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let hint = if protocol == Protocol::Sctp
        && !Path::new("/proc/sys/net/netfilter/nf_conntrack_sctp_timeout_established").exists()
    {
        " (this kernel has no SCTP conntrack: CONFIG_NF_CT_PROTO_SCTP)"
    } else {
        ""
    };
    Err(format!("conntrack -I failed: {stderr}{hint}"))
}

/// The table size limit (global: read-only inside a namespace).
fn nf_conntrack_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").ok()?.trim().parse().ok()
}
