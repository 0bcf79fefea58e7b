//! Slow and dead clients (issue 7, hardening): 500 connections that send 5 bytes of a
//! ClientHello and stall, 500 that complete the handshake and send request headers one byte
//! every 3 s, and clients that stop reading a large response. Each connection is closed at
//! its documented deadline (`tls.handshake_timeout`, `http.header_timeout`,
//! `http.idle_timeout`) and counted under its reason; the proxy's memory stays bounded; a
//! normal client is served meanwhile (fresh handshakes and keep-alive requests); afterwards
//! the gauges are 0 and the proxy's descriptors are back to their baseline.
//!
//! The proxy runs as a child process (`ephemera serve --config`): its resident memory
//! (/proc/PID/status) and descriptors (/proc/PID/fd) are then its own. In-process, the 500
//! clients' sockets and TLS state would be counted with it.

mod common;
use bytes::Bytes;
use common::serve::{Serve, memory_kib, raise_nofile};
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// Attacking connections per test.
const N: usize = 500;
/// A deadline is met when the close comes no earlier than this before it (timer and
/// millisecond rounding)…
const EARLY: Duration = Duration::from_millis(100);
/// …and no later than this after it (a generous bound for a loaded 2-core machine).
const LATE: Duration = Duration::from_secs(3);
/// Resident memory the proxy may grow by while holding the attack: a bound that tells
/// buffering or a leak from normal per-connection state (tens of KiB each), not a figure.
const MAX_GROWTH_KIB: u64 = 64 * 1024;

/// Descriptors this process needs: the attacking clients, the normal client, the backend.
fn enough_descriptors() -> bool {
    raise_nofile(N as u64 + 256)
}

/// How a client saw its connection end.
#[derive(Debug)]
enum End {
    /// A clean end: FIN, or close_notify then FIN.
    Closed,
    /// Reset or another socket error (the kind is printed on failure).
    #[allow(dead_code)]
    Error(std::io::ErrorKind),
    /// Still open at the test's own limit.
    StillOpen,
}

fn ended(r: std::io::Result<usize>) -> Option<End> {
    match r {
        Ok(0) => Some(End::Closed),
        Ok(_) => None,
        Err(e) => Some(End::Error(e.kind())),
    }
}

/// Checks every close time against `deadline` (each measured from a point no later than
/// the proxy started its clock) and prints the spread.
fn assert_at_deadline(what: &str, deadline: Duration, closes: &[(Duration, End)]) {
    let mut times: Vec<Duration> = closes.iter().map(|(t, _)| *t).collect();
    times.sort();
    eprintln!(
        "{what}: {} connections closed after min {:?} / median {:?} / max {:?} (deadline {deadline:?})",
        times.len(),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    for (i, (t, end)) in closes.iter().enumerate() {
        assert!(
            !matches!(end, End::StillOpen),
            "{what}: connection {i} still open after {t:?} (deadline {deadline:?})"
        );
        assert!(
            *t + EARLY >= deadline,
            "{what}: connection {i} closed after {t:?}, before the deadline {deadline:?} ({end:?})"
        );
        assert!(
            *t <= deadline + LATE,
            "{what}: connection {i} closed after {t:?}, long past the deadline {deadline:?} ({end:?})"
        );
    }
}

/// A well-behaved client running during an attack: every 250 ms one request on a fresh
/// connection (alternately HTTP/1.1 and HTTP/2) and one on a keep-alive HTTP/2 connection,
/// each of which must succeed within 5 s.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(usize, Vec<String>)>,
}

impl Bystander {
    async fn start(addr: SocketAddr, certs: &Certs) -> Bystander {
        let ca = certs.ca_der();
        let mut keep = HttpClient::connect(addr, &ca, true).await;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut served, mut failures) = (0, Vec::new());
            let mut round = 0usize;
            while !stopped.load(Ordering::Relaxed) {
                let h2 = round.is_multiple_of(2);
                round += 1;
                let fresh = async {
                    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
                    let tls = tls_connect(addr, "localhost", client_config(&ca, alpn))
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                    let mut c = HttpClient::over(tls, h2).await;
                    status_of(&mut c).await
                };
                for (what, r) in [
                    ("fresh", timeout(Duration::from_secs(5), fresh).await),
                    (
                        "keep-alive",
                        timeout(Duration::from_secs(5), status_of(&mut keep)).await,
                    ),
                ] {
                    match r {
                        Ok(Ok(200)) => served += 1,
                        Ok(Ok(s)) => failures.push(format!("{what} h2={h2}: status {s}")),
                        Ok(Err(e)) => failures.push(format!("{what} h2={h2}: {e}")),
                        Err(_) => failures.push(format!("{what} h2={h2}: no answer within 5 s")),
                    }
                }
                sleep(Duration::from_millis(250)).await;
            }
            (served, failures)
        });
        Bystander { stop, task }
    }

    /// Stops it and asserts it was served throughout.
    async fn assert_served(self, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (served, failures) = self.task.await.unwrap();
        eprintln!("{what}: normal client served {served} requests meanwhile");
        assert!(
            failures.is_empty(),
            "{what}: the normal client was not served: {failures:?}"
        );
        assert!(served >= 4, "{what}: only {served} normal requests ran");
    }
}

async fn status_of(c: &mut HttpClient) -> Result<u16, String> {
    let resp = c
        .send(request("GET", "/", empty()))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(status)
}

/// Samples the proxy's resident memory and open-connections gauge every 100 ms while an
/// attack runs; `finish` gives the peaks.
struct Peaks {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(u64, f64)>,
}

impl Peaks {
    fn start(serve: &Serve) -> Peaks {
        let (pid, admin) = (serve.pid(), serve.admin);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut rss, mut open) = (0u64, 0f64);
            while !stopped.load(Ordering::Relaxed) {
                rss = rss.max(memory_kib(pid).0);
                let m = admin_get(admin, "/metrics").await.1;
                open = open.max(metric(&m, "ephemera_connections_open", &[]));
                sleep(Duration::from_millis(100)).await;
            }
            (rss, open)
        });
        Peaks { stop, task }
    }

    /// (peak VmRSS KiB, peak `ephemera_connections_open`).
    async fn finish(self) -> (u64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Asserts the memory bound and prints the figures.
fn assert_memory(what: &str, serve: &Serve, before: u64, peak: u64, connections: usize) {
    let (after, hwm) = serve.memory_kib();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "{what}: proxy VmRSS before {before} KiB, peak {peak} KiB (+{growth} KiB, {} KiB per \
         connection), after {after} KiB; VmHWM {hwm} KiB",
        growth / connections as u64
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "{what}: the proxy grew by {growth} KiB holding {connections} connections"
    );
}

/// Starts the proxy and warms it up (allocator, first handshakes) so that the memory
/// baseline is not the cold process: (proxy, descriptor baseline, VmRSS baseline).
async fn start(certs: &Certs, yaml: &str) -> (Serve, usize, u64) {
    let serve = Serve::start_yaml(certs.dir.path(), yaml).await;
    let fds = serve.open_fds();
    for h2 in [false, true, false, true] {
        let mut c = HttpClient::connect(serve.addr, &certs.ca_der(), h2).await;
        assert_eq!(status_of(&mut c).await, Ok(200));
    }
    serve.assert_settled(fds, Duration::from_secs(5)).await;
    let rss = serve.memory_kib().0;
    (serve, fds, rss)
}

/// Graceful stop: exit 0 and no panic logged.
async fn stop(mut serve: Serve) {
    serve.sigterm();
    let status = serve.exit_within(Duration::from_secs(10)).await;
    let log = serve.log();
    assert!(status.success(), "{status}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// 500 connections send the first 5 bytes of a ClientHello (its record header) and stall:
/// each is closed at `tls.handshake_timeout` and counted as a handshake failure
/// `reason="timeout"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_hellos_are_closed_at_handshake_timeout() {
    let _serial = serial().await;
    if !enough_descriptors() {
        return;
    }
    let deadline = Duration::from_secs(3);
    let certs = Certs::new(&["localhost"]);
    let yaml = config_yaml(&certs, None, "      handshake_timeout: 3s\n", "", "");
    let (serve, fd_baseline, rss_before) = start(&certs, &yaml).await;
    let bystander = Bystander::start(serve.addr, &certs).await;
    let peaks = Peaks::start(&serve);

    let addr = serve.addr;
    let clients: Vec<_> = (0..N)
        .map(|_| {
            tokio::spawn(async move {
                // The proxy's clock starts at its accept, after this.
                let started = Instant::now();
                let mut s = TcpStream::connect(addr).await.unwrap();
                // A TLS record header: handshake, legacy version 3.1, 512 bytes to follow.
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
                let mut buf = [0u8; 512];
                let limit = started + deadline + LATE + Duration::from_secs(2);
                loop {
                    match tokio::time::timeout_at(limit, s.read(&mut buf)).await {
                        Err(_) => return (started.elapsed(), End::StillOpen),
                        Ok(r) => {
                            if let Some(end) = ended(r) {
                                return (started.elapsed(), end);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut closes = Vec::new();
    for c in clients {
        closes.push(c.await.unwrap());
    }
    let (rss_peak, open_peak) = peaks.finish().await;
    bystander.assert_served("stalled ClientHellos").await;
    assert_at_deadline("stalled ClientHellos", deadline, &closes);
    assert!(
        open_peak >= N as f64,
        "only {open_peak} connections were open at once"
    );
    assert_memory("stalled ClientHellos", &serve, rss_before, rss_peak, N);

    serve
        .assert_settled(fd_baseline, Duration::from_secs(10))
        .await;
    let m = serve.metrics().await;
    let failures = |r: &str| {
        metric(
            &m,
            "ephemera_tls_handshake_failures_total",
            &[&format!("reason=\"{r}\"")],
        )
    };
    assert_eq!(failures("timeout"), N as f64, "{m}");
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        N as f64,
        "no other handshake failures: {m}"
    );
    stop(serve).await;
}

/// 500 clients complete the handshake (HTTP/1.1), then send a request's headers one byte
/// every 3 s: each is closed `http.header_timeout` after its first byte (a total, not a
/// per-byte timeout: the byte at 3 s does not extend it) and counted as
/// `ephemera_tls_connections_closed_total{reason="header_timeout"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_request_headers_are_cut_off_at_header_timeout() {
    let _serial = serial().await;
    if !enough_descriptors() {
        return;
    }
    let deadline = Duration::from_secs(4);
    let certs = Certs::new(&["localhost"]);
    let yaml = config_yaml(&certs, None, "", "      idle_timeout: 30s\n", "")
        .replace("header_timeout: 10s", "header_timeout: 4s");
    let (serve, fd_baseline, rss_before) = start(&certs, &yaml).await;
    let bystander = Bystander::start(serve.addr, &certs).await;
    let peaks = Peaks::start(&serve);

    // All handshakes first (64 at a time), so that every connection is open before the
    // first deadline runs.
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let handshakes: Vec<_> = (0..N)
        .map(|_| {
            let (gate, config) = (gate.clone(), client_config(&certs.ca_der(), &[b"http/1.1"]));
            let addr = serve.addr;
            tokio::spawn(async move {
                let _slot = gate.acquire().await.unwrap();
                tls_connect(addr, "localhost", config).await.unwrap()
            })
        })
        .collect();
    let mut streams = Vec::new();
    for h in handshakes {
        streams.push(h.await.unwrap());
    }
    eprintln!("{N} handshakes in {:?}", started.elapsed());

    let clients: Vec<_> = streams
        .into_iter()
        .map(|mut tls| {
            tokio::spawn(async move {
                let head = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
                // The proxy's clock starts when it reads the first byte, after this.
                let started = Instant::now();
                tls.write_all(&head[..1]).await.unwrap();
                tls.flush().await.unwrap();
                let mut sent = 1;
                let mut next = started + Duration::from_secs(3);
                let limit = started + deadline + LATE + Duration::from_secs(2);
                let mut buf = [0u8; 1024];
                loop {
                    tokio::select! {
                        r = tls.read(&mut buf) => {
                            if let Some(end) = ended(r) {
                                return (started.elapsed(), end, sent);
                            }
                        }
                        _ = tokio::time::sleep_until(next), if sent < head.len() => {
                            let wrote = async {
                                tls.write_all(&head[sent..sent + 1]).await?;
                                tls.flush().await
                            };
                            if let Err(e) = wrote.await {
                                return (started.elapsed(), End::Error(e.kind()), sent);
                            }
                            sent += 1;
                            next += Duration::from_secs(3);
                        }
                        _ = tokio::time::sleep_until(limit) => {
                            return (started.elapsed(), End::StillOpen, sent);
                        }
                    }
                }
            })
        })
        .collect();
    let mut closes = Vec::new();
    for c in clients {
        let (t, end, _sent) = c.await.unwrap();
        closes.push((t, end));
    }
    let (rss_peak, open_peak) = peaks.finish().await;
    bystander.assert_served("trickled headers").await;
    assert_at_deadline("trickled headers", deadline, &closes);
    assert!(
        open_peak >= N as f64,
        "only {open_peak} connections were open at once"
    );
    assert_memory("trickled headers", &serve, rss_before, rss_peak, N);

    serve
        .assert_settled(fd_baseline, Duration::from_secs(10))
        .await;
    let m = serve.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_connections_closed_total",
            &["reason=\"header_timeout\""]
        ),
        N as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "ephemera_tls_handshake_failures_total", &[]),
        0.0,
        "{m}"
    );
    stop(serve).await;
}

/// A backend whose `/endless/ID` responses are 1 GiB long and record, per ID, when they stop
/// being taken: the moment the proxy drops the backend connection of a client it cut off.
/// Anything else: `ok`.
struct EndlessBackend {
    addr: SocketAddr,
    cut: Arc<Mutex<HashMap<usize, Instant>>>,
}

/// Records its drop time under an ID.
struct CutGuard(usize, Arc<Mutex<HashMap<usize, Instant>>>);

impl Drop for CutGuard {
    fn drop(&mut self) {
        self.1.lock().unwrap().insert(self.0, Instant::now());
    }
}

static ZEROS: [u8; 65536] = [0; 65536];
const ENDLESS_CHUNKS: usize = 16384;

impl EndlessBackend {
    async fn start() -> EndlessBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let cuts = cuts.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let id = req
                        .uri()
                        .path()
                        .strip_prefix("/endless/")
                        .and_then(|i| i.parse::<usize>().ok());
                    let cuts = cuts.clone();
                    async move {
                        let Some(id) = id else {
                            return Ok::<_, Infallible>(Response::new(full("ok")));
                        };
                        let guard = CutGuard(id, cuts);
                        let chunks = std::iter::repeat_with(move || {
                            let _ = &guard;
                            Ok::<_, BoxError>(Frame::data(Bytes::from_static(&ZEROS)))
                        })
                        .take(ENDLESS_CHUNKS);
                        let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
                        let mut resp = Response::new(body);
                        resp.headers_mut()
                            .insert("content-length", (ENDLESS_CHUNKS * ZEROS.len()).into());
                        Ok(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        EndlessBackend { addr, cut }
    }
}

/// Clients that stop reading a 1 GiB response (HTTP/1.1: the proxy's writes block) are cut
/// off `http.idle_timeout` after they stopped (`reason="stalled"`), their backend
/// connections with them; the proxy buffers none of the response beyond its fixed buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_cut_off_at_idle_timeout() {
    const K: usize = 10;
    let _serial = serial().await;
    if !enough_descriptors() {
        return;
    }
    let deadline = Duration::from_secs(2);
    let certs = Certs::new(&["localhost"]);
    let backend = EndlessBackend::start().await;
    let yaml = config_yaml(
        &certs,
        Some(&[backend.addr]),
        "",
        "      idle_timeout: 2s\n",
        "",
    );
    let (serve, fd_baseline, rss_before) = start(&certs, &yaml).await;
    let bystander = Bystander::start(serve.addr, &certs).await;
    let peaks = Peaks::start(&serve);

    let clients: Vec<_> = (0..K)
        .map(|id| {
            let config = client_config(&certs.ca_der(), &[b"http/1.1"]);
            let addr = serve.addr;
            tokio::spawn(async move {
                let mut tls = tls_connect(addr, "localhost", config).await.unwrap();
                // The proxy's clock starts when a write to us blocks, after this. (Not when
                // we stop reading: it cannot see our reads from what the kernel buffered.)
                let asked = Instant::now();
                tls.write_all(
                    format!("GET /endless/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
                )
                .await
                .unwrap();
                tls.flush().await.unwrap();
                // Take the head and the first 256 KiB, then stop reading.
                let mut got = 0;
                let mut buf = vec![0u8; 65536];
                while got < 256 * 1024 {
                    let n = tls.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed early");
                    got += n;
                }
                (asked, got, tls)
            })
        })
        .collect();
    let mut stopped = Vec::new();
    for c in clients {
        stopped.push(c.await.unwrap());
    }
    // Wait for the proxy to cut them all (seen at the backend), then resume reading: what
    // was still buffered arrives, then the end, well short of the 1 GiB.
    let wait_until = Instant::now() + deadline + LATE + Duration::from_secs(2);
    while backend.cut.lock().unwrap().len() < K && Instant::now() < wait_until {
        sleep(Duration::from_millis(20)).await;
    }
    let (rss_peak, open_peak) = peaks.finish().await;
    let cut = backend.cut.lock().unwrap().clone();
    let mut closes = Vec::new();
    for (id, (asked, got, mut tls)) in stopped.into_iter().enumerate() {
        let Some(at) = cut.get(&id) else {
            closes.push((asked.elapsed(), End::StillOpen));
            continue;
        };
        let mut rest = 0usize;
        let mut buf = vec![0u8; 65536];
        let end = loop {
            match timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
                Err(_) => break End::StillOpen,
                Ok(Ok(n)) if n > 0 => rest += n,
                Ok(r) => break ended(r).unwrap(),
            }
        };
        eprintln!(
            "stalled reader {id}: read {got} bytes, stopped; cut {:?} after its request; then {rest} more bytes and {end:?}",
            *at - asked
        );
        assert!(
            got + rest < 64 << 20,
            "client {id}: {} bytes arrived: not cut off",
            got + rest
        );
        closes.push((*at - asked, end));
    }
    bystander.assert_served("stalled readers").await;
    assert_at_deadline("stalled readers", deadline, &closes);
    assert!(open_peak >= K as f64, "only {open_peak} connections open");
    assert_memory("stalled readers", &serve, rss_before, rss_peak, K);

    serve
        .assert_settled(fd_baseline, Duration::from_secs(10))
        .await;
    let m = serve.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ephemera_tls_connections_closed_total",
            &["reason=\"stalled\""]
        ),
        K as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "ephemera_upstream_errors_total", &[]),
        0.0,
        "a client stall is not a backend error: {m}"
    );
    stop(serve).await;
}
