//! WebSocket through the proxy to an HTTP/1.1 echo backend: over HTTP/1.1 (Upgrade) and over
//! HTTP/2 (RFC 8441 extended CONNECT, which the proxy turns into an HTTP/1.1 Upgrade), text and
//! binary messages of many sizes compared byte for byte, ping/pong, the close handshake, forced
//! TLS KeyUpdates mid-stream, and plain requests on the same route. A control test runs the
//! same clients against the backend through a byte-copying TLS relay instead of the proxy, so
//! a failure through the proxy points at the proxy.

mod common;
use common::*;
#[path = "support/tls_relay.rs"]
mod tls_relay;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Every test finishes within this or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const KIB: usize = 1024;

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("test timed out after {TEST_TIMEOUT:?}"))
}

// ---------- backend: WebSocket echo on /echo, plain answers elsewhere ----------

/// One line per request the backend received: `METHOD PATH VERSION upgrade=… key=yes|no
/// ws_version=…` (what the proxy made of the client's request).
type Seen = Arc<Mutex<Vec<String>>>;

#[derive(Clone, Copy)]
enum BackendProtocol {
    /// What the proxy talks to: HTTP/1.1 with upgrades.
    Http1,
    /// Only for the control test: HTTP/2 with extended CONNECT enabled, so the H2 client can
    /// be checked without the proxy.
    H2,
}

async fn start_ws_backend(protocol: BackendProtocol) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| ws_backend(req, log.clone()));
                let io = TokioIo::new(sock);
                let _ = match protocol {
                    BackendProtocol::Http1 => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await
                    }
                    BackendProtocol::H2 => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .enable_connect_protocol()
                            .serve_connection(io, svc)
                            .await
                    }
                };
            });
        }
    });
    (addr, seen)
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn text_response(status: StatusCode, body: String) -> Response<TestBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

async fn ws_backend(req: Request<Incoming>, seen: Seen) -> Result<Response<TestBody>, Infallible> {
    let ws_version = header(&req, "sec-websocket-version").to_string();
    let key = header(&req, "sec-websocket-key").to_string();
    seen.lock().unwrap().push(format!(
        "{} {} {:?} upgrade={} key={} ws_version={}",
        req.method(),
        req.uri().path(),
        req.version(),
        header(&req, "upgrade"),
        if key.is_empty() { "no" } else { "yes" },
        ws_version
    ));
    let h1_upgrade = header(&req, "upgrade").eq_ignore_ascii_case("websocket")
        && header(&req, "connection")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let h2_connect = req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<Protocol>()
            .is_some_and(|p| p.as_str() == "websocket");
    if !h1_upgrade && !h2_connect {
        let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
        let line = seen.lock().unwrap().last().unwrap().clone();
        let mut resp = text_response(StatusCode::OK, format!("plain {line} bytes={body:?}"));
        // What the backend saw, where a CONNECT's 200 (no body for the client) can show it.
        resp.headers_mut()
            .insert("x-plain-answer", line.parse().unwrap());
        return Ok(resp);
    }
    if req.uri().path() != "/echo" {
        return Ok(text_response(
            StatusCode::NOT_FOUND,
            "no such socket".into(),
        ));
    }
    if ws_version != "13" || (h1_upgrade && key.is_empty()) {
        return Ok(text_response(
            StatusCode::BAD_REQUEST,
            format!("bad websocket request: version={ws_version:?} key={key:?}"),
        ));
    }
    let resp = if h1_upgrade {
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(empty())
            .unwrap()
    } else {
        Response::new(empty())
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                echo(ws).await;
            }
            Err(e) => eprintln!("backend: upgrade failed: {e}"),
        }
    });
    Ok(resp)
}

/// Echo every text and binary message until the client closes (tungstenite answers pings and
/// the close frame itself).
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

// ---------- clients ----------

/// WebSocket over HTTP/1.1 (`Upgrade: websocket`) on `io` to `/echo`.
async fn ws_over_h1<S>(io: S, url: &str) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio_tungstenite::client_async(url, io).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
            ws
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => panic!(
            "HTTP/1.1 WebSocket handshake answered {}: {}",
            resp.status(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
        ),
        Err(e) => panic!("HTTP/1.1 WebSocket handshake failed: {e}"),
    }
}

/// HTTP/2 connection on `io`; returns the request handle (for more requests on the same
/// connection) and a WebSocket opened with an RFC 8441 extended CONNECT to `/echo`.
async fn ws_over_h2<S>(io: S) -> (HttpClient, WebSocketStream<TokioIo<Upgraded>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut client = HttpClient::over(io, true).await;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("https://localhost/echo")
        .header("sec-websocket-version", "13")
        .body(empty())
        .unwrap();
    req.extensions_mut()
        .insert(Protocol::from_static("websocket"));
    let resp = client
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("extended CONNECT failed: {e:?}"));
    if let Some(seen) = resp.headers().get("x-plain-answer") {
        panic!(
            "extended CONNECT reached the backend as a plain request, not an Upgrade: the \
             backend saw {seen:?} and answered {}",
            resp.status()
        );
    }
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        panic!("extended CONNECT answered {status}: {body:?}");
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .unwrap_or_else(|e| panic!("extended CONNECT: no upgraded stream: {e}"));
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    (client, ws)
}

// ---------- what goes over the socket ----------

/// Message `i` of `n` payload bytes: text (printable ASCII) for even `i`, binary otherwise.
fn message(i: usize, n: usize) -> Message {
    if i.is_multiple_of(2) {
        let text: String = (0..n)
            .map(|j| (b'a' + ((i + j) % 26) as u8) as char)
            .collect();
        Message::text(text)
    } else {
        Message::binary(pattern(i * 7919, n))
    }
}

fn describe(m: &Message) -> String {
    match m {
        Message::Text(t) => format!("text of {} bytes", t.len()),
        Message::Binary(b) => format!("binary of {} bytes", b.len()),
        other => format!("{other:?}"),
    }
}

/// Sends `sizes.len()` messages while reading their echoes concurrently (full duplex), checks
/// each echo byte for byte, then a ping/pong; returns the payload bytes sent.
async fn exchange<S>(ws: WebSocketStream<S>, sizes: &[usize]) -> (WebSocketStream<S>, usize)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let send = async {
        for (i, &n) in sizes.iter().enumerate() {
            tx.send(message(i, n))
                .await
                .unwrap_or_else(|e| panic!("sending message {i} ({n} bytes): {e}"));
        }
    };
    let receive = async {
        for (i, &n) in sizes.iter().enumerate() {
            let got = match rx.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => panic!("reading echo {i} ({n} bytes): {e}"),
                None => panic!("connection ended before echo {i} ({n} bytes)"),
            };
            let want = message(i, n);
            assert!(
                got == want,
                "echo {i}: got {}, want {}",
                describe(&got),
                describe(&want)
            );
        }
    };
    tokio::join!(send, receive);
    let mut ws = tx.reunite(rx).unwrap();

    let ping = Bytes::from_static(b"are you there?");
    ws.send(Message::Ping(ping.clone())).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Pong(p))) => assert_eq!(p, ping),
        other => panic!("expected the pong, got {other:?}"),
    }
    (ws, sizes.iter().sum())
}

/// Sends each message and waits for its echo before the next (interactive traffic: data
/// alternates direction); returns the payload bytes sent.
async fn exchange_lockstep<S>(ws: &mut WebSocketStream<S>, sizes: &[usize]) -> usize
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for (i, &n) in sizes.iter().enumerate() {
        let want = message(i, n);
        ws.send(want.clone())
            .await
            .unwrap_or_else(|e| panic!("sending message {i} ({n} bytes): {e}"));
        let got = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => panic!("reading echo {i} ({n} bytes): {e}"),
            None => panic!("connection ended before echo {i} ({n} bytes)"),
        };
        assert!(
            got == want,
            "echo {i}: got {}, want {}",
            describe(&got),
            describe(&want)
        );
    }
    sizes.iter().sum()
}

/// Client-initiated close: the backend's close frame must come back, then the end.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    ws.close(None).await.unwrap();
    let mut saw_close = false;
    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Close(_)) => saw_close = true,
            Ok(other) => panic!("after our close: unexpected {}", describe(&other)),
            Err(e) => panic!("after our close (saw_close={saw_close}): {e}"),
        }
    }
    assert!(saw_close, "the backend's close frame never arrived");
}

/// Frame-size edge cases (125/126, 65535/65536 length encodings) and large messages, about
/// 1 MiB in all.
const SIZES: &[usize] = &[
    0, 1, 125, 126, 127, 1000, 65535, 65536, 65537, 16387, 300_000, 500_000,
];

/// 64 messages of 64–127 KiB: about 6 MiB each way.
fn bulk_sizes() -> Vec<usize> {
    (0..64)
        .map(|i| 64 * KIB + (i * 1031) % (64 * KIB))
        .collect()
}

// ---------- through the proxy ----------

/// The proxy (HTTP/1.1 upstream `app`, every path) in front of a fresh echo backend.
async fn ws_proxy(extra_tls: &str) -> (Certs, Proxy, Seen) {
    let certs = Certs::new(&["localhost"]);
    let (backend, seen) = start_ws_backend(BackendProtocol::Http1).await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), extra_tls, "", "")).await;
    (certs, proxy, seen)
}

async fn connect_tls(
    addr: SocketAddr,
    certs: &Certs,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tls = tls_connect(addr, "localhost", client_config(&certs.ca_der(), &[alpn]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls
}

const KEY_UPDATE_64KIB: &str = "      key_update: { max_bytes: 64KiB }\n";

async fn assert_key_updates(proxy: &Proxy, at_least: f64) {
    let m = proxy.metrics().await;
    let updates = metric(
        &m,
        "ephemera_tls_key_updates_total",
        &["listener=\"public\"", "trigger=\"bytes\""],
    );
    let deferred = metric(
        &m,
        "ephemera_tls_key_updates_deferred_total",
        &["listener=\"public\""],
    );
    assert!(
        updates >= at_least,
        "forced KeyUpdates: {updates} (deferred: {deferred}), expected at least {at_least}"
    );
    assert_eq!(
        metric(&m, "ephemera_tls_key_update_failures_total", &[]),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn websocket_over_http1_echoes_text_and_binary() {
    bounded(async {
        let (certs, proxy, seen) = ws_proxy("").await;
        let tls = connect_tls(proxy.addr, &certs, b"http/1.1").await;
        let ws = ws_over_h1(tls, "wss://localhost/echo").await;
        let (ws, sent) = exchange(ws, SIZES).await;
        assert!(sent > 900 * KIB);
        close(ws).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            ["GET /echo HTTP/1.1 upgrade=websocket key=yes ws_version=13"]
        );
    })
    .await;
}

#[tokio::test]
async fn websocket_over_http1_survives_forced_key_updates() {
    let _serial = serial().await;
    bounded(async {
        let (certs, proxy, _) = ws_proxy(KEY_UPDATE_64KIB).await;
        let tls = connect_tls(proxy.addr, &certs, b"http/1.1").await;
        let mut ws = ws_over_h1(tls, "wss://localhost/echo").await;
        // Interactive traffic, about 6 MiB each way in 64 KiB steps: ~190 updates are due, and
        // data alternates direction, so the 31-in-a-row rule never has to hold one back.
        let sent = exchange_lockstep(&mut ws, &bulk_sizes()).await;
        assert!(sent > 5 * 1024 * KIB);
        assert_key_updates(&proxy, 48.0).await;
        // A full-duplex burst across more updates, then the edge sizes: still intact.
        let (ws, _) = exchange(ws, &bulk_sizes()).await;
        let (ws, _) = exchange(ws, SIZES).await;
        close(ws).await;
    })
    .await;
}

#[tokio::test]
async fn websocket_over_h2_extended_connect_echoes() {
    bounded(async {
        let (certs, proxy, seen) = ws_proxy("").await;
        let tls = connect_tls(proxy.addr, &certs, b"h2").await;
        let (mut client, ws) = ws_over_h2(tls).await;
        let (ws, sent) = exchange(ws, SIZES).await;
        assert!(sent > 900 * KIB);
        // Other streams on the same HTTP/2 connection work while the WebSocket is open.
        let (status, _, body) = client.get("/other").await;
        assert_eq!(status, 200, "{body:?}");
        close(ws).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.first().map(String::as_str),
            Some("GET /echo HTTP/1.1 upgrade=websocket key=yes ws_version=13"),
            "the backend gets an HTTP/1.1 Upgrade: {seen:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn websocket_over_h2_survives_forced_key_updates() {
    let _serial = serial().await;
    bounded(async {
        let (certs, proxy, _) = ws_proxy(KEY_UPDATE_64KIB).await;
        let tls = connect_tls(proxy.addr, &certs, b"h2").await;
        let (_client, mut ws) = ws_over_h2(tls).await;
        exchange_lockstep(&mut ws, &bulk_sizes()).await;
        assert_key_updates(&proxy, 48.0).await;
        let (ws, _) = exchange(ws, &bulk_sizes()).await;
        let (ws, _) = exchange(ws, SIZES).await;
        close(ws).await;
    })
    .await;
}

#[tokio::test]
async fn plain_requests_on_the_websocket_route_still_work() {
    bounded(async {
        let (certs, proxy, _) = ws_proxy("").await;
        for h2 in [false, true] {
            let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
            let (status, _, body) = c.get("/echo").await;
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "h2={h2}: {body}");
            assert!(
                body.starts_with("plain GET /echo HTTP/1.1 upgrade= key=no"),
                "h2={h2}: {body}"
            );
            let resp = c
                .send(request("POST", "/echo", pattern_body(100 * KIB)))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "h2={h2}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body);
            assert!(
                body.starts_with("plain POST /echo") && body.ends_with("bytes=Ok(102400)"),
                "h2={h2}: {body}"
            );
        }
    })
    .await;
}

// ---------- control: the same clients without the proxy ----------

#[tokio::test]
async fn control_clients_work_without_the_proxy() {
    bounded(async {
        let certs = Certs::new(&["localhost"]);

        // HTTP/1.1 Upgrade, through a TLS relay to the backend the proxy uses.
        let (backend, seen) = start_ws_backend(BackendProtocol::Http1).await;
        let relay = tls_relay::start_tls_relay(&certs, b"http/1.1", backend).await;
        let tls = connect_tls(relay, &certs, b"http/1.1").await;
        let ws = ws_over_h1(tls, "wss://localhost/echo").await;
        let (ws, _) = exchange(ws, &bulk_sizes()).await;
        let (ws, _) = exchange(ws, SIZES).await;
        close(ws).await;
        let tls = connect_tls(relay, &certs, b"http/1.1").await;
        let mut c = HttpClient::over(tls, false).await;
        let (status, _, body) = c.get("/echo").await;
        assert_eq!(status, 200);
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("plain GET /echo HTTP/1.1 upgrade= key=no"),
            "{body}"
        );
        assert_eq!(
            seen.lock().unwrap()[0],
            "GET /echo HTTP/1.1 upgrade=websocket key=yes ws_version=13"
        );

        // RFC 8441 extended CONNECT, through a TLS relay to the same handler served over
        // HTTP/2 with extended CONNECT enabled.
        let (backend, seen) = start_ws_backend(BackendProtocol::H2).await;
        let relay = tls_relay::start_tls_relay(&certs, b"h2", backend).await;
        let tls = connect_tls(relay, &certs, b"h2").await;
        let (mut client, ws) = ws_over_h2(tls).await;
        let (ws, _) = exchange(ws, &bulk_sizes()).await;
        let (ws, _) = exchange(ws, SIZES).await;
        let (status, _, _) = client.get("/other").await;
        assert_eq!(status, 200);
        close(ws).await;
        assert_eq!(
            seen.lock().unwrap()[0],
            "CONNECT /echo HTTP/2.0 upgrade= key=no ws_version=13"
        );
    })
    .await;
}

// ---------- refusals and shutdown ----------

fn extended_connect() -> Request<TestBody> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("https://localhost/echo")
        .header("sec-websocket-version", "13")
        .body(empty())
        .unwrap();
    req.extensions_mut()
        .insert(Protocol::from_static("websocket"));
    req
}

#[tokio::test]
async fn extended_connect_to_a_fixed_response_route_is_501_not_a_dead_tunnel() {
    bounded(async {
        let certs = Certs::new(&["localhost"]);
        let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
        let tls = connect_tls(proxy.addr, &certs, b"h2").await;
        let mut client = HttpClient::over(tls, true).await;
        let resp = client.send(extended_connect()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
        // Plain CONNECT is refused outright, with Allow.
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("https://localhost/")
            .body(empty())
            .unwrap();
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(resp.headers().contains_key("allow"));
    })
    .await;
}

/// A backend that answers every request with a 101 that is not a WebSocket handshake.
async fn start_bogus_101_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    let mut r = Response::new(empty());
                    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    r.headers_mut()
                        .insert("upgrade", "not-websocket".parse().unwrap());
                    r.headers_mut()
                        .insert("connection", "upgrade".parse().unwrap());
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_backend_101_that_is_not_a_websocket_handshake_is_502() {
    bounded(async {
        let certs = Certs::new(&["localhost"]);
        let backend = start_bogus_101_backend().await;
        let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
        let tls = connect_tls(proxy.addr, &certs, b"h2").await;
        let mut client = HttpClient::over(tls, true).await;
        let resp = client.send(extended_connect()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);

        let tls = connect_tls(proxy.addr, &certs, b"http/1.1").await;
        let mut client = HttpClient::over(tls, false).await;
        let req = Request::builder()
            .uri("/echo")
            .header("host", "localhost")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(empty())
            .unwrap();
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    })
    .await;
}

#[tokio::test]
async fn open_websockets_are_closed_at_shutdown_not_after_the_grace() {
    bounded(async {
        let (certs, proxy, _) = ws_proxy("").await;
        let tls = connect_tls(proxy.addr, &certs, b"http/1.1").await;
        let ws = ws_over_h1(tls, "wss://localhost/echo").await;
        let (mut ws, _) = exchange(ws, &[10, 1000]).await;
        let started = std::time::Instant::now();
        proxy.stop();
        // shutdown_grace is 5 s in the test config; the relay must not wait for it.
        let end = tokio::time::timeout(Duration::from_secs(4), ws.next()).await;
        assert!(
            matches!(end, Ok(None) | Ok(Some(Err(_)))),
            "the WebSocket was still open {:?} after shutdown began: {end:?}",
            started.elapsed()
        );
    })
    .await;
}
