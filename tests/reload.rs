//! Hot reload (`POST /reload` on the admin listener; SIGHUP in tests/cli.rs): new handshakes
//! get the new certificate while live connections keep going, a broken certificate changes
//! nothing, the bearer token, listeners added and removed, and no request lost to reloads
//! under load.

mod common;
use common::*;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

fn write_config(certs: &Certs, yaml: &str) -> PathBuf {
    let path = certs.dir.path().join("ephemera.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn leaf_der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

/// Copy `from`'s certificate and key over `to`'s files (a certificate rotation on disk).
fn rotate(from: &Certs, to: &Certs) {
    std::fs::copy(&from.cert, &to.cert).unwrap();
    std::fs::copy(&from.key, &to.key).unwrap();
}

async fn reload(proxy: &Proxy, headers: &[&str]) -> (u16, String) {
    admin_request(proxy.admin, "POST", "/reload", headers).await
}

/// The certificate a fresh handshake (SNI localhost) gets, verified against `ca`.
async fn served_leaf(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
) -> std::io::Result<CertificateDer<'static>> {
    let tls = tls_connect(addr, "localhost", client_config(ca, &[b"http/1.1"])).await?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].clone())
}

#[tokio::test]
async fn new_handshakes_get_the_new_certificate_and_live_connections_go_on() {
    let certs = Certs::new(&["localhost"]);
    let next = Certs::new(&["localhost"]);
    let path = write_config(&certs, &config_yaml(&certs, None, "", "", ""));
    let proxy = Proxy::start_file(&path).await;
    let mut live = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    assert_eq!(live.get("/").await.0, 200);

    rotate(&next, &certs);
    let (status, body) = reload(&proxy, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("listener 'public'"), "{body}");

    let leaf = served_leaf(proxy.addr, &next.ca_der()).await.unwrap();
    assert_eq!(
        leaf,
        leaf_der(&next.cert),
        "a new client sees the new certificate"
    );
    assert!(
        served_leaf(proxy.addr, &certs.ca_der()).await.is_err(),
        "the old certificate is no longer served"
    );
    assert_eq!(
        live.get("/").await.0,
        200,
        "the live connection was not dropped"
    );

    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_config_reloads_total", &["result=\"ok\""]),
        1.0
    );
    assert_eq!(
        metric(&m, "ephemera_config_reloads_total", &["result=\"error\""]),
        0.0
    );
    let expiry = metric(
        &m,
        "ephemera_tls_certificate_expiry_timestamp_seconds",
        &["listener=\"public\"", "certificate=\"localhost\""],
    );
    assert!(expiry > 1.7e9, "{m}");
}

#[tokio::test]
async fn a_broken_certificate_is_rejected_and_the_old_one_keeps_serving() {
    let certs = Certs::new(&["localhost"]);
    let other = Certs::new(&["localhost"]);
    let path = write_config(&certs, &config_yaml(&certs, None, "", "", ""));
    let proxy = Proxy::start_file(&path).await;

    // The key of another certificate: load fails, nothing changes.
    std::fs::copy(&other.key, &certs.key).unwrap();
    let (status, body) = reload(&proxy, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("previous config still serving"), "{body}");
    assert!(body.contains("key"), "names the problem: {body}");
    let leaf = served_leaf(proxy.addr, &certs.ca_der()).await.unwrap();
    assert_eq!(leaf, leaf_der(&certs.cert));

    // A config error (unknown key) is rejected the same way, naming the line.
    std::fs::write(&path, config_yaml(&certs, None, "", "", "") + "bogus: 1\n").unwrap();
    let (status, body) = reload(&proxy, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("bogus"), "{body}");

    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_config_reloads_total", &["result=\"error\""]),
        2.0
    );
    assert_eq!(
        metric(&m, "ephemera_config_reloads_total", &["result=\"ok\""]),
        0.0
    );
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    assert_eq!(c.get("/").await.0, 200);
}

#[tokio::test]
async fn reload_needs_the_bearer_token_when_one_is_configured() {
    let certs = Certs::new(&["localhost"]);
    let token = certs.dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let yaml = config_yaml(&certs, None, "", "", "").replace(
        "admin: { bind: 127.0.0.1:0 }",
        &format!(
            "admin: {{ bind: 127.0.0.1:0, token_file: {} }}",
            yaml_path(&token)
        ),
    );
    let path = write_config(&certs, &yaml);
    let proxy = Proxy::start_file(&path).await;
    assert_eq!(reload(&proxy, &[]).await.0, 401);
    assert_eq!(reload(&proxy, &["Authorization: Bearer nope"]).await.0, 401);
    assert_eq!(admin_get(proxy.admin, "/reload").await.0, 405);
    let (status, body) = reload(&proxy, &["Authorization: Bearer s3cret-token"]).await;
    assert_eq!(status, 200, "{body}");
    // /metrics stays open (scrapers carry no token).
    assert_eq!(admin_get(proxy.admin, "/metrics").await.0, 200);
}

#[tokio::test]
async fn without_a_config_file_reload_is_409() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let (status, body) = reload(&proxy, &[]).await;
    assert_eq!(status, 409, "{body}");
}

/// The listener named `name` in a reload summary ("listener 'NAME' ADDR; ...").
fn listed(summary: &str, name: &str) -> Option<std::net::SocketAddr> {
    let key = format!("listener '{name}' ");
    let rest = &summary[summary.find(&key)? + key.len()..];
    rest.split([';', '\n']).next()?.trim().parse().ok()
}

#[tokio::test]
async fn listeners_added_and_removed_by_a_reload_take_effect() {
    let certs = Certs::new(&["localhost"]);
    let one = config_yaml(&certs, None, "", "", "");
    let path = write_config(&certs, &one);
    let proxy = Proxy::start_file(&path).await;
    let second = format!(
        "  - name: second\n    bind: 127.0.0.1:0\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\n    routes:\n      - {{ respond: {{ status: 200, body: second }} }}\n",
        yaml_path(&certs.cert),
        yaml_path(&certs.key)
    );
    std::fs::write(&path, one.clone() + &second).unwrap();
    let (status, body) = reload(&proxy, &[]).await;
    assert_eq!(status, 200, "{body}");
    let second_addr = listed(&body, "second").unwrap_or_else(|| panic!("{body}"));
    assert_eq!(listed(&body, "public"), Some(proxy.addr), "kept its socket");
    let mut c = HttpClient::connect(second_addr, &certs.ca_der(), false).await;
    let (status, _, text) = c.get("/").await;
    assert_eq!((status, &text[..]), (200, &b"second"[..]));

    // Remove `public`: its socket closes; `second` keeps serving, and so does the
    // connection opened on it before.
    let only_second = format!(
        "admin: {{ bind: 127.0.0.1:0 }}\nlisteners:\n{}",
        second.replace("bind: 127.0.0.1:0", &format!("bind: {second_addr}"))
    );
    std::fs::write(&path, only_second).unwrap();
    let (status, body) = reload(&proxy, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(listed(&body, "public").is_none(), "{body}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "the removed listener still accepts"
    );
    assert_eq!(c.get("/").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_no_request() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let path = write_config(&certs, &config_yaml(&certs, None, "", "", ""));
    let proxy = Arc::new(Proxy::start_file(&path).await);
    let done = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for h2 in [true, false, true, false] {
        let (proxy, ca, done) = (proxy.clone(), certs.ca_der(), done.clone());
        let (ok, failed) = (ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                // A new connection (a full handshake) for every request.
                let tls = tls_connect(
                    proxy.addr,
                    "localhost",
                    client_config(&ca, if h2 { &[b"h2"] } else { &[b"http/1.1"] }),
                )
                .await;
                let good = match tls {
                    Ok(tls) => {
                        let mut c = HttpClient::over(tls, h2).await;
                        c.send(request("GET", "/", empty()))
                            .await
                            .is_ok_and(|r| r.status() == 200)
                    }
                    Err(_) => false,
                };
                let counter = if good { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (status, body) = reload(&proxy, &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} requests on new connections during 10 reloads, {failed} failed");
    assert!(ok > 50, "{ok}");
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn moving_a_listener_to_another_address_keeps_the_proxy_running() {
    let certs = Certs::new(&["localhost"]);
    let yaml = config_yaml(&certs, None, "", "", "");
    let path = write_config(&certs, &yaml);
    let proxy = Proxy::start_file(&path).await;
    std::fs::write(
        &path,
        yaml.replace("bind: 127.0.0.1:0\n    tls", "bind: 127.0.0.2:0\n    tls"),
    )
    .unwrap();
    let (status, body) = reload(&proxy, &[]).await;
    assert_eq!(status, 200, "{body}");
    let moved = listed(&body, "public").unwrap_or_else(|| panic!("{body}"));
    assert_eq!(moved.ip().to_string(), "127.0.0.2");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !proxy.task.is_finished(),
        "the proxy stopped after the old loop ended"
    );
    let mut c = HttpClient::connect(moved, &certs.ca_der(), true).await;
    assert_eq!(c.get("/").await.0, 200);
    assert_eq!(reload(&proxy, &[]).await.0, 200, "still taking reloads");
}

#[tokio::test]
async fn the_policy_info_series_follows_the_config_in_force() {
    let certs = Certs::new(&["localhost"]);
    let yaml = config_yaml(&certs, None, "", "", "");
    let path = write_config(&certs, &yaml);
    let proxy = Proxy::start_file(&path).await;
    let before = metric(
        &proxy.metrics().await,
        "ephemera_tls_policy_info",
        &["groups=\"x25519,secp256r1,secp384r1\""],
    );
    assert_eq!(before, 1.0);
    std::fs::write(
        &path,
        config_yaml(&certs, None, "      groups: [x25519]\n", "", ""),
    )
    .unwrap();
    assert_eq!(reload(&proxy, &[]).await.0, 200);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "ephemera_tls_policy_info", &["groups=\"x25519\""]),
        1.0,
        "{m}"
    );
    assert!(
        !m.contains("groups=\"x25519,secp256r1,secp384r1\""),
        "stale policy series:\n{m}"
    );
    // A rejected reload (a second listener on a taken address) leaves no policy series.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = config_yaml(&certs, None, "      groups: [x25519]\n", "", "")
        + &format!(
            "  - name: typo\n    bind: {}\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\n      groups: [x25519mlkem768]\n    routes:\n      - {{ respond: {{}} }}\n",
            taken.local_addr().unwrap(),
            yaml_path(&certs.cert),
            yaml_path(&certs.key)
        );
    std::fs::write(&path, bad).unwrap();
    assert_eq!(reload(&proxy, &[]).await.0, 422);
    let m = proxy.metrics().await;
    assert!(
        !m.contains("ephemera_tls_policy_info{groups=\"x25519mlkem768\""),
        "{m}"
    );
}
