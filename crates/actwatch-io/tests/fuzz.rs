//! Seeded fuzzing of every reader of outside files: the Parquet trace reader (files read to the
//! end, and record batches handed over in memory), monitor artifacts, and the framed formats of a
//! fit (fit states, calibration parts, checkpoints). Bounded so that it runs with every
//! `cargo test`; the harnesses are shared with the cargo-fuzz targets
//! (`actwatch_testkit::fuzz`, `fuzz/`; see `docs/fuzzing.md`).
//!
//! - `ACTWATCH_FUZZ_CASES=N`: N inputs per target instead of each target's default below (e.g.
//!   20000 for a long run: `ACTWATCH_FUZZ_CASES=20000 cargo test --release -p actwatch-io --test
//!   fuzz -- --nocapture`);
//! - `ACTWATCH_FUZZ_SEED=S` (or `PROPTEST_RNG_SEED=S`): another seed (default fixed, so every run
//!   executes the same inputs).
//!
//! Inputs are small valid ones written with the project's writers (and the smallest of the shared
//! MiniLM files), mutated: bits flipped, lengths and counts overwritten with edge values (in the
//! footer too), cut, spliced; manifests edited node by node; blobs and frames changed with their
//! checksums resealed, so the decoders behind them are reached. Each target prints how many inputs
//! it executed (`--nocapture` shows it). Properties: no panic, every refusal an `Err`; no single
//! allocation beyond a linear budget of the input's size (the installed allocator measures it);
//! changed bytes under an unchanged checksum refused as damaged, before decoding.

use std::sync::Arc;

use actwatch_io::artifact::MANIFEST;
use actwatch_testkit::alloc::{largest_allocation, CappedAlloc};
use actwatch_testkit::fuzz::artifacts::{check_artifact, edit_manifest, reseal, seed_monitors};
use actwatch_testkit::fuzz::frames::{self, check_frame, frame_seeds, FrameKind};
use actwatch_testkit::fuzz::mutate::strategy::{in_place_mutations, mutations};
use actwatch_testkit::fuzz::mutate::{mutated, Mutation, Region};
use actwatch_testkit::fuzz::traces::{
    decode_record_batch, read_budget, read_trace_file, seed_trace_files, SeedFile,
};
use actwatch_testkit::fuzz::{run, Tally};
use actwatch_testkit::minilm;
use arrow::array::{
    ArrayRef, BooleanBufferBuilder, DictionaryArray, FixedSizeListArray, Float16Array,
    Float32Array, Float64Array, Int32Array, Int64Array, LargeListArray, LargeStringArray,
    ListArray, StringArray, StringViewArray, UInt64Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Int16Type, Schema};
use arrow::record_batch::RecordBatch;
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Writes `bytes` to `path` and reads it to the end with `selector`'s options, checking the
/// allocation budget; returns whether it was accepted.
fn read_case(path: &std::path::Path, bytes: &[u8], selector: u8, tally: &mut Tally) {
    std::fs::write(path, bytes).expect("writing the input");
    let budget = read_budget(bytes.len());
    let (result, largest) = largest_allocation(|| read_trace_file(path, selector));
    assert!(
        largest <= budget,
        "reading a {}-byte file allocated {largest} bytes at once (budget {budget})",
        bytes.len()
    );
    tally.record(&result);
}

/// Small valid trace files of every layout, mutated, read to the end under every reader option.
#[test]
fn trace_files() {
    let seeds = seed_trace_files();
    let n = seeds.len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.parquet");
    // Any mutation, or (twice as often) a few that keep the length and the footer's length and
    // magic, so that more inputs reach the pages.
    let m = prop_oneof![
        1 => mutations(512, 6).prop_map(|m| (m, false)),
        2 => in_place_mutations(512, 3).prop_map(|m| (m, true)),
    ];
    let input = (0..n, 0..n, m, any::<u8>());
    run(
        "io::trace_files",
        10_000,
        input,
        |(i, d, (m, keep_footer), options): (usize, usize, (Vec<Mutation>, bool), u8), tally| {
            let seed: &SeedFile = &seeds[i];
            let mut bytes = mutated(&seed.bytes, &m, &seeds[d].bytes);
            let end = seed.bytes.len() - 8;
            if keep_footer && bytes.len() == seed.bytes.len() {
                bytes[end..].copy_from_slice(&seed.bytes[end..]);
            }
            // the seed's columns, any batch size, other columns and site filter
            read_case(&path, &bytes, seed.selector | (options & 0b1111), tally);
        },
    );
}

/// The smallest of the shared MiniLM files (written by pyarrow: statistics, dictionaries, 384-wide
/// vectors), mutated mostly in its footer and first pages, read to the end.
#[test]
fn minilm_file() {
    let original = std::fs::read(minilm::file(minilm::DEV_OOD[0])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.parquet");
    let input = (mutations(4096, 3), any::<u8>());
    run(
        "io::minilm_file",
        400,
        input,
        |(m, options): (Vec<Mutation>, u8), tally| {
            let bytes = mutated(&original, &m, &original);
            read_case(&path, &bytes, 16 | (options & 0b1011), tally);
        },
    );
}

/// The knobs of one record batch handed over in memory (see [`record_batch`]).
#[derive(Debug, Clone)]
struct BatchKnobs {
    rows: usize,
    ids: u8,
    sites: u8,
    vectors: u8,
    width: usize,
    lengths: Vec<u8>,
    values: Vec<f32>,
    nulls: u8,
    positions: u8,
    slice: (usize, usize),
    metadata: u8,
}

fn batch_knobs() -> impl Strategy<Value = BatchKnobs> {
    (
        (0usize..10, 0u8..9, 0u8..9, 0u8..10, 0usize..4),
        (
            proptest::collection::vec(0u8..5, 10),
            proptest::collection::vec(
                prop_oneof![
                    8 => -10.0f32..10.0,
                    1 => proptest::sample::select(vec![
                        f32::NAN,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                        f32::MAX,
                        70000.0,
                    ]),
                ],
                64,
            ),
            0u8..8,
            0u8..8,
            (0usize..4, 0usize..12),
            0u8..5,
        ),
    )
        .prop_map(
            |(
                (rows, ids, sites, vectors, width),
                (lengths, values, nulls, positions, slice, metadata),
            )| BatchKnobs {
                rows,
                ids,
                sites,
                vectors,
                width,
                lengths,
                values,
                nulls,
                positions,
                slice,
                metadata,
            },
        )
}

/// A label column of `n` rows in one of the accepted types (or a float column: refused), with a
/// null in row 1 when `null`.
fn labels(kind: u8, n: usize, null: bool, names: &[&str]) -> ArrayRef {
    let value = |i: usize| names[i % names.len()];
    let valid = |i: usize| !(null && i == 1);
    match kind {
        0 => Arc::new(StringArray::from_iter(
            (0..n).map(|i| valid(i).then(|| value(i))),
        )),
        1 => Arc::new(LargeStringArray::from_iter(
            (0..n).map(|i| valid(i).then(|| value(i))),
        )),
        2 => Arc::new(StringViewArray::from_iter(
            (0..n).map(|i| valid(i).then(|| value(i))),
        )),
        3 => Arc::new(Int32Array::from_iter(
            (0..n).map(|i| valid(i).then_some(2 + (i % 2) as i32 * 2)),
        )),
        4 => Arc::new(UInt64Array::from_iter(
            (0..n).map(|i| valid(i).then_some(u64::MAX - i as u64)),
        )),
        5 => Arc::new(
            (0..n)
                .map(|i| valid(i).then(|| value(i)))
                .collect::<DictionaryArray<Int16Type>>(),
        ),
        6 => Arc::new(Float32Array::from_iter((0..n).map(|i| Some(i as f32)))),
        _ => Arc::new(StringArray::from_iter_values((0..n).map(value))),
    }
}

/// A record batch from its knobs: ids and sites in every accepted type (and a refused one), with
/// or without nulls; vectors as `FixedSizeList`, `List` or `LargeList` of f16 / f32 / f64 (or of
/// integers: refused) with empty vectors, mixed widths, nulls and non-finite values; a position
/// column in range or not; sliced; a provenance in the schema's metadata or garbage there.
/// `None` when arrow itself refuses to build it.
fn record_batch(k: &BatchKnobs) -> Option<RecordBatch> {
    let n = k.rows;
    let null = |which: u8| k.nulls == which;
    let ids = labels(
        k.ids,
        n,
        null(1),
        &["c0", "c1", "", "c2"][..if k.ids == 8 { 4 } else { 2 }],
    );
    let sites = labels(k.sites, n, null(2), &["a", "b", "2"]);
    let lens: Vec<usize> = (0..n).map(|i| usize::from(k.lengths[i])).collect();
    let total: usize = lens.iter().sum::<usize>().max(k.width * n);
    let values: Vec<f32> = (0..total).map(|i| k.values[i % k.values.len()]).collect();
    let value_nulls = null(3).then(|| {
        let mut b = BooleanBufferBuilder::new(total);
        (0..total).for_each(|i| b.append(i != 0));
        NullBuffer::new(b.finish())
    });
    let row_nulls = null(4).then(|| {
        let mut b = BooleanBufferBuilder::new(n);
        (0..n).for_each(|i| b.append(i != 0));
        NullBuffer::new(b.finish())
    });
    let (item_type, items): (DataType, ArrayRef) = match k.vectors % 4 {
        0 => (
            DataType::Float32,
            Arc::new(Float32Array::new(values.into(), value_nulls)),
        ),
        1 => (
            DataType::Float16,
            Arc::new(Float16Array::new(
                values.iter().map(|&v| half::f16::from_f32(v)).collect(),
                value_nulls,
            )),
        ),
        2 => (
            DataType::Float64,
            Arc::new(Float64Array::new(
                values.iter().map(|&v| f64::from(v)).collect(),
                value_nulls,
            )),
        ),
        _ => (
            DataType::Int32,
            Arc::new(Int32Array::new(
                values.iter().map(|&v| v as i32).collect(),
                value_nulls,
            )),
        ),
    };
    let field = Arc::new(Field::new("item", item_type, true));
    let vectors: ArrayRef = match k.vectors / 4 {
        0 => {
            let w = k.width;
            let items = items.slice(0, w * n);
            Arc::new(
                FixedSizeListArray::try_new(field, i32::try_from(w).ok()?, items, row_nulls)
                    .ok()?,
            )
        }
        1 => Arc::new(
            ListArray::try_new(field, OffsetBuffer::from_lengths(lens), items, row_nulls).ok()?,
        ),
        _ => Arc::new(
            LargeListArray::try_new(field, OffsetBuffer::from_lengths(lens), items, row_nulls)
                .ok()?,
        ),
    };
    let mut fields = vec![
        Field::new("trace_id", ids.data_type().clone(), true),
        Field::new("site", sites.data_type().clone(), true),
        Field::new("activation", vectors.data_type().clone(), true),
    ];
    let mut columns = vec![ids, sites, vectors];
    match k.positions {
        0..=2 => {}
        3 => {
            fields.push(Field::new("position", DataType::Int32, true));
            columns.push(Arc::new(Int32Array::from_iter(
                (0..n).map(|i| (!null(5) || i != 1).then_some(i as i32)),
            )));
        }
        4 => {
            fields.push(Field::new("position", DataType::Int64, true));
            columns.push(Arc::new(Int64Array::from_iter_values((0..n).map(|i| {
                if i == 2 {
                    i64::MAX
                } else {
                    i as i64
                }
            }))));
        }
        5 => {
            fields.push(Field::new("position", DataType::Float32, true));
            columns.push(Arc::new(Float32Array::from_iter_values(
                (0..n).map(|i| i as f32),
            )));
        }
        _ => {
            // the vector column missing, under another name
            fields[2] = Field::new("vectors", columns[2].data_type().clone(), true);
        }
    }
    let metadata: std::collections::HashMap<String, String> = match k.metadata {
        0 | 1 => Default::default(),
        2 => [(
            "actwatch.provenance".to_string(),
            r#"{"*": {"model": "m"}, "a": {"pooling": "none"}}"#.to_string(),
        )]
        .into(),
        3 => [("actwatch.provenance".to_string(), "{not json".to_string())].into(),
        _ => [(
            "actwatch.provenance".to_string(),
            r#"{"*": {"colour": "blue"}}"#.to_string(),
        )]
        .into(),
    };
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let batch = RecordBatch::try_new(schema, columns).ok()?;
    let (offset, len) = k.slice;
    let offset = offset.min(n);
    Some(batch.slice(offset, len.min(n - offset)))
}

/// Record batches handed over in memory (the Python bindings' door), hostile in every column.
#[test]
fn record_batches() {
    run("io::record_batches", 20_000, batch_knobs(), |k, tally| {
        let Some(batch) = record_batch(&k) else {
            return;
        };
        let selector = k.nulls & 0b1011;
        tally.record(&decode_record_batch(batch, selector));
    });
}

/// What to do to a seed monitor's directory.
#[derive(Debug, Clone)]
enum Edit {
    /// Mutate a blob and leave the manifest alone: refused as damaged ("checksum").
    Blob(usize, Vec<Mutation>),
    /// Mutate a blob and reseal its manifest entry: the decoder behind the checksum is reached.
    Resealed(usize, Vec<Mutation>),
    /// Replace nodes of the manifest's JSON with hostile values.
    Manifest(Vec<(u64, u8)>),
    /// Mutate the manifest's bytes.
    ManifestBytes(Vec<Mutation>),
    /// One file with another's bytes, resealed or not.
    Swap(usize, usize, bool),
    /// A file removed.
    Remove(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => (any::<usize>(), mutations(64, 4)).prop_map(|(f, m)| Edit::Blob(f, m)),
        4 => (any::<usize>(), mutations(64, 4)).prop_map(|(f, m)| Edit::Resealed(f, m)),
        4 => proptest::collection::vec((any::<u64>(), any::<u8>()), 1..4).prop_map(Edit::Manifest),
        1 => mutations(256, 4).prop_map(Edit::ManifestBytes),
        1 => (any::<usize>(), any::<usize>(), any::<bool>())
            .prop_map(|(a, b, r)| Edit::Swap(a, b, r)),
        1 => any::<usize>().prop_map(Edit::Remove),
    ]
}

/// The seed monitors' directories edited, loaded, and scored when they load.
#[test]
fn monitor_artifacts() {
    let seeds = seed_monitors();
    let input = (0..seeds.len(), edit());
    run(
        "io::monitor_artifacts",
        3000,
        input,
        |(s, edit): (usize, Edit), tally| {
            let seed = &seeds[s];
            let mut files = seed.files.clone();
            let names: Vec<String> = files.keys().cloned().collect();
            let blobs: Vec<&String> = names.iter().filter(|n| *n != MANIFEST).collect();
            let mut must_refuse = None;
            match edit {
                Edit::Blob(f, m) => {
                    let name = blobs[f % blobs.len()];
                    let bytes = mutated(&files[name], &m, &files[MANIFEST]);
                    if bytes != files[name] {
                        must_refuse = Some("checksum");
                    }
                    files.insert(name.clone(), bytes);
                }
                Edit::Resealed(f, m) => {
                    let name = blobs[f % blobs.len()];
                    let donor = &files[blobs[(f + 1) % blobs.len()]];
                    let bytes = mutated(&files[name], &m, donor);
                    files.insert(name.clone(), bytes);
                    reseal(&mut files, name);
                }
                Edit::Manifest(edits) => {
                    for (pick, kind) in edits {
                        edit_manifest(&mut files, pick, kind);
                    }
                }
                Edit::ManifestBytes(m) => {
                    let bytes = mutated(&files[MANIFEST], &m, &files[blobs[0]]);
                    files.insert(MANIFEST.into(), bytes);
                }
                Edit::Swap(a, b, resealed) => {
                    let (a, b) = (&names[a % names.len()], &names[b % names.len()]);
                    let bytes = files[b].clone();
                    if !resealed && a != MANIFEST && bytes != files[a] {
                        must_refuse = Some("checksum");
                    }
                    files.insert(a.clone(), bytes);
                    if resealed {
                        reseal(&mut files, a);
                    }
                }
                Edit::Remove(f) => {
                    let name = &names[f % names.len()];
                    files.remove(name);
                    must_refuse = Some(if name == MANIFEST {
                        "not a monitor directory"
                    } else {
                        "cannot read blob"
                    });
                }
            }
            check_artifact(&files, must_refuse, tally);
        },
    );
}

/// Fit states, calibration parts and checkpoints, mutated (refused as damaged) or mutated and
/// resealed (decoded, and used as a fit in parts uses them).
#[test]
fn fit_frames() {
    let seeds = frame_seeds();
    let input = (0..seeds.len(), 0..3usize, any::<bool>(), mutations(32, 4));
    run(
        "io::fit_frames",
        5000,
        input,
        |(s, kind, resealed, m): (usize, usize, bool, Vec<Mutation>), tally| {
            let seed = &seeds[s];
            let kind = FrameKind::ALL[kind];
            let Some(original) = seed.bytes(kind) else {
                return;
            };
            let donor = &seed.fit_state;
            let mut bytes = mutated(original, &m, donor);
            if resealed {
                frames::reseal(&mut bytes);
            }
            let must_refuse = !resealed && bytes != original;
            check_frame(seed, kind, &bytes, must_refuse, tally);
        },
    );
}

/// With `ACTWATCH_FUZZ_CORPUS=DIR`, writes the cargo-fuzz targets' seed corpus under `DIR`
/// (`scripts/fuzz.sh` does); without it, nothing.
#[test]
fn write_corpus() {
    if let Some(dir) = std::env::var_os("ACTWATCH_FUZZ_CORPUS") {
        let n = actwatch_testkit::fuzz::targets::write_corpus(std::path::Path::new(&dir)).unwrap();
        eprintln!("wrote {n} seed inputs under {}", dir.to_string_lossy());
    }
}

/// The cargo-fuzz targets' bodies run through their seed corpus (what `scripts/fuzz.sh` starts
/// libFuzzer from) without a panic.
#[test]
fn corpus_runs_through_the_targets() {
    use actwatch_testkit::fuzz::targets;
    let dir = tempfile::tempdir().unwrap();
    targets::write_corpus(dir.path()).unwrap();
    for target in targets::TARGETS {
        let run: fn(&[u8]) = match target {
            "proto_requests" => targets::proto_requests,
            "trace_reader" => targets::trace_reader,
            "monitor_artifact" => targets::monitor_artifact,
            _ => targets::fit_frames,
        };
        let inputs = std::fs::read_dir(dir.path().join(target)).unwrap();
        for input in inputs {
            run(&std::fs::read(input.unwrap().path()).unwrap());
        }
    }
}

/// Every seed is itself accepted (the fuzzing starts from inputs that reach the end).
#[test]
fn seeds_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    for seed in seed_trace_files() {
        let path = dir.path().join(format!("{}.parquet", seed.name));
        std::fs::write(&path, &seed.bytes).unwrap();
        for options in 0..16 {
            let rows = read_trace_file(&path, seed.selector | options)
                .unwrap_or_else(|e| panic!("{} ({options}): {e}", seed.name));
            assert!(rows > 0 || options & 8 != 0, "{}: no rows", seed.name);
        }
    }
    for seed in seed_monitors() {
        let mut tally = Tally::default();
        check_artifact(&seed.files, None, &mut tally);
        assert_eq!(tally.accepted, 1, "{}", seed.name);
    }
    for seed in frame_seeds() {
        for kind in FrameKind::ALL {
            if let Some(bytes) = seed.bytes(kind) {
                let mut tally = Tally::default();
                check_frame(seed, kind, bytes, false, &mut tally);
                assert_eq!(tally.accepted, 1, "{} {kind:?}", seed.name);
            }
        }
    }
}

// Regressions: each input the suite once failed on, as it found it (the seeds are deterministic,
// so a mutation means the same bytes every time).

/// The Parquet decoder (parquet 60.1) panics on these corrupt pages and footers instead of
/// returning an error; the reader turns its panics into errors naming the file.
#[test]
fn decoder_panics_on_corrupt_pages_are_errors() {
    let seeds = seed_trace_files();
    let seed = |name: &str| seeds.iter().find(|s| s.name == name).unwrap();
    let cases: [(&str, Vec<Mutation>); 3] = [
        // "range end index 30 out of range for slice of length 12" (list-f16, one bit)
        (
            "list-f16",
            vec![Mutation::FlipBit {
                region: Region::Anywhere,
                at: 426_713_580,
                bit: 3,
            }],
        ),
        // "slice must not be empty" (arrow-buffer's bit_util, from definition levels)
        (
            "list-f16",
            vec![Mutation::SetInt {
                region: Region::Anywhere,
                at: 672_734_566,
                width: 0,
                value: 65535,
            }],
        ),
        // "column start and length should not be negative" (a column chunk's metadata)
        (
            "minilm-like",
            vec![
                Mutation::SetInt {
                    region: Region::Anywhere,
                    at: 2_310_053_283,
                    width: 0,
                    value: 65535,
                },
                Mutation::SetByte {
                    region: Region::Head(64),
                    at: 1_704_402_912,
                    value: 83,
                },
            ],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.parquet");
    for (name, m) in cases {
        let s = seed(name);
        std::fs::write(&path, mutated(&s.bytes, &m, &[])).unwrap();
        for options in [0, 1, 2] {
            let e = read_trace_file(&path, s.selector | options);
            assert!(e.is_err(), "{name} {m:?}: the corrupt file was read");
            eprintln!("{name} ({options}): {}", e.unwrap_err());
        }
    }
}

/// parquet 60.1 reserves a string dictionary page's declared value count before decoding it: four
/// bytes inserted near the start of a segment made a 1.6 kB file ask for 3.4 GB at once (the
/// process aborted under the suite's allocator). The reader now checks each dictionary page's
/// count against its bytes first (`reader::check_dictionary_pages`).
#[test]
fn string_dictionary_counts_are_checked_before_they_are_allocated() {
    let seeds = seed_trace_files();
    let seed = seeds.iter().find(|s| s.name == "segment-f32").unwrap();
    let m = [Mutation::Insert {
        region: Region::Head(64),
        at: 860_474_658,
        bytes: vec![214, 167, 146, 184],
    }];
    let bytes = mutated(&seed.bytes, &m, &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.parquet");
    std::fs::write(&path, &bytes).unwrap();
    for options in [0, 2] {
        let (result, largest) =
            largest_allocation(|| read_trace_file(&path, seed.selector | options));
        assert!(
            largest <= read_budget(bytes.len()),
            "{largest} bytes at once"
        );
        let e = result.expect_err("the corrupt file was read");
        eprintln!("segment-f32 ({options}): {e}");
    }
}

/// A manifest that declares a blob of 2^64-1 (or 2^40) bytes: the blob was read into a buffer
/// of that capacity ("capacity overflow" panic, or an abort allocating 1 TiB); now the file's
/// size is compared first.
#[test]
fn declared_blob_sizes_are_not_allocated() {
    for bytes in [u64::MAX, 1 << 40, 1 << 32] {
        let mut files = seed_monitors()[0].files.clone();
        let mut manifest: serde_json::Value = serde_json::from_slice(&files[MANIFEST]).unwrap();
        manifest["sites"][0]["blob"]["bytes"] = bytes.into();
        files.insert(MANIFEST.into(), serde_json::to_vec(&manifest).unwrap());
        let mut tally = Tally::default();
        check_artifact(&files, Some("checksum"), &mut tally);
    }
}

/// A calibration blob, resealed, that holds length strata without a calibration: it loaded,
/// and scoring indexed an empty list; now decoding refuses it.
#[test]
fn length_strata_without_calibrations_are_refused() {
    let mut files = seed_monitors()[0].files.clone();
    files.insert("calibration.bin".into(), vec![0u8; 16]);
    reseal(&mut files, "calibration.bin");
    let mut tally = Tally::default();
    check_artifact(&files, None, &mut tally);
    assert_eq!(tally.refused, 1);
}

/// Resealed frames that decoded into states a fit cannot use: a checkpoint whose probe examples
/// point past their labels (merge indexed out of bounds), a calibration part whose detectors
/// scored different traces (calibration indexed out of bounds). Now refused when decoded or
/// absorbed.
#[test]
fn inconsistent_fit_states_are_refused() {
    let seeds = frame_seeds();
    let cases = [
        (
            "probe",
            FrameKind::Checkpoint,
            Mutation::SetInt {
                region: Region::Anywhere,
                at: 3_845_527_583,
                width: 0,
                value: 1_665_361_744_427,
            },
        ),
        (
            "joint",
            FrameKind::CalibrationPart,
            Mutation::SetInt {
                region: Region::Anywhere,
                at: 374_527_838,
                width: 3,
                value: 0,
            },
        ),
    ];
    for (name, kind, m) in cases {
        let seed = seeds.iter().find(|s| s.name == name).unwrap();
        let mut bytes = mutated(seed.bytes(kind).unwrap(), &[m], &[]);
        frames::reseal(&mut bytes);
        let mut tally = Tally::default();
        check_frame(seed, kind, &bytes, false, &mut tally);
        if kind == FrameKind::Checkpoint {
            assert_eq!(tally.refused, 1, "{name}: decoded");
        }
    }
}
