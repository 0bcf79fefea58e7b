//! PROXY protocol: inbound v1/v2 from trusted load balancers (the client address then used
//! for X-Forwarded-For), refused or ignored otherwise; outbound v2 to TCP and HTTP/1.1
//! backends with the client address and TLS facts (SNI, version, cipher) as TLVs.

mod common;
use common::*;

use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn v2(client: &str, local: &str) -> Vec<u8> {
    let (c, l): (SocketAddr, SocketAddr) = (client.parse().unwrap(), local.parse().unwrap());
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (c, l),
    )
    .build()
    .unwrap()
}

/// TLS (http/1.1) over a TCP connection that first sends `header`; GET /headers.
async fn headers_via(proxy: &Proxy, certs: &Certs, header: &[u8]) -> Result<String, String> {
    let mut tcp = TcpStream::connect(proxy.addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(header).await.map_err(|e| e.to_string())?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&certs.ca_der(), &[b"http/1.1"])));
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = HttpClient::over(tls, false).await;
    let resp = c
        .send(request("GET", "/headers", empty()))
        .await
        .map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).to_string())
}

async fn inbound_proxy(trusted: &str) -> (Certs, Proxy) {
    let certs = Certs::new(&["localhost"]);
    let backend = start_backend().await;
    let yaml = config_yaml(
        &certs,
        Some(&[backend]),
        "",
        &format!("      trusted_proxies: [{trusted}]\n"),
        "",
    )
    .replace("    tls:\n", "    proxy_protocol: true\n    tls:\n");
    let proxy = Proxy::start(&yaml).await;
    (certs, proxy)
}

#[tokio::test]
async fn a_trusted_balancers_v1_and_v2_headers_name_the_client() {
    let (certs, proxy) = inbound_proxy("127.0.0.0/8").await;
    let text = headers_via(&proxy, &certs, &v2("203.0.113.9:4000", "192.0.2.1:443"))
        .await
        .unwrap();
    assert!(text.contains("x-forwarded-for: 203.0.113.9\n"), "{text}");
    assert!(
        text.contains("forwarded: for=203.0.113.9;proto=https"),
        "{text}"
    );
    let text = headers_via(
        &proxy,
        &certs,
        b"PROXY TCP4 198.51.100.7 192.0.2.1 5000 443\r\n",
    )
    .await
    .unwrap();
    assert!(text.contains("x-forwarded-for: 198.51.100.7\n"), "{text}");
    // LOCAL (the balancer's own health check): the peer address stays.
    let local = ppp::v2::Builder::new(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
    )
    .build()
    .unwrap();
    let text = headers_via(&proxy, &certs, &local).await.unwrap();
    assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
}

#[tokio::test]
async fn a_trusted_peer_without_a_header_is_refused_and_counted() {
    let (certs, proxy) = inbound_proxy("127.0.0.0/8").await;
    let r = headers_via(&proxy, &certs, b"").await;
    assert!(r.is_err(), "{r:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = proxy.metrics().await;
        if metric(
            &m,
            "ephemera_tls_handshake_failures_total",
            &["reason=\"proxy_protocol\""],
        ) == 1.0
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_untrusted_peer_cannot_claim_another_address() {
    let (certs, proxy) = inbound_proxy("10.0.0.0/8").await;
    // Its PROXY header is not read: the bytes are not TLS, the handshake fails.
    let forged = headers_via(&proxy, &certs, &v2("203.0.113.9:4000", "192.0.2.1:443")).await;
    assert!(forged.is_err(), "{forged:?}");
    // Plain TLS from it works, with its own address.
    let text = headers_via(&proxy, &certs, b"").await.unwrap();
    assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
}

/// Reads one PROXY header per connection, records it, then echoes (TCP) the rest.
async fn start_recording_echo() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut prefix = [0u8; 16];
                s.read_exact(&mut prefix).await.unwrap();
                let len = u16::from_be_bytes([prefix[14], prefix[15]]) as usize;
                let mut rest = vec![0u8; len];
                s.read_exact(&mut rest).await.unwrap();
                seen.lock().unwrap().push([&prefix[..], &rest].concat());
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, seen)
}

fn tlvs(header: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let h = ppp::v2::Header::try_from(header).unwrap();
    h.tlvs()
        .map(|t| t.unwrap())
        .map(|t| (t.kind, t.value.to_vec()))
        .collect()
}

#[tokio::test]
async fn tcp_upstreams_get_a_v2_header_with_the_client_and_tls_facts() {
    let certs = Certs::new(&["localhost"]);
    let (backend, seen) = start_recording_echo().await;
    let yaml = format!(
        "admin: {{ bind: 127.0.0.1:0 }}\nlisteners:\n  - name: l4\n    bind: 127.0.0.1:0\n    mode: tcp\n    tcp: {{ upstream: echo }}\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\nupstreams:\n  echo: {{ protocol: tcp, proxy_protocol: v2, servers: [{backend}] }}\n",
        yaml_path(&certs.cert),
        yaml_path(&certs.key)
    );
    let proxy = Proxy::start(&yaml).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&certs.ca_der(), &[])));
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    let header = seen.lock().unwrap()[0].clone();
    let h = ppp::v2::Header::try_from(&header[..]).unwrap();
    match h.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(
                SocketAddr::from((a.source_address, a.source_port)),
                client_addr
            );
            assert_eq!(
                SocketAddr::from((a.destination_address, a.destination_port)),
                proxy.addr
            );
        }
        other => panic!("{other:?}"),
    }
    let t = tlvs(&header);
    assert!(
        t.contains(&(0x02, b"localhost".to_vec())),
        "authority (SNI): {t:?}"
    );
    let ssl = &t.iter().find(|(k, _)| *k == 0x20).expect("PP2_TYPE_SSL").1;
    assert_eq!(ssl[0] & 0x01, 0x01, "PP2_CLIENT_SSL");
    let sub = String::from_utf8_lossy(&ssl[5..]).to_string();
    assert!(
        sub.contains("TLSv1.3") && sub.contains("TLS_AES_128_GCM_SHA256"),
        "{sub}"
    );
}

#[tokio::test]
async fn http1_upstreams_get_one_connection_per_request_with_the_header() {
    let certs = Certs::new(&["localhost"]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::<Option<SocketAddr>>::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let client = ephemera::proxy_protocol::read_header(&mut s).await.unwrap();
                seen.lock().unwrap().push(client);
                let svc = hyper::service::service_fn(backend_handler);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let ups = "    proxy_protocol: v2\n";
    let proxy = Proxy::start(&config_yaml(&certs, Some(&[backend]), "", "", ups)).await;
    let mut c = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    for _ in 0..3 {
        assert_eq!(c.get("/").await.0, 200);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        3,
        "one backend connection per request: {seen:?}"
    );
    assert!(
        seen.iter().all(|a| a.is_some_and(|a| a.ip().is_loopback())),
        "{seen:?}"
    );
}
