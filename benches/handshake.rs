//! Server-side CPU of one full TLS 1.3 handshake through Ephemera's policy
//! (`tls::policy::server_config`), in memory with no sockets, next to the raw crypto floor
//! measured in the same run (X25519 and P-256 keygen + agree, ECDSA P-256 sign, ML-KEM-768
//! encapsulate), so the overhead above the floor is one ratio.
//!
//! Only the server's calls (`ServerConnection::new`, `read_tls`, `process_new_packets`,
//! `write_tls`) are timed: the client's work in the same loop is excluded.
//!
//! `cargo bench --bench handshake`; a summary of ratios follows criterion's output.

use criterion::{Criterion, criterion_group};
use ephemera::config::Group;
use ephemera::tls::policy;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Case {
    name: &'static str,
    group: Group,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn certified(
    rsa: bool,
    provider: &rustls::crypto::CryptoProvider,
) -> (rustls::sign::CertifiedKey, CertificateDer<'static>) {
    let alg = if rsa {
        &rcgen::PKCS_RSA_SHA256
    } else {
        &rcgen::PKCS_ECDSA_P256_SHA256
    };
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    (
        rustls::sign::CertifiedKey::from_der(vec![der.clone()], key, provider).unwrap(),
        der,
    )
}

fn case(name: &'static str, group: Group, rsa: bool) -> Case {
    let provider = policy::provider(&[group]);
    let (ck, der) = certified(rsa, &provider);
    let server = policy::server_config(
        &[group],
        Arc::new(rustls::sign::SingleCertAndKey::from(ck)),
        None,
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    // The client offers exactly the group under test: no HelloRetryRequest.
    let client = ClientConfig::builder_with_provider(Arc::new(policy::provider(&[group])))
        .with_protocol_versions(policy::VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Case {
        name,
        group,
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// One full handshake; returns the time spent in the server's calls.
fn server_handshake(c: &Case) -> Duration {
    let mut client =
        ClientConnection::new(c.client.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut spent = Duration::ZERO;
    let t = Instant::now();
    let mut server = ServerConnection::new(c.server.clone()).unwrap();
    spent += t.elapsed();
    let mut to_server = Vec::with_capacity(4096);
    let mut to_client = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() {
        to_server.clear();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        let t = Instant::now();
        let mut rd = to_server.as_slice();
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
        }
        to_client.clear();
        while server.wants_write() {
            server.write_tls(&mut to_client).unwrap();
        }
        spent += t.elapsed();
        let mut rd = to_client.as_slice();
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
    }
    assert_eq!(
        server.negotiated_key_exchange_group().map(|g| g.name()),
        Some(policy::kx_group(c.group).name())
    );
    black_box(&server);
    spent
}

fn cases() -> Vec<Case> {
    vec![
        case("x25519_ecdsa_p256", Group::X25519, false),
        case("secp256r1_ecdsa_p256", Group::Secp256r1, false),
        case("x25519mlkem768_ecdsa_p256", Group::X25519Mlkem768, false),
        case("x25519_rsa2048", Group::X25519, true),
    ]
}

mod floor {
    use aws_lc_rs::{agreement, kem, rand, signature};

    pub struct Floor {
        rng: rand::SystemRandom,
        peer_x25519: Vec<u8>,
        peer_p256: Vec<u8>,
        ecdsa: signature::EcdsaKeyPair,
        mlkem_peer: kem::EncapsulationKey<kem::AlgorithmId>,
    }

    impl Floor {
        pub fn new() -> Floor {
            let rng = rand::SystemRandom::new();
            let peer = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
            let peer_x25519 = peer.compute_public_key().unwrap().as_ref().to_vec();
            let peer =
                agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng).unwrap();
            let peer_p256 = peer.compute_public_key().unwrap().as_ref().to_vec();
            let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &rng,
            )
            .unwrap();
            let ecdsa = signature::EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                pkcs8.as_ref(),
            )
            .unwrap();
            let dk = kem::DecapsulationKey::generate(&kem::ML_KEM_768).unwrap();
            Floor {
                rng,
                peer_x25519,
                peer_p256,
                ecdsa,
                mlkem_peer: dk.encapsulation_key().unwrap(),
            }
        }

        /// The server's key share and shared secret for X25519.
        pub fn x25519(&self) {
            self.ecdhe(&agreement::X25519, &self.peer_x25519);
        }

        /// The same for P-256 (secp256r1).
        pub fn p256(&self) {
            self.ecdhe(&agreement::ECDH_P256, &self.peer_p256);
        }

        fn ecdhe(&self, alg: &'static agreement::Algorithm, peer: &[u8]) {
            let me = agreement::EphemeralPrivateKey::generate(alg, &self.rng).unwrap();
            let _public = me.compute_public_key().unwrap();
            let peer = agreement::UnparsedPublicKey::new(alg, peer);
            agreement::agree_ephemeral(me, peer, (), |k| {
                std::hint::black_box(k);
                Ok(())
            })
            .unwrap();
        }

        /// The CertificateVerify signature.
        pub fn ecdsa_p256_sign(&self) {
            std::hint::black_box(
                self.ecdsa
                    .sign(&self.rng, b"TLS 1.3, server CertificateVerify")
                    .unwrap(),
            );
        }

        /// The ML-KEM half of the hybrid: the server encapsulates to the client's key.
        pub fn mlkem768_encapsulate(&self) {
            std::hint::black_box(self.mlkem_peer.encapsulate().unwrap());
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("server_full_handshake");
    for case in cases() {
        g.bench_function(case.name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| server_handshake(&case)).sum())
        });
    }
    g.finish();
    let f = floor::Floor::new();
    let mut g = c.benchmark_group("crypto_floor");
    g.bench_function("x25519_keygen_agree", |b| b.iter(|| f.x25519()));
    g.bench_function("p256_keygen_agree", |b| b.iter(|| f.p256()));
    g.bench_function("ecdsa_p256_sign", |b| b.iter(|| f.ecdsa_p256_sign()));
    g.bench_function("mlkem768_encapsulate", |b| {
        b.iter(|| f.mlkem768_encapsulate())
    });
    g.finish();
}

criterion_group!(benches, bench);

/// Median of `n` timed runs of `f`, in µs.
fn median_us(n: usize, mut f: impl FnMut() -> Duration) -> f64 {
    let mut v: Vec<f64> = (0..n).map(|_| f().as_secs_f64() * 1e6).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[n / 2]
}

fn timed(f: impl Fn()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// One line per case: server µs per handshake, the crypto floor for it, and the ratio.
fn summary() {
    let f = floor::Floor::new();
    let n = 2001;
    let x25519 = median_us(n, || timed(|| f.x25519()));
    let p256 = median_us(n, || timed(|| f.p256()));
    let sign = median_us(n, || timed(|| f.ecdsa_p256_sign()));
    let mlkem = median_us(n, || timed(|| f.mlkem768_encapsulate()));
    println!(
        "\nsummary (median of {n}): crypto floor x25519 {x25519:.1} µs, p256 ecdh {p256:.1} µs, ecdsa_p256_sign {sign:.1} µs, mlkem768_encapsulate {mlkem:.1} µs"
    );
    for c in cases() {
        if c.name.contains("rsa") {
            let us = median_us(n / 4, || server_handshake(&c));
            println!(
                "  {:<28} server {us:>7.1} µs per handshake (RSA-2048 signing dominates; no floor ratio)",
                c.name
            );
            continue;
        }
        let floor = match c.group {
            Group::X25519Mlkem768 => x25519 + mlkem + sign,
            Group::Secp256r1 | Group::Secp384r1 => p256 + sign,
            Group::X25519 => x25519 + sign,
        };
        let us = median_us(n, || server_handshake(&c));
        println!(
            "  {:<28} server {us:>7.1} µs per handshake, floor {floor:>5.1} µs, ratio {:.2}",
            c.name,
            us / floor
        );
    }
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // Under `cargo test --all-targets` criterion runs each bench once; skip the summary there.
    if std::env::args().any(|a| a == "--bench") {
        summary();
    }
}
