//! Reference ingest: the segments one IngestReference stream writes, committed all at once.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use actwatch_core::SiteBatch;
use actwatch_io::reader::TraceColumns;
use actwatch_io::writer::{TraceWriter, DEFAULT_POSITION_COLUMN};

use super::monitor::{reference_conflict, MonitorEntry, SegmentEntry, SiteDelta};
use super::REFERENCE_DIR;
use crate::{Error, Result};

/// The segments one IngestReference stream is writing: one Parquet file per vector width.
/// Dropped without [`IngestSession::commit`], it removes its temporary files and stores nothing.
#[derive(Debug)]
pub struct IngestSession {
    entry: Arc<MonitorEntry>,
    /// `Limits::max_sites_per_monitor`.
    max_sites: usize,
    seq: u64,
    writers: BTreeMap<usize, TraceWriter>,
    /// Per site of this stream: width, rows and declared provenance.
    sites: BTreeMap<String, SiteDelta>,
    pub rows: u64,
    pub bytes: u64,
    pub batches: u64,
}

impl IngestSession {
    /// A session for one stream into `entry`, which may have at most `max_sites` sites.
    pub fn new(entry: Arc<MonitorEntry>, max_sites: usize) -> Self {
        let seq = entry.reserve_segment();
        Self {
            entry,
            max_sites,
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

    /// Checks a batch's width and provenance against its site and writes it (blocking).
    pub fn add(&mut self, batch: SiteBatch, payload_bytes: u64) -> Result<()> {
        let width = batch.dim();
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
        site.rows += rows;
        if let Some(p) = &declared {
            site.provenance
                .merge(p)
                .map_err(|c| reference_conflict(batch.site(), c))?;
        }
        let writer = match self.writers.entry(width) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let path = self
                    .entry
                    .dir
                    .join(REFERENCE_DIR)
                    .join(format!("seg-{:08}-d{width}.parquet", self.seq));
                v.insert(TraceWriter::create(
                    path,
                    width,
                    &TraceColumns::default(),
                    Some(DEFAULT_POSITION_COLUMN),
                )?)
            }
        };
        writer.write(batch)?;
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
            .commit_segments(entries, &self.sites, self.max_sites)
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
