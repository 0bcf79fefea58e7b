//! The client's established TLS stream as handed to `http` (or any byte relay): it forces
//! KeyUpdates by policy (`tls::rekey`), records per-connection figures, and returns the TLS
//! stream to the connection task when dropped, for the lingering close.
//!
//! Held-back flushes (HTTP/2 only): a flush asked for while the client's next bytes already
//! wait decrypted in rustls is held back, because the caller reads them next and flushes again
//! (h2 flushes at the end of every poll of the connection): the answers then share one write.
//! On a new HTTP/2 connection this puts the server SETTINGS, WINDOW_UPDATE and SETTINGS ACK
//! into one record write instead of two (one write of five per handshake-and-request), and
//! `first_flight` holds that write on for the first response.
//!
//! The last response (HTTP/1.x): when the HTTP layer knows the connection closes after the
//! response being written (`LastResponse`), flushes are held back for the rest of that poll
//! of the connection, because hyper shuts the stream down in the same poll: the response and
//! close_notify then leave in one write. Should the poll end without the shutdown, the task
//! is woken and the next poll's flush writes them. Only inside the HTTP/1.x driver's polls:
//! a relay that takes the stream over after an upgrade writes as usual.
//!
//! Lingering close: hyper owns the stream while serving and drops it when the connection
//! ends. Dropping a socket with unread bytes in its receive queue (the client's KeyUpdate
//! answers, a pipelined request) makes the kernel send RST, and the client then loses the
//! tail of a response still in flight. So the connection task gets the stream back, sends
//! close_notify + FIN, and reads and discards until the client closes or `LINGER` passes.
//! Not when the client is done (`LastResponse::set_client_done`: it asked for the close and
//! sent its whole request, and no forced KeyUpdate awaits its answer) and nothing of it is
//! waiting in the socket: such a client may send no further request (RFC 9112 §9.6) and
//! nothing else before it has read our close_notify, so the socket closes at once, much like
//! nginx's `lingering_close on`, instead of waiting out the client's round trip; our FIN then
//! goes with the close (no shutdown call), or before the drain if bytes of it are waiting. The
//! check is one moment's: late bytes of a client that breaks the rule draw a RST (as with
//! nginx).

use super::first_flight::FirstFlight;
use super::rekey::{Decision, Rekey, Trigger};
use crate::config::KeyUpdatePolicy;
use crate::metrics::RekeyMetrics;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;

/// Upper bound on the whole lingering close (close_notify, FIN, draining the client's bytes).
pub const LINGER: Duration = Duration::from_secs(2);

pub type ServerTls = TlsStream<TcpStream>;

/// What the connection task gets back when the `ClientStream` is dropped.
pub struct Closed {
    pub stream: ServerTls,
    /// close_notify already went out, and our FIN too unless `peer_done` or `client_done`
    /// (then it goes with the close, or before a drain).
    pub shut_down: bool,
    /// The client's FIN was read, or its close_notify with no KeyUpdate of ours to answer:
    /// nothing more can arrive, so there is nothing to drain, and closing the socket sends
    /// our FIN without the risk of a reset. (A close_notify after our KeyUpdates is not
    /// enough: a client may still answer one after it.)
    pub peer_done: bool,
    /// The client is done (see `LastResponse::set_client_done`) and was sent no KeyUpdate:
    /// the close need not wait for it unless bytes of it are already waiting.
    pub client_done: bool,
}

/// An established client connection: TLS, forced key updates, return-on-drop.
pub struct ClientStream {
    inner: Option<ServerTls>,
    rekey: Rekey,
    /// A KeyUpdate is queued in rustls but not yet written to the socket.
    flush_pending: bool,
    /// A forced update failed: rustls has queued a fatal alert, so the connection is over.
    failed: Option<String>,
    metrics: RekeyMetrics,
    id: u64,
    accepted: Instant,
    /// Boxed: a channel of `Closed` would hold room for the TLS stream (over 1 KiB) for
    /// the whole life of the connection.
    on_drop: Option<oneshot::Sender<Box<Closed>>>,
    /// close_notify and FIN were sent (hyper shut the stream down itself); the FIN is left
    /// for the close when the client was done (see `Closed::shut_down`).
    shut_down: bool,
    /// Forced key updates so far, readable by the HTTP layer (access log).
    updates_seen: Arc<AtomicU64>,
    /// Flushes may be held back while input waits (see the module comment): HTTP/2.
    coalesce: bool,
    /// Records are queued in rustls that a held-back flush has not written yet.
    owed: bool,
    /// The task was woken once to come back for an owed flush.
    owed_woken: bool,
    /// The client's FIN was read (end of stream without close_notify).
    peer_fin: bool,
    /// The client's close_notify was read (or a read after tokio-rustls saw the connection
    /// aborted: it is dead then anyway).
    peer_closed: bool,
    /// Shared with the HTTP layer: the connection closes after the response being written.
    last: Arc<LastResponse>,
    /// Records of the last response are held in rustls since a poll of the connection;
    /// they are held on only while that poll lasts (`LastResponse::held`).
    held_back: bool,
    /// HTTP/2: the server's first SETTINGS and WINDOW_UPDATE frames, held for the first
    /// response (see `first_flight`).
    first: FirstFlight,
    /// Not HTTP/2: the client's handshake has yet to be acknowledged at once if its request
    /// is not already there (see `ack_the_handshake`).
    ack_owed: bool,
}

/// Shared by an HTTP/1.x connection's driver and its `ClientStream`: whether the response
/// being written is the connection's last, and the polls of the connection (`poll_with`),
/// the only place where its flushes are held.
#[derive(Default)]
pub struct LastResponse {
    closing: AtomicBool,
    /// Inside `poll_with`: outside it (a relay after an upgrade) nothing is held.
    in_poll: AtomicBool,
    /// A flush was held in the current poll (cleared when the poll ends).
    held: AtomicBool,
    /// The client asked for the close and sent its whole request.
    client_done: AtomicBool,
    /// A request without a body arrived on the connection (HTTP/2's first flight may wait
    /// for its response: `first_flight`).
    request_arrived: AtomicBool,
}

impl LastResponse {
    /// The connection closes once the response being written is sent.
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// The client asked for the close and has sent all of its request (it had no body): it
    /// sends nothing more until it has read the response, so the close need not linger.
    pub fn set_client_done(&self) {
        self.client_done.store(true, Ordering::Relaxed);
    }

    /// A request whose response needs nothing more from the client arrived (hyper hands it
    /// to the service in the connection's own task).
    pub fn set_request_arrived(&self) {
        self.request_arrived.store(true, Ordering::Relaxed);
    }

    /// One poll of the connection (`f`). Flushes held in it are written by the next poll's
    /// flush: if the poll ends Pending with a flush held (no shutdown came), the task is
    /// woken for that next poll.
    pub fn poll_with<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.in_poll.store(true, Ordering::Relaxed);
        let r = f(cx);
        self.in_poll.store(false, Ordering::Relaxed);
        if self.held.swap(false, Ordering::Relaxed) && r.is_pending() {
            cx.waker().wake_by_ref();
        }
        r
    }
}

impl ClientStream {
    /// The receiver gets the TLS stream back once the `ClientStream` is dropped. `coalesce`:
    /// hold flushes back while input waits (HTTP/2, whose connection flushes once per poll).
    pub fn new(
        stream: ServerTls,
        coalesce: bool,
        policy: Option<KeyUpdatePolicy>,
        metrics: RekeyMetrics,
        id: u64,
        accepted: Instant,
    ) -> (ClientStream, oneshot::Receiver<Box<Closed>>) {
        let (tx, rx) = oneshot::channel();
        let s = ClientStream {
            inner: Some(stream),
            rekey: Rekey::new(policy),
            flush_pending: false,
            failed: None,
            metrics,
            id,
            accepted,
            on_drop: Some(tx),
            shut_down: false,
            updates_seen: Arc::new(AtomicU64::new(0)),
            coalesce,
            owed: false,
            owed_woken: false,
            peer_fin: false,
            peer_closed: false,
            last: Arc::default(),
            held_back: false,
            first: FirstFlight::new(coalesce),
            ack_owed: !coalesce,
        };
        (s, rx)
    }

    /// Forced key updates on this connection so far (shared, live).
    pub fn key_updates(&self) -> Arc<AtomicU64> {
        self.updates_seen.clone()
    }

    /// For the HTTP layer: says when the response being written is the connection's last,
    /// whose flushes are then held for the shutdown that follows (see the module comment).
    pub fn last_response(&self) -> Arc<LastResponse> {
        self.last.clone()
    }

    fn io(&mut self) -> Pin<&mut ServerTls> {
        Pin::new(self.inner.as_mut().expect("stream present until drop"))
    }

    fn force(&mut self, cx: &mut Context<'_>, trigger: Trigger) {
        if self.rekey.decide(&self.metrics) == Decision::Defer {
            tracing::debug!(
                conn = self.id,
                trigger = trigger.label(),
                "key update deferred: 31 unanswered in a row"
            );
            return;
        }
        let result = self.io().get_mut().get_mut().1.refresh_traffic_keys();
        if let Err(e) = &result {
            tracing::warn!(conn = self.id, trigger = trigger.label(), error = %e, "key update failed; closing the connection");
            self.failed = Some(e.to_string());
        } else {
            tracing::debug!(
                conn = self.id,
                trigger = trigger.label(),
                n = self.rekey.updates + 1,
                "key update sent"
            );
        }
        self.rekey.updated(trigger, result.is_ok(), &self.metrics);
        self.updates_seen
            .store(self.rekey.updates, std::sync::atomic::Ordering::Relaxed);
        self.flush_pending = true;
        self.flush_key_update(cx);
    }

    /// Write a queued KeyUpdate out now, even from the read side: tokio-rustls writes records
    /// only from poll_write/poll_flush, and an idle connection has no writes coming.
    fn flush_key_update(&mut self, cx: &mut Context<'_>) {
        if self.flush_pending {
            // An error surfaces on the next write.
            let _ = self.flush_now(cx);
        }
    }

    /// Write everything queued in rustls to the socket.
    fn flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.io().poll_flush(cx);
        if r.is_ready() {
            self.first.sent();
            self.flush_pending = false;
            self.owed = false;
            self.owed_woken = false;
            self.held_back = false;
        }
        r
    }

    /// Writing the last response, in the poll where its flushes are held (or none was yet).
    fn holding_last(&self) -> bool {
        self.last.closing.load(Ordering::Relaxed)
            && self.last.in_poll.load(Ordering::Relaxed)
            && (!self.held_back || self.last.held.load(Ordering::Relaxed))
    }

    /// The client's next bytes are decrypted and waiting: the caller is about to read them.
    fn input_waiting(&mut self) -> bool {
        use std::io::BufRead;
        let conn = self.io().get_mut().get_mut().1;
        matches!(conn.reader().fill_buf(), Ok(b) if !b.is_empty())
    }

    /// Queue a write in rustls without writing to the socket, when flushes are held back;
    /// `None`: take the usual path (rustls' buffer is full, or nothing waits).
    fn hold_write(&mut self, bufs: &[io::IoSlice<'_>]) -> Option<usize> {
        let last = self.holding_last();
        if !(last || self.coalesce && self.input_waiting()) {
            return None;
        }
        let n = self.queue(bufs)?;
        if last {
            self.held_for_last();
        }
        Some(n)
    }

    /// Queue `bufs` in rustls without writing to the socket: the records are owed. `None`:
    /// rustls took nothing (its buffer is full).
    fn queue(&mut self, bufs: &[io::IoSlice<'_>]) -> Option<usize> {
        use std::io::Write;
        let conn = self.io().get_mut().get_mut().1;
        match conn.writer().write_vectored(bufs) {
            Ok(n) if n > 0 => {
                self.owed = true;
                Some(n)
            }
            _ => None,
        }
    }

    /// Queue a write of HTTP/2 setup frames in rustls while the first flight is held (see
    /// `first_flight`); `None`: this write goes the usual way, and takes held records along.
    fn hold_first_flight(&mut self, bufs: &[io::IoSlice<'_>]) -> Option<usize> {
        if !self.first.holds(bufs) {
            return None;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = self.queue(bufs);
        if n == Some(total) {
            self.first.queued();
        } else {
            // Taken in part (the rest starts inside a frame) or not at all: no more
            // sniffing, the next write sends everything.
            self.first = FirstFlight::Over;
        }
        n
    }

    /// Records of the last response are held in this poll; `LastResponse::poll_with` makes
    /// sure a next poll comes to write them if this one ends without the shutdown.
    fn held_for_last(&mut self) {
        if !self.held_back {
            self.held_back = true;
            self.last.held.store(true, Ordering::Relaxed);
        }
    }

    fn write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.failure() {
            return Poll::Ready(Err(e));
        }
        self.flush_key_update(cx);
        let held = match self.hold_first_flight(bufs) {
            Some(n) => Some(n),
            None => self.hold_write(bufs),
        };
        let r = match held {
            Some(n) => Poll::Ready(Ok(n)),
            None => self.io().poll_write_vectored(cx, bufs),
        };
        if let Poll::Ready(Ok(n)) = r
            && let Some(trigger) = self.rekey.on_write(n)
        {
            self.force(cx, trigger);
        }
        r
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        self.metrics
            .per_connection
            .observe(self.rekey.updates as f64);
        self.metrics.bytes.observe(self.rekey.total_bytes as f64);
        self.metrics
            .duration
            .observe(self.accepted.elapsed().as_secs_f64());
        if let (Some(stream), Some(tx)) = (self.inner.take(), self.on_drop.take()) {
            // The receiver may be gone (task aborted): then the stream just closes.
            let _ = tx.send(Box::new(Closed {
                stream,
                shut_down: self.shut_down,
                peer_done: self.peer_done(),
                client_done: self.client_done(),
            }));
        }
    }
}

impl ClientStream {
    /// The first read finds no request after the handshake: acknowledge the client's Finished
    /// now. By then the kernel delays its ACKs (the connection looks interactive), and a client
    /// with Nagle's algorithm (no `TCP_NODELAY`: Python's plain sockets, for one) holds a
    /// request written after the handshake until its Finished is acknowledged: nothing of ours
    /// would carry that ACK before the delayed-ACK timer, 40 ms. A request that came with the
    /// Finished costs nothing here. HTTP/2 needs none: the server's SETTINGS carry the ACK.
    fn ack_the_handshake(&mut self) {
        self.ack_owed = false;
        if self.rekey.total_bytes == 0 {
            #[cfg(target_os = "linux")]
            let _ = rustix::net::sockopt::set_tcp_quickack(self.io().get_ref().0, true);
        }
    }

    /// Nothing more comes from the client: its FIN was read, or its close_notify when it has
    /// no KeyUpdate of ours to answer (after close_notify a TLS 1.3 peer sends nothing, but
    /// some answer a KeyUpdate still: Go after `CloseWrite`).
    fn peer_done(&self) -> bool {
        self.peer_fin || self.peer_closed && self.rekey.updates == 0
    }

    fn client_done(&self) -> bool {
        self.last.client_done.load(Ordering::Relaxed) && self.rekey.updates == 0
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|e| io::Error::other(format!("forced key update failed: {e}")))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.failure() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = self.io().poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n == 0 && buf.remaining() > 0 && matches!(r, Poll::Ready(Ok(()))) {
            self.peer_closed = true;
        }
        match &r {
            // rustls reports a FIN without close_notify this way; after close_notify it
            // returns Ok(0) and reads no further, so a FIN behind it is not seen.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => self.peer_fin = true,
            // An owed flush must not wait for the client: come back once (h2 normally
            // flushes before then), and write it on the next read that would block.
            Poll::Pending if self.owed => {
                let arrived = self.last.request_arrived.load(Ordering::Relaxed);
                if self.first.read_blocked(cx, arrived) {
                    // HTTP/2's first flight, held for the response (see `first_flight`).
                } else if !self.io().get_ref().1.wants_write() {
                    // A write that could not be held has already sent the records.
                    self.owed = false;
                    self.owed_woken = false;
                } else if self.owed_woken {
                    let _ = self.flush_now(cx);
                } else {
                    self.owed_woken = true;
                    cx.waker().wake_by_ref();
                }
            }
            _ => {}
        }
        if r.is_pending() && self.ack_owed {
            self.ack_the_handshake();
        }
        let mut due = self.rekey.on_read(n);
        // The age timer is polled only when the read parks, so the busy path stays a compare.
        if due.is_none() && r.is_pending() {
            due = self.rekey.poll_age(cx);
        }
        match due {
            Some(trigger) => self.force(cx, trigger),
            None => self.flush_key_update(cx),
        }
        r
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // rustls encrypts one vectored write into one record: hyper then sends a small
        // response's head and body together.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.first.holding(cx) {
            // HTTP/2's first flight waits for the first response (see `first_flight`).
            return Poll::Ready(Ok(()));
        }
        if self.coalesce && self.input_waiting() {
            // Held back: the caller reads the waiting input and flushes again after it.
            self.owed = self.owed || self.io().get_ref().1.wants_write();
            return Poll::Ready(Ok(()));
        }
        if self.holding_last() && self.io().get_ref().1.wants_write() {
            // Held for the shutdown that follows in this poll (hyper's last act).
            self.held_for_last();
            self.owed = true;
            return Poll::Ready(Ok(()));
        }
        self.flush_now(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.peer_done() {
            // The client sends nothing more: close_notify now, our FIN when the socket
            // closes (a shutdown call and a drain read would add nothing). rustls queues
            // close_notify once, however often this is asked.
            self.io().get_mut().get_mut().1.send_close_notify();
            let r = self.flush_now(cx);
            if r.is_ready() {
                self.shut_down = true;
            }
            return r;
        }
        if self.client_done() {
            // close_notify now; our FIN either goes with the close or, if bytes of the
            // client turn out to be waiting, before the drain (`close_lingering` looks).
            // Most closes then take no shutdown call.
            self.io().get_mut().get_mut().1.send_close_notify();
            let r = self.flush_now(cx);
            if let Poll::Ready(Ok(())) = r {
                self.shut_down = true;
            }
            return r;
        }
        let r = self.io().poll_shutdown(cx);
        if r.is_ready() {
            self.shut_down = true;
        }
        r
    }
}

/// close_notify + FIN (unless already sent), then drain what the client still sends (its
/// KeyUpdate answers, a pipelined request we will not serve) until it closes or `LINGER`
/// passes; a client that is done, with nothing of it waiting, is not waited for.
pub async fn close_lingering(closed: Box<Closed>) {
    let Closed {
        mut stream,
        mut shut_down,
        peer_done,
        client_done,
    } = *closed;
    let deadline = tokio::time::Instant::now() + LINGER;
    if peer_done {
        // Nothing is left to drain: close_notify (queued once by rustls, so asking again
        // after an interrupted shutdown is harmless), and the FIN goes with the close.
        stream.get_mut().1.send_close_notify();
        let _ = tokio::time::timeout_at(deadline, stream.flush()).await;
        return;
    }
    if !shut_down {
        shut_down = matches!(
            tokio::time::timeout_at(deadline, stream.shutdown()).await,
            Ok(Ok(()))
        );
    }
    let (mut tcp, _) = stream.into_inner();
    if client_done && shut_down && nothing_waiting(&tcp) {
        return;
    }
    if client_done && shut_down {
        // poll_shutdown left our FIN for the close: the client is told we are done before we
        // wait for it to be.
        let _ = tokio::time::timeout_at(deadline, tcp.shutdown()).await;
    }
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// No byte of the client waits in the socket (or its FIN does, or an error). Asks the
/// socket itself: tokio's readiness may not know yet of bytes that have just arrived. A
/// byte read here is one the drain would have discarded.
fn nothing_waiting(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    !matches!(
        rustix::net::recv(tcp, &mut byte[..], rustix::net::RecvFlags::DONTWAIT),
        Ok((n, _)) if n > 0
    )
}

#[cfg(test)]
mod tests {
    //! Held-back flushes over a real TLS connection on loopback: what the client can read
    //! tells whether the server's records reached the socket.
    use super::*;
    use crate::config::Group;
    use crate::metrics::Metrics;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream as ClientTls;

    const NOTHING_WITHIN: Duration = Duration::from_millis(200);
    const WITHIN: Duration = Duration::from_secs(5);

    async fn pair(coalesce: bool) -> (ClientStream, ClientTls<TcpStream>) {
        let (ca, leaf) = crate::certgen::ca_and_leaf(&["localhost".to_string()]).unwrap();
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(super::super::policy::provider(&[Group::X25519]));
        let versions = &[&rustls::version::TLS13];
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap()
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(tcp)
                .await
                .unwrap()
        };
        let (client, server) = tokio::join!(connect, accept);
        let metrics = Metrics::new().listener("t", &["x25519"]).rekey().clone();
        let (server, _closed) =
            ClientStream::new(server, coalesce, None, metrics, 1, Instant::now());
        (server, client)
    }

    /// Client sends `sent`; the server reads `first` bytes of it, so the rest waits
    /// decrypted in rustls, then writes and flushes `reply`.
    async fn reply_with_input_waiting(
        server: &mut ClientStream,
        client: &mut ClientTls<TcpStream>,
        sent: &[u8],
        first: usize,
        reply: &[u8],
    ) {
        client.write_all(sent).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; first];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent[..first]);
        server.write_all(reply).await.unwrap();
        server.flush().await.unwrap();
    }

    async fn read_some(client: &mut ClientTls<TcpStream>, within: Duration) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(within, client.read(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(buf[..n].to_vec())
    }

    #[tokio::test]
    async fn a_flush_with_input_waiting_is_held_until_the_input_is_read() {
        let (mut server, mut client) = pair(true).await;
        reply_with_input_waiting(&mut server, &mut client, b"ping-pong", 4, b"reply").await;
        assert_eq!(
            read_some(&mut client, NOTHING_WITHIN).await,
            None,
            "held back while '-pong' waits"
        );
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"-pong");
        server.flush().await.unwrap();
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), b"reply");
    }

    #[tokio::test]
    async fn without_coalescing_a_flush_writes_at_once() {
        let (mut server, mut client) = pair(false).await;
        reply_with_input_waiting(&mut server, &mut client, b"ping-pong", 4, b"reply").await;
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), b"reply");
    }

    #[tokio::test]
    async fn an_owed_flush_goes_out_when_the_reader_blocks_without_flushing() {
        let (mut server, mut client) = pair(true).await;
        reply_with_input_waiting(&mut server, &mut client, b"ab", 1, b"r2").await;
        // The server only reads from here on: the owed records must still be written.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            while server.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), b"r2");
        reader.abort();
    }

    /// Counts wake-ups, to see that a held flush asks to be polled again.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicU32);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One poll of the connection, as `H1Conn` makes it: `reply` written and flushed twice
    /// (as hyper may), then `and_then`; the poll ends Pending unless `and_then` is Ready.
    fn one_poll(
        server: &mut ClientStream,
        wakes: &Arc<Wakes>,
        reply: &[u8],
        and_then: impl FnOnce(Pin<&mut ClientStream>, &mut Context<'_>) -> Poll<()>,
    ) -> Poll<()> {
        let last = server.last_response();
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        last.poll_with(&mut cx, |cx| {
            let mut s = Pin::new(server);
            if !reply.is_empty() {
                let n = s.as_mut().poll_write(cx, reply);
                assert!(matches!(n, Poll::Ready(Ok(n)) if n == reply.len()));
                assert!(s.as_mut().poll_flush(cx).is_ready());
                assert!(s.as_mut().poll_flush(cx).is_ready());
            }
            and_then(s, cx)
        })
    }

    fn pending(_: Pin<&mut ClientStream>, _: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }

    fn queued(server: &mut ClientStream) -> bool {
        server.io().get_ref().1.wants_write()
    }

    fn wakes(w: &Wakes) -> u32 {
        w.0.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn the_last_response_is_held_for_the_shutdown_in_the_same_poll() {
        let (mut server, mut client) = pair(false).await;
        server.last_response().set_closing();
        let w = Arc::new(Wakes::default());
        let r = one_poll(&mut server, &w, b"bye", |mut s, cx| {
            assert!(
                queued(&mut s),
                "the response is still in rustls after the flushes"
            );
            s.as_mut().poll_shutdown(cx).map(|r| r.unwrap())
        });
        assert!(r.is_ready());
        assert!(!queued(&mut server));
        assert_eq!(
            wakes(&w),
            0,
            "the poll ended with the shutdown: nothing to come back for"
        );
        let mut got = Vec::new();
        tokio::time::timeout(WITHIN, client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"bye", "the response, then close_notify");
    }

    #[tokio::test]
    async fn a_held_last_response_is_written_by_the_next_polls_flush() {
        let (mut server, mut client) = pair(false).await;
        server.last_response().set_closing();
        let w = Arc::new(Wakes::default());
        assert!(one_poll(&mut server, &w, b"last", pending).is_pending());
        assert!(queued(&mut server));
        assert_eq!(wakes(&w), 1, "woken for the next poll");
        let flush =
            |s: Pin<&mut ClientStream>, cx: &mut Context<'_>| s.poll_flush(cx).map(|r| r.unwrap());
        assert!(one_poll(&mut server, &w, b"", flush).is_ready());
        assert!(!queued(&mut server), "written in the next poll");
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), b"last");
        // Later writes are held in their own poll again, and written in the one after.
        assert!(one_poll(&mut server, &w, b"more", pending).is_pending());
        assert_eq!(wakes(&w), 2);
        assert!(one_poll(&mut server, &w, b"", flush).is_ready());
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), b"more");
    }

    #[tokio::test]
    async fn outside_the_connections_polls_nothing_is_held() {
        // A relay that took the stream over (upgrade) writes outside `poll_with`.
        let (mut server, mut client) = pair(false).await;
        server.last_response().set_closing();
        server.write_all(b"relayed").await.unwrap();
        server.flush().await.unwrap();
        assert!(!queued(&mut server));
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), b"relayed");
    }

    #[tokio::test]
    async fn without_closing_an_http1_flush_writes_at_once() {
        let (mut server, mut client) = pair(false).await;
        let w = Arc::new(Wakes::default());
        assert!(one_poll(&mut server, &w, b"ok", pending).is_pending());
        assert!(!queued(&mut server));
        assert_eq!(wakes(&w), 0);
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), b"ok");
    }

    /// One poll of the connection's read, which finds nothing from the client.
    fn read_blocks(server: &mut ClientStream, wakes: &Arc<Wakes>) {
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 16];
        let mut rb = ReadBuf::new(&mut buf);
        assert!(Pin::new(server).poll_read(&mut cx, &mut rb).is_pending());
    }

    fn settings() -> Vec<u8> {
        super::super::first_flight::frame(
            super::super::first_flight::SETTINGS,
            &[0, 3, 0, 0, 0, 100],
        )
    }

    #[tokio::test]
    async fn http2_setup_frames_wait_for_the_first_response() {
        let (mut server, mut client) = pair(true).await;
        server.last_response().set_request_arrived();
        server.write_all(&settings()).await.unwrap();
        server.flush().await.unwrap();
        assert!(queued(&mut server), "SETTINGS queued, not written");
        let w = Arc::new(Wakes::default());
        read_blocks(&mut server, &w);
        read_blocks(&mut server, &w);
        assert!(
            queued(&mut server),
            "held for the response while the reads block"
        );
        let headers = super::super::first_flight::frame(0x1, &[0x88]);
        server.write_all(&headers).await.unwrap();
        assert!(!queued(&mut server), "the response takes them along");
        let mut got = vec![0; settings().len() + headers.len()];
        tokio::time::timeout(WITHIN, client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, [settings(), headers].concat());
    }

    #[tokio::test]
    async fn http2_setup_frames_go_out_when_no_request_came() {
        // A client that waits for our SETTINGS before it sends a request.
        let (mut server, mut client) = pair(true).await;
        server.write_all(&settings()).await.unwrap();
        server.flush().await.unwrap();
        assert!(queued(&mut server));
        let w = Arc::new(Wakes::default());
        read_blocks(&mut server, &w);
        assert_eq!(
            wakes(&w),
            1,
            "comes back once: hyper may accept a request yet"
        );
        read_blocks(&mut server, &w);
        assert!(!queued(&mut server), "written once the reads block again");
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), settings());
    }

    #[tokio::test]
    async fn held_http2_setup_frames_go_out_when_the_hold_ends() {
        let (mut server, mut client) = pair(true).await;
        server.last_response().set_request_arrived();
        server.write_all(&settings()).await.unwrap();
        server.flush().await.unwrap();
        // No response comes; the connection only reads.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            while server.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), settings());
        reader.abort();
    }

    #[tokio::test]
    async fn other_http2_frames_are_not_held() {
        let (mut server, mut client) = pair(true).await;
        server.last_response().set_request_arrived();
        let ping_ack = super::super::first_flight::frame(0x6, &[1; 8]);
        server.write_all(&ping_ack).await.unwrap();
        server.flush().await.unwrap();
        assert!(!queued(&mut server));
        assert_eq!(read_some(&mut client, WITHIN).await.unwrap(), ping_ack);
    }

    fn acks_at_once(server: &mut ClientStream) -> bool {
        rustix::net::sockopt::tcp_quickack(server.io().get_ref().0).unwrap()
    }

    /// As the kernel has it once the connection looks interactive: ACKs delayed.
    fn delay_acks(server: &mut ClientStream) {
        rustix::net::sockopt::set_tcp_quickack(server.io().get_ref().0, false).unwrap();
    }

    #[tokio::test]
    async fn with_no_request_after_the_handshake_its_ack_goes_at_once() {
        let (mut server, _client) = pair(false).await;
        delay_acks(&mut server);
        let w = Arc::new(Wakes::default());
        read_blocks(&mut server, &w);
        assert!(
            acks_at_once(&mut server),
            "the handshake acknowledged at once"
        );
    }

    #[tokio::test]
    async fn a_request_with_the_handshake_draws_no_early_ack() {
        let (mut server, mut client) = pair(false).await;
        delay_acks(&mut server);
        client.write_all(b"GET").await.unwrap();
        client.flush().await.unwrap();
        // In the socket before the first read, as when it comes with the client's Finished.
        server.io().get_ref().0.readable().await.unwrap();
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.unwrap();
        let w = Arc::new(Wakes::default());
        read_blocks(&mut server, &w);
        assert!(
            !acks_at_once(&mut server),
            "the response will carry the ACK"
        );
    }

    #[tokio::test]
    async fn http2_leaves_the_handshake_ack_to_its_settings() {
        let (mut server, _client) = pair(true).await;
        delay_acks(&mut server);
        let w = Arc::new(Wakes::default());
        read_blocks(&mut server, &w);
        assert!(!acks_at_once(&mut server));
    }
}
