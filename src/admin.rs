//! The plaintext admin listener: `/metrics` (Prometheus text), `/healthz` (the process is up),
//! `/readyz` (503 once draining), `POST /reload` (asks `Server::run` to reload; a bearer token
//! from `admin.token_file` when set). Reads `metrics`; nothing else depends on it. Bind it to
//! loopback or a private network: it has no TLS.

use crate::body::{ProxyBody, full};
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::reload::{ReloadError, ReloadHandle};
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    pub async fn run(
        self,
        metrics: Metrics,
        draining: watch::Receiver<bool>,
        reload: Option<ReloadHandle>,
        token_file: Option<PathBuf>,
    ) {
        let token_file = Arc::new(token_file);
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
            let reload = reload.clone();
            let token_file = token_file.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let immediate = (req.uri().path() != "/reload")
                        .then(|| answer(&req, &metrics, *draining.borrow()));
                    let (reload, token_file) = (reload.clone(), token_file.clone());
                    async move {
                        Ok::<_, Infallible>(match immediate {
                            Some(resp) => resp,
                            None => {
                                answer_reload(&req, reload, token_file.as_ref().as_deref()).await
                            }
                        })
                    }
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
            "endpoints: /metrics /healthz /readyz, POST /reload\n".into(),
            "text/plain",
        ),
    }
}

/// `POST /reload`: 200 with what is now served; 401 without the right bearer token; 409
/// without a config file; 422 with the reason when the new config is rejected (the old one
/// keeps serving).
async fn answer_reload(
    req: &Request<Incoming>,
    reload: Option<ReloadHandle>,
    token_file: Option<&Path>,
) -> Response<ProxyBody> {
    if req.method() != Method::POST {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST\n".into(),
            "text/plain",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    if let Some(path) = token_file {
        // Read per request: a rotated token applies at once, and no copy stays in memory.
        let expected = match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            Ok(_) | Err(_) => {
                tracing::error!(file = %path.display(), "admin.token_file is unreadable or empty; refusing /reload");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "admin.token_file is unreadable or empty\n".into(),
                    "text/plain",
                );
            }
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .unwrap_or("");
        // Digests, compared in constant time: nothing about the token, not even its length,
        // shows in the timing.
        let digest = |t: &str| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, t.as_bytes());
        let ok = aws_lc_rs::constant_time::verify_slices_are_equal(
            digest(given).as_ref(),
            digest(&expected).as_ref(),
        )
        .is_ok();
        if !ok {
            tracing::warn!("POST /reload refused: missing or wrong bearer token");
        }
        if !ok {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required\n".into(),
                "text/plain",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    let Some(reload) = reload else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "reload is not available\n".into(),
            "text/plain",
        );
    };
    match reload.reload().await {
        Ok(summary) => text(
            StatusCode::OK,
            format!("reloaded: {summary}\n"),
            "text/plain",
        ),
        Err(e @ ReloadError::NoConfigFile) => {
            text(StatusCode::CONFLICT, format!("{e}\n"), "text/plain")
        }
        Err(e @ ReloadError::ShuttingDown) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}\n"),
            "text/plain",
        ),
        Err(e) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload rejected, previous config still serving: {e}\n"),
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
