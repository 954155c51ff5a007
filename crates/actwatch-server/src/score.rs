//! Scoring decoded batches with a served fit: the same `Monitor::score_site` → `accumulate` →
//! `finish_computation` calls as the batch pipeline, so both doors give the same p-values.

use std::collections::HashMap;

use actwatch_detect::monitor::ComputationAccumulator;
use actwatch_proto::{v1, DecodedBatch};

use crate::storage::{now_unix_ms, FittedMonitor, LoggedScore, LoggedSlot};
use crate::{Error, Result};

/// Computations seen but not yet completed, in first-seen order.
#[derive(Debug, Default)]
pub struct OpenComputations {
    accs: HashMap<String, ComputationAccumulator>,
    order: Vec<String>,
}

impl OpenComputations {
    /// Every open computation's id, in first-seen order.
    pub fn ids(&self) -> Vec<String> {
        self.order
            .iter()
            .filter(|id| self.accs.contains_key(*id))
            .cloned()
            .collect()
    }
}

/// Scores one batch: per-trace results, and each row's evidence added to its computation.
/// `max_open` bounds how many computations may be open at once.
pub fn score_batch(
    fitted: &FittedMonitor,
    batch: DecodedBatch,
    open: &mut OpenComputations,
    max_open: usize,
) -> Result<Vec<v1::TraceScore>> {
    let monitor = &fitted.monitor;
    let DecodedBatch {
        site,
        trace_ids,
        positions,
        vectors,
    } = batch;
    let Some(s) = monitor.site_index(&site) else {
        return Err(Error::UnknownSite {
            site,
            known: monitor.site_names().join(", "),
        });
    };
    let expected = monitor.sites[s].dim;
    if vectors.dim() != expected {
        return Err(Error::WidthMismatch {
            site,
            expected,
            got: vectors.dim(),
        });
    }
    let new = trace_ids
        .iter()
        .filter(|id| !open.accs.contains_key(*id))
        .collect::<std::collections::HashSet<_>>()
        .len();
    if open.accs.len() + new > max_open {
        return Err(Error::LimitExceeded {
            limit: "max_open_computations",
            max: max_open as u64,
            detail: format!(
                "{} computations open and {new} new in this batch; complete some first",
                open.accs.len()
            ),
        });
    }
    let scores = monitor.score_site(s, vectors.as_slice())?;
    let detectors: Vec<&'static str> = monitor.sites[s]
        .detectors
        .iter()
        .map(|d| d.name())
        .collect();
    let fpr = monitor.options.fpr;
    let mut out = Vec::with_capacity(trace_ids.len());
    for (r, id) in trace_ids.into_iter().enumerate() {
        let acc = match open.accs.get_mut(&id) {
            Some(a) => a,
            None => {
                open.order.push(id.clone());
                open.accs
                    .entry(id.clone())
                    .or_insert_with(|| monitor.new_accumulator())
            }
        };
        monitor.accumulate(acc, s, &scores, r);
        out.push(v1::TraceScore {
            trace_id: id,
            site: site.clone(),
            position: positions.as_ref().map(|p| p[r]),
            score: scores.trace_score[r],
            p_value: scores.trace_p[r],
            flagged: scores.trace_p[r] <= fpr,
            detectors: detectors
                .iter()
                .enumerate()
                .map(|(j, name)| v1::DetectorScore {
                    detector: (*name).to_string(),
                    raw: scores.raw[j][r],
                    p_value: scores.p[j][r],
                })
                .collect(),
        });
    }
    Ok(out)
}

/// Completes computations: fuses and calibrates their evidence. An id the stream never saw is a
/// protocol error (nothing is completed then).
pub fn complete(
    fitted: &FittedMonitor,
    open: &mut OpenComputations,
    ids: &[String],
) -> Result<Vec<LoggedScore>> {
    if let Some(missing) = ids.iter().find(|id| !open.accs.contains_key(*id)) {
        return Err(Error::BadStream(format!(
            "computation {missing:?} has no open traces in this stream (never sent, or completed already)"
        )));
    }
    let monitor = &fitted.monitor;
    let slots = monitor.slots();
    let now = now_unix_ms();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(acc) = open.accs.remove(id) else {
            // Listed twice in one request: completed by its first mention.
            continue;
        };
        let r = monitor.finish_computation(&acc);
        out.push(LoggedScore {
            trace_id: id.clone(),
            score: r.score,
            p_value: r.p_value,
            flagged: r.flagged,
            traces: r.traces,
            slots: slots
                .iter()
                .zip(&r.slot_p)
                .map(|((site, det), p)| LoggedSlot {
                    site: site.clone(),
                    detector: (*det).to_string(),
                    p_value: *p,
                })
                .collect(),
            scored_at_unix_ms: now,
            fit_version: fitted.fit_version,
        });
    }
    // Keep the order list from growing with completed ids on long streams.
    if open.order.len() > 2 * open.accs.len() + 64 {
        let accs = &open.accs;
        open.order.retain(|id| accs.contains_key(id));
    }
    Ok(out)
}
