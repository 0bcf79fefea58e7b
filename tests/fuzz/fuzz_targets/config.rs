//! Config parser and validator: any bytes → `Config::parse` (YAML → raw serde structs →
//! validation). It must never panic, and whatever it accepts must hold every promise the
//! validated types make (nothing past `config` re-checks them).
//!
//! `Config::parse` touches no file: certificate, key, CA and token paths are only stored
//! (they are read later, by `Prepared::new` and the admin listener, which this target does
//! not call), so no input can make it read or write anything.

#![no_main]

use ephemera::config::{
    Config, ConfigError, HostMatch, ListenerMode, MAX_DURATION, RouteAction, UpstreamProtocol,
};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.yaml") {
        Ok(config) => check(&config),
        Err(e) => {
            // Every message names the file; rendering it must not panic either.
            let message = e.to_string();
            assert!(message.starts_with("fuzz.yaml"), "{message}");
            if let ConfigError::Invalid { origin, .. } = &e {
                assert_eq!(origin.file, "fuzz.yaml");
                assert!(!origin.key.is_empty(), "{message}");
                // "Every error names the file, the key path and the line"; only a missing
                // `listeners` has no line to name.
                assert!(
                    origin.line > 0 || origin.key == "listeners",
                    "no line: {message}"
                );
            }
        }
    }
});

fn duration_ok(d: Duration) -> bool {
    !d.is_zero() && d <= MAX_DURATION
}

fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A lower-case DNS name: labels of letters, digits and '-'.
fn host_ok(n: &str) -> bool {
    !n.is_empty()
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// What the validated types promise (see `config/mod.rs` and `config/validate.rs`).
fn check(c: &Config) {
    assert!(c.shutdown_grace <= MAX_DURATION);
    assert!(!c.listeners.is_empty());

    let mut upstream_names = HashSet::new();
    for u in &c.upstreams {
        assert!(name_ok(&u.name), "upstream name {:?}", u.name);
        assert!(upstream_names.insert(u.name.as_str()));
        assert!(!u.servers.is_empty());
        for s in &u.servers {
            let (host, port) = s.rsplit_once(':').expect("HOST:PORT");
            assert!(!host.is_empty(), "server {s:?}");
            assert_ne!(
                port.parse::<u16>().expect("numeric port"),
                0,
                "server {s:?}"
            );
        }
        assert!(duration_ok(u.connect_timeout));
        assert!(duration_ok(u.response_timeout));
        assert!((1..=1024).contains(&u.max_connections));
        assert_eq!(u.tls.is_some(), u.protocol == UpstreamProtocol::H2);
        assert!(!(u.proxy_protocol && u.protocol.is_h2()));
    }

    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    for l in &c.listeners {
        assert!(name_ok(&l.name), "listener name {:?}", l.name);
        assert!(names.insert(l.name.as_str()), "duplicate {:?}", l.name);
        if l.bind.port() != 0 {
            assert!(binds.insert(l.bind), "duplicate bind {}", l.bind);
            assert_ne!(l.bind, c.admin.bind);
        }
        assert!((1..=10_000_000).contains(&l.max_connections));
        assert!(!(l.proxy_protocol && l.http.trusted_proxies.is_empty()));

        let t = &l.tls;
        assert!(!t.certificates.is_empty());
        for cert in &t.certificates {
            assert!(!cert.cert.to_string().trim().is_empty());
            assert!(!cert.key.to_string().trim().is_empty());
        }
        assert!(!t.groups.is_empty());
        let groups: HashSet<_> = t.groups.iter().collect();
        assert_eq!(groups.len(), t.groups.len(), "duplicate group");
        assert!(duration_ok(t.handshake_timeout));
        assert!((1..=1_000_000).contains(&t.max_concurrent_handshakes));
        assert!(t.keylog.is_none(), "key logging is never read from a file");
        if let Some(k) = t.key_update {
            assert!(k.max_bytes.is_some() || k.max_age.is_some());
            assert!(k.max_bytes.is_none_or(|b| b >= 64 * 1024));
            assert!(
                k.max_age
                    .is_none_or(|a| a >= Duration::from_secs(1) && a <= MAX_DURATION)
            );
        }

        let h = &l.http;
        assert!(duration_ok(h.header_timeout));
        assert!(duration_ok(h.idle_timeout));
        assert!((1..=10_000).contains(&h.h2.max_concurrent_streams));
        assert!((1024..=(1 << 31) - 1).contains(&h.h2.initial_stream_window));
        assert!((65_535..=(1 << 31) - 1).contains(&h.h2.initial_connection_window));
        assert!((1024..=1024 * 1024).contains(&h.h2.max_header_list_size));
        assert!(h.h2.keepalive_interval.is_none_or(duration_ok));
        assert!(duration_ok(h.h2.keepalive_timeout));

        match l.mode {
            ListenerMode::Tcp {
                upstream,
                idle_timeout,
            } => {
                assert_eq!(c.upstreams[upstream].protocol, UpstreamProtocol::Tcp);
                assert!(duration_ok(idle_timeout));
                assert!(l.routes.is_empty());
            }
            ListenerMode::Http => {
                assert!(!l.routes.is_empty());
                for r in &l.routes {
                    assert!(r.path_prefix.starts_with('/'));
                    match &r.host {
                        HostMatch::Any => {}
                        HostMatch::Exact(n) => assert!(host_ok(n), "host {n:?}"),
                        HostMatch::Suffix(s) => {
                            assert!(s.starts_with('.') && host_ok(&s[1..]), "host {s:?}")
                        }
                    }
                    match &r.action {
                        RouteAction::Upstream(i) => {
                            assert_ne!(c.upstreams[*i].protocol, UpstreamProtocol::Tcp);
                        }
                        RouteAction::Respond { status, .. } => {
                            assert!((200..=599).contains(status));
                        }
                    }
                }
            }
        }
    }
}
