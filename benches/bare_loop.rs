//! The reference point of the handshake target in `benches/compare.sh`: a bare tokio-rustls +
//! hyper accept loop that answers "ok" itself, with no proxying and nothing of ephemera's
//! serving path (no routing, no forwarding, no metrics, no timeouts, no tuned close). The
//! target says the full proxy should be no heavier per handshake than this loop; compare.sh
//! runs it next to ephemera, nginx and HAProxy so that the four are measured in one run.
//!
//! It uses ephemera's TLS policy (`tls::policy::server_config`: TLS 1.3 only, X25519/P-256/
//! P-384, AES-128-GCM first, no tickets, no session cache, ALPN h2 and http/1.1), so the
//! handshake is the same as the others'; the rest is what a minimal server written with these
//! crates does: one current-thread runtime (compare.sh pins every server to one CPU), the
//! system allocator, hyper-util's HTTP/1.1 + HTTP/2 connection builder with its defaults.
//!
//! `cargo build --release --example bare_loop`, then
//! `bare_loop --listen 127.0.0.1:8443 --cert localhost.crt --key localhost.key`.

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use ephemera::config::Group;
use ephemera::tls::policy;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Parser)]
#[command(about = "Bare tokio-rustls + hyper loop answering \"ok\" (benchmark reference)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Certificate chain (PEM), leaf first.
    #[arg(long)]
    cert: PathBuf,
    /// The leaf's private key (PEM).
    #[arg(long)]
    key: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let chain = CertificateDer::pem_file_iter(&args.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .with_context(|| format!("reading the private key from {}", args.key.display()))?;
    let groups = [Group::X25519, Group::Secp256r1, Group::Secp384r1];
    let certified = CertifiedKey::from_der(chain, key, &policy::provider(&groups))
        .context("certificate and key do not match or are not supported")?;
    let config = policy::server_config(&groups, Arc::new(SingleCertAndKey::from(certified)), None)
        .context("building the TLS server config")?;
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        eprintln!("bare_loop listening on {}", listener.local_addr()?);
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: the loop goes on, as a server's would.
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service_fn(respond))
                    .await;
            });
        }
    })
}

async fn respond(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
}
