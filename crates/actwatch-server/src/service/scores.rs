//! One StreamScores stream: the fit it started with and its open computations.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use actwatch_detect::OpenComputations;
use actwatch_proto::v1;
use v1::stream_scores_request::Event as In;
use v1::stream_scores_response::Event as Out;

use super::{blocking, compute, ActivationMonitorService};
use crate::convert::computation_score;
use crate::metrics::ScoreRpc;
use crate::score::{complete, early_flags, score_batch};
use crate::storage::{FittedMonitor, MonitorEntry};
use crate::{Error, Result};

/// The state of one StreamScores call after its first message named the monitor. The stream
/// keeps the fit it started with: a refit serves new streams, and this stream's open computations
/// stay consistent.
pub(super) struct ScoreStream {
    service: ActivationMonitorService,
    entry: Arc<MonitorEntry>,
    fitted: Arc<FittedMonitor>,
    /// Only ever locked by this stream's one compute task at a time (uncontended); shared so that
    /// the task can borrow it without moving it out.
    open: Arc<Mutex<OpenComputations>>,
}

impl ScoreStream {
    pub(super) fn new(
        service: ActivationMonitorService,
        entry: Arc<MonitorEntry>,
        fitted: Arc<FittedMonitor>,
    ) -> Self {
        let (max_open, max_joint) = (
            service.limits.max_open_computations,
            service.limits.max_joint_pending_bytes,
        );
        Self {
            service,
            entry,
            fitted,
            open: Arc::new(Mutex::new(OpenComputations::with_limits(
                max_open, max_joint,
            ))),
        }
    }

    /// Answers one message: per-trace scores for a batch, computation results for a completion.
    pub(super) async fn handle(
        &mut self,
        msg: v1::StreamScoresRequest,
    ) -> Result<Vec<v1::StreamScoresResponse>> {
        let v1::StreamScoresRequest { event } = msg;
        match event {
            None => Err(Error::BadStream("a message without an event".into())),
            Some(In::Monitor(_)) => Err(Error::BadStream(
                "`monitor` may only be sent in the first message".into(),
            )),
            Some(In::Batch(batch)) => {
                self.service.check_batch(&batch)?;
                let (fitted, open) = (self.fitted.clone(), self.open.clone());
                let started = Instant::now();
                // Early flags are not logged: the final result, flagged too, is, with the
                // position where the computation was first flagged.
                let (traces, warning, early) = compute(move || {
                    let decoded = actwatch_proto::decode_trace_batch(batch)?;
                    let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
                    let (traces, warning) = score_batch(&fitted, &decoded, &mut open)?;
                    Ok((traces, warning, early_flags(&fitted, &mut open)))
                })
                .await?;
                let warnings: Vec<_> = warning.into_iter().collect();
                self.service
                    .note_provenance_warnings(&self.entry.name, &self.fitted, &warnings);
                let metrics = &self.service.metrics;
                metrics.observe_score_latency(ScoreRpc::StreamScores, started.elapsed());
                let name = &self.entry.name;
                self.service.count_scores(name, traces.len(), &[]);
                // early flags go to watchers now; they are counted as computations at completion
                let early: Vec<_> = early.iter().map(|l| computation_score(l, name)).collect();
                self.service.publish_flags(&early);
                Ok(vec![v1::StreamScoresResponse {
                    event: Some(Out::Traces(v1::TraceScores {
                        traces,
                        early_flags: early,
                        provenance_warnings: warnings,
                    })),
                }])
            }
            Some(In::Complete(v1::CompleteComputations { trace_ids })) => {
                let (fitted, open, entry) =
                    (self.fitted.clone(), self.open.clone(), self.entry.clone());
                let logged = compute(move || {
                    let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
                    complete(&fitted, &mut open, Some(&trace_ids))
                })
                .await?;
                let logged = blocking(move || {
                    entry.log_scores(&logged)?;
                    Ok(logged)
                })
                .await?;
                let name = &self.entry.name;
                let computations: Vec<_> =
                    logged.iter().map(|l| computation_score(l, name)).collect();
                self.service.count_scores(name, 0, &computations);
                self.service.publish_flags(&computations);
                Ok(computations
                    .into_iter()
                    .map(|c| v1::StreamScoresResponse {
                        event: Some(Out::Computation(c)),
                    })
                    .collect())
            }
        }
    }
}
