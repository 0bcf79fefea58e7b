//! Rate limit for log lines driven by the network (handshake failures, accept errors), so a
//! scan or a flood cannot flood the log. Counting is unaffected: metrics see every event.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows at most `burst` lines per `window`; reports how many were suppressed before.
pub struct LogLimiter {
    window: Duration,
    burst: u32,
    state: Mutex<State>,
}

struct State {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(window: Duration, burst: u32) -> LogLimiter {
        LogLimiter {
            window,
            burst,
            state: Mutex::new(State {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)`: log this line, noting `n` lines suppressed since the last one logged.
    /// `None`: stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(s.started) >= self.window {
            s.started = now;
            s.logged = 0;
        }
        if s.logged < self.burst {
            s.logged += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports() {
        let l = LogLimiter::new(Duration::from_millis(50), 2);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow(), Some(2));
    }
}
