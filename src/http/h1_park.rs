//! Idle HTTP/1.1 connections without hyper: after `PARK_AFTER` with no request, the
//! connection task takes hyper's connection apart (`into_parts`) and drops it, freeing its
//! read and write buffers and parser state (about 20 KiB), and waits for the next request's
//! first bytes on the TLS stream alone. Those bytes are put back in front of the stream
//! (`ParkableIo`) for a new hyper connection. Inside `server`, HTTP/1.1 only: an HTTP/2
//! connection's state (HPACK tables, settings, streams) lives across requests.

use super::activity::ActivityIo;
use crate::body::BoxError;
use crate::metrics::{GaugeGuard, ListenerMetrics};
use crate::tls::stream::{ClientStream, LastResponse};
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long an HTTP/1.1 connection stays idle before it is parked. Long enough that a client
/// sending requests back to back never pays for a rebuilt hyper connection (a few µs), and
/// that hyper has flushed what it wrote; short because freed buffers are reused only by
/// connections that come later (nginx frees its buffers at once).
pub const PARK_AFTER: Duration = Duration::from_millis(250);

type Stream = ParkableIo<ActivityIo<ClientStream>>;
type Serving<S> = http1::UpgradeableConnection<TokioIo<Stream>, S>;

/// An HTTP/1.1 connection that can be parked while idle; a `Future` like hyper's.
pub struct H1Conn<S: HttpService<Incoming>> {
    builder: http1::Builder,
    state: State<S>,
    metrics: ListenerMetrics,
    /// Told of every poll of hyper's connection: the stream holds the last response's
    /// flushes within one poll only.
    last: Arc<LastResponse>,
}

enum State<S: HttpService<Incoming>> {
    Serving(Pin<Box<Serving<S>>>),
    /// Boxed: a serving connection's state then holds only a pointer to nothing.
    Parked(Box<(Stream, S, GaugeGuard)>),
    Done,
}

impl<S, B> H1Conn<S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub fn new(
        builder: http1::Builder,
        io: ActivityIo<ClientStream>,
        service: S,
        metrics: ListenerMetrics,
        last: Arc<LastResponse>,
    ) -> Self {
        let state = State::Serving(serve(&builder, ParkableIo::new(io), service));
        H1Conn {
            builder,
            state,
            metrics,
            last,
        }
    }

    /// Like hyper's: close once the request in flight (if any) is answered; at once when
    /// parked.
    pub fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Serving(conn) => conn.as_mut().graceful_shutdown(),
            State::Parked(_) => self.state = State::Done,
            State::Done => {}
        }
    }

    /// Park the connection. Only call this between messages (`Activity::parkable_since`: no
    /// request in flight, no request body being read) and when everything hyper wrote has
    /// been flushed (`Activity::flushed`): hyper's buffers and parser state are dropped.
    pub fn park(&mut self) {
        if self.last.is_closing() {
            // hyper is finishing the last response (its flush may be held until the
            // shutdown, which only hyper does): nothing to park for.
            return;
        }
        let State::Serving(conn) = std::mem::replace(&mut self.state, State::Done) else {
            return;
        };
        // None: upgraded, and then the connection future has already completed.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return;
        };
        let mut io = parts.io.into_inner();
        if parts.read_buf.is_empty() && io.prefix.is_empty() {
            let gauge = self.metrics.http1_parked();
            self.state = State::Parked(Box::new((io, parts.service, gauge)));
        } else {
            // The start of the next request arrived with the last one: serve it now. hyper
            // read `read_buf` before what is left of our prefix.
            if !parts.read_buf.is_empty() {
                let mut joined = BytesMut::from(&parts.read_buf[..]);
                joined.extend_from_slice(&io.prefix);
                io.prefix = joined.freeze();
            }
            self.state = State::Serving(serve(&self.builder, io, parts.service));
        }
    }

    pub fn is_parked(&self) -> bool {
        matches!(self.state, State::Parked(_))
    }
}

fn serve<S, B>(builder: &http1::Builder, io: Stream, service: S) -> Pin<Box<Serving<S>>>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
    )
}

impl<S, B> Future for H1Conn<S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Serving(conn) => {
                    return this
                        .last
                        .poll_with(cx, |cx| conn.as_mut().poll(cx))
                        .map_err(Into::into);
                }
                State::Done => return Poll::Ready(Ok(())),
                State::Parked(_) => {
                    let State::Parked(mut parked) = std::mem::replace(&mut this.state, State::Done)
                    else {
                        return Poll::Ready(Ok(()));
                    };
                    // Read through the TLS stream, not the socket: a KeyUpdate or
                    // close_notify from the client is handled as it would be by hyper.
                    let mut first = [0u8; 512];
                    let mut buf = ReadBuf::new(&mut first);
                    match Pin::new(&mut parked.0).poll_read(cx, &mut buf) {
                        Poll::Pending => {
                            this.state = State::Parked(parked);
                            return Poll::Pending;
                        }
                        // The client closed or reset an idle connection: hyper reports both
                        // as a clean end (a read error between messages is no failure).
                        Poll::Ready(Err(e)) => {
                            tracing::debug!(error = %e, "idle HTTP/1.1 connection ended");
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Ok(())) => {
                            let (mut io, service, _unparked) = *parked;
                            io.prefix = Bytes::copy_from_slice(buf.filled());
                            this.state = State::Serving(serve(&this.builder, io, service));
                        }
                    }
                }
            }
        }
    }
}

/// The client stream with bytes read while parked put back in front.
pub struct ParkableIo<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> ParkableIo<T> {
    fn new(inner: T) -> Self {
        ParkableIo {
            prefix: Bytes::new(),
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ParkableIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParkableIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
