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
/// the subject (RFC 2253), and each URI and DNS subjectAltName. Values that hold `,` `;`
/// `=` or `"` are quoted, with `"` and `\` escaped, so no value can add a key or an element.
/// Non-ASCII characters are percent-encoded (header values are ASCII). `None` if the DER
/// does not parse (it verified, so it should).
pub fn forwarded_value(leaf: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut out = format!("Hash={hex};Subject={}", quoted(&rfc2253(cert.subject())));
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                out.push_str(&format!(";URI={}", value(u)));
            }
        }
        for name in &san.value.general_names {
            if let GeneralName::DNSName(d) = name {
                out.push_str(&format!(";DNS={}", value(d)));
            }
        }
    }
    Some(out)
}

/// A distinguished name as RFC 2253 writes it (last RDN first, `,` between RDNs, `+`
/// within one), values escaped per RFC 4514.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let kind = x509_parser::objects::oid2abbrev(atv.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| atv.attr_type().to_id_string());
                    let v = match atv.as_str() {
                        Ok(text) => escape_rfc4514(text),
                        Err(_) => {
                            let raw = atv.attr_value().data;
                            format!(
                                "#{}",
                                raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
                            )
                        }
                    };
                    format!("{kind}={v}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.reverse();
    rdns.join(",")
}

fn escape_rfc4514(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An XFCC value: as is when plain, else quoted with `"` and `\` escaped.
fn value(v: &str) -> String {
    let ascii = percent_non_ascii(v);
    if ascii.contains([',', ';', '=', '"', '\\']) {
        quoted(&ascii)
    } else {
        ascii
    }
}

fn quoted(v: &str) -> String {
    let v = percent_non_ascii(v);
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Header values must be visible ASCII: other bytes (and control characters) become %XX.
fn percent_non_ascii(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_add_keys_or_elements() {
        assert_eq!(value("client.test"), "client.test");
        assert_eq!(value("https://x;DNS=admin"), "\"https://x;DNS=admin\"");
        assert_eq!(quoted(r#"CN=a\"b"#), r#""CN=a\\\"b""#);
        assert_eq!(escape_rfc4514("alice, OU=admins"), r"alice\, OU\=admins");
        assert_eq!(escape_rfc4514(" x "), r"\ x\ ");
        assert_eq!(percent_non_ascii("Jörg"), "J%C3%B6rg");
    }
}
