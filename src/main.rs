//! The `ephemera` binary: parse the command line, set up logging, build the runtime, hand
//! over to the library, map the outcome to an exit code. All logic lives in the library.

use ephemera::cli::{self, LogFormat};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// jemalloc for Rust allocations: 10% less server CPU per handshake than glibc's malloc and
/// less memory per idle HTTP/2 connection (README "Why jemalloc"). aws-lc keeps the system
/// malloc (jemalloc's symbols are prefixed).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let args = cli::parse();
    let filter = EnvFilter::try_from_env("EPHEMERA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    // Given one CPU (taskset, a cgroup quota), a single-threaded runtime: the same work
    // without a worker thread beside the main one and the multi-threaded scheduler's
    // cross-thread bookkeeping (atomic task states, run-queue handoff). Interleaved A/B on
    // a pinned proxy: 2-3% less server CPU per handshake (benches/README.md).
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_cpu {
        let mut b = tokio::runtime::Builder::new_current_thread();
        // Under load, poll for I/O every 256 task polls instead of tokio's 61: our tasks
        // return within microseconds, and events gathered in fewer, larger batches let more
        // HTTP/2 responses share a write. Keep-alive HTTP/2 through the proxy (h2load -c 8
        // -m 10, strace -c): epoll_wait 0.078 -> 0.027, writev 1.20 -> 1.11 and recvfrom
        // 1.20 -> 1.11 per request; server CPU per request lower in 9 of 10 paired rounds
        // (about 3%). An idle runtime still polls at once (its queue is empty).
        b.event_interval(256);
        b
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(cli::run(args.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::error_chain(&e));
            1
        }
    };
    // Do not wait for lingering tasks (e.g. connections past shutdown_grace).
    runtime.shutdown_background();
    std::process::exit(code);
}
