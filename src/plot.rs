//! A self-contained SVG of an evaluation: score histograms (normal vs each anomalous set) and ROC
//! curves. Hand-written SVG keeps the dependency tree lean; the figure is for eyes, not for print.

use std::fmt::Write;

const W: f64 = 420.0;
const H: f64 = 300.0;
const PAD: f64 = 40.0;
const BINS: usize = 40;
const COLOURS: [&str; 6] = [
    "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
];

/// Scores are plotted as log10(1 + score): fused statistics span orders of magnitude.
fn tx(s: f64) -> f64 {
    (1.0 + s.max(0.0)).log10()
}

fn histogram(v: &[f64], lo: f64, hi: f64) -> Vec<f64> {
    let mut h = vec![0.0; BINS];
    for &s in v {
        let b = (((tx(s) - lo) / (hi - lo)) * BINS as f64).floor();
        h[(b.max(0.0) as usize).min(BINS - 1)] += 1.0;
    }
    let n = v.len().max(1) as f64;
    h.iter_mut().for_each(|x| *x /= n);
    h
}

fn roc(normal: &[f64], anomalous: &[f64]) -> Vec<(f64, f64)> {
    let mut all: Vec<(f64, bool)> = normal
        .iter()
        .map(|&s| (s, false))
        .chain(anomalous.iter().map(|&s| (s, true)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (n0, n1) = (normal.len().max(1) as f64, anomalous.len().max(1) as f64);
    let (mut fp, mut tp) = (0.0, 0.0);
    let mut pts = vec![(0.0, 0.0)];
    for (_, pos) in all {
        if pos {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        pts.push((fp / n0, tp / n1));
    }
    pts
}

/// The SVG document.
pub fn svg(normal: &[f64], anomalous: &[(&str, &[f64])], threshold: Option<f64>) -> String {
    let all = normal
        .iter()
        .chain(anomalous.iter().flat_map(|(_, v)| v.iter()));
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &s| {
        (lo.min(tx(s)), hi.max(tx(s)))
    });
    let (lo, hi) = if lo < hi { (lo, hi) } else { (0.0, 1.0) };
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        2.0 * W,
        H + 20.0
    );
    let series: Vec<(&str, &str, Vec<f64>)> =
        std::iter::once(("normal", "#1f77b4", histogram(normal, lo, hi)))
            .chain(
                anomalous
                    .iter()
                    .enumerate()
                    .map(|(i, (n, v))| (*n, COLOURS[i % COLOURS.len()], histogram(v, lo, hi))),
            )
            .collect();
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter())
        .fold(0.0f64, |a, &b| a.max(b))
        .max(1e-9);
    let px = |x: f64| PAD + (x - lo) / (hi - lo) * (W - 2.0 * PAD);
    let py = |y: f64| H - PAD - y / ymax * (H - 2.0 * PAD);
    let _ = write!(
        out,
        r#"<text x="{PAD}" y="20">score histograms (x: log10(1 + score))</text>"#
    );
    let _ = write!(
        out,
        r#"<line x1="{PAD}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/>"#,
        H - PAD,
        W - PAD
    );
    for (name, colour, h) in &series {
        let mut d = String::new();
        for (b, y) in h.iter().enumerate() {
            let x0 = lo + (hi - lo) * b as f64 / BINS as f64;
            let x1 = lo + (hi - lo) * (b + 1) as f64 / BINS as f64;
            let _ = write!(
                d,
                "L{:.1},{:.1} L{:.1},{:.1} ",
                px(x0),
                py(*y),
                px(x1),
                py(*y)
            );
        }
        let _ = write!(
            out,
            r#"<path d="M{:.1},{:.1} {d}" fill="none" stroke="{colour}" stroke-width="1.5"><title>{name}</title></path>"#,
            px(lo),
            py(0.0)
        );
    }
    if let Some(t) = threshold {
        let x = px(tx(t).clamp(lo, hi));
        let _ = write!(
            out,
            r#"<line x1="{x:.1}" y1="{PAD}" x2="{x:.1}" y2="{}" stroke="gray" stroke-dasharray="4"/><text x="{x:.1}" y="{}" fill="gray">flag threshold</text>"#,
            H - PAD,
            PAD - 4.0
        );
    }
    for (i, (name, colour, _)) in series.iter().enumerate() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" fill="{colour}">{}</text>"#,
            W - PAD - 120.0,
            PAD + 14.0 * i as f64,
            escape(name)
        );
    }
    // ROC panel.
    let rx = |x: f64| W + PAD + x * (W - 2.0 * PAD);
    let ry = |y: f64| H - PAD - y * (H - 2.0 * PAD);
    let _ = write!(
        out,
        r#"<text x="{}" y="20">ROC (anomalous vs normal)</text>"#,
        W + PAD
    );
    let _ = write!(
        out,
        r#"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="black"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="lightgray"/>"#,
        rx(0.0),
        ry(1.0),
        rx(1.0) - rx(0.0),
        ry(0.0) - ry(1.0),
        rx(0.0),
        ry(0.0),
        rx(1.0),
        ry(1.0)
    );
    for (i, (name, v)) in anomalous.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts = roc(normal, v);
        let step = (pts.len() / 400).max(1);
        let d: String = pts
            .iter()
            .step_by(step)
            .chain(pts.last())
            .enumerate()
            .map(|(k, (x, y))| {
                format!(
                    "{}{:.1},{:.1} ",
                    if k == 0 { "M" } else { "L" },
                    rx(*x),
                    ry(*y)
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.5"><title>{}</title></path>"#,
            escape(name)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}">false-positive rate</text><text x="{}" y="{}">true-positive rate</text></svg>"#,
        rx(0.4),
        H - PAD + 16.0,
        W + 4.0,
        PAD - 6.0
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
