//! Per-request handling: route, answer built-in routes, or rewrite the request for the
//! backend (hop-by-hop headers, X-Forwarded-*, Forwarded, Host), send it through `upstream`,
//! and map backend failures to 502/504. Bodies stream both ways; none is buffered whole.

use super::access::AccessEntry;
use super::activity::{Activity, BodyReading, RequestGuard};
use super::route::{host_of, target_authority};
use super::server::ListenerHttp;
use super::upgrade;
use crate::body::{BoxError, ProxyBody, full};
use crate::config::RouteAction;
use crate::metrics::GaugeGuard;
use crate::tls::TlsInfo;
use crate::upstream::{Upstream, UpstreamError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Facts about the client connection a request arrived on.
pub struct ConnContext {
    /// The client: the TCP peer, or the address a trusted PROXY header named.
    pub peer: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    pub tls: TlsInfo,
    /// The peer is in `trusted_proxies`: its X-Forwarded-For / Forwarded are kept.
    pub trusted_peer: bool,
    pub activity: Arc<Activity>,
    /// Turns true when the proxy starts shutting down (WebSocket relays then close).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Forced key updates on this connection so far (for the access log).
    pub key_updates: Arc<std::sync::atomic::AtomicU64>,
    /// `peer` as the forwarding headers give it, formatted once per connection.
    pub forwarded_for: ForwardedFor,
    /// Told when the connection closes after the response being written (HTTP/1.x): the TLS
    /// stream then sends the response and close_notify in one write.
    pub last_response: Arc<crate::tls::stream::LastResponse>,
}

/// The client address in X-Forwarded-For and Forwarded form. Formatting an address costs more
/// than the rest of the header rewrite, so it is done once per connection.
pub struct ForwardedFor {
    /// `192.0.2.1` or `2001:db8::1`.
    ip: String,
    /// The same as a header value, cloned (a reference count) into every request.
    ip_value: HeaderValue,
    /// The start of a Forwarded element: `for=192.0.2.1;proto=https` (IPv6 quoted).
    element: String,
}

impl ForwardedFor {
    pub fn new(peer: &SocketAddr) -> ForwardedFor {
        let addr = client_ip(peer);
        // Formatted once: the element reuses the text (an IPv6 node is quoted and bracketed).
        let ip = addr.to_string();
        let element = if addr.is_ipv6() {
            format!("for=\"[{ip}]\";proto=https")
        } else {
            format!("for={ip};proto=https")
        };
        ForwardedFor {
            // Digits, dots, colons and hex letters only: always a valid header value.
            ip_value: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            ip,
            element,
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus Proxy-Authorization/Authenticate, which are
/// meant for a proxy and must not reach the backend or the client.
/// `Connection` first: the names it lists go too.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

// Parsed once here: a lookup by `&str` parses the name again on every request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

pub fn version_label(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 | Version::HTTP_09 => "HTTP/1.0",
        Version::HTTP_2 | Version::HTTP_3 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// Entry point from the HTTP server for every request.
pub async fn handle(
    req: Request<Incoming>,
    l: &ListenerHttp,
    c: &ConnContext,
) -> Response<ProxyBody> {
    let version = version_label(req.version());
    if req.version() != Version::HTTP_2 && closes_after(&req) {
        c.last_response.set_closing();
        if req.body().is_end_stream() {
            c.last_response.set_client_done();
        }
    }
    // HTTP/1.1: the connection is mid-message until hyper has read this body (see
    // `h1_park`); dropped unread (a fixed response, an error), it is never parked again.
    let body_reading = (req.version() != Version::HTTP_2 && !req.body().is_end_stream())
        .then(|| c.activity.body_reading());
    let mut guard = Guards {
        request: c.activity.begin(),
        _h2_stream: (req.version() == Version::HTTP_2).then(|| l.metrics.h2_stream()),
        access: l.cfg.access_log.then(|| {
            Box::new(AccessEntry::new(
                l.metrics.shared_name(),
                c.peer,
                req.method(),
                req.uri().path(),
                version,
                c.tls.group,
                c.key_updates.clone(),
            ))
        }),
    };
    // CONNECT tunnels are not proxied (the backend could be made an open relay); only the
    // extended CONNECT that carries a WebSocket is.
    if req.method() == http::Method::CONNECT && upgrade::requested(&req).is_none() {
        let mut resp = simple(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n");
        resp.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"),
        );
        return answered(resp, version, l, guard);
    }
    let authority = match target_authority(&req) {
        Ok(a) => a,
        Err(why) => {
            let resp = simple(StatusCode::BAD_REQUEST, format!("bad request: {why}\n"));
            return answered(resp, version, l, guard);
        }
    };
    let host = authority.as_ref().map(host_of);
    // HTTP/2 only: its clients reuse a connection for other names its certificate covers;
    // HTTP/1.1 clients do not, and some send a Host unlike their SNI on purpose.
    if let (Version::HTTP_2, Some(sni), Some(host)) =
        (req.version(), c.tls.server_name.as_deref(), host)
        && l.certificates.misdirected(sni, host)
    {
        let resp = simple(
            StatusCode::MISDIRECTED_REQUEST,
            "this connection's certificate does not cover the requested host\n",
        );
        return answered(resp, version, l, guard);
    }
    let resp = match l.router.find(host, req.uri().path()) {
        None => simple(StatusCode::NOT_FOUND, "no route for this host and path\n"),
        // An extended CONNECT answered with 2xx opens a tunnel (RFC 8441 §5); a fixed
        // response has none behind it.
        Some(RouteAction::Respond { .. })
            if upgrade::requested(&req) == Some(upgrade::Kind::ExtendedConnect) =>
        {
            simple(
                StatusCode::NOT_IMPLEMENTED,
                "WebSocket is served only on routes to an upstream\n",
            )
        }
        Some(RouteAction::Respond { status, body }) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let text = match body {
                Some(b) => b.clone(),
                None => tls_summary(&c.tls, version),
            };
            simple(status, text)
        }
        Some(RouteAction::Upstream(i)) => match l.upstreams.get(*i) {
            Some(up) => {
                if let Some(a) = guard.access.as_mut() {
                    a.upstream = Some(up.name().to_string());
                }
                forward(req, body_reading, authority, up, l, c).await
            }
            None => simple(
                StatusCode::INTERNAL_SERVER_ERROR,
                "route points at a missing upstream\n",
            ),
        },
    };
    answered(resp, version, l, guard)
}

/// Count the response and wrap its body so that the request stays in flight (and its
/// access log line waits) until the body has been sent.
fn answered(
    resp: Response<ProxyBody>,
    version: &'static str,
    l: &ListenerHttp,
    mut guard: Guards,
) -> Response<ProxyBody> {
    l.metrics.http_request(version, resp.status().as_u16());
    if let Some(a) = guard.access.as_mut() {
        a.head_sent(resp.status());
    }
    resp.map(|b| GuardedBody::new(b, guard).boxed())
}

/// What a response body holds until it is dropped.
struct Guards {
    request: RequestGuard,
    /// Held for its drop: the stream stops counting as open.
    _h2_stream: Option<GaugeGuard>,
    access: Option<Box<AccessEntry>>,
}

/// The built-in route's text: what this connection negotiated.
fn tls_summary(tls: &TlsInfo, http_version: &str) -> String {
    format!(
        "Hello from ephemera.\ntls_version: TLSv1.3\ngroup: {}\ncipher_suite: {}\nalpn: {}\nhttp_version: {}\nresumed: false\n",
        tls.group,
        tls.cipher_suite,
        tls.alpn.label(),
        http_version
    )
}

pub(super) fn simple(status: StatusCode, text: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn forward(
    req: Request<Incoming>,
    body_reading: Option<BodyReading>,
    authority: Option<Authority>,
    up: &Upstream,
    l: &ListenerHttp,
    c: &ConnContext,
) -> Response<ProxyBody> {
    let limit = l.cfg.max_request_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return simple(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    let upgrade_kind = upgrade::requested(&req);
    if upgrade_kind.is_some() && !upgrade::supported_by(up) {
        return simple(
            StatusCode::BAD_GATEWAY,
            "WebSocket needs an http1 upstream\n",
        );
    }
    let (mut parts, body) = req.into_parts();
    let authority = authority.map(|a| a.as_str().to_string());
    let client_version = parts.version;
    rewrite_request_headers(&mut parts.headers, c, authority.as_deref(), client_version);
    if let Some(kind) = upgrade_kind {
        return forward_upgrade(kind, parts, authority.is_none(), up, l, c).await;
    }
    parts.uri = origin_form(&parts.uri);
    // Always HTTP/1.1 to the backend, so the pooled connection stays open (an HTTP/1.0
    // request would close it after every response). A request without any host (HTTP/1.0
    // without Host) gets the upstream's name, as nginx sends its `$proxy_host`.
    parts.version = Version::HTTP_11;
    if authority.is_none()
        && let Ok(v) = HeaderValue::from_str(up.name())
    {
        parts.headers.insert(header::HOST, v);
    }
    if up.proxy_protocol() {
        parts.extensions.insert(client_facts(c));
    }
    let usize_limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let body = ClientBody::new(
        Limited::new(body, usize_limit),
        l.cfg.idle_timeout,
        body_reading,
    )
    .boxed();
    match up.send(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            // Both framings from the backend: Transfer-Encoding wins (RFC 9112 §6.3); hyper
            // re-frames the body for the client, so the stale length must not go along.
            if parts.headers.contains_key(header::TRANSFER_ENCODING) {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            strip_hop_by_hop(&mut parts.headers);
            parts.version = Version::HTTP_11;
            Response::from_parts(parts, body)
        }
        Err(e) => upstream_failure(e, up),
    }
}

/// A WebSocket upgrade: no request body goes to the backend; on 101 the relay starts.
async fn forward_upgrade(
    kind: upgrade::Kind,
    mut parts: http::request::Parts,
    no_authority: bool,
    up: &Upstream,
    l: &ListenerHttp,
    c: &ConnContext,
) -> Response<ProxyBody> {
    let Some(client_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return simple(StatusCode::BAD_REQUEST, "upgrade not possible here\n");
    };
    parts.uri = origin_form(&parts.uri);
    if up.proxy_protocol() {
        parts.extensions.insert(client_facts(c));
    }
    if no_authority && let Ok(v) = HeaderValue::from_str(up.name()) {
        parts.headers.insert(header::HOST, v);
    }
    upgrade::backend_request(kind, &mut parts);
    let key = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    match up
        .send(Request::from_parts(parts, crate::body::empty()))
        .await
    {
        Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => upgrade::switched(
            kind,
            key.as_ref(),
            client_upgrade,
            resp,
            c.activity.clone(),
            c.shutdown.clone(),
            l.cfg.idle_timeout,
        ),
        // A 2xx to an extended CONNECT would tell the client its tunnel is open.
        Ok(resp) if kind == upgrade::Kind::ExtendedConnect && resp.status().is_success() => {
            tracing::debug!(status = %resp.status(), "backend answered a WebSocket upgrade without switching");
            simple(
                StatusCode::BAD_GATEWAY,
                "upstream did not switch to WebSocket\n",
            )
        }
        // Refused (401, 403, 426…): the backend's answer goes back as it is.
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body)
        }
        Err(e) => upstream_failure(e, up),
    }
}

/// For a backend that wants a PROXY header: who the client is and what TLS it spoke.
pub fn client_facts(c: &ConnContext) -> crate::proxy_protocol::ClientFacts {
    crate::proxy_protocol::ClientFacts {
        client: c.peer,
        local: c.local,
        sni: c.tls.server_name.clone(),
        cipher_suite: c.tls.cipher_suite,
        client_cert: c.tls.client_cert.is_some(),
    }
}

fn origin_form(uri: &http::Uri) -> http::Uri {
    uri.path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"))
}

fn upstream_failure(e: UpstreamError, up: &Upstream) -> Response<ProxyBody> {
    if let UpstreamError::ClientBody { source, .. } = &e {
        // The client's fault: answered (if it still listens) but not logged as a backend
        // problem and not counted in ephemera_upstream_errors_total.
        tracing::debug!(error = %e, "request body failed");
        let source: &(dyn std::error::Error + 'static) = source.as_ref();
        return if caused_by::<http_body_util::LengthLimitError>(source) {
            simple(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
        } else if caused_by::<BodyStalled>(source) {
            simple(StatusCode::REQUEST_TIMEOUT, "request body stalled\n")
        } else {
            simple(StatusCode::BAD_REQUEST, "request body aborted\n")
        };
    }
    if let Some(suppressed) = up.log.allow() {
        tracing::warn!(error = %e, suppressed_since_last = suppressed, "upstream request failed");
    }
    match e {
        UpstreamError::ResponseTimeout { .. } | UpstreamError::BodyTimeout { .. } => simple(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream did not respond in time\n",
        ),
        _ => simple(StatusCode::BAD_GATEWAY, "upstream unavailable\n"),
    }
}

fn caused_by<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The client sent no request body data for `idle_timeout` while we waited for it.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {0:?}")]
pub struct BodyStalled(Duration);

pin_project_lite::pin_project! {
    /// The client's request body on its way to the backend: cut off (408) when the client
    /// stops sending it for `idle_timeout`, so a stalled upload cannot hold a connection and
    /// a backend connection forever.
    struct ClientBody {
        #[pin]
        inner: Limited<Incoming>,
        timeout: Duration,
        stall: Pin<Box<tokio::time::Sleep>>,
        reading: Option<BodyReading>,
    }
}

impl ClientBody {
    fn new(
        inner: Limited<Incoming>,
        timeout: Duration,
        reading: Option<BodyReading>,
    ) -> ClientBody {
        ClientBody {
            inner,
            timeout,
            stall: Box::pin(tokio::time::sleep(timeout)),
            reading,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + *this.timeout;
                this.stall.as_mut().reset(next);
                // Checked only until the body's end has been seen once.
                if this.reading.is_some()
                    && !matches!(frame, Some(Err(_)))
                    && (frame.is_none() || this.inner.is_end_stream())
                    && let Some(r) = this.reading.take()
                {
                    r.ended();
                }
                Poll::Ready(frame)
            }
            Poll::Pending => match this.stall.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(*this.timeout))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection closes after this request's response, as hyper decides it for HTTP/1.x:
/// `Connection: close`, or HTTP/1.0 without `Connection: keep-alive`. Never for a request
/// that may upgrade (an `Upgrade` header, CONNECT): hyper then hands the stream over
/// without shutting it down.
fn closes_after<B>(req: &Request<B>) -> bool {
    if req.method() == http::Method::CONNECT || req.headers().contains_key(header::UPGRADE) {
        return false;
    }
    let mut keep_alive = false;
    let tokens = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for t in tokens {
        let t = t.trim();
        if t.eq_ignore_ascii_case("close") {
            return true;
        }
        keep_alive |= t.eq_ignore_ascii_case("keep-alive");
    }
    req.version() == Version::HTTP_10 && !keep_alive
}

/// Remove hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these or only
    // `Connection` (a backend's keep-alive), and each remove costs a hash and a probe.
    let mut present = [false; HOP_BY_HOP.len()];
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present[i] = true;
        }
    }
    if present[0] {
        // `close` names no header, and `keep-alive` is in the list anyway: the usual values
        // need no parse and no allocation.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for (name, here) in HOP_BY_HOP.iter().zip(present) {
        if here {
            headers.remove(name);
        }
    }
}

fn client_ip(peer: &SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

/// Public only for the fuzz target `tests/fuzz/fuzz_targets/request_headers.rs`, which
/// checks its guarantees on arbitrary client headers; not part of the API.
#[doc(hidden)]
pub fn rewrite_request_headers(
    h: &mut HeaderMap,
    c: &ConnContext,
    authority: Option<&str>,
    version: Version,
) {
    // `TE: trailers` is the one TE value that goes on (RFC 9113 §8.2.2): gRPC backends
    // require it, and it says the client accepts trailers, which we relay.
    let te_trailers = h
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    strip_hop_by_hop(h);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let ip = &c.forwarded_for.ip;
    // What a client sent is kept only from a trusted proxy: looked up only then.
    match c
        .trusted_peer
        .then(|| joined(h, &X_FORWARDED_FOR, ", "))
        .flatten()
    {
        Some(prev) => set(h, X_FORWARDED_FOR, &format!("{prev}, {ip}")),
        None => {
            h.insert(X_FORWARDED_FOR, c.forwarded_for.ip_value.clone());
        }
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    // Only the identity we verified reaches the backend; a client cannot forge one.
    h.remove(&X_FORWARDED_CLIENT_CERT);
    if let Some(identity) = &c.tls.client_cert {
        set(h, X_FORWARDED_CLIENT_CERT, identity);
    }

    let mut element = c.forwarded_for.element.clone();
    if let Some(a) = authority
        && a.chars()
            .all(|ch| ch.is_ascii_graphic() && ch != '"' && ch != '\\')
    {
        element.push_str(";host=\"");
        element.push_str(a);
        element.push('"');
    }
    let forwarded = match c
        .trusted_peer
        .then(|| joined(h, &header::FORWARDED, ", "))
        .flatten()
    {
        Some(prev) => format!("{prev}, {element}"),
        None => element,
    };
    set(h, header::FORWARDED, &forwarded);

    match authority.and_then(|a| HeaderValue::from_str(a).ok()) {
        Some(v) => {
            if !c.trusted_peer || !h.contains_key(&X_FORWARDED_HOST) {
                h.insert(X_FORWARDED_HOST, v.clone());
            }
            // The one target the request was routed by (HTTP/2 carries it in :authority).
            h.insert(header::HOST, v);
        }
        // An HTTP/1.0 request may have no host: a client's own X-Forwarded-Host must not
        // pass for ours.
        None if !c.trusted_peer => {
            h.remove(&X_FORWARDED_HOST);
        }
        None => {}
    }
    // HTTP/2 may split cookies into several fields; HTTP/1.1 needs one (RFC 9113 §8.2.3).
    // Joined as bytes: cookie values may carry non-ASCII octets that `to_str` would drop.
    if version == Version::HTTP_2 && h.get_all(header::COOKIE).iter().nth(1).is_some() {
        let parts: Vec<&[u8]> = h
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&parts.join(&b"; "[..])) {
            h.insert(header::COOKIE, v);
        }
    }
}

fn joined(h: &HeaderMap, name: &HeaderName, sep: &str) -> Option<String> {
    let vals: Vec<&str> = h
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.join(sep))
}

fn set(h: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it is dropped, and
    /// tells `Activity` whether the client is taking its data.
    struct GuardedBody {
        #[pin]
        inner: ProxyBody,
        guard: Guards,
        waiting: bool,
        ended: bool,
    }
    impl PinnedDrop for GuardedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.waiting {
                this.guard.request.activity().body_done_waiting();
            }
            if let Some(a) = this.guard.access.take() {
                a.finish(*this.ended || this.inner.is_end_stream());
            }
        }
    }
}

impl GuardedBody {
    fn new(inner: ProxyBody, guard: Guards) -> GuardedBody {
        GuardedBody {
            inner,
            guard,
            waiting: false,
            ended: false,
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let activity = this.guard.request.activity();
        activity.body_pulled(std::mem::take(this.waiting));
        let mut inner = this.inner;
        let r = inner.as_mut().poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(a), Some(d)) = (this.guard.access.as_mut(), f.data_ref()) {
                    a.bytes_sent += d.len() as u64;
                }
                if inner.is_end_stream() {
                    *this.ended = true;
                } else if f.is_data() {
                    *this.waiting = true;
                    activity.body_waiting();
                }
            }
            Poll::Ready(None) => *this.ended = true,
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(peer: &str, trusted: bool) -> ConnContext {
        ConnContext {
            peer: peer.parse().unwrap(),
            local: "192.0.2.100:443".parse().unwrap(),
            tls: TlsInfo {
                group: "x25519",
                cipher_suite: "TLS13_AES_128_GCM_SHA256",
                alpn: crate::tls::accept::Alpn::H2,
                server_name: None,
                client_cert: None,
            },
            trusted_peer: trusted,
            activity: Activity::new(),
            shutdown: tokio::sync::watch::channel(false).1,
            key_updates: Default::default(),
            forwarded_for: ForwardedFor::new(&peer.parse().unwrap()),
            last_response: Default::default(),
        }
    }

    #[test]
    fn closes_after_follows_the_http1_keep_alive_rules() {
        let req = |version, connection: Option<&'static str>| {
            let mut b = Request::builder().version(version);
            if let Some(c) = connection {
                b = b.header(header::CONNECTION, c);
            }
            b.body(()).unwrap()
        };
        assert!(!closes_after(&req(Version::HTTP_11, None)));
        assert!(closes_after(&req(Version::HTTP_11, Some("close"))));
        assert!(closes_after(&req(Version::HTTP_11, Some("x-trace, Close"))));
        assert!(closes_after(&req(Version::HTTP_10, None)));
        assert!(!closes_after(&req(Version::HTTP_10, Some("Keep-Alive"))));
        assert!(closes_after(&req(
            Version::HTTP_10,
            Some("keep-alive, close")
        )));
        // hyper hands an upgraded stream over without a shutdown: nothing may be held.
        let upgrade = Request::builder()
            .header(header::CONNECTION, "close, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert!(!closes_after(&upgrade));
        let connect = Request::builder()
            .method(http::Method::CONNECT)
            .header(header::CONNECTION, "close")
            .body(())
            .unwrap();
        assert!(!closes_after(&connect));
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("gzip"));
        rewrite_request_headers(
            &mut h,
            &ctx("192.0.2.1:5000", false),
            Some("example.com"),
            Version::HTTP_11,
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;proto=https;host=\"example.com\""
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(
            !h.contains_key("x-secret") && !h.contains_key("connection") && !h.contains_key("te")
        );
        assert_eq!(h["host"], "example.com");
    }

    #[test]
    fn trusted_forwarding_headers_are_appended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
        rewrite_request_headers(
            &mut h,
            &ctx("[::ffff:10.0.0.5]:5000", true),
            None,
            Version::HTTP_11,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.2, 10.0.0.5");
        let mut h = HeaderMap::new();
        rewrite_request_headers(
            &mut h,
            &ctx("[2001:db8::1]:5000", false),
            None,
            Version::HTTP_11,
        );
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn x_forwarded_host_is_ours_or_a_trusted_proxys() {
        let from = |trusted, authority| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
            rewrite_request_headers(
                &mut h,
                &ctx("192.0.2.1:5000", trusted),
                authority,
                Version::HTTP_10,
            );
            h.get("x-forwarded-host").cloned()
        };
        assert_eq!(from(false, Some("example.com")).unwrap(), "example.com");
        // HTTP/1.0 without a Host: nothing to say, and the client's value is not kept.
        assert_eq!(from(false, None), None);
        assert_eq!(from(true, Some("example.com")).unwrap(), "evil.example");
        assert_eq!(from(true, None).unwrap(), "evil.example");
    }

    #[test]
    fn te_trailers_alone_goes_on() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip, Trailers;q=1"));
        rewrite_request_headers(&mut h, &ctx("192.0.2.1:1", false), None, Version::HTTP_2);
        assert_eq!(h.get_all("te").iter().collect::<Vec<_>>(), ["trailers"]);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_lists_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-trace, Keep-Alive"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);

        // One of them alone, no Connection.
        let mut h = HeaderMap::new();
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::PROXY_AUTHORIZATION));
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn h2_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        rewrite_request_headers(
            &mut h,
            &ctx("192.0.2.1:1", false),
            Some("x"),
            Version::HTTP_2,
        );
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_bytes(b"n=caf\xc3\xa9").unwrap());
        rewrite_request_headers(
            &mut h,
            &ctx("192.0.2.1:1", false),
            Some("x"),
            Version::HTTP_2,
        );
        assert_eq!(h["cookie"].as_bytes(), b"a=1; n=caf\xc3\xa9");
    }
}
