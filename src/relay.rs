//! Byte relay between a client stream and a backend stream, both ways, half-closes passed
//! on (EOF from one side shuts down the other's write side; TLS sends close_notify), until
//! both directions are done, nothing moves for `idle` (or, once `quiet_after` has passed,
//! for `QUIET`: a pause between messages to close in), or `stop` turns true. Used for
//! WebSocket after an upgrade (`http::upgrade`) and by TCP-mode listeners (`tcp`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Once a relay is asked to wind down (`quiet_after`), this long without a byte either way
/// ends it: most protocols pause between messages, and cutting there loses nothing.
pub const QUIET: Duration = Duration::from_secs(1);

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed; bytes client→backend and backend→client.
    Closed(u64, u64),
    /// An I/O error on either side.
    Failed(io::Error),
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// Winding down (`quiet_after` passed) and nothing moved for `QUIET`.
    Quiet,
    /// `stop` turned true.
    Stopped,
}

pub async fn relay<A, B>(
    client: A,
    backend: B,
    idle: Duration,
    quiet_after: Option<Instant>,
    stop: Option<watch::Receiver<bool>>,
) -> RelayEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let mut client = Watched::new(client, last.clone(), epoch);
    let mut backend = Watched::new(backend, last.clone(), epoch);
    let watchdog = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let idle_by = epoch + since + idle;
            let now = Instant::now();
            if now >= idle_by {
                return RelayEnd::Idle;
            }
            let wake = match quiet_after {
                Some(from) if now >= from => {
                    let quiet_by = (epoch + since + QUIET).max(from + QUIET);
                    if now >= quiet_by {
                        return RelayEnd::Quiet;
                    }
                    quiet_by.min(idle_by)
                }
                Some(from) => from.min(idle_by),
                None => idle_by,
            };
            tokio::time::sleep_until(wake).await;
        }
    };
    let stopped = async {
        match stop {
            Some(mut s) => {
                let _ = s.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut backend) => match r {
            Ok((up, down)) => RelayEnd::Closed(up, down),
            Err(e) => RelayEnd::Failed(e),
        },
        end = watchdog => end,
        _ = stopped => RelayEnd::Stopped,
    }
}

pin_project_lite::pin_project! {
    /// Notes the time of every read, for the idle watchdog.
    struct Watched<T> {
        #[pin]
        inner: T,
        last: Arc<AtomicU64>,
        epoch: Instant,
    }
}

impl<T> Watched<T> {
    fn new(inner: T, last: Arc<AtomicU64>, epoch: Instant) -> Self {
        Watched { inner, last, epoch }
    }
}

impl<T: AsyncRead> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(this.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
