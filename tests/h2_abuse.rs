//! HTTP/2 abuse against the proxy's HTTP/2 server (hyper 1 over h2 0.4.20), spoken by a raw
//! frame writer over a rustls client connection (ALPN h2): rapid reset (CVE-2023-44487),
//! CONTINUATION flood (CVE-2024-27316), empty DATA frame flood, HPACK bomb (over the header
//! list limit: 431; far over it: GOAWAY), SETTINGS and PING floods (read backpressure), and
//! server-provoked resets ("MadeYouReset", CVE-2025-8671). After each, a well-behaved HTTP/2
//! client (the harness's `HttpClient`) still gets 200, on a connection opened before the abuse
//! (probed during it) and on a fresh one.
//!
//! Every abusive write loop is bounded in bytes (`FLOOD_LIMIT`) and in time (`TEST_BOUND`), so
//! a server that stops defending makes a test fail, not hang. Where the defence is a limit
//! inside h2 0.4.20 (not a setting of ours), the comment names the constant; these tests then
//! guard against an h2/hyper upgrade or builder change that loosens it. All tests take the
//! `serial()` lock: they load the machine.

mod common;
#[path = "common/h2frames.rs"]
mod h2frames;

use common::*;
use h2frames::{Frame, GoAway, Status, code, hpack, kind};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;
type Rd = ReadHalf<ClientTls>;
type Wr = WriteHalf<ClientTls>;

/// No abusive connection writes more than this.
const FLOOD_LIMIT: u64 = 64 << 20;
/// Bound on each abusive phase (the whole test stays near it at worst).
const TEST_BOUND: Duration = Duration::from_secs(20);
/// How long a GOAWAY (after we stop writing) or the close (after the GOAWAY) may take.
const REPLY_BOUND: Duration = Duration::from_secs(5);

// ---------- setup ----------

async fn proxy(certs: &Certs, upstream: Option<&[std::net::SocketAddr]>) -> Proxy {
    Proxy::start(&config_yaml(certs, upstream, "", "", "")).await
}

/// A TLS connection with ALPN h2 and the HTTP/2 preface done: our preface and empty SETTINGS
/// sent, the server's SETTINGS read and acknowledged. `small_buffers` sets 32 KiB socket
/// buffers on our side (no autotuning), so read backpressure from the server shows within a
/// few MiB.
async fn raw_h2(proxy: &Proxy, certs: &Certs, small_buffers: bool) -> (Rd, Wr) {
    let socket = TcpSocket::new_v4().unwrap();
    if small_buffers {
        socket.set_recv_buffer_size(32 * 1024).unwrap();
        socket.set_send_buffer_size(32 * 1024).unwrap();
    }
    let tcp = socket.connect(proxy.addr).await.unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&certs.ca_der(), &[b"h2"])));
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(h2frames::PREFACE).await.unwrap();
    tls.write_all(&h2frames::settings(&[])).await.unwrap();
    // Both the server's SETTINGS and its ACK of ours, so no ACK counted later is for them.
    let (mut settings, mut ack) = (false, false);
    while !(settings && ack) {
        let f = timeout(REPLY_BOUND, h2frames::read_frame(&mut tls))
            .await
            .expect("server SETTINGS in time")
            .unwrap()
            .expect("server SETTINGS before EOF");
        if f.is_ack(kind::SETTINGS) {
            ack = true;
        } else if f.kind == kind::SETTINGS {
            assert!(!settings, "second SETTINGS before our ACK");
            settings = true;
            tls.write_all(&h2frames::settings_ack()).await.unwrap();
        }
    }
    tls.flush().await.unwrap();
    tokio::io::split(tls)
}

// ---------- reading the server's frames ----------

enum Event {
    Frame(Frame),
    /// The connection ended: "EOF" or the read error.
    End(String),
}

/// The server's frames, read by a task. PING and SETTINGS acknowledgements are only counted
/// (a flood's answers would fill memory); everything else is passed on.
struct Reader {
    rx: mpsc::UnboundedReceiver<Event>,
    /// Set at the first GOAWAY or at the end of the connection: flood loops stop on it.
    stop: Arc<AtomicBool>,
    ping_acks: Arc<AtomicU64>,
    settings_acks: Arc<AtomicU64>,
    /// Frames passed on so far, for failure messages.
    seen: Vec<String>,
}

fn spawn_reader(mut rd: Rd) -> Reader {
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let ping_acks = Arc::new(AtomicU64::new(0));
    let settings_acks = Arc::new(AtomicU64::new(0));
    let (s, p, a) = (stop.clone(), ping_acks.clone(), settings_acks.clone());
    tokio::spawn(async move {
        loop {
            match h2frames::read_frame(&mut rd).await {
                Ok(Some(f)) if f.is_ack(kind::PING) => {
                    p.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(f)) if f.is_ack(kind::SETTINGS) => {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(f)) => {
                    if f.kind == kind::GOAWAY {
                        s.store(true, Ordering::Relaxed);
                    }
                    if tx.send(Event::Frame(f)).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    s.store(true, Ordering::Relaxed);
                    let _ = tx.send(Event::End("EOF".into()));
                    return;
                }
                Err(e) => {
                    s.store(true, Ordering::Relaxed);
                    let _ = tx.send(Event::End(format!("read error: {e}")));
                    return;
                }
            }
        }
    });
    Reader {
        rx,
        stop,
        ping_acks,
        settings_acks,
        seen: Vec::new(),
    }
}

impl Reader {
    fn summary(&self) -> String {
        let n = self.seen.len();
        let tail = &self.seen[n.saturating_sub(8)..];
        format!("{n} frames seen, last: {tail:?}")
    }

    /// Frames up to and including the first GOAWAY; panics on the end of the connection or
    /// on `within` passing first.
    async fn until_goaway(&mut self, within: Duration) -> (GoAway, Vec<Frame>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut before = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Event::Frame(f))) => {
                    self.seen.push(f.describe());
                    if let Some(g) = f.goaway() {
                        return (g, before);
                    }
                    before.push(f);
                }
                Ok(Some(Event::End(why))) => {
                    panic!(
                        "connection ended ({why}) without GOAWAY; {}",
                        self.summary()
                    )
                }
                Ok(None) => panic!("reader gone without GOAWAY; {}", self.summary()),
                Err(_) => panic!("no GOAWAY within {within:?}; {}", self.summary()),
            }
        }
    }

    /// After a GOAWAY: the server closes the connection within `within` (frames after the
    /// GOAWAY are returned; a GOAWAY among them must say the same code).
    async fn until_closed(&mut self, within: Duration) -> (Vec<Frame>, String) {
        let deadline = tokio::time::Instant::now() + within;
        let mut after = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Event::Frame(f))) => {
                    self.seen.push(f.describe());
                    after.push(f);
                }
                Ok(Some(Event::End(why))) => return (after, why),
                Ok(None) => return (after, "reader gone".into()),
                Err(_) => panic!(
                    "server did not close the connection within {within:?} of its GOAWAY; {}",
                    self.summary()
                ),
            }
        }
    }

    /// Frames until a HEADERS frame on `stream`; panics on GOAWAY, end or timeout.
    async fn until_headers(&mut self, stream: u32, within: Duration) -> (Status, Vec<Frame>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut before = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Event::Frame(f))) => {
                    self.seen.push(f.describe());
                    if let Some(g) = f.goaway() {
                        panic!("{g} while waiting for stream {stream}; {}", self.summary());
                    }
                    if f.kind == kind::HEADERS && f.stream == stream {
                        return (f.status().unwrap(), before);
                    }
                    before.push(f);
                }
                Ok(Some(Event::End(why))) => panic!(
                    "connection ended ({why}) before a response on stream {stream}; {}",
                    self.summary()
                ),
                Ok(None) => panic!("reader gone; {}", self.summary()),
                Err(_) => panic!(
                    "no response on stream {stream} within {within:?}; {}",
                    self.summary()
                ),
            }
        }
    }
}

/// The common ending of a flood the server must answer with GOAWAY: the GOAWAY (with the
/// frames before it), then the server closes the connection.
async fn expect_goaway_and_close(reader: &mut Reader, what: &str) -> (GoAway, Vec<Frame>) {
    let (goaway, before) = reader.until_goaway(REPLY_BOUND).await;
    let (after, end) = reader.until_closed(REPLY_BOUND).await;
    for f in &after {
        if let Some(g) = f.goaway() {
            assert_eq!(g.code, goaway.code, "{what}: second GOAWAY differs: {g}");
        }
    }
    eprintln!(
        "{what}: {goaway}; {} frames before it ({}), {} after; connection then ended: {end}",
        before.len(),
        tally(&before),
        after.len()
    );
    (goaway, before)
}

/// "N×HEADERS 200, M×RST_STREAM CANCEL, …" for a report line.
fn tally(frames: &[Frame]) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for f in frames {
        let key = match f.kind {
            kind::HEADERS => format!("HEADERS {:?}", f.status().unwrap()),
            kind::RST_STREAM => format!("RST_STREAM {}", code::name(f.rst_code().unwrap())),
            kind::DATA => "DATA".into(),
            kind::WINDOW_UPDATE => "WINDOW_UPDATE".into(),
            k => format!("type {k}"),
        };
        *counts.entry(key).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n}×{k}")).collect();
    parts.join(", ")
}

// ---------- writing floods ----------

struct Flooded {
    bytes: u64,
    chunks: u64,
    /// The write error that ended the flood, if one did (the server closed on us).
    write_error: Option<String>,
}

/// Write `chunk(i)` for i = 0, 1, … until `stop` is set (the reader saw GOAWAY or the end),
/// a write fails, or `limit` bytes are out. Bounded by `TEST_BOUND` (a server that stops
/// reading without a GOAWAY makes the write block: that fails here).
async fn flood(
    wr: &mut Wr,
    stop: &AtomicBool,
    limit: u64,
    mut chunk: impl FnMut(u64) -> Vec<u8>,
) -> Flooded {
    let mut out = Flooded {
        bytes: 0,
        chunks: 0,
        write_error: None,
    };
    let run = async {
        while !stop.load(Ordering::Relaxed) && out.bytes < limit {
            let c = chunk(out.chunks);
            if let Err(e) = wr.write_all(&c).await {
                out.write_error = Some(e.to_string());
                break;
            }
            out.bytes += c.len() as u64;
            out.chunks += 1;
        }
        let _ = wr.flush().await;
    };
    if timeout(TEST_BOUND, run).await.is_err() {
        panic!(
            "flood write blocked for {TEST_BOUND:?} with no GOAWAY seen (server stopped reading?)"
        );
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

// ---------- the well-behaved client ----------

/// A well-behaved HTTP/2 client on its own connection, opened (and checked) before the abuse,
/// sending a GET every 20 ms during it.
struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u32, Vec<String>, HttpClient)>,
}

impl Prober {
    async fn start(proxy: &Proxy, certs: &Certs) -> Prober {
        let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
        assert_eq!(c.get("/").await.0, 200, "before the abuse");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failures) = (0, Vec::new());
            while !s.load(Ordering::Relaxed) {
                match timeout(REPLY_BOUND, probe(&mut c)).await {
                    Ok(Ok(200)) => ok += 1,
                    Ok(Ok(status)) => failures.push(format!("status {status}")),
                    Ok(Err(e)) => failures.push(e),
                    Err(_) => failures.push(format!("no answer within {REPLY_BOUND:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failures, c)
        });
        Prober { stop, task }
    }

    /// After the abuse: every probe during it got 200, the same connection still gets 200,
    /// and so does a fresh one.
    async fn finish(self, proxy: &Proxy, certs: &Certs, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failures, mut c) = self.task.await.unwrap();
        assert!(
            failures.is_empty(),
            "{what}: the well-behaved client failed during the abuse ({ok} ok): {failures:?}"
        );
        assert_eq!(
            timeout(REPLY_BOUND, probe(&mut c)).await,
            Ok(Ok(200)),
            "{what}: well-behaved connection opened before the abuse, after it"
        );
        let mut fresh = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
        assert_eq!(
            timeout(REPLY_BOUND, probe(&mut fresh)).await,
            Ok(Ok(200)),
            "{what}: fresh well-behaved connection after the abuse"
        );
        eprintln!("{what}: well-behaved client: {ok} × 200 during the abuse, 200 after");
    }
}

async fn probe(c: &mut HttpClient) -> Result<u16, String> {
    let resp = c
        .send(request("GET", "/", empty()))
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

// ---------- 1. rapid reset ----------

/// CVE-2023-44487: HEADERS (a complete GET) immediately followed by RST_STREAM(CANCEL), on a
/// new stream each time, as fast as we can write. h2 0.4.20 counts streams the peer reset
/// before the application accepted them (`max_pending_accept_reset_streams`, default 20:
/// `DEFAULT_REMOTE_RESET_STREAM_MAX`; hyper 1.12 passes it through only when set, and we do
/// not set it) and answers GOAWAY ENHANCE_YOUR_CALM, debug data "too_many_resets".
///
/// Fault injection: `.max_pending_accept_reset_streams(usize::MAX)` on the HTTP/2 builder in
/// src/http/server.rs makes this test fail: the flood runs to `FLOOD_LIMIT` with no GOAWAY
/// (tried: 1.86 M pairs, 64 MiB; remotely reset streams do not count against
/// max_concurrent_streams, so no other limit steps in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_enhance_your_calm() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs, None).await;
    let prober = Prober::start(&proxy, &certs).await;
    let (rd, mut wr) = raw_h2(&proxy, &certs, false).await;
    let mut reader = spawn_reader(rd);

    const PAIRS_PER_CHUNK: u64 = 100;
    let block = hpack::request("GET", "/");
    let flooded = flood(&mut wr, &reader.stop.clone(), FLOOD_LIMIT, |i| {
        let mut buf = Vec::new();
        for k in 0..PAIRS_PER_CHUNK {
            let stream = 1 + 2 * (i * PAIRS_PER_CHUNK + k) as u32;
            buf.extend(h2frames::headers(stream, &block, true, true));
            buf.extend(h2frames::rst_stream(stream, code::CANCEL));
        }
        buf
    })
    .await;
    let pairs = flooded.chunks * PAIRS_PER_CHUNK;
    assert!(
        flooded.bytes < FLOOD_LIMIT,
        "{pairs} HEADERS+RST_STREAM pairs ({}) and the server never said GOAWAY",
        mib(flooded.bytes)
    );
    let (goaway, _) = expect_goaway_and_close(&mut reader, "rapid reset").await;
    eprintln!(
        "rapid reset: {pairs} pairs ({}) written before the flood stopped (write error: {:?})",
        mib(flooded.bytes),
        flooded.write_error
    );
    assert_eq!(goaway.code, code::ENHANCE_YOUR_CALM, "{goaway}");
    // GOAWAY 0xb, debug data "too_many_resets".
    assert_goaways(&proxy, 1.0).await;
    prober.finish(&proxy, &certs, "rapid reset").await;
}

// ---------- 2. CONTINUATION flood ----------

/// CVE-2024-27316: HEADERS without END_HEADERS, then CONTINUATION frames that never end the
/// block. h2 0.4.20 allows max(5, 1.25 × max_header_list_size / max_frame_size) CONTINUATION
/// frames per block (`calc_max_continuation_frames` in codec/framed_read.rs: 5 with hyper's
/// 16 KiB header list and 16 KiB frames), then GOAWAY ENHANCE_YOUR_CALM
/// "too_many_continuations". Two shapes: empty CONTINUATIONs (the CPU flood) and full 16 KiB
/// ones carrying header fields (the memory flood).
///
/// Fault injection (both tried): `.max_header_list_size(256 << 20)` on the HTTP/2 builder
/// raises the allowance to 20,480 frames of 16 KiB, and the 16 KiB shape reaches
/// `FLOOD_LIMIT` with no GOAWAY (the server buffers it all); patching h2 to skip the
/// CONTINUATION count (framed_read.rs, `cnt > decoder.max_continuation_frames`) makes the
/// empty shape reach `FLOOD_LIMIT` with no GOAWAY. Either fails this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_gets_goaway_enhance_your_calm() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs, None).await;
    let prober = Prober::start(&proxy, &certs).await;

    // One literal header field filling a 16 KiB CONTINUATION payload exactly.
    let mut full = Vec::new();
    let overhead = 1 + 1 + b"x-flood".len() + 3; // representation, name length, name, value length
    hpack::literal_new_name(&mut full, b"x-flood", &vec![b'a'; 16384 - overhead]);
    assert_eq!(full.len(), 16384);

    for (n, (shape, payload)) in [("empty", Vec::new()), ("16 KiB", full)]
        .into_iter()
        .enumerate()
    {
        let what = format!("CONTINUATION flood ({shape})");
        let (rd, mut wr) = raw_h2(&proxy, &certs, false).await;
        let mut reader = spawn_reader(rd);
        // The block's start: a complete GET, but END_HEADERS never comes.
        let start = h2frames::headers(1, &hpack::request("GET", "/"), true, false);
        wr.write_all(&start).await.unwrap();
        const FRAMES_PER_CHUNK: u64 = 16;
        let flooded = flood(&mut wr, &reader.stop.clone(), FLOOD_LIMIT, |_| {
            let mut buf = Vec::new();
            for _ in 0..FRAMES_PER_CHUNK {
                buf.extend(h2frames::continuation(1, &payload, false));
            }
            buf
        })
        .await;
        let frames = flooded.chunks * FRAMES_PER_CHUNK;
        assert!(
            flooded.bytes < FLOOD_LIMIT,
            "{what}: {frames} CONTINUATION frames ({}) and no GOAWAY",
            mib(flooded.bytes)
        );
        let (goaway, before) = expect_goaway_and_close(&mut reader, &what).await;
        eprintln!(
            "{what}: {frames} frames ({}) written before the flood stopped",
            mib(flooded.bytes)
        );
        assert_eq!(goaway.code, code::ENHANCE_YOUR_CALM, "{what}: {goaway}");
        // The half-received request was never answered.
        assert!(
            before.iter().all(|f| f.kind != kind::HEADERS),
            "{what}: {}",
            tally(&before)
        );
        // GOAWAY 0xb, debug data "too_many_continuations".
        assert_goaways(&proxy, n as f64 + 1.0).await;
    }
    prober.finish(&proxy, &certs, "CONTINUATION flood").await;
}

// ---------- 3. empty DATA frame flood ----------

/// Zero-length DATA frames without END_STREAM on an open POST: each costs the server a frame
/// decode and nothing of the flow-control window, so flow control does not bound them. h2
/// 0.4.20 allows 100 of them per connection lifetime (`MAX_RECV_EMPTY_DATA_FRAMES` in
/// proto/mod.rs, no setting) and then answers GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames"
/// (h2 0.4.16 added this limit; before it, the flood went on for as long as the client liked).
/// The POST goes to a real backend (`/hash` reads the body to its end), so the stream stays
/// open for the whole flood.
///
/// Fault injection: with h2 before 0.4.16, or with the `MAX_RECV_EMPTY_DATA_FRAMES` check
/// patched out of h2 (tried), the flood runs to `FLOOD_LIMIT` (7.4 M empty frames) with no
/// GOAWAY and this test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_frame_flood_gets_goaway_enhance_your_calm() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = proxy(&certs, Some(&[backend])).await;
    let prober = Prober::start(&proxy, &certs).await;
    let (rd, mut wr) = raw_h2(&proxy, &certs, false).await;
    let mut reader = spawn_reader(rd);

    let post = h2frames::headers(1, &hpack::request("POST", "/hash"), false, true);
    wr.write_all(&post).await.unwrap();
    const FRAMES_PER_CHUNK: u64 = 50;
    let empty = h2frames::data(1, &[], false);
    let flooded = flood(&mut wr, &reader.stop.clone(), FLOOD_LIMIT, |_| {
        empty.repeat(FRAMES_PER_CHUNK as usize)
    })
    .await;
    let frames = flooded.chunks * FRAMES_PER_CHUNK;
    assert!(
        flooded.bytes < FLOOD_LIMIT,
        "{frames} empty DATA frames ({}) and no GOAWAY",
        mib(flooded.bytes)
    );
    let (goaway, _) = expect_goaway_and_close(&mut reader, "empty DATA flood").await;
    eprintln!("empty DATA flood: {frames} empty frames written before the flood stopped");
    assert_eq!(goaway.code, code::ENHANCE_YOUR_CALM, "{goaway}");
    // GOAWAY 0xb, debug data "too_many_data_frames".
    assert_goaways(&proxy, 1.0).await;
    prober.finish(&proxy, &certs, "empty DATA flood").await;
}

// ---------- 4. HPACK bomb ----------

/// The bomb: one ~4 KiB header inserted into the server's HPACK dynamic table (literal with
/// incremental indexing; the default table holds 4,096 bytes), then `refs` one-byte indexed
/// references to it, each decoding to a 4 KiB header field.
fn hpack_bomb(refs: usize) -> (Vec<u8>, usize) {
    let name = b"x-bomb";
    let value = vec![b'b'; 4000];
    let mut block = hpack::request("GET", "/");
    hpack::literal_new_name_indexed(&mut block, name, &value);
    for _ in 0..refs {
        hpack::indexed(&mut block, hpack::FIRST_DYNAMIC);
    }
    let decoded = (refs + 1) * hpack::field_size(name, &value);
    (block, decoded)
}

/// Resident set size of this process (the proxy runs in it), from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A bomb far over the limit: ~12 KiB on the wire decoding to ~12,000 × 4 KiB = 46 MiB. h2
/// 0.4.20 stops decoding once the decoded list passes 4 × max_header_list_size (hyper: 16 KiB,
/// so 64 KiB; `MAX_HEADER_LIST_ABUSE_MULTIPLIER` in frame/headers.rs) and answers GOAWAY
/// ENHANCE_YOUR_CALM "header_list_way_too_large". Memory stays bounded: decoded values share
/// the table entry's bytes, and decoding stops at the abuse limit; the process's RSS is
/// sampled throughout and must not grow by anything near the decoded size.
///
/// Fault injection (tried): `.max_header_list_size(64 << 20)` on the HTTP/2 builder lets the
/// whole list decode; the request then reaches the proxy (with 12,000 `x-bomb` fields) and is
/// answered 200 instead of the GOAWAY this test expects. (The RSS check would not catch that:
/// the 12,000 values share one buffer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_far_over_the_header_list_limit_gets_goaway() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs, None).await;
    let prober = Prober::start(&proxy, &certs).await;
    let (rd, mut wr) = raw_h2(&proxy, &certs, false).await;
    let mut reader = spawn_reader(rd);

    let (block, decoded) = hpack_bomb(12_000);
    assert!(block.len() <= 16384, "one frame: {}", block.len());
    let rss_before = rss_bytes();
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    wr.write_all(&h2frames::headers(1, &block, true, true))
        .await
        .unwrap();
    wr.flush().await.unwrap();
    let (goaway, before) = expect_goaway_and_close(&mut reader, "HPACK bomb (far over)").await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(rss_before);
    eprintln!(
        "HPACK bomb (far over): {} on the wire, {} decoded if expanded; RSS grew by at most {}",
        block.len(),
        mib(decoded as u64),
        mib(growth)
    );
    assert_eq!(goaway.code, code::ENHANCE_YOUR_CALM, "{goaway}");
    assert!(
        before.iter().all(|f| f.kind != kind::HEADERS),
        "the bomb must not be answered: {}",
        tally(&before)
    );
    assert!(
        growth < (decoded as u64) / 2,
        "RSS grew by {} for a {} bomb",
        mib(growth),
        mib(decoded as u64)
    );
    // GOAWAY 0xb, debug data "header_list_way_too_large".
    assert_goaways(&proxy, 1.0).await;
    prober.finish(&proxy, &certs, "HPACK bomb (far over)").await;
}

/// A bomb over the header list limit (16 KiB) but under h2's abuse limit (64 KiB): 6 × 4 KiB.
/// h2 answers the stream itself with 431 (END_STREAM) and keeps the connection: the next
/// request on it gets 200. The 431 is h2's own (hyper's service never sees the request), so
/// `ephemera_http_requests_total` does not count it.
///
/// Fault injection (tried): `.max_header_list_size(1 << 20)` on the HTTP/2 builder, or
/// `h2: { max_header_list_size: 1MiB }` in the listener's `http` config, makes the bomb an
/// ordinary request answered 200: this test fails on the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_over_the_header_list_limit_gets_431_and_the_connection_lives() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs, None).await;
    let prober = Prober::start(&proxy, &certs).await;
    let (rd, mut wr) = raw_h2(&proxy, &certs, false).await;
    let mut reader = spawn_reader(rd);

    let (block, decoded) = hpack_bomb(5);
    assert!((16 << 10..64 << 10).contains(&decoded), "{decoded}");
    wr.write_all(&h2frames::headers(1, &block, true, true))
        .await
        .unwrap();
    wr.flush().await.unwrap();
    let (status, _) = reader.until_headers(1, REPLY_BOUND).await;
    assert_eq!(status, Status::Code(431), "{}", reader.summary());

    // The same connection serves the next request (the dynamic table still holds x-bomb;
    // this request does not refer to it).
    wr.write_all(&h2frames::headers(
        3,
        &hpack::request("GET", "/"),
        true,
        true,
    ))
    .await
    .unwrap();
    wr.flush().await.unwrap();
    let (status, between) = reader.until_headers(3, REPLY_BOUND).await;
    assert_eq!(status, Status::Code(200), "{}", reader.summary());
    eprintln!(
        "HPACK bomb (over the limit, {} decoded): stream 1 → 431, then [{}], then stream 3 → 200",
        mib(decoded as u64),
        tally(&between)
    );
    prober.finish(&proxy, &certs, "HPACK bomb (431)").await;
}

// ---------- 5. SETTINGS and PING floods ----------

/// How a control-frame flood ended.
enum Outcome {
    /// We stopped being able to write (the server stopped reading) after this many bytes.
    Backpressure(u64),
    /// The server closed on us (its GOAWAY, if any, is read afterwards).
    Closed(u64, String),
}

/// Flood the connection with `frame` (whole frames, many per write) without reading anything
/// back, until our writes stop making progress for 1.5 s (read backpressure), a write fails,
/// or `FLOOD_LIMIT`. Then read everything the server sent. With backpressure, every frame
/// must have been answered (`acks(reader)` reaches the number sent) and the connection must
/// still serve a GET; with a close, the server must have said GOAWAY ENHANCE_YOUR_CALM.
async fn control_flood(frame: Vec<u8>, acks: fn(&Reader) -> u64, what: &str) {
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs, None).await;
    let prober = Prober::start(&proxy, &certs).await;
    let (rd, mut wr) = raw_h2(&proxy, &certs, true).await;

    let chunk = frame.repeat(1024);
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop, chunk) = (written.clone(), stop.clone(), chunk.clone());
        tokio::spawn(async move {
            let mut err = None;
            while !stop.load(Ordering::Relaxed) && written.load(Ordering::Relaxed) < FLOOD_LIMIT {
                if let Err(e) = wr.write_all(&chunk).await {
                    err = Some(e.to_string());
                    break;
                }
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            if err.is_none() {
                let _ = wr.flush().await;
            }
            (wr, err)
        })
    };
    let started = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = written.load(Ordering::Relaxed);
        if writer.is_finished() {
            break None;
        }
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() >= Duration::from_millis(1500) {
            break Some(Outcome::Backpressure(now));
        }
        assert!(
            started.elapsed() < TEST_BOUND,
            "{what}: still writing after {TEST_BOUND:?} ({})",
            mib(now)
        );
    };
    // The writer stops after its current chunk (which completes once we read).
    stop.store(true, Ordering::Relaxed);
    let mut reader = spawn_reader(rd);
    let (mut wr, err) = timeout(TEST_BOUND, writer).await.unwrap().unwrap();
    let sent = written.load(Ordering::Relaxed);
    let outcome = match (outcome, err) {
        (_, Some(e)) => Outcome::Closed(sent, e),
        (Some(o), None) => o,
        (None, None) => panic!(
            "{what}: {} of frames ({} frames) written without the server stopping to read or \
             saying GOAWAY",
            mib(sent),
            sent / frame.len() as u64
        ),
    };
    let frames = sent / frame.len() as u64;
    match outcome {
        Outcome::Backpressure(at) => {
            eprintln!(
                "{what}: read backpressure after {} ({} frames); {} frames sent in all",
                mib(at),
                at / frame.len() as u64,
                frames
            );
            // Everything is answered once we read, and the connection still works.
            wr.write_all(&h2frames::headers(
                1,
                &hpack::request("GET", "/"),
                true,
                true,
            ))
            .await
            .unwrap();
            wr.flush().await.unwrap();
            let (status, _) = reader.until_headers(1, TEST_BOUND).await;
            assert_eq!(status, Status::Code(200), "{what}");
            assert_eq!(acks(&reader), frames, "{what}: every frame answered");
            // Backpressure, no GOAWAY.
            assert_goaways(&proxy, 0.0).await;
        }
        Outcome::Closed(at, e) => {
            eprintln!("{what}: writes failed after {} ({e})", mib(at));
            let (goaway, _) = expect_goaway_and_close(&mut reader, what).await;
            assert_eq!(goaway.code, code::ENHANCE_YOUR_CALM, "{what}: {goaway}");
            assert_goaways(&proxy, 1.0).await;
        }
    }
    prober.finish(&proxy, &certs, what).await;
}

/// Thousands of PINGs without reading the ACKs. h2 0.4.20 holds one pending PING ACK and
/// must write it before reading the next frame (`PingPong::send_pending_pong` →
/// `Codec::poll_ready`), so once its write buffer and the socket are full it stops reading:
/// our writes block (observed: within a few MiB with 32 KiB client socket buffers). It never
/// says GOAWAY for a PING flood; every PING is answered once we read.
///
/// Fault injection (tried): patching h2 to drop a PING ACK when its write buffer is full,
/// instead of waiting, means it never stops reading: the flood goes on (56 MiB in 20 s) and
/// the test fails on `TEST_BOUND` (or on `FLOOD_LIMIT` on a faster machine). A server that
/// skipped ACKs without blocking would fail the ACK count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_meets_read_backpressure() {
    let _serial = serial().await;
    control_flood(
        h2frames::ping(*b"ephemera"),
        |r| r.ping_acks.load(Ordering::Relaxed),
        "PING flood",
    )
    .await;
}

/// Thousands of empty SETTINGS frames without reading the ACKs. h2 0.4.20 holds one
/// received SETTINGS and writes its ACK before reading further (`Settings::poll_send` →
/// `Codec::poll_ready`): the same read backpressure as for PINGs, no GOAWAY.
///
/// Fault injection (tried): patching h2 to drop the ACK when its write buffer is full: the
/// flood reaches `FLOOD_LIMIT` (7.4 M frames) unblocked and this test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_meets_read_backpressure() {
    let _serial = serial().await;
    control_flood(
        h2frames::settings(&[]),
        |r| r.settings_acks.load(Ordering::Relaxed),
        "SETTINGS flood",
    )
    .await;
}

// ---------- server-provoked resets ----------

/// CVE-2025-8671 ("MadeYouReset"): the client never sends RST_STREAM itself but makes the
/// server reset streams: a complete GET (END_STREAM) followed by a WINDOW_UPDATE that
/// overflows the stream's send window (2^31 − 1 on top of 65,535) is a stream error
/// FLOW_CONTROL_ERROR, so the server resets the stream, whose work is already under way. h2
/// 0.4.20 counts such resets (`max_local_error_reset_streams`, hyper 1.12's default 1024) and
/// then answers GOAWAY ENHANCE_YOUR_CALM "too_many_internal_resets". Observed: the first 100
/// streams are reset FLOW_CONTROL_ERROR and stay counted as concurrent (the service has not
/// accepted them yet), the next ones are refused (REFUSED_STREAM, counted too since h2
/// 0.4.20), and the 1,025th reset or refusal brings the GOAWAY; in some runs the 100
/// FLOW_CONTROL_ERROR resets are never written (only the 924 refusals reach us before the
/// GOAWAY). (DATA after END_STREAM, the other classic trigger, is a connection error in h2:
/// GOAWAY PROTOCOL_ERROR at once.)
///
/// Fault injection (tried): `.max_local_error_reset_streams(None)` on the HTTP/2 builder
/// removes the limit: the flood runs to `FLOOD_LIMIT` (1.86 M streams) without GOAWAY and this
/// test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_provoked_resets_get_goaway_enhance_your_calm() {
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = proxy(&certs, None).await;
    let prober = Prober::start(&proxy, &certs).await;
    let (rd, mut wr) = raw_h2(&proxy, &certs, false).await;
    let mut reader = spawn_reader(rd);

    const PER_CHUNK: u64 = 100;
    let block = hpack::request("GET", "/");
    let flooded = flood(&mut wr, &reader.stop.clone(), FLOOD_LIMIT, |i| {
        let mut buf = Vec::new();
        for k in 0..PER_CHUNK {
            let stream = 1 + 2 * (i * PER_CHUNK + k) as u32;
            buf.extend(h2frames::headers(stream, &block, true, true));
            buf.extend(h2frames::window_update(stream, 0x7fff_ffff));
        }
        buf
    })
    .await;
    let streams = flooded.chunks * PER_CHUNK;
    assert!(
        flooded.bytes < FLOOD_LIMIT,
        "{streams} provoked resets ({}) and no GOAWAY",
        mib(flooded.bytes)
    );
    let (goaway, before) = expect_goaway_and_close(&mut reader, "MadeYouReset").await;
    eprintln!(
        "MadeYouReset: {streams} streams written before the flood stopped; before the GOAWAY: {}",
        tally(&before)
    );
    // The server reset (FLOW_CONTROL_ERROR) or refused (REFUSED_STREAM) streams itself.
    let resets = before
        .iter()
        .filter(|f| {
            [code::FLOW_CONTROL_ERROR, code::REFUSED_STREAM].contains(&f.rst_code().unwrap_or(0))
        })
        .count();
    assert!(resets > 0, "the server reset streams: {}", tally(&before));
    assert_eq!(goaway.code, code::ENHANCE_YOUR_CALM, "{goaway}");
    // GOAWAY 0xb, debug data "too_many_internal_resets".
    assert_goaways(&proxy, 1.0).await;
    prober.finish(&proxy, &certs, "MadeYouReset").await;
}

/// `ephemera_h2_goaways_sent_total{reason="enhance_your_calm"}` reaches `want` (the
/// connection task counts it as it ends, just after the client saw the GOAWAY).
async fn assert_goaways(proxy: &Proxy, want: f64) {
    let mut got = 0.0;
    for _ in 0..100 {
        got = metric(
            &proxy.metrics().await,
            "ephemera_h2_goaways_sent_total",
            &["listener=\"public\"", "reason=\"enhance_your_calm\""],
        );
        if got >= want && want > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, want, "GOAWAY ENHANCE_YOUR_CALM counted");
}

/// A client that holds its flow-control windows at zero (SETTINGS_INITIAL_WINDOW_SIZE 0,
/// no WINDOW_UPDATE) while asking for large responses from an HTTP/2 backend shared with
/// other clients. It never blocks a socket write, so only the per-connection check that
/// response bodies are being taken catches it: the connection is closed after
/// `idle_timeout`. Meanwhile a well-behaved client's download over the same backend
/// connection completes: the stalled streams do not starve the backend connection's window.
#[tokio::test]
async fn a_zero_window_client_is_cut_off_and_does_not_stall_others() {
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(None, None).await;
    let yaml = config_yaml(
        &certs,
        Some(&[backend.addr]),
        "",
        "      idle_timeout: 2s\n",
        "",
    )
    .replace("protocol: http1", "protocol: h2c");
    let proxy = Proxy::start(&yaml).await;
    let (rd, mut wr) = raw_h2(&proxy, &certs, false).await;
    let mut reader = spawn_reader(rd);
    // Window 0 for every stream; the connection window stays at its initial 64 KiB.
    wr.write_all(&h2frames::settings(&[(0x4, 0)]))
        .await
        .unwrap();
    for i in 0..90u32 {
        let block = hpack::request("GET", "/bytes/1048576");
        wr.write_all(&h2frames::headers(2 * i + 1, &block, true, true))
            .await
            .unwrap();
    }
    wr.flush().await.unwrap();
    let started = Instant::now();

    // 90 x 1 MiB responses are stuck in the proxy; a good client's 8 MiB still flows.
    let mut good = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    let resp = timeout(
        Duration::from_secs(10),
        good.send(request("GET", "/bytes/8388608", empty())),
    )
    .await
    .expect("headers in time")
    .unwrap();
    assert_eq!(resp.status(), 200);
    let body = timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the good client's body is not starved")
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 8 << 20);

    let (_, end) = reader.until_closed(Duration::from_secs(10)).await;
    let took = started.elapsed();
    eprintln!("zero-window client: connection ended after {took:?}: {end}");
    assert!(
        took >= Duration::from_millis(1500),
        "closed after {took:?}, before idle_timeout"
    );
    assert_eq!(backend.connections(), 1, "one shared backend connection");
}
