//! Per-connection activity for the HTTP timeouts: requests in flight, when the last one
//! finished, when the first byte of a new request arrived, and since when a write to the
//! client has been blocked. Read bytes are noted by
//! `ActivityIo` (plaintext only: TLS KeyUpdates never reach it, so they are not activity).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Shared between the connection task, the service and the body of each response.
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when the last request finished (or the connection began).
    idle_since_ms: AtomicU64,
    /// Milliseconds since `epoch` + 1 of the first byte read while idle; 0 = none.
    head_started_ms: AtomicU64,
    /// Milliseconds since `epoch` + 1 since which a write to the client is blocked (the
    /// client is not reading); 0 = not blocked.
    write_blocked_ms: AtomicU64,
    /// Response bodies that handed data on and have not been asked for more since: the
    /// client is not taking data (HTTP/2 flow control at zero, or a blocked socket).
    bodies_waiting: AtomicUsize,
    /// Milliseconds since `epoch` of the last time any response body was asked for data.
    body_pulled_ms: AtomicU64,
    /// HTTP/1.1 request bodies hyper is still reading (`BodyReading`): the connection is
    /// mid-message and must not be parked.
    bodies_reading: AtomicUsize,
    /// A request body was dropped before its end: hyper drains or closes the rest, so this
    /// connection is never parked again.
    no_park: AtomicBool,
    /// Something was written since the last completed flush: bytes may still sit in a
    /// buffer above the socket (hyper's, rustls's).
    unflushed: AtomicBool,
    /// Wakes the connection task when its deadline changes kind (a head starts arriving, the
    /// last request finishes).
    changed: Notify,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(0),
            bodies_waiting: AtomicUsize::new(0),
            body_pulled_ms: AtomicU64::new(0),
            bodies_reading: AtomicUsize::new(0),
            no_park: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// A request head arrived: it is in flight until the guard (held by its response body)
    /// drops.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Release);
        RequestGuard(self.clone())
    }

    fn note_write(&self, blocked: bool) {
        self.unflushed.store(true, Ordering::Relaxed);
        let current = self.write_blocked_ms.load(Ordering::Relaxed);
        if blocked && current == 0 {
            self.write_blocked_ms
                .store(self.now_ms() + 1, Ordering::Release);
            self.changed.notify_one();
        } else if !blocked && current != 0 {
            self.write_blocked_ms.store(0, Ordering::Release);
        }
    }

    fn note_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_started_ms
                .compare_exchange(0, self.now_ms() + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.changed.notify_one();
        }
    }

    /// Everything written so far has been flushed to the socket.
    pub fn flushed(&self) -> bool {
        !self.unflushed.load(Ordering::Relaxed)
    }

    /// When the connection last became idle (no request in flight), if it is idle now and
    /// between messages: no request body is being read, none was left unread.
    pub fn parkable_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started_ms.load(Ordering::Acquire) == 0
            && self.bodies_reading.load(Ordering::Acquire) == 0
            && !self.no_park.load(Ordering::Acquire))
        .then(|| self.at(self.idle_since_ms.load(Ordering::Acquire)))
    }

    /// An HTTP/1.1 request body starts: the connection is mid-message until the returned
    /// guard is told the body `ended` (or dropped, which rules out parking from then on).
    pub fn body_reading(self: &Arc<Self>) -> BodyReading {
        self.bodies_reading.fetch_add(1, Ordering::AcqRel);
        BodyReading {
            activity: self.clone(),
            ended: false,
        }
    }

    /// A response body is being asked for data (by hyper, when the client can take it).
    pub fn body_pulled(&self, was_waiting: bool) {
        self.body_pulled_ms.store(self.now_ms(), Ordering::Release);
        if was_waiting {
            self.bodies_waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A response body handed data on and now waits to be asked again.
    pub fn body_waiting(&self) {
        if self.bodies_waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_one();
        }
    }

    /// A waiting response body was dropped.
    pub fn body_done_waiting(&self) {
        self.bodies_waiting.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves when the deadline may have changed; a notification sent while nobody waits
    /// is kept, so none is lost.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// What the connection task should do next.
    pub fn next_deadline(
        &self,
        header_timeout: Option<Duration>,
        idle_timeout: Duration,
    ) -> Deadline {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // Waiting on the backend is bounded by response_timeout; waiting on a client
            // that does not read is bounded here: a blocked socket, or (HTTP/2, where a
            // client can hold its flow-control window at zero without ever blocking the
            // socket) responses with data ready and no body asked for more since.
            let blocked = match self.write_blocked_ms.load(Ordering::Acquire) {
                0 => None,
                since => Some(self.at(since - 1) + idle_timeout),
            };
            let starved = (self.bodies_waiting.load(Ordering::Acquire) > 0)
                .then(|| self.at(self.body_pulled_ms.load(Ordering::Acquire)) + idle_timeout);
            return match (blocked, starved) {
                (None, None) => Deadline::Busy,
                (Some(t), None) | (None, Some(t)) => Deadline::StalledBy(t),
                (Some(a), Some(b)) => Deadline::StalledBy(a.min(b)),
            };
        }
        let head = self.head_started_ms.load(Ordering::Acquire);
        if let (Some(t), true) = (header_timeout, head != 0) {
            return Deadline::HeaderBy(self.at(head - 1) + t);
        }
        Deadline::IdleBy(self.at(self.idle_since_ms.load(Ordering::Acquire)) + idle_timeout)
    }
}

pub enum Deadline {
    /// A request is in flight: no connection-level timeout applies.
    Busy,
    /// A request head has started arriving and must be complete by then.
    HeaderBy(Instant),
    /// Nothing in flight: close the connection gracefully at this instant.
    IdleBy(Instant),
    /// A request is in flight but the client has taken nothing of what we have for it:
    /// close the connection at this instant.
    StalledBy(Instant),
}

/// A request body hyper is reading; see `Activity::body_reading`.
pub struct BodyReading {
    activity: Arc<Activity>,
    ended: bool,
}

impl BodyReading {
    /// hyper has read the whole body: the connection is between messages again.
    pub fn ended(mut self) {
        self.ended = true;
    }
}

impl Drop for BodyReading {
    fn drop(&mut self) {
        if !self.ended {
            self.activity.no_park.store(true, Ordering::Release);
        }
        self.activity.bodies_reading.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks a request as finished when dropped (with its response body).
pub struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    pub fn activity(&self) -> &Activity {
        &self.0
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.now_ms(), Ordering::Release);
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.changed.notify_one();
        }
    }
}

/// IO wrapper that notes plaintext reads into `Activity`.
pub struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.note_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.note_write(r.is_pending());
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.note_write(r.is_pending());
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
