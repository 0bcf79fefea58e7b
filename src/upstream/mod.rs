//! Backends: per server, pooled keep-alive HTTP/1.1 connections (`h1`) or multiplexed HTTP/2
//! connections (`h2`, cleartext or TLS); round-robin balancing; passive health (servers
//! that keep failing to connect are ejected for a while); one retry on another server.
//! Called by `http::forward`; the last stage before the backend.
//!
//! Pools of our own (over hyper's `client::conn`) rather than hyper-util's legacy client:
//! choosing the server before the request is handed over lets a refused connect move on to
//! the next server without losing a streamed request body, and HTTP/2 streams can spread
//! over several connections when one is at the server's stream limit.

mod connect;
mod h1;
mod h2;
mod health;
mod resolve;
mod sent;

pub use connect::{BackendIo, UpstreamSetupError};

use crate::body::{BoxError, ProxyBody};
use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::log_limit::LogLimiter;
use crate::metrics::{GaugeGuard, RetryReason, UpstreamErrorKind, UpstreamMetrics};
use crate::proxy_protocol::{self, ClientFacts};
use bytes::Bytes;
use connect::{BackendTls, ConnectFailure};
use health::Health;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::TrySendError;
use hyper::{Request, Response};
use rustls::pki_types::ServerName;
use sent::BodyWatch;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Why a request could not be sent to the backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// Every server refused the connection or failed to connect (answered 502).
    #[error("upstream '{upstream}': no server accepted a connection (last: {server}: {source})")]
    Connect {
        upstream: String,
        server: String,
        #[source]
        source: std::io::Error,
    },
    /// No response headers within `response_timeout` (answered 504).
    #[error("upstream '{upstream}': no response from {server} within {timeout:?}")]
    ResponseTimeout {
        upstream: String,
        server: String,
        timeout: Duration,
    },
    /// The connection failed after it was made: reset, refused stream, malformed response
    /// (answered 502).
    #[error("upstream '{upstream}': request to {server} failed: {source}")]
    Protocol {
        upstream: String,
        server: String,
        #[source]
        source: BoxError,
    },
    /// The client's request body failed while it was being sent (aborted, too large,
    /// stalled): not the backend's fault, and not counted as an upstream error.
    #[error("upstream '{upstream}': the client's request body failed: {source}")]
    ClientBody {
        upstream: String,
        #[source]
        source: BoxError,
    },
    /// The backend stopped taking the request body (or the request waited for a free
    /// HTTP/2 stream) for `response_timeout` (answered 504).
    #[error("upstream '{upstream}': {server} took no request body data for {timeout:?}")]
    BodyTimeout {
        upstream: String,
        server: String,
        timeout: Duration,
    },
}

struct Server {
    addr: String,
    /// The TLS name to verify (`h2` upstreams only).
    tls_name: Option<ServerName<'static>>,
    health: Health,
    resolved: resolve::Resolved,
    h1: Arc<h1::Pool>,
    h2: h2::Pool,
}

/// One configured upstream: its servers, their pools and its metrics.
pub struct Upstream {
    name: String,
    protocol: UpstreamProtocol,
    /// `http` for h2c, `https` for h2: the `:scheme` sent to HTTP/2 backends.
    scheme: Scheme,
    servers: Vec<Arc<Server>>,
    next: AtomicUsize,
    tls: Option<BackendTls>,
    connect_timeout: Duration,
    response_timeout: Duration,
    read_timeout: Duration,
    /// Each new connection starts with a PROXY v2 header naming its client.
    proxy_protocol: bool,
    metrics: UpstreamMetrics,
    /// A down backend must not flood the log: at most 10 lines per 10 s per upstream.
    pub log: LogLimiter,
    upkeep: std::sync::Once,
}

/// How one attempt on one server ended, short of a response.
enum Attempt {
    /// No connection to the server: nothing was sent; the request comes back.
    NoConnection(Request<ProxyBody>, ConnectFailure),
    /// Another request's connection attempt to this server failed while we waited.
    NoConnectionMeanwhile(Request<ProxyBody>),
    /// The backend failed before answering (reset, refused stream, closed connection).
    Unanswered(BoxError),
    /// Final: the client's body failed, or the response timed out.
    Final(UpstreamError),
}

impl Upstream {
    pub fn new(
        cfg: &UpstreamConfig,
        metrics: UpstreamMetrics,
    ) -> Result<Upstream, UpstreamSetupError> {
        let tls = cfg
            .tls
            .as_ref()
            .map(|t| BackendTls::new(&cfg.name, t))
            .transpose()?;
        let servers = cfg
            .servers
            .iter()
            .map(|addr| {
                let tls_name = tls
                    .as_ref()
                    .map(|t| t.name_for(&cfg.name, addr))
                    .transpose()?;
                Ok(Arc::new(Server {
                    addr: addr.clone(),
                    tls_name,
                    health: Health::default(),
                    resolved: resolve::Resolved::default(),
                    h1: Arc::new(h1::Pool::default()),
                    h2: h2::Pool::new(cfg.max_connections),
                }))
            })
            .collect::<Result<_, UpstreamSetupError>>()?;
        Ok(Upstream {
            name: cfg.name.clone(),
            protocol: cfg.protocol,
            scheme: if tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            servers,
            next: AtomicUsize::new(0),
            tls,
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
            read_timeout: cfg.read_timeout,
            proxy_protocol: cfg.proxy_protocol,
            metrics,
            log: LogLimiter::new(Duration::from_secs(10), 10),
            upkeep: std::sync::Once::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// Whether requests must carry `ClientFacts` for a PROXY v2 header.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// HTTP/2 connections open to each server, in config order (for tests and logs).
    pub fn h2_connections(&self) -> Vec<usize> {
        self.servers.iter().map(|s| s.h2.open()).collect()
    }

    /// Servers in the order to try for one request: round-robin start, ejected servers last
    /// (still tried: better a late success than a certain 502).
    fn order(&self) -> Vec<Arc<Server>> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<_> = (0..n)
            .map(|i| self.servers[(start + i) % n].clone())
            .collect();
        if n > 1 {
            let now = Instant::now();
            order.sort_by_key(|s| s.health.ejected(now));
        }
        order
    }

    async fn connect(&self, server: &Server) -> Result<BackendIo, ConnectFailure> {
        self.connect_for(server, None).await
    }

    /// A new connection; with `facts` (PROXY protocol upstreams) it starts with the header.
    async fn connect_for(
        &self,
        server: &Server,
        facts: Option<&ClientFacts>,
    ) -> Result<BackendIo, ConnectFailure> {
        let tls = match (&self.tls, &server.tls_name) {
            (Some(t), Some(name)) => Some((t, name)),
            _ => None,
        };
        if self.proxy_protocol && facts.is_none() {
            // Never open a connection a PROXY backend would take to be from us.
            return Err((
                UpstreamErrorKind::Connect,
                std::io::Error::other("no client facts for the PROXY protocol header"),
            ));
        }
        let mut io = connect::connect(&server.addr, self.connect_timeout, tls).await?;
        if let Some(f) = facts.filter(|_| self.proxy_protocol) {
            let header =
                proxy_protocol::v2_header(f).map_err(|e| (UpstreamErrorKind::Connect, e))?;
            tokio::io::AsyncWriteExt::write_all(&mut io, &header)
                .await
                .map_err(|e| (UpstreamErrorKind::Connect, e))?;
        }
        Ok(io)
    }

    /// Send `req` (origin-form URI, headers already rewritten, Host set) and wait for the
    /// response headers. `response_timeout` runs from the moment the request body has been
    /// sent in full, so a long upload is not cut off by it.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        // Started by the first request: it needs the runtime, which `check` does not start.
        self.upkeep
            .call_once(|| resolve::spawn(self.name.clone(), &self.servers));
        let req = if self.protocol.is_h2() {
            self.to_h2(req)
        } else {
            req
        };
        // A bodyless idempotent request can be sent again if a backend fails to answer it.
        let replay = (is_idempotent(req.method()) && req.body().is_end_stream()).then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.version(),
                req.headers().clone(),
                req.extensions().get::<ClientFacts>().cloned(),
            )
        });
        let (mut req, mut body) = watch_body(req);
        let mut retried = false;
        let mut last_connect: Option<(String, std::io::Error)> = None;
        let mut order = self.order();
        let mut i = 0;
        while let Some(server) = order.get(i).cloned() {
            i += 1;
            let more = i < order.len();
            let attempt = if self.protocol.is_h2() {
                self.send_h2(&server, req, &body).await
            } else {
                self.send_h1(&server, req, &body).await
            };
            match attempt {
                Ok(resp) => {
                    server.health.connected();
                    return Ok(resp);
                }
                Err(Attempt::NoConnection(r, (kind, e))) => {
                    self.connect_failed(&server, kind, &e, more);
                    last_connect = Some((server.addr.clone(), e));
                    req = r;
                }
                Err(Attempt::NoConnectionMeanwhile(r)) => {
                    last_connect.get_or_insert_with(|| {
                        (
                            server.addr.clone(),
                            std::io::Error::other("a connection attempt to this server failed"),
                        )
                    });
                    req = r;
                }
                Err(Attempt::Unanswered(source)) => {
                    self.metrics.error(UpstreamErrorKind::Protocol);
                    match &replay {
                        Some((method, uri, version, headers, facts)) if !retried => {
                            retried = true;
                            self.metrics.retry(RetryReason::Unanswered);
                            tracing::debug!(upstream = %self.name, server = %server.addr, error = %source, "backend did not answer; sending the idempotent request once more");
                            // To the next server; with none left, to this one again.
                            if !more {
                                order.push(server.clone());
                            }
                            let mut again = rebuild(method, uri, *version, headers);
                            if let Some(f) = facts {
                                again.extensions_mut().insert(f.clone());
                            }
                            (req, body) = watch_body(again);
                        }
                        _ => {
                            return Err(UpstreamError::Protocol {
                                upstream: self.name.clone(),
                                server: server.addr.clone(),
                                source,
                            });
                        }
                    }
                }
                Err(Attempt::Final(e)) => return Err(e),
            }
        }
        let (server, source) =
            last_connect.unwrap_or_else(|| (String::new(), std::io::Error::other("no servers")));
        Err(UpstreamError::Connect {
            upstream: self.name.clone(),
            server,
            source,
        })
    }

    /// Count and log a failed connection attempt; eject the server if it keeps failing.
    fn connect_failed(
        &self,
        server: &Server,
        kind: UpstreamErrorKind,
        e: &std::io::Error,
        more: bool,
    ) {
        self.metrics.error(kind);
        if server.health.connect_failed(Instant::now()) {
            self.metrics.ejected();
            tracing::warn!(upstream = %self.name, server = %server.addr, cool_down = ?health::EJECT_FOR, "server ejected after {} connect failures in a row", health::EJECT_AFTER);
        }
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(upstream = %self.name, server = %server.addr, error = %e, suppressed_since_last = suppressed, more_servers = more, "backend connect failed");
        }
        if more {
            self.metrics.retry(RetryReason::Connect);
        }
    }

    /// TCP mode: a connection to the next server in rotation (ejected ones last; a failed
    /// connect moves on), counted in `ephemera_upstream_connections_open` until the guard
    /// is dropped.
    pub async fn open_stream(
        &self,
        facts: &ClientFacts,
    ) -> Result<(BackendIo, GaugeGuard), UpstreamError> {
        let order = self.order();
        let mut last = None;
        for (i, server) in order.iter().enumerate() {
            match self.connect_for(server, Some(facts)).await {
                Ok(io) => {
                    server.health.connected();
                    return Ok((io, self.metrics.connection_opened()));
                }
                Err((kind, e)) => {
                    self.connect_failed(server, kind, &e, i + 1 < order.len());
                    last = Some((server.addr.clone(), e));
                }
            }
        }
        let (server, source) =
            last.unwrap_or_else(|| (String::new(), std::io::Error::other("no servers")));
        Err(UpstreamError::Connect {
            upstream: self.name.clone(),
            server,
            source,
        })
    }

    async fn send_h1(
        &self,
        server: &Server,
        mut req: Request<ProxyBody>,
        body: &BodyWatch,
    ) -> Result<Response<ProxyBody>, Attempt> {
        // A connection that began with a PROXY header belongs to that one client: never
        // pooled, never reused.
        let facts = req.extensions().get::<ClientFacts>().cloned();
        let head = req.method() == Method::HEAD;
        let private = self.proxy_protocol;
        // A reused connection may have been closed by the backend just now; hyper then hands
        // the unsent request back and we try a fresh connection.
        let mut reused = if private { None } else { server.h1.take_idle() };
        loop {
            let fresh = reused.is_none();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => {
                    let generation = server.h1.generation();
                    let io = match self.connect_for(server, facts.as_ref()).await {
                        Ok(io) => io,
                        Err(f) => return Err(Attempt::NoConnection(req, f)),
                    };
                    match h1::handshake(io, &server.addr, generation, &self.metrics).await {
                        Ok(c) => c,
                        Err(e) => {
                            let f = (UpstreamErrorKind::Protocol, std::io::Error::other(e));
                            return Err(Attempt::NoConnection(req, f));
                        }
                    }
                }
            };
            let started = Instant::now();
            match self
                .exchange(conn.sender.try_send_request(req), body, server)
                .await
            {
                Ok(resp) => {
                    self.metrics.observe(started.elapsed().as_secs_f64());
                    let announced = announced_length(head, &resp);
                    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS || private {
                        // The connection now belongs to the upgrade (a WebSocket relay), or,
                        // having begun with a PROXY header, to this one request: it closes
                        // once the response has been read.
                        conn.detach();
                        return Ok(resp.map(|body| self.checked(body, announced)));
                    }
                    // Back to the pool once the response body has been read to the end.
                    let pool = server.h1.clone();
                    return Ok(resp.map(|body| {
                        self.checked(h1::Returning::new(body, pool, conn), announced)
                    }));
                }
                Err(Exchange::Unsent(r)) if !fresh => req = r,
                Err(Exchange::Unsent(r)) => {
                    let f = (
                        UpstreamErrorKind::Protocol,
                        std::io::Error::other("a new backend connection closed at once"),
                    );
                    return Err(Attempt::NoConnection(r, f));
                }
                Err(Exchange::Failed(a)) => return Err(a),
            }
        }
    }

    async fn send_h2(
        &self,
        server: &Server,
        mut req: Request<ProxyBody>,
        body: &BodyWatch,
    ) -> Result<Response<ProxyBody>, Attempt> {
        let head = req.method() == Method::HEAD;
        // A connection can end (GOAWAY) between lease and send; hyper hands the request back
        // and we lease again, a few times at most.
        for attempt in 0..3 {
            if attempt > 0 {
                tracing::debug!(server = %server.addr, "HTTP/2 connection ended before the request was sent; leasing another");
            }
            let leased = server
                .h2
                .lease(|| async {
                    let io = self.connect(server).await?;
                    h2::handshake(io, &server.addr, self.connect_timeout, &self.metrics).await
                })
                .await;
            let lease = match leased {
                Ok(l) => l,
                Err(h2::LeaseError::Connect(f)) => return Err(Attempt::NoConnection(req, f)),
                Err(h2::LeaseError::FailedMeanwhile) => {
                    return Err(Attempt::NoConnectionMeanwhile(req));
                }
            };
            let started = Instant::now();
            let mut sender = lease.sender();
            match self
                .exchange(sender.try_send_request(req), body, server)
                .await
            {
                Ok(resp) => {
                    self.metrics.observe(started.elapsed().as_secs_f64());
                    let announced = announced_length(head, &resp);
                    return Ok(resp.map(|body| {
                        let body = LeasedBody {
                            body,
                            _lease: lease,
                        };
                        self.checked(body, announced)
                    }));
                }
                Err(Exchange::Unsent(r)) => {
                    lease.mark_ended();
                    req = r;
                }
                Err(Exchange::Failed(a)) => return Err(a),
            }
        }
        let f = (
            UpstreamErrorKind::Protocol,
            std::io::Error::other(
                "backend HTTP/2 connections kept closing before the request was sent",
            ),
        );
        Err(Attempt::NoConnection(req, f))
    }

    /// Wait for the response to a request handed to hyper. Bounded by `response_timeout`
    /// from the moment the request body has been sent in full, and before that by the same
    /// time without hyper pulling from the body (a backend that stops reading it, or an
    /// HTTP/2 stream that never gets a slot).
    async fn exchange(
        &self,
        send: impl Future<Output = Result<Response<Incoming>, TrySendError<Request<ProxyBody>>>>,
        body: &BodyWatch,
        server: &Server,
    ) -> Result<Response<Incoming>, Exchange> {
        let timeout = self.response_timeout;
        let deadline = body.deadline(timeout);
        let sent = tokio::select! {
            r = send => r,
            body_stuck = deadline => {
                self.metrics.error(UpstreamErrorKind::ResponseTimeout);
                let e = if body_stuck {
                    UpstreamError::BodyTimeout {
                        upstream: self.name.clone(),
                        server: server.addr.clone(),
                        timeout,
                    }
                } else {
                    UpstreamError::ResponseTimeout {
                        upstream: self.name.clone(),
                        server: server.addr.clone(),
                        timeout,
                    }
                };
                return Err(Exchange::Failed(Attempt::Final(e)));
            }
        };
        match sent {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(unsent) => Err(Exchange::Unsent(unsent)),
                None => {
                    // The client's body failing is not the backend's fault: hyper's HTTP/1.1
                    // client reports it as a user error, its HTTP/2 client as a stream reset.
                    if let Some(source) = body.take_failure() {
                        return Err(Exchange::Failed(Attempt::Final(
                            UpstreamError::ClientBody {
                                upstream: self.name.clone(),
                                source,
                            },
                        )));
                    }
                    Err(Exchange::Failed(Attempt::Unanswered(e.into_error().into())))
                }
            },
        }
    }

    /// A response body as it goes to the client: failures counted, length enforced.
    fn checked<B>(&self, body: B, announced: Option<u64>) -> ProxyBody
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        CheckedBody {
            inner: body,
            remaining: announced,
            metrics: Some(self.metrics.clone()),
            read_timeout: self.read_timeout,
            silence: None,
        }
        .boxed()
    }

    /// HTTP/2 to the backend: the authority moves from Host into the URI (`:authority`),
    /// with the scheme of the backend connection.
    fn to_h2(&self, req: Request<ProxyBody>) -> Request<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let authority = parts
            .headers
            .remove(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .or_else(|| Authority::try_from(self.name.as_str()).ok());
        let mut uri = Uri::builder().scheme(self.scheme.clone());
        if let Some(a) = authority {
            uri = uri.authority(a);
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        if let Ok(u) = uri.path_and_query(pq).build() {
            parts.uri = u;
        }
        parts.version = Version::HTTP_2;
        Request::from_parts(parts, body)
    }
}

enum Exchange {
    /// hyper did not send the request (the connection was closed): it comes back.
    Unsent(Request<ProxyBody>),
    Failed(Attempt),
}

fn watch_body(req: Request<ProxyBody>) -> (Request<ProxyBody>, BodyWatch) {
    let (parts, body) = req.into_parts();
    let (body, watch) = sent::watched(body);
    (Request::from_parts(parts, body), watch)
}

fn rebuild(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Request<ProxyBody> {
    let mut req = Request::new(crate::body::empty());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.version_mut() = version;
    *req.headers_mut() = headers.clone();
    req
}

/// RFC 9110 §9.2.2.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

pin_project_lite::pin_project! {
    /// A response body from an HTTP/2 backend, holding its stream's slot on the connection
    /// until it is dropped.
    struct LeasedBody {
        #[pin]
        body: Incoming,
        _lease: h2::Lease,
    }
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx).map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The body length a response announces with Content-Length, where its body must have that
/// length: not for HEAD, 1xx, 204 or 304 (RFC 9110 §8.6), nor beside Transfer-Encoding
/// (which wins, RFC 9112 §6.3).
fn announced_length(head_request: bool, resp: &Response<Incoming>) -> Option<u64> {
    let status = resp.status();
    if head_request
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
        || resp.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    resp.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A backend's response body failed after its head had gone to the client. It carries the
/// cause as text only: hyper resets the client's HTTP/2 stream with the first HTTP/2 error
/// code among an error's sources, and the backend's code (REFUSED_STREAM, CANCEL, …) says
/// nothing true about the client's stream; without one hyper uses INTERNAL_ERROR.
#[derive(Debug, thiserror::Error)]
#[error("the backend's response body failed: {0}")]
pub struct TruncatedBody(String);

pin_project_lite::pin_project! {
    /// A backend's response body on its way to the client. A failure after the head went on
    /// (reset, connection closed early, malformed chunk) is counted once as `truncated`: the
    /// client sees the response cut off. A body that ends short of its Content-Length is made
    /// such a failure: hyper's HTTP/2 client ends a body cleanly on RST_STREAM(NO_ERROR) even
    /// before END_STREAM, and a short body must not reach the client looking complete.
    struct CheckedBody<B> {
        #[pin]
        inner: B,
        // Bytes the backend announced and has not sent yet.
        remaining: Option<u64>,
        // Taken when the failure is counted.
        metrics: Option<UpstreamMetrics>,
        // `read_timeout`: armed when the backend has nothing for us, disarmed by data.
        read_timeout: Duration,
        silence: Option<(Pin<Box<tokio::time::Sleep>>, bool)>,
    }
}

impl<B> Body for CheckedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.inner.poll_frame(cx) {
            Poll::Ready(p) => p.map(|r| r.map_err(|e| e.into().to_string())),
            Poll::Pending => {
                // One timer per body, re-armed (not re-allocated) at each wait.
                let deadline = tokio::time::Instant::now() + *this.read_timeout;
                let (sleep, armed) = this
                    .silence
                    .get_or_insert_with(|| (Box::pin(tokio::time::sleep_until(deadline)), true));
                if !*armed {
                    sleep.as_mut().reset(deadline);
                    *armed = true;
                }
                std::task::ready!(sleep.as_mut().poll(cx));
                Some(Err(format!(
                    "the backend sent nothing for read_timeout ({:?})",
                    this.read_timeout
                )))
            }
        };
        let why = match polled {
            Some(Ok(frame)) => {
                if let Some((_, armed)) = this.silence.as_mut() {
                    *armed = false;
                }
                if let (Some(left), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                    *left = left.saturating_sub(data.len() as u64);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            None => match *this.remaining {
                Some(left) if left > 0 => {
                    format!("it ended {left} bytes short of its Content-Length")
                }
                _ => return Poll::Ready(None),
            },
            Some(Err(e)) => e,
        };
        if let Some(m) = this.metrics.take() {
            m.error(UpstreamErrorKind::Truncated);
        }
        tracing::debug!(error = %why, "backend response body failed; the client sees it cut off");
        Poll::Ready(Some(Err(Box::new(TruncatedBody(why)))))
    }

    fn is_end_stream(&self) -> bool {
        // hyper stops polling a body that says it has ended: not before the announced length.
        self.remaining.is_none_or(|left| left == 0) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
