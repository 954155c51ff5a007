//! Helpers shared by the end-to-end test files (each includes this module with `mod common;`).

// Each test file is its own crate and uses only some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::{Float64Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A file of the shared MiniLM data set.
pub fn data(name: &str) -> PathBuf {
    actwatch_testkit::minilm::file(name)
}

/// Runs the real `actwatch` binary.
pub fn actwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_actwatch"))
        .args(args)
        .output()
        .expect("run actwatch")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = actwatch(args);
    assert!(
        out.status.success(),
        "actwatch {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `actwatch fit` on train.parquet (sentence id in `id`, layer in `layer`) into `out`; its report.
pub fn fit_train(out: &Path) -> String {
    ok(&[
        "fit",
        "--input",
        data("train.parquet").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--trace-column",
        "id",
        "--site-column",
        "layer",
    ])
}

/// Runs a command that must fail; returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = actwatch(args);
    assert!(
        !out.status.success(),
        "actwatch {args:?} should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A whole Parquet file as one batch.
pub fn read_all(path: &Path) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// A Float64 column's values.
pub fn f64_col(b: &RecordBatch, name: &str) -> Vec<f64> {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .values()
        .to_vec()
}

/// `actwatch score --monitor M --input I --output O [extra...]`, then the output as one batch.
pub fn score_with(monitor: &Path, input: &Path, out: &Path, extra: &[&str]) -> RecordBatch {
    let mut args = vec![
        "score",
        "--monitor",
        monitor.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    read_all(out)
}
