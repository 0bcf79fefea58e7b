//! `ephemera serve` as a child process: for the CLI tests, and for tests that measure the
//! proxy alone (its memory, descriptors and CPU time from /proc, without the test's own
//! clients and backends counted in) or run it under resource limits.

use super::{admin_get, bin, metric};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Send a signal (`kill -TERM`, `-INT`, `-HUP` …) to a process.
pub fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {which} {pid} failed");
}

/// `ephemera serve` as a child process, its stderr (the log) collected as it arrives.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<String>>,
    /// Collects the log; `exit_within` waits for it to reach the end of stderr, so that the
    /// log is complete once the process has exited.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Serve {
    pub async fn start(extra: &[&str]) -> Serve {
        let mut args = vec!["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Serve::spawn(&args).await
    }

    /// `serve --config FILE` (the file must bind the listener and admin to port 0).
    pub async fn start_config(path: &Path) -> Serve {
        Serve::spawn(&["--config", path.to_str().unwrap()]).await
    }

    /// `serve --config FILE` with `yaml` written to `dir/ephemera.yaml`.
    pub async fn start_yaml(dir: &Path, yaml: &str) -> Serve {
        let path = dir.join("ephemera.yaml");
        std::fs::write(&path, yaml).unwrap();
        Serve::start_config(&path).await
    }

    pub async fn spawn(args: &[&str]) -> Serve {
        Serve::spawn_command(Command::new(bin()), args).await
    }

    /// `serve` with `extra`, allowed to run on `cpu` only (`taskset`, which execs it: the
    /// pid is the proxy's).
    pub async fn start_pinned(cpu: usize, extra: &[&str]) -> Serve {
        let mut taskset = Command::new("taskset");
        taskset.arg("-c").arg(cpu.to_string()).arg(bin());
        let mut args = vec!["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Serve::spawn_command(taskset, &args).await
    }

    async fn spawn_command(mut command: Command, args: &[&str]) -> Serve {
        let mut child = command
            .arg("serve")
            .args(args)
            .env("EPHEMERA_LOG", "info")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let current = log.lock().unwrap().clone();
            let addr = logged_addr(&current, "listening (TLS 1.3)");
            let admin = logged_addr(&current, "admin listening");
            if let (Some(addr), Some(admin)) = (addr, admin) {
                return Serve {
                    child,
                    addr,
                    admin,
                    log,
                    reader: Some(reader),
                };
            }
            if let Some(status) = child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("serve exited early ({status}):\n{}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "no listening addresses logged within 20 s:\n{current}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    pub fn signal(&self, which: &str) {
        signal(self.pid(), which);
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("serve did not exit within {limit:?}:\n{}", self.log()),
        };
        // The process is gone, but its last log lines may still be on their way through
        // the pipe to the reader.
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status
    }

    pub async fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics").await.1
    }

    /// Open file descriptors of the proxy process.
    pub fn open_fds(&self) -> usize {
        open_fds_of(self.pid())
    }

    /// Resident memory of the proxy process: (VmRSS, VmHWM) in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        memory_kib(self.pid())
    }

    /// utime + stime of the proxy process (all threads), in clock ticks (usually 1/100 s).
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid())
    }

    /// Waits up to `within` for the proxy to hold nothing for clients any more: the
    /// connection and stream gauges at 0, and its open descriptors back to `fd_baseline`
    /// (taken before the test's clients ran) plus one per pooled backend connection. Panics
    /// naming what did not settle, with the figures.
    pub async fn assert_settled(&self, fd_baseline: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            // Counted before the scrape: its admin connection is not one of the test's.
            let fds = self.open_fds();
            let text = self.metrics().await;
            let conns = metric(&text, "ephemera_connections_open", &[]);
            let streams = metric(&text, "ephemera_h2_streams_open", &[]);
            let pooled = metric(&text, "ephemera_upstream_connections_open", &[]) as usize;
            let fd_limit = fd_baseline + pooled;
            if conns == 0.0 && streams == 0.0 && fds <= fd_limit {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "proxy did not settle within {within:?}: ephemera_connections_open {conns}, \
                     ephemera_h2_streams_open {streams}, open fds {fds} (baseline {fd_baseline} \
                     + {pooled} pooled backend connections = {fd_limit})"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Open file descriptors of a process.
pub fn open_fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of a process: (VmRSS, VmHWM) in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// utime + stime of a process, in clock ticks (usually 1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The `addr=IP:PORT` field of the first log line containing `message`.
pub fn logged_addr(log: &str, message: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains(message))?;
    // Text: `addr=IP:PORT`; JSON (`--log-format json`): `"addr":"IP:PORT"`.
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))
        .or_else(|| line.split("\"addr\":\"").nth(1)?.split('"').next())?
        .parse()
        .ok()
}

/// Raises this process's soft limit on open files to `need` (children inherit it), up to
/// the hard limit. False, with a message, when the hard limit is below `need`: the caller
/// skips.
pub fn raise_nofile(need: u64) -> bool {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    if soft >= need {
        return true;
    }
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if hard < need {
        let msg = format!(
            "open-files hard limit {hard} is below the {need} this test needs (raise it with \
             `ulimit -Hn`)"
        );
        eprintln!("skipping: {msg}");
        return false;
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(need.min(hard)),
            maximum: lim.maximum,
        },
    )
    .expect("raising the soft open-files limit");
    true
}
