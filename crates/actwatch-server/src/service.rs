//! The `ActivationMonitor` service: every handler validates, converts, delegates (CPU and disk
//! work in `spawn_blocking`), and maps the error through the one `From<Error> for Status`.
//! Every handler runs inside [`ActivationMonitorService::observed`], which logs and counts the
//! call when it is rejected; errors that end a stream later go through
//! [`ActivationMonitorService::reject`].

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use actwatch_detect::monitor::MonitorFitter;
use actwatch_io::artifact::{load_monitor, save_monitor};
use actwatch_io::checkpoint::{load_checkpoint, save_checkpoint, FitCheckpoint};
use actwatch_io::pipeline::{calibrate_reference, fold_reference, Progress};
use actwatch_io::reader::ReadOptions;
use actwatch_proto::v1;
use actwatch_proto::v1::activation_monitor_server::ActivationMonitor;
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::convert::{check_name, StoredSpec};
use crate::metrics::{code_name, MonitorCounters, ScoreRpc};
use crate::score::{complete, score_batch, OpenComputations};
use crate::storage::{DataDir, FitRun, FittedMonitor, IngestSession, MonitorEntry, ScoreFilter};
use crate::{Error, Limits, Metrics, Result};

/// Responses buffered per streaming call before the handler's task waits for the client.
const STREAM_BUFFER: usize = 16;
/// Fit progress messages buffered; when the client reads slower, progress messages are skipped
/// (never the final report).
const FIT_PROGRESS_BUFFER: usize = 64;

type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

/// The service. Cheap to clone: every field is shared.
#[derive(Debug, Clone)]
pub struct ActivationMonitorService {
    /// Monitors and their files.
    data: Arc<DataDir>,
    limits: Arc<Limits>,
    /// One permit per open streaming call; a call that finds none is refused, never queued.
    streams: Arc<Semaphore>,
    /// Flagged computations, fanned out to watchers.
    flags: broadcast::Sender<Arc<v1::ComputationScore>>,
    /// Becomes true when the server starts shutting down, so that watchers (which never end by
    /// themselves) let the graceful shutdown finish.
    shutdown: watch::Receiver<bool>,
    /// Counters scraped on `/metrics`.
    metrics: Arc<Metrics>,
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// Resolves once the server is shutting down (never, if the signal's sender is gone).
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn join_write(w: tokio::task::JoinHandle<Result<IngestSession>>) -> Result<IngestSession> {
    w.await.map_err(|e| Error::Task(e.to_string()))?
}

impl ActivationMonitorService {
    pub fn new(
        data: Arc<DataDir>,
        limits: Limits,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (flags, _) = broadcast::channel(limits.flag_buffer.max(1));
        Self {
            data,
            streams: Arc::new(Semaphore::new(limits.max_concurrent_streams)),
            limits: Arc::new(limits),
            flags,
            shutdown,
            metrics,
        }
    }

    /// Runs one handler; a call it rejects is counted and logged (one line, with its code).
    async fn observed<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        call.await.map_err(|s| self.reject(rpc, s))
    }

    /// Counts and logs a status that ends a call: server faults at WARN, the rest at INFO.
    fn reject(&self, rpc: &'static str, status: Status) -> Status {
        let code = status.code();
        self.metrics.reject(code);
        let name = code_name(code);
        match code {
            Code::Internal | Code::DataLoss | Code::Unknown => {
                tracing::warn!(rpc, code = name, message = status.message(), "call failed");
            }
            _ => tracing::info!(
                rpc,
                code = name,
                message = status.message(),
                "call rejected"
            ),
        }
        status
    }

    /// Counts scored traces, computations and flags of one monitor.
    fn count_scores(&self, monitor: &str, traces: usize, computations: &[v1::ComputationScore]) {
        let c = self.metrics.monitor(monitor);
        MonitorCounters::add(&c.scored_traces, traces as u64);
        MonitorCounters::add(&c.scored_computations, computations.len() as u64);
        let flags = computations.iter().filter(|c| c.flagged).count();
        MonitorCounters::add(&c.flags, flags as u64);
    }

    fn stream_permit(&self) -> Result<OwnedSemaphorePermit> {
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::LimitExceeded {
                limit: "max_concurrent_streams",
                max: self.limits.max_concurrent_streams as u64,
                detail: "too many streaming calls are open; retry later".into(),
            })
    }

    fn check_rows(&self, batch: &v1::TraceBatch) -> Result<()> {
        let rows = actwatch_proto::declared_rows(batch);
        if rows > self.limits.max_batch_rows {
            return Err(Error::LimitExceeded {
                limit: "max_batch_rows",
                max: self.limits.max_batch_rows as u64,
                detail: format!("a batch of site {:?} has {rows} rows", batch.site),
            });
        }
        Ok(())
    }

    fn fitted(entry: &MonitorEntry) -> Result<Arc<FittedMonitor>> {
        entry
            .fitted()
            .ok_or_else(|| Error::NotFitted(entry.name.clone()))
    }

    /// Sends flagged computations to watchers. Nobody watching is not an error.
    fn publish_flags(&self, computations: &[v1::ComputationScore]) {
        for c in computations.iter().filter(|c| c.flagged) {
            let _ = self.flags.send(Arc::new(c.clone()));
        }
    }

    fn inbound_error(&self, status: Status) -> Status {
        Error::from_inbound(status, self.limits.max_message_bytes)
    }
}

/// Fit progress into a bounded channel; lossy, so a slow client never stalls the fit.
struct ChannelProgress {
    tx: mpsc::Sender<Result<v1::FitProgress, Status>>,
    /// (phase, rows done, rows total)
    phase: Mutex<(String, u64, u64)>,
}

impl ChannelProgress {
    fn update(&self, f: impl FnOnce(&mut (String, u64, u64))) {
        let mut p = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut p);
        let _ = self.tx.try_send(Ok(v1::FitProgress {
            event: Some(v1::fit_progress::Event::Phase(v1::Phase {
                name: p.0.clone(),
                rows_done: p.1,
                rows_total: p.2,
            })),
        }));
    }
}

impl Progress for ChannelProgress {
    fn start(&self, phase: &str, total_rows: u64) {
        self.update(|p| *p = (phase.to_string(), 0, total_rows));
    }

    fn advance(&self, rows: u64) {
        self.update(|p| p.1 += rows);
    }

    fn finish(&self) {
        self.update(|p| p.1 = p.2);
    }
}

/// The saved fit state, if it can be resumed with `segments`: it must be intact, made with the
/// monitor's options, and have folded a prefix of the committed segments (they are append-only,
/// so anything else means it belongs to other data). `None` means: fit from scratch.
fn resumable(entry: &MonitorEntry, segments: &[String]) -> Option<(MonitorFitter, usize)> {
    let path = entry.checkpoint_path();
    if !path.exists() {
        return None;
    }
    let why = match load_checkpoint(&path) {
        Ok(ck) if ck.fitter.options() != &entry.options => "it was made with other options".into(),
        Ok(ck) if !segments.starts_with(&ck.folded) => {
            "its segments are not a prefix of the committed ones".into()
        }
        Ok(ck) => return Some((ck.fitter, ck.folded.len())),
        Err(e) => e.to_string(),
    };
    tracing::warn!(monitor = %entry.name, reason = %why, "fit checkpoint unusable; fitting from scratch");
    None
}

/// Fits on the committed segments (from scratch, or, when `incremental`, by folding only the
/// segments the checkpoint has not seen), checkpoints the fitter, calibrates on all segments,
/// saves the artifact (atomically replacing the old one), loads it back (so the served fit is
/// exactly what a restart loads) and swaps it in.
///
/// The checkpoint is written before calibration and names the segments it holds, so it is
/// consistent on its own whatever happens next: a later incremental fit resumes from it.
fn fit_and_install(
    entry: &MonitorEntry,
    segments: &[(String, PathBuf)],
    incremental: bool,
    progress: &dyn Progress,
) -> Result<Arc<FittedMonitor>> {
    let read = ReadOptions::default();
    let names: Vec<String> = segments.iter().map(|(n, _)| n.clone()).collect();
    let paths: Vec<PathBuf> = segments.iter().map(|(_, p)| p.clone()).collect();
    let resumed = if incremental {
        resumable(entry, &names)
    } else {
        None
    };
    let run_incremental = resumed.is_some();
    let (mut fitter, done) = match resumed {
        Some(r) => r,
        None => (MonitorFitter::new(entry.options.clone())?, 0),
    };
    let rows_folded = fold_reference(&mut fitter, &paths[done..], &read, progress)?;
    let checkpoint = FitCheckpoint {
        folded: names,
        fitter,
    };
    save_checkpoint(&checkpoint, &entry.checkpoint_path())?;
    let (monitor, reference) = calibrate_reference(checkpoint.fitter, &paths, &read, progress)?;
    let dir = entry.fitted_dir();
    save_monitor(&monitor, &reference, &dir)?;
    drop(monitor);
    let (monitor, manifest) = load_monitor(&dir)?;
    entry.install_fit(
        monitor,
        &manifest,
        FitRun {
            incremental: run_incremental,
            rows_folded,
        },
    )
}

#[tonic::async_trait]
impl ActivationMonitor for ActivationMonitorService {
    async fn create_monitor(
        &self,
        request: Request<v1::CreateMonitorRequest>,
    ) -> Result<Response<v1::MonitorInfo>, Status> {
        self.observed("CreateMonitor", async move {
            let v1::CreateMonitorRequest { name, spec } = request.into_inner();
            check_name(&name)?;
            let spec = StoredSpec::from_proto(spec)?;
            let data = self.data.clone();
            let entry = blocking(move || data.create(&name, spec)).await?;
            self.metrics
                .register_monitor(&entry.name, entry.options.fpr);
            tracing::info!(
                monitor = %entry.name,
                target_fpr = entry.options.fpr,
                "monitor created"
            );
            Ok(Response::new(entry.info()))
        })
        .await
    }

    async fn get_monitor(
        &self,
        request: Request<v1::GetMonitorRequest>,
    ) -> Result<Response<v1::MonitorInfo>, Status> {
        self.observed("GetMonitor", async move {
            let v1::GetMonitorRequest { name } = request.into_inner();
            Ok(Response::new(self.data.get(&name)?.info()))
        })
        .await
    }

    async fn list_monitors(
        &self,
        request: Request<v1::ListMonitorsRequest>,
    ) -> Result<Response<v1::ListMonitorsResponse>, Status> {
        self.observed("ListMonitors", async move {
            let v1::ListMonitorsRequest {} = request.into_inner();
            let monitors = self.data.list().iter().map(|m| m.info()).collect();
            Ok(Response::new(v1::ListMonitorsResponse { monitors }))
        })
        .await
    }

    async fn delete_monitor(
        &self,
        request: Request<v1::DeleteMonitorRequest>,
    ) -> Result<Response<v1::DeleteMonitorResponse>, Status> {
        self.observed("DeleteMonitor", async move {
            let v1::DeleteMonitorRequest { name } = request.into_inner();
            let entry = self.data.get(&name)?;
            // Wait for a running fit, so it never writes into a deleted monitor's folder.
            let _fit = entry.fit_lock.clone().lock_owned().await;
            let data = self.data.clone();
            let deleted = name.clone();
            blocking(move || data.delete(&name)).await?;
            self.metrics.remove_monitor(&deleted);
            tracing::info!(monitor = %deleted, "monitor deleted");
            Ok(Response::new(v1::DeleteMonitorResponse {}))
        })
        .await
    }

    async fn ingest_reference(
        &self,
        request: Request<Streaming<v1::IngestReferenceRequest>>,
    ) -> Result<Response<v1::IngestReferenceSummary>, Status> {
        self.observed("IngestReference", async move {
            let _permit = self.stream_permit()?;
            let mut inbound = request.into_inner();
            // The session is either idle here or inside the one write in flight: batch N is
            // written while batch N + 1 is received and decoded, and writes stay in order. At
            // most two batches are held, whatever the client sends.
            let mut session: Option<IngestSession> = None;
            let mut writing: Option<tokio::task::JoinHandle<Result<IngestSession>>> = None;
            let mut name: Option<String> = None;
            // Any error returns early: the session is dropped (after its write, if one is in
            // flight), its temporary files removed, and nothing of this stream is stored.
            // At shutdown a stream still sending is cut off (UNAVAILABLE) and stores nothing: it
            // was never acknowledged, so the client resends it in full and nothing is doubled. A
            // stream the client has finished is committed and acknowledged before the server stops.
            let mut shutdown = self.shutdown.clone();
            loop {
                let received = tokio::select! {
                    biased;
                    () = shutting_down(&mut shutdown) => return Err(Error::ShuttingDown.into()),
                    r = inbound.message() => r,
                };
                let Some(msg) = received.map_err(|s| self.inbound_error(s))? else {
                    break;
                };
                let v1::IngestReferenceRequest { monitor, batch } = msg;
                match &name {
                    None if monitor.is_empty() => {
                        return Err(Error::BadStream(
                            "the first IngestReference message must name the monitor".into(),
                        )
                        .into())
                    }
                    None => {
                        session = Some(IngestSession::new(self.data.get(&monitor)?));
                        name = Some(monitor);
                    }
                    Some(n) if !monitor.is_empty() && &monitor != n => {
                        return Err(Error::BadStream(format!(
                            "stream started for monitor {n:?}, a later message names {monitor:?}"
                        ))
                        .into())
                    }
                    Some(_) => {}
                }
                let Some(batch) = batch else {
                    continue;
                };
                self.check_rows(&batch)?;
                let payload = batch
                    .activations
                    .as_ref()
                    .map_or(0, |t| t.data.len() as u64);
                let decoded =
                    blocking(move || Ok(actwatch_proto::decode_trace_batch(batch)?)).await?;
                let mut sess = match writing.take() {
                    Some(w) => join_write(w).await?,
                    None => session
                        .take()
                        .expect("an idle session when no write is in flight"),
                };
                writing = Some(tokio::task::spawn_blocking(move || {
                    sess.add(decoded, payload)?;
                    Ok(sess)
                }));
            }
            let sess =
                match writing.take() {
                    Some(w) => join_write(w).await?,
                    None => match session.take() {
                        Some(s) => s,
                        None => return Err(Error::BadStream(
                            "empty IngestReference stream: the first message must name the monitor"
                                .into(),
                        )
                        .into()),
                    },
                };
            let monitor = sess.entry().name.clone();
            let summary = blocking(move || {
                let (rows, bytes, batches) = (sess.rows, sess.bytes, sess.batches);
                let total_rows = sess.commit()?;
                Ok(v1::IngestReferenceSummary {
                    rows,
                    bytes,
                    batches,
                    total_rows,
                })
            })
            .await?;
            let c = self.metrics.monitor(&monitor);
            MonitorCounters::add(&c.ingest_rows, summary.rows);
            MonitorCounters::add(&c.ingest_bytes, summary.bytes);
            tracing::info!(
                monitor = %monitor,
                rows = summary.rows,
                bytes = summary.bytes,
                batches = summary.batches,
                total_rows = summary.total_rows,
                "reference ingest committed"
            );
            Ok(Response::new(summary))
        })
        .await
    }

    type FitStream = ResponseStream<v1::FitProgress>;

    async fn fit(
        &self,
        request: Request<v1::FitRequest>,
    ) -> Result<Response<Self::FitStream>, Status> {
        self.observed("Fit", async move {
            let v1::FitRequest {
                monitor,
                incremental,
            } = request.into_inner();
            let entry = self.data.get(&monitor)?;
            let permit = self.stream_permit()?;
            let guard = entry
                .fit_lock
                .clone()
                .try_lock_owned()
                .map_err(|_| Error::FitInProgress(monitor.clone()))?;
            let segments = entry.segments();
            if segments.is_empty() {
                return Err(Error::NoReferenceData(monitor).into());
            }
            let (tx, rx) = mpsc::channel(FIT_PROGRESS_BUFFER);
            tracing::info!(
                monitor = %monitor,
                segments = segments.len(),
                incremental,
                "fit started"
            );
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _guard = guard;
                let started = Instant::now();
                let progress = ChannelProgress {
                    tx: tx.clone(),
                    phase: Mutex::new((String::new(), 0, 0)),
                };
                // A fit that started runs to the end and is installed even if the client leaves.
                let result =
                    blocking(move || fit_and_install(&entry, &segments, incremental, &progress))
                        .await;
                let elapsed_s = started.elapsed().as_secs_f64();
                let last = result.map_or_else(
                    |e| Err(this.reject("Fit", e.into())),
                    |fitted| {
                        let r = &fitted.report;
                        tracing::info!(
                            monitor = %monitor,
                            fit_version = r.fit_version,
                            reference_rows = r.reference_rows,
                            calibration_computations = r.calibration_computations,
                            calibration_fpr = r.calibration_fpr,
                            incremental = r.incremental,
                            rows_folded = r.rows_folded,
                            fit_seconds = r.fit_seconds,
                            calibration_seconds = r.calibration_seconds,
                            elapsed_seconds = elapsed_s,
                            "fit finished"
                        );
                        Ok(v1::FitProgress {
                            event: Some(v1::fit_progress::Event::Report(fitted.report.clone())),
                        })
                    },
                );
                let _ = tx.send(last).await;
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn score(
        &self,
        request: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreResponse>, Status> {
        self.observed("Score", async move {
            let v1::ScoreRequest {
                monitor,
                batches,
                complete: complete_all,
            } = request.into_inner();
            let entry = self.data.get(&monitor)?;
            let fitted = Self::fitted(&entry)?;
            for b in &batches {
                self.check_rows(b)?;
            }
            let max_open = self.limits.max_open_computations;
            let started = Instant::now();
            let (traces, logged) = blocking(move || {
                let mut open = OpenComputations::default();
                let mut traces = Vec::new();
                for b in batches {
                    let decoded = actwatch_proto::decode_trace_batch(b)?;
                    traces.extend(score_batch(&fitted, decoded, &mut open, max_open)?);
                }
                let logged = if complete_all {
                    let ids = open.ids();
                    let logged = complete(&fitted, &mut open, &ids)?;
                    entry.log_scores(&logged)?;
                    logged
                } else {
                    Vec::new()
                };
                Ok((traces, logged))
            })
            .await?;
            self.metrics
                .observe_score_latency(ScoreRpc::Score, started.elapsed());
            let computations: Vec<_> = logged.iter().map(|l| l.to_proto(&monitor)).collect();
            self.count_scores(&monitor, traces.len(), &computations);
            self.publish_flags(&computations);
            Ok(Response::new(v1::ScoreResponse {
                traces,
                computations,
            }))
        })
        .await
    }

    type StreamScoresStream = ResponseStream<v1::StreamScoresResponse>;

    async fn stream_scores(
        &self,
        request: Request<Streaming<v1::StreamScoresRequest>>,
    ) -> Result<Response<Self::StreamScoresStream>, Status> {
        self.observed("StreamScores", async move {
            use v1::stream_scores_request::Event as In;
            use v1::stream_scores_response::Event as Out;
            let permit = self.stream_permit()?;
            let mut inbound = request.into_inner();
            let first = inbound
                .message()
                .await
                .map_err(|s| self.inbound_error(s))?
                .ok_or_else(|| Error::BadStream("empty StreamScores stream".into()))?;
            let v1::StreamScoresRequest { event } = first;
            let Some(In::Monitor(name)) = event else {
                return Err(Error::BadStream(
                    "the first StreamScores message must be `monitor`".into(),
                )
                .into());
            };
            let entry = self.data.get(&name)?;
            // The stream keeps the fit it started with: a refit serves new streams, and this
            // stream's open computations stay consistent.
            let fitted = Self::fitted(&entry)?;
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            let this = self.clone();
            let mut shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut open = OpenComputations::default();
                loop {
                    // At shutdown the stream ends (UNAVAILABLE) instead of waiting for a client
                    // that may never close it; every result already sent stands, and open
                    // computations were never reported, so a client resends them elsewhere.
                    let received = tokio::select! {
                        biased;
                        () = shutting_down(&mut shutdown) => {
                            let s = this.reject("StreamScores", Error::ShuttingDown.into());
                            let _ = tx.send(Err(s)).await;
                            break;
                        }
                        r = inbound.message() => r,
                    };
                    let msg = match received {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(s) => {
                            let s = this.reject("StreamScores", this.inbound_error(s));
                            let _ = tx.send(Err(s)).await;
                            break;
                        }
                    };
                    let v1::StreamScoresRequest { event } = msg;
                    let step: Result<(OpenComputations, Vec<v1::StreamScoresResponse>)> =
                        match event {
                            None => Err(Error::BadStream("a message without an event".into())),
                            Some(In::Monitor(_)) => Err(Error::BadStream(
                                "`monitor` may only be sent in the first message".into(),
                            )),
                            Some(In::Batch(batch)) => match this.check_rows(&batch) {
                                Err(e) => Err(e),
                                Ok(()) => {
                                    let fitted = fitted.clone();
                                    let max_open = this.limits.max_open_computations;
                                    let mut o = std::mem::take(&mut open);
                                    let started = Instant::now();
                                    let this = this.clone();
                                    let name = name.clone();
                                    blocking(move || {
                                        let decoded = actwatch_proto::decode_trace_batch(batch)?;
                                        let traces =
                                            score_batch(&fitted, decoded, &mut o, max_open)?;
                                        this.metrics.observe_score_latency(
                                            ScoreRpc::StreamScores,
                                            started.elapsed(),
                                        );
                                        this.count_scores(&name, traces.len(), &[]);
                                        let out = v1::StreamScoresResponse {
                                            event: Some(Out::Traces(v1::TraceScores { traces })),
                                        };
                                        Ok((o, vec![out]))
                                    })
                                    .await
                                }
                            },
                            Some(In::Complete(v1::CompleteComputations { trace_ids })) => {
                                let fitted = fitted.clone();
                                let entry = entry.clone();
                                let mut o = std::mem::take(&mut open);
                                let name = name.clone();
                                match blocking(move || {
                                    let logged = complete(&fitted, &mut o, &trace_ids)?;
                                    entry.log_scores(&logged)?;
                                    Ok((o, logged))
                                })
                                .await
                                {
                                    Err(e) => Err(e),
                                    Ok((o, logged)) => {
                                        let computations: Vec<_> =
                                            logged.iter().map(|l| l.to_proto(&name)).collect();
                                        this.count_scores(&name, 0, &computations);
                                        this.publish_flags(&computations);
                                        let out = computations
                                            .into_iter()
                                            .map(|c| v1::StreamScoresResponse {
                                                event: Some(Out::Computation(c)),
                                            })
                                            .collect();
                                        Ok((o, out))
                                    }
                                }
                            }
                        };
                    match step {
                        Ok((o, responses)) => {
                            open = o;
                            for r in responses {
                                if tx.send(Ok(r)).await.is_err() {
                                    return; // the client is gone
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(this.reject("StreamScores", e.into()))).await;
                            return;
                        }
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    type WatchFlagsStream = ResponseStream<v1::FlagEvent>;

    /// A watcher that reads slower than flags are raised falls behind; once it is more than
    /// `Limits::flag_buffer` events behind, its stream ends with RESOURCE_EXHAUSTED naming
    /// `flag_buffer` and how many events it missed (QueryScores with `flagged_only` recovers them
    /// from the log). At shutdown watchers end with UNAVAILABLE.
    async fn watch_flags(
        &self,
        request: Request<v1::WatchFlagsRequest>,
    ) -> Result<Response<Self::WatchFlagsStream>, Status> {
        self.observed("WatchFlags", async move {
            let v1::WatchFlagsRequest {
                monitors,
                max_p_value,
            } = request.into_inner();
            let permit = self.stream_permit()?;
            let monitors: HashSet<String> = monitors.into_iter().collect();
            let mut events = self.flags.subscribe();
            let mut shutdown = self.shutdown.clone();
            let flag_buffer = self.limits.flag_buffer as u64;
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                loop {
                    if *shutdown.borrow_and_update() {
                        let s = this.reject("WatchFlags", Error::ShuttingDown.into());
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    let event = tokio::select! {
                        _ = shutdown.changed() => continue,
                        () = tx.closed() => return,
                        e = events.recv() => e,
                    };
                    match event {
                        Ok(c) => {
                            let wanted = (monitors.is_empty() || monitors.contains(&c.monitor))
                                && (max_p_value <= 0.0 || c.p_value <= max_p_value);
                            if wanted {
                                let ev = v1::FlagEvent {
                                    computation: Some((*c).clone()),
                                };
                                if tx.send(Ok(ev)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let e = Error::LimitExceeded {
                                limit: "flag_buffer",
                                max: flag_buffer,
                                detail: format!(
                                    "this watcher fell {missed} flag events behind and was disconnected; \
                                     QueryScores with flagged_only recovers them"
                                ),
                            };
                            let _ = tx.send(Err(this.reject("WatchFlags", e.into()))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn query_scores(
        &self,
        request: Request<v1::QueryScoresRequest>,
    ) -> Result<Response<v1::QueryScoresResponse>, Status> {
        self.observed("QueryScores", async move {
            let v1::QueryScoresRequest {
                monitor,
                trace_ids,
                since_unix_ms,
                until_unix_ms,
                flagged_only,
                limit,
            } = request.into_inner();
            let entry = self.data.get(&monitor)?;
            let limit = match limit {
                0 => self.limits.query_limit,
                n => (n as usize).min(self.limits.max_query_limit),
            };
            let filter = ScoreFilter {
                trace_ids: trace_ids.into_iter().collect(),
                since_unix_ms,
                until_unix_ms,
                flagged_only,
            };
            let logged = blocking(move || entry.query_scores(&filter, limit)).await?;
            let results = logged.iter().map(|l| l.to_proto(&monitor)).collect();
            Ok(Response::new(v1::QueryScoresResponse { results }))
        })
        .await
    }
}
