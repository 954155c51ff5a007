//! What the commands print: the fit report and the evaluation table.

use std::path::Path;

use actwatch_detect::metrics;
use actwatch_detect::Monitor;
use actwatch_io::artifact::Manifest;

pub fn print_fit_report(monitor: &Monitor, manifest: &Manifest, seconds: f64, out: &Path) {
    let s = monitor.summary();
    println!("monitor written to {}", out.display());
    println!(
        "reference: {} rows, {} computations ({} calibration), sha256 {}",
        manifest.reference.rows,
        manifest.reference.computations,
        s.calibration_computations,
        &manifest.reference.sha256[..16]
    );
    println!(
        "{:<12} {:>6} {:>10} {:>12}  detectors",
        "site", "width", "fit", "calibration"
    );
    for site in monitor.sites() {
        let dets: Vec<String> = site.detectors.iter().map(describe_detector).collect();
        println!(
            "{:<12} {:>6} {:>10} {:>12}  {}",
            site.name,
            site.dim,
            site.fit_traces,
            site.calibration_traces,
            dets.join(", ")
        );
    }
    for r in &s.knn_recall {
        println!(
            "knn recall@{} at site {} (HNSW vs exact, {} calibration queries): {:.4}",
            r.k, r.site, r.queries, r.recall
        );
    }
    if s.knn_recall.is_empty() {
        println!("knn: exact search at every site (recall 1)");
    }
    println!(
        "fusion {}, target FPR {}, calibration FPR {:.4} (each calibration computation judged against the others)",
        monitor.options().fusion.name(),
        monitor.options().fpr,
        s.calibration_fpr
    );
    println!(
        "timings: fit {:.2}s, calibration {:.2}s, total {:.2}s",
        s.fit_seconds, s.calibration_seconds, seconds
    );
}

fn describe_detector(d: &actwatch_detect::spec::FittedDetector) -> String {
    use actwatch_detect::spec::FittedDetector;
    match d {
        FittedDetector::Gaussian(g) => format!(
            "gaussian(shrinkage {:.3}, rank {}{})",
            g.shrinkage(),
            g.rank(),
            if g.options().normalize { ", l2" } else { "" }
        ),
        FittedDetector::Knn(k) => format!(
            "knn(k {}, {:?}, {} refs, {})",
            k.options().k,
            k.options().metric,
            k.len(),
            if k.is_exact() { "exact" } else { "hnsw" }
        ),
    }
}

/// One row of the evaluation table: the computation-level scores and flags of one category.
pub struct EvalRow {
    pub name: String,
    pub scores: Vec<f64>,
    pub flags: Vec<bool>,
}

/// The achieved false-positive rate on `normal`, then per anomalous category its AUROC, FPR at
/// 95% TPR and recall at the monitor's target rate.
pub fn print_eval_table(monitor: &Monitor, normal_row: &EvalRow, rows: &[EvalRow]) {
    let fpr = metrics::rate(&normal_row.flags).unwrap_or(0.0);
    println!(
        "normal: {} computations, achieved FPR {:.4} at target {} ({} flagged)",
        normal_row.scores.len(),
        fpr,
        monitor.options().fpr,
        normal_row.flags.iter().filter(|&&f| f).count()
    );
    println!(
        "{:<24} {:>7} {:>8} {:>11} {:>16}",
        "anomalous", "n", "AUROC", "FPR@95TPR", "recall@target"
    );
    for r in rows {
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!(
            "{:<24} {:>7} {:>8} {:>11} {:>16}",
            r.name,
            r.scores.len(),
            fmt(metrics::auroc(&normal_row.scores, &r.scores)),
            fmt(metrics::fpr_at_tpr(&normal_row.scores, &r.scores, 0.95)),
            fmt(metrics::rate(&r.flags)),
        );
    }
}
