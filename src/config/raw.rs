//! Config, layer 1 of 2: serde structs that mirror the YAML file one to one.
//!
//! Nothing here is trusted. Every field that needs checking is wrapped in `Spanned` so that
//! `config::validate` can name the line it came from; unknown keys are rejected by serde.

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

/// A scalar with the line it was written on.
pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub shutdown_grace: Option<S<String>>,
    #[serde(default)]
    pub listeners: Vec<S<RawListener>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, S<RawUpstream>>,
    /// Only to refuse it with a clear message: key logging is a command-line flag.
    #[serde(default)]
    pub keylog: Option<S<serde::de::IgnoredAny>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Option<S<String>>,
    #[serde(default)]
    pub token_file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: S<String>,
    pub bind: S<String>,
    #[serde(default)]
    pub max_connections: Option<S<u64>>,
    #[serde(default)]
    pub reuse_port: Option<bool>,
    #[serde(default)]
    pub proxy_protocol: Option<S<bool>>,
    pub tls: S<RawTls>,
    #[serde(default)]
    pub mode: Option<S<String>>,
    #[serde(default)]
    pub tcp: Option<S<RawTcp>>,
    #[serde(default)]
    pub http: Option<RawHttp>,
    #[serde(default)]
    pub routes: Vec<S<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcp {
    pub upstream: S<String>,
    #[serde(default)]
    pub idle_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub certificates: Vec<S<RawCertificate>>,
    #[serde(default)]
    pub strict_sni: Option<bool>,
    #[serde(default)]
    pub groups: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub handshake_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_concurrent_handshakes: Option<S<u64>>,
    #[serde(default)]
    pub key_update: Option<S<RawKeyUpdate>>,
    #[serde(default)]
    pub max_connection_age: Option<S<RawDurationOrOff>>,
    #[serde(default)]
    pub max_connection_age_grace: Option<S<String>>,
    #[serde(default)]
    pub handshake_rate_per_ip: Option<S<RawHandshakeRate>>,
    #[serde(default)]
    pub client_auth: Option<S<RawClientAuth>>,
    /// Only to refuse it with a clear message.
    #[serde(default)]
    pub keylog: Option<S<serde::de::IgnoredAny>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientAuth {
    pub ca: S<String>,
    #[serde(default)]
    pub required: Option<bool>,
}

/// `key_update: false` (or `off`), `true`, or `{ max_bytes: 1GiB, max_age: 1h }`.
#[derive(Debug)]
pub enum RawKeyUpdate {
    Switch(bool),
    Limits(RawKeyUpdateLimits),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyUpdateLimits {
    #[serde(default)]
    pub max_bytes: Option<String>,
    #[serde(default)]
    pub max_age: Option<String>,
}

// Hand-written rather than `#[serde(untagged)]`: untagged enums replace every inner error
// (an unknown key, say) with "data did not match any variant".
impl<'de> Deserialize<'de> for RawKeyUpdate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawKeyUpdate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("false, true, or a map { max_bytes: SIZE, max_age: DURATION }")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawKeyUpdate, E> {
                Ok(RawKeyUpdate::Switch(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawKeyUpdate, A::Error> {
                RawKeyUpdateLimits::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawKeyUpdate::Limits)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A duration, or `false` / `off` to disable what it bounds.
#[derive(Debug)]
pub enum RawDurationOrOff {
    Off,
    Duration(String),
}

impl<'de> Deserialize<'de> for RawDurationOrOff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDurationOrOff;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration such as 24h, or false (off)")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawDurationOrOff, E> {
                if v {
                    Err(E::custom(
                        "true is not a duration: write one such as 24h, or false to turn it off",
                    ))
                } else {
                    Ok(RawDurationOrOff::Off)
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDurationOrOff, E> {
                Ok(match v.trim() {
                    "off" | "false" => RawDurationOrOff::Off,
                    d => RawDurationOrOff::Duration(d.to_string()),
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDurationOrOff, E> {
                Ok(RawDurationOrOff::Duration(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `handshake_rate_per_ip: 20` (per second), `false`, or
/// `{ per_second: 20, burst: 40, ipv6_prefix: 64 }`.
#[derive(Debug)]
pub enum RawHandshakeRate {
    Off,
    PerSecond(f64),
    Limits(RawHandshakeRateLimits),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHandshakeRateLimits {
    pub per_second: f64,
    #[serde(default)]
    pub burst: Option<u64>,
    #[serde(default)]
    pub ipv6_prefix: Option<u64>,
}

impl<'de> Deserialize<'de> for RawHandshakeRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawHandshakeRate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("false, handshakes per second (a number), or a map { per_second: N, burst: N, ipv6_prefix: N }")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawHandshakeRate, E> {
                if v {
                    Err(E::custom(
                        "true is not a rate: write handshakes per second (e.g. 20), or false to turn it off",
                    ))
                } else {
                    Ok(RawHandshakeRate::Off)
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawHandshakeRate, E> {
                Ok(RawHandshakeRate::PerSecond(v as f64))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawHandshakeRate, E> {
                Ok(RawHandshakeRate::PerSecond(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawHandshakeRate, E> {
                Ok(RawHandshakeRate::PerSecond(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawHandshakeRate, E> {
                match v.trim() {
                    "off" | "false" => Ok(RawHandshakeRate::Off),
                    other => Err(E::custom(format!(
                        "'{other}' is not a rate: write handshakes per second (e.g. 20), or false"
                    ))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawHandshakeRate, A::Error> {
                RawHandshakeRateLimits::deserialize(serde::de::value::MapAccessDeserializer::new(
                    map,
                ))
                .map(RawHandshakeRate::Limits)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: S<String>,
    pub key: S<String>,
    #[serde(default)]
    pub ocsp: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    #[serde(default)]
    pub header_timeout: Option<S<String>>,
    #[serde(default)]
    pub idle_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_request_body: Option<S<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<S<String>>,
    #[serde(default)]
    pub h2: Option<S<RawH2>>,
    #[serde(default)]
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawH2 {
    #[serde(default)]
    pub max_concurrent_streams: Option<S<u64>>,
    #[serde(default)]
    pub initial_stream_window: Option<S<String>>,
    #[serde(default)]
    pub initial_connection_window: Option<S<String>>,
    #[serde(default)]
    pub max_header_list_size: Option<S<String>>,
    #[serde(default)]
    pub keepalive_interval: Option<S<String>>,
    #[serde(default)]
    pub keepalive_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default)]
    pub host: Option<S<String>>,
    #[serde(default)]
    pub path_prefix: Option<S<String>>,
    #[serde(default)]
    pub upstream: Option<S<String>>,
    #[serde(default)]
    pub respond: Option<S<RawRespond>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    #[serde(default)]
    pub status: Option<S<u16>>,
    #[serde(default)]
    pub body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default)]
    pub protocol: Option<S<String>>,
    pub servers: S<Vec<S<String>>>,
    #[serde(default)]
    pub connect_timeout: Option<S<String>>,
    #[serde(default)]
    pub response_timeout: Option<S<String>>,
    #[serde(default)]
    pub read_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_connections: Option<S<u64>>,
    #[serde(default)]
    pub tls: Option<S<RawUpstreamTls>>,
    #[serde(default)]
    pub proxy_protocol: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: S<String>,
    #[serde(default)]
    pub server_name: Option<S<String>>,
}
