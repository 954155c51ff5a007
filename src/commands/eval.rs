//! `actwatch eval`: normal files against anomalous ones (AUROC, FPR at 95% TPR, recall at the
//! target false-positive rate, achieved FPR).

use std::path::{Path, PathBuf};

use actwatch_detect::Monitor;
use actwatch_io::pipeline;
use actwatch_io::reader::ReadOptions;
use anyhow::{bail, Context, Result};

use crate::cli::EvalArgs;
use crate::progress::Bars;
use crate::report::{print_eval_table, EvalRow};

pub fn run(a: EvalArgs) -> Result<()> {
    let (mut monitor, manifest) = super::load(&a.monitor)?;
    monitor.set_provenance_policy(a.provenance.policy());
    let read = a.columns.read_options(&manifest.reference.columns, None);
    if !a.examples.is_empty() {
        let label = a
            .label_column
            .as_deref()
            .expect("clap requires --label-column");
        return run_probe_eval(
            &monitor,
            &read,
            &a.examples,
            label,
            a.group_column.as_deref(),
        );
    }
    run_eval(
        &monitor,
        &read,
        &a.normal,
        &a.anomalous,
        a.label_column.as_deref(),
        a.plot.as_deref(),
    )
}

pub fn run_eval(
    monitor: &Monitor,
    read: &ReadOptions,
    normal: &[PathBuf],
    anomalous: &[PathBuf],
    label_column: Option<&str>,
    plot_path: Option<&Path>,
) -> Result<()> {
    let bars = Bars::new();
    let n = pipeline::score_computations(monitor, normal, read, &bars)
        .context("scoring the normal files")?;
    let mut normal_row = EvalRow::new("normal".into());
    n.results.iter().for_each(|r| normal_row.push(r));
    crate::report::print_provenance_conflicts(&n.provenance_conflicts);
    let mut rows: Vec<EvalRow> = Vec::new();
    for path in anomalous {
        let t = pipeline::score_computations(monitor, std::slice::from_ref(path), read, &bars)
            .with_context(|| format!("scoring {}", path.display()))?;
        crate::report::print_provenance_conflicts(&t.provenance_conflicts);
        match label_column {
            None => {
                let mut row = EvalRow::new(path.file_stem().map_or_else(
                    || path.display().to_string(),
                    |s| s.to_string_lossy().into_owned(),
                ));
                t.results.iter().for_each(|r| row.push(r));
                rows.push(row);
            }
            Some(col) => {
                let labels = t.column_strings(col).with_context(|| {
                    format!(
                        "{}: no column {col} constant within each computation",
                        path.display()
                    )
                })?;
                for (label, r) in labels.iter().zip(&t.results) {
                    let name = label.clone().unwrap_or_else(|| "(null)".into());
                    let row = match rows.iter().position(|x| x.name == name) {
                        Some(i) => &mut rows[i],
                        None => {
                            rows.push(EvalRow::new(name));
                            rows.last_mut().expect("pushed")
                        }
                    };
                    row.push(r);
                }
            }
        }
    }
    if normal_row.scores.is_empty() {
        bail!("the normal files hold no computations of the monitor's sites");
    }
    print_eval_table(monitor, &normal_row, &rows);
    if let Some(path) = plot_path {
        let series: Vec<(&str, &[f64])> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.scores.as_slice()))
            .collect();
        std::fs::write(
            path,
            crate::plot::svg(&normal_row.scores, &series, monitor.summary().threshold),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// `eval --examples`: the monitor's concept probes on labelled computations.
pub fn run_probe_eval(
    monitor: &Monitor,
    read: &ReadOptions,
    examples: &[PathBuf],
    label_column: &str,
    group_column: Option<&str>,
) -> Result<()> {
    if monitor.probes().is_empty() {
        bail!("the monitor has no concept probes (fit one with --probe and --examples)");
    }
    let read = ReadOptions {
        keep_other_columns: true,
        ..read.clone()
    };
    let t = pipeline::score_computations(monitor, examples, &read, &Bars::new())
        .context("scoring the examples")?;
    crate::report::print_provenance_conflicts(&t.provenance_conflicts);
    let labels = t
        .column_strings(label_column)
        .with_context(|| format!("no column {label_column} constant within each computation"))?
        .into_iter()
        .zip(&t.ids)
        .map(|(v, id)| match v.as_deref() {
            Some("1" | "true") => Ok(true),
            Some("0" | "false") => Ok(false),
            other => {
                bail!("computation {id:?}: label {other:?} in column {label_column} is not 0 or 1")
            }
        })
        .collect::<Result<Vec<bool>>>()?;
    let groups = match group_column {
        Some(g) => Some(
            t.column_strings(g)
                .with_context(|| format!("no column {g} constant within each computation"))?,
        ),
        None => None,
    };
    crate::report::print_probe_eval(monitor, &t.results, &labels, groups.as_deref());
    Ok(())
}
