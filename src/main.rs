//! The `ephemera` binary: parse the command line, set up logging, build the runtime, hand
//! over to the library, map the outcome to an exit code. All logic lives in the library.

use ephemera::cli::{self, LogFormat};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
