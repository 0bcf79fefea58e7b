//! The request body on its way to a backend, reporting when it has been sent in full: the
//! `response_timeout` starts then, so a long upload is not cut off by it.

use crate::body::{BoxError, ProxyBody};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::watch;

pin_project_lite::pin_project! {
    pub struct SentSignal {
        #[pin]
        inner: ProxyBody,
        sent: Option<watch::Sender<bool>>,
    }
}

impl SentSignal {
    pub fn new(inner: ProxyBody, sent: watch::Sender<bool>) -> SentSignal {
        let mut sent = Some(sent);
        if inner.is_end_stream() {
            fire(&mut sent);
        }
        SentSignal { inner, sent }
    }
}

fn fire(sent: &mut Option<watch::Sender<bool>>) {
    if let Some(tx) = sent.take() {
        let _ = tx.send(true);
    }
}

impl Body for SentSignal {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        let r = inner.as_mut().poll_frame(cx);
        // hyper stops polling once `is_end_stream` is true, so check after every frame.
        let ended = match &r {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
            _ => false,
        };
        if ended {
            fire(this.sent);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
