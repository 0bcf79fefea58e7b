//! The body type that flows through the proxy in both directions: streamed, never buffered
//! whole. Shared by `http` (client side) and `upstream` (backend side).

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed HTTP body.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body from bytes in memory (built-in responses, error pages).
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body (a request replayed without one).
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}
