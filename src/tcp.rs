//! Layer-4 mode (`mode: tcp` listeners): after the TLS handshake (the same policy and the
//! same forced key updates as HTTP listeners), the client's bytes are relayed to a
//! `protocol: tcp` upstream and back, half-closes passed on both ways. Called by `listener`
//! in place of `http::serve_connection`; uses `upstream` and `relay`.

use crate::relay::{RelayEnd, relay};
use crate::tls::Established;
use crate::tls::stream::close_lingering;
use crate::upstream::Upstream;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub async fn serve_connection(
    est: Established,
    peer: SocketAddr,
    local: SocketAddr,
    up: Arc<Upstream>,
    idle: Duration,
) {
    let Established {
        stream: client,
        closed: returned,
        info,
    } = est;
    let facts = crate::proxy_protocol::ClientFacts {
        client: peer,
        local,
        sni: info.server_name.clone(),
        cipher_suite: info.cipher_suite,
        client_cert: info.client_cert.is_some(),
    };
    match up.open_stream(&facts).await {
        Ok((backend, _open)) => match relay(client, backend, idle, None).await {
            RelayEnd::Closed(up_bytes, down_bytes) => {
                tracing::debug!(%peer, up_bytes, down_bytes, "TCP relay closed");
            }
            RelayEnd::Failed(e) => {
                tracing::debug!(%peer, error = %e, "TCP relay ended with an error")
            }
            RelayEnd::Idle => {
                tracing::debug!(%peer, "TCP relay idle for tcp.idle_timeout; closing")
            }
            RelayEnd::Stopped => {}
        },
        Err(e) => {
            // Counted in ephemera_upstream_errors_total; the client sees the TLS session
            // close without data.
            if let Some(suppressed) = up.log.allow() {
                tracing::warn!(%peer, error = %e, suppressed_since_last = suppressed, "TCP mode: no backend connection");
            }
            drop(client);
        }
    }
    if let Ok(tls) = returned.await {
        close_lingering(tls).await;
    }
}
