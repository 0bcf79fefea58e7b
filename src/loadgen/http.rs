//! loadgen: HTTP over an established connection (connect → **HTTP** → stats): hyper's
//! client connection, HTTP/2 or HTTP/1.1 by the negotiated ALPN, one request template, and
//! the exchange (send, read the whole response body, count its bytes).

use super::connect::NegotiatedAlpn;
use super::failure::Failure;
use super::options::{Alpn, Options};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

/// The HTTP version spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

impl Proto {
    /// By ALPN; with none negotiated, what `--alpn` asked for (prior knowledge), else HTTP/1.1.
    pub fn choose(negotiated: NegotiatedAlpn, asked: Option<Alpn>) -> Proto {
        match (negotiated, asked) {
            (NegotiatedAlpn::H2, _) => Proto::H2,
            (NegotiatedAlpn::None, Some(Alpn::H2)) => Proto::H2,
            _ => Proto::H1,
        }
    }
}

/// Sends requests on one connection.
pub enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// Drives the connection's I/O; must be polled (awaited or spawned) while requests run.
pub type Driver = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// One response: its status and body size.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: StatusCode,
    pub body_bytes: u64,
}

/// The HTTP client handshake (for HTTP/2: preface and SETTINGS).
pub async fn handshake<S>(io: S, proto: Proto) -> Result<(Sender, Driver), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    match proto {
        Proto::H1 => {
            let (send, conn) = http1::handshake(io).await.map_err(Failure::http)?;
            Ok((Sender::H1(send), Box::pin(conn)))
        }
        Proto::H2 => {
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(Failure::http)?;
            Ok((Sender::H2(send), Box::pin(conn)))
        }
    }
}

impl Sender {
    /// Another handle on the same connection (HTTP/2 only: HTTP/1.1 has one request in flight).
    pub fn try_clone(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }

    /// Whether the connection may still take requests.
    pub fn is_open(&self) -> bool {
        match self {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        }
    }

    /// Wait until the connection can take a request; an error means it is gone.
    pub async fn ready(&mut self) -> Result<(), Failure> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
        .map_err(Failure::http)
    }

    /// Send `req` and read the whole response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Answer, Failure> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.map_err(Failure::http)?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(Failure::http)?;
                s.send_request(req).await
            }
        }
        .map_err(Failure::unanswered)?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut body_bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.map_err(Failure::http)?.data_ref() {
                body_bytes += data.len() as u64;
            }
        }
        Ok(Answer { status, body_bytes })
    }
}

/// Send one request on a connection nobody else uses, driving the connection in this task
/// (no spawn per handshake-mode connection). Returns the answer and the driver, to be
/// `close`d once the answer is recorded.
pub async fn exchange_once(
    mut sender: Sender,
    mut driver: Driver,
    req: Request<Full<Bytes>>,
) -> Result<(Answer, Driver), Failure> {
    let answer = {
        let mut send = std::pin::pin!(sender.send(req));
        tokio::select! {
            answer = &mut send => answer?,
            ended = &mut driver => {
                // The connection ended; a response it delivered whole may still be waiting to
                // be read from its channel.
                let answer = send.await;
                return match (answer, ended) {
                    (Ok(a), _) => Ok((a, Box::pin(std::future::ready(Ok(()))))),
                    (Err(_), Err(e)) => Err(Failure::http(e)),
                    (Err(_), Ok(())) => Err(Failure::closed_early()),
                };
            }
        }
    };
    // Dropping the sender tells hyper we are done: HTTP/1.1 (Connection: close) and HTTP/2
    // (GOAWAY) then close the connection, which sends close_notify and FIN.
    drop(sender);
    Ok((answer, driver))
}

/// Let a connection whose senders are gone close cleanly, for at most `limit`.
pub async fn close(driver: Driver, limit: std::time::Duration) {
    let _ = tokio::time::timeout(limit, driver).await;
}

/// The request every attempt sends.
pub struct RequestTemplate {
    method: http::Method,
    /// `https://authority/path` for HTTP/2 (`:scheme`, `:authority`, `:path`).
    absolute: http::Uri,
    /// `/path` for HTTP/1.1, with a Host header.
    origin: http::Uri,
    host: http::HeaderValue,
    body: Bytes,
}

const USER_AGENT: &str = concat!("ephemera-loadgen/", env!("CARGO_PKG_VERSION"));

impl RequestTemplate {
    pub fn new(opts: &Options) -> RequestTemplate {
        let t = &opts.target;
        let absolute = http::Uri::builder()
            .scheme("https")
            .authority(t.authority.clone())
            .path_and_query(t.path.clone())
            .build()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        let origin = http::Uri::from(t.path.clone());
        // An Authority is always a valid header value (checked by the URI parser).
        let host = http::HeaderValue::from_str(t.authority.as_str())
            .unwrap_or_else(|_| http::HeaderValue::from_static("localhost"));
        RequestTemplate {
            method: opts.method.clone(),
            absolute,
            origin,
            host,
            body: Bytes::from(vec![0u8; opts.body_size]),
        }
    }

    /// Safe to send again when a connection closed around it (RFC 9110 §9.2.2).
    pub fn idempotent(&self) -> bool {
        use http::Method;
        [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ]
        .contains(&self.method)
    }

    /// A request for `proto`; `close` asks an HTTP/1.1 server to close after answering.
    pub fn build(&self, proto: Proto, close: bool) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        req.headers_mut().insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(USER_AGENT),
        );
        match proto {
            Proto::H2 => {
                *req.uri_mut() = self.absolute.clone();
                *req.version_mut() = http::Version::HTTP_2;
            }
            Proto::H1 => {
                *req.uri_mut() = self.origin.clone();
                let headers = req.headers_mut();
                headers.insert(http::header::HOST, self.host.clone());
                if close {
                    headers.insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
            }
        }
        req
    }
}
