//! loadgen `--server-pid`: a process's user and system CPU time from /proc/PID/stat (fields
//! 14 and 15, utime and stime; they total every thread of the process). Read before and after
//! the run; the report divides the difference by handshakes and by requests. Also read for
//! loadgen itself, to show whether the client was the bottleneck.

use std::time::Duration;

/// Units of utime/stime: USER_HZ, which the kernel fixes at 100 for user space on every
/// architecture Rust targets (`getconf CLK_TCK`); reading sysconf would need unsafe FFI.
const TICKS_PER_SECOND: u64 = 100;

/// CPU time used by a process so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub user: Duration,
    pub system: Duration,
}

/// /proc/PID/stat could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    #[error("--server-pid {pid}: reading /proc/{pid}/stat: {source}")]
    Read {
        pid: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--server-pid {pid}: /proc/{pid}/stat is not in the expected format")]
    Format { pid: String },
}

/// CPU times of process `pid` ("self" for this process).
pub fn read(pid: &str) -> Result<CpuTimes, ProcError> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|source| ProcError::Read {
            pid: pid.to_string(),
            source,
        })?;
    parse_stat(&text).ok_or_else(|| ProcError::Format {
        pid: pid.to_string(),
    })
}

/// Parse utime and stime out of a stat line. The command name (field 2) is in parentheses
/// and may itself hold spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<CpuTimes> {
    let after = &text[text.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so utime (14) is index 11, stime (15) 12.
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(CpuTimes {
        user: ticks(utime),
        system: ticks(stime),
    })
}

fn ticks(t: u64) -> Duration {
    Duration::from_millis(t.saturating_mul(1000 / TICKS_PER_SECOND))
}

impl CpuTimes {
    /// Time used between `self` (earlier) and `later`.
    pub fn until(self, later: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: later.user.saturating_sub(self.user),
            system: later.system.saturating_sub(self.system),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_tricky_name() {
        let line = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    250 75 0 0 20 0 5 0 12345 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        let t = parse_stat(line).unwrap();
        assert_eq!(t.user, Duration::from_millis(2500));
        assert_eq!(t.system, Duration::from_millis(750));
        assert!(parse_stat("4242 (x) S 1 2").is_none());
    }

    #[test]
    fn reads_this_process() {
        let before = read("self").unwrap();
        let after = read(&std::process::id().to_string()).unwrap();
        let used = before.until(after);
        assert!(used.user >= Duration::ZERO && used.system >= Duration::ZERO);
        assert!(matches!(read("0"), Err(ProcError::Read { .. })));
    }
}
