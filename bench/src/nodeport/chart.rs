//! Latency percentile charts as hand-written SVG: latency (x, µs on a log
//! scale, so that a body of a few µs and a tail of milliseconds both show)
//! against percentile (y, on a scale that opens up the tail: 0, 90, 99,
//! 99.9 % equally spaced, i.e. -log10(1 - p)), one line per path. A line
//! further left is faster; where two lines part tells whether a path is
//! slower everywhere or only in its tail.

use crate::control_plane::chart::{PALETTE, escape};
use std::fmt::Write as _;

/// One path's latency at each percentile.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub name: String,
    /// (percentile in 0..100, µs); the 100th is left out (it has no place on the scale).
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (the floors), so that a colour used twice still tells the lines apart.
    pub dashed: bool,
}

/// The y position of percentile `p` in "nines": 0 % -> 0, 90 % -> 1, 99 % -> 2, 99.9 % -> 3.
fn nines(p: f64) -> f64 {
    -(1.0 - p / 100.0).max(1e-6).log10()
}

/// 1-2-5 ticks from `lo` to `hi` (both on the 1-2-5 grid).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut e = lo.log10().floor() as i32;
    while out.len() < 64 {
        for m in [1.0, 2.0, 5.0] {
            let t = m * 10f64.powi(e);
            if t >= lo * 0.999 && t <= hi * 1.001 {
                out.push(t);
            }
        }
        if 10f64.powi(e) > hi {
            break;
        }
        e += 1;
    }
    out
}

/// The 1-2-5 value at or below `x` (`down`) or at or above it.
fn grid(x: f64, down: bool) -> f64 {
    let e = x.log10().floor() as i32;
    let steps = [1.0, 2.0, 5.0, 10.0].map(|m| m * 10f64.powi(e));
    if down {
        steps.iter().rev().copied().find(|t| *t <= x * 1.0001).unwrap_or(steps[0])
    } else {
        steps.iter().copied().find(|t| *t >= x * 0.9999).unwrap_or(steps[3])
    }
}

/// An SVG document: `title` on top; x = µs (log scale) from the fastest sample to the largest
/// 99.9th percentile, y = percentile to 99.9.
pub fn svg(title: &str, lines: &[Line]) -> String {
    let (w, h) = (760.0, 460.0);
    let (left, right, top, bottom) = (70.0, 250.0, 44.0, 56.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let top_nines = 3.0;
    let shown = || lines.iter().flat_map(|l| l.points.iter()).filter(|(p, us)| *p <= 99.9 + 1e-9 && *us > 0.0);
    let hi = shown().map(|(_, us)| *us).fold(0.0, f64::max);
    let lo = shown().map(|(_, us)| *us).fold(f64::INFINITY, f64::min);
    let (xmin, xmax) = if hi > 0.0 { (grid(lo, true), grid(hi, false)) } else { (1.0, 10.0) };
    let xmax = if xmax > xmin { xmax } else { xmin * 2.0 };
    let sx = |us: f64| left + (us.clamp(xmin, xmax).log10() - xmin.log10()) / (xmax.log10() - xmin.log10()) * pw;
    let sy = |p: f64| top + ph - nines(p).min(top_nines) / top_nines * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{left}" y="24" font-size="15" font-weight="bold">{}</text>"#, escape(title));
    for x in ticks(xmin, xmax) {
        let px = sx(x);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/>"##, top + ph);
        let _ = writeln!(s, r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{x}</text>"#, top + ph + 18.0);
    }
    for (p, label) in [(0.0, "0 %"), (50.0, "50 %"), (90.0, "90 %"), (99.0, "99 %"), (99.9, "99.9 %")] {
        let py = sy(p);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/>"##, left + pw);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#, left - 6.0, py + 4.0);
    }
    let _ = writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">µs (log scale)</text>"#,
        left + pw / 2.0,
        h - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">percentile (tail opened up)</text>"#,
        top + ph / 2.0
    );
    for (i, line) in lines.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = line
            .points
            .iter()
            .filter(|(p, us)| *p < 100.0 && *us > 0.0)
            .map(|(p, us)| format!("{:.1},{:.1}", sx(*us), sy(*p)))
            .collect();
        let dash = if line.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        if path.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
        }
        let ly = top + 16.0 + 22.0 * i as f64;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{colour}" stroke-width="3"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            escape(&line.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_scale_spaces_nines_evenly() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(ticks(5.0, 200.0), [5.0, 10.0, 20.0, 50.0, 100.0, 200.0]);
        assert_eq!((grid(6.3, true), grid(6.3, false)), (5.0, 10.0));
    }

    #[test]
    fn a_chart_has_one_polyline_per_line_and_escapes_names() {
        let l = |n: &str| Line {
            name: n.into(),
            points: vec![(50.0, 10.0), (99.0, 20.0), (100.0, 900.0)],
            dashed: n == "c",
        };
        let doc = svg("t", &[l("a<b"), l("c")]);
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains("a&lt;b"));
        assert!(!doc.contains(">900<"), "the 100th percentile does not set the scale");
        assert_eq!(doc.matches("stroke-dasharray").count(), 2, "c's line and its legend");
    }
}
