//! Scoring throughput, torch backend vs the default one, on the MiniLM activations: a monitor with
//! the default detectors fitted on train.parquet; queries are the dev files' vectors, tiled to
//! `--rows` per site (default 100,000). Prints vectors/s per detector and device, and the ratio.
//!
//!     cargo run --release -p actwatch-torch --features tch --example bench_backend -- [--rows N] [--device cpu|cuda]

use std::path::{Path, PathBuf};
use std::time::Instant;

use actwatch_detect::monitor::MonitorOptions;
use actwatch_io::pipeline::{fit_monitor, NoProgress};
use actwatch_io::reader::{ReadOptions, TraceColumns, TraceReader};
use actwatch_torch::{parse_device, TorchBackend};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let rows: usize = arg("--rows").map_or(100_000, |s| s.parse().unwrap());
    let device = parse_device(&arg("--device").unwrap_or_else(|| "cpu".into())).unwrap();
    let data = PathBuf::from(arg("--data").unwrap_or_else(|| {
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
    let backend = TorchBackend::new(&monitor, device).unwrap();
    println!(
        "{rows} queries x {d} at site 2; {} kNN references; rayon threads {}, torch threads {}",
        monitor.sites()[site].fit_traces,
        rayon::current_num_threads(),
        tch::get_num_threads()
    );
    println!(
        "{:<10} {:>16} {:>16} {:>8}",
        "detector", "default (vec/s)", "torch (vec/s)", "ratio"
    );
    for (j, det) in monitor.sites()[site].detectors.iter().enumerate() {
        // Warm-up (first libtorch call, lazy norms), then the median of 3 runs.
        let warm = &queries[..d * 1000];
        det.score_batch(warm).unwrap();
        backend.score(site, j, det, warm).unwrap();
        let time = |f: &dyn Fn() -> Vec<f64>| {
            let mut t: Vec<f64> = (0..3)
                .map(|_| {
                    let s = Instant::now();
                    let out = f();
                    assert_eq!(out.len(), rows);
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            rows as f64 / t[1]
        };
        let native = time(&|| det.score_batch(&queries).unwrap());
        let torch = time(&|| backend.score(site, j, det, &queries).unwrap().unwrap());
        println!(
            "{:<10} {:>16.0} {:>16.0} {:>7.2}x",
            det.name(),
            native,
            torch,
            torch / native
        );
    }
}
