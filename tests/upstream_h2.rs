//! HTTP/2 end to end: many client streams over one TLS session, multiplexed onto few HTTP/2
//! backend connections (h2c and h2 over TLS), the stream-limit-driven pool, backend TLS
//! verification, passive health and retries.

mod common;

use common::h2_backend::{self, H2Backend};
use common::*;
use http_body_util::BodyExt;
use std::net::SocketAddr;

fn upstream_yaml(protocol: &str, servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
    format!(
        "upstreams:\n  app:\n    protocol: {protocol}\n    servers: [{}]\n{extra}",
        list.join(", ")
    )
}

/// The standard listener routed to `upstreams` (YAML from `upstream_yaml`).
fn proxy_yaml(certs: &Certs, upstreams: &str) -> String {
    let base = config_yaml(certs, None, "", "", "");
    base.replace("respond: { status: 200 }", "upstream: app") + upstreams
}

/// `total` GETs of `path` as `concurrency` concurrent streams on one HTTP/2 connection;
/// returns the statuses and bodies that were not `200 backend ok`.
async fn run_streams(
    client: &HttpClient,
    path: &str,
    total: usize,
    concurrency: usize,
) -> Vec<String> {
    let HttpClient::H2(sender) = client else {
        panic!("needs an HTTP/2 client")
    };
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut s = sender.clone();
        let next = next.clone();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                s.ready().await.unwrap();
                let resp = s
                    .send_request(request("GET", &path, empty()))
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                if status != 200
                    || !body.starts_with(b"backend ok") && !body.starts_with(b"slow ok")
                {
                    bad.push(format!("{status} {}", String::from_utf8_lossy(&body)));
                }
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.unwrap());
    }
    bad
}

#[tokio::test]
async fn thousand_requests_on_one_session_share_one_h2c_backend_connection() {
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(None, None).await;
    let proxy = Proxy::start(&proxy_yaml(
        &certs,
        &upstream_yaml("h2c", &[backend.addr], ""),
    ))
    .await;
    let client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;

    let bad = run_streams(&client, "/slow/5", 1000, 100).await;
    assert!(
        bad.is_empty(),
        "{} failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(backend.requests(), 1000);
    assert_eq!(
        backend.connections(),
        1,
        "the backend saw one TCP connection"
    );
    assert!(
        backend.peak_in_flight() > 10,
        "streams were multiplexed: peak {}",
        backend.peak_in_flight()
    );

    let m = proxy.metrics().await;
    let handshakes: f64 = m
        .lines()
        .filter(|l| l.starts_with("ephemera_tls_handshakes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(handshakes, 1.0, "exactly one TLS handshake:\n{m}");
    assert_eq!(
        metric(&m, "ephemera_h2_streams_total", &["listener=\"public\""]),
        1000.0
    );
    assert_eq!(
        metric(&m, "ephemera_h2_streams_open", &["listener=\"public\""]),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_connections_open",
            &["upstream=\"app\"", "protocol=\"h2c\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_low_stream_limit_opens_more_connections_up_to_max_connections() {
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(Some(10), None).await;
    let ups = upstream_yaml("h2c", &[backend.addr], "    max_connections: 4\n");
    let proxy = Proxy::start(&proxy_yaml(&certs, &ups)).await;
    let client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;

    // 100 streams at once, each held 20 ms at the backend: 10 per connection fit, so the pool
    // must open more connections, but never more than 4; the rest wait in h2 for a slot.
    let bad = run_streams(&client, "/slow/20", 600, 100).await;
    assert!(
        bad.is_empty(),
        "{} failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    let conns = backend.connections();
    assert!((2..=4).contains(&conns), "backend connections: {conns}");
    assert!(
        backend.peak_in_flight() <= 40,
        "peak {} > 4 x 10",
        backend.peak_in_flight()
    );
    assert!(
        backend.peak_in_flight() > 10,
        "peak {}",
        backend.peak_in_flight()
    );
}

async fn tls_backend_proxy(backend: &H2Backend, trusted: &Certs, certs: &Certs) -> Proxy {
    let ca = trusted.dir.path().join("trusted-ca.pem");
    std::fs::write(&ca, &trusted.ca_pem).unwrap();
    let extra = format!(
        "    tls: {{ ca: {}, server_name: backend.test }}\n",
        yaml_path(&ca)
    );
    Proxy::start(&proxy_yaml(
        certs,
        &upstream_yaml("h2", &[backend.addr], &extra),
    ))
    .await
}

#[tokio::test]
async fn h2_over_tls_backend_multiplexes_on_one_verified_connection() {
    let certs = Certs::new(&["localhost"]);
    let backend_certs = Certs::new(&["backend.test"]);
    let backend = h2_backend::start(None, Some(h2_backend::backend_tls(&backend_certs))).await;
    let proxy = tls_backend_proxy(&backend, &backend_certs, &certs).await;
    let client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;

    let bad = run_streams(&client, "/slow/5", 500, 100).await;
    assert!(
        bad.is_empty(),
        "{} failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(backend.connections(), 1);
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    let (status, _, body) = c.get("/headers").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("version: HTTP/2.0"), "{text}");
    assert_eq!(
        backend.connections(),
        1,
        "a second client session reuses the backend connection"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_connections_open",
            &["upstream=\"app\"", "protocol=\"h2\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn backend_certificate_from_another_ca_is_a_counted_tls_error_and_502() {
    let certs = Certs::new(&["localhost"]);
    let backend_certs = Certs::new(&["backend.test"]);
    let other_ca = Certs::new(&["backend.test"]);
    let backend = h2_backend::start(None, Some(h2_backend::backend_tls(&backend_certs))).await;
    let proxy = tls_backend_proxy(&backend, &other_ca, &certs).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;

    let (status, _, _) = client.get("/").await;
    assert_eq!(status, 502);
    assert_eq!(backend.requests(), 0);
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "ephemera_upstream_errors_total",
            &["upstream=\"app\"", "kind=\"tls\""]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_backend_that_speaks_http1_to_h2c_is_a_502_not_a_hang() {
    let certs = Certs::new(&["localhost"]);
    let h1 = start_backend().await;
    let proxy = Proxy::start(&proxy_yaml(&certs, &upstream_yaml("h2c", &[h1], ""))).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let (status, _, _) = client.get("/").await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn a_dead_server_is_ejected_and_requests_go_to_the_live_one() {
    let certs = Certs::new(&["localhost"]);
    let dead = closed_port().await;
    let live = h2_backend::start(None, None).await;
    let proxy = Proxy::start(&proxy_yaml(
        &certs,
        &upstream_yaml("h2c", &[dead, live.addr], ""),
    ))
    .await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    for i in 0..20 {
        let (status, _, body) = client.get("/").await;
        assert_eq!(
            (status, &body[..]),
            (200, &b"backend ok"[..]),
            "request {i}"
        );
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_ejections_total",
            &["upstream=\"app\""]
        ),
        1.0,
        "{m}"
    );
    // Round robin sends every other request to the dead server first until it is ejected
    // (3 failures in a row); after that it is tried last, so never again here.
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_errors_total",
            &["upstream=\"app\"", "kind=\"connect\""]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_retries_total",
            &["upstream=\"app\"", "reason=\"connect\""]
        ),
        3.0
    );
}

/// A backend that accepts connections and closes them without answering.
async fn start_slamming_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            if let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                });
            }
        }
    });
    addr
}

#[tokio::test]
async fn an_unanswered_idempotent_request_is_retried_once_on_another_server() {
    let certs = Certs::new(&["localhost"]);
    let slam = start_slamming_backend().await;
    let live = start_backend().await;
    let ups = upstream_yaml("http1", &[slam, live], "");
    let proxy = Proxy::start(&proxy_yaml(&certs, &ups)).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;

    // Round robin: one of the first two requests starts at the slamming server.
    for _ in 0..2 {
        let (status, _, body) = client.get("/").await;
        assert_eq!((status, &body[..]), (200, &b"backend ok"[..]));
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_retries_total",
            &["upstream=\"app\"", "reason=\"unanswered\""]
        ),
        1.0,
        "{m}"
    );

    // A POST is not idempotent: not retried, the client gets 502 when it hits that server.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let resp = client
            .send(request("POST", "/hash", full("payload")))
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 502]);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_retries_total",
            &["upstream=\"app\"", "reason=\"unanswered\""]
        ),
        1.0
    );
}

/// `h2load` (nghttp2) as an independent HTTP/2 client: many streams over a few TLS sessions,
/// through the proxy to an h2c backend, with zero failures. Skipped without h2load, except
/// under CI (env `CI`), where `.ci/run` installs it.
#[tokio::test]
async fn h2load_completes_many_streams_with_zero_failures() {
    let have = std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "h2load missing under CI: install nghttp2-client"
        );
        eprintln!("SKIPPED: h2load is not on PATH");
        return;
    }
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(None, None).await;
    let proxy = Proxy::start(&proxy_yaml(
        &certs,
        &upstream_yaml("h2c", &[backend.addr], ""),
    ))
    .await;
    let out = tokio::process::Command::new("h2load")
        .args(["-n", "4000", "-c", "4", "-m", "100"])
        .arg(format!("https://127.0.0.1:{}/", proxy.addr.port()))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("4000 succeeded, 0 failed, 0 errored, 0 timeout"),
        "{text}"
    );
    assert!(text.contains("status codes: 4000 2xx"), "{text}");
    assert!(text.contains("Application protocol: h2"), "{text}");
    assert_eq!(backend.requests(), 4000);
    // Up to 4 x 100 streams at once against hyper's default limit of 200 per connection.
    assert!(
        (1..=2).contains(&backend.connections()),
        "4 client sessions over {} backend connections",
        backend.connections()
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_h2_streams_total", &["listener=\"public\""]),
        4000.0
    );
}

#[tokio::test]
async fn servers_given_by_name_are_resolved() {
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(None, None).await;
    let ups = format!(
        "upstreams:\n  app:\n    protocol: h2c\n    servers: [\"localhost:{}\"]\n",
        backend.addr.port()
    );
    let proxy = Proxy::start(&proxy_yaml(&certs, &ups)).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    let (status, _, body) = client.get("/").await;
    assert_eq!((status, &body[..]), (200, &b"backend ok"[..]));
}

#[tokio::test]
async fn the_backend_never_sees_more_than_max_concurrent_streams_from_one_connection() {
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(None, None).await;
    let base = proxy_yaml(&certs, &upstream_yaml("h2c", &[backend.addr], ""));
    let yaml = base.replace(
        "      header_timeout: 10s\n",
        "      header_timeout: 10s\n      h2: { max_concurrent_streams: 10 }\n",
    );
    assert_ne!(yaml, base);
    let proxy = Proxy::start(&yaml).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    // One request first, so the client has our SETTINGS (streams opened before them, past
    // the limit, are refused with REFUSED_STREAM, as RFC 9113 §5.1.2 allows).
    assert_eq!(client.get("/").await.0, 200);
    // 50 requests at once, each held 30 ms: the client may open 10 streams at a time.
    let bad = run_streams(&client, "/slow/30", 200, 50).await;
    assert!(bad.is_empty(), "{bad:?}");
    assert!(
        backend.peak_in_flight() <= 10,
        "peak {}",
        backend.peak_in_flight()
    );
    assert!(
        backend.peak_in_flight() >= 5,
        "peak {}",
        backend.peak_in_flight()
    );
}

#[tokio::test]
async fn a_client_body_over_the_limit_is_413_not_an_upstream_error_with_h2_backends() {
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(None, None).await;
    let base = proxy_yaml(&certs, &upstream_yaml("h2c", &[backend.addr], ""));
    let yaml = base.replace(
        "      header_timeout: 10s\n",
        "      header_timeout: 10s\n      max_request_body: 64KiB\n",
    );
    let proxy = Proxy::start(&yaml).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    // Streamed, no Content-Length: cut off at the limit while it is being forwarded.
    let resp = client
        .send(request("POST", "/hash", pattern_body(1 << 20)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_errors_total",
            &["upstream=\"app\"", "kind=\"protocol\""]
        ),
        0.0
    );
    let (status, _, _) = client.get("/").await;
    assert_eq!(status, 200, "the backend connection is still fine");
}

/// A backend that drops its first connection after reading the request, then serves
/// `common::backend_handler` normally.
async fn start_flaky_once_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            if std::mem::take(&mut first) {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                continue;
            }
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(backend_handler);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn with_one_server_the_retry_goes_to_that_server_again() {
    let certs = Certs::new(&["localhost"]);
    let flaky = start_flaky_once_backend().await;
    let proxy = Proxy::start(&proxy_yaml(&certs, &upstream_yaml("http1", &[flaky], ""))).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let (status, _, body) = client.get("/").await;
    assert_eq!((status, &body[..]), (200, &b"backend ok"[..]));
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_retries_total",
            &["upstream=\"app\"", "reason=\"unanswered\""]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_retries_total",
            &["upstream=\"app\"", "reason=\"connect\""]
        ),
        0.0
    );
}

/// A backend that accepts, reads a little, and then neither reads nor answers.
async fn start_deaf_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            held.push(s);
        }
    });
    addr
}

#[tokio::test]
async fn a_backend_that_stops_reading_an_upload_gets_504_after_response_timeout() {
    let certs = Certs::new(&["localhost"]);
    let deaf = start_deaf_backend().await;
    let ups = upstream_yaml("http1", &[deaf], "    response_timeout: 1s\n");
    let proxy = Proxy::start(&proxy_yaml(&certs, &ups)).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.send(request("POST", "/hash", pattern_body(64 << 20))),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_eq!(resp.status(), 504, "after {:?}", started.elapsed());
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_errors_total",
            &["upstream=\"app\"", "kind=\"response_timeout\""]
        ),
        1.0
    );
}
