//! loadgen: the report rendered for a person (stats → report → **text**); `--json` prints
//! the same `Report` serialized instead.

use super::report::Report;
use std::collections::BTreeMap;
use std::fmt::Write as _;

impl Report {
    /// The report for a person.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let streams = if self.mode == "requests" && self.streams > 1 {
            format!(" x {} streams", self.streams)
        } else {
            String::new()
        };
        let rate = self
            .rate
            .map_or(String::new(), |r| format!(", open loop at {r}/s"));
        let _ = writeln!(
            o,
            "ephemera loadgen {} ({} mode, {}{streams}, {}{rate})",
            self.target,
            self.mode,
            plural(self.connections, "connection"),
            plural(self.threads, "thread")
        );
        let _ = writeln!(
            o,
            "  offered: groups {}; ALPN {}; certificate verification {}",
            self.offered_groups.join(", "),
            self.offered_alpn.join(", "),
            self.certificate_verification
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "  elapsed        {:.2} s, {} attempted",
            self.elapsed_s,
            plural(self.attempts as usize, "request")
        );
        let _ = writeln!(
            o,
            "  handshakes     {:<10} {:>10.1} /s",
            self.handshakes, self.handshakes_per_s
        );
        let statuses: Vec<_> = self
            .status
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            o,
            "  requests       {:<10} {:>10.1} /s   ({}; {} body bytes)",
            self.requests,
            self.requests_per_s,
            if statuses.is_empty() {
                "no responses".to_string()
            } else {
                statuses.join(", ")
            },
            self.response_body_bytes
        );
        let _ = writeln!(o, "  errors         {}", self.errors.total);
        for (kind, n) in &self.errors.by_kind {
            let _ = writeln!(o, "    {kind:<22} {n}");
            if *kind == "tls_handshake" {
                for (sub, n) in &self.errors.tls_handshake {
                    let _ = writeln!(o, "      {sub:<20} {n}");
                }
            }
        }
        for (kind, msg) in &self.errors.examples {
            let _ = writeln!(o, "    e.g. {kind}: {msg}");
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "  latency        {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "min", "mean", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, s) in [
            ("tcp connect", &self.latency_us.tcp_connect),
            ("tls handshake", &self.latency_us.tls_handshake),
            ("request", &self.latency_us.request),
        ] {
            let cell = |us| if s.count == 0 { "-".into() } else { human(us) };
            let _ = writeln!(
                o,
                "  {name:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                cell(s.min),
                cell(s.mean.round() as u64),
                cell(s.p50),
                cell(s.p90),
                cell(s.p99),
                cell(s.p99_9),
                cell(s.max)
            );
        }
        let _ = writeln!(o);
        let counts = |m: &BTreeMap<&str, u64>| {
            if m.is_empty() {
                return "-".to_string();
            }
            m.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(o, "  negotiated");
        let _ = writeln!(o, "    group        {}", counts(&self.negotiated.group));
        let _ = writeln!(
            o,
            "    cipher suite {}",
            counts(&self.negotiated.cipher_suite)
        );
        let _ = writeln!(o, "    alpn         {}", counts(&self.negotiated.alpn));
        let _ = writeln!(
            o,
            "    kind         {}",
            counts(&self.negotiated.handshake_kind)
        );
        let _ = writeln!(
            o,
            "    resumed      {}{} (hello retry requests {}, session tickets received {})",
            self.resumed_handshakes,
            if self.resumed_handshakes > 0 {
                " UNEXPECTED: loadgen offers no session, yet the server reports resuming one"
            } else {
                ""
            },
            self.hello_retry_requests,
            self.session_tickets_received
        );
        if let Some(m) = &self.server_metrics {
            let _ = writeln!(o);
            let _ = writeln!(o, "  server metrics ({}), change over the run", m.url);
            if !m.ephemera_metrics_found {
                let _ = writeln!(o, "    (no ephemera_tls_* families on that page)");
            }
            let reasons: Vec<_> = m
                .handshake_failures_by_reason
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let _ = writeln!(
                o,
                "    handshakes {}, failures {}{}, resumed {}, http requests {}",
                m.handshakes,
                m.handshake_failures,
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", reasons.join(", "))
                },
                m.resumed_handshakes,
                m.http_requests
            );
        }
        if let Some(c) = &self.server_cpu {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "  server CPU (pid {}): user {:.3} s, system {:.3} s ({:.2} cores busy)",
                c.pid,
                c.user_us as f64 / 1e6,
                c.system_us as f64 / 1e6,
                c.cores_busy
            );
            for (what, p) in [
                ("handshake", c.per_handshake_us),
                ("request", c.per_request_us),
            ] {
                if let Some(p) = p {
                    let _ = writeln!(
                        o,
                        "    per {what:<9} {:>8.1} µs  (user {:.1}, system {:.1})",
                        p.total, p.user, p.system
                    );
                }
            }
        }
        if let Some(c) = &self.client_cpu {
            let _ = writeln!(
                o,
                "  client CPU: {:.2} cores busy of {}",
                c.cores_busy,
                plural(self.threads, "thread")
            );
        }
        o
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Microseconds for a person.
fn human(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(999), "999µs");
        assert_eq!(human(1_500), "1.50ms");
        assert_eq!(human(2_500_000), "2.50s");
        assert_eq!(plural(1, "thread"), "1 thread");
        assert_eq!(plural(2, "thread"), "2 threads");
    }
}
