//! Monitor artifacts: directories of `manifest.json` and bincode blobs, loaded by
//! [`load_monitor`]; a monitor that loads is scored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use actwatch_core::{SiteBatch, Vectors};
use actwatch_detect::monitor::{Monitor, MonitorOptions};
use actwatch_detect::probe::ProbeSpec;
use actwatch_detect::score::OpenComputations;
use actwatch_detect::spec::DetectorSpec;
use actwatch_io::artifact::{load_monitor, save_monitor, MANIFEST};
use actwatch_io::pipeline::{fit_monitor_with_examples, ExampleInput, NoProgress};
use actwatch_io::reader::{ReadOptions, TraceColumns};
use actwatch_io::writer::TraceWriter;
use serde_json::Value;

use super::{sha256_hex, Tally};
use crate::alloc::largest_allocation;
use crate::Rng;

/// Synthetic reference traces in a temporary directory: `reference.parquet` (160 computations,
/// sites `a` and `b`, width 6, pooled) and `examples.parquet` (60 labelled computations at site
/// `a`, half of them shifted: the concept).
pub struct Reference {
    _dir: tempfile::TempDir,
    pub files: Vec<PathBuf>,
    pub examples: PathBuf,
    pub read: ReadOptions,
}

/// The vector width of [`Reference`]'s sites.
pub const WIDTH: usize = 6;

/// Writes [`Reference`].
pub fn reference() -> Reference {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let columns = TraceColumns::default();
    let mut rng = Rng::new(11);
    let batch = |site: &str, ids: Vec<String>, rows: Vec<f32>| {
        SiteBatch::new(site, ids, None, Vectors::new(WIDTH, rows).expect("rows")).expect("a batch")
    };
    let path = dir.path().join("reference.parquet");
    let mut w = TraceWriter::create(&path, WIDTH, &columns, None).expect("a writer");
    let ids: Vec<String> = (0..160).map(|i| format!("c{i}")).collect();
    for (site, offset) in [("a", 0.0), ("b", 3.0)] {
        let rows = rng.correlated_rows(ids.len(), WIDTH, offset, 5);
        w.write(batch(site, ids.clone(), rows)).expect("writing");
    }
    w.finish().expect("finishing");
    let examples = dir.path().join("examples.parquet");
    let mut w =
        TraceWriter::create_labelled(&examples, WIDTH, &columns, None, "label").expect("a writer");
    let ids: Vec<String> = (0..60).map(|i| format!("e{i}")).collect();
    let labels: Vec<bool> = (0..60).map(|i| i % 2 == 0).collect();
    let mut rows = rng.correlated_rows(ids.len(), WIDTH, 0.0, 5);
    for (row, &l) in rows.chunks_exact_mut(WIDTH).zip(&labels) {
        if l {
            row.iter_mut().for_each(|v| *v += 1.5);
        }
    }
    w.write_labelled(batch("a", ids, rows), labels)
        .expect("writing");
    w.finish().expect("finishing");
    Reference {
        _dir: dir,
        files: vec![path],
        examples,
        read: ReadOptions::default(),
    }
}

/// The options of the seed monitors (and fit states): `joint` (Gaussian and exact kNN, a joint
/// Gaussian), `hnsw-lowrank` (a rank-2 Gaussian and an HNSW kNN, no joint detector) and
/// `probe` (a Gaussian and a difference-of-means concept probe at site `a`).
pub fn seed_options() -> Vec<(&'static str, MonitorOptions)> {
    let base = MonitorOptions {
        fpr: 0.1,
        length_strata: 1,
        ..MonitorOptions::default()
    };
    vec![
        ("joint", base.clone()),
        (
            "hnsw-lowrank",
            MonitorOptions {
                detectors: DetectorSpec::parse_list(
                    "gaussian:rank=2,knn:k=3,exact_max=0,ef_construction=16,ef_search=16",
                )
                .expect("valid detectors"),
                joint: Vec::new(),
                ..base.clone()
            },
        ),
        (
            "probe",
            MonitorOptions {
                detectors: DetectorSpec::parse_list("gaussian").expect("valid detectors"),
                joint: Vec::new(),
                probes: vec![ProbeSpec::parse("p:kind=diff_means,sites=a").expect("a probe")],
                ..base
            },
        ),
    ]
}

/// A monitor directory, file name to bytes.
pub type Files = BTreeMap<String, Vec<u8>>;

/// One seed monitor: its name and files.
pub struct SeedMonitor {
    pub name: &'static str,
    pub files: Files,
}

/// The seed monitors, fitted on [`reference`] with each of [`seed_options`] and saved with
/// `save_monitor` (once per process).
pub fn seed_monitors() -> &'static [SeedMonitor] {
    static SEEDS: OnceLock<Vec<SeedMonitor>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let r = reference();
        let examples = ExampleInput::new(std::slice::from_ref(&r.examples), &r.read, "label")
            .expect("examples");
        let dir = tempfile::tempdir().expect("a temporary directory");
        seed_options()
            .into_iter()
            .map(|(name, options)| {
                let ex = (!options.probes.is_empty()).then_some(&examples);
                let (monitor, summary) =
                    fit_monitor_with_examples(&r.files, &r.read, options, ex, &NoProgress)
                        .unwrap_or_else(|e| panic!("fitting the {name} seed monitor: {e}"));
                let out = dir.path().join(name);
                save_monitor(&monitor, &summary, &out).expect("saving a seed monitor");
                let files = std::fs::read_dir(&out)
                    .expect("listing a seed monitor")
                    .map(|e| {
                        let e = e.expect("an entry");
                        let name = e.file_name().to_string_lossy().into_owned();
                        (name, std::fs::read(e.path()).expect("reading a seed file"))
                    })
                    .collect();
                SeedMonitor { name, files }
            })
            .collect()
    })
}

/// Points every blob entry of the manifest that names `file` (`{"file", "bytes", "sha256"}`,
/// wherever it is) at `file`'s current bytes, as a writer that meant them would have: the
/// checksums then let the bytes through to the decoder. Nothing when the manifest is not JSON.
pub fn reseal(files: &mut Files, file: &str) {
    fn visit(v: &mut Value, file: &str, bytes: u64, sha: &str) {
        match v {
            Value::Object(o) => {
                if o.get("file").and_then(Value::as_str) == Some(file) && o.contains_key("sha256") {
                    o.insert("bytes".into(), bytes.into());
                    o.insert("sha256".into(), sha.into());
                }
                o.values_mut().for_each(|c| visit(c, file, bytes, sha));
            }
            Value::Array(a) => a.iter_mut().for_each(|c| visit(c, file, bytes, sha)),
            _ => {}
        }
    }
    let Some(content) = files.get(file) else {
        return;
    };
    let (bytes, sha) = (content.len() as u64, sha256_hex(content));
    let Some(Ok(mut manifest)) = files
        .get(MANIFEST)
        .map(|m| serde_json::from_slice::<Value>(m))
    else {
        return;
    };
    visit(&mut manifest, file, bytes, &sha);
    files.insert(
        MANIFEST.into(),
        serde_json::to_vec_pretty(&manifest).expect("JSON"),
    );
}

/// Replaces the `pick`-th node (pre-order, modulo their number) of the manifest's JSON with the
/// hostile value `kind` names: numbers at the edges (0, -1, 2^64-1, 1e300, 2^40, a fraction),
/// strings (empty, path escapes, a dot file, 100 kB, another blob's name), null, booleans,
/// empty containers, or the node doubled (an array twice as long). Nothing when it is not JSON.
pub fn edit_manifest(files: &mut Files, pick: u64, kind: u8) {
    fn count(v: &Value) -> u64 {
        1 + match v {
            Value::Object(o) => o.values().map(count).sum(),
            Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    fn hostile(old: &Value, kind: u8) -> Value {
        match kind % 20 {
            0 => 0.into(),
            1 => (-1).into(),
            2 => u64::MAX.into(),
            3 => 1e300.into(),
            4 => (1u64 << 40).into(),
            5 => 0.5.into(),
            6 => i64::MIN.into(),
            7 => "".into(),
            8 => "../manifest.json".into(),
            9 => ".hidden".into(),
            10 => "x".repeat(100_000).into(),
            11 => "site-0.bin".into(),
            12 => "calibration.bin".into(),
            13 => Value::Null,
            14 => true.into(),
            15 => Value::Array(Vec::new()),
            16 => Value::Object(Default::default()),
            17 => match old {
                Value::Array(a) => Value::Array(a.iter().chain(a).cloned().collect()),
                Value::String(s) => format!("{s}{s}").into(),
                other => other.clone(),
            },
            18 => match old {
                Value::Array(a) => Value::Array(a.iter().skip(1).cloned().collect()),
                Value::Number(n) => (n.as_f64().unwrap_or(0.0) + 1.0).into(),
                other => other.clone(),
            },
            _ => 4_294_967_296u64.into(),
        }
    }
    fn replace(v: &mut Value, target: &mut u64, kind: u8) -> bool {
        if *target == 0 {
            *v = hostile(v, kind);
            return true;
        }
        *target -= 1;
        match v {
            Value::Object(o) => o.values_mut().any(|c| replace(c, target, kind)),
            Value::Array(a) => a.iter_mut().any(|c| replace(c, target, kind)),
            _ => false,
        }
    }
    let Some(Ok(mut manifest)) = files
        .get(MANIFEST)
        .map(|m| serde_json::from_slice::<Value>(m))
    else {
        return;
    };
    let mut target = pick % count(&manifest);
    replace(&mut manifest, &mut target, kind);
    files.insert(
        MANIFEST.into(),
        serde_json::to_vec_pretty(&manifest).expect("JSON"),
    );
}

/// The most one allocation may take while loading a monitor of `bytes` bytes in all: its blobs
/// read whole, the vectors they hold, serde's cautious preallocation (1 MiB) and a constant.
pub fn load_budget(bytes: usize) -> usize {
    8 * bytes + (4 << 20)
}

/// Writes `files` as a monitor directory and loads it with [`load_monitor`]: no panic, no single
/// allocation beyond [`load_budget`]; with `must_refuse`, the load must fail with an error that
/// contains it (a changed blob whose manifest entry was not resealed: "checksum"). A monitor that
/// loads is then scored (every site, a few rows, computations completed): a monitor that loads
/// must score without a panic.
pub fn check_artifact(files: &Files, must_refuse: Option<&str>, tally: &mut Tally) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).expect("writing a monitor file");
    }
    let total: usize = files.values().map(Vec::len).sum();
    let budget = load_budget(total);
    let (loaded, largest) = largest_allocation(|| load_monitor(dir.path()));
    assert!(
        largest <= budget,
        "loading a {total}-byte monitor allocated {largest} bytes at once (budget {budget})"
    );
    tally.record(&loaded);
    match (loaded, must_refuse) {
        (Ok(_), Some(why)) => panic!("a monitor whose blob changed loaded (expected {why:?})"),
        (Err(e), Some(why)) => {
            let e = e.to_string();
            assert!(
                e.contains(why),
                "refused for another reason than {why:?}: {e}"
            );
        }
        (Ok((monitor, _)), None) => score(&monitor),
        (Err(_), None) => {}
    }
}

/// Scores three rows (two computations) at every site of `monitor`, then completes them.
pub fn score(monitor: &Monitor) {
    let mut open = OpenComputations::default();
    for s in monitor.sites() {
        if s.dim > 1 << 16 {
            continue;
        }
        let values: Vec<f32> = (0..3 * s.dim)
            .map(|i| ((i * 7) % 11) as f32 - 5.0)
            .collect();
        let batch = SiteBatch::new(
            s.name.clone(),
            vec!["x0".into(), "x1".into(), "x0".into()],
            None,
            Vectors::new(s.dim, values).expect("rows"),
        );
        if let Ok(batch) = batch {
            let _ = open.score(monitor, &batch);
        }
    }
    let _ = open.complete_all(monitor);
}
