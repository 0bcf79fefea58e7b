//! loadgen: what the workers record (HTTP → **stats** → report): latency histograms
//! (hdrhistogram, microseconds) for TCP connect, TLS handshake and the whole request, counts
//! of outcomes and of what was negotiated. Workers write to a few mutex-guarded shards (one
//! histogram set per worker would cost ~0.5 MB each at thousands of connections); the shards
//! are merged once at the end. Live counters for the progress line are plain atomics.

use super::connect::Connected;
use super::failure::{ErrorKind, Failure};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Largest latency tracked exactly: one hour (in µs). Longer ones are recorded as one hour.
const MAX_MICROS: u64 = 3_600_000_000;

/// Everything recorded, for one shard or merged.
#[derive(Debug, Clone)]
pub struct Stats {
    pub tcp_connect: Histogram<u64>,
    pub tls_handshake: Histogram<u64>,
    pub request: Histogram<u64>,
    pub handshakes: u64,
    pub resumed: u64,
    pub hello_retries: u64,
    /// Responses received (any status).
    pub responses: u64,
    pub response_bytes: u64,
    /// By status class: "2xx", "5xx", …
    pub status: BTreeMap<&'static str, u64>,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// The first error message seen per kind.
    pub examples: BTreeMap<ErrorKind, String>,
    pub groups: BTreeMap<&'static str, u64>,
    pub cipher_suites: BTreeMap<&'static str, u64>,
    pub alpn: BTreeMap<&'static str, u64>,
    pub handshake_kinds: BTreeMap<&'static str, u64>,
}

fn histogram() -> Histogram<u64> {
    // Constant, valid bounds (1 µs to one hour, 3 significant figures): this cannot fail.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn bump<K: Ord>(map: &mut BTreeMap<K, u64>, key: K, n: u64) {
    *map.entry(key).or_insert(0) += n;
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            tcp_connect: histogram(),
            tls_handshake: histogram(),
            request: histogram(),
            handshakes: 0,
            resumed: 0,
            hello_retries: 0,
            responses: 0,
            response_bytes: 0,
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            examples: BTreeMap::new(),
            groups: BTreeMap::new(),
            cipher_suites: BTreeMap::new(),
            alpn: BTreeMap::new(),
            handshake_kinds: BTreeMap::new(),
        }
    }
}

impl Stats {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn attempts(&self) -> u64 {
        self.responses + self.errors_total()
    }

    fn merge(&mut self, other: Stats) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.tcp_connect.add(&other.tcp_connect);
        let _ = self.tls_handshake.add(&other.tls_handshake);
        let _ = self.request.add(&other.request);
        self.handshakes += other.handshakes;
        self.resumed += other.resumed;
        self.hello_retries += other.hello_retries;
        self.responses += other.responses;
        self.response_bytes += other.response_bytes;
        for (k, n) in other.status {
            bump(&mut self.status, k, n);
        }
        for (k, n) in other.errors {
            bump(&mut self.errors, k, n);
        }
        for (k, m) in other.examples {
            self.examples.entry(k).or_insert(m);
        }
        for (dst, src) in [
            (&mut self.groups, other.groups),
            (&mut self.cipher_suites, other.cipher_suites),
            (&mut self.alpn, other.alpn),
            (&mut self.handshake_kinds, other.handshake_kinds),
        ] {
            for (k, n) in src {
                bump(dst, k, n);
            }
        }
    }
}

/// Counters the progress line reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    pub handshakes: AtomicU64,
    pub responses: AtomicU64,
    pub errors: AtomicU64,
}

/// Shared by all workers.
pub struct Recorder {
    shards: Box<[Mutex<Stats>]>,
    pub live: Live,
}

impl Recorder {
    pub fn new(shards: usize) -> Recorder {
        Recorder {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Stats::default()))
                .collect(),
            live: Live::default(),
        }
    }

    fn with<R>(&self, worker: usize, f: impl FnOnce(&mut Stats) -> R) -> R {
        let shard = &self.shards[worker % self.shards.len()];
        // A poisoned shard still holds valid counts (nothing here panics mid-update).
        let mut stats = shard.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut stats)
    }

    pub fn handshake(&self, worker: usize, c: &Connected) {
        self.live.handshakes.fetch_add(1, Ordering::Relaxed);
        let n = &c.negotiated;
        self.with(worker, |s| {
            s.tcp_connect.saturating_record(micros(c.tcp_connect));
            s.tls_handshake.saturating_record(micros(c.tls_handshake));
            s.handshakes += 1;
            s.resumed += u64::from(n.resumed);
            s.hello_retries += u64::from(n.hello_retry);
            bump(&mut s.groups, n.group, 1);
            bump(&mut s.cipher_suites, n.cipher_suite, 1);
            bump(&mut s.alpn, n.alpn.label(), 1);
            bump(&mut s.handshake_kinds, n.kind, 1);
        });
    }

    pub fn response(
        &self,
        worker: usize,
        latency: Duration,
        status: http::StatusCode,
        body_bytes: u64,
    ) {
        self.live.responses.fetch_add(1, Ordering::Relaxed);
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.with(worker, |s| {
            s.request.saturating_record(micros(latency));
            s.responses += 1;
            s.response_bytes += body_bytes;
            bump(&mut s.status, class, 1);
        });
    }

    pub fn failure(&self, worker: usize, f: &Failure) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        self.with(worker, |s| {
            bump(&mut s.errors, f.kind, 1);
            s.examples.entry(f.kind).or_insert_with(|| f.to_string());
        });
    }

    /// All shards added up.
    pub fn merged(&self) -> Stats {
        let mut total = Stats::default();
        for shard in self.shards.iter() {
            let stats = shard.lock().unwrap_or_else(|p| p.into_inner());
            total.merge(stats.clone());
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::failure::Failure;

    #[test]
    fn shards_merge_into_one_view() {
        let r = Recorder::new(3);
        for w in 0..6u64 {
            r.response(
                w as usize,
                Duration::from_millis(w + 1),
                http::StatusCode::OK,
                10,
            );
        }
        r.response(
            1,
            Duration::from_secs(7200),
            http::StatusCode::BAD_GATEWAY,
            0,
        );
        let refused = || {
            Failure::connect(
                "127.0.0.1:1".parse().unwrap(),
                std::io::ErrorKind::ConnectionRefused.into(),
            )
        };
        r.failure(0, &refused());
        r.failure(2, &refused());
        let s = r.merged();
        assert_eq!(s.responses, 7);
        assert_eq!(s.response_bytes, 60);
        assert_eq!(s.status["2xx"], 6);
        assert_eq!(s.status["5xx"], 1);
        assert_eq!(s.errors[&ErrorKind::ConnectRefused], 2);
        assert_eq!(s.attempts(), 9);
        assert_eq!(s.request.len(), 7);
        // Past the tracked range: recorded at the top, not lost.
        assert!(s.request.max() >= MAX_MICROS - MAX_MICROS / 1000);
        assert!(s.examples[&ErrorKind::ConnectRefused].contains("refused"));
    }
}
