//! Reading one batch ahead: a [`TraceReader`] on a thread of its own, so that reading and
//! decoding the next batch overlaps whatever the caller does with this one (scoring it, fitting
//! on it). Batches arrive in the reader's order, so every result is the same as reading inline.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use super::{TraceBatch, TraceReader};
use crate::Result;

/// The batches of a [`TraceReader`], read by a thread of their own at most one batch ahead
/// ([`TraceReader::read_ahead`]). The hand-over is a rendezvous: the thread holds the batch it
/// decoded until the caller asks for it, so the look-ahead costs one decoded batch of memory
/// (`ReadOptions::batch_rows` rows), never more.
///
/// A panic on the reading thread is raised again on the caller's when it asks for the next
/// batch: the stream never ends early without saying why. Dropping this stops the thread after
/// the batch it is reading.
pub struct ReadAhead {
    inner: Inner,
}

enum Inner {
    Thread {
        rx: Option<Receiver<Result<TraceBatch>>>,
        thread: Option<JoinHandle<()>>,
    },
    /// The thread could not be started: read on the caller's thread instead.
    Inline(Box<TraceReader>),
}

impl TraceReader {
    /// This reader on a thread of its own, one batch ahead of its caller (see [`ReadAhead`]).
    pub fn read_ahead(self) -> ReadAhead {
        let (tx, rx) = sync_channel::<Result<TraceBatch>>(0);
        // The reader is handed over once the thread runs, so that if the OS refuses a thread it
        // is still here to be read inline.
        let (give, take) = std::sync::mpsc::channel::<TraceReader>();
        let spawned = std::thread::Builder::new()
            .name("actwatch-read".into())
            .spawn(move || {
                let Ok(reader) = take.recv() else { return };
                for batch in reader {
                    if tx.send(batch).is_err() {
                        // The caller stopped asking.
                        return;
                    }
                }
            });
        let inner = match spawned {
            Ok(thread) => match give.send(self) {
                Ok(()) => Inner::Thread {
                    rx: Some(rx),
                    thread: Some(thread),
                },
                // The thread ended before it took the reader (it cannot, but then read inline).
                Err(back) => Inner::Inline(Box::new(back.0)),
            },
            Err(_) => Inner::Inline(Box::new(self)),
        };
        ReadAhead { inner }
    }
}

impl Iterator for ReadAhead {
    type Item = Result<TraceBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Inline(reader) => reader.next(),
            Inner::Thread { rx, thread } => {
                if let Some(batch) = rx.as_ref().and_then(|rx| rx.recv().ok()) {
                    return Some(batch);
                }
                // The reader is done, or its thread panicked: join it to tell which.
                *rx = None;
                if let Some(Err(panic)) = thread.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Inner::Thread { rx, thread } = &mut self.inner {
            // Closing the channel first makes the thread's next hand-over fail, so it stops.
            *rx = None;
            if let Some(thread) = thread.take() {
                // A panic there is not raised again while this is dropped (it may be dropped
                // by an unwind already); the caller has stopped reading anyway.
                let _ = thread.join();
            }
        }
    }
}
