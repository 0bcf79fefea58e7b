//! One client connection's HTTP service: HTTP/2 when ALPN chose `h2`, HTTP/1.1 otherwise
//! (parked while idle, `h1_park`). Runs the connection-level timeouts (header, idle), the
//! age limit (`tls.max_connection_age`), graceful shutdown, and the lingering close; says why
//! the connection ended.
//! Called by `listener` after `tls::accept`; calls `forward` per request.

use super::activity::{Activity, ActivityIo, Deadline};
use super::forward::{self, ConnContext};
use super::h1_park::{H1Conn, PARK_AFTER};
use super::route::Router;
use crate::body::BoxError;
use crate::config::HttpConfig;
use crate::metrics::{CloseReason, ListenerMetrics};
use crate::tls::Established;
use crate::tls::accept::Alpn;
use crate::tls::max_age::ConnectionAge;
use crate::tls::stream::{ClientStream, close_lingering};
use crate::upstream::Upstream;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long an idle connection we are closing gracefully may take to finish.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Everything a listener's connections share for HTTP.
pub struct ListenerHttp {
    pub router: Router,
    /// Indexed like `Config::upstreams`.
    pub upstreams: Vec<Arc<Upstream>>,
    pub cfg: HttpConfig,
    pub metrics: ListenerMetrics,
    /// Which names each connection's certificate covers (421 Misdirected Request).
    pub certificates: Arc<crate::tls::certs::SniResolver>,
}

impl ListenerHttp {
    pub fn is_trusted(&self, peer: &SocketAddr) -> bool {
        let ip = peer.ip().to_canonical();
        self.cfg.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// Serve HTTP on an established TLS connection until it closes, times out, `shutdown` turns
/// true or `age` passes its close time (then gracefully: GOAWAY for HTTP/2, close after the
/// response for HTTP/1.1; cut at the end of the grace).
///
/// The setup runs here, before the returned future is first polled: that future then holds
/// only what serving needs (hyper's connection is boxed), which is what an idle connection
/// costs in memory.
pub fn serve_connection(
    est: Established,
    peer: SocketAddr,
    local: SocketAddr,
    l: Arc<ListenerHttp>,
    mut shutdown: watch::Receiver<bool>,
    age: Option<ConnectionAge>,
) -> impl Future<Output = CloseReason> + Send {
    let Established {
        stream: client,
        closed: returned,
        info,
        ..
    } = est;
    let activity = Activity::new();
    let h2 = info.alpn == Alpn::H2;
    // What this connection's WebSocket relays stop on: the proxy's shutdown, or the end of
    // the age grace (they may outlive hyper's connection: an HTTP/1.1 upgrade ends it).
    let (relays_stop, relays_stop_rx) = watch::channel(*shutdown.borrow());
    let cx = Arc::new(ConnContext {
        peer,
        local,
        tls: info,
        trusted_peer: l.is_trusted(&peer),
        activity: activity.clone(),
        shutdown: relays_stop_rx,
        key_updates: client.key_updates(),
        forwarded_for: forward::ForwardedFor::new(&peer),
        last_response: client.last_response(),
    });

    let last_response = cx.last_response.clone();
    let service = {
        let l = l.clone();
        service_fn(move |req: hyper::Request<Incoming>| {
            // Called in the connection's task as hyper accepts the request, before the
            // stream's task runs: HTTP/2's first flight can then wait for the response. Not
            // for a request with a body: its client may need our WINDOW_UPDATEs to send it.
            if req.body().is_end_stream() {
                cx.last_response.set_request_arrived();
            }
            let l = l.clone();
            let cx = cx.clone();
            // Boxed: hyper spawns a task per HTTP/2 stream and moves this future into it
            // (and its output over it at the end); unboxed, that is several KiB copied twice.
            async move { Ok::<_, Infallible>(Box::pin(forward::handle(req, &l, &cx)).await) }
        })
    };
    let io = ActivityIo::new(client, activity.clone());
    let mut conn = if h2 {
        let h2_limits = &l.cfg.h2;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2_limits.max_concurrent_streams)
            .initial_stream_window_size(h2_limits.initial_stream_window)
            .initial_connection_window_size(h2_limits.initial_connection_window)
            .max_header_list_size(h2_limits.max_header_list_size)
            .keep_alive_interval(h2_limits.keepalive_interval)
            .keep_alive_timeout(h2_limits.keepalive_timeout)
            // Rapid reset (CVE-2023-44487) and server-provoked resets (CVE-2025-8671): GOAWAY
            // ENHANCE_YOUR_CALM past these counts. h2's defaults, pinned so that a change of
            // default cannot silently drop the protection (tests/h2_abuse.rs).
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(1024)
            // RFC 8441: WebSocket over HTTP/2 arrives as an extended CONNECT.
            .enable_connect_protocol();
        // Boxed, not stack-pinned: it must really be dropped below to get the stream back.
        Conn::H2(Box::pin(
            builder.serve_connection(TokioIo::new(io), service),
        ))
    } else {
        // No hyper timer on HTTP/1.1: its header_read_timeout would also run while a
        // keep-alive connection is idle. Ours (`Activity`) starts at the first byte of a request.
        let mut builder = http1::Builder::new();
        builder.keep_alive(true).max_buf_size(super::MAX_H1_BUFFER);
        Conn::H1(H1Conn::new(
            builder,
            io,
            service,
            l.metrics.clone(),
            last_response,
        ))
    };
    async move {
        let header_timeout = (!h2).then_some(l.cfg.header_timeout);
        // Set once we start a graceful close ourselves (idle): the peer gets this long to finish
        // (HTTP/2: GOAWAY, then the final GOAWAY after a PING round trip) before we cut it.
        let mut close_by: Option<Instant> = None;
        // Set when we decide to close (or cut) the connection; otherwise the outcome decides.
        let mut why: Option<CloseReason> = None;
        let mut closing = *shutdown.borrow();
        if closing {
            why = Some(CloseReason::Shutdown);
            conn.graceful_shutdown();
        }
        let age_close = age.map(|a| a.close_at);
        // HTTP/1.1: no parking attempt before this (pushed back while a write is unflushed).
        let mut park_not_before = Instant::now();
        let ended = loop {
            let park_at = (!closing && conn.can_park())
                .then(|| activity.parkable_since())
                .flatten()
                .map(|t| (t + PARK_AFTER).max(park_not_before));
            let wake = if closing {
                close_by
            } else {
                let t = match activity.next_deadline(header_timeout, l.cfg.idle_timeout) {
                    Deadline::Busy => None,
                    Deadline::HeaderBy(t) | Deadline::IdleBy(t) | Deadline::StalledBy(t) => Some(t),
                };
                earliest(earliest(t, age_close), park_at)
            };
            tokio::select! {
                res = &mut conn => {
                    let Err(e) = res else {
                        break why.unwrap_or(CloseReason::Completed);
                    };
                    if let Some(reason) = goaway_we_sent(e.as_ref()) {
                        l.metrics.goaway_sent(reason);
                        tracing::debug!(%peer, reason, error = %e, "HTTP/2 connection closed with GOAWAY");
                        break why.unwrap_or(CloseReason::ProtocolError);
                    }
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                    break why.unwrap_or(if client_went_away(e.as_ref()) {
                        CloseReason::ClientReset
                    } else {
                        CloseReason::Error
                    });
                }
                _ = shutdown.changed(), if !closing => {
                    closing = true;
                    why = Some(CloseReason::Shutdown);
                    relays_stop.send_replace(true);
                    if h2 {
                        l.metrics.goaway_sent("shutdown");
                    }
                    conn.graceful_shutdown();
                }
                _ = activity.changed(), if !closing => {}
                _ = sleep_until_opt(wake) => {
                    let now = Instant::now();
                    if closing {
                        if close_by.is_some_and(|t| now >= t) {
                            tracing::debug!(%peer, "graceful close did not finish in time; closing");
                            break why.unwrap_or(CloseReason::Completed);
                        }
                        continue;
                    }
                    if let Some(a) = age.filter(|a| now >= a.close_at) {
                        tracing::debug!(%peer, "past max_connection_age; closing gracefully");
                        if h2 {
                            l.metrics.goaway_sent("max_age");
                        }
                        closing = true;
                        why = Some(CloseReason::MaxAge);
                        close_by = Some(a.cut_at);
                        conn.graceful_shutdown();
                        continue;
                    }
                    if park_at.is_some_and(|t| now >= t) {
                        // hyper's buffers go only once all it wrote has reached the socket.
                        if activity.flushed() {
                            conn.park();
                        }
                        // Not parked (unflushed, or bytes of a next request were buffered and
                        // it is served at once): try again no sooner than this.
                        park_not_before = now + PARK_AFTER;
                        continue;
                    }
                    match activity.next_deadline(header_timeout, l.cfg.idle_timeout) {
                        Deadline::HeaderBy(t) if now >= t => {
                            tracing::debug!(%peer, "request headers not received within header_timeout; closing");
                            break CloseReason::HeaderTimeout;
                        }
                        Deadline::StalledBy(t) if now >= t => {
                            tracing::debug!(%peer, "client read nothing for idle_timeout with a response pending; closing");
                            break CloseReason::Stalled;
                        }
                        Deadline::IdleBy(t) if now >= t => {
                            if h2 {
                                l.metrics.goaway_sent("idle");
                            }
                            closing = true;
                            why = Some(CloseReason::IdleTimeout);
                            close_by = Some(now + IDLE_CLOSE_GRACE.min(l.cfg.idle_timeout));
                            conn.graceful_shutdown();
                        }
                        _ => {}
                    }
                }
            }
        };
        // Dropping hyper's connection hands the TLS stream back through `returned` once nothing
        // else holds it: an upgraded HTTP/1.1 connection's WebSocket relay may still run, until
        // it ends, the proxy shuts down, or the connection's age grace runs out.
        drop(conn);
        if closing {
            relays_stop.send_replace(true);
        }
        let mut returned = returned;
        let mut relay_cut = None;
        let tls = loop {
            tokio::select! {
                r = &mut returned => break r,
                _ = shutdown.changed(), if !*relays_stop.borrow() => {
                    relays_stop.send_replace(true);
                    relay_cut = Some(CloseReason::Shutdown);
                }
                _ = sleep_until_opt(age.map(|a| a.cut_at)), if !*relays_stop.borrow() => {
                    relays_stop.send_replace(true);
                    relay_cut = Some(CloseReason::MaxAge);
                }
            }
        };
        if let Ok(tls) = tls {
            // Boxed: its state (the TLS stream, a read buffer) would otherwise be part of this
            // future, and so of every idle connection's memory.
            Box::pin(close_lingering(tls)).await;
        }
        relay_cut.unwrap_or(ended)
    }
}

type H2Conn<S> = http2::Connection<TokioIo<ActivityIo<ClientStream>>, S, TokioExecutor>;

/// hyper's connection for the protocol ALPN chose.
enum Conn<S: HttpService<Incoming>> {
    H1(H1Conn<S>),
    H2(Pin<Box<H2Conn<S>>>),
}

impl<S, B> Conn<S>
where
    S: HttpService<Incoming, ResBody = B> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(&mut self) {
        match self {
            Conn::H1(c) => c.graceful_shutdown(),
            Conn::H2(c) => c.as_mut().graceful_shutdown(),
        }
    }

    /// An HTTP/1.1 connection not parked already.
    fn can_park(&self) -> bool {
        matches!(self, Conn::H1(c) if !c.is_parked())
    }

    fn park(&mut self) {
        if let Conn::H1(c) = self {
            c.park();
        }
    }
}

impl<S, B> Future for Conn<S>
where
    S: HttpService<Incoming, ResBody = B> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Conn::H1(c) => Pin::new(c).poll(cx),
            Conn::H2(c) => c.as_mut().poll(cx).map_err(Into::into),
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The GOAWAY error code we sent when h2 closed the connection on its own (flood
/// protections, protocol errors), as a `GOAWAY_REASONS` label.
fn goaway_we_sent(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            if !h2e.is_go_away() || h2e.is_remote() {
                return None;
            }
            let code = u32::from(h2e.reason()?);
            return crate::metrics::GOAWAY_REASONS
                .get(usize::try_from(code).ok()?)
                .filter(|_| code <= 0xd)
                .copied();
        }
        cur = err.source();
    }
    None
}

/// An I/O error that means the client reset or dropped the connection.
fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionAborted
            );
        }
        cur = err.source();
    }
    false
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
