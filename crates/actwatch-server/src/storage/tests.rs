//! Storage integrity through the storage API (reliability issue): checksummed segments and their
//! quarantine, the fit version recorded with the fit, and a full disk on every write path.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_core::{SiteBatch, Vectors};
use actwatch_io::pipeline::NoProgress;
use actwatch_proto::v1;
use actwatch_testkit::Rng;
use tonic::{Code, Status};

use super::*;
use crate::fit::{fit_and_install, fit_and_save, FitPlan};

const WIDTH: usize = 8;
/// Rows per site per ingest; every ingest writes one segment holding both sites.
const ROWS: usize = 200;
const SITES: [&str; 2] = ["a", "b"];
const LOG_BYTES: u64 = 1 << 20;

fn open(root: &Path) -> DataDir {
    DataDir::open(root, LOG_BYTES).unwrap()
}

fn create(data: &DataDir, name: &str) -> Arc<MonitorEntry> {
    // Small and quick: one detector, one length stratum, half the computations calibrate.
    let spec = StoredSpec::from_proto(Some(v1::MonitorSpec {
        detectors: vec!["gaussian".into()],
        fpr: 0.05,
        calibration_fraction: 0.5,
        length_strata: 1,
        ..Default::default()
    }))
    .unwrap();
    data.create(name, spec).unwrap()
}

fn batch(site: &str, seed: u64) -> SiteBatch {
    let mut rng = Rng::new(seed);
    let ids = (0..ROWS).map(|i| format!("c{seed}-{i}")).collect();
    let vectors = Vectors::new(WIDTH, rng.gaussian_rows(ROWS, WIDTH, 0.0)).unwrap();
    SiteBatch::new(site, ids, None, vectors).unwrap()
}

/// One IngestReference stream of both sites: one segment of `2 * ROWS` rows.
fn ingest(entry: &Arc<MonitorEntry>, seed: u64) -> Result<(u64, u64)> {
    let mut s = IngestSession::new(entry.clone(), 16, 1 << 20, None);
    for site in SITES {
        s.add(batch(site, seed), actwatch_core::Dtype::F32, 0, None)?;
    }
    s.commit()
}

fn fit(entry: &MonitorEntry) -> Result<Arc<FittedMonitor>> {
    fit_and_install(entry, &FitPlan::all(entry, false), false, &NoProgress)
}

fn monitor_dir(root: &Path, name: &str) -> PathBuf {
    root.join(MONITORS_DIR).join(name)
}

/// What `state.json` on disk lists: (segment files, rows per site).
fn state_on_disk(dir: &Path) -> (Vec<String>, Vec<u64>) {
    let state: MonitorState = read_json(&dir.join(STATE_FILE)).unwrap();
    (
        state.segments.iter().map(|s| s.file.clone()).collect(),
        state.sites.iter().map(|s| s.reference_rows).collect(),
    )
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The fit failed with DATA_LOSS naming `victim`, which is now in `quarantine/` with a reason
/// beside it, out of `reference/` and of `state.json` (its rows subtracted), and a new fit
/// succeeds on the remaining segments, also after a restart.
fn assert_quarantined(root: &Path, data: DataDir, status: Status, victim: &str) {
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let m = status.message();
    assert!(m.contains(victim), "{m}");
    assert!(m.contains("quarantined"), "{m}");
    assert!(m.contains("a new Fit uses the remaining data"), "{m}");

    let dir = monitor_dir(root, "m");
    let quarantined = names_in(&dir.join(QUARANTINE_DIR));
    assert!(quarantined.iter().any(|n| n == victim), "{quarantined:?}");
    assert!(
        quarantined
            .iter()
            .any(|n| n != victim && n.starts_with(victim)),
        "no reason file beside it: {quarantined:?}"
    );
    assert!(!dir.join(REFERENCE_DIR).join(victim).exists());
    let (listed, site_rows) = state_on_disk(&dir);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(!listed.iter().any(|f| f == victim), "{listed:?}");
    assert_eq!(site_rows, [2 * ROWS as u64; 2]);

    let entry = data.get("m").unwrap();
    assert_eq!(entry.state().reference_rows(), 4 * ROWS as u64);
    let fitted = fit(&entry).unwrap();
    assert_eq!(fitted.reference_rows, 4 * ROWS as u64);

    drop((entry, data));
    let data = open(root);
    assert!(data.damaged().is_empty(), "{:?}", data.damaged());
    let entry = data.get("m").unwrap();
    assert_eq!(entry.state().segments.len(), 2);
    assert_eq!(entry.fitted().unwrap().reference_rows, 4 * ROWS as u64);
}

/// Three segments, the middle one then damaged by `damage` (after start, so the start-up check
/// has passed: the fit is where it is found).
fn fit_with_damaged_segment(damage: impl FnOnce(&Path)) {
    let root = tempfile::tempdir().unwrap();
    let data = open(root.path());
    let entry = create(&data, "m");
    for seed in 1..=3 {
        ingest(&entry, seed).unwrap();
    }
    let (victim, path, _) = FitPlan::all(&entry, false).segments()[1].clone();
    damage(&path);
    let Err(e) = fit(&entry) else {
        panic!("a damaged segment was fitted");
    };
    let status = Status::from(e);
    assert!(entry.fitted().is_none(), "a damaged segment was fitted");
    drop(entry);
    assert_quarantined(root.path(), data, status, &victim);
}

/// Four flipped bytes in a segment's data pages: the Parquet still decodes (the vectors are
/// stored plain), so without a checksum the fit would silently use other values.
#[test]
fn a_segment_with_flipped_bytes_is_quarantined_at_fit() {
    fit_with_damaged_segment(|path| {
        let mut bytes = fs::read(path).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 4] {
            *b ^= 0x01;
        }
        fs::write(path, bytes).unwrap();
    });
}

/// A segment cut short after start: found at fit time, quarantined like a corrupt one, and
/// the monitor stays fittable.
#[test]
fn a_truncated_segment_is_quarantined_at_fit() {
    fit_with_damaged_segment(|path| {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len / 2).unwrap();
        f.sync_all().unwrap();
    });
}

/// A crash after the segment was moved into `quarantine/` but before `state.json` dropped it:
/// the start finishes the quarantine instead of declaring the monitor damaged.
#[test]
fn a_quarantine_interrupted_by_a_crash_is_finished_at_start() {
    let root = tempfile::tempdir().unwrap();
    let data = open(root.path());
    let entry = create(&data, "m");
    for seed in 1..=3 {
        ingest(&entry, seed).unwrap();
    }
    let (victim, path, _) = FitPlan::all(&entry, false).segments()[1].clone();
    drop((entry, data));
    let quarantine = monitor_dir(root.path(), "m").join(QUARANTINE_DIR);
    fs::create_dir_all(&quarantine).unwrap();
    fs::rename(&path, quarantine.join(&victim)).unwrap();
    fs::write(quarantine.join(format!("{victim}.reason.json")), b"{}").unwrap();

    let data = open(root.path());
    assert!(data.damaged().is_empty(), "{:?}", data.damaged());
    let entry = data.get("m").unwrap();
    assert_eq!(entry.state().reference_rows(), 4 * ROWS as u64);
    let (listed, site_rows) = state_on_disk(&monitor_dir(root.path(), "m"));
    assert!(!listed.contains(&victim), "{listed:?}");
    assert_eq!(site_rows, [2 * ROWS as u64; 2]);
    assert_eq!(fit(&entry).unwrap().reference_rows, 4 * ROWS as u64);
}

/// `state.json` written before checksums were recorded still loads; its segments are fitted
/// unverified, and the ones ingested since are verified.
#[test]
fn segments_listed_without_a_checksum_are_read_unverified() {
    let root = tempfile::tempdir().unwrap();
    let data = open(root.path());
    let entry = create(&data, "m");
    for seed in 1..=2 {
        ingest(&entry, seed).unwrap();
    }
    drop((entry, data));
    let state_path = monitor_dir(root.path(), "m").join(STATE_FILE);
    let mut state: serde_json::Value = read_json(&state_path).unwrap();
    for s in state["segments"].as_array_mut().unwrap() {
        let s = s.as_object_mut().unwrap();
        assert!(
            s.remove("xxh3_128").is_some(),
            "no checksum recorded: {s:?}"
        );
        s.remove("site_rows");
    }
    fs::write(&state_path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();

    let data = open(root.path());
    let entry = data.get("m").unwrap();
    assert!(entry.state().segments.iter().all(|s| s.xxh3_128.is_none()));
    assert_eq!(fit(&entry).unwrap().reference_rows, 4 * ROWS as u64);
    ingest(&entry, 3).unwrap();
    assert!(entry.state().segments[2].xxh3_128.is_some());
    assert_eq!(fit(&entry).unwrap().reference_rows, 6 * ROWS as u64);
}

/// Batches that arrive as bf16 or f16 are stored in that type (a segment of about half the
/// bytes), and fit the same monitor, to the bit, as the same values sent as f32.
#[test]
fn half_precision_batches_are_stored_as_they_came_and_fit_the_same_monitor() {
    use actwatch_core::Dtype;
    // Values exact in bf16 and in f16 alike.
    let exact = |b: SiteBatch| {
        let (site, ids, _, v) = b.into_parts();
        let values = v
            .into_inner()
            .into_iter()
            .map(|x| {
                let y = half::bf16::from_f32(x).to_f32();
                if half::f16::from_f32(y).to_f32() == y {
                    y
                } else {
                    0.0
                }
            })
            .collect();
        SiteBatch::new(site, ids, None, Vectors::new(WIDTH, values).unwrap()).unwrap()
    };
    let root = tempfile::tempdir().unwrap();
    let data = open(root.path());
    let mut runs = Vec::new();
    for (name, dtype) in [
        ("f32", Dtype::F32),
        ("bf16", Dtype::Bf16),
        ("f16", Dtype::F16),
    ] {
        let entry = create(&data, name);
        for seed in 1..=3 {
            let mut s = IngestSession::new(entry.clone(), 16, 1 << 20, None);
            for site in SITES {
                s.add(exact(batch(site, seed)), dtype, 0, None).unwrap();
            }
            s.commit().unwrap();
        }
        let segments = FitPlan::all(&entry, false).segments().to_vec();
        let bytes: u64 = segments
            .iter()
            .map(|(_, p, _)| fs::metadata(p).unwrap().len())
            .sum();
        let files: Vec<String> = segments.into_iter().map(|(f, _, _)| f).collect();
        let fitted = fit(&entry).unwrap();
        let scores = fitted.monitor.score(&exact(batch("a", 99))).unwrap();
        runs.push((files, bytes, scores.raw, scores.p));
    }
    let vector_bytes = (3 * SITES.len() * ROWS * WIDTH * 2) as u64;
    for (files, bytes, raw, p) in &runs[1..] {
        assert!(
            runs[0].1 - bytes >= vector_bytes * 9 / 10,
            "{} vs {bytes}",
            runs[0].1
        );
        assert_eq!(raw, &runs[0].2, "{files:?}");
        assert_eq!(p, &runs[0].3, "{files:?}");
    }
    assert!(
        runs[1].0.iter().all(|f| f.ends_with("-bf16.arrow")),
        "{:?}",
        runs[1].0
    );
    assert!(
        runs[2].0.iter().all(|f| f.ends_with("-f16.arrow")),
        "{:?}",
        runs[2].0
    );
}

/// Segments committed when checksums were SHA-256 (`state.json` records `sha256`) are still
/// verified with it: intact ones are fitted, one with flipped bytes is quarantined.
#[test]
fn segments_with_a_recorded_sha256_are_still_verified() {
    let root = tempfile::tempdir().unwrap();
    let data = open(root.path());
    let entry = create(&data, "m");
    for seed in 1..=3 {
        ingest(&entry, seed).unwrap();
    }
    let segments = FitPlan::all(&entry, false).segments().to_vec();
    drop((entry, data));
    let state_path = monitor_dir(root.path(), "m").join(STATE_FILE);
    let mut state: serde_json::Value = read_json(&state_path).unwrap();
    for (s, (_, path, _)) in state["segments"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(&segments)
    {
        let s = s.as_object_mut().unwrap();
        assert!(
            s.remove("xxh3_128").is_some(),
            "no checksum recorded: {s:?}"
        );
        let (sha256, _) = actwatch_io::checksum::sha256_file(path).unwrap();
        s.insert("sha256".into(), sha256.into());
    }
    fs::write(&state_path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();

    let data = open(root.path());
    let entry = data.get("m").unwrap();
    assert!(entry.state().segments.iter().all(|s| s.sha256.is_some()));
    assert_eq!(fit(&entry).unwrap().reference_rows, 6 * ROWS as u64);
    let (victim, path, _) = &segments[1];
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(path, bytes).unwrap();
    let Err(e) = fit(&entry) else {
        panic!("a damaged segment was fitted");
    };
    let status = Status::from(e);
    assert!(status.message().contains("SHA-256"), "{status:?}");
    drop(entry);
    let reason = monitor_dir(root.path(), "m")
        .join(QUARANTINE_DIR)
        .join(format!("{victim}{QUARANTINE_REASON_SUFFIX}"));
    let reason: serde_json::Value = read_json(&reason).unwrap();
    assert!(reason["sha256_recorded"].is_string(), "{reason}");
    // The last fit succeeded on all three; the fit after the quarantine uses the other two.
    let entry = data.get("m").unwrap();
    assert_eq!(fit(&entry).unwrap().reference_rows, 4 * ROWS as u64);
}

/// A crash after the new fit's artifact was renamed into `fitted/` and before anything else was
/// recorded: the restart serves that artifact under the version it was fitted as (it used to
/// serve it under the previous fit's version), and the next fit takes the version after it.
#[test]
fn a_crash_after_installing_a_fit_serves_it_under_its_own_version() {
    let root = tempfile::tempdir().unwrap();
    let data = open(root.path());
    let entry = create(&data, "m");
    ingest(&entry, 1).unwrap();
    assert_eq!(fit(&entry).unwrap().fit_version, 1);
    ingest(&entry, 2).unwrap();
    // The crash: the artifact is installed, the process stops before it is served or recorded.
    let saved = fit_and_save(&entry, &FitPlan::all(&entry, false), false, &NoProgress).unwrap();
    drop((saved, entry, data));

    let data = open(root.path());
    let entry = data.get("m").unwrap();
    let served = entry.fitted().unwrap();
    assert_eq!(served.reference_rows, 4 * ROWS as u64);
    assert_eq!(served.fit_version, 2, "served under another version");
    assert_eq!(entry.state().fit_version, 2, "state.json not repaired");
    drop(served);
    assert_eq!(fit(&entry).unwrap().fit_version, 3);
    drop((entry, data));
    let data = open(root.path());
    assert_eq!(data.get("m").unwrap().fitted().unwrap().fit_version, 3);
}

/// A small tmpfs holding a data directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` reads it), or says why it cannot.
    fn mount(size: &str) -> std::result::Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Set in the child that [`a_full_disk_is_resource_exhausted_and_leaves_nothing_half_written`]
/// runs under `unshare -rm` when it may not mount a tmpfs itself.
const IN_NAMESPACE: &str = "ACTWATCH_TEST_IN_MOUNT_NAMESPACE";

/// A file that fills the disk, shrunk to free exactly what a step may use.
struct Ballast {
    path: PathBuf,
}

impl Ballast {
    fn new(path: PathBuf) -> Self {
        File::create(&path).unwrap();
        Self { path }
    }

    /// Grows the file until the disk is full (whatever the steps before used or freed), then
    /// cuts `free` bytes off it.
    fn leave_free(&self, free: u64) {
        let mut f = OpenOptions::new().append(true).open(&self.path).unwrap();
        let chunk = vec![0x5a; 4096];
        while let Ok(n) = f.write(&chunk) {
            if n == 0 {
                break;
            }
        }
        let full = f.metadata().unwrap().len();
        f.set_len(full.saturating_sub(free)).unwrap();
    }
}

/// Temporary files (`durable::is_temporary`) anywhere under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if durable::is_temporary(&e.file_name().to_string_lossy()) {
            found.push(e.path());
        } else if e.file_type().unwrap().is_dir() {
            found.extend(temporaries(&e.path()));
        }
    }
    found
}

fn assert_disk_full(status: &Status) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("disk is full"), "{status:?}");
}

fn logged(trace_id: String, fit_version: u64) -> LoggedScore {
    LoggedScore {
        trace_id,
        score: 2.5,
        p_value: 0.25,
        flagged: false,
        traces: 2,
        slots: vec![LoggedSlot {
            site: "a".into(),
            detector: "gaussian".into(),
            p_value: Some(0.25),
        }],
        scored_at_unix_ms: 1,
        fit_version,
        partial: false,
        flagged_at: None,
        probes: Vec::new(),
    }
}

fn logged_ids(entry: &MonitorEntry) -> Vec<String> {
    let mut ids: Vec<String> = entry
        .query_scores(&ScoreFilter::default(), usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| s.trace_id)
        .collect();
    ids.sort();
    ids
}

/// Runs `step` with 0, 4 KiB, 8 KiB, ... free until it succeeds: every failure on the way must
/// be the full disk (RESOURCE_EXHAUSTED) and pass `check`, so the failure point walks through
/// every write the step makes.
fn walk_free_space<T>(
    ballast: &Ballast,
    what: &str,
    mut step: impl FnMut() -> Result<T>,
    mut check: impl FnMut(),
) -> (T, usize) {
    for (failures, free) in (0..=256u64).map(|k| k * 4096).enumerate() {
        ballast.leave_free(free);
        match step() {
            Ok(t) => return (t, failures),
            Err(e) => {
                let status = Status::from(e);
                assert_disk_full(&status);
                println!("{what} with {free} bytes free: {}", status.message());
                check();
            }
        }
    }
    panic!("{what} never succeeded with up to 1 MiB free");
}

/// ENOSPC on every write path of the storage layer (segment writes and their commit in
/// `state.json`, the fit checkpoint, the artifact and its installation, the score log) reaches
/// the client as RESOURCE_EXHAUSTED saying the disk is full, never INTERNAL ("invalid or
/// unreadable Parquet") or DATA_LOSS; nothing half-written is listed or read back; once space
/// is freed, everything works again, also after a restart. Needs a tmpfs: mounted directly as
/// root, else in a user and mount namespace (`unshare -rm`), else skipped saying why.
#[test]
fn a_full_disk_is_resource_exhausted_and_leaves_nothing_half_written() {
    let tmpfs = match Tmpfs::mount("4m") {
        Ok(t) => t,
        Err(why) if std::env::var_os(IN_NAMESPACE).is_none() => {
            let exe = std::env::current_exe().unwrap();
            let run = std::process::Command::new("unshare")
                .args(["-rm", "--"])
                .arg(exe)
                .args([
                    "storage::tests::a_full_disk_is_resource_exhausted_and_leaves_nothing_half_written",
                    "--exact",
                    "--nocapture",
                ])
                .env(IN_NAMESPACE, "1")
                .output();
            match run {
                Ok(out) if out.status.success() => {
                    println!("{}", String::from_utf8_lossy(&out.stdout));
                    return;
                }
                Ok(out) if String::from_utf8_lossy(&out.stdout).contains("test result") => {
                    panic!(
                        "the test failed in a mount namespace:\n{}\n{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                }
                Ok(out) => println!(
                    "SKIPPED: cannot mount a tmpfs ({why}), nor in a namespace (unshare -rm: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => {
                    println!("SKIPPED: cannot mount a tmpfs ({why}), nor run unshare -rm ({e})")
                }
            }
            return;
        }
        Err(why) => {
            println!("SKIPPED: cannot mount a tmpfs in the namespace either: {why}");
            return;
        }
    };
    let root = tmpfs.path().join("data");
    let data = open(&root);
    let entry = create(&data, "m");
    let dir = monitor_dir(&root, "m");
    ingest(&entry, 1).unwrap();
    assert_eq!(fit(&entry).unwrap().fit_version, 1);
    entry.log_scores(&[logged("before".into(), 1)]).unwrap();
    let ballast = Ballast::new(tmpfs.path().join("ballast"));

    // Ingest: the segment's pages, then its commit in state.json.
    let listed = entry.state().segments.len();
    let (_, failures) = walk_free_space(
        &ballast,
        "ingest",
        || ingest(&entry, 2),
        || {
            assert_eq!(entry.state().segments.len(), listed);
            assert_eq!(state_on_disk(&dir).0.len(), listed);
            let files = names_in(&dir.join(REFERENCE_DIR));
            assert_eq!(files.len(), listed, "unlisted files: {files:?}");
            assert_eq!(temporaries(&root), Vec::<PathBuf>::new());
        },
    );
    assert!(failures > 0, "the ingest never hit the full disk");
    assert_eq!(state_on_disk(&dir).0.len(), listed + 1);

    // Fit: the checkpoint, the artifact's blobs and manifest, its installation.
    let (fitted, failures) = walk_free_space(
        &ballast,
        "fit",
        || fit(&entry),
        || {
            let served = entry.fitted().unwrap();
            assert_eq!(served.fit_version, 1);
            assert_eq!(served.reference_rows, 2 * ROWS as u64);
            assert!(actwatch_io::artifact::load_monitor(&entry.fitted_dir()).is_ok());
            assert_eq!(temporaries(&root), Vec::<PathBuf>::new());
        },
    );
    assert!(failures > 0, "the fit never hit the full disk");
    assert_eq!(fitted.fit_version, 2);
    assert_eq!(fitted.reference_rows, 4 * ROWS as u64);

    // Score log: one call of many results, bigger than a page, so its write is cut short.
    let mut calls = 0;
    let (_, failures) = walk_free_space(
        &ballast,
        "score log",
        || {
            calls += 1;
            let call: Vec<_> = (0..64)
                .map(|i| logged(format!("call{calls}-{i:02}"), 2))
                .collect();
            entry.log_scores(&call)
        },
        || assert_eq!(logged_ids(&entry), ["before"]),
    );
    assert!(failures > 0, "the score log never hit the full disk");
    let ids = logged_ids(&entry);
    assert_eq!(ids.len(), 65, "{ids:?}");
    assert!(ids
        .iter()
        .all(|i| i == "before" || i.starts_with(&format!("call{calls}-"))));

    // Space freed: everything works again, and survives a restart.
    fs::remove_file(&ballast.path).unwrap();
    ingest(&entry, 3).unwrap();
    assert_eq!(fit(&entry).unwrap().fit_version, 3);
    entry.log_scores(&[logged("after".into(), 3)]).unwrap();
    drop((entry, data));
    let data = open(&root);
    assert!(data.damaged().is_empty(), "{:?}", data.damaged());
    let entry = data.get("m").unwrap();
    assert_eq!(entry.fitted().unwrap().fit_version, 3);
    assert_eq!(entry.state().reference_rows(), 6 * ROWS as u64);
    assert_eq!(logged_ids(&entry).len(), 66);
    drop((entry, data));
    drop(tmpfs);
}
