//! HTTP/2 backend connections for one server: streams from many clients share them. A new
//! connection opens only when every open one is at the stream limit its server announced
//! (SETTINGS_MAX_CONCURRENT_STREAMS), up to `max_connections`; past that, new streams go to
//! the least busy connection and wait in h2 for a free slot.
//!
//! hyper's `SendRequest` does not expose the announced limit (its `Connection` does), so the
//! task holding each connection copies it out whenever the server's settings are applied.

use super::connect::{BackendIo, ConnectFailure};
use crate::body::ProxyBody;
use crate::metrics::{UpstreamErrorKind, UpstreamMetrics};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};

/// Flow-control window per backend stream: how much of one response we take from the
/// backend ahead of a slow client. Bounds memory per stream.
const STREAM_WINDOW: u32 = 128 * 1024;
/// Window for a whole backend connection. Larger than one stream's so that a few slow
/// clients cannot stall the other streams sharing the connection.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// PING a backend connection this often (also while idle) to find dead ones before a
/// request does.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/2 connection to the server.
pub struct Conn {
    sender: http2::SendRequest<ProxyBody>,
    /// Streams leased out: requests whose response has not been dropped yet.
    active: AtomicUsize,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS, kept current by the driver task.
    max_streams: Arc<AtomicUsize>,
    /// Set by the driver task when the connection has ended.
    ended: Arc<AtomicBool>,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.ended.load(Ordering::Acquire) && self.sender.is_ready()
    }

    fn has_room(&self) -> bool {
        self.active.load(Ordering::Acquire) < self.max_streams.load(Ordering::Acquire)
    }

    fn lease(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Ordering::AcqRel);
        Lease { conn: self.clone() }
    }
}

/// One stream's claim on a connection; released when dropped (with the response body).
pub struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    pub fn sender(&self) -> http2::SendRequest<ProxyBody> {
        self.conn.sender.clone()
    }

    /// hyper said the connection is gone: no new streams go to it.
    pub fn mark_ended(&self) {
        self.conn.ended.store(true, Ordering::Release);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no stream could be leased.
pub enum LeaseError {
    /// Our own connection attempt failed.
    Connect(ConnectFailure),
    /// Another request's attempt to the same server failed while we waited for it: do not
    /// queue another attempt behind it (it would fail the same way, one timeout later).
    FailedMeanwhile,
}

pub struct Pool {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// One connection attempt at a time per server; requests that arrive meanwhile wait for
    /// it rather than opening connections of their own.
    connecting: tokio::sync::Mutex<()>,
    failed_attempts: AtomicU64,
    max_connections: usize,
}

impl Pool {
    pub fn new(max_connections: usize) -> Pool {
        Pool {
            conns: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            failed_attempts: AtomicU64::new(0),
            max_connections: max_connections.max(1),
        }
    }

    /// Open connections (for tests and logs).
    pub fn open(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.iter().filter(|c| c.usable()).count()
    }

    /// No new streams on the open connections (their server's address changed); streams in
    /// flight finish, then each connection closes as its last sender goes.
    pub fn retire_all(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.drain(..) {
            c.ended.store(true, Ordering::Release);
        }
    }

    fn try_lease(&self) -> Option<Lease> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.usable());
        // The first with room: streams pack onto as few connections as possible.
        if let Some(c) = conns.iter().find(|c| c.has_room()) {
            return Some(c.lease());
        }
        if conns.len() >= self.max_connections {
            return least_busy(&conns);
        }
        None
    }

    /// A slot on the least busy open connection, past its stream limit (the stream waits in
    /// h2 for a free one): when no further connection can be opened.
    fn lease_least_busy(&self) -> Option<Lease> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.usable());
        least_busy(&conns)
    }

    /// A stream slot on an open connection, opening one with `connect` when all are full.
    pub async fn lease<F, Fut>(&self, connect: F) -> Result<Lease, LeaseError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Conn, ConnectFailure>>,
    {
        if let Some(l) = self.try_lease() {
            return Ok(l);
        }
        let failures_before = self.failed_attempts.load(Ordering::Acquire);
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(l) = self.try_lease() {
            return Ok(l);
        }
        if self.failed_attempts.load(Ordering::Acquire) != failures_before {
            return self.lease_least_busy().ok_or(LeaseError::FailedMeanwhile);
        }
        match connect().await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                let lease = conn.lease();
                self.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn);
                Ok(lease)
            }
            Err(e) => {
                self.failed_attempts.fetch_add(1, Ordering::AcqRel);
                // An extra connection failed, but the open ones still work: queue there
                // rather than fail a request they can carry.
                match self.lease_least_busy() {
                    Some(l) => {
                        tracing::debug!(error = %e.1, "extra backend HTTP/2 connection failed; using an open one");
                        Ok(l)
                    }
                    None => Err(LeaseError::Connect(e)),
                }
            }
        }
    }
}

fn least_busy(conns: &[Arc<Conn>]) -> Option<Lease> {
    conns
        .iter()
        .min_by_key(|c| c.active.load(Ordering::Acquire))
        .map(|c| c.lease())
}

/// HTTP/2 handshake on a fresh connection. Returns once the server's SETTINGS have been
/// applied (its stream limit is then known), within `timeout`.
pub async fn handshake(
    io: BackendIo,
    server: &str,
    timeout: Duration,
    metrics: &UpstreamMetrics,
) -> Result<Conn, ConnectFailure> {
    let settings_applied = Arc::new(Notify::new());
    let io = SettingsAckIo {
        inner: io,
        out: OutgoingFrames::default(),
        acked: settings_applied.clone(),
    };
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| (UpstreamErrorKind::Protocol, io::Error::other(e)))?;
    let max_streams = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicBool::new(false));
    let (settled_tx, mut settled) = watch::channel(false);
    let open = metrics.connection_opened();
    let addr = server.to_string();
    let (max, done) = (max_streams.clone(), ended.clone());
    // hyper drives the h2 connection in a task of its own; this one routes requests into it
    // and, each time the server's settings have been applied, copies the stream limit out.
    tokio::spawn(async move {
        let _open = open;
        let mut conn = Box::pin(conn);
        let r = loop {
            let applied = settings_applied.notified();
            tokio::pin!(applied);
            let polled = poll_fn(|cx: &mut Context<'_>| {
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                match applied.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match polled {
                Some(r) => break r,
                None => {
                    max.store(conn.current_max_send_streams(), Ordering::Release);
                    settled_tx.send_replace(true);
                }
            }
        };
        done.store(true, Ordering::Release);
        if let Err(e) = r {
            tracing::debug!(server = %addr, error = %e, "backend HTTP/2 connection ended with an error");
        }
    });
    let settled = tokio::time::timeout(timeout, settled.wait_for(|s| *s)).await;
    let failure = match settled {
        Ok(Ok(_)) => None,
        // Silent: like a connect that hangs.
        Err(_) => Some((
            UpstreamErrorKind::ConnectTimeout,
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the backend sent no HTTP/2 SETTINGS within {timeout:?}"),
            ),
        )),
        Ok(Err(_)) => Some((
            UpstreamErrorKind::Protocol,
            io::Error::other(
                "the backend ended the connection before its HTTP/2 SETTINGS (is it speaking HTTP/2?)",
            ),
        )),
    };
    if let Some(f) = failure {
        ended.store(true, Ordering::Release);
        return Err(f);
    }
    Ok(Conn {
        sender,
        active: AtomicUsize::new(0),
        max_streams,
        ended,
    })
}

/// Follows the frames we send and signals each SETTINGS acknowledgement: h2 applies the
/// server's settings right after queueing the ACK and before writing it (h2 0.4
/// `proto/settings.rs`), so once the ACK is written the new stream limit is in effect.
struct SettingsAckIo {
    inner: BackendIo,
    out: OutgoingFrames,
    acked: Arc<Notify>,
}

/// A parser for our own outgoing byte stream: the 24-byte client preface, then frames.
#[derive(Default)]
struct OutgoingFrames {
    preface_left: usize,
    started: bool,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

impl OutgoingFrames {
    /// Feed written bytes; true when they completed a SETTINGS frame with the ACK flag.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        if !self.started {
            self.started = true;
            self.preface_left = 24;
        }
        let mut ack = false;
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    let h = self.header;
                    self.payload_left =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    // Type 0x4 SETTINGS with flag 0x1 ACK.
                    ack |= h[3] == 0x4 && h[4] & 0x1 != 0;
                    self.header_len = 0;
                }
            }
        }
        ack
    }
}

impl SettingsAckIo {
    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let mut ack = false;
        for b in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(b.len());
            ack |= self.out.feed(&b[..take]);
            n -= take;
        }
        if ack {
            self.acked.notify_one();
        }
    }
}

impl AsyncRead for SettingsAckIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SettingsAckIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(&[io::IoSlice::new(buf)], n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(bufs, n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::OutgoingFrames;

    #[test]
    fn finds_settings_ack_across_split_writes() {
        let mut out = Vec::new();
        out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        // SETTINGS (6 bytes of payload), WINDOW_UPDATE, then SETTINGS ACK.
        out.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        out.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let ack_at = out.len();
        out.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
        let mut f = OutgoingFrames::default();
        assert!(
            !f.feed(&out[..ack_at + 4]),
            "no ACK before its header is complete"
        );
        assert!(f.feed(&out[ack_at + 4..]));
        let mut g = OutgoingFrames::default();
        assert!(
            !out[..ack_at].chunks(1).any(|c| g.feed(c)),
            "SETTINGS without ACK"
        );
    }
}
