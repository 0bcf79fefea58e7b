//! HTTP/2 backend connections for one server: streams from many clients share them. A new
//! connection opens only when every open one is at the stream limit its server announced
//! (SETTINGS_MAX_CONCURRENT_STREAMS), up to `max_connections`; past that, new streams go to
//! the least busy connection and wait in h2 for a free slot.
//!
//! hyper's `SendRequest` does not expose the announced limit (its `Connection` does), so the
//! task driving each connection copies it out after every poll.

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
use tokio::sync::watch;

/// Flow-control window per backend stream: how much of one response we take from the
/// backend ahead of a slow client. Bounds memory per stream.
const STREAM_WINDOW: u32 = 256 * 1024;
/// Window for a whole backend connection. Larger than one stream's so that a few slow
/// clients cannot stall the other streams sharing the connection.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
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

    fn try_lease(&self) -> Option<Lease> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.usable());
        // The first with room: streams pack onto as few connections as possible.
        if let Some(c) = conns.iter().find(|c| c.has_room()) {
            return Some(c.lease());
        }
        if conns.len() >= self.max_connections {
            return conns
                .iter()
                .min_by_key(|c| c.active.load(Ordering::Acquire))
                .map(|c| c.lease());
        }
        None
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
            return Err(LeaseError::FailedMeanwhile);
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
                Err(LeaseError::Connect(e))
            }
        }
    }
}

/// HTTP/2 handshake on a fresh connection. Returns once the server's SETTINGS have been
/// read (its stream limit is then known), within `timeout`.
pub async fn handshake(
    io: BackendIo,
    server: &str,
    timeout: Duration,
    metrics: &UpstreamMetrics,
) -> Result<Conn, ConnectFailure> {
    let (settings_tx, mut settings_rx) = watch::channel(false);
    let first_frame = Arc::new(AtomicBool::new(false));
    let io = FirstFrameIo {
        inner: io,
        seen: 0,
        header: [0; 3],
        read: first_frame.clone(),
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
    let max_streams = Arc::new(AtomicUsize::new(conn.current_max_send_streams()));
    let ended = Arc::new(AtomicBool::new(false));
    let open = metrics.connection_opened();
    let addr = server.to_string();
    let (max, done) = (max_streams.clone(), ended.clone());
    tokio::spawn(async move {
        let _open = open;
        let mut conn = Box::pin(conn);
        let r = poll_fn(|cx: &mut Context<'_>| {
            let r = conn.as_mut().poll(cx);
            max.store(conn.current_max_send_streams(), Ordering::Release);
            // h2 processes every frame it has read before its poll returns, so once the
            // first frame was read it has been applied.
            if !*settings_tx.borrow() && first_frame.load(Ordering::Acquire) {
                let _ = settings_tx.send(true);
            }
            r
        })
        .await;
        done.store(true, Ordering::Release);
        if let Err(e) = r {
            tracing::debug!(server = %addr, error = %e, "backend HTTP/2 connection ended with an error");
        }
    });
    // The server's first frame must be SETTINGS (RFC 9113 §3.4).
    let settled = tokio::time::timeout(timeout, settings_rx.wait_for(|read| *read)).await;
    if !matches!(settled, Ok(Ok(_))) {
        ended.store(true, Ordering::Release);
        return Err((
            UpstreamErrorKind::Protocol,
            io::Error::other("the backend sent no HTTP/2 SETTINGS (is it speaking HTTP/2?)"),
        ));
    }
    Ok(Conn {
        sender,
        active: AtomicUsize::new(0),
        max_streams,
        ended,
    })
}

/// Watches the first bytes from the server and notes once its first frame (SETTINGS) has
/// been read in full.
struct FirstFrameIo {
    inner: BackendIo,
    /// Bytes of the first frame seen so far.
    seen: usize,
    /// The frame's 24-bit length field.
    header: [u8; 3],
    read: Arc<AtomicBool>,
}

impl AsyncRead for FirstFrameIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.read.load(Ordering::Relaxed) {
            return r;
        }
        for &b in &buf.filled()[before..] {
            if this.seen < 3 {
                this.header[this.seen] = b;
            }
            this.seen += 1;
        }
        if this.seen >= 3 {
            let [a, b, c] = this.header;
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if this.seen >= 9 + len {
                this.read.store(true, Ordering::Release);
            }
        }
        r
    }
}

impl AsyncWrite for FirstFrameIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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
