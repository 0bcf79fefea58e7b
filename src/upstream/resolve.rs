//! Upstream upkeep in the background, for as long as the upstream exists: host names in
//! `servers` are resolved again every `EVERY`, and when a name's set of addresses changes,
//! the pooled connections to it stop taking requests (new connections resolve afresh); idle
//! HTTP/1.1 connections past their idle timeout are closed rather than held until reuse.

use super::Server;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

pub const EVERY: Duration = Duration::from_secs(30);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses a server's name resolved to last time; `None` until the first lookup.
#[derive(Default)]
pub struct Resolved(Mutex<Option<BTreeSet<SocketAddr>>>);

impl Resolved {
    /// Record a lookup; true when it differs from an earlier one.
    pub fn changed(&self, now: BTreeSet<SocketAddr>) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let changed = last.as_ref().is_some_and(|prev| *prev != now);
        *last = Some(now);
        changed
    }
}

/// Whether `addr` (`HOST:PORT`) names a host rather than an IP address.
pub fn is_name(addr: &str) -> bool {
    addr.parse::<SocketAddr>().is_err()
}

/// Start the upkeep task for `servers`; it ends once the upstream has been dropped.
pub fn spawn(upstream: String, servers: &[Arc<Server>]) {
    let servers: Vec<Weak<Server>> = servers.iter().map(Arc::downgrade).collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            let mut alive = false;
            for weak in &servers {
                let Some(server) = weak.upgrade() else {
                    continue;
                };
                alive = true;
                server.h1.prune(false);
                if !is_name(&server.addr) {
                    continue;
                }
                let lookup = tokio::time::timeout(
                    LOOKUP_TIMEOUT,
                    tokio::net::lookup_host(server.addr.as_str()),
                )
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("lookup timed out")));
                match lookup {
                    Ok(addrs) => {
                        let addrs: BTreeSet<SocketAddr> = addrs.collect();
                        if server.resolved.changed(addrs.clone()) {
                            tracing::info!(%upstream, server = %server.addr, ?addrs, "server name resolves to new addresses; moving to them");
                            server.h1.prune(true);
                            server.h2.retire_all();
                        }
                    }
                    Err(e) => {
                        // Keep the connections we have; new ones will fail and be counted.
                        tracing::warn!(%upstream, server = %server.addr, error = %e, "cannot resolve server name");
                    }
                }
            }
            if !alive {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_after_the_first_lookup_only() {
        let r = Resolved::default();
        let a: BTreeSet<SocketAddr> = ["10.0.0.1:80".parse().unwrap()].into();
        let b: BTreeSet<SocketAddr> = ["10.0.0.2:80".parse().unwrap()].into();
        assert!(!r.changed(a.clone()), "the first lookup is not a change");
        assert!(!r.changed(a.clone()));
        assert!(r.changed(b.clone()));
        assert!(!r.changed(b));
        assert!(is_name("backend.internal:8080") && !is_name("[::1]:8080"));
    }
}
