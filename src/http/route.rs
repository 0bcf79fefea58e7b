//! Routing: the first route (in config order) whose host and path prefix match a request.

use crate::config::{HostMatch, RouteAction, RouteConfig};

pub struct Router {
    routes: Vec<RouteConfig>,
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>) -> Router {
        Router { routes }
    }

    /// `host` is the request's host without port, or `None` (HTTP/1.0 without Host).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&RouteAction> {
        let host = host.map(|h| h.trim_end_matches('.').to_ascii_lowercase());
        self.routes
            .iter()
            .find(|r| host_matches(&r.host, host.as_deref()) && path.starts_with(&r.path_prefix))
            .map(|r| &r.action)
    }
}

fn host_matches(m: &HostMatch, host: Option<&str>) -> bool {
    match (m, host) {
        (HostMatch::Any, _) => true,
        (HostMatch::Exact(name), Some(h)) => h == name,
        (HostMatch::Suffix(suffix), Some(h)) => {
            h.len() > suffix.len() && h.ends_with(suffix.as_str())
        }
        (_, None) => false,
    }
}

/// The host of a request, without port: the URI authority (HTTP/2 `:authority`, absolute-form
/// HTTP/1.1) or else the Host header.
pub fn request_host<B>(req: &http::Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            let auth: http::uri::Authority = h.parse().ok()?;
            auth.host().to_string()
        }
    };
    let host = raw
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    (!host.is_empty()).then_some(host)
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

    #[test]
    fn host_from_header_or_authority() {
        let req = http::Request::get("/x")
            .header("host", "Example.com:8443")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("Example.com"));
        let req = http::Request::get("https://[::1]:8443/x").body(()).unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("::1"));
        let req = http::Request::get("/x").body(()).unwrap();
        assert_eq!(request_host(&req), None);
    }
}
