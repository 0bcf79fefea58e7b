//! Forced TLS 1.3 KeyUpdate, proved on the wire: `openssl s_client -keylogfile` appends a
//! `SERVER_TRAFFIC_SECRET_N` line for every KeyUpdate it receives (OpenSSL 3.x), an
//! independent count to hold our metrics against. Also rustls and hyper HTTP/2 clients across
//! hundreds of updates, the time trigger on an idle connection, and a client-initiated update.

mod common;
use common::*;
use http_body_util::BodyExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

fn have_openssl() -> bool {
    let ok = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok();
    if !ok && std::env::var_os("CI").is_some() {
        panic!("openssl is required in CI");
    }
    ok
}

fn rekey_yaml(certs: &Certs, backend: std::net::SocketAddr, key_update: &str) -> String {
    config_yaml(
        certs,
        Some(&[backend]),
        &format!("      key_update: {key_update}\n"),
        "      max_request_body: 2GiB\n",
        "",
    )
}

/// Forced updates the client saw. OpenSSL 3.0 appends `SERVER_TRAFFIC_SECRET_N <random>
/// <secret>` (a literal N) for each KeyUpdate it receives; numbered forms (`_1`, `_2`, …) are
/// counted too in case a version writes those.
fn updates_in_keylog(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("SERVER_TRAFFIC_SECRET_"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|n| *n == "N" || n.parse::<u32>().is_ok_and(|n| n >= 1))
        .count()
}

/// Runs `openssl s_client` over TLS 1.3 feeding `input` (then `delay_before_input` of
/// silence first); returns everything the server sent as plaintext.
async fn s_client(
    proxy: &Proxy,
    certs: &Certs,
    keylog: &Path,
    input: Vec<u8>,
    delay_before_input: Duration,
) -> Vec<u8> {
    let ca = certs.dir.path().join("ca.crt");
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.addr.to_string(),
            "-servername",
            "localhost",
            "-tls1_3",
            "-alpn",
            "http/1.1",
            "-quiet",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(&ca)
        .arg("-keylogfile")
        .arg(keylog)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(delay_before_input).await;
        let _ = stdin.write_all(&input).await;
        // Keep stdin open: s_client exits when the server closes (Connection: close).
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stdin);
    });
    let mut out = Vec::new();
    let mut stdout = child.stdout.take().unwrap();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_end(&mut out))
        .await
        .expect("s_client finished")
        .unwrap();
    writer.abort();
    let _ = child.wait().await;
    out
}

fn split_response(raw: &[u8]) -> (String, &[u8]) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    (
        String::from_utf8_lossy(&raw[..end]).to_string(),
        &raw[end..],
    )
}

async fn key_updates_metric(proxy: &Proxy) -> f64 {
    metric(
        &proxy.metrics().await,
        "ephemera_tls_key_updates_total",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_64mib_with_1mib_limit_arrives_whole_with_31_updates_then_deferral() {
    if !have_openssl() {
        return;
    }
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 1MiB }")).await;
    let keylog = certs.dir.path().join("download.keylog");
    let len = 64 * MIB;
    let req = format!("GET /bytes/{len} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .into_bytes();
    let raw = s_client(&proxy, &certs, &keylog, req, Duration::ZERO).await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body.len(), len, "download truncated");
    assert_eq!(sha256(body), sha256(&pattern(0, len)));
    // A silent client: 31 updates, the rest deferred (our rustls would abort at the 33rd).
    let seen = updates_in_keylog(&keylog);
    assert_eq!(seen, 31, "updates the client saw");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_tls_key_updates_total", &["trigger=\"bytes\""]),
        seen as f64
    );
    assert_eq!(
        metric(&m, "ephemera_tls_key_updates_deferred_total", &[]),
        1.0
    );
    assert_eq!(
        metric(&m, "ephemera_tls_key_update_failures_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_64mib_with_1mib_limit_arrives_whole() {
    if !have_openssl() {
        return;
    }
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 1MiB }")).await;
    let keylog = certs.dir.path().join("upload.keylog");
    let len = 64 * MIB;
    let mut req = format!("POST /hash HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n").into_bytes();
    req.extend(pattern(0, len));
    let raw = s_client(&proxy, &certs, &keylog, req, Duration::ZERO).await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        String::from_utf8_lossy(body),
        format!("{len} {}", sha256(&pattern(0, len)))
    );
    // The client receives nothing from us during the upload: 31, then one more once the
    // response flows.
    let seen = updates_in_keylog(&keylog);
    assert!(seen == 31 || seen == 32, "updates the client saw: {seen}");
    assert_eq!(key_updates_metric(&proxy).await, seen as f64);
}

/// Python's `ssl` module writes the whole upload before reading anything, so it answers every
/// update forced during the upload only after its last byte of data. The updates forced
/// during the response must then wait, or our rustls sees 33 KeyUpdates in a row and aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_uploads_before_reading_gets_the_whole_response() {
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok();
    if !python {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 is required in CI"
        );
        return;
    }
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 64KiB }")).await;
    let (up, down) = (8 * MIB, 32 * MIB);
    let script = format!(
        r#"
import hashlib, socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="localhost")
s.sendall(b"POST /bytes/{down} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {up}\r\nConnection: close\r\n\r\n")
s.sendall(b"u" * {up})
data = bytearray()
while True:
    try:
        chunk = s.recv(1 << 20)
    except (ssl.SSLError, OSError) as e:
        print("ERROR", e, len(data))
        break
    if not chunk:
        break
    data += chunk
head, _, body = bytes(data).partition(b"\r\n\r\n")
print(head.split(b"\r\n")[0].decode(), len(body), hashlib.sha256(body).hexdigest())
"#,
        port = proxy.addr.port()
    );
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(certs.dir.path().join("ca.crt"))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("HTTP/1.1 200 OK {down} {}", sha256(&pattern(0, down))),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_tls_key_update_failures_total", &[]),
        0.0
    );
    assert!(metric(&m, "ephemera_tls_key_updates_total", &[]) >= 31.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_rekeyed_by_age_and_keeps_working() {
    if !have_openssl() {
        return;
    }
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_age: 1s }")).await;
    let keylog = certs.dir.path().join("idle.keylog");
    let req = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec();
    let raw = s_client(&proxy, &certs, &keylog, req, Duration::from_millis(5500)).await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"backend ok");
    let seen = updates_in_keylog(&keylog);
    assert!(seen >= 3, "updates the silent client saw: {seen}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_tls_key_updates_total", &["trigger=\"age\""]),
        seen as f64
    );
}

/// Eight 8 MiB downloads on one keep-alive connection, each request written by `s_client`
/// only after the previous response has arrived in full: each request is client data, so the
/// in-a-row count restarts and the client sees well over 31 updates in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_sequential_downloads_see_well_over_31_updates() {
    if !have_openssl() {
        return;
    }
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 1MiB }")).await;
    let keylog = certs.dir.path().join("sequential.keylog");
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.addr.to_string(),
            "-servername",
            "localhost",
            "-tls1_3",
            "-alpn",
            "http/1.1",
            "-quiet",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(certs.dir.path().join("ca.crt"))
        .arg("-keylogfile")
        .arg(&keylog)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let len = 8 * MIB;
    let want = sha256(&pattern(0, len));
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    for i in 0..8 {
        stdin
            .write_all(format!("GET /bytes/{len} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
        // Read exactly one response: head, then content-length bytes.
        let head_end = loop {
            if let Some(p) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "s_client ended during response {i}");
            pending.extend_from_slice(&buf[..n]);
        };
        assert!(pending.starts_with(b"HTTP/1.1 200"), "response {i}");
        while pending.len() < head_end + len {
            let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "s_client ended during body {i}");
            pending.extend_from_slice(&buf[..n]);
        }
        assert_eq!(sha256(&pending[head_end..head_end + len]), want, "body {i}");
        pending.drain(..head_end + len);
    }
    drop(stdin);
    let _ = child.kill().await;
    let seen = updates_in_keylog(&keylog);
    assert!(seen > 31, "updates the client saw: {seen}");
    assert_eq!(key_updates_metric(&proxy).await, seen as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_downloads_on_one_connection_exceed_31_updates_intact() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 1MiB }")).await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), false).await;
    let len = 8 * MIB;
    for i in 0..8 {
        // Each request is client data: it resets the in-a-row count.
        let resp = c
            .send(request("GET", &format!("/bytes/{len}"), empty()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (n, h) = hash_body(resp.into_body()).await;
        assert_eq!((n, h), (len, sha256(&pattern(0, len))), "download {i}");
    }
    let updates = key_updates_metric(&proxy).await;
    assert!(updates > 31.0, "{updates} updates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_and_h2_clients_survive_hundreds_of_updates_both_ways() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 64KiB }")).await;
    for h2 in [false, true] {
        let before = key_updates_metric(&proxy).await;
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        for round in 0..4 {
            // A rustls client aborts at the 33rd KeyUpdate it receives without data: the
            // upload checks our count of what the client received.
            let len = 6 * MIB + round;
            let resp = c
                .send(request("POST", "/hash", pattern_body(len)))
                .await
                .unwrap();
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                String::from_utf8_lossy(&got),
                format!("{len} {}", sha256(&pattern(0, len))),
                "h2={h2} upload {round}"
            );
            let resp = c
                .send(request("GET", &format!("/bytes/{len}"), empty()))
                .await
                .unwrap();
            let (n, h) = hash_body(resp.into_body()).await;
            assert_eq!(
                (n, h),
                (len, sha256(&pattern(0, len))),
                "h2={h2} download {round}"
            );
        }
        let updates = key_updates_metric(&proxy).await - before;
        assert!(updates >= 200.0, "h2={h2}: only {updates} updates");
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_tls_key_update_failures_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_initiated_key_update_is_answered_and_the_connection_goes_on() {
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "false")).await;
    let mut tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    async fn get(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.ends_with(b"backend ok") {
            let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        got
    }
    assert!(get(&mut tls).await.starts_with(b"HTTP/1.1 200"));
    for _ in 0..5 {
        // Our sending key rotates now; the proxy must answer with its own update before the
        // response, which rustls then decrypts under the peer's new key.
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        assert!(get(&mut tls).await.starts_with(b"HTTP/1.1 200"));
    }
    assert_eq!(
        key_updates_metric(&proxy).await,
        0.0,
        "key_update: false forces none"
    );
}

/// `len` bytes each way over HTTP/1.1 and HTTP/2 with a 1 MiB threshold, sha256 compared.
async fn both_ways(len: usize) {
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 1MiB }")).await;
    for h2 in [false, true] {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
        let resp = c
            .send(request("POST", "/hash", pattern_body(len)))
            .await
            .unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&got),
            format!("{len} {}", sha256(&pattern(0, len))),
            "h2={h2}"
        );
        let resp = c
            .send(request("GET", &format!("/bytes/{len}"), empty()))
            .await
            .unwrap();
        assert_eq!(
            hash_body(resp.into_body()).await,
            (len, sha256(&pattern(0, len))),
            "h2={h2}"
        );
    }
    let m = proxy.metrics().await;
    assert!(metric(&m, "ephemera_tls_key_updates_total", &[]) >= 62.0);
    assert_eq!(
        metric(&m, "ephemera_tls_key_update_failures_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_both_ways_with_1mib_threshold() {
    let _serial = serial().await;
    both_ways(64 * MIB).await;
}

/// Run with `cargo test --release --test rekey -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "1 GiB each way; run by hand"]
async fn one_gib_both_ways_with_1mib_threshold() {
    both_ways(1024 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_downloads_with_rekeying_arrive_whole_before_the_close() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&rekey_yaml(&certs, backend, "{ max_bytes: 1MiB }")).await;
    let mut tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    // 30 MiB in all: 30 updates, under the in-a-row limit, so they continue to the end.
    let len = 5 * MIB;
    let n = 6;
    let mut reqs = String::new();
    for i in 0..n {
        let close = if i == n - 1 {
            "Connection: close\r\n"
        } else {
            ""
        };
        reqs.push_str(&format!(
            "GET /bytes/{len} HTTP/1.1\r\nHost: localhost\r\n{close}\r\n"
        ));
    }
    // All requests at once; the client then only reads (answering our KeyUpdates) and the
    // proxy closes after the last response. The lingering close itself is proved in
    // tests/connection.rs, which fails without it; this checks the rekeying path up to the
    // close, with a reader that falls behind at the end.
    tls.write_all(reqs.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let slow_from = n * len - 14 * MIB;
    loop {
        if raw.len() >= slow_from {
            // A slow reader: the proxy's socket keeps a queue until after it has closed.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let r = tokio::time::timeout(Duration::from_secs(60), tls.read(&mut buf))
            .await
            .unwrap();
        match r {
            Ok(0) => break,
            Ok(k) => raw.extend_from_slice(&buf[..k]),
            Err(e) => panic!(
                "read failed after {} of about {} bytes: {e}",
                raw.len(),
                n * len
            ),
        }
        // Send our KeyUpdate answers now, as OpenSSL does (tokio-rustls writes records only
        // on write/flush).
        let _ = tls.flush().await;
    }
    let mut rest = &raw[..];
    let want = sha256(&pattern(0, len));
    for i in 0..n {
        let (head, body) = split_response(rest);
        assert!(head.starts_with("HTTP/1.1 200"), "response {i}: {head}");
        assert!(
            body.len() >= len,
            "response {i} truncated: {} of {len}",
            body.len()
        );
        assert_eq!(sha256(&body[..len]), want, "response {i}");
        rest = &body[len..];
    }
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_do_not_keep_an_idle_connection_open() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let yaml = rekey_yaml(&certs, backend, "{ max_age: 1s }").replace(
        "      max_request_body: 2GiB\n",
        "      idle_timeout: 2500ms\n",
    );
    let proxy = Proxy::start(&yaml).await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    assert_eq!(c.get("/").await.0, 200);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "ephemera_tls_key_updates_total", &["trigger=\"age\""]) >= 2.0,
        "{m}"
    );
    assert!(
        c.send(request("GET", "/", empty())).await.is_err(),
        "idle_timeout must close despite key updates"
    );
}
