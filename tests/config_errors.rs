//! Invalid configurations: each is rejected with a message naming the key path and the line
//! (in-process via `Config::parse` + `Prepared::new`), and through the binary `ephemera check`
//! exits 1 and `ephemera serve --config` exits non-zero before binding anything.

mod common;
use common::*;
use ephemera::Prepared;
use ephemera::config::Config;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A valid config with fixed line numbers (the cases below edit one line each):
/// line 5 `bind`, line 8 the certificate entry, lines 10/11 the groups, line 13
/// `header_timeout`, line 15 the route, line 17 the upstream.
fn base(certs: &Certs, bind: &str) -> String {
    format!(
        "admin: {{ bind: 127.0.0.1:0 }}
shutdown_grace: 5s
listeners:
  - name: public
    bind: {bind}
    tls:
      certificates:
        - {{ cert: {}, key: {} }}
      groups:
        - x25519
        - secp256r1
    http:
      header_timeout: 10s
    routes:
      - {{ host: \"*\", path_prefix: /, upstream: app }}
upstreams:
  app: {{ protocol: http1, servers: [127.0.0.1:8080] }}
",
        yaml_path(&certs.cert),
        yaml_path(&certs.key)
    )
}

/// `yaml` with `from` (which must occur exactly once) replaced by `to`.
fn edit(yaml: &str, from: &str, to: &str) -> String {
    assert_eq!(
        yaml.matches(from).count(),
        1,
        "'{from}' not unique in:\n{yaml}"
    );
    yaml.replacen(from, to, 1)
}

/// The error the library gives for `yaml`, from parsing/validation or from loading the
/// certificates; panics if the config is accepted.
fn error_of(yaml: &str) -> String {
    let config = match Config::parse(yaml, "test.yaml") {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    match Prepared::new(config) {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

/// `err` names `key` and `line N` (exactly N, not a longer number starting with N).
#[track_caller]
fn assert_names(err: &str, key: &str, line: u64) {
    assert!(err.contains(key), "error does not name '{key}':\n{err}");
    let needle = format!("line {line}");
    let exact = err.match_indices(&needle).any(|(i, _)| {
        !err[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    });
    assert!(exact, "error does not name '{needle}':\n{err}");
}

#[test]
fn base_config_is_valid() {
    // Every case below differs from this by one edit, so each error is caused by that edit.
    let certs = Certs::new(&["localhost"]);
    let config = Config::parse(&base(&certs, "127.0.0.1:0"), "test.yaml").unwrap();
    assert!(Prepared::new(config).is_ok());
}

#[test]
fn unknown_key_names_the_field_and_line() {
    let certs = Certs::new(&["localhost"]);
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        "header_timeout: 10s",
        "header_timeot: 10s",
    );
    let err = error_of(&yaml);
    assert_names(&err, "header_timeot", 13);
    assert!(err.contains("test.yaml"), "{err}");
    // It says what would have been accepted there.
    assert!(err.contains("header_timeout"), "{err}");

    let yaml = format!("listenres: []\n{}", base(&certs, "127.0.0.1:0"));
    let err = error_of(&yaml);
    assert_names(&err, "listenres", 1);

    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        "servers: [127.0.0.1:8080] }",
        "servers: [127.0.0.1:8080], timeout: 3s }",
    );
    let err = error_of(&yaml);
    assert_names(&err, "timeout", 17);
    assert!(err.contains("response_timeout"), "{err}");
}

#[test]
fn bad_address_names_the_key_and_line() {
    let certs = Certs::new(&["localhost"]);
    for bad in ["127.0.0.1:99999", "nonsense", "localhost:8443"] {
        let err = error_of(&base(&certs, bad));
        assert_names(&err, "listeners[0].bind", 5);
        assert!(err.contains(bad), "{err}");
        assert!(err.contains("test.yaml"), "{err}");
    }
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        "bind: 127.0.0.1:0 }",
        "bind: 127.0.0.1 }",
    );
    let err = error_of(&yaml);
    assert_names(&err, "admin.bind", 1);
}

#[test]
fn missing_certificate_file_names_the_file_and_entry() {
    let certs = Certs::new(&["localhost"]);
    let missing = certs.dir.path().join("missing.crt");
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        &yaml_path(&certs.cert),
        &yaml_path(&missing),
    );
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].tls.certificates[0]", 8);
    assert!(err.contains(&yaml_path(&missing)), "{err}");

    // Same for the key file.
    let missing = certs.dir.path().join("missing.key");
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        &yaml_path(&certs.key),
        &yaml_path(&missing),
    );
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].tls.certificates[0]", 8);
    assert!(err.contains(&yaml_path(&missing)), "{err}");
}

#[test]
fn key_not_matching_certificate_is_rejected() {
    let certs = Certs::new(&["localhost"]);
    let other = Certs::new(&["localhost"]);
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        &yaml_path(&certs.key),
        &yaml_path(&other.key),
    );
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].tls.certificates[0]", 8);
    assert!(err.contains("does not match"), "{err}");
    assert!(err.contains(&yaml_path(&certs.cert)), "{err}");
    assert!(err.contains(&yaml_path(&other.key)), "{err}");
}

#[test]
fn empty_groups_list_is_rejected() {
    let certs = Certs::new(&["localhost"]);
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        "groups:\n        - x25519\n        - secp256r1\n",
        "groups: []\n",
    );
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].tls.groups", 9);
    assert!(err.contains("at least one"), "{err}");
}

#[test]
fn unknown_group_lists_the_allowed_groups() {
    let certs = Certs::new(&["localhost"]);
    let yaml = edit(&base(&certs, "127.0.0.1:0"), "- secp256r1", "- ffdhe2048");
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].tls.groups[1]", 11);
    assert!(err.contains("ffdhe2048"), "{err}");
    for allowed in ["x25519", "secp256r1", "secp384r1", "x25519mlkem768"] {
        assert!(
            err.contains(allowed),
            "allowed group {allowed} not listed:\n{err}"
        );
    }
}

#[test]
fn route_to_undefined_upstream_is_rejected() {
    let certs = Certs::new(&["localhost"]);
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        "upstream: app",
        "upstream: nope",
    );
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].routes[0].upstream", 15);
    assert!(err.contains("'nope'"), "{err}");
    // The defined upstreams are listed.
    assert!(err.contains("app"), "{err}");
}

#[test]
fn route_with_both_upstream_and_respond_is_rejected() {
    let certs = Certs::new(&["localhost"]);
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        "upstream: app }",
        "upstream: app, respond: { status: 200 } }",
    );
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].routes[0]", 15);
    assert!(err.contains("upstream") && err.contains("respond"), "{err}");

    // Neither is rejected the same way.
    let yaml = edit(&base(&certs, "127.0.0.1:0"), ", upstream: app", "");
    let err = error_of(&yaml);
    assert_names(&err, "listeners[0].routes[0]", 15);
}

// ---------- through the binary ----------

/// Run the binary to completion, failing the test if it takes longer than 20 s.
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .env("EPHEMERA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ephemera {args:?} did not exit within 20 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn write_config(dir: &Path, yaml: &str) -> String {
    let path = dir.join("ephemera.yaml");
    std::fs::write(&path, yaml).unwrap();
    yaml_path(&path)
}

#[test]
fn check_exits_1_and_names_the_key_on_stderr() {
    let certs = Certs::new(&["localhost"]);
    let yaml = edit(&base(&certs, "127.0.0.1:0"), "- secp256r1", "- ffdhe2048");
    let file = write_config(certs.dir.path(), &yaml);
    let out = run(&["check", "--config", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains(&file), "{stderr}");
    assert_names(&stderr, "listeners[0].tls.groups[1]", 11);
    assert!(stderr.contains("ffdhe2048"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("config OK"),
        "{out:?}"
    );

    // The unedited config passes, so the failure above is the edit's.
    let file = write_config(certs.dir.path(), &base(&certs, "127.0.0.1:0"));
    let out = run(&["check", "--config", &file]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("config OK"));
}

#[test]
fn check_reports_a_missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = yaml_path(&dir.path().join("nope.yaml"));
    let out = run(&["check", "--config", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains(&file), "{stderr}");
    // serve prints the cause once, not once per level of the error chain.
    let out = run(&["serve", "--config", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

/// `serve --config` validates everything before binding: with the listener's port held by
/// the test, an invalid config reports its own error (not "cannot bind"); a valid config on
/// the same held port does reach the bind and fails there, which shows the test can tell
/// the two apart.
#[test]
fn serve_rejects_invalid_config_before_binding() {
    let certs = Certs::new(&["localhost"]);
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let bind = format!("127.0.0.1:{port}");

    let missing = certs.dir.path().join("missing.crt");
    let cases = [
        (
            edit(
                &base(&certs, &bind),
                &yaml_path(&certs.cert),
                &yaml_path(&missing),
            ),
            "listeners[0].tls.certificates[0]",
            8,
        ),
        (
            edit(&base(&certs, &bind), "upstream: app", "upstream: nope"),
            "listeners[0].routes[0].upstream",
            15,
        ),
        (
            edit(&base(&certs, &bind), "header_timeout", "header_timeot"),
            "header_timeot",
            13,
        ),
    ];
    for (yaml, key, line) in cases {
        let file = write_config(certs.dir.path(), &yaml);
        let started = Instant::now();
        let out = run(&["serve", "--config", &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: exited 0; stderr:\n{stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key}: slow exit"
        );
        assert_names(&stderr, key, line);
        assert!(
            !stderr.contains("cannot bind"),
            "{key}: bound first:\n{stderr}"
        );
        assert!(
            !stderr.contains("listening"),
            "{key}: bound first:\n{stderr}"
        );
    }

    let file = write_config(certs.dir.path(), &base(&certs, &bind));
    let out = run(&["serve", "--config", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr:\n{stderr}");
    assert!(stderr.contains("cannot bind"), "{stderr}");
    assert!(stderr.contains(&bind), "{stderr}");
    drop(held);
}

#[test]
fn upstream_protocol_and_tls_must_agree() {
    let certs = Certs::new(&["localhost"]);
    let base = base(&certs, "127.0.0.1:0");
    let line = "  app: { protocol: http1, servers: [127.0.0.1:8080] }";

    let err = error_of(&edit(
        &base,
        line,
        "  app: { protocol: h2, servers: [127.0.0.1:8080] }",
    ));
    assert_names(&err, "upstreams.app.tls", 17);
    assert!(err.contains("h2c"), "suggests h2c for cleartext: {err}");

    let err = error_of(&edit(
        &base,
        line,
        "  app: { protocol: h2c, servers: [127.0.0.1:8080], tls: { ca: x.pem } }",
    ));
    assert_names(&err, "upstreams.app.tls", 17);

    let err = error_of(&edit(
        &base,
        line,
        "  app: { protocol: http3, servers: [127.0.0.1:8080] }",
    ));
    assert_names(&err, "upstreams.app.protocol", 17);
    assert!(err.contains("http1, h2c, h2"), "{err}");

    let err = error_of(&edit(
        &base,
        line,
        "  app: { protocol: http1, servers: [127.0.0.1:8080], max_connections: 4 }",
    ));
    assert_names(&err, "upstreams.app.max_connections", 17);
    let err = error_of(&edit(
        &base,
        line,
        "  app: { protocol: h2c, servers: [127.0.0.1:8080], max_connections: 0 }",
    ));
    assert_names(&err, "upstreams.app.max_connections", 17);
}

#[test]
fn upstream_ca_file_problems_name_the_upstream_and_file() {
    let certs = Certs::new(&["localhost"]);
    let line = "  app: { protocol: http1, servers: [127.0.0.1:8080] }";
    let missing = certs.dir.path().join("missing-ca.pem");
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        line,
        &format!(
            "  app: {{ protocol: h2, servers: [127.0.0.1:8443], tls: {{ ca: {} }} }}",
            yaml_path(&missing)
        ),
    );
    let err = error_of(&yaml);
    assert!(
        err.contains("upstream 'app'") && err.contains("missing-ca.pem"),
        "{err}"
    );

    // A file without any certificate (here: a private key).
    let yaml = edit(
        &base(&certs, "127.0.0.1:0"),
        line,
        &format!(
            "  app: {{ protocol: h2, servers: [127.0.0.1:8443], tls: {{ ca: {} }} }}",
            yaml_path(&certs.key)
        ),
    );
    let err = error_of(&yaml);
    assert!(
        err.contains("upstream 'app'") && err.contains("no CERTIFICATE"),
        "{err}"
    );
}

#[test]
fn h2_limits_out_of_range_name_the_key_and_line() {
    let certs = Certs::new(&["localhost"]);
    let base = base(&certs, "127.0.0.1:0");
    for (setting, key) in [
        ("max_concurrent_streams: 0", "max_concurrent_streams"),
        ("initial_stream_window: 3GiB", "initial_stream_window"),
        (
            "initial_connection_window: 100",
            "initial_connection_window",
        ),
        ("max_header_list_size: 2MiB", "max_header_list_size"),
        ("keepalive_interval: soon", "keepalive_interval"),
        ("bogus: 1", "bogus"),
    ] {
        let yaml = edit(
            &base,
            "      header_timeout: 10s\n",
            &format!("      header_timeout: 10s\n      h2:\n        {setting}\n"),
        );
        let err = error_of(&yaml);
        assert!(err.contains(key), "{setting}: {err}");
        assert!(err.contains("line 15"), "{setting}: {err}");
    }
    let ok = edit(
        &base,
        "      header_timeout: 10s\n",
        "      header_timeout: 10s\n      h2: { max_concurrent_streams: 250, keepalive_interval: off }\n",
    );
    Config::parse(&ok, "ok.yaml").unwrap();
}
