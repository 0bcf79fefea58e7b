//! The `ephemera` binary end to end: `certs` (files, modes, names, chain verification),
//! `check` on the documented example config, `serve` without a config (built-in response and
//! `--upstream`, admin endpoints, SIGTERM exits 0), clap conflicts and help, and graceful
//! shutdown with a request in flight. Tests that need curl skip without it (unless CI is set).

mod common;
use common::serve::{Serve, logged_addr};
use common::*;
use ephemera::Prepared;
use ephemera::config::Config;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/ephemera.yaml");

/// Run the binary to completion (at most 20 s).
async fn run(args: &[&str]) -> Output {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("ephemera {args:?} did not exit within 20 s"))
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether curl can be used; without it the caller skips, except under CI where it panics.
fn have_curl() -> bool {
    let ok = std::process::Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "curl is required for the CLI tests (CI is set)"
        );
        eprintln!("skipping: curl not found");
    }
    ok
}

/// curl against the proxy with `localhost` resolved to its address: the child, not awaited.
fn curl_spawn(addr: SocketAddr, path: &str, extra: &[&str]) -> Child {
    let port = addr.port();
    Command::new("curl")
        .args(["-sS", "-k", "--max-time", "20", "-w", "\n%{http_code}"])
        .arg("--resolve")
        .arg(format!("localhost:{port}:{}", addr.ip()))
        .args(extra)
        .arg(format!("https://localhost:{port}{path}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning curl")
}

/// (HTTP status, body) from a finished curl; panics if curl failed.
async fn curl_result(child: Child) -> (u16, String) {
    let out = tokio::time::timeout(Duration::from_secs(25), child.wait_with_output())
        .await
        .expect("curl did not finish")
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}\n{stdout}",
        text(&out.stderr)
    );
    let (body, code) = stdout.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

async fn curl(addr: SocketAddr, path: &str) -> (u16, String) {
    curl_result(curl_spawn(addr, path, &[])).await
}

#[test]
fn logged_addr_parses_the_listening_lines() {
    let log = "2026-01-01T00:00:00Z  INFO ephemera: listening (TLS 1.3) listener=default addr=127.0.0.1:4433\n\
               2026-01-01T00:00:00Z  INFO ephemera: admin listening (/metrics, /healthz, /readyz) addr=127.0.0.1:9000\n\
               2026-01-01T00:00:01Z  INFO ephemera::listener: stopped accepting listener=default local_addr=127.0.0.1:1\n";
    assert_eq!(
        logged_addr(log, "listening (TLS 1.3)"),
        Some("127.0.0.1:4433".parse().unwrap())
    );
    assert_eq!(
        logged_addr(log, "admin listening"),
        Some("127.0.0.1:9000".parse().unwrap())
    );
    assert_eq!(logged_addr(log, "stopped accepting"), None);
}

// ---------- certs ----------

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Verify `chain_file` (leaf first) for `name` against the CA in `ca_file`.
fn verify(ca_file: &Path, chain_file: &Path, name: &str) -> Result<(), rustls::Error> {
    let ca = CertificateDer::from_pem_file(ca_file).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider()))
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain_file)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

#[tokio::test]
async fn certs_writes_ca_and_leaf_with_private_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = run(&["certs", "--out", out_dir.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    for f in ["ca.crt", "ca.key", "localhost.crt", "localhost.key"] {
        let p = out_dir.join(f);
        assert!(p.is_file(), "{f} missing");
        assert!(
            text(&out.stdout).contains(&p.display().to_string()),
            "{out:?}"
        );
    }
    assert_eq!(mode(&out_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&out_dir.join("localhost.key")), 0o600);
    assert_eq!(
        mode(&out_dir.join("localhost.crt")) & 0o022,
        0,
        "crt writable"
    );
    verify(
        &out_dir.join("ca.crt"),
        &out_dir.join("localhost.crt"),
        "localhost",
    )
    .unwrap();

    // Re-running over existing, loosened key files tightens them again.
    let key = out_dir.join("localhost.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["certs", "--out", out_dir.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&key), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_with_names_verify_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = run(&[
        "certs",
        "--out",
        d.to_str().unwrap(),
        "--name",
        "api.test",
        "--name",
        "other.test",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    for f in ["ca.crt", "ca.key", "api.test.crt", "api.test.key"] {
        assert!(d.join(f).is_file(), "{f} missing");
    }
    assert!(!d.join("localhost.crt").exists());
    assert!(!d.join("other.test.crt").exists());
    assert_eq!(mode(&d.join("api.test.key")), 0o600);

    let (ca, chain) = (d.join("ca.crt"), d.join("api.test.crt"));
    verify(&ca, &chain, "api.test").unwrap();
    verify(&ca, &chain, "other.test").unwrap();
    assert!(
        verify(&ca, &chain, "third.test").is_err(),
        "name not in cert"
    );
    // A different run's CA does not vouch for this leaf.
    let other = tempfile::tempdir().unwrap();
    let out = run(&["certs", "--out", other.path().to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(verify(&other.path().join("ca.crt"), &chain, "api.test").is_err());

    // And a real handshake: the proxy serving these files, a rustls client trusting only
    // ca.crt, SNI other.test.
    let certs = Certs {
        ca_pem: std::fs::read_to_string(&ca).unwrap(),
        cert: chain.clone(),
        key: d.join("api.test.key"),
        dir,
    };
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let tls = tls_connect(
        proxy.addr,
        "other.test",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .expect("handshake with SNI other.test");
    let mut client = HttpClient::over(tls, false).await;
    let req = hyper::Request::get("/")
        .header("host", "other.test")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("TLSv1.3"));
    // The certificate does not cover localhost, but this is HTTP/1.1: no 421 (only
    // HTTP/2 clients reuse connections across names).
    assert_eq!(client.get("/").await.0, 200);
    let refused = tls_connect(
        proxy.addr,
        "third.test",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await;
    assert!(
        refused.is_err(),
        "client accepted a cert not naming third.test"
    );
}

// ---------- the example config ----------

/// The example config with its `certs/` paths pointing into `dir` (where `ephemera certs`
/// wrote them).
fn example_in(dir: &Path) -> String {
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    assert!(example.contains("cert: certs/localhost.crt, key: certs/localhost.key"));
    example.replace("certs/", &format!("{}/", dir.display()))
}

#[tokio::test]
async fn check_accepts_the_example_config_and_prints_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["certs", "--out", dir.path().to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    let file = dir.path().join("ephemera.yaml");
    std::fs::write(&file, example_in(dir.path())).unwrap();

    let out = run(&["check", "--config", file.to_str().unwrap()]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for want in [
        "config OK",
        "TLSv1.3 only",
        "groups (ECDHE) x25519, secp256r1, secp384r1",
        "resumption off",
        "listener 'public': 127.0.0.1:8443",
        "admin: 127.0.0.1:9844",
        "route: host * path_prefix / -> upstream 'app'",
        "upstream 'app': http1 [127.0.0.1:8080]",
        "names [localhost]",
    ] {
        assert!(stdout.contains(want), "missing '{want}' in:\n{stdout}");
    }
}

/// The example documents the defaults: with every optional key removed, the effective
/// policy is identical.
#[test]
fn example_config_values_are_the_defaults() {
    let certs = Certs::new(&["localhost"]);
    let dir = certs.dir.path();
    let example = Config::parse(&example_in(dir), "ephemera.yaml").unwrap();
    let minimal = format!(
        "listeners:
  - name: public
    bind: 127.0.0.1:8443
    tls:
      certificates:
        - {{ cert: {0}/localhost.crt, key: {0}/localhost.key }}
    routes:
      - {{ upstream: app }}
upstreams:
  app: {{ servers: [127.0.0.1:8080] }}
",
        dir.display()
    );
    let minimal = Config::parse(&minimal, "minimal.yaml").unwrap();
    let example = ephemera::describe(&Prepared::new(example).unwrap());
    let minimal = ephemera::describe(&Prepared::new(minimal).unwrap());
    assert_eq!(example, minimal);
}

#[test]
fn example_config_mentions_every_key() {
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    for key in [
        "admin",
        "bind",
        "shutdown_grace",
        "listeners",
        "name",
        "max_connections",
        "tls",
        "certificates",
        "cert",
        "key",
        "strict_sni",
        "groups",
        "handshake_timeout",
        "http",
        "header_timeout",
        "idle_timeout",
        "max_request_body",
        "trusted_proxies",
        "routes",
        "host",
        "path_prefix",
        "upstream",
        "respond",
        "status",
        "body",
        "upstreams",
        "protocol",
        "servers",
        "connect_timeout",
        "response_timeout",
        "key_update",
        "max_bytes",
        "max_age",
        "h2",
        "max_concurrent_streams",
        "initial_stream_window",
        "initial_connection_window",
        "max_header_list_size",
        "keepalive_interval",
        "keepalive_timeout",
        "ca",
        "server_name",
        "token_file",
        "access_log",
        "reuse_port",
        "mode",
        "tcp",
        "client_auth",
        "required",
        "proxy_protocol",
        "ocsp",
        "max_concurrent_handshakes",
    ] {
        let written = example
            .match_indices(&format!("{key}:"))
            .any(|(i, _)| !example[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'));
        assert!(written, "example config does not show '{key}:'");
    }
    for group in ["x25519", "secp256r1", "secp384r1", "x25519mlkem768"] {
        assert!(example.contains(group), "{group} not documented");
    }
}

// ---------- serve ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_config_answers_with_the_tls_summary_and_exits_0_on_sigterm() {
    if !have_curl() {
        return;
    }
    let mut serve = Serve::start(&[]).await;
    let log = serve.log();
    assert!(log.contains("self-signed"), "{log}");
    assert!(log.contains("minted in memory"), "{log}");

    let (status, body) = curl(serve.addr, "/").await;
    assert_eq!(status, 200, "{body}");
    for want in [
        "tls_version: TLSv1.3",
        "group: x25519",
        "cipher_suite: TLS13_",
        "alpn: h2",
        "resumed: false",
    ] {
        assert!(body.contains(want), "missing '{want}' in:\n{body}");
    }
    let (status, body) = curl_result(curl_spawn(serve.addr, "/", &["--http1.1"])).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alpn: http/1.1"), "{body}");

    let (status, metrics) = admin_get(serve.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metric(&metrics, "ephemera_tls_handshakes_total", &[]) >= 2.0,
        "{metrics}"
    );
    assert!(metrics.contains("ephemera_tls_policy_info"), "{metrics}");
    assert_eq!(
        admin_get(serve.admin, "/healthz").await,
        (200, "ok\n".into())
    );
    assert_eq!(admin_get(serve.admin, "/readyz").await.0, 200);

    serve.sigterm();
    let status = serve.exit_within(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{}", serve.log());
    assert!(serve.log().contains("SIGTERM"), "{}", serve.log());
}

/// Given one CPU, the proxy runs everything on its main thread (a single-threaded runtime,
/// no worker thread) and serves HTTP/2 and HTTP/1.1 as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_one_cpu_runs_on_one_thread() {
    if !have_curl() {
        return;
    }
    let serve = Serve::start_pinned(0, &[]).await;
    let (status, body) = curl(serve.addr, "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alpn: h2"), "{body}");
    let (status, body) = curl_result(curl_spawn(serve.addr, "/", &["--http1.1"])).await;
    assert_eq!(status, 200, "{body}");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", serve.pid()))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .collect();
    assert_eq!(threads.len(), 1, "threads: {threads:?}\n{}", serve.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_upstream_forwards_to_the_backend() {
    if !have_curl() {
        return;
    }
    let backend = start_backend().await;
    let mut serve = Serve::start(&["--upstream", &format!("http://{backend}")]).await;
    let (status, body) = curl(serve.addr, "/").await;
    assert_eq!((status, body.as_str()), (200, "backend ok"));
    let (status, body) = curl(serve.addr, "/headers").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{body}");

    serve.sigterm();
    let status = serve.exit_within(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{}", serve.log());
}

#[tokio::test]
async fn serve_rejects_a_bad_upstream_url() {
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--upstream",
        "https://127.0.0.1:1",
    ])
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--upstream"), "{stderr}");
    assert!(stderr.contains("http://HOST:PORT"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

#[tokio::test]
async fn serve_quick_start_flags_conflict_with_config() {
    for (flag, value) in [
        ("--listen", "127.0.0.1:1"),
        ("--admin", "127.0.0.1:1"),
        ("--upstream", "http://127.0.0.1:1"),
    ] {
        let out = run(&["serve", "--config", "x.yaml", flag, value]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains("cannot be used with"), "{flag}: {stderr}");
        assert!(
            stderr.contains("--config") && stderr.contains(flag),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn help_lists_commands_and_serve_flags() {
    let out = run(&["serve", "--help"]).await;
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--admin",
        "--upstream",
        "--log-format",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}:\n{help}");
    }
    let out = run(&["--help"]).await;
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    for cmd in ["serve", "check", "certs"] {
        assert!(help.contains(cmd), "--help lacks {cmd}:\n{help}");
    }
    let out = run(&["certs", "--help"]).await;
    let help = text(&out.stdout);
    assert!(help.contains("--out") && help.contains("--name"), "{help}");
}

/// SIGTERM with a request in flight: new connections are refused at once, the request still
/// completes, then the process exits 0. Over HTTP/2 and HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_request_and_refuses_new_connections() {
    if !have_curl() {
        return;
    }
    let backend = start_backend().await;
    for proto in ["--http2", "--http1.1"] {
        let mut serve = Serve::start(&["--upstream", &format!("http://{backend}")]).await;
        let started = Instant::now();
        let mut request = curl_spawn(serve.addr, "/slow/1500", &[proto]);
        // Wait until the connection is open, then give the request time to reach the backend.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = admin_get(serve.admin, "/metrics").await.1;
            if metric(&m, "ephemera_connections_open", &[]) >= 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "curl never connected:\n{m}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        serve.sigterm();

        // New connections are refused while the request is still being served.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::net::TcpStream::connect(serve.addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                other => {
                    drop(other);
                    assert!(
                        Instant::now() < deadline,
                        "{proto}: still accepting 1 s after SIGTERM:\n{}",
                        serve.log()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        assert!(
            serve.running(),
            "{proto}: exited before the drain:\n{}",
            serve.log()
        );
        assert!(
            request.try_wait().unwrap().is_none(),
            "{proto}: the request was no longer in flight when checked"
        );

        let (status, body) = curl_result(request).await;
        assert_eq!((status, body.as_str()), (200, "slow ok"), "{proto}");
        assert!(started.elapsed() >= Duration::from_millis(1500));
        let status = serve.exit_within(Duration::from_secs(5)).await;
        assert_eq!(status.code(), Some(0), "{proto}:\n{}", serve.log());
        let log = serve.log();
        assert!(log.contains("all connections drained"), "{proto}:\n{log}");
    }
}

/// SIGHUP reloads the config file: a broken file is refused with a log line naming the
/// problem and the proxy keeps serving; a good one is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file() {
    let certs = Certs::new(&["localhost"]);
    let yaml = config_yaml(&certs, None, "", "", "");
    let path = certs.dir.path().join("ephemera.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let mut serve = Serve::start_config(&path).await;

    let wait_log = |serve: &Serve, needle: &'static str| {
        let log = serve.log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = log.lock().unwrap().clone();
                if text.contains(needle) {
                    return text;
                }
                assert!(
                    Instant::now() < deadline,
                    "no '{needle}' in the log:\n{text}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    std::fs::write(&path, yaml.clone() + "surprise: 1\n").unwrap();
    serve.signal("-HUP");
    let log = wait_log(&serve, "config reload failed").await;
    assert!(log.contains("surprise"), "{log}");
    let mut c = HttpClient::connect(serve.addr, &certs.ca_der(), true).await;
    assert_eq!(c.get("/").await.0, 200, "still serving");

    std::fs::write(&path, &yaml).unwrap();
    serve.signal("-HUP");
    wait_log(&serve, "config reloaded").await;
    let m = admin_get(serve.admin, "/metrics").await.1;
    assert_eq!(
        metric(&m, "ephemera_config_reloads_total", &["result=\"ok\""]),
        1.0
    );
    assert_eq!(
        metric(&m, "ephemera_config_reloads_total", &["result=\"error\""]),
        1.0
    );
    assert!(serve.running());
}

/// One JSON access log line per request with `--log-format json`: method, path without the
/// query, status, bytes, durations, listener, upstream, TLS group, key updates so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request_without_the_query() {
    let backend = start_backend().await;
    let upstream = format!("http://{backend}");
    let serve = Serve::start(&["--upstream", &upstream, "--log-format", "json"]).await;
    let tls = tls_connect(serve.addr, "localhost", any_cert_client())
        .await
        .unwrap();
    let mut c = HttpClient::over(tls, false).await;
    let (status, _, body) = c.get("/bytes/1234?token=SECRET").await;
    assert_eq!((status, body.len()), (200, 1234));
    let line = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = serve.log();
            if let Some(l) = log.lines().find(|l| l.contains("\"ephemera::access\"")) {
                break l.to_string();
            }
            assert!(Instant::now() < deadline, "no access line:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(
        !serve.log().contains("SECRET"),
        "the query string was logged"
    );
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &v["fields"];
    assert_eq!(f["method"], "GET", "{line}");
    assert_eq!(f["path"], "/bytes/1234");
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes_sent"], 1234);
    assert_eq!(f["complete"], true);
    assert_eq!(f["listener"], "default");
    assert_eq!(f["upstream"], "default");
    assert_eq!(f["tls_group"], "x25519");
    assert_eq!(f["key_updates"], 0);
    assert_eq!(f["version"], "HTTP/1.1");
    assert!(f["total_ms"].as_f64().unwrap() >= f["head_ms"].as_f64().unwrap());
    assert_eq!(
        serve.log().matches("\"ephemera::access\"").count(),
        1,
        "one line per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_can_be_turned_off() {
    let certs = Certs::new(&["localhost"]);
    let path = certs.dir.path().join("ephemera.yaml");
    std::fs::write(
        &path,
        config_yaml(&certs, None, "", "      access_log: false\n", ""),
    )
    .unwrap();
    let serve = Serve::spawn(&["--config", path.to_str().unwrap(), "--log-format", "json"]).await;
    let mut c = HttpClient::connect(serve.addr, &certs.ca_der(), true).await;
    assert_eq!(c.get("/").await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!serve.log().contains("ephemera::access"), "{}", serve.log());
}

/// A request the client gives up on before the response head (it closes the connection
/// while the backend is slow) still gets its access line, as status 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_before_the_response_is_logged_as_499() {
    let backend = start_backend().await;
    let upstream = format!("http://{backend}");
    let serve = Serve::start(&["--upstream", &upstream, "--log-format", "json"]).await;
    let tls = tls_connect(serve.addr, "localhost", any_cert_client()).await;
    let mut c = HttpClient::over(tls.unwrap(), false).await;
    let pending = c.send(request("GET", "/slow/3000", empty()));
    let _ = tokio::time::timeout(Duration::from_millis(300), pending).await;
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = serve.log();
        if let Some(l) = log.lines().find(|l| l.contains("\"ephemera::access\"")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no access line:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["status"], 499, "{line}");
    assert_eq!(v["fields"]["complete"], false);
    assert_eq!(v["fields"]["path"], "/slow/3000");
}

fn core_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Core dumps are off by default (a core would hold private keys and traffic secrets):
/// RLIMIT_CORE 0 soft and hard; `--allow-core-dumps` leaves the inherited limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_dumps_are_disabled_unless_allowed() {
    let serve = Serve::start(&[]).await;
    let pid = serve.child.id().unwrap();
    assert_eq!(core_limit(pid), "0 0");
    let allowed = Serve::start(&["--allow-core-dumps"]).await;
    let pid = allowed.child.id().unwrap();
    assert_eq!(core_limit(pid), core_limit(std::process::id()), "inherited");
    assert!(
        allowed.log().contains("--allow-core-dumps"),
        "{}",
        allowed.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_readable_by_others_is_warned_about() {
    let certs = Certs::new(&["localhost"]);
    std::fs::set_permissions(&certs.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = certs.dir.path().join("ephemera.yaml");
    std::fs::write(&path, config_yaml(&certs, None, "", "", "")).unwrap();
    let serve = Serve::start_config(&path).await;
    let log = serve.log();
    assert!(
        log.contains("private key file is readable by group or others"),
        "{log}"
    );
    assert!(!log.contains("BEGIN"), "no key material in the log");
}

/// `--keylog FILE` (debugging only): secrets in SSLKEYLOGFILE format, file mode 0600, a
/// warning and `ephemera_tls_keylog_enabled 1`. Off by default; refused in a config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keylog_is_a_flag_only_and_says_so() {
    let plain = Serve::start(&[]).await;
    let m = admin_get(plain.admin, "/metrics").await.1;
    assert_eq!(metric(&m, "ephemera_tls_keylog_enabled", &[]), 0.0, "{m}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.log");
    let serve = Serve::start(&["--keylog", file.to_str().unwrap()]).await;
    assert!(serve.log().contains("--keylog"), "{}", serve.log());
    let (status, _) = curl(serve.addr, "/").await;
    assert_eq!(status, 200);
    let m = admin_get(serve.admin, "/metrics").await.1;
    assert_eq!(metric(&m, "ephemera_tls_keylog_enabled", &[]), 1.0);
    let keys = std::fs::read_to_string(&file).unwrap();
    for label in [
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET ",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET ",
        "CLIENT_TRAFFIC_SECRET_0 ",
        "SERVER_TRAFFIC_SECRET_0 ",
    ] {
        assert!(keys.contains(label), "{label} missing:\n{keys}");
    }
    assert_eq!(mode(&file), 0o600);

    let certs = Certs::new(&["localhost"]);
    let path = certs.dir.path().join("ephemera.yaml");
    std::fs::write(
        &path,
        config_yaml(&certs, None, "", "", "") + "keylog: /tmp/keys.log\n",
    )
    .unwrap();
    let out = run(&["check", "--config", path.to_str().unwrap()]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--keylog"), "{stderr}");
}
