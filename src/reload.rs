//! Hot reload: re-read the config file and every certificate, then apply them to the running
//! proxy. New handshakes use the new certificates and settings; live connections keep what
//! they started with and are not dropped; listeners added to the config are bound, removed
//! ones stop accepting (their connections finish). A config or certificate that fails to
//! load changes nothing. Asked for by SIGHUP (`cli`) or `POST /reload` (`admin`); applied by
//! `Server::run`, which owns the listeners.

use tokio::sync::{mpsc, oneshot};

/// The outcome of one reload: a summary of what is now served, or why nothing changed.
pub type ReloadResult = Result<String, ReloadError>;

/// Why a reload changed nothing.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The proxy runs on the embedded default (no `--config`): there is nothing to re-read.
    #[error("started without --config: there is no config file to reload")]
    NoConfigFile,
    /// The new config, a certificate, or a new listener's address was rejected; the message
    /// names what and where. The previous config keeps serving.
    #[error("{0}")]
    Rejected(String),
    /// The proxy is shutting down.
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

pub struct ReloadRequest {
    pub reply: oneshot::Sender<ReloadResult>,
}

/// Asks the running server to reload; cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<ReloadRequest>);

impl ReloadHandle {
    pub fn new() -> (ReloadHandle, mpsc::Receiver<ReloadRequest>) {
        let (tx, rx) = mpsc::channel(8);
        (ReloadHandle(tx), rx)
    }

    /// Reload and wait for the outcome.
    pub async fn reload(&self) -> ReloadResult {
        let (reply, rx) = oneshot::channel();
        self.0
            .send(ReloadRequest { reply })
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        rx.await.unwrap_or(Err(ReloadError::ShuttingDown))
    }
}
