//! `actwatch score`: score Parquet archives with a fitted monitor, to Parquet.

use std::time::Instant;

use actwatch_io::pipeline::{self, Level};
use anyhow::{Context, Result};

use crate::cli::{LevelArg, ScoreArgs};
use crate::progress::Bars;

pub fn run(a: ScoreArgs) -> Result<()> {
    let (mut monitor, manifest) = super::load(&a.monitor)?;
    monitor.set_provenance_policy(a.provenance.policy());
    #[cfg(feature = "torch")]
    let monitor = crate::torch::with_device(monitor, a.device.as_deref(), a.on_device.as_deref())?;
    let read = a.columns.read_options(&manifest.reference.columns, None);
    let level = match a.level {
        LevelArg::Computation => Level::Computation,
        LevelArg::Trace => Level::Trace,
    };
    let started = Instant::now();
    let summary =
        pipeline::score_to_parquet(&monitor, &a.input, &read, level, &a.output, &Bars::new())
            .context("scoring failed")?;
    let secs = started.elapsed().as_secs_f64();
    crate::report::print_provenance_conflicts(&summary.provenance_conflicts);
    println!(
        "scored {} traces into {} rows ({} flagged at p <= {}) in {:.2}s ({:.0} traces/s); wrote {}",
        summary.input_rows,
        summary.output_rows,
        summary.flagged,
        monitor.options().fpr,
        secs,
        summary.input_rows as f64 / secs.max(1e-9),
        a.output.display()
    );
    Ok(())
}
