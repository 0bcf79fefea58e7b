//! Passive health of one backend server, fed by `upstream`'s connection attempts: after
//! `EJECT_AFTER` connect failures in a row the server is ejected for `EJECT_FOR`: tried only
//! after every other server. Atomics, not a lock: the order of servers is computed on every
//! request.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const EJECT_AFTER: u32 = 3;
pub const EJECT_FOR: Duration = Duration::from_secs(10);

pub struct Health {
    epoch: Instant,
    failures_in_a_row: AtomicU32,
    /// Milliseconds since `epoch` until which the server is ejected; 0 = not ejected.
    ejected_until_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            epoch: Instant::now(),
            failures_in_a_row: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Ejected servers are tried after the others.
    pub fn ejected(&self, now: Instant) -> bool {
        self.ms(now) < self.ejected_until_ms.load(Ordering::Acquire)
    }

    pub fn connected(&self) {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Release);
        }
    }

    /// Record a failed connect; true when this failure ejects the server.
    pub fn connect_failed(&self, now: Instant) -> bool {
        let now_ms = self.ms(now);
        let n = self.failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
        let ejected = now_ms < self.ejected_until_ms.load(Ordering::Acquire);
        if n >= EJECT_AFTER && !ejected {
            let until = now_ms + EJECT_FOR.as_millis() as u64;
            self.ejected_until_ms.store(until, Ordering::Release);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_failures_in_a_row_and_recovers() {
        let h = Health::default();
        let t0 = Instant::now();
        assert!(!h.ejected(t0));
        assert!(!h.connect_failed(t0));
        assert!(!h.connect_failed(t0));
        assert!(!h.ejected(t0));
        assert!(h.connect_failed(t0), "third failure in a row ejects");
        assert!(h.ejected(t0));
        assert!(!h.connect_failed(t0), "already ejected: not counted again");
        assert!(!h.ejected(t0 + EJECT_FOR));
        // Back after the cool-down; the next failure ejects again at once.
        assert!(h.connect_failed(t0 + EJECT_FOR));
        h.connected();
        assert!(!h.connect_failed(t0 + 3 * EJECT_FOR));
    }
}
