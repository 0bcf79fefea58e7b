//! loadgen: when each request starts. Workers take tickets from one shared schedule until it
//! runs out (`-n` attempts, `-d` elapsed, or a stop). With `--rate` (open loop) ticket `i`
//! carries its intended start, `start + i / rate`: a worker that takes it late — because the
//! server stalled and every worker was busy — still measures latency from that time, so a
//! stall shows up in the percentiles instead of being hidden (coordinated omission).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

pub struct Schedule {
    start: Instant,
    next: AtomicU64,
    limit: Option<u64>,
    deadline: Option<Instant>,
    rate: Option<f64>,
    stopped: AtomicBool,
}

/// Permission to start one request.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    /// Open loop only: when the request should start.
    pub intended: Option<Instant>,
}

impl Schedule {
    pub fn new(
        start: Instant,
        limit: Option<u64>,
        duration: Option<Duration>,
        rate: Option<f64>,
    ) -> Schedule {
        Schedule {
            start,
            next: AtomicU64::new(0),
            limit,
            // `Options` bounds the duration, so the deadline is representable; were it not,
            // the run would have none (a count limit or Ctrl-C ends it).
            deadline: duration.and_then(|d| start.checked_add(d)),
            rate,
            stopped: AtomicBool::new(false),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// The next ticket, or None when the run is over.
    pub fn take(&self) -> Option<Ticket> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.limit.is_some_and(|l| i >= l) {
            self.stop();
            return None;
        }
        let intended = match self.rate {
            // Past the last representable instant: no ticket can start, so the run is
            // over. Defensive: `Options` bounds the rate and the duration, but -n alone
            // may ask for more tickets than any clock can space out.
            Some(r) => match Duration::try_from_secs_f64(i as f64 / r)
                .ok()
                .and_then(|d| self.start.checked_add(d))
            {
                Some(at) => Some(at),
                None => {
                    self.stop();
                    return None;
                }
            },
            None => None,
        };
        let starts_at = intended.unwrap_or_else(Instant::now);
        if self.deadline.is_some_and(|d| starts_at >= d) {
            self.stop();
            return None;
        }
        Some(Ticket { intended })
    }

    /// Issue no more tickets (Ctrl-C, or the run is over).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    pub fn duration(&self) -> Option<Duration> {
        self.deadline.map(|d| d - self.start)
    }
}

impl Ticket {
    /// Wait for the intended start (if any); returns the instant latency is measured from.
    pub async fn begin(self) -> Instant {
        match self.intended {
            Some(at) => {
                tokio::time::sleep_until(at).await;
                at
            }
            None => Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn count_limit_issues_exactly_n() {
        let s = Schedule::new(Instant::now(), Some(3), None, None);
        assert!((0..3).all(|_| s.take().is_some()));
        assert!(s.take().is_none());
        assert!(s.stopped.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_spaces_intended_starts_and_stops_at_the_deadline() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, None, Some(Duration::from_secs(1)), Some(4.0));
        let starts: Vec<_> = std::iter::from_fn(|| s.take())
            .map(|t| t.intended.unwrap() - t0)
            .collect();
        assert_eq!(
            starts,
            [0, 250, 500, 750].map(Duration::from_millis).to_vec()
        );
        // A late taker still measures from the intended time.
        let s = Schedule::new(t0, Some(2), None, Some(1.0));
        let (a, b) = (s.take().unwrap(), s.take().unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(a.begin().await, t0);
        assert_eq!(b.begin().await, t0 + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_start_past_the_representable_time_ends_the_run() {
        let s = Schedule::new(Instant::now(), Some(u64::MAX), None, Some(1e-300));
        assert!(s.take().is_some(), "ticket 0 starts at once");
        assert!(s.take().is_none());
        assert!(s.stopped.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn duration_limit_without_rate_uses_the_clock() {
        let s = Schedule::new(Instant::now(), None, Some(Duration::from_secs(2)), None);
        assert!(s.take().is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(s.take().is_none());
        s.stop();
        assert!(s.take().is_none());
    }
}
