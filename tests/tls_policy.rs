//! The TLS policy as a real client sees it, against the proxy running in-process: TLS 1.3
//! only, only the configured ECDHE groups, only the TLS 1.3 AEAD suites, no resumption, SNI
//! certificate selection (default, strict), ECDSA preferred over RSA, HelloRetryRequest, plain
//! HTTP on the TLS port, and the handshake metrics each of these feeds.

mod common;
use common::*;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::crypto::{CipherSuiteCommon, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    AlertDescription, CipherSuite, HandshakeKind, NamedGroup, SignatureScheme,
    SupportedCipherSuite, Tls13CipherSuite,
};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STEP: Duration = Duration::from_secs(5);

// ---------- helpers local to this file ----------

fn failures(reason: &str) -> [String; 2] {
    [
        "listener=\"public\"".to_string(),
        format!("reason=\"{reason}\""),
    ]
}

async fn wait_failures(proxy: &Proxy, reason: &str, want: f64) -> String {
    let labels = failures(reason);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    wait_metric(
        proxy,
        "ephemera_tls_handshake_failures_total",
        &labels,
        want,
    )
    .await
}

/// Connect with a bound on the whole handshake.
async fn connect(
    addr: std::net::SocketAddr,
    sni: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tokio::time::timeout(STEP, tls_connect(addr, sni, config))
        .await
        .expect("handshake did not finish within 5 s")
}

/// The fatal alert the server sent, if that is why the client's handshake failed.
fn alert_of(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

async fn expect_refused(
    addr: std::net::SocketAddr,
    sni: &str,
    config: rustls::ClientConfig,
    alert: AlertDescription,
) {
    match connect(addr, sni, config).await {
        Ok(s) => panic!(
            "handshake unexpectedly succeeded: {:?} {:?}",
            s.get_ref().1.protocol_version(),
            s.get_ref().1.negotiated_cipher_suite()
        ),
        Err(e) => assert_eq!(alert_of(&e), Some(alert), "{e:?}"),
    }
}

fn client_with_roots(
    roots: &[CertificateDer<'static>],
    provider: CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth()
}

fn leaf_der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .expect("a certificate in the file")
        .unwrap()
}

fn served_leaf(s: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref()
        .1
        .peer_certificates()
        .expect("server certificates")[0]
        .clone()
}

/// A listener with several certificates, written out by hand.
fn multi_cert_yaml(certs: &[(&Path, &Path)], extra_tls: &str) -> String {
    let mut list = String::new();
    for (c, k) in certs {
        list.push_str(&format!(
            "        - {{ cert: {}, key: {} }}\n",
            yaml_path(c),
            yaml_path(k)
        ));
    }
    format!(
        "admin: {{ bind: 127.0.0.1:0 }}\nshutdown_grace: 5s\nlisteners:\n  - name: public\n    bind: 127.0.0.1:0\n    tls:\n      certificates:\n{list}{extra_tls}    routes:\n      - {{ host: \"*\", path_prefix: /, respond: {{ status: 200 }} }}\n"
    )
}

/// One HTTP/1.1 GET over an established stream; returns (status, body).
async fn get_over(tls: tokio_rustls::client::TlsStream<TcpStream>) -> (u16, String) {
    let mut c = HttpClient::over(tls, false).await;
    let (status, _, body) = tokio::time::timeout(STEP, c.get("/"))
        .await
        .expect("response within 5 s");
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ---------- 1. versions ----------

#[tokio::test]
async fn tls12_only_client_is_refused_as_protocol_version() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let tls12 = client_config_with(
        &certs.ca_der(),
        &[b"h2"],
        provider(),
        &[&rustls::version::TLS12],
    );
    expect_refused(
        proxy.addr,
        "localhost",
        tls12,
        AlertDescription::ProtocolVersion,
    )
    .await;
    let m = wait_failures(&proxy, "protocol_version", 1.0).await;
    assert_eq!(metric(&m, "ephemera_tls_handshakes_total", &[]), 0.0);

    // The same client allowed TLS 1.3 as well gets TLS 1.3.
    let both = client_config(&certs.ca_der(), &[b"h2"]);
    let s = connect(proxy.addr, "localhost", both).await.unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 1.0).await;
    wait_failures(&proxy, "protocol_version", 1.0).await;
}

// ---------- 2. groups ----------

#[tokio::test]
async fn client_without_a_shared_group_is_refused_as_no_shared_group() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "      groups: [secp384r1]\n",
        "",
        "",
    ))
    .await;
    let mut p = provider();
    p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let x25519_only = client_config_with(&certs.ca_der(), &[b"h2"], p, rustls::ALL_VERSIONS);
    expect_refused(
        proxy.addr,
        "localhost",
        x25519_only,
        AlertDescription::HandshakeFailure,
    )
    .await;
    let m = wait_failures(&proxy, "no_shared_group", 1.0).await;
    assert_eq!(metric(&m, "ephemera_tls_handshakes_total", &[]), 0.0);
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        1.0,
        "counted under exactly one reason\n{m}"
    );

    // A client offering the configured group gets it.
    let mut p = provider();
    p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::SECP384R1];
    let ok = client_config_with(&certs.ca_der(), &[b"h2"], p, rustls::ALL_VERSIONS);
    let s = connect(proxy.addr, "localhost", ok).await.unwrap();
    assert_eq!(
        s.get_ref()
            .1
            .negotiated_key_exchange_group()
            .unwrap()
            .name(),
        NamedGroup::secp384r1
    );
    wait_metric(
        &proxy,
        "ephemera_tls_handshakes_total",
        &["group=\"secp384r1\""],
        1.0,
    )
    .await;
}

// ---------- 3. cipher suites ----------

/// A TLS 1.3 suite the server does not have: AES-128-GCM's machinery relabelled as
/// TLS_AES_128_CCM_SHA256 (0x1304). The handshake never gets far enough to use it.
fn unsupported_tls13_suite() -> SupportedCipherSuite {
    let base = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .unwrap();
    let suite: &'static Tls13CipherSuite = Box::leak(Box::new(Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: CipherSuite::TLS13_AES_128_CCM_SHA256,
            hash_provider: base.common.hash_provider,
            confidentiality_limit: base.common.confidentiality_limit,
        },
        hkdf_provider: base.hkdf_provider,
        aead_alg: base.aead_alg,
        quic: None,
    }));
    SupportedCipherSuite::Tls13(suite)
}

#[tokio::test]
async fn client_without_a_shared_suite_is_refused_as_no_shared_cipher() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;

    // Offers TLS 1.3, but only a TLS 1.3 suite the policy does not include.
    let mut p = provider();
    p.cipher_suites = vec![unsupported_tls13_suite()];
    let ccm_only = client_config_with(&certs.ca_der(), &[b"h2"], p, &[&rustls::version::TLS13]);
    expect_refused(
        proxy.addr,
        "localhost",
        ccm_only,
        AlertDescription::HandshakeFailure,
    )
    .await;
    let m = wait_failures(&proxy, "no_shared_cipher", 1.0).await;
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        1.0
    );

    // Only TLS 1.2 suites while "allowing" TLS 1.2 + 1.3: rustls then does not offer TLS 1.3
    // at all (no usable suite for it), so this is a protocol_version refusal, not a cipher one.
    let mut p = provider();
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS12);
    let tls12_suites = client_config_with(&certs.ca_der(), &[b"h2"], p, rustls::ALL_VERSIONS);
    expect_refused(
        proxy.addr,
        "localhost",
        tls12_suites,
        AlertDescription::ProtocolVersion,
    )
    .await;
    wait_failures(&proxy, "protocol_version", 1.0).await;
    wait_failures(&proxy, "no_shared_cipher", 1.0).await;

    // One shared suite among unknown ones: that one is used.
    let mut p = provider();
    p.cipher_suites = vec![
        unsupported_tls13_suite(),
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let mixed = client_config_with(&certs.ca_der(), &[b"h2"], p, &[&rustls::version::TLS13]);
    let s = connect(proxy.addr, "localhost", mixed).await.unwrap();
    assert_eq!(
        s.get_ref().1.negotiated_cipher_suite().unwrap().suite(),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    );
}

// ---------- 4. no resumption ----------

/// The default in-memory session store, counting what the server gave us to resume with.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    tls13_tickets: AtomicUsize,
    tls12_sessions: AtomicUsize,
}

impl CountingStore {
    fn new() -> Arc<CountingStore> {
        Arc::new(CountingStore {
            inner: ClientSessionMemoryCache::new(32),
            tls13_tickets: AtomicUsize::new(0),
            tls12_sessions: AtomicUsize::new(0),
        })
    }
    fn tickets(&self) -> usize {
        self.tls13_tickets.load(Ordering::SeqCst) + self.tls12_sessions.load(Ordering::SeqCst)
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.tls12_sessions.fetch_add(1, Ordering::SeqCst);
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.tls13_tickets.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

fn resuming_client(
    ca: &CertificateDer<'static>,
    store: Arc<CountingStore>,
) -> rustls::ClientConfig {
    let mut c = client_config(ca, &[b"http/1.1"]);
    c.resumption = Resumption::store(store);
    c
}

#[tokio::test]
async fn second_connection_is_a_full_handshake_and_no_ticket_is_issued() {
    let certs = Certs::new(&["localhost"]);

    // Control: against a server that issues tickets, the same client resumes.
    // One ClientConfig, cloned per connection: rustls only resumes a session stored by a config
    // with the same verifier (`Arc` identity), so a fresh config per connection never would.
    let control = start_ticketing_server(&certs).await;
    let store = CountingStore::new();
    let config = resuming_client(&certs.ca_der(), store.clone());
    for round in 0..2 {
        let tls = connect(control, "localhost", config.clone()).await.unwrap();
        let kind = tls.get_ref().1.handshake_kind();
        let (status, _) = get_over(tls).await;
        assert_eq!(status, 200);
        let want = if round == 0 {
            HandshakeKind::Full
        } else {
            HandshakeKind::Resumed
        };
        assert_eq!(kind, Some(want), "control round {round}");
    }
    assert!(store.tickets() > 0, "control server issued no ticket");

    // The proxy: two connections, one full HTTP exchange each, never resumed.
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let store = CountingStore::new();
    let config = resuming_client(&certs.ca_der(), store.clone());
    for round in 0..2 {
        let tls = connect(proxy.addr, "localhost", config.clone())
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full),
            "round {round}"
        );
        let (status, body) = get_over(tls).await;
        assert_eq!(status, 200);
        assert!(body.contains("resumed: false"), "{body}");
        // Any NewSessionTicket precedes the response on the wire, so it would be stored now.
        assert_eq!(store.tickets(), 0, "the proxy issued a session ticket");
    }
    let m = wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 2.0).await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_resumed_handshakes_total",
            &["listener=\"public\""]
        ),
        0.0
    );
    assert!(
        m.contains("ephemera_tls_resumed_handshakes_total{listener=\"public\"} 0"),
        "the resumed counter is exported (at 0)\n{m}"
    );
}

// ---------- 5. SNI ----------

#[tokio::test]
async fn sni_selects_the_certificate_and_falls_back_to_the_first() {
    let certs = Certs::new(&["a.test"]);
    let (b_cert, b_key, b_der) = certs.extra_self_signed("b", &["b.test"], false);
    let a_der = leaf_der(&certs.cert);
    assert_ne!(a_der, b_der);
    let files = [
        (certs.cert.as_path(), certs.key.as_path()),
        (&b_cert, &b_key),
    ];
    let roots = [certs.ca_der(), b_der.clone()];

    let proxy = Proxy::start(&multi_cert_yaml(&files, "")).await;
    for (sni, want) in [("a.test", &a_der), ("b.test", &b_der)] {
        // Verified against the trusted roots for that name, and the exact certificate.
        let s = connect(
            proxy.addr,
            sni,
            client_with_roots(&roots, provider(), rustls::ALL_VERSIONS),
        )
        .await
        .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(&served_leaf(&s), want, "{sni}");
    }
    // No SNI (an IP address is never sent as SNI) and an unknown name: the first certificate.
    for sni in ["127.0.0.1", "c.test"] {
        let s = connect(proxy.addr, sni, any_cert_client()).await.unwrap();
        assert_eq!(served_leaf(&s), a_der, "{sni}");
    }
    wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 4.0).await;
    drop(proxy);

    // strict_sni: both are refused and counted; known names still work.
    let proxy = Proxy::start(&multi_cert_yaml(&files, "      strict_sni: true\n")).await;
    for sni in ["127.0.0.1", "c.test"] {
        expect_refused(
            proxy.addr,
            sni,
            any_cert_client(),
            AlertDescription::AccessDenied,
        )
        .await;
    }
    let m = wait_failures(&proxy, "unknown_sni", 2.0).await;
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        2.0
    );
    // An unknown name that fails for another reason first keeps that reason (rustls checks
    // the version before it asks for a certificate).
    let tls12 = client_with_roots(&roots, provider(), &[&rustls::version::TLS12]);
    expect_refused(
        proxy.addr,
        "c.test",
        tls12,
        AlertDescription::ProtocolVersion,
    )
    .await;
    let m = wait_failures(&proxy, "protocol_version", 1.0).await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshake_failures_total",
            &["reason=\"unknown_sni\""]
        ),
        2.0
    );
    for (sni, want) in [("a.test", &a_der), ("b.test", &b_der)] {
        let s = connect(
            proxy.addr,
            sni,
            client_with_roots(&roots, provider(), rustls::ALL_VERSIONS),
        )
        .await
        .unwrap_or_else(|e| panic!("strict {sni}: {e}"));
        assert_eq!(&served_leaf(&s), want, "strict {sni}");
    }
    wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 2.0).await;
}

// ---------- 6. ECDSA preferred, RSA when the client needs it ----------

/// The default provider, able to verify (and so offering) only RSA signature schemes.
fn rsa_only_provider() -> CryptoProvider {
    let mut p = provider();
    let base = p.signature_verification_algorithms;
    let mapping: Vec<_> = base
        .mapping
        .iter()
        .filter(|(scheme, _)| {
            matches!(
                scheme,
                SignatureScheme::RSA_PSS_SHA256
                    | SignatureScheme::RSA_PSS_SHA384
                    | SignatureScheme::RSA_PSS_SHA512
                    | SignatureScheme::RSA_PKCS1_SHA256
                    | SignatureScheme::RSA_PKCS1_SHA384
                    | SignatureScheme::RSA_PKCS1_SHA512
            )
        })
        .copied()
        .collect();
    assert!(!mapping.is_empty());
    p.signature_verification_algorithms = WebPkiSupportedAlgorithms {
        all: base.all,
        mapping: Box::leak(mapping.into_boxed_slice()),
    };
    p
}

#[tokio::test]
async fn ecdsa_is_preferred_and_rsa_served_to_rsa_only_clients() {
    let certs = Certs::new(&["localhost"]);
    let (rsa_cert, rsa_key, rsa_der) = certs.extra_self_signed("dual-rsa", &["dual.test"], true);
    let (ec_cert, ec_key, ec_der) = certs.extra_self_signed("dual-ec", &["dual.test"], false);
    // RSA is listed first: ECDSA must win by preference, not by order.
    let proxy = Proxy::start(&multi_cert_yaml(
        &[(&rsa_cert, &rsa_key), (&ec_cert, &ec_key)],
        "",
    ))
    .await;
    let roots = [rsa_der.clone(), ec_der.clone()];

    let s = connect(
        proxy.addr,
        "dual.test",
        client_with_roots(&roots, provider(), rustls::ALL_VERSIONS),
    )
    .await
    .unwrap();
    assert_eq!(
        served_leaf(&s),
        ec_der,
        "default client gets the ECDSA certificate"
    );

    let rsa_client = client_with_roots(&roots, rsa_only_provider(), rustls::ALL_VERSIONS);
    let s = connect(proxy.addr, "dual.test", rsa_client).await.unwrap();
    assert_eq!(
        served_leaf(&s),
        rsa_der,
        "RSA-only client gets the RSA certificate"
    );
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 2.0).await;
    drop(proxy);

    // With only the ECDSA certificate, the RSA-only client is refused and counted.
    let proxy = Proxy::start(&multi_cert_yaml(&[(&ec_cert, &ec_key)], "")).await;
    let rsa_client = client_with_roots(&roots, rsa_only_provider(), rustls::ALL_VERSIONS);
    expect_refused(
        proxy.addr,
        "dual.test",
        rsa_client,
        AlertDescription::HandshakeFailure,
    )
    .await;
    let m = wait_failures(&proxy, "no_shared_signature_scheme", 1.0).await;
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        1.0
    );
}

// ---------- 7. metrics ----------

#[tokio::test]
async fn handshake_metrics_count_successes_failures_and_open_connections() {
    const N: usize = 5;
    const M: usize = 3;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_policy_info",
            &[
                "listener=\"public\"",
                "versions=\"TLSv1.3\"",
                "groups=\"x25519,secp256r1,secp384r1\"",
                "resumption=\"off\"",
            ]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "ephemera_tls_handshakes_total", &[]), 0.0);

    let mut clients = Vec::new();
    for i in 0..N {
        let h2 = i % 2 == 0;
        let mut c =
            tokio::time::timeout(STEP, HttpClient::connect(proxy.addr, &certs.ca_der(), h2))
                .await
                .unwrap();
        let (status, _, body) = tokio::time::timeout(STEP, c.get("/")).await.unwrap();
        assert_eq!(status, 200);
        let want = if h2 { "alpn: h2" } else { "alpn: http/1.1" };
        assert!(String::from_utf8_lossy(&body).contains(want));
        clients.push(c);
    }
    for _ in 0..M {
        let tls12 = client_config_with(
            &certs.ca_der(),
            &[b"h2"],
            provider(),
            &[&rustls::version::TLS12],
        );
        assert!(connect(proxy.addr, "localhost", tls12).await.is_err());
    }
    wait_metric(
        &proxy,
        "ephemera_tls_handshake_failures_total",
        &["listener=\"public\""],
        M as f64,
    )
    .await;
    let m = wait_metric(&proxy, "ephemera_connections_open", &[], N as f64).await;
    assert_eq!(metric(&m, "ephemera_tls_handshakes_total", &[]), N as f64);
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshakes_total",
            &[
                "alpn=\"h2\"",
                "group=\"x25519\"",
                "cipher_suite=\"TLS13_AES_128_GCM_SHA256\""
            ]
        ),
        N.div_ceil(2) as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "ephemera_tls_handshakes_total", &["alpn=\"http/1.1\""]),
        (N / 2) as f64
    );
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        M as f64
    );
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshake_failures_total",
            &["reason=\"protocol_version\""]
        ),
        M as f64
    );
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshake_duration_seconds_count",
            &["listener=\"public\""]
        ),
        N as f64
    );

    drop(clients);
    wait_metric(&proxy, "ephemera_connections_open", &[], 0.0).await;
}

// ---------- 8. HelloRetryRequest ----------

#[tokio::test]
async fn hello_retry_request_is_counted() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(
        &certs,
        None,
        "      groups: [secp256r1]\n",
        "",
        "",
    ))
    .await;
    use rustls::crypto::aws_lc_rs::kx_group;

    // Key share for X25519 (not configured), secp256r1 also supported: one HRR.
    let mut p = provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1];
    let c = client_config_with(&certs.ca_der(), &[b"http/1.1"], p, rustls::ALL_VERSIONS);
    let s = connect(proxy.addr, "localhost", c).await.unwrap();
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(HandshakeKind::FullWithHelloRetryRequest)
    );
    let (status, body) = get_over(s).await;
    assert_eq!(status, 200);
    assert!(body.contains("group: secp256r1"), "{body}");
    let m = wait_metric(
        &proxy,
        "ephemera_tls_hello_retry_requests_total",
        &["listener=\"public\""],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_handshakes_total",
            &["group=\"secp256r1\""]
        ),
        1.0
    );

    // Key share for secp256r1 straight away: no HRR, the counter stays at 1.
    let mut p = provider();
    p.kx_groups = vec![kx_group::SECP256R1, kx_group::X25519];
    let c = client_config_with(&certs.ca_der(), &[b"http/1.1"], p, rustls::ALL_VERSIONS);
    let s = connect(proxy.addr, "localhost", c).await.unwrap();
    assert_eq!(s.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
    let m = wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 2.0).await;
    assert_eq!(
        metric(&m, "ephemera_tls_hello_retry_requests_total", &[]),
        1.0
    );
}

// ---------- 9. plain HTTP on the TLS port ----------

#[tokio::test]
async fn plain_http_is_refused_as_malformed_and_tls_keeps_working() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;

    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(STEP, tcp.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection");
    // A reset is also an acceptable way to refuse; what matters is no HTTP answer.
    if read.is_ok() {
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plain HTTP was answered: {:?}",
            String::from_utf8_lossy(&answer)
        );
        // Nothing, or a TLS alert record.
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "unexpected bytes {answer:02x?}"
        );
    }
    let m = wait_failures(&proxy, "malformed", 1.0).await;
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        1.0
    );

    let mut c = tokio::time::timeout(STEP, HttpClient::connect(proxy.addr, &certs.ca_der(), true))
        .await
        .unwrap();
    let (status, _, _) = tokio::time::timeout(STEP, c.get("/")).await.unwrap();
    assert_eq!(status, 200);
    wait_metric(&proxy, "ephemera_tls_handshakes_total", &[], 1.0).await;
}
