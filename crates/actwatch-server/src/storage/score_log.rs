//! The score log: every computation-level result a monitor gave, as JSON lines, bounded.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sync_dir;
use crate::{Error, Result};

/// The score log is split in this many files, so dropping the oldest keeps most of the budget.
const SCORE_LOG_FILES: u64 = 4;

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
    /// An early flag of a computation not yet complete. Early flags are sent, not logged (the
    /// final result is flagged too and says where), so logged results have `false` here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// Where the running statistic first reached the threshold (monitors that flag early).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flagged_at: Option<i64>,
    /// Per concept probe, its answer (absent for monitors without probes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<LoggedProbe>,
}

impl LoggedScore {
    /// The questions that flagged it: "anomaly" and the names of the probes that flagged it.
    pub fn raised_by(&self) -> Vec<String> {
        self.flagged
            .then(|| ANOMALY.to_string())
            .into_iter()
            .chain(
                self.probes
                    .iter()
                    .filter(|p| p.flagged)
                    .map(|p| p.name.clone()),
            )
            .collect()
    }
}

/// The name of the anomaly question in `raised_by` and `flagged_by` (a probe may not be named so).
pub const ANOMALY: &str = "anomaly";

/// One probe's answer for a computation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedProbe {
    pub name: String,
    pub score: f64,
    pub p_value: f64,
    pub flagged: bool,
    pub deferred: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flagged_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedSlot {
    pub site: String,
    pub detector: String,
    pub p_value: Option<f64>,
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
    /// Flagged by any question (anomaly or a probe), or with `flagged_by` by that one.
    pub flagged_only: bool,
    /// With `flagged_only`: only results flagged by this question ([`ANOMALY`] or a probe's
    /// name); None: by any.
    pub flagged_by: Option<String>,
}

impl ScoreFilter {
    fn accepts(&self, s: &LoggedScore) -> bool {
        (self.trace_ids.is_empty() || self.trace_ids.contains(&s.trace_id))
            && (self.since_unix_ms == 0 || s.scored_at_unix_ms >= self.since_unix_ms)
            && (self.until_unix_ms == 0 || s.scored_at_unix_ms < self.until_unix_ms)
            && (!self.flagged_only
                || match &self.flagged_by {
                    None => !s.raised_by().is_empty(),
                    Some(q) => s.raised_by().contains(q),
                })
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
            partial: false,
            flagged_at: flagged.then_some(2),
            probes: Vec::new(),
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
