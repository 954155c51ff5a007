//! Integration tests of the trace reader: real MiniLM activations, and small files written here
//! for every accepted layout and every kind of bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_io::reader::{expand_inputs, ReadOptions, TraceBatch, TraceColumns, TraceReader};
use actwatch_io::writer::AtomicParquetWriter;
use actwatch_io::Error;
use actwatch_testkit::minilm;
use arrow::array::DictionaryArray;
use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float16Array, Float32Array, Float64Array,
    Int32Array, Int64Array, LargeListArray, ListArray, StringArray, StringViewArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn data_dir() -> PathBuf {
    minilm::dir()
}

fn train() -> PathBuf {
    data_dir().join("train.parquet")
}

fn minilm_options(batch_rows: usize) -> ReadOptions {
    ReadOptions {
        batch_rows,
        ..minilm::read_options()
    }
}

fn read_all(paths: &[PathBuf], opts: ReadOptions) -> Result<Vec<TraceBatch>, Error> {
    TraceReader::open(paths, opts)?.collect()
}

/// Rows of a Parquet file as arrow-rs reads it directly: (id, layer, activation).
fn direct_rows(path: &Path, rows: &[u64]) -> BTreeMap<u64, (String, i32, Vec<f32>)> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .with_batch_size(4096)
        .build()
        .unwrap();
    let mut out = BTreeMap::new();
    let mut base = 0u64;
    for batch in reader {
        let batch = batch.unwrap();
        let ids = batch
            .column_by_name("id")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let layers = batch
            .column_by_name("layer")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int32Type>()
            .clone();
        let acts = batch
            .column_by_name("activation")
            .unwrap()
            .as_fixed_size_list()
            .clone();
        for &r in rows {
            if r >= base && r < base + batch.num_rows() as u64 {
                let i = (r - base) as usize;
                let v = acts.value(i);
                let v = v.as_primitive::<Float32Type>().values().to_vec();
                out.insert(r, (ids.value(i).to_owned(), layers.value(i), v));
            }
        }
        base += batch.num_rows() as u64;
    }
    out
}

#[test]
fn reads_real_minilm_train_file() {
    let path = train();
    let reader = TraceReader::open(std::slice::from_ref(&path), minilm_options(1000)).unwrap();
    assert_eq!(reader.total_rows(), 18000);
    assert_eq!(reader.files(), std::slice::from_ref(&path));

    let probe = [0u64, 1, 999, 1000, 6001, 12345, 17999];
    let expected = direct_rows(&path, &probe);
    let mut per_site: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_rows = 0u64;
    let mut site_arcs: BTreeMap<String, Arc<str>> = BTreeMap::new();
    let mut found = 0;
    for batch in reader {
        let batch = batch.unwrap();
        assert!(batch.len() <= 1000 && !batch.is_empty());
        assert_eq!(batch.first_row, seen_rows);
        assert!(batch.file_rows.is_none());
        assert_eq!(batch.offsets.len(), batch.len() + 1);
        assert!(batch.other.is_none());
        seen_rows += batch.len() as u64;
        for i in 0..batch.len() {
            assert_eq!(batch.width(i), 384);
            let site = &batch.sites[i];
            *per_site.entry(site.to_string()).or_default() += 1;
            // Interned: one Arc per distinct site over the whole stream.
            let first = site_arcs
                .entry(site.to_string())
                .or_insert_with(|| site.clone());
            assert!(Arc::ptr_eq(first, site));
            if let Some((id, layer, v)) = expected.get(&batch.file_row(i)) {
                assert_eq!(&batch.trace_ids[i], id);
                assert_eq!(&**site, layer.to_string());
                assert_eq!(batch.row_vector(i), v.as_slice());
                found += 1;
            }
        }
        let groups = batch.site_batches().unwrap();
        assert_eq!(
            groups.iter().map(|(rows, _)| rows.len()).sum::<usize>(),
            batch.len()
        );
        for (rows, g) in &groups {
            assert_eq!(g.dim(), 384);
            assert_eq!(g.rows(), rows.len());
            assert_eq!(g.vectors().row(0), batch.row_vector(rows[0]));
            assert_eq!(g.trace_ids()[0], batch.trace_ids[rows[0]]);
        }
    }
    assert_eq!(found, probe.len());
    assert_eq!(seen_rows, 18000);
    let expected_sites: BTreeMap<String, usize> = [("2", 6000), ("4", 6000), ("6", 6000)]
        .map(|(s, n)| (s.to_owned(), n))
        .into();
    assert_eq!(per_site, expected_sites);
}

#[test]
fn reading_ahead_gives_the_same_batches_and_errors_and_stops_when_dropped() {
    let path = train();
    let files = [path.clone(), path];
    let inline = read_all(&files, minilm_options(700)).unwrap();
    let ahead: Vec<TraceBatch> = TraceReader::open(&files, minilm_options(700))
        .unwrap()
        .read_ahead()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ahead.len(), inline.len());
    for (a, b) in ahead.iter().zip(&inline) {
        assert_eq!((&a.path, a.first_row), (&b.path, b.first_row));
        assert_eq!((&a.trace_ids, &a.sites), (&b.trace_ids, &b.sites));
        assert_eq!((&a.vectors, &a.offsets), (&b.vectors, &b.offsets));
    }

    // Dropped after one batch, or before any: the reading thread stops (this returns).
    let mut it = TraceReader::open(&files, minilm_options(100))
        .unwrap()
        .read_ahead();
    assert!(it.next().unwrap().is_ok());
    drop(it);
    drop(
        TraceReader::open(&files, minilm_options(100))
            .unwrap()
            .read_ahead(),
    );

    // An error in a later batch arrives after the good ones, then the stream ends.
    let dir = tempfile::tempdir().unwrap();
    let p = nan_in_row_3(dir.path());
    let opts = ReadOptions {
        batch_rows: 2,
        ..ReadOptions::default()
    };
    let got: Vec<_> = TraceReader::open(std::slice::from_ref(&p), opts)
        .unwrap()
        .read_ahead()
        .collect();
    assert_eq!(got.len(), 2);
    assert!(got[0].is_ok());
    assert!(
        matches!(got[1], Err(Error::NonFinite { row: 3, .. })),
        "{:?}",
        got[1]
    );
}

#[test]
fn site_filter_keeps_only_those_sites_and_their_file_rows() {
    let path = train();
    let opts = ReadOptions {
        sites: Some(vec!["4".into()]),
        ..minilm_options(777)
    };
    let mut reader = TraceReader::open(std::slice::from_ref(&path), opts).unwrap();
    let mut n = 0;
    let mut probes = Vec::new();
    for batch in reader.by_ref() {
        let batch = batch.unwrap();
        assert!(batch.len() <= 777);
        assert!(batch.sites.iter().all(|s| &**s == "4"));
        n += batch.len();
        if probes.len() < 5 {
            probes.push((batch.file_row(0), batch.row_vector(0).to_vec()));
        }
        if let Some(last) = batch.len().checked_sub(1) {
            probes.push((batch.file_row(last), batch.row_vector(last).to_vec()));
        }
    }
    assert_eq!(n, 6000);
    assert_eq!(reader.rows_read(), 18000);
    assert_eq!(reader.site_width("4"), Some(384));
    assert_eq!(reader.site_width("2"), None);
    let rows: Vec<u64> = probes.iter().map(|p| p.0).collect();
    let direct = direct_rows(&path, &rows);
    for (row, v) in probes {
        let (_, layer, expected) = &direct[&row];
        assert_eq!(*layer, 4);
        assert_eq!(&v, expected);
    }
}

#[test]
fn keeps_other_columns_row_aligned() {
    let path = data_dir().join("dev_ood_code.parquet");
    let opts = ReadOptions {
        keep_other_columns: true,
        sites: Some(vec!["2".into(), "6".into()]),
        ..minilm_options(512)
    };
    let mut total = 0;
    for batch in read_all(&[path], opts).unwrap() {
        let other = batch.other.as_ref().unwrap();
        let names: Vec<&str> = other
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["id", "split", "label", "layer", "text"]);
        assert_eq!(other.num_rows(), batch.len());
        let ids = other.column(0).as_string::<i32>();
        let labels = other.column(2).as_string::<i32>();
        for i in 0..batch.len() {
            assert_eq!(ids.value(i), batch.trace_ids[i]);
            assert_eq!(labels.value(i), "code");
        }
        total += batch.len();
    }
    assert_eq!(total, 1000);
}

// ---- small files ----

fn f32_list_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float32, true))
}

fn write(path: &Path, columns: Vec<(&str, ArrayRef)>) -> u64 {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch =
        RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect()).unwrap();
    let mut w = AtomicParquetWriter::create(path, schema).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap()
}

fn strings(v: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

fn fsl_f32(width: i32, values: Vec<f32>, nulls: Option<Vec<bool>>) -> ArrayRef {
    Arc::new(
        FixedSizeListArray::try_new(
            f32_list_field(),
            width,
            Arc::new(Float32Array::from(values)),
            nulls.map(NullBuffer::from),
        )
        .unwrap(),
    )
}

fn list_f32(rows: &[&[f32]]) -> ArrayRef {
    let values: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Arc::new(
        ListArray::try_new(
            f32_list_field(),
            OffsetBuffer::from_lengths(rows.iter().map(|r| r.len())),
            Arc::new(Float32Array::from(values)),
            None,
        )
        .unwrap(),
    )
}

fn one_err(paths: &[PathBuf], opts: ReadOptions) -> Error {
    match TraceReader::open(paths, opts) {
        Err(e) => e,
        Ok(reader) => {
            let mut reader = reader;
            let mut err = None;
            for b in reader.by_ref() {
                if let Err(e) = b {
                    err = Some(e);
                    break;
                }
            }
            // The iterator ends after its first error.
            assert!(reader.next().is_none());
            err.expect("an error")
        }
    }
}

fn assert_names(err: &Error, path: &Path) {
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(
        err.to_string().contains(name),
        "error does not name {name}: {err}"
    );
    assert_eq!(err.path(), Some(path));
}

#[test]
fn list_of_f32_with_widths_per_site() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("list.parquet");
    let rows = write(
        &p,
        vec![
            ("trace_id", strings(&["t0", "t0", "t1", "t1"])),
            (
                "site",
                Arc::new(DictionaryArray::<Int32Type>::from_iter([
                    "a", "b", "a", "b",
                ])),
            ),
            (
                "activation",
                list_f32(&[&[1., 2., 3.], &[4., 5.], &[6., 7., 8.], &[9., 10.]]),
            ),
        ],
    );
    assert_eq!(rows, 4);
    let mut reader = TraceReader::open(&[p], ReadOptions::default()).unwrap();
    let batch = reader.next().unwrap().unwrap();
    assert!(reader.next().is_none());
    assert_eq!(batch.trace_ids, ["t0", "t0", "t1", "t1"]);
    assert_eq!(batch.row_vector(1), &[4., 5.]);
    assert_eq!(batch.offsets, [0, 3, 5, 8, 10]);
    let groups = batch.site_batches().unwrap();
    assert_eq!(groups[0].1.site(), "a");
    assert_eq!(groups[0].1.vectors().as_slice(), &[1., 2., 3., 6., 7., 8.]);
    assert_eq!(groups[1].1.site(), "b");
    assert_eq!(groups[1].0, [1, 3]);
    assert_eq!(groups[1].1.dim(), 2);
    assert_eq!(
        reader.site_widths(),
        [(Arc::from("a"), 3), (Arc::from("b"), 2)]
    );
}

#[test]
fn fixed_size_list_of_f16_large_list_of_f64_and_integer_ids() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [0.5f32, -1.25, 3.0, 65504.0, 1e-3, 0.0];
    let h: Vec<half::f16> = vals.iter().map(|v| half::f16::from_f32(*v)).collect();
    let f16_field = Arc::new(Field::new("item", DataType::Float16, true));
    let acts: ArrayRef = Arc::new(
        FixedSizeListArray::try_new(f16_field, 3, Arc::new(Float16Array::from(h.clone())), None)
            .unwrap(),
    );
    let p16 = dir.path().join("f16.parquet");
    write(
        &p16,
        vec![
            ("trace_id", Arc::new(Int64Array::from(vec![42, -7]))),
            ("site", Arc::new(Int32Array::from(vec![12, 12]))),
            ("activation", acts),
        ],
    );
    let p64 = dir.path().join("f64.parquet");
    let f64_field = Arc::new(Field::new("item", DataType::Float64, true));
    let large: ArrayRef = Arc::new(
        LargeListArray::try_new(
            f64_field,
            OffsetBuffer::from_lengths([3]),
            Arc::new(Float64Array::from(vec![1.0, 2.5, -3.0])),
            None,
        )
        .unwrap(),
    );
    write(
        &p64,
        vec![
            ("trace_id", Arc::new(StringViewArray::from(vec!["view-id"]))),
            ("site", strings(&["12"])),
            ("activation", large),
        ],
    );
    let batches = read_all(&[p16, p64], ReadOptions::default()).unwrap();
    assert_eq!(batches.len(), 2);
    let b = &batches[0];
    assert_eq!(b.trace_ids, ["42", "-7"]);
    assert_eq!(&*b.sites[0], "12");
    let expected: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    assert_eq!(b.vectors, expected);
    assert_eq!(b.vectors[3], 65504.0);
    let b = &batches[1];
    assert_eq!(b.trace_ids, ["view-id"]);
    assert_eq!(b.row_vector(0), &[1.0, 2.5, -3.0]);
    // Integer site 12 of the first file and string site "12" of the second are one site.
    assert!(Arc::ptr_eq(&batches[0].sites[0], &b.sites[0]));
}

#[test]
fn missing_column_lists_available_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nosite.parquet");
    write(
        &p,
        vec![
            ("trace_id", strings(&["a"])),
            ("activation", fsl_f32(2, vec![1., 2.], None)),
        ],
    );
    let err = one_err(std::slice::from_ref(&p), ReadOptions::default());
    assert_names(&err, &p);
    match &err {
        Error::MissingColumn {
            column, available, ..
        } => {
            assert_eq!(column, "site");
            assert_eq!(available, &["trace_id", "activation"]);
        }
        e => panic!("wrong error: {e:?}"),
    }
}

#[test]
fn bad_column_types_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ints.parquet");
    let int_field = Arc::new(Field::new("item", DataType::Int32, true));
    let ints: ArrayRef = Arc::new(
        ListArray::try_new(
            int_field,
            OffsetBuffer::from_lengths([2]),
            Arc::new(Int32Array::from(vec![1, 2])),
            None,
        )
        .unwrap(),
    );
    write(
        &p,
        vec![
            ("trace_id", strings(&["a"])),
            ("site", strings(&["s"])),
            ("activation", ints),
            ("score", Arc::new(Float32Array::from(vec![0.5]))),
        ],
    );
    let err = one_err(std::slice::from_ref(&p), ReadOptions::default());
    assert_names(&err, &p);
    assert!(
        matches!(&err, Error::BadColumnType { column, found, .. } if column == "activation" && found.contains("Int32")),
        "{err:?}"
    );
    // A float site column is refused too.
    let opts = ReadOptions {
        columns: TraceColumns::new("trace_id", "score", "activation"),
        ..ReadOptions::default()
    };
    let err = one_err(std::slice::from_ref(&p), opts);
    assert!(
        matches!(&err, Error::BadColumnType { column, .. } if column == "score"),
        "{err:?}"
    );
}

#[test]
fn width_change_of_a_site_in_a_later_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.parquet");
    let b = dir.path().join("b.parquet");
    write(
        &a,
        vec![
            ("trace_id", strings(&["t0", "t1"])),
            ("site", strings(&["s", "s"])),
            ("activation", fsl_f32(2, vec![1., 2., 3., 4.], None)),
        ],
    );
    write(
        &b,
        vec![
            ("trace_id", strings(&["t2", "t2", "t3"])),
            ("site", strings(&["other", "other", "s"])),
            (
                "activation",
                fsl_f32(3, vec![1., 2., 3., 4., 5., 6., 7., 8., 9.], None),
            ),
        ],
    );
    let mut reader =
        TraceReader::open(&[dir.path().to_path_buf()], ReadOptions::default()).unwrap();
    assert_eq!(reader.files(), [a.clone(), b.clone()]);
    assert_eq!(reader.total_rows(), 5);
    assert_eq!(reader.next().unwrap().unwrap().len(), 2);
    let err = reader.next().unwrap().unwrap_err();
    assert!(reader.next().is_none());
    assert_names(&err, &b);
    match err {
        Error::WidthMismatch {
            site,
            expected,
            got,
            row,
            ..
        } => assert_eq!((site.as_str(), expected, got, row), ("s", 2, 3, 2)),
        e => panic!("wrong error: {e:?}"),
    }
    // Without site "s" the second file is fine.
    let opts = ReadOptions {
        sites: Some(vec!["other".into()]),
        ..ReadOptions::default()
    };
    let batches = read_all(&[b], opts).unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].file_rows, Some(vec![0, 1]));
}

/// Five traces of width 3 in `dir`, the second component of row 3 NaN.
fn nan_in_row_3(dir: &Path) -> PathBuf {
    let p = dir.join("nan.parquet");
    let mut values = vec![0.0f32; 5 * 3];
    values[3 * 3 + 1] = f32::NAN;
    write(
        &p,
        vec![
            ("trace_id", strings(&["a", "b", "c", "d", "e"])),
            ("site", strings(&["s"; 5])),
            ("activation", fsl_f32(3, values, None)),
        ],
    );
    p
}

#[test]
fn nan_is_reported_with_file_row_and_component() {
    let dir = tempfile::tempdir().unwrap();
    let p = nan_in_row_3(dir.path());
    // Batches of 2 rows: the NaN is in the second batch, row 3 of the file.
    let opts = ReadOptions {
        batch_rows: 2,
        ..ReadOptions::default()
    };
    let err = one_err(std::slice::from_ref(&p), opts);
    assert_names(&err, &p);
    assert!(
        matches!(
            err,
            Error::NonFinite {
                row: 3,
                component: 1,
                ..
            }
        ),
        "{err:?}"
    );

    let p = dir.path().join("inf.parquet");
    write(
        &p,
        vec![
            ("trace_id", strings(&["a", "b"])),
            ("site", strings(&["s", "t"])),
            ("activation", list_f32(&[&[1.0], &[2.0, f32::NEG_INFINITY]])),
        ],
    );
    let err = one_err(std::slice::from_ref(&p), ReadOptions::default());
    assert!(
        matches!(
            err,
            Error::NonFinite {
                row: 1,
                component: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn nulls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nullvec.parquet");
    write(
        &p,
        vec![
            ("trace_id", strings(&["a", "b", "c"])),
            ("site", strings(&["s"; 3])),
            (
                "activation",
                fsl_f32(
                    2,
                    vec![1., 2., 3., 4., 5., 6.],
                    Some(vec![true, true, false]),
                ),
            ),
        ],
    );
    let err = one_err(std::slice::from_ref(&p), ReadOptions::default());
    assert_names(&err, &p);
    assert!(
        matches!(&err, Error::NullValue { column, row: 2, .. } if column == "activation"),
        "{err:?}"
    );

    let p = dir.path().join("nullelem.parquet");
    let values: ArrayRef = Arc::new(Float32Array::from(vec![
        Some(1.0),
        Some(2.0),
        None,
        Some(4.0),
    ]));
    let acts: ArrayRef =
        Arc::new(FixedSizeListArray::try_new(f32_list_field(), 2, values, None).unwrap());
    write(
        &p,
        vec![
            ("trace_id", strings(&["a", "b"])),
            ("site", strings(&["s"; 2])),
            ("activation", acts),
        ],
    );
    let err = one_err(std::slice::from_ref(&p), ReadOptions::default());
    assert!(
        matches!(&err, Error::NullValue { column, row: 1, .. } if column == "activation"),
        "{err:?}"
    );

    let p = dir.path().join("nullid.parquet");
    write(
        &p,
        vec![
            (
                "trace_id",
                Arc::new(StringArray::from(vec![Some("a"), None])),
            ),
            ("site", strings(&["s"; 2])),
            ("activation", fsl_f32(1, vec![1., 2.], None)),
        ],
    );
    let err = one_err(std::slice::from_ref(&p), ReadOptions::default());
    assert_names(&err, &p);
    assert!(
        matches!(&err, Error::NullValue { column, row: 1, .. } if column == "trace_id"),
        "{err:?}"
    );

    let p = dir.path().join("empty.parquet");
    write(
        &p,
        vec![
            ("trace_id", strings(&["a", "b"])),
            ("site", strings(&["s", "t"])),
            ("activation", list_f32(&[&[1.0], &[]])),
        ],
    );
    let err = one_err(std::slice::from_ref(&p), ReadOptions::default());
    assert!(matches!(err, Error::EmptyVector { row: 1, .. }), "{err:?}");
}

#[test]
fn truncated_and_non_parquet_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fs::read(data_dir().join("dev_ood_base64.parquet")).unwrap();
    let truncated = dir.path().join("truncated.parquet");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = one_err(std::slice::from_ref(&truncated), minilm_options(1024));
    assert_names(&err, &truncated);
    assert!(matches!(err, Error::Parquet { .. }), "{err:?}");

    let text = dir.path().join("notes.txt");
    fs::write(&text, "this is not parquet\n").unwrap();
    let err = one_err(std::slice::from_ref(&text), minilm_options(1024));
    assert_names(&err, &text);
    assert!(matches!(err, Error::Parquet { .. }), "{err:?}");

    // Data pages corrupted behind an intact footer: an error while streaming, not a panic.
    let mut corrupt = bytes.clone();
    let n = corrupt.len();
    for b in &mut corrupt[8..n / 2] {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    let corrupted = dir.path().join("corrupt.parquet");
    fs::write(&corrupted, &corrupt).unwrap();
    let err = one_err(std::slice::from_ref(&corrupted), minilm_options(1024));
    assert_names(&err, &corrupted);
    assert!(matches!(err, Error::Parquet { .. }), "{err:?}");

    let missing = dir.path().join("missing.parquet");
    let err = one_err(std::slice::from_ref(&missing), minilm_options(1024));
    assert_names(&err, &missing);
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[test]
fn expand_inputs_walks_directories_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("b/nested")).unwrap();
    fs::create_dir_all(root.join(".hidden")).unwrap();
    for f in [
        "z.parquet",
        "a.PARQUET",
        "b/nested/c.parquet",
        "b/readme.txt",
        ".hidden/x.parquet",
        "_tmp.parquet",
        "y.parquet.tmp-123",
    ] {
        fs::write(root.join(f), b"").unwrap();
    }
    let extra = root.join("b/readme.txt");
    let files =
        expand_inputs(&[root.to_path_buf(), extra.clone(), root.join("z.parquet")]).unwrap();
    assert_eq!(
        files,
        [
            root.join("a.PARQUET"),
            root.join("b/nested/c.parquet"),
            root.join("z.parquet"),
            extra
        ]
    );
    let empty = tempfile::tempdir().unwrap();
    let err = expand_inputs(&[empty.path().to_path_buf()]).unwrap_err();
    assert!(matches!(err, Error::NoInput(_)), "{err:?}");
    let err = expand_inputs(&[root.join("nope")]).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope"));
}

#[test]
fn atomic_writer_leaves_nothing_behind_unless_finished() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.parquet");
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int32Array::from(vec![1, 2, 3]))],
    )
    .unwrap();
    {
        let mut w = AtomicParquetWriter::create(&p, schema.clone()).unwrap();
        w.write(&batch).unwrap();
        let listing: BTreeSet<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(listing.len(), 1);
        assert!(!p.exists());
        // Dropped without finish.
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

    let mut w = AtomicParquetWriter::create(&p, schema.clone()).unwrap();
    w.write(&batch).unwrap();
    w.write(&batch).unwrap();
    assert_eq!(w.finish().unwrap(), 6);
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["out.parquet"]);
    let n: usize = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    assert_eq!(n, 6);

    // A batch of another schema is an error naming the file.
    let mut w = AtomicParquetWriter::create(&p, schema).unwrap();
    let other = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("y", DataType::Utf8, false)])),
        vec![strings(&["a"])],
    )
    .unwrap();
    let err = w.write(&other).unwrap_err();
    assert_names(&err, &p);
}

/// The batches of `paths` as plain values (ids, sites, file rows, vectors), to compare two readings.
type Traces = Vec<(String, String, u64, Vec<f32>)>;

fn traces(paths: &[PathBuf], opts: ReadOptions) -> Traces {
    let mut out = Vec::new();
    for b in read_all(paths, opts).unwrap() {
        for i in 0..b.len() {
            out.push((
                b.trace_ids[i].clone(),
                b.sites[i].to_string(),
                b.file_row(i),
                b.row_vector(i).to_vec(),
            ));
        }
    }
    out
}

/// An Arrow IPC file as other tools write it (arrow's own `FileWriter`, the layout `pyarrow`
/// gives: here the real MiniLM train file's record batches, integer layers, 384-wide lists) reads
/// as the same traces as the Parquet file it came from, at any batch size, and a directory walk
/// finds it; a dictionary-encoded site column (its dictionary written once, before the batches)
/// reads too.
#[test]
fn arrow_ipc_files_read_the_same_traces_as_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let ipc = dir.path().join("train.arrow");
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(train()).unwrap())
        .unwrap()
        .with_batch_size(1000)
        .build()
        .unwrap();
    let schema = arrow::record_batch::RecordBatchReader::schema(&reader);
    let mut w =
        arrow::ipc::writer::FileWriter::try_new(File::create(&ipc).unwrap(), &schema).unwrap();
    for b in reader {
        w.write(&b.unwrap()).unwrap();
    }
    w.finish().unwrap();
    drop(w);
    assert_eq!(actwatch_io::reader::file_rows(&ipc).unwrap(), 18000);
    for batch_rows in [777, 1000, 5000] {
        let want = traces(&[train()], minilm_options(batch_rows));
        let got = traces(std::slice::from_ref(&ipc), minilm_options(batch_rows));
        assert_eq!(want.len(), 18000);
        assert!(got == want, "batch_rows {batch_rows}");
    }
    assert_eq!(
        expand_inputs(&[dir.path().to_path_buf()]).unwrap(),
        vec![ipc]
    );

    let path = dir.path().join("dict.arrow");
    let sites: DictionaryArray<Int32Type> = vec!["a", "b", "a", "a"].into_iter().collect();
    let batch = RecordBatch::try_from_iter([
        ("trace_id", strings(&["c0", "c1", "c2", "c3"])),
        ("site", Arc::new(sites) as ArrayRef),
        (
            "activation",
            fsl_f32(2, (0..8).map(|i| i as f32).collect(), None),
        ),
    ])
    .unwrap();
    let mut w =
        arrow::ipc::writer::FileWriter::try_new(File::create(&path).unwrap(), &batch.schema())
            .unwrap();
    w.write(&batch).unwrap();
    w.write(&batch.slice(1, 2)).unwrap();
    w.finish().unwrap();
    drop(w);
    let got = traces(
        &[path],
        ReadOptions {
            batch_rows: 3,
            ..Default::default()
        },
    );
    let sites: Vec<&str> = got.iter().map(|t| t.1.as_str()).collect();
    assert_eq!(sites, ["a", "b", "a", "a", "b", "a"]);
    assert_eq!(got[5].3, vec![4.0, 5.0]);
    assert_eq!(got[5].2, 5);
}
