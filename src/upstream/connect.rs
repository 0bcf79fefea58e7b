//! Opening one backend connection for `upstream`: TCP within `connect_timeout`, then, for `h2`
//! upstreams, TLS with the certificate verified against the upstream's CA and ALPN h2.
//! The pools (`h1`, `h2`) hand the result to hyper's client handshake.

use crate::config::UpstreamTls;
use crate::metrics::UpstreamErrorKind;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why an upstream's TLS settings could not be turned into a client policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamSetupError {
    /// The CA file named in `upstreams.NAME.tls.ca` could not be read.
    #[error("upstream '{upstream}': cannot read tls.ca file {path}: {source}")]
    CaRead {
        upstream: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The CA file holds no PEM certificate that can be used as a trust anchor.
    #[error("upstream '{upstream}': tls.ca file {path}: {detail}")]
    CaContent {
        upstream: String,
        path: PathBuf,
        detail: String,
    },
    /// A server's host is not a DNS name or IP address and no `tls.server_name` is set.
    #[error(
        "upstream '{upstream}': server '{server}' has no host usable as a TLS server name; set tls.server_name"
    )]
    ServerName { upstream: String, server: String },
}

/// TLS to the backends of one `h2` upstream.
pub struct BackendTls {
    connector: TlsConnector,
    /// `tls.server_name` when configured; otherwise each server's own host.
    server_name: Option<ServerName<'static>>,
}

impl BackendTls {
    pub fn new(upstream: &str, tls: &UpstreamTls) -> Result<BackendTls, UpstreamSetupError> {
        let pem = std::fs::read(&tls.ca).map_err(|source| UpstreamSetupError::CaRead {
            upstream: upstream.to_string(),
            path: tls.ca.clone(),
            source,
        })?;
        let content = |detail: String| UpstreamSetupError::CaContent {
            upstream: upstream.to_string(),
            path: tls.ca.clone(),
            detail,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| content(format!("not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| content(format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(content("no CERTIFICATE block found".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // TLS 1.3 preferred, 1.2 accepted (rustls offers only forward-secret ECDHE suites
        // there). No resumption: every backend connection gets fresh keys too.
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| content(format!("TLS policy: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        let server_name = match &tls.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| content(format!("tls.server_name '{n}': {e}")))?,
            ),
            None => None,
        };
        Ok(BackendTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name to verify for `server` (`HOST:PORT`).
    pub fn name_for(
        &self,
        upstream: &str,
        server: &str,
    ) -> Result<ServerName<'static>, UpstreamSetupError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = server
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(server);
        ServerName::try_from(host.to_string()).map_err(|_| UpstreamSetupError::ServerName {
            upstream: upstream.to_string(),
            server: server.to_string(),
        })
    }
}

/// A connection to a backend, cleartext or TLS.
pub enum BackendIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A failed connection attempt and the kind it is counted as.
pub type ConnectFailure = (UpstreamErrorKind, io::Error);

/// TCP connect (names resolved now, so DNS changes apply to new connections), then TLS when
/// `tls` is given. `timeout` bounds both together.
pub async fn connect(
    addr: &str,
    timeout: Duration,
    tls: Option<(&BackendTls, &ServerName<'static>)>,
) -> Result<BackendIo, ConnectFailure> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| (UpstreamErrorKind::Connect, e))?;
        let _ = tcp.set_nodelay(true);
        let Some((tls, name)) = tls else {
            return Ok(BackendIo::Plain(tcp));
        };
        let stream = tls
            .connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| (UpstreamErrorKind::Tls, e))?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err((
                UpstreamErrorKind::Tls,
                io::Error::other("the backend did not choose ALPN h2"),
            ));
        }
        Ok(BackendIo::Tls(Box::new(stream)))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err((
            UpstreamErrorKind::ConnectTimeout,
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            ),
        )),
    }
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Plain(s) => s.is_write_vectored(),
            BackendIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
