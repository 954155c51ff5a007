//! End to end: the real `actwatch` binary on real Parquet files (../shared/data/minilm).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, BooleanArray, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

mod common;
use common::{data, f64_col, fails, fit_train, ok, score_with};

/// One monitor fitted on train.parquet with the default detectors, shared by the tests.
fn monitor() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("monitor");
        let report = fit_train(&out);
        assert!(report.contains("calibration FPR"), "{report}");
        dir
    })
    .path()
    .join("monitor")
    .leak()
}

fn score(input: &Path, out: &Path, extra: &[&str]) -> RecordBatch {
    score_with(monitor(), input, out, extra)
}

fn auroc(normal: &[f64], anomalous: &[f64]) -> f64 {
    let mut s = 0.0;
    for &a in anomalous {
        for &n in normal {
            s += if a > n {
                1.0
            } else if a == n {
                0.5
            } else {
                0.0
            };
        }
    }
    s / (normal.len() * anomalous.len()) as f64
}

#[test]
fn default_monitor_meets_the_peer_bar_and_its_target_fpr() {
    let tmp = tempfile::tempdir().unwrap();
    let id = score(&data("dev_id.parquet"), &tmp.path().join("id.parquet"), &[]);
    assert_eq!(id.num_rows(), 1000, "one row per computation");
    // Constant columns ride along; the per-site, per-detector p-values are there.
    for col in [
        "id",
        "label",
        "text",
        "split",
        "score",
        "p_value",
        "flagged",
        "p_2_gaussian",
        "p_6_knn",
    ] {
        assert!(id.column_by_name(col).is_some(), "missing {col}");
    }
    assert!(
        id.column_by_name("layer").is_none(),
        "the site column varies within a computation"
    );
    let flagged = id
        .column_by_name("flagged")
        .unwrap()
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap()
        .true_count();
    let fpr = flagged as f64 / 1000.0;
    assert!(
        (0.005..=0.015).contains(&fpr),
        "achieved FPR {fpr} at target 0.01"
    );
    let normal = f64_col(&id, "score");
    // The bar is the best single peer per category (../shared/data/minilm/README.md): met for
    // non_english (0.9988) and base64 (0.9995). For code the best peer (0.994) is one detector,
    // layer 2's Gaussian, picked with hindsight; the fused default reaches 0.988 (the weaker layers
    // dilute it, scripts/explore_defaults.py measures every variant) and is held to 0.985 here.
    for (file, bar) in [
        ("dev_ood_code.parquet", 0.985),
        ("dev_ood_non_english.parquet", 0.9988),
        ("dev_ood_base64.parquet", 0.9995),
    ] {
        let ood = score(&data(file), &tmp.path().join(file), &[]);
        let a = auroc(&normal, &f64_col(&ood, "score"));
        assert!(a >= bar, "{file}: AUROC {a:.4} below the peer bar {bar}");
    }
}

#[test]
fn eval_prints_the_table_and_a_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let plot = tmp.path().join("eval.svg");
    let out = ok(&[
        "eval",
        "--monitor",
        monitor().to_str().unwrap(),
        "--normal",
        data("dev_id.parquet").to_str().unwrap(),
        "--anomalous",
        data("dev_ood_code.parquet").to_str().unwrap(),
        data("dev_ood_base64.parquet").to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(out.contains("achieved FPR"), "{out}");
    assert!(
        out.contains("dev_ood_code") && out.contains("dev_ood_base64"),
        "{out}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ROC"));
    // Grouped by label instead of by file.
    let out = ok(&[
        "eval",
        "--monitor",
        monitor().to_str().unwrap(),
        "--normal",
        data("dev_id.parquet").to_str().unwrap(),
        "--anomalous",
        data("dev_ood_code.parquet").to_str().unwrap(),
        "--label-column",
        "label",
    ]);
    assert!(out.contains("\ncode "), "{out}");
}

#[test]
fn trace_level_scores_every_row_and_scoring_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let input = data("dev_ood_code.parquet");
    let a = score(&input, &tmp.path().join("a.parquet"), &["--level", "trace"]);
    assert_eq!(a.num_rows(), 1500);
    for col in [
        "id",
        "layer",
        "score",
        "p_value",
        "flagged",
        "raw_gaussian",
        "p_knn",
    ] {
        assert!(a.column_by_name(col).is_some(), "missing {col}");
    }
    assert!(a.column_by_name("activation").is_none());
    let b = score(&input, &tmp.path().join("b.parquet"), &["--level", "trace"]);
    assert_eq!(f64_col(&a, "score"), f64_col(&b, "score"));
    for p in f64_col(&a, "p_value") {
        assert!(p > 0.0 && p <= 1.0);
    }
}

#[test]
fn refitting_with_the_same_seed_gives_the_same_monitor() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("again");
    fit_train(&out);
    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(monitor().join("manifest.json")).unwrap()).unwrap();
    let m2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m1["reference"]["sha256"], m2["reference"]["sha256"]);
    for (a, b) in m1["sites"]
        .as_array()
        .unwrap()
        .iter()
        .zip(m2["sites"].as_array().unwrap())
    {
        assert_eq!(
            a["blob"]["sha256"], b["blob"]["sha256"],
            "fitting is not reproducible"
        );
    }
}

/// Writes a long-format file with one site "2" whose vectors are `dim` wide.
fn write_traces(path: &Path, dim: i32, values: Vec<f32>, with_site: bool) {
    let rows = values.len() / dim as usize;
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let vectors = FixedSizeListArray::try_new(
        item.clone(),
        dim,
        Arc::new(Float32Array::from(values)),
        None,
    )
    .unwrap();
    let mut fields = vec![Field::new("id", DataType::Utf8, false)];
    let mut cols: Vec<Arc<dyn Array>> = vec![Arc::new(StringArray::from_iter_values(
        (0..rows).map(|i| format!("bad-{i}")),
    ))];
    if with_site {
        fields.push(Field::new("layer", DataType::Int32, false));
        cols.push(Arc::new(Int32Array::from(vec![2; rows])));
    }
    fields.push(Field::new(
        "activation",
        DataType::FixedSizeList(item, dim),
        false,
    ));
    cols.push(Arc::new(vectors));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn assert_rejected(input: &Path, expect: &[&str]) {
    let out = input.with_extension("scores.parquet");
    let err = fails(&[
        "score",
        "--monitor",
        monitor().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    for e in expect {
        assert!(
            err.to_lowercase().contains(&e.to_lowercase()),
            "expected `{e}` in: {err}"
        );
    }
    assert!(
        !out.exists(),
        "an output file was left behind for a failed run"
    );
    let leftovers: Vec<_> = std::fs::read_dir(input.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let wrong_width = tmp.path().join("wrong_width.parquet");
    write_traces(&wrong_width, 100, vec![0.5; 300], true);
    assert_rejected(&wrong_width, &["wrong_width.parquet", "384", "100"]);

    let nan = tmp.path().join("nan.parquet");
    let mut v = vec![0.1f32; 384 * 2];
    v[384 + 7] = f32::NAN;
    write_traces(&nan, 384, v, true);
    assert_rejected(&nan, &["nan.parquet", "non-finite"]);

    let missing = tmp.path().join("missing.parquet");
    write_traces(&missing, 384, vec![0.1; 384], false);
    assert_rejected(&missing, &["missing.parquet", "layer"]);

    let truncated = tmp.path().join("truncated.parquet");
    let bytes = std::fs::read(data("dev_ood_code.parquet")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_rejected(&truncated, &["truncated.parquet"]);

    // Fitting on bad input fails the same way and leaves no monitor behind.
    let out = tmp.path().join("m");
    let err = fails(&[
        "fit",
        "--input",
        nan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--trace-column",
        "id",
        "--site-column",
        "layer",
    ]);
    assert!(err.contains("non-finite"), "{err}");
    assert!(!out.exists());
}

#[test]
fn corrupt_monitor_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("m");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(monitor()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let blob = copy.join("site-0.bin");
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let out = tmp.path().join("s.parquet");
    let score_with_copy = || {
        fails(&[
            "score",
            "--monitor",
            copy.to_str().unwrap(),
            "--input",
            data("dev_ood_code.parquet").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let err = score_with_copy();
    assert!(err.contains("checksum"), "{err}");
    assert!(!out.exists());
    // A half-written monitor (no manifest) is not a monitor.
    std::fs::remove_file(copy.join("manifest.json")).unwrap();
    let err = score_with_copy();
    assert!(err.contains("not a monitor"), "{err}");
}

#[test]
fn demo_runs_with_no_arguments() {
    let out = ok(&["demo"]);
    assert!(
        out.contains("achieved FPR") && out.contains("ood_base64"),
        "{out}"
    );
}

/// `n` computations of sites "a" and "b" (width 8) written by the trace writer, site "a"
/// declaring `pooling`.
fn declared_file(path: &Path, n: usize, seed: u64, pooling: &str) {
    use actwatch_core::{Provenance, SiteBatch, Vectors};
    use actwatch_io::reader::TraceColumns;
    use actwatch_io::writer::TraceWriter;
    let mut rng = actwatch_testkit::Rng::new(seed);
    let ids: Vec<String> = (0..n).map(|i| format!("c{seed}-{i}")).collect();
    let mut w = TraceWriter::create(path, 8, &TraceColumns::default(), None).unwrap();
    let p = Provenance::from_pairs([("model", "net"), ("pooling", pooling)]).unwrap();
    for site in ["a", "b"] {
        let v = Vectors::new(8, rng.gaussian_rows(n, 8, 0.0)).unwrap();
        let b = SiteBatch::new(site, ids.clone(), None, v).unwrap();
        w.write(b.with_provenance((site == "a").then(|| Arc::new(p.clone()))))
            .unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn score_refuses_an_archive_captured_another_way_unless_told_to_warn() {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, archive, monitor) = (
        tmp.path().join("ref.parquet"),
        tmp.path().join("archive.parquet"),
        tmp.path().join("monitor"),
    );
    declared_file(&reference, 600, 1, "mean");
    declared_file(&archive, 30, 2, "last");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let report = ok(&[
        "fit",
        "--input",
        &s(&reference),
        "--out",
        &s(&monitor),
        "--detectors",
        "gaussian",
    ]);
    assert!(
        report.contains("provenance of site a: model=net, pooling=mean"),
        "{report}"
    );
    assert!(
        report.contains("provenance of site b: undeclared"),
        "{report}"
    );
    let score = |policy: &str, out: &str| {
        common::actwatch(&[
            "score",
            "--monitor",
            &s(&monitor),
            "--input",
            &s(&archive),
            "--output",
            &s(&tmp.path().join(out)),
            "--provenance-policy",
            policy,
        ])
    };
    let refused = score("refuse", "refused.parquet");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("archive.parquet") && stderr.contains("pooling \"last\""),
        "{stderr}"
    );
    assert!(
        !tmp.path().join("refused.parquet").exists(),
        "nothing written"
    );
    let warned = score("warn", "warned.parquet");
    let stderr = String::from_utf8_lossy(&warned.stderr);
    assert!(warned.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: site a: the input declares pooling \"last\""),
        "{stderr}"
    );
    assert_eq!(
        common::read_all(&tmp.path().join("warned.parquet")).num_rows(),
        30
    );
}

/// A file of the shared concept data set (harmful vs benign requests, `concept` 1 or 0).
fn concepts(name: &str) -> std::path::PathBuf {
    data("train.parquet")
        .parent()
        .unwrap()
        .join("../concepts")
        .join(name)
}

#[test]
fn concept_probes_fit_score_and_evaluate_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let fit = |extra: &[&str]| {
        let mut args = vec![
            "fit",
            "--input",
            data("train.parquet").to_str().unwrap().to_owned().leak(),
            "--out",
            out.to_str().unwrap().to_owned().leak(),
            "--trace-column",
            "id",
            "--site-column",
            "layer",
            "--joint",
            "none",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let train = concepts("train.parquet");
    let train = train.to_str().unwrap();
    let args = fit(&[
        "--examples",
        train,
        "--label-column",
        "concept",
        "--probe",
        "harmful_request:defer_fpr=0.05",
        "--probe",
        "lr6:kind=logistic,sites=6",
    ]);
    let report = ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for want in [
        "probe harmful_request (diff_means)",
        "probe lr6 (logistic)",
        "cross-validated",
        "recall at FPR 0.01",
        "deferred (cascade band)",
    ] {
        assert!(report.contains(want), "missing {want:?} in:\n{report}");
    }

    // Scored output: per probe its p-value, flag, verdict; consistent with each other.
    let dev = concepts("dev.parquet");
    let scored = score_with(&out, &dev, &tmp.path().join("dev.parquet"), &[]);
    let p = f64_col(&scored, "p_probe_harmful_request");
    let flagged = scored
        .column_by_name("flagged_probe_harmful_request")
        .unwrap()
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap()
        .clone();
    let verdict = scored
        .column_by_name("verdict_probe_harmful_request")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap()
        .clone();
    let concept = scored
        .column_by_name("concept")
        .expect("the label rides along as a constant column");
    let concept = arrow::compute::cast(concept, &DataType::Int32).unwrap();
    let concept = concept.as_any().downcast_ref::<Int32Array>().unwrap();
    assert_eq!(p.len(), 1116);
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for (i, &pi) in p.iter().enumerate() {
        assert_eq!(flagged.value(i), pi <= 0.01);
        let v = verdict.value(i);
        assert_eq!(v == "flag", flagged.value(i));
        assert_eq!(v == "defer", !flagged.value(i) && pi <= 0.05);
        // Smaller p-value = more of the concept.
        if concept.value(i) == 1 {
            pos.push(-p[i])
        } else {
            neg.push(-p[i])
        }
    }
    // The default probe on the style-shifted dev set at least matches the best peer's AUROC
    // (difference of means, layer 6: 0.815; measured 0.83, docs/experiments/probes.md), and its
    // false-positive rate on dev's benign requests stays near the target.
    let a = auroc(&neg, &pos);
    assert!(a > 0.8, "dev AUROC {a}");
    let fpr = (0..p.len())
        .filter(|&i| concept.value(i) == 0 && flagged.value(i))
        .count() as f64
        / neg.len() as f64;
    assert!(fpr <= 0.03, "dev benign FPR {fpr}");

    let table = ok(&[
        "eval",
        "--monitor",
        out.to_str().unwrap(),
        "--examples",
        dev.to_str().unwrap(),
        "--label-column",
        "concept",
        "--group-column",
        "label",
    ]);
    for want in [
        "probe harmful_request (diff_means, sites 2+4+6)",
        "dna_malicious_uses",
        "freshqa",
        "defer+",
    ] {
        assert!(table.contains(want), "missing {want:?} in:\n{table}");
    }

    // Bad input: refused with a clear message, nothing stored.
    let bad_out = tmp.path().join("bad");
    let refused = |extra: &[&str], expect: &str| {
        let mut args = fit(extra);
        let i = args
            .iter()
            .position(|a| a == out.to_str().unwrap())
            .unwrap();
        args[i] = bad_out.to_str().unwrap().to_string();
        let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
        assert!(!bad_out.exists(), "a monitor was written for a refused fit");
    };
    // A label column of the wrong type (the source name, a string).
    refused(
        &[
            "--examples",
            train,
            "--label-column",
            "label",
            "--probe",
            "p",
        ],
        "expected a label",
    );
    // A missing label column.
    refused(
        &[
            "--examples",
            train,
            "--label-column",
            "nope",
            "--probe",
            "p",
        ],
        "no column \"nope\"",
    );
    // Examples without a probe, a probe without examples.
    refused(
        &["--examples", train, "--label-column", "concept"],
        "--probe",
    );
    refused(&["--probe", "p"], "--examples");
    // A bad spec.
    refused(
        &[
            "--examples",
            train,
            "--label-column",
            "concept",
            "--probe",
            "p:kind=svm",
        ],
        "unknown kind",
    );
    // A label that is neither 0 nor 1.
    let b = common::read_all(train.as_ref());
    let mut cols = b.columns().to_vec();
    let ci = b.schema().index_of("concept").unwrap();
    let mut values: Vec<i32> = arrow::compute::cast(&cols[ci], &DataType::Int32)
        .unwrap()
        .as_any()
        .downcast_ref::<Int32Array>()
        .unwrap()
        .values()
        .to_vec();
    values[5] = 2;
    cols[ci] = Arc::new(Int32Array::from(values));
    let mut fields: Vec<Field> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[ci] = Field::new("concept", DataType::Int32, false);
    let b = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let two = tmp.path().join("two.parquet");
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(&two).unwrap(), b.schema(), None).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
    refused(
        &[
            "--examples",
            two.to_str().unwrap(),
            "--label-column",
            "concept",
            "--probe",
            "p",
        ],
        "label 2 is not 0 or 1",
    );
}

/// Cross-validated logistic regression on nearly separable examples (a 3-sigma shift; the
/// Python client's probe test data, `tests/data/probe_separable/make.py`) fits: it once failed,
/// its warm-started solves stalling at a gradient of 1.6e-8 that f64 could not lower.
#[test]
fn a_logistic_probe_fits_nearly_separable_examples() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/probe_separable");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let report = ok(&[
        "fit",
        "--input",
        dir.join("ref.parquet").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--examples",
        dir.join("pos.parquet").to_str().unwrap(),
        dir.join("mix.parquet").to_str().unwrap(),
        "--probe",
        "lr:kind=logistic",
        "--fpr",
        "0.05",
        "--seed",
        "3",
    ]);
    assert!(report.contains("5-fold cross-validated"), "{report}");
    assert!(
        report.contains("recall at FPR 0.05 on 22 held-out positives: 100.0%"),
        "{report}"
    );
}
