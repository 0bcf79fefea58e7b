//! loadgen: the command line as clap parses it (`Args`), checked into `Options` (URL split,
//! limits validated, defaults filled) before anything connects. The first stage of
//! options → client TLS → connect → HTTP → stats → report.

use crate::config::Group;
use clap::ValueEnum;
use rustls::pki_types::ServerName;
use std::path::PathBuf;
use std::time::Duration;

/// Default run length when neither `-d` nor `-n` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The largest request body (it is held in memory once and shared by every request).
const MAX_BODY: u64 = 1 << 30;
/// The longest run: far beyond any load test, and every deadline computed from it is a
/// representable instant.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest wait for one attempt.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The slowest open-loop rate: one request every 1,000 s.
const MIN_RATE: f64 = 0.001;
/// The most client worker threads (each is an OS thread with its own stack).
const MAX_THREADS: usize = 1024;
/// The most connections, and streams per connection: each is a task (and a socket), all
/// spawned at the start.
const MAX_CONNECTIONS: usize = 100_000;
const MAX_STREAMS: usize = 1000;

/// `ephemera loadgen` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Target: https://HOST[:PORT][/PATH]. Any TLS 1.3 HTTP server.
    #[arg(value_name = "URL")]
    pub url: String,
    /// handshake: every request on a fresh TCP + TLS connection (full handshake, never
    /// resumed). requests: keep-alive connections, HTTP/1.1 or HTTP/2 (--streams).
    #[arg(long, value_enum, default_value_t = Mode::Handshake)]
    pub mode: Mode,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 8, value_name = "N")]
    pub connections: usize,
    /// requests mode over HTTP/2: concurrent streams per connection.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub streams: usize,
    /// Run this long (e.g. 10s, 1m). Default: 10s, or until -n requests when -n is given.
    #[arg(short = 'd', long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// Stop after this many requests (attempts, failed ones included).
    #[arg(short = 'n', long, value_name = "N")]
    pub requests: Option<u64>,
    /// Open loop: start requests at this fixed rate (per second) whatever the server does;
    /// latency counts from each request's intended start (no coordinated omission).
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Client worker threads. Default: the CPUs this process may run on.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Offer only this key-exchange group: x25519, secp256r1, secp384r1, x25519mlkem768.
    /// Default: x25519, secp256r1, secp384r1 (key share for x25519).
    #[arg(long, value_parser = parse_group, value_name = "GROUP")]
    pub group: Option<Group>,
    /// Offer only this ALPN protocol. Default: offer h2 and http/1.1, use what the server picks.
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub alpn: Option<Alpn>,
    /// Server name to send (SNI) and to verify the certificate for. Default: the URL's host.
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// Trust the CA certificates in this PEM file. Default: the system's CA bundle.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Do not verify the server's certificate (the handshake signature is still checked).
    /// For measuring a server with a self-signed certificate.
    #[arg(long, short = 'k')]
    pub insecure: bool,
    /// HTTP method.
    #[arg(long, default_value = "GET", value_name = "METHOD")]
    pub method: String,
    /// Request body size (e.g. 0, 1KiB, 1MiB): that many zero bytes with each request.
    #[arg(long, default_value = "0", value_parser = parse_size, value_name = "SIZE")]
    pub body_size: u64,
    /// Give up on one attempt (connect, handshake and response) after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Print the report as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// The server's Prometheus endpoint (http://HOST:PORT/metrics): scraped before and after,
    /// the server's own handshake counts are reported as deltas.
    #[arg(long, value_name = "URL")]
    pub metrics: Option<String>,
    /// The server's process id (same machine): its CPU time from /proc before and after gives
    /// server CPU per handshake and per request, user and system apart.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Handshake,
    Requests,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Handshake => "handshake",
            Mode::Requests => "requests",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Alpn {
    #[value(name = "h2")]
    H2,
    #[value(name = "http/1.1")]
    Http11,
}

impl Alpn {
    pub fn wire(self) -> &'static [u8] {
        match self {
            Alpn::H2 => b"h2",
            Alpn::Http11 => b"http/1.1",
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum Verify {
    /// Against the CAs in this PEM file.
    CaFile(PathBuf),
    /// Against the system's CA bundle.
    System,
    /// Not at all (the handshake signature still is).
    Insecure,
}

/// The target, split once.
#[derive(Debug, Clone)]
pub struct Target {
    /// As given.
    pub url: String,
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// `host[:port]` for the Host header and HTTP/2 `:authority`.
    pub authority: http::uri::Authority,
    pub path: http::uri::PathAndQuery,
}

/// Validated options: nothing past here sees an unchecked value.
#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    pub mode: Mode,
    pub connections: usize,
    pub streams: usize,
    /// Stop after this many attempts…
    pub requests: Option<u64>,
    /// …or after this long, whichever comes first (at least one is set).
    pub duration: Option<Duration>,
    pub rate: Option<f64>,
    pub threads: usize,
    pub groups: Vec<Group>,
    pub alpn: Option<Alpn>,
    pub server_name: ServerName<'static>,
    pub verify: Verify,
    pub method: http::Method,
    pub body_size: usize,
    pub timeout: Duration,
    pub json: bool,
    pub metrics: Option<http::Uri>,
    pub server_pid: Option<u32>,
}

/// A command line that cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// The URL does not parse.
    #[error("invalid URL {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The URL parses but cannot be a target (wrong scheme, no host).
    #[error("invalid URL {url:?}: {reason}")]
    Target { url: String, reason: &'static str },
    /// `--sni` is not a valid DNS name or IP address.
    #[error("invalid server name {name:?}: {source}")]
    ServerName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// `--method` is not an HTTP method.
    #[error("invalid HTTP method {method:?}: {source}")]
    Method {
        method: String,
        #[source]
        source: http::method::InvalidMethod,
    },
    /// A numeric flag is out of range.
    #[error("{flag}: {reason}")]
    Range {
        flag: &'static str,
        reason: &'static str,
    },
}

fn range(flag: &'static str, reason: &'static str) -> OptionsError {
    OptionsError::Range { flag, reason }
}

impl Options {
    pub fn from_args(a: Args) -> Result<Options, OptionsError> {
        let target = parse_target(&a.url)?;
        if a.connections == 0 {
            return Err(range("--connections", "must be at least 1"));
        }
        if a.connections > MAX_CONNECTIONS {
            return Err(range("--connections", "at most 100000"));
        }
        if a.streams == 0 {
            return Err(range("--streams", "must be at least 1"));
        }
        if a.streams > MAX_STREAMS {
            return Err(range("--streams", "at most 1000"));
        }
        if a.streams > 1 && a.mode == Mode::Handshake {
            return Err(range(
                "--streams",
                "handshake mode sends one request per connection; use --mode requests",
            ));
        }
        if a.streams > 1 && a.alpn == Some(Alpn::Http11) {
            return Err(range(
                "--streams",
                "HTTP/1.1 has one request in flight per connection; use --alpn h2",
            ));
        }
        if a.requests == Some(0) {
            return Err(range("--requests", "must be at least 1"));
        }
        if a.duration.is_some_and(|d| d.is_zero()) {
            return Err(range("--duration", "must be more than 0"));
        }
        if a.duration.is_some_and(|d| d > MAX_DURATION) {
            return Err(range("--duration", "at most 366 days"));
        }
        if let Some(r) = a.rate
            && !(r.is_finite() && r > 0.0)
        {
            return Err(range("--rate", "must be a positive number per second"));
        }
        if a.rate.is_some_and(|r| r < MIN_RATE) {
            return Err(range(
                "--rate",
                "at least 0.001 per second (one request every 1000 s)",
            ));
        }
        if a.threads == Some(0) {
            return Err(range("--threads", "must be at least 1"));
        }
        if a.threads.is_some_and(|t| t > MAX_THREADS) {
            return Err(range("--threads", "at most 1024"));
        }
        if a.timeout.is_zero() {
            return Err(range("--timeout", "must be more than 0"));
        }
        if a.timeout > MAX_TIMEOUT {
            return Err(range("--timeout", "at most 24 hours"));
        }
        if a.body_size > MAX_BODY {
            return Err(range("--body-size", "at most 1 GiB"));
        }
        let server_name = match &a.sni {
            Some(name) => name.as_str(),
            None => target.host.as_str(),
        };
        let server_name = ServerName::try_from(server_name.to_string()).map_err(|source| {
            OptionsError::ServerName {
                name: server_name.to_string(),
                source,
            }
        })?;
        let method = http::Method::from_bytes(a.method.as_bytes()).map_err(|source| {
            OptionsError::Method {
                method: a.method.clone(),
                source,
            }
        })?;
        let metrics = a.metrics.as_deref().map(parse_metrics_url).transpose()?;
        let duration = match (a.duration, a.requests) {
            (None, None) => Some(DEFAULT_DURATION),
            (d, _) => d,
        };
        let threads = a.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(MAX_THREADS)
        });
        let verify = match (a.ca, a.insecure) {
            (_, true) => Verify::Insecure,
            (Some(path), false) => Verify::CaFile(path),
            (None, false) => Verify::System,
        };
        Ok(Options {
            target,
            mode: a.mode,
            connections: a.connections,
            streams: a.streams,
            requests: a.requests,
            duration,
            rate: a.rate,
            threads,
            groups: a.group.map_or_else(|| Group::DEFAULT.to_vec(), |g| vec![g]),
            alpn: a.alpn,
            server_name,
            verify,
            method,
            // Checked against MAX_BODY above, so it fits.
            body_size: usize::try_from(a.body_size).unwrap_or(usize::MAX),
            timeout: a.timeout,
            json: a.json,
            metrics,
            server_pid: a.server_pid,
        })
    }

    /// ALPN protocols offered, in preference order.
    pub fn alpn_offered(&self) -> Vec<&'static [u8]> {
        match self.alpn {
            Some(one) => vec![one.wire()],
            None => vec![Alpn::H2.wire(), Alpn::Http11.wire()],
        }
    }
}

fn parse_target(url: &str) -> Result<Target, OptionsError> {
    let bad = |reason| OptionsError::Target {
        url: url.to_string(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|source| OptionsError::Url {
        url: url.to_string(),
        source,
    })?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(_) => return Err(bad("loadgen speaks TLS only: use https://")),
        None => return Err(bad("expected https://HOST[:PORT][/PATH]")),
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
    if authority.as_str().contains('@') {
        return Err(bad("user information in the URL is not supported"));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_string();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    Ok(Target {
        url: url.to_string(),
        host,
        port: authority.port_u16().unwrap_or(443),
        authority,
        path,
    })
}

fn parse_metrics_url(url: &str) -> Result<http::Uri, OptionsError> {
    let uri: http::Uri = url.parse().map_err(|source| OptionsError::Url {
        url: url.to_string(),
        source,
    })?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(OptionsError::Target {
            url: url.to_string(),
            reason: "--metrics takes a plain http://HOST:PORT/PATH URL",
        });
    }
    Ok(uri)
}

fn parse_group(s: &str) -> Result<Group, String> {
    Group::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Group::ALL.iter().map(|g| g.name()).collect();
        format!("unknown group (expected one of {})", names.join(", "))
    })
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{e} (e.g. 0, 512, 1KiB, 1MiB)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn options(argv: &[&str]) -> Result<Options, OptionsError> {
        let cli = Cli::try_parse_from(std::iter::once("loadgen").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"));
        Options::from_args(cli.args)
    }

    #[test]
    fn defaults_and_url_parts() {
        let o = options(&["https://localhost:8443/x?y=1"]).unwrap();
        assert_eq!(o.target.host, "localhost");
        assert_eq!(o.target.port, 8443);
        assert_eq!(o.target.authority.as_str(), "localhost:8443");
        assert_eq!(o.target.path.as_str(), "/x?y=1");
        assert_eq!(o.duration, Some(DEFAULT_DURATION));
        assert_eq!(o.requests, None);
        assert_eq!(o.groups, Group::DEFAULT.to_vec());
        assert_eq!(o.alpn_offered(), vec![&b"h2"[..], &b"http/1.1"[..]]);
        assert!(matches!(o.verify, Verify::System));

        let o = options(&[
            "https://[::1]",
            "-n",
            "5",
            "--group",
            "x25519mlkem768",
            "-k",
        ])
        .unwrap();
        assert_eq!(o.target.host, "::1");
        assert_eq!(o.target.port, 443);
        assert_eq!(o.target.path.as_str(), "/");
        assert_eq!((o.requests, o.duration), (Some(5), None));
        assert_eq!(o.groups, vec![Group::X25519Mlkem768]);
        assert!(matches!(o.server_name, ServerName::IpAddress(_)));
        assert!(matches!(o.verify, Verify::Insecure));

        let o = options(&["https://h/", "--body-size", "1KiB", "--alpn", "http/1.1"]).unwrap();
        assert_eq!(o.body_size, 1024);
        assert_eq!(o.alpn_offered(), vec![&b"http/1.1"[..]]);
    }

    #[test]
    fn refuses_what_cannot_run() {
        for argv in [
            &["http://localhost/"][..],
            &["localhost:8443"],
            &["https://localhost/", "-c", "0"],
            &["https://localhost/", "--streams", "4"],
            &[
                "https://localhost/",
                "--mode",
                "requests",
                "--streams",
                "4",
                "--alpn",
                "http/1.1",
            ],
            &["https://localhost/", "--rate", "0"],
            &["https://localhost/", "--rate", "NaN"],
            &["https://localhost/", "--method", "BAD METHOD"],
            &[
                "https://localhost/",
                "--metrics",
                "https://localhost:9844/metrics",
            ],
            &["https://localhost/", "--sni", "not a name"],
        ] {
            assert!(options(argv).is_err(), "{argv:?} accepted");
        }
    }

    /// Values past these bounds overflowed a deadline (`Instant + Duration`) or spawned an
    /// unbounded number of threads: each is refused, naming the flag.
    #[test]
    fn refuses_values_past_their_bounds_naming_the_flag() {
        for (flag, value) in [
            ("--timeout", "500000000000years"),
            ("--timeout", "25h"),
            ("-d", "500000000000years"),
            ("-d", "367days"),
            ("--rate", "1e-300"),
            ("--rate", "0.0009"),
            ("--threads", "100000000"),
            ("--connections", "100001"),
            ("--streams", "1001"),
        ] {
            let e = options(&["https://localhost/", flag, value])
                .expect_err(&format!("{flag} {value} accepted"))
                .to_string();
            let long = if flag == "-d" { "--duration" } else { flag };
            assert!(e.starts_with(long), "{flag} {value}: {e}");
        }
        for (flag, value) in [
            ("--timeout", "24h"),
            ("-d", "366days"),
            ("--rate", "0.001"),
            ("--threads", "1024"),
            ("--connections", "100000"),
        ] {
            assert!(
                options(&["https://localhost/", flag, value]).is_ok(),
                "{flag} {value} refused"
            );
        }
    }
}
