//! Development certificates minted with rcgen: the embedded default's self-signed certificate
//! (held in memory only) and `ephemera certs` (a local CA plus a leaf, written to disk).
//! ECDSA P-256 throughout: the cheapest signature for a full handshake (see README).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Leaf validity: 397 days, the most browsers accept. The CA lives a little longer.
const LEAF_DAYS: i64 = 397;
const CA_DAYS: i64 = 2 * 365;

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A day of slack for clients whose clocks run behind.
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}

/// A certificate (chain) and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertgenError {
    /// rcgen refused the parameters (e.g. a name that is not a valid DNS name or IP address).
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file under `--out` failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn leaf_params(names: &[String]) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, LEAF_DAYS);
    Ok(params)
}

/// A self-signed ECDSA P-256 certificate for `names` (the embedded default uses `localhost`).
pub fn self_signed(names: &[String]) -> Result<Issued, CertgenError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = leaf_params(names)?.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A development CA and a leaf for `names` signed by it. The leaf's `cert_pem` is the chain
/// (leaf then CA).
pub fn ca_and_leaf(names: &[String]) -> Result<(Issued, Issued), CertgenError> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Ephemera development CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, CA_DAYS);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let leaf = leaf_params(names)?.signed_by(&leaf_key, &issuer)?;
    let ca = Issued {
        cert_pem: ca_pem.clone(),
        key_pem: ca_key_pem,
    };
    let leaf = Issued {
        cert_pem: format!("{}{}", leaf.pem(), ca_pem),
        key_pem: leaf_key.serialize_pem(),
    };
    Ok((ca, leaf))
}

/// `ephemera certs`: writes `ca.crt`, `ca.key`, `<first name>.crt` (chain), `<first name>.key`
/// into `out`; keys get mode 0600. Returns the paths written.
pub fn write_dev_certs(out: &Path, names: &[String]) -> Result<Vec<PathBuf>, CertgenError> {
    let (ca, leaf) = ca_and_leaf(names)?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertgenError::Write { path, source }
    };
    std::fs::create_dir_all(out).map_err(write_err(out))?;
    let base = names
        .first()
        .map(String::as_str)
        .unwrap_or("localhost")
        .replace(['/', '\\'], "_");
    let files = [
        (out.join("ca.crt"), ca.cert_pem, false),
        (out.join("ca.key"), ca.key_pem, true),
        (out.join(format!("{base}.crt")), leaf.cert_pem, false),
        (out.join(format!("{base}.key")), leaf.key_pem, true),
    ];
    let mut written = Vec::new();
    for (path, contents, secret) in files {
        write_file(&path, contents.as_bytes(), secret).map_err(write_err(&path))?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path)?;
    // An existing file keeps its old mode on open: tighten it explicitly.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(contents)?;
    f.sync_all()
}
