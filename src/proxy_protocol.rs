//! PROXY protocol (HAProxy's spec, v1 and v2): reading the header an L4 load balancer in
//! front of us sends first (`listener`, for `proxy_protocol: true` listeners, from
//! `trusted_proxies` only), and writing a v2 header to backends that asked for one
//! (`upstream`, `proxy_protocol: v2`), carrying the client address and the TLS facts.
//! Parsing and building use the `ppp` crate; this module only frames the bytes.

use ppp::v2::{Builder, Command, Protocol, Type, Version};
use std::io;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v1 limit (107 bytes) and the v2 fixed part.
const V1_MAX: usize = 107;
const V2_PREFIX: usize = 16;

/// Why an inbound PROXY header was refused (the connection is closed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyHeaderError {
    /// The peer closed before sending anything (a load balancer's TCP health check).
    #[error("the peer closed before sending a PROXY header")]
    Closed,
    #[error("no PROXY protocol header from a trusted proxy (first byte {0:#04x})")]
    Missing(u8),
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// Read exactly one PROXY header (v1 or v2) from the start of `io`, consuming nothing
/// after it. Returns the client address it names; `None` for LOCAL / UNKNOWN (health
/// checks from the balancer itself: keep the peer address).
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let first = match io.read_u8().await {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(ProxyHeaderError::Closed);
        }
        Err(e) => return Err(e.into()),
    };
    match first {
        b'P' => {
            // v1: text up to CRLF, byte by byte so that no TLS byte after it is consumed.
            let mut line = vec![first];
            while !line.ends_with(b"\r\n") {
                if line.len() >= V1_MAX {
                    return Err(ProxyHeaderError::Malformed(
                        "v1 line longer than 107 bytes".into(),
                    ));
                }
                line.push(io.read_u8().await?);
            }
            let h = ppp::v1::Header::try_from(&line[..])
                .map_err(|e| ProxyHeaderError::Malformed(format!("v1: {e:?}")))?;
            Ok(match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            })
        }
        0x0D => {
            let mut buf = vec![0u8; V2_PREFIX];
            buf[0] = first;
            io.read_exact(&mut buf[1..]).await?;
            // Signature and version 2 before believing the length (up to 64 KiB).
            if &buf[..12] != ppp::v2::PROTOCOL_PREFIX || buf[12] >> 4 != 2 {
                return Err(ProxyHeaderError::Malformed("not a v2 signature".into()));
            }
            let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            buf.resize(V2_PREFIX + len, 0);
            io.read_exact(&mut buf[V2_PREFIX..]).await?;
            let h = ppp::v2::Header::try_from(&buf[..])
                .map_err(|e| ProxyHeaderError::Malformed(format!("v2: {e:?}")))?;
            if h.command == Command::Local {
                return Ok(None);
            }
            Ok(match h.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            })
        }
        other => Err(ProxyHeaderError::Missing(other)),
    }
}

/// What a v2 header to a backend carries (set on requests for upstreams that want one).
#[derive(Debug, Clone)]
pub struct ClientFacts {
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub sni: Option<String>,
    pub cipher_suite: &'static str,
    pub client_cert: bool,
}

/// PP2_TYPE_SSL sub-types (spec §2.2.5).
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;

/// rustls names TLS 1.3 suites `TLS13_…`; HAProxy and OpenSSL send the IANA name `TLS_…`.
fn iana_cipher(rustls_name: &str) -> String {
    match rustls_name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => rustls_name.to_string(),
    }
}

/// A v2 PROXY header: PROXY command, TCP over the client's address family, the client and
/// our local address, PP2_TYPE_AUTHORITY (the SNI name) and PP2_TYPE_SSL (version, cipher).
pub fn v2_header(f: &ClientFacts) -> io::Result<Vec<u8>> {
    let client = SocketAddr::new(f.client.ip().to_canonical(), f.client.port());
    let local = SocketAddr::new(f.local.ip().to_canonical(), f.local.port());
    // Both addresses in one family: map an IPv4 one to IPv6 when they differ.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V6(l)) => (
            SocketAddr::new(c.ip().to_ipv6_mapped().into(), c.port()),
            SocketAddr::V6(l),
        ),
        (SocketAddr::V6(c), SocketAddr::V4(l)) => (
            SocketAddr::V6(c),
            SocketAddr::new(l.ip().to_ipv6_mapped().into(), l.port()),
        ),
        pair => pair,
    };
    let mut ssl = vec![if f.client_cert {
        PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
    } else {
        PP2_CLIENT_SSL
    }];
    // verify: 0 when a client certificate was presented and verified, non-zero otherwise.
    ssl.extend_from_slice(&u32::from(!f.client_cert).to_be_bytes());
    for (kind, value) in [
        (PP2_SUBTYPE_SSL_VERSION, "TLSv1.3".as_bytes()),
        (
            PP2_SUBTYPE_SSL_CIPHER,
            iana_cipher(f.cipher_suite).as_bytes(),
        ),
    ] {
        ssl.push(kind);
        ssl.extend_from_slice(&u16::try_from(value.len()).unwrap_or(0).to_be_bytes());
        ssl.extend_from_slice(value);
    }
    let mut b = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (client, local),
    );
    if let Some(sni) = &f.sni {
        b = b.write_tlv(Type::Authority, sni.as_bytes())?;
    }
    b.write_tlv(Type::SSL, &ssl)?.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v2_round_trips_and_stops_at_the_header() {
        let facts = ClientFacts {
            client: "203.0.113.7:51000".parse().unwrap(),
            local: "192.0.2.1:443".parse().unwrap(),
            sni: Some("app.example".into()),
            cipher_suite: "TLS13_AES_128_GCM_SHA256",
            client_cert: false,
        };
        let mut bytes = v2_header(&facts).unwrap();
        let header_len = bytes.len();
        bytes.extend_from_slice(b"\x16\x03\x01rest");
        let mut r = &bytes[..];
        let addr = read_header(&mut r).await.unwrap();
        assert_eq!(addr, Some(facts.client));
        assert_eq!(r, b"\x16\x03\x01rest", "nothing after the header consumed");
        let h = ppp::v2::Header::try_from(&bytes[..header_len]).unwrap();
        let tlvs: Vec<_> = h.tlvs().map(|t| t.unwrap()).collect();
        assert_eq!(tlvs[0].value.as_ref(), b"app.example");
    }

    #[tokio::test]
    async fn v1_is_read_byte_exact_and_garbage_is_refused() {
        let mut r = &b"PROXY TCP4 198.51.100.9 192.0.2.1 40000 443\r\n\x16\x03"[..];
        let addr = read_header(&mut r).await.unwrap();
        assert_eq!(addr, Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(r, b"\x16\x03");
        let mut r = &b"PROXY UNKNOWN\r\n"[..];
        assert_eq!(read_header(&mut r).await.unwrap(), None);
        let mut r = &b"\x16\x03\x01\x00"[..];
        assert!(matches!(
            read_header(&mut r).await,
            Err(ProxyHeaderError::Missing(0x16))
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        let mut r = &long[..];
        assert!(matches!(
            read_header(&mut r).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }
}
