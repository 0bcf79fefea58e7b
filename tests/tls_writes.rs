//! How the proxy's TLS writes are batched and how it ends a connection the client has finished
//! with. The client here drives rustls by hand over a plain TCP socket, so it decides which
//! TLS records share one TCP write and sees which records arrive together.
//!
//! - HTTP/2: when the client's Finished, preface, SETTINGS and first request arrive together,
//!   the server's SETTINGS, WINDOW_UPDATE and SETTINGS ACK arrive together (a flush asked for
//!   while input waits is held back; the unit tests in src/tls/stream.rs show the holding
//!   itself), and a held-back flush still goes out when the input turns out incomplete.
//! - A client that sends close_notify, or only a FIN, gets the proxy's close_notify and a
//!   clean end (after a FIN the proxy closes without a shutdown call or a drain read, and
//!   so after a close_notify when it sent no KeyUpdate: the client's socket may stay open).

mod common;
#[path = "common/h2frames.rs"]
mod h2frames;

use common::*;
use h2frames::{Frame, PREFACE, Status, flag, hpack, kind};
use rustls::ClientConnection;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WITHIN: Duration = Duration::from_secs(5);

/// A TLS 1.3 client over a plain socket: every `send` is one TCP write, every `recv` one read.
struct RawTls {
    tcp: TcpStream,
    conn: ClientConnection,
    buf: Vec<u8>,
}

impl RawTls {
    /// Handshake with ALPN h2; the client's Finished leaves in one TCP write with `first`.
    async fn connect(addr: SocketAddr, certs: &Certs, first: &[u8]) -> RawTls {
        let config = client_config(&certs.ca_der(), &[b"h2"]);
        let conn =
            ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut c = RawTls {
            tcp,
            conn,
            buf: vec![0; 64 * 1024],
        };
        c.flush_tls().await;
        while c.conn.is_handshaking() {
            c.recv_tls().await;
        }
        assert_eq!(c.conn.alpn_protocol(), Some(&b"h2"[..]));
        c.send(first).await;
        c
    }

    /// Queue `data` and write it, with whatever TLS records wait, in one TCP write.
    async fn send(&mut self, data: &[u8]) {
        self.conn.writer().write_all(data).unwrap();
        self.flush_tls().await;
    }

    async fn flush_tls(&mut self) {
        let mut out = Vec::new();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut out).unwrap();
        }
        self.tcp.write_all(&out).await.unwrap();
    }

    /// One TCP read, decrypted. Returns false at EOF.
    async fn recv_tls(&mut self) -> bool {
        self.read_once(false).await
    }

    /// One TCP read, decrypted; `discard`: drop the plaintext as it comes (more of it than
    /// rustls buffers may arrive).
    async fn read_once(&mut self, discard: bool) -> bool {
        let n = timeout(WITHIN, self.tcp.read(&mut self.buf))
            .await
            .expect("server bytes in time")
            .unwrap();
        let mut read = &self.buf[..n];
        let mut sink = [0u8; 4096];
        while !read.is_empty() {
            self.conn.read_tls(&mut read).unwrap();
            self.conn.process_new_packets().unwrap();
            while discard && matches!(self.conn.reader().read(&mut sink), Ok(n) if n > 0) {}
        }
        n > 0
    }

    /// Read to the end, discarding the plaintext: true if the server sent close_notify (a
    /// reset fails the read).
    async fn read_to_end(&mut self) -> bool {
        while self.read_once(true).await {}
        self.conn.process_new_packets().unwrap().peer_has_closed()
    }

    /// Send close_notify and read to the end, keeping the socket open: true if the server
    /// answered with its own close_notify.
    async fn close_notify_to_end(&mut self) -> bool {
        self.conn.send_close_notify();
        self.flush_tls().await;
        self.read_to_end().await
    }

    /// `close_notify_to_end`, then the socket closes.
    async fn close(mut self) -> bool {
        self.close_notify_to_end().await
    }

    /// Send a FIN without close_notify and read to the end: true if the server answered
    /// with close_notify (a reset fails the read).
    async fn fin(mut self) -> bool {
        self.tcp.shutdown().await.unwrap();
        self.read_to_end().await
    }

    /// The plaintext that arrived with the next TCP read.
    async fn recv(&mut self) -> Vec<u8> {
        assert!(self.recv_tls().await, "server closed");
        let mut plain = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match self.conn.reader().read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => plain.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading plaintext: {e}"),
            }
        }
        plain
    }
}

async fn frames(mut plain: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = h2frames::read_frame(&mut plain).await.unwrap() {
        out.push(f);
    }
    out
}

fn describe(frames: &[Frame]) -> String {
    frames
        .iter()
        .map(Frame::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_settings(f: &Frame) -> bool {
    f.kind == kind::SETTINGS && f.flags & flag::ACK == 0
}

fn request() -> Vec<u8> {
    h2frames::headers(1, &hpack::request("GET", "/"), true, true)
}

#[tokio::test]
async fn server_settings_window_update_and_ack_arrive_together() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let first = [PREFACE, &h2frames::settings(&[]), &request()].concat();
    let mut c = RawTls::connect(proxy.addr, &certs, &first).await;
    // All three answer input that arrived in one piece; the response comes from the
    // request's own task, later.
    let got = frames(&c.recv().await).await;
    assert!(
        got.iter().any(is_settings)
            && got.iter().any(|f| f.is_ack(kind::SETTINGS))
            && got
                .iter()
                .any(|f| f.kind == kind::WINDOW_UPDATE && f.stream == 0),
        "the first read holds SETTINGS, WINDOW_UPDATE and the SETTINGS ACK: got [{}]",
        describe(&got)
    );
    assert_eq!(response_status(&mut c, got).await, Some(Status::Code(200)));
}

#[tokio::test]
async fn a_held_back_flush_goes_out_when_the_preface_is_incomplete() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    // Part of the preface waits decrypted while the server writes its SETTINGS: the flush
    // is held back, and must still happen although no more input comes until it does.
    let mut c = RawTls::connect(proxy.addr, &certs, &PREFACE[..16]).await;
    let got = frames(&c.recv().await).await;
    assert!(
        got.iter().any(is_settings),
        "server SETTINGS before the client completes its preface: got [{}]",
        describe(&got)
    );
    c.send(&[&PREFACE[16..], &h2frames::settings(&[]), &request()].concat())
        .await;
    assert_eq!(response_status(&mut c, got).await, Some(Status::Code(200)));
}

/// Read frames until stream 1's response HEADERS; returns its status.
async fn response_status(c: &mut RawTls, mut seen: Vec<Frame>) -> Option<Status> {
    loop {
        if let Some(h) = seen
            .iter()
            .find(|f| f.kind == kind::HEADERS && f.stream == 1)
        {
            return h.status();
        }
        seen.extend(frames(&c.recv().await).await);
    }
}

#[tokio::test]
async fn a_client_close_notify_or_fin_gets_ours_and_a_clean_end() {
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    // HTTP/2: the connection ends when the client's close_notify is read.
    let first = [PREFACE, &h2frames::settings(&[]), &request()].concat();
    let mut c = RawTls::connect(proxy.addr, &certs, &first).await;
    assert_eq!(
        response_status(&mut c, Vec::new()).await,
        Some(Status::Code(200))
    );
    assert!(c.close().await, "the proxy's close_notify before its FIN");
    // A FIN alone: nothing more can come, close_notify then close.
    let mut c = RawTls::connect(proxy.addr, &certs, &first).await;
    assert_eq!(
        response_status(&mut c, Vec::new()).await,
        Some(Status::Code(200))
    );
    assert!(
        c.fin().await,
        "the proxy's close_notify after the client's FIN"
    );

    // HTTP/1.1 through tokio-rustls: close_notify and FIN after a complete response, then
    // read_to_end, which fails on a reset or on an end without close_notify.
    let tls = tls_connect(
        proxy.addr,
        "localhost",
        client_config(&certs.ca_der(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    wr.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        rd.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("content-length");
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await.unwrap();
    wr.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = timeout(WITHIN, rd.read_to_end(&mut rest)).await.unwrap();
    assert!(end.is_ok(), "clean end expected: {end:?}");
    assert!(rest.is_empty());
    wait_metric(
        &proxy,
        "ephemera_tls_connections_closed_total",
        &["reason=\"completed\""],
        3.0,
    )
    .await;
}

#[tokio::test]
async fn after_a_client_close_notify_the_proxy_does_not_wait_for_its_fin() {
    // With no KeyUpdate of ours to answer, a client's close_notify is the last it sends: the
    // proxy answers with its own and closes at once, though the client keeps its socket
    // open (no drain read waiting out LINGER, 2 s).
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let proxy = Proxy::start(&config_yaml(&certs, None, "", "", "")).await;
    let first = [PREFACE, &h2frames::settings(&[]), &request()].concat();
    let mut c = RawTls::connect(proxy.addr, &certs, &first).await;
    assert_eq!(
        response_status(&mut c, Vec::new()).await,
        Some(Status::Code(200))
    );
    assert!(c.close_notify_to_end().await, "the proxy's close_notify");
    wait_closed_before_linger(&proxy).await;
    drop(c);
}

#[tokio::test]
async fn after_our_key_update_a_client_close_notify_is_not_its_last_word() {
    // A client may answer a KeyUpdate after its close_notify (Go does after `CloseWrite`):
    // then the proxy answers the close_notify but lingers for the client's FIN.
    let _serial = serial().await;
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let proxy = Proxy::start(&config_yaml(
        &certs,
        Some(&[backend]),
        "      key_update: { max_bytes: 64KiB }\n",
        "",
        "",
    ))
    .await;
    // Within the client's initial window, and past 64 KiB with the frames around it.
    let get = h2frames::headers(1, &hpack::request("GET", "/bytes/65500"), true, true);
    let first = [PREFACE, &h2frames::settings(&[]), &get].concat();
    let mut c = RawTls::connect(proxy.addr, &certs, &first).await;
    wait_metric(&proxy, "ephemera_tls_key_updates_total", &[], 1.0).await;
    assert!(c.close_notify_to_end().await, "the proxy's close_notify");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&proxy.metrics().await, "ephemera_connections_open", &[]),
        1.0,
        "the proxy must wait for the FIN of a client that may answer its KeyUpdate"
    );
    drop(c);
    wait_metric(&proxy, "ephemera_connections_open", &[], 0.0).await;
}
