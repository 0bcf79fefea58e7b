//! The plaintext admin listener: `/metrics` (Prometheus text), `/healthz` (the process is up),
//! `/readyz` (503 once draining). Reads `metrics`; nothing else depends on it. Bind it to
//! loopback or a private network: it has no TLS and no authentication.

use crate::body::{ProxyBody, full};
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Admin {
    tcp: TcpListener,
    pub local_addr: SocketAddr,
}

impl Admin {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Admin> {
        let tcp = TcpListener::bind(addr).await?;
        let local_addr = tcp.local_addr()?;
        Ok(Admin { tcp, local_addr })
    }

    /// Serve until the task is dropped. `draining` true turns `/readyz` to 503.
    pub async fn run(self, metrics: Metrics, draining: watch::Receiver<bool>) {
        let log = LogLimiter::new(std::time::Duration::from_secs(10), 5);
        loop {
            let (sock, _) = match self.tcp.accept().await {
                Ok(a) => a,
                Err(e) => {
                    if let Some(suppressed) = log.allow() {
                        tracing::warn!(error = %e, suppressed_since_last = suppressed, "admin accept failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            let draining = draining.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = answer(&req, &metrics, *draining.borrow());
                    async move { Ok::<_, Infallible>(resp) }
                });
                // Scrapers send small requests: a client that trickles one is dropped.
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    }
}

fn answer(req: &Request<Incoming>, metrics: &Metrics, draining: bool) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics.encode(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if draining => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining\n".into(),
            "text/plain",
        ),
        "/readyz" => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: /metrics /healthz /readyz\n".into(),
            "text/plain",
        ),
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
