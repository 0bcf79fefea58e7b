//! Routing: the first route (in config order) whose host and path prefix match a request.

use crate::config::{HostMatch, RouteAction, RouteConfig};
use http::uri::Authority;

pub struct Router {
    routes: Vec<RouteConfig>,
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>) -> Router {
        Router { routes }
    }

    /// `host` is the request's host without port, or `None` (HTTP/1.0 without Host).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&RouteAction> {
        let host = host.map(|h| h.trim_end_matches('.'));
        self.routes
            .iter()
            .find(|r| host_matches(&r.host, host) && path.starts_with(&r.path_prefix))
            .map(|r| &r.action)
    }
}

/// Case-insensitive without allocating: the config's names are stored lower-case.
fn host_matches(m: &HostMatch, host: Option<&str>) -> bool {
    match (m, host) {
        (HostMatch::Any, _) => true,
        (HostMatch::Exact(name), Some(h)) => h.eq_ignore_ascii_case(name),
        (HostMatch::Suffix(suffix), Some(h)) => {
            let (h, suffix) = (h.as_bytes(), suffix.as_bytes());
            h.len() > suffix.len() && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        (_, None) => false,
    }
}

/// The request's target: `host[:port]` without userinfo, taken from the URI authority
/// (HTTP/2 `:authority`, HTTP/1.1 absolute-form) or else the Host header.
///
/// Routing and the Host sent to the backend both come from this one value, so a client
/// cannot be routed as one host and reach the backend as another: an HTTP/2 Host header that
/// differs from `:authority` is refused (RFC 9113 §8.3.1), and for absolute-form HTTP/1.1
/// the Host header is replaced (RFC 9112 §3.2.2).
pub fn target_authority<B>(req: &http::Request<B>) -> Result<Option<Authority>, &'static str> {
    let host_header = match req.headers().get(http::header::HOST) {
        None => None,
        Some(v) => {
            let a: Authority = v
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("invalid Host header")?;
            Some(without_userinfo(&a)?)
        }
    };
    match req.uri().authority() {
        Some(a) => {
            let a = without_userinfo(a)?;
            if req.version() == http::Version::HTTP_2
                && let Some(h) = &host_header
                && !h.as_str().eq_ignore_ascii_case(a.as_str())
            {
                return Err("Host header differs from :authority");
            }
            Ok(Some(a))
        }
        None => Ok(host_header),
    }
}

fn without_userinfo(a: &Authority) -> Result<Authority, &'static str> {
    if !a.as_str().contains('@') {
        return Ok(a.clone());
    }
    let s = match a.port_u16() {
        Some(p) => format!("{}:{p}", a.host()),
        None => a.host().to_string(),
    };
    s.parse().map_err(|_| "invalid authority")
}

/// The host part of an authority, without port or IPv6 brackets, for routing.
pub fn host_of(a: &Authority) -> &str {
    a.host().trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: HostMatch, prefix: &str, status: u16) -> RouteConfig {
        RouteConfig {
            host,
            path_prefix: prefix.into(),
            action: RouteAction::Respond { status, body: None },
        }
    }

    fn status(r: Option<&RouteAction>) -> u16 {
        match r {
            Some(RouteAction::Respond { status, .. }) => *status,
            _ => 0,
        }
    }

    #[test]
    fn first_match_wins() {
        let r = Router::new(vec![
            route(HostMatch::Exact("api.example.com".into()), "/v1/", 201),
            route(HostMatch::Suffix(".example.com".into()), "/", 202),
            route(HostMatch::Any, "/", 203),
        ]);
        assert_eq!(status(r.find(Some("API.example.com"), "/v1/x")), 201);
        assert_eq!(status(r.find(Some("api.example.com"), "/v2")), 202);
        assert_eq!(status(r.find(Some("example.com"), "/")), 203);
        assert_eq!(status(r.find(None, "/")), 203);
        let strict = Router::new(vec![route(HostMatch::Exact("a".into()), "/", 200)]);
        assert!(strict.find(None, "/").is_none());
    }

    fn target(req: http::Request<()>) -> Result<Option<String>, &'static str> {
        target_authority(&req).map(|a| a.map(|a| a.as_str().to_string()))
    }

    #[test]
    fn target_from_authority_or_host() {
        let req = http::Request::get("/x")
            .header("host", "Example.com:8443")
            .body(())
            .unwrap();
        assert_eq!(target(req).unwrap().as_deref(), Some("Example.com:8443"));
        let req = http::Request::get("https://[::1]:8443/x").body(()).unwrap();
        let a = target_authority(&req).unwrap().unwrap();
        assert_eq!(host_of(&a), "::1");
        assert_eq!(
            target(http::Request::get("/x").body(()).unwrap()).unwrap(),
            None
        );
        // Absolute-form wins over Host; userinfo is dropped.
        let req = http::Request::get("https://user:pw@a.example/x")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(target(req).unwrap().as_deref(), Some("a.example"));
        // HTTP/2: a Host that differs from :authority is refused, a matching one accepted.
        let req = http::Request::get("https://a.example/")
            .version(http::Version::HTTP_2)
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert!(target(req).is_err());
        let req = http::Request::get("https://a.example/")
            .version(http::Version::HTTP_2)
            .header("host", "A.example")
            .body(())
            .unwrap();
        assert_eq!(target(req).unwrap().as_deref(), Some("a.example"));
        let req = http::Request::get("/x")
            .header("host", "bad host")
            .body(())
            .unwrap();
        assert!(target(req).is_err());
    }
}
