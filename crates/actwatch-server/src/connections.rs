//! The gRPC listener's connections, bounded: at most `max_connections` open (one beyond is
//! closed at accept), each closed if it sends nothing within the handshake timeout (a silent
//! socket cannot be held forever; with TLS the handshake's own timeout applies as well), accept
//! errors (out of file descriptors) logged and backed off instead of spun on, and `TCP_NODELAY`
//! on every connection (small responses must not wait for the peer's delayed ACK: score latency
//! is the product).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// One accepted connection: its socket, its slot among `max_connections`, and until its first
/// byte arrives, the deadline for it.
#[derive(Debug)]
pub(crate) struct Connection {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The accepted connections of `listener`, as tonic takes them.
pub(crate) fn bounded(
    listener: TcpListener,
    max_connections: usize,
    handshake: Duration,
) -> Incoming {
    Incoming {
        listener,
        slots: Arc::new(Semaphore::new(max_connections)),
        max_connections,
        handshake,
        backoff: None,
        log: RateLimitedLog::default(),
    }
}

/// See [`bounded`].
#[derive(Debug)]
pub(crate) struct Incoming {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max_connections: usize,
    handshake: Duration,
    /// After an accept error (out of file descriptors and the like), when to try again: tonic
    /// would otherwise retry at once, in a busy loop.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    log: RateLimitedLog,
}

impl Stream for Incoming {
    type Item = std::io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(wait) = this.backoff.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            let io = match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.log
                        .warn(|| tracing::warn!(error = %e, "cannot accept a connection"));
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    continue;
                }
                Poll::Ready(Ok((io, _))) => io,
            };
            let Ok(slot) = this.slots.clone().try_acquire_owned() else {
                let (max_connections, peer) = (this.max_connections, io.peer_addr().ok());
                this.log.warn(|| {
                    tracing::warn!(
                        max_connections,
                        peer = ?peer,
                        "connection refused: max_connections are open"
                    )
                });
                continue; // dropping `io` closes it
            };
            if let Err(e) = io.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
            return Poll::Ready(Some(Ok(Connection {
                io,
                _slot: slot,
                first_byte: Some(Box::pin(tokio::time::sleep(this.handshake))),
            })));
        }
    }
}

/// How long the listener waits after an accept error before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Logs at most one line per 10 s of a kind that an attacker could otherwise make flood the log.
#[derive(Debug, Default)]
struct RateLimitedLog {
    last: AtomicU64,
}

impl RateLimitedLog {
    fn warn(&self, log: impl FnOnce()) {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_secs() + 10;
        let last = self.last.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log();
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(deadline) = self.first_byte.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client sent nothing within handshake_timeout_seconds",
                )));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.first_byte = None;
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
