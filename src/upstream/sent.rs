//! The request body on its way to a backend, watched: when it has been sent in full (the
//! `response_timeout` starts then, so a long upload is not cut off by it), when hyper last
//! pulled from it (a backend that stops taking the body, or a stream that cannot open, is
//! then noticed), and why it failed (the client's fault, which hyper's HTTP/2 client only
//! logs: the stream is reset and the response future sees just the reset).

use crate::body::{BoxError, ProxyBody};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the sender of one request learns from its body.
pub struct BodyWatch {
    /// `None` for a request without a body: it is sent in full with its head, so there is
    /// nothing to watch (and no channel, clock read or shared state to pay for on every GET).
    live: Option<Live>,
}

struct Live {
    sent: watch::Receiver<bool>,
    epoch: Instant,
    /// Milliseconds since `epoch` of hyper's last pull.
    pulled_ms: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<BoxError>>>,
}

impl Live {
    /// `true` when hyper has not pulled from the body for `timeout`; `false` once the body
    /// has been sent in full, or is gone (failed or dropped): the response timer runs then.
    async fn stuck(&self, timeout: std::time::Duration) -> bool {
        let mut sent = self.sent.clone();
        loop {
            if *sent.borrow_and_update() {
                return false;
            }
            let pulled = self.epoch
                + std::time::Duration::from_millis(self.pulled_ms.load(Ordering::Acquire));
            let due = pulled + timeout;
            if Instant::now() >= due {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                changed = sent.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
            }
        }
    }
}

impl BodyWatch {
    /// Resolves when the wait for a response should end: `false` once `timeout` has passed
    /// since the body was sent in full (the response timeout), `true` when hyper has not
    /// pulled from the unfinished body for `timeout` (the backend stopped taking it, or an
    /// HTTP/2 stream never got a slot).
    pub async fn deadline(&self, timeout: std::time::Duration) -> bool {
        if let Some(live) = &self.live
            && live.stuck(timeout).await
        {
            return true;
        }
        tokio::time::sleep(timeout).await;
        false
    }

    /// The client-side error that ended the body, if it failed.
    pub fn take_failure(&self) -> Option<BoxError> {
        self.live
            .as_ref()?
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

pin_project_lite::pin_project! {
    pub struct SentSignal {
        #[pin]
        inner: ProxyBody,
        sent: Option<watch::Sender<bool>>,
        epoch: Instant,
        pulled_ms: Arc<AtomicU64>,
        failure: Arc<Mutex<Option<BoxError>>>,
    }
}

/// Wrap `inner`; the returned watch belongs to whoever sends the request. A body that is
/// already at its end is returned as it is.
pub fn watched(inner: ProxyBody) -> (ProxyBody, BodyWatch) {
    if inner.is_end_stream() {
        return (inner, BodyWatch { live: None });
    }
    let (tx, rx) = watch::channel(false);
    let epoch = Instant::now();
    let pulled_ms = Arc::new(AtomicU64::new(0));
    let failure = Arc::new(Mutex::new(None));
    let body = SentSignal {
        inner,
        sent: Some(tx),
        epoch,
        pulled_ms: pulled_ms.clone(),
        failure: failure.clone(),
    };
    let live = Live {
        sent: rx,
        epoch,
        pulled_ms,
        failure,
    };
    (body.boxed(), BodyWatch { live: Some(live) })
}

fn fire(sent: &mut Option<watch::Sender<bool>>) {
    if let Some(tx) = sent.take() {
        let _ = tx.send(true);
    }
}

/// What hyper gets in place of the client's error (it only logs or wraps it); the original
/// is kept for the sender.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
struct ClientBodyFailed(String);

impl Body for SentSignal {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let ms = u64::try_from(this.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        this.pulled_ms.store(ms, Ordering::Release);
        let mut inner = this.inner;
        let r = inner.as_mut().poll_frame(cx);
        // hyper stops polling once `is_end_stream` is true, so check after every frame.
        match r {
            Poll::Ready(Some(Err(e))) => {
                let shown = ClientBodyFailed(e.to_string());
                *this.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                Poll::Ready(Some(Err(Box::new(shown))))
            }
            Poll::Ready(None) => {
                fire(this.sent);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if inner.is_end_stream() {
                    fire(this.sent);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
