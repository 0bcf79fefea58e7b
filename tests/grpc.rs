//! gRPC through the proxy: a tonic `grpc.health.v1.Health` server behind an `h2c` upstream and
//! a tonic client over TLS (ALPN h2) to the proxy. Unary success, a trailers-only error status,
//! a server stream whose status arrives in real trailers after the data (and whose messages
//! arrive one by one, not buffered), and 200 concurrent calls multiplexed over one connection.
//! A control test runs the same scenarios with the same client against the backend through a
//! byte-copying TLS relay instead of the proxy, so a failure through the proxy points at the
//! proxy.

mod common;
use common::*;
#[path = "support/tls_relay.rs"]
mod tls_relay;

use futures_util::Stream;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tonic::codegen::Service;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Every test finishes within this or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("test timed out after {TEST_TIMEOUT:?}"))
}

// ---------- backend: a tonic Health server whose answers the tests control ----------

/// What the backend saw, and the gate that paces the `gated` watch stream.
struct BackendState {
    /// The `te` header of every Check call, in arrival order.
    te: Mutex<Vec<Option<String>>>,
    /// The `gated` watch stream takes one permit before each item after the first.
    gate: Semaphore,
}

struct TestHealth(Arc<BackendState>);

fn status(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: s as i32 }
}

#[tonic::async_trait]
impl Health for TestHealth {
    /// `""` → SERVING; `svc-*` → SERVING with the name echoed in response metadata
    /// `x-service`; anything else → NOT_FOUND (a trailers-only response).
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        let te = req
            .metadata()
            .get("te")
            .map(|v| v.to_str().unwrap_or("?").to_string());
        self.0.te.lock().unwrap().push(te);
        let service = req.into_inner().service;
        if service.is_empty() {
            return Ok(tonic::Response::new(status(ServingStatus::Serving)));
        }
        if service.starts_with("svc-") {
            let mut resp = tonic::Response::new(status(ServingStatus::Serving));
            resp.metadata_mut()
                .insert("x-service", service.parse().unwrap());
            return Ok(resp);
        }
        Err(Status::not_found(format!("unknown service '{service}'")))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    /// SERVING, NOT_SERVING, SERVING, then the error status RESOURCE_EXHAUSTED "done" (which
    /// can only travel in trailers after the data). For service `gated`, each item after the
    /// first waits for a permit from the test.
    async fn watch(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let gated = req.into_inner().service == "gated";
        let state = self.0.clone();
        let items = futures_util::stream::unfold(0usize, move |i| {
            let state = state.clone();
            async move {
                if i > 3 {
                    return None;
                }
                if gated && i > 0 {
                    state.gate.acquire().await.ok()?.forget();
                }
                let item = match i {
                    0 | 2 => Ok(status(ServingStatus::Serving)),
                    1 => Ok(status(ServingStatus::NotServing)),
                    _ => Err(Status::resource_exhausted("done")),
                };
                Some((item, i + 1))
            }
        });
        Ok(tonic::Response::new(Box::pin(items)))
    }
}

/// The tonic server (HTTP/2 cleartext, prior knowledge) on port 0.
async fn start_grpc_backend() -> (SocketAddr, Arc<BackendState>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(BackendState {
        te: Mutex::new(Vec::new()),
        gate: Semaphore::new(0),
    });
    let svc = HealthServer::new(TestHealth(state.clone()));
    tokio::spawn(async move {
        Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (addr, state)
}

// ---------- client: a tonic Channel over our own connector ----------

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Connects to one fixed address: TLS with ALPN h2 (to the proxy) or plain TCP (h2c, straight
/// to the backend). tonic's own TLS features are not enabled, so TLS is done here.
#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Service<http::Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (addr, tls) = (self.addr, self.tls.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let Some(config) = tls else {
                return Ok(TokioIo::new(Box::new(tcp) as Box<dyn Io>));
            };
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            if alpn.as_deref() != Some(b"h2") {
                return Err(std::io::Error::other(format!(
                    "proxy negotiated ALPN {alpn:?}, not h2"
                )));
            }
            Ok(TokioIo::new(Box::new(tls) as Box<dyn Io>))
        })
    }
}

/// A channel over TLS to the proxy (`ca` given) or over h2c straight to `addr`.
async fn channel(addr: SocketAddr, ca: Option<&Certs>) -> Channel {
    let (uri, tls) = match ca {
        Some(certs) => (
            "https://localhost",
            Some(Arc::new(client_config(&certs.ca_der(), &[b"h2"]))),
        ),
        None => ("http://localhost", None),
    };
    Endpoint::from_static(uri)
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(Connector { addr, tls })
        .await
        .unwrap_or_else(|e| panic!("channel to {addr}: {e:?}"))
}

fn check_request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_string(),
    }
}

// ---------- scenarios (run through the proxy, and straight against the backend) ----------

async fn unary_ok(channel: Channel, backend: &BackendState) {
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(check_request(""))
        .await
        .unwrap_or_else(|s| panic!("Check(\"\") failed: {s:?}"));
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);
    let te = backend.te.lock().unwrap().last().cloned();
    assert_eq!(
        te,
        Some(Some("trailers".to_string())),
        "the backend must receive `te: trailers`"
    );
}

async fn unary_not_found(channel: Channel) {
    let mut client = HealthClient::new(channel);
    let err = client
        .check(check_request("no.such.Service"))
        .await
        .expect_err("an unknown service must fail");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(
        err.message(),
        "unknown service 'no.such.Service'",
        "{err:?}"
    );
    // The same channel goes on working after an error status.
    let resp = client
        .check(check_request(""))
        .await
        .unwrap_or_else(|s| panic!("Check(\"\") after the error: {s:?}"));
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);
}

async fn server_stream_ends_with_status_in_trailers(channel: Channel) {
    let mut client = HealthClient::new(channel);
    let mut stream = client
        .watch(check_request(""))
        .await
        .unwrap_or_else(|s| panic!("Watch failed before any message: {s:?}"))
        .into_inner();
    let mut got = Vec::new();
    let end = loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m.status),
            Ok(None) => panic!("stream ended without an error status after {got:?}"),
            Err(s) => break s,
        }
    };
    let want = [
        ServingStatus::Serving as i32,
        ServingStatus::NotServing as i32,
        ServingStatus::Serving as i32,
    ];
    assert_eq!(got, want, "messages, then {end:?}");
    assert_eq!(
        (end.code(), end.message()),
        (Code::ResourceExhausted, "done"),
        "grpc-status/grpc-message must arrive in the trailers: {end:?}"
    );
}

/// Each message arrives while the backend still holds the rest back: the response is
/// streamed, not buffered until the end.
async fn server_stream_is_not_buffered(channel: Channel, backend: &BackendState) {
    let mut client = HealthClient::new(channel);
    let mut stream = client
        .watch(check_request("gated"))
        .await
        .unwrap_or_else(|s| panic!("Watch failed before any message: {s:?}"))
        .into_inner();
    for (i, want) in [
        ServingStatus::Serving,
        ServingStatus::NotServing,
        ServingStatus::Serving,
    ]
    .into_iter()
    .enumerate()
    {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!("message {i} did not arrive while the backend holds the stream open")
            })
            .unwrap_or_else(|s| panic!("message {i}: {s:?}"))
            .unwrap_or_else(|| panic!("stream ended at message {i}"));
        assert_eq!(m.status, want as i32, "message {i}");
        backend.gate.add_permits(1);
    }
    let end = stream.message().await.expect_err("must end with a status");
    assert_eq!(
        (end.code(), end.message()),
        (Code::ResourceExhausted, "done")
    );
}

async fn many_concurrent_unary_calls(channel: Channel, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut client = HealthClient::new(channel.clone());
        tasks.spawn(async move {
            let name = format!("svc-{i}");
            let resp = client
                .check(check_request(&name))
                .await
                .map_err(|s| format!("call {i}: {s:?}"))?;
            let echoed = resp
                .metadata()
                .get("x-service")
                .map(|v| v.to_str().unwrap_or("?").to_string());
            if echoed.as_deref() != Some(name.as_str()) {
                return Err(format!("call {i}: x-service {echoed:?}"));
            }
            if resp.into_inner().status != ServingStatus::Serving as i32 {
                return Err(format!("call {i}: not SERVING"));
            }
            Ok(())
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} calls failed; first: {}",
        failed.len(),
        failed[0]
    );
}

// ---------- through the proxy ----------

/// The proxy with an `h2c` upstream `app` (every path) to a fresh tonic backend.
async fn grpc_proxy() -> (Certs, Proxy, Arc<BackendState>) {
    let certs = Certs::new(&["localhost"]);
    let (backend, state) = start_grpc_backend().await;
    let yaml = config_yaml(&certs, Some(&[backend]), "", "", "");
    assert!(yaml.contains("    protocol: http1\n"), "{yaml}");
    let yaml = yaml.replace("    protocol: http1\n", "    protocol: h2c\n");
    let proxy = Proxy::start(&yaml).await;
    (certs, proxy, state)
}

#[tokio::test]
async fn unary_call_succeeds_through_the_proxy() {
    bounded(async {
        let (certs, proxy, state) = grpc_proxy().await;
        unary_ok(channel(proxy.addr, Some(&certs)).await, &state).await;
    })
    .await;
}

#[tokio::test]
async fn unary_error_status_reaches_the_client() {
    bounded(async {
        let (certs, proxy, _) = grpc_proxy().await;
        unary_not_found(channel(proxy.addr, Some(&certs)).await).await;
    })
    .await;
}

#[tokio::test]
async fn server_stream_delivers_messages_then_the_status_from_trailers() {
    bounded(async {
        let (certs, proxy, state) = grpc_proxy().await;
        let ch = channel(proxy.addr, Some(&certs)).await;
        server_stream_ends_with_status_in_trailers(ch.clone()).await;
        server_stream_is_not_buffered(ch, &state).await;
    })
    .await;
}

#[tokio::test]
async fn two_hundred_concurrent_calls_over_one_connection() {
    bounded(async {
        let (certs, proxy, _) = grpc_proxy().await;
        many_concurrent_unary_calls(channel(proxy.addr, Some(&certs)).await, 200).await;
        let m = proxy.metrics().await;
        assert_eq!(
            metric(
                &m,
                "ephemera_tls_handshakes_total",
                &["listener=\"public\""]
            ),
            1.0,
            "all calls share one client connection:\n{m}"
        );
    })
    .await;
}

// ---------- control: the same scenarios without the proxy ----------

#[tokio::test]
async fn control_scenarios_pass_without_the_proxy() {
    bounded(async {
        let certs = Certs::new(&["localhost"]);
        let (backend, state) = start_grpc_backend().await;
        // h2c straight to the backend, then the TLS client through a TLS relay.
        let relay = tls_relay::start_tls_relay(&certs, b"h2", backend).await;
        for ch in [
            channel(backend, None).await,
            channel(relay, Some(&certs)).await,
        ] {
            unary_ok(ch.clone(), &state).await;
            unary_not_found(ch.clone()).await;
            server_stream_ends_with_status_in_trailers(ch.clone()).await;
            server_stream_is_not_buffered(ch.clone(), &state).await;
            many_concurrent_unary_calls(ch, 200).await;
        }
    })
    .await;
}
