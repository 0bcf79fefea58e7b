//! Forced TLS 1.3 KeyUpdate: the per-connection policy state that `tls::stream::ClientStream`
//! consults on every read and write (a counter compare) and whose timer wakes an idle
//! connection. Below HTTP, so HTTP/1.1, HTTP/2 and any byte relay get it alike.
//!
//! rustls's `refresh_traffic_keys()` sends KeyUpdate with update_requested: the client then
//! rotates its sending key too and answers with a KeyUpdate of its own. TLS stacks (rustls,
//! BoringSSL) abort a connection after 32 KeyUpdates received with no application data in
//! between, and that bites both ways: our rustls counts the client's answers while the client
//! sends no data (a download), and the client counts our requests while we send no data (an
//! upload). So we keep both counts and force an update only while both are below 31; past that
//! the update is deferred (and counted) until data flows again, when one update fires.

use crate::config::KeyUpdatePolicy;
use crate::metrics::RekeyMetrics;
use std::future::Future;
use std::pin::Pin;
use std::task::Context;
#[cfg(test)]
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Forced updates allowed in a row without application data in one direction. Peers abort at
/// the 33rd KeyUpdate received; 31 leaves one spare for rustls's own confidentiality-limit
/// update.
pub const IN_A_ROW_LIMIT: u32 = 31;

/// What made an update due: the `trigger` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Bytes,
    Age,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Bytes => "bytes",
            Trigger::Age => "age",
        }
    }
}

/// Whether a due update may be sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Send,
    /// 31 updates are unanswered in one direction; wait for application data.
    Defer,
}

/// One connection's forced-update state.
pub struct Rekey {
    /// `u64::MAX` when there is no byte limit, so the hot path is a single compare.
    max_bytes: u64,
    max_age: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    age_due: bool,
    /// Application data, both directions, since the last update.
    bytes: u64,
    /// Forced updates since the client last sent us application data.
    unanswered_by_client: u32,
    /// Forced updates since we last sent the client application data.
    unanswered_to_client: u32,
    deferred: bool,
    /// Forced updates on this connection.
    pub updates: u64,
    /// Application data on this connection, both directions.
    pub total_bytes: u64,
}

impl Rekey {
    /// `None`: forced updates are off (bytes are still counted for the connection metrics).
    pub fn new(policy: Option<KeyUpdatePolicy>) -> Rekey {
        let max_age = policy.and_then(|p| p.max_age);
        Rekey {
            max_bytes: policy.and_then(|p| p.max_bytes).unwrap_or(u64::MAX),
            max_age,
            timer: max_age.map(|d| Box::pin(tokio::time::sleep(d))),
            age_due: false,
            bytes: 0,
            unanswered_by_client: 0,
            unanswered_to_client: 0,
            deferred: false,
            updates: 0,
            total_bytes: 0,
        }
    }

    /// `n` bytes of application data arrived from the client.
    ///
    /// Client data proves the client answered only the updates it had read before sending
    /// it. One that writes a whole upload before reading (Python `ssl`, OpenSSL answering
    /// inside `SSL_read`) answers every update we sent while we sent it nothing *after* its
    /// data. So only the updates followed by our data are taken as answered.
    #[inline]
    pub fn on_read(&mut self, n: usize) -> Option<Trigger> {
        if n == 0 {
            return None;
        }
        self.unanswered_by_client = self.unanswered_to_client;
        self.count(n)
    }

    /// `n` bytes of application data were accepted for sending to the client.
    #[inline]
    pub fn on_write(&mut self, n: usize) -> Option<Trigger> {
        if n == 0 {
            return None;
        }
        self.unanswered_to_client = 0;
        self.count(n)
    }

    #[inline]
    fn count(&mut self, n: usize) -> Option<Trigger> {
        self.bytes += n as u64;
        self.total_bytes += n as u64;
        if self.bytes >= self.max_bytes {
            Some(Trigger::Bytes)
        } else if self.age_due {
            Some(Trigger::Age)
        } else {
            None
        }
    }

    /// Poll the age timer (registers the waker, so an idle connection is woken on time).
    pub fn poll_age(&mut self, cx: &mut Context<'_>) -> Option<Trigger> {
        if self.age_due {
            return Some(Trigger::Age);
        }
        let timer = self.timer.as_mut()?;
        if timer.as_mut().poll(cx).is_ready() {
            self.age_due = true;
            return Some(Trigger::Age);
        }
        None
    }

    /// An update is due: may it be sent? Counts a deferral once per deferred stretch.
    pub fn decide(&mut self, metrics: &RekeyMetrics) -> Decision {
        if self.unanswered_by_client < IN_A_ROW_LIMIT && self.unanswered_to_client < IN_A_ROW_LIMIT
        {
            self.deferred = false;
            Decision::Send
        } else {
            if !self.deferred {
                self.deferred = true;
                metrics.deferred.inc();
            }
            Decision::Defer
        }
    }

    /// Record the outcome of `refresh_traffic_keys()`; counters and the deadline restart.
    pub fn updated(&mut self, trigger: Trigger, ok: bool, metrics: &RekeyMetrics) {
        if ok {
            self.updates += 1;
            self.unanswered_by_client += 1;
            self.unanswered_to_client += 1;
            match trigger {
                Trigger::Bytes => metrics.by_bytes.inc(),
                Trigger::Age => metrics.by_age.inc(),
            }
        } else {
            metrics.failures.inc();
        }
        self.bytes = 0;
        self.age_due = false;
        if let (Some(timer), Some(age)) = (self.timer.as_mut(), self.max_age) {
            timer.as_mut().reset(Instant::now() + age);
        }
    }

    /// Whether an update is waiting for application data (for tests and logs).
    pub fn is_deferred(&self) -> bool {
        self.deferred
    }
}

/// Polls `rekey`'s timer without a stream, for tests.
#[cfg(test)]
fn poll_age_now(rekey: &mut Rekey) -> Poll<Trigger> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match rekey.poll_age(&mut cx) {
        Some(t) => Poll::Ready(t),
        None => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn metrics() -> (Metrics, RekeyMetrics) {
        let m = Metrics::new();
        let r = m.listener("t", &["x25519"]).rekey().clone();
        (m, r)
    }

    fn policy(bytes: Option<u64>, age: Option<u64>) -> Option<KeyUpdatePolicy> {
        Some(KeyUpdatePolicy {
            max_bytes: bytes,
            max_age: age.map(Duration::from_secs),
        })
    }

    #[test]
    fn bytes_in_both_directions_trigger_and_restart() {
        let (_m, r) = metrics();
        let mut k = Rekey::new(policy(Some(100), None));
        assert_eq!(k.on_read(60), None);
        assert_eq!(k.on_write(39), None);
        assert_eq!(k.on_write(1), Some(Trigger::Bytes));
        assert_eq!(k.decide(&r), Decision::Send);
        k.updated(Trigger::Bytes, true, &r);
        assert_eq!(k.on_read(99), None);
        assert_eq!(k.on_read(1), Some(Trigger::Bytes));
        assert_eq!(r.by_bytes.get(), 1);
        assert_eq!(k.total_bytes, 200);
    }

    #[test]
    fn disabled_policy_never_triggers() {
        let mut k = Rekey::new(None);
        assert_eq!(k.on_read(usize::MAX / 2), None);
        assert_eq!(k.on_write(usize::MAX / 2), None);
        assert_eq!(poll_age_now(&mut k), Poll::Pending);
    }

    #[test]
    fn a_silent_client_allows_31_updates_then_defers_once_until_it_sends() {
        let (_m, r) = metrics();
        let mut k = Rekey::new(policy(Some(10), None));
        // A download: only we send data, so the client's answers go unanswered by its data.
        let mut sent = 0;
        for _ in 0..100 {
            if let Some(t) = k.on_write(10)
                && k.decide(&r) == Decision::Send
            {
                k.updated(t, true, &r);
                sent += 1;
            }
        }
        assert_eq!(sent, IN_A_ROW_LIMIT);
        assert!(k.is_deferred());
        assert_eq!(
            r.deferred.get(),
            1,
            "one deferral per stretch, not per write"
        );
        // The client sends a request: exactly one deferred update fires, not a burst.
        assert_eq!(k.on_read(5), Some(Trigger::Bytes));
        assert_eq!(k.decide(&r), Decision::Send);
        k.updated(Trigger::Bytes, true, &r);
        assert_eq!(k.on_write(1), None);
        assert_eq!(r.by_bytes.get(), 32);
    }

    #[test]
    fn an_upload_the_client_sends_is_limited_by_its_count_of_our_requests() {
        let (_m, r) = metrics();
        let mut k = Rekey::new(policy(Some(10), None));
        let mut sent = 0;
        for _ in 0..100 {
            if let Some(t) = k.on_read(10)
                && k.decide(&r) == Decision::Send
            {
                k.updated(t, true, &r);
                sent += 1;
            }
        }
        assert_eq!(sent, IN_A_ROW_LIMIT);
        // Our response starts: the client may answer all 31 only now, after its data, so no
        // further update is forced until it sends data again.
        assert_eq!(k.on_write(10), Some(Trigger::Bytes));
        assert_eq!(k.decide(&r), Decision::Defer);
        for _ in 0..10 {
            assert_eq!(k.on_write(10), Some(Trigger::Bytes));
            assert_eq!(k.decide(&r), Decision::Defer);
        }
        // The next request (sent after reading our response and its updates): updates resume.
        assert_eq!(k.on_read(1), Some(Trigger::Bytes));
        assert_eq!(k.decide(&r), Decision::Send);
    }

    #[tokio::test(start_paused = true)]
    async fn age_fires_on_an_idle_connection_and_restarts() {
        let (_m, r) = metrics();
        let mut k = Rekey::new(policy(None, Some(1)));
        assert_eq!(poll_age_now(&mut k), Poll::Pending);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(poll_age_now(&mut k), Poll::Ready(Trigger::Age));
        // Still due on the next data until an update happens.
        assert_eq!(k.on_read(1), Some(Trigger::Age));
        k.updated(Trigger::Age, true, &r);
        assert_eq!(poll_age_now(&mut k), Poll::Pending);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(poll_age_now(&mut k), Poll::Pending);
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(poll_age_now(&mut k), Poll::Ready(Trigger::Age));
        assert_eq!(r.by_age.get(), 1);
    }

    #[test]
    fn failures_are_counted_and_restart_the_counters() {
        let (_m, r) = metrics();
        let mut k = Rekey::new(policy(Some(10), None));
        assert_eq!(k.on_read(10), Some(Trigger::Bytes));
        k.updated(Trigger::Bytes, false, &r);
        assert_eq!(r.failures.get(), 1);
        assert_eq!(k.updates, 0);
        assert_eq!(k.on_read(9), None);
    }
}
