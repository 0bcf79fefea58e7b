//! Config, layer 2 of 2: the validated configuration every other module reads.
//!
//! Flow: YAML text → `raw::RawConfig` (serde, unknown keys rejected) → `validate` → `Config`.
//! Every default and every check lives in `validate.rs`; nothing past this module sees an
//! unvalidated value. `config` imports no other module of the crate.

pub mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use validate::{DEFAULT_ADMIN_BIND, DEFAULT_LISTEN};

/// Where a value came from: the config file, its key path and line, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The config file (or "command line", "built-in default").
    pub file: String,
    /// Key path, e.g. `listeners[0].tls.certificates[1].key`.
    pub key: String,
    /// 1-based line in the config file; 0 when the value is built in (no file).
    pub line: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.key)
        } else {
            write!(f, "{}: {} (line {})", self.file, self.key, self.line)
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub admin: AdminConfig,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
    pub shutdown_grace: Duration,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// When set, `POST /reload` needs `Authorization: Bearer <the file's content>`.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub max_connections: usize,
    /// SO_REUSEPORT: several processes may listen on the same address (the kernel spreads
    /// connections over them).
    pub reuse_port: bool,
    /// Expect a PROXY protocol (v1/v2) header from peers in `http.trusted_proxies`.
    pub proxy_protocol: bool,
    pub tls: TlsConfig,
    /// HTTP (routes) or layer-4 relaying (`mode: tcp`).
    pub mode: ListenerMode,
    pub http: HttpConfig,
    /// Empty in TCP mode.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// HTTP/1.1 or HTTP/2 by ALPN, routed per request.
    Http,
    /// TLS terminated, then the bytes relayed to one `protocol: tcp` upstream.
    Tcp {
        /// Index into `Config::upstreams`.
        upstream: usize,
        /// A relay with no bytes either way for this long is closed.
        idle_timeout: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The first entry is the default for a missing or unknown SNI name.
    pub certificates: Vec<CertificateSource>,
    pub strict_sni: bool,
    /// Key-exchange groups in server preference order.
    pub groups: Vec<Group>,
    pub handshake_timeout: Duration,
    /// Handshakes in progress at most; connections past it are closed before any crypto.
    pub max_concurrent_handshakes: usize,
    /// Forced TLS 1.3 KeyUpdate; `None` when disabled (`key_update: false`).
    pub key_update: Option<KeyUpdatePolicy>,
    /// Past this age (less a per-connection jitter of up to 10%) a connection is closed
    /// gracefully; `None` when disabled (`max_connection_age: false`).
    pub max_connection_age: Option<Duration>,
    /// How long a connection past its age may take to finish what is in flight.
    pub max_connection_age_grace: Duration,
    /// New handshakes per client address; `None`: unlimited.
    pub handshake_rate_per_ip: Option<HandshakeRate>,
    /// Client certificates (mTLS); `None`: not asked for.
    pub client_auth: Option<ClientAuth>,
    /// Set only from the command line (`--keylog`), never from a file.
    pub keylog: Option<std::sync::Arc<dyn rustls::KeyLog>>,
}

/// `tls.handshake_rate_per_ip`: a token bucket per client address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandshakeRate {
    /// Tokens added per second (sustained handshakes per second).
    pub per_second: f64,
    /// Bucket size: handshakes allowed at once after a quiet spell.
    pub burst: u32,
    /// IPv6 clients are keyed by this prefix length (one host usually holds a whole /64).
    pub ipv6_prefix: u8,
}

/// `tls.client_auth`: verify client certificates against `ca`.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    pub ca: PathBuf,
    /// false: a client without a certificate is let in (and gets no identity header).
    pub required: bool,
}

/// When to force a KeyUpdate: after `max_bytes` of application data (both directions
/// together) or `max_age` since the last update, whichever comes first. At least one is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUpdatePolicy {
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
}

impl KeyUpdatePolicy {
    pub const DEFAULT: KeyUpdatePolicy = KeyUpdatePolicy {
        max_bytes: Some(1024 * 1024 * 1024),
        max_age: Some(Duration::from_secs(3600)),
    };
    /// The smallest accepted limits: more frequent updates cost CPU and buy nothing.
    pub const MIN_BYTES: u64 = 64 * 1024;
    pub const MIN_AGE: Duration = Duration::from_secs(1);
}

/// A certificate chain and its private key, as PEM.
#[derive(Debug, Clone)]
pub struct CertificateSource {
    pub cert: PemSource,
    pub key: PemSource,
    /// A DER OCSP response to staple (read with the certificate, at start and each reload).
    pub ocsp: Option<PathBuf>,
    /// The config entry, named in every error about this certificate.
    pub origin: Origin,
}

/// PEM bytes from a file, or held in memory (the embedded default's rcgen certificate).
#[derive(Clone)]
pub enum PemSource {
    File(PathBuf),
    Memory { label: &'static str, pem: Vec<u8> },
}

impl fmt::Debug for PemSource {
    // Never print in-memory PEM: it may hold a private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemSource::File(p) => write!(f, "File({})", p.display()),
            PemSource::Memory { label, .. } => write!(f, "Memory({label})"),
        }
    }
}

impl fmt::Display for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemSource::File(p) => write!(f, "{}", p.display()),
            PemSource::Memory { label, .. } => write!(f, "<{label}>"),
        }
    }
}

/// ECDHE key-exchange groups the policy may offer. A closed set: nothing else is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    X25519,
    Secp256r1,
    Secp384r1,
    /// Hybrid X25519 + ML-KEM-768; only offered when listed.
    X25519Mlkem768,
}

impl Group {
    pub const ALL: [Group; 4] = [
        Group::X25519,
        Group::Secp256r1,
        Group::Secp384r1,
        Group::X25519Mlkem768,
    ];
    pub const DEFAULT: [Group; 3] = [Group::X25519, Group::Secp256r1, Group::Secp384r1];

    /// The config-file spelling, also used as the `group` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Group::X25519 => "x25519",
            Group::Secp256r1 => "secp256r1",
            Group::Secp384r1 => "secp384r1",
            Group::X25519Mlkem768 => "x25519mlkem768",
        }
    }

    pub fn from_name(name: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == name)
    }
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Total time allowed to receive one request's headers.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Request bodies larger than this get 413.
    pub max_request_body: u64,
    /// Peers whose X-Forwarded-For / Forwarded headers are kept and appended to.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub h2: H2Limits,
    /// One log line per request (target `ephemera::access`).
    pub access_log: bool,
}

/// HTTP/2 server limits for one listener (`listeners[].http.h2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Limits {
    /// Streams one client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Flow-control window per stream: how much of a request body the client may send
    /// before the backend has taken it.
    pub initial_stream_window: u32,
    /// Flow-control window for the whole connection.
    pub initial_connection_window: u32,
    /// Decoded size of one header list (RFC 9113 §6.5.2 accounting); larger ones get 431.
    pub max_header_list_size: u32,
    /// PING a connection after this long without frames from the client; `None`: never.
    pub keepalive_interval: Option<Duration>,
    /// How long to wait for the PING's acknowledgement before closing.
    pub keepalive_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub host: HostMatch,
    pub path_prefix: String,
    pub action: RouteAction,
}

/// Which request hosts a route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `*`: every host, and requests without one (HTTP/1.0).
    Any,
    /// An exact name, lower-case, without port.
    Exact(String),
    /// `*.example.com`: stored as `.example.com`; matches one or more labels before it.
    Suffix(String),
}

#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Index into `Config::upstreams`.
    Upstream(usize),
    /// A fixed response. `body: None` answers with the connection's TLS parameters.
    Respond { status: u16, body: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over TCP, pooled keep-alive connections.
    Http1,
    /// HTTP/2 over TCP with prior knowledge (cleartext), multiplexed.
    H2c,
    /// HTTP/2 over TLS (ALPN h2, certificate verified), multiplexed.
    H2,
    /// Raw TCP, for `mode: tcp` listeners.
    Tcp,
}

impl UpstreamProtocol {
    /// As written in the config and used as the `protocol` metric label.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::Tcp => "tcp",
        }
    }

    pub fn is_h2(self) -> bool {
        matches!(self, UpstreamProtocol::H2c | UpstreamProtocol::H2)
    }
}

/// TLS to the backends of an `h2` upstream. Verification is always on.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// PEM file with the CA certificate(s) that signed the backends' certificates.
    pub ca: PathBuf,
    /// The name to verify and send as SNI; `None`: each server's host.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub protocol: UpstreamProtocol,
    /// `host:port` strings; names are resolved at connect time.
    pub servers: Vec<String>,
    pub connect_timeout: Duration,
    /// Bound on the wait for response headers (not on a streaming body).
    pub response_timeout: Duration,
    /// Bound on the wait for the next piece of a response body.
    pub read_timeout: Duration,
    /// HTTP/2: connections per server at most (another opens only when the open ones are
    /// at the stream limit the server announced).
    pub max_connections: usize,
    /// Set exactly when `protocol` is `H2`.
    pub tls: Option<UpstreamTls>,
    /// Send a PROXY protocol v2 header on each new connection (http1 and tcp only; such
    /// HTTP/1.1 connections carry one client's requests and are not pooled).
    pub proxy_protocol: bool,
}

/// Why a config was rejected. Every message names the file, the key path and the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read at all.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax error, unknown key, or a value of the wrong type (with line and column).
    #[error("{file}: {}", source.without_snippet())]
    Parse {
        file: String,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A value parsed but is not acceptable (bad address, unknown group, dangling reference…).
    #[error("{origin}: {message}")]
    Invalid {
        origin: Box<Origin>,
        message: String,
    },
}

impl Config {
    /// Log every listener's TLS secrets to `keylog` (the `--keylog` debugging flag).
    pub fn set_keylog(&mut self, keylog: Option<std::sync::Arc<dyn rustls::KeyLog>>) {
        for l in &mut self.listeners {
            l.tls.keylog = keylog.clone();
        }
    }

    /// The key log in use, if any.
    pub fn keylog(&self) -> Option<std::sync::Arc<dyn rustls::KeyLog>> {
        self.listeners.iter().find_map(|l| l.tls.keylog.clone())
    }

    /// Read and validate a config file. Paths inside it are relative to the working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Validate YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            serde_saphyr::from_str(text).map_err(|source| ConfigError::Parse {
                file: file.to_string(),
                source: Box::new(source),
            })?;
        validate::validate(raw, file)
    }
}

/// Parse a duration such as `10s`, `500ms`, `24h`.
/// At most one year: longer values would overflow deadline arithmetic and mean nothing.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration '{s}' ({e}); write e.g. 10s, 500ms, 2m"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "duration '{s}' is longer than the maximum of 365 days"
        ));
    }
    Ok(d)
}

pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parse a byte size such as `64MiB`, `1MB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size '{s}' ({e}); write e.g. 64MiB, 1MB, 4096"))
}
