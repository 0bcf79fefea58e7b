//! loadgen: one new connection (client TLS → **connect** → HTTP): TCP connect, then the TLS
//! handshake, each timed, with what was negotiated. Failures come back classified.

use super::failure::{ErrorKind, Failure, TlsFailure};
use crate::config::Group;
use crate::tls::policy::kx_group;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind, NamedGroup};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Opens connections to one target.
pub struct Connector {
    addrs: Vec<SocketAddr>,
    /// The address that last accepted: `localhost` may resolve to ::1 first while the server
    /// listens on 127.0.0.1 only; after one refusal every connection goes straight to the one
    /// that works.
    preferred: AtomicUsize,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    timeout: Duration,
}

/// An established TLS connection and how it came about.
pub struct Connected {
    pub stream: TlsStream<TcpStream>,
    pub tcp_connect: Duration,
    pub tls_handshake: Duration,
    pub negotiated: Negotiated,
}

/// The handshake's outcome, as report labels.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub group: &'static str,
    pub cipher_suite: &'static str,
    pub alpn: NegotiatedAlpn,
    pub kind: &'static str,
    pub resumed: bool,
    pub hello_retry: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegotiatedAlpn {
    H2,
    Http11,
    /// The server chose none.
    None,
    /// Something we did not offer (a broken server): spoken as HTTP/1.1.
    Other,
}

impl NegotiatedAlpn {
    pub fn label(self) -> &'static str {
        match self {
            NegotiatedAlpn::H2 => "h2",
            NegotiatedAlpn::Http11 => "http/1.1",
            NegotiatedAlpn::None => "none",
            NegotiatedAlpn::Other => "other",
        }
    }
}

impl Connector {
    /// `addrs` must not be empty.
    pub fn new(
        addrs: Vec<SocketAddr>,
        config: ClientConfig,
        server_name: ServerName<'static>,
        timeout: Duration,
    ) -> Connector {
        Connector {
            addrs,
            preferred: AtomicUsize::new(0),
            tls: TlsConnector::from(Arc::new(config)),
            server_name,
            timeout,
        }
    }

    /// TCP connect and TLS handshake, both done by `deadline`.
    pub async fn connect(&self, deadline: Instant) -> Result<Connected, Failure> {
        let t0 = Instant::now();
        let tcp = timeout_at(deadline, self.tcp()).await.map_err(|_| {
            Failure::timed_out(ErrorKind::ConnectTimeout, "TCP connect", self.timeout)
        })??;
        // Requests are small writes answered by the server; Nagle would only add delay.
        let _ = tcp.set_nodelay(true);
        let t1 = Instant::now();
        let stream = timeout_at(deadline, self.tls.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| {
                Failure::timed_out(
                    ErrorKind::TlsHandshake(TlsFailure::Timeout),
                    "TLS handshake",
                    self.timeout,
                )
            })?
            .map_err(Failure::tls)?;
        let t2 = Instant::now();
        let negotiated = negotiated(stream.get_ref().1);
        Ok(Connected {
            stream,
            tcp_connect: t1 - t0,
            tls_handshake: t2 - t1,
            negotiated,
        })
    }

    async fn tcp(&self) -> Result<TcpStream, Failure> {
        let n = self.addrs.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let addr = self.addrs[idx];
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    if i != 0 {
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    return Ok(s);
                }
                Err(e) => last = Some(Failure::connect(addr, e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            Failure::connect(
                SocketAddr::from(([0, 0, 0, 0], 0)),
                std::io::ErrorKind::AddrNotAvailable.into(),
            )
        }))
    }
}

fn negotiated(conn: &rustls::ClientConnection) -> Negotiated {
    let alpn = match conn.alpn_protocol() {
        Some(b"h2") => NegotiatedAlpn::H2,
        Some(b"http/1.1") => NegotiatedAlpn::Http11,
        Some(_) => NegotiatedAlpn::Other,
        None => NegotiatedAlpn::None,
    };
    let kind = conn.handshake_kind();
    Negotiated {
        group: conn
            .negotiated_key_exchange_group()
            .map_or("none", |g| group_label(g.name())),
        cipher_suite: conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown"),
        alpn,
        kind: match kind {
            Some(HandshakeKind::Full) => "full",
            Some(HandshakeKind::FullWithHelloRetryRequest) => "full_with_hello_retry_request",
            Some(HandshakeKind::Resumed) => "resumed",
            None => "unknown",
        },
        resumed: kind == Some(HandshakeKind::Resumed),
        hello_retry: kind == Some(HandshakeKind::FullWithHelloRetryRequest),
    }
}

fn group_label(g: NamedGroup) -> &'static str {
    Group::ALL
        .into_iter()
        .find(|ours| kx_group(*ours).name() == g)
        .map_or("other", Group::name)
}
