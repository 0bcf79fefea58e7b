//! Layer-4 mode: TLS terminated with the same policy and forced key updates, then bytes
//! relayed to a `protocol: tcp` upstream, half-closes passed on both ways.

mod common;
use common::*;

use ephemera::config::Config;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn tcp_yaml(certs: &Certs, backend: SocketAddr, extra_tls: &str) -> String {
    format!(
        "admin: {{ bind: 127.0.0.1:0 }}\nshutdown_grace: 2s\nlisteners:\n  - name: l4\n    bind: 127.0.0.1:0\n    mode: tcp\n    tcp: {{ upstream: echo, idle_timeout: 30s }}\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\n{extra_tls}upstreams:\n  echo: {{ protocol: tcp, servers: [{backend}] }}\n",
        yaml_path(&certs.cert),
        yaml_path(&certs.key)
    )
}

/// Echoes everything until EOF, then closes its write side.
async fn start_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn connect(
    proxy: &Proxy,
    certs: &Certs,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    // No ALPN at all: a TCP-mode listener must not require one.
    tls_connect(proxy.addr, "localhost", client_config(&certs.ca_der(), &[]))
        .await
        .unwrap()
}

async fn echo_through(proxy: &Proxy, certs: &Certs, len: usize) {
    let tls = connect(proxy, certs).await;
    let (mut r, mut w) = tokio::io::split(tls);
    let data = pattern(0, len);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        // close_notify + FIN: the backend must see EOF and answer with its own.
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .expect("echo and EOF in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), len);
    assert!(back == data, "echo differs");
}

#[tokio::test]
async fn bytes_are_relayed_both_ways_and_half_close_passes_through() {
    let certs = Certs::new(&["localhost"]);
    let echo = start_echo().await;
    let proxy = Proxy::start(&tcp_yaml(&certs, echo, "")).await;
    echo_through(&proxy, &certs, 1 << 20).await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshakes_total",
            &["listener=\"l4\"", "alpn=\"none\""]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn tcp_mode_rekeys_like_http() {
    let certs = Certs::new(&["localhost"]);
    let echo = start_echo().await;
    let proxy = Proxy::start(&tcp_yaml(
        &certs,
        echo,
        "      key_update: { max_bytes: 64KiB }\n",
    ))
    .await;
    // Lockstep, 128 x 64 KiB out and back: both sides keep sending application data, so
    // no update waits for an answer (a one-way burst would defer after 31 in a row).
    let mut tls = connect(&proxy, &certs).await;
    let mut back = vec![0u8; 64 << 10];
    for i in 0..128 {
        let chunk = pattern(i << 16, 64 << 10);
        tls.write_all(&chunk).await.unwrap();
        tls.read_exact(&mut back).await.unwrap();
        assert!(back == chunk, "chunk {i} differs");
    }
    tls.shutdown().await.unwrap();
    let m = proxy.metrics().await;
    let updates = metric(
        &m,
        "ephemera_tls_key_updates_total",
        &["listener=\"l4\"", "trigger=\"bytes\""],
    );
    // 16 MiB through at 64 KiB: about 256.
    assert!(updates >= 200.0, "forced updates: {updates}");
    assert_eq!(
        metric(&m, "ephemera_tls_key_update_failures_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn a_backend_that_closes_first_still_gets_the_clients_later_bytes() {
    let certs = Certs::new(&["localhost"]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        w.write_all(b"hello\n").await.unwrap();
        w.shutdown().await.unwrap();
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).await.unwrap();
        *sink.lock().unwrap() = buf;
    });
    let proxy = Proxy::start(&tcp_yaml(&certs, backend, "")).await;
    let tls = connect(&proxy, &certs).await;
    let (mut r, mut w) = tokio::io::split(tls);
    let mut banner = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut banner))
        .await
        .expect("banner and EOF")
        .unwrap();
    assert_eq!(banner, b"hello\n");
    // Our read side is closed; the write side is still open.
    w.write_all(b"bye\n").await.unwrap();
    w.shutdown().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the backend never got the bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(&got.lock().unwrap()[..], b"bye\n");
}

#[tokio::test]
async fn no_backend_closes_the_client_and_counts_the_error() {
    let certs = Certs::new(&["localhost"]);
    let dead = closed_port().await;
    let proxy = Proxy::start(&tcp_yaml(&certs, dead, "")).await;
    let mut tls = connect(&proxy, &certs).await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(n.is_ok_and(|n| n == 0) || buf.is_empty());
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_upstream_errors_total",
            &["upstream=\"echo\"", "kind=\"connect\""]
        ),
        1.0
    );
}

#[test]
fn tcp_mode_config_errors_name_the_key() {
    let certs = Certs::new(&["localhost"]);
    let base = tcp_yaml(&certs, "127.0.0.1:9".parse().unwrap(), "");
    let err = |yaml: &str| Config::parse(yaml, "t.yaml").unwrap_err().to_string();

    let e = err(&base.replace("protocol: tcp", "protocol: http1"));
    assert!(
        e.contains("listeners[0].tcp.upstream") && e.contains("protocol: tcp"),
        "{e}"
    );
    let e = err(&base.replace("    mode: tcp\n", ""));
    assert!(
        e.contains("listeners[0].tcp") && e.contains("mode: tcp"),
        "{e}"
    );
    let e = err(&base.replace("mode: tcp", "mode: udp"));
    assert!(e.contains("listeners[0].mode") && e.contains("udp"), "{e}");
    let e = err(&(base
        .clone()
        .replace("upstreams:", "    routes: [{ respond: {} }]\nupstreams:")));
    assert!(e.contains("listeners[0].routes"), "{e}");
    // An HTTP route cannot point at a tcp upstream.
    let http = config_yaml(&certs, None, "", "", "")
        .replace("respond: { status: 200 }", "upstream: echo")
        + "upstreams:\n  echo: { protocol: tcp, servers: [127.0.0.1:9] }\n";
    let e = err(&http);
    assert!(
        e.contains("routes[0].upstream") && e.contains("protocol tcp"),
        "{e}"
    );
}
