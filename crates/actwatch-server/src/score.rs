//! Scoring with a served fit: [`OpenComputations::score`] and [`OpenComputations::complete`], the
//! same door as the batch pipeline, so both give the same p-values; this module only maps their
//! results to the wire and their errors to the service's.

use actwatch_core::SiteBatch;
use actwatch_detect::{ComputationResult, OpenComputations};
use actwatch_proto::v1;

use crate::convert::{provenance_warning, trace_scores};
use crate::storage::{now_unix_ms, FittedMonitor, LoggedProbe, LoggedScore, LoggedSlot};
use crate::{Error, Result};

/// The service's view of a scoring error: the open-computation bound is the
/// `max_open_computations` limit, completing a computation that is not open breaks the stream
/// protocol, and the rest passes through.
fn scoring_error(e: actwatch_detect::Error) -> Error {
    use actwatch_detect::Error as E;
    match e {
        E::TooManyOpen { max, open, new } => Error::LimitExceeded {
            limit: "max_open_computations",
            max: max as u64,
            detail: format!(
                "{open} computations open and {new} new in this batch; complete some first"
            ),
        },
        E::JointPending { max } => Error::LimitExceeded {
            limit: "max_joint_pending_bytes",
            max: max as u64,
            detail: "traces are waiting for the other sites of their joint vectors; send a \
                     computation's sites together"
                .into(),
        },
        e @ E::NotOpen(_) => Error::BadStream(e.to_string()),
        e => Error::Detect(e),
    }
}

/// Scores one batch and adds each row's evidence to its computation; returns per-trace results,
/// and the batch's provenance conflict when it was scored despite one (policy "warn").
pub fn score_batch(
    fitted: &FittedMonitor,
    batch: &SiteBatch,
    open: &mut OpenComputations,
) -> Result<(Vec<v1::TraceScore>, Option<v1::ProvenanceWarning>)> {
    let scores = open.score(&fitted.monitor, batch).map_err(scoring_error)?;
    let warning = scores
        .provenance_conflict
        .as_ref()
        .map(|c| provenance_warning(batch.site(), c));
    Ok((trace_scores(&fitted.monitor, batch, &scores), warning))
}

/// Completes computations (`None`: every open one): fuses and calibrates their evidence.
pub fn complete(
    fitted: &FittedMonitor,
    open: &mut OpenComputations,
    ids: Option<&[String]>,
) -> Result<Vec<LoggedScore>> {
    let monitor = &fitted.monitor;
    let done = match ids {
        Some(ids) => open.complete(monitor, ids).map_err(scoring_error)?,
        None => open.complete_all(monitor),
    };
    Ok(to_logged(fitted, done))
}

/// The running results of computations flagged early since the last call (monitors that flag
/// early, see [`actwatch_detect::Monitor::flags_early`]), marked partial.
pub fn early_flags(fitted: &FittedMonitor, open: &mut OpenComputations) -> Vec<LoggedScore> {
    to_logged(fitted, open.take_early_flags(&fitted.monitor))
}

fn to_logged(fitted: &FittedMonitor, done: Vec<(String, ComputationResult)>) -> Vec<LoggedScore> {
    let slots = fitted.monitor.slots();
    let now = now_unix_ms();
    done.into_iter()
        .map(|(trace_id, r)| LoggedScore {
            trace_id,
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
            partial: r.partial,
            flagged_at: r.flagged_at,
            probes: fitted
                .monitor
                .probes()
                .iter()
                .zip(&r.probes)
                .map(|(p, pr)| LoggedProbe {
                    name: p.name().to_string(),
                    score: pr.score,
                    p_value: pr.p_value,
                    flagged: pr.flagged,
                    deferred: pr.deferred,
                    flagged_at: pr.flagged_at,
                })
                .collect(),
        })
        .collect()
}
