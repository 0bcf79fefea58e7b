//! Process hardening at start, before any private key is read: no core dumps (RLIMIT_CORE
//! 0) and not dumpable (PR_SET_DUMPABLE 0, which also keeps other non-root users' ptrace,
//! perf and /proc reads out), so keys and traffic secrets do not leave the process that way.
//! Called by `cli` for `serve` unless `--allow-core-dumps`.

use rustix::process::{Resource, Rlimit, setrlimit};

/// Why hardening could not be applied (the proxy still starts, and says so).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct HardeningError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

pub fn no_core_dumps() -> Result<(), HardeningError> {
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, zero).map_err(|e| HardeningError {
        what: "setting RLIMIT_CORE to 0",
        source: e.into(),
    })?;
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| HardeningError {
            what: "PR_SET_DUMPABLE 0",
            source: e.into(),
        })?;
    Ok(())
}
