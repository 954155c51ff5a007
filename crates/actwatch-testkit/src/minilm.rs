//! The shared MiniLM activations (`../shared/data/minilm` from the repository root; CI has them
//! there too): real all-MiniLM-L6-v2 hidden states, layers 2, 4 and 6, mean-pooled, one row per
//! (sentence, layer), on trusted English prose and on out-of-distribution text.

use std::path::PathBuf;

use actwatch_io::reader::{ReadOptions, TraceColumns};

/// The computation-id column (one sentence).
pub const TRACE_COLUMN: &str = "id";
/// The site column (the layer, an integer).
pub const SITE_COLUMN: &str = "layer";
/// The vector column (384 float32).
pub const VECTOR_COLUMN: &str = "activation";
/// The vector width.
pub const WIDTH: usize = 384;
/// The reference (trusted) file.
pub const TRAIN: &str = "train.parquet";
/// Held-out trusted prose.
pub const DEV_ID: &str = "dev_id.parquet";
/// Out-of-distribution text, one category per file.
pub const DEV_OOD: [&str; 3] = [
    "dev_ood_code.parquet",
    "dev_ood_non_english.parquet",
    "dev_ood_base64.parquet",
];

/// The directory holding the files.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/minilm")
}

/// One file of the set, e.g. `minilm::file(minilm::TRAIN)`.
pub fn file(name: &str) -> PathBuf {
    dir().join(name)
}

/// The columns of the files.
pub fn columns() -> TraceColumns {
    TraceColumns::new(TRACE_COLUMN, SITE_COLUMN, VECTOR_COLUMN)
}

/// Reader options for the files (default batch size, every site).
pub fn read_options() -> ReadOptions {
    ReadOptions {
        columns: columns(),
        ..ReadOptions::default()
    }
}
