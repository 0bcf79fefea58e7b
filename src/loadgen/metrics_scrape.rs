//! loadgen `--metrics`: the target's own view. A plain HTTP/1.1 GET of its Prometheus
//! endpoint before and after the run; the report shows the deltas of ephemera's handshake
//! counters (successes summed over labels, failures by reason, resumed) and HTTP requests.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::net::TcpStream;

/// An exposition larger than this is not a metrics page.
const MAX_BODY: usize = 64 << 20;

const HANDSHAKES: &str = "ephemera_tls_handshakes_total";
const FAILURES: &str = "ephemera_tls_handshake_failures_total";
const RESUMED: &str = "ephemera_tls_resumed_handshakes_total";
const REQUESTS: &str = "ephemera_http_requests_total";

/// The counters read from one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerCounts {
    pub handshakes: f64,
    pub failures: f64,
    pub failures_by_reason: BTreeMap<String, f64>,
    pub resumed: f64,
    pub http_requests: f64,
    /// Whether any ephemera handshake family was present (another server exposes none).
    pub found: bool,
}

/// The metrics endpoint could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScrapeError {
    #[error("--metrics {url}: connecting: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--metrics {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("--metrics {url}: reading the body: {reason}")]
    Body { url: String, reason: String },
    #[error("--metrics {url}: HTTP status {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("--metrics {url}: no answer within {limit:?}")]
    Timeout { url: String, limit: Duration },
}

/// GET the page and parse it.
pub async fn scrape(uri: &http::Uri, limit: Duration) -> Result<ServerCounts, ScrapeError> {
    let url = uri.to_string();
    match tokio::time::timeout(limit, fetch(uri, &url)).await {
        Ok(text) => Ok(parse(&text?)),
        Err(_) => Err(ScrapeError::Timeout { url, limit }),
    }
}

async fn fetch(uri: &http::Uri, url: &str) -> Result<String, ScrapeError> {
    // Checked by Options: an http:// URL with an authority.
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let addr = if uri.port().is_some() {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|source| ScrapeError::Connect {
            url: url.to_string(),
            source,
        })?;
    let http_err = |source| ScrapeError::Http {
        url: url.to_string(),
        source,
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http_err)?;
    let conn = tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| ScrapeError::Body {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let resp = send.send_request(req).await.map_err(http_err)?;
    if !resp.status().is_success() {
        conn.abort();
        return Err(ScrapeError::Status {
            url: url.to_string(),
            status: resp.status(),
        });
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ScrapeError::Body {
            url: url.to_string(),
            reason: e.to_string(),
        })?
        .to_bytes();
    conn.abort();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Sum the families we report from Prometheus text exposition.
pub fn parse(text: &str) -> ServerCounts {
    let mut c = ServerCounts::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else {
            continue;
        };
        match name {
            HANDSHAKES => c.handshakes += value,
            FAILURES => {
                c.failures += value;
                let reason = label(labels, "reason").unwrap_or("unknown");
                *c.failures_by_reason
                    .entry(reason.to_string())
                    .or_insert(0.0) += value;
            }
            RESUMED => c.resumed += value,
            REQUESTS => c.http_requests += value,
            _ => continue,
        }
        c.found = true;
    }
    c
}

/// `name{labels} value [timestamp]` → (name, labels, value).
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let i = line.find(['{', ' '])?;
    let (name, labels, rest) = if line.as_bytes()[i] == b'{' {
        let close = closing_brace(line, i)?;
        (&line[..i], &line[i + 1..close], &line[close + 1..])
    } else {
        (&line[..i], "", &line[i..])
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// The `}` that ends the label set opened at `open`, skipping quoted values (which may hold
/// braces and escaped quotes).
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in line.bytes().enumerate().skip(open + 1) {
        match (quoted, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (_, false, b'"') => quoted = !quoted,
            (false, _, b'}') => return Some(i),
            _ => {}
        }
    }
    None
}

/// The value of label `key` (escapes are not undone: label values we read are plain words).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let end = value_end(after)?;
        if k.trim().trim_start_matches(',').trim() == key {
            return Some(&after[..end]);
        }
        rest = after[end + 1..].trim_start_matches(',');
    }
    None
}

fn value_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        match (escaped, b) {
            (true, _) => escaped = false,
            (false, b'\\') => escaped = true,
            (false, b'"') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP ephemera_tls_handshakes_total Successful handshakes.
# TYPE ephemera_tls_handshakes_total counter
ephemera_tls_handshakes_total{alpn="h2",cipher_suite="TLS13_AES_128_GCM_SHA256",group="x25519",listener="public"} 40
ephemera_tls_handshakes_total{alpn="http/1.1",cipher_suite="TLS13_AES_128_GCM_SHA256",group="x25519",listener="public"} 10
ephemera_tls_handshake_failures_total{listener="public",reason="client_closed"} 2
ephemera_tls_handshake_failures_total{listener="a \"}\" b",reason="protocol_version"} 1 1700000000
ephemera_tls_resumed_handshakes_total{listener="public"} 0
ephemera_http_requests_total{listener="public",status_class="2xx",version="HTTP/2"} 7
ephemera_tls_handshakes_total_other 99
process_cpu_seconds_total 3
"#;

    #[test]
    fn sums_the_families_and_splits_failures_by_reason() {
        let c = parse(PAGE);
        assert!(c.found);
        assert_eq!(c.handshakes, 50.0);
        assert_eq!(c.failures, 3.0);
        assert_eq!(c.failures_by_reason["client_closed"], 2.0);
        assert_eq!(c.failures_by_reason["protocol_version"], 1.0);
        assert_eq!(c.resumed, 0.0);
        assert_eq!(c.http_requests, 7.0);
        assert!(!parse("process_cpu_seconds_total 3\n{broken\n").found);
    }
}
