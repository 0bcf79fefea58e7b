//! `openssl s_client` as an independent TLS peer against the proxy running in-process:
//! TLS 1.3 with X25519 and a verified chain, TLS 1.2 refused, no session ticket ever issued,
//! FFDHE-only refused, and the cipher suite choice (server preference, AES-128-GCM first).
//!
//! Skipped (with a message) when `openssl` is not on PATH, except under CI (env `CI` set),
//! where a missing `openssl` fails the test.

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// Whether to run: `openssl` is on PATH. Under CI its absence is a failure, not a skip.
fn have_openssl(test: &str) -> bool {
    let ok = std::process::Command::new("openssl")
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: `openssl` is not on PATH, but CI is set: install it");
        }
        eprintln!("SKIPPED {test}: `openssl` is not on PATH");
    }
    ok
}

/// The proxy with the built-in route, and the CA written out for `-CAfile`.
async fn start(extra_tls: &str) -> (Certs, Proxy, PathBuf) {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, extra_tls, "", "")).await;
    let ca = certs.dir.path().join("openssl-ca.pem");
    std::fs::write(&ca, &certs.ca_pem).unwrap();
    (certs, proxy, ca)
}

struct Run {
    success: bool,
    /// stdout and stderr together.
    out: String,
}

/// `openssl s_client -connect 127.0.0.1:PORT -servername localhost -CAfile CA ARGS`, with
/// `input` on stdin (or /dev/null), killed if it runs longer than 10 s.
async fn s_client(addr: SocketAddr, ca: &Path, args: &[&str], input: Option<&[u8]>) -> Run {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(format!("127.0.0.1:{}", addr.port()))
        .args(["-servername", "localhost", "-CAfile"])
        .arg(ca)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn openssl s_client");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).await.unwrap();
        drop(stdin);
    }
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("openssl s_client {args:?} did not finish within 10 s"))
        .unwrap();
    Run {
        success: output.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

async fn wait_failure(proxy: &Proxy, reason: &str, want: f64) -> String {
    let reason = format!("reason=\"{reason}\"");
    let m = wait_metric(
        proxy,
        "ephemera_tls_handshake_failures_total",
        &["listener=\"public\"", &reason],
        want,
    )
    .await;
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        want,
        "counted under exactly one reason\n{m}"
    );
    m
}

/// The negotiated cipher suite from s_client's "New, TLSv1.3, Cipher is X" line.
fn cipher_of(out: &str) -> Option<&str> {
    out.lines()
        .find_map(|l| l.strip_prefix("New, TLSv1.3, Cipher is "))
        .map(str::trim)
}

// ---------- 1. TLS 1.3 + X25519, chain verified ----------

#[tokio::test]
async fn tls13_x25519_with_verified_chain() {
    if !have_openssl("tls13_x25519_with_verified_chain") {
        return;
    }
    let (certs, proxy, ca) = start("").await;
    let run = s_client(proxy.addr, &ca, &["-groups", "X25519"], None).await;
    let out = &run.out;
    assert!(run.success, "{out}");
    assert!(out.contains("New, TLSv1.3, Cipher is "), "{out}");
    // OpenSSL 3.0/3.1 print the key exchange as "Server Temp Key"; 3.2+ also print the group.
    assert!(
        out.contains("Server Temp Key: X25519") || out.contains("Negotiated TLS1.3 group: X25519"),
        "{out}"
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("subject=CN = localhost"), "{out}");

    let m = wait_metric(
        &proxy,
        "ephemera_tls_handshakes_total",
        &[
            "group=\"x25519\"",
            "cipher_suite=\"TLS13_AES_128_GCM_SHA256\"",
            "alpn=\"none\"",
        ],
        1.0,
    )
    .await;
    assert_eq!(metric(&m, "ephemera_tls_handshakes_total", &[]), 1.0);

    // The chain check is real: without the CA, verification fails.
    let other = Certs::new(&["localhost"]);
    let wrong_ca = certs.dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, &other.ca_pem).unwrap();
    let run = s_client(proxy.addr, &wrong_ca, &["-groups", "X25519"], None).await;
    assert!(
        !run.out.contains("Verify return code: 0 (ok)"),
        "{}",
        run.out
    );
}

// ---------- 2. TLS 1.2 refused ----------

#[tokio::test]
async fn tls12_is_refused_as_protocol_version() {
    if !have_openssl("tls12_is_refused_as_protocol_version") {
        return;
    }
    let (_certs, proxy, ca) = start("").await;
    let run = s_client(proxy.addr, &ca, &["-tls1_2"], None).await;
    let out = &run.out;
    assert!(!run.success, "{out}");
    assert!(out.contains("alert protocol version"), "{out}");
    assert!(!out.contains("TLSv1.3"), "{out}");
    let m = wait_failure(&proxy, "protocol_version", 1.0).await;
    assert_eq!(metric(&m, "ephemera_tls_handshakes_total", &[]), 0.0);
}

// ---------- 3. no session ticket ----------

#[tokio::test]
async fn sess_out_writes_nothing_because_no_ticket_is_issued() {
    if !have_openssl("sess_out_writes_nothing_because_no_ticket_is_issued") {
        return;
    }
    let (certs, proxy, ca) = start("").await;

    // Control: the same command against a server that issues tickets writes the file.
    let control = start_ticketing_server(&certs).await;
    let control_sess = certs.dir.path().join("control.sess");
    let run = s_client(
        control,
        &ca,
        &["-ign_eof", "-sess_out", control_sess.to_str().unwrap()],
        Some(REQUEST),
    )
    .await;
    assert!(run.out.contains("HTTP/1.1 200 OK"), "{}", run.out);
    assert!(
        run.out.contains("New Session Ticket"),
        "control: no ticket reported\n{}",
        run.out
    );
    assert!(
        control_sess.exists(),
        "control: -sess_out wrote no file although tickets were sent\n{}",
        run.out
    );

    let sess = certs.dir.path().join("proxy.sess");
    let run = s_client(
        proxy.addr,
        &ca,
        &["-ign_eof", "-sess_out", sess.to_str().unwrap()],
        Some(REQUEST),
    )
    .await;
    let out = &run.out;
    // The exchange went all the way: a response was read after the handshake.
    assert!(out.contains("HTTP/1.1 200 OK"), "{out}");
    assert!(out.contains("resumed: false"), "{out}");
    assert!(out.contains("New, TLSv1.3, Cipher is "), "{out}");
    assert!(
        !out.contains("New Session Ticket"),
        "a session ticket arrived\n{out}"
    );
    assert!(
        !sess.exists(),
        "-sess_out wrote a session: the proxy issued a ticket\n{out}"
    );
    let m = wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 1.0).await;
    assert_eq!(
        metric(&m, "ephemera_tls_resumed_handshakes_total", &[]),
        0.0
    );
}

// ---------- 4. FFDHE refused ----------

#[tokio::test]
async fn ffdhe_only_client_is_refused_as_no_shared_group() {
    if !have_openssl("ffdhe_only_client_is_refused_as_no_shared_group") {
        return;
    }
    let (_certs, proxy, ca) = start("").await;
    let run = s_client(proxy.addr, &ca, &["-groups", "ffdhe2048"], None).await;
    let out = &run.out;
    assert!(!run.success, "{out}");
    assert!(cipher_of(out).is_none(), "{out}");
    assert!(out.contains("alert handshake failure"), "{out}");
    let m = wait_failure(&proxy, "no_shared_group", 1.0).await;
    assert_eq!(metric(&m, "ephemera_tls_handshakes_total", &[]), 0.0);

    // With an ECDHE group added, the same client connects.
    let run = s_client(proxy.addr, &ca, &["-groups", "ffdhe2048:P-256"], None).await;
    assert!(run.success, "{}", run.out);
    wait_metric(
        &proxy,
        "ephemera_tls_handshakes_total",
        &["group=\"secp256r1\""],
        1.0,
    )
    .await;
}

// ---------- 5. cipher suites ----------

#[tokio::test]
async fn cipher_suite_choice_follows_server_preference() {
    if !have_openssl("cipher_suite_choice_follows_server_preference") {
        return;
    }
    let (_certs, proxy, ca) = start("").await;

    // Only AES-256-GCM offered: still accepted, and used.
    let run = s_client(
        proxy.addr,
        &ca,
        &["-ciphersuites", "TLS_AES_256_GCM_SHA384"],
        None,
    )
    .await;
    assert!(run.success, "{}", run.out);
    assert_eq!(
        cipher_of(&run.out),
        Some("TLS_AES_256_GCM_SHA384"),
        "{}",
        run.out
    );

    // OpenSSL's default order puts AES-256-GCM first; the server's preference wins.
    let run = s_client(proxy.addr, &ca, &[], None).await;
    assert!(run.success, "{}", run.out);
    assert_eq!(
        cipher_of(&run.out),
        Some("TLS_AES_128_GCM_SHA256"),
        "{}",
        run.out
    );

    // Explicitly preferring AES-256 and ChaCha20 over AES-128 changes nothing either.
    let run = s_client(
        proxy.addr,
        &ca,
        &[
            "-ciphersuites",
            "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
        ],
        None,
    )
    .await;
    assert_eq!(
        cipher_of(&run.out),
        Some("TLS_AES_128_GCM_SHA256"),
        "{}",
        run.out
    );

    let m = wait_metric(
        &proxy,
        "ephemera_tls_handshakes_total",
        &["cipher_suite=\"TLS13_AES_128_GCM_SHA256\""],
        2.0,
    )
    .await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshakes_total",
            &["cipher_suite=\"TLS13_AES_256_GCM_SHA384\""]
        ),
        1.0
    );

    // A TLS 1.3 suite outside the policy (AES-128-CCM) is refused as no_shared_cipher.
    let run = s_client(
        proxy.addr,
        &ca,
        &["-ciphersuites", "TLS_AES_128_CCM_SHA256"],
        None,
    )
    .await;
    assert!(!run.success, "{}", run.out);
    assert!(cipher_of(&run.out).is_none(), "{}", run.out);
    wait_failure(&proxy, "no_shared_cipher", 1.0).await;
}

/// `ocsp: FILE` staples that DER OCSP response; `openssl s_client -status` sees it. The
/// response is made by `openssl ocsp` acting as the test CA's responder.
#[tokio::test]
async fn an_ocsp_response_from_a_file_is_stapled() {
    if !have_openssl("an_ocsp_response_from_a_file_is_stapled") {
        return;
    }
    let certs = Certs::new(&["localhost"]);
    let dir = certs.dir.path();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    std::fs::write(dir.join("index.txt"), "").unwrap();
    run(&[
        "ocsp",
        "-issuer",
        "ca.crt",
        "-cert",
        "localhost.crt",
        "-no_nonce",
        "-reqout",
        "req.der",
    ]);
    run(&[
        "ocsp",
        "-index",
        "index.txt",
        "-rsigner",
        "ca.crt",
        "-rkey",
        "ca.key",
        "-CA",
        "ca.crt",
        "-reqin",
        "req.der",
        "-respout",
        "resp.der",
        "-ndays",
        "1",
    ]);
    let ocsp = dir.join("resp.der");
    let yaml = config_yaml(&certs, None, "", "", "").replace(
        &format!("key: {} }}", yaml_path(&certs.key)),
        &format!(
            "key: {}, ocsp: {} }}",
            yaml_path(&certs.key),
            yaml_path(&ocsp)
        ),
    );
    assert!(yaml.contains("ocsp:"), "{yaml}");
    let proxy = Proxy::start(&yaml).await;
    let ca = dir.join("openssl-ca.pem");
    std::fs::write(&ca, &certs.ca_pem).unwrap();
    let r = s_client(proxy.addr, &ca, &["-status"], Some(REQUEST)).await;
    assert!(
        r.out.contains("OCSP Response Status: successful"),
        "{}",
        r.out
    );

    // Without `ocsp`, nothing is stapled.
    let (_plain_certs, plain, ca) = start("").await;
    let r = s_client(plain.addr, &ca, &["-status"], Some(REQUEST)).await;
    assert!(
        r.out.contains("OCSP response: no response sent"),
        "{}",
        r.out
    );
}
