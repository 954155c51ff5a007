//! One WatchFlags stream: flagged computations, filtered, until the client leaves, falls too far
//! behind, or the server shuts down.

use std::collections::HashSet;
use std::sync::Arc;

use actwatch_proto::v1;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;

use super::ActivationMonitorService;
use crate::Error;

/// Which flags one watcher wants.
pub(super) struct FlagFilter {
    /// Empty: every monitor.
    pub(super) monitors: HashSet<String>,
    /// 0 or less: any p-value.
    pub(super) max_p_value: f64,
}

impl FlagFilter {
    /// A flag of a wanted monitor, raised by a question whose p-value is at or below
    /// `max_p_value` (when set).
    fn wants(&self, c: &v1::ComputationScore) -> bool {
        let p_ok = |p: f64| self.max_p_value <= 0.0 || p <= self.max_p_value;
        (self.monitors.is_empty() || self.monitors.contains(&c.monitor))
            && ((c.flagged && p_ok(c.p_value))
                || c.probes.iter().any(|p| p.flagged && p_ok(p.p_value)))
    }
}

/// Forwards wanted flag events to `tx` until the watcher is gone (returns quietly), more than
/// `flag_buffer` events behind (RESOURCE_EXHAUSTED naming the limit and how many it missed:
/// QueryScores with `flagged_only` recovers them) or the server is shutting down (UNAVAILABLE).
pub(super) async fn forward_flags(
    service: ActivationMonitorService,
    filter: FlagFilter,
    mut events: broadcast::Receiver<Arc<v1::ComputationScore>>,
    mut shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Result<v1::FlagEvent, Status>>,
) {
    let end = |e: Error| service.reject("WatchFlags", e.into());
    loop {
        if *shutdown.borrow_and_update() {
            // The last word, after what the watcher has not read yet (a watcher that never reads
            // holds only this task, which `serve`'s grace period cuts).
            let _ = tx.send(Err(end(Error::ShuttingDown))).await;
            return;
        }
        let event = tokio::select! {
            _ = shutdown.changed() => continue,
            () = tx.closed() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(c) if filter.wants(&c) => {
                let ev = v1::FlagEvent {
                    raised_by: crate::convert::raised_by(&c),
                    computation: Some((*c).clone()),
                };
                if !ActivationMonitorService::send(&tx, Ok(ev), &mut shutdown).await {
                    continue; // gone (the next send fails too), or shutting down (said above)
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let e = Error::LimitExceeded {
                    limit: "flag_buffer",
                    max: service.limits.flag_buffer as u64,
                    detail: format!(
                        "this watcher fell {missed} flag events behind and was disconnected; \
                         QueryScores with flagged_only recovers them"
                    ),
                };
                let _ = tx.send(Err(end(e))).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
