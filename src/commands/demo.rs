//! `actwatch demo`: a first run on real transformer activations shipped in `data/demo/`.

use std::path::PathBuf;
use std::time::Instant;

use actwatch_detect::monitor::MonitorOptions;
use actwatch_io::artifact::save_monitor;
use actwatch_io::pipeline;
use actwatch_io::reader::{ReadOptions, TraceColumns};
use anyhow::{Context, Result};

use crate::progress::Bars;
use crate::report::print_fit_report;

const DEMO_FILES: [(&str, &[u8]); 5] = [
    (
        "reference.parquet",
        include_bytes!("../../data/demo/reference.parquet"),
    ),
    (
        "normal.parquet",
        include_bytes!("../../data/demo/normal.parquet"),
    ),
    (
        "ood_code.parquet",
        include_bytes!("../../data/demo/ood_code.parquet"),
    ),
    (
        "ood_non_english.parquet",
        include_bytes!("../../data/demo/ood_non_english.parquet"),
    ),
    (
        "ood_base64.parquet",
        include_bytes!("../../data/demo/ood_base64.parquet"),
    ),
];

pub fn run() -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    for (name, bytes) in DEMO_FILES {
        std::fs::write(dir.path().join(name), bytes)?;
    }
    println!(
        "actwatch demo: real activations of all-MiniLM-L6-v2 (layers 2, 4, 6) on trusted English prose,\n\
         and on out-of-distribution text (source code, other languages, base64). Files in {}\n",
        dir.path().display()
    );
    let columns = TraceColumns {
        trace: "id".into(),
        site: "layer".into(),
        vector: "activation".into(),
    };
    let read = ReadOptions {
        columns,
        ..ReadOptions::default()
    };
    let monitor_dir = dir.path().join("monitor");
    println!("$ actwatch fit --input reference.parquet --out monitor --trace-column id --site-column layer");
    let started = Instant::now();
    let (monitor, reference) = pipeline::fit_monitor(
        &[dir.path().join("reference.parquet")],
        &read,
        MonitorOptions::default(),
        &Bars::new(),
    )?;
    let manifest = save_monitor(&monitor, &reference, &monitor_dir)?;
    print_fit_report(
        &monitor,
        &manifest,
        started.elapsed().as_secs_f64(),
        &monitor_dir,
    );
    println!(
        "\n$ actwatch eval --monitor monitor --normal normal.parquet --anomalous ood_*.parquet"
    );
    let (monitor, _) = super::load(&monitor_dir)?;
    let anomalous: Vec<PathBuf> = ["ood_code", "ood_non_english", "ood_base64"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.parquet")))
        .collect();
    super::eval::run_eval(
        &monitor,
        &read,
        &[dir.path().join("normal.parquet")],
        &anomalous,
        None,
        None,
    )?;
    println!(
        "\nNext: `actwatch fit --help`, `actwatch score --help`, and the README's walk-through."
    );
    Ok(())
}
