//! HTTP through the proxy to a real hyper backend, over HTTP/1.1 and HTTP/2 (by ALPN):
//! status, headers, multi-MiB bodies both ways (hashes compared), 413, forwarding headers,
//! 502/504, round robin with a dead server, and the built-in route.

mod common;
use common::*;
use http_body_util::BodyExt;

async fn proxy_to_backend(
    extra_http: &str,
    extra_upstream: &str,
) -> (Certs, Proxy, std::net::SocketAddr) {
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(
        &certs,
        Some(&[backend]),
        "",
        extra_http,
        extra_upstream,
    ))
    .await;
    (certs, proxy, backend)
}

#[tokio::test]
async fn requests_and_streamed_bodies_both_ways_h1_and_h2() {
    let (certs, proxy, _) = proxy_to_backend("      max_request_body: 64MiB\n", "").await;
    for h2 in [false, true] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let (status, _, body) = c.get("/").await;
        assert_eq!((status, &body[..]), (200, &b"backend ok"[..]), "h2={h2}");

        // Upload 5 MiB + a bit, streamed; the backend hashes what it received.
        let len = 5 * 1024 * 1024 + 123;
        let expected = sha256(&pattern(0, len));
        let resp = c
            .send(request("POST", "/hash", pattern_body(len)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&got),
            format!("{len} {expected}"),
            "h2={h2}"
        );

        // Download 7 MiB + a bit, streamed; hash compared.
        let len = 7 * 1024 * 1024 + 7;
        let resp = c
            .send(request("GET", &format!("/bytes/{len}"), empty()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (n, h) = hash_body(resp.into_body()).await;
        assert_eq!((n, h), (len, sha256(&pattern(0, len))), "h2={h2}");
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_http_requests_total",
            &["version=\"HTTP/1.1\"", "status_class=\"2xx\""]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "ephemera_http_requests_total",
            &["version=\"HTTP/2\"", "status_class=\"2xx\""]
        ),
        3.0
    );
    assert!(
        metric(
            &m,
            "ephemera_upstream_request_duration_seconds_count",
            &["upstream=\"app\""]
        ) >= 6.0
    );
}

#[tokio::test]
async fn request_body_over_limit_gets_413() {
    let (certs, proxy, _) = proxy_to_backend("      max_request_body: 1MiB\n", "").await;
    for h2 in [false, true] {
        // Declared length over the limit: refused before anything is forwarded.
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let resp = c
            .send(request("POST", "/hash", full(vec![0u8; 1024 * 1024 + 1])))
            .await
            .unwrap();
        assert_eq!(resp.status(), 413, "h2={h2}");
        // Streamed (no length) and over the limit: cut off and answered 413.
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let resp = c
            .send(request("POST", "/hash", pattern_body(3 * 1024 * 1024)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 413, "h2={h2}");
        // At the limit: fine.
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let resp = c
            .send(request("POST", "/hash", pattern_body(1024 * 1024)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "h2={h2}");
    }
}

#[tokio::test]
async fn forwarding_headers_and_hop_by_hop() {
    let (certs, proxy, _) = proxy_to_backend("", "").await;
    for h2 in [false, true] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let mut req = request("GET", "/headers", empty());
        req.headers_mut()
            .insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        req.headers_mut()
            .insert("forwarded", "for=6.6.6.6".parse().unwrap());
        req.headers_mut()
            .insert("x-custom", "kept".parse().unwrap());
        if !h2 {
            req.headers_mut()
                .insert("connection", "x-drop-me".parse().unwrap());
            req.headers_mut().insert("x-drop-me", "1".parse().unwrap());
        }
        let resp = c.send(req).await.unwrap();
        let text = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        assert!(
            text.contains("x-forwarded-for: 127.0.0.1\n"),
            "untrusted XFF must be replaced (h2={h2}):\n{text}"
        );
        assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
        assert!(
            text.contains("forwarded: for=127.0.0.1;proto=https;host=\"localhost\"\n"),
            "{text}"
        );
        assert!(
            text.contains("host: localhost\n"),
            "Host kept (h2={h2}): {text}"
        );
        assert!(text.contains("x-custom: kept\n"), "{text}");
        assert!(!text.contains("x-drop-me"), "{text}");
        assert!(text.contains("version: HTTP/1.1"), "{text}");
    }
}

#[tokio::test]
async fn trusted_proxy_xff_is_appended() {
    let (certs, proxy, _) = proxy_to_backend("      trusted_proxies: [127.0.0.0/8]\n", "").await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let mut req = request("GET", "/headers", empty());
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let resp = c.send(req).await.unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn backend_down_gives_502_and_proxy_keeps_serving() {
    let certs = Certs::new(&["localhost"]);
    let dead = closed_port().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[dead]), "", "", "")).await;
    for h2 in [false, true] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let (status, _, body) = c.get("/").await;
        assert_eq!(status, 502, "h2={h2}");
        assert!(!body.is_empty());
        // Same connection still usable.
        let (status, _, _) = c.get("/again").await;
        assert_eq!(status, 502);
    }
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "ephemera_upstream_errors_total",
            &["upstream=\"app\"", "kind=\"connect\""]
        ) >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "ephemera_http_requests_total",
            &["status_class=\"5xx\""]
        ),
        4.0
    );
}

#[tokio::test]
async fn slow_backend_gives_504_and_proxy_keeps_serving() {
    let _serial = serial().await;
    let (certs, proxy, _) = proxy_to_backend("", "    response_timeout: 300ms\n").await;
    for h2 in [false, true] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let (status, _, _) = c.get("/slow/3000").await;
        assert_eq!(status, 504, "h2={h2}");
        let (status, _, body) = c.get("/").await;
        assert_eq!((status, &body[..]), (200, &b"backend ok"[..]));
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_errors_total",
            &["kind=\"response_timeout\""]
        ),
        2.0
    );
}

#[tokio::test]
async fn round_robin_skips_a_refusing_server() {
    let certs = Certs::new(&["localhost"]);
    let a = start_backend().await;
    let dead = closed_port().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[dead, a]), "", "", "")).await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    for i in 0..6 {
        let (status, _, _) = c.get(&format!("/{i}")).await;
        assert_eq!(status, 200, "request {i}");
    }
}

#[tokio::test]
async fn keep_alive_connections_to_the_backend_are_reused() {
    use std::sync::atomic::Ordering;
    let (backend, accepted) = start_counting_backend(|_req| async {
        Ok::<_, std::convert::Infallible>(hyper::Response::new(full("pooled")))
    })
    .await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    for _ in 0..20 {
        let (status, _, _) = c.get("/").await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "sequential requests reuse one backend connection"
    );
}

/// A pooled connection goes back to the pool when its response body has been read to the
/// end, whatever the body: none (204, HEAD), one frame, many frames, chunked; for clients
/// over HTTP/1.1 and HTTP/2 (whose servers stop polling a body once it says it has ended).
#[tokio::test]
async fn backend_connections_return_to_the_pool_after_every_kind_of_body() {
    use std::sync::atomic::Ordering;
    let (backend, accepted) =
        start_counting_backend(|req: hyper::Request<hyper::body::Incoming>| async move {
            let resp = match req.uri().path() {
                "/none" => hyper::Response::builder()
                    .status(204)
                    .body(empty())
                    .unwrap(),
                "/big" => hyper::Response::new(full(vec![b'x'; 300_000])),
                "/chunked" => {
                    let frames = (0..5).map(|i| {
                        Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from(vec![
                            b'0' + i;
                            10_000
                        ])))
                    });
                    hyper::Response::new(
                        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed(),
                    )
                }
                _ => hyper::Response::new(full("pooled")),
            };
            Ok::<_, std::convert::Infallible>(resp)
        })
        .await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    for h2 in [false, true] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        for round in 0..3 {
            for (path, len) in [
                ("/none", 0),
                ("/", 6),
                ("/big", 300_000),
                ("/chunked", 50_000),
            ] {
                let (status, _, body) = c.get(path).await;
                assert!(status < 300, "{path}: {status}");
                assert_eq!(body.len(), len, "{path} (h2 {h2}, round {round})");
            }
            let resp = c.send(request("HEAD", "/big", empty())).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(
                resp.into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .is_empty()
            );
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "30 sequential requests over two client connections reuse one backend connection"
    );
}

#[tokio::test]
async fn builtin_route_names_tls_parameters() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    let (status, _, body) = c.get("/").await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains("tls_version: TLSv1.3")
            && text.contains("group: x25519")
            && text.contains("cipher_suite: TLS13_AES_128_GCM_SHA256")
            && text.contains("alpn: h2"),
        "{text}"
    );
}

#[tokio::test]
async fn http10_without_host_uses_the_wildcard_route() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (certs, proxy, _) = proxy_to_backend("", "").await;
    let mut tls = tls_connect(proxy.addr, "localhost", client_config(&certs.ca_der(), &[]))
        .await
        .unwrap();
    tls.write_all(b"GET /headers HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(text.contains("x-forwarded-proto: https"), "{text}");
}

/// On a connection that closes after its response, the proxy holds flushes until hyper's
/// shutdown in the same poll (response and close_notify in one write). A body that stalls
/// after its first chunk must still deliver that chunk at once, not when the body resumes.
#[tokio::test]
async fn a_stalled_last_response_still_delivers_what_it_has() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (certs, proxy, _) = proxy_to_backend("", "").await;
    for req in [
        "GET /drip/30000 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "GET /drip/30000 HTTP/1.0\r\n\r\n",
    ] {
        let mut tls = tls_connect(proxy.addr, "localhost", client_config(&certs.ca_der(), &[]))
            .await
            .unwrap();
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            while !got.windows(6).any(|w| w == b"first\n") {
                let n = tls.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(
            first.is_ok(),
            "{req:?}: the first chunk did not arrive within 5 s: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
}

#[tokio::test]
async fn response_timeout_starts_after_the_request_body_is_sent() {
    let _serial = serial().await;
    let (certs, proxy, _) = proxy_to_backend("", "    response_timeout: 300ms\n").await;
    for h2 in [false, true] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        // 10 chunks 100 ms apart: the upload alone takes longer than response_timeout.
        let chunks = futures_util::stream::unfold(0usize, |i| async move {
            if i == 10 {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Some((
                Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from(pattern(
                    i * 1000,
                    1000,
                )))),
                i + 1,
            ))
        });
        let body = http_body_util::StreamBody::new(chunks).boxed();
        let resp = c.send(request("POST", "/hash", body)).await.unwrap();
        assert_eq!(resp.status(), 200, "h2={h2}");
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&got),
            format!("10000 {}", sha256(&pattern(0, 10000)))
        );
    }
}

#[tokio::test]
async fn routing_host_and_backend_host_cannot_disagree() {
    let certs = Certs::new(&["localhost", "public.example", "admin.example"]);
    let backend = start_backend().await;
    // admin.example is refused by a route; everything else goes to the backend.
    let yaml = config_yaml(&certs, Some(&[backend]), "", "", "").replace(
        "    routes:\n",
        "    routes:\n      - { host: admin.example, respond: { status: 403, body: \"no\" } }\n",
    );
    let proxy = Proxy::start(&yaml).await;

    // HTTP/2: :authority public.example with Host admin.example is malformed: 400, not a
    // backend request with Host admin.example.
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    let req = hyper::Request::get("https://public.example/headers")
        .header("host", "admin.example")
        .body(empty())
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status(), 400);

    // HTTP/1.1 absolute-form: routed by the URI, and the backend gets that same Host.
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let req = hyper::Request::get("https://public.example/headers")
        .header("host", "admin.example")
        .body(empty())
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("host: public.example\n") && !text.contains("admin.example"),
        "{text}"
    );

    // Userinfo never reaches Host, X-Forwarded-Host or Forwarded.
    let req = hyper::Request::get("https://user:secret@public.example/headers")
        .body(empty())
        .unwrap();
    let resp = c.send(req).await.unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(!text.contains("secret"), "{text}");
    assert!(text.contains("host: public.example\n"), "{text}");

    // And the route for admin.example still answers 403 when asked directly.
    let req = hyper::Request::get("https://admin.example/")
        .body(empty())
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().status(), 403);
}

#[tokio::test]
async fn http10_requests_reuse_pooled_backend_connections() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (backend, accepted) =
        start_counting_backend(|req: hyper::Request<hyper::body::Incoming>| async move {
            let host = req
                .headers()
                .get("host")
                .map(|h| h.to_str().unwrap_or("").to_string())
                .unwrap_or_default();
            Ok::<_, std::convert::Infallible>(hyper::Response::new(full(format!(
                "host={host} version={:?}",
                req.version()
            ))))
        })
        .await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    for i in 0..5 {
        // HTTP/1.0 without Host, one request per client connection (as `openssl s_time -www`).
        let mut tls = tls_connect(proxy.addr, "localhost", client_config(&certs.ca_der(), &[]))
            .await
            .unwrap();
        tls.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains(" 200 "), "request {i}: {text}");
        assert!(
            text.ends_with("host=app version=HTTP/1.1"),
            "request {i}: {text}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one pooled backend connection serves them all"
    );
}

#[tokio::test]
async fn over_http2_a_host_outside_the_connections_certificate_gets_421() {
    // One certificate for localhost, alt.example and the address 127.0.0.1 (an IP SAN),
    // another for other.example.
    let certs = Certs::new(&["localhost", "alt.example", "127.0.0.1", "::1"]);
    let (other_cert, other_key, _) = certs.extra_self_signed("other", &["other.example"], false);
    let yaml = config_yaml(&certs, None, "", "", "").replace(
        "      certificates:\n",
        &format!(
            "      certificates:\n        - {{ cert: {}, key: {} }}\n",
            yaml_path(&other_cert),
            yaml_path(&other_key)
        ),
    );
    // The first certificate is the default; keep localhost's first.
    let yaml = {
        let lines: Vec<&str> = yaml.lines().collect();
        let i = lines.iter().position(|l| l.contains("other.crt")).unwrap();
        let mut v: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        v.swap(i, i + 1);
        v.join("\n") + "\n"
    };
    let proxy = Proxy::start(&yaml).await;
    for h2 in [true, false] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        for (host, want) in [
            ("localhost", 200),
            ("alt.example", 200),
            ("ALT.example.", 200),
            ("other.example", if h2 { 421 } else { 200 }),
            ("nowhere.example", if h2 { 421 } else { 200 }),
            ("127.0.0.1", 200),
            ("[::1]", 200),
            ("[0:0:0:0:0:0:0:1]", 200),
            ("127.0.0.2", if h2 { 421 } else { 200 }),
        ] {
            let req = hyper::Request::get(format!("https://{host}/"))
                .header("host", host)
                .body(empty())
                .unwrap();
            let resp = c.send(req).await.unwrap();
            assert_eq!(resp.status(), want, "{host} over SNI localhost, h2={h2}");
        }
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_http_requests_total",
            &["version=\"HTTP/2\"", "status_class=\"4xx\""]
        ),
        3.0
    );
}

/// A strict `Expect: 100-continue` client: it sends the body only after `100 Continue`
/// arrives, which the proxy must answer itself (the backend sees the body, not a stall).
#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (certs, proxy, _) = proxy_to_backend("", "").await;
    let mut tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let body = pattern(0, 100_000);
    let head = format!(
        "POST /hash HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("no 100 Continue within 5 s")
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    tls.write_all(&body).await.unwrap();
    let mut resp = Vec::new();
    loop {
        let n = tls.read(&mut buf).await.unwrap();
        resp.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&resp);
        if n == 0 || text.contains(&sha256(&body)) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains(&format!("{} {}", body.len(), sha256(&body))),
        "{text}"
    );
}
