//! Streaming captured traces straight into a running server's monitor (IngestReference).

use std::time::Duration;

use actwatch_core::{Dtype, SiteBatch};
use actwatch_proto::encode_trace_batch;
use actwatch_proto::v1::activation_monitor_client::ActivationMonitorClient;
use actwatch_proto::v1::{self, IngestReferenceSummary};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::capture::TraceSink;
use crate::{Error, Result};

/// Largest message sent (the server's default limit is 64 MiB).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

type Call = JoinHandle<std::result::Result<IngestReferenceSummary, tonic::Status>>;

/// One IngestReference stream into `monitor` on the server at `address`. The server acknowledges
/// (stores) the traces only when [`ServerSink::finish`] ends the stream cleanly. Dropped unfinished
/// (a capture that failed), it makes the server refuse the stream, so nothing of it is stored: it
/// sends one more message naming another monitor, which the server answers at once with an error
/// (a stream must not change monitors), and closes the stream only after that answer. (Cancelling
/// the call would not do: the request body is sent by the connection's own task, which would then
/// end the stream cleanly, and a cleanly ended stream is committed.)
pub struct ServerSink {
    address: String,
    monitor: String,
    /// `None` only while dropping.
    runtime: Option<Runtime>,
    tx: Option<mpsc::Sender<v1::IngestReferenceRequest>>,
    call: Option<Call>,
    first: bool,
}

impl ServerSink {
    /// Connects and checks that the monitor exists. `address`: `host:port` or a URL.
    pub fn connect(address: &str, monitor: &str) -> Result<Self> {
        let url = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let err = |message: String| Error::Server {
            address: address.to_string(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| err(format!("cannot start the async runtime: {e}")))?;
        let (tx, rx) = mpsc::channel::<v1::IngestReferenceRequest>(4);
        let call = runtime.block_on(async {
            let mut client = ActivationMonitorClient::connect(url)
                .await
                .map_err(|e| err(format!("cannot connect: {e}")))?
                .max_encoding_message_size(64 << 20);
            client
                .get_monitor(v1::GetMonitorRequest {
                    name: monitor.to_string(),
                })
                .await
                .map_err(|s| err(format!("monitor {monitor:?}: {}", s.message())))?;
            Ok::<_, Error>(tokio::spawn(async move {
                client
                    .ingest_reference(ReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner())
            }))
        })?;
        Ok(Self {
            address: address.to_string(),
            monitor: monitor.to_string(),
            runtime: Some(runtime),
            tx: Some(tx),
            call: Some(call),
            first: true,
        })
    }

    fn rt(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn error(&self, message: String) -> Error {
        Error::Server {
            address: self.address.clone(),
            message,
        }
    }

    /// Ends the stream and waits for the server's acknowledgement.
    pub fn finish(mut self) -> Result<IngestReferenceSummary> {
        drop(self.tx.take());
        let call = self.call.take().expect("call is open until finish");
        match self.rt().block_on(call) {
            Ok(Ok(summary)) => Ok(summary),
            Ok(Err(status)) => Err(self.error(format!(
                "ingest into {:?} refused: {}",
                self.monitor,
                status.message()
            ))),
            Err(e) => Err(self.error(format!("ingest task failed: {e}"))),
        }
    }

    /// The server's answer when the stream broke early (it refused a batch).
    fn broken(&mut self) -> Error {
        let call = self.call.take().expect("call is open until finish");
        let message = match self.rt().block_on(call) {
            Ok(Err(status)) => format!(
                "ingest into {:?} refused: {}",
                self.monitor,
                status.message()
            ),
            Ok(Ok(_)) => "the server ended the ingest early".to_string(),
            Err(e) => format!("ingest task failed: {e}"),
        };
        self.error(message)
    }
}

impl Drop for ServerSink {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        if let (Some(tx), Some(call)) = (self.tx.take(), self.call.take()) {
            if self.first {
                // Nothing sent: an empty stream is refused too.
                drop(tx);
            } else {
                let poison = v1::IngestReferenceRequest {
                    monitor: format!("{} (capture failed: refuse this stream)", self.monitor),
                    batch: None,
                    labels: Vec::new(),
                };
                let _ = runtime.block_on(async move {
                    let _ = tx.send(poison).await;
                    // The server's refusal; the stream stays open (tx alive) until it has come.
                    let answer = tokio::time::timeout(Duration::from_secs(30), call).await;
                    drop(tx);
                    answer
                });
            }
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

impl TraceSink for ServerSink {
    fn write(&mut self, batch: SiteBatch) -> Result<()> {
        let dim = batch.dim();
        let ids = batch.trace_ids();
        let values = batch.vectors().as_slice();
        let rows_per_message = (MAX_MESSAGE_BYTES / (4 * dim)).max(1);
        for start in (0..ids.len()).step_by(rows_per_message) {
            let end = (start + rows_per_message).min(ids.len());
            let mut wire = encode_trace_batch(
                batch.site(),
                ids[start..end].to_vec(),
                batch
                    .positions()
                    .map(|p| p[start..end].to_vec())
                    .unwrap_or_default(),
                dim,
                &values[start * dim..end * dim],
                Dtype::F32,
            );
            wire.provenance = batch
                .provenance()
                .map(|p| actwatch_proto::provenance_to_proto(p));
            let msg = v1::IngestReferenceRequest {
                monitor: if self.first {
                    self.monitor.clone()
                } else {
                    String::new()
                },
                batch: Some(wire),
                labels: Vec::new(),
            };
            self.first = false;
            let tx = self.tx.as_ref().expect("open until finish");
            if self.rt().block_on(tx.send(msg)).is_err() {
                return Err(self.broken());
            }
        }
        Ok(())
    }
}
