//! HTTP/2 backends for the upstream tests: cleartext (h2c, prior knowledge) or TLS (ALPN h2,
//! a certificate from its own rcgen CA), announcing a chosen stream limit, and counting the
//! TCP connections they accept and the most streams they saw in flight at once.

use super::{Certs, backend_handler};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Counts {
    pub connections: AtomicUsize,
    in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
    pub requests: AtomicUsize,
}

pub struct H2Backend {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
}

impl H2Backend {
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }
    pub fn peak_in_flight(&self) -> usize {
        self.counts.peak_in_flight.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }
}

/// A TLS server config for a backend with a certificate for `backend.test` from `certs`'
/// CA (make `certs` with `Certs::new(&["backend.test"])`).
pub fn backend_tls(certs: &Certs) -> Arc<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&certs.key).unwrap();
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(super::provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

/// Serves `common::backend_handler`'s routes over HTTP/2.
pub async fn start(max_streams: Option<u32>, tls: Option<Arc<rustls::ServerConfig>>) -> H2Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            c.connections.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let c = c.clone();
                    async move {
                        c.requests.fetch_add(1, Ordering::SeqCst);
                        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        c.peak_in_flight.fetch_max(now, Ordering::SeqCst);
                        let r = backend_handler(req).await;
                        c.in_flight.fetch_sub(1, Ordering::SeqCst);
                        r
                    }
                });
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                if let Some(n) = max_streams {
                    b.max_concurrent_streams(n);
                }
                match tls {
                    None => {
                        let _ = b.serve_connection(TokioIo::new(sock), svc).await;
                    }
                    Some(cfg) => {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(sock).await else {
                            return;
                        };
                        let _ = b.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    H2Backend { addr, counts }
}
