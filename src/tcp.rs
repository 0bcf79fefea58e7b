//! Layer-4 mode (`mode: tcp` listeners): after the TLS handshake (the same policy and the
//! same forced key updates as HTTP listeners), the client's bytes are relayed to a
//! `protocol: tcp` upstream and back, half-closes passed on both ways. Called by `listener`
//! in place of `http::serve_connection`; uses `upstream` and `relay`. Past
//! `tls.max_connection_age` the relay closes at its first pause (`relay::QUIET`), or at the
//! end of the grace period whatever is in flight: TCP has no way to ask the client to
//! reconnect.

use crate::metrics::CloseReason;
use crate::relay::{RelayEnd, relay};
use crate::tls::Established;
use crate::tls::max_age::ConnectionAge;
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
    age: Option<ConnectionAge>,
) -> CloseReason {
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
    let reason = match up.open_stream(&facts).await {
        Ok((backend, _open)) => {
            let relayed = relay(client, backend, idle, age.map(|a| a.close_at), None);
            let cut = async {
                match age {
                    Some(a) => tokio::time::sleep_until(a.cut_at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = relayed => match end {
                    RelayEnd::Closed(up_bytes, down_bytes) => {
                        tracing::debug!(%peer, up_bytes, down_bytes, "TCP relay closed");
                        CloseReason::Completed
                    }
                    RelayEnd::Failed(e) => {
                        tracing::debug!(%peer, error = %e, "TCP relay ended with an error");
                        CloseReason::Error
                    }
                    RelayEnd::Idle => {
                        tracing::debug!(%peer, "TCP relay idle for tcp.idle_timeout; closing");
                        CloseReason::IdleTimeout
                    }
                    RelayEnd::Quiet => {
                        tracing::debug!(%peer, "past max_connection_age; closed at a pause");
                        CloseReason::MaxAge
                    }
                    RelayEnd::Stopped => CloseReason::Shutdown,
                },
                _ = cut => {
                    tracing::debug!(%peer, "past max_connection_age and its grace; closing");
                    CloseReason::MaxAge
                }
            }
        }
        Err(e) => {
            // Counted in ephemera_upstream_errors_total; the client sees the TLS session
            // close without data.
            if let Some(suppressed) = up.log.allow() {
                tracing::warn!(%peer, error = %e, suppressed_since_last = suppressed, "TCP mode: no backend connection");
            }
            drop(client);
            CloseReason::UpstreamUnavailable
        }
    };
    if let Ok(tls) = returned.await {
        // Boxed: its state (the TLS stream, a read buffer) would otherwise be part of this
        // future, and so of every idle connection's memory.
        Box::pin(close_lingering(tls)).await;
    }
    reason
}
