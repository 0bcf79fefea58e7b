//! The TLS 1.3 key schedule's HKDF for `tls::policy`'s cipher suites: rustls' own HKDF-Expand
//! (`HkdfUsingHmac`) over aws-lc's HMAC, with each PRK's HMAC key prepared once.
//!
//! Why not the aws-lc-rs provider's HKDF: it hands every expansion to aws-lc's `HKDF_expand`,
//! which sets up the HMAC key (two SHA-256 blocks) each time, and a PRK from `extract` is kept
//! as salt and secret, so each expansion from it first redoes the extract. Here an extract is
//! one HMAC, and each expander holds an `aws_lc_rs::hmac::Key` (the key's inner and outer hash
//! states) that every expansion starts from a copy of. Measured with callgrind over 1,000
//! HTTP/2 handshakes (benches/instructions.sh): SHA-256 compression calls 128 -> 90 per
//! handshake, server instructions 1,189k -> 1,108k per connection.
//!
//! Erasure: aws-lc cleans an HMAC key's state when it is dropped, and rustls' `OkmBlock` and
//! `Tag` zero themselves; the provider's HKDF instead kept the extract's salt in a heap copy
//! freed unwiped. aws-lc-rs returns each HMAC output as a plain `Tag` value, not erased: a
//! copy of each PRK and derived secret stays in dead stack memory until overwritten, like
//! the stack buffer of the provider's own `expand_block` (README, "What is wiped").

use aws_lc_rs::hmac;
use rustls::crypto::hmac::{Hmac, Key, Tag};
use rustls::crypto::tls13::{Hkdf, HkdfExpander, HkdfUsingHmac, OkmBlock};

/// HKDF with HMAC-SHA256 (TLS_AES_128_GCM_SHA256, TLS_CHACHA20_POLY1305_SHA256).
pub static HKDF_SHA256: PreparedKeyHkdf = PreparedKeyHkdf(&HMAC_SHA256);
/// HKDF with HMAC-SHA384 (TLS_AES_256_GCM_SHA384).
pub static HKDF_SHA384: PreparedKeyHkdf = PreparedKeyHkdf(&HMAC_SHA384);

static HMAC_SHA256: AwsLcHmac = AwsLcHmac(hmac::HMAC_SHA256);
static HMAC_SHA384: AwsLcHmac = AwsLcHmac(hmac::HMAC_SHA384);

/// `Hkdf` whose expanders keep the PRK as a prepared HMAC key.
pub struct PreparedKeyHkdf(&'static AwsLcHmac);

impl PreparedKeyHkdf {
    fn hash_len(&self) -> usize {
        self.0.hash_output_len()
    }
}

impl Hkdf for PreparedKeyHkdf {
    fn extract_from_zero_ikm(&self, salt: Option<&[u8]>) -> Box<dyn HkdfExpander> {
        let zeroes = [0u8; OkmBlock::MAX_LEN];
        self.extract_from_secret(salt, &zeroes[..self.hash_len()])
    }

    /// HKDF-Extract (RFC 5869 §2.2): PRK = HMAC(salt, secret), the salt defaulting to HashLen
    /// zero bytes. rustls' `HkdfUsingHmac` would return the PRK in a `Vec` that is freed
    /// without being erased; here it lives in an `OkmBlock`, which zeroes itself.
    fn extract_from_secret(&self, salt: Option<&[u8]>, secret: &[u8]) -> Box<dyn HkdfExpander> {
        let zeroes = [0u8; OkmBlock::MAX_LEN];
        let salt = salt.unwrap_or(&zeroes[..self.hash_len()]);
        let prk = OkmBlock::new(self.0.with_key(salt).sign(&[secret]).as_ref());
        self.expander_for_okm(&prk)
    }

    fn expander_for_okm(&self, okm: &OkmBlock) -> Box<dyn HkdfExpander> {
        HkdfUsingHmac(self.0).expander_for_okm(okm)
    }

    fn hmac_sign(&self, key: &OkmBlock, message: &[u8]) -> Tag {
        self.0.with_key(key.as_ref()).sign(&[message])
    }

    fn fips(&self) -> bool {
        self.0.fips()
    }
}

/// rustls' `Hmac` over aws-lc-rs (the provider's own adapter is private to rustls).
pub struct AwsLcHmac(hmac::Algorithm);

impl Hmac for AwsLcHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
        Box::new(AwsLcHmacKey(hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }

    /// As the provider's suites report it: aws-lc built in FIPS mode.
    fn fips(&self) -> bool {
        aws_lc_rs::try_fips_mode().is_ok()
    }
}

struct AwsLcHmacKey(hmac::Key);

impl Key for AwsLcHmacKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(first);
        for part in middle {
            ctx.update(part);
        }
        ctx.update(last);
        Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::hkdf;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5869 appendix A.1 (SHA-256, basic case) and A.3 (no salt, no info).
    #[test]
    fn rfc5869_test_vectors() {
        let ikm = hex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let salt = hex("000102030405060708090a0b0c");
        let info = hex("f0f1f2f3f4f5f6f7f8f9");
        let mut okm = [0u8; 42];
        HKDF_SHA256
            .extract_from_secret(Some(&salt), &ikm)
            .expand_slice(&[&info], &mut okm)
            .unwrap();
        assert_eq!(
            okm.to_vec(),
            hex(concat!(
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf",
                "34007208d5b887185865"
            ))
        );
        HKDF_SHA256
            .extract_from_secret(None, &ikm)
            .expand_slice(&[], &mut okm)
            .unwrap();
        assert_eq!(
            okm.to_vec(),
            hex(concat!(
                "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d",
                "9d201395faa4b61a96c8"
            ))
        );
    }

    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    /// Every entry point agrees with aws-lc's own HKDF and HMAC, for both hashes, for salts,
    /// secrets and info split in parts, and for outputs of one block, less, and several.
    #[test]
    fn agrees_with_aws_lc_hkdf() {
        let cases: [(&PreparedKeyHkdf, hkdf::Algorithm, hmac::Algorithm); 2] = [
            (&HKDF_SHA256, hkdf::HKDF_SHA256, hmac::HMAC_SHA256),
            (&HKDF_SHA384, hkdf::HKDF_SHA384, hmac::HMAC_SHA384),
        ];
        let secret: Vec<u8> = (0u8..=96).collect();
        let salt: Vec<u8> = (100u8..148).collect();
        let info: [&[u8]; 3] = [
            b"\x00\x20",
            b"\x0dtls13 derived",
            b"\x20abcdefghijklmnopqrstuvwxyz012345",
        ];
        let joined = info.concat();
        for (ours, alg, hmac_alg) in cases {
            let n = ours.hash_len();
            let zeroes = vec![0u8; n];
            for out_len in [12, 16, n, n + 1, 3 * n + 5] {
                let mut want = vec![0u8; out_len];
                hkdf::Salt::new(alg, &salt)
                    .extract(&secret)
                    .expand(&[&joined], Len(out_len))
                    .unwrap()
                    .fill(&mut want)
                    .unwrap();
                let mut got = vec![0u8; out_len];
                ours.extract_from_secret(Some(&salt), &secret)
                    .expand_slice(&info, &mut got)
                    .unwrap();
                assert_eq!(got, want, "{alg:?} extract+expand, {out_len} bytes");

                hkdf::Salt::new(alg, &zeroes)
                    .extract(&zeroes)
                    .expand(&[&joined], Len(out_len))
                    .unwrap()
                    .fill(&mut want)
                    .unwrap();
                ours.extract_from_zero_ikm(None)
                    .expand_slice(&info, &mut got)
                    .unwrap();
                assert_eq!(got, want, "{alg:?} zero ikm, {out_len} bytes");
            }
            let okm = OkmBlock::new(&secret[..n]);
            let mut want = vec![0u8; n];
            hkdf::Prk::new_less_safe(alg, okm.as_ref())
                .expand(&[&joined], Len(n))
                .unwrap()
                .fill(&mut want)
                .unwrap();
            assert_eq!(
                ours.expander_for_okm(&okm).expand_block(&info).as_ref(),
                &want[..]
            );
            assert_eq!(
                ours.hmac_sign(&okm, b"transcript hash").as_ref(),
                hmac::sign(&hmac::Key::new(hmac_alg, okm.as_ref()), b"transcript hash").as_ref()
            );
        }
    }

    #[test]
    fn refuses_outputs_longer_than_255_blocks() {
        let mut out = vec![0u8; 255 * 32 + 1];
        assert!(
            HKDF_SHA256
                .extract_from_zero_ikm(None)
                .expand_slice(&[b"x"], &mut out)
                .is_err()
        );
    }
}
