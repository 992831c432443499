//! Latency percentile charts as hand-written SVG: latency (x, linear µs,
//! from the tick below the fastest sample) against percentile (y, on a scale
//! that opens up the tail: 0, 90, 99, 99.9 % equally spaced, i.e.
//! -log10(1 - p)), one line per path. A line
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
}

/// The y position of percentile `p` in "nines": 0 % -> 0, 90 % -> 1, 99 % -> 2, 99.9 % -> 3.
fn nines(p: f64) -> f64 {
    -(1.0 - p / 100.0).max(1e-6).log10()
}

/// A round step for about `n` ticks over 0..max.
fn step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

/// An SVG document: `title` on top; x = µs up to the largest 99.9th percentile, y = percentile to 99.9.
pub fn svg(title: &str, lines: &[Line]) -> String {
    let (w, h) = (760.0, 460.0);
    let (left, right, top, bottom) = (70.0, 250.0, 44.0, 56.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let top_nines = 3.0;
    let xmax_raw = lines
        .iter()
        .flat_map(|l| l.points.iter())
        .filter(|(p, _)| *p <= 99.9 + 1e-9)
        .map(|(_, us)| *us)
        .fold(0.0, f64::max);
    let xmin_raw = lines.iter().flat_map(|l| l.points.iter()).map(|(_, us)| *us).fold(f64::INFINITY, f64::min);
    let dx = step((xmax_raw - xmin_raw.min(xmax_raw)).max(1.0), 8.0);
    let xmax = (xmax_raw / dx).ceil().max(1.0) * dx;
    // From the last tick below the fastest sample: the paths differ by µs, not by tens of them.
    let xmin = if xmin_raw.is_finite() { ((xmin_raw / dx).floor() * dx).min(xmax - dx).max(0.0) } else { 0.0 };
    let sx = |us: f64| left + (us.clamp(xmin, xmax) - xmin) / (xmax - xmin) * pw;
    let sy = |p: f64| top + ph - nines(p).min(top_nines) / top_nines * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{left}" y="24" font-size="15" font-weight="bold">{}</text>"#, escape(title));
    let mut x = xmin;
    while x <= xmax + 1e-9 {
        let px = sx(x);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/>"##, top + ph);
        let _ = writeln!(s, r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{x}</text>"#, top + ph + 18.0);
        x += dx;
    }
    for (p, label) in [(0.0, "0 %"), (50.0, "50 %"), (90.0, "90 %"), (99.0, "99 %"), (99.9, "99.9 %")] {
        let py = sy(p);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/>"##, left + pw);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#, left - 6.0, py + 4.0);
    }
    let _ = writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">µs</text>"#, left + pw / 2.0, h - 14.0);
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
        if path.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_scale_spaces_nines_evenly() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(step(37.0, 8.0), 5.0);
    }

    #[test]
    fn a_chart_has_one_polyline_per_line_and_escapes_names() {
        let l = |n: &str| Line { name: n.into(), points: vec![(50.0, 10.0), (99.0, 20.0), (100.0, 900.0)] };
        let doc = svg("t", &[l("a<b"), l("c")]);
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains("a&lt;b"));
        assert!(!doc.contains(">900<"), "the 100th percentile does not set the scale");
    }
}
