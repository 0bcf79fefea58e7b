//! HTTP: serve one established TLS connection with HTTP/1.1 or HTTP/2 as chosen by ALPN
//! (`server`), route each request (`route`), and forward it to an upstream or answer it
//! (`forward`), relaying WebSocket upgrades (`upgrade`). Sits between `tls` and `upstream`.

pub mod access;
pub mod activity;
pub mod forward;
pub mod h1_park;
pub mod route;
pub mod server;
pub mod upgrade;

pub use server::{ListenerHttp, serve_connection};

/// hyper's HTTP/1.1 buffer limit (read buffer, and queued writes before backpressure), for
/// client and backend connections. hyper's default is about 400 KiB per direction, so a
/// client that stops reading a large response held about 1.4 MiB through the proxy until
/// `idle_timeout` (tests/slow_clients.rs); 64 KiB is four TLS records, enough to keep a
/// transfer moving.
pub const MAX_H1_BUFFER: usize = 64 * 1024;
