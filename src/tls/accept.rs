//! The TLS handshake for one accepted TCP connection: read the ClientHello, apply strict SNI,
//! run the handshake under `handshake_timeout`, and classify any failure into the closed set
//! `HandshakeFailure` (metric label and rate-limited log line). Called by `listener`; hands an
//! `Established` connection on to `http`.

use super::certs::{self, CertError, LoadedCert, SniResolver};
use super::policy;
use super::stream::{ClientStream, Closed};
use crate::config::KeyUpdatePolicy;
use crate::config::{Group, TlsConfig};
use crate::log_limit::LogLimiter;
use crate::metrics::{HandshakeFailure, ListenerMetrics};
use rustls::server::Acceptor;
use rustls::{HandshakeKind, NamedGroup, PeerIncompatible, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

/// Why a listener's TLS could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// A certificate or key could not be loaded (the message names the entry and file).
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// `tls.client_auth.ca` is missing, unreadable or holds no usable certificate.
    #[error(transparent)]
    ClientCa(#[from] super::client_cert::ClientCaError),
    /// rustls refused the policy (should not happen with the groups `config` allows).
    #[error("listener '{listener}': TLS policy rejected by rustls: {source}")]
    Policy {
        listener: String,
        #[source]
        source: rustls::Error,
    },
}

/// What the handshake negotiated: metric labels, the built-in response, and forwarding.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub group: &'static str,
    pub cipher_suite: &'static str,
    pub alpn: Alpn,
    pub server_name: Option<String>,
    /// The verified client certificate as an `X-Forwarded-Client-Cert` value (mTLS only).
    pub client_cert: Option<Arc<str>>,
}

/// The application protocol chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
    /// The client sent no ALPN extension: HTTP/1.1 is spoken.
    None,
}

impl Alpn {
    pub fn label(self) -> &'static str {
        match self {
            Alpn::H2 => "h2",
            Alpn::Http11 => "http/1.1",
            Alpn::None => "none",
        }
    }
}

/// A completed handshake.
pub struct Established {
    /// The stream to serve: forces key updates, returns the TLS stream through `closed`.
    pub stream: ClientStream,
    /// Receives the TLS stream when `stream` is dropped, for `stream::close_lingering`.
    pub closed: oneshot::Receiver<Box<Closed>>,
    pub info: TlsInfo,
}

/// One listener's TLS: its policy config, certificates and handshake accounting.
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    resolver: Arc<SniResolver>,
    strict_sni: bool,
    handshake_timeout: Duration,
    /// Permits for handshakes in progress (`tls.max_concurrent_handshakes`).
    in_flight: tokio::sync::Semaphore,
    key_update: Option<KeyUpdatePolicy>,
    next_id: AtomicU64,
    metrics: ListenerMetrics,
    log: LogLimiter,
    pub certificates: Vec<LoadedCert>,
}

impl TlsAcceptor {
    /// The listener's certificates by name (for the HTTP layer's 421 check).
    pub fn resolver(&self) -> Arc<SniResolver> {
        self.resolver.clone()
    }

    /// Load the certificates and build the policy. Fails before anything binds. `http`:
    /// offer ALPN h2/http/1.1; a TCP-mode listener offers none (its clients may name any
    /// protocol, or none, and must not be refused for it).
    pub fn new(
        tls: &TlsConfig,
        listener: &str,
        metrics: ListenerMetrics,
        http: bool,
    ) -> Result<TlsAcceptor, TlsSetupError> {
        let provider = policy::provider(&tls.groups);
        let certificates = tls
            .certificates
            .iter()
            .map(|c| certs::load(c, &provider))
            .collect::<Result<Vec<_>, _>>()?;
        for (src, c) in tls.certificates.iter().zip(&certificates) {
            if c.names.is_empty() {
                tracing::warn!(listener, certificate = %src.origin, "certificate has no DNS names (subjectAltName): it is only ever served as the default for a missing or unknown SNI name");
            }
        }
        let resolver = Arc::new(SniResolver::new(&certificates, tls.strict_sni));
        let client_auth = tls
            .client_auth
            .as_ref()
            .map(|auth| super::client_cert::verifier(listener, auth, Arc::new(provider.clone())))
            .transpose()?;
        let mut config = policy::server_config(&tls.groups, resolver.clone(), client_auth)
            .map_err(|source| TlsSetupError::Policy {
                listener: listener.to_string(),
                source,
            })?;
        if !http {
            config.alpn_protocols.clear();
        }
        if let Some(keylog) = &tls.keylog {
            config.key_log = keylog.clone();
        }
        Ok(TlsAcceptor {
            config: Arc::new(config),
            resolver,
            strict_sni: tls.strict_sni,
            handshake_timeout: tls.handshake_timeout,
            in_flight: tokio::sync::Semaphore::new(tls.max_concurrent_handshakes),
            key_update: tls.key_update,
            next_id: AtomicU64::new(1),
            metrics,
            log: LogLimiter::new(Duration::from_secs(10), 10),
            certificates,
        })
    }

    /// Run the handshake; every outcome is counted.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Established> {
        // Past the cap, refuse before reading a byte: a flood of (slow) handshakes must not
        // cost crypto or memory. Established connections hold no permit.
        let Ok(_slot) = self.in_flight.try_acquire() else {
            self.refused(
                HandshakeFailure::HandshakeLimit,
                &peer,
                "max_concurrent_handshakes reached",
            );
            return None;
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.handshake_timeout, self.handshake(tcp)).await;
        let failure = match result {
            Ok(Ok(stream)) => return Some(self.established(stream, started)),
            Ok(Err((reason, detail))) => (reason, detail),
            Err(_) => (
                HandshakeFailure::Timeout,
                "no complete handshake within handshake_timeout".to_string(),
            ),
        };
        let (reason, detail) = failure;
        self.refused(reason, &peer, &detail);
        None
    }

    /// Count and (rate-limited) log a connection refused before or during the handshake.
    pub fn refused(&self, reason: HandshakeFailure, peer: &SocketAddr, detail: &str) {
        self.metrics.handshake_failed(reason);
        if let Some(suppressed) = self.log.allow() {
            tracing::info!(
                listener = self.metrics.name(),
                %peer,
                reason = reason.label(),
                detail = %detail,
                suppressed_since_last = suppressed,
                "TLS handshake failed"
            );
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, (HandshakeFailure, String)> {
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp)
            .await
            .map_err(|e| classify_io(&e))?;
        let name = start.client_hello().server_name().map(str::to_owned);
        let unknown_sni = self.strict_sni && !self.resolver.covers(name.as_deref());
        match start.into_stream(self.config.clone()).await {
            Ok(s) => Ok(s),
            Err(e) => {
                let (reason, detail) = classify_io(&e);
                // rustls checks version, groups and suites before it asks the resolver for a
                // certificate; only its generic "no certificate resolved" error (sent with an
                // access_denied alert) is the strict-SNI refusal.
                if unknown_sni && reason == HandshakeFailure::Other {
                    let why = match name {
                        Some(_) => "strict_sni: no certificate covers the requested name",
                        None => "strict_sni: the client sent no SNI name",
                    };
                    return Err((HandshakeFailure::UnknownSni, why.to_string()));
                }
                Err((reason, detail))
            }
        }
    }

    fn established(&self, stream: TlsStream<TcpStream>, started: Instant) -> Established {
        let (_, conn) = stream.get_ref();
        match conn.handshake_kind() {
            Some(HandshakeKind::Resumed) => self.metrics.resumed(),
            Some(HandshakeKind::FullWithHelloRetryRequest) => self.metrics.hello_retry_request(),
            _ => {}
        }
        let group = conn
            .negotiated_key_exchange_group()
            .map(|g| group_label(g.name()))
            .unwrap_or("unknown");
        let cipher_suite = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown");
        let alpn = match conn.alpn_protocol() {
            Some(b"h2") => Alpn::H2,
            Some(_) => Alpn::Http11,
            None => Alpn::None,
        };
        let info = TlsInfo {
            group,
            cipher_suite,
            alpn,
            server_name: conn.server_name().map(str::to_owned),
            client_cert: conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(super::client_cert::forwarded_value)
                .map(Arc::from),
        };
        self.metrics.handshake_ok(
            group,
            cipher_suite,
            alpn.label(),
            started.elapsed().as_secs_f64(),
        );
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let accepted = std::time::Instant::now() - started.elapsed();
        let (stream, closed) = ClientStream::new(
            stream,
            alpn == Alpn::H2,
            self.key_update,
            self.metrics.rekey().clone(),
            id,
            accepted,
        );
        Established {
            stream,
            closed,
            info,
        }
    }
}

fn group_label(g: NamedGroup) -> &'static str {
    Group::ALL
        .into_iter()
        .find(|ours| policy::kx_group(*ours).name() == g)
        .map(Group::name)
        .unwrap_or("unknown")
}

/// Map a handshake error onto the closed set of reasons.
fn classify_io(e: &std::io::Error) -> (HandshakeFailure, String) {
    use std::io::ErrorKind;
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return (classify_tls(tls), tls.to_string());
    }
    let reason = match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => HandshakeFailure::ClientClosed,
        ErrorKind::InvalidData => HandshakeFailure::Malformed,
        _ => HandshakeFailure::Io,
    };
    (reason, e.to_string())
}

fn classify_tls(e: &rustls::Error) -> HandshakeFailure {
    use rustls::Error as E;
    match e {
        E::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired,
        ) => HandshakeFailure::ProtocolVersion,
        E::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon) => {
            HandshakeFailure::NoSharedGroup
        }
        E::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon) => {
            HandshakeFailure::NoSharedCipher
        }
        E::PeerIncompatible(PeerIncompatible::NoSignatureSchemesInCommon) => {
            HandshakeFailure::NoSharedSignatureScheme
        }
        E::NoApplicationProtocol => HandshakeFailure::NoApplicationProtocol,
        // On a server, the only peer certificate is the client's (mTLS).
        E::NoCertificatesPresented => HandshakeFailure::ClientCertMissing,
        E::InvalidCertificate(_) => HandshakeFailure::ClientCertInvalid,
        E::AlertReceived(_) => HandshakeFailure::AlertReceived,
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerMisbehaved(_)
        | E::DecryptError => HandshakeFailure::Malformed,
        _ => HandshakeFailure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_policy_refusals() {
        let pi = |p| rustls::Error::PeerIncompatible(p);
        assert_eq!(
            classify_tls(&pi(PeerIncompatible::SupportedVersionsExtensionRequired)),
            HandshakeFailure::ProtocolVersion
        );
        assert_eq!(
            classify_tls(&pi(PeerIncompatible::Tls12NotOfferedOrEnabled)),
            HandshakeFailure::ProtocolVersion
        );
        assert_eq!(
            classify_tls(&pi(PeerIncompatible::NoKxGroupsInCommon)),
            HandshakeFailure::NoSharedGroup
        );
        assert_eq!(
            classify_tls(&pi(PeerIncompatible::NoCipherSuitesInCommon)),
            HandshakeFailure::NoSharedCipher
        );
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            pi(PeerIncompatible::NoKxGroupsInCommon),
        );
        assert_eq!(classify_io(&io).0, HandshakeFailure::NoSharedGroup);
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(classify_io(&eof).0, HandshakeFailure::ClientClosed);
    }

    #[test]
    fn group_labels() {
        assert_eq!(group_label(NamedGroup::X25519), "x25519");
        assert_eq!(group_label(NamedGroup::secp384r1), "secp384r1");
        assert_eq!(group_label(NamedGroup::X25519MLKEM768), "x25519mlkem768");
    }
}
