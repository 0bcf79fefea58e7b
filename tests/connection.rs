//! Connection lifecycle over real sockets: lingering close (no RST truncating a response),
//! small responses in one TLS record, idle and header timeouts, the connection cap, and the
//! graceful drain on stop. Timing-sensitive tests take the `serial()` lock.

mod common;
use common::*;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

#[tokio::test]
async fn lingering_close_delivers_the_whole_response_despite_unread_client_bytes() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    let len = 8 * 1024 * 1024;
    for round in 0..3 {
        let tls = tls_connect(
            proxy.addr,
            "localhost",
            client_config(&certs.ca_der(), &[b"http/1.1"]),
        )
        .await
        .unwrap();
        let (mut rd, mut wr) = tokio::io::split(tls);
        // One request the proxy answers and then closes on, followed by bytes it will never
        // read (as KeyUpdate answers or a pipelined request would be), still arriving when
        // the response ends.
        let req =
            format!("GET /bytes/{len} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let writer = tokio::spawn(async move {
            wr.write_all(req.as_bytes()).await?;
            let junk = vec![b'x'; 16 * 1024];
            for _ in 0..256 {
                wr.write_all(&junk).await?;
            }
            wr.flush().await?;
            // Keep our half open until the reader is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::io::Error>(wr)
        });
        // Read slowly at first so part of the response is still in flight when the proxy
        // closes: an abortive close (RST) would discard it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut got))
            .await
            .unwrap();
        writer.abort();
        assert!(
            r.is_ok(),
            "round {round}: read failed after {} bytes: {:?}",
            got.len(),
            r.err()
        );
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(
            got.len() - head_end,
            len,
            "round {round}: response truncated"
        );
        assert_eq!(sha256(&got[head_end..]), sha256(&pattern(0, len)));
    }
}

#[tokio::test]
async fn a_client_done_with_its_request_is_not_waited_for() {
    // A client that asked for the close, sent no body and nothing after its request gets the
    // response, close_notify and FIN, and the proxy closes its socket at once: it does not
    // wait out LINGER (2 s) for a client that keeps its end open and silent.
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    for request in [
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n",
    ] {
        let mut tls = tls_connect(
            proxy.addr,
            "localhost",
            client_config(&certs.ca_der(), &[b"http/1.1"]),
        )
        .await
        .unwrap();
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1."), "{request:?}: {got:?}");
        // With the client's socket still open.
        wait_closed_before_linger(&proxy).await;
        drop(tls);
    }
}

#[tokio::test]
async fn a_done_client_with_bytes_still_arriving_gets_our_fin_before_the_drain() {
    // The client asked for the close and sent no body, but keeps sending (as a pipelining
    // client would): the proxy drains, and its FIN must come before that drain, not after
    // LINGER, so that a client waiting for the end of the connection is not kept waiting.
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    let tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let len = 1024 * 1024;
    let req = format!("GET /bytes/{len} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let writer = tokio::spawn(async move {
        wr.write_all(req.as_bytes()).await.unwrap();
        let junk = vec![b'x'; 16 * 1024];
        for _ in 0..64 {
            if wr.write_all(&junk).await.is_err() {
                break;
            }
        }
        let _ = wr.flush().await;
        wr
    });
    let mut got = Vec::new();
    // Ends at the proxy's close_notify.
    tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got.len() > len, "response truncated: {} bytes", got.len());
    let wr = writer.await.unwrap();
    let (mut tcp, _) = rd.unsplit(wr).into_inner();
    // After close_notify only the FIN can come (a RST would be an error).
    let mut rest = [0u8; 64];
    let eof = tokio::time::timeout(ephemera::tls::stream::LINGER * 3 / 5, tcp.read(&mut rest))
        .await
        .expect("no FIN from the proxy before LINGER");
    assert_eq!(eof.unwrap(), 0, "bytes after close_notify");
}

/// Counts TLS records arriving from the server (parses the 5-byte record headers).
struct RecordCounter<S> {
    inner: S,
    records: Arc<AtomicUsize>,
    header: Vec<u8>,
    skip: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordCounter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        for b in new {
            if self.skip > 0 {
                self.skip -= 1;
                continue;
            }
            self.header.push(b);
            if self.header.len() == 5 {
                self.skip = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                self.header.clear();
                self.records.fetch_add(1, Ordering::SeqCst);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordCounter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn small_response_leaves_as_one_tls_record() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let records = Arc::new(AtomicUsize::new(0));
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let counted = RecordCounter {
        inner: tcp,
        records: records.clone(),
        header: Vec::new(),
        skip: 0,
    };
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&certs.ca_der(), &[b"http/1.1"])));
    let tls = connector
        .connect("localhost".try_into().unwrap(), counted)
        .await
        .unwrap();
    let mut c = HttpClient::over(tls, false).await;
    for i in 0..3 {
        let before = records.load(Ordering::SeqCst);
        let (status, _, body) = c.get("/").await;
        assert_eq!(status, 200);
        assert!(body.len() > 50);
        assert_eq!(
            records.load(Ordering::SeqCst) - before,
            1,
            "request {i}: head and body must share one record"
        );
    }
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "",
        "      idle_timeout: 1s\n",
        "",
    ))
    .await;
    for h2 in [false, true] {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = tls_connect(
            proxy.addr,
            "localhost",
            client_config(&certs.ca_der(), alpn),
        )
        .await
        .unwrap();
        let mut c = HttpClient::over(tls, h2).await;
        // Activity keeps it open: requests every 400 ms for 2 s.
        for _ in 0..5 {
            assert_eq!(c.get("/").await.0, 200);
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        // Idle: closed within about a second (GOAWAY for HTTP/2, close for HTTP/1.1).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let req = request("GET", "/", empty());
        assert!(
            c.send(req).await.is_err(),
            "h2={h2}: connection should be closed after idle_timeout"
        );
    }
    assert_eq!(wait_connections_open(&proxy, 0).await, 0.0);
}

async fn wait_connections_open(proxy: &Proxy, want: u64) -> f64 {
    let mut v = -1.0;
    for _ in 0..60 {
        v = metric(&proxy.metrics().await, "ephemera_connections_open", &[]);
        if v == want as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v
}

#[tokio::test]
async fn slow_request_headers_are_cut_off_by_header_timeout() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let yaml = config_yaml(&certs, None, "", "", "")
        .replace("header_timeout: 10s", "header_timeout: 500ms");
    let proxy = Proxy::start(&yaml).await;
    let mut tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    // An idle keep-alive connection is not subject to header_timeout (only idle_timeout)…
    tokio::time::sleep(Duration::from_millis(900)).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // …but a request whose headers trickle in is cut off.
    tls.write_all(b"GET / HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        r.is_ok() && rest.is_empty(),
        "expected a clean close, got {r:?} {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// At `max_connections` a new connection is closed at once (the client learns now, not
/// after waiting unseen in the backlog) and counted; open ones are unaffected; once one
/// closes, new connections are served again.
#[tokio::test]
async fn connections_over_max_connections_are_closed_promptly() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let yaml = config_yaml(&certs, None, "", "", "").replace(
        "    bind: 127.0.0.1:0\n",
        "    bind: 127.0.0.1:0\n    max_connections: 2\n",
    );
    let proxy = Proxy::start(&yaml).await;
    let cfg = client_config(&certs.ca_der(), &[b"http/1.1"]);
    let a = tls_connect(proxy.addr, "localhost", cfg.clone())
        .await
        .unwrap();
    let mut b = HttpClient::over(
        tls_connect(proxy.addr, "localhost", cfg.clone())
            .await
            .unwrap(),
        false,
    )
    .await;
    // A deadline far above a refusal's cost, far below the handshake timeout (10 s) that a
    // connection left waiting would run into.
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connect(proxy.addr, "localhost", cfg.clone()),
    )
    .await
    .expect("a connection over the cap must be closed promptly, not left waiting");
    assert!(third.is_err(), "a third connection got through the cap");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshake_failures_total",
            &["reason=\"connection_limit\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "ephemera_connections_open", &[]), 2.0);
    assert_eq!(metric(&m, "ephemera_connections_accepted_total", &[]), 3.0);
    assert_eq!(b.get("/").await.0, 200, "open connections are unaffected");
    drop(a);
    wait_connections_open(&proxy, 1).await;
    let c = tls_connect(proxy.addr, "localhost", cfg.clone())
        .await
        .expect("served again once a slot is free");
    let mut c = HttpClient::over(c, false).await;
    assert_eq!(c.get("/").await.0, 200);
}

#[tokio::test]
async fn stop_drains_in_flight_requests_and_refuses_new_connections() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    let mut slow = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    let mut idle = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    assert_eq!(idle.get("/").await.0, 200);
    let in_flight = tokio::spawn(async move { slow.get("/slow/1200").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(
        (status, &body[..]),
        (200, &b"slow ok"[..]),
        "in-flight request completes during the drain"
    );
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "no new connections after stop"
    );
    // The idle HTTP/1.1 keep-alive connection was closed by the drain.
    assert!(idle.send(request("GET", "/", empty())).await.is_err());
    let mut proxy = proxy;
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.task)
        .await
        .expect("drain finished")
        .unwrap();
}

#[tokio::test]
async fn idle_http2_connection_gets_a_graceful_goaway() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "",
        "      idle_timeout: 1s\n",
        "",
    ))
    .await;
    for round in 0..4 {
        let tls = tls_connect(
            proxy.addr,
            "localhost",
            client_config(&certs.ca_der(), &[b"h2"]),
        )
        .await
        .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let resp = send
            .send_request(request("GET", "/", empty()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        // The proxy closes the idle connection: GOAWAY, then a clean end of the connection,
        // which hyper's client reports as Ok; an abrupt close is an error.
        let ended = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("closed after idle_timeout")
            .unwrap();
        assert!(ended.is_ok(), "round {round}: {ended:?}");
    }
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_off_after_idle_timeout() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(
        &certs,
        Some(&[backend]),
        "",
        "      idle_timeout: 1s\n",
        "",
    ))
    .await;
    let mut tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    // Headers and a little of the promised body, then nothing.
    tls.write_all(
        b"POST /hash HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\nsome bytes",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), tls.read_to_end(&mut got))
        .await
        .expect("the proxy gave up on the body");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_upstream_errors_total", &[]),
        0.0,
        "a client stall is not a backend error"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_idle_timeout() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(
        &certs,
        Some(&[backend]),
        "",
        "      idle_timeout: 1s\n",
        "",
    ))
    .await;
    let mut tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    tls.write_all(b"GET /bytes/268435456 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // Never read: the proxy's writes block once the socket buffers are full.
    let mut open = 1.0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = metric(&proxy.metrics().await, "ephemera_connections_open", &[]);
        if open == 0.0 {
            break;
        }
    }
    assert_eq!(open, 0.0, "the stalled connection must be closed");
    drop(tls);
}

/// `reuse_port: true` (SO_REUSEPORT): a second process — here a second server — binds the
/// same address and the kernel spreads new connections over both; without it the second
/// bind fails with a clear error.
#[tokio::test]
async fn reuse_port_lets_two_servers_share_one_address() {
    let certs = Certs::new(&["localhost"]);
    let yaml = |bind: &str, body: &str, reuse: bool| {
        config_yaml(&certs, None, "", "", "")
            .replace(
                "bind: 127.0.0.1:0\n    tls:",
                &format!("bind: {bind}\n    reuse_port: {reuse}\n    tls:"),
            )
            .replace(
                "respond: { status: 200 }",
                &format!("respond: {{ status: 200, body: {body} }}"),
            )
    };
    let a = Proxy::start(&yaml("127.0.0.1:0", "a", true)).await;
    let shared = a.addr.to_string();
    let refused = ephemera::Server::bind(
        ephemera::config::Config::parse(&yaml(&shared, "c", false), "c.yaml").unwrap(),
    )
    .await;
    let err = refused
        .err()
        .expect("a second bind without reuse_port fails")
        .to_string();
    assert!(
        err.contains("listener 'public'") && err.contains(&shared),
        "{err}"
    );

    let b = Proxy::start(&yaml(&shared, "b", true)).await;
    assert_eq!(b.addr, a.addr);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let mut c = HttpClient::connect(a.addr, &certs.ca_der(), false).await;
        let (status, _, body) = c.get("/").await;
        assert_eq!(status, 200);
        seen.insert(String::from_utf8_lossy(&body).to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b"]);
}

/// Drain: an HTTP/1.1 response in flight when shutdown begins says `Connection: close`
/// (the client must not send another request on it) and arrives whole; `/readyz` is 503.
#[tokio::test]
async fn during_a_drain_http1_responses_carry_connection_close() {
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let pending = tokio::spawn(async move {
        let resp = c.send(request("GET", "/slow/800", empty())).await.unwrap();
        let close = resp
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap().to_string());
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (close, body)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(admin_get(proxy.admin, "/readyz").await.0, 503);
    let (close, body) = pending.await.unwrap();
    assert_eq!(close.as_deref(), Some("close"));
    assert_eq!(&body[..], b"slow ok");
}

/// `tls.max_concurrent_handshakes`: with 2 handshakes held open by clients that never send a
/// ClientHello, a third connection is closed at once and counted; an established connection
/// keeps working; once a slot frees, new handshakes succeed.
#[tokio::test]
async fn handshakes_in_flight_are_capped_and_the_excess_refused() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "      max_concurrent_handshakes: 2\n",
        "",
        "",
    ))
    .await;
    let mut established = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    let stall1 = TcpStream::connect(proxy.addr).await.unwrap();
    let stall2 = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"h2"]),
    )
    .await;
    assert!(refused.is_err(), "a third handshake got through");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshake_failures_total",
            &["reason=\"handshake_limit\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        established.get("/").await.0,
        200,
        "established connections are unaffected"
    );
    drop(stall1);
    drop(stall2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fresh = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    assert_eq!(fresh.get("/").await.0, 200);
}
