//! Provenance through files: written into the Parquet footer by the trace writer, read back per
//! site, recorded by the fit (in the artifact's manifest and the fit checkpoint), and checked
//! when scoring: a conflicting archive is refused, or scored with the same p-values and reported
//! under the "warn" policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_core::{Provenance, SiteBatch, Vectors};
use actwatch_detect::monitor::{MonitorFitter, MonitorOptions, ProvenancePolicy};
use actwatch_detect::spec::DetectorSpec;
use actwatch_io::artifact::{load_monitor, save_monitor};
use actwatch_io::checkpoint::{load_checkpoint, save_checkpoint, FitCheckpoint};
use actwatch_io::pipeline::{fit_monitor, fold_reference, score_computations, NoProgress};
use actwatch_io::reader::{ReadOptions, TraceColumns, TraceReader};
use actwatch_io::writer::TraceWriter;
use actwatch_testkit::Rng;

const DIM: usize = 8;

fn prov(pairs: &[(&str, &str)]) -> Provenance {
    Provenance::from_pairs(pairs.iter().copied()).unwrap()
}

fn reference_provenance() -> Provenance {
    prov(&[
        ("model", "synthetic-net"),
        ("revision", "sha256:0123456789abcdef"),
        ("capture", "actwatch capture"),
        ("pooling", "mean"),
        ("dtype", "float32"),
    ])
}

/// `n` computations with a trace at sites "a" and "b"; site "a" declares `a`, site "b" nothing.
fn write_traces(path: &Path, n: usize, seed: u64, a: Option<Provenance>) -> PathBuf {
    let mut rng = Rng::new(seed);
    let ids: Vec<String> = (0..n).map(|i| format!("c{seed}-{i}")).collect();
    let mut w = TraceWriter::create(path, DIM, &TraceColumns::default(), None).unwrap();
    for (site, declared) in [("a", a.map(Arc::new)), ("b", None)] {
        let v = Vectors::new(DIM, rng.gaussian_rows(n, DIM, 0.0)).unwrap();
        let batch = SiteBatch::new(site, ids.clone(), None, v)
            .unwrap()
            .with_provenance(declared);
        w.write(batch).unwrap();
    }
    w.finish().unwrap();
    path.to_path_buf()
}

fn options() -> MonitorOptions {
    MonitorOptions {
        detectors: DetectorSpec::parse_list("gaussian").unwrap(),
        joint: Vec::new(),
        ..MonitorOptions::default()
    }
}

#[test]
fn the_footer_carries_each_sites_provenance_to_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_traces(
        &dir.path().join("t.parquet"),
        10,
        1,
        Some(reference_provenance()),
    );
    let reader = TraceReader::open(&[path], ReadOptions::default()).unwrap();
    let mut seen = 0;
    for batch in reader {
        for (_, b) in batch.unwrap().site_batches().unwrap() {
            match b.site() {
                "a" => assert_eq!(b.provenance().map(|p| &**p), Some(&reference_provenance())),
                _ => assert_eq!(b.provenance(), None),
            }
            seen += 1;
        }
    }
    assert!(seen >= 2);
    // One file, one provenance per site: a batch that contradicts an earlier one is refused.
    let mut w = TraceWriter::create(
        dir.path().join("u.parquet"),
        DIM,
        &TraceColumns::default(),
        None,
    )
    .unwrap();
    let batch = |p: Provenance| {
        SiteBatch::new(
            "a",
            vec!["x".into()],
            None,
            Vectors::new(DIM, vec![0.5; DIM]).unwrap(),
        )
        .unwrap()
        .with_provenance(Some(Arc::new(p)))
    };
    w.write(batch(prov(&[("pooling", "mean")]))).unwrap();
    let err = w.write(batch(prov(&[("pooling", "last")]))).unwrap_err();
    assert!(err.to_string().contains("pooling \"last\""), "{err}");
}

#[test]
fn a_fit_records_provenance_and_scoring_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let reference = write_traces(
        &dir.path().join("ref.parquet"),
        600,
        1,
        Some(reference_provenance()),
    );
    let read = ReadOptions::default();
    let (monitor, summary) = fit_monitor(
        std::slice::from_ref(&reference),
        &read,
        options(),
        &NoProgress,
    )
    .unwrap();
    let site = |m: &actwatch_detect::Monitor, s: &str| {
        m.sites()[m.site_index(s).unwrap()].provenance.clone()
    };
    assert_eq!(site(&monitor, "a"), reference_provenance());
    assert!(site(&monitor, "b").is_empty());

    // Saved in the manifest, loaded back into the model.
    let out = dir.path().join("monitor");
    let manifest = save_monitor(&monitor, &summary, &out).unwrap();
    assert_eq!(manifest.sites[0].provenance, reference_provenance());
    let (mut loaded, _) = load_monitor(&out).unwrap();
    assert_eq!(site(&loaded, "a"), reference_provenance());

    // Scoring: undeclared and agreeing archives score alike; a conflicting one is refused,
    // naming its file and the field.
    let undeclared = write_traces(&dir.path().join("plain.parquet"), 40, 7, None);
    let same = write_traces(
        &dir.path().join("same.parquet"),
        40,
        7,
        Some(prov(&[("model", "synthetic-net")])),
    );
    let other = write_traces(
        &dir.path().join("other.parquet"),
        40,
        7,
        Some(prov(&[("model", "synthetic-net"), ("pooling", "last")])),
    );
    let score = |m: &actwatch_detect::Monitor, f: &PathBuf| {
        score_computations(m, std::slice::from_ref(f), &read, &NoProgress)
    };
    let base = score(&loaded, &undeclared).unwrap();
    assert!(base.provenance_conflicts.is_empty());
    assert_eq!(score(&loaded, &same).unwrap().results, base.results);
    let Err(err) = score(&loaded, &other) else {
        panic!("a conflicting archive was scored under the refuse policy");
    };
    let err = err.to_string();
    for needle in ["other.parquet", "pooling \"last\"", "\"mean\""] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Warn: the same scores, and the conflict reported.
    loaded.set_provenance_policy(ProvenancePolicy::Warn);
    let warned = score(&loaded, &other).unwrap();
    assert_eq!(warned.results, base.results);
    let c = &warned.provenance_conflicts["a"];
    assert_eq!(
        (c.field, c.declared.as_str(), c.recorded.as_str()),
        ("pooling", "last", "mean")
    );

    // Reference files that contradict each other cannot make one monitor.
    let contradicting = write_traces(
        &dir.path().join("ref2.parquet"),
        50,
        2,
        Some(prov(&[("capture", "transformer_lens")])),
    );
    let err = fit_monitor(&[reference, contradicting], &read, options(), &NoProgress)
        .unwrap_err()
        .to_string();
    for needle in [
        "ref2.parquet",
        "capture \"transformer_lens\"",
        "\"actwatch capture\"",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_checkpointed_fitter_keeps_what_it_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let reference = write_traces(
        &dir.path().join("ref.parquet"),
        50,
        1,
        Some(reference_provenance()),
    );
    let mut fitter = MonitorFitter::new(options()).unwrap();
    fold_reference(
        &mut fitter,
        &[reference],
        &ReadOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let path = dir.path().join("fit.ckpt");
    save_checkpoint(
        &FitCheckpoint {
            folded: vec!["ref.parquet".into()],
            fitter,
        },
        &path,
    )
    .unwrap();
    let resumed = load_checkpoint(&path).unwrap().fitter;
    assert_eq!(resumed.provenance("a"), Some(&reference_provenance()));
    assert_eq!(resumed.provenance("b"), None);
}
