//! `actwatch fit`: fit a monitor on reference Parquet and write it to a directory.

use std::time::Instant;

use actwatch_detect::monitor::MonitorOptions;
use actwatch_detect::probe::ProbeSpec;
use actwatch_detect::spec::DetectorSpec;
use actwatch_detect::{Aggregation, Fusion};
use actwatch_io::artifact::save_monitor;
use actwatch_io::pipeline;
use actwatch_io::reader::TraceColumns;
use anyhow::{Context, Result};

use crate::cli::FitArgs;
use crate::progress::Bars;
use crate::report::print_fit_report;

pub fn run(a: FitArgs) -> Result<()> {
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list(&a.detectors).context("--detectors")?,
        joint: if a.joint.trim().eq_ignore_ascii_case("none") {
            Vec::new()
        } else {
            DetectorSpec::parse_list(&a.joint).context("--joint")?
        },
        aggregation: Aggregation::parse(&a.aggregation).context("--aggregation")?,
        fusion: Fusion::parse(&a.fusion).context("--fusion")?,
        fpr: a.fpr,
        calibration_fraction: a.calibration_fraction,
        seed: a.seed,
        length_strata: a.length_strata,
        probes: a
            .probes
            .iter()
            .map(|p| ProbeSpec::parse(p))
            .collect::<Result<_, _>>()
            .context("--probe")?,
    };
    options.validate()?;
    let read = a
        .columns
        .read_options(&TraceColumns::default(), a.sites.clone());
    let examples = if a.examples.is_empty() {
        None
    } else {
        Some(
            pipeline::ExampleInput::new(&a.examples, &read, &a.label_column)
                .context("--examples")?,
        )
    };
    let started = Instant::now();
    let (monitor, reference) = pipeline::fit_monitor_with_examples(
        &a.input,
        &read,
        options,
        examples.as_ref(),
        &Bars::new(),
    )
    .context("fitting failed")?;
    let manifest = save_monitor(&monitor, &reference, &a.out)
        .with_context(|| format!("writing the monitor to {}", a.out.display()))?;
    print_fit_report(&monitor, &manifest, started.elapsed().as_secs_f64(), &a.out);
    Ok(())
}
