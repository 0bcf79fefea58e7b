//! Idle HTTP/1.1 connections are parked (hyper's connection taken apart, its buffers freed)
//! after 250 ms without a request: the next request on the same TLS session, pipelined
//! requests, a client KeyUpdate, a close and the idle timeout all work on a parked connection.
//! Parking is seen in `ephemera_http1_connections_parked`. Timing-sensitive: `serial()`.

mod common;
use common::raw_backend::RawBackend;
use common::*;
use http_body_util::BodyExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARKED: &str = "ephemera_http1_connections_parked";

/// A raw TLS connection to the proxy speaking HTTP/1.1.
async fn h1_tls(proxy: &Proxy, certs: &Certs) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap()
}

fn handshakes(text: &str) -> f64 {
    metric(text, "ephemera_tls_handshakes_total", &[])
}

#[tokio::test]
async fn a_parked_connection_carries_the_next_requests_and_bodies_both_ways() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(
        &certs,
        Some(&[backend]),
        "",
        "      max_request_body: 16MiB\n",
        "",
    ))
    .await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    assert_eq!(c.get("/").await.0, 200);
    // Busy connections are not parked: requests back to back stay below the threshold.
    wait_metric(&proxy, PARKED, &[], 1.0).await;
    for round in 0..2 {
        let len = 3 * 1024 * 1024 + 17;
        let resp = c
            .send(request("POST", "/hash", pattern_body(len)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&got),
            format!("{len} {}", sha256(&pattern(0, len))),
            "round {round}: upload after parking"
        );
        let len = 5 * 1024 * 1024 + 5;
        let resp = c
            .send(request("GET", &format!("/bytes/{len}"), empty()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (n, h) = hash_body(resp.into_body()).await;
        assert_eq!(
            (n, h),
            (len, sha256(&pattern(0, len))),
            "round {round}: download after parking"
        );
        wait_metric(&proxy, PARKED, &[], 1.0).await;
    }
    let m = proxy.metrics().await;
    assert_eq!(handshakes(&m), 1.0, "one TLS session throughout");
    drop(c);
    wait_metric(&proxy, PARKED, &[], 0.0).await;
}

/// Two requests in one write wake a parked connection: both are answered, in order.
#[tokio::test]
async fn pipelined_requests_and_a_client_key_update_on_a_parked_connection() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let mut tls = h1_tls(&proxy, &certs).await;
    tls.write_all(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut tls).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    wait_metric(&proxy, PARKED, &[], 1.0).await;

    // A KeyUpdate alone carries no request: the connection stays parked and still works.
    tls.get_mut().1.refresh_traffic_keys().unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_metric(&proxy, PARKED, &[], 1.0).await;

    tls.write_all(
        b"GET /b HTTP/1.1\r\nHost: localhost\r\n\r\nGET /c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(
        rest.matches("HTTP/1.1 200").count(),
        2,
        "both pipelined requests answered: {rest}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_http_requests_total",
            &["version=\"HTTP/1.1\"", "status_class=\"2xx\""]
        ),
        3.0
    );
    wait_metric(&proxy, PARKED, &[], 0.0).await;
}

/// Reads one response with a Content-Length body.
async fn read_response<S: AsyncReadExt + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed mid-head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    head + &String::from_utf8_lossy(&body)
}

/// A parked connection the client closes counts as completed; one left alone is closed by
/// the idle timeout, counted as such.
#[tokio::test]
async fn parked_connections_close_as_completed_or_by_idle_timeout() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "",
        "      idle_timeout: 3s\n",
        "",
    ))
    .await;
    let mut closing = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let mut idle = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    assert_eq!(closing.get("/").await.0, 200);
    assert_eq!(idle.get("/").await.0, 200);
    wait_metric(&proxy, PARKED, &[], 2.0).await;
    drop(closing);
    wait_metric(&proxy, PARKED, &[], 1.0).await;
    wait_metric(&proxy, PARKED, &[], 0.0).await;
    let m = proxy.metrics().await;
    let closed = |reason: &str| {
        metric(
            &m,
            "ephemera_tls_connections_closed_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(closed("idle_timeout"), 1.0);
    assert_eq!(closed("completed") + closed("client_reset"), 1.0);
    assert!(idle.send(request("GET", "/", empty())).await.is_err());
}

/// A backend that answers as soon as it has a request head (before any body) and then reads
/// the body to its end: the client's connection is between a response and the rest of its
/// request body, which is no time to park it.
async fn answer_before_the_body(mut sock: TcpStream, _n: usize) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        while !buf.ends_with(b"\r\n\r\n") {
            match sock.read(&mut byte).await {
                Ok(1) => buf.push(byte[0]),
                _ => return,
            }
        }
        let post = buf.starts_with(b"POST");
        buf.clear();
        if sock
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
        if post {
            let mut rest = Vec::new();
            let _ = sock.read_to_end(&mut rest).await;
            return;
        }
    }
}

#[tokio::test]
async fn a_connection_still_sending_a_request_body_is_not_parked() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = RawBackend::start(answer_before_the_body).await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend.addr]), "", "", "")).await;
    let mut tls = h1_tls(&proxy, &certs).await;
    tls.write_all(
        b"POST /up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let first = read_response(&mut tls).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Well past the parking delay, with the upload unfinished.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        metric(&proxy.metrics().await, PARKED, &[]),
        0.0,
        "parked in the middle of a request body"
    );
    // The end of the body, then a next request: the last chunk must not be taken for a head.
    tls.write_all(b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200"),
        "the request after the body: {rest}"
    );
}

/// A partial next request that arrived with the previous one (more than the parked read's
/// 512 bytes) survives the attempts to park the connection and arrives whole.
#[tokio::test]
async fn a_long_partial_next_request_survives_parking_attempts() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    let mut tls = h1_tls(&proxy, &certs).await;
    let pad = "a".repeat(700);
    let mut first = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
    first.extend_from_slice(
        format!("GET /headers HTTP/1.1\r\nHost: localhost\r\nX-Pad: {pad}").as_bytes(),
    );
    tls.write_all(&first).await.unwrap();
    let one = read_response(&mut tls).await;
    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    tls.write_all(b"\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(
        rest.contains(&format!("x-pad: {pad}\n")),
        "the padded header arrived whole: {rest}"
    );
}
