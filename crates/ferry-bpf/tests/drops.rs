//! Every drop of the C datapath is counted: a check over the source in
//! `bpf/` (no kernel needed).
//!
//! - A tc program drops only through `drop_packet(reason)` (bpf/lib/stats.h),
//!   which bumps the counter of `reason`: `TC_ACT_SHOT` appears nowhere
//!   else, and neither do `XDP_DROP` or `SK_DROP`.
//! - Every `drop_packet` names a `STAT_DROP_*` reason, or `why` that
//!   `ct_create` set to one.
//! - A socket hook refuses (`SYS_REJECT`) only in the `XLATE_REJECT` arm, and every
//!   `return XLATE_REJECT` follows a `stat_inc`.
//! - Every counter of `enum ferry_stat` is bumped somewhere (by the agent
//!   for the few listed in `AGENT_COUNTERS`), and the Rust names
//!   (`ferry_bpf::stats::NAMES`) are the enum's, in order.

use std::path::{Path, PathBuf};

fn sources() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bpf");
    let mut out = Vec::new();
    for dir in [root.clone(), root.join("lib")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "c" || x == "h") {
                let text = std::fs::read_to_string(&p).unwrap();
                out.push((p, text));
            }
        }
    }
    assert!(out.len() >= 10, "found only {} C files under {}", out.len(), root.display());
    out
}

/// Lines of code with comments removed (block and line comments), numbered from 1.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    for (i, line) in text.lines().enumerate() {
        let mut code = String::new();
        let mut rest = line;
        loop {
            if in_block {
                match rest.find("*/") {
                    Some(end) => {
                        in_block = false;
                        rest = &rest[end + 2..];
                    }
                    None => break,
                }
            } else {
                let block = rest.find("/*");
                let line_c = rest.find("//");
                match (block, line_c) {
                    (Some(b), Some(l)) if l < b => {
                        code.push_str(&rest[..l]);
                        break;
                    }
                    (Some(b), _) => {
                        code.push_str(&rest[..b]);
                        in_block = true;
                        rest = &rest[b + 2..];
                    }
                    (None, Some(l)) => {
                        code.push_str(&rest[..l]);
                        break;
                    }
                    (None, None) => {
                        code.push_str(rest);
                        break;
                    }
                }
            }
        }
        out.push((i + 1, code));
    }
    out
}

#[test]
fn every_drop_goes_through_drop_packet() {
    let mut bad = Vec::new();
    for (path, text) in sources() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let lines = code_lines(&text);
        for (n, code) in &lines {
            for verdict in ["TC_ACT_SHOT", "XDP_DROP", "SK_DROP"] {
                if code.contains(verdict) {
                    // The one allowed place: the body of drop_packet in stats.h.
                    let in_drop_packet = name == "stats.h"
                        && verdict == "TC_ACT_SHOT"
                        && lines.iter().rev().filter(|(m, _)| m < n).take(4).any(|(_, l)| l.contains("drop_packet("));
                    if !in_drop_packet {
                        bad.push(format!("{name}:{n}: {verdict} outside drop_packet: {}", code.trim()));
                    }
                }
            }
            if let Some(at) = code.find("drop_packet(")
                && !code.contains("static __always_inline")
            {
                let arg = code[at + "drop_packet(".len()..].split(')').next().unwrap().trim();
                if !(arg.starts_with("STAT_DROP_") || arg == "why") {
                    bad.push(format!("{name}:{n}: drop_packet({arg}) is not a STAT_DROP_* reason"));
                }
            }
            if code.contains("return XLATE_REJECT") {
                let prev = lines.iter().rev().find(|(m, l)| m < n && !l.trim().is_empty());
                if !prev.is_some_and(|(_, l)| l.contains("stat_inc(")) {
                    bad.push(format!("{name}:{n}: XLATE_REJECT without a stat_inc on the line before"));
                }
            }
            if code.contains("SYS_REJECT") && !code.contains("#define") {
                let mut arm = lines.iter().rev().filter(|(m, l)| m < n && !l.trim().is_empty()).take(3);
                if !arm.any(|(_, l)| l.contains("case XLATE_REJECT:")) {
                    bad.push(format!("{name}:{n}: SYS_REJECT outside the XLATE_REJECT arm"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "drops without a counter:\n{}", bad.join("\n"));
}

/// `ct_create`'s failure reasons are drop reasons too.
#[test]
fn ct_create_reasons_are_drop_counters() {
    let ct = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bpf/lib/ct.h")).unwrap();
    let reasons: Vec<&str> =
        ct.lines().filter_map(|l| l.trim().strip_prefix("*why = ")).map(|r| r.trim_end_matches(';')).collect();
    assert!(reasons.len() >= 3, "ct_create sets {reasons:?}");
    for r in reasons {
        assert!(r.starts_with("STAT_DROP_"), "ct_create reason {r}");
    }
}

fn stat_enum() -> Vec<String> {
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bpf/lib/stats.h")).unwrap();
    let start = header.find("enum ferry_stat {").expect("enum ferry_stat in stats.h");
    let body = &header[start..header[start..].find("};").unwrap() + start];
    code_lines(body)
        .into_iter()
        .map(|(_, l)| l.trim().to_string())
        .filter(|l| l.starts_with("STAT_") && !l.starts_with("STAT_COUNT_"))
        .map(|l| l.split([',', ' ', '=']).next().unwrap().to_string())
        .collect()
}

/// Counters the agent keeps in `ferry_stats` itself (the datapath never
/// writes their slots), each with the Rust source that must bump it.
const AGENT_COUNTERS: &[(&str, &str)] =
    &[("STAT_CT_NEW_AGENT_DELETE", "src/maps.rs"), ("STAT_CT_STRANDED", "src/maps.rs")];

#[test]
fn every_counter_is_bumped_somewhere() {
    let all: String = sources().into_iter().map(|(_, t)| t).collect::<Vec<_>>().join("\n");
    for (stat, file) in AGENT_COUNTERS {
        let rust = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        let name = stat.trim_start_matches("STAT_").to_lowercase();
        assert!(rust.contains(&format!("add_counter(\"{name}\"")), "{stat}: the agent never adds to it in {file}");
        assert!(!all.contains(&format!("({stat})")), "{stat} is the agent's: the datapath must not write it");
    }
    for stat in stat_enum() {
        if AGENT_COUNTERS.iter().any(|(s, _)| *s == stat) {
            continue;
        }
        // xdp_pass (xdp.h) counts why XDP passed a packet to tc.
        let bumped = [
            format!("stat_inc({stat})"),
            format!("drop_packet({stat})"),
            format!("*why = {stat};"),
            format!("xdp_pass({stat})"),
        ]
        .iter()
        .any(|p| all.contains(p.as_str()));
        assert!(bumped, "{stat} is never incremented");
    }
}

#[test]
fn rust_names_are_the_c_enum() {
    let from_c: Vec<String> = stat_enum().iter().map(|s| s.trim_start_matches("STAT_").to_lowercase()).collect();
    assert_eq!(from_c, ferry_bpf::stats::NAMES);
    let slots = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bpf/lib/stats.h"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("#define STAT_SLOTS ").map(|v| v.trim().parse::<usize>().unwrap()))
        .unwrap();
    assert!(ferry_bpf::stats::NAMES.len() <= slots, "more counters than ferry_stats slots");
}
