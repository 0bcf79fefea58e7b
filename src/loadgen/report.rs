//! loadgen: the final report (stats → **report**). One `Report` value, printed either as
//! text for a person or, with `--json`, serialized whole as one JSON document: the two never
//! disagree because the text is rendered from the same value.

use super::failure::ErrorKind;
use super::metrics_scrape::ServerCounts;
use super::options::{Mode, Options, Verify};
use super::proc_cpu::CpuTimes;
use super::stats::Stats;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub mode: &'static str,
    pub connections: usize,
    pub streams: usize,
    pub threads: usize,
    /// Open-loop arrival rate (per second), if any.
    pub rate: Option<f64>,
    pub offered_groups: Vec<&'static str>,
    pub offered_alpn: Vec<String>,
    /// "ca_file", "system_roots" or "off" (`--insecure`).
    pub certificate_verification: &'static str,
    pub elapsed_s: f64,
    /// Requests attempted: responses plus failures.
    pub attempts: u64,
    /// Completed TLS handshakes.
    pub handshakes: u64,
    pub handshakes_per_s: f64,
    /// Responses received, any status.
    pub requests: u64,
    pub requests_per_s: f64,
    pub response_body_bytes: u64,
    /// Responses by status class ("2xx", …).
    pub status: BTreeMap<&'static str, u64>,
    pub latency_us: Latencies,
    pub errors: Errors,
    pub negotiated: Negotiated,
    /// Handshakes the server resumed (the client never offers a session: must stay 0).
    pub resumed_handshakes: u64,
    pub hello_retry_requests: u64,
    /// TLS 1.3 session tickets the server sent (kept by no one; ephemera sends none).
    pub session_tickets_received: u64,
    pub server_metrics: Option<ServerMetrics>,
    pub server_cpu: Option<ServerCpu>,
    pub client_cpu: Option<ClientCpu>,
}

/// Latency distributions, microseconds. `request` runs from the request's start (its
/// intended start under `--rate`) to the end of the response body; in handshake mode it
/// includes the connect and the handshake.
#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    pub tcp_connect: Summary,
    pub tls_handshake: Summary,
    pub request: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    #[serde(rename = "p99.9")]
    pub p99_9: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Errors {
    pub total: u64,
    /// By kind: connect_refused, connect_timeout, connect_other, tls_handshake, http, timeout.
    pub by_kind: BTreeMap<&'static str, u64>,
    /// TLS handshake failures by sub-kind: bad_certificate, protocol_version, …
    pub tls_handshake: BTreeMap<&'static str, u64>,
    /// The first message seen per kind (sub-kind for TLS).
    pub examples: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Negotiated {
    pub group: BTreeMap<&'static str, u64>,
    pub cipher_suite: BTreeMap<&'static str, u64>,
    pub alpn: BTreeMap<&'static str, u64>,
    pub handshake_kind: BTreeMap<&'static str, u64>,
}

/// Deltas of the server's own counters over the run (`--metrics`).
#[derive(Debug, Clone, Serialize)]
pub struct ServerMetrics {
    pub url: String,
    /// Whether the page had ephemera's handshake families at all.
    pub ephemera_metrics_found: bool,
    pub handshakes: u64,
    pub handshake_failures: u64,
    pub handshake_failures_by_reason: BTreeMap<String, u64>,
    pub resumed_handshakes: u64,
    pub http_requests: u64,
}

/// The server process's CPU over the run (`--server-pid`), microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ServerCpu {
    pub pid: u32,
    pub user_us: u64,
    pub system_us: u64,
    /// CPU time / wall time: 1.0 is one core fully busy.
    pub cores_busy: f64,
    /// Handshake mode only (in requests mode a few handshakes carry many requests).
    pub per_handshake_us: Option<PerUnit>,
    pub per_request_us: Option<PerUnit>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerUnit {
    pub user: f64,
    pub system: f64,
    pub total: f64,
}

/// loadgen's own CPU over the run: near `threads` busy cores means the client was the limit.
#[derive(Debug, Clone, Serialize)]
pub struct ClientCpu {
    pub user_us: u64,
    pub system_us: u64,
    pub cores_busy: f64,
}

/// What the run measured besides `Stats`.
pub struct Extras {
    pub elapsed: Duration,
    pub tickets: u64,
    pub server_metrics: Option<(String, ServerCounts, ServerCounts)>,
    pub server_cpu: Option<(u32, CpuTimes)>,
    pub client_cpu: Option<CpuTimes>,
}

fn summary(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary {
            count: 0,
            min: 0,
            mean: 0.0,
            p50: 0,
            p90: 0,
            p99: 0,
            p99_9: 0,
            max: 0,
        };
    }
    Summary {
        count: h.len(),
        min: h.min(),
        mean: (h.mean() * 10.0).round() / 10.0,
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p99_9: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn per_unit(cpu: CpuTimes, n: u64) -> Option<PerUnit> {
    (n > 0).then(|| {
        let user = cpu.user.as_secs_f64() * 1e6 / n as f64;
        let system = cpu.system.as_secs_f64() * 1e6 / n as f64;
        let r = |x: f64| (x * 10.0).round() / 10.0;
        PerUnit {
            user: r(user),
            system: r(system),
            total: r(user + system),
        }
    })
}

fn delta(before: f64, after: f64) -> u64 {
    // Counters only grow; a smaller value means the server restarted (report 0, not garbage).
    let d = (after - before).round();
    if d.is_finite() && d > 0.0 {
        d as u64
    } else {
        0
    }
}

pub fn build(opts: &Options, stats: &Stats, x: Extras) -> Report {
    let secs = x.elapsed.as_secs_f64().max(1e-9);
    let rate = |n: u64| (n as f64 / secs * 10.0).round() / 10.0;
    let cores = |c: CpuTimes| ((c.user + c.system).as_secs_f64() / secs * 1000.0).round() / 1000.0;
    let mut by_kind = BTreeMap::new();
    let mut tls = BTreeMap::new();
    for (kind, n) in &stats.errors {
        *by_kind.entry(kind.name()).or_insert(0) += n;
        if let ErrorKind::TlsHandshake(t) = kind {
            *tls.entry(t.name()).or_insert(0) += n;
        }
    }
    Report {
        target: opts.target.url.clone(),
        mode: opts.mode.name(),
        connections: opts.connections,
        streams: opts.streams,
        threads: opts.threads,
        rate: opts.rate,
        offered_groups: opts.groups.iter().map(|g| g.name()).collect(),
        offered_alpn: opts
            .alpn_offered()
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect(),
        certificate_verification: match opts.verify {
            Verify::CaFile(_) => "ca_file",
            Verify::System => "system_roots",
            Verify::Insecure => "off",
        },
        elapsed_s: (secs * 1000.0).round() / 1000.0,
        attempts: stats.attempts(),
        handshakes: stats.handshakes,
        handshakes_per_s: rate(stats.handshakes),
        requests: stats.responses,
        requests_per_s: rate(stats.responses),
        response_body_bytes: stats.response_bytes,
        status: stats.status.clone(),
        latency_us: Latencies {
            tcp_connect: summary(&stats.tcp_connect),
            tls_handshake: summary(&stats.tls_handshake),
            request: summary(&stats.request),
        },
        errors: Errors {
            total: stats.errors_total(),
            by_kind,
            tls_handshake: tls,
            examples: stats
                .examples
                .iter()
                .map(|(k, m)| (k.to_string(), m.clone()))
                .collect(),
        },
        negotiated: Negotiated {
            group: stats.groups.clone(),
            cipher_suite: stats.cipher_suites.clone(),
            alpn: stats.alpn.clone(),
            handshake_kind: stats.handshake_kinds.clone(),
        },
        resumed_handshakes: stats.resumed,
        hello_retry_requests: stats.hello_retries,
        session_tickets_received: x.tickets,
        server_metrics: x.server_metrics.map(|(url, b, a)| ServerMetrics {
            url,
            ephemera_metrics_found: a.found,
            handshakes: delta(b.handshakes, a.handshakes),
            handshake_failures: delta(b.failures, a.failures),
            handshake_failures_by_reason: a
                .failures_by_reason
                .iter()
                .map(|(r, v)| {
                    let was = b.failures_by_reason.get(r).copied().unwrap_or(0.0);
                    (r.clone(), delta(was, *v))
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            resumed_handshakes: delta(b.resumed, a.resumed),
            http_requests: delta(b.http_requests, a.http_requests),
        }),
        server_cpu: x.server_cpu.map(|(pid, used)| ServerCpu {
            pid,
            user_us: micros(used.user),
            system_us: micros(used.system),
            cores_busy: cores(used),
            per_handshake_us: match opts.mode {
                Mode::Handshake => per_unit(used, stats.handshakes),
                Mode::Requests => None,
            },
            per_request_us: per_unit(used, stats.responses),
        }),
        client_cpu: x.client_cpu.map(|used| ClientCpu {
            user_us: micros(used.user),
            system_us: micros(used.system),
            cores_busy: cores(used),
        }),
    }
}

impl Report {
    /// Every attempt failed: the most frequent error kind, its count, and an example.
    pub fn dominant_error(&self, stats: &Stats) -> Option<(ErrorKind, u64, String)> {
        if self.requests > 0 || self.attempts == 0 {
            return None;
        }
        let (kind, n) = stats.errors.iter().max_by_key(|(_, n)| **n)?;
        let example = stats.examples.get(kind).cloned().unwrap_or_default();
        Some((*kind, *n, example))
    }

    /// One JSON document.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_deltas_never_go_negative() {
        assert_eq!(delta(10.0, 60.0), 50);
        assert_eq!(delta(60.0, 10.0), 0);
        assert_eq!(delta(f64::NAN, 1.0), 0);
    }

    #[test]
    fn cpu_per_unit_splits_user_and_system() {
        let cpu = CpuTimes {
            user: Duration::from_millis(300),
            system: Duration::from_millis(100),
        };
        let p = per_unit(cpu, 1000).unwrap();
        assert_eq!((p.user, p.system, p.total), (300.0, 100.0, 400.0));
        assert!(per_unit(cpu, 0).is_none());
    }
}
