//! HTTP/1.1 backend connections for one server: idle keep-alive connections are parked here
//! between requests. `upstream` takes one (or opens one) per request and hands it back once
//! the response body has been read to the end.

use super::connect::BackendIo;
use crate::body::ProxyBody;
use crate::metrics::UpstreamMetrics;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
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

    /// Park `conn` once its current response has been read to the end (hyper's `ready`): at
    /// once if hyper already wants the next request, else from a task that waits for it.
    fn give_back(self: &Arc<Self>, mut conn: Conn) {
        if conn.sender.is_ready() {
            self.park(conn);
            return;
        }
        // A body can be dropped outside the runtime (as it shuts down): the connection closes.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.clone();
        rt.spawn(async move {
            if conn.sender.ready().await.is_ok() {
                pool.park(conn);
            }
        });
    }

    fn park(&self, mut conn: Conn) {
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: `prune(true)` bumps it before taking the lock to empty the
        // pool, so a connection to an old address is either refused here or emptied there.
        if conn.generation == self.generation.load(Ordering::Acquire) && idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body from a pooled connection, which goes back to the pool when the body
    /// has been read to the end: usually hyper then already wants the next request, and the
    /// connection is parked without a task to wait for that (as it was for every response).
    /// Dropped before its end, the connection is handed to such a task (hyper closes it, or
    /// reads the rest and parks it).
    pub struct Returning {
        #[pin]
        body: Incoming,
        conn: Option<(Arc<Pool>, Conn)>,
    }

    impl PinnedDrop for Returning {
        fn drop(this: Pin<&mut Self>) {
            if let Some((pool, conn)) = this.project().conn.take() {
                pool.give_back(conn);
            }
        }
    }
}

impl Returning {
    pub fn new(body: Incoming, pool: Arc<Pool>, conn: Conn) -> Returning {
        let mut r = Returning {
            body,
            conn: Some((pool, conn)),
        };
        if r.body.is_end_stream()
            && let Some((pool, conn)) = r.conn.take()
        {
            pool.give_back(conn);
        }
        r
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = std::task::ready!(this.body.as_mut().poll_frame(cx));
        // hyper's servers stop polling a body that says it has ended after a frame.
        let ended = match &polled {
            Some(Ok(_)) => this.body.is_end_stream(),
            None => true,
            // The connection is closed or will be; the drop hands it to the waiting task.
            Some(Err(_)) => false,
        };
        if ended && let Some((pool, conn)) = this.conn.take() {
            pool.give_back(conn);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
