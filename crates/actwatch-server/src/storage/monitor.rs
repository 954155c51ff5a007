//! One monitor's files and served state: its spec, `state.json` (sites, committed segments, fit
//! version), the fit being served and its score log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use actwatch_core::{Provenance, ProvenanceConflict};
use actwatch_detect::monitor::{Monitor, MonitorOptions};
use actwatch_io::artifact::{load_monitor, Manifest};
use actwatch_io::checksum;
use serde::{Deserialize, Serialize};

use super::score_log::{LoggedScore, ScoreFilter, ScoreLog};
use super::{
    lock, now_unix_ms, read_json, sync_dir, write_json_atomic, CHECKPOINT_FILE, FITTED_DIR,
    FIT_RECORD_FILE, QUARANTINE_DIR, QUARANTINE_REASON_SUFFIX, REFERENCE_DIR, STATE_FILE,
    STORAGE_FORMAT_VERSION,
};
use crate::convert::StoredSpec;
use crate::{Error, Result};

/// What `spec.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SpecFile {
    pub(super) format_version: u32,
    pub(super) name: String,
    pub(super) spec: StoredSpec,
    pub(super) created_unix_ms: i64,
}

/// One site of a monitor: its width is fixed by its first reference batch, ever, and each field
/// of its provenance by the first reference batch that declares it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteState {
    pub name: String,
    pub width: usize,
    pub reference_rows: u64,
    /// Labelled example rows of the site (for the monitor's probes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub example_rows: u64,
    #[serde(default, skip_serializing_if = "Provenance::is_empty")]
    pub provenance: Provenance,
}

/// What one ingest stream adds to a site: its width, rows, and the provenance its batches
/// declared.
#[derive(Debug, Clone, Default)]
pub struct SiteDelta {
    pub width: usize,
    pub rows: u64,
    pub example_rows: u64,
    pub provenance: Provenance,
}

/// A committed reference segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub file: String,
    pub rows: u64,
    /// A segment of labelled examples (with a `label` column) for the monitor's probes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub labelled: bool,
    /// The checksum of the file's bytes (`actwatch_io::checksum`, XXH3-128 in lowercase hex),
    /// computed as the ingest wrote them (`TraceWriter::finish_hashed`) and checked before every
    /// fit reads the segment ([`MonitorEntry::verify_segments`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3_128: Option<String>,
    /// The SHA-256 (lowercase hex) that segments committed before XXH3 recorded instead, still
    /// verified. A segment with neither (a `state.json` written before checksums were recorded)
    /// is read unverified, as it was then (only the start-up check of its footer's row count
    /// covers it), and never quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The segment's rows per site, recorded with the checksum, so that quarantining it takes
    /// them from the right sites' counts (empty where no checksum was recorded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub site_rows: BTreeMap<String, u64>,
    /// When the ingest that wrote it was committed (Unix ms); `None` in a `state.json` written
    /// before commit times were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_unix_ms: Option<i64>,
    /// The token principal that sent the ingest (`None` without tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

impl SegmentEntry {
    /// The ingest (IngestReference stream) that wrote it: the sequence number in its name
    /// (`seg-<ingest>-d<width>[-bf16|-f16][-labelled].arrow`; `.parquet` before 2026-12-04).
    pub fn ingest(&self) -> Option<u64> {
        self.file
            .strip_prefix("seg-")?
            .split('-')
            .next()?
            .parse()
            .ok()
    }
}

/// One committed ingest (one IngestReference stream): its segments, in commit order.
#[derive(Debug, Clone)]
pub struct Ingest {
    pub id: u64,
    pub rows: u64,
    pub example_rows: u64,
    pub committed_unix_ms: Option<i64>,
    pub principal: Option<String>,
    /// (file name, path, labelled), as [`MonitorEntry::segments`].
    pub segments: Vec<(String, PathBuf, bool)>,
}

/// What `quarantine/<segment>.reason.json` says of a segment taken out of the fit.
#[derive(Debug, Serialize)]
struct QuarantineReason<'a> {
    segment: &'a str,
    reason: &'a str,
    rows: u64,
    labelled: bool,
    site_rows: &'a BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xxh3_128_recorded: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256_recorded: Option<&'a str>,
    quarantined_unix_ms: i64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorState {
    pub(super) format_version: u32,
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
    pub(super) fn site(&self, site: &str) -> Option<&SiteState> {
        self.sites.iter().find(|s| s.name == site)
    }

    pub(super) fn width(&self, site: &str) -> Option<usize> {
        self.site(site).map(|s| s.width)
    }

    pub fn reference_rows(&self) -> u64 {
        self.sites.iter().map(|s| s.reference_rows).sum()
    }

    pub fn example_rows(&self) -> u64 {
        self.sites.iter().map(|s| s.example_rows).sum()
    }

    /// Takes the segment `file` off the list, and its rows off its sites' counts (a
    /// quarantine). Fails, saying why, when the segment is not listed or its rows per site are
    /// not recorded or do not fit the sites' counts; `self` is then unchanged.
    pub(super) fn drop_segment(&mut self, file: &str) -> Result<SegmentEntry, String> {
        let i = self
            .segments
            .iter()
            .position(|s| s.file == file)
            .ok_or_else(|| format!("segment {file} is not listed"))?;
        let segment = &self.segments[i];
        if segment.site_rows.values().sum::<u64>() != segment.rows {
            return Err(format!(
                "state.json does not record the rows of segment {file} per site, so they cannot \
                 be taken off the counts"
            ));
        }
        let mut sites = self.sites.clone();
        for (site, &rows) in &segment.site_rows {
            let s = sites
                .iter_mut()
                .find(|s| &s.name == site)
                .ok_or_else(|| format!("segment {file} holds rows of an unknown site {site:?}"))?;
            let count = if segment.labelled {
                &mut s.example_rows
            } else {
                &mut s.reference_rows
            };
            *count = count.checked_sub(rows).ok_or_else(|| {
                format!("segment {file} holds {rows} rows of site {site:?}, more than it counts")
            })?;
        }
        self.sites = sites;
        Ok(self.segments.remove(i))
    }
}

/// What `fitted/fit.json` holds: the version the fit was made as, and how it ran. It is written
/// into the artifact directory before that directory is renamed into place
/// (`actwatch_io::artifact::save_monitor_with`), so a fit and its version are installed in one
/// atomic step and the served version is always read from the fit it names. `state.json`'s
/// `fit_version` and `last_fit` are a cache of it (repaired at start when a crash left them
/// behind) and the counter the next fit's version comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitRecord {
    pub format_version: u32,
    pub fit_version: u64,
    pub run: FitRun,
    #[serde(default)]
    pub details: FitDetails,
}

/// What a fit used and what its reference check found (in `fit.json`, served in the report).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitDetails {
    /// The ingests fitted, in commit order (empty for a fit recorded before ingests were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingests: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_check: Option<ReferenceCheckRecord>,
}

/// The reference check of a fit (`actwatch_detect::check`), by ingest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReferenceCheckRecord {
    /// Why it did not run, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub alpha: f64,
    pub seconds: f64,
    pub ingests: Vec<IngestCheckRecord>,
}

/// One ingest (or block of consecutive ingests) in the reference check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestCheckRecord {
    pub first_ingest: u64,
    pub last_ingest: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    pub rows: u64,
    pub computations: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub flagged_share: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    pub suspect: bool,
}

impl FitRecord {
    pub fn new(fit_version: u64, run: FitRun) -> Self {
        Self {
            format_version: STORAGE_FORMAT_VERSION,
            fit_version,
            run,
            details: FitDetails::default(),
        }
    }
}

/// Loads the fit saved in `dir` (a monitor's `fitted/`) with its [`FitRecord`]; the record is
/// `None` for a fit saved before records were written with the fit (its version is then
/// `state.json`'s).
pub(crate) fn load_fitted(dir: &Path) -> Result<(Monitor, Manifest, Option<FitRecord>)> {
    let (monitor, manifest) = load_monitor(dir)?;
    let path = dir.join(FIT_RECORD_FILE);
    if !path.exists() {
        return Ok((monitor, manifest, None));
    }
    let record: FitRecord = read_json(&path)?;
    if record.format_version != STORAGE_FORMAT_VERSION {
        return Err(Error::Corrupt {
            path,
            message: format!(
                "format version {}; this build reads {STORAGE_FORMAT_VERSION}",
                record.format_version
            ),
        });
    }
    Ok((monitor, manifest, Some(record)))
}

/// The `max_ingests_per_monitor` limit: `state` may take one more ingest.
fn check_ingests(name: &str, state: &MonitorState, max_ingests: usize) -> Result<()> {
    let ingests = state
        .segments
        .iter()
        .map(SegmentEntry::ingest)
        .collect::<HashSet<_>>()
        .len();
    if ingests >= max_ingests {
        return Err(Error::LimitExceeded {
            limit: "max_ingests_per_monitor",
            max: max_ingests as u64,
            detail: format!(
                "monitor {name:?} holds {ingests} ingests; send reference data in fewer, larger \
                 IngestReference streams"
            ),
        });
    }
    Ok(())
}

/// A fitted monitor as served: immutable, shared by every scoring call that started with it.
#[derive(Debug)]
pub struct FittedMonitor {
    pub monitor: Monitor,
    pub fit_version: u64,
    /// Reference rows the fit was made on (every committed segment).
    pub reference_rows: u64,
    pub run: FitRun,
    /// The ingests fitted and the reference check.
    pub details: FitDetails,
    /// Sites whose conflicting provenance has been logged (once per site and fit: a client
    /// that keeps sending such batches is counted in the metrics, not logged each time).
    pub provenance_logged: Mutex<HashSet<String>>,
}

impl FittedMonitor {
    /// Serves `monitor` with the spec's provenance policy.
    pub fn new(
        mut monitor: Monitor,
        spec: &StoredSpec,
        record: FitRecord,
        reference_rows: u64,
    ) -> Result<Self> {
        monitor.set_provenance_policy(spec.provenance_policy()?);
        Ok(Self {
            monitor,
            fit_version: record.fit_version,
            reference_rows,
            run: record.run,
            details: record.details,
            provenance_logged: Mutex::new(HashSet::new()),
        })
    }
}

/// One monitor: its spec, its committed state, the fit being served and its score log.
#[derive(Debug)]
pub struct MonitorEntry {
    pub name: String,
    pub spec: StoredSpec,
    pub options: MonitorOptions,
    pub(super) dir: PathBuf,
    /// Sites, segments and fit version; every change is written to `state.json` under this lock.
    pub(super) state: Mutex<MonitorState>,
    /// The served fit, replaced in one assignment by a refit: a scorer holds either the old
    /// `Arc` or the new one, never half of either.
    pub(super) fitted: RwLock<Option<Arc<FittedMonitor>>>,
    /// Held by the running fit, so two fits of one monitor never race on `fitted/`.
    pub fit_lock: Arc<tokio::sync::Mutex<()>>,
    pub(super) log: Mutex<ScoreLog>,
    /// Set by DeleteMonitor, so an ingest or fit that finishes afterwards commits nothing.
    pub(super) deleted: AtomicBool,
}

impl MonitorEntry {
    pub fn state(&self) -> MonitorState {
        lock(&self.state).clone()
    }

    /// Sites committed so far.
    pub fn site_count(&self) -> usize {
        lock(&self.state).sites.len()
    }

    pub fn site_width(&self, site: &str) -> Option<usize> {
        lock(&self.state).width(site)
    }

    /// The provenance committed for `site` (empty when none declared or no such site).
    pub fn site_provenance(&self, site: &str) -> Provenance {
        lock(&self.state)
            .site(site)
            .map(|s| s.provenance.clone())
            .unwrap_or_default()
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

    /// Fails (`max_ingests_per_monitor`) when the monitor holds `max_ingests` ingests already.
    pub fn check_room_for_ingest(&self, max_ingests: usize) -> Result<()> {
        check_ingests(&self.name, &lock(&self.state), max_ingests)
    }

    /// The committed ingests, oldest first, each with its segments.
    pub fn ingests(&self) -> Vec<Ingest> {
        let dir = self.dir.join(REFERENCE_DIR);
        let st = lock(&self.state);
        let mut out: Vec<Ingest> = Vec::new();
        for s in &st.segments {
            // A name that does not parse (never written by this server) is an ingest of its own.
            let id = s.ingest().unwrap_or(0);
            let ingest = match out.last_mut() {
                Some(last) if last.id == id && id != 0 => last,
                _ => {
                    out.push(Ingest {
                        id,
                        rows: 0,
                        example_rows: 0,
                        committed_unix_ms: s.committed_unix_ms,
                        principal: s.principal.clone(),
                        segments: Vec::new(),
                    });
                    out.last_mut().expect("just pushed")
                }
            };
            if s.labelled {
                ingest.example_rows += s.rows;
            } else {
                ingest.rows += s.rows;
            }
            ingest
                .segments
                .push((s.file.clone(), dir.join(&s.file), s.labelled));
        }
        out
    }

    /// Where the fit checkpoint lives (see [`actwatch_io::checkpoint`]).
    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join(CHECKPOINT_FILE)
    }

    pub(super) fn check_not_deleted(&self) -> Result<()> {
        if self.deleted.load(Ordering::SeqCst) {
            return Err(Error::MonitorNotFound(self.name.clone()));
        }
        Ok(())
    }

    /// Reserves a segment sequence number for one ingest stream.
    pub(super) fn reserve_segment(&self) -> u64 {
        let mut st = lock(&self.state);
        let seq = st.next_segment;
        st.next_segment += 1;
        seq
    }

    /// Lists finished segments and their sites in `state.json`, stamped with the commit time:
    /// the commit point of an ingest. Fails when the monitor would then hold more than
    /// `max_ingests` ingests.
    pub(super) fn commit_segments(
        &self,
        mut files: Vec<SegmentEntry>,
        sites: &BTreeMap<String, SiteDelta>,
        max_sites: usize,
        max_ingests: usize,
    ) -> Result<(u64, u64)> {
        let mut st = lock(&self.state);
        self.check_not_deleted()?;
        if !files.is_empty() {
            // Checked when the stream opened too; concurrent streams are caught here.
            check_ingests(&self.name, &st, max_ingests)?;
        }
        let now = now_unix_ms();
        for f in &mut files {
            f.committed_unix_ms = Some(now);
        }
        let mut next = st.clone();
        for (site, d) in sites {
            match next.sites.iter_mut().find(|s| &s.name == site) {
                Some(s) if s.width != d.width => {
                    // Another stream fixed this site's width first.
                    return Err(Error::WidthMismatch {
                        site: site.clone(),
                        expected: s.width,
                        got: d.width,
                    });
                }
                Some(s) => {
                    // (Another stream may have fixed the site's provenance first.)
                    s.provenance
                        .merge(&d.provenance)
                        .map_err(|conflict| reference_conflict(site, conflict))?;
                    s.reference_rows += d.rows;
                    s.example_rows += d.example_rows;
                }
                None => next.sites.push(SiteState {
                    name: site.clone(),
                    width: d.width,
                    reference_rows: d.rows,
                    example_rows: d.example_rows,
                    provenance: d.provenance.clone(),
                }),
            }
        }
        if next.sites.len() > max_sites {
            // Concurrent streams that each stayed under the limit, together over it.
            return Err(super::ingest::too_many_sites(max_sites, next.sites.len()));
        }
        next.segments.extend(files);
        write_json_atomic(&self.dir.join(STATE_FILE), &next)?;
        let total = (next.reference_rows(), next.example_rows());
        *st = next;
        Ok(total)
    }

    /// The version the next fit is made as (one fit of a monitor runs at a time: `fit_lock`).
    pub fn next_fit_version(&self) -> u64 {
        lock(&self.state).fit_version + 1
    }

    /// Serves a new fit, already installed in `fitted/` with its `record` (`fit.json`, renamed
    /// into place with the fit: the commit point of a fit), and caches its version in
    /// `state.json`. Failing to write that cache is logged, not returned: the fit is installed
    /// and is what a restart serves, and the start repairs the cache from the record (as does
    /// the next write of `state.json`, from memory).
    pub fn install_fit(
        &self,
        monitor: Monitor,
        reference_rows: u64,
        record: FitRecord,
    ) -> Result<Arc<FittedMonitor>> {
        let mut st = lock(&self.state);
        self.check_not_deleted()?;
        let (fit_version, run) = (record.fit_version, record.run);
        let fitted = Arc::new(FittedMonitor::new(
            monitor,
            &self.spec,
            record,
            reference_rows,
        )?);
        let mut next = st.clone();
        next.fit_version = next.fit_version.max(fit_version);
        next.last_fit = run;
        if let Err(e) = write_json_atomic(&self.dir.join(STATE_FILE), &next) {
            tracing::warn!(
                monitor = %self.name,
                fit_version,
                error = %e,
                "the fit is installed and served, but state.json could not cache its version; \
                 the next start repairs it"
            );
        }
        *st = next;
        *self.fitted.write().unwrap_or_else(PoisonError::into_inner) = Some(fitted.clone());
        Ok(fitted)
    }

    /// Checks each of `segments` (those a fit is about to read) against the checksum recorded
    /// when it was committed, before any of its rows is folded. Each that fails (corrupt, cut
    /// short) is quarantined: moved into `quarantine/` with a reason file beside it and dropped
    /// from `state.json`, its rows taken off the counts; the result is then
    /// [`Error::SegmentsQuarantined`] (DATA_LOSS) naming them, so the fit stops and a new one
    /// uses the remaining data. Segments without a recorded checksum are not checked (see
    /// [`SegmentEntry::sha256`]). Blocking: reads each checked segment once.
    pub fn verify_segments(&self, segments: &[(String, PathBuf, bool)]) -> Result<()> {
        // Per file: the checksum recorded, and the function that computes it.
        type Check = (
            String,
            fn(&Path) -> std::io::Result<(String, u64)>,
            &'static str,
        );
        let recorded: HashMap<String, Option<Check>> = lock(&self.state)
            .segments
            .iter()
            .map(|s| {
                let check: Option<Check> = match (&s.xxh3_128, &s.sha256) {
                    (Some(x), _) => Some((x.clone(), checksum::file, "XXH3-128")),
                    (None, Some(sha)) => Some((sha.clone(), checksum::sha256_file, "SHA-256")),
                    (None, None) => None,
                };
                (s.file.clone(), check)
            })
            .collect();
        let quarantine = self.dir.join(QUARANTINE_DIR);
        let mut failed = Vec::new();
        for (file, path, _) in segments {
            let expected = match recorded.get(file) {
                None => {
                    return Err(Error::Corrupt {
                        path: self.dir.join(STATE_FILE),
                        message: format!("segment {file} is no longer listed"),
                    })
                }
                Some(None) => continue,
                Some(Some(check)) => check,
            };
            let (expected, compute, name) = expected;
            let why = match compute(path) {
                Ok((sum, _)) if &sum == expected => continue,
                Ok((_, len)) => format!(
                    "its {len} bytes do not match the {name} recorded when it was committed: \
                     the file is corrupt or cut short"
                ),
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && quarantine.join(file).is_file() =>
                {
                    // A quarantine that stopped before state.json dropped the segment.
                    "already moved to quarantine by a fit that stopped before dropping it from \
                     state.json"
                        .to_string()
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::Corrupt {
                        path: self.dir.join(STATE_FILE),
                        message: format!("listed segment {} is missing", path.display()),
                    })
                }
                Err(e) => return Err(Error::storage(path, e)),
            };
            self.quarantine_segment(file, &why)?;
            failed.push((file.clone(), why));
        }
        if failed.is_empty() {
            return Ok(());
        }
        Err(Error::SegmentsQuarantined {
            monitor: self.name.clone(),
            segments: failed,
            folder: quarantine,
        })
    }

    /// Moves the segment `file` into `quarantine/` (a reason file first, then the segment,
    /// both folders fsynced) and only then drops it from `state.json`: a crash in between
    /// leaves a listed segment found in `quarantine/`, which the start (and the next fit)
    /// finish dropping, never a monitor that lists what it lost.
    fn quarantine_segment(&self, file: &str, why: &str) -> Result<()> {
        let mut st = lock(&self.state);
        self.check_not_deleted()?;
        let mut next = st.clone();
        let segment = next.drop_segment(file).map_err(|message| Error::Corrupt {
            path: self.dir.join(STATE_FILE),
            message,
        })?;
        let reference = self.dir.join(REFERENCE_DIR);
        let from = reference.join(file);
        let folder = self.dir.join(QUARANTINE_DIR);
        if from.exists() {
            fs::create_dir_all(&folder).map_err(|e| Error::storage(&folder, e))?;
            sync_dir(&self.dir)?;
            write_json_atomic(
                &folder.join(format!("{file}{QUARANTINE_REASON_SUFFIX}")),
                &QuarantineReason {
                    segment: file,
                    reason: why,
                    rows: segment.rows,
                    labelled: segment.labelled,
                    site_rows: &segment.site_rows,
                    xxh3_128_recorded: segment.xxh3_128.as_deref(),
                    sha256_recorded: segment.sha256.as_deref(),
                    quarantined_unix_ms: now_unix_ms(),
                },
            )?;
            fs::rename(&from, folder.join(file)).map_err(|e| Error::storage(&from, e))?;
            sync_dir(&folder)?;
            sync_dir(&reference)?;
        }
        write_json_atomic(&self.dir.join(STATE_FILE), &next)?;
        *st = next;
        tracing::warn!(
            monitor = %self.name,
            segment = %file,
            rows = segment.rows,
            reason = %why,
            "reference segment quarantined (moved to quarantine/, dropped from state.json); \
             it is never fitted"
        );
        Ok(())
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
        let files = lock(&self.log).files_newest_first();
        ScoreLog::read(&files, filter, limit)
    }
}

/// A reference batch of `site` whose provenance conflicts with what the site recorded.
pub(super) fn reference_conflict(site: &str, conflict: ProvenanceConflict) -> Error {
    Error::Detect(actwatch_detect::Error::Provenance {
        site: site.to_string(),
        conflict,
        scoring: false,
    })
}
