//! Monitor artifacts: a saved and reloaded monitor scores exactly like the fitted one; a damaged
//! one is refused.

use std::path::PathBuf;

use actwatch_detect::monitor::MonitorOptions;
use actwatch_detect::spec::DetectorSpec;
use actwatch_io::artifact::{
    load_monitor, read_manifest, save_monitor, save_monitor_with, FORMAT_VERSION, MANIFEST,
};
use actwatch_io::pipeline::{fit_monitor, score_computations, NoProgress};
use actwatch_io::reader::ReadOptions;
use actwatch_io::Error;
use actwatch_testkit::{fixture, minilm};

fn data(name: &str) -> PathBuf {
    minilm::file(name)
}

fn read(sites: Option<Vec<String>>) -> ReadOptions {
    ReadOptions {
        sites,
        ..minilm::read_options()
    }
}

fn round_trip(options: MonitorOptions, sites: Option<Vec<String>>) {
    let r = read(sites);
    let (fitted, reference) = fixture::fit_minilm(options, &r);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("monitor");
    save_monitor(&fitted, &reference, &out).unwrap();
    let (loaded, manifest) = load_monitor(&out).unwrap();
    assert_eq!(manifest.reference, reference);
    assert_eq!(&manifest.options, fitted.options());
    let input = [data("dev_ood_code.parquet"), data("dev_id.parquet")];
    let a = score_computations(&fitted, &input, &r, &NoProgress).unwrap();
    let b = score_computations(&loaded, &input, &r, &NoProgress).unwrap();
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.results, b.results, "reloaded monitor scores differently");
    assert!(!a.results.is_empty());
}

#[test]
fn default_monitor_round_trips_to_identical_scores() {
    round_trip(MonitorOptions::default(), None);
}

/// A monitor with concept probes (fitted on the shared concept data) round-trips: same
/// probes, same probe p-values; its manifest says version 3 and holds the probes' summaries; a
/// damaged probe blob is refused.
#[test]
fn probes_round_trip_to_identical_results() {
    use actwatch_detect::probe::ProbeSpec;
    use actwatch_io::pipeline::{fit_monitor_with_examples, ExampleInput};
    let r = read(Some(vec!["4".into(), "6".into()]));
    let concepts = minilm::dir().join("../concepts");
    let examples = ExampleInput::new(&[concepts.join("train.parquet")], &r, "concept").unwrap();
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list("gaussian").unwrap(),
        probes: vec![
            ProbeSpec::parse("harm:defer_fpr=0.05").unwrap(),
            ProbeSpec::parse("lr:kind=logistic,c=1,sites=6,reference_negatives=true").unwrap(),
        ],
        ..MonitorOptions::default()
    };
    let (fitted, reference) = fit_monitor_with_examples(
        &[data("train.parquet")],
        &r,
        options,
        Some(&examples),
        &NoProgress,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("monitor");
    save_monitor(&fitted, &reference, &out).unwrap();
    let (loaded, manifest) = load_monitor(&out).unwrap();
    assert_eq!(manifest.format_version, FORMAT_VERSION);
    let names: Vec<&str> = manifest.probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["harm", "lr"]);
    assert!(manifest.probes[0].summary.recall.unwrap() > 0.5);
    assert!(manifest.probes[1].summary.sites[0].fit.reference > 0);
    let input = [concepts.join("dev.parquet")];
    let a = score_computations(&fitted, &input, &r, &NoProgress).unwrap();
    let b = score_computations(&loaded, &input, &r, &NoProgress).unwrap();
    assert_eq!(a.results, b.results, "reloaded monitor scores differently");
    assert_eq!(a.results[0].probes.len(), 2);
    let blob = out.join(&manifest.probes[1].blob.file);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    assert!(matches!(load_monitor(&out), Err(Error::Artifact(m)) if m.contains("checksum")));
}

#[test]
fn hnsw_monitor_round_trips_to_identical_scores() {
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list("knn:exact_max=0,ef_construction=64,ef_search=32")
            .unwrap(),
        ..MonitorOptions::default()
    };
    let r = read(Some(vec!["2".into()]));
    let (fitted, _) = fixture::fit_minilm(options.clone(), &r);
    let recall = &fitted.summary().knn_recall;
    assert_eq!(recall.len(), 1, "HNSW recall is measured at fit time");
    assert!(
        recall[0].recall >= 0.9,
        "recall@10 {} below 0.9",
        recall[0].recall
    );
    round_trip(options.clone(), Some(vec!["2".into()]));

    // The graph is kept with the monitor and loaded as it was built, not rebuilt; a monitor
    // without it (as saved before graphs were kept) rebuilds the same graph; a damaged one is
    // refused like any blob.
    let graph = |m: &actwatch_detect::Monitor| -> actwatch_detect::KnnIndex {
        match &m.sites()[0].detectors[0] {
            actwatch_detect::spec::FittedDetector::Knn(k) => k.index().unwrap().clone(),
            other => panic!("not a kNN detector: {other:?}"),
        }
    };
    let (fitted, reference) = fixture::fit_minilm(options, &r);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("monitor");
    let manifest = save_monitor(&fitted, &reference, &out).unwrap();
    let index = manifest.sites[0].index.clone().expect("the graph is saved");
    assert_eq!(index.file, "site-0-index.bin");
    let (loaded, _) = load_monitor(&out).unwrap();
    assert!(graph(&loaded) == graph(&fitted));

    let manifest_path = out.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
    old["sites"][0].as_object_mut().unwrap().remove("index");
    std::fs::write(&manifest_path, serde_json::to_vec(&old).unwrap()).unwrap();
    let (rebuilt, _) = load_monitor(&out).unwrap();
    assert!(graph(&rebuilt) == graph(&fitted));
    std::fs::write(&manifest_path, &text).unwrap();

    let blob = out.join(&index.file);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    assert!(matches!(load_monitor(&out), Err(Error::Artifact(m)) if m.contains("checksum")));
}

#[test]
fn damaged_monitors_are_refused() {
    let r = read(Some(vec!["4".into()]));
    let (fitted, reference) = fixture::fit_minilm(MonitorOptions::default(), &r);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    save_monitor(&fitted, &reference, &out).unwrap();
    // Saving again replaces the monitor atomically and leaves no temporary directory behind.
    save_monitor(&fitted, &reference, &out).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["m".to_string()]);

    let blob = out.join("site-0.bin");
    let good = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &good[..good.len() - 10]).unwrap();
    assert!(matches!(load_monitor(&out), Err(Error::Artifact(m)) if m.contains("checksum")));
    std::fs::write(&blob, &good).unwrap();
    load_monitor(&out).unwrap();

    let manifest_path = out.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    // (A monitor without probes is written as the version before them.)
    let written = read_manifest(&out).unwrap().format_version;
    assert!(written <= FORMAT_VERSION);
    let newer = text.replace(
        &format!("\"format_version\": {written}"),
        &format!("\"format_version\": {}", FORMAT_VERSION + 1),
    );
    assert_ne!(newer, text);
    std::fs::write(&manifest_path, newer).unwrap();
    assert!(matches!(read_manifest(&out), Err(Error::Artifact(m)) if m.contains("not supported")));
    std::fs::write(&manifest_path, &text[..text.len() / 2]).unwrap();
    assert!(
        matches!(load_monitor(&out), Err(Error::Artifact(m)) if m.contains("corrupt manifest"))
    );

    // A directory that is not a monitor is never replaced.
    let other = dir.path().join("not-a-monitor");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("precious.txt"), "keep me").unwrap();
    assert!(save_monitor(&fitted, &reference, &other).is_err());
    assert!(other.join("precious.txt").exists());
}

/// Extra files (the server's fit record) are installed with the monitor in its one rename, and
/// the loader ignores them; names that could clash with the monitor's own files are refused.
#[test]
fn extra_files_are_installed_with_the_monitor() {
    let r = read(Some(vec!["4".into()]));
    let (fitted, reference) = fixture::fit_minilm(MonitorOptions::default(), &r);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    save_monitor_with(&fitted, &reference, &out, &[("fit.json", b"{\"v\": 2}")]).unwrap();
    assert_eq!(std::fs::read(out.join("fit.json")).unwrap(), b"{\"v\": 2}");
    load_monitor(&out).unwrap();
    for bad in ["manifest.json", "site-0.bin", "../x.json", ".hidden", ""] {
        let e = save_monitor_with(&fitted, &reference, &out, &[(bad, b"x")]).unwrap_err();
        assert!(matches!(e, Error::Artifact(_)), "{bad:?}: {e}");
    }
    // A refused save changed nothing.
    assert_eq!(std::fs::read(out.join("fit.json")).unwrap(), b"{\"v\": 2}");
}

/// Incremental fitting: folding one file, checkpointing, reloading and folding a second file gives
/// the same monitor as one fit over both (same scores to the bit, same provenance), for the
/// Gaussian sufficient statistics and the kNN reservoir alike, including a reservoir that samples.
#[test]
fn resumed_checkpoint_fits_exactly_like_a_full_fit() {
    use actwatch_detect::monitor::MonitorFitter;
    use actwatch_io::checkpoint::{load_checkpoint, save_checkpoint, FitCheckpoint};
    use actwatch_io::pipeline::{calibrate_reference, fold_reference};

    let r = read(None);
    let files = [data("train.parquet"), data("dev_ood_non_english.parquet")];
    for detectors in ["gaussian,knn", "knn:max_references=3000"] {
        let options = MonitorOptions {
            detectors: DetectorSpec::parse_list(detectors).unwrap(),
            ..MonitorOptions::default()
        };
        let (full, full_ref) = fit_monitor(&files, &r, options.clone(), &NoProgress).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fitter.bin");
        let mut first = MonitorFitter::new(options.clone()).unwrap();
        fold_reference(&mut first, &files[..1], &r, &NoProgress).unwrap();
        let ck = FitCheckpoint {
            folded: vec!["train".into()],
            fitter: first,
        };
        save_checkpoint(&ck, &path).unwrap();
        drop(ck);
        let FitCheckpoint { folded, mut fitter } = load_checkpoint(&path).unwrap();
        assert_eq!(folded, ["train"]);
        let rows = fold_reference(&mut fitter, &files[1..], &r, &NoProgress).unwrap();
        assert_eq!(rows, 1500, "only the new file is read in the fit pass");
        let (resumed, resumed_ref) = calibrate_reference(fitter, &files, &r, &NoProgress).unwrap();

        assert_eq!(resumed_ref, full_ref);
        assert_eq!(
            resumed.summary().calibration_fpr,
            full.summary().calibration_fpr
        );
        let input = [data("dev_ood_code.parquet"), data("dev_id.parquet")];
        let a = score_computations(&full, &input, &r, &NoProgress).unwrap();
        let b = score_computations(&resumed, &input, &r, &NoProgress).unwrap();
        assert_eq!(a.ids, b.ids);
        assert_eq!(
            a.results, b.results,
            "{detectors}: resumed fit scores differently"
        );
    }
}

/// A monitor saved in format 1 (one calibration of the fused statistic, before length strata)
/// still loads, as one stratum, and scores as it did.
#[test]
fn format_1_monitors_still_load_as_one_stratum() {
    use sha2::{Digest, Sha256};
    let r = read(Some(vec!["4".into()]));
    let (fitted, reference) = fixture::fit_minilm(MonitorOptions::default(), &r);
    assert_eq!(fitted.fused().len(), 1, "pooled traces: one stratum");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("monitor");
    save_monitor(&fitted, &reference, &out).unwrap();
    // rewrite it as format 1 wrote it: the calibration blob is one Calibration
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(MANIFEST)).unwrap()).unwrap();
    let blob = bincode::serialize(&fitted.fused().calibrations()[0]).unwrap();
    let file = manifest["calibration"]["file"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(out.join(&file), &blob).unwrap();
    manifest["format_version"] = 1.into();
    manifest["calibration"]["bytes"] = (blob.len() as u64).into();
    let sha: String = Sha256::digest(&blob)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    manifest["calibration"]["sha256"] = sha.into();
    std::fs::write(out.join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let (loaded, m) = load_monitor(&out).unwrap();
    assert_eq!(m.format_version, 1);
    assert_eq!(loaded.fused(), fitted.fused());
    let input = [data("dev_ood_code.parquet")];
    let a = score_computations(&fitted, &input, &r, &NoProgress).unwrap();
    let b = score_computations(&loaded, &input, &r, &NoProgress).unwrap();
    assert_eq!(a.results, b.results);
}

/// A fit in parts, as Ray or Spark workers run it: each file folded into its own fit state on a
/// "worker", the states shipped as bytes and merged in file order; each worker then scores its
/// file's calibration part against the merged fit, and the parts are absorbed in order. The
/// monitor equals `fit_monitor` over the same files to the bit (same scores, same calibration),
/// for the Gaussian statistics and the kNN sample alike, including one that samples.
#[test]
fn a_fit_in_parts_equals_one_fit_over_the_same_files() {
    use actwatch_detect::monitor::MonitorFitter;
    use actwatch_io::checkpoint::{
        calibration_part_from_bytes, calibration_part_to_bytes, fitter_from_bytes, fitter_to_bytes,
    };
    use actwatch_io::pipeline::{
        calibrate_batch, calibrate_joint_batch, fold_batch, fold_reference,
    };
    use actwatch_io::reader::TraceReader;

    let r = read(None);
    let files = [
        data("train.parquet"),
        data("dev_ood_non_english.parquet"),
        data("dev_ood_code.parquet"),
        data("dev_id.parquet"),
    ];
    for detectors in ["gaussian,knn", "knn:max_references=3000"] {
        let options = MonitorOptions {
            detectors: DetectorSpec::parse_list(detectors).unwrap(),
            ..MonitorOptions::default()
        };
        let (full, _) = fit_monitor(&files, &r, options.clone(), &NoProgress).unwrap();

        // Pass 1: a fit state per file (read in batches of another size than fit_monitor's:
        // the statistics do not depend on batching), merged in file order.
        let worker_read = ReadOptions {
            batch_rows: 1000,
            ..r.clone()
        };
        let states: Vec<Vec<u8>> = files
            .iter()
            .map(|f| {
                let mut part = MonitorFitter::new(options.clone()).unwrap();
                for batch in
                    TraceReader::open(std::slice::from_ref(f), worker_read.clone()).unwrap()
                {
                    fold_batch(&mut part, &batch.unwrap()).unwrap();
                }
                fitter_to_bytes(&part).unwrap()
            })
            .collect();
        let mut merged = MonitorFitter::new(options.clone()).unwrap();
        for s in &states {
            merged.merge(fitter_from_bytes(s).unwrap()).unwrap();
        }
        let merged = fitter_to_bytes(&merged).unwrap();
        // The fit states themselves (f64 sufficient statistics, kNN samples) are bit-identical to
        // the fit pass of `fit_monitor` (the model's f32 parameters would hide a last-bit
        // difference in the statistics).
        let mut single = MonitorFitter::new(options.clone()).unwrap();
        fold_reference(&mut single, &files, &r, &NoProgress).unwrap();
        assert!(
            fitter_to_bytes(&single).unwrap() == merged,
            "{detectors}: the merged fit state differs from the fit pass over the same files"
        );

        // Pass 2: each worker scores its file's calibration part against the merged fit.
        let parts: Vec<Vec<u8>> = files
            .iter()
            .map(|f| {
                let mut cal = fitter_from_bytes(&merged).unwrap().finish_fit().unwrap();
                for batch in
                    TraceReader::open(std::slice::from_ref(f), worker_read.clone()).unwrap()
                {
                    calibrate_batch(&mut cal, &batch.unwrap()).unwrap();
                }
                calibration_part_to_bytes(&cal.take_part().unwrap()).unwrap()
            })
            .collect();
        let mut cal = fitter_from_bytes(&merged).unwrap().finish_fit().unwrap();
        for p in &parts {
            cal.absorb(calibration_part_from_bytes(p).unwrap()).unwrap();
        }
        // Pass 3 (the default joint detector): each worker scores its file's joint vectors
        // against the joint fit merged from pass 2.
        assert!(cal.joint_wanted());
        let joint_fit = calibration_part_to_bytes(&cal.joint_fit_part().unwrap()).unwrap();
        cal.finish_joint_fit().unwrap();
        assert!(cal.joint_calibrating());
        let joint_parts: Vec<Vec<u8>> = files
            .iter()
            .map(|f| {
                let mut w = fitter_from_bytes(&merged).unwrap().finish_fit().unwrap();
                w.absorb(calibration_part_from_bytes(&joint_fit).unwrap())
                    .unwrap();
                w.finish_joint_fit().unwrap();
                for batch in
                    TraceReader::open(std::slice::from_ref(f), worker_read.clone()).unwrap()
                {
                    calibrate_joint_batch(&mut w, &batch.unwrap()).unwrap();
                }
                calibration_part_to_bytes(&w.take_part().unwrap()).unwrap()
            })
            .collect();
        for p in &joint_parts {
            cal.absorb(calibration_part_from_bytes(p).unwrap()).unwrap();
        }
        let sharded = cal.finish().unwrap();
        assert_eq!(sharded.summary().joint, full.summary().joint);

        assert_eq!(
            sharded.summary().calibration_fpr,
            full.summary().calibration_fpr
        );
        let input = [data("dev_ood_code.parquet"), data("dev_id.parquet")];
        let a = score_computations(&full, &input, &r, &NoProgress).unwrap();
        let b = score_computations(&sharded, &input, &r, &NoProgress).unwrap();
        assert_eq!(a.ids, b.ids);
        assert_eq!(
            a.results, b.results,
            "{detectors}: the fit in parts scores differently"
        );
    }
    // Damaged or foreign bytes are refused, never decoded.
    let f = MonitorFitter::new(MonitorOptions::default()).unwrap();
    let mut bytes = fitter_to_bytes(&f).unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 1;
    assert!(fitter_from_bytes(&bytes).is_err());
    assert!(calibration_part_from_bytes(&fitter_to_bytes(&f).unwrap()).is_err());
}
