//! The `ActivationMonitor` service: every handler validates, converts, delegates (decoding and
//! scoring on the one compute pool, [`compute`]; disk work in `spawn_blocking`, [`blocking`]; fits
//! on threads of their own, at most `max_concurrent_fits`), and maps the error through the one `From<Error> for Status`.
//! Every handler runs inside [`ActivationMonitorService::observed`], which logs and counts the
//! call when it is rejected; errors that end a stream later go through
//! [`ActivationMonitorService::reject`]. The client-driven streams are small session types
//! ([`ingest::IngestStream`], [`scores::ScoreStream`], [`watch::forward_flags`]) that receive
//! through one shutdown-aware helper, [`ActivationMonitorService::next_message`]; fitting is
//! [`crate::fit`].

mod ingest;
mod scores;
mod watch;

use std::future::Future;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use actwatch_detect::OpenComputations;
use actwatch_proto::v1;
use actwatch_proto::v1::activation_monitor_server::ActivationMonitor;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::audit::{Actor, AuditLog, Details};
use crate::convert::{
    check_name, check_site_name, computation_score, damaged_info, excerpt, fit_report,
    monitor_info, StoredSpec,
};
use crate::fit::{fit_and_install, ChannelProgress, FitPlan};
use crate::linger;
use crate::metrics::{code_name, MonitorCounters, ScoreRpc};
use crate::score::{complete, score_batch};
use crate::storage::{DataDir, FittedMonitor, MonitorEntry, ScoreFilter};
use crate::{Error, Limits, Metrics, Result};
use ingest::IngestStream;
use scores::ScoreStream;

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
    /// Streaming calls open per client, bounded by `max_streams_per_client`.
    clients: ClientStreams,
    /// One permit per running fit; a fit that finds none waits for one.
    fits: Arc<Semaphore>,
    /// Flagged computations, fanned out to watchers.
    flags: broadcast::Sender<Arc<v1::ComputationScore>>,
    /// Becomes true when the server starts shutting down, so that watchers (which never end by
    /// themselves) let the graceful shutdown finish.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Counters scraped on `/metrics`.
    metrics: Arc<Metrics>,
    /// Who changed which monitor ([`crate::audit`]).
    audit: Arc<AuditLog>,
}

/// Who a streaming call counts against for `max_streams_per_client`: the token's principal when
/// tokens are configured, else the connection (its peer address).
fn client_of<T>(request: &Request<T>) -> String {
    match request.extensions().get::<crate::access::Principal>() {
        Some(p) => format!("token {}", p.name),
        None => request
            .remote_addr()
            .map_or_else(|| "an unknown peer".into(), |a| format!("connection {a}")),
    }
}

/// Streaming calls open per client ([`client_of`]); an entry is removed when its last call ends,
/// so the map holds at most `max_concurrent_streams` entries.
type ClientStreams = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// One of a client's `max_streams_per_client`, given back on drop.
#[derive(Debug)]
struct ClientSlot {
    clients: ClientStreams,
    client: String,
}

impl ClientSlot {
    fn take(clients: &ClientStreams, client: String, max: usize) -> Option<Self> {
        let mut open = clients.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(client.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                open.remove(&client);
            }
            return None;
        }
        *n += 1;
        Some(Self {
            clients: clients.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// Held for the life of a streaming call.
#[derive(Debug)]
pub(super) struct StreamPermit {
    _global: OwnedSemaphorePermit,
    _client: ClientSlot,
}

/// Disk work (and fits, under their own semaphore) on tokio's blocking threads.
async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// CPU work of a call (decoding, scoring) on the process's one compute pool: rayon's global pool,
/// one thread per core, which the matrix products inside use as well. Calls beyond the pool's
/// threads queue instead of each taking a thread of its own: every thread that runs a matrix
/// product keeps a packing buffer for its life (64 MiB, see `vendor/private-gemm-x86`), so
/// threads per call made the server's virtual memory grow with its concurrency. A panic in `f`
/// fails the call (INTERNAL), never the pool. After each task the pool's threads poll for the
/// next for a moment (`linger.rs`) instead of sleeping at once.
async fn compute<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(result);
        linger::after_task();
    });
    match rx.await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(Error::Task(format!("compute task failed: {what}")))
        }
        Err(_) => Err(Error::Task("compute task ended without a result".into())),
    }
}

impl ActivationMonitorService {
    pub fn new(
        data: Arc<DataDir>,
        limits: Limits,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        audit: Arc<AuditLog>,
    ) -> Self {
        let (flags, _) = broadcast::channel(limits.flag_buffer.max(1));
        Self {
            data,
            streams: Arc::new(Semaphore::new(limits.max_concurrent_streams)),
            clients: ClientStreams::default(),
            fits: Arc::new(Semaphore::new(limits.max_concurrent_fits.max(1))),
            limits: Arc::new(limits),
            flags,
            shutdown,
            metrics,
            audit,
        }
    }

    /// Runs an admin call and records it in the audit log, whatever its outcome: `call` gives
    /// its answer and what the entry says of it; `monitor` names the monitor (an ingest learns it
    /// from its first message, hence a shared slot).
    async fn audited<T>(
        &self,
        actor: Actor,
        action: &'static str,
        monitor: Arc<std::sync::Mutex<String>>,
        call: impl Future<Output = Result<(T, Details), Status>>,
    ) -> Result<T, Status> {
        let (result, code, details) = match call.await {
            Ok((t, d)) => (Ok(t), Code::Ok, d),
            Err(s) => {
                let error = crate::error::capped(s.clone()).message().to_string();
                let code = s.code();
                let d = Details {
                    error: Some(error),
                    ..Details::default()
                };
                (Err(s), code, d)
            }
        };
        let audit = self.audit.clone();
        let monitor = monitor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let _ = blocking(move || {
            audit.record(&actor, action, &monitor, code, &details);
            Ok(())
        })
        .await;
        result
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
    /// Every failing call passes here, so its message is capped here ([`crate::error::capped`]).
    pub(super) fn reject(&self, rpc: &'static str, status: Status) -> Status {
        let status = crate::error::capped(status);
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
    pub(super) fn count_scores(
        &self,
        monitor: &str,
        traces: usize,
        computations: &[v1::ComputationScore],
    ) {
        let c = self.metrics.monitor(monitor);
        MonitorCounters::add(&c.scored_traces, traces as u64);
        MonitorCounters::add(&c.scored_computations, computations.len() as u64);
        let flags = computations.iter().filter(|c| c.flagged).count();
        MonitorCounters::add(&c.flags, flags as u64);
        let probe_flags = computations
            .iter()
            .filter(|c| c.probes.iter().any(|p| p.flagged))
            .count();
        MonitorCounters::add(&c.probe_flags, probe_flags as u64);
    }

    /// Counts batches scored despite conflicting provenance, and logs the first of each site
    /// per served fit.
    pub(super) fn note_provenance_warnings(
        &self,
        monitor: &str,
        fitted: &FittedMonitor,
        warnings: &[v1::ProvenanceWarning],
    ) {
        if warnings.is_empty() {
            return;
        }
        let c = self.metrics.monitor(monitor);
        MonitorCounters::add(&c.provenance_warnings, warnings.len() as u64);
        let mut logged = fitted
            .provenance_logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for w in warnings {
            if logged.insert(w.site.clone()) {
                tracing::warn!(
                    monitor,
                    site = %w.site,
                    field = %w.field,
                    declared = %w.declared,
                    recorded = %w.recorded,
                    "scoring traces whose provenance differs from the monitor's reference \
                     (provenance policy warn); further ones of this site are only counted"
                );
            }
        }
    }

    /// A permit for one streaming call of `client` ([`client_of`]): one of the server's
    /// `max_concurrent_streams`, and one of the client's `max_streams_per_client`, so one client
    /// holding idle streams cannot take every slot from the others. Refused, never queued.
    fn stream_permit(&self, client: String) -> Result<StreamPermit> {
        let slot = ClientSlot::take(&self.clients, client, self.limits.max_streams_per_client)
            .ok_or_else(|| Error::LimitExceeded {
                limit: "max_streams_per_client",
                max: self.limits.max_streams_per_client as u64,
                detail: "this client has too many streaming calls open; close one or retry later"
                    .into(),
            })?;
        let global =
            self.streams
                .clone()
                .try_acquire_owned()
                .map_err(|_| Error::LimitExceeded {
                    limit: "max_concurrent_streams",
                    max: self.limits.max_concurrent_streams as u64,
                    detail: "too many streaming calls are open; retry later".into(),
                })?;
        Ok(StreamPermit {
            _global: global,
            _client: slot,
        })
    }

    /// Refuses a fit whose estimated peak memory (`actwatch_detect::budget::fit_bytes`, from the
    /// sites' widths and rows) is over `max_fit_bytes`, before anything is allocated.
    fn check_fit_memory(&self, entry: &MonitorEntry) -> Result<()> {
        let state = entry.state();
        let sites: Vec<(usize, u64)> = state
            .sites
            .iter()
            .map(|s| (s.width, s.reference_rows))
            .collect();
        let needed = actwatch_detect::budget::fit_bytes(&entry.options, &sites);
        let max = self.limits.max_fit_bytes;
        if needed > max {
            let widest = sites.iter().map(|s| s.0).max().unwrap_or(0);
            return Err(Error::LimitExceeded {
                limit: "max_fit_bytes",
                max,
                detail: format!(
                    "this fit would hold about {:.1} GiB ({} sites, the widest {widest} wide); \
                     fewer or narrower sites, a lower kNN max_references or a Gaussian rank \
                     would fit",
                    needed as f64 / (1u64 << 30) as f64,
                    sites.len()
                ),
            });
        }
        Ok(())
    }

    /// Checks what a batch declares against the limits before it is decoded (before any memory is
    /// committed to it): rows, vector width, site name (length, then characters) and trace id
    /// lengths. Messages quote client strings only as a short excerpt.
    pub(super) fn check_batch(&self, batch: &v1::TraceBatch) -> Result<()> {
        let l = &self.limits;
        let over = |limit: &'static str, max: usize, detail: String| Error::LimitExceeded {
            limit,
            max: max as u64,
            detail,
        };
        if batch.site.len() > l.max_site_name_bytes {
            return Err(over(
                "max_site_name_bytes",
                l.max_site_name_bytes,
                format!(
                    "a site name of {} bytes ({})",
                    batch.site.len(),
                    excerpt(&batch.site)
                ),
            ));
        }
        check_site_name(&batch.site)?;
        let rows = actwatch_proto::declared_rows(batch);
        if rows > l.max_batch_rows {
            let detail = format!("a batch of site {:?} has {rows} rows", batch.site);
            return Err(over("max_batch_rows", l.max_batch_rows, detail));
        }
        let width = actwatch_proto::declared_width(batch);
        if width > l.max_vector_width {
            let detail = format!(
                "a batch of site {:?} has vectors of width {width}",
                batch.site
            );
            return Err(over("max_vector_width", l.max_vector_width, detail));
        }
        if let Some((i, id)) = batch
            .trace_ids
            .iter()
            .enumerate()
            .find(|(_, id)| id.len() > l.max_trace_id_bytes)
        {
            let detail = format!(
                "trace id of row {i} has {} bytes ({})",
                id.len(),
                excerpt(id)
            );
            return Err(over("max_trace_id_bytes", l.max_trace_id_bytes, detail));
        }
        Ok(())
    }

    fn fitted(entry: &MonitorEntry) -> Result<Arc<FittedMonitor>> {
        entry
            .fitted()
            .ok_or_else(|| Error::NotFitted(entry.name.clone()))
    }

    /// Sends flagged computations to watchers. Nobody watching is not an error.
    pub(super) fn publish_flags(&self, computations: &[v1::ComputationScore]) {
        for c in computations
            .iter()
            .filter(|c| !crate::convert::raised_by(c).is_empty())
        {
            let _ = self.flags.send(Arc::new(c.clone()));
        }
    }

    /// Sends one response of a server-to-client stream, unless the server starts shutting down
    /// while the client is not reading (then the response is dropped and the stream abandoned).
    /// False when the response was not sent: the client is gone, or the server is stopping.
    async fn send<T>(
        tx: &mpsc::Sender<Result<T, Status>>,
        item: Result<T, Status>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            biased;
            sent = tx.send(item) => sent.is_ok(),
            _ = shutdown.wait_for(|stop| *stop) => false,
        }
    }

    /// The next message of a client stream: `Ok(None)` when the client has finished it, the
    /// status to end the call with when the server is shutting down (UNAVAILABLE) or the stream
    /// broke (an over-long message is the `max_message_bytes` limit). Every streaming handler
    /// receives through here, so none can hold the server past its shutdown.
    async fn next_message<T>(
        &self,
        inbound: &mut Streaming<T>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<T>, Status> {
        let shutting_down = async {
            if shutdown.wait_for(|stop| *stop).await.is_err() {
                // The signal's sender is gone: the server never shuts down by it.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            () = shutting_down => Err(Error::ShuttingDown.into()),
            r = inbound.message() => {
                r.map_err(|s| Error::from_inbound(s, self.limits.max_message_bytes))
            }
        }
    }
}

#[tonic::async_trait]
impl ActivationMonitor for ActivationMonitorService {
    async fn create_monitor(
        &self,
        request: Request<v1::CreateMonitorRequest>,
    ) -> Result<Response<v1::MonitorInfo>, Status> {
        let actor = Actor::of(&request);
        self.observed("CreateMonitor", async move {
            let v1::CreateMonitorRequest { name, spec } = request.into_inner();
            // (a client's name, bounded: the check that refuses a bad one runs inside)
            let monitor = Arc::new(std::sync::Mutex::new(name.chars().take(128).collect()));
            self.audited(actor, "create", monitor, async move {
                check_name(&name)?;
                let spec = StoredSpec::from_proto(spec)?;
                check_ranks(&spec, self.limits.max_vector_width)?;
                let data = self.data.clone();
                let entry = blocking(move || data.create(&name, spec)).await?;
                self.metrics
                    .register_monitor(&entry.name, entry.options.fpr);
                tracing::info!(
                    monitor = %entry.name,
                    target_fpr = entry.options.fpr,
                    "monitor created"
                );
                Ok((Response::new(monitor_info(&entry)), Details::default()))
            })
            .await
        })
        .await
    }

    async fn get_monitor(
        &self,
        request: Request<v1::GetMonitorRequest>,
    ) -> Result<Response<v1::MonitorInfo>, Status> {
        self.observed("GetMonitor", async move {
            let v1::GetMonitorRequest { name } = request.into_inner();
            match self.data.get(&name) {
                Ok(entry) => Ok(Response::new(monitor_info(&entry))),
                Err(Error::MonitorDamaged { name, reason }) => {
                    Ok(Response::new(damaged_info(&name, &reason)))
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn list_monitors(
        &self,
        request: Request<v1::ListMonitorsRequest>,
    ) -> Result<Response<v1::ListMonitorsResponse>, Status> {
        self.observed("ListMonitors", async move {
            let v1::ListMonitorsRequest {} = request.into_inner();
            let mut monitors: Vec<_> = self.data.list().iter().map(|m| monitor_info(m)).collect();
            let damaged = self.data.damaged();
            monitors.extend(damaged.iter().map(|(n, r)| damaged_info(n, r)));
            monitors.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Response::new(v1::ListMonitorsResponse { monitors }))
        })
        .await
    }

    async fn delete_monitor(
        &self,
        request: Request<v1::DeleteMonitorRequest>,
    ) -> Result<Response<v1::DeleteMonitorResponse>, Status> {
        let actor = Actor::of(&request);
        self.observed("DeleteMonitor", async move {
            let v1::DeleteMonitorRequest { name } = request.into_inner();
            // (a client's name, bounded: the check that refuses a bad one runs inside)
            let monitor = Arc::new(std::sync::Mutex::new(name.chars().take(128).collect()));
            self.audited(actor, "delete", monitor, async move {
                // Wait for a running fit, so it never writes into a deleted monitor's folder (a
                // damaged monitor has none).
                let _fit = match self.data.get(&name) {
                    Ok(entry) => Some(entry.fit_lock.clone().lock_owned().await),
                    Err(Error::MonitorDamaged { .. }) => None,
                    Err(e) => return Err(e.into()),
                };
                let data = self.data.clone();
                let deleted = name.clone();
                blocking(move || data.delete(&name)).await?;
                self.metrics.remove_monitor(&deleted);
                tracing::info!(monitor = %deleted, "monitor deleted");
                Ok((
                    Response::new(v1::DeleteMonitorResponse {}),
                    Details::default(),
                ))
            })
            .await
        })
        .await
    }

    /// At shutdown a stream still sending is cut off (UNAVAILABLE) and stores nothing: it was
    /// never acknowledged, so the client resends it in full and nothing is doubled. A stream the
    /// client has finished is committed and acknowledged before the server stops.
    async fn ingest_reference(
        &self,
        request: Request<Streaming<v1::IngestReferenceRequest>>,
    ) -> Result<Response<v1::IngestReferenceSummary>, Status> {
        let actor = Actor::of(&request);
        let principal = actor.principal_name();
        self.observed("IngestReference", async move {
            let named = Arc::new(std::sync::Mutex::new(String::new()));
            let slot = named.clone();
            self.audited(actor, "ingest", named, async move {
                let _permit = self.stream_permit(client_of(&request))?;
                let mut inbound = request.into_inner();
                let mut shutdown = self.shutdown.clone();
                let mut stream = IngestStream::new(principal);
                while let Some(msg) = self.next_message(&mut inbound, &mut shutdown).await? {
                    stream.accept(self, msg).await?;
                    if let Some(m) = stream.monitor() {
                        m.clone_into(&mut slot.lock().unwrap_or_else(PoisonError::into_inner));
                    }
                }
                let digest = stream.digest();
                let (monitor, summary) = stream.commit().await?;
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
                let details = Details {
                    rows: Some(summary.rows),
                    bytes: Some(summary.bytes),
                    sha256: Some(digest),
                    ..Details::default()
                };
                Ok((Response::new(summary), details))
            })
            .await
        })
        .await
    }

    type FitStream = ResponseStream<v1::FitProgress>;

    /// A fit that started runs to the end and is installed even if the client leaves.
    async fn fit(
        &self,
        request: Request<v1::FitRequest>,
    ) -> Result<Response<Self::FitStream>, Status> {
        self.observed("Fit", async move {
            let client = client_of(&request);
            let actor = Actor::of(&request);
            let v1::FitRequest {
                monitor,
                incremental,
                select,
                skip_reference_check,
            } = request.into_inner();
            let entry = self.data.get(&monitor)?;
            let permit = self.stream_permit(client)?;
            let guard = entry
                .fit_lock
                .clone()
                .try_lock_owned()
                .map_err(|_| Error::FitInProgress(monitor.clone()))?;
            let check = !skip_reference_check;
            let plan = match &select {
                None => FitPlan::all(&entry, check),
                Some(s) => FitPlan::select(&entry, s, check, &self.limits)?,
            };
            if plan.reference_rows() == 0 {
                return Err(Error::NoReferenceData(monitor).into());
            }
            let segments = plan.ingests.iter().map(|i| i.segments.len()).sum::<usize>();
            self.check_fit_memory(&entry)?;
            let (tx, rx) = mpsc::channel(FIT_PROGRESS_BUFFER);
            tracing::info!(
                monitor = %monitor,
                segments,
                ingests = plan.ingests.len(),
                incremental,
                "fit started"
            );
            let this = self.clone();
            let fits = self.fits.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _guard = guard;
                let started = Instant::now();
                let progress = ChannelProgress::new(tx.clone());
                let mut audit_details = Details {
                    incremental: Some(incremental),
                    ..Details::default()
                };
                let result = match fits.acquire_owned().await {
                    Err(_) => Err(Error::Task("the fit semaphore was closed".into())),
                    Ok(running) => {
                        blocking(move || {
                            let _running = running;
                            fit_and_install(&entry, &plan, incremental, &progress)
                        })
                        .await
                    }
                };
                let last = match result {
                    Err(e) => Err(this.reject("Fit", e.into())),
                    Ok(fitted) => {
                        let r = fit_report(&fitted);
                        audit_details = Details {
                            rows: Some(r.reference_rows),
                            fit_version: Some(r.fit_version),
                            incremental: Some(r.incremental),
                            ..Details::default()
                        };
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
                            elapsed_seconds = started.elapsed().as_secs_f64(),
                            "fit finished"
                        );
                        Ok(v1::FitProgress {
                            event: Some(v1::fit_progress::Event::Report(r)),
                        })
                    }
                };
                let code = match &last {
                    Ok(_) => Code::Ok,
                    Err(s) => {
                        audit_details.error = Some(s.message().to_string());
                        s.code()
                    }
                };
                let audit = this.audit.clone();
                let _ = blocking(move || {
                    audit.record(&actor, "fit", &monitor, code, &audit_details);
                    Ok(())
                })
                .await;
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
                self.check_batch(b)?;
            }
            let (max_open, max_joint) = (
                self.limits.max_open_computations,
                self.limits.max_joint_pending_bytes,
            );
            let started = Instant::now();
            let scorer = fitted.clone();
            let (traces, logged, warnings) = compute(move || {
                let mut open = OpenComputations::with_limits(max_open, max_joint);
                let mut traces = Vec::new();
                let mut warnings: Vec<v1::ProvenanceWarning> = Vec::new();
                for b in batches {
                    let decoded = actwatch_proto::decode_trace_batch(b)?;
                    let (t, warning) = score_batch(&scorer, &decoded, &mut open)?;
                    traces.extend(t);
                    // one per site
                    warnings.extend(warning.filter(|w| warnings.iter().all(|o| o.site != w.site)));
                }
                let logged = if complete_all {
                    complete(&scorer, &mut open, None)?
                } else {
                    Vec::new()
                };
                Ok((traces, logged, warnings))
            })
            .await?;
            let logged = if logged.is_empty() {
                logged
            } else {
                blocking(move || {
                    entry.log_scores(&logged)?;
                    Ok(logged)
                })
                .await?
            };
            self.note_provenance_warnings(&monitor, &fitted, &warnings);
            self.metrics
                .observe_score_latency(ScoreRpc::Score, started.elapsed());
            let computations: Vec<_> = logged
                .iter()
                .map(|l| computation_score(l, &monitor))
                .collect();
            self.count_scores(&monitor, traces.len(), &computations);
            self.publish_flags(&computations);
            Ok(Response::new(v1::ScoreResponse {
                traces,
                computations,
                provenance_warnings: warnings,
            }))
        })
        .await
    }

    type StreamScoresStream = ResponseStream<v1::StreamScoresResponse>;

    /// At shutdown the stream ends (UNAVAILABLE) instead of waiting for a client that may never
    /// close it; every result already sent stands, and open computations were never reported, so
    /// a client resends them elsewhere.
    async fn stream_scores(
        &self,
        request: Request<Streaming<v1::StreamScoresRequest>>,
    ) -> Result<Response<Self::StreamScoresStream>, Status> {
        self.observed("StreamScores", async move {
            use v1::stream_scores_request::Event as In;
            let permit = self.stream_permit(client_of(&request))?;
            let mut inbound = request.into_inner();
            let mut shutdown = self.shutdown.clone();
            let first = self
                .next_message(&mut inbound, &mut shutdown)
                .await?
                .ok_or_else(|| Error::BadStream("empty StreamScores stream".into()))?;
            let v1::StreamScoresRequest { event } = first;
            let Some(In::Monitor(name)) = event else {
                return Err(Error::BadStream(
                    "the first StreamScores message must be `monitor`".into(),
                )
                .into());
            };
            let entry = self.data.get(&name)?;
            let fitted = Self::fitted(&entry)?;
            let mut stream = ScoreStream::new(self.clone(), entry, fitted);
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                loop {
                    let step = match this.next_message(&mut inbound, &mut shutdown).await {
                        Ok(None) => return,
                        Ok(Some(msg)) => stream.handle(msg).await.map_err(Status::from),
                        Err(status) => Err(status),
                    };
                    match step {
                        Ok(responses) => {
                            for r in responses {
                                if !Self::send(&tx, Ok(r), &mut shutdown).await {
                                    return; // the client is gone, or not reading at shutdown
                                }
                            }
                        }
                        Err(status) => {
                            let status = this.reject("StreamScores", status);
                            Self::send(&tx, Err(status), &mut shutdown).await;
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

    /// See [`watch::forward_flags`] for how a watcher ends.
    async fn watch_flags(
        &self,
        request: Request<v1::WatchFlagsRequest>,
    ) -> Result<Response<Self::WatchFlagsStream>, Status> {
        self.observed("WatchFlags", async move {
            let client = client_of(&request);
            let v1::WatchFlagsRequest {
                monitors,
                max_p_value,
            } = request.into_inner();
            let permit = self.stream_permit(client)?;
            let filter = watch::FlagFilter {
                monitors: monitors.into_iter().collect(),
                max_p_value,
            };
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            let (events, shutdown) = (self.flags.subscribe(), self.shutdown.clone());
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                watch::forward_flags(this, filter, events, shutdown, tx).await;
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
                flagged_by,
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
                flagged_only: flagged_only || !flagged_by.is_empty(),
                flagged_by: (!flagged_by.is_empty()).then_some(flagged_by),
            };
            let logged = blocking(move || entry.query_scores(&filter, limit)).await?;
            let results = logged
                .iter()
                .map(|l| computation_score(l, &monitor))
                .collect();
            Ok(Response::new(v1::QueryScoresResponse { results }))
        })
        .await
    }
}

/// A Gaussian rank wider than `max_vector_width` can never be fitted (no site is that wide):
/// refused at create instead of at every Fit.
fn check_ranks(spec: &StoredSpec, max_vector_width: usize) -> Result<()> {
    let options = crate::convert::options_from_spec(spec)?;
    let detectors = options.detectors.iter().chain(options.joint.iter());
    for d in detectors {
        if let actwatch_detect::DetectorSpec::Gaussian(g) = d {
            if let Some(r) = g.rank.filter(|&r| r > max_vector_width) {
                return Err(Error::BadSpec(format!(
                    "gaussian rank {r} is wider than any site can be (max_vector_width \
                     {max_vector_width})"
                )));
            }
        }
    }
    Ok(())
}
