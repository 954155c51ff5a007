//! Scoring throughput, torch backend vs the default one. Prints vectors/s per detector, the ratio,
//! and the largest relative difference between the two backends' raw scores.
//!
//! - MiniLM (the default): a monitor with the default detectors fitted on train.parquet; queries are
//!   the dev files' layer-2 vectors, tiled to `--rows` (default 100,000).
//! - Synthetic (`--dim D`, for the GPU figures of docs/benchmarks-gpu.md): seeded vectors of width
//!   D from a low-rank model of hidden states (a mean direction, 64 latent factors whose scales
//!   decay by 0.85 each, isotropic noise); a Gaussian (the default rank rule, and full rank) fitted
//!   on `--fit-rows` vectors (default 50,000) and scored on `--rows` (default 65,536); exact kNN
//!   (the default cosine, k = 10) against each count of `--refs` (default 100000,1000000) with
//!   `--knn-queries` queries (default 4,096), drawn from the same model with another seed.
//!   `--cases gaussian,knn` picks the cases (default both).
//!
//! ```text
//! cargo run --release -p actwatch-torch --features tch --example bench_backend -- [--rows N] [--device cpu|cuda]
//! cargo run ... --example bench_backend -- --dim 4096 [--refs 100000,1000000] [--cases knn] --device cuda
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use actwatch_detect::monitor::MonitorOptions;
use actwatch_detect::spec::FittedDetector;
use actwatch_detect::{DetectorSpec, GaussianDetector, GaussianFitter, GaussianOptions};
use actwatch_io::pipeline::{fit_monitor, NoProgress};
use actwatch_io::reader::{ReadOptions, TraceColumns, TraceReader};
use actwatch_testkit::{median_seconds, Rng};
use actwatch_torch::{parse_device, Device, Families, TorchBackend};
use rayon::prelude::*;
use tch::{Kind, Tensor};

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|a| a == name)?;
        Some(self.0.get(i + 1).expect("a value after the flag").clone())
    }

    fn usize(&self, name: &str, default: usize) -> usize {
        self.get(name).map_or(default, |s| s.parse().unwrap())
    }
}

fn main() {
    let args = Args(std::env::args().collect());
    let device = parse_device(&args.get("--device").unwrap_or_else(|| "cpu".into())).unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "CPU: {cpu}; rayon threads {}, torch threads {}; device {device:?}",
        rayon::current_num_threads(),
        tch::get_num_threads()
    );
    match args.get("--dim") {
        Some(d) => synthetic(&args, d.parse().unwrap(), device),
        None => minilm(&args, device),
    }
}

fn header() {
    println!(
        "{:<28} {:>9} {:>16} {:>16} {:>8} {:>9}",
        "case", "vectors", "default (vec/s)", "torch (vec/s)", "ratio", "max rel"
    );
}

/// Times both backends on `queries` (after a warm-up on its first `warm` rows: the first libtorch
/// call, cuBLAS handles, lazy norms): the median of 3 runs each, and the largest relative
/// difference between their raw scores.
fn compare(
    case: &str,
    backend: &TorchBackend,
    site: usize,
    index: usize,
    det: &FittedDetector,
    queries: &[f32],
    warm: usize,
) {
    let d = det.dim();
    let rows = queries.len() / d;
    let warm = &queries[..d * warm.min(rows)];
    det.score_batch(warm).unwrap();
    backend.score(site, index, det, warm).unwrap();
    let time = |f: &dyn Fn() -> Vec<f64>| {
        let mut out = Vec::new();
        let mut t: Vec<f64> = (0..3)
            .map(|_| {
                let s = Instant::now();
                out = f();
                assert_eq!(out.len(), rows);
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        (rows as f64 / t[1], out)
    };
    let (native, a) = time(&|| det.score_batch(queries).unwrap());
    let (torch, b) = time(&|| backend.score(site, index, det, queries).unwrap().unwrap());
    let max_rel = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(1e-12))
        .fold(0.0f64, f64::max);
    println!(
        "{case:<28} {rows:>9} {native:>16.0} {torch:>16.0} {:>7.2}x {max_rel:>9.1e}",
        torch / native
    );
}

fn minilm(args: &Args, device: Device) {
    let rows = args.usize("--rows", 100_000);
    let data = PathBuf::from(args.get("--data").unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/minilm")
            .to_string_lossy()
            .into_owned()
    }));
    let read = ReadOptions {
        columns: TraceColumns::new("id", "layer", "activation"),
        ..ReadOptions::default()
    };
    let (monitor, _) = fit_monitor(
        &[data.join("train.parquet")],
        &read,
        MonitorOptions::default(),
        &NoProgress,
    )
    .unwrap();
    // Layer-2 vectors of the dev files, tiled.
    let mut base = Vec::new();
    for f in [
        "dev_id",
        "dev_ood_code",
        "dev_ood_non_english",
        "dev_ood_base64",
    ] {
        let r = TraceReader::open(&[data.join(format!("{f}.parquet"))], read.clone()).unwrap();
        for b in r {
            for (_, s) in b.unwrap().site_batches().unwrap() {
                if s.site() == "2" {
                    base.extend_from_slice(s.vectors().as_slice());
                }
            }
        }
    }
    let site = monitor.site_index("2").unwrap();
    let d = monitor.sites()[site].dim;
    let queries: Vec<f32> = base.iter().copied().cycle().take(rows * d).collect();
    let backend = TorchBackend::new(&monitor, device, Families::ALL).unwrap();
    println!(
        "MiniLM layer 2 (d = {d}); {} kNN references",
        monitor.sites()[site].fit_traces
    );
    header();
    for (j, det) in monitor.sites()[site].detectors.iter().enumerate() {
        compare(det.name(), &backend, site, j, det, &queries, 1000);
    }
}

/// Latent factors of the synthetic model.
const LATENT: usize = 64;
/// Rows per seeded generation chunk: the data do not depend on the thread count.
const GEN_CHUNK: usize = 1024;

/// A seeded low-rank model of hidden states: `mean + Σ_j s_j z_j f_j + σ ε`, with `f_j` random
/// unit-norm directions, `s_j = 0.85^j`, `z` and `ε` standard normal (`ε` approximately: a sum of
/// four uniforms per coordinate, cheap enough for a billion values), and `σ` such that the noise
/// carries about a third of the energy.
struct Synthetic {
    dim: usize,
    mean: Vec<f32>,
    /// `[LATENT, dim]`, each row scaled by its `s_j`.
    factors: Vec<f32>,
    sigma: f32,
}

impl Synthetic {
    fn new(dim: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let unit = |rng: &mut Rng, scale: f64| {
            let v: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter()
                .map(|x| (x / norm * scale) as f32)
                .collect::<Vec<f32>>()
        };
        let mean = unit(&mut rng, 2.0);
        let factors = (0..LATENT)
            .flat_map(|j| unit(&mut rng, 0.85f64.powi(j as i32)))
            .collect();
        // Signal energy Σ s_j² ≈ 3.6; noise energy dim σ² ≈ 1.8.
        let sigma = (1.8 / dim as f64).sqrt() as f32;
        Self {
            dim,
            mean,
            factors,
            sigma,
        }
    }

    /// Rows `[start, start + n)` of the stream seeded by `seed`.
    fn rows(&self, seed: u64, start: usize, n: usize) -> Vec<f32> {
        assert_eq!(start % GEN_CHUNK, 0);
        let d = self.dim;
        let mut out = vec![0.0f32; n * d];
        out.par_chunks_mut(GEN_CHUNK * d)
            .enumerate()
            .for_each(|(c, chunk)| {
                let chunk_index = (start / GEN_CHUNK + c) as u64;
                let mut rng = Rng::new(seed ^ chunk_index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                // Irwin-Hall(4) in 16-bit steps: mean 2, variance 1/3 (in units of 2^16).
                let scale = self.sigma * 3f32.sqrt() / 65536.0;
                for row in chunk.chunks_exact_mut(d) {
                    for pair in row.iter_mut().zip(&self.mean) {
                        let u = rng.next_u64();
                        let sum =
                            (u & 0xFFFF) + ((u >> 16) & 0xFFFF) + ((u >> 32) & 0xFFFF) + (u >> 48);
                        *pair.0 = pair.1 + (sum as f32 - 131_070.0) * scale;
                    }
                    for f in self.factors.chunks_exact(d) {
                        let z = rng.normal() as f32;
                        for (x, &fj) in row.iter_mut().zip(f) {
                            *x += z * fj;
                        }
                    }
                }
            });
        out
    }
}

/// Waits for the device's queued work (a copy back of one value).
fn wait(t: &Tensor) {
    let _ = t.f_double_value(&[0, 0]);
}

/// Where the torch backend's Gaussian time goes outside the device, each step timed alone: the
/// host's normalising and centring (the detector's own `centred_rows`), the copy of the rows into
/// a libtorch tensor, its copy to the device from pageable memory, and, for comparison, the copy
/// into pinned memory and from there.
fn breakdown(g: &FittedDetector, queries: &[f32], device: Device) {
    let FittedDetector::Gaussian(g) = g else {
        return;
    };
    let d = g.dim();
    let rows = queries.len() / d;
    let shape = [rows as i64, d as i64];
    let rate = |what: &str, secs: f64| {
        format!(
            "{what} {:.0} vec/s ({:.1} GB/s)",
            rows as f64 / secs,
            (queries.len() * 4) as f64 / secs / 1e9
        )
    };
    let host = Tensor::from_slice(queries).reshape(shape);
    let mut steps = vec![
        rate(
            "host centring",
            median_seconds(3, || {
                g.centred_rows(queries).unwrap();
            }),
        ),
        rate(
            "slice to tensor",
            median_seconds(3, || {
                let _ = Tensor::from_slice(queries).reshape(shape);
            }),
        ),
    ];
    if device != Device::Cpu {
        let pinned = host.pin_memory(device);
        steps.push(rate(
            "to device (pageable)",
            median_seconds(3, || wait(&host.to_device(device))),
        ));
        steps.push(rate(
            "pinning",
            median_seconds(3, || {
                let _ = host.pin_memory(device);
            }),
        ));
        steps.push(rate(
            "to device (pinned)",
            median_seconds(3, || wait(&pinned.to_device(device))),
        ));
    }
    println!("  ({})", steps.join("; "));
}

/// The device's own rate at the kNN step, on data already there: one f32 product of a block of
/// queries with `n` references and the top 10 of each row, at the backend's CPU block (64 Mi
/// similarity values) and at its GPU block (256 Mi).
fn knn_device_rate(n: usize, dim: usize, device: Device) {
    if device == Device::Cpu {
        return;
    }
    let opts = (Kind::Float, device);
    let refs = Tensor::randn([n as i64, dim as i64], opts);
    let mut out = Vec::new();
    for block in [(64usize << 20) / n, (256usize << 20) / n] {
        let block = block.clamp(1, 8192) as i64;
        let q = Tensor::randn([block, dim as i64], opts);
        let secs = median_seconds(3, || {
            let (v, _) = q.matmul(&refs.tr()).topk(10, 1, true, false);
            wait(&v);
        });
        out.push(format!(
            "block {block}: {:.0} q/s, {:.1} TFLOP/s",
            block as f64 / secs,
            2.0 * (block as usize * n * dim) as f64 / secs / 1e12
        ));
    }
    println!("  (device-resident product + top-k: {})", out.join("; "));
}

fn synthetic(args: &Args, dim: usize, device: Device) {
    let fit_rows = args.usize("--fit-rows", 50_000);
    let rows = args.usize("--rows", 65_536);
    let knn_queries = args.usize("--knn-queries", 4096);
    let refs: Vec<usize> = args
        .get("--refs")
        .unwrap_or_else(|| "100000,1000000".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    // `--cases gaussian,knn` (the default: both).
    let cases = args.get("--cases").unwrap_or_else(|| "gaussian,knn".into());
    let model = Synthetic::new(dim, 1);
    println!("synthetic, d = {dim}: {LATENT} latent factors + isotropic noise, seeded");

    if cases.contains("gaussian") {
        gaussian_cases(&model, fit_rows, rows, device);
    }
    if cases.contains("knn") {
        knn_cases(&model, &refs, knn_queries, device);
    }
}

fn step(what: &str, t: Instant) {
    println!("  ({what}: {:.1} s)", t.elapsed().as_secs_f64());
}

/// One pass of statistics, two models (the default rank rule, and full rank).
fn gaussian_cases(model: &Synthetic, fit_rows: usize, rows: usize, device: Device) {
    let dim = model.dim;
    let t = Instant::now();
    let mut fitter = GaussianFitter::new(dim, GaussianOptions::default());
    for start in (0..fit_rows).step_by(16 * GEN_CHUNK) {
        let n = (fit_rows - start).min(16 * GEN_CHUNK);
        fitter.push_batch(&model.rows(2, start, n)).unwrap();
    }
    let stats = fitter.stats().unwrap();
    step(&format!("Gaussian statistics of {fit_rows} vectors"), t);
    let mut gaussians = Vec::new();
    for rank in [None, Some(dim)] {
        let t = Instant::now();
        let opts = GaussianOptions {
            rank,
            ..GaussianOptions::default()
        };
        let g = GaussianDetector::fit(&stats, &opts).unwrap();
        g.prepare();
        step(&format!("Gaussian fit, rank {}", g.rank()), t);
        gaussians.push(FittedDetector::Gaussian(g));
    }
    let t = Instant::now();
    let backend = TorchBackend::for_sites([gaussians.as_slice()], device, Families::ALL).unwrap();
    step("Gaussians to the device", t);
    let queries = model.rows(3, 0, rows);
    breakdown(&gaussians[0], &queries, device);
    header();
    for (j, g) in gaussians.iter().enumerate() {
        let FittedDetector::Gaussian(gd) = g else {
            unreachable!()
        };
        let case = format!("gaussian d={dim} rank={}", gd.rank());
        compare(&case, &backend, 0, j, g, &queries, 1024);
    }
}

/// Exact kNN against each count of references.
fn knn_cases(model: &Synthetic, refs: &[usize], knn_queries: usize, device: Device) {
    let dim = model.dim;
    let queries = model.rows(5, 0, knn_queries);
    for &n in refs {
        let t = Instant::now();
        let spec = DetectorSpec::parse(&format!("knn:exact_max={n},max_references={n}")).unwrap();
        let mut fitter = spec.fitter(dim).unwrap();
        for start in (0..n).step_by(16 * GEN_CHUNK) {
            let m = (n - start).min(16 * GEN_CHUNK);
            fitter.push_batch(&model.rows(4, start, m)).unwrap();
        }
        let knn = [fitter.finish().unwrap()];
        step(&format!("kNN fit, {n} references"), t);
        let t = Instant::now();
        let backend = TorchBackend::for_sites([knn.as_slice()], device, Families::ALL).unwrap();
        step("kNN references to the device", t);
        knn_device_rate(n, dim, device);
        header();
        let case = format!("knn d={dim} refs={n}");
        compare(&case, &backend, 0, 0, &knn[0], &queries, 256);
    }
}
