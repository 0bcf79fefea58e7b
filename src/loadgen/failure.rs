//! loadgen: why one request attempt failed, as a small closed set of kinds (the report's error
//! table and the exit message), classified from the TCP, rustls and hyper errors that
//! `connect` and `http` return. The source error is kept for the report's example line.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// What went wrong with one attempt. A closed set: the report counts by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The TCP connection was refused (nothing listening on the port).
    ConnectRefused,
    /// The TCP connection did not complete within `--timeout`.
    ConnectTimeout,
    /// Any other TCP connect error (unreachable, out of local ports, …).
    ConnectOther,
    /// TCP connected, the TLS handshake failed; the sub-kind says how.
    TlsHandshake(TlsFailure),
    /// The TLS connection was up, the HTTP exchange failed (reset, closed mid-response,
    /// malformed response).
    Http,
    /// The HTTP exchange did not complete within `--timeout`.
    Timeout,
}

/// How a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsFailure {
    /// We rejected the server's certificate (unknown issuer, wrong name, expired…).
    BadCertificate,
    /// The server does not speak TLS 1.3 (TLS 1.2 only, or older).
    ProtocolVersion,
    /// The server sent a handshake_failure alert: no shared group, cipher suite or
    /// signature scheme (a TLS 1.2-only server may also answer this way).
    HandshakeFailure,
    /// No ALPN protocol in common with the server (`--alpn`).
    NoApplicationProtocol,
    /// The server does not know the name we sent (`--sni`; strict SNI).
    UnrecognisedName,
    /// The server sent another fatal alert.
    AlertReceived,
    /// The server's messages broke the protocol (or it does not speak TLS on that port).
    ProtocolError,
    /// The server closed or reset the connection during the handshake.
    PeerClosed,
    /// The handshake did not complete within `--timeout`.
    Timeout,
    /// A socket error during the handshake.
    Io,
    /// Anything else rustls reported.
    Other,
}

impl ErrorKind {
    /// The report's name for the kind.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::ConnectOther => "connect_other",
            ErrorKind::TlsHandshake(_) => "tls_handshake",
            ErrorKind::Http => "http",
            ErrorKind::Timeout => "timeout",
        }
    }

    /// What to check, for the message when every attempt failed this way.
    pub fn hint(self) -> Option<&'static str> {
        match self {
            ErrorKind::ConnectRefused => Some("nothing is listening at the target address"),
            ErrorKind::TlsHandshake(TlsFailure::BadCertificate) => Some(
                "the server's certificate is not trusted: pass --ca FILE with its CA, or --insecure",
            ),
            ErrorKind::TlsHandshake(TlsFailure::ProtocolVersion) => {
                Some("the server does not speak TLS 1.3")
            }
            ErrorKind::TlsHandshake(TlsFailure::HandshakeFailure) => Some(
                "no shared group, cipher suite or signature scheme (or the server lacks TLS 1.3)",
            ),
            _ => None,
        }
    }

    /// The sub-kind, for TLS handshake failures.
    pub fn detail(self) -> Option<&'static str> {
        match self {
            ErrorKind::TlsHandshake(t) => Some(t.name()),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail() {
            Some(d) => write!(f, "{} ({d})", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

impl TlsFailure {
    pub fn name(self) -> &'static str {
        match self {
            TlsFailure::BadCertificate => "bad_certificate",
            TlsFailure::ProtocolVersion => "protocol_version",
            TlsFailure::HandshakeFailure => "handshake_failure",
            TlsFailure::NoApplicationProtocol => "no_application_protocol",
            TlsFailure::UnrecognisedName => "unrecognised_name",
            TlsFailure::AlertReceived => "alert_received",
            TlsFailure::ProtocolError => "protocol_error",
            TlsFailure::PeerClosed => "peer_closed",
            TlsFailure::Timeout => "timeout",
            TlsFailure::Io => "io",
            TlsFailure::Other => "other",
        }
    }
}

/// One failed attempt: its kind and the error it came from.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct Failure {
    pub kind: ErrorKind,
    #[source]
    pub source: FailureSource,
}

/// The underlying error of a failed attempt.
#[derive(Debug, thiserror::Error)]
pub enum FailureSource {
    /// TCP connect to this address failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    /// hyper reported an HTTP error.
    #[error("HTTP: {}", with_causes(.0))]
    Http(#[source] hyper::Error),
    /// No response head came back: the connection closed around the request (the server
    /// may not have seen it).
    #[error("HTTP: no response: {}", with_causes(.0))]
    Unanswered(#[source] hyper::Error),
    /// The connection ended before a response came.
    #[error("HTTP: the server closed the connection before responding")]
    ClosedEarly,
    /// A phase did not finish in time.
    #[error("{phase} did not complete within {limit:?}")]
    TimedOut {
        phase: &'static str,
        limit: Duration,
    },
}

/// hyper's message with its causes: "http2 error" alone does not say that it was, e.g., a
/// stream the server refused.
fn with_causes(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl Failure {
    pub fn connect(addr: SocketAddr, source: std::io::Error) -> Failure {
        use std::io::ErrorKind as Io;
        let kind = match source.kind() {
            Io::ConnectionRefused => ErrorKind::ConnectRefused,
            Io::TimedOut => ErrorKind::ConnectTimeout,
            _ => ErrorKind::ConnectOther,
        };
        Failure {
            kind,
            source: FailureSource::Connect { addr, source },
        }
    }

    pub fn tls(source: std::io::Error) -> Failure {
        Failure {
            kind: ErrorKind::TlsHandshake(classify_tls_io(&source)),
            source: FailureSource::Tls(source),
        }
    }

    pub fn http(source: hyper::Error) -> Failure {
        Failure {
            kind: ErrorKind::Http,
            source: FailureSource::Http(source),
        }
    }

    /// `send_request` failed: no response head.
    pub fn unanswered(source: hyper::Error) -> Failure {
        Failure {
            kind: ErrorKind::Http,
            source: FailureSource::Unanswered(source),
        }
    }

    pub fn is_unanswered(&self) -> bool {
        matches!(self.source, FailureSource::Unanswered(_))
    }

    /// An HTTP/2 request the server's GOAWAY left unprocessed (its stream above the
    /// GOAWAY's last stream id, or opened after it): safe to send again whatever the method
    /// (RFC 9113 §6.8), while the connection may still be finishing other streams.
    pub fn refused_by_goaway(&self) -> bool {
        let FailureSource::Unanswered(e) = &self.source else {
            return false;
        };
        std::error::Error::source(e)
            .and_then(|c| c.downcast_ref::<h2::Error>())
            .is_some_and(|h| h.is_go_away() && h.is_remote())
    }

    pub fn closed_early() -> Failure {
        Failure {
            kind: ErrorKind::Http,
            source: FailureSource::ClosedEarly,
        }
    }

    /// `phase` ran out of time: connect, handshake or the HTTP exchange.
    pub fn timed_out(kind: ErrorKind, phase: &'static str, limit: Duration) -> Failure {
        Failure {
            kind,
            source: FailureSource::TimedOut { phase, limit },
        }
    }
}

/// Classify the error tokio-rustls returns from a client handshake.
fn classify_tls_io(e: &std::io::Error) -> TlsFailure {
    use std::io::ErrorKind as Io;
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return classify_tls(tls);
    }
    match e.kind() {
        Io::UnexpectedEof | Io::ConnectionReset | Io::BrokenPipe | Io::ConnectionAborted => {
            TlsFailure::PeerClosed
        }
        Io::InvalidData => TlsFailure::ProtocolError,
        _ => TlsFailure::Io,
    }
}

pub fn classify_tls(e: &rustls::Error) -> TlsFailure {
    use rustls::AlertDescription as A;
    use rustls::Error as E;
    use rustls::PeerIncompatible as P;
    match e {
        E::InvalidCertificate(_) => TlsFailure::BadCertificate,
        E::PeerIncompatible(
            P::ServerDoesNotSupportTls12Or13
            | P::ServerTlsVersionIsDisabledByOurConfig
            | P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled,
        ) => TlsFailure::ProtocolVersion,
        E::PeerIncompatible(_) => TlsFailure::HandshakeFailure,
        E::NoApplicationProtocol => TlsFailure::NoApplicationProtocol,
        E::AlertReceived(alert) => match alert {
            A::ProtocolVersion => TlsFailure::ProtocolVersion,
            A::HandshakeFailure | A::InsufficientSecurity => TlsFailure::HandshakeFailure,
            A::NoApplicationProtocol => TlsFailure::NoApplicationProtocol,
            A::UnrecognisedName => TlsFailure::UnrecognisedName,
            _ => TlsFailure::AlertReceived,
        },
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerMisbehaved(_)
        | E::DecryptError => TlsFailure::ProtocolError,
        _ => TlsFailure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request on an HTTP/2 connection whose server answers its preface with GOAWAY (last
    /// stream id 0): the request was not processed, so loadgen may send it again.
    #[tokio::test]
    async fn a_stream_past_the_servers_goaway_is_refused_not_failed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move {
            // Our SETTINGS, the client's SETTINGS ACK, then GOAWAY(last stream 0, NO_ERROR).
            server
                .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            server
                .write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0])
                .await
                .unwrap();
            let mut goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
            goaway.extend_from_slice(&[0; 8]);
            let mut preface_and_request = [0u8; 64];
            let _ = server.read(&mut preface_and_request).await;
            server.write_all(&goaway).await.unwrap();
            let mut rest = [0u8; 1024];
            while server.read(&mut rest).await.is_ok_and(|n| n > 0) {}
        });
        let req = http::Request::get("http://localhost/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let e = sender.send_request(req).await.unwrap_err();
        let f = Failure::unanswered(e);
        assert!(f.refused_by_goaway(), "{f}");
        assert!(f.to_string().contains("connection error received"), "{f}");
    }

    fn io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn classifies_handshake_errors() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                TlsFailure::BadCertificate,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion),
                TlsFailure::ProtocolVersion,
            ),
            (
                rustls::PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig.into(),
                TlsFailure::ProtocolVersion,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
                TlsFailure::HandshakeFailure,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName),
                TlsFailure::UnrecognisedName,
            ),
            (rustls::Error::DecryptError, TlsFailure::ProtocolError),
        ];
        for (err, want) in cases {
            let f = Failure::tls(io(err));
            assert_eq!(f.kind, ErrorKind::TlsHandshake(want), "{f}");
        }
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(
            Failure::tls(eof).kind,
            ErrorKind::TlsHandshake(TlsFailure::PeerClosed)
        );
    }

    #[test]
    fn classifies_connect_errors_and_names_them() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let refused = Failure::connect(addr, std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(refused.kind, ErrorKind::ConnectRefused);
        assert_eq!(refused.kind.to_string(), "connect_refused");
        assert!(refused.to_string().contains("127.0.0.1:1"), "{refused}");
        let other = Failure::connect(addr, std::io::ErrorKind::AddrNotAvailable.into());
        assert_eq!(other.kind, ErrorKind::ConnectOther);
        assert_eq!(
            ErrorKind::TlsHandshake(TlsFailure::BadCertificate).to_string(),
            "tls_handshake (bad_certificate)"
        );
    }
}
