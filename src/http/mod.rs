//! HTTP: serve one established TLS connection with HTTP/1.1 or HTTP/2 as chosen by ALPN
//! (`server`), route each request (`route`), and forward it to an upstream or answer it
//! (`forward`), relaying WebSocket upgrades (`upgrade`). Sits between `tls` and `upstream`.

pub mod access;
pub mod activity;
pub mod forward;
pub mod route;
pub mod server;
pub mod upgrade;

pub use server::{ListenerHttp, serve_connection};
