//! The access log: one line per request, written when its response has been sent (or
//! abandoned), as a tracing event with target `ephemera::access` (so `--log-format json`
//! makes it JSON). Fed by `forward`. The path is logged without its query string, and no
//! header is: queries and headers carry credentials, and nothing secret is ever logged.

use http::{Method, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What is known of a request when it arrives; completed by `finish`.
pub struct AccessEntry {
    started: Instant,
    listener: Arc<str>,
    peer: SocketAddr,
    method: Method,
    path: String,
    version: &'static str,
    group: &'static str,
    key_updates: Arc<AtomicU64>,
    pub status: StatusCode,
    pub upstream: Option<String>,
    /// Time to the response head (the backend's answer, for upstream routes).
    pub head_after: Option<std::time::Duration>,
    pub bytes_sent: u64,
    written: bool,
}

impl AccessEntry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        listener: Arc<str>,
        peer: SocketAddr,
        method: &Method,
        path: &str,
        version: &'static str,
        group: &'static str,
        key_updates: Arc<AtomicU64>,
    ) -> AccessEntry {
        AccessEntry {
            started: Instant::now(),
            listener,
            peer,
            method: method.clone(),
            path: path.to_string(),
            version,
            group,
            key_updates,
            status: StatusCode::OK,
            upstream: None,
            head_after: None,
            bytes_sent: 0,
            written: false,
        }
    }

    pub fn head_sent(&mut self, status: StatusCode) {
        self.status = status;
        self.head_after = Some(self.started.elapsed());
    }

    /// Write the line. `complete`: the response body was handed on to its end.
    pub fn finish(mut self: Box<Self>, complete: bool) {
        self.written = true;
        self.write(complete);
    }

    fn write(&self, complete: bool) {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            target: "ephemera::access",
            listener = %self.listener,
            client = %self.peer.ip().to_canonical(),
            method = %self.method,
            path = %self.path,
            version = self.version,
            status = self.status.as_u16(),
            bytes_sent = self.bytes_sent,
            complete,
            head_ms = self.head_after.map(ms),
            total_ms = ms(self.started.elapsed()),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            tls_group = self.group,
            key_updates = self.key_updates.load(Ordering::Relaxed),
            "request"
        );
    }
}

impl Drop for AccessEntry {
    /// The request ended before a response head was sent (the client reset the stream or
    /// closed the connection while the backend was still working): logged as 499, as nginx
    /// does, since these are the requests an operator looks for.
    fn drop(&mut self) {
        if !self.written {
            self.status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
            self.write(false);
        }
    }
}
