//! Command line: `serve`, `check`, `certs`, `loadgen`. Parsed by clap in `main`; each subcommand
//! maps onto the library (config → Server, or the load generator) and returns an exit code.

use crate::config::{self, Config};
use crate::{Prepared, Server, certgen, describe};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    name = "ephemera",
    version,
    about = "TLS 1.3-only terminating reverse proxy with strict forward secrecy"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy. Without --config it serves an embedded default: TLS on 127.0.0.1:8443
    /// with a self-signed certificate for localhost minted in memory, admin on 127.0.0.1:9844,
    /// and a built-in response naming the negotiated TLS parameters (or --upstream).
    Serve {
        /// YAML config file (see config/ephemera.yaml). Without it, the embedded default runs.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Quick start, without --config only: TLS listen address.
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        listen: Option<SocketAddr>,
        /// Quick start, without --config only: admin (metrics) listen address.
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        admin: Option<SocketAddr>,
        /// Quick start, without --config only: forward every request to this HTTP/1.1 backend
        /// (http://HOST:PORT) instead of the built-in response.
        #[arg(long, value_name = "URL", conflicts_with = "config")]
        upstream: Option<String>,
        /// Keep core dumps possible (debugging only): by default the process sets
        /// RLIMIT_CORE to 0 and marks itself non-dumpable, since a core file would hold
        /// private keys and live traffic secrets.
        #[arg(long)]
        allow_core_dumps: bool,
        /// DEBUGGING ONLY: append every connection's TLS secrets to FILE (SSLKEYLOGFILE
        /// format, for Wireshark). Anyone with the file and a capture reads the traffic:
        /// forward secrecy is gone for those connections. Never a config setting.
        #[arg(long, value_name = "FILE")]
        keylog: Option<PathBuf>,
    },
    /// Validate a config (files, certificates, keys) and print the effective policy. Exits 0
    /// when valid, 1 otherwise. Binds nothing.
    Check {
        /// YAML config file to validate.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Write development certificates: ca.crt, ca.key, <NAME>.crt (chain) and <NAME>.key
    /// (ECDSA P-256, keys mode 0600). For testing only.
    Certs {
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// DNS name (or IP) for the leaf certificate; repeat for more. The first names the
        /// files. Default: localhost.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
    /// Load generator for any TLS 1.3 HTTP server: full handshakes per second (--mode
    /// handshake) or keep-alive requests (--mode requests), with latency percentiles, errors by
    /// kind, what was negotiated, and (--metrics, --server-pid) the server's own counts and CPU.
    Loadgen(Box<crate::loadgen::Args>),
}

/// Run a parsed command. Returns the process exit code.
pub async fn run(cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Serve {
            config,
            listen,
            admin,
            upstream,
            allow_core_dumps,
            keylog,
        } => {
            if allow_core_dumps {
                tracing::warn!(
                    "--allow-core-dumps: a core dump of this process would contain private keys and traffic secrets"
                );
            } else if let Err(e) = crate::hardening::no_core_dumps() {
                tracing::warn!(error = %e, "could not disable core dumps");
            }
            let keylog = match keylog {
                None => None,
                Some(path) => {
                    let file = crate::tls::keylog::KeyLogFile::open(&path)
                        .with_context(|| format!("opening --keylog file {}", path.display()))?;
                    tracing::warn!(file = %path.display(), "--keylog: TLS secrets of every connection are written to this file; forward secrecy is void for them. Debugging only");
                    Some(std::sync::Arc::new(file) as std::sync::Arc<dyn rustls::KeyLog>)
                }
            };
            serve(config, listen, admin, upstream, keylog).await
        }
        Command::Check { config } => check(config),
        Command::Certs { out, names } => {
            let names = if names.is_empty() {
                vec!["localhost".to_string()]
            } else {
                names
            };
            let written = certgen::write_dev_certs(&out, &names)?;
            for p in written {
                let _ = writeln!(std::io::stdout(), "wrote {}", p.display());
            }
            Ok(0)
        }
        Command::Loadgen(args) => Ok(crate::loadgen::command(*args).await?),
    }
}

fn check(path: PathBuf) -> anyhow::Result<i32> {
    let prepared = Config::load(&path)
        .map_err(crate::StartError::from)
        .and_then(Prepared::new);
    match prepared {
        Ok(p) => {
            // Not print!: it panics when stdout is a closed pipe (`ephemera check | head`).
            let text = format!("config OK: {}\n{}", path.display(), describe(&p));
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            Ok(0)
        }
        Err(e) => {
            eprintln!("config INVALID: {e}");
            Ok(1)
        }
    }
}

async fn serve(
    path: Option<PathBuf>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    upstream: Option<String>,
    keylog: Option<std::sync::Arc<dyn rustls::KeyLog>>,
) -> anyhow::Result<i32> {
    let mut config = match &path {
        Some(p) => Config::load(p)?,
        None => {
            let issued =
                certgen::self_signed(&["localhost".into(), "127.0.0.1".into(), "::1".into()])
                    .context("minting the embedded default certificate")?;
            tracing::warn!(
                "no --config: serving the embedded default with a self-signed ECDSA P-256 certificate for localhost, minted in memory (clients must skip verification, e.g. curl -k)"
            );
            let listen =
                listen.unwrap_or_else(|| config::DEFAULT_LISTEN.parse().expect("constant"));
            let admin =
                admin.unwrap_or_else(|| config::DEFAULT_ADMIN_BIND.parse().expect("constant"));
            Config::embedded(
                listen,
                admin,
                upstream.as_deref(),
                issued.cert_pem.into_bytes(),
                issued.key_pem.into_bytes(),
            )?
        }
    };
    config.set_keylog(keylog);
    // Installed before the (possibly slow) bind: SIGHUP's default action would kill us.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let mut server = Server::bind(config).await?;
    if let Some(p) = path {
        server = server.reload_from(p);
    }
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(count_signals(tx));
    tokio::spawn(reload_on_sighup(hup, server.reload_handle()));
    tokio::spawn(timer_anchor());
    Ok(if server.run(rx).await { 0 } else { 1 })
}

/// A timer that always fires within 200 ms. tokio wakes its driver (an eventfd write) whenever
/// a new timer is due before every other one; each connection starts such timers (the
/// handshake timeout, the header or idle deadline, HTTP/1.1's 250 ms parking check), so with
/// nothing earlier pending each new connection paid one or two writes. With this one pending
/// they are not the earliest. Costs five wake-ups a second.
async fn timer_anchor() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Counts SIGTERM/SIGINT: the first starts a graceful drain, the second ends it.
async fn count_signals(tx: watch::Sender<u32>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        // Keep the sender: dropping it would read as a stop request.
        std::future::pending::<()>().await;
        return;
    };
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stop requested");
        tx.send_modify(|n| *n += 1);
    }
}

/// SIGHUP reloads the config file and certificates (the outcome is logged by the server).
async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    reload: crate::reload::ReloadHandle,
) {
    let Ok(mut hup) = hup else {
        tracing::error!("cannot install the SIGHUP handler; reload with POST /reload");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(signal = "SIGHUP", "reload requested");
        let _ = reload.reload().await;
    }
}

/// An error and its causes on one line, skipping a cause whose text the message before it
/// already includes (our errors name their source in their own message).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = cause.source();
    }
    out
}

/// Parse the command line (exposed for main).
pub fn parse() -> Cli {
    Cli::parse()
}
