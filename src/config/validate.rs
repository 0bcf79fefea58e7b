//! Config validation: turns `raw::RawConfig` into `Config`. Every default and every check of
//! the configuration lives here, and every error names the key path and line.

use super::raw::{self, S};
use super::*;
use std::collections::HashSet;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:9844";
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// Far above what one process serves (each connection needs a file descriptor).
const MAX_CONNECTIONS: u64 = 10_000_000;
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A day bounds how long one set of traffic secrets (and its KeyUpdate chain) lives.
const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);
/// A core does a few thousand full handshakes a second: 1024 in flight is well past what
/// legitimate load keeps waiting, and bounds what a flood of slow ClientHellos can hold.
const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 1024;
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_REQUEST_BODY: u64 = 64 * 1024 * 1024;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// As nginx's proxy_read_timeout: a backend silent this long in the middle of a body is gone.
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// As nginx's stream `proxy_timeout` (10 min).
const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// HTTP/2 connections per backend server; each carries as many streams as the server allows.
const DEFAULT_UPSTREAM_H2_CONNECTIONS: u64 = 8;
const MAX_UPSTREAM_H2_CONNECTIONS: u64 = 1024;

/// HTTP/2 limits for an internet-facing edge, after Envoy's edge guidance: 100 streams,
/// 64 KiB stream and 1 MiB connection windows (so one client cannot make us buffer much),
/// 16 KiB of headers (hyper's and nginx's order of magnitude).
pub const DEFAULT_H2_LIMITS: H2Limits = H2Limits {
    max_concurrent_streams: 100,
    initial_stream_window: 64 * 1024,
    initial_connection_window: 1024 * 1024,
    max_header_list_size: 16 * 1024,
    keepalive_interval: Some(Duration::from_secs(30)),
    keepalive_timeout: Duration::from_secs(10),
};

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, line: u64, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: Box::new(Origin {
                file: self.file.to_string(),
                key: key.into(),
                line,
            }),
            message: message.into(),
        }
    }

    fn duration(
        &self,
        key: &str,
        v: &Option<S<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let d = parse_duration(&v.value).map_err(|m| self.err(key, line(v), m))?;
        if d.is_zero() {
            return Err(self.err(key, line(v), "must be greater than zero"));
        }
        Ok(d)
    }

    fn addr(&self, key: &str, v: &S<String>) -> Result<SocketAddr, ConfigError> {
        v.value.trim().parse().map_err(|e| {
            self.err(
                key,
                line(v),
                format!(
                    "invalid address '{}' ({e}); write IP:PORT, e.g. 127.0.0.1:8443 or [::]:443",
                    v.value
                ),
            )
        })
    }
}

fn line<T>(v: &S<T>) -> u64 {
    v.referenced.line()
}

pub(super) fn validate(raw: raw::RawConfig, file: &str) -> Result<Config, ConfigError> {
    let cx = Ctx { file };
    const KEYLOG: &str = "key logging defeats forward secrecy and is only a debugging flag: run `ephemera serve --keylog FILE`; it is never read from a config file";
    if let Some(k) = &raw.keylog {
        return Err(cx.err("keylog", line(k), KEYLOG));
    }
    for (i, l) in raw.listeners.iter().enumerate() {
        if let Some(k) = &l.value.tls.value.keylog {
            return Err(cx.err(format!("listeners[{i}].tls.keylog"), line(k), KEYLOG));
        }
    }

    let admin_bind = match raw.admin.as_ref().and_then(|a| a.bind.as_ref()) {
        Some(b) => cx.addr("admin.bind", b)?,
        None => DEFAULT_ADMIN_BIND.parse().expect("constant address"),
    };
    let shutdown_grace = match &raw.shutdown_grace {
        Some(v) => parse_duration(&v.value).map_err(|m| cx.err("shutdown_grace", line(v), m))?,
        None => DEFAULT_SHUTDOWN_GRACE,
    };

    let mut upstreams = Vec::new();
    for (name, u) in &raw.upstreams {
        upstreams.push(upstream(&cx, name, u)?);
    }

    if raw.listeners.is_empty() {
        return Err(cx.err("listeners", 0, "at least one listener is required"));
    }
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        let v = listener(&cx, &key, l, &upstreams)?;
        if !names.insert(v.name.clone()) {
            return Err(cx.err(
                format!("{key}.name"),
                line(&l.value.name),
                format!("duplicate listener name '{}'", v.name),
            ));
        }
        if v.bind.port() != 0 && !binds.insert(v.bind) {
            return Err(cx.err(
                format!("{key}.bind"),
                line(&l.value.bind),
                format!("address {} is already used by another listener", v.bind),
            ));
        }
        if v.bind.port() != 0 && v.bind == admin_bind {
            return Err(cx.err(
                format!("{key}.bind"),
                line(&l.value.bind),
                "same address as admin.bind",
            ));
        }
        listeners.push(v);
    }

    let token_file = raw
        .admin
        .as_ref()
        .and_then(|a| a.token_file.as_ref())
        .map(|t| PathBuf::from(t.value.trim()));
    Ok(Config {
        admin: AdminConfig {
            bind: admin_bind,
            token_file,
        },
        shutdown_grace,
        listeners,
        upstreams,
    })
}

fn listener(
    cx: &Ctx,
    key: &str,
    l: &S<raw::RawListener>,
    upstreams: &[UpstreamConfig],
) -> Result<ListenerConfig, ConfigError> {
    let r = &l.value;
    let name = r.name.value.trim().to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(cx.err(
            format!("{key}.name"),
            line(&r.name),
            "must be non-empty and use only letters, digits, '-' and '_' (it is a metric label)",
        ));
    }
    let bind = cx.addr(&format!("{key}.bind"), &r.bind)?;
    let max_connections = match &r.max_connections {
        Some(v) if v.value == 0 => {
            return Err(cx.err(
                format!("{key}.max_connections"),
                line(v),
                "must be at least 1",
            ));
        }
        Some(v) if v.value > MAX_CONNECTIONS => {
            return Err(cx.err(
                format!("{key}.max_connections"),
                line(v),
                format!("{} is more than the maximum of {MAX_CONNECTIONS}", v.value),
            ));
        }
        Some(v) => v.value,
        None => DEFAULT_MAX_CONNECTIONS,
    };
    let tls = tls(cx, &format!("{key}.tls"), &r.tls)?;
    let http = http(cx, &format!("{key}.http"), r.http.as_ref())?;
    let proxy_protocol = match &r.proxy_protocol {
        Some(p) if p.value && http.trusted_proxies.is_empty() => {
            return Err(cx.err(
                format!("{key}.proxy_protocol"),
                line(p),
                "proxy_protocol: true needs http.trusted_proxies (the load balancers whose headers are believed)",
            ));
        }
        Some(p) => p.value,
        None => false,
    };
    let mode = match (r.mode.as_ref().map(|m| (m.value.trim(), line(m))), &r.tcp) {
        (None | Some(("http", _)), None) => ListenerMode::Http,
        (None | Some(("http", _)), Some(t)) => {
            return Err(cx.err(format!("{key}.tcp"), line(t), "tcp settings need mode: tcp"));
        }
        (Some(("tcp", l)), None) => {
            return Err(cx.err(
                format!("{key}.tcp"),
                l,
                "mode: tcp needs tcp: { upstream: NAME } (an upstream with protocol: tcp)",
            ));
        }
        (Some(("tcp", _)), Some(t)) => {
            let u = &t.value.upstream;
            let idx = upstreams
                .iter()
                .position(|x| x.name == u.value.trim())
                .ok_or_else(|| {
                    cx.err(
                        format!("{key}.tcp.upstream"),
                        line(u),
                        format!("no upstream named '{}'", u.value),
                    )
                })?;
            if upstreams[idx].protocol != UpstreamProtocol::Tcp {
                return Err(cx.err(
                    format!("{key}.tcp.upstream"),
                    line(u),
                    format!(
                        "upstream '{}' is protocol {}; mode: tcp needs protocol: tcp",
                        u.value,
                        upstreams[idx].protocol.name()
                    ),
                ));
            }
            if let Some(rt) = r.routes.first() {
                return Err(cx.err(
                    format!("{key}.routes"),
                    line(rt),
                    "routes apply to mode: http; a mode: tcp listener relays to tcp.upstream",
                ));
            }
            ListenerMode::Tcp {
                upstream: idx,
                idle_timeout: cx.duration(
                    &format!("{key}.tcp.idle_timeout"),
                    &t.value.idle_timeout,
                    DEFAULT_TCP_IDLE_TIMEOUT,
                )?,
            }
        }
        (Some((other, l)), _) => {
            return Err(cx.err(
                format!("{key}.mode"),
                l,
                format!("unknown mode '{other}'; allowed: http, tcp"),
            ));
        }
    };
    // TCP-mode listeners relay to their one upstream: they have no routes.
    let routes = if matches!(mode, ListenerMode::Tcp { .. }) {
        Vec::new()
    } else {
        if r.routes.is_empty() {
            return Err(cx.err(
                format!("{key}.routes"),
                line(l),
                "at least one route is required, e.g. { host: \"*\", path_prefix: /, upstream: app }",
            ));
        }
        r.routes
            .iter()
            .enumerate()
            .map(|(i, rt)| route(cx, &format!("{key}.routes[{i}]"), rt, upstreams))
            .collect::<Result<_, _>>()?
    };
    Ok(ListenerConfig {
        name,
        bind,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        reuse_port: r.reuse_port.unwrap_or(false),
        proxy_protocol,
        tls,
        mode,
        http,
        routes,
    })
}

fn tls(cx: &Ctx, key: &str, t: &S<raw::RawTls>) -> Result<TlsConfig, ConfigError> {
    let r = &t.value;
    if r.certificates.is_empty() {
        return Err(cx.err(
            format!("{key}.certificates"),
            line(t),
            "at least one certificate is required",
        ));
    }
    let certificates = r
        .certificates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ck = format!("{key}.certificates[{i}]");
            for (field, v) in [("cert", &c.value.cert), ("key", &c.value.key)] {
                if v.value.trim().is_empty() {
                    return Err(cx.err(format!("{ck}.{field}"), line(v), "file path is empty"));
                }
            }
            Ok(CertificateSource {
                cert: PemSource::File(PathBuf::from(c.value.cert.value.trim())),
                key: PemSource::File(PathBuf::from(c.value.key.value.trim())),
                ocsp: c.value.ocsp.as_ref().map(|o| PathBuf::from(o.value.trim())),
                origin: Origin {
                    file: cx.file.to_string(),
                    key: ck,
                    line: line(c),
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let groups = match &r.groups {
        None => Group::DEFAULT.to_vec(),
        Some(list) => {
            if list.value.is_empty() {
                return Err(cx.err(format!("{key}.groups"), line(list), "must list at least one group; allowed: x25519, secp256r1, secp384r1, x25519mlkem768"));
            }
            let mut out = Vec::new();
            for (i, g) in list.value.iter().enumerate() {
                let name = g.value.trim().to_ascii_lowercase();
                let group = Group::from_name(&name).ok_or_else(|| {
                    cx.err(format!("{key}.groups[{i}]"), line(g), format!("unknown group '{}'; allowed: x25519, secp256r1, secp384r1, x25519mlkem768 (ECDHE only: no FFDHE)", g.value))
                })?;
                if out.contains(&group) {
                    return Err(cx.err(
                        format!("{key}.groups[{i}]"),
                        line(g),
                        format!("group '{name}' is listed twice"),
                    ));
                }
                out.push(group);
            }
            out
        }
    };
    Ok(TlsConfig {
        certificates,
        strict_sni: r.strict_sni.unwrap_or(false),
        groups,
        handshake_timeout: cx.duration(
            &format!("{key}.handshake_timeout"),
            &r.handshake_timeout,
            DEFAULT_HANDSHAKE_TIMEOUT,
        )?,
        max_concurrent_handshakes: match &r.max_concurrent_handshakes {
            None => DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            Some(v) if (1..=1_000_000).contains(&v.value) => v.value as usize,
            Some(v) => {
                return Err(cx.err(
                    format!("{key}.max_concurrent_handshakes"),
                    line(v),
                    format!("{} is out of range; allowed 1 to 1000000", v.value),
                ));
            }
        },
        key_update: key_update(cx, &format!("{key}.key_update"), r.key_update.as_ref())?,
        max_connection_age: max_connection_age(
            cx,
            &format!("{key}.max_connection_age"),
            r.max_connection_age.as_ref(),
        )?,
        max_connection_age_grace: cx.duration(
            &format!("{key}.max_connection_age_grace"),
            &r.max_connection_age_grace,
            DEFAULT_MAX_CONNECTION_AGE_GRACE,
        )?,
        handshake_rate_per_ip: handshake_rate(
            cx,
            &format!("{key}.handshake_rate_per_ip"),
            r.handshake_rate_per_ip.as_ref(),
        )?,
        keylog: None,
        client_auth: r.client_auth.as_ref().map(|c| ClientAuth {
            ca: PathBuf::from(c.value.ca.value.trim()),
            required: c.value.required.unwrap_or(true),
        }),
    })
}

fn max_connection_age(
    cx: &Ctx,
    key: &str,
    v: Option<&S<raw::RawDurationOrOff>>,
) -> Result<Option<Duration>, ConfigError> {
    let Some(v) = v else {
        return Ok(Some(DEFAULT_MAX_CONNECTION_AGE));
    };
    let text = match &v.value {
        raw::RawDurationOrOff::Off => return Ok(None),
        raw::RawDurationOrOff::Duration(d) => d,
    };
    let d = parse_duration(text).map_err(|m| cx.err(key, line(v), m))?;
    if d < Duration::from_secs(1) {
        return Err(cx.err(
            key,
            line(v),
            format!("{text} is below the minimum of 1s (write false to turn it off)"),
        ));
    }
    Ok(Some(d))
}

fn handshake_rate(
    cx: &Ctx,
    key: &str,
    v: Option<&S<raw::RawHandshakeRate>>,
) -> Result<Option<HandshakeRate>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    let (per_second, burst, prefix) = match &v.value {
        raw::RawHandshakeRate::Off => return Ok(None),
        raw::RawHandshakeRate::PerSecond(r) => (*r, None, None),
        raw::RawHandshakeRate::Limits(l) => (l.per_second, l.burst, l.ipv6_prefix),
    };
    if !(per_second.is_finite() && (0.001..=1_000_000.0).contains(&per_second)) {
        return Err(cx.err(
            format!("{key}.per_second"),
            line(v),
            format!("{per_second} is out of range; allowed 0.001 to 1000000"),
        ));
    }
    // By default the bucket holds one second's worth (at least one handshake).
    let burst = burst.unwrap_or(per_second.ceil() as u64);
    if !(1..=1_000_000).contains(&burst) {
        return Err(cx.err(
            format!("{key}.burst"),
            line(v),
            format!("{burst} is out of range; allowed 1 to 1000000"),
        ));
    }
    let prefix = prefix.unwrap_or(64);
    if !(1..=128).contains(&prefix) {
        return Err(cx.err(
            format!("{key}.ipv6_prefix"),
            line(v),
            format!("{prefix} is out of range; allowed 1 to 128"),
        ));
    }
    Ok(Some(HandshakeRate {
        per_second,
        burst: burst as u32,
        ipv6_prefix: prefix as u8,
    }))
}

fn key_update(
    cx: &Ctx,
    key: &str,
    v: Option<&S<raw::RawKeyUpdate>>,
) -> Result<Option<KeyUpdatePolicy>, ConfigError> {
    let Some(v) = v else {
        return Ok(Some(KeyUpdatePolicy::DEFAULT));
    };
    let limits = match &v.value {
        raw::RawKeyUpdate::Switch(false) => return Ok(None),
        raw::RawKeyUpdate::Switch(true) => return Ok(Some(KeyUpdatePolicy::DEFAULT)),
        raw::RawKeyUpdate::Limits(l) => l,
    };
    let max_bytes = match &limits.max_bytes {
        None => None,
        Some(s) => {
            let n = parse_size(s).map_err(|m| cx.err(format!("{key}.max_bytes"), line(v), m))?;
            if n < KeyUpdatePolicy::MIN_BYTES {
                return Err(cx.err(
                    format!("{key}.max_bytes"),
                    line(v),
                    format!("{s} is below the minimum of 64KiB"),
                ));
            }
            Some(n)
        }
    };
    let max_age = match &limits.max_age {
        None => None,
        Some(s) => {
            let d = parse_duration(s).map_err(|m| cx.err(format!("{key}.max_age"), line(v), m))?;
            if d < KeyUpdatePolicy::MIN_AGE {
                return Err(cx.err(
                    format!("{key}.max_age"),
                    line(v),
                    format!("{s} is below the minimum of 1s"),
                ));
            }
            Some(d)
        }
    };
    if max_bytes.is_none() && max_age.is_none() {
        return Err(cx.err(key, line(v), "set max_bytes and/or max_age, or write `key_update: false` to disable forced key updates"));
    }
    Ok(Some(KeyUpdatePolicy { max_bytes, max_age }))
}

fn http(cx: &Ctx, key: &str, h: Option<&raw::RawHttp>) -> Result<HttpConfig, ConfigError> {
    let none = raw::RawHttp {
        header_timeout: None,
        idle_timeout: None,
        max_request_body: None,
        trusted_proxies: Vec::new(),
        h2: None,
        access_log: None,
    };
    let h = h.unwrap_or(&none);
    let max_request_body = match &h.max_request_body {
        Some(v) => parse_size(&v.value)
            .map_err(|m| cx.err(format!("{key}.max_request_body"), line(v), m))?,
        None => DEFAULT_MAX_REQUEST_BODY,
    };
    let trusted_proxies = h
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            parse_cidr(&p.value)
                .map_err(|m| cx.err(format!("{key}.trusted_proxies[{i}]"), line(p), m))
        })
        .collect::<Result<_, _>>()?;
    Ok(HttpConfig {
        header_timeout: cx.duration(
            &format!("{key}.header_timeout"),
            &h.header_timeout,
            DEFAULT_HEADER_TIMEOUT,
        )?,
        idle_timeout: cx.duration(
            &format!("{key}.idle_timeout"),
            &h.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
        )?,
        max_request_body,
        trusted_proxies,
        h2: h2_limits(cx, &format!("{key}.h2"), h.h2.as_ref())?,
        access_log: h.access_log.unwrap_or(true),
    })
}

fn h2_limits(cx: &Ctx, key: &str, h: Option<&S<raw::RawH2>>) -> Result<H2Limits, ConfigError> {
    let d = DEFAULT_H2_LIMITS;
    let Some(h) = h else { return Ok(d) };
    let h = &h.value;
    let streams = match &h.max_concurrent_streams {
        None => d.max_concurrent_streams,
        Some(v) if (1..=10_000).contains(&v.value) => v.value as u32,
        Some(v) => {
            return Err(cx.err(
                format!("{key}.max_concurrent_streams"),
                line(v),
                format!("{} is out of range; allowed 1 to 10000", v.value),
            ));
        }
    };
    // RFC 9113 §6.9.1: windows are at most 2^31-1 octets.
    let size = |name: &str, v: &Option<S<String>>, default: u32, min: u64, max: u64| {
        let Some(v) = v else { return Ok(default) };
        let k = format!("{key}.{name}");
        let n = parse_size(&v.value).map_err(|m| cx.err(&k, line(v), m))?;
        if !(min..=max).contains(&n) {
            return Err(cx.err(
                &k,
                line(v),
                format!("{} is out of range; allowed {min} to {max} bytes", v.value),
            ));
        }
        Ok(n as u32)
    };
    let window_max = (1u64 << 31) - 1;
    let keepalive_interval = match &h.keepalive_interval {
        Some(v) if matches!(v.value.trim(), "off" | "none") => None,
        v => Some(cx.duration(
            &format!("{key}.keepalive_interval"),
            v,
            d.keepalive_interval.unwrap_or(Duration::from_secs(30)),
        )?),
    };
    Ok(H2Limits {
        max_concurrent_streams: streams,
        initial_stream_window: size(
            "initial_stream_window",
            &h.initial_stream_window,
            d.initial_stream_window,
            1024,
            window_max,
        )?,
        initial_connection_window: size(
            "initial_connection_window",
            &h.initial_connection_window,
            d.initial_connection_window,
            65_535,
            window_max,
        )?,
        max_header_list_size: size(
            "max_header_list_size",
            &h.max_header_list_size,
            d.max_header_list_size,
            1024,
            1024 * 1024,
        )?,
        keepalive_interval,
        keepalive_timeout: cx.duration(
            &format!("{key}.keepalive_timeout"),
            &h.keepalive_timeout,
            d.keepalive_timeout,
        )?,
    })
}

/// A CIDR (`10.0.0.0/8`) or a bare address (one host).
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("invalid CIDR '{s}'; write e.g. 10.0.0.0/8 or 192.0.2.7"))
}

fn route(
    cx: &Ctx,
    key: &str,
    rt: &S<raw::RawRoute>,
    upstreams: &[UpstreamConfig],
) -> Result<RouteConfig, ConfigError> {
    let r = &rt.value;
    let host = match &r.host {
        None => HostMatch::Any,
        Some(h) => {
            parse_host_match(&h.value).map_err(|m| cx.err(format!("{key}.host"), line(h), m))?
        }
    };
    let path_prefix = match &r.path_prefix {
        None => "/".to_string(),
        Some(p) if p.value.starts_with('/') => p.value.clone(),
        Some(p) => {
            return Err(cx.err(
                format!("{key}.path_prefix"),
                line(p),
                format!("'{}' must start with '/'", p.value),
            ));
        }
    };
    let action = match (&r.upstream, &r.respond) {
        (Some(u), None) => {
            let idx = upstreams
                .iter()
                .position(|x| x.name == u.value)
                .ok_or_else(|| {
                    let known: Vec<_> = upstreams.iter().map(|x| x.name.as_str()).collect();
                    cx.err(
                        format!("{key}.upstream"),
                        line(u),
                        format!(
                            "no upstream named '{}' (defined: {})",
                            u.value,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    )
                })?;
            if upstreams[idx].protocol == UpstreamProtocol::Tcp {
                return Err(cx.err(
                    format!("{key}.upstream"),
                    line(u),
                    format!(
                        "upstream '{}' is protocol tcp, for mode: tcp listeners; routes need http1, h2c or h2",
                        u.value
                    ),
                ));
            }
            RouteAction::Upstream(idx)
        }
        (None, Some(resp)) => {
            let status = match &resp.value.status {
                Some(s) if !(200..=599).contains(&s.value) => {
                    return Err(cx.err(
                        format!("{key}.respond.status"),
                        line(s),
                        format!("status {} is not between 200 and 599", s.value),
                    ));
                }
                Some(s) => s.value,
                None => 200,
            };
            RouteAction::Respond {
                status,
                body: resp.value.body.clone(),
            }
        }
        _ => {
            return Err(cx.err(
                key.to_string(),
                line(rt),
                "a route needs exactly one of 'upstream' or 'respond'",
            ));
        }
    };
    Ok(RouteConfig {
        host,
        path_prefix,
        action,
    })
}

fn parse_host_match(s: &str) -> Result<HostMatch, String> {
    let s = s.trim().to_ascii_lowercase();
    if s == "*" {
        return Ok(HostMatch::Any);
    }
    let (wild, name) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s.as_str()),
    };
    let valid = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid {
        return Err(format!(
            "invalid host '{s}'; write '*', a name like 'api.example.com', or '*.example.com'"
        ));
    }
    Ok(if wild {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_string())
    })
}

fn upstream(cx: &Ctx, name: &str, u: &S<raw::RawUpstream>) -> Result<UpstreamConfig, ConfigError> {
    let key = format!("upstreams.{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(cx.err(
            key,
            line(u),
            "upstream names use only letters, digits, '-' and '_' (it is a metric label)",
        ));
    }
    let r = &u.value;
    let protocol = match r.protocol.as_ref().map(|p| (p.value.trim(), line(p))) {
        None | Some(("http1", _)) => UpstreamProtocol::Http1,
        Some(("h2c", _)) => UpstreamProtocol::H2c,
        Some(("h2", _)) => UpstreamProtocol::H2,
        Some(("tcp", _)) => UpstreamProtocol::Tcp,
        Some((other, l)) => {
            return Err(cx.err(
                format!("{key}.protocol"),
                l,
                format!("unsupported protocol '{other}'; supported: http1, h2c, h2, tcp"),
            ));
        }
    };
    let tls = match (&r.tls, protocol) {
        (Some(t), UpstreamProtocol::H2) => Some(UpstreamTls {
            ca: PathBuf::from(t.value.ca.value.trim()),
            server_name: match &t.value.server_name {
                None => None,
                Some(n) => Some(
                    rustls::pki_types::ServerName::try_from(n.value.trim())
                        .map(|_| n.value.trim().to_string())
                        .map_err(|_| {
                            cx.err(
                                format!("{key}.tls.server_name"),
                                line(n),
                                format!("'{}' is not a valid DNS name or IP address", n.value),
                            )
                        })?,
                ),
            },
        }),
        (Some(t), p) => {
            return Err(cx.err(
                format!("{key}.tls"),
                line(t),
                format!(
                    "tls is for 'protocol: h2' upstreams; this one is {}",
                    p.name()
                ),
            ));
        }
        (None, UpstreamProtocol::H2) => {
            return Err(cx.err(
                format!("{key}.tls"),
                line(u),
                "'protocol: h2' needs tls: { ca: FILE } (use h2c for cleartext HTTP/2)",
            ));
        }
        (None, _) => None,
    };
    let max_connections = match (&r.max_connections, protocol.is_h2()) {
        (None, _) => DEFAULT_UPSTREAM_H2_CONNECTIONS as usize,
        (Some(v), true) if (1..=MAX_UPSTREAM_H2_CONNECTIONS).contains(&v.value) => v.value as usize,
        (Some(v), true) => {
            return Err(cx.err(
                format!("{key}.max_connections"),
                line(v),
                format!(
                    "{} is out of range; allowed 1 to {MAX_UPSTREAM_H2_CONNECTIONS}",
                    v.value
                ),
            ));
        }
        (Some(v), false) => {
            return Err(cx.err(
                format!("{key}.max_connections"),
                line(v),
                "max_connections applies to h2 and h2c upstreams (HTTP/1.1 pools open a \
                 connection per concurrent request)",
            ));
        }
    };
    if r.servers.value.is_empty() {
        return Err(cx.err(
            format!("{key}.servers"),
            line(&r.servers),
            "at least one server (HOST:PORT) is required",
        ));
    }
    let servers = r
        .servers
        .value
        .iter()
        .enumerate()
        .map(|(i, s)| {
            parse_host_port(&s.value).map_err(|m| cx.err(format!("{key}.servers[{i}]"), line(s), m))
        })
        .collect::<Result<_, _>>()?;
    Ok(UpstreamConfig {
        name: name.to_string(),
        protocol,
        servers,
        connect_timeout: cx.duration(
            &format!("{key}.connect_timeout"),
            &r.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?,
        response_timeout: cx.duration(
            &format!("{key}.response_timeout"),
            &r.response_timeout,
            DEFAULT_RESPONSE_TIMEOUT,
        )?,
        read_timeout: cx.duration(
            &format!("{key}.read_timeout"),
            &r.read_timeout,
            DEFAULT_READ_TIMEOUT,
        )?,
        max_connections,
        tls,
        proxy_protocol: match &r.proxy_protocol {
            None => false,
            Some(p) if p.value.trim() == "v2" && !protocol.is_h2() => true,
            Some(p) if p.value.trim() == "v2" => {
                return Err(cx.err(
                    format!("{key}.proxy_protocol"),
                    line(p),
                    "proxy_protocol is for http1 and tcp upstreams: an HTTP/2 connection carries many clients",
                ));
            }
            Some(p) => {
                return Err(cx.err(
                    format!("{key}.proxy_protocol"),
                    line(p),
                    format!("unsupported '{}'; write v2", p.value),
                ));
            }
        },
    })
}

/// `HOST:PORT` with a non-zero port; IPv6 in brackets.
pub(super) fn parse_host_port(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    let bad = || {
        format!("invalid server '{s}'; write HOST:PORT, e.g. 127.0.0.1:8080 or app.internal:8080")
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 || host.is_empty() || host.contains([':', '/', ' ']) {
        return Err(bad());
    }
    Ok(s.to_string())
}

impl Config {
    /// The embedded default used by `ephemera serve` without `--config`: one listener with the
    /// given (in-memory) certificate, routed to `upstream` (`http://HOST:PORT`) or to the
    /// built-in response that names the negotiated TLS parameters.
    pub fn embedded(
        listen: SocketAddr,
        admin: SocketAddr,
        upstream: Option<&str>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<Config, ConfigError> {
        let cx = Ctx {
            file: "command line",
        };
        let mut upstreams = Vec::new();
        let action = match upstream {
            None => RouteAction::Respond {
                status: 200,
                body: None,
            },
            Some(url) => {
                let authority = url
                    .strip_prefix("http://")
                    .map(|rest| rest.trim_end_matches('/'))
                    .ok_or_else(|| {
                        cx.err("--upstream", 0, format!("'{url}' must be http://HOST:PORT"))
                    })?;
                let server = parse_host_port(authority).map_err(|m| cx.err("--upstream", 0, m))?;
                upstreams.push(UpstreamConfig {
                    name: "default".to_string(),
                    protocol: UpstreamProtocol::Http1,
                    servers: vec![server],
                    connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                    response_timeout: DEFAULT_RESPONSE_TIMEOUT,
                    read_timeout: DEFAULT_READ_TIMEOUT,
                    max_connections: DEFAULT_UPSTREAM_H2_CONNECTIONS as usize,
                    tls: None,
                    proxy_protocol: false,
                });
                RouteAction::Upstream(0)
            }
        };
        Ok(Config {
            admin: AdminConfig {
                bind: admin,
                token_file: None,
            },
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            listeners: vec![ListenerConfig {
                name: "default".to_string(),
                bind: listen,
                max_connections: DEFAULT_MAX_CONNECTIONS as usize,
                reuse_port: false,
                proxy_protocol: false,
                mode: ListenerMode::Http,
                tls: TlsConfig {
                    certificates: vec![CertificateSource {
                        cert: PemSource::Memory {
                            label: "self-signed localhost certificate",
                            pem: cert_pem,
                        },
                        key: PemSource::Memory {
                            label: "in-memory private key",
                            pem: key_pem,
                        },
                        ocsp: None,
                        origin: Origin {
                            file: "built-in default".to_string(),
                            key: "certificate".to_string(),
                            line: 0,
                        },
                    }],
                    strict_sni: false,
                    groups: Group::DEFAULT.to_vec(),
                    handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                    max_concurrent_handshakes: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
                    key_update: Some(KeyUpdatePolicy::DEFAULT),
                    max_connection_age: Some(DEFAULT_MAX_CONNECTION_AGE),
                    max_connection_age_grace: DEFAULT_MAX_CONNECTION_AGE_GRACE,
                    handshake_rate_per_ip: None,
                    client_auth: None,
                    keylog: None,
                },
                http: HttpConfig {
                    header_timeout: DEFAULT_HEADER_TIMEOUT,
                    idle_timeout: DEFAULT_IDLE_TIMEOUT,
                    max_request_body: DEFAULT_MAX_REQUEST_BODY,
                    trusted_proxies: Vec::new(),
                    h2: DEFAULT_H2_LIMITS,
                    access_log: true,
                },
                routes: vec![RouteConfig {
                    host: HostMatch::Any,
                    path_prefix: "/".to_string(),
                    action,
                }],
            }],
            upstreams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_matches_parse() {
        assert_eq!(parse_host_match("*").unwrap(), HostMatch::Any);
        assert_eq!(
            parse_host_match("API.example.com").unwrap(),
            HostMatch::Exact("api.example.com".into())
        );
        assert_eq!(
            parse_host_match("*.example.com").unwrap(),
            HostMatch::Suffix(".example.com".into())
        );
        assert!(parse_host_match("a..b").is_err());
        assert!(parse_host_match("a/b").is_err());
    }

    #[test]
    fn host_port_parse() {
        assert!(parse_host_port("127.0.0.1:8080").is_ok());
        assert!(parse_host_port("[::1]:8080").is_ok());
        assert!(parse_host_port("app.internal:80").is_ok());
        assert!(parse_host_port("app.internal").is_err());
        assert!(parse_host_port("app:0").is_err());
        assert!(parse_host_port("http://x:1").is_err());
    }

    fn tls_of(extra: &str) -> Result<TlsConfig, ConfigError> {
        let yaml = format!(
            "listeners:\n  - name: a\n    bind: 127.0.0.1:1\n    tls:\n      certificates: [{{ cert: c, key: k }}]\n{extra}    routes: [{{ respond: {{}} }}]\n"
        );
        Config::parse(&yaml, "t.yaml").map(|c| c.listeners[0].tls.clone())
    }

    #[test]
    fn key_update_forms() {
        assert_eq!(
            tls_of("").unwrap().key_update,
            Some(KeyUpdatePolicy::DEFAULT)
        );
        assert_eq!(
            tls_of("      key_update: false\n").unwrap().key_update,
            None
        );
        assert_eq!(tls_of("      key_update: off\n").unwrap().key_update, None);
        assert_eq!(
            tls_of("      key_update: true\n").unwrap().key_update,
            Some(KeyUpdatePolicy::DEFAULT)
        );
        let p = tls_of("      key_update: { max_bytes: 1MiB }\n")
            .unwrap()
            .key_update
            .unwrap();
        assert_eq!((p.max_bytes, p.max_age), (Some(1024 * 1024), None));
        let p = tls_of("      key_update:\n        max_age: 90s\n")
            .unwrap()
            .key_update
            .unwrap();
        assert_eq!(
            (p.max_bytes, p.max_age),
            (None, Some(Duration::from_secs(90)))
        );
    }

    #[test]
    fn max_connection_age_and_handshake_rate_forms() {
        let t = tls_of("").unwrap();
        assert_eq!(t.max_connection_age, Some(Duration::from_secs(86_400)));
        assert_eq!(t.max_connection_age_grace, Duration::from_secs(30));
        assert_eq!(t.handshake_rate_per_ip, None);
        for off in ["false", "off"] {
            let t = tls_of(&format!("      max_connection_age: {off}\n")).unwrap();
            assert_eq!(t.max_connection_age, None);
        }
        let t =
            tls_of("      max_connection_age: 90m\n      max_connection_age_grace: 5s\n").unwrap();
        assert_eq!(t.max_connection_age, Some(Duration::from_secs(5400)));
        assert_eq!(t.max_connection_age_grace, Duration::from_secs(5));
        let r = tls_of("      handshake_rate_per_ip: 20\n")
            .unwrap()
            .handshake_rate_per_ip
            .unwrap();
        assert_eq!((r.per_second, r.burst, r.ipv6_prefix), (20.0, 20, 64));
        let r = tls_of("      handshake_rate_per_ip: 0.5\n")
            .unwrap()
            .handshake_rate_per_ip
            .unwrap();
        assert_eq!((r.per_second, r.burst), (0.5, 1));
        let r =
            tls_of("      handshake_rate_per_ip: { per_second: 5, burst: 50, ipv6_prefix: 56 }\n")
                .unwrap()
                .handshake_rate_per_ip
                .unwrap();
        assert_eq!((r.per_second, r.burst, r.ipv6_prefix), (5.0, 50, 56));
        let off = tls_of("      handshake_rate_per_ip: false\n").unwrap();
        assert_eq!(off.handshake_rate_per_ip, None);
    }

    #[test]
    fn max_connection_age_and_handshake_rate_errors_name_key_and_line() {
        for (yaml, want) in [
            (
                "      max_connection_age: 500ms\n",
                "listeners[0].tls.max_connection_age (line 6)",
            ),
            ("      max_connection_age: true\n", "true is not a duration"),
            (
                "      max_connection_age: soon\n",
                "listeners[0].tls.max_connection_age (line 6)",
            ),
            (
                "      handshake_rate_per_ip: 0\n",
                "listeners[0].tls.handshake_rate_per_ip.per_second (line 6)",
            ),
            (
                "      handshake_rate_per_ip: { per_second: 5, burst: 0 }\n",
                "listeners[0].tls.handshake_rate_per_ip.burst (line 6)",
            ),
            (
                "      handshake_rate_per_ip: { per_second: 5, ipv6_prefix: 129 }\n",
                "listeners[0].tls.handshake_rate_per_ip.ipv6_prefix (line 6)",
            ),
            (
                "      handshake_rate_per_ip: { per_second: 5, brust: 9 }\n",
                "brust",
            ),
            ("      handshake_rate_per_ip: lots\n", "lots"),
        ] {
            let e = tls_of(yaml).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("line 6"), "{yaml}: {e}");
        }
    }

    #[test]
    fn key_update_errors_name_key_and_line() {
        let e = tls_of("      key_update: { max_bytes: 1KiB }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listeners[0].tls.key_update.max_bytes (line 6)") && e.contains("64KiB"),
            "{e}"
        );
        let e = tls_of("      key_update: { max_age: 500ms }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key_update.max_age (line 6)") && e.contains("1s"),
            "{e}"
        );
        let e = tls_of("      key_update: { max_bites: 1MiB }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_bites") && e.contains("line 6"), "{e}");
        let e = tls_of("      key_update: {}\n").unwrap_err().to_string();
        assert!(e.contains("key_update: false"), "{e}");
        assert!(tls_of("      key_update: 5\n").is_err());
    }

    #[test]
    fn absurd_values_are_refused_not_overflowed() {
        let e = tls_of("      handshake_timeout: 300000000000y\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("handshake_timeout") && e.contains("365 days"),
            "{e}"
        );
        let e = tls_of("      key_update: { max_age: 2y }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_age"), "{e}");
        let yaml = "listeners:\n  - name: a\n    bind: 127.0.0.1:1\n    max_connections: 18446744073709551615\n    tls: { certificates: [{ cert: c, key: k }] }\n    routes: [{ respond: {} }]\n";
        let e = Config::parse(yaml, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("max_connections (line 4)"), "{e}");
    }

    #[test]
    fn cidr_parse() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }
}
