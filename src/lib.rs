//! Ephemera: a TLS 1.3-only terminating reverse proxy with strict forward secrecy.
//!
//! Data flows one way:
//! `config` → `listener` → `tls` (policy, certs, accept) → `http` (server, forward) →
//! `upstream` → backend; `metrics` is a side channel read only by `admin`.
//! `Server` ties them together for the binary and for tests.

#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod certgen;
pub mod cli;
pub mod config;
pub mod http;
pub mod listener;
pub mod loadgen;
mod log_limit;
pub mod metrics;
pub mod tls;
pub mod upstream;

use config::Config;
use listener::{BoundListener, PreparedListener};
use metrics::Metrics;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The config file is invalid (the message names key and line).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A listener's TLS could not be built (certificate, key, policy).
    #[error(transparent)]
    Tls(#[from] tls::accept::TlsSetupError),
    /// An upstream's TLS settings are unusable (CA file missing or empty).
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamSetupError),
    /// An address could not be bound (in use, permission).
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Everything built and checked, nothing bound: what `ephemera check` validates.
pub struct Prepared {
    pub config: Config,
    pub metrics: Metrics,
    pub listeners: Vec<PreparedListener>,
}

impl Prepared {
    /// Load every certificate and build every TLS policy.
    pub fn new(config: Config) -> Result<Prepared, StartError> {
        let metrics = Metrics::new();
        let upstreams = listener::upstreams(&config, &metrics)?;
        let listeners = config
            .listeners
            .iter()
            .map(|l| PreparedListener::new(l, &metrics, &upstreams))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prepared {
            config,
            metrics,
            listeners,
        })
    }
}

/// A bound proxy: listeners and admin have addresses; nothing is served until `run`.
pub struct Server {
    config: Config,
    metrics: Metrics,
    listeners: Vec<BoundListener>,
    admin: admin::Admin,
}

impl Server {
    /// Prepare and bind everything; logs each bound address (port 0 resolves here).
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let Prepared {
            config,
            metrics,
            listeners,
        } = Prepared::new(config)?;
        let mut bound = Vec::new();
        for p in listeners {
            let (name, addr) = (p.cfg.name.clone(), p.cfg.bind);
            let l = p.bind().map_err(|source| StartError::Bind {
                what: format!("listener '{name}'"),
                addr,
                source,
            })?;
            tracing::info!(listener = %name, addr = %l.local_addr, "listening (TLS 1.3)");
            bound.push(l);
        }
        let admin_addr = config.admin.bind;
        let admin = admin::Admin::bind(admin_addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "admin".into(),
                addr: admin_addr,
                source,
            })?;
        tracing::info!(addr = %admin.local_addr, "admin listening (/metrics, /healthz, /readyz)");
        Ok(Server {
            config,
            metrics,
            listeners: bound,
            admin,
        })
    }

    /// `(listener name, bound address)` for each listener.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|l| (l.name().to_string(), l.local_addr))
            .collect()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serve until `signals` counts one stop request; then stop accepting, let in-flight
    /// requests finish for up to `shutdown_grace`, and return. A second stop request during
    /// the drain returns at once.
    ///
    /// Returns false when a listener's accept loop ended on its own (a bug or a fatal socket
    /// error): the proxy then drains and the binary exits non-zero, so a supervisor restarts it.
    pub async fn run(self, mut signals: watch::Receiver<u32>) -> bool {
        let (stop_tx, stop_rx) = watch::channel(false);
        let tracker = TaskTracker::new();
        let mut accept_loops = tokio::task::JoinSet::new();
        for l in self.listeners {
            accept_loops.spawn(l.run(stop_rx.clone(), tracker.clone()));
        }
        let admin = tokio::spawn(self.admin.run(self.metrics.clone(), stop_rx.clone()));

        let mut clean = true;
        tokio::select! {
            stopped = async { signals.wait_for(|n| *n >= 1).await.is_ok() } => {
                if !stopped {
                    // The signal source is gone without a stop request: serve until killed.
                    std::future::pending::<()>().await;
                }
            }
            Some(ended) = accept_loops.join_next() => {
                tracing::error!(result = ?ended, "a listener stopped accepting unexpectedly; shutting down");
                clean = false;
            }
        }
        let grace = self.config.shutdown_grace;
        tracing::info!(grace = ?grace, "shutting down: no new connections; draining in-flight requests");
        let _ = stop_tx.send(true);
        while accept_loops.join_next().await.is_some() {}
        tracker.close();
        tokio::select! {
            _ = tracker.wait() => tracing::info!("all connections drained"),
            _ = tokio::time::sleep(grace) => tracing::warn!(open = tracker.len(), "shutdown_grace passed; closing remaining connections"),
            true = async { signals.wait_for(|n| *n >= 2).await.is_ok() } => tracing::warn!(open = tracker.len(), "second stop signal; exiting now"),
        }
        admin.abort();
        clean
    }
}

/// Human-readable effective policy, printed by `ephemera check`.
pub fn describe(p: &Prepared) -> String {
    use std::fmt::Write;
    let c = &p.config;
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    let mut out = String::new();
    let _ = writeln!(out, "admin: {} (/metrics, /healthz, /readyz)", c.admin.bind);
    let _ = writeln!(out, "shutdown_grace: {}", secs(c.shutdown_grace));
    for l in &p.listeners {
        let cfg = &l.cfg;
        let _ = writeln!(
            out,
            "listener '{}': {} (max_connections {})",
            cfg.name, cfg.bind, cfg.max_connections
        );
        let groups: Vec<_> = cfg.tls.groups.iter().map(|g| g.name()).collect();
        let suites: Vec<_> = tls::policy::CIPHER_SUITES
            .iter()
            .filter_map(|s| s.suite().as_str())
            .collect();
        let _ = writeln!(
            out,
            "  tls: TLSv1.3 only; groups (ECDHE) {}; suites (server order) {}",
            groups.join(", "),
            suites.join(", ")
        );
        let _ = writeln!(
            out,
            "  tls: resumption off (no session cache, no tickets, no 0-RTT); ALPN h2, http/1.1; strict_sni {}; handshake_timeout {}",
            cfg.tls.strict_sni,
            secs(cfg.tls.handshake_timeout)
        );
        let key_update = match cfg.tls.key_update {
            None => "off".to_string(),
            Some(p) => {
                let bytes = p
                    .max_bytes
                    .map(|b| bytesize::ByteSize(b).display().iec().to_string());
                let age = p.max_age.map(secs);
                format!(
                    "forced after max_bytes {} or max_age {} (at most 31 in a row without application data)",
                    bytes.unwrap_or_else(|| "(none)".into()),
                    age.unwrap_or_else(|| "(none)".into())
                )
            }
        };
        let _ = writeln!(out, "  tls: key_update {key_update}");
        for (src, cert) in cfg.tls.certificates.iter().zip(&l.tls.certificates) {
            let expires = time_fmt(cert.not_after);
            let _ = writeln!(
                out,
                "  certificate {}: {:?} key, names [{}], expires {}",
                src.cert,
                cert.algorithm,
                cert.names.join(", "),
                expires
            );
        }
        let h = &cfg.http;
        let _ = writeln!(
            out,
            "  http: header_timeout {}, idle_timeout {}, max_request_body {} bytes, trusted_proxies [{}]",
            secs(h.header_timeout),
            secs(h.idle_timeout),
            h.max_request_body,
            h.trusted_proxies
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let h2 = &h.h2;
        let _ = writeln!(
            out,
            "  http.h2: max_concurrent_streams {}, initial_stream_window {} bytes, initial_connection_window {} bytes, max_header_list_size {} bytes, keepalive_interval {}, keepalive_timeout {}",
            h2.max_concurrent_streams,
            h2.initial_stream_window,
            h2.initial_connection_window,
            h2.max_header_list_size,
            h2.keepalive_interval
                .map(secs)
                .unwrap_or_else(|| "off".into()),
            secs(h2.keepalive_timeout)
        );
        for r in &cfg.routes {
            let host = match &r.host {
                config::HostMatch::Any => "*".to_string(),
                config::HostMatch::Exact(h) => h.clone(),
                config::HostMatch::Suffix(s) => format!("*{s}"),
            };
            let target = match &r.action {
                config::RouteAction::Upstream(i) => format!("upstream '{}'", c.upstreams[*i].name),
                config::RouteAction::Respond { status, body: None } => {
                    format!("respond {status} (built-in TLS summary)")
                }
                config::RouteAction::Respond {
                    status,
                    body: Some(_),
                } => format!("respond {status}"),
            };
            let _ = writeln!(
                out,
                "  route: host {host} path_prefix {} -> {target}",
                r.path_prefix
            );
        }
    }
    for u in &c.upstreams {
        let _ = writeln!(
            out,
            "upstream '{}': {} [{}], connect_timeout {}, response_timeout {}",
            u.name,
            u.protocol.name(),
            u.servers.join(", "),
            secs(u.connect_timeout),
            secs(u.response_timeout)
        );
        if u.protocol.is_h2() {
            let _ = writeln!(
                out,
                "  max_connections {} per server (more only at the server's stream limit)",
                u.max_connections
            );
        }
        if let Some(t) = &u.tls {
            let _ = writeln!(
                out,
                "  tls: verified against {}, server_name {}, ALPN h2, TLS 1.3 preferred, no resumption",
                t.ca.display(),
                t.server_name.as_deref().unwrap_or("(each server's host)")
            );
        }
    }
    out
}

fn time_fmt(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(s) => humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
            .to_string(),
        Err(_) => unix.to_string(),
    }
}
