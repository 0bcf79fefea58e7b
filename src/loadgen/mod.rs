//! `ephemera loadgen`: a handshake and request load generator for any TLS 1.3 HTTP server,
//! the client side of the crates the proxy uses (rustls + aws-lc-rs, hyper). Not part of the
//! proxy's data flow; it reads `config::Group` and the policy's group mapping only.
//!
//! options → client TLS (`client_tls`) → `connect` (TCP + TLS) → `http` → `stats` →
//! `report` (JSON) and `report_text`; `schedule` paces the workers in `drive`;
//! `metrics_scrape` and `proc_cpu` read the server's own view before and after; `progress`
//! draws the live line.

pub mod client_tls;
mod connect;
mod drive;
pub mod failure;
mod http;
pub mod metrics_scrape;
pub mod options;
pub mod proc_cpu;
mod progress;
pub mod report;
mod report_text;
mod schedule;
mod stats;

pub use options::{Args, Options};
pub use report::Report;

use client_tls::TicketCounter;
use failure::ErrorKind;
use proc_cpu::CpuTimes;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long one metrics scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a load run could not start or produced nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadgenError {
    /// The command line cannot run.
    #[error(transparent)]
    Options(#[from] options::OptionsError),
    /// The target's host name does not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    /// The client TLS config cannot be built (CA file, system roots).
    #[error(transparent)]
    ClientTls(#[from] client_tls::ClientTlsError),
    /// The server's metrics endpoint could not be read before the run.
    #[error(transparent)]
    Metrics(#[from] metrics_scrape::ScrapeError),
    /// The server process's CPU time could not be read.
    #[error(transparent)]
    Proc(#[from] proc_cpu::ProcError),
    /// The client's runtime could not start.
    #[error("cannot start the client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A load worker, or the run around it, panicked (a bug in loadgen): the run is
    /// incomplete, so no report.
    #[error("loadgen failed unexpectedly, so the run is incomplete: {0}")]
    WorkerPanicked(String),
    /// Every attempt failed; `kind` is the most frequent error.
    #[error(
        "every request failed ({count} of {attempts} with {kind}): {example}{}",
        kind.hint().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    AllFailed {
        kind: ErrorKind,
        count: u64,
        attempts: u64,
        example: String,
    },
}

/// The subcommand: run, print the report (stdout), and fail when every attempt failed.
pub async fn command(args: Args) -> Result<i32, LoadgenError> {
    let opts = Options::from_args(args)?;
    if matches!(opts.verify, options::Verify::Insecure) {
        eprintln!(
            "warning: certificate verification is OFF (--insecure): any certificate is accepted; \
             only the handshake signature is checked"
        );
    }
    let json = opts.json;
    let (report, failed) = run(opts).await?;
    let text = if json {
        report.to_json() + "\n"
    } else {
        report.to_text()
    };
    // Not print!: it panics when stdout is a closed pipe (`ephemera loadgen … | head`).
    let _ = std::io::stdout().write_all(text.as_bytes());
    match failed {
        Some(e) => Err(e),
        None => Ok(0),
    }
}

/// Run the load on a runtime of its own (`--threads` worker threads), so the client's
/// thread count is the one asked for whatever runtime the caller has. Returns the report and,
/// if every attempt failed, the error to exit with.
pub async fn run(opts: Options) -> Result<(Report, Option<LoadgenError>), LoadgenError> {
    let threads = opts.threads;
    let joined = tokio::task::spawn_blocking(move || {
        // One thread: a current-thread runtime on this (blocking) thread does the same work
        // without the multi-threaded scheduler's cross-thread bookkeeping, so a client pinned
        // to one CPU (`taskset`, as in benches/compare.sh) drives more load per core.
        let mut builder = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads).thread_name("loadgen");
            b
        };
        let rt = builder
            .enable_all()
            .build()
            .map_err(LoadgenError::Runtime)?;
        let out = rt.block_on(run_here(opts));
        // Connections still closing are dropped, not waited for.
        rt.shutdown_background();
        out
    })
    .await;
    match joined {
        Ok(out) => out,
        Err(e) if e.is_panic() => Err(LoadgenError::WorkerPanicked(drive::panic_message(
            e.into_panic(),
        ))),
        Err(e) => Err(LoadgenError::Runtime(std::io::Error::other(e.to_string()))),
    }
}

async fn run_here(opts: Options) -> Result<(Report, Option<LoadgenError>), LoadgenError> {
    let addrs = resolve(&opts).await?;
    let tickets = Arc::new(TicketCounter::default());
    let tls = client_tls::client_config(&opts, tickets.clone())?;
    let connector = connect::Connector::new(addrs, tls, opts.server_name.clone(), opts.timeout);

    let metrics_before = match &opts.metrics {
        Some(uri) => Some(metrics_scrape::scrape(uri, SCRAPE_TIMEOUT).await?),
        None => None,
    };
    let pid = opts.server_pid.map(|p| p.to_string());
    let server_before = pid.as_deref().map(proc_cpu::read).transpose()?;
    let client_before = proc_cpu::read("self").ok();

    let start = tokio::time::Instant::now();
    let shared = Arc::new(drive::Shared::new(
        &opts,
        connector,
        schedule::Schedule::new(start, opts.requests, opts.duration, opts.rate),
        // A few shards per thread keep lock contention negligible.
        stats::Recorder::new(opts.threads * 4),
    ));
    let progress = progress::Progress::start(shared.clone());
    let elapsed = drive::run(shared.clone()).await;
    progress.finish();
    let elapsed = elapsed.map_err(LoadgenError::WorkerPanicked)?;

    let server_cpu = match (pid.as_deref(), server_before) {
        (Some(p), Some(before)) => match proc_cpu::read(p) {
            Ok(after) => opts.server_pid.map(|pid| (pid, before.until(after))),
            Err(e) => {
                eprintln!("warning: {e} (after the run); no server CPU figures");
                None
            }
        },
        _ => None,
    };
    let client_cpu = client_before
        .zip(proc_cpu::read("self").ok())
        .map(|(b, a): (CpuTimes, CpuTimes)| b.until(a));
    let server_metrics = match (&opts.metrics, metrics_before) {
        (Some(uri), Some(before)) => match metrics_scrape::scrape(uri, SCRAPE_TIMEOUT).await {
            Ok(after) => Some((uri.to_string(), before, after)),
            Err(e) => {
                eprintln!("warning: {e} (after the run); no server metrics");
                None
            }
        },
        _ => None,
    };

    let stats = shared.recorder.merged();
    let report = report::build(
        &opts,
        &stats,
        report::Extras {
            elapsed,
            tickets: tickets.received(),
            server_metrics,
            server_cpu,
            client_cpu,
        },
    );
    let failed =
        report
            .dominant_error(&stats)
            .map(|(kind, count, example)| LoadgenError::AllFailed {
                kind,
                count,
                attempts: report.attempts,
                example,
            });
    Ok((report, failed))
}

async fn resolve(opts: &Options) -> Result<Vec<SocketAddr>, LoadgenError> {
    let t = &opts.target;
    let err = |source| LoadgenError::Resolve {
        host: t.host.clone(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((t.host.as_str(), t.port))
        .await
        .map_err(err)?
        .collect();
    if addrs.is_empty() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no addresses",
        )));
    }
    Ok(addrs)
}
