//! The deployment files in `deploy/`, checked with the tools that consume them:
//!
//! - systemd: `systemd-analyze verify` on the unit (ExecStart pointed at the built binary) must
//!   print nothing; `systemd-analyze security --offline` must rate it 2.0 or better; the
//!   hardening directives are present; the unit's credentials are the files the config reads;
//!   `ephemera check` accepts the config (credential paths rewritten to test certificates).
//! - Kubernetes: every manifest parses (serde-saphyr), kinds and key facts (probes on the admin
//!   port, Secret volumes 0400, non-root, read-only root, no capabilities, grace periods,
//!   selectors, PodMonitor on /metrics, placeholder-only Secrets); the ConfigMap's config passes
//!   `ephemera check` and, served on loopback, answers the probes and guards `POST /reload`
//!   with the token; `kubernetes-validate --strict` (PyPI, bundled API schemas) accepts them.
//! - Prometheus: `promtool check rules` and `promtool test rules` on the alert rules;
//!   `promtool check metrics` on a live `/metrics` after a request through the proxy; every
//!   metric the rules and the dashboard name exists in that output.
//! - Grafana: the dashboard JSON parses, has the required panels, and its expressions name only
//!   Ephemera's metrics and parse as PromQL (`promtool check rules` on them as recording rules).
//!
//! A missing tool (systemd-analyze, promtool, curl, kubernetes-validate) skips its test with
//! SKIPPED on stderr, unless CI is set: then the test fails (`.ci/run` installs them).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ephemera");

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether `tool` runs (`tool args...` exits 0). Missing: SKIPPED, or a panic under CI.
fn have(tool: &str, args: &[&str], test: &str) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: `{tool} {args:?}` failed, but CI is set: install it (see .ci/run)");
        }
        eprintln!("SKIPPED {test}: `{tool} {args:?}` failed (not installed?)");
    }
    ok
}

/// Run `cmd` to completion, killing it after `secs`; stdin is empty (or `input`).
fn run(cmd: &mut Command, input: Option<&[u8]>, secs: u64) -> Output {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || stdin.write_all(&input));
    }
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).map(|_| v)
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).map(|_| v)
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap().unwrap(),
        stderr: err_t.join().unwrap().unwrap(),
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Development certificates for localhost from `ephemera certs`: (dir, cert, key).
fn test_certs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        Command::new(BIN).arg("certs").arg("--out").arg(dir.path()),
        None,
        20,
    );
    assert!(o.status.success(), "ephemera certs: {}", text(&o));
    let (cert, key) = (
        dir.path().join("localhost.crt"),
        dir.path().join("localhost.key"),
    );
    assert!(cert.exists() && key.exists());
    (dir, cert, key)
}

fn ephemera_check(config: &Path) {
    let o = run(
        Command::new(BIN).arg("check").arg("--config").arg(config),
        None,
        20,
    );
    assert!(
        o.status.success(),
        "ephemera check {}: {}",
        config.display(),
        text(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("config OK"));
}

/// `30s`, `2m`, `500ms` (the forms the configs here use) in seconds.
fn seconds(s: &str) -> f64 {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or_else(|_| panic!("duration {s:?}"));
    n * match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => panic!("duration unit in {s:?}"),
    }
}

fn yaml(text: &str, what: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(path))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// `v` at a path of keys and indices, e.g. `at(&d, "spec.template.spec.containers.0")`.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        };
        assert!(!cur.is_null(), "no {path} (missing at {key:?}) in {v:#}");
    }
    cur
}

// ---------- the proxy, run from the binary ----------

struct Serve {
    child: Child,
    tls: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr=IP:PORT` of the first log line containing `message`.
fn logged_addr(log: &str, message: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains(message))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))?
        .parse()
        .ok()
}

impl Serve {
    fn start(args: &[&str]) -> Serve {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .env("EPHEMERA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let current = log.lock().unwrap().clone();
            if let (Some(tls), Some(admin)) = (
                logged_addr(&current, "listening (TLS 1.3)"),
                logged_addr(&current, "admin listening"),
            ) {
                return Serve {
                    child,
                    tls,
                    admin,
                    log,
                };
            }
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("serve exited early ({status}):\n{}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "no listening addresses logged within 15 s:\n{current}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// One plaintext HTTP/1.1 request to the admin listener: (status, body).
fn admin_request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A keep-alive HTTP/1.1 backend on loopback answering every request `200 backend`.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    let mut content_length = 0usize;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            content_length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; content_length];
                    if r.read_exact(&mut body).is_err()
                        || w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nbackend\n")
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

// ---------- systemd ----------

/// `Key=Value` lines of a unit file, in order (a key may repeat).
fn unit_entries(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

const CREDENTIALS_DIR: &str = "/run/credentials/ephemera.service/";

/// YAML text without its comment lines.
fn uncommented(yaml: &str) -> String {
    yaml.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify_and_security() {
    let test = "systemd_unit_passes_systemd_analyze_verify_and_security";
    if !have("systemd-analyze", &["--version"], test) {
        return;
    }
    // The unit as installed, but with the binary this build made (verify checks that every
    // Exec*= command exists and is executable). The file keeps its name: the credentials
    // directory, /run/credentials/<unit name>/, depends on it.
    let unit = read(&deploy("ephemera.service")).replace("/usr/local/bin/ephemera", BIN);
    assert!(unit.contains(&format!("ExecStart={BIN} serve --config ")));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ephemera.service");
    std::fs::write(&path, &unit).unwrap();

    // In this container systemd is not PID 1 (there is no system manager to ask), and verify
    // works anyway: it loads the unit file offline. For this unit it prints nothing and exits
    // 0, so any output fails the test: an unknown or misspelt directive, or a value systemd
    // cannot parse, is only a warning with exit status 0 ("Unknown key 'ProtectSytem' in
    // section [Service], ignoring."), so the exit status alone would not catch it. No warning
    // is tolerated. --man=no: the Documentation= URL is not a man page to look up.
    let o = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .current_dir(dir.path()),
        None,
        20,
    );
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&o)
    );

    // systemd's own exposure rating (0 = locked down, 10 = unprotected); this unit rates 1.4
    // with systemd 252. The remaining points are what a proxy needs: network access
    // (AF_INET/AF_INET6, no PrivateNetwork/IPAddressDeny), CAP_NET_BIND_SERVICE as an ambient
    // capability, the host's root directory and users. --threshold is in tenths.
    let o = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
            .arg(&path)
            .current_dir(dir.path()),
        None,
        20,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let overall = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level: {}", text(&o)));
    eprintln!("systemd-analyze security: {overall}");
    assert!(
        o.status.success(),
        "exposure above 2.0: {overall}\n{}",
        text(&o)
    );
}

#[test]
fn systemd_unit_is_hardened_and_its_credentials_are_what_the_config_reads() {
    let unit = read(&deploy("ephemera.service"));
    let entries = unit_entries(&unit);
    let all = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let v = all(key);
        assert_eq!(v.len(), 1, "{key}= must appear once in the unit: {v:?}");
        v[0]
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LimitCORE", "0"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(key), value, "{key}=");
    }
    assert!(
        one("ExecStart")
            .starts_with("/usr/local/bin/ephemera serve --config /etc/ephemera/ephemera.yaml")
    );
    assert!(
        one("ExecStartPre")
            .starts_with("/usr/local/bin/ephemera check --config /etc/ephemera/ephemera.yaml")
    );

    // The config the unit runs is deploy/ephemera.yaml; systemd must be allowed to wait for
    // the whole drain before it SIGKILLs.
    let config_text = read(&deploy("ephemera.yaml"));
    let config = yaml(&config_text, "deploy/ephemera.yaml");
    let grace = seconds(config["shutdown_grace"].as_str().unwrap());
    let stop = seconds(one("TimeoutStopSec"));
    assert!(
        stop >= grace + 5.0,
        "TimeoutStopSec {stop}s must exceed shutdown_grace {grace}s (with a margin)"
    );

    // Every credential the config reads is loaded by the unit, and every loaded one is used.
    let loaded: BTreeSet<String> = all("LoadCredential")
        .iter()
        .map(|v| {
            let (id, src) = v.split_once(':').unwrap();
            assert!(src.starts_with("/etc/ephemera/"), "credential source {src}");
            id.to_string()
        })
        .collect();
    let mut referenced = BTreeSet::new();
    for piece in uncommented(&config_text).split_whitespace() {
        if let Some(i) = piece.find(CREDENTIALS_DIR) {
            let id = &piece[i + CREDENTIALS_DIR.len()..];
            referenced.insert(id.trim_end_matches([',', '}', '"']).to_string());
        }
    }
    assert_eq!(
        loaded, referenced,
        "LoadCredential= ids vs paths under {CREDENTIALS_DIR} in deploy/ephemera.yaml"
    );
    let cert = &config["listeners"][0]["tls"]["certificates"][0];
    assert_eq!(cert["cert"], format!("{CREDENTIALS_DIR}tls.crt"));
    assert_eq!(cert["key"], format!("{CREDENTIALS_DIR}tls.key"));
    assert_eq!(
        config["admin"]["token_file"],
        format!("{CREDENTIALS_DIR}admin.token")
    );
}

#[test]
fn systemd_config_passes_ephemera_check() {
    let (dir, cert, key) = test_certs();
    let config = read(&deploy("ephemera.yaml"))
        .replace(&format!("{CREDENTIALS_DIR}tls.crt"), cert.to_str().unwrap())
        .replace(&format!("{CREDENTIALS_DIR}tls.key"), key.to_str().unwrap())
        .replace(
            &format!("{CREDENTIALS_DIR}admin.token"),
            dir.path().join("token").to_str().unwrap(),
        );
    assert!(!uncommented(&config).contains(CREDENTIALS_DIR), "{config}");
    let path = dir.path().join("ephemera.yaml");
    std::fs::write(&path, config).unwrap();
    ephemera_check(&path);
}

// ---------- Kubernetes ----------

const MANIFESTS: &[&str] = &[
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "secret.yaml",
    "pdb.yaml",
    "hpa.yaml",
    "podmonitor.yaml",
];

/// Every manifest by kind (the two Secrets by name).
fn manifests() -> BTreeMap<String, Value> {
    let mut by_kind = BTreeMap::new();
    for file in MANIFESTS {
        for doc in yaml_docs(&deploy(&format!("kubernetes/{file}"))) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no kind"))
                .to_string();
            assert!(doc["apiVersion"].is_string(), "{file}: no apiVersion");
            let name = at(&doc, "metadata.name").as_str().unwrap().to_string();
            let key = if kind == "Secret" {
                format!("Secret/{name}")
            } else {
                kind
            };
            assert!(by_kind.insert(key.clone(), doc).is_none(), "two {key}");
        }
    }
    by_kind
}

/// The ConfigMap's `ephemera.yaml`.
fn configmap_config(m: &BTreeMap<String, Value>) -> String {
    m["ConfigMap"]["data"]["ephemera.yaml"]
        .as_str()
        .expect("ConfigMap data ephemera.yaml")
        .to_string()
}

#[test]
fn kubernetes_manifests_parse_and_state_the_key_facts() {
    let m = manifests();
    let kinds: Vec<&str> = m.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PodMonitor",
            "Secret/ephemera-admin",
            "Secret/ephemera-tls",
            "Service",
        ]
    );
    let config = yaml(&configmap_config(&m), "ConfigMap ephemera.yaml");
    let labels = at(&m["Deployment"], "metadata.labels").clone();

    // Pods: labels the selectors use, non-root, a grace period over preStop + shutdown_grace.
    let d = &m["Deployment"];
    assert_eq!(at(d, "spec.selector.matchLabels"), &labels);
    assert_eq!(at(d, "spec.template.metadata.labels"), &labels);
    let pod = at(d, "spec.template.spec");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    // Root-owned 0400 Secret files are readable by the non-root user only through fsGroup.
    assert_eq!(
        pod["securityContext"]["fsGroup"],
        pod["securityContext"]["runAsGroup"]
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = at(pod, "containers.0");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(c["securityContext"]["capabilities"]["add"].is_null());

    // Ports: TLS and admin as the config binds them; probes on the admin port.
    let port = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let admin_bind = config["admin"]["bind"].as_str().unwrap();
    assert!(
        admin_bind.starts_with("0.0.0.0:"),
        "the kubelet probes the pod IP: admin.bind must not be loopback ({admin_bind})"
    );
    assert_eq!(admin_bind, format!("0.0.0.0:{}", port("admin")));
    assert_eq!(
        config["listeners"][0]["bind"],
        format!("0.0.0.0:{}", port("https"))
    );
    assert!(port("https") >= 1024, "no capability to bind below 1024");
    assert_eq!(at(c, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(at(c, "readinessProbe.httpGet.port"), "admin");
    assert_eq!(at(c, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(at(c, "livenessProbe.httpGet.port"), "admin");

    // Shutdown: preStop sleep, then SIGTERM and shutdown_grace, all inside the grace period.
    let pre_stop = at(c, "lifecycle.preStop.sleep.seconds").as_f64().unwrap();
    let grace = seconds(config["shutdown_grace"].as_str().unwrap());
    let period = at(pod, "terminationGracePeriodSeconds").as_f64().unwrap();
    assert!(pre_stop > 0.0);
    assert!(
        period > pre_stop + grace,
        "terminationGracePeriodSeconds {period} <= preStop {pre_stop} + shutdown_grace {grace}"
    );

    // The config file and Secrets are mounted where the config and args expect them; the
    // Secret volumes are 0400 (256: the manifests write it in decimal).
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount_of = |volume: &str| -> String {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .unwrap_or_else(|| panic!("no mount of {volume}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let volume = |name: &str| -> &Value {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    assert_eq!(config_path, format!("{}/ephemera.yaml", mount_of("config")));
    assert_eq!(
        at(volume("config"), "configMap.name"),
        at(&m["ConfigMap"], "metadata.name")
    );
    let tls = mount_of("tls");
    let cert = &config["listeners"][0]["tls"]["certificates"][0];
    assert_eq!(cert["cert"], format!("{tls}/tls.crt"));
    assert_eq!(cert["key"], format!("{tls}/tls.key"));
    assert_eq!(
        config["admin"]["token_file"],
        format!("{}/token", mount_of("admin-token"))
    );
    for (vol, secret) in [("tls", "ephemera-tls"), ("admin-token", "ephemera-admin")] {
        assert_eq!(at(volume(vol), "secret.secretName"), secret);
        assert_eq!(
            at(volume(vol), "secret.defaultMode"),
            256,
            "{vol}: mode 0400"
        );
        assert!(m.contains_key(&format!("Secret/{secret}")));
    }
    assert!(
        c["resources"]["requests"]["cpu"].is_string(),
        "the HPA needs a CPU request"
    );

    // Secrets: placeholders only, never key material.
    assert_eq!(at(&m["Secret/ephemera-tls"], "type"), "kubernetes.io/tls");
    for (name, secret) in m.iter().filter(|(k, _)| k.starts_with("Secret/")) {
        for (key, value) in secret["data"].as_object().unwrap() {
            assert_eq!(value, "", "{name} {key} must stay an empty placeholder");
        }
        assert!(secret["stringData"].is_null());
    }
    let secret_text = read(&deploy("kubernetes/secret.yaml"));
    assert!(!secret_text.contains("PRIVATE KEY"));
    assert!(secret_text.contains("kubectl create secret tls ephemera-tls"));

    // Service: the TLS port only; PDB and HPA target these pods; PodMonitor scrapes /metrics.
    let svc = &m["Service"];
    assert_eq!(at(svc, "spec.selector"), &labels);
    let svc_ports = at(svc, "spec.ports").as_array().unwrap();
    assert_eq!(svc_ports.len(), 1, "admin is not exposed by the Service");
    assert_eq!(svc_ports[0]["port"], 443);
    assert_eq!(svc_ports[0]["targetPort"], "https");
    assert_eq!(
        at(&m["PodDisruptionBudget"], "spec.selector.matchLabels"),
        &labels
    );
    let hpa = &m["HorizontalPodAutoscaler"];
    assert_eq!(at(hpa, "spec.scaleTargetRef.kind"), "Deployment");
    assert_eq!(at(hpa, "spec.scaleTargetRef.name"), at(d, "metadata.name"));
    assert_eq!(at(hpa, "spec.metrics.0.resource.name"), "cpu");
    assert!(at(hpa, "spec.minReplicas").as_u64().unwrap() >= 2);
    assert!(
        d["spec"]["replicas"].is_null(),
        "replicas belong to the HPA (apply would reset them)"
    );
    let pm = &m["PodMonitor"];
    assert_eq!(at(pm, "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(at(pm, "spec.selector.matchLabels"), &labels);
    assert_eq!(at(pm, "spec.podMetricsEndpoints.0.port"), "admin");
    assert_eq!(at(pm, "spec.podMetricsEndpoints.0.path"), "/metrics");

    // kustomization.yaml: every manifest but the placeholder Secrets.
    let k = yaml(
        &read(&deploy("kubernetes/kustomization.yaml")),
        "kustomization",
    );
    let listed: BTreeSet<&str> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = MANIFESTS
        .iter()
        .copied()
        .filter(|f| *f != "secret.yaml")
        .collect();
    assert_eq!(listed, expected);
}

/// The ConfigMap's config with the pod's paths and binds rewritten for this machine.
fn configmap_config_here(
    dir: &Path,
    cert: &Path,
    key: &Path,
    token: &Path,
    upstream: SocketAddr,
) -> PathBuf {
    let m = manifests();
    let original = configmap_config(&m);
    let config = original
        .replace("/etc/ephemera/tls/tls.crt", cert.to_str().unwrap())
        .replace("/etc/ephemera/tls/tls.key", key.to_str().unwrap())
        .replace("/etc/ephemera/admin/token", token.to_str().unwrap())
        .replace("0.0.0.0:9844", "127.0.0.1:0")
        .replace("0.0.0.0:8443", "127.0.0.1:0")
        .replace("[app:8080]", &format!("[{upstream}]"));
    let live = uncommented(&config);
    assert!(
        !live.contains("/etc/ephemera") && !live.contains("0.0.0.0") && !live.contains("app:8080"),
        "the ConfigMap changed: update the rewrites here\n{config}"
    );
    let path = dir.join("ephemera.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn kubernetes_configmap_config_passes_check_serves_probes_and_guards_reload() {
    let (dir, cert, key) = test_certs();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let path = configmap_config_here(dir.path(), &cert, &key, &token, backend());
    ephemera_check(&path);

    let serve = Serve::start(&["--config", path.to_str().unwrap()]);
    assert_eq!(admin_request(serve.admin, "GET", "/healthz", "").0, 200);
    assert_eq!(admin_request(serve.admin, "GET", "/readyz", "").0, 200);
    let (status, body) = admin_request(serve.admin, "POST", "/reload", "");
    assert_eq!(status, 401, "{body}");
    let (status, body) = admin_request(
        serve.admin,
        "POST",
        "/reload",
        "Authorization: Bearer wrong\r\n",
    );
    assert_eq!(status, 401, "{body}");
    let (status, body) = admin_request(
        serve.admin,
        "POST",
        "/reload",
        "Authorization: Bearer s3cret-token\r\n",
    );
    assert_eq!(status, 200, "{body}\n{}", serve.log());
    let (status, metrics) = admin_request(serve.admin, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ephemera_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let test = "kubernetes_manifests_validate_against_the_api_schemas";
    // Run as a module: pip puts the script where PATH may not reach (a pyenv shim appears
    // only after `pyenv rehash`), the module is wherever python3's packages are.
    let validate = ["-m", "kubernetes_validate"];
    if !have("python3", &[validate[0], validate[1], "--version"], test) {
        return;
    }
    // Kubernetes 1.30: the first release whose pods have the preStop `sleep` action by
    // default. The PodMonitor is a CRD (no bundled schema) and is checked above instead.
    let files: Vec<PathBuf> = MANIFESTS
        .iter()
        .filter(|f| **f != "podmonitor.yaml")
        .map(|f| deploy(&format!("kubernetes/{f}")))
        .collect();
    let o = run(
        Command::new("python3")
            .args(validate)
            .args(["--strict", "--kubernetes-version", "1.30.0"])
            .args(&files),
        None,
        20,
    );
    let report = text(&o);
    assert!(o.status.success(), "kubernetes-validate: {report}");
    assert!(
        !report.contains("WARN") && !report.contains("ERROR"),
        "{report}"
    );
    assert_eq!(
        report.matches("passed for resource").count(),
        files.len() + 1, // secret.yaml holds two Secrets
        "{report}"
    );
}

// ---------- Prometheus ----------

/// The metrics this repo's monitoring may use (README "Metrics"); histograms also as
/// `_bucket`, `_sum`, `_count`.
const KNOWN_METRICS: &[&str] = &[
    "ephemera_tls_handshakes_total",
    "ephemera_tls_handshake_failures_total",
    "ephemera_tls_handshake_duration_seconds",
    "ephemera_tls_resumed_handshakes_total",
    "ephemera_tls_key_updates_total",
    "ephemera_tls_key_update_failures_total",
    "ephemera_connections_open",
    "ephemera_http_requests_total",
    "ephemera_upstream_request_duration_seconds",
    "ephemera_upstream_errors_total",
    "ephemera_upstream_connections_open",
    "ephemera_h2_streams_total",
    "ephemera_h2_streams_open",
    "ephemera_config_reloads_total",
    "ephemera_tls_certificate_expiry_timestamp_seconds",
];
const HISTOGRAMS: &[&str] = &[
    "ephemera_tls_handshake_duration_seconds",
    "ephemera_upstream_request_duration_seconds",
];

fn known_metric(name: &str) -> bool {
    KNOWN_METRICS.contains(&name)
        || HISTOGRAMS.iter().any(|h| {
            name.strip_prefix(h)
                .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
        })
}

/// Metric names in a PromQL expression: identifiers that are not functions, aggregations,
/// keywords, label names (in `{...}` or `by (...)`) or inside strings and range selectors.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skip to the char after the `close` matching the opener at chars[i] (strings inside
    // are skipped whole).
    let skip_group = |mut i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => {
                    let q = chars[i];
                    i += 1;
                    while i < chars.len() && chars[i] != q {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        panic!("unbalanced {open}{close} in {expr:?}");
    };
    let mut skip_next_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            let q = c;
            i += 1;
            while i < chars.len() && chars[i] != q {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '(' && skip_next_group {
            skip_next_group = false;
            i = skip_group(i, '(', ')');
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
            {
                i += 1;
            }
        } else if c == '$' {
            // A Grafana variable ($job, $__rate_interval) outside a selector.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let rest: String = chars[j..].iter().take(8).collect();
            // `f(...)`, `sum (...)`, and `sum by (...) (...)` / `sum without (...) (...)`.
            let call = rest.starts_with('(')
                || (AGGREGATIONS.contains(&word.as_str())
                    && (rest.starts_with("by") || rest.starts_with("without")));
            if GROUPING.contains(&word.as_str()) {
                skip_next_group = call;
            } else if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_names_finds_metrics_only() {
    let names = |e| promql_metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, listener) (rate(a_bucket{job=~"$job", x="}{"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum by (x) (rate(a[5m])) / on (x) group_left (y) b > bool 1e3 and c offset 5m"),
        ["a", "b", "c"]
    );
    assert_eq!(names("min(a - time()) < 14 * 86400"), ["a"]);
    assert_eq!(names(r#"a{alpn="h2"} unless ignoring(z) b"#), ["a", "b"]);
}

#[test]
fn prometheus_alert_rules_pass_promtool_check_and_unit_tests() {
    let test = "prometheus_alert_rules_pass_promtool_check_and_unit_tests";
    let rules = deploy("prometheus/ephemera-alerts.yaml");
    let doc = yaml(&read(&rules), "ephemera-alerts.yaml");
    let mut alerts = BTreeMap::new();
    for group in doc["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"]
                .as_str()
                .expect("alerting rules only")
                .to_string();
            assert!(
                ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            let expr = rule["expr"].as_str().unwrap().to_string();
            for metric in promql_metric_names(&expr) {
                assert!(known_metric(&metric), "{name}: unknown metric {metric}");
            }
            alerts.insert(name, expr);
        }
    }
    // The alerts the issue asks for, by what they watch.
    for (alert, needle) in [
        (
            "EphemeraHandshakeFailureRatioHigh",
            "ephemera_tls_handshake_failures_total",
        ),
        (
            "EphemeraKeyUpdateFailures",
            "ephemera_tls_key_update_failures_total",
        ),
        (
            "EphemeraResumedHandshakes",
            "ephemera_tls_resumed_handshakes_total",
        ),
        (
            "EphemeraCertificateExpiringSoon",
            "ephemera_tls_certificate_expiry_timestamp_seconds - time()) < 14 * 86400",
        ),
        ("EphemeraUpstreamErrors", "ephemera_upstream_errors_total"),
        (
            "EphemeraConfigReloadFailed",
            "ephemera_config_reloads_total{result=\"error\"}",
        ),
    ] {
        let expr = alerts
            .get(alert)
            .unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(expr.contains(needle), "{alert}: {expr}");
    }

    if !have("promtool", &["--version"], test) {
        return;
    }
    let o = run(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
        None,
        20,
    );
    assert!(o.status.success(), "promtool check rules: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{}",
        text(&o)
    );
    // Each alert fires on a series that should trigger it, stays quiet on one under its
    // threshold or `for:`, and renders its annotations as expected.
    let o = run(
        Command::new("promtool")
            .args(["test", "rules", "ephemera-alerts.test.yaml"])
            .current_dir(deploy("prometheus")),
        None,
        20,
    );
    assert!(o.status.success(), "promtool test rules: {}", text(&o));
}

/// `curl -k` one request through the proxy, then `promtool check metrics` on `/metrics`:
/// exit 0 (clean) or 3 (lint findings only, printed) passes; a parse error (exit 1) fails.
/// Then every metric the alert rules and the dashboard use must be in that output.
#[test]
fn live_metrics_pass_promtool_check_metrics_and_cover_rules_and_dashboard() {
    let test = "live_metrics_pass_promtool_check_metrics_and_cover_rules_and_dashboard";
    if !have("promtool", &["--version"], test) || !have("curl", &["--version"], test) {
        return;
    }
    let upstream = format!("http://{}", backend());
    let serve = Serve::start(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
    ]);
    let url = format!("https://{}/", serve.tls);
    // HTTP/2 (curl's default over TLS when it can), so the h2 stream and alpn="h2" series
    // are populated too.
    let o = run(
        Command::new("curl").args(["-sk", "--max-time", "10", &url]),
        None,
        15,
    );
    assert!(o.status.success(), "curl: {}\n{}", text(&o), serve.log());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "backend\n");

    let (status, metrics) = admin_request(serve.admin, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let o = run(
        Command::new("promtool").args(["check", "metrics"]),
        Some(metrics.as_bytes()),
        20,
    );
    let lint = String::from_utf8_lossy(&o.stderr);
    match o.status.code() {
        Some(0) => {}
        Some(3) => eprintln!("promtool check metrics: lint findings (tolerated):\n{lint}"),
        _ => panic!("promtool check metrics failed: {}", text(&o)),
    }

    let present: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let mut used = BTreeSet::new();
    for group in yaml(&read(&deploy("prometheus/ephemera-alerts.yaml")), "alerts")["groups"]
        .as_array()
        .unwrap()
    {
        for rule in group["rules"].as_array().unwrap() {
            used.extend(promql_metric_names(rule["expr"].as_str().unwrap()));
        }
    }
    for (_, expr) in dashboard_exprs(&dashboard()) {
        used.extend(promql_metric_names(&expr));
    }
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !present.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "used by the rules or the dashboard but not exported: {missing:?}"
    );
}

// ---------- Grafana ----------

fn dashboard() -> Value {
    serde_json::from_str(&read(&deploy("grafana/ephemera.json"))).expect("dashboard JSON")
}

/// (panel title, expr) of every target, and the templating variables' queries.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("no expr in {t}"));
            out.push((p["title"].as_str().unwrap().to_string(), expr.to_string()));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let query = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap();
        // Grafana's label_values(METRIC_SELECTOR, LABEL): the selector is PromQL.
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| selector)
            .unwrap_or(query);
        out.push((format!("variable {}", v["name"]), inner.to_string()));
    }
    out
}

#[test]
fn grafana_dashboard_parses_and_queries_only_ephemera_metrics() {
    let test = "grafana_dashboard_parses_and_queries_only_ephemera_metrics";
    let d = dashboard();
    assert_eq!(d["uid"], "ephemera");
    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 10);
    for (title, expr) in &exprs {
        let metrics = promql_metric_names(expr);
        assert!(!metrics.is_empty(), "{title}: no metric in {expr}");
        for m in metrics {
            assert!(known_metric(&m), "{title}: unknown metric {m} in {expr}");
        }
    }
    // The panels the issue asks for, by the query shape each needs.
    let has = |needles: &[&str]| {
        exprs
            .iter()
            .any(|(_, e)| needles.iter().all(|n| e.contains(n)))
    };
    for needles in [
        &["sum by (group)", "rate(ephemera_tls_handshakes_total"][..],
        &[
            "histogram_quantile(0.99",
            "ephemera_tls_handshake_duration_seconds_bucket",
            "le",
        ],
        &["sum by (reason)", "ephemera_tls_handshake_failures_total"],
        &["sum by (trigger)", "ephemera_tls_key_updates_total"],
        &[
            "rate(ephemera_h2_streams_total",
            "/",
            "ephemera_tls_handshakes_total{",
            "alpn=\"h2\"",
        ],
        &[
            "histogram_quantile(0.99",
            "ephemera_upstream_request_duration_seconds_bucket",
        ],
    ] {
        assert!(has(needles), "no panel query with {needles:?}");
    }
    // Grid positions inside the 24-column grid, panel ids unique.
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{p}"
        );
    }

    // PromQL syntax: promtool parses every expression as a recording rule (Grafana's
    // variables replaced by values of the same kind).
    if !have("promtool", &["--version"], test) {
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$listener", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&path, &rules).unwrap();
    let o = run(
        Command::new("promtool").args(["check", "rules"]).arg(&path),
        None,
        20,
    );
    assert!(
        o.status.success(),
        "promtool check rules on the dashboard: {}\n{rules}",
        text(&o)
    );
}
