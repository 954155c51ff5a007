//! One module per command; each exposes `run`.

pub mod demo;
pub mod eval;
pub mod fit;
pub mod score;
pub mod serve;
pub mod token;

use std::path::Path;

use actwatch_detect::Monitor;
use actwatch_io::artifact::{load_monitor, Manifest};
use anyhow::{Context, Result};

/// Loads a monitor directory written by `actwatch fit`, naming it in the error.
fn load(dir: &Path) -> Result<(Monitor, Manifest)> {
    load_monitor(dir).with_context(|| format!("loading the monitor at {}", dir.display()))
}
