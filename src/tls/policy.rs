//! THE TLS policy, in one place for a security reviewer: TLS 1.3 only, ECDHE groups only (as
//! configured), the three TLS 1.3 AEAD suites with AES-128-GCM preferred, no resumption of any
//! kind (no session cache, no tickets, no 0-RTT), ALPN h2 and http/1.1.
//! Used by `tls::accept` to build each listener's `ServerConfig`; the unit tests below assert
//! each property of the built config.

use crate::config::Group;
use rustls::crypto::aws_lc_rs::{self, cipher_suite, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::server::{NoServerSessionStorage, ResolvesServerCert};
use rustls::{ServerConfig, SupportedCipherSuite};
use std::sync::Arc;

/// The only protocol version.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Server preference order. AES-128-GCM first: it is as strong as needed, and SHA-256 has
/// hardware support where SHA-384 often does not (the design notes measured ~22% less user CPU
/// per handshake than letting OpenSSL clients pick AES-256-GCM-SHA384; see README).
pub const CIPHER_SUITES: [SupportedCipherSuite; 3] = [
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// ALPN protocols offered, in server preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The rustls key-exchange group for a configured group. Only ECDHE (and the ECDHE+ML-KEM
/// hybrid) exist in `Group`: FFDHE cannot be configured.
pub fn kx_group(group: Group) -> &'static dyn SupportedKxGroup {
    match group {
        Group::X25519 => kx_group::X25519,
        Group::Secp256r1 => kx_group::SECP256R1,
        Group::Secp384r1 => kx_group::SECP384R1,
        Group::X25519Mlkem768 => kx_group::X25519MLKEM768,
    }
}

/// aws-lc-rs with exactly the configured groups (in order) and the three AEAD suites.
pub fn provider(groups: &[Group]) -> CryptoProvider {
    CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        kx_groups: groups.iter().map(|g| kx_group(*g)).collect(),
        ..aws_lc_rs::default_provider()
    }
}

/// The server config for one listener.
pub fn server_config(
    groups: &[Group],
    resolver: Arc<dyn ResolvesServerCert>,
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<ServerConfig, rustls::Error> {
    let builder = ServerConfig::builder_with_provider(Arc::new(provider(groups)))
        .with_protocol_versions(VERSIONS)?;
    let builder = match client_auth {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    // The default is a 256-entry session cache: stateful resumption would be ON.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    // The default sends 2 tickets after each handshake; with none there is nothing to resume.
    config.send_tls13_tickets = 0;
    // No 0-RTT: early data is replayable and not forward secret.
    config.max_early_data_size = 0;
    config.send_half_rtt_data = false;
    config.ignore_client_order = true;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{ClientConfig, ClientConnection, ServerConnection};

    fn built(groups: &[Group]) -> (ServerConfig, CertificateDer<'static>) {
        let issued = crate::certgen::self_signed(&["localhost".to_string()]).unwrap();
        let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let ck = rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key, &provider(groups))
            .unwrap();
        let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(ck));
        (server_config(groups, resolver, None).unwrap(), cert)
    }

    /// Runs a handshake in memory; returns both sides or the server's error.
    fn handshake(
        server: ServerConfig,
        client: ClientConfig,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let mut c =
            ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            let _ = c.process_new_packets();
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    fn client(
        cert: &CertificateDer<'static>,
        provider: CryptoProvider,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    #[test]
    fn tls13_only() {
        let (server, cert) = built(&Group::DEFAULT);
        let tls12 = client(
            &cert,
            aws_lc_rs::default_provider(),
            &[&rustls::version::TLS12],
        );
        let err = handshake(server.clone(), tls12).unwrap_err();
        assert!(matches!(err, rustls::Error::PeerIncompatible(_)), "{err:?}");
        let both = client(&cert, aws_lc_rs::default_provider(), rustls::ALL_VERSIONS);
        let (_, s) = handshake(server, both).unwrap();
        assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    }

    #[test]
    fn aead_suites_aes128_first() {
        let (c, cert) = built(&Group::DEFAULT);
        let names: Vec<_> = c
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            names,
            vec![
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        assert!(c.ignore_client_order);
        // A client preferring AES-256 still gets AES-128: the server's order wins.
        let mut p = aws_lc_rs::default_provider();
        p.cipher_suites.reverse();
        let (_, s) = handshake(c, client(&cert, p, rustls::ALL_VERSIONS)).unwrap();
        assert_eq!(
            s.negotiated_cipher_suite().unwrap().suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    /// Each of the three suites can be negotiated alone (a client offering only it) and
    /// carries application data both ways.
    #[test]
    fn each_suite_is_negotiated_and_carries_data() {
        use std::io::{Read, Write};
        for suite in [
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (s, cert) = built(&Group::DEFAULT);
            let p = CryptoProvider {
                cipher_suites: vec![suite],
                ..aws_lc_rs::default_provider()
            };
            let (mut c, mut s) = handshake(s, client(&cert, p, rustls::ALL_VERSIONS)).unwrap();
            assert_eq!(s.negotiated_cipher_suite().unwrap().suite(), suite.suite());
            let mut wire = Vec::new();
            c.writer().write_all(b"ping").unwrap();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut got = [0u8; 4];
            s.reader().read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            wire.clear();
            s.writer().write_all(b"pong").unwrap();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets().unwrap();
            c.reader().read_exact(&mut got).unwrap();
            assert_eq!(&got, b"pong");
        }
    }

    #[test]
    fn only_configured_ecdhe_groups() {
        let (c, cert) = built(&Group::DEFAULT);
        let names: Vec<_> = c
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            names,
            vec![
                rustls::NamedGroup::X25519,
                rustls::NamedGroup::secp256r1,
                rustls::NamedGroup::secp384r1
            ]
        );
        // The hybrid is never offered unless listed: a client offering only it is refused.
        let mut p = aws_lc_rs::default_provider();
        p.kx_groups = vec![kx_group::X25519MLKEM768];
        let err = handshake(c, client(&cert, p, rustls::ALL_VERSIONS)).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)
        );

        let (c, cert) = built(&[Group::X25519Mlkem768, Group::X25519]);
        let names: Vec<_> = c
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            names,
            vec![
                rustls::NamedGroup::X25519MLKEM768,
                rustls::NamedGroup::X25519
            ]
        );
        // rustls takes a group the client sent a key share for (no HelloRetryRequest).
        let mut p = aws_lc_rs::default_provider();
        p.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519];
        let (_, s) = handshake(c, client(&cert, p, rustls::ALL_VERSIONS)).unwrap();
        assert_eq!(
            s.negotiated_key_exchange_group().unwrap().name(),
            rustls::NamedGroup::X25519MLKEM768
        );
    }

    #[test]
    fn no_resumption_no_early_data() {
        let (c, cert) = built(&Group::DEFAULT);
        assert_eq!(c.send_tls13_tickets, 0);
        assert_eq!(c.max_early_data_size, 0);
        assert!(!c.send_half_rtt_data);
        assert!(!c.ticketer.enabled(), "no ticketer may be installed");
        assert!(!c.session_storage.put(vec![1], vec![2]));
        assert!(c.session_storage.get(&[1]).is_none());
        assert!(!c.session_storage.can_cache());
        // A client that caches sessions still gets a full handshake the second time.
        let cc = client(&cert, aws_lc_rs::default_provider(), rustls::ALL_VERSIONS);
        let (mut cl, _) = handshake(c.clone(), cc.clone()).unwrap();
        let _ = cl.process_new_packets();
        let (_, s) = handshake(c, cc).unwrap();
        assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }

    #[test]
    fn alpn_h2_then_http11() {
        let (c, _) = built(&Group::DEFAULT);
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }
}
