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
//! naming the limit.

mod convert;
mod error;
mod limits;
mod score;
mod service;
pub mod storage;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use actwatch_proto::v1::activation_monitor_server::ActivationMonitorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use convert::{check_name, options_from_spec, StoredSpec, MAX_NAME_LEN};
pub use error::{Error, Result};
pub use limits::*;
pub use service::ActivationMonitorService;
pub use storage::DataDir;

/// Serves the API, gRPC health (`grpc.health.v1`, SERVING) and reflection (v1) on `listener`
/// until `shutdown` completes; then stops accepting, ends watchers with UNAVAILABLE and waits for
/// in-flight calls to finish. Loads every monitor of `data_dir` (created if absent) first.
pub async fn serve(
    listener: TcpListener,
    data_dir: impl Into<PathBuf>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let root = data_dir.into();
    let max_log = limits.max_score_log_bytes;
    let data = tokio::task::spawn_blocking(move || DataDir::open(root, max_log))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let max_message_bytes = limits.max_message_bytes;
    let service = ActivationMonitorService::new(Arc::new(data), limits, stop_rx);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ActivationMonitorServer<ActivationMonitorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(actwatch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Reflection(e.to_string()))?;
    let api = ActivationMonitorServer::new(service)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);

    let signal = async move {
        shutdown.await;
        health
            .set_not_serving::<ActivationMonitorServer<ActivationMonitorService>>()
            .await;
        let _ = stop_tx.send(true);
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await?;
    Ok(())
}
