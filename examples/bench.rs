//! Benchmark of actwatch's detectors on the exact bytes `scripts/bench_peers.py` times the peers on.
//!
//! `cargo run --release --example bench -- target/bench-data [--knn-only]` prints one JSON object per
//! line, with the same task names as the peer script, so `scripts/bench_table.py` can join them.
//! Wall clock, median of repeats after a warm-up. Not a test: nothing here asserts a timing.
//! `--knn-only` runs the exact kNN and HNSW cases alone.

use std::path::Path;
use std::time::Instant;

use actwatch_detect::gaussian::{GaussianDetector, GaussianFitter, GaussianOptions};
use actwatch_detect::knn::{KnnFitter, KnnOptions};
use actwatch_testkit::median_seconds;

fn load(dir: &Path, name: &str) -> (Vec<f32>, usize, usize) {
    let shape: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("{name}.shape"))).expect("shape sidecar"),
    )
    .expect("shape json");
    let rows = shape["rows"].as_u64().expect("rows") as usize;
    let cols = shape["cols"].as_u64().expect("cols") as usize;
    let bytes = std::fs::read(dir.join(format!("{name}.f32"))).expect("matrix file");
    assert_eq!(
        bytes.len(),
        rows * cols * 4,
        "{name}: size does not match its shape"
    );
    let v = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v, rows, cols)
}

/// Wall seconds of one run of `f`, no warm-up (for fits that take many seconds).
fn once_seconds(f: impl FnOnce()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64()
}

fn fit_gaussian(rows: &[f32], d: usize, opts: &GaussianOptions) -> GaussianDetector {
    let mut f = GaussianFitter::new(d, opts.clone());
    f.push_batch(rows).expect("fit batch");
    f.finish().expect("fit")
}

fn emit(task: &str, tool: &str, n: usize, d: usize, threads: usize, seconds: f64, extra: &str) {
    println!(
        "{{\"task\":\"{task}\",\"tool\":\"{tool}\",\"n\":{n},\"d\":{d},\"threads\":{threads},\"seconds\":{seconds:.6},\"per_s\":{:.1}{extra}}}",
        n as f64 / seconds
    );
}

fn emit_seconds(
    task: &str,
    tool: &str,
    n: usize,
    d: usize,
    threads: usize,
    seconds: f64,
    extra: &str,
) {
    println!(
        "{{\"task\":\"{task}\",\"tool\":\"{tool}\",\"n\":{n},\"d\":{d},\"threads\":{threads},\"seconds\":{seconds:.6}{extra}}}"
    );
}

fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

/// Exact kNN (cosine, k = 10, exact at any size) fitted on `refs`, scoring `queries` on all
/// cores and on one: the median of `repeats` timed runs each.
fn exact_knn_case(
    task: &str,
    refs: &[f32],
    queries: &[f32],
    d: usize,
    cores: usize,
    repeats: usize,
    extra: &str,
) {
    let opts = KnnOptions {
        exact_max: usize::MAX,
        ..KnnOptions::default()
    };
    let mut f = KnnFitter::new(d, opts);
    f.push_batch(refs).expect("refs");
    let knn = f.finish().expect("knn");
    for threads in [cores, 1] {
        let secs = with_threads(threads, || {
            median_seconds(repeats, || {
                std::hint::black_box(knn.score_batch(queries).expect("knn"));
            })
        });
        emit(task, "actwatch", queries.len() / d, d, threads, secs, extra);
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/bench-data".into());
    let dir = Path::new(&dir);
    let knn_only = std::env::args().skip(2).any(|a| a == "--knn-only");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (fit, n_fit, d) = load(dir, "fit");
    let (query, n_query, _) = load(dir, "query");

    let (big_ref, n_ref, _) = load(dir, "big_ref");
    // `--knn-only` (after the data directory): the kNN and HNSW cases alone.
    if !knn_only {
        gaussian_cases(
            dir,
            (&fit, n_fit),
            (&query, n_query),
            (&big_ref, n_ref),
            d,
            cores,
        );
    }

    // Exact kNN against the 6,000 real references, then the first 10,000 and all of the
    // synthetic ones.
    let q = &query[..20_000.min(n_query) * d];
    exact_knn_case("knn_exact_6k", &fit, q, d, cores, 3, "");
    let (big_query, n_bq, _) = load(dir, "big_query");
    let small = 10_000.min(n_ref);
    exact_knn_case(
        "knn_exact_10k",
        &big_ref[..small * d],
        &big_query,
        d,
        cores,
        9,
        &format!(",\"refs\":{small}"),
    );
    exact_knn_case(
        "knn_exact_big",
        &big_ref,
        &big_query,
        d,
        cores,
        2,
        &format!(",\"refs\":{n_ref}"),
    );
    // HNSW: built on one thread and on all (the same graph: the build is deterministic), then
    // a recall/speed curve over ef, recall against exact search.
    let hnsw_opts = KnnOptions {
        exact_max: 0,
        ..KnnOptions::default()
    };
    let mut built = Vec::new();
    // One build beyond 200k references (on one thread a 1M build takes 15 minutes or more), as
    // the peer script does; the query curve still runs on 1 and all threads.
    let build_threads = if n_ref > 200_000 {
        vec![cores]
    } else {
        vec![1, cores]
    };
    for threads in build_threads {
        let started = Instant::now();
        let hnsw = with_threads(threads, || {
            let mut f = KnnFitter::new(d, hnsw_opts.clone());
            f.push_batch(&big_ref).expect("refs");
            f.finish().expect("hnsw")
        });
        let seconds = started.elapsed().as_secs_f64();
        let same = built
            .first()
            .map(|first: &actwatch_detect::KnnDetector| first.index() == hnsw.index());
        emit_seconds(
            "hnsw_build",
            "actwatch-hnsw",
            n_ref,
            d,
            threads,
            seconds,
            &format!(
                ",\"inserts_per_s\":{:.1},\"M\":{},\"ef_construction\":{}{}",
                n_ref as f64 / seconds,
                hnsw_opts.hnsw_m,
                hnsw_opts.hnsw_ef_construction,
                same.map_or(String::new(), |s| format!(
                    ",\"same_graph_as_1_thread\":{s}"
                ))
            ),
        );
        built.push(hnsw);
    }
    let mut hnsw = built.pop().expect("built");
    drop(built);
    // The peer script's ef curve: on to 512 beyond 200k references.
    let efs: &[usize] = if n_ref > 200_000 {
        &[16, 32, 48, 64, 96, 128, 256, 384, 512]
    } else {
        &[16, 32, 48, 64, 96, 128, 256]
    };
    for &ef in efs {
        hnsw.set_ef_search(ef).expect("ef");
        let recall = hnsw
            .measure_recall(&big_query, 10)
            .expect("recall")
            .expect("an HNSW index");
        for threads in [cores, 1] {
            let secs = with_threads(threads, || {
                median_seconds(3, || {
                    std::hint::black_box(hnsw.score_batch(&big_query).expect("hnsw"));
                })
            });
            emit(
                "hnsw_query",
                "actwatch-hnsw",
                n_bq,
                d,
                threads,
                secs,
                &format!(",\"refs\":{n_ref},\"ef\":{ef},\"recall_at_10\":{recall:.4}"),
            );
        }
    }
}

/// The Gaussian cases: fit and scoring at d = 384 (`fit`, `query`), the fit at n = 100k
/// (`big_ref`), and fit and scoring at d = 1024 / 4096 (the peer script's wide matrices).
fn gaussian_cases(
    dir: &Path,
    (fit, n_fit): (&[f32], usize),
    (query, n_query): (&[f32], usize),
    (big_ref, n_ref): (&[f32], usize),
    d: usize,
    cores: usize,
) {
    // Gaussian: fit (statistics + Ledoit-Wolf + eigendecomposition) and scoring.
    let opts = GaussianOptions {
        normalize: false,
        ..GaussianOptions::default()
    };
    let mut det = None;
    let secs = median_seconds(3, || {
        let mut f = GaussianFitter::new(d, opts.clone());
        f.push_batch(fit).expect("fit batch");
        det = Some(f.finish().expect("fit"));
    });
    emit_seconds("gaussian_fit", "actwatch", n_fit, d, cores, secs, "");
    let det = det.expect("fitted");
    let secs = median_seconds(5, || {
        std::hint::black_box(det.score_batch(query).expect("score"));
    });
    emit("gaussian_score", "actwatch", n_query, d, cores, secs, "");
    let secs = with_threads(1, || {
        median_seconds(3, || {
            std::hint::black_box(det.score_batch(query).expect("score"));
        })
    });
    emit("gaussian_score", "actwatch", n_query, d, 1, secs, "");

    // Gaussian fit at n = 100k (big_ref), then fit and scoring at d = 1024 / 4096 (the peer
    // script's wide matrices) in calls of 1 (the first 256 rows), 64 and 4096 rows; full whitening
    // and, at 4096, rank 256 + residual (the default there).
    let secs = median_seconds(3, || {
        std::hint::black_box(fit_gaussian(big_ref, d, &opts));
    });
    emit_seconds("gaussian_fit_100k", "actwatch", n_ref, d, cores, secs, "");
    for wd in [1024usize, 4096] {
        if !dir.join(format!("wide_fit_{wd}.f32")).exists() {
            continue; // --quick writes d = 1024 only
        }
        let (wfit, n_wfit, _) = load(dir, &format!("wide_fit_{wd}"));
        let (wq, _, _) = load(dir, &format!("wide_query_{wd}"));
        let big = wd >= 4096;
        let mut models = vec![("", wd)];
        if big {
            models.push(("lr", 256));
        }
        for (tag, rank) in models {
            let wopts = GaussianOptions {
                normalize: false,
                rank: Some(rank),
                ..GaussianOptions::default()
            };
            let mut wdet = None;
            let fit_once = || fit_gaussian(&wfit, wd, &wopts);
            let secs = if big {
                once_seconds(|| wdet = Some(fit_once()))
            } else {
                median_seconds(3, || wdet = Some(fit_once()))
            };
            let extra = format!(",\"rank\":{rank}");
            emit_seconds(
                &format!("gaussian_fit_d{wd}{tag}"),
                "actwatch",
                n_wfit,
                wd,
                cores,
                secs,
                &extra,
            );
            let wdet = wdet.expect("fitted");
            for b in [1usize, 64, 4096] {
                let rows = if b == 1 { &wq[..256 * wd] } else { &wq[..] };
                for threads in [cores, 1] {
                    let secs = with_threads(threads, || {
                        median_seconds(3, || {
                            for call in rows.chunks(b * wd) {
                                std::hint::black_box(wdet.score_batch(call).expect("score"));
                            }
                        })
                    });
                    emit(
                        &format!("gaussian_score_d{wd}{tag}_b{b}"),
                        "actwatch",
                        rows.len() / wd,
                        wd,
                        threads,
                        secs,
                        &format!(",\"batch\":{b},\"rank\":{rank}"),
                    );
                }
            }
        }
    }
}
