//! One monitor's files and served state: its spec, `state.json` (sites, committed segments, fit
//! version), the fit being served and its score log.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use actwatch_core::{Provenance, ProvenanceConflict};
use actwatch_detect::monitor::{Monitor, MonitorOptions};
use serde::{Deserialize, Serialize};

use super::score_log::{LoggedScore, ScoreFilter, ScoreLog};
use super::{
    lock, write_json_atomic, CHECKPOINT_FILE, FITTED_DIR, REFERENCE_DIR, STATE_FILE,
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
}

/// A fitted monitor as served: immutable, shared by every scoring call that started with it.
#[derive(Debug)]
pub struct FittedMonitor {
    pub monitor: Monitor,
    pub fit_version: u64,
    /// Reference rows the fit was made on (every committed segment).
    pub reference_rows: u64,
    pub run: FitRun,
    /// Sites whose conflicting provenance has been logged (once per site and fit: a client
    /// that keeps sending such batches is counted in the metrics, not logged each time).
    pub provenance_logged: Mutex<HashSet<String>>,
}

impl FittedMonitor {
    /// Serves `monitor` with the spec's provenance policy.
    pub fn new(
        mut monitor: Monitor,
        spec: &StoredSpec,
        fit_version: u64,
        reference_rows: u64,
        run: FitRun,
    ) -> Result<Self> {
        monitor.set_provenance_policy(spec.provenance_policy()?);
        Ok(Self {
            monitor,
            fit_version,
            reference_rows,
            run,
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

    /// The committed segments, reference traffic and labelled examples, in commit order:
    /// (file name, path, labelled).
    pub fn segments(&self) -> Vec<(String, PathBuf, bool)> {
        let dir = self.dir.join(REFERENCE_DIR);
        lock(&self.state)
            .segments
            .iter()
            .map(|s| (s.file.clone(), dir.join(&s.file), s.labelled))
            .collect()
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

    /// Lists finished segments and their sites in `state.json`: the commit point of an ingest.
    pub(super) fn commit_segments(
        &self,
        files: Vec<SegmentEntry>,
        sites: &BTreeMap<String, SiteDelta>,
        max_sites: usize,
    ) -> Result<(u64, u64)> {
        let mut st = lock(&self.state);
        self.check_not_deleted()?;
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

    /// Records a new fit (already saved in `fitted/`) and serves it.
    pub fn install_fit(
        &self,
        monitor: Monitor,
        reference_rows: u64,
        run: FitRun,
    ) -> Result<Arc<FittedMonitor>> {
        let mut st = lock(&self.state);
        self.check_not_deleted()?;
        let mut next = st.clone();
        next.fit_version += 1;
        next.last_fit = run;
        write_json_atomic(&self.dir.join(STATE_FILE), &next)?;
        let fitted = Arc::new(FittedMonitor::new(
            monitor,
            &self.spec,
            next.fit_version,
            reference_rows,
            run,
        )?);
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
}

/// A reference batch of `site` whose provenance conflicts with what the site recorded.
pub(super) fn reference_conflict(site: &str, conflict: ProvenanceConflict) -> Error {
    Error::Detect(actwatch_detect::Error::Provenance {
        site: site.to_string(),
        conflict,
        scoring: false,
    })
}
