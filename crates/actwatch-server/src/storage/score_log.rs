//! The score log: every computation-level result a monitor gave, as JSON lines, bounded.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
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

/// Append-only JSON lines in numbered files, at most `max_bytes` in all: the oldest file is
/// deleted when the budget is exceeded. Each append (one call's results) is all or nothing: one
/// buffer, written and fsynced, or on any failure cut back off the file ([`ScoreLog::append`]).
/// Reads take only whole lines, up to the length acknowledged when they started: a torn last
/// line (a crash mid-append) is never read, and every start opens a new file, so nothing is
/// appended after one.
#[derive(Debug)]
pub struct ScoreLog {
    dir: PathBuf,
    max_bytes: u64,
    /// (sequence number, size) of every file, oldest first; the last one is being appended to.
    /// The size of the current file counts acknowledged appends only.
    files: VecDeque<(u64, u64)>,
    current: Option<File>,
    /// Test-only failure injection: the next append writes this many bytes of its buffer, then
    /// fails as a full disk would.
    #[cfg(test)]
    fail_after: Option<usize>,
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
            #[cfg(test)]
            fail_after: None,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("log-{seq:08}.jsonl"))
    }

    fn file_budget(&self) -> u64 {
        (self.max_bytes / SCORE_LOG_FILES).max(1)
    }

    /// Appends one call's results, all or nothing: they are encoded into one buffer, written and
    /// fsynced; if the write or the fsync fails, the file is cut back to its length before the
    /// append (and that fsynced) and the error returned, so a failed call leaves nothing of its
    /// results and the next append starts on a clean line. If even the cut fails, the file is
    /// left to readers (who read only up to its acknowledged length) and the next append opens a
    /// new one.
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
        #[cfg(test)]
        let fail_after = self.fail_after.take();
        let (seq, size) = self.files.back_mut().expect("a current file exists");
        let path = self.dir.join(format!("log-{seq:08}.jsonl"));
        let f = self.current.as_mut().expect("a current file is open");
        let before = *size;
        let write = |f: &mut File| -> std::io::Result<()> {
            #[cfg(test)]
            if let Some(n) = fail_after {
                f.write_all(&buf[..n.min(buf.len())])?;
                return Err(std::io::Error::from_raw_os_error(28));
            }
            f.write_all(&buf)?;
            f.sync_data()
        };
        if let Err(e) = write(f) {
            // The file is opened to append, so the next write lands at the cut.
            if let Err(cut) = f.set_len(before).and_then(|()| f.sync_data()) {
                tracing::error!(
                    file = %path.display(),
                    error = %cut,
                    "cannot cut a failed score-log append back off; the next append opens a \
                     new file (readers skip the torn tail)"
                );
                self.current = None;
            }
            return Err(Error::storage(&path, e));
        }
        *size += len;
        while self.files.len() > 1 && self.files.iter().map(|f| f.1).sum::<u64>() > self.max_bytes {
            let old = self.files.front().expect("more than one file").0;
            let p = self.path(old);
            // The append is durable and acknowledged whatever happens here: a file that cannot
            // be deleted is kept (and tried again at the next append), not reported as the
            // call's failure.
            match fs::remove_file(&p) {
                Ok(()) => {
                    self.files.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.files.pop_front();
                }
                Err(e) => {
                    tracing::warn!(
                        file = %p.display(),
                        error = %e,
                        "cannot delete the oldest score-log file; the log exceeds its budget"
                    );
                    break;
                }
            }
        }
        Ok(())
    }

    /// Every file, newest first, with the length acknowledged so far: what a read may take.
    pub fn files_newest_first(&self) -> Vec<(PathBuf, u64)> {
        self.files
            .iter()
            .rev()
            .map(|&(s, size)| (self.path(s), size))
            .collect()
    }

    /// Reads logged results newest first, from `files` as [`ScoreLog::files_newest_first`]
    /// gave them (no lock needed: files are append-only, each is read only up to its
    /// acknowledged length, so an append in progress is never seen, and a file deleted
    /// meanwhile is skipped). Only whole lines are read: what follows a file's last newline is
    /// a torn tail (an append a crash cut short), never returned.
    pub fn read(
        files: &[(PathBuf, u64)],
        filter: &ScoreFilter,
        limit: usize,
    ) -> Result<Vec<LoggedScore>> {
        let mut out = Vec::new();
        for (p, acknowledged) in files {
            let mut bytes = Vec::new();
            match File::open(p) {
                Ok(f) => f
                    .take(*acknowledged)
                    .read_to_end(&mut bytes)
                    .map_err(|e| Error::storage(p, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::storage(p, e)),
            };
            let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            for line in bytes[..end].split(|&b| b == b'\n').rev() {
                // (A line torn by a crash before appends were all or nothing does not parse.)
                let Ok(s) = serde_json::from_slice::<LoggedScore>(line) else {
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
        let got = ScoreLog::read(&log.files_newest_first(), &ScoreFilter::default(), 5).unwrap();
        let ids: Vec<_> = got.iter().map(|s| s.trace_id.as_str()).collect();
        assert_eq!(ids, ["c199", "c198", "c197", "c196", "c195"]);
        drop(log);

        let mut log = ScoreLog::open(dir.path(), 4096).unwrap();
        log.append(&[score("after", true, 1000)]).unwrap();
        // A torn line in an older file is skipped.
        let oldest = log.files_newest_first().pop().unwrap().0;
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
        let got = ScoreLog::read(&log.files_newest_first(), &filter, 3).unwrap();
        let ids: Vec<_> = got.iter().map(|s| s.trace_id.as_str()).collect();
        assert_eq!(ids, ["after", "c190", "c180"]);
    }

    fn ids(log: &ScoreLog) -> Vec<String> {
        ScoreLog::read(
            &log.files_newest_first(),
            &ScoreFilter::default(),
            usize::MAX,
        )
        .unwrap()
        .into_iter()
        .map(|s| s.trace_id)
        .collect()
    }

    /// A write that fails part-way (here after three and a half of the call's four results, as a
    /// full disk does) leaves nothing of the call, and the next acknowledged append reads back
    /// whole (reliability issue: "a failed score-log write left one acknowledged result unreadable
    /// and stored 3 results of the failed call").
    #[test]
    fn a_failed_append_leaves_nothing_of_its_call() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ScoreLog::open(dir.path(), 1 << 20).unwrap();
        log.append(&[score("a", false, 1)]).unwrap();
        log.append(&[score("b", true, 2)]).unwrap();
        let failed: Vec<_> = (0..4).map(|i| score(&format!("f{i}"), false, 3)).collect();
        let line = serde_json::to_vec(&failed[0]).unwrap().len() + 1;
        log.fail_after = Some(3 * line + line / 2);
        let e = log.append(&failed).unwrap_err();
        assert!(e.to_string().contains("os error 28"), "{e}");
        assert_eq!(ids(&log), ["b", "a"]);
        log.append(&[score("c", false, 4)]).unwrap();
        assert_eq!(ids(&log), ["c", "b", "a"]);
        drop(log);
        let log = ScoreLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&log), ["c", "b", "a"]);
    }

    /// A torn last line (a crash mid-append, possibly from a build before appends were
    /// all-or-nothing) is never read back, whether it happens to parse (only its newline is
    /// missing) or ends inside a UTF-8 character, and the log accepts new appends after it.
    #[test]
    fn a_torn_last_line_is_never_read_and_appends_continue() {
        for torn in [
            // A whole result whose newline never made it: part of a call that did not return.
            serde_json::to_vec(&score("torn", true, 3)).unwrap(),
            // Cut inside the two bytes of an "é".
            b"{\"trace_id\":\"caf\xc3".to_vec(),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = Vec::new();
            for s in [score("a", false, 1), score("b", true, 2)] {
                serde_json::to_writer(&mut bytes, &s).unwrap();
                bytes.push(b'\n');
            }
            bytes.extend_from_slice(&torn);
            fs::write(dir.path().join("log-00000001.jsonl"), &bytes).unwrap();
            let mut log = ScoreLog::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(ids(&log), ["b", "a"]);
            log.append(&[score("c", false, 4)]).unwrap();
            log.append(&[score("d", true, 5)]).unwrap();
            assert_eq!(ids(&log), ["d", "c", "b", "a"]);
        }
    }
}
