//! Scoring cost per token of a concept probe beside the anomaly detectors', on one thread.
//!
//! `cargo run --release --example probe_cost [-- ROWS]` prints, for widths 384 and 4096, the
//! nanoseconds per trace (one token at one site) of each detector's raw score plus its conformal
//! p-value and smoothed `-ln p`, the work `Monitor::score_site` does per detector, for a batch of
//! ROWS traces (default 4096) and for one trace at a time (a live token). Seeded synthetic data
//! (6,000 reference traces, 1,500 calibration traces); medians of repeats after a warm-up. Not a
//! test: nothing here asserts a timing.

use actwatch_detect::gaussian::{GaussianFitter, GaussianOptions};
use actwatch_detect::knn::{KnnFitter, KnnOptions};
use actwatch_detect::probe::{difference_of_means, OwnedExamples};
use actwatch_detect::Calibration;
use actwatch_testkit::{median_seconds, Rng};

/// A detector's raw scores of a row-major batch.
type Scorer<'a> = Box<dyn Fn(&[f32]) -> Vec<f64> + 'a>;

fn median_ns_per_row(rows: usize, repeats: usize, f: impl FnMut()) -> f64 {
    median_seconds(repeats, f) * 1e9 / rows as f64
}

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .map_or(4096, |s| s.parse().expect("ROWS is a number"));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    for d in [384usize, 4096] {
        let mut rng = Rng::new(d as u64);
        let reference = rng.gaussian_rows(6000, d, 0.0);
        let cal = rng.gaussian_rows(1500, d, 0.0);
        let batch = rng.gaussian_rows(rows, d, 0.0);
        let examples = OwnedExamples {
            rows: rng.gaussian_rows(400, d, 0.0),
            dim: d,
            labels: (0..400).map(|i| i % 2 == 0).collect(),
            weights: vec![1.0; 400],
            groups: (0..400).collect(),
        };
        pool.install(|| {
            let mut g = GaussianFitter::new(d, GaussianOptions::default());
            g.push_batch(&reference).expect("fit");
            let gaussian = g.finish().expect("gaussian");
            let mut k = KnnFitter::new(d, KnnOptions::default());
            k.push_batch(&reference).expect("fit");
            let knn = k.finish().expect("knn");
            let probe = difference_of_means(&examples.view()).expect("probe");
            let scorers: [(&str, Scorer); 3] = [
                ("gaussian", Box::new(|r| gaussian.score_batch(r).expect("score"))),
                ("knn_exact_6k", Box::new(|r| knn.score_batch(r).expect("score"))),
                ("probe_diff_means", Box::new(|r| probe.scores(r))),
            ];
            for (name, score) in &scorers {
                let calibration = Calibration::new(score(&cal)).expect("calibration");
                let per_row = |chunk: &[f32]| {
                    for x in score(chunk) {
                        std::hint::black_box((
                            calibration.p_value(x),
                            calibration.smooth_neg_log_p(x, false),
                        ));
                    }
                };
                let batched = median_ns_per_row(rows, 5, || per_row(&batch));
                let single_rows = rows.min(512);
                let single = median_ns_per_row(single_rows, 5, || {
                    for r in batch[..single_rows * d].chunks_exact(d) {
                        per_row(r);
                    }
                });
                println!(
                    "{{\"task\":\"score_per_token\",\"detector\":\"{name}\",\"d\":{d},\"threads\":1,\"batch_rows\":{rows},\"ns_per_token_batched\":{batched:.0},\"ns_per_token_one_at_a_time\":{single:.0}}}"
                );
            }
        });
    }
}
