//! The client's established TLS stream as handed to `http` (or any byte relay): it forces
//! KeyUpdates by policy (`tls::rekey`), records per-connection figures, and returns the TLS
//! stream to the connection task when dropped, for the lingering close.
//!
//! Lingering close: hyper owns the stream while serving and drops it when the connection
//! ends. Dropping a socket with unread bytes in its receive queue (the client's KeyUpdate
//! answers, a pipelined request) makes the kernel send RST, and the client then loses the
//! tail of a response still in flight. So the connection task gets the stream back, sends
//! close_notify + FIN, and reads and discards until the client closes or `LINGER` passes.

use super::rekey::{Decision, Rekey, Trigger};
use crate::config::KeyUpdatePolicy;
use crate::metrics::RekeyMetrics;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;

/// Upper bound on the whole lingering close (close_notify, FIN, draining the client's bytes).
pub const LINGER: Duration = Duration::from_secs(2);

pub type ServerTls = TlsStream<TcpStream>;

/// What the connection task gets back when the `ClientStream` is dropped.
pub struct Closed {
    pub stream: ServerTls,
    /// close_notify and FIN already went out: do not send them again.
    pub shut_down: bool,
}

/// An established client connection: TLS, forced key updates, return-on-drop.
pub struct ClientStream {
    inner: Option<ServerTls>,
    rekey: Rekey,
    /// A KeyUpdate is queued in rustls but not yet written to the socket.
    flush_pending: bool,
    /// A forced update failed: rustls has queued a fatal alert, so the connection is over.
    failed: Option<String>,
    metrics: RekeyMetrics,
    id: u64,
    accepted: Instant,
    /// Boxed: a channel of `Closed` would hold room for the TLS stream (over 1 KiB) for
    /// the whole life of the connection.
    on_drop: Option<oneshot::Sender<Box<Closed>>>,
    /// close_notify and FIN were sent (hyper shut the stream down itself).
    shut_down: bool,
    /// Forced key updates so far, readable by the HTTP layer (access log).
    updates_seen: Arc<AtomicU64>,
}

impl ClientStream {
    /// The receiver gets the TLS stream back once the `ClientStream` is dropped.
    pub fn new(
        stream: ServerTls,
        policy: Option<KeyUpdatePolicy>,
        metrics: RekeyMetrics,
        id: u64,
        accepted: Instant,
    ) -> (ClientStream, oneshot::Receiver<Box<Closed>>) {
        let (tx, rx) = oneshot::channel();
        let s = ClientStream {
            inner: Some(stream),
            rekey: Rekey::new(policy),
            flush_pending: false,
            failed: None,
            metrics,
            id,
            accepted,
            on_drop: Some(tx),
            shut_down: false,
            updates_seen: Arc::new(AtomicU64::new(0)),
        };
        (s, rx)
    }

    /// Forced key updates on this connection so far (shared, live).
    pub fn key_updates(&self) -> Arc<AtomicU64> {
        self.updates_seen.clone()
    }

    fn io(&mut self) -> Pin<&mut ServerTls> {
        Pin::new(self.inner.as_mut().expect("stream present until drop"))
    }

    fn force(&mut self, cx: &mut Context<'_>, trigger: Trigger) {
        if self.rekey.decide(&self.metrics) == Decision::Defer {
            tracing::debug!(
                conn = self.id,
                trigger = trigger.label(),
                "key update deferred: 31 unanswered in a row"
            );
            return;
        }
        let result = self.io().get_mut().get_mut().1.refresh_traffic_keys();
        if let Err(e) = &result {
            tracing::warn!(conn = self.id, trigger = trigger.label(), error = %e, "key update failed; closing the connection");
            self.failed = Some(e.to_string());
        } else {
            tracing::debug!(
                conn = self.id,
                trigger = trigger.label(),
                n = self.rekey.updates + 1,
                "key update sent"
            );
        }
        self.rekey.updated(trigger, result.is_ok(), &self.metrics);
        self.updates_seen
            .store(self.rekey.updates, std::sync::atomic::Ordering::Relaxed);
        self.flush_pending = true;
        self.flush_key_update(cx);
    }

    /// Write a queued KeyUpdate out now, even from the read side: tokio-rustls writes records
    /// only from poll_write/poll_flush, and an idle connection has no writes coming.
    fn flush_key_update(&mut self, cx: &mut Context<'_>) {
        if self.flush_pending && self.io().poll_flush(cx).is_ready() {
            // An error surfaces on the next write.
            self.flush_pending = false;
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        self.metrics
            .per_connection
            .observe(self.rekey.updates as f64);
        self.metrics.bytes.observe(self.rekey.total_bytes as f64);
        self.metrics
            .duration
            .observe(self.accepted.elapsed().as_secs_f64());
        if let (Some(stream), Some(tx)) = (self.inner.take(), self.on_drop.take()) {
            // The receiver may be gone (task aborted): then the stream just closes.
            let _ = tx.send(Box::new(Closed {
                stream,
                shut_down: self.shut_down,
            }));
        }
    }
}

impl ClientStream {
    fn failure(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|e| io::Error::other(format!("forced key update failed: {e}")))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.failure() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = self.io().poll_read(cx, buf);
        let n = buf.filled().len() - before;
        let mut due = self.rekey.on_read(n);
        // The age timer is polled only when the read parks, so the busy path stays a compare.
        if due.is_none() && r.is_pending() {
            due = self.rekey.poll_age(cx);
        }
        match due {
            Some(trigger) => self.force(cx, trigger),
            None => self.flush_key_update(cx),
        }
        r
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.failure() {
            return Poll::Ready(Err(e));
        }
        self.flush_key_update(cx);
        let r = self.io().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && let Some(trigger) = self.rekey.on_write(n)
        {
            self.force(cx, trigger);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.failure() {
            return Poll::Ready(Err(e));
        }
        self.flush_key_update(cx);
        let r = self.io().poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && let Some(trigger) = self.rekey.on_write(n)
        {
            self.force(cx, trigger);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        // rustls encrypts one vectored write into one record: hyper then sends a small
        // response's head and body together.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.io().poll_flush(cx);
        if r.is_ready() {
            self.flush_pending = false;
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.io().poll_shutdown(cx);
        if r.is_ready() {
            self.shut_down = true;
        }
        r
    }
}

/// close_notify + FIN (unless already sent), then drain what the client still sends (its
/// KeyUpdate answers, a pipelined request we will not serve) until it closes or `LINGER` passes.
pub async fn close_lingering(closed: Box<Closed>) {
    let Closed {
        mut stream,
        shut_down,
    } = *closed;
    let deadline = tokio::time::Instant::now() + LINGER;
    if !shut_down {
        let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
    }
    let (mut tcp, _) = stream.into_inner();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}
