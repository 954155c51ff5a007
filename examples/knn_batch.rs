//! Exact kNN on a batch, in process: `cargo run --release --example knn_batch -- [REFS [QUERIES
//! [DIM [REPEATS]]]]` (defaults 15,000 x 100,000 x 384, 5 repeats) fits the default kNN detector
//! (k = 10, cosine, exact) on `REFS` seeded isotropic Gaussian references and scores `QUERIES`
//! more on all threads; prints the median and the range of the repeats' wall times and the
//! queries/s of the median. The archive benchmark's kNN (`scripts/bench_archive.sh`: 14,972
//! references a site, isotropic) without its Parquet and its other detectors, so that a change to
//! the kernels can be timed alone. Not a test: nothing here asserts a timing.

use std::time::Instant;

use actwatch_detect::knn::{KnnFitter, KnnOptions};
use actwatch_testkit::Rng;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .map(|a| a.parse().expect("a whole number"))
        .unwrap_or(default)
}

fn main() {
    let (refs, queries, dim, repeats) = (arg(1, 15_000), arg(2, 100_000), arg(3, 384), arg(4, 5));
    let mut rng = Rng::new(7);
    let mut fitter = KnnFitter::new(dim, KnnOptions::default());
    fitter
        .push_batch(&rng.gaussian_rows(refs, dim, 0.0))
        .expect("references");
    let knn = fitter.finish().expect("fit");
    let rows = rng.gaussian_rows(queries, dim, 0.0);
    std::hint::black_box(knn.score_batch(&rows).expect("score")); // warm-up
    let mut secs: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(knn.score_batch(&rows).expect("score"));
            t.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    println!(
        "{refs} references x {queries} queries x {dim}: median {median:.3} s ({:.0} queries/s), \
         range {:.3}-{:.3} s over {} repeats, {} threads",
        queries as f64 / median,
        secs[0],
        secs[secs.len() - 1],
        secs.len(),
        rayon::current_num_threads()
    );
}
