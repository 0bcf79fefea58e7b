//! loadgen: the client's rustls config (options → **client TLS** → connect): TLS 1.3 only,
//! aws-lc-rs with the chosen groups, ALPN, the trust anchors or `--insecure`, and no
//! resumption — a session store that counts the tickets a server sends but never hands one
//! back, so every handshake is full and the report can say whether the server issues tickets.

use super::options::{Options, Verify};
use crate::tls::policy::kx_group;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionStore, Resumption, Tls12ClientSessionValue};
use rustls::client::{Tls12Resumption, Tls13ClientSessionValue};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, NamedGroup, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where system CA bundles live (Debian/Ubuntu, Fedora/RHEL, Alpine/macOS-style).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The client TLS config cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientTlsError {
    /// The `--ca` file cannot be read or holds no usable certificate.
    #[error("--ca {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    /// No system CA bundle was found.
    #[error(
        "no system CA bundle found (tried $SSL_CERT_FILE, {}); pass --ca FILE or --insecure",
        SYSTEM_BUNDLES.join(", ")
    )]
    NoSystemRoots,
    /// rustls refused the configuration.
    #[error("client TLS config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the config; `tickets` counts the session tickets servers send.
pub fn client_config(
    opts: &Options,
    tickets: Arc<TicketCounter>,
) -> Result<ClientConfig, ClientTlsError> {
    let provider = Arc::new(CryptoProvider {
        kx_groups: opts.groups.iter().map(|g| kx_group(*g)).collect(),
        ..aws_lc_rs::default_provider()
    });
    // aws-lc initialises itself on first use (~30 ms here): do it now, not in the first
    // handshake, where it would show as a latency outlier.
    for group in &provider.kx_groups {
        let _ = group.start();
    }
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match &opts.verify {
        Verify::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignatureOnly::new(algorithms)))
            .with_no_client_auth(),
        Verify::CaFile(path) => builder
            .with_root_certificates(ca_file(path)?)
            .with_no_client_auth(),
        Verify::System => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
    };
    // Equivalent to Resumption::disabled() for the handshakes (nothing is ever offered back),
    // but the tickets are counted.
    config.resumption = Resumption::store(tickets).tls12_resumption(Tls12Resumption::Disabled);
    config.enable_early_data = false;
    config.alpn_protocols = opts.alpn_offered().iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn ca_file(path: &Path) -> Result<RootCertStore, ClientTlsError> {
    let err = |reason: String| ClientTlsError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, ClientTlsError> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let candidates = from_env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from));
    for path in candidates {
        let Ok(iter) = CertificateDer::pem_file_iter(&path) else {
            continue;
        };
        let mut roots = RootCertStore::empty();
        // A bundle may hold certificates webpki cannot parse; skip those, as browsers do.
        roots.add_parsable_certificates(iter.filter_map(Result::ok));
        if !roots.is_empty() {
            return Ok(roots);
        }
    }
    Err(ClientTlsError::NoSystemRoots)
}

/// `--insecure`: accepts any certificate, but still checks the handshake signature against
/// the certificate's key, so the server really does the private-key operation a verifying
/// client would make it do (the cost we are measuring).
#[derive(Debug)]
pub struct SignatureOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl SignatureOnly {
    pub fn new(algorithms: WebPkiSupportedAlgorithms) -> SignatureOnly {
        SignatureOnly { algorithms }
    }
}

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A session store that keeps nothing: it counts the TLS 1.3 tickets servers send and never
/// returns one, so no handshake is ever resumed (and no key-share hint is kept either: each
/// handshake starts from the same ClientHello).
#[derive(Debug, Default)]
pub struct TicketCounter {
    received: AtomicU64,
}

impl TicketCounter {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl ClientSessionStore for TicketCounter {
    fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        None
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, _: ServerName<'static>, _: Tls13ClientSessionValue) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        None
    }
}
