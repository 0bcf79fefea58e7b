//! Client certificates (`tls.client_auth`): required and optional, the verified identity
//! passed to the backend in `X-Forwarded-Client-Cert` (Envoy's format), a forged copy from
//! the client stripped, and refusals counted by reason.

mod common;
use common::*;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A client CA (written to `dir`) and a client certificate it signed.
struct ClientPki {
    ca_file: PathBuf,
    leaf: CertificateDer<'static>,
    key: KeyPair,
}

fn client_pki(dir: &std::path::Path, file: &str) -> ClientPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "test client CA");
    ca.distinguished_name = dn;
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let ca_file = dir.join(file);
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::URI("spiffe://test/client".try_into().unwrap()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "client one");
    leaf.distinguished_name = dn;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    ClientPki {
        ca_file,
        leaf: leaf.der().clone(),
        key,
    }
}

fn with_client_cert(certs: &Certs, pki: Option<&ClientPki>, alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.ca_der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut c = match pki {
        Some(p) => builder
            .with_client_auth_cert(
                vec![p.leaf.clone()],
                PrivateKeyDer::try_from(p.key.serialize_der()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    c.alpn_protocols = vec![alpn.to_vec()];
    c
}

async fn setup(required: bool) -> (Certs, ClientPki, Proxy) {
    let certs = Certs::new(&["localhost"]);
    let pki = client_pki(certs.dir.path(), "client-ca.pem");
    let backend = start_backend().await;
    let extra = format!(
        "      client_auth: {{ ca: {}, required: {required} }}\n",
        yaml_path(&pki.ca_file)
    );
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), &extra, "", "")).await;
    (certs, pki, proxy)
}

/// GET /headers with a forged X-Forwarded-Client-Cert; the backend's view of that header.
async fn backend_sees(
    proxy: &Proxy,
    config: rustls::ClientConfig,
) -> Result<Option<String>, String> {
    let tls = tls_connect(proxy.addr, "localhost", config)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = HttpClient::over(tls, false).await;
    let req = hyper::Request::get("/headers")
        .header("host", "localhost")
        .header(
            "x-forwarded-client-cert",
            "Hash=forged;Subject=\"CN=admin\"",
        )
        .body(empty())
        .unwrap();
    let resp = c.send(req).await.map_err(|e| e.to_string())?;
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).to_string();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .map(str::to_string))
}

async fn failures(proxy: &Proxy, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(
            &proxy.metrics().await,
            "ephemera_tls_handshake_failures_total",
            &[&label],
        );
        if v > 0.0 || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_verified_client_identity_reaches_the_backend_and_a_forged_one_does_not() {
    let (certs, pki, proxy) = setup(true).await;
    let xfcc = backend_sees(&proxy, with_client_cert(&certs, Some(&pki), b"http/1.1"))
        .await
        .unwrap()
        .expect("X-Forwarded-Client-Cert set");
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pki.leaf.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        xfcc,
        format!("Hash={hash};Subject=\"CN=client one\";URI=spiffe://test/client;DNS=client.test")
    );
}

#[tokio::test]
async fn without_a_certificate_a_required_listener_refuses_and_counts_it() {
    let (certs, _pki, proxy) = setup(true).await;
    let r = backend_sees(&proxy, with_client_cert(&certs, None, b"http/1.1")).await;
    assert!(r.is_err(), "served without a client certificate: {r:?}");
    assert_eq!(failures(&proxy, "client_cert_missing").await, 1.0);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_and_counted() {
    let (certs, _pki, proxy) = setup(true).await;
    let stranger = client_pki(certs.dir.path(), "other-ca.pem");
    let r = backend_sees(
        &proxy,
        with_client_cert(&certs, Some(&stranger), b"http/1.1"),
    )
    .await;
    assert!(r.is_err(), "served with an unknown client CA: {r:?}");
    assert_eq!(failures(&proxy, "client_cert_invalid").await, 1.0);
}

#[tokio::test]
async fn optional_client_auth_lets_anonymous_clients_in_without_an_identity() {
    let (certs, pki, proxy) = setup(false).await;
    let anonymous = backend_sees(&proxy, with_client_cert(&certs, None, b"http/1.1"))
        .await
        .unwrap();
    assert_eq!(anonymous, None, "the forged header must be stripped");
    let known = backend_sees(&proxy, with_client_cert(&certs, Some(&pki), b"http/1.1"))
        .await
        .unwrap();
    assert!(known.is_some_and(|v| v.contains("DNS=client.test")));
}
