//! Log-log line charts as hand-written SVG: time (y) against services (x),
//! one line per proxy. Callers pass any list of series (the bench passes
//! ferry nftables and kube-proxy's two layouts; a ferry bpf series is added
//! the same way).
//!
//! ```no_run
//! use ferry_bench::control_plane::chart::{Point, Series, svg};
//! let s = Series::new("ferry bpf", vec![Point::at(1000.0, 18.0), Point::at(10_000.0, 225.0)]);
//! std::fs::write("full-sync.svg", svg("Full sync", "time", &[s])).unwrap();
//! ```

use std::fmt::Write as _;

/// One measurement: `x` services, `y` milliseconds. `lower_bound`: the run
/// did not finish; `y` is where it was stopped (drawn hollow, labelled ≥).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lower_bound: bool,
}

impl Point {
    pub fn at(x: f64, y: f64) -> Point {
        Point { x, y, lower_bound: false }
    }

    pub fn at_least(x: f64, y: f64) -> Point {
        Point { x, y, lower_bound: true }
    }
}

/// A named line of points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

impl Series {
    pub fn new(name: &str, points: Vec<Point>) -> Series {
        Series { name: name.to_string(), points }
    }
}

/// Colours by series position (colour-blind safe, Okabe-Ito).
pub const PALETTE: [&str; 6] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"];

fn decades(lo: f64, hi: f64) -> (i32, i32) {
    let a = lo.max(1e-9).log10().floor() as i32;
    let b = hi.max(1e-9).log10().ceil() as i32;
    (a, if b <= a { a + 1 } else { b })
}

fn count_label(e: i32) -> String {
    match e {
        ..=2 => format!("{}", 10f64.powi(e)),
        3..=5 => format!("{}k", 10f64.powi(e - 3)),
        _ => format!("{}M", 10f64.powi(e - 6)),
    }
}

fn ms_label(e: i32) -> String {
    match e {
        ..=-4 => format!("{} ns", 10f64.powi(e + 6)),
        -3..=-1 => format!("{} µs", 10f64.powi(e + 3)),
        0..=2 => format!("{} ms", 10f64.powi(e)),
        _ => format!("{} s", 10f64.powi(e - 3)),
    }
}

/// Text made safe inside SVG elements.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// An SVG document: `title` on top, x = services (log), y = milliseconds (log).
pub fn svg(title: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 460.0);
    let (left, right, top, bottom) = (80.0, 200.0, 44.0, 56.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let fold = |f: fn(f64, f64) -> f64, init: f64, g: fn(&Point) -> f64| pts().map(g).fold(init, f);
    let (xmin, xmax) = (fold(f64::min, f64::INFINITY, |p| p.x), fold(f64::max, 0.0, |p| p.x));
    let (ymin, ymax) = (fold(f64::min, f64::INFINITY, |p| p.y), fold(f64::max, 0.0, |p| p.y));
    let (xa, xb) = if xmax > 0.0 { decades(xmin, xmax) } else { (3, 5) };
    let (ya, yb) = if ymax > 0.0 { decades(ymin, ymax) } else { (0, 3) };
    let sx = |x: f64| left + (x.log10() - f64::from(xa)) / f64::from(xb - xa) * pw;
    let sy = |y: f64| top + ph - (y.log10() - f64::from(ya)) / f64::from(yb - ya) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="24" font-size="15" font-weight="bold">{}</text>"#, left, escape(title));
    for e in xa..=xb {
        let x = sx(10f64.powi(e));
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##, top + ph);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            top + ph + 18.0,
            count_label(e)
        );
    }
    for e in ya..=yb {
        let y = sy(10f64.powi(e));
        let _ = writeln!(s, r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##, left + pw);
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, y + 4.0, ms_label(e));
    }
    let _ = writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">services (log scale)</text>"#,
        left + pw / 2.0,
        h - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{} (log scale)</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    for (i, line) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut points: Vec<&Point> = line.points.iter().filter(|p| p.x > 0.0 && p.y > 0.0).collect();
        points.sort_by(|a, b| a.x.total_cmp(&b.x));
        let path: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.y))).collect();
        if path.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            );
        }
        for p in &points {
            let (x, y) = (sx(p.x), sy(p.y));
            if p.lower_bound {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="white" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}" fill="{colour}">≥ (stopped)</text>"#,
                    x + 7.0,
                    // Series stopped at the same time would print over each other.
                    y - 6.0 - 14.0 * i as f64
                );
            } else {
                let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{colour}"/>"#);
            }
        }
        let ly = top + 16.0 + 22.0 * i as f64;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            escape(&line.name)
        );
    }
    s.push_str("</svg>\n");
    s
}
