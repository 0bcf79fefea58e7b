//! Client certificates (mTLS, `tls.client_auth`): the verifier built from the configured CA,
//! and the verified identity rendered for the backend as an `X-Forwarded-Client-Cert` value
//! in Envoy's format (`Hash=…;Subject="…";URI=…;DNS=…`). Used by `tls::accept`; the value is
//! carried in `TlsInfo` to `http::forward`.

use crate::config::ClientAuth;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use std::sync::Arc;

/// Why `tls.client_auth.ca` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("listener '{listener}': tls.client_auth.ca {path}: {detail}")]
pub struct ClientCaError {
    pub listener: String,
    pub path: String,
    pub detail: String,
}

pub fn verifier(
    listener: &str,
    auth: &ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, ClientCaError> {
    let err = |detail: String| ClientCaError {
        listener: listener.to_string(),
        path: auth.ca.display().to_string(),
        detail,
    };
    let pem = std::fs::read(&auth.ca).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if auth.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|e| err(e.to_string()))
}

/// The `X-Forwarded-Client-Cert` element for a verified client leaf, as Envoy writes it
/// with `set_current_client_cert_details: { subject, uri, dns }`: the SHA-256 of the DER,
/// the subject, and each URI and DNS subjectAltName. `None` if the DER does not parse (it
/// verified, so it should).
pub fn forwarded_value(leaf: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = cert.subject().to_string().replace('"', "\\\"");
    let mut out = format!("Hash={hex};Subject=\"{subject}\"");
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                out.push_str(&format!(";URI={u}"));
            }
        }
        for name in &san.value.general_names {
            if let GeneralName::DNSName(d) = name {
                out.push_str(&format!(";DNS={d}"));
            }
        }
    }
    Some(out)
}
