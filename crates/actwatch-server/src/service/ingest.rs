//! One IngestReference stream as a small state machine.

use actwatch_proto::v1;
use tokio::task::JoinHandle;

use super::{blocking, ActivationMonitorService};
use crate::storage::IngestSession;
use crate::{Error, Result};

/// Where a stream's segments are. Batch N is decoded and written in one blocking task (its audit
/// digest computed beside it on the compute pool) while batch N + 1 is received, and writes stay
/// in order, so at most two batches are held whatever the client sends. The decode is in the
/// write's task, not a task of its own awaited first: a hand-over between threads cost about
/// 0.3 ms here, ten times the decode of a 256 x 384 batch. A batch that fails to decode fails the
/// stream at the next message or at its end, and nothing of the stream is stored. Dropped before [`IngestStream::commit`] (an error, a client gone, shutdown), the
/// session removes its temporary files and nothing of the stream is stored.
#[derive(Debug, Default)]
enum State {
    /// Waiting for the first message, which names the monitor.
    #[default]
    Unopened,
    /// No write in flight.
    Idle(IngestSession),
    /// The session is inside the one write in flight, which also returns the SHA-256 of the
    /// batch's activation bytes.
    Writing(JoinHandle<Result<(IngestSession, [u8; 32])>>),
}

/// The reference traces one IngestReference stream has sent so far.
#[derive(Debug, Default)]
pub(super) struct IngestStream {
    state: State,
    /// The monitor the first message named.
    monitor: Option<String>,
    /// SHA-256 of each batch's activation bytes, in order (for the audit log).
    batch_digests: Vec<[u8; 32]>,
    /// The token principal sending the stream (recorded with its segments).
    principal: Option<String>,
}

impl IngestStream {
    /// A stream sent by `principal`.
    pub(super) fn new(principal: Option<String>) -> Self {
        Self {
            principal,
            ..Self::default()
        }
    }

    /// The monitor the stream's first message named, once it has.
    pub(super) fn monitor(&self) -> Option<&str> {
        self.monitor.as_deref()
    }

    /// SHA-256 over the SHA-256 of each batch's activation bytes, in order: what the audit log
    /// records of the data.
    pub(super) fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for d in &self.batch_digests {
            h.update(d);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Takes one message: checks the monitor it names, decodes its batch (blocking) and starts
    /// writing it once the previous write is done.
    pub(super) async fn accept(
        &mut self,
        service: &ActivationMonitorService,
        msg: v1::IngestReferenceRequest,
    ) -> Result<()> {
        let v1::IngestReferenceRequest {
            monitor,
            batch,
            labels,
        } = msg;
        match &self.monitor {
            None if monitor.is_empty() => {
                return Err(Error::BadStream(
                    "the first IngestReference message must name the monitor".into(),
                ))
            }
            None => {
                let entry = service.data.get(&monitor)?;
                let limits = &service.limits;
                entry.check_room_for_ingest(limits.max_ingests_per_monitor)?;
                self.state = State::Idle(IngestSession::new(
                    entry,
                    limits.max_sites_per_monitor,
                    limits.max_ingests_per_monitor,
                    self.principal.clone(),
                ));
                self.monitor = Some(monitor);
            }
            Some(n) if !monitor.is_empty() && &monitor != n => {
                return Err(Error::BadStream(format!(
                    "stream started for monitor {n:?}, a later message names {monitor:?}"
                )))
            }
            Some(_) => {}
        }
        let Some(batch) = batch else {
            if !labels.is_empty() {
                return Err(Error::BadLabels("labels without a batch".into()));
            }
            return Ok(());
        };
        let labels = (!labels.is_empty()).then_some(labels);
        service.check_batch(&batch)?;
        let payload = batch
            .activations
            .as_ref()
            .map_or(0, |t| t.data.len() as u64);
        // The type the values arrive in is the type they are stored in (a bad one is refused by
        // the decode below).
        let dtype = batch
            .activations
            .as_ref()
            .and_then(|t| actwatch_proto::dtype_from_proto(t.dtype).ok())
            .unwrap_or(actwatch_core::Dtype::F32);
        let mut session = self.take_session().await?;
        self.state = State::Writing(tokio::task::spawn_blocking(move || {
            // The audit's SHA-256 of the bytes runs on the compute pool while this thread
            // decodes and writes them (it costs about as much as the write; one in flight).
            let data = batch
                .activations
                .as_ref()
                .map(|t| t.data.clone())
                .unwrap_or_default();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            rayon::spawn(move || {
                use sha2::{Digest, Sha256};
                let digest = std::panic::catch_unwind(|| <[u8; 32]>::from(Sha256::digest(&data)));
                if let Ok(d) = digest {
                    let _ = tx.send(d);
                }
            });
            let decoded = actwatch_proto::decode_trace_batch(batch)?;
            session.add(decoded, dtype, payload, labels)?;
            let digest = rx
                .recv()
                .map_err(|_| Error::Task("hashing a batch for the audit log failed".into()))?;
            Ok((session, digest))
        }));
        Ok(())
    }

    /// The session, once no write is in flight.
    async fn take_session(&mut self) -> Result<IngestSession> {
        match std::mem::take(&mut self.state) {
            State::Unopened => Err(Error::BadStream(
                "empty IngestReference stream: the first message must name the monitor".into(),
            )),
            State::Idle(session) => Ok(session),
            State::Writing(write) => {
                let (session, digest) = write.await.map_err(|e| Error::Task(e.to_string()))??;
                self.batch_digests.push(digest);
                Ok(session)
            }
        }
    }

    /// The client finished the stream: waits for the last write, then makes every segment
    /// durable and commits them (the acknowledgement). Returns the summary to send.
    pub(super) async fn commit(mut self) -> Result<(String, v1::IngestReferenceSummary)> {
        let session = self.take_session().await?;
        let monitor = session.entry().name.clone();
        let summary = blocking(move || {
            let (rows, bytes, batches) = (session.rows, session.bytes, session.batches);
            let example_rows = session.example_rows;
            let ingest = session.ingest();
            let (total_rows, total_example_rows) = session.commit()?;
            Ok(v1::IngestReferenceSummary {
                rows,
                bytes,
                batches,
                total_rows,
                example_rows,
                total_example_rows,
                ingest,
            })
        })
        .await?;
        Ok((monitor, summary))
    }
}
