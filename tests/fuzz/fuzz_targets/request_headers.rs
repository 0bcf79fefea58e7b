//! What the proxy itself does with a client's request line and headers once hyper has parsed
//! them, in the order `http::forward::handle` does it: the request target (`route::
//! target_authority`, `host_of`), the 421 check (`SniResolver::misdirected`), routing
//! (`Router::find`), the WebSocket check (`upgrade::requested`), the header rewrite for the
//! backend (`forward::rewrite_request_headers`: hop-by-hop, X-Forwarded-*, Forwarded, Host,
//! X-Forwarded-Client-Cert, cookies) and the PROXY v2 header sent to backends that want one.
//!
//! Input format (so that seeds are readable):
//! byte 0 = flags: bits 0-1 version (0 HTTP/1.0, 2 HTTP/2, else HTTP/1.1); bit 2 the peer is
//! a trusted proxy; bits 3-4 which peer address; bit 5 local address IPv6; bit 6 the
//! connection has a verified client certificate. Then lines (`\n`, a trailing `\r` dropped):
//! `METHOD TARGET`, the SNI name (empty: none), then `name: value` headers; the pseudo-header
//! `:protocol: websocket` sets HTTP/2's extended CONNECT protocol.
//!
//! Checked: no panic; the authority has no userinfo and (HTTP/2) agrees with Host; the 421
//! decision and the route chosen match a model written here from the documented rules; after
//! the rewrite no hop-by-hop header (nor one the client named in Connection) is left except
//! `te: trailers`, X-Forwarded-For / Forwarded end with the real client (and are exactly it
//! from an untrusted peer), X-Forwarded-Proto is `https`, X-Forwarded-Client-Cert is ours or
//! absent, Host is the routed authority, HTTP/2 cookies are one field; the PROXY v2 header
//! reads back as the client's address.

#![no_main]

use ephemera::config::{CertificateSource, HostMatch, Origin, PemSource, RouteAction, RouteConfig};
use ephemera::http::activity::Activity;
use ephemera::http::forward::{ConnContext, ForwardedFor, client_facts, rewrite_request_headers};
use ephemera::http::route::{Router, host_of, target_authority};
use ephemera::http::upgrade;
use ephemera::proxy_protocol::{read_header, v2_header};
use ephemera::tls::TlsInfo;
use ephemera::tls::accept::Alpn;
use ephemera::tls::certs::SniResolver;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];
/// Headers the rewrite sets itself (so they may be present even if named in Connection).
const OURS: [&str; 7] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "x-forwarded-host",
    "host",
    "x-forwarded-client-cert",
    "te",
];
const CLIENT_CERT: &str = "Hash=00;Subject=\"CN=fuzz client\"";

struct Fixed {
    resolver: SniResolver,
    router: Router,
    runtime: tokio::runtime::Runtime,
}

/// Certificates: 0 covers example.com and *.example.com (the default), 1 covers other.test.
/// Routes: api.example.com /v1/ → 1, *.example.com / → 2, other.test / → 3 (no catch-all).
fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let provider = ephemera::tls::policy::provider(&ephemera::config::Group::DEFAULT);
        let load = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let issued = ephemera::certgen::self_signed(&names).expect("certificate");
            let src = CertificateSource {
                cert: PemSource::Memory {
                    label: "fuzz cert",
                    pem: issued.cert_pem.into_bytes(),
                },
                key: PemSource::Memory {
                    label: "fuzz key",
                    pem: issued.key_pem.into_bytes(),
                },
                ocsp: None,
                origin: Origin {
                    file: "fuzz".into(),
                    key: "certificates".into(),
                    line: 0,
                },
            };
            ephemera::tls::certs::load(&src, &provider).expect("load")
        };
        let certs = [
            load(&["example.com", "*.example.com"]),
            load(&["other.test"]),
        ];
        let route = |host: HostMatch, prefix: &str, status: u16| RouteConfig {
            host,
            path_prefix: prefix.into(),
            action: RouteAction::Respond { status, body: None },
        };
        Fixed {
            resolver: SniResolver::new(&certs, false),
            router: Router::new(vec![
                route(HostMatch::Exact("api.example.com".into()), "/v1/", 201),
                route(HostMatch::Suffix(".example.com".into()), "/", 202),
                route(HostMatch::Exact("other.test".into()), "/", 203),
            ]),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
        }
    })
}

/// Model of certificate coverage: exact names, then a wildcard for exactly one more label.
fn covering_cert(name: &str) -> Option<usize> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match name.as_str() {
        "example.com" => return Some(0),
        "other.test" => return Some(1),
        _ => {}
    }
    match name.split_once('.') {
        Some((_, "example.com")) => Some(0),
        _ => None,
    }
}

/// Model of the route table in `fixed()`.
fn model_route(host: Option<&str>, path: &str) -> Option<u16> {
    let host = host?.trim_end_matches('.');
    let h = host.to_ascii_lowercase();
    if h == "api.example.com" && path.starts_with("/v1/") {
        Some(201)
    } else if h.len() > ".example.com".len() && h.ends_with(".example.com") && path.starts_with('/')
    {
        Some(202)
    } else if h == "other.test" && path.starts_with('/') {
        Some(203)
    } else {
        None
    }
}

fn values<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    h.get_all(name).iter().map(HeaderValue::as_bytes).collect()
}

fn tokens(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.to_string())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let version = match flags & 3 {
        0 => Version::HTTP_10,
        2 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let trusted = flags & 4 != 0;
    let peer: SocketAddr = match (flags >> 3) & 3 {
        0 => "192.0.2.1:5000",
        1 => "[2001:db8::1]:5000",
        2 => "[::ffff:198.51.100.7]:5001",
        _ => "10.0.0.5:1",
    }
    .parse()
    .unwrap();
    let local: SocketAddr = if flags & 32 != 0 {
        "[2001:db8::100]:443"
    } else {
        "192.0.2.100:443"
    }
    .parse()
    .unwrap();
    let client_cert = flags & 64 != 0;

    let mut lines = rest
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let (method, target) = match request_line.iter().position(|&b| b == b' ') {
        Some(i) => (&request_line[..i], &request_line[i + 1..]),
        None => (&b"GET"[..], request_line),
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let sni = lines
        .next()
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned());
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    for line in lines {
        if let Some(p) = line.strip_prefix(b":protocol:") {
            let p = String::from_utf8_lossy(p.trim_ascii());
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from(p.as_ref()));
            continue;
        }
        let Some(i) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        // As hyper hands them over: a valid name, the value without surrounding whitespace.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..i]),
            HeaderValue::from_bytes(line[i + 1..].trim_ascii()),
        ) {
            req.headers_mut().append(n, v);
        }
    }

    let f = fixed();
    let kind = upgrade::requested(&req);
    if kind == Some(upgrade::Kind::Http1) {
        assert_eq!(req.method(), Method::GET);
    }
    if kind == Some(upgrade::Kind::ExtendedConnect) {
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(version, Version::HTTP_2);
    }

    let Ok(authority) = target_authority(&req) else {
        return;
    };
    if let Some(a) = &authority {
        assert!(!a.as_str().contains('@'), "userinfo kept: {a}");
        if version == Version::HTTP_2
            && let Some(h) = req.headers().get(http::header::HOST)
        {
            assert!(
                h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
                    || h.as_bytes().contains(&b'@'),
                "HTTP/2 Host {h:?} differs from :authority {a}"
            );
        }
    }
    let host = authority.as_ref().map(host_of);

    if let (Some(sni), Some(host)) = (&sni, host) {
        let same_name = host
            .trim_end_matches('.')
            .eq_ignore_ascii_case(sni.trim_end_matches('.'));
        let served = covering_cert(sni).unwrap_or(0);
        let expected = !same_name && covering_cert(host) != Some(served);
        assert_eq!(
            f.resolver.misdirected(sni, host),
            expected,
            "misdirected(sni {sni:?}, host {host:?})"
        );
    }

    let routed = match f.router.find(host, req.uri().path()) {
        Some(RouteAction::Respond { status, .. }) => Some(*status),
        _ => None,
    };
    assert_eq!(
        routed,
        model_route(host, req.uri().path()),
        "route for host {host:?} path {:?}",
        req.uri().path()
    );

    // The rewrite, as `forward` calls it.
    let (watch_tx, shutdown) = tokio::sync::watch::channel(false);
    let ctx = ConnContext {
        peer,
        local,
        tls: TlsInfo {
            group: "x25519",
            cipher_suite: "TLS13_AES_128_GCM_SHA256",
            alpn: if version == Version::HTTP_2 {
                Alpn::H2
            } else {
                Alpn::Http11
            },
            server_name: sni.clone(),
            client_cert: client_cert.then(|| Arc::from(CLIENT_CERT)),
        },
        trusted_peer: trusted,
        activity: Activity::new(),
        shutdown,
        key_updates: Default::default(),
        forwarded_for: ForwardedFor::new(&peer),
        last_response: Default::default(),
    };
    let authority = authority.map(|a| a.as_str().to_string());
    let before = req.headers().clone();
    let te_trailers = tokens(&before, "te").iter().any(|t| {
        t.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("trailers")
    });
    let listed: Vec<HeaderName> = tokens(&before, "connection")
        .iter()
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let mut h = before.clone();
    rewrite_request_headers(&mut h, &ctx, authority.as_deref(), version);

    for name in HOP_BY_HOP {
        if name == "te" {
            continue;
        }
        assert!(!h.contains_key(name), "hop-by-hop {name} forwarded");
    }
    if te_trailers {
        assert_eq!(values(&h, "te"), [b"trailers"]);
    } else {
        assert!(
            !h.contains_key("te"),
            "te forwarded: {:?}",
            values(&h, "te")
        );
    }
    for name in &listed {
        if !OURS.contains(&name.as_str()) {
            assert!(
                !h.contains_key(name),
                "{name} named in Connection forwarded"
            );
        }
    }

    let ip = peer.ip().to_canonical();
    let ip_text = ip.to_string();
    let xff = values(&h, "x-forwarded-for");
    assert_eq!(xff.len(), 1, "x-forwarded-for: {xff:?}");
    let xff = std::str::from_utf8(xff[0]).unwrap();
    if trusted {
        assert!(
            xff == ip_text || xff.ends_with(&format!(", {ip_text}")),
            "x-forwarded-for {xff:?} does not end with {ip_text}"
        );
    } else {
        assert_eq!(xff, ip_text);
    }
    assert_eq!(values(&h, "x-forwarded-proto"), [b"https"]);

    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node};proto=https");
    if let Some(a) = &authority
        && a.chars()
            .all(|ch| ch.is_ascii_graphic() && ch != '"' && ch != '\\')
    {
        element.push_str(&format!(";host=\"{a}\""));
    }
    let fwd = values(&h, "forwarded");
    assert_eq!(fwd.len(), 1, "forwarded: {fwd:?}");
    let fwd = std::str::from_utf8(fwd[0]).unwrap();
    if trusted {
        assert!(
            fwd == element || fwd.ends_with(&format!(", {element}")),
            "forwarded {fwd:?} does not end with {element:?}"
        );
    } else {
        assert_eq!(fwd, element);
    }

    let xfcc = values(&h, "x-forwarded-client-cert");
    if client_cert {
        assert_eq!(xfcc, [CLIENT_CERT.as_bytes()]);
    } else {
        assert!(xfcc.is_empty(), "client-sent XFCC forwarded: {xfcc:?}");
    }
    if let Some(a) = &authority {
        assert_eq!(values(&h, "host"), [a.as_bytes()]);
        if !trusted {
            assert_eq!(values(&h, "x-forwarded-host"), [a.as_bytes()]);
        }
    } else if !trusted {
        let xfh = values(&h, "x-forwarded-host");
        assert!(xfh.is_empty(), "client-sent X-Forwarded-Host forwarded: {xfh:?}");
    }
    if version == Version::HTTP_2 {
        assert!(
            h.get_all("cookie").iter().count() <= 1,
            "cookies not joined"
        );
    }

    // The PROXY v2 header to a backend reads back as this client.
    let facts = client_facts(&ctx);
    if let Ok(bytes) = v2_header(&facts) {
        let mut r = &bytes[..];
        let got = f
            .runtime
            .block_on(read_header(&mut r))
            .expect("our own v2 header");
        let local_ip = local.ip().to_canonical();
        let want = match (ip, local_ip) {
            (IpAddr::V4(v4), IpAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => ip,
        };
        assert_eq!(got, Some(SocketAddr::new(want, peer.port())));
        assert!(r.is_empty(), "v2 header longer than its length field says");
    }
    drop(watch_tx);
});
