//! HNSW recall and speed of the kNN detector, through its own code path (`KnnFitter::finish`, then
//! `measure_recall` and `score_batch`), against exact search. Prints figures; asserts nothing.
//!
//! ```text
//! CARGO_TARGET_DIR=... cargo run --release -p actwatch-detect --example hnsw_recall -- \
//!     [--data mixture|gaussian|<refs.f32>] [--queries <queries.f32>] [--n 20000] [--nq 1000] \
//!     [--dim 384] [--m 16] [--ef-construction 200] [--efs 16,32,64,128] [--metric cosine|l2] \
//!     [--seed 7]
//! ```
//!
//! `mixture` (the default) is the seeded analogue of `scripts/bench_peers.py`'s `big_ref`: 64
//! anisotropic Gaussian components of rank 24 plus isotropic noise 0.15, Dirichlet(2) weights,
//! L2-normalised; queries are fresh draws from the same mixture. `gaussian` is i.i.d. N(0, 1)
//! (the hardest case for any graph index). A file is raw little-endian f32, `dim` wide; its rows
//! (up to `--n`) are the references and `--queries` (required then) the queries.
//!
//! q/s figures are for the rayon pool as configured (set
//! `RAYON_NUM_THREADS=1` for per-thread figures).

use std::time::Instant;

use actwatch_detect::knn::{KnnFitter, KnnOptions, Metric};
use actwatch_testkit::Rng;

struct Args {
    data: String,
    queries: Option<String>,
    n: usize,
    nq: usize,
    dim: usize,
    m: usize,
    ef_construction: usize,
    efs: Vec<usize>,
    metric: Metric,
    seed: u64,
}

fn parse_args() -> Args {
    let defaults = KnnOptions::default();
    let mut a = Args {
        data: "mixture".into(),
        queries: None,
        n: 20_000,
        nq: 1000,
        dim: 384,
        m: defaults.hnsw_m,
        ef_construction: defaults.hnsw_ef_construction,
        efs: vec![16, 32, 64, 128],
        metric: defaults.metric,
        seed: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let num = || value.parse::<usize>().expect("a number");
        match flag.as_str() {
            "--data" => a.data = value.clone(),
            "--queries" => a.queries = Some(value.clone()),
            "--n" => a.n = num(),
            "--nq" => a.nq = num(),
            "--dim" => a.dim = num(),
            "--m" => a.m = num(),
            "--ef-construction" => a.ef_construction = num(),
            "--seed" => a.seed = num() as u64,
            "--efs" => a.efs = value.split(',').map(|s| s.parse().expect("ef")).collect(),
            "--metric" => {
                a.metric = match value.as_str() {
                    "cosine" => Metric::Cosine,
                    "l2" => Metric::L2,
                    other => panic!("unknown metric {other}"),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn read_f32(path: &str, dim: usize, max_rows: usize) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(bytes.len() % (4 * dim), 0, "{path}: not rows of {dim} f32");
    let rows = (bytes.len() / (4 * dim)).min(max_rows);
    bytes[..rows * dim * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The mixture of `scripts/bench_peers.py` (`mixture_params`, `gaussian_mixture`), seeded.
struct Mixture {
    centres: Vec<f32>,
    /// Per component, `dim x rank` row-major.
    bases: Vec<f32>,
    /// Cumulative component weights.
    cumulative: Vec<f64>,
    dim: usize,
    rank: usize,
}

impl Mixture {
    const COMPONENTS: usize = 64;
    const RANK: usize = 24;
    const ISO: f64 = 0.15;

    fn new(rng: &mut Rng, dim: usize) -> Self {
        let (k, r) = (Self::COMPONENTS, Self::RANK);
        let centres = rng.gaussian_rows(k, dim, 0.0);
        let scale = 1.2 / (r as f64).sqrt();
        let bases = (0..k * dim * r)
            .map(|_| (rng.normal() * scale) as f32)
            .collect();
        // Dirichlet(2): normalised Gamma(2) draws, each the sum of two exponentials.
        let w: Vec<f64> = (0..k)
            .map(|_| rng.exponential() + rng.exponential())
            .collect();
        let total: f64 = w.iter().sum();
        let cumulative = w
            .iter()
            .scan(0.0, |acc, x| {
                *acc += x / total;
                Some(*acc)
            })
            .collect();
        Self {
            centres,
            bases,
            cumulative,
            dim,
            rank: r,
        }
    }

    fn draw(&self, rng: &mut Rng, n: usize) -> Vec<f32> {
        let (d, r) = (self.dim, self.rank);
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            let u = rng.uniform();
            let c = self
                .cumulative
                .iter()
                .position(|&w| u < w)
                .unwrap_or(Self::COMPONENTS - 1);
            let z: Vec<f64> = (0..r).map(|_| rng.normal()).collect();
            let basis = &self.bases[c * d * r..(c + 1) * d * r];
            let start = out.len();
            for j in 0..d {
                let low_rank: f64 = basis[j * r..(j + 1) * r]
                    .iter()
                    .zip(&z)
                    .map(|(&b, &z)| f64::from(b) * z)
                    .sum();
                let x = f64::from(self.centres[c * d + j]) + low_rank + Self::ISO * rng.normal();
                out.push(x as f32);
            }
            let row = &mut out[start..];
            let norm = row
                .iter()
                .map(|&x| f64::from(x).powi(2))
                .sum::<f64>()
                .sqrt();
            row.iter_mut()
                .for_each(|x| *x = (f64::from(*x) / norm) as f32);
        }
        out
    }
}

fn data(a: &Args) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(a.seed);
    match a.data.as_str() {
        "mixture" => {
            let m = Mixture::new(&mut rng, a.dim);
            let refs = m.draw(&mut rng, a.n);
            let queries = m.draw(&mut rng, a.nq);
            (refs, queries)
        }
        "gaussian" => (
            rng.gaussian_rows(a.n, a.dim, 0.0),
            rng.gaussian_rows(a.nq, a.dim, 0.0),
        ),
        spec if spec.starts_with("clusters:") => {
            // clusters:C:S — C centres N(0, I), points = centre + S * N(0, I)
            let mut parts = spec.split(':').skip(1);
            let c: usize = parts
                .next()
                .and_then(|x| x.parse().ok())
                .expect("clusters:C:S");
            let s: f64 = parts
                .next()
                .and_then(|x| x.parse().ok())
                .expect("clusters:C:S");
            let centres = rng.gaussian_rows(c, a.dim, 0.0);
            let mut draw = |rows: usize| -> Vec<f32> {
                (0..rows)
                    .flat_map(|_| {
                        let k = (rng.next_u64() % c as u64) as usize;
                        (0..a.dim)
                            .map(|j| centres[k * a.dim + j] + (s * rng.normal()) as f32)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let refs = draw(a.n);
            (refs, draw(a.nq))
        }
        path => {
            let q = a.queries.as_deref().expect("--queries with a data file");
            (read_f32(path, a.dim, a.n), read_f32(q, a.dim, a.nq))
        }
    }
}

/// Queries per second of `f` over `nq` queries: best of three runs after a warm-up.
fn per_second(nq: usize, mut f: impl FnMut()) -> f64 {
    f();
    let best = (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    nq as f64 / best
}

fn main() {
    let a = parse_args();
    let (refs, queries) = data(&a);
    let (n, nq) = (refs.len() / a.dim, queries.len() / a.dim);
    let options = KnnOptions {
        exact_max: 0,
        hnsw_m: a.m,
        hnsw_ef_construction: a.ef_construction,
        metric: a.metric,
        ..KnnOptions::default()
    };
    println!(
        "data {} n {n} nq {nq} dim {} metric {:?} M {} ef_construction {} threads {}",
        a.data,
        a.dim,
        a.metric,
        a.m,
        a.ef_construction,
        rayon::current_num_threads()
    );

    let exact = {
        let mut f = KnnFitter::new(
            a.dim,
            KnnOptions {
                exact_max: usize::MAX,
                ..options.clone()
            },
        );
        f.push_batch(&refs).expect("references");
        f.finish().expect("exact detector")
    };
    let exact_qps = per_second(nq, || {
        std::hint::black_box(exact.score_batch(&queries).expect("exact"));
    });
    println!("exact: {exact_qps:.0} q/s");

    let t = Instant::now();
    let mut f = KnnFitter::new(a.dim, options.clone());
    f.push_batch(&refs).expect("references");
    let mut det = f.finish().expect("hnsw detector");
    println!("hnsw build: {:.2} s", t.elapsed().as_secs_f64());
    for &ef in &a.efs {
        det.set_ef_search(ef).expect("ef");
        let recall = det
            .measure_recall(&queries, 10)
            .expect("recall")
            .expect("an index");
        let qps = per_second(nq, || {
            std::hint::black_box(det.score_batch(&queries).expect("hnsw"));
        });
        println!("ef {ef:>4}: recall@10 {recall:.4}  {qps:>8.0} q/s");
    }
}
