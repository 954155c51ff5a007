//! The reference check over files ([`actwatch_detect::check`]): which groups of reference files
//! look unlike the rest. Three streaming passes over the files (basis sample, fit halves and null
//! sample, scoring), each batch handed over per site; memory is what the check keeps (bounded by
//! its named limits), never the data.

use std::collections::HashMap;
use std::path::PathBuf;

use actwatch_detect::check::{BasisSampler, CheckReport, CHECK_MAX_GROUPS};

use super::Progress;
use crate::reader::{ReadOptions, TraceBatch, TraceReader};
use crate::{Error, Result};

/// Checks `groups` (each a list of reference files; at least 2 and at most
/// [`CHECK_MAX_GROUPS`] groups, every file in one group) whose traces are at `sites` (name,
/// width). Progress: one phase, "check", over three times the rows.
pub fn check_reference(
    groups: &[Vec<PathBuf>],
    sites: &[(String, usize)],
    read: &ReadOptions,
    progress: &dyn Progress,
) -> Result<CheckReport> {
    if groups.len() > CHECK_MAX_GROUPS {
        return Err(Error::Detect(actwatch_detect::Error::InvalidOption(
            format!(
                "the reference check compares at most {CHECK_MAX_GROUPS} groups, got {}",
                groups.len()
            ),
        )));
    }
    let mut group_of: HashMap<PathBuf, usize> = HashMap::new();
    for (g, files) in groups.iter().enumerate() {
        for f in files {
            if group_of.insert(f.clone(), g).is_some() {
                return Err(Error::Detect(actwatch_detect::Error::InvalidOption(
                    format!("reference check: {} is in two groups", f.display()),
                )));
            }
        }
    }
    let files: Vec<PathBuf> = groups.iter().flatten().cloned().collect();
    let read = ReadOptions {
        keep_other_columns: false,
        ..read.clone()
    };
    let mut sampler = BasisSampler::new(groups.len(), sites)?;
    let total = TraceReader::open(&files, read.clone())?.total_rows();
    progress.start("check", 3 * total);
    each_site(&files, &read, &group_of, progress, |_, site, ids, rows| {
        Ok(sampler.push(site, ids, rows)?)
    })?;
    let mut features = sampler.finish()?;
    each_site(&files, &read, &group_of, progress, |g, site, ids, rows| {
        Ok(features.push(g, site, ids, rows)?)
    })?;
    let mut scorer = features.finish()?;
    each_site(&files, &read, &group_of, progress, |g, site, ids, rows| {
        Ok(scorer.push(g, site, ids, rows)?)
    })?;
    progress.finish();
    Ok(scorer.finish())
}

/// One pass: every batch of `files`, per site, with its file's group.
fn each_site(
    files: &[PathBuf],
    read: &ReadOptions,
    group_of: &HashMap<PathBuf, usize>,
    progress: &dyn Progress,
    mut f: impl FnMut(usize, &str, &[&str], &[f32]) -> Result<()>,
) -> Result<()> {
    for batch in TraceReader::open(files, read.clone())? {
        let batch: TraceBatch = batch?;
        // (A directory given as a group's file would expand into files not in the map.)
        let g = *group_of.get(batch.path.as_ref()).ok_or_else(|| {
            Error::NoInput(format!(
                "reference check: {} is in no group (groups list files, not directories)",
                batch.path.display()
            ))
        })?;
        for (site, idx) in batch.site_groups() {
            let ids: Vec<&str> = idx.iter().map(|&i| batch.trace_ids[i].as_str()).collect();
            let v = batch.gather(&idx)?;
            f(g, &site, &ids, v.as_slice())?;
        }
        progress.advance(batch.trace_ids.len() as u64);
    }
    Ok(())
}
