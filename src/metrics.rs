//! Metrics: a side channel fed by every stage (listener, TLS accept, HTTP, upstream) and read
//! only by `admin`. One `Registry` per process, no global statics. Label handles are resolved
//! once per listener / upstream (`ListenerMetrics`, `UpstreamMetrics`), never per request.
//! This module imports nothing downstream of `config`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Handshake failure reasons: a small closed set, used as the `reason` label and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The client did not offer TLS 1.3 (a TLS 1.2-only or older client). Alert: protocol_version.
    ProtocolVersion,
    /// No ECDHE group in common (e.g. an FFDHE-only client). Alert: handshake_failure.
    NoSharedGroup,
    /// No TLS 1.3 AEAD cipher suite in common. Alert: handshake_failure.
    NoSharedCipher,
    /// No signature scheme in common with any certificate for the name.
    NoSharedSignatureScheme,
    /// The client offered ALPN protocols, none of them h2 or http/1.1. Alert: no_application_protocol.
    NoApplicationProtocol,
    /// `strict_sni: true` and the client's SNI name (or its absence) matches no certificate.
    UnknownSni,
    /// The handshake did not finish within `handshake_timeout`.
    Timeout,
    /// The client closed the connection before the handshake finished.
    ClientClosed,
    /// The client sent a fatal alert (often: it does not trust our certificate).
    AlertReceived,
    /// The bytes were not a valid TLS handshake (plain HTTP, a scanner, garbage).
    Malformed,
    /// `tls.client_auth` with `required: true` and the client sent no certificate.
    ClientCertMissing,
    /// The client's certificate did not verify against `tls.client_auth.ca` (unknown issuer,
    /// expired, wrong usage, bad signature).
    ClientCertInvalid,
    /// `tls.max_concurrent_handshakes` handshakes were already in progress: the connection
    /// was closed at once, before reading its ClientHello.
    HandshakeLimit,
    /// `proxy_protocol: true`: a trusted proxy's connection did not start with a valid
    /// PROXY header (or it did not arrive within `handshake_timeout`).
    ProxyProtocol,
    /// The listener already held `max_connections` connections: the new one was closed at
    /// once, before reading its ClientHello.
    ConnectionLimit,
    /// The client address was over `tls.handshake_rate_per_ip`: closed at once, before
    /// reading its ClientHello.
    RateLimited,
    /// A socket error during the handshake.
    Io,
    /// Anything else rustls refused; the log line carries the detail.
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 18] = [
        HandshakeFailure::ProtocolVersion,
        HandshakeFailure::NoSharedGroup,
        HandshakeFailure::NoSharedCipher,
        HandshakeFailure::NoSharedSignatureScheme,
        HandshakeFailure::NoApplicationProtocol,
        HandshakeFailure::UnknownSni,
        HandshakeFailure::Timeout,
        HandshakeFailure::ClientClosed,
        HandshakeFailure::AlertReceived,
        HandshakeFailure::Malformed,
        HandshakeFailure::ClientCertMissing,
        HandshakeFailure::ClientCertInvalid,
        HandshakeFailure::HandshakeLimit,
        HandshakeFailure::ProxyProtocol,
        HandshakeFailure::ConnectionLimit,
        HandshakeFailure::RateLimited,
        HandshakeFailure::Io,
        HandshakeFailure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::NoSharedGroup => "no_shared_group",
            HandshakeFailure::NoSharedCipher => "no_shared_cipher",
            HandshakeFailure::NoSharedSignatureScheme => "no_shared_signature_scheme",
            HandshakeFailure::NoApplicationProtocol => "no_application_protocol",
            HandshakeFailure::UnknownSni => "unknown_sni",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ClientClosed => "client_closed",
            HandshakeFailure::AlertReceived => "alert_received",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::ClientCertMissing => "client_cert_missing",
            HandshakeFailure::ClientCertInvalid => "client_cert_invalid",
            HandshakeFailure::HandshakeLimit => "handshake_limit",
            HandshakeFailure::ProxyProtocol => "proxy_protocol",
            HandshakeFailure::ConnectionLimit => "connection_limit",
            HandshakeFailure::RateLimited => "rate_limited",
            HandshakeFailure::Io => "io_error",
            HandshakeFailure::Other => "other",
        }
    }
}

/// Upstream error kinds, the `kind` label of `ephemera_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// A server refused or failed the TCP connection (the next server is tried).
    Connect,
    /// Opening a connection took longer than `connect_timeout` (TCP connect, backend TLS
    /// handshake, or an HTTP/2 backend's first SETTINGS).
    ConnectTimeout,
    /// No response headers within `response_timeout` (answered 504).
    ResponseTimeout,
    /// The request or response failed after the connection was made (reset, malformed response).
    Protocol,
    /// The TLS handshake with an `h2` backend failed (certificate not verified, no common
    /// version, the backend did not choose ALPN h2).
    Tls,
    /// The response body failed after its head had gone to the client (reset, connection
    /// closed early, malformed chunk, shorter than its Content-Length): the client saw it cut off.
    Truncated,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 6] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::ResponseTimeout,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::Tls,
        UpstreamErrorKind::Truncated,
    ];
    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::ResponseTimeout => "response_timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::Truncated => "truncated",
        }
    }
}

/// Why an established TLS connection ended: the `reason` label of
/// `ephemera_tls_connections_closed_total`. Each established connection is counted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client closed it (or, in TCP mode, both ends finished), with nothing pending.
    Completed,
    /// No request (HTTP) or no bytes either way (TCP mode) for the idle timeout.
    IdleTimeout,
    /// HTTP/1.1 request headers did not arrive within `header_timeout`.
    HeaderTimeout,
    /// The client stopped reading a response or sending a request body for `idle_timeout`.
    Stalled,
    /// `tls.max_connection_age` passed: closed gracefully so the client reconnects with a
    /// fresh handshake.
    MaxAge,
    /// The proxy was shutting down (drain).
    Shutdown,
    /// We ended it for a protocol violation (an HTTP/2 GOAWAY with an error code: flood
    /// protections, malformed frames).
    ProtocolError,
    /// The client reset or dropped the connection (TCP RST, a broken pipe, end of stream
    /// without close_notify), typically once it had what it wanted.
    ClientReset,
    /// A TLS or socket error other than the client going away (a bad record, a failed key
    /// update).
    Error,
    /// TCP mode: no backend connection could be made.
    UpstreamUnavailable,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Completed,
        CloseReason::IdleTimeout,
        CloseReason::HeaderTimeout,
        CloseReason::Stalled,
        CloseReason::MaxAge,
        CloseReason::Shutdown,
        CloseReason::ProtocolError,
        CloseReason::ClientReset,
        CloseReason::Error,
        CloseReason::UpstreamUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Completed => "completed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::Stalled => "stalled",
            CloseReason::MaxAge => "max_age",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::ClientReset => "client_reset",
            CloseReason::Error => "error",
            CloseReason::UpstreamUnavailable => "upstream_unavailable",
        }
    }
}

/// Why a request went to another backend attempt: the `reason` label of
/// `ephemera_upstream_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The connection to a server failed; nothing was sent (any method).
    Connect,
    /// The backend refused the stream or closed the connection before answering, with
    /// nothing of the request body sent: an idempotent request is tried once more.
    Unanswered,
}

/// HTTP/2 error codes a GOAWAY can carry (RFC 9113 §7), as the `reason` label of
/// `ephemera_h2_goaways_sent_total`, plus `shutdown`, `idle` and `max_age` for our graceful
/// closes.
pub const GOAWAY_REASONS: [&str; 17] = [
    "no_error",
    "protocol_error",
    "internal_error",
    "flow_control_error",
    "settings_timeout",
    "stream_closed",
    "frame_size_error",
    "refused_stream",
    "cancel",
    "compression_error",
    "connect_error",
    "enhance_your_calm",
    "inadequate_security",
    "http_1_1_required",
    "shutdown",
    "idle",
    "max_age",
];

/// The TLS 1.3 suites as labelled in `ephemera_tls_handshakes_total{cipher_suite}`.
pub const HANDSHAKE_SUITES: [&str; 3] = [
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
];

/// HTTP versions as labelled in `ephemera_http_requests_total{version}`.
pub const HTTP_VERSIONS: [&str; 3] = ["HTTP/1.0", "HTTP/1.1", "HTTP/2"];

/// All metric families, registered on one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    handshakes: IntCounterVec,
    handshake_failures: IntCounterVec,
    handshake_duration: HistogramVec,
    hello_retry_requests: IntCounterVec,
    resumed: IntCounterVec,
    policy_info: IntGaugeVec,
    connections_open: IntGaugeVec,
    connections_accepted: IntCounterVec,
    connections_closed: IntCounterVec,
    http_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    upstream_connections_open: IntGaugeVec,
    upstream_ejections: IntCounterVec,
    upstream_retries: IntCounterVec,
    h2_streams_open: IntGaugeVec,
    http1_parked: IntGaugeVec,
    h2_streams: IntCounterVec,
    h2_goaways: IntCounterVec,
    config_reloads: IntCounterVec,
    certificate_expiry: IntGaugeVec,
    keylog_enabled: IntGauge,
    key_updates: IntCounterVec,
    key_update_failures: IntCounterVec,
    key_updates_deferred: IntCounterVec,
    connection_key_updates: HistogramVec,
    connection_duration: HistogramVec,
    connection_bytes: HistogramVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(v.clone()))
        .expect("metric registered once");
    v
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(v.clone()))
        .expect("metric registered once");
    v
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let v = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition");
    r.register(Box::new(v.clone()))
        .expect("metric registered once");
    v
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector registered once");
        let m = Metrics {
            handshakes: counter_vec(
                &r,
                "ephemera_tls_handshakes_total",
                "Successful TLS handshakes by negotiated group, cipher suite and ALPN protocol.",
                &["listener", "group", "cipher_suite", "alpn"],
            ),
            handshake_failures: counter_vec(
                &r,
                "ephemera_tls_handshake_failures_total",
                "Failed TLS handshakes by reason (a closed set; see README).",
                &["listener", "reason"],
            ),
            handshake_duration: histogram_vec(
                &r,
                "ephemera_tls_handshake_duration_seconds",
                "Time from accepting the TCP connection to a completed TLS handshake.",
                &["listener"],
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ],
            ),
            hello_retry_requests: counter_vec(
                &r,
                "ephemera_tls_hello_retry_requests_total",
                "Handshakes that needed a HelloRetryRequest (the client's key share was for a group we do not prefer or allow).",
                &["listener"],
            ),
            resumed: counter_vec(
                &r,
                "ephemera_tls_resumed_handshakes_total",
                "Resumed handshakes. Resumption is off, so this stays 0: it proves the policy.",
                &["listener"],
            ),
            policy_info: gauge_vec(
                &r,
                "ephemera_tls_policy_info",
                "The TLS policy of each listener (value 1).",
                &["listener", "versions", "groups", "resumption"],
            ),
            connections_open: gauge_vec(
                &r,
                "ephemera_connections_open",
                "Client connections currently open (handshaking or established).",
                &["listener"],
            ),
            connections_accepted: counter_vec(
                &r,
                "ephemera_connections_accepted_total",
                "Client TCP connections accepted (each then succeeds or fails its handshake).",
                &["listener"],
            ),
            connections_closed: counter_vec(
                &r,
                "ephemera_tls_connections_closed_total",
                "Established TLS connections closed, by reason (a closed set; see README).",
                &["listener", "reason"],
            ),
            http_requests: counter_vec(
                &r,
                "ephemera_http_requests_total",
                "HTTP requests answered, by HTTP version and status class.",
                &["listener", "version", "status_class"],
            ),
            upstream_duration: histogram_vec(
                &r,
                "ephemera_upstream_request_duration_seconds",
                "Time from sending a request to a backend to receiving its response headers.",
                &["upstream"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ],
            ),
            upstream_errors: counter_vec(
                &r,
                "ephemera_upstream_errors_total",
                "Backend errors by kind (connect, connect_timeout, response_timeout, protocol).",
                &["upstream", "kind"],
            ),
            upstream_connections_open: gauge_vec(
                &r,
                "ephemera_upstream_connections_open",
                "Backend connections currently open, by upstream and protocol (http1, h2c, h2).",
                &["upstream", "protocol"],
            ),
            upstream_ejections: counter_vec(
                &r,
                "ephemera_upstream_ejections_total",
                "Servers taken out of rotation for a cool-down after consecutive connect failures.",
                &["upstream"],
            ),
            upstream_retries: counter_vec(
                &r,
                "ephemera_upstream_retries_total",
                "Requests sent to another server after a failed attempt (connect: nothing sent; unanswered: an idempotent request the backend did not answer).",
                &["upstream", "reason"],
            ),
            h2_streams_open: gauge_vec(
                &r,
                "ephemera_h2_streams_open",
                "HTTP/2 client streams (requests) currently open.",
                &["listener"],
            ),
            http1_parked: gauge_vec(
                &r,
                "ephemera_http1_connections_parked",
                "HTTP/1.1 client connections idle for 250 ms and parked (HTTP state freed until the next request).",
                &["listener"],
            ),
            h2_streams: counter_vec(
                &r,
                "ephemera_h2_streams_total",
                "HTTP/2 client streams (requests) received.",
                &["listener"],
            ),
            config_reloads: counter_vec(
                &r,
                "ephemera_config_reloads_total",
                "Config reloads (SIGHUP or POST /reload) by result: ok, or error (the previous config kept serving).",
                &["result"],
            ),
            keylog_enabled: {
                let g = IntGauge::new(
                    "ephemera_tls_keylog_enabled",
                    "1 while --keylog writes TLS secrets to a file (a debugging flag that defeats forward secrecy).",
                )
                .expect("valid metric definition");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            certificate_expiry: gauge_vec(
                &r,
                "ephemera_tls_certificate_expiry_timestamp_seconds",
                "notAfter of each configured certificate (Unix time), by listener and the certificate's first DNS name.",
                &["listener", "certificate"],
            ),
            h2_goaways: counter_vec(
                &r,
                "ephemera_h2_goaways_sent_total",
                "GOAWAY frames sent to HTTP/2 clients, by error code (lower-case RFC 9113 name) or our reason (shutdown, idle).",
                &["listener", "reason"],
            ),
            key_updates: counter_vec(
                &r,
                "ephemera_tls_key_updates_total",
                "TLS 1.3 KeyUpdates forced by policy, by trigger (bytes or age).",
                &["listener", "trigger"],
            ),
            key_update_failures: counter_vec(
                &r,
                "ephemera_tls_key_update_failures_total",
                "Forced KeyUpdates that rustls refused.",
                &["listener"],
            ),
            key_updates_deferred: counter_vec(
                &r,
                "ephemera_tls_key_updates_deferred_total",
                "Forced KeyUpdates deferred because 31 were already unanswered by application data in one direction (peers abort at 33).",
                &["listener"],
            ),
            connection_key_updates: histogram_vec(
                &r,
                "ephemera_tls_connection_key_updates",
                "Forced KeyUpdates per closed TLS connection.",
                &["listener"],
                vec![
                    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
                ],
            ),
            connection_duration: histogram_vec(
                &r,
                "ephemera_tls_connection_duration_seconds",
                "Lifetime of established TLS connections, from accept to close.",
                &["listener"],
                vec![
                    0.01,
                    0.1,
                    1.0,
                    10.0,
                    60.0,
                    300.0,
                    900.0,
                    3600.0,
                    4.0 * 3600.0,
                    24.0 * 3600.0,
                ],
            ),
            connection_bytes: histogram_vec(
                &r,
                "ephemera_tls_connection_bytes",
                "Application data per closed TLS connection, both directions.",
                &["listener"],
                (0..14).map(|k| 1024.0 * 4f64.powi(k)).collect(),
            ),
            registry: r,
        };
        // Both results exist from the start, so an alert on errors sees a 0, not nothing.
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }

    /// The registry in Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Resolve every per-listener handle once. `groups` is the listener's policy.
    pub fn listener(&self, listener: &str, groups: &[&'static str]) -> ListenerMetrics {
        let failures = HandshakeFailure::ALL
            .iter()
            .map(|r| {
                (
                    *r,
                    self.handshake_failures
                        .with_label_values(&[listener, r.label()]),
                )
            })
            .collect();
        // Every combination of the listener's groups, the three suites and the ALPN outcomes,
        // resolved now: the handshake path then only reads an immutable map.
        let mut handshakes = HashMap::new();
        for g in groups {
            for suite in HANDSHAKE_SUITES {
                for alpn in ["h2", "http/1.1", "none"] {
                    handshakes.insert(
                        (*g, suite, alpn),
                        self.handshakes
                            .with_label_values(&[listener, g, suite, alpn]),
                    );
                }
            }
        }
        let mut http_requests = HashMap::new();
        for v in HTTP_VERSIONS {
            for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
                http_requests.insert(
                    (v, class),
                    self.http_requests.with_label_values(&[listener, v, class]),
                );
            }
        }
        let rekey = RekeyMetrics {
            by_bytes: self.key_updates.with_label_values(&[listener, "bytes"]),
            by_age: self.key_updates.with_label_values(&[listener, "age"]),
            failures: self.key_update_failures.with_label_values(&[listener]),
            deferred: self.key_updates_deferred.with_label_values(&[listener]),
            per_connection: self.connection_key_updates.with_label_values(&[listener]),
            duration: self.connection_duration.with_label_values(&[listener]),
            bytes: self.connection_bytes.with_label_values(&[listener]),
        };
        ListenerMetrics {
            inner: Arc::new(ListenerInner {
                rekey,
                name: Arc::from(listener),
                handshakes_vec: self.handshakes.clone(),
                handshakes,
                failures,
                duration: self.handshake_duration.with_label_values(&[listener]),
                hello_retry_requests: self.hello_retry_requests.with_label_values(&[listener]),
                resumed: self.resumed.with_label_values(&[listener]),
                connections_open: self.connections_open.with_label_values(&[listener]),
                connections_accepted: self.connections_accepted.with_label_values(&[listener]),
                closed: CloseReason::ALL
                    .iter()
                    .map(|r| {
                        (
                            *r,
                            self.connections_closed
                                .with_label_values(&[listener, r.label()]),
                        )
                    })
                    .collect(),
                http_requests,
                h2_streams_open: self.h2_streams_open.with_label_values(&[listener]),
                http1_parked: self.http1_parked.with_label_values(&[listener]),
                h2_streams: self.h2_streams.with_label_values(&[listener]),
                h2_goaways: GOAWAY_REASONS
                    .iter()
                    .map(|r| self.h2_goaways.with_label_values(&[listener, r]))
                    .collect(),
            }),
        }
    }

    /// `ephemera_tls_policy_info` for the listeners now serving, `(listener, groups)`; the
    /// series of policies no longer in force (`old`, as returned last time) are removed.
    /// Called once a config is in force, never for one still being checked.
    pub fn policies_in_force(
        &self,
        old: &[(String, String)],
        now: &[(String, String)],
    ) -> Vec<(String, String)> {
        for (l, g) in old {
            if !now.contains(&(l.clone(), g.clone())) {
                let _ = self
                    .policy_info
                    .remove_label_values(&[l, "TLSv1.3", g, "off"]);
            }
        }
        for (l, g) in now {
            self.policy_info
                .with_label_values(&[l, "TLSv1.3", g, "off"])
                .set(1);
        }
        now.to_vec()
    }

    pub fn keylog_enabled(&self) {
        self.keylog_enabled.set(1);
    }

    /// A reload finished: `ok` or not.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Set the expiry of each `(listener, certificate, not_after)` now configured and drop
    /// the series of certificates no longer configured (`old`, as returned last time).
    pub fn certificates_changed(
        &self,
        old: &[(String, String)],
        now: &[(String, String, i64)],
    ) -> Vec<(String, String)> {
        let current: Vec<(String, String)> =
            now.iter().map(|(l, c, _)| (l.clone(), c.clone())).collect();
        for (l, c) in old {
            if !current.contains(&(l.clone(), c.clone())) {
                let _ = self.certificate_expiry.remove_label_values(&[l, c]);
            }
        }
        for (l, c, t) in now {
            self.certificate_expiry.with_label_values(&[l, c]).set(*t);
        }
        current
    }

    /// Resolve every per-upstream handle once. `protocol` is the upstream's protocol name.
    pub fn upstream(&self, upstream: &str, protocol: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            connections_open: self
                .upstream_connections_open
                .with_label_values(&[upstream, protocol]),
            ejections: self.upstream_ejections.with_label_values(&[upstream]),
            retries_connect: self
                .upstream_retries
                .with_label_values(&[upstream, "connect"]),
            retries_unanswered: self
                .upstream_retries
                .with_label_values(&[upstream, "unanswered"]),
            duration: self.upstream_duration.with_label_values(&[upstream]),
            errors: Arc::new(
                UpstreamErrorKind::ALL
                    .iter()
                    .map(|k| {
                        self.upstream_errors
                            .with_label_values(&[upstream, k.label()])
                    })
                    .collect(),
            ),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Handles for one listener, cheap to clone into each connection.
#[derive(Clone)]
pub struct ListenerMetrics {
    inner: Arc<ListenerInner>,
}

struct ListenerInner {
    name: Arc<str>,
    rekey: RekeyMetrics,
    handshakes_vec: IntCounterVec,
    // Keyed by (group, suite, alpn), all from closed sets: at most 4 x 3 x 3 entries.
    handshakes: HashMap<(&'static str, &'static str, &'static str), IntCounter>,
    failures: HashMap<HandshakeFailure, IntCounter>,
    duration: Histogram,
    hello_retry_requests: IntCounter,
    resumed: IntCounter,
    connections_open: IntGauge,
    connections_accepted: IntCounter,
    closed: HashMap<CloseReason, IntCounter>,
    http_requests: HashMap<(&'static str, &'static str), IntCounter>,
    h2_streams_open: IntGauge,
    h2_streams: IntCounter,
    http1_parked: IntGauge,
    /// Indexed like `GOAWAY_REASONS`.
    h2_goaways: Vec<IntCounter>,
}

impl ListenerMetrics {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The name, shared (per-request records keep it without copying).
    pub fn shared_name(&self) -> Arc<str> {
        self.inner.name.clone()
    }

    pub fn handshake_ok(
        &self,
        group: &'static str,
        suite: &'static str,
        alpn: &'static str,
        seconds: f64,
    ) {
        match self.inner.handshakes.get(&(group, suite, alpn)) {
            Some(c) => c.inc(),
            // Not reachable with the policy's groups and suites; counted all the same.
            None => self
                .inner
                .handshakes_vec
                .with_label_values(&[&self.inner.name, group, suite, alpn])
                .inc(),
        }
        self.inner.duration.observe(seconds);
    }

    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        if let Some(c) = self.inner.failures.get(&reason) {
            c.inc();
        }
    }

    pub fn rekey(&self) -> &RekeyMetrics {
        &self.inner.rekey
    }

    pub fn hello_retry_request(&self) {
        self.inner.hello_retry_requests.inc();
    }

    pub fn resumed(&self) {
        self.inner.resumed.inc();
    }

    /// Counts the connection as accepted, and as open until the guard is dropped.
    pub fn connection_opened(&self) -> GaugeGuard {
        self.inner.connections_accepted.inc();
        self.inner.connections_open.inc();
        GaugeGuard(self.inner.connections_open.clone())
    }

    /// An established TLS connection ended.
    pub fn connection_closed(&self, reason: CloseReason) {
        if let Some(c) = self.inner.closed.get(&reason) {
            c.inc();
        }
    }

    /// `version` is one of `HTTP_VERSIONS`.
    pub fn http_request(&self, version: &'static str, status: u16) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        if let Some(c) = self.inner.http_requests.get(&(version, class)) {
            c.inc();
        }
    }
}

impl ListenerMetrics {
    /// An HTTP/2 request stream: counted, and open until the guard is dropped.
    pub fn h2_stream(&self) -> GaugeGuard {
        self.inner.h2_streams.inc();
        self.inner.h2_streams_open.inc();
        GaugeGuard(self.inner.h2_streams_open.clone())
    }

    /// An idle HTTP/1.1 connection parked until the guard is dropped.
    pub fn http1_parked(&self) -> GaugeGuard {
        self.inner.http1_parked.inc();
        GaugeGuard(self.inner.http1_parked.clone())
    }

    /// `reason` is one of `GOAWAY_REASONS`; anything else is not counted.
    pub fn goaway_sent(&self, reason: &str) {
        if let Some(i) = GOAWAY_REASONS.iter().position(|r| *r == reason) {
            self.inner.h2_goaways[i].inc();
        }
    }
}

/// Decrements a gauge when dropped.
pub struct GaugeGuard(IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Handles for forced key updates and per-connection figures of one listener.
#[derive(Clone)]
pub struct RekeyMetrics {
    pub by_bytes: IntCounter,
    pub by_age: IntCounter,
    pub failures: IntCounter,
    pub deferred: IntCounter,
    pub per_connection: Histogram,
    pub duration: Histogram,
    pub bytes: Histogram,
}

/// Handles for one upstream.
#[derive(Clone)]
pub struct UpstreamMetrics {
    connections_open: IntGauge,
    ejections: IntCounter,
    retries_connect: IntCounter,
    retries_unanswered: IntCounter,
    duration: Histogram,
    errors: Arc<Vec<IntCounter>>,
}

impl UpstreamMetrics {
    /// A backend connection: open until the guard is dropped.
    pub fn connection_opened(&self) -> GaugeGuard {
        self.connections_open.inc();
        GaugeGuard(self.connections_open.clone())
    }

    pub fn ejected(&self) {
        self.ejections.inc();
    }

    pub fn retry(&self, reason: RetryReason) {
        match reason {
            RetryReason::Connect => self.retries_connect.inc(),
            RetryReason::Unanswered => self.retries_unanswered.inc(),
        }
    }

    pub fn observe(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    pub fn error(&self, kind: UpstreamErrorKind) {
        if let Some(i) = UpstreamErrorKind::ALL.iter().position(|k| *k == kind) {
            self.errors[i].inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_with_labels() {
        let m = Metrics::new();
        let l = m.listener("public", &["x25519", "secp256r1"]);
        m.policies_in_force(&[], &[("public".into(), "x25519,secp256r1".into())]);
        l.handshake_ok("x25519", "TLS13_AES_128_GCM_SHA256", "h2", 0.001);
        l.handshake_ok("x25519", "TLS13_AES_128_GCM_SHA256", "h2", 0.001);
        l.handshake_failed(HandshakeFailure::ProtocolVersion);
        let text = m.encode();
        assert!(text.contains(r#"ephemera_tls_handshakes_total{alpn="h2",cipher_suite="TLS13_AES_128_GCM_SHA256",group="x25519",listener="public"} 2"#), "{text}");
        assert!(text.contains(r#"ephemera_tls_handshake_failures_total{listener="public",reason="protocol_version"} 1"#));
        assert!(text.contains(r#"ephemera_tls_policy_info{groups="x25519,secp256r1",listener="public",resumption="off",versions="TLSv1.3"} 1"#));
        assert!(text.contains(r#"ephemera_tls_resumed_handshakes_total{listener="public"} 0"#));
    }
}
