//! Backend faults (issue 7): a backend that refuses, never answers, answers malformed, cuts a
//! response body short, or closes keep-alive connections while the proxy reuses them. For
//! each, over HTTP/1.1 and HTTP/2 clients and `http1` and `h2c` upstreams: the client gets
//! 502/504, or a body that visibly fails (never one that looks complete); the fault is
//! counted in `ephemera_upstream_errors_total` under its kind and under no other; the proxy
//! keeps serving; gauges and descriptors settle. Backends are raw sockets scripted byte by
//! byte (tests/common/raw_backend.rs, HTTP/2 frames from tests/common/h2frames.rs).
//!
//! Every test holds `serial()`: descriptor counts are per process.

mod common;
#[path = "common/h2frames.rs"]
mod h2frames;

use common::raw_backend::{self, BlackHole, RawBackend, read_request};
use common::*;
use h2frames::{code, flag, hpack, kind};
use http_body_util::BodyExt;
use hyper::Response;
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The length a cut-short response announces, and how much of it the backend sends.
const FULL: usize = 1000;
const SENT: usize = 300;

/// HTTP/1.1, then HTTP/2 clients (the `h2` flag of `HttpClient::connect`).
const CLIENTS: [bool; 2] = [false, true];

fn client_name(h2: bool) -> &'static str {
    if h2 {
        "HTTP/2 client"
    } else {
        "HTTP/1.1 client"
    }
}

// ---------- the proxy under test ----------

struct Fixture {
    certs: Certs,
    proxy: Proxy,
    fd_baseline: usize,
}

impl Fixture {
    /// The proxy with two upstreams: `app` (`protocol`, the one faulty `server`, short
    /// timeouts) for every path except `/healthy`, which goes to a well-behaved backend.
    async fn start(protocol: &str, server: SocketAddr) -> Fixture {
        let certs = Certs::new(&["localhost"]);
        let good = start_backend().await;
        let base = config_yaml(&certs, None, "", "", "");
        let builtin = "      - { host: \"*\", path_prefix: /, respond: { status: 200 } }\n";
        assert!(base.contains(builtin), "{base}");
        let routes = "      - { host: \"*\", path_prefix: /healthy, upstream: good }\n      - { host: \"*\", path_prefix: /, upstream: app }\n";
        let yaml = base.replace(builtin, routes)
            + &format!(
                "upstreams:\n  app:\n    protocol: {protocol}\n    servers: [{server}]\n    connect_timeout: 300ms\n    response_timeout: 1s\n    read_timeout: 1s\n  good:\n    protocol: http1\n    servers: [{good}]\n"
            );
        let proxy = Proxy::start(&yaml).await;
        let fd_baseline = open_fds();
        Fixture {
            certs,
            proxy,
            fd_baseline,
        }
    }

    async fn client(&self, h2: bool) -> HttpClient {
        HttpClient::connect(self.proxy.addr, &self.certs.ca_der(), h2).await
    }

    /// `ephemera_upstream_errors_total` of upstream `app`, by kind.
    async fn errors(&self) -> BTreeMap<String, f64> {
        let text = self.proxy.metrics().await;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("ephemera_upstream_errors_total{") else {
                continue;
            };
            if !rest.contains("upstream=\"app\"") {
                continue;
            }
            let kind = rest
                .split("kind=\"")
                .nth(1)
                .and_then(|k| k.split('"').next())
                .unwrap_or("?");
            let value = line.rsplit(' ').next().and_then(|v| v.parse().ok());
            out.insert(kind.to_string(), value.unwrap_or(f64::NAN));
        }
        out
    }

    /// Sends `method /` on `client`; asserts the status and exactly these changes to the
    /// upstream error counts.
    async fn expect_counted(
        &self,
        client: &mut HttpClient,
        method: &str,
        status: u16,
        counted: &[(&str, f64)],
        what: &str,
    ) {
        let before = self.errors().await;
        let (got, _) = answer(client, method, "/").await;
        assert_eq!(got, status, "{what}: {method}");
        assert_counted(&before, &self.errors().await, counted, what);
    }

    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric(&self.proxy.metrics().await, name, labels)
    }

    async fn retries_unanswered(&self) -> f64 {
        self.metric(
            "ephemera_upstream_retries_total",
            &["upstream=\"app\"", "reason=\"unanswered\""],
        )
        .await
    }

    /// Waits (up to 5 s) until the proxy holds no connection to `app`: it noticed that the
    /// backend closed it, or closed it itself after a fault.
    async fn await_app_connections_closed(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let open = self
                .metric("ephemera_upstream_connections_open", &["upstream=\"app\""])
                .await;
            if open == 0.0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy still holds {open} connection(s) to the backend after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The proxy keeps serving: `client` (if its connection is meant to be alive) and a new
    /// client of the same protocol get `/healthy` from the good backend.
    async fn still_serves(&self, client: Option<&mut HttpClient>, h2: bool, what: &str) {
        if let Some(c) = client {
            let (status, _, body) = c.get("/healthy").await;
            assert_eq!(
                (status, String::from_utf8_lossy(&body)),
                (200, "backend ok".into()),
                "{what}: same client afterwards"
            );
        }
        let mut fresh = self.client(h2).await;
        let (status, _, body) = fresh.get("/healthy").await;
        assert_eq!(
            (status, String::from_utf8_lossy(&body)),
            (200, "backend ok".into()),
            "{what}: new client afterwards"
        );
    }

    /// Gauges back to 0 and descriptors back to the baseline; then the proxy stops (so its
    /// descriptors are gone before the next fixture counts its own).
    async fn finish(mut self) {
        self.proxy
            .assert_settled(self.fd_baseline, Duration::from_secs(10))
            .await;
        self.proxy.stop();
        tokio::time::timeout(Duration::from_secs(10), &mut self.proxy.task)
            .await
            .expect("the proxy stopped")
            .expect("the proxy task did not panic");
    }
}

/// Asserts that between `before` and `after` exactly the `expected` counts were added, and
/// nothing under any other kind.
fn assert_counted(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    expected: &[(&str, f64)],
    what: &str,
) {
    let mut delta: BTreeMap<&str, f64> = BTreeMap::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d != 0.0 {
            delta.insert(k, d);
        }
    }
    let want: BTreeMap<&str, f64> = expected.iter().copied().collect();
    assert_eq!(
        delta, want,
        "{what}: ephemera_upstream_errors_total{{upstream=\"app\"}} changes by kind (after: {after:?})"
    );
}

// ---------- the client's side ----------

/// GET (no body) or POST (a small body) `path`; an answer must come within 10 s.
async fn send(client: &mut HttpClient, method: &str, path: &str) -> Response<Incoming> {
    let body = if method == "POST" {
        full("payload")
    } else {
        empty()
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        client.send(request(method, path, body)),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {path}: no response within 10 s"))
    .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"))
}

/// Status and whole body (which must end within 10 s).
async fn answer(client: &mut HttpClient, method: &str, path: &str) -> (u16, String) {
    let resp = send(client, method, path).await;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body within 10 s")
        .expect("body complete")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The HTTP/2 error code in `e`'s chain of causes.
fn h2_reason(e: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<h2::Error>() {
            return h.reason();
        }
        cur = err.source();
    }
    None
}

/// The kind of the I/O error in `e`'s chain of causes.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = err.source();
    }
    None
}

/// Asserts that a response the backend cut short is seen cut short: its head (200) came,
/// then its body failed before the end. Over HTTP/1.1 the connection closes without the
/// rest (the announced Content-Length, if any, is kept so the client can tell; otherwise
/// chunked without its last chunk); over HTTP/2 the stream is reset with INTERNAL_ERROR.
/// An `Ok` end of body fails the test: a truncated body must never look complete.
async fn assert_truncated(
    resp: Response<Incoming>,
    h2: bool,
    announced: Option<usize>,
    what: &str,
) {
    assert_eq!(resp.status(), 200, "{what}");
    let length = resp
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
    assert_eq!(length, announced, "{what}: Content-Length to the client");
    if !h2 && announced.is_none() {
        assert_eq!(
            resp.headers()
                .get("transfer-encoding")
                .map(|v| v.to_str().unwrap()),
            Some("chunked"),
            "{what}"
        );
    }
    let mut body = resp.into_body();
    let mut got = 0;
    let err = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap_or_else(|_| panic!("{what}: the body hung after {got} bytes"));
        match frame {
            Some(Ok(f)) => got += f.data_ref().map_or(0, |d| d.len()),
            Some(Err(e)) => break e,
            None => panic!(
                "{what}: the body ended cleanly after {got} of {FULL} bytes: a truncated response looked complete"
            ),
        }
    };
    assert!(
        got <= SENT,
        "{what}: {got} bytes arrived, the backend sent {SENT}"
    );
    if h2 {
        assert_eq!(
            h2_reason(&err),
            Some(h2::Reason::INTERNAL_ERROR),
            "{what}: the client's stream must be reset with INTERNAL_ERROR: {err:?}"
        );
    } else {
        assert!(
            io_kind(&err) == Some(std::io::ErrorKind::UnexpectedEof),
            "{what}: the connection must close before the body's end: {err:?}"
        );
    }
}

// ---------- scripted backends ----------

/// How a backend ends a connection.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// FIN (then it waits for the proxy to close its end).
    Fin,
    /// RST (SO_LINGER 0).
    Reset,
}

async fn cut(sock: TcpStream, how: Cut) {
    match how {
        Cut::Fin => raw_backend::close(sock).await,
        Cut::Reset => raw_backend::reset(sock),
    }
}

/// Waits for the test's go-ahead (given once the client has the response head), so that a
/// fault happens after the head reached the client, never before.
async fn go_ahead(go: &Notify) {
    let _ = tokio::time::timeout(Duration::from_secs(10), go.notified()).await;
}

const OK_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nbackend ok";

// HTTP/2: the server's side of a connection, by hand.

/// Reads the client preface and sends our SETTINGS (empty: defaults); false when the proxy
/// went away or sent no preface.
async fn h2_accept(sock: &mut TcpStream) -> bool {
    let mut preface = [0u8; 24];
    if sock.read_exact(&mut preface).await.is_err() || preface != h2frames::PREFACE {
        return false;
    }
    sock.write_all(&h2frames::settings(&[])).await.is_ok()
}

/// Reads frames up to the end of the next request (its HEADERS, which from the proxy are
/// one frame, and any DATA up to END_STREAM) and returns its stream id; acknowledges
/// SETTINGS and answers PINGs on the way. `None` once the connection has ended.
async fn h2_next_request(sock: &mut TcpStream) -> Option<u32> {
    loop {
        let f = h2frames::read_frame(sock).await.ok()??;
        let reply = match f.kind {
            kind::HEADERS | kind::DATA if f.flags & flag::END_STREAM != 0 => {
                return Some(f.stream);
            }
            kind::SETTINGS if f.flags & flag::ACK == 0 => h2frames::settings_ack(),
            kind::PING if f.flags & flag::ACK == 0 => {
                h2frames::frame(kind::PING, flag::ACK, 0, &f.payload)
            }
            _ => continue,
        };
        sock.write_all(&reply).await.ok()?;
    }
}

/// A response HEADERS frame: `:status 200`, and `content-length` when given.
fn h2_head(stream: u32, length: Option<usize>, end_stream: bool) -> Vec<u8> {
    let mut block = Vec::new();
    hpack::indexed(&mut block, 8); // :status 200
    if let Some(n) = length {
        hpack::literal_name_index(&mut block, 28, n.to_string().as_bytes()); // content-length
    }
    h2frames::headers(stream, &block, end_stream, true)
}

fn goaway(last_stream: u32, error: u32) -> Vec<u8> {
    let mut payload = last_stream.to_be_bytes().to_vec();
    payload.extend_from_slice(&error.to_be_bytes());
    h2frames::frame(kind::GOAWAY, 0, 0, &payload)
}

/// Answers one request completely with `backend ok`.
fn h2_ok(stream: u32) -> Vec<u8> {
    let mut out = h2_head(stream, Some(10), false);
    out.extend(h2frames::data(stream, b"backend ok", true));
    out
}

// ---------- refused, black-holed, silent ----------

#[tokio::test]
async fn a_refused_connection_is_a_502_counted_as_connect() {
    let _serial = serial().await;
    for protocol in ["http1", "h2c"] {
        let fx = Fixture::start(protocol, closed_port().await).await;
        for h2 in CLIENTS {
            let what = format!("{protocol} backend refusing, {}", client_name(h2));
            let mut client = fx.client(h2).await;
            for method in ["GET", "POST"] {
                fx.expect_counted(&mut client, method, 502, &[("connect", 1.0)], &what)
                    .await;
            }
            fx.still_serves(Some(&mut client), h2, &what).await;
        }
        fx.finish().await;
    }
}

#[tokio::test]
async fn a_connect_that_hangs_is_a_502_counted_as_connect_timeout() {
    let _serial = serial().await;
    for protocol in ["http1", "h2c"] {
        let hole = BlackHole::start().await;
        let fx = Fixture::start(protocol, hole.addr).await;
        for h2 in CLIENTS {
            let what = format!("{protocol} backend not accepting, {}", client_name(h2));
            let mut client = fx.client(h2).await;
            fx.expect_counted(&mut client, "GET", 502, &[("connect_timeout", 1.0)], &what)
                .await;
            fx.still_serves(Some(&mut client), h2, &what).await;
        }
        fx.finish().await;
    }
}

/// Accepts, reads the request (or, over h2c, completes the HTTP/2 start and reads requests),
/// and never answers.
async fn never_answers(mut sock: TcpStream, h2: bool) {
    if h2 {
        if !h2_accept(&mut sock).await {
            return;
        }
        while h2_next_request(&mut sock).await.is_some() {}
    } else if read_request(&mut sock).await.is_some() {
        raw_backend::drain(&mut sock).await;
    }
}

#[tokio::test]
async fn a_backend_that_never_answers_is_a_504_counted_as_response_timeout() {
    let _serial = serial().await;
    for protocol in ["http1", "h2c"] {
        let h2_backend = protocol == "h2c";
        let backend = RawBackend::start(move |s, _| never_answers(s, h2_backend)).await;
        let fx = Fixture::start(protocol, backend.addr).await;
        for h2 in CLIENTS {
            let what = format!("{protocol} backend never answering, {}", client_name(h2));
            let mut client = fx.client(h2).await;
            fx.expect_counted(&mut client, "GET", 504, &[("response_timeout", 1.0)], &what)
                .await;
            if !h2_backend {
                // An HTTP/1.1 connection with a response still owed cannot be used again.
                fx.await_app_connections_closed().await;
            }
            fx.still_serves(Some(&mut client), h2, &what).await;
        }
        fx.finish().await;
    }
}

/// Accepts and reads, but never starts HTTP/2 (no SETTINGS).
async fn silent(mut sock: TcpStream) {
    raw_backend::drain(&mut sock).await;
}

#[tokio::test]
async fn an_h2c_backend_that_never_sends_settings_is_a_502_counted_as_connect_timeout() {
    let _serial = serial().await;
    let backend = RawBackend::start(|s, _| silent(s)).await;
    let fx = Fixture::start("h2c", backend.addr).await;
    for h2 in CLIENTS {
        let what = format!("h2c backend silent, {}", client_name(h2));
        let mut client = fx.client(h2).await;
        fx.expect_counted(&mut client, "GET", 502, &[("connect_timeout", 1.0)], &what)
            .await;
        fx.still_serves(Some(&mut client), h2, &what).await;
    }
    fx.finish().await;
}

// ---------- malformed responses ----------

/// Answers every request on the connection with `bytes`, then waits for the proxy to close.
async fn h1_answers(mut sock: TcpStream, bytes: &'static [u8]) {
    while read_request(&mut sock).await.is_some() {
        if sock.write_all(bytes).await.is_err() {
            return;
        }
    }
}

/// A malformed answer is not an answer: a GET (bodyless, idempotent) is sent once more,
/// then 502; a POST gets 502 at once. Each attempt counts as `protocol`.
/// With `closes`, the proxy must not keep the backend connection afterwards.
async fn assert_malformed_is_502(fx: &Fixture, what: &str, closes: bool) {
    for h2 in CLIENTS {
        let what = format!("{what}, {}", client_name(h2));
        let mut client = fx.client(h2).await;
        let retries = fx.retries_unanswered().await;
        fx.expect_counted(&mut client, "GET", 502, &[("protocol", 2.0)], &what)
            .await;
        assert_eq!(fx.retries_unanswered().await, retries + 1.0, "{what}");

        fx.expect_counted(&mut client, "POST", 502, &[("protocol", 1.0)], &what)
            .await;
        assert_eq!(fx.retries_unanswered().await, retries + 1.0, "{what}");
        if closes {
            fx.await_app_connections_closed().await;
        }
        fx.still_serves(Some(&mut client), h2, &what).await;
    }
}

#[tokio::test]
async fn a_malformed_http1_response_is_a_502_counted_as_protocol() {
    let _serial = serial().await;
    let cases: [(&str, &'static [u8]); 4] = [
        (
            "bad status line",
            b"HTTP/1.1 2x0 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n"),
        (
            "conflicting lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 5\r\n\r\nok",
        ),
        (
            "space in a header name",
            b"HTTP/1.1 200 OK\r\nbad header: 1\r\ncontent-length: 2\r\n\r\nok",
        ),
    ];
    for (name, bytes) in cases {
        let backend = RawBackend::start(move |s, _| h1_answers(s, bytes)).await;
        let fx = Fixture::start("http1", backend.addr).await;
        assert_malformed_is_502(&fx, &format!("http1 backend: {name}"), true).await;
        fx.finish().await;
    }
}

/// Answers every request with `block` as its response header block (with END_STREAM).
async fn h2_answers(mut sock: TcpStream, block: &'static [u8]) {
    if !h2_accept(&mut sock).await {
        return;
    }
    while let Some(stream) = h2_next_request(&mut sock).await {
        let out = h2frames::headers(stream, block, true, true);
        if sock.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_malformed_h2c_response_is_a_502_counted_as_protocol() {
    let _serial = serial().await;
    let cases: [(&str, &'static [u8]); 3] = [
        // A literal `x-a: 1` (not indexed, new name): no :status at all.
        ("no :status", b"\x00\x03x-a\x011"),
        // :status 200, then `connection: close`, which HTTP/2 forbids (RFC 9113 §8.2.2).
        (
            "connection-specific field",
            b"\x88\x00\x0aconnection\x05close",
        ),
        // An index far past both tables: an HPACK decoding error ends the connection.
        ("undecodable HPACK", b"\xff\xff\xff\x7f"),
    ];
    for (name, block) in cases {
        let backend = RawBackend::start(move |s, _| h2_answers(s, block)).await;
        let fx = Fixture::start("h2c", backend.addr).await;
        // A malformed response is a stream error; undecodable HPACK ends the connection.
        let closes = name == "undecodable HPACK";
        assert_malformed_is_502(&fx, &format!("h2c backend: {name}"), closes).await;
        fx.finish().await;
    }
}

// ---------- bodies cut short ----------

#[derive(Clone, Copy, Debug)]
enum H1BodyFault {
    /// Content-Length 1000, 300 bytes, then the connection ends.
    ShortOfLength(Cut),
    /// Chunked: one 300-byte chunk, then the connection ends without the last chunk.
    NoLastChunk(Cut),
    /// Chunked: one 300-byte chunk, then a chunk-size line that is not hex.
    BadChunkSize,
    /// Content-Length 1000, 300 bytes, then nothing (the connection stays open): cut off at
    /// the upstream's `read_timeout`.
    Silent,
}

async fn h1_body_fault(mut sock: TcpStream, fault: H1BodyFault, go: Arc<Notify>) {
    if read_request(&mut sock).await.is_none() {
        return;
    }
    let part = pattern(0, SENT);
    let mut out = Vec::new();
    match fault {
        H1BodyFault::ShortOfLength(_) | H1BodyFault::Silent => {
            out.extend_from_slice(raw_backend::head_with_length(FULL).as_bytes());
            out.extend_from_slice(&part);
        }
        H1BodyFault::NoLastChunk(_) | H1BodyFault::BadChunkSize => {
            out.extend_from_slice(raw_backend::CHUNKED_HEAD.as_bytes());
            out.extend(raw_backend::chunk(&part));
        }
    }
    if sock.write_all(&out).await.is_err() {
        return;
    }
    go_ahead(&go).await;
    match fault {
        H1BodyFault::ShortOfLength(how) | H1BodyFault::NoLastChunk(how) => cut(sock, how).await,
        H1BodyFault::BadChunkSize => {
            let _ = sock.write_all(b"zz\r\n").await;
            raw_backend::drain(&mut sock).await;
        }
        H1BodyFault::Silent => raw_backend::drain(&mut sock).await,
    }
}

#[tokio::test]
async fn an_http1_body_cut_short_reaches_the_client_visibly_truncated() {
    let _serial = serial().await;
    let faults = [
        H1BodyFault::ShortOfLength(Cut::Fin),
        H1BodyFault::ShortOfLength(Cut::Reset),
        H1BodyFault::NoLastChunk(Cut::Fin),
        H1BodyFault::NoLastChunk(Cut::Reset),
        H1BodyFault::BadChunkSize,
        H1BodyFault::Silent,
    ];
    for fault in faults {
        let go = Arc::new(Notify::new());
        let g = go.clone();
        let backend = RawBackend::start(move |s, _| h1_body_fault(s, fault, g.clone())).await;
        let fx = Fixture::start("http1", backend.addr).await;
        let announced =
            matches!(fault, H1BodyFault::ShortOfLength(_) | H1BodyFault::Silent).then_some(FULL);
        for h2 in CLIENTS {
            let what = format!("http1 backend {fault:?}, {}", client_name(h2));
            let mut client = fx.client(h2).await;
            let before = fx.errors().await;
            let resp = send(&mut client, "GET", "/").await;
            go.notify_one();
            assert_truncated(resp, h2, announced, &what).await;
            assert_counted(&before, &fx.errors().await, &[("truncated", 1.0)], &what);
            // The broken backend connection is not kept.
            fx.await_app_connections_closed().await;
            // An HTTP/1.1 client's connection ends with the response; an HTTP/2 client's
            // carries on.
            fx.still_serves(h2.then_some(&mut client), h2, &what).await;
        }
        fx.finish().await;
    }
}

#[derive(Clone, Copy, Debug)]
enum H2BodyFault {
    /// RST_STREAM with this code after 300 bytes; the connection carries on.
    Reset(u32),
    /// GOAWAY (NO_ERROR, this stream processed) after 300 bytes, then FIN: a graceful
    /// close that does not wait for the stream.
    GoAwayThenFin,
    /// The TCP connection ends after 300 bytes, without GOAWAY.
    Closed(Cut),
    /// END_STREAM after 300 bytes of an announced 1000.
    EndShortOfLength,
    /// Nothing after 300 bytes (the connection carries on): cut off at `read_timeout`.
    Silent,
}

async fn h2_body_fault(mut sock: TcpStream, fault: H2BodyFault, announce: bool, go: Arc<Notify>) {
    if !h2_accept(&mut sock).await {
        return;
    }
    let part = pattern(0, SENT);
    while let Some(stream) = h2_next_request(&mut sock).await {
        let mut out = h2_head(stream, announce.then_some(FULL), false);
        if !matches!(fault, H2BodyFault::EndShortOfLength) {
            out.extend(h2frames::data(stream, &part, false));
        }
        if sock.write_all(&out).await.is_err() {
            return;
        }
        go_ahead(&go).await;
        let end = match fault {
            H2BodyFault::Reset(code) => h2frames::rst_stream(stream, code),
            H2BodyFault::EndShortOfLength => h2frames::data(stream, &part, true),
            H2BodyFault::GoAwayThenFin => {
                let _ = sock.write_all(&goaway(stream, code::NO_ERROR)).await;
                return cut(sock, Cut::Fin).await;
            }
            H2BodyFault::Closed(how) => return cut(sock, how).await,
            H2BodyFault::Silent => continue,
        };
        if sock.write_all(&end).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn an_h2c_body_cut_short_reaches_the_client_visibly_truncated() {
    let _serial = serial().await;
    // (fault, whether the response announces its length)
    let faults = [
        (H2BodyFault::Reset(0x2), false), // INTERNAL_ERROR
        (H2BodyFault::Reset(code::CANCEL), true),
        (H2BodyFault::Reset(code::REFUSED_STREAM), false),
        // NO_ERROR ends the body for hyper (RFC 9113 §8.1, meant for after END_STREAM);
        // with a length announced the proxy can tell the body is short.
        (H2BodyFault::Reset(code::NO_ERROR), true),
        (H2BodyFault::GoAwayThenFin, false),
        (H2BodyFault::Closed(Cut::Fin), true),
        (H2BodyFault::Closed(Cut::Reset), false),
        (H2BodyFault::EndShortOfLength, true),
        (H2BodyFault::Silent, false),
    ];
    for (fault, announce) in faults {
        let go = Arc::new(Notify::new());
        let g = go.clone();
        let backend =
            RawBackend::start(move |s, _| h2_body_fault(s, fault, announce, g.clone())).await;
        let fx = Fixture::start("h2c", backend.addr).await;
        let announced = announce.then_some(FULL);
        let connection_ends = matches!(fault, H2BodyFault::GoAwayThenFin | H2BodyFault::Closed(_));
        for h2 in CLIENTS {
            let what = format!(
                "h2c backend {fault:?} (length announced: {announce}), {}",
                client_name(h2)
            );
            let mut client = fx.client(h2).await;
            let before = fx.errors().await;
            let resp = send(&mut client, "GET", "/").await;
            go.notify_one();
            assert_truncated(resp, h2, announced, &what).await;
            assert_counted(&before, &fx.errors().await, &[("truncated", 1.0)], &what);
            if connection_ends {
                fx.await_app_connections_closed().await;
            }
            fx.still_serves(h2.then_some(&mut client), h2, &what).await;
        }
        if !connection_ends {
            // A reset stream leaves the multiplexed connection to the others.
            assert_eq!(
                backend.accepted(),
                1,
                "{fault:?}: one backend connection throughout"
            );
        }
        fx.finish().await;
    }
}

// ---------- keep-alive connections closed by the backend ----------

#[derive(Clone, Copy, Debug)]
enum KeepAlive {
    /// Answer one request (keep-alive), then, on the test's go-ahead (once the proxy has
    /// pooled the connection), close it while idle; over HTTP/2 with `goaway`, announce it
    /// with GOAWAY first.
    CloseWhenIdle(Cut, bool),
    /// Answer the first request (keep-alive); when the next one arrives on the same
    /// connection, close without answering it.
    CloseOnReuse(Cut),
}

async fn h1_keep_alive(mut sock: TcpStream, mode: KeepAlive, go: Arc<Notify>) {
    if read_request(&mut sock).await.is_none() || sock.write_all(OK_RESPONSE).await.is_err() {
        return;
    }
    match mode {
        KeepAlive::CloseWhenIdle(how, _) => {
            go_ahead(&go).await;
            cut(sock, how).await;
        }
        KeepAlive::CloseOnReuse(how) => {
            if read_request(&mut sock).await.is_some() {
                cut(sock, how).await;
            }
        }
    }
}

async fn h2_keep_alive(mut sock: TcpStream, mode: KeepAlive, go: Arc<Notify>) {
    if !h2_accept(&mut sock).await {
        return;
    }
    let Some(stream) = h2_next_request(&mut sock).await else {
        return;
    };
    if sock.write_all(&h2_ok(stream)).await.is_err() {
        return;
    }
    match mode {
        KeepAlive::CloseWhenIdle(how, goaway_first) => {
            go_ahead(&go).await;
            if goaway_first {
                let _ = sock.write_all(&goaway(stream, code::NO_ERROR)).await;
            }
            cut(sock, how).await;
        }
        KeepAlive::CloseOnReuse(how) => {
            if h2_next_request(&mut sock).await.is_some() {
                cut(sock, how).await;
            }
        }
    }
}

async fn keep_alive_backend(protocol: &str, mode: KeepAlive, go: Arc<Notify>) -> RawBackend {
    if protocol == "h2c" {
        RawBackend::start(move |s, _| h2_keep_alive(s, mode, go.clone())).await
    } else {
        RawBackend::start(move |s, _| h1_keep_alive(s, mode, go.clone())).await
    }
}

/// Time for the proxy to pool an HTTP/1.1 connection whose response the client has read:
/// it is parked once the proxy has read the response to its end, a moment later.
async fn let_the_proxy_pool_it() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// The backend closes a pooled connection while it is idle: the pool notices and the next
/// request, even a POST with a body, goes on a new connection. Nothing failed, nothing is
/// counted.
#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_not_reused() {
    let _serial = serial().await;
    let cases = [
        ("http1", KeepAlive::CloseWhenIdle(Cut::Fin, false)),
        ("http1", KeepAlive::CloseWhenIdle(Cut::Reset, false)),
        ("h2c", KeepAlive::CloseWhenIdle(Cut::Fin, false)),
        ("h2c", KeepAlive::CloseWhenIdle(Cut::Fin, true)),
        ("h2c", KeepAlive::CloseWhenIdle(Cut::Reset, false)),
    ];
    for (protocol, mode) in cases {
        let go = Arc::new(Notify::new());
        let backend = keep_alive_backend(protocol, mode, go.clone()).await;
        let fx = Fixture::start(protocol, backend.addr).await;
        let before = fx.errors().await;
        let mut requests = 0;
        for h2 in CLIENTS {
            let what = format!("{protocol} backend {mode:?}, {}", client_name(h2));
            let mut client = fx.client(h2).await;
            for method in ["GET", "POST", "GET"] {
                let (status, body) = answer(&mut client, method, "/").await;
                requests += 1;
                assert_eq!(
                    (status, body.as_str()),
                    (200, "backend ok"),
                    "{what}: {method}"
                );
                let_the_proxy_pool_it().await;
                go.notify_one();
                fx.await_app_connections_closed().await;
            }
            fx.still_serves(Some(&mut client), h2, &what).await;
        }
        assert_eq!(backend.accepted(), requests, "one connection per request");
        assert_counted(&before, &fx.errors().await, &[], &format!("{mode:?}"));
        assert_eq!(fx.retries_unanswered().await, 0.0);
        fx.finish().await;
    }
}

/// The backend closes a reused connection when the next request arrives on it, without
/// answering: a GET is sent again on a new connection (200); a POST with a body cannot be
/// sent again (502). No hang either way.
#[tokio::test]
async fn a_reused_connection_the_backend_closes_unanswered_retries_a_get_and_fails_a_post() {
    let _serial = serial().await;
    let cases = [
        ("http1", KeepAlive::CloseOnReuse(Cut::Fin)),
        ("http1", KeepAlive::CloseOnReuse(Cut::Reset)),
        ("h2c", KeepAlive::CloseOnReuse(Cut::Fin)),
        ("h2c", KeepAlive::CloseOnReuse(Cut::Reset)),
    ];
    for (protocol, mode) in cases {
        for h2 in CLIENTS {
            let what = format!("{protocol} backend {mode:?}, {}", client_name(h2));
            let backend = keep_alive_backend(protocol, mode, Arc::new(Notify::new())).await;
            let fx = Fixture::start(protocol, backend.addr).await;
            let mut client = fx.client(h2).await;
            let before = fx.errors().await;
            // Connection A answers, and is pooled.
            let (status, _) = answer(&mut client, "GET", "/").await;
            assert_eq!(status, 200, "{what}: first GET");
            let_the_proxy_pool_it().await;
            // A is reused and closes: the GET goes again, on new connection B.
            let (status, body) = answer(&mut client, "GET", "/").await;
            assert_eq!((status, body.as_str()), (200, "backend ok"), "{what}");
            assert_eq!(
                backend.accepted(),
                2,
                "{what}: the GET was retried on a new connection"
            );
            assert_eq!(fx.retries_unanswered().await, 1.0, "{what}");
            let_the_proxy_pool_it().await;
            // B is reused and closes: the POST's body is gone, so 502.
            let (status, _) = answer(&mut client, "POST", "/").await;
            assert_eq!(status, 502, "{what}: POST");
            assert_eq!(backend.accepted(), 2, "{what}: the POST was not retried");
            assert_eq!(fx.retries_unanswered().await, 1.0, "{what}");
            assert_counted(&before, &fx.errors().await, &[("protocol", 2.0)], &what);
            // And the next request gets a new connection.
            let (status, _) = answer(&mut client, "GET", "/").await;
            assert_eq!(status, 200, "{what}: GET after");
            fx.still_serves(Some(&mut client), h2, &what).await;
            drop(client);
            fx.finish().await;
        }
    }
}

/// Answers one request, then closes (FIN) after 0 to 3 ms, varied by connection.
async fn close_soon_after_answer(mut sock: TcpStream, n: usize, h2: bool) {
    let answered = if h2 {
        match h2_accept(&mut sock).await {
            true => match h2_next_request(&mut sock).await {
                Some(stream) => sock.write_all(&h2_ok(stream)).await.is_ok(),
                None => false,
            },
            false => false,
        }
    } else {
        read_request(&mut sock).await.is_some() && sock.write_all(OK_RESPONSE).await.is_ok()
    };
    if answered {
        tokio::time::sleep(Duration::from_millis(n as u64 % 4)).await;
        cut(sock, Cut::Fin).await;
    }
}

/// The backend closes every connection just after its answer, and requests follow each
/// other at once, so some meet a pooled connection whose close is on its way: every GET
/// succeeds (a new connection, or sent again); a POST succeeds or gets 502, never hangs;
/// each failed attempt is counted once.
#[tokio::test]
async fn back_to_back_requests_racing_the_backends_close_never_fail_a_get_or_hang() {
    let _serial = serial().await;
    for protocol in ["http1", "h2c"] {
        let h2_backend = protocol == "h2c";
        let backend =
            RawBackend::start(move |s, n| close_soon_after_answer(s, n, h2_backend)).await;
        let fx = Fixture::start(protocol, backend.addr).await;
        let before = fx.errors().await;
        let mut post_502 = 0.0;
        for h2 in CLIENTS {
            let what = format!(
                "{protocol} backend closing after each answer, {}",
                client_name(h2)
            );
            let mut client = fx.client(h2).await;
            for i in 0..20 {
                let (status, body) = answer(&mut client, "GET", "/").await;
                assert_eq!(
                    (status, body.as_str()),
                    (200, "backend ok"),
                    "{what}: GET {i}"
                );
            }
            for i in 0..10 {
                let (status, _) = answer(&mut client, "POST", "/").await;
                assert!(status == 200 || status == 502, "{what}: POST {i}: {status}");
                if status == 502 {
                    post_502 += 1.0;
                }
            }
            fx.still_serves(Some(&mut client), h2, &what).await;
        }
        let after = fx.errors().await;
        let protocol_errors = after.get("protocol").copied().unwrap_or(0.0)
            - before.get("protocol").copied().unwrap_or(0.0);
        assert_eq!(
            protocol_errors,
            fx.retries_unanswered().await + post_502,
            "{protocol}: each failed attempt counted once"
        );
        fx.finish().await;
    }
}
