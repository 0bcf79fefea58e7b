//! `tls.max_connection_age`: when an established connection must start closing, so that its
//! client reconnects with a fresh ECDHE exchange. A KeyUpdate derives the next traffic secret
//! from the current one (forward secrecy inside the connection, but no recovery once a secret
//! is known); only a new handshake starts from fresh key material. Computed by `listener` at
//! the handshake; `http::server` and `tcp` act on it.

use std::time::Duration;
use tokio::time::Instant;

/// Share of the age taken off at random per connection, so that connections opened together
/// (after a deploy or a restart) do not all reconnect at once.
const JITTER: f64 = 0.10;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionAge {
    /// Start the graceful close here (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`).
    pub close_at: Instant,
    /// Cut the connection here whatever is still in flight.
    pub cut_at: Instant,
}

impl ConnectionAge {
    /// For a connection whose handshake just completed: the limit less a random 0-10%.
    pub fn start(max_age: Duration, grace: Duration) -> ConnectionAge {
        ConnectionAge::with_jitter(max_age, grace, fastrand::f64())
    }

    /// `unit` in [0, 1): the share of the full jitter taken off.
    fn with_jitter(max_age: Duration, grace: Duration, unit: f64) -> ConnectionAge {
        let age = max_age.mul_f64(1.0 - JITTER * unit.clamp(0.0, 1.0));
        let close_at = Instant::now() + age;
        ConnectionAge {
            close_at,
            cut_at: close_at + grace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_only_shortens_and_by_at_most_a_tenth() {
        let day = Duration::from_secs(86_400);
        let grace = Duration::from_secs(30);
        let before = Instant::now();
        let none = ConnectionAge::with_jitter(day, grace, 0.0);
        let most = ConnectionAge::with_jitter(day, grace, 0.999_999);
        let after = Instant::now();
        assert!(none.close_at >= before + day && none.close_at <= after + day);
        let floor = day.mul_f64(0.9);
        assert!(most.close_at >= before + floor - Duration::from_millis(100));
        assert!(most.close_at < before + floor + Duration::from_secs(1));
        assert_eq!(most.cut_at - most.close_at, grace);
    }

    #[test]
    fn connections_opened_together_spread_out() {
        let hour = Duration::from_secs(3600);
        let ages: Vec<Instant> = (0..200)
            .map(|_| ConnectionAge::start(hour, Duration::ZERO).close_at)
            .collect();
        let first = *ages.iter().min().unwrap();
        let last = *ages.iter().max().unwrap();
        // 200 uniform draws over 6 minutes: the spread is far over a minute.
        assert!(last - first > Duration::from_secs(60), "{:?}", last - first);
        assert!(last - first <= hour.mul_f64(JITTER) + Duration::from_secs(1));
    }
}
