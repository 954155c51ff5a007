//! The trace reader (Parquet and Arrow IPC files): files read to the end by [`TraceReader`], and record batches
//! handed over in memory to [`TraceReader::decode_batch`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_core::{Dtype, Provenance, SiteBatch, Vectors};
use actwatch_io::reader::{file_rows, ReadOptions, TraceBatch, TraceColumns, TraceReader};
use actwatch_io::writer::{AtomicParquetWriter, TraceWriter};
use arrow::array::{
    ArrayRef, BooleanArray, DictionaryArray, FixedSizeListArray, Float16Array, Float32Array,
    Float64Array, Int32Array, Int64Array, LargeListArray, ListArray, StringArray, StringViewArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Int32Type, Int8Type, Schema};
use arrow::record_batch::RecordBatch;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::Rng;

/// The sites a reader's site filter keeps ([`read_options`] bit 3): one of the synthetic files'
/// and one of the MiniLM-like ones'.
pub const SITE_FILTER: [&str; 2] = ["a", "2"];

/// The label column of the labelled seed.
pub const LABEL_COLUMN: &str = "label";

/// The reader options a selector byte picks: bits 0-1 the batch size (8192, 1, 3, 5), bit 2
/// keeps the other columns, bit 3 filters sites ([`SITE_FILTER`]), bit 4 reads the MiniLM
/// column names (`id`, `layer`, `activation`) instead of the defaults.
pub fn read_options(selector: u8) -> ReadOptions {
    ReadOptions {
        columns: if selector & 16 != 0 {
            crate::minilm::columns()
        } else {
            TraceColumns::default()
        },
        batch_rows: [8192, 1, 3, 5][usize::from(selector & 3)],
        sites: (selector & 8 != 0).then(|| SITE_FILTER.iter().map(|s| s.to_string()).collect()),
        keep_other_columns: selector & 4 != 0,
    }
}

/// The most one allocation may take while reading a trace file of `len` bytes: its pages
/// decompressed and decoded (a page of the seeds is at most a few kB, the MiniLM file's a few
/// hundred), arrow's buffers for a batch, a constant.
pub fn read_budget(len: usize) -> usize {
    16 * len + (16 << 20)
}

/// A small valid trace file, and the selector its columns need.
#[derive(Debug, Clone)]
pub struct SeedFile {
    pub name: &'static str,
    pub selector: u8,
    pub bytes: Vec<u8>,
}

fn sites_batch(
    site: &str,
    ids: std::ops::Range<usize>,
    dim: usize,
    rng: &mut Rng,
    positions: bool,
) -> SiteBatch {
    let n = ids.len();
    let ids: Vec<String> = ids.map(|i| format!("c{i}")).collect();
    let positions = positions.then(|| (0..n as i32).collect());
    SiteBatch::new(
        site,
        ids,
        positions,
        Vectors::new(dim, rng.gaussian_rows(n, dim, 0.0)).expect("whole rows"),
    )
    .expect("a valid batch")
}

fn write_batches(path: &Path, batch: RecordBatch, props: WriterProperties) {
    let mut w = AtomicParquetWriter::create_with_properties(path, batch.schema(), props)
        .expect("creating a seed file");
    // In pieces, so that small row-group and page limits give several of each.
    for at in (0..batch.num_rows()).step_by(3) {
        let len = 3.min(batch.num_rows() - at);
        w.write(&batch.slice(at, len)).expect("writing a seed file");
    }
    w.finish().expect("finishing a seed file");
}

fn item(dt: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", dt, true))
}

/// Small valid trace files, one per layout the reader accepts, written with the project's writers
/// (or arrow's, for layouts ours never write) into a temporary directory and read back:
/// - `segment`: [`TraceWriter`]'s own (dictionary sites, Utf8 ids, positions, `FixedSizeList<f32>`,
///   provenance in the footer), two sites;
/// - `segment-bf16`: the server's reference segment, an Arrow IPC file, of batches that arrived as
///   bf16 (`FixedSizeBinary(2 d)` rows marked `actwatch.dtype = bfloat16`, provenance in the
///   footer), one batch without positions;
/// - `list-f16`: integer ids and sites, nullable positions, `List<Float16>`, snappy, several row
///   groups and pages, page statistics and indexes;
/// - `large-list-f64`: `Utf8View` ids, `Dictionary<Int8, Utf8>` sites, `LargeList<Float64>`, a
///   label and an extra column, zstd with dictionaries;
/// - `minilm-like`: the shared MiniLM files' layout (`id`, integer `layer`, `activation`),
///   uncompressed;
/// - `segment-f32`: the server's segment (Arrow IPC) of labelled examples sent as f32
///   (`FixedSizeBinary(4 d)` rows marked `actwatch.dtype = float32`);
/// - `ipc-dictionary`: an Arrow IPC file as other tools write it (arrow's own writer): a
///   dictionary-encoded site column and `FixedSizeList<Float32>` vectors, two record batches.
pub fn seed_trace_files() -> Vec<SeedFile> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    let mut keep = |name: &'static str, selector: u8, path: PathBuf| {
        out.push(SeedFile {
            name,
            selector,
            bytes: std::fs::read(&path).expect("reading a seed file back"),
        })
    };

    // segment
    let path = dir.path().join("segment.parquet");
    let mut w = TraceWriter::create(&path, 4, &TraceColumns::default(), Some("position"))
        .expect("a trace writer");
    let provenance = Arc::new(
        Provenance::from_pairs([("model", "fuzz/tiny"), ("pooling", "none")]).expect("valid"),
    );
    w.write(sites_batch("a", 0..4, 4, &mut rng, true).with_provenance(Some(provenance)))
        .expect("writing");
    w.write(sites_batch("b", 0..4, 4, &mut rng, true))
        .expect("writing");
    w.write(sites_batch("a", 4..6, 4, &mut rng, true))
        .expect("writing");
    w.finish().expect("finishing");
    keep("segment", 0, path);

    // segment-bf16: the server's segment (an Arrow IPC file) of batches that arrived as bf16
    let path = dir.path().join("segment-bf16.arrow");
    let columns = TraceColumns::default();
    let mut w =
        TraceWriter::create_segment(&path, 4, &columns, Some("position"), None, Dtype::Bf16)
            .expect("a trace writer");
    let provenance = Arc::new(Provenance::from_pairs([("model", "fuzz/tiny")]).expect("valid"));
    w.write(sites_batch("a", 0..4, 4, &mut rng, true).with_provenance(Some(provenance)))
        .expect("writing");
    w.write(sites_batch("b", 0..3, 4, &mut rng, false))
        .expect("writing");
    w.finish_hashed().expect("finishing");
    keep("segment-bf16", 0, path);

    // list-f16
    let n = 10;
    let lens: Vec<usize> = (0..n).map(|i| if i % 4 == 3 { 5 } else { 3 }).collect();
    let values: Vec<half::f16> = (0..lens.iter().sum::<usize>())
        .map(|_| half::f16::from_f32(rng.normal() as f32))
        .collect();
    let sites: Vec<i32> = (0..n).map(|i| if i % 4 == 3 { 4 } else { 2 }).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("trace_id", DataType::Int64, false),
        Field::new("site", DataType::Int32, false),
        Field::new("position", DataType::Int64, true),
        Field::new("activation", DataType::List(item(DataType::Float16)), true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| i / 2))) as ArrayRef,
            Arc::new(Int32Array::from(sites)),
            Arc::new(Int64Array::from_iter(
                (0..n as i64).map(|i| (i != 5).then_some(i)),
            )),
            Arc::new(ListArray::new(
                item(DataType::Float16),
                OffsetBuffer::from_lengths(lens),
                Arc::new(Float16Array::from(values)),
                None,
            )),
        ],
    )
    .expect("a record batch");
    let path = dir.path().join("list-f16.parquet");
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(4))
        .set_data_page_row_count_limit(2)
        .set_write_batch_size(2)
        .set_statistics_enabled(EnabledStatistics::Page)
        .build();
    write_batches(&path, batch, props);
    keep("list-f16", 0, path);

    // large-list-f64
    let n = 8;
    let schema = Arc::new(Schema::new(vec![
        Field::new("trace_id", DataType::Utf8View, false),
        Field::new(
            "site",
            DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8)),
            false,
        ),
        Field::new(
            "activation",
            DataType::LargeList(item(DataType::Float64)),
            false,
        ),
        Field::new(LABEL_COLUMN, DataType::Boolean, false),
        Field::new("note", DataType::Utf8, true),
    ]));
    let sites: DictionaryArray<Int8Type> =
        (0..n).map(|i| if i % 3 == 0 { "b" } else { "a" }).collect();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringViewArray::from_iter_values(
                (0..n).map(|i| format!("computation-{}", i / 2)),
            )) as ArrayRef,
            Arc::new(sites),
            Arc::new(LargeListArray::new(
                item(DataType::Float64),
                OffsetBuffer::from_lengths(vec![2; n]),
                Arc::new(Float64Array::from(
                    rng.gaussian_rows(n, 2, 1.0)
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect::<Vec<_>>(),
                )),
                None,
            )),
            Arc::new(BooleanArray::from_iter((0..n).map(|i| Some(i % 4 < 2)))),
            Arc::new(StringArray::from_iter(
                (0..n).map(|i| (i % 2 == 0).then_some("x")),
            )),
        ],
    )
    .expect("a record batch");
    let path = dir.path().join("large-list-f64.parquet");
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(Default::default()))
        .set_dictionary_enabled(true)
        .build();
    write_batches(&path, batch, props);
    keep("large-list-f64", 4, path);

    // minilm-like
    let n = 6;
    let width = 8;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("layer", DataType::Int32, false),
        Field::new(
            "activation",
            DataType::FixedSizeList(item(DataType::Float32), width),
            false,
        ),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("s{}", i / 3)),
            )) as ArrayRef,
            Arc::new(Int32Array::from_iter_values(
                (0..n).map(|i| [2, 4, 6][i % 3]),
            )),
            Arc::new(FixedSizeListArray::new(
                item(DataType::Float32),
                width,
                Arc::new(Float32Array::from(rng.gaussian_rows(
                    n,
                    width as usize,
                    0.0,
                ))),
                None,
            )),
        ],
    )
    .expect("a record batch");
    let path = dir.path().join("minilm-like.parquet");
    let props = WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .build();
    write_batches(&path, batch, props);
    keep("minilm-like", 16, path);

    // segment-f32 (last, so the seeds above keep their random values): the server's segment (Arrow
    // IPC) of batches that arrived as f32 (`FixedSizeBinary(4 d)` rows marked `actwatch.dtype =
    // float32`), with labels
    let path = dir.path().join("segment-f32.arrow");
    let mut w = TraceWriter::create_segment(
        &path,
        4,
        &columns,
        Some("position"),
        Some("label"),
        Dtype::F32,
    )
    .expect("a trace writer");
    w.write_labelled(
        sites_batch("a", 0..3, 4, &mut rng, true),
        vec![true, false, true],
    )
    .expect("writing");
    w.write_labelled(sites_batch("b", 0..2, 4, &mut rng, false), vec![false; 2])
        .expect("writing");
    w.finish_hashed().expect("finishing");
    keep("segment-f32", 0, path);

    // ipc-dictionary (after the others, for the same reason): an Arrow IPC file as other tools
    // write it, with a dictionary-encoded site column (its dictionary block before the batches)
    // and `FixedSizeList<Float32>` vectors, in two record batches
    let sites: DictionaryArray<Int32Type> = ["a", "b", "a", "b", "b"].into_iter().collect();
    let batch = RecordBatch::try_from_iter([
        (
            "trace_id",
            Arc::new(StringArray::from_iter_values(
                (0..5).map(|i| format!("c{i}")),
            )) as ArrayRef,
        ),
        ("site", Arc::new(sites) as ArrayRef),
        (
            "activation",
            Arc::new(
                FixedSizeListArray::try_new(
                    item(DataType::Float32),
                    4,
                    Arc::new(Float32Array::from(rng.gaussian_rows(5, 4, 0.0))),
                    None,
                )
                .expect("a list array"),
            ) as ArrayRef,
        ),
    ])
    .expect("a record batch");
    let path = dir.path().join("ipc-dictionary.arrow");
    let file = std::fs::File::create(&path).expect("creating a seed file");
    let mut w =
        arrow::ipc::writer::FileWriter::try_new(file, &batch.schema()).expect("an IPC writer");
    w.write(&batch.slice(0, 3)).expect("writing");
    w.write(&batch.slice(3, 2)).expect("writing");
    w.finish().expect("finishing");
    drop(w);
    keep("ipc-dictionary", 0, path);
    out
}

/// Checks what the reader promises of a batch it hands out: one site and id per row, offsets
/// from 0 to the end of the vectors, every vector non-empty and finite, one width per site.
fn check_trace_batch(b: &TraceBatch) {
    let n = b.len();
    assert_eq!(b.sites.len(), n);
    assert_eq!(b.offsets.len(), n + 1);
    assert_eq!(b.offsets[0], 0);
    assert_eq!(b.offsets[n], b.vectors.len());
    assert!(b.offsets.windows(2).all(|w| w[0] < w[1]), "an empty vector");
    assert!(
        b.vectors.iter().all(|v| v.is_finite()),
        "a non-finite value"
    );
    if let Some(p) = &b.positions {
        assert_eq!(p.len(), n);
    }
    if let Some(rows) = &b.file_rows {
        assert_eq!(rows.len(), n);
    }
    if let Some(o) = &b.other {
        assert_eq!(o.num_rows(), n);
    }
}

/// Reads the trace file at `path` to the end with [`read_options`]`(selector)` and checks every
/// batch: [`check_trace_batch`], its per-site batches, its labels when it has a label column.
/// Also reads the footer's row count alone ([`file_rows`]). Returns the rows read, or the first
/// error (the property is that there is no panic, and every refusal is an `Err`).
pub fn read_trace_file(path: &Path, selector: u8) -> actwatch_io::Result<u64> {
    let _ = file_rows(path);
    let reader = TraceReader::open(&[path.to_path_buf()], read_options(selector))?;
    let mut rows = 0;
    for batch in reader {
        let batch = batch?;
        check_trace_batch(&batch);
        for (idx, site) in batch.site_batches()? {
            assert_eq!(idx.len(), site.rows());
        }
        if selector & 4 != 0 {
            let _ = batch.labels(LABEL_COLUMN);
        }
        rows += batch.len() as u64;
    }
    Ok(rows)
}

/// Decodes a record batch handed over in memory ([`TraceReader::decode_batch`], the door of the
/// Python bindings) with [`read_options`]`(selector)`, and checks what comes out as
/// [`read_trace_file`] does. Returns the rows decoded.
pub fn decode_record_batch(batch: RecordBatch, selector: u8) -> actwatch_io::Result<u64> {
    let mut reader = TraceReader::for_batches(read_options(selector));
    let source = Arc::new(PathBuf::from("<memory>"));
    let Some(decoded) = reader.decode_batch(&source, batch, 0)? else {
        return Ok(0);
    };
    check_trace_batch(&decoded);
    for (idx, site) in decoded.site_batches()? {
        assert_eq!(idx.len(), site.rows());
    }
    Ok(decoded.len() as u64)
}
