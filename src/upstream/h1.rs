//! HTTP/1.1 backend connections for one server: idle keep-alive connections are parked here
//! between requests. `upstream` takes one (or opens one) per request and hands it back once
//! the response body has been read to the end.

use super::connect::BackendIo;
use crate::body::ProxyBody;
use crate::metrics::UpstreamMetrics;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Idle connections older than this are not reused: backends close idle keep-alive
/// connections on their own schedule (often 5–60 s) and reusing one they just closed fails.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per server; extra ones are closed.
const MAX_IDLE: usize = 256;

/// A live HTTP/1.1 connection: the send half plus the task driving it (aborted on drop,
/// unless detached).
pub struct Conn {
    pub sender: http1::SendRequest<ProxyBody>,
    driver: Option<JoinHandle<()>>,
    idle_since: Instant,
    /// The pool's generation when this connection was opened.
    generation: u64,
}

impl Conn {
    /// Let the driver run on its own: it hands the connection to a protocol upgrade.
    pub fn detach(mut self) {
        self.driver = None;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(d) = &self.driver {
            d.abort();
        }
    }
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Conn>>,
    /// Bumped when the server's address changes: older connections are not parked again.
    generation: AtomicU64,
}

impl Pool {
    /// The most recently used idle connection that is still open and young enough.
    pub fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(c) = idle.pop() {
            if c.idle_since.elapsed() < IDLE_TIMEOUT && c.sender.is_ready() {
                return Some(c);
            }
        }
        None
    }

    /// Close idle connections that are too old or closed by the backend; with `all`, every
    /// idle connection (the server's address changed).
    pub fn prune(&self, all: bool) {
        if all {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| !all && c.idle_since.elapsed() < IDLE_TIMEOUT && c.sender.is_ready());
    }

    /// Park `conn` once its current response has been read to the end (hyper's `ready`).
    pub fn give_back(self: &Arc<Self>, mut conn: Conn) {
        let pool = self.clone();
        tokio::spawn(async move {
            let current = pool.generation.load(Ordering::Acquire);
            if conn.sender.ready().await.is_ok() && conn.generation == current {
                conn.idle_since = Instant::now();
                let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < MAX_IDLE {
                    idle.push(conn);
                }
            }
        });
    }
}

impl Pool {
    /// The current generation, for a connection about to be opened.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// HTTP/1.1 handshake on a fresh connection; the driver task keeps it counted as open.
pub async fn handshake(
    io: BackendIo,
    server: &str,
    generation: u64,
    metrics: &UpstreamMetrics,
) -> Result<Conn, hyper::Error> {
    // hyper buffers up to ~400 KiB per direction by default; a client that stops reading
    // would hold that much per connection here (and again on its side) until idle_timeout.
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(crate::http::MAX_H1_BUFFER)
        .handshake(TokioIo::new(io))
        .await?;
    let addr = server.to_string();
    let open = metrics.connection_opened();
    let driver = tokio::spawn(async move {
        let _open = open;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(server = %addr, error = %e, "backend connection ended with an error");
        }
    });
    Ok(Conn {
        sender,
        driver: Some(driver),
        idle_since: Instant::now(),
        generation,
    })
}
