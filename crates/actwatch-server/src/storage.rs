//! The data directory: one folder per monitor, every acknowledged write durable.
//!
//! ```text
//! <data-dir>/monitors/<name>/spec.json          what the monitor is (written once, atomically)
//! <data-dir>/monitors/<name>/state.json         sites and widths, committed segments, fit version
//! <data-dir>/monitors/<name>/reference/seg-<seq>-d<width>.parquet
//! <data-dir>/monitors/<name>/fitted/            the offline core's monitor artifact (`save_monitor`)
//! <data-dir>/monitors/<name>/fitter.bin         fit checkpoint: fitter state + segments folded in
//! <data-dir>/monitors/<name>/scores/log-<seq>.jsonl   the bounded score log
//! ```
//!
//! The decision a reader must know: `state.json` is the commit point. A reference segment is
//! written to a temporary name, fsynced and renamed (by `AtomicParquetWriter`), and only then listed
//! in `state.json` (itself written to a temporary name, fsynced, renamed); the ingest summary is sent
//! after that. At start, segment files that `state.json` does not list belong to ingests that were
//! never acknowledged and are deleted, so a client's retry cannot double them.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use actwatch_detect::monitor::{Monitor, MonitorOptions};
use actwatch_io::artifact::{load_monitor, Manifest};
use actwatch_io::reader::AtomicParquetWriter;
use actwatch_proto::{v1, DecodedBatch};
use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::convert::{options_from_spec, StoredSpec};
use crate::{Error, Result};

const MONITORS_DIR: &str = "monitors";
const SPEC_FILE: &str = "spec.json";
const STATE_FILE: &str = "state.json";
const REFERENCE_DIR: &str = "reference";
const FITTED_DIR: &str = "fitted";
const CHECKPOINT_FILE: &str = "fitter.bin";
const SCORES_DIR: &str = "scores";
/// Version of `spec.json` and `state.json`.
const STORAGE_FORMAT_VERSION: u32 = 1;
/// The score log is split in this many files, so dropping the oldest keeps most of the budget.
const SCORE_LOG_FILES: u64 = 4;

pub(crate) fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::storage(dir, e))
}

/// Writes `value` as JSON to `path` atomically: temporary file, fsync, rename, fsync of the folder.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::storage(path, e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| Error::storage(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct SpecFile {
    format_version: u32,
    name: String,
    spec: StoredSpec,
    created_unix_ms: i64,
}

/// One site of a monitor: its width is fixed by its first reference batch, ever.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteState {
    pub name: String,
    pub width: usize,
    pub reference_rows: u64,
}

/// A committed reference segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub file: String,
    pub rows: u64,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorState {
    format_version: u32,
    pub sites: Vec<SiteState>,
    pub segments: Vec<SegmentEntry>,
    /// Sequence number of the next segment (segments of failed ingests may leave gaps).
    pub next_segment: u64,
    /// Increases with every fit; 0 when never fitted.
    pub fit_version: u64,
    /// How the served fit was made.
    #[serde(default)]
    pub last_fit: FitRun,
}

/// How a fit ran: fully, or as an incremental update from a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FitRun {
    pub incremental: bool,
    /// Reference rows the fit pass read.
    pub rows_folded: u64,
}

impl Default for MonitorState {
    fn default() -> Self {
        Self {
            format_version: STORAGE_FORMAT_VERSION,
            sites: Vec::new(),
            segments: Vec::new(),
            next_segment: 1,
            fit_version: 0,
            last_fit: FitRun::default(),
        }
    }
}

impl MonitorState {
    fn width(&self, site: &str) -> Option<usize> {
        self.sites.iter().find(|s| s.name == site).map(|s| s.width)
    }

    pub fn reference_rows(&self) -> u64 {
        self.sites.iter().map(|s| s.reference_rows).sum()
    }
}

/// A fitted monitor as served: immutable, shared by every scoring call that started with it.
#[derive(Debug)]
pub struct FittedMonitor {
    pub monitor: Monitor,
    pub fit_version: u64,
    pub report: v1::FitReport,
}

impl FittedMonitor {
    pub fn new(monitor: Monitor, manifest: &Manifest, fit_version: u64, run: FitRun) -> Self {
        let s = &monitor.summary;
        let report = v1::FitReport {
            fit_version,
            reference_rows: manifest.reference.rows,
            calibration_computations: s.calibration_computations,
            calibration_fpr: s.calibration_fpr,
            fit_seconds: s.fit_seconds,
            calibration_seconds: s.calibration_seconds,
            knn_recall: s
                .knn_recall
                .iter()
                .map(|r| v1::KnnRecall {
                    site: r.site.clone(),
                    detector: monitor
                        .options
                        .detectors
                        .get(r.detector)
                        .map_or("?", |d| d.name())
                        .to_string(),
                    queries: r.queries as u64,
                    k: r.k as u32,
                    recall: r.recall,
                })
                .collect(),
            incremental: run.incremental,
            rows_folded: run.rows_folded,
        };
        Self {
            monitor,
            fit_version,
            report,
        }
    }
}

/// One monitor: its spec, its committed state, the fit being served and its score log.
#[derive(Debug)]
pub struct MonitorEntry {
    pub name: String,
    pub spec: StoredSpec,
    pub options: MonitorOptions,
    dir: PathBuf,
    /// Sites, segments and fit version; every change is written to `state.json` under this lock.
    state: Mutex<MonitorState>,
    /// The served fit, replaced in one assignment by a refit: a scorer holds either the old
    /// `Arc` or the new one, never half of either.
    fitted: RwLock<Option<Arc<FittedMonitor>>>,
    /// Held by the running fit, so two fits of one monitor never race on `fitted/`.
    pub fit_lock: Arc<tokio::sync::Mutex<()>>,
    log: Mutex<ScoreLog>,
    /// Set by DeleteMonitor, so an ingest or fit that finishes afterwards commits nothing.
    deleted: AtomicBool,
}

impl MonitorEntry {
    pub fn state(&self) -> MonitorState {
        lock(&self.state).clone()
    }

    pub fn site_width(&self, site: &str) -> Option<usize> {
        lock(&self.state).width(site)
    }

    pub fn fitted(&self) -> Option<Arc<FittedMonitor>> {
        self.fitted
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn fitted_dir(&self) -> PathBuf {
        self.dir.join(FITTED_DIR)
    }

    /// The committed reference segments, in commit order: (file name, path).
    pub fn segments(&self) -> Vec<(String, PathBuf)> {
        let dir = self.dir.join(REFERENCE_DIR);
        lock(&self.state)
            .segments
            .iter()
            .map(|s| (s.file.clone(), dir.join(&s.file)))
            .collect()
    }

    /// Where the fit checkpoint lives (see [`actwatch_io::checkpoint`]).
    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join(CHECKPOINT_FILE)
    }

    fn check_not_deleted(&self) -> Result<()> {
        if self.deleted.load(Ordering::SeqCst) {
            return Err(Error::MonitorNotFound(self.name.clone()));
        }
        Ok(())
    }

    /// Reserves a segment sequence number for one ingest stream.
    fn reserve_segment(&self) -> u64 {
        let mut st = lock(&self.state);
        let seq = st.next_segment;
        st.next_segment += 1;
        seq
    }

    /// Lists finished segments and their sites in `state.json`: the commit point of an ingest.
    fn commit_segments(
        &self,
        files: Vec<SegmentEntry>,
        sites: &BTreeMap<String, (usize, u64)>,
    ) -> Result<u64> {
        let mut st = lock(&self.state);
        self.check_not_deleted()?;
        let mut next = st.clone();
        for (site, &(width, rows)) in sites {
            match next.sites.iter_mut().find(|s| &s.name == site) {
                Some(s) if s.width != width => {
                    // Another stream fixed this site's width first.
                    return Err(Error::WidthMismatch {
                        site: site.clone(),
                        expected: s.width,
                        got: width,
                    });
                }
                Some(s) => s.reference_rows += rows,
                None => next.sites.push(SiteState {
                    name: site.clone(),
                    width,
                    reference_rows: rows,
                }),
            }
        }
        next.segments.extend(files);
        write_json_atomic(&self.dir.join(STATE_FILE), &next)?;
        let total = next.reference_rows();
        *st = next;
        Ok(total)
    }

    /// Records a new fit (already saved in `fitted/`) and serves it.
    pub fn install_fit(
        &self,
        monitor: Monitor,
        manifest: &Manifest,
        run: FitRun,
    ) -> Result<Arc<FittedMonitor>> {
        let mut st = lock(&self.state);
        self.check_not_deleted()?;
        let mut next = st.clone();
        next.fit_version += 1;
        next.last_fit = run;
        write_json_atomic(&self.dir.join(STATE_FILE), &next)?;
        let fitted = Arc::new(FittedMonitor::new(monitor, manifest, next.fit_version, run));
        *st = next;
        *self.fitted.write().unwrap_or_else(PoisonError::into_inner) = Some(fitted.clone());
        Ok(fitted)
    }

    /// Appends computation results to the score log (fsynced before returning).
    pub fn log_scores(&self, entries: &[LoggedScore]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        lock(&self.log).append(entries)
    }

    /// Reads the score log, newest first.
    pub fn query_scores(&self, filter: &ScoreFilter, limit: usize) -> Result<Vec<LoggedScore>> {
        let paths = lock(&self.log).paths_newest_first();
        ScoreLog::read(&paths, filter, limit)
    }

    pub fn info(&self) -> v1::MonitorInfo {
        let st = self.state();
        let fitted = self.fitted();
        v1::MonitorInfo {
            name: self.name.clone(),
            spec: Some(self.spec.to_proto()),
            sites: st
                .sites
                .iter()
                .map(|s| v1::SiteInfo {
                    name: s.name.clone(),
                    width: s.width as u64,
                    reference_rows: s.reference_rows,
                })
                .collect(),
            reference_rows: st.reference_rows(),
            fitted: fitted.is_some(),
            fit_version: fitted.as_ref().map_or(0, |f| f.fit_version),
            report: fitted.map(|f| f.report.clone()),
        }
    }
}

/// All monitors of one data directory.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    monitors: RwLock<BTreeMap<String, Arc<MonitorEntry>>>,
    /// Serialises create and delete, which touch the folder layout.
    layout: Mutex<()>,
    max_score_log_bytes: u64,
}

impl DataDir {
    /// Opens (creating if needed) a data directory and loads every monitor, with its fit where
    /// one was saved. Blocking: call it from `spawn_blocking` or before the runtime serves.
    pub fn open(root: impl Into<PathBuf>, max_score_log_bytes: u64) -> Result<Self> {
        let root = root.into();
        let monitors_dir = root.join(MONITORS_DIR);
        fs::create_dir_all(&monitors_dir).map_err(|e| Error::storage(&monitors_dir, e))?;
        let mut monitors = BTreeMap::new();
        let entries = fs::read_dir(&monitors_dir).map_err(|e| Error::storage(&monitors_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::storage(&monitors_dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A create or delete that did not finish.
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            if !path.is_dir() {
                continue;
            }
            let m = load_entry(&path, max_score_log_bytes)?;
            monitors.insert(m.name.clone(), Arc::new(m));
        }
        Ok(Self {
            root,
            monitors: RwLock::new(monitors),
            layout: Mutex::new(()),
            max_score_log_bytes,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn get(&self, name: &str) -> Result<Arc<MonitorEntry>> {
        self.monitors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::MonitorNotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<MonitorEntry>> {
        self.monitors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Creates an empty monitor: its folder is built under a dot name and renamed into place.
    pub fn create(&self, name: &str, spec: StoredSpec) -> Result<Arc<MonitorEntry>> {
        let _layout = lock(&self.layout);
        if self.get(name).is_ok() {
            return Err(Error::MonitorExists(name.to_string()));
        }
        let options = options_from_spec(&spec)?;
        let monitors_dir = self.root.join(MONITORS_DIR);
        let dir = monitors_dir.join(name);
        if dir.exists() {
            return Err(Error::MonitorExists(name.to_string()));
        }
        let tmp = monitors_dir.join(format!(".{name}.creating"));
        let _ = fs::remove_dir_all(&tmp);
        let build = || -> Result<()> {
            for sub in [REFERENCE_DIR, SCORES_DIR] {
                let d = tmp.join(sub);
                fs::create_dir_all(&d).map_err(|e| Error::storage(&d, e))?;
            }
            write_json_atomic(
                &tmp.join(SPEC_FILE),
                &SpecFile {
                    format_version: STORAGE_FORMAT_VERSION,
                    name: name.to_string(),
                    spec: spec.clone(),
                    created_unix_ms: now_unix_ms(),
                },
            )?;
            write_json_atomic(&tmp.join(STATE_FILE), &MonitorState::default())?;
            fs::rename(&tmp, &dir).map_err(|e| Error::storage(&dir, e))?;
            sync_dir(&monitors_dir)
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let entry = Arc::new(MonitorEntry {
            name: name.to_string(),
            spec,
            options,
            log: Mutex::new(ScoreLog::open(
                &dir.join(SCORES_DIR),
                self.max_score_log_bytes,
            )?),
            dir,
            state: Mutex::new(MonitorState::default()),
            fitted: RwLock::new(None),
            fit_lock: Arc::new(tokio::sync::Mutex::new(())),
            deleted: AtomicBool::new(false),
        });
        self.monitors
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    /// Deletes a monitor with everything it stored. Calls still holding it finish on their own
    /// copies, and commit nothing.
    pub fn delete(&self, name: &str) -> Result<()> {
        let _layout = lock(&self.layout);
        let entry = self.get(name)?;
        {
            let _state = lock(&entry.state);
            entry.deleted.store(true, Ordering::SeqCst);
        }
        self.monitors
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        let monitors_dir = self.root.join(MONITORS_DIR);
        let trash = monitors_dir.join(format!(".{name}.deleted-{}", now_unix_ms()));
        fs::rename(&entry.dir, &trash).map_err(|e| Error::storage(&entry.dir, e))?;
        sync_dir(&monitors_dir)?;
        fs::remove_dir_all(&trash).map_err(|e| Error::storage(&trash, e))
    }
}

fn load_entry(dir: &Path, max_score_log_bytes: u64) -> Result<MonitorEntry> {
    let spec_file: SpecFile = read_json(&dir.join(SPEC_FILE))?;
    let mut state: MonitorState = read_json(&dir.join(STATE_FILE))?;
    for (path, version) in [
        (dir.join(SPEC_FILE), spec_file.format_version),
        (dir.join(STATE_FILE), state.format_version),
    ] {
        if version != STORAGE_FORMAT_VERSION {
            return Err(Error::Corrupt {
                path,
                message: format!(
                    "format version {version}; this build reads {STORAGE_FORMAT_VERSION}"
                ),
            });
        }
    }
    let options = options_from_spec(&spec_file.spec)?;

    // Segments that state.json does not list were never acknowledged: remove them.
    let reference = dir.join(REFERENCE_DIR);
    fs::create_dir_all(&reference).map_err(|e| Error::storage(&reference, e))?;
    let listed: HashSet<&str> = state.segments.iter().map(|s| s.file.as_str()).collect();
    for e in fs::read_dir(&reference).map_err(|e| Error::storage(&reference, e))? {
        let e = e.map_err(|e| Error::storage(&reference, e))?;
        let file = e.file_name().to_string_lossy().into_owned();
        if !listed.contains(file.as_str()) {
            if let Some(seq) = segment_seq(&file) {
                state.next_segment = state.next_segment.max(seq + 1);
            }
            let _ = fs::remove_file(e.path());
        }
    }
    for s in &state.segments {
        let p = reference.join(&s.file);
        if !p.is_file() {
            return Err(Error::Corrupt {
                path: dir.join(STATE_FILE),
                message: format!("listed segment {} is missing", p.display()),
            });
        }
    }

    // Leftovers of a save_monitor or a checkpoint that did not finish.
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!(".{FITTED_DIR}.")) {
                let _ = fs::remove_dir_all(e.path());
            } else if n == format!("{CHECKPOINT_FILE}.tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let fitted_dir = dir.join(FITTED_DIR);
    let fitted = if fitted_dir.exists() {
        match load_monitor(&fitted_dir) {
            Ok((monitor, manifest)) => Some(Arc::new(FittedMonitor::new(
                monitor,
                &manifest,
                state.fit_version.max(1),
                state.last_fit,
            ))),
            Err(e) => {
                // Never serve a damaged fit; the monitor stays usable and a refit repairs it.
                tracing::warn!(
                    monitor = %spec_file.name,
                    error = %e,
                    "not serving the stored fit; a refit repairs it"
                );
                None
            }
        }
    } else {
        None
    };
    let scores = dir.join(SCORES_DIR);
    Ok(MonitorEntry {
        name: spec_file.name,
        spec: spec_file.spec,
        options,
        dir: dir.to_path_buf(),
        state: Mutex::new(state),
        fitted: RwLock::new(fitted),
        fit_lock: Arc::new(tokio::sync::Mutex::new(())),
        log: Mutex::new(ScoreLog::open(&scores, max_score_log_bytes)?),
        deleted: AtomicBool::new(false),
    })
}

fn segment_seq(file: &str) -> Option<u64> {
    file.strip_prefix("seg-")?
        .split(['-', '.'])
        .next()?
        .parse()
        .ok()
}

/// The Arrow schema of a reference segment of width `width` (the canonical long format).
pub fn segment_schema(width: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("trace_id", DataType::Utf8, false),
        Field::new("site", DataType::Utf8, false),
        Field::new("position", DataType::Int32, true),
        Field::new(
            "activation",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                width as i32,
            ),
            false,
        ),
    ]))
}

/// How segments are encoded. Activations are nearly incompressible (the shared MiniLM files shrink
/// by about 5% under zstd), so the vector column is stored plain: no compression, no dictionary
/// attempt, no min/max statistics, which together cost more write time than anything else here
/// (on this machine the Parquet writer goes from about 340 to 570 MB/s). Ids and site names
/// compress well and cheaply, so they keep zstd.
fn segment_writer_properties() -> WriterProperties {
    let vectors = ColumnPath::new(vec!["activation".into(), "list".into(), "item".into()]);
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_column_compression(vectors.clone(), Compression::UNCOMPRESSED)
        .set_column_dictionary_enabled(vectors.clone(), false)
        .set_column_statistics_enabled(vectors, EnabledStatistics::None)
        .build()
}

fn segment_batch(batch: DecodedBatch) -> Result<RecordBatch> {
    let DecodedBatch {
        site,
        trace_ids,
        positions,
        vectors,
    } = batch;
    let rows = trace_ids.len();
    let width = vectors.dim();
    let schema = segment_schema(width);
    let DataType::FixedSizeList(item, _) = schema.field(3).data_type().clone() else {
        unreachable!("segment_schema's vector column is a FixedSizeList")
    };
    let values = Float32Array::from(vectors.into_inner());
    let activation = FixedSizeListArray::try_new(item, width as i32, Arc::new(values), None)
        .map_err(actwatch_io::Error::from)?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(trace_ids)),
        Arc::new(StringArray::from(vec![site; rows])),
        Arc::new(match positions {
            Some(p) => Int32Array::from(p),
            None => Int32Array::new_null(rows),
        }),
        Arc::new(activation),
    ];
    Ok(RecordBatch::try_new(schema, columns).map_err(actwatch_io::Error::from)?)
}

/// The segments one IngestReference stream is writing: one Parquet file per vector width.
/// Dropped without [`IngestSession::commit`], it removes its temporary files and stores nothing.
#[derive(Debug)]
pub struct IngestSession {
    entry: Arc<MonitorEntry>,
    seq: u64,
    writers: BTreeMap<usize, AtomicParquetWriter>,
    /// Per site of this stream: width and rows.
    sites: BTreeMap<String, (usize, u64)>,
    pub rows: u64,
    pub bytes: u64,
    pub batches: u64,
}

impl IngestSession {
    pub fn new(entry: Arc<MonitorEntry>) -> Self {
        let seq = entry.reserve_segment();
        Self {
            entry,
            seq,
            writers: BTreeMap::new(),
            sites: BTreeMap::new(),
            rows: 0,
            bytes: 0,
            batches: 0,
        }
    }

    pub fn entry(&self) -> &Arc<MonitorEntry> {
        &self.entry
    }

    /// Checks a batch's width against its site and writes it (blocking).
    pub fn add(&mut self, batch: DecodedBatch, payload_bytes: u64) -> Result<()> {
        let width = batch.vectors.dim();
        let known = self
            .entry
            .site_width(&batch.site)
            .or_else(|| self.sites.get(&batch.site).map(|s| s.0));
        if let Some(expected) = known.filter(|&w| w != width) {
            return Err(Error::WidthMismatch {
                site: batch.site,
                expected,
                got: width,
            });
        }
        let rows = batch.rows() as u64;
        let site = self.sites.entry(batch.site.clone()).or_insert((width, 0));
        site.1 += rows;
        let writer = match self.writers.entry(width) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let path = self
                    .entry
                    .dir
                    .join(REFERENCE_DIR)
                    .join(format!("seg-{:08}-d{width}.parquet", self.seq));
                v.insert(AtomicParquetWriter::create_with_properties(
                    path,
                    segment_schema(width),
                    segment_writer_properties(),
                )?)
            }
        };
        writer.write(&segment_batch(batch)?)?;
        self.rows += rows;
        self.bytes += payload_bytes;
        self.batches += 1;
        Ok(())
    }

    /// Makes every segment durable (fsync, rename) and commits them in `state.json` (blocking).
    /// Returns the monitor's reference rows after the commit.
    pub fn commit(mut self) -> Result<u64> {
        let writers = std::mem::take(&mut self.writers);
        let mut done: Vec<(PathBuf, u64)> = Vec::new();
        let remove = |done: &[(PathBuf, u64)]| {
            for (p, _) in done {
                let _ = fs::remove_file(p);
            }
        };
        for (_, w) in writers {
            let path = w.path().to_path_buf();
            match w.finish() {
                Ok(rows) => done.push((path, rows)),
                Err(e) => {
                    // The writers not yet finished remove their temporary files when dropped.
                    remove(&done);
                    return Err(e.into());
                }
            }
        }
        let entries = done
            .iter()
            .map(|(p, rows)| SegmentEntry {
                file: p
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                rows: *rows,
            })
            .collect();
        self.entry
            .commit_segments(entries, &self.sites)
            .inspect_err(|_| remove(&done))
    }
}

/// One scored computation as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedScore {
    pub trace_id: String,
    pub score: f64,
    pub p_value: f64,
    pub flagged: bool,
    pub traces: u64,
    pub slots: Vec<LoggedSlot>,
    pub scored_at_unix_ms: i64,
    pub fit_version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedSlot {
    pub site: String,
    pub detector: String,
    pub p_value: Option<f64>,
}

impl LoggedScore {
    pub fn to_proto(&self, monitor: &str) -> v1::ComputationScore {
        let LoggedScore {
            trace_id,
            score,
            p_value,
            flagged,
            traces,
            slots,
            scored_at_unix_ms,
            fit_version,
        } = self;
        v1::ComputationScore {
            monitor: monitor.to_string(),
            trace_id: trace_id.clone(),
            score: *score,
            p_value: *p_value,
            flagged: *flagged,
            traces: *traces,
            slots: slots
                .iter()
                .map(|s| v1::SlotPValue {
                    site: s.site.clone(),
                    detector: s.detector.clone(),
                    p_value: s.p_value,
                })
                .collect(),
            scored_at_unix_ms: *scored_at_unix_ms,
            fit_version: *fit_version,
        }
    }
}

/// Which logged results a query wants.
#[derive(Debug, Clone, Default)]
pub struct ScoreFilter {
    /// Empty: any computation.
    pub trace_ids: HashSet<String>,
    /// Scored at or after (0: unbounded).
    pub since_unix_ms: i64,
    /// Scored before (0: unbounded).
    pub until_unix_ms: i64,
    pub flagged_only: bool,
}

impl ScoreFilter {
    fn accepts(&self, s: &LoggedScore) -> bool {
        (self.trace_ids.is_empty() || self.trace_ids.contains(&s.trace_id))
            && (self.since_unix_ms == 0 || s.scored_at_unix_ms >= self.since_unix_ms)
            && (self.until_unix_ms == 0 || s.scored_at_unix_ms < self.until_unix_ms)
            && (!self.flagged_only || s.flagged)
    }
}

/// Append-only JSON lines in numbered files, fsynced per append, at most `max_bytes` in all: the
/// oldest file is deleted when the budget is exceeded. A torn last line (a crash mid-append) is
/// skipped when read; every start opens a new file, so nothing is appended after a torn line.
#[derive(Debug)]
pub struct ScoreLog {
    dir: PathBuf,
    max_bytes: u64,
    /// (sequence number, size) of every file, oldest first; the last one is being appended to.
    files: VecDeque<(u64, u64)>,
    current: Option<File>,
}

impl ScoreLog {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::storage(dir, e))?;
        let mut files = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| Error::storage(dir, e))? {
            let e = e.map_err(|e| Error::storage(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(seq) = name
                .strip_prefix("log-")
                .and_then(|s| s.strip_suffix(".jsonl"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                files.push((seq, len));
            }
        }
        files.sort_unstable();
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            files: files.into(),
            current: None,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("log-{seq:08}.jsonl"))
    }

    fn file_budget(&self) -> u64 {
        (self.max_bytes / SCORE_LOG_FILES).max(1)
    }

    pub fn append(&mut self, entries: &[LoggedScore]) -> Result<()> {
        let mut buf = Vec::new();
        for e in entries {
            serde_json::to_writer(&mut buf, e).map_err(|e| Error::Corrupt {
                path: self.dir.clone(),
                message: format!("cannot encode a score: {e}"),
            })?;
            buf.push(b'\n');
        }
        let len = buf.len() as u64;
        let rotate = match (self.current.is_some(), self.files.back()) {
            (true, Some(&(_, size))) => size > 0 && size + len > self.file_budget(),
            _ => true,
        };
        if rotate {
            let seq = self.files.back().map_or(1, |&(s, _)| s + 1);
            let path = self.path(seq);
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::storage(&path, e))?;
            sync_dir(&self.dir)?;
            self.current = Some(f);
            self.files.push_back((seq, 0));
        }
        let (seq, size) = self.files.back_mut().expect("a current file exists");
        let path = self.dir.join(format!("log-{seq:08}.jsonl"));
        let f = self.current.as_mut().expect("a current file is open");
        f.write_all(&buf)
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::storage(&path, e))?;
        *size += len;
        while self.files.len() > 1 && self.files.iter().map(|f| f.1).sum::<u64>() > self.max_bytes {
            let (old, _) = self.files.pop_front().expect("more than one file");
            let p = self.path(old);
            fs::remove_file(&p).map_err(|e| Error::storage(&p, e))?;
        }
        Ok(())
    }

    pub fn paths_newest_first(&self) -> Vec<PathBuf> {
        self.files
            .iter()
            .rev()
            .map(|&(s, _)| self.path(s))
            .collect()
    }

    /// Reads logged results newest first (no lock needed: files are append-only, and a file
    /// deleted meanwhile is skipped).
    pub fn read(paths: &[PathBuf], filter: &ScoreFilter, limit: usize) -> Result<Vec<LoggedScore>> {
        let mut out = Vec::new();
        for p in paths {
            let text = match fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::storage(p, e)),
            };
            for line in text.lines().rev() {
                let Ok(s) = serde_json::from_str::<LoggedScore>(line) else {
                    continue;
                };
                if filter.accepts(&s) {
                    out.push(s);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(id: &str, flagged: bool, at: i64) -> LoggedScore {
        LoggedScore {
            trace_id: id.into(),
            score: 1.5,
            p_value: if flagged { 0.001 } else { 0.5 },
            flagged,
            traces: 3,
            slots: vec![LoggedSlot {
                site: "2".into(),
                detector: "knn".into(),
                p_value: Some(0.25),
            }],
            scored_at_unix_ms: at,
            fit_version: 1,
        }
    }

    #[test]
    fn score_log_is_bounded_newest_first_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ScoreLog::open(dir.path(), 4096).unwrap();
        for i in 0..200 {
            log.append(&[score(&format!("c{i}"), i % 10 == 0, i)])
                .unwrap();
        }
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 4096, "{total} bytes kept");
        let got = ScoreLog::read(&log.paths_newest_first(), &ScoreFilter::default(), 5).unwrap();
        let ids: Vec<_> = got.iter().map(|s| s.trace_id.as_str()).collect();
        assert_eq!(ids, ["c199", "c198", "c197", "c196", "c195"]);
        drop(log);

        let mut log = ScoreLog::open(dir.path(), 4096).unwrap();
        log.append(&[score("after", true, 1000)]).unwrap();
        // A torn line in an older file is skipped.
        let oldest = log.paths_newest_first().pop().unwrap();
        OpenOptions::new()
            .append(true)
            .open(&oldest)
            .unwrap()
            .write_all(b"{\"trace_id\":\"tor")
            .unwrap();
        let filter = ScoreFilter {
            flagged_only: true,
            ..Default::default()
        };
        let got = ScoreLog::read(&log.paths_newest_first(), &filter, 3).unwrap();
        let ids: Vec<_> = got.iter().map(|s| s.trace_id.as_str()).collect();
        assert_eq!(ids, ["after", "c190", "c180"]);
    }
}
