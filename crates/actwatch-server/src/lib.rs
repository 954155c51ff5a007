//! actwatch-server: the `actwatch.v1` gRPC service over one data directory.
//!
//! The decision a reader must know: the service is a thin door onto the offline core. Reference
//! ingest writes Parquet segments in the canonical long format, fitting is
//! `actwatch_io::pipeline::fit_monitor` over those segments, the fit is saved with
//! `actwatch_io::artifact::save_monitor`, and scoring calls the same `Monitor` methods as
//! `actwatch score`: one engine, two doors, the same p-values. Everything acknowledged is durable
//! (see [`storage`]); a refit swaps the served `Arc<FittedMonitor>` in one assignment; CPU and
//! disk work runs in `spawn_blocking`; every channel is bounded; every error becomes a gRPC
//! status in one exhaustive `match` ([`Error`]); limits ([`Limits`]) answer RESOURCE_EXHAUSTED
//! naming the limit. Observability is structured `tracing` events (one per monitor lifecycle
//! event and per rejected call, never per trace) and Prometheus counters in [`metrics`], served on
//! a separate listener by [`serve`].

mod access;
mod audit;
mod connections;
mod convert;
mod error;
mod fit;
mod limits;
mod linger;
mod metrics;
mod score;
mod service;
mod storage;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actwatch_proto::v1::activation_monitor_server::ActivationMonitorServer;
use tokio::net::TcpListener;

pub use access::{token_digest, Access, Principal, Role, Tls, TokenEntry, Tokens};
pub use audit::AUDIT_FILE;
pub use error::{Error, Result, MAX_STATUS_MESSAGE_BYTES};
pub use limits::*;
pub use linger::{compute_linger, set_compute_linger, DEFAULT_COMPUTE_LINGER, MAX_COMPUTE_LINGER};

use crate::metrics::Metrics;
use crate::service::ActivationMonitorService;
use crate::storage::DataDir;

/// How often the server pings an HTTP/2 connection, and how long it waits for the answer before
/// closing it: a peer that vanished (no FIN, no RST) frees its connection and streams within
/// about a minute.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How many bytes a client may send on one stream before the server has read them (HTTP/2's
/// flow-control window; the protocol's default is 64 KiB). An IngestReference stream reads the
/// next batch while the previous one is written, and with 64 KiB the client stalled about 64
/// times per 4 MB batch waiting for window updates: 1 MiB took f32 ingest at d = 4,096 from
/// about 350 to 420 MB/s on the development VM (4 MiB: 440). What h2 holds unread is bounded by
/// [`HTTP2_CONNECTION_WINDOW_BYTES`] per connection, so at most that times `max_connections`
/// (2 GiB at the defaults) in the worst case, where every connection stops being read.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 1 << 20;
/// How many bytes a client may send on all the streams of one connection before the server has
/// read them: two streams' windows ([`HTTP2_STREAM_WINDOW_BYTES`]).
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 2 << 20;

/// Serves the API, gRPC health (`grpc.health.v1`, SERVING) and reflection (v1 and v1alpha) on
/// `listener`, and Prometheus metrics (`GET /metrics`, text format 0.0.4) on `metrics_listener`
/// when there is one, until `shutdown` completes; then stops accepting, ends client-driven streams
/// with UNAVAILABLE and waits for in-flight calls to finish, for at most
/// `Limits::shutdown_grace_seconds`: a client that never reads its responses cannot hold the
/// server (what is still open then is cut; blocking work such as a fit runs to its end before the
/// process exits). Loads every monitor of `data_dir` (created if absent) first.
pub async fn serve(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    data_dir: impl Into<PathBuf>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_with_access(
        listener,
        metrics_listener,
        data_dir,
        limits,
        Access::default(),
        shutdown,
    )
    .await
}

/// [`serve`], with TLS and tokens as `access` says: every call but gRPC health then needs a
/// token of the role it calls for ([`access`]), and connections are TLS (mutual TLS with a client
/// CA). Either way, connections are bounded ([`connections`]): at most `max_connections`, each
/// closed if it says nothing (or does not finish its TLS handshake) within
/// `handshake_timeout_seconds`, HTTP/2 keepalive pings drop peers that stopped answering, and a
/// connection older than `max_connection_age_seconds` is sent GOAWAY (it closes once its open
/// streams end; clients reconnect for their next call).
pub async fn serve_with_access(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    data_dir: impl Into<PathBuf>,
    limits: Limits,
    access: Access,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let handshake = Duration::from_secs(limits.handshake_timeout_seconds.max(1));
    let max_connection_age = Duration::from_secs(limits.max_connection_age_seconds.max(1));
    let max_connections = limits.max_connections.max(1);
    let tls = access
        .tls
        .as_ref()
        .map(|t| t.server_config(handshake))
        .transpose()?;
    let (data, metrics) = open_data(data_dir.into(), limits.max_score_log_bytes).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let max_message_bytes = limits.max_message_bytes;
    let grace = Duration::from_secs(limits.shutdown_grace_seconds);
    let stopping = stop_rx.clone();
    let root = data.root().to_path_buf();
    let audit = tokio::task::spawn_blocking(move || audit::AuditLog::open(&root))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let service = ActivationMonitorService::new(
        Arc::new(data),
        limits,
        metrics.clone(),
        stop_rx.clone(),
        Arc::new(audit),
    );

    let rejections = metrics.clone();
    let metrics_task = metrics_listener.map(|l| spawn_metrics(l, metrics, stop_rx));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ActivationMonitorServer<ActivationMonitorService>>()
        .await;
    // Both reflection versions: grpcurl speaks v1, grpcio-reflection's client still v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(actwatch_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Reflection(e.to_string()))?;
    let api = ActivationMonitorServer::new(service)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            tls = access.tls.is_some(),
            mutual_tls = access.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            tokens = !access.tokens.is_empty(),
            "serving actwatch.v1 (with health and reflection)"
        );
    }

    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new calls, finishing in-flight ones");
        health
            .set_not_serving::<ActivationMonitorServer<ActivationMonitorService>>()
            .await;
        let _ = stop_tx.send(true);
    };
    let incoming = connections::bounded(listener, max_connections, handshake);
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(max_connection_age)
        .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW_BYTES));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(access::AuthorizeLayer::new(
            access.tokens,
            rejections.clone(),
        ))
        .layer(tower::util::MapResponseLayer::new(
            oversized_is_resource_exhausted(max_message_bytes, rejections),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, signal);
    let served = drain_within(server, stopping, grace).await;
    if let Some(task) = metrics_task {
        // It stops on the same signal; if serving failed before the signal, stop it here.
        task.abort();
        let _ = task.await;
    }
    served?;
    tracing::info!("server stopped");
    Ok(())
}

/// Serves Prometheus metrics on `listener` until the shutdown signal.
fn spawn_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    }
    tokio::spawn(metrics::serve_metrics(listener, metrics, stop))
}

/// Runs `server` until it has drained after the shutdown signal, or until `grace` has passed since
/// the signal, whichever comes first; then what is still open is cut.
async fn drain_within(
    server: impl Future<Output = std::result::Result<(), tonic::transport::Error>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) -> std::result::Result<(), tonic::transport::Error> {
    let deadline = async {
        if stopping.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r,
        () = deadline => {
            tracing::warn!(
                grace_seconds = grace.as_secs(),
                "shutdown grace period over: cutting the client streams still open"
            );
            Ok(())
        }
    }
}

/// Opens the data directory (blocking, off the runtime's threads) and registers every monitor's
/// metrics.
async fn open_data(root: PathBuf, max_score_log_bytes: u64) -> Result<(DataDir, Arc<Metrics>)> {
    let data = tokio::task::spawn_blocking(move || DataDir::open(root, max_score_log_bytes))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let metrics = Arc::new(Metrics::default());
    for m in data.list() {
        metrics.register_monitor(&m.name, m.options.fpr);
    }
    tracing::info!(
        data_dir = %data.root().display(),
        monitors = data.list().len(),
        "data directory loaded"
    );
    Ok((data, metrics))
}

/// tonic rejects an over-long *unary* request before any handler runs, with OUT_OF_RANGE in a
/// trailers-only response, and one that is not its protobuf message with INTERNAL. This rewrites
/// those statuses as streaming calls answer them ([`Error::from_inbound`]): RESOURCE_EXHAUSTED
/// naming the `max_message_bytes` limit, INVALID_ARGUMENT "malformed request", so every call
/// answers the same input the same way. Other responses pass untouched (a successful unary
/// response carries its status in trailers, not headers, so it is never even parsed).
fn oversized_is_resource_exhausted<B>(
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
) -> impl Fn(http::Response<B>) -> http::Response<B> + Clone {
    move |mut response| {
        let Some(status) = tonic::Status::from_header_map(response.headers()) else {
            return response;
        };
        if !matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::Internal
        ) {
            return response;
        }
        let mapped = Error::from_inbound(status.clone(), max_message_bytes);
        if mapped.code() != status.code() {
            // Counted and logged like every other rejection (no handler ran to do it).
            metrics.reject(mapped.code());
            tracing::info!(
                code = metrics::code_name(mapped.code()),
                message = mapped.message(),
                "call rejected"
            );
            let headers = response.headers_mut();
            headers.remove("grpc-message");
            headers.remove("grpc-status-details-bin");
            if let Err(e) = mapped.add_header(headers) {
                tracing::warn!(error = %e, "cannot rewrite an oversized-request status");
            }
        }
        response
    }
}
