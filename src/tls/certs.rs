//! Certificates: PEM loading (chain + key, checked to match) and the SNI resolver that picks
//! a certificate per handshake. Called by `tls::accept` when a listener's TLS is built; the
//! resolver is consulted by rustls inside every handshake.
//!
//! Several certificates per listener: exact names beat wildcards (`*.example.com` covers one
//! label), and for one name an ECDSA and an RSA certificate may both be given; ECDSA is chosen
//! whenever the client's signature schemes allow it (a handshake costs 4.5x less server CPU;
//! `benches/handshake.rs`).

use crate::config::{CertificateSource, Origin, PemSource};
use rustls::SignatureAlgorithm;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Why a certificate could not be loaded. Each error names the config entry and the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The file could not be read (missing, unreadable).
    #[error("{origin}: cannot read {file}: {source}")]
    Read {
        origin: Box<Origin>,
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no `CERTIFICATE` PEM block, or a block is corrupt.
    #[error("{origin}: {file} holds no valid PEM certificate")]
    NoCertificate { origin: Box<Origin>, file: String },
    /// The key file holds no private key (PKCS#8, PKCS#1 or SEC1 PEM).
    #[error("{origin}: {file} holds no valid PEM private key")]
    NoKey { origin: Box<Origin>, file: String },
    /// The key type is not supported (supported: ECDSA P-256/P-384, RSA 2048+, Ed25519).
    #[error("{origin}: unsupported private key in {file}: {source}")]
    UnsupportedKey {
        origin: Box<Origin>,
        file: String,
        #[source]
        source: rustls::Error,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("{origin}: private key {key_file} does not match certificate {cert_file}")]
    KeyMismatch {
        origin: Box<Origin>,
        cert_file: String,
        key_file: String,
    },
    /// The `ocsp` file is not a DER OCSP response.
    #[error("{origin}: {file} is not a DER OCSP response (convert with `openssl ocsp -respout`)")]
    BadOcsp { origin: Box<Origin>, file: String },
    /// The leaf certificate could not be parsed as X.509.
    #[error("{origin}: cannot parse certificate in {file}: {detail}")]
    BadCertificate {
        origin: Box<Origin>,
        file: String,
        detail: String,
    },
}

/// One loaded certificate with the names it covers.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// DNS names from subjectAltName, lower-case; wildcards kept as `*.example.com`.
    pub names: Vec<String>,
    /// IP addresses from subjectAltName (canonical text), for the 421 check: a request for
    /// `https://192.0.2.1/` on a connection whose certificate lists that address is not
    /// misdirected.
    pub ips: Vec<String>,
    /// Expiry (seconds since the Unix epoch), for logs and metrics.
    pub not_after: i64,
    pub algorithm: SignatureAlgorithm,
}

/// The file's bytes, wiped from memory when dropped: a key file's PEM text is the private
/// key (rustls wipes its parsed copy itself).
fn read(src: &PemSource, origin: &Origin) -> Result<Zeroizing<Vec<u8>>, CertError> {
    match src {
        PemSource::Memory { pem, .. } => Ok(Zeroizing::new(pem.clone())),
        PemSource::File(path) => {
            let bytes = std::fs::read(path).map_err(|source| CertError::Read {
                origin: Box::new(origin.clone()),
                file: path.display().to_string(),
                source,
            })?;
            let bytes = Zeroizing::new(bytes);
            warn_if_exposed(path, &bytes);
            Ok(bytes)
        }
    }
}

/// A private key file that group or others can read is worth a warning (not an error:
/// some setups rely on a group, e.g. ssl-cert). Only key files: certificates are public.
fn warn_if_exposed(path: &std::path::Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let is_key = bytes.windows(11).any(|w| w == b"PRIVATE KEY");
    if let Ok(meta) = std::fs::metadata(path)
        && is_key
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "private key file is readable by group or others; chmod 600 it");
    }
}

/// Load and check one certificate entry: chain parses, key parses, key matches the leaf.
pub fn load(src: &CertificateSource, provider: &CryptoProvider) -> Result<LoadedCert, CertError> {
    let origin = &src.origin;
    let cert_file = src.cert.to_string();
    let key_file = src.key.to_string();
    let cert_pem = read(&src.cert, origin)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| CertError::NoCertificate {
            origin: Box::new(origin.clone()),
            file: cert_file.clone(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            origin: Box::new(origin.clone()),
            file: cert_file,
        });
    }
    let key_pem = read(&src.key, origin)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CertError::NoKey {
        origin: Box::new(origin.clone()),
        file: key_file.clone(),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| CertError::UnsupportedKey {
            origin: Box::new(origin.clone()),
            file: key_file.clone(),
            source,
        })?;
    let algorithm = signing_key.algorithm();
    let mut certified = CertifiedKey::new(chain, signing_key);
    if let Some(path) = &src.ocsp {
        let der = std::fs::read(path).map_err(|source| CertError::Read {
            origin: Box::new(origin.clone()),
            file: path.display().to_string(),
            source,
        })?;
        // A DER OCSPResponse is a SEQUENCE: catch a PEM or text file given by mistake.
        if der.first() != Some(&0x30) {
            return Err(CertError::BadOcsp {
                origin: Box::new(origin.clone()),
                file: path.display().to_string(),
            });
        }
        certified.ocsp = Some(der);
    }
    // keys_match compares the key's SPKI with the leaf's; `Unknown` cannot happen for the
    // aws-lc-rs keys we load, and is treated as a mismatch to be safe.
    if certified.keys_match().is_err() {
        return Err(CertError::KeyMismatch {
            origin: Box::new(origin.clone()),
            cert_file,
            key_file,
        });
    }
    let (names, ips, not_after) =
        leaf_facts(&certified.cert[0]).map_err(|detail| CertError::BadCertificate {
            origin: Box::new(origin.clone()),
            file: cert_file,
            detail,
        })?;
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        ips,
        not_after,
        algorithm,
    })
}

/// The leaf's DNS names, IP addresses and notAfter.
type LeafFacts = (Vec<String>, Vec<String>, i64);

fn leaf_facts(der: &CertificateDer<'_>) -> Result<LeafFacts, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.trim_end_matches('.').to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    ips.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok((names, ips, cert.validity().not_after.timestamp()))
}

/// Picks the certificate for a handshake from the client's SNI name and signature schemes.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// Keyed by the part after `*.`, e.g. `example.com`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// For a missing or unknown name (unless strict).
    default: Vec<Arc<CertifiedKey>>,
    strict: bool,
}

fn preference(alg: SignatureAlgorithm) -> u8 {
    match alg {
        SignatureAlgorithm::ECDSA | SignatureAlgorithm::ED25519 => 0,
        _ => 1,
    }
}

impl SniResolver {
    /// `certs` in config order; the first one's names form the default set.
    pub fn new(certs: &[LoadedCert], strict: bool) -> SniResolver {
        let mut exact: HashMap<String, Vec<(u8, Arc<CertifiedKey>)>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<(u8, Arc<CertifiedKey>)>> = HashMap::new();
        for c in certs {
            for name in &c.names {
                let entry = (preference(c.algorithm), c.key.clone());
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_default().push(entry),
                    None => exact.entry(name.clone()).or_default().push(entry),
                }
            }
            // Clients never send an address as SNI: these entries only answer `misdirected`.
            for ip in &c.ips {
                let entry = (preference(c.algorithm), c.key.clone());
                exact.entry(ip.clone()).or_default().push(entry);
            }
        }
        // Stable sort: ECDSA before RSA, config order otherwise.
        let finish = |m: HashMap<String, Vec<(u8, Arc<CertifiedKey>)>>| {
            m.into_iter()
                .map(|(k, mut v)| {
                    v.sort_by_key(|(p, _)| *p);
                    (k, v.into_iter().map(|(_, c)| c).collect::<Vec<_>>())
                })
                .collect::<HashMap<_, _>>()
        };
        let exact = finish(exact);
        let wildcard = finish(wildcard);
        let default = match certs.first() {
            Some(first) => {
                let by_name = first
                    .names
                    .first()
                    .and_then(|n| match n.strip_prefix("*.") {
                        Some(s) => wildcard.get(s),
                        None => exact.get(n),
                    });
                by_name.cloned().unwrap_or_else(|| vec![first.key.clone()])
            }
            None => Vec::new(),
        };
        SniResolver {
            exact,
            wildcard,
            default,
            strict,
        }
    }

    fn candidates(&self, name: &str) -> Option<&[Arc<CertifiedKey>]> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(v) = self.exact.get(&name) {
            return Some(v);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).map(Vec::as_slice)
    }

    /// Whether some certificate covers `name`. A missing name is never covered.
    pub fn covers(&self, name: Option<&str>) -> bool {
        name.is_some_and(|n| self.candidates(n).is_some())
    }

    /// A request for `host` on a connection whose client asked for `sni`: true when the
    /// certificate that connection got does not cover `host` (answered 421, RFC 9110
    /// §15.5.20: HTTP/2 clients reuse a connection for every name its certificate lists, and
    /// a name outside it must go to a connection of its own).
    pub fn misdirected(&self, sni: &str, host: &str) -> bool {
        let canonical;
        let host = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                canonical = ip.to_string();
                canonical.as_str()
            }
            Err(_) => host.trim_end_matches('.'),
        };
        if host.eq_ignore_ascii_case(sni.trim_end_matches('.')) {
            return false;
        }
        let Some(served) = self.for_name(Some(sni)) else {
            return true;
        };
        match self.candidates(host) {
            Some(covering) => !covering
                .iter()
                .any(|c| served.iter().any(|s| Arc::ptr_eq(c, s))),
            None => true,
        }
    }

    /// The certificate list for a name: its own, else (unless strict) the default.
    fn for_name(&self, name: Option<&str>) -> Option<&[Arc<CertifiedKey>]> {
        match name.and_then(|n| self.candidates(n)) {
            Some(c) => Some(c),
            None if self.strict => None,
            None => Some(&self.default),
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let list = self.for_name(hello.server_name())?;
        let schemes = hello.signature_schemes();
        // ECDSA comes first in each list; RSA is used only when the client cannot verify it.
        list.iter()
            .find(|c| c.key.choose_scheme(schemes).is_some())
            .or_else(|| list.first())
            .cloned()
    }
}
