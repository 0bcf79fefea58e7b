//! Backends: pooled keep-alive HTTP/1.1 connections per server, round-robin balancing, and
//! skipping of servers that refuse connections. Called by `http::forward`; the last stage
//! before the backend.
//!
//! A small pool of our own (over hyper's `client::conn`) rather than hyper-util's legacy
//! client: choosing the server before the request is handed over lets a refused connect move
//! on to the next server without losing a streamed request body.

use crate::body::{BoxError, ProxyBody};
use crate::config::UpstreamConfig;
use crate::log_limit::LogLimiter;
use crate::metrics::{UpstreamErrorKind, UpstreamMetrics};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Idle connections older than this are not reused: backends close idle keep-alive
/// connections on their own schedule (often 5–60 s) and reusing one they just closed fails.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per server; extra ones are closed.
const MAX_IDLE_PER_SERVER: usize = 256;
/// After a refused connect, a server is tried last for this long.
const FAILED_BACKOFF: Duration = Duration::from_secs(2);

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
    /// The connection failed after it was made: reset, malformed response (answered 502).
    #[error("upstream '{upstream}': request to {server} failed: {source}")]
    Protocol {
        upstream: String,
        server: String,
        #[source]
        source: hyper::Error,
    },
    /// The client's request body failed while it was being sent (aborted, too large,
    /// stalled): not the backend's fault, and not counted as an upstream error.
    #[error("upstream '{upstream}': the client's request body failed: {source}")]
    ClientBody {
        upstream: String,
        #[source]
        source: hyper::Error,
    },
}

/// A live HTTP/1.1 connection: the send half plus the task driving it (aborted on drop).
struct PooledConn {
    sender: http1::SendRequest<ProxyBody>,
    driver: JoinHandle<()>,
    idle_since: Instant,
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

struct Server {
    addr: String,
    idle: Mutex<Vec<PooledConn>>,
    failed_at: Mutex<Option<Instant>>,
}

impl Server {
    fn recently_failed(&self) -> bool {
        let failed = self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        failed.is_some_and(|t| t.elapsed() < FAILED_BACKOFF)
    }

    fn mark_failed(&self, failed: bool) {
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = failed.then(Instant::now);
    }

    fn take_idle(&self) -> Option<PooledConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(c) = idle.pop() {
            if c.idle_since.elapsed() < IDLE_TIMEOUT && c.sender.is_ready() {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, mut conn: PooledConn) {
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_PER_SERVER {
            idle.push(conn);
        }
    }
}

/// One configured upstream: its servers, their pools and its metrics.
pub struct Upstream {
    name: String,
    servers: Vec<Arc<Server>>,
    next: AtomicUsize,
    connect_timeout: Duration,
    response_timeout: Duration,
    metrics: UpstreamMetrics,
    /// A down backend must not flood the log: at most 10 lines per 10 s per upstream.
    pub log: LogLimiter,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: UpstreamMetrics) -> Upstream {
        Upstream {
            name: cfg.name.clone(),
            servers: cfg
                .servers
                .iter()
                .map(|addr| {
                    Arc::new(Server {
                        addr: addr.clone(),
                        idle: Mutex::new(Vec::new()),
                        failed_at: Mutex::new(None),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
            metrics,
            log: LogLimiter::new(Duration::from_secs(10), 10),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Servers in the order to try for one request: round-robin start, recently failed last.
    fn order(&self) -> Vec<Arc<Server>> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<_> = (0..n)
            .map(|i| self.servers[(start + i) % n].clone())
            .collect();
        order.sort_by_key(|s| s.recently_failed());
        order
    }

    async fn connect(
        &self,
        server: &Server,
    ) -> Result<PooledConn, (UpstreamErrorKind, std::io::Error)> {
        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(server.addr.as_str()),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err((UpstreamErrorKind::Connect, e)),
            Err(_) => {
                return Err((
                    UpstreamErrorKind::ConnectTimeout,
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| (UpstreamErrorKind::Connect, std::io::Error::other(e)))?;
        let addr = server.addr.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(server = %addr, error = %e, "backend connection ended with an error");
            }
        });
        Ok(PooledConn {
            sender,
            driver,
            idle_since: Instant::now(),
        })
    }

    /// Send `req` (origin-form URI, headers already rewritten) and wait for response headers.
    /// `response_timeout` runs from the moment the request body has been sent in full, so a
    /// long upload is not cut off by it.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        let (body_sent_tx, body_sent) = watch::channel(false);
        let mut req = req.map(|b| SentSignal::new(b, body_sent_tx).boxed());
        let mut last_err = None;
        for server in self.order() {
            // A reused connection may have been closed by the backend just now; hyper then
            // hands the unsent request back and we try a fresh connection.
            let mut reused = server.take_idle();
            loop {
                let fresh = reused.is_none();
                let mut conn = match reused.take() {
                    Some(c) => c,
                    None => match self.connect(&server).await {
                        Ok(c) => {
                            server.mark_failed(false);
                            c
                        }
                        Err((kind, e)) => {
                            self.metrics.error(kind);
                            server.mark_failed(true);
                            if let Some(suppressed) = self.log.allow() {
                                tracing::warn!(upstream = %self.name, server = %server.addr, error = %e, suppressed_since_last = suppressed, "backend connect failed; trying the next server");
                            }
                            last_err = Some((server.addr.clone(), e));
                            break;
                        }
                    },
                };
                let started = Instant::now();
                let deadline = async {
                    // Err: the body is gone (failed or dropped); the timer starts anyway.
                    let _ = body_sent.clone().wait_for(|sent| *sent).await;
                    tokio::time::sleep(self.response_timeout).await;
                };
                let sent = tokio::select! {
                    r = conn.sender.try_send_request(req) => Ok(r),
                    _ = deadline => Err(()),
                };
                match sent {
                    Ok(Ok(resp)) => {
                        self.metrics.observe(started.elapsed().as_secs_f64());
                        let server = server.clone();
                        // Back to the pool once the response body has been read to the end.
                        tokio::spawn(async move {
                            if conn.sender.ready().await.is_ok() {
                                server.put_idle(conn);
                            }
                        });
                        return Ok(resp);
                    }
                    Ok(Err(mut e)) => match e.take_message() {
                        Some(unsent) if !fresh => {
                            req = unsent;
                            continue;
                        }
                        _ => {
                            let source = e.into_error();
                            // A user error is ours to send: here, the client's body failing.
                            if source.is_user() {
                                return Err(UpstreamError::ClientBody {
                                    upstream: self.name.clone(),
                                    source,
                                });
                            }
                            self.metrics.error(UpstreamErrorKind::Protocol);
                            return Err(UpstreamError::Protocol {
                                upstream: self.name.clone(),
                                server: server.addr.clone(),
                                source,
                            });
                        }
                    },
                    Err(_) => {
                        self.metrics.error(UpstreamErrorKind::ResponseTimeout);
                        return Err(UpstreamError::ResponseTimeout {
                            upstream: self.name.clone(),
                            server: server.addr.clone(),
                            timeout: self.response_timeout,
                        });
                    }
                }
            }
        }
        let (server, source) =
            last_err.unwrap_or_else(|| (String::new(), std::io::Error::other("no servers")));
        Err(UpstreamError::Connect {
            upstream: self.name.clone(),
            server,
            source,
        })
    }
}

pin_project_lite::pin_project! {
    /// A request body that reports when it has been sent in full.
    struct SentSignal {
        #[pin]
        inner: ProxyBody,
        sent: Option<watch::Sender<bool>>,
    }
}

impl SentSignal {
    fn new(inner: ProxyBody, sent: watch::Sender<bool>) -> SentSignal {
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
