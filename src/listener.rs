//! Listeners: bind, the accept loop (connection cap, back-off on EMFILE/ENFILE), and the task
//! per connection: PROXY header, per-address handshake rate, `tls::accept`, then
//! `http::serve_connection` (or `tcp`), counting why the connection ended.
//! First stage after `config`; everything a connection does starts here.

use crate::config::{ListenerConfig, ListenerMode};
use crate::http::route::Router;
use crate::http::{ListenerHttp, serve_connection};
use crate::log_limit::LogLimiter;
use crate::metrics::{CloseReason, HandshakeFailure, ListenerMetrics, Metrics};
use crate::tls::TlsAcceptor;
use crate::tls::accept::TlsSetupError;
use crate::tls::max_age::ConnectionAge;
use crate::tls::rate::HandshakeRateLimiter;
use crate::upstream::{Upstream, UpstreamSetupError};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

const BACKLOG: u32 = 1024;

/// A listener with its TLS built (certificates loaded), not yet bound. Once bound, what its
/// new connections use; a reload swaps in a new one, and live connections keep the old.
pub struct PreparedListener {
    pub cfg: ListenerConfig,
    pub tls: Arc<TlsAcceptor>,
    http: Arc<ListenerHttp>,
    metrics: ListenerMetrics,
    /// `max_connections` permits; kept across a reload that does not change it.
    limit: Arc<Semaphore>,
    /// `tls.handshake_rate_per_ip` buckets; kept across a reload that does not change it.
    rate: Option<Arc<HandshakeRateLimiter>>,
    /// `mode: tcp`: the upstream to relay to, and the idle timeout.
    tcp: Option<(Arc<Upstream>, Duration)>,
}

/// A bound listener, ready to accept.
pub struct BoundListener {
    pub state: Arc<ArcSwap<PreparedListener>>,
    tcp: TcpListener,
    pub local_addr: SocketAddr,
}

impl PreparedListener {
    pub fn new(
        cfg: &ListenerConfig,
        metrics: &Metrics,
        upstreams: &[Arc<Upstream>],
    ) -> Result<PreparedListener, TlsSetupError> {
        let groups: Vec<&str> = cfg.tls.groups.iter().map(|g| g.name()).collect();
        let lm = metrics.listener(&cfg.name, &groups);
        let tls = TlsAcceptor::new(
            &cfg.tls,
            &cfg.name,
            lm.clone(),
            cfg.mode == ListenerMode::Http,
        )?;
        let http = ListenerHttp {
            router: Router::new(cfg.routes.clone()),
            upstreams: upstreams.to_vec(),
            cfg: cfg.http.clone(),
            metrics: lm.clone(),
            certificates: tls.resolver(),
        };
        Ok(PreparedListener {
            cfg: cfg.clone(),
            tls: Arc::new(tls),
            http: Arc::new(http),
            metrics: lm,
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            rate: cfg
                .tls
                .handshake_rate_per_ip
                .map(|r| Arc::new(HandshakeRateLimiter::new(r))),
            tcp: match cfg.mode {
                ListenerMode::Http => None,
                ListenerMode::Tcp {
                    upstream,
                    idle_timeout,
                } => upstreams.get(upstream).map(|u| (u.clone(), idle_timeout)),
            },
        })
    }

    /// Replacing `old` on a live listener: connections already open hold permits of the
    /// old limit, so an unchanged `max_connections` keeps the same one.
    pub fn succeed(&mut self, old: &PreparedListener) {
        if self.cfg.max_connections == old.cfg.max_connections {
            self.limit = old.limit.clone();
        }
        if let (Some(new), Some(old)) = (&self.rate, &old.rate)
            && new.policy() == old.policy()
        {
            self.rate = Some(old.clone());
        }
    }

    pub fn bind(self) -> std::io::Result<BoundListener> {
        let addr = self.cfg.bind;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if self.cfg.reuse_port {
            socket.set_reuseport(true)?;
        }
        // Accepted sockets inherit TCP_NODELAY from the listening socket on Linux: one
        // setsockopt here instead of one per connection.
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        let tcp = socket.listen(BACKLOG)?;
        let local_addr = tcp.local_addr()?;
        Ok(BoundListener {
            state: Arc::new(ArcSwap::from_pointee(self)),
            tcp,
            local_addr,
        })
    }
}

/// Upstream pools for the whole config, indexed like `Config::upstreams`.
pub fn upstreams(
    cfg: &crate::config::Config,
    metrics: &Metrics,
) -> Result<Vec<Arc<Upstream>>, UpstreamSetupError> {
    cfg.upstreams
        .iter()
        .map(|u| Upstream::new(u, metrics.upstream(&u.name, u.protocol.name())).map(Arc::new))
        .collect()
}

impl BoundListener {
    pub fn name(&self) -> String {
        self.state.load().cfg.name.clone()
    }

    /// Accept until `stop` turns true (the proxy shuts down, or a reload removed this
    /// listener). Connections get `shutdown` (true when the proxy drains) and go on
    /// `tracker` so the caller can wait for them to drain.
    pub async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        shutdown: watch::Receiver<bool>,
        tracker: TaskTracker,
    ) {
        let BoundListener {
            state,
            tcp,
            local_addr,
        } = self;
        let log = LogLimiter::new(Duration::from_secs(10), 5);
        let mut backoff = Duration::ZERO;
        loop {
            if *stop.borrow_and_update() {
                break;
            }
            let accepted = tokio::select! {
                a = tcp.accept() => a,
                _ = stop.changed() => continue,
            };
            let (sock, peer) = match accepted {
                Ok(a) => {
                    backoff = Duration::ZERO;
                    a
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS persist until something closes: back off instead
                    // of spinning on an accept that fails at once.
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    if let Some(suppressed) = log.allow() {
                        tracing::warn!(listener = %state.load().cfg.name, %local_addr, error = %e, retry_in = ?backoff, suppressed_since_last = suppressed, "accept failed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        _ = stop.changed() => continue,
                    }
                }
            };
            #[cfg(not(target_os = "linux"))]
            let _ = sock.set_nodelay(true);
            // Read after the accept: a reload while we waited applies to this connection.
            let prepared = state.load();
            let tls = prepared.tls.clone();
            let open = prepared.metrics.connection_opened();
            // At the cap the new connection is closed at once: a client learns it now (and
            // may try another instance) instead of waiting unseen in the backlog.
            let Ok(permit) = prepared.limit.clone().try_acquire_owned() else {
                drop(open);
                tls.refused(
                    HandshakeFailure::ConnectionLimit,
                    &peer,
                    "max_connections reached",
                );
                drop(sock);
                continue;
            };
            let http = prepared.http.clone();
            let metrics = prepared.metrics.clone();
            let rate = prepared.rate.clone();
            let max_age = prepared
                .cfg
                .tls
                .max_connection_age
                .map(|a| (a, prepared.cfg.tls.max_connection_age_grace));
            let shutdown = shutdown.clone();
            let tcp = prepared.tcp.clone();
            let proxied = prepared.cfg.proxy_protocol && http.is_trusted(&peer);
            // Delay our ACK of the ClientHello: the first flight follows within the
            // handshake's computation and carries it, one packet (and its processing on
            // both sides) less per connection (HAProxy's `tcp-smart-accept`). Safe: a
            // TLS 1.3 client sends nothing more until that flight (a Nagle client would
            // wait for our ACK before a second small segment: a load balancer's PROXY
            // header may come in a segment of its own, so not behind one). Per socket:
            // Linux does not pass it on from the listening socket.
            #[cfg(target_os = "linux")]
            if !proxied {
                let _ = rustix::net::sockopt::set_tcp_quickack(&sock, false);
            }
            let handshake_timeout = prepared.cfg.tls.handshake_timeout;
            tracker.spawn(async move {
                let _permit = permit;
                let _open = open;
                let mut sock = sock;
                // Bound to one address, that is the local address: no getsockname per connection.
                let local = if local_addr.ip().is_unspecified() {
                    sock.local_addr().unwrap_or(local_addr)
                } else {
                    local_addr
                };
                let mut peer = peer;
                if proxied {
                    // The load balancer's header names the client; it must come first.
                    let read = tokio::time::timeout(
                        handshake_timeout,
                        crate::proxy_protocol::read_header(&mut sock),
                    )
                    .await;
                    match read {
                        Ok(Ok(Some(client))) => peer = client,
                        Ok(Ok(None)) => {}
                        Ok(Err(crate::proxy_protocol::ProxyHeaderError::Closed)) => {
                            tls.refused(
                                crate::metrics::HandshakeFailure::ClientClosed,
                                &peer,
                                "closed before the PROXY header",
                            );
                            return;
                        }
                        Ok(Err(e)) => {
                            tls.refused(
                                crate::metrics::HandshakeFailure::ProxyProtocol,
                                &peer,
                                &e.to_string(),
                            );
                            return;
                        }
                        Err(_) => {
                            tls.refused(
                                crate::metrics::HandshakeFailure::ProxyProtocol,
                                &peer,
                                "no PROXY header within handshake_timeout",
                            );
                            return;
                        }
                    }
                }
                // Before any crypto: a token per handshake for the client's address (the
                // one a trusted PROXY header named, when there is one).
                if let Some(rate) = rate
                    && !rate.allow(peer.ip())
                {
                    tls.refused(
                        HandshakeFailure::RateLimited,
                        &peer,
                        "over tls.handshake_rate_per_ip",
                    );
                    return;
                }
                // Boxed like the serving below: the handshake's state is freed when it ends.
                // The serving future is built within this statement so that this task does
                // not also keep room for the established stream while it is served (rustls'
                // state inline, over 2 KiB): an async block keeps a local's space, moved away
                // or not, for as long as the local is in scope.
                let serving: Pin<Box<dyn Future<Output = CloseReason> + Send>> =
                    match Box::pin(tls.accept(sock, peer)).await {
                        None => return,
                        Some(est) => {
                            let age = max_age.map(|(a, grace)| ConnectionAge::start(a, grace));
                            // Boxed: this task then holds the handshake's state or a pointer,
                            // never both, and an idle connection costs only what serving it
                            // needs.
                            match tcp {
                                None => Box::pin(serve_connection(
                                    est, peer, local, http, shutdown, age,
                                )),
                                Some((up, idle)) => Box::pin(crate::tcp::serve_connection(
                                    est, peer, local, up, idle, age,
                                )),
                            }
                        }
                    };
                metrics.connection_closed(serving.await);
            });
        }
        tracing::info!(listener = %state.load().cfg.name, %local_addr, "stopped accepting");
    }
}
