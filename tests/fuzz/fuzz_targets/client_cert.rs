//! The X-Forwarded-Client-Cert value built from a client's certificate (mTLS):
//! any bytes as the leaf's DER → `tls::client_cert::forwarded_value`. In the proxy the leaf
//! has been verified against the configured CA first, but its subject and subjectAltNames
//! are whatever the client's CA put there, and the value goes to backends that trust it.
//!
//! Checked: no panic; the value is a valid header value of visible ASCII; read back the way
//! Envoy parses XFCC (elements split at `,`, pairs at `;`, key and value at `=`, all outside
//! double quotes, `\` escaping inside them) it is exactly one element whose keys are `Hash`
//! (the SHA-256 in hex), `Subject`, then one `URI` per URI name and one `DNS` per DNS name
//! that x509-parser finds in the certificate: no name can add a key or an element.

#![no_main]

use ephemera::tls::client_cert::forwarded_value;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// Split `s` at `sep` outside double quotes; `None` if a quote is left open.
fn split_unquoted(s: &str, sep: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if !quoted && c == sep {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    (!quoted && !escaped).then(|| {
        parts.push(&s[start..]);
        parts
    })
}

/// A value as Envoy reads it: quoted (and then nothing outside the quotes) or plain.
fn value_ok(v: &str) -> bool {
    match v.strip_prefix('"') {
        Some(inner) => {
            let Some(body) = inner.strip_suffix('"') else {
                return false;
            };
            // Inside: every `"` and `\` escaped.
            let mut chars = body.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if chars.next().is_none() {
                            return false;
                        }
                    }
                    '"' => return false,
                    _ => {}
                }
            }
            true
        }
        None => !v.contains([',', ';', '=', '"', '\\']),
    }
}

fuzz_target!(|data: &[u8]| {
    let der = CertificateDer::from(data);
    let Some(v) = forwarded_value(&der) else {
        return;
    };
    assert!(
        v.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "not visible ASCII: {v:?}"
    );
    assert!(http::HeaderValue::from_str(&v).is_ok());

    let elements = split_unquoted(&v, ',').unwrap_or_else(|| panic!("open quote: {v:?}"));
    assert_eq!(elements.len(), 1, "more than one element: {v:?}");
    let pairs = split_unquoted(elements[0], ';').unwrap();
    let mut keys = Vec::new();
    for p in &pairs {
        let (k, val) = p
            .split_once('=')
            .unwrap_or_else(|| panic!("pair without '=': {p:?} in {v:?}"));
        assert!(value_ok(val), "value {val:?} in {v:?}");
        keys.push(k);
    }
    assert_eq!(keys.first(), Some(&"Hash"), "{v:?}");
    assert_eq!(keys.get(1), Some(&"Subject"), "{v:?}");
    let hash = pairs[0].strip_prefix("Hash=").unwrap();
    assert!(hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()));

    // The names the certificate really holds.
    let (_, cert) = x509_parser::parse_x509_certificate(data).expect("forwarded_value parsed it");
    let (mut uris, mut dns) = (0, 0);
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(_) => uris += 1,
                GeneralName::DNSName(_) => dns += 1,
                _ => {}
            }
        }
    }
    let mut want = vec!["Hash", "Subject"];
    want.extend(std::iter::repeat_n("URI", uris));
    want.extend(std::iter::repeat_n("DNS", dns));
    assert_eq!(keys, want, "{v:?}");
});
