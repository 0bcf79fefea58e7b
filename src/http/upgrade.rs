//! WebSocket through the proxy: an HTTP/1.1 `Upgrade: websocket` request, or an HTTP/2
//! extended CONNECT with `:protocol websocket` (RFC 8441), becomes an HTTP/1.1 upgrade to the
//! backend; once both sides have switched, bytes are relayed both ways over the client's
//! (rekeying) TLS stream. Called by `forward` for upgrade requests; uses `upstream`.

use super::activity::Activity;
use crate::body::{ProxyBody, empty};
use crate::relay::RelayEnd;
use crate::upstream::Upstream;
use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What kind of upgrade a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1 `Connection: upgrade` + `Upgrade: websocket`.
    Http1,
    /// HTTP/2 CONNECT with `:protocol websocket`.
    ExtendedConnect,
}

/// The WebSocket upgrade `req` asks for, if any. Other upgrade tokens (h2c, TLS) are not
/// relayed: their headers are hop-by-hop and dropped like any other.
pub fn requested<B>(req: &Request<B>) -> Option<Kind> {
    if req.version() == Version::HTTP_2 {
        let proto = req.extensions().get::<hyper::ext::Protocol>()?;
        return (req.method() == Method::CONNECT
            && proto.as_str().eq_ignore_ascii_case("websocket"))
        .then_some(Kind::ExtendedConnect);
    }
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    (req.method() == Method::GET
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket"))
    .then_some(Kind::Http1)
}

/// RFC 6455 §1.3: what `Sec-WebSocket-Accept` must be for a given key.
fn accept_for(key: &[u8]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// Whether the backend's 101 really switched to WebSocket: `Upgrade: websocket`, and the
/// accept value matching the key we sent (for HTTP/1.1 clients the client checks it
/// against its own key). Anything else could leave a raw tunnel to a backend still
/// speaking HTTP, past routing and header rewriting.
fn backend_switched(kind: Kind, key: Option<&HeaderValue>, resp: &Response<ProxyBody>) -> bool {
    let upgrade_ok = resp
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let accept_ok = match (kind, key) {
        (Kind::ExtendedConnect, Some(key)) => resp
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|a| a.as_bytes() == accept_for(key.as_bytes()).as_bytes()),
        (Kind::ExtendedConnect, None) => false,
        (Kind::Http1, _) => resp.headers().contains_key(header::SEC_WEBSOCKET_ACCEPT),
    };
    upgrade_ok && accept_ok
}

/// Turn the client's (already rewritten) request into the HTTP/1.1 upgrade request for the
/// backend. For extended CONNECT the handshake headers HTTP/1.1 needs are added.
pub fn backend_request(kind: Kind, parts: &mut http::request::Parts) {
    parts.method = Method::GET;
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if kind == Kind::ExtendedConnect {
        // RFC 8441 §5: the HTTP/2 side has no key; the backend's HTTP/1.1 handshake needs one.
        let mut key = [0u8; 16];
        if aws_lc_rs::rand::fill(&mut key).is_ok()
            && let Ok(v) =
                HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(key))
        {
            h.insert(header::SEC_WEBSOCKET_KEY, v);
        }
    }
}

/// The answer to the client once the backend switched protocols, and the relay started in
/// the background. `client` is the client request's upgrade handle.
#[allow(clippy::too_many_arguments)]
pub fn switched(
    kind: Kind,
    key: Option<&HeaderValue>,
    client: OnUpgrade,
    mut backend: Response<ProxyBody>,
    activity: Arc<Activity>,
    shutdown: watch::Receiver<bool>,
    idle_timeout: Duration,
) -> Response<ProxyBody> {
    if !backend_switched(kind, key, &backend) {
        tracing::debug!("backend answered 101 without a valid WebSocket handshake");
        return super::forward::simple(StatusCode::BAD_GATEWAY, "upstream upgrade failed\n");
    }
    let Some(backend_up) = backend.extensions_mut().remove::<OnUpgrade>() else {
        return super::forward::simple(StatusCode::BAD_GATEWAY, "upstream upgrade failed\n");
    };
    let mut resp = Response::new(empty());
    let keep: &[header::HeaderName] = match kind {
        Kind::Http1 => {
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            &[
                header::SEC_WEBSOCKET_ACCEPT,
                header::SEC_WEBSOCKET_PROTOCOL,
                header::SEC_WEBSOCKET_EXTENSIONS,
            ]
        }
        // RFC 8441 §5: 200 instead of 101, without Sec-WebSocket-Accept.
        Kind::ExtendedConnect => &[
            header::SEC_WEBSOCKET_PROTOCOL,
            header::SEC_WEBSOCKET_EXTENSIONS,
        ],
    };
    copy_headers(backend.headers(), resp.headers_mut(), keep);
    tokio::spawn(relay(client, backend_up, activity, shutdown, idle_timeout));
    resp
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, names: &[header::HeaderName]) {
    for name in names {
        for v in from.get_all(name) {
            to.append(name.clone(), v.clone());
        }
    }
}

/// Relay bytes both ways until either side closes, nothing moves for `idle_timeout`, or the
/// proxy shuts down (a WebSocket is not an in-flight request to wait for: its client
/// reconnects, to another instance). The client connection counts as busy meanwhile.
async fn relay(
    client: OnUpgrade,
    backend: OnUpgrade,
    activity: Arc<Activity>,
    shutdown: watch::Receiver<bool>,
    idle: Duration,
) {
    let _busy = activity.begin();
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket upgrade did not complete");
            return;
        }
    };
    match crate::relay::relay(
        TokioIo::new(client),
        TokioIo::new(backend),
        idle,
        None,
        Some(shutdown),
    )
    .await
    {
        RelayEnd::Failed(e) => tracing::debug!(error = %e, "WebSocket relay ended with an error"),
        RelayEnd::Idle => tracing::debug!("WebSocket relay idle for idle_timeout; closing"),
        RelayEnd::Stopped => {
            tracing::debug!("shutting down or past max_connection_age; closing WebSocket relay")
        }
        RelayEnd::Quiet => {}
        RelayEnd::Closed(..) => {}
    }
}

/// Whether `up` can carry an upgrade (HTTP/1.1 backends only).
pub fn supported_by(up: &Upstream) -> bool {
    !up.protocol().is_h2()
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_value_is_rfc_6455s_example() {
        assert_eq!(
            super::accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
