//! Reference ingest: the segments one IngestReference stream writes, committed all at once.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use actwatch_core::{Dtype, SiteBatch};
use actwatch_io::reader::TraceColumns;
use actwatch_io::writer::{TraceWriter, DEFAULT_POSITION_COLUMN};

use super::monitor::{reference_conflict, MonitorEntry, SegmentEntry, SiteDelta};
use super::REFERENCE_DIR;
use crate::{Error, Result};

/// The label column of a segment of labelled examples.
pub const LABEL_COLUMN: &str = "label";

/// Most labelled computations one IngestReference stream may hold: the stream keeps each one's
/// label to refuse a computation labelled both ways, so this bounds that memory (about 100 MiB
/// at 100-byte ids). Send more in further streams.
pub const MAX_LABELLED_COMPUTATIONS_PER_STREAM: usize = 1 << 20;

/// What one segment of a stream holds: a width, labelled examples or not, and the type its
/// vectors arrived (and are stored) in.
type SegmentKey = (usize, bool, Dtype);

/// The segments one IngestReference stream is writing: one Parquet file per vector width (and
/// per wire type: a batch is stored in the type it arrived in, bf16 and f16 in half the bytes of
/// f32, and decoded to f32 when read).
/// Dropped without [`IngestSession::commit`], it removes its temporary files and stores nothing.
#[derive(Debug)]
pub struct IngestSession {
    entry: Arc<MonitorEntry>,
    /// `Limits::max_sites_per_monitor` and `Limits::max_ingests_per_monitor`.
    max_sites: usize,
    max_ingests: usize,
    /// The token principal sending the stream, recorded with its segments.
    principal: Option<String>,
    seq: u64,
    /// Per (width, labelled examples or reference traffic, storage type).
    writers: BTreeMap<SegmentKey, TraceWriter>,
    /// Per segment (keyed as `writers`), the rows written of each site (recorded with it, so a
    /// quarantine can take them off the right sites).
    segment_sites: BTreeMap<SegmentKey, BTreeMap<String, u64>>,
    /// The label of each labelled computation of this stream (one label per computation).
    labels: std::collections::HashMap<String, bool>,
    /// Per site of this stream: width, rows and declared provenance.
    sites: BTreeMap<String, SiteDelta>,
    pub rows: u64,
    /// Of `rows`, the labelled examples.
    pub example_rows: u64,
    pub bytes: u64,
    pub batches: u64,
}

impl IngestSession {
    /// A session for one stream into `entry`, which may have at most `max_sites` sites and
    /// `max_ingests` ingests, sent by `principal`.
    pub fn new(
        entry: Arc<MonitorEntry>,
        max_sites: usize,
        max_ingests: usize,
        principal: Option<String>,
    ) -> Self {
        let seq = entry.reserve_segment();
        Self {
            entry,
            max_sites,
            max_ingests,
            principal,
            seq,
            writers: BTreeMap::new(),
            segment_sites: BTreeMap::new(),
            labels: std::collections::HashMap::new(),
            sites: BTreeMap::new(),
            rows: 0,
            example_rows: 0,
            bytes: 0,
            batches: 0,
        }
    }

    pub fn entry(&self) -> &Arc<MonitorEntry> {
        &self.entry
    }

    /// The id of the ingest this stream commits (`IngestReferenceSummary.ingest`).
    pub fn ingest(&self) -> u64 {
        self.seq
    }

    /// Checks a batch's width and provenance against its site (and its labels, if any: labelled
    /// examples for the monitor's probes) and writes it (blocking), stored as `dtype`: the type
    /// its values arrived in (they are exact in it).
    pub fn add(
        &mut self,
        batch: SiteBatch,
        dtype: Dtype,
        payload_bytes: u64,
        labels: Option<Vec<bool>>,
    ) -> Result<()> {
        let width = batch.dim();
        let labels =
            match labels {
                None => None,
                Some(_) if self.entry.options.probes.is_empty() => return Err(Error::BadLabels(
                    "the monitor has no probes to fit on labelled examples (MonitorSpec.probes)"
                        .into(),
                )),
                Some(l) if l.len() == 1 => Some(vec![l[0]; batch.rows()]),
                Some(l) if l.len() == batch.rows() => Some(l),
                Some(l) => {
                    return Err(Error::BadLabels(format!(
                    "{} labels for a batch of {} rows: give one for the whole batch or one per row",
                    l.len(),
                    batch.rows()
                )))
                }
            };
        if let Some(labels) = &labels {
            // One label per computation, within the stream (checked before anything is kept).
            let mut seen: std::collections::HashMap<&str, bool> = Default::default();
            for (id, &l) in batch.trace_ids().iter().zip(labels) {
                let known = self
                    .labels
                    .get(id)
                    .copied()
                    .or_else(|| seen.get(id.as_str()).copied());
                if known.is_some_and(|k| k != l) {
                    return Err(Error::BadLabels(format!(
                        "computation {:?} is labelled both true and false; a label is per computation",
                        crate::convert::excerpt(id)
                    )));
                }
                seen.insert(id, l);
            }
            let new = seen
                .keys()
                .filter(|id| !self.labels.contains_key(**id))
                .count();
            if self.labels.len() + new > MAX_LABELLED_COMPUTATIONS_PER_STREAM {
                return Err(Error::LimitExceeded {
                    limit: "max_labelled_computations_per_stream",
                    max: MAX_LABELLED_COMPUTATIONS_PER_STREAM as u64,
                    detail: "this stream would label more computations; send the rest in \
                             another stream"
                        .into(),
                });
            }
            for (id, l) in seen {
                self.labels.insert(id.to_string(), l);
            }
        }
        let known = self
            .entry
            .site_width(batch.site())
            .or_else(|| self.sites.get(batch.site()).map(|s| s.width));
        if let Some(expected) = known.filter(|&w| w != width) {
            return Err(Error::WidthMismatch {
                site: batch.site().to_string(),
                expected,
                got: width,
            });
        }
        if known.is_none() {
            // A new site: refused before anything of it is written.
            let sites = self.entry.site_count() + self.sites.len();
            if sites >= self.max_sites {
                return Err(too_many_sites(self.max_sites, sites + 1));
            }
        }
        let rows = batch.rows() as u64;
        let declared = batch.provenance().cloned();
        if let Some(p) = &declared {
            // What the site committed, plus what this stream declared so far: a conflict is
            // refused before anything of the batch is written.
            let mut recorded = self.entry.site_provenance(batch.site());
            if let Some(s) = self.sites.get(batch.site()) {
                recorded
                    .merge(&s.provenance)
                    .map_err(|c| reference_conflict(batch.site(), c))?;
            }
            if let Some(c) = recorded.conflict(p) {
                return Err(reference_conflict(batch.site(), c));
            }
        }
        let site = self
            .sites
            .entry(batch.site().to_string())
            .or_insert_with(|| SiteDelta {
                width,
                ..SiteDelta::default()
            });
        if labels.is_some() {
            site.example_rows += rows;
        } else {
            site.rows += rows;
        }
        if let Some(p) = &declared {
            site.provenance
                .merge(p)
                .map_err(|c| reference_conflict(batch.site(), c))?;
        }
        let labelled = labels.is_some();
        let key = (width, labelled, dtype);
        let writer = match self.writers.entry(key) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let dir = self.entry.dir.join(REFERENCE_DIR);
                let columns = TraceColumns::default();
                let position = Some(DEFAULT_POSITION_COLUMN);
                let stored = match dtype {
                    Dtype::F32 => "",
                    Dtype::F16 => "-f16",
                    Dtype::Bf16 => "-bf16",
                };
                let (suffix, label) = match labelled {
                    true => ("-labelled", Some(LABEL_COLUMN)),
                    false => ("", None),
                };
                let file = format!("seg-{:08}-d{width}{stored}{suffix}.arrow", self.seq);
                // Hashed as written: the checksum state.json records with the segment.
                let path = dir.join(file);
                v.insert(TraceWriter::create_segment(
                    path, width, &columns, position, label, dtype,
                )?)
            }
        };
        let site_name = batch.site().to_string();
        match labels {
            Some(l) => writer.write_labelled(batch, l)?,
            None => writer.write(batch)?,
        }
        *self
            .segment_sites
            .entry(key)
            .or_default()
            .entry(site_name)
            .or_default() += rows;
        if labelled {
            self.example_rows += rows;
        }
        self.rows += rows;
        self.bytes += payload_bytes;
        self.batches += 1;
        Ok(())
    }

    /// Makes every segment durable (fsync, rename) and commits them in `state.json` (blocking),
    /// each with the checksum of its bytes (`actwatch_io::checksum`) and its rows per site. Returns the monitor's reference
    /// rows and labelled example rows after the commit.
    pub fn commit(mut self) -> Result<(u64, u64)> {
        let writers = std::mem::take(&mut self.writers);
        let mut done: Vec<(PathBuf, SegmentEntry)> = Vec::new();
        let remove = |done: &[(PathBuf, SegmentEntry)]| {
            for (p, _) in done {
                let _ = fs::remove_file(p);
            }
        };
        for (key @ (_, labelled, _), w) in writers {
            let path = w.path().to_path_buf();
            match w.finish_hashed() {
                Ok((rows, sum)) => {
                    let entry = SegmentEntry {
                        file: path
                            .file_name()
                            .map(|f| f.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        rows,
                        labelled,
                        xxh3_128: Some(sum),
                        sha256: None,
                        site_rows: self.segment_sites.remove(&key).unwrap_or_default(),
                        committed_unix_ms: None, // stamped at the commit
                        principal: self.principal.clone(),
                    };
                    done.push((path, entry));
                }
                Err(e) => {
                    // The writers not yet finished remove their temporary files when dropped.
                    remove(&done);
                    return Err(e.into());
                }
            }
        }
        let entries = done.iter().map(|(_, e)| e.clone()).collect();
        self.entry
            .commit_segments(entries, &self.sites, self.max_sites, self.max_ingests)
            .inspect_err(|_| remove(&done))
    }
}

/// The `max_sites_per_monitor` limit, hit by a monitor that would have `sites` sites.
pub(super) fn too_many_sites(max: usize, sites: usize) -> Error {
    Error::LimitExceeded {
        limit: "max_sites_per_monitor",
        max: max as u64,
        detail: format!("this ingest would give the monitor {sites} sites"),
    }
}
