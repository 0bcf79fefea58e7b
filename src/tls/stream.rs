//! The client's established TLS stream as handed to `http`, and its lingering close.
//!
//! hyper owns the stream while serving and drops it when the connection ends. Dropping a
//! socket with unread bytes in its receive queue makes the kernel send RST, and the client
//! then loses the tail of a response still in flight. So `ClientStream` hands the TLS stream
//! back to the connection task on drop, which sends close_notify + FIN and then reads and
//! discards until the client closes or `LINGER` passes (`close_lingering`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;

/// Upper bound on the whole lingering close (close_notify, FIN, draining the client's bytes).
pub const LINGER: Duration = Duration::from_secs(2);

pub type ServerTls = TlsStream<TcpStream>;

/// A TLS stream that returns itself to the connection task when dropped.
pub struct ClientStream {
    inner: Option<ServerTls>,
    on_drop: Option<oneshot::Sender<ServerTls>>,
}

impl ClientStream {
    /// The receiver gets the stream back once hyper drops it.
    pub fn new(stream: ServerTls) -> (ClientStream, oneshot::Receiver<ServerTls>) {
        let (tx, rx) = oneshot::channel();
        (
            ClientStream {
                inner: Some(stream),
                on_drop: Some(tx),
            },
            rx,
        )
    }

    fn io(&mut self) -> Pin<&mut ServerTls> {
        Pin::new(self.inner.as_mut().expect("stream present until drop"))
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if let (Some(stream), Some(tx)) = (self.inner.take(), self.on_drop.take()) {
            // The receiver may be gone (task aborted): then the stream just closes.
            let _ = tx.send(stream);
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        // rustls encrypts one vectored write into one record: hyper then sends a small
        // response's head and body together.
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// close_notify + FIN, then drain what the client still sends (its KeyUpdate answers, a
/// pipelined request we will not serve) until it closes or `LINGER` passes.
pub async fn close_lingering(mut stream: ServerTls) {
    let deadline = tokio::time::Instant::now() + LINGER;
    let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
    let (mut tcp, _) = stream.into_inner();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}
