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
pub mod hardening;
pub mod http;
pub mod listener;
pub mod loadgen;
mod log_limit;
pub mod metrics;
pub mod proxy_protocol;
pub mod relay;
pub mod reload;
pub mod tcp;
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
        Prepared::with_metrics(config, Metrics::new())
    }

    /// The same, registering into existing `metrics` (a reload: counters carry on).
    pub fn with_metrics(config: Config, metrics: Metrics) -> Result<Prepared, StartError> {
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
    /// The file the config came from; `None` for the embedded default (no reload).
    config_path: Option<std::path::PathBuf>,
    metrics: Metrics,
    listeners: Vec<BoundListener>,
    admin: admin::Admin,
    reload: reload::ReloadHandle,
    reload_rx: tokio::sync::mpsc::Receiver<reload::ReloadRequest>,
}

/// A listener while the server runs.
struct Live {
    /// Unique per accept loop: a listener moved to another address by a reload gets a new
    /// loop (and id) under the same name.
    id: u64,
    name: String,
    /// As configured (port 0 stays 0), to match it against a reloaded config.
    bind: SocketAddr,
    local_addr: SocketAddr,
    state: std::sync::Arc<arc_swap::ArcSwap<PreparedListener>>,
    stop: watch::Sender<bool>,
}

impl Server {
    /// Prepare and bind everything; logs each bound address (port 0 resolves here).
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        // aws-lc seeds its random generator from CPU jitter on first use (about 0.1 s of
        // CPU): pay it here, not in the first client's handshake.
        let _ = tls::policy::provider(&[])
            .secure_random
            .fill(&mut [0u8; 32]);
        let metrics = Metrics::new();
        let Prepared {
            config,
            metrics,
            listeners,
        } = Prepared::with_metrics(config, metrics)?;
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
        tracing::info!(addr = %admin.local_addr, "admin listening (/metrics, /healthz, /readyz, POST /reload)");
        if config.keylog().is_some() {
            metrics.keylog_enabled();
        }
        let (reload, reload_rx) = reload::ReloadHandle::new();
        Ok(Server {
            config,
            config_path: None,
            metrics,
            listeners: bound,
            admin,
            reload,
            reload_rx,
        })
    }

    /// Reload from `path` on SIGHUP or `POST /reload` (the file the config was read from).
    pub fn reload_from(mut self, path: std::path::PathBuf) -> Server {
        self.config_path = Some(path);
        self
    }

    /// Asks the running server to reload (SIGHUP does this).
    pub fn reload_handle(&self) -> reload::ReloadHandle {
        self.reload.clone()
    }

    /// `(listener name, bound address)` for each listener.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|l| (l.name(), l.local_addr))
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
    /// the drain returns at once. Reload requests are applied as they come.
    ///
    /// Returns false when a listener's accept loop ended on its own (a bug or a fatal socket
    /// error): the proxy then drains and the binary exits non-zero, so a supervisor restarts it.
    pub async fn run(self, mut signals: watch::Receiver<u32>) -> bool {
        let Server {
            mut config,
            config_path,
            metrics,
            listeners,
            admin,
            reload,
            mut reload_rx,
        } = self;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let tracker = TaskTracker::new();
        let mut accept_loops = tokio::task::JoinSet::new();
        let mut live = Vec::new();
        let mut cert_series = metrics.certificates_changed(&[], &listeners_certs(&listeners));
        let mut policy_series = metrics.policies_in_force(&[], &listeners_policies(&listeners));
        for l in listeners {
            live.push(start_listener(
                l,
                &mut accept_loops,
                shutdown_rx.clone(),
                &tracker,
            ));
        }
        let admin = tokio::spawn(admin.run(
            metrics.clone(),
            shutdown_rx.clone(),
            Some(reload),
            config.admin.token_file.clone(),
        ));

        let mut clean = true;
        loop {
            tokio::select! {
                stopped = async { signals.wait_for(|n| *n >= 1).await.is_ok() } => {
                    if !stopped {
                        // The signal source is gone without a stop request: serve until killed.
                        std::future::pending::<()>().await;
                    }
                    break;
                }
                Some(req) = reload_rx.recv() => {
                    let result = match &config_path {
                        None => Err(reload::ReloadError::NoConfigFile),
                        Some(path) => apply_reload(
                            path,
                            &metrics,
                            &mut config,
                            &mut live,
                            &mut cert_series,
                            &mut policy_series,
                            &mut accept_loops,
                            &shutdown_rx,
                            &tracker,
                        ),
                    };
                    match &result {
                        Ok(summary) => {
                            metrics.config_reload(true);
                            tracing::info!(%summary, "config reloaded");
                        }
                        Err(e) => {
                            metrics.config_reload(false);
                            tracing::error!(error = %e, "config reload failed; the previous config keeps serving");
                        }
                    }
                    let _ = req.reply.send(result);
                }
                Some(ended) = accept_loops.join_next() => {
                    match ended {
                        // A listener a reload removed.
                        Ok(id) if !live.iter().any(|l| l.id == id) => continue,
                        other => {
                            tracing::error!(result = ?other, "a listener stopped accepting unexpectedly; shutting down");
                            clean = false;
                            break;
                        }
                    }
                }
            }
        }
        // No reload during the drain: a POST /reload waiting now gets its answer at once.
        reload_rx.close();
        while let Ok(req) = reload_rx.try_recv() {
            let _ = req.reply.send(Err(reload::ReloadError::ShuttingDown));
        }
        let grace = config.shutdown_grace;
        tracing::info!(grace = ?grace, "shutting down: no new connections; draining in-flight requests");
        let _ = shutdown_tx.send(true);
        for l in &live {
            let _ = l.stop.send(true);
        }
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

fn start_listener(
    l: BoundListener,
    accept_loops: &mut tokio::task::JoinSet<u64>,
    shutdown: watch::Receiver<bool>,
    tracker: &TaskTracker,
) -> Live {
    let (stop, stop_rx) = watch::channel(false);
    let cfg = &l.state.load().cfg;
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let entry = Live {
        id,
        name: cfg.name.clone(),
        bind: cfg.bind,
        local_addr: l.local_addr,
        state: l.state.clone(),
        stop,
    };
    let tracker2 = tracker.clone();
    accept_loops.spawn(async move {
        l.run(stop_rx, shutdown, tracker2).await;
        id
    });
    entry
}

/// `(listener, groups)` of each listener, for `ephemera_tls_policy_info`.
fn listeners_policies(listeners: &[BoundListener]) -> Vec<(String, String)> {
    listeners
        .iter()
        .map(|l| policy_of(&l.state.load()))
        .collect()
}

fn policy_of(p: &PreparedListener) -> (String, String) {
    let groups: Vec<&str> = p.cfg.tls.groups.iter().map(|g| g.name()).collect();
    (p.cfg.name.clone(), groups.join(","))
}

/// `(listener, certificate label, expiry)` of every certificate of `listeners`.
fn listeners_certs(listeners: &[BoundListener]) -> Vec<(String, String, i64)> {
    listeners
        .iter()
        .flat_map(|l| prepared_certs(&l.state.load()))
        .collect()
}

fn prepared_certs(p: &PreparedListener) -> Vec<(String, String, i64)> {
    p.tls
        .certificates
        .iter()
        .zip(&p.cfg.tls.certificates)
        .map(|(c, src)| {
            // The certificate's first DNS name: a bounded set from the config, never a
            // client's SNI. A certificate without one is named by its file.
            let label = c
                .names
                .first()
                .cloned()
                .unwrap_or_else(|| src.cert.to_string());
            (p.cfg.name.clone(), label, c.not_after)
        })
        .collect()
}

/// Load `path` and apply it to the running listeners, or change nothing.
#[allow(clippy::too_many_arguments)]
fn apply_reload(
    path: &std::path::Path,
    metrics: &Metrics,
    config: &mut Config,
    live: &mut Vec<Live>,
    cert_series: &mut Vec<(String, String)>,
    policy_series: &mut Vec<(String, String)>,
    accept_loops: &mut tokio::task::JoinSet<u64>,
    shutdown: &watch::Receiver<bool>,
    tracker: &TaskTracker,
) -> reload::ReloadResult {
    let rejected = |e: &dyn std::fmt::Display| reload::ReloadError::Rejected(e.to_string());
    let mut new_config = Config::load(path).map_err(|e| rejected(&e))?;
    // --keylog is a flag of the process, not of the file: it stays across reloads.
    new_config.set_keylog(config.keylog());
    let prepared = Prepared::with_metrics(new_config, metrics.clone()).map_err(|e| rejected(&e))?;
    // A listener keeps its socket when its address stays: the same configured address (for
    // port 0, with the same name) or the address it is bound to now.
    let same = |l: &Live, p: &PreparedListener| {
        (l.bind == p.cfg.bind && (p.cfg.bind.port() != 0 || l.name == p.cfg.name))
            || l.local_addr == p.cfg.bind
    };
    // Bind every new address before changing anything, so a failure changes nothing.
    let mut swaps = Vec::new();
    let mut added = Vec::new();
    for p in prepared.listeners {
        match live.iter().position(|l| same(l, &p)) {
            Some(i) => swaps.push((i, p)),
            None => {
                let (name, addr) = (p.cfg.name.clone(), p.cfg.bind);
                let bound = p.bind().map_err(|e| {
                    reload::ReloadError::Rejected(format!(
                        "cannot bind listener '{name}' on {addr}: {e}"
                    ))
                })?;
                added.push(bound);
            }
        }
    }
    if prepared.config.admin.bind != config.admin.bind {
        tracing::warn!(old = %config.admin.bind, new = %prepared.config.admin.bind, "admin.bind changes only at restart");
    }
    if prepared.config.admin.token_file != config.admin.token_file {
        tracing::warn!(
            "admin.token_file (adding, removing or moving it) changes only at restart; the file's content is read at each request"
        );
    }
    let mut certs = Vec::new();
    let mut kept = vec![false; live.len()];
    for (i, mut p) in swaps {
        kept[i] = true;
        p.succeed(&live[i].state.load());
        certs.extend(prepared_certs(&p));
        live[i].name = p.cfg.name.clone();
        live[i].bind = p.cfg.bind;
        live[i].state.store(std::sync::Arc::new(p));
    }
    let mut i = 0;
    live.retain(|l| {
        let keep = kept[i];
        i += 1;
        if !keep {
            tracing::info!(listener = %l.name, addr = %l.local_addr, "listener removed by reload; its connections finish");
            let _ = l.stop.send(true);
        }
        keep
    });
    for l in added {
        certs.extend(prepared_certs(&l.state.load()));
        tracing::info!(listener = %l.name(), addr = %l.local_addr, "listening (TLS 1.3)");
        live.push(start_listener(l, accept_loops, shutdown.clone(), tracker));
    }
    *cert_series = metrics.certificates_changed(cert_series, &certs);
    let policies: Vec<(String, String)> = live.iter().map(|l| policy_of(&l.state.load())).collect();
    *policy_series = metrics.policies_in_force(policy_series, &policies);
    *config = prepared.config;
    let summary: Vec<String> = live
        .iter()
        .map(|l| format!("listener '{}' {}", l.name, l.local_addr))
        .collect();
    Ok(summary.join("; "))
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
            "listener '{}': {} (max_connections {}{})",
            cfg.name,
            cfg.bind,
            cfg.max_connections,
            if cfg.reuse_port { ", reuse_port" } else { "" }
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
