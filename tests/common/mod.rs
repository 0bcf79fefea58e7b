//! Shared integration-test harness: certificates minted per test with rcgen, the proxy run
//! in-process on port 0, real hyper backends on port 0, and real rustls + hyper clients.
#![allow(dead_code)]

use bytes::Bytes;
use ephemera::Server;
use ephemera::config::Config;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub mod h2_backend;
pub mod raw_backend;
pub mod serve;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Tests that measure time or load hold this so they do not run in parallel with each other.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A temporary directory with a CA-signed certificate for `names` (ECDSA P-256).
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub fn new(names: &[&str]) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let written = ephemera::certgen::write_dev_certs(dir.path(), &names).unwrap();
        let ca_pem = std::fs::read_to_string(&written[0]).unwrap();
        Certs {
            ca_pem,
            cert: written[2].clone(),
            key: written[3].clone(),
            dir,
        }
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap()
    }

    /// Mint another leaf (self-signed, `rsa` or ECDSA) into this directory; returns
    /// (cert path, key path, cert DER for a client to trust).
    pub fn extra_self_signed(
        &self,
        file: &str,
        names: &[&str],
        rsa: bool,
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let alg = if rsa {
            &rcgen::PKCS_RSA_SHA256
        } else {
            &rcgen::PKCS_ECDSA_P256_SHA256
        };
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cp = self.dir.path().join(format!("{file}.crt"));
        let kp = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        (cp, kp, cert.der().clone())
    }
}

pub fn yaml_path(p: &Path) -> String {
    p.display().to_string()
}

/// Standard single-listener config on port 0 (admin too), routed to `upstream` servers or, if
/// none, to the built-in response. `extra_http` and `extra_tls` are YAML lines (8-space indent).
pub fn config_yaml(
    certs: &Certs,
    upstream: Option<&[SocketAddr]>,
    extra_tls: &str,
    extra_http: &str,
    extra_upstream: &str,
) -> String {
    let route = if upstream.is_some() {
        "{ host: \"*\", path_prefix: /, upstream: app }"
    } else {
        "{ host: \"*\", path_prefix: /, respond: { status: 200 } }"
    };
    let upstreams = match upstream {
        Some(servers) => {
            let list: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
            format!(
                "upstreams:\n  app:\n    protocol: http1\n    servers: [{}]\n{extra_upstream}",
                list.join(", ")
            )
        }
        None => String::new(),
    };
    format!(
        "admin: {{ bind: 127.0.0.1:0 }}\nshutdown_grace: 5s\nlisteners:\n  - name: public\n    bind: 127.0.0.1:0\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\n{extra_tls}    http:\n      header_timeout: 10s\n{extra_http}    routes:\n      - {route}\n{upstreams}",
        yaml_path(&certs.cert),
        yaml_path(&certs.key)
    )
}

/// The proxy running in-process. Dropping it requests shutdown.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: watch::Sender<u32>,
    pub task: tokio::task::JoinHandle<bool>,
}

impl Proxy {
    pub async fn start(yaml: &str) -> Proxy {
        let config = Config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        Proxy::start_config(config).await
    }

    pub async fn start_config(config: Config) -> Proxy {
        Proxy::run(Server::bind(config).await.unwrap())
    }

    /// From a config file, reloadable (`POST /reload` re-reads `path`).
    pub async fn start_file(path: &Path) -> Proxy {
        let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        let server = Server::bind(config)
            .await
            .unwrap()
            .reload_from(path.to_path_buf());
        Proxy::run(server)
    }

    fn run(server: Server) -> Proxy {
        let addr = server.listener_addrs()[0].1;
        let admin = server.admin_addr();
        let (stop, rx) = watch::channel(0);
        let task = tokio::spawn(server.run(rx));
        Proxy {
            addr,
            admin,
            stop,
            task,
        }
    }

    /// Request a graceful stop (like SIGTERM).
    pub fn stop(&self) {
        self.stop.send_modify(|n| *n += 1);
    }

    pub async fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics").await.1
    }

    /// Waits up to `within` for the proxy to hold nothing for clients any more: the
    /// connection and stream gauges at 0, and this process's open descriptors back to
    /// `fd_baseline` (from `open_fds()` before the test's clients ran). Pooled backend
    /// connections are allowed for: each holds two descriptors here (the proxy's end and the
    /// in-process backend's). Panics naming what did not settle, with the figures.
    pub async fn assert_settled(&self, fd_baseline: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.metrics().await;
            let conns = metric(&text, "ephemera_connections_open", &[]);
            let streams = metric(&text, "ephemera_h2_streams_open", &[]);
            let pooled = metric(&text, "ephemera_upstream_connections_open", &[]) as usize;
            let fds = open_fds();
            let fd_limit = fd_baseline + 2 * pooled;
            if conns == 0.0 && streams == 0.0 && fds <= fd_limit {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "proxy did not settle within {within:?}: ephemera_connections_open {conns}, \
                     ephemera_h2_streams_open {streams}, open fds {fds} (baseline {fd_baseline} \
                     + 2 x {pooled} pooled backend connections = {fd_limit})"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Open file descriptors of this test process that a proxy could leak: sockets other than
/// Unix ones, files, pipes. Every test's proxy, backends and clients run in it, so counts
/// compare only in a test binary whose tests all hold `serial()`. Left out: the tokio
/// runtime's own descriptors (epoll, eventfd: `anon_inode:`; the signal driver's Unix
/// socket), because libtest starts the next test's runtime, before that test waits for
/// `serial()`, while another test is still checking its count.
pub fn open_fds() -> usize {
    let unix: std::collections::HashSet<String> = std::fs::read_to_string("/proc/self/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(6).map(str::to_string))
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|t| !t.starts_with("anon_inode:"))
        .filter(|t| {
            t.strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .is_none_or(|inode| !unix.contains(inode))
        })
        .count()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.send_modify(|n| *n += 2);
    }
}

/// Plain HTTP/1.1 GET against the admin listener: (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, "GET", path, &[]).await
}

/// Any request against the admin listener, with extra header lines: (status, body).
pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Poll `/metrics` until `name{labels}` reads `want` (at most 5 s); returns the exposition.
pub async fn wait_metric(proxy: &Proxy, name: &str, labels: &[&str], want: f64) -> String {
    wait_metric_within(proxy, name, labels, want, Duration::from_secs(5)).await
}

/// `wait_metric` with its own limit, for a test that must tell "soon" from "after a timer".
pub async fn wait_metric_within(
    proxy: &Proxy,
    name: &str,
    labels: &[&str],
    want: f64,
    within: Duration,
) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = proxy.metrics().await;
        let got = metric(&text, name, labels);
        if got == want {
            return text;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{name}{labels:?}: got {got}, want {want}\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The proxy holds no client connection within 60% of the lingering close's limit: it did
/// not wait for a client that keeps its socket open.
pub async fn wait_closed_before_linger(proxy: &Proxy) {
    wait_metric_within(
        proxy,
        "ephemera_connections_open",
        &[],
        0.0,
        ephemera::tls::stream::LINGER * 3 / 5,
    )
    .await;
}

/// The sum of the exposition lines named `name` that contain every `labels` fragment; 0
/// when absent.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

// ---------- clients ----------

pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

pub fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    client_config_with(ca, alpn, provider(), rustls::ALL_VERSIONS)
}

pub fn client_config_with(
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
    provider: rustls::crypto::CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c
}

/// Accepts any certificate (no chain or name check) but still verifies the handshake
/// signature with the presented leaf's key (loadgen's `--insecure` verifier): for servers
/// with a certificate minted in memory, or to see which certificate is served.
pub fn any_cert_client() -> rustls::ClientConfig {
    let p = provider();
    let algs = p.signature_verification_algorithms;
    rustls::ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            ephemera::loadgen::client_tls::SignatureOnly::new(algs),
        ))
        .with_no_client_auth()
}

pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// An HTTP client over one TLS connection, HTTP/2 or HTTP/1.1 by ALPN.
pub enum HttpClient {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr, ca: &CertificateDer<'static>, h2: bool) -> HttpClient {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = tls_connect(addr, "localhost", client_config(ca, alpn))
            .await
            .unwrap();
        HttpClient::over(tls, h2).await
    }

    pub async fn over<S>(io: S, h2: bool) -> HttpClient
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            HttpClient::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            HttpClient::H1(send)
        }
    }

    pub async fn send(&mut self, req: Request<TestBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            HttpClient::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            HttpClient::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// GET `path` with Host: localhost; returns (status, headers, body).
    pub async fn get(&mut self, path: &str) -> (u16, http::HeaderMap, Bytes) {
        let req = request("GET", path, empty());
        let resp = self.send(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body)
    }
}

pub fn request(method: &str, path: &str, body: TestBody) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("host", "localhost")
        .body(body)
        .unwrap()
}

pub fn empty() -> TestBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A body of `len` deterministic bytes sent in 64 KiB chunks (streamed, never in memory whole).
pub fn pattern_body(len: usize) -> TestBody {
    let chunks = (0..len.div_ceil(65536)).map(move |i| {
        let start = i * 65536;
        let n = (len - start).min(65536);
        Ok::<_, BoxError>(Frame::data(Bytes::from(pattern(start, n))))
    });
    StreamBody::new(futures_util::stream::iter(chunks)).boxed()
}

pub fn pattern(offset: usize, n: usize) -> Vec<u8> {
    (offset..offset + n)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

pub fn sha256(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hash a streamed body without holding it: (length, sha256 hex).
pub async fn hash_body<B>(mut body: B) -> (usize, String)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len();
            ctx.update(&data);
        }
    }
    (n, hex(ctx.finish().as_ref()))
}

/// A plain rustls server with rustls' default session handling (it issues TLS 1.3 tickets),
/// answering each connection's request with 200 and closing: the control showing that the
/// no-resumption tests (openssl `-sess_out`, rustls `handshake_kind()`) can see resumption.
pub async fn start_ticketing_server(certs: &Certs) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certs.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    assert!(config.send_tls13_tickets > 0, "control must send tickets");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\ncontrol\n",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

// ---------- backend ----------

/// A real hyper HTTP/1.1 backend on port 0:
/// - `/headers`: the request's headers as `name: value` lines;
/// - `/hash`: reads the body, answers `LEN SHA256`;
/// - `/bytes/N`: reads any request body, then streams N pattern bytes;
/// - `/slow/MS`: answers after MS milliseconds;
/// - anything else: `backend ok`.
pub async fn start_backend() -> SocketAddr {
    start_counting_backend(backend_handler).await.0
}

/// A real hyper HTTP/1.1 backend on port 0 answering with `handler`, and the number of
/// connections it has accepted (for tests of the proxy's connection pool).
pub async fn start_counting_backend<F, Fut>(handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<TestBody>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), service_fn(handler))
                    .await;
            });
        }
    });
    (addr, accepted)
}

pub async fn backend_handler(req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = if path == "/headers" {
        let mut out = String::new();
        for (k, v) in req.headers() {
            out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        out.push_str(&format!("version: {:?}\n", req.version()));
        Response::new(full(out))
    } else if path == "/hash" {
        let (n, h) = hash_body(req.into_body()).await;
        Response::new(full(format!("{n} {h}")))
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        // Read any request body first (upload-then-download tests).
        let n: usize = n.parse().unwrap_or(0);
        let _ = hash_body(req.into_body()).await;
        let mut r = Response::new(pattern_body(n));
        r.headers_mut().insert("content-length", n.into());
        r
    } else if let Some(ms) = path.strip_prefix("/drip/") {
        // "first", a pause of `ms`, "second": a body that stalls after its first chunk.
        let pause = Duration::from_millis(ms.parse().unwrap_or(0));
        let chunks = futures_util::stream::unfold(0u8, move |i| async move {
            let chunk: &'static [u8] = match i {
                0 => b"first\n",
                1 => {
                    tokio::time::sleep(pause).await;
                    b"second\n"
                }
                _ => return None,
            };
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(chunk))),
                i + 1,
            ))
        });
        Response::new(StreamBody::new(chunks).boxed())
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        Response::new(full("slow ok"))
    } else {
        Response::new(full("backend ok"))
    };
    Ok(resp)
}

/// A port with nothing listening on it (bound, then closed).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Path of the built binary for CLI tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ephemera"))
}
