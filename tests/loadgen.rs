//! `ephemera loadgen` end to end, the binary against real servers over loopback: the proxy
//! in-process (its /metrics must agree with the report), `ephemera serve` as a child (for a
//! real --server-pid), a ticket-issuing rustls server, a TLS 1.2-only server, servers that
//! stall or answer with something other than HTTP, and a closed port. The report is read as
//! JSON (--json); errors must be kinds in the report, not panics.

mod common;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

/// One finished loadgen run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// A finished run; panics if loadgen panicked.
    fn from_output(out: std::process::Output) -> Run {
        let run = Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        run.assert_no_panic();
        run
    }

    /// The report (--json); panics with the output when it does not parse.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "loadgen panicked:\n{}",
            self.stderr
        );
    }
}

/// `ephemera loadgen ARGS` started, output piped (two threads unless ARGS say otherwise).
fn spawn_loadgen(args: &[&str]) -> tokio::process::Child {
    let threads: &[&str] = if args.contains(&"--threads") {
        &[]
    } else {
        &["--threads", "2"]
    };
    Command::new(bin())
        .arg("loadgen")
        .args(threads)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn loadgen(args: &[&str]) -> Run {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        spawn_loadgen(args).wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("loadgen {args:?} did not finish within 30 s"))
    .unwrap();
    Run::from_output(out)
}

fn ca_file(certs: &Certs) -> String {
    certs.dir.path().join("ca.crt").display().to_string()
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", addr.port())
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

async fn proxy(certs: &Certs) -> Proxy {
    Proxy::start(&config_yaml(certs, None, "", "", "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_mode_makes_exactly_n_full_handshakes_and_the_proxy_agrees() {
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs).await;
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    let pid = std::process::id().to_string();
    let run = loadgen(&[
        &url(proxy.addr, "/"),
        "--mode",
        "handshake",
        "-n",
        "50",
        "-c",
        "4",
        "--ca",
        &ca_file(&certs),
        "--json",
        "--metrics",
        &metrics_url,
        "--server-pid",
        &pid,
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["attempts"]), 50, "{r:#}");
    assert_eq!(n(&r["handshakes"]), 50);
    assert_eq!(n(&r["requests"]), 50);
    assert_eq!(n(&r["status"]["2xx"]), 50);
    assert_eq!(n(&r["errors"]["total"]), 0);
    assert_eq!(n(&r["resumed_handshakes"]), 0);
    assert_eq!(n(&r["session_tickets_received"]), 0);
    assert_eq!(n(&r["negotiated"]["handshake_kind"]["full"]), 50);
    assert_eq!(n(&r["negotiated"]["group"]["x25519"]), 50);
    assert_eq!(
        n(&r["negotiated"]["cipher_suite"]["TLS13_AES_128_GCM_SHA256"]),
        50
    );
    assert_eq!(r["certificate_verification"], "ca_file");
    for h in ["tcp_connect", "tls_handshake", "request"] {
        let s = &r["latency_us"][h];
        assert_eq!(n(&s["count"]), 50, "{h}: {s}");
        assert!(n(&s["p50"]) <= n(&s["p99"]) && n(&s["p99"]) <= n(&s["max"]));
        assert!(s["p99.9"].is_u64() && s["p90"].is_u64());
    }
    assert!(r["handshakes_per_s"].as_f64().unwrap() > 0.0);

    // The server's own view, scraped by loadgen and read here directly.
    let m = &r["server_metrics"];
    assert_eq!(n(&m["handshakes"]), 50, "{m}");
    assert_eq!(n(&m["resumed_handshakes"]), 0);
    assert_eq!(n(&m["handshake_failures"]), 0);
    assert_eq!(m["ephemera_metrics_found"], true);
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "ephemera_tls_handshakes_total", &[]), 50.0);
    assert_eq!(
        metric(&text, "ephemera_tls_resumed_handshakes_total", &[]),
        0.0
    );

    // The in-process proxy shares this test's pid: the figures exist and add up.
    let cpu = &r["server_cpu"];
    assert_eq!(cpu["pid"].as_u64(), Some(u64::from(std::process::id())));
    let per = &cpu["per_handshake_us"];
    let (user, system, total) = (
        per["user"].as_f64().unwrap(),
        per["system"].as_f64().unwrap(),
        per["total"].as_f64().unwrap(),
    );
    assert!((user + system - total).abs() < 0.2, "{cpu}");
    assert!(cpu["per_request_us"]["total"].is_f64(), "{cpu}");
    assert!(r["client_cpu"]["cores_busy"].is_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_mode_over_http2_keeps_two_connections_with_four_streams() {
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs).await;
    // One thread: loadgen's current-thread runtime (the other tests use two threads).
    let run = loadgen(&[
        &url(proxy.addr, "/"),
        "--threads",
        "1",
        "--mode",
        "requests",
        "--alpn",
        "h2",
        "--streams",
        "4",
        "-c",
        "2",
        "-n",
        "200",
        "--ca",
        &ca_file(&certs),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["requests"]), 200, "{r:#}");
    assert_eq!(n(&r["handshakes"]), 2);
    assert_eq!(n(&r["negotiated"]["alpn"]["h2"]), 2);
    assert_eq!(n(&r["latency_us"]["request"]["count"]), 200);
    assert_eq!(n(&r["latency_us"]["tls_handshake"]["count"]), 2);
    assert_eq!(r["streams"], 4);
    assert_eq!(r["threads"], 1);
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "ephemera_tls_handshakes_total", &[]), 2.0);
    assert_eq!(
        metric(
            &text,
            "ephemera_http_requests_total",
            &["version=\"HTTP/2\""]
        ),
        200.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_mode_over_http1_sends_the_bodies_through_to_a_backend() {
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    let run = loadgen(&[
        &url(proxy.addr, "/hash"),
        "--mode",
        "requests",
        "--alpn",
        "http/1.1",
        "--method",
        "POST",
        "--body-size",
        "1KiB",
        "-c",
        "2",
        "-n",
        "20",
        "--ca",
        &ca_file(&certs),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["requests"]), 20, "{r:#}");
    assert_eq!(n(&r["handshakes"]), 2);
    assert_eq!(n(&r["negotiated"]["alpn"]["http/1.1"]), 2);
    // The backend answers "LEN SHA256" for each body: 1024 zero bytes arrived every time.
    let answer = format!("1024 {}", sha256(&[0u8; 1024]));
    assert_eq!(
        n(&r["response_body_bytes"]),
        20 * answer.len() as u64,
        "{r:#}"
    );
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "ephemera_http_requests_total",
            &["version=\"HTTP/1.1\"", "status_class=\"2xx\""]
        ),
        20.0
    );
}

/// A server that closes keep-alive connections (here: `tls.max_connection_age`, GOAWAY or
/// `Connection: close`) is not failing requests: a request whose connection closed while it
/// waited for its start time goes on the next connection. Every request is answered and
/// the proxy counts exactly as many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_connections_the_server_closes_are_sent_on_new_ones() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "      max_connection_age: 1s\n      max_connection_age_grace: 5s\n",
        "",
        "",
    ))
    .await;
    for (alpn, streams, version) in [("h2", "4", "HTTP/2"), ("http/1.1", "1", "HTTP/1.1")] {
        let run = loadgen(&[
            &url(proxy.addr, "/"),
            "--mode",
            "requests",
            "--alpn",
            alpn,
            "--streams",
            streams,
            "-c",
            "2",
            "--rate",
            "100",
            "-n",
            "300",
            "--ca",
            &ca_file(&certs),
            "--json",
        ])
        .await;
        let r = run.json();
        assert_eq!(n(&r["errors"]["total"]), 0, "{alpn}: {r:#}");
        assert_eq!(n(&r["requests"]), 300, "{alpn}: {r:#}");
        assert!(
            n(&r["handshakes"]) >= 4,
            "{alpn}: 3 s of 1 s connections, yet {} handshakes",
            r["handshakes"]
        );
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let text = proxy.metrics().await;
        assert_eq!(
            metric(
                &text,
                "ephemera_http_requests_total",
                &[&format!("version=\"{version}\"")]
            ),
            300.0,
            "{alpn}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_rate_paces_the_requests() {
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs).await;
    let run = loadgen(&[
        &url(proxy.addr, "/"),
        "--rate",
        "100",
        "-n",
        "20",
        "-c",
        "2",
        "--ca",
        &ca_file(&certs),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["requests"]), 20, "{r:#}");
    assert_eq!(r["rate"].as_f64(), Some(100.0));
    // Twenty starts 10 ms apart: the last starts 190 ms in.
    let elapsed = r["elapsed_s"].as_f64().unwrap();
    assert!((0.18..5.0).contains(&elapsed), "elapsed {elapsed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_latency_counts_from_the_intended_start_when_the_server_is_slow() {
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", "")).await;
    // Each response takes 200 ms; one connection, a request due every 20 ms: the tenth is
    // due at 180 ms but can start only at ~1.8 s. A closed-loop client would report 200 ms for
    // all of them (coordinated omission); from the intended start the queue shows.
    let run = loadgen(&[
        &url(proxy.addr, "/slow/200"),
        "--mode",
        "requests",
        "--alpn",
        "http/1.1",
        "--rate",
        "50",
        "-n",
        "10",
        "-c",
        "1",
        "--ca",
        &ca_file(&certs),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    let latency = &r["latency_us"]["request"];
    assert_eq!(n(&latency["count"]), 10, "{r:#}");
    assert!(n(&latency["min"]) >= 200_000, "{latency}");
    assert!(n(&latency["max"]) >= 1_500_000, "{latency}");
    assert!(n(&latency["p50"]) >= 800_000, "{latency}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_mode_runs_for_the_duration_and_prints_a_text_report() {
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs).await;
    let started = Instant::now();
    let run = loadgen(&[
        &url(proxy.addr, "/"),
        "--mode",
        "requests",
        "-d",
        "1s",
        "-c",
        "2",
        "--ca",
        &ca_file(&certs),
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(started.elapsed() >= Duration::from_secs(1));
    let out = &run.stdout;
    for line in [
        "requests mode, 2 connections",
        "handshakes     2 ",
        "tls handshake",
        "p99.9",
        "cipher suite TLS13_AES_128_GCM_SHA256 2",
        "kind         full 2",
        "resumed      0 (",
        "min      mean",
        "body bytes)",
        "requests attempted",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    // Nothing but warnings on stderr when it is not a terminal (no progress line).
    assert!(run.stderr.trim().is_empty(), "{}", run.stderr);
}

#[tokio::test]
async fn a_refused_connection_is_an_error_kind_and_exits_non_zero() {
    let port = closed_port().await;
    let run = loadgen(&[
        &format!("https://127.0.0.1:{}/", port.port()),
        "-n",
        "5",
        "--insecure",
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["errors"]["by_kind"]["connect_refused"]), 5, "{r:#}");
    assert_eq!(n(&r["errors"]["total"]), 5);
    assert_eq!(n(&r["requests"]), 0);
    assert_eq!(n(&r["attempts"]), 5);
    assert!(
        run.stderr.contains("every request failed") && run.stderr.contains("connect_refused"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("verification is OFF"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_bad_certificate_and_insecure_accepts_it() {
    let certs = Certs::new(&["localhost"]);
    let other = Certs::new(&["localhost"]);
    let proxy = proxy(&certs).await;
    let run = loadgen(&[
        &url(proxy.addr, "/"),
        "-n",
        "4",
        "--ca",
        &ca_file(&other),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let r = run.json();
    assert_eq!(
        n(&r["errors"]["tls_handshake"]["bad_certificate"]),
        4,
        "{r:#}"
    );
    assert_eq!(n(&r["errors"]["by_kind"]["tls_handshake"]), 4);
    assert!(
        run.stderr.contains("tls_handshake (bad_certificate)") && run.stderr.contains("--ca"),
        "{}",
        run.stderr
    );

    let run = loadgen(&[&url(proxy.addr, "/"), "-n", "4", "--insecure", "--json"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("verification is OFF"), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["requests"]), 4, "{r:#}");
    assert_eq!(r["certificate_verification"], "off");
}

/// What a test server does with a connection once its TLS handshake is done.
#[derive(Clone, Copy)]
enum Then {
    /// Close it.
    Close,
    /// Read the request and never answer it (a stalled server).
    Stall,
    /// Read the request and answer with bytes that are not HTTP.
    NotHttp,
}

/// A rustls server speaking `versions`, without ALPN (so loadgen speaks HTTP/1.1 to it).
async fn start_rustls_server(
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
    then: Then,
) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certs.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                if let Then::Close = then {
                    return;
                }
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if matches!(then, Then::NotHttp) && seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        seen.clear();
                        let _ = tls.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
                        let _ = tls.flush().await;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP server that accepts and never says anything (no TLS at all).
async fn start_mute_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_only_server_is_protocol_version() {
    let certs = Certs::new(&["localhost"]);
    let addr = start_rustls_server(&certs, &[&rustls::version::TLS12], Then::Close).await;
    let run = loadgen(&[
        &url(addr, "/"),
        "-n",
        "3",
        "--ca",
        &ca_file(&certs),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let r = run.json();
    assert_eq!(
        n(&r["errors"]["tls_handshake"]["protocol_version"]),
        3,
        "{r:#}"
    );
    assert!(run.stderr.contains("TLS 1.3"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_from_a_ticketing_server_are_counted_and_never_used() {
    let certs = Certs::new(&["localhost"]);
    let addr = start_ticketing_server(&certs).await;
    let run = loadgen(&[
        &url(addr, "/"),
        "-n",
        "5",
        "-c",
        "1",
        "--ca",
        &ca_file(&certs),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["requests"]), 5, "{r:#}");
    // rustls sends two tickets per handshake; none is ever offered back.
    assert_eq!(n(&r["session_tickets_received"]), 10, "{r:#}");
    assert_eq!(n(&r["resumed_handshakes"]), 0);
    assert_eq!(n(&r["negotiated"]["handshake_kind"]["full"]), 5);
    // No ALPN from that server: spoken as HTTP/1.1.
    assert_eq!(n(&r["negotiated"]["alpn"]["none"]), 5);
}

/// `ephemera serve` (embedded default) as a child on port 0: (child, TLS addr, admin addr).
async fn spawn_serve() -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("EPHEMERA_LOG", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut tls, mut admin) = (None, None);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let addr = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("addr="))
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if line.contains("admin listening") {
                admin = addr;
            } else if line.contains("listening (TLS 1.3)") {
                tls = addr;
            }
            if tls.is_some() && admin.is_some() {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "serve logged no addresses within 20 s");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, tls.unwrap(), admin.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pid_and_metrics_report_the_serving_process() {
    let (child, addr, admin) = spawn_serve().await;
    let pid = child.id().unwrap().to_string();
    let metrics_url = format!("http://{admin}/metrics");
    let args = [
        &url(addr, "/"),
        "-n",
        "30",
        "-c",
        "2",
        "--insecure",
        "--server-pid",
        &pid,
        "--metrics",
        &metrics_url,
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let run = loadgen(&json_args).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    assert_eq!(n(&r["handshakes"]), 30, "{r:#}");
    assert_eq!(n(&r["server_metrics"]["handshakes"]), 30, "{r:#}");
    assert_eq!(n(&r["server_metrics"]["resumed_handshakes"]), 0);
    assert_eq!(n(&r["server_metrics"]["http_requests"]), 30);
    let cpu = &r["server_cpu"];
    assert_eq!(cpu["pid"].as_u64(), Some(u64::from(child.id().unwrap())));
    for field in ["user", "system", "total"] {
        assert!(cpu["per_handshake_us"][field].is_f64(), "{cpu}");
        assert!(cpu["per_request_us"][field].is_f64(), "{cpu}");
    }
    assert!(cpu["user_us"].is_u64() && cpu["system_us"].is_u64());

    let run = loadgen(&args).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for line in [
        format!("server CPU (pid {pid})"),
        "per handshake".to_string(),
        "handshakes 30, failures 0, resumed 0, http requests 30".to_string(),
    ] {
        assert!(
            run.stdout.contains(&line),
            "no {line:?} in:\n{}",
            run.stdout
        );
    }
}

/// The first Ctrl-C (SIGINT) stops starting requests and reports what was done; it does not
/// wait for the 60 s the run was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_run_and_reports() {
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs).await;
    let child = spawn_loadgen(&[
        &url(proxy.addr, "/"),
        "-d",
        "60s",
        "-c",
        "2",
        "--json",
        "--ca",
        &ca_file(&certs),
    ]);
    let pid = child.id().unwrap();
    // Until the proxy has served a few requests: the run is under way.
    let started = Instant::now();
    while metric(&proxy.metrics().await, "ephemera_tls_handshakes_total", &[]) < 4.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no load within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::serve::signal(pid, "-INT");
    let run = Run::from_output(
        tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
            .await
            .expect("loadgen did not stop within 15 s of SIGINT")
            .unwrap(),
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let r = run.json();
    assert!(n(&r["requests"]) >= 4, "{r:#}");
    assert_eq!(n(&r["errors"]["total"]), 0, "{r:#}");
    assert!(r["elapsed_s"].as_f64().unwrap() < 30.0, "{r:#}");
}

/// On a terminal the live progress line is drawn on stderr (under util-linux `script`, which
/// gives the command a pseudo-terminal); on a pipe nothing is
/// (`duration_mode_runs_for_the_duration_and_prints_a_text_report`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_line_is_drawn_on_a_terminal() {
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs).await;
    let command = format!(
        "'{}' loadgen '{}' -d 1500ms -c 1 --threads 1 --ca '{}' >/dev/null",
        bin().display(),
        url(proxy.addr, "/"),
        ca_file(&certs)
    );
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("TERM", "xterm")
        .env("SHELL", "/bin/sh")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("script + loadgen did not finish within 30 s")
        .expect("util-linux `script` (bsdutils) must be installed");
    let tty = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{tty}\nstderr: {stderr}");
    assert!(!tty.contains("panicked"), "{tty}");
    assert!(
        tty.contains(" hs ") && tty.contains(" req ") && tty.contains(" err"),
        "no progress line on the terminal:\n{tty:?}\nstderr: {stderr}"
    );
}

/// A server that stalls is reported by phase: `tls_handshake` (timeout) when it never
/// answers the ClientHello, `timeout` when it never answers the request; one that answers
/// with something other than HTTP is `http`. Each is a kind in the report, not a panic. The
/// stalls wait out a 1 s `--timeout`; the non-HTTP answer gets 10 s, so that a slow debug
/// build under the parallel suite cannot turn it into a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_non_http_servers_are_error_kinds() {
    let certs = Certs::new(&["localhost"]);
    let ca = ca_file(&certs);
    let mute = start_mute_server().await;
    let stall = start_rustls_server(&certs, &[&rustls::version::TLS13], Then::Stall).await;
    let not_http = start_rustls_server(&certs, &[&rustls::version::TLS13], Then::NotHttp).await;
    for (addr, kind, sub, timeout) in [
        (mute, "tls_handshake", Some("timeout"), "1s"),
        (stall, "timeout", None, "1s"),
        (not_http, "http", None, "10s"),
    ] {
        let run = loadgen(&[
            &url(addr, "/"),
            "-n",
            "2",
            "-c",
            "1",
            "--timeout",
            timeout,
            "--ca",
            &ca,
            "--json",
        ])
        .await;
        assert_eq!(run.code, Some(1), "{kind}: {}", run.stderr);
        let r = run.json();
        assert_eq!(n(&r["errors"]["by_kind"][kind]), 2, "{kind}: {r:#}");
        if let Some(sub) = sub {
            assert_eq!(n(&r["errors"]["tls_handshake"][sub]), 2, "{r:#}");
        }
        assert_eq!(n(&r["requests"]), 0, "{r:#}");
        assert!(
            run.stderr.contains(&format!("with {kind}")),
            "{kind}: {}",
            run.stderr
        );
    }
}

/// `--group` offers that group only, so it is the one negotiated, for each of the four
/// (the proxy allows all four here); `--sni` is the name sent and verified: the URL's host is
/// an address the certificate does not cover, and `--sni localhost` makes the run succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_group_is_negotiated_when_asked_for_and_sni_is_the_name_verified() {
    let certs = Certs::new(&["localhost"]);
    let ca = ca_file(&certs);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "      groups: [x25519, secp256r1, secp384r1, x25519mlkem768]\n",
        "",
        "",
    ))
    .await;
    for group in ["x25519", "secp256r1", "secp384r1", "x25519mlkem768"] {
        let run = loadgen(&[
            &url(proxy.addr, "/"),
            "-n",
            "3",
            "-c",
            "1",
            "--group",
            group,
            "--ca",
            &ca,
            "--json",
        ])
        .await;
        assert_eq!(run.code, Some(0), "{group}: {}", run.stderr);
        let r = run.json();
        assert_eq!(n(&r["negotiated"]["group"][group]), 3, "{group}: {r:#}");
        assert_eq!(r["offered_groups"], serde_json::json!([group]), "{r:#}");
    }

    let by_address = format!("https://127.0.0.1:{}/", proxy.addr.port());
    let run = loadgen(&[&by_address, "-n", "2", "-c", "1", "--ca", &ca, "--json"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let r = run.json();
    assert_eq!(
        n(&r["errors"]["tls_handshake"]["bad_certificate"]),
        2,
        "{r:#}"
    );
    let run = loadgen(&[
        &by_address,
        "-n",
        "2",
        "-c",
        "1",
        "--sni",
        "localhost",
        "--ca",
        &ca,
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(n(&run.json()["requests"]), 2);
}

#[tokio::test]
async fn options_that_cannot_run_are_refused_with_a_message() {
    for (args, needle) in [
        (&["https://localhost:1/", "--streams", "4"][..], "--streams"),
        (&["http://localhost:1/"], "https://"),
        (&["https://localhost:1/", "--group", "ffdhe2048"], "x25519"),
        (
            &["https://localhost:1/", "--ca", "/nonexistent/ca.pem"],
            "--ca",
        ),
        // Past their bounds the first three overflowed a deadline (a panic, and exit 0) and
        // the last asked for that many OS threads.
        (
            &["https://localhost:1/", "--timeout", "500000000000years"],
            "--timeout: at most 24 hours",
        ),
        (
            &["https://localhost:1/", "-d", "500000000000years"],
            "--duration: at most 366 days",
        ),
        (
            &["https://localhost:1/", "--rate", "1e-300"],
            "--rate: at least 0.001",
        ),
        (
            &["https://localhost:1/", "--threads", "100000000"],
            "--threads: at most 1024",
        ),
    ] {
        let run = loadgen(args).await;
        assert!(matches!(run.code, Some(1 | 2)), "{args:?}: {:?}", run.code);
        assert!(run.stderr.contains(needle), "{args:?}:\n{}", run.stderr);
    }
}
