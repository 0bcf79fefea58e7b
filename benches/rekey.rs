//! Cost of forced KeyUpdates, measured in one run, side by side:
//! 1. the per-read/per-write policy check (`Rekey::on_read`/`on_write`), in ns per call;
//! 2. throughput of a large HTTP/1.1 download through the proxy with key updates off, every
//!    64 MiB and every 1 MiB, rounds interleaved; reported as MB/s and cost relative to off.
//!
//! `cargo bench --bench rekey` (1 GiB per download, 3 rounds; `REKEY_BENCH_MIB` and
//! `REKEY_BENCH_ROUNDS` override). Under `cargo test --all-targets` it runs a small smoke
//! version so the bench keeps compiling and working.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::*;
use ephemera::config::KeyUpdatePolicy;
use ephemera::metrics::Metrics;
use ephemera::tls::rekey::Rekey;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("REKEY_BENCH_MIB", if full { 1024 } else { 16 });
    let rounds = env("REKEY_BENCH_ROUNDS", if full { 5 } else { 1 });
    let calls = if full { 200_000_000 } else { 1_000_000 };

    check_cost(calls);
    update_cost(if full { 20_000 } else { 200 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // HTTP/1.1: the client sends nothing during a download, so past 31 updates the rest
    // are deferred. HTTP/2: WINDOW_UPDATE frames are client data, so every update fires.
    rt.block_on(throughput(mib, rounds, false));
    rt.block_on(throughput(mib, rounds, true));
}

/// The hot-path check: what every read and write pays.
fn check_cost(calls: u64) {
    let metrics = Metrics::new();
    let listener = metrics.listener("bench", &["x25519"]);
    for (label, policy) in [
        ("key_update: false", None),
        (
            "max_bytes: 1GiB, max_age: 1h",
            Some(KeyUpdatePolicy::DEFAULT),
        ),
    ] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut k = Rekey::new(policy);
        let started = Instant::now();
        let mut due = 0u64;
        for i in 0..calls {
            // 16 KiB records: a large limit is never reached in this loop.
            let n = black_box(16 * 1024 + (i as usize & 1));
            if let Some(t) = if i & 1 == 0 {
                k.on_read(n)
            } else {
                k.on_write(n)
            } {
                // Rare (once per max_bytes): restart the counters as a real update would.
                k.updated(t, true, listener.rekey());
                due += 1;
            }
        }
        let ns = started.elapsed().as_nanos() as f64 / calls as f64;
        println!("check cost ({label}): {ns:.2} ns per read/write call ({calls} calls, {due} due)");
    }
}

/// CPU for one complete forced update, both sides: our KeyUpdate (update_requested), the
/// client's answer, each side deriving new traffic secrets and keys. In memory, no sockets.
fn update_cost(updates: u32) {
    use rustls::pki_types::pem::PemObject;
    use std::sync::Arc;
    let certs = Certs::new(&["localhost"]);
    let groups = [ephemera::config::Group::X25519];
    let provider = ephemera::tls::policy::provider(&groups);
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&certs.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&certs.key).unwrap();
    let ck = rustls::sign::CertifiedKey::from_der(chain, key, &provider).unwrap();
    let server_cfg = ephemera::tls::policy::server_config(
        &groups,
        Arc::new(rustls::sign::SingleCertAndKey::from(ck)),
        None,
    )
    .unwrap();
    let client_cfg = client_config(&certs.ca_der(), &[b"http/1.1"]);
    let mut client =
        rustls::ClientConnection::new(Arc::new(client_cfg), "localhost".try_into().unwrap())
            .unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server_cfg)).unwrap();
    fn pump(
        from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
        to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    ) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }
    while client.is_handshaking() || server.is_handshaking() {
        pump(&mut client, &mut server);
        pump(&mut server, &mut client);
    }
    let mut round = |rekey: bool| {
        let started = Instant::now();
        for _ in 0..updates {
            if rekey {
                server.refresh_traffic_keys().unwrap();
            }
            // Application data each way keeps both peers' in-a-row counters at zero.
            std::io::Write::write_all(&mut server.writer(), b"x").unwrap();
            pump(&mut server, &mut client);
            std::io::Write::write_all(&mut client.writer(), b"y").unwrap();
            pump(&mut client, &mut server);
            let mut sink = [0u8; 16];
            let _ = std::io::Read::read(&mut client.reader(), &mut sink);
            let _ = std::io::Read::read(&mut server.reader(), &mut sink);
        }
        started.elapsed().as_secs_f64() * 1e6 / f64::from(updates)
    };
    let base = round(false);
    let with = round(true);
    let us = with - base;
    println!(
        "one forced update, both sides (KeyUpdate, answer, new keys): {us:.2} µs ({with:.2} with vs {base:.2} without, per 1-byte exchange; {updates} updates)"
    );
    println!(
        "  => every 1 MiB: {:.2} ms of CPU per GiB; every 64 MiB: {:.3} ms per GiB",
        us * 1024.0 / 1000.0,
        us * 16.0 / 1000.0
    );
}

/// A backend that streams `N` bytes from one static buffer (no per-byte work), so the proxy's
/// own cost dominates the measurement.
async fn zeros_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    static BUF: [u8; CHUNK] = [0x5a; CHUNK];
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let n: usize = req
                            .uri()
                            .path()
                            .trim_start_matches('/')
                            .parse()
                            .unwrap_or(0);
                        let chunks = (0..n.div_ceil(CHUNK)).map(move |i| {
                            let len = (n - i * CHUNK).min(CHUNK);
                            Ok::<_, BoxError>(Frame::data(Bytes::from_static(&BUF[..len])))
                        });
                        let mut resp = hyper::Response::new(
                            StreamBody::new(futures_util::stream::iter(chunks)).boxed(),
                        );
                        resp.headers_mut().insert("content-length", n.into());
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    addr
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process (proxy, backend and client together), in clock ticks.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

async fn throughput(mib: usize, rounds: usize, h2: bool) {
    let certs = Certs::new(&["localhost"]);
    let backend = zeros_backend().await;
    let cases = [
        ("off", "false"),
        ("every 64 MiB", "{ max_bytes: 64MiB }"),
        ("every 1 MiB", "{ max_bytes: 1MiB }"),
    ];
    let mut proxies = Vec::new();
    for (_, ku) in cases {
        let yaml = config_yaml(
            &certs,
            Some(&[backend]),
            &format!("      key_update: {ku}\n"),
            "",
            "",
        );
        proxies.push(Proxy::start(&yaml).await);
    }
    let len = mib * 1024 * 1024;
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, proxy) in proxies.iter().enumerate() {
            let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), h2).await;
            let cpu0 = cpu_seconds();
            let started = Instant::now();
            let resp = c
                .send(request("GET", &format!("/{len}"), empty()))
                .await
                .unwrap();
            let mut body = resp.into_body();
            let mut n = 0usize;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    n += d.len();
                }
            }
            assert_eq!(n, len, "download truncated");
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            results[i].push((
                len as f64 / secs / 1e6,
                (cpu_seconds() - cpu0) / (len as f64 / (1u64 << 30) as f64),
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let base = median(&mut results[0].iter().map(|r| r.0).collect());
    let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
    println!("\n{proto} download of {mib} MiB through the proxy, {rounds} round(s), median:");
    println!(
        "| key updates | MB/s | process CPU s per GiB | updates per download | throughput cost vs off |"
    );
    println!("|---|---|---|---|---|");
    for (i, (label, _)) in cases.iter().enumerate() {
        let tput = median(&mut results[i].iter().map(|r| r.0).collect());
        let cpu = median(&mut results[i].iter().map(|r| r.1).collect());
        let updates = metric(
            &proxies[i].metrics().await,
            "ephemera_tls_key_updates_total",
            &[],
        ) / rounds as f64;
        println!(
            "| {label} | {tput:.0} | {cpu:.2} | {updates} | {:+.1}% |",
            (1.0 - tput / base) * 100.0
        );
    }
}
