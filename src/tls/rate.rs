//! `tls.handshake_rate_per_ip`: a token bucket per client address, checked by `listener` after
//! the accept (and after a PROXY header names the client), before any byte of the ClientHello
//! is read. Without resumption every connection costs a full handshake, so a single address
//! opening connections as fast as it can is the cheapest attack on the proxy.

use crate::config::HandshakeRate;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets of addresses quiet for longer than a refill are dropped at most this often, so a
/// client cycling through many addresses costs bounded memory and no per-check sweep.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

pub struct HandshakeRateLimiter {
    policy: HandshakeRate,
    buckets: DefaultKeyedRateLimiter<IpAddr>,
    last_sweep: Mutex<Instant>,
}

impl HandshakeRateLimiter {
    pub fn new(policy: HandshakeRate) -> HandshakeRateLimiter {
        // `config` bounds per_second to 0.001..=1e6 and burst to 1..=1e6.
        let period = Duration::from_secs_f64(1.0 / policy.per_second);
        let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        HandshakeRateLimiter {
            policy,
            buckets: RateLimiter::keyed(quota),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    pub fn policy(&self) -> HandshakeRate {
        self.policy
    }

    /// Takes a token for `ip`; false when its bucket is empty (refuse the connection).
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.sweep();
        self.buckets
            .check_key(&key(ip.to_canonical(), self.policy.ipv6_prefix))
            .is_ok()
    }

    /// Addresses with a bucket in memory now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn sweep(&self) {
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if last.elapsed() < SWEEP_EVERY {
            return;
        }
        *last = Instant::now();
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// IPv4 by address; IPv6 by prefix, since one host (or one customer) usually holds a whole
/// /64 and could otherwise take a fresh bucket per connection.
fn key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let prefix = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: u32) -> HandshakeRateLimiter {
        HandshakeRateLimiter::new(HandshakeRate {
            per_second,
            burst,
            ipv6_prefix: 64,
        })
    }

    #[test]
    fn a_burst_then_refusal_per_address() {
        let l = limiter(1.0, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a)));
        assert!(!l.allow(a), "fourth handshake within the burst window");
        assert!(l.allow(b), "another address has its own bucket");
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn tokens_come_back_at_the_rate() {
        let l = limiter(50.0, 1);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.allow(a));
        assert!(!l.allow(a));
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.allow(a));
    }

    #[test]
    fn ipv6_addresses_share_their_prefix_and_mapped_ipv4_is_ipv4() {
        let l = limiter(1.0, 1);
        assert!(l.allow("2001:db8:1:2::1".parse().unwrap()));
        assert!(
            !l.allow("2001:db8:1:2:ffff::9".parse().unwrap()),
            "same /64"
        );
        assert!(l.allow("2001:db8:1:3::1".parse().unwrap()), "next /64");
        assert!(l.allow("::ffff:192.0.2.7".parse().unwrap()));
        assert!(
            !l.allow("192.0.2.7".parse().unwrap()),
            "v4-mapped is the v4 address"
        );
        assert_eq!(
            key("2001:db8::1".parse().unwrap(), 128),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            key("2001:db8::1".parse().unwrap(), 1),
            "::".parse::<IpAddr>().unwrap()
        );
    }
}
