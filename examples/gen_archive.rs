//! Writes a synthetic long-format archive for the batch-scoring benchmark:
//! `cargo run --release --example gen_archive -- OUT.parquet ROWS DIM SITES [SEED [FIRST_ID]]`.
//! Rows cycle through `SITES` sites ("0", "1", ...), so a computation has SITES traces; computation
//! ids are `c<FIRST_ID + row / SITES>` (FIRST_ID: 0 by default; give each file of a multi-file
//! archive its own range); vectors are a seeded Gaussian (SplitMix64 + Box-Muller). Written in
//! batches, in row groups of at most 65,536 rows (as a capture writes them, so that readers which
//! load a row group at a time, and engines that split files by row group, stay bounded and
//! parallel): memory stays flat.

use std::sync::Arc;

use arrow::array::{FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: gen_archive OUT.parquet ROWS DIM SITES [SEED [FIRST_ID]]");
        std::process::exit(2);
    }
    let rows: usize = args[2].parse().expect("ROWS");
    let dim: usize = args[3].parse().expect("DIM");
    let sites: usize = args[4].parse().expect("SITES");
    let mut rng = SplitMix(args.get(5).map_or(7, |s| s.parse().expect("SEED")));
    let first_id: usize = args.get(6).map_or(0, |s| s.parse().expect("FIRST_ID"));
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let schema = Arc::new(Schema::new(vec![
        Field::new("trace_id", DataType::Utf8, false),
        Field::new("site", DataType::Utf8, false),
        Field::new(
            "activation",
            DataType::FixedSizeList(item.clone(), dim as i32),
            false,
        ),
    ]));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level")))
        .set_max_row_group_row_count(Some(65_536))
        .build();
    let file = std::fs::File::create(&args[1]).expect("create output");
    let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props)).expect("writer");
    let batch = 16_384;
    let mut start = 0;
    while start < rows {
        let n = batch.min(rows - start);
        let ids = StringArray::from_iter_values(
            (start..start + n).map(|r| format!("c{}", first_id + r / sites)),
        );
        let site =
            StringArray::from_iter_values((start..start + n).map(|r| format!("{}", r % sites)));
        let values: Vec<f32> = (0..n * dim).map(|_| rng.normal()).collect();
        let vectors = FixedSizeListArray::try_new(
            item.clone(),
            dim as i32,
            Arc::new(Float32Array::from(values)),
            None,
        )
        .expect("vectors");
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(ids), Arc::new(site), Arc::new(vectors)],
        )
        .expect("batch");
        w.write(&b).expect("write");
        start += n;
    }
    w.close().expect("close");
}
