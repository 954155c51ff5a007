//! A monitor fitted on the MiniLM reference file (in memory: nothing is written, so nothing is
//! left behind).

use actwatch_detect::monitor::{Monitor, MonitorOptions};
use actwatch_io::artifact::ReferenceSummary;
use actwatch_io::pipeline::{fit_monitor, NoProgress};
use actwatch_io::reader::ReadOptions;

use crate::minilm;

/// Fits `options` on the MiniLM reference file read with `read`.
pub fn fit_minilm(options: MonitorOptions, read: &ReadOptions) -> (Monitor, ReferenceSummary) {
    fit_monitor(&[minilm::file(minilm::TRAIN)], read, options, &NoProgress)
        .expect("fitting on the MiniLM reference file")
}
