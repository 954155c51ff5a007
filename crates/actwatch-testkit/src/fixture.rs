//! A monitor fitted on the MiniLM reference file, in memory or saved to a directory that lives as
//! long as the fixture (a temporary directory owned by it, removed when it is dropped).

use std::path::{Path, PathBuf};

use actwatch_detect::monitor::{Monitor, MonitorOptions};
use actwatch_io::artifact::{save_monitor, ReferenceSummary};
use actwatch_io::pipeline::{fit_monitor, NoProgress};
use actwatch_io::reader::ReadOptions;
use tempfile::TempDir;

use crate::minilm;

/// Fits `options` on the MiniLM reference file read with `read`.
pub fn fit_minilm(options: MonitorOptions, read: &ReadOptions) -> (Monitor, ReferenceSummary) {
    fit_monitor(&[minilm::file(minilm::TRAIN)], read, options, &NoProgress)
        .expect("fitting on the MiniLM reference file")
}

/// A fitted monitor saved with `save_monitor`, in a directory removed with the fixture.
pub struct SavedMonitor {
    _dir: TempDir,
    path: PathBuf,
}

impl SavedMonitor {
    /// Fits the default monitor on the MiniLM reference file and saves it.
    pub fn minilm_default() -> Self {
        Self::minilm(MonitorOptions::default())
    }

    /// Fits `options` on the MiniLM reference file and saves it.
    pub fn minilm(options: MonitorOptions) -> Self {
        let (monitor, reference) = fit_minilm(options, &minilm::read_options());
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("monitor");
        save_monitor(&monitor, &reference, &path).expect("saving the monitor");
        Self { _dir: dir, path }
    }

    /// The monitor directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
