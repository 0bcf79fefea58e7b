#!/usr/bin/env bash
# Soak: SOAK_SECS (default 10 minutes) of mixed traffic through one ephemera process, then
# checks that nothing failed, nothing leaked and the counters agree. Not part of the test run.
#
#   bash benches/soak.sh                          # SOAK_SECS=600
#   SOAK_SECS=90 RELOAD_EVERY=20 bash benches/soak.sh
#   CARGO_TARGET_DIR=/work/bench-target bash benches/soak.sh
#
# One proxy (`ephemera serve --config`, pinned to PROXY_CPU) with one TLS listener and two
# routes: `/h2c/` to an HTTP/2 cleartext upstream, everything else to an HTTP/1.1 upstream; both
# are one nginx instance (plain HTTP/1.1 on one port, h2c with prior knowledge on another; it
# answers "ok", serves a random BIG_MIB file and takes PUT uploads with its DAV module).
# `tls.key_update: { max_bytes: 1MiB, max_age: 30s }`, so large transfers and long keep-alive
# connections rekey. Concurrently, for SOAK_SECS, pinned to CLIENT_CPU with the backend:
#   handshakes  `ephemera loadgen --mode handshake --rate HS_RATE` (a new connection each)
#   h1          `ephemera loadgen --mode requests --alpn http/1.1 -c H1_CONNS --rate H1_RATE`
#   h2          `ephemera loadgen --mode requests --alpn h2 -c H2_CONNS --streams H2_STREAMS
#               --rate H2_RATE` to /h2c/ (multiplexed onto the h2c upstream pool)
#   transfers   a curl loop: BIG_MIB downloads and UPLOAD_MIB uploads over HTTP/1.1 and HTTP/2,
#               to both upstreams, each checked by size and SHA-256
#   reloads     every RELOAD_EVERY s the certificate is switched between two minted sets and
#               `POST /reload` is sent; it must answer 200 and new handshakes must get the
#               new certificate
# Every SAMPLE_EVERY s the proxy's VmRSS and open descriptors are printed. At the end the load
# stops, connections drain, /metrics is read, and a summary table with PASS/FAIL per check is
# printed. Exit status 1 when any check fails. See benches/README.md.
#
# Environment:
#   SOAK_SECS=600      seconds of load
#   RELOAD_EVERY=60    seconds between reloads (the first after half of it)
#   SAMPLE_EVERY=10    seconds between RSS / fd samples
#   WARMUP_SECS        the RSS baseline is the first sample at or after this (default
#                      min(60, SOAK_SECS / 2))
#   HS_RATE=100        new handshakes per second (loadgen -c HS_CONNS=8)
#   H1_RATE=500        keep-alive HTTP/1.1 requests per second over H1_CONNS=8 connections
#   H2_RATE=1000       keep-alive HTTP/2 requests per second over H2_CONNS=4 connections with
#                      H2_STREAMS=16 streams each
#   BIG_MIB=64         download size; UPLOAD_MIB=32 upload size; TRANSFER_PAUSE=1 s between
#                      transfers
#   MAX_AGE=           if set (e.g. 2m), tls.max_connection_age for the listener (default: the
#                      proxy's default, 24h). loadgen currently counts requests it could not
#                      send on a connection the proxy closed as errors (benches/README.md)
#   RSS_FACTOR=1.25 RSS_SLACK_MIB=8   RSS at the end must be <= FACTOR x RSS after warm-up + SLACK
#   FD_SLACK=2         descriptors at the end must be <= those before the load + backend
#                      connections still pooled + FD_SLACK
#   PROXY_CPU=0 CLIENT_CPU=1          taskset pinning (empty: no pinning)
#   EPHEMERA_BIN=      use this binary instead of building (cargo build --release --locked)
#   CARGO_TARGET_DIR   respected by the build (default: the repository's target/)
#   KEEP_TMP=1         keep the temporary directory (configs, logs, loadgen JSON, samples)
#   PROXY_LOG=warn     the proxy's EPHEMERA_LOG (e.g. warn,ephemera::http::server=debug: why
#                      connections end), written to ephemera.log in the temporary directory
set -euo pipefail

SOAK_SECS=${SOAK_SECS:-600}
RELOAD_EVERY=${RELOAD_EVERY:-60}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
WARMUP_SECS=${WARMUP_SECS:-$((SOAK_SECS / 2 < 60 ? SOAK_SECS / 2 : 60))}
HS_RATE=${HS_RATE:-100}
HS_CONNS=${HS_CONNS:-8}
H1_RATE=${H1_RATE:-500}
H1_CONNS=${H1_CONNS:-8}
H2_RATE=${H2_RATE:-1000}
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-16}
BIG_MIB=${BIG_MIB:-64}
UPLOAD_MIB=${UPLOAD_MIB:-32}
TRANSFER_PAUSE=${TRANSFER_PAUSE:-1}
MAX_AGE=${MAX_AGE:-}
RSS_FACTOR=${RSS_FACTOR:-1.25}
RSS_SLACK_MIB=${RSS_SLACK_MIB:-8}
FD_SLACK=${FD_SLACK:-2}
PROXY_CPU=${PROXY_CPU-0}
CLIENT_CPU=${CLIENT_CPU-1}
KEEP_TMP=${KEEP_TMP:-0}
PROXY_LOG=${PROXY_LOG:-warn}

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf '\nsoak.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

for v in SOAK_SECS RELOAD_EVERY SAMPLE_EVERY HS_RATE HS_CONNS H1_RATE H1_CONNS H2_RATE H2_CONNS H2_STREAMS \
    BIG_MIB UPLOAD_MIB; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
for v in WARMUP_SECS TRANSFER_PAUSE RSS_SLACK_MIB FD_SLACK; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
[[ $RSS_FACTOR =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "RSS_FACTOR must be a number, got '$RSS_FACTOR'"
((UPLOAD_MIB < 1024)) || die "UPLOAD_MIB must be below 1024"

# ---------------------------------------------------------------------------------------------
# 1. Tools (Debian/Ubuntu packages; the nginx service the package enables is stopped again:
#    only the binary is used, with its own config).
# ---------------------------------------------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
command -v taskset >/dev/null || need+=(util-linux)
command -v sha256sum >/dev/null || need+=(coreutils)
if ((${#need[@]})); then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get: install them by hand"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "missing ${need[*]}: run as root or install sudo"
        SUDO=(sudo)
    fi
    log "installing ${need[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" ||
        { "${SUDO[@]}" apt-get update && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"; }
    if [[ -d /run/systemd/system ]] && [[ " ${need[*]} " = *" nginx-light "* ]]; then
        "${SUDO[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
fi
for c in nginx curl openssl python3 taskset sha256sum awk; do
    command -v "$c" >/dev/null || die "'$c' not found after installation"
done
nginx -V 2>&1 | grep -q -- '--with-http_dav_module' || die "this nginx has no DAV module (needed for PUT uploads)"
nginx -V 2>&1 | grep -q -- '--with-http_v2_module' || die "this nginx has no HTTP/2 module (needed for the h2c upstream)"
curl --version | grep -q 'HTTP2' || die "this curl has no HTTP/2 support"
NCPU=$(nproc)
for v in PROXY_CPU CLIENT_CPU; do
    [[ -z ${!v} ]] || { [[ ${!v} =~ ^[0-9]+$ ]] && ((${!v} < NCPU)); } || die "$v=${!v} does not exist (nproc=$NCPU)"
done

# ---------------------------------------------------------------------------------------------
# 2. Build (release), then pin this script (and so every client and the backend it starts) to
#    CLIENT_CPU; the proxy is started on PROXY_CPU.
# ---------------------------------------------------------------------------------------------
if [[ -n ${EPHEMERA_BIN:-} ]]; then
    EPH=$EPHEMERA_BIN
else
    log "building ephemera (release; CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target})"
    (cd "$ROOT" && cargo build --release --locked --bin ephemera) >&2
    EPH=${CARGO_TARGET_DIR:-$ROOT/target}/release/ephemera
    [[ $EPH = /* ]] || EPH=$ROOT/$EPH
fi
[[ -x $EPH ]] || die "ephemera binary not found at $EPH"
[[ -z $CLIENT_CPU ]] || taskset -p -c "$CLIENT_CPU" $$ >/dev/null
PIN_PROXY=()
[[ -z $PROXY_CPU ]] || PIN_PROXY=(taskset -c "$PROXY_CPU")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ephemera-soak.XXXXXX")
# Processes we started, by name; the cleanup stops them (and the children of the transfer loop).
declare -A PID=()

children_of() {
    local f st
    for f in /proc/[0-9]*/stat; do
        { st=$(<"$f"); } 2>/dev/null || continue
        st=${st##*) }
        read -r _ ppid _ <<<"$st"
        [[ $ppid = "$1" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
    return 0
}
cleanup() {
    local rc=$? p c
    trap - EXIT INT TERM
    # The transfer loop first (its curl would otherwise outlive it), then everything else.
    if [[ -n ${PID[transfers]:-} ]]; then
        for c in $(children_of "${PID[transfers]}"); do kill -TERM "$c" 2>/dev/null || true; done
    fi
    for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 1 20); do
        local alive=0
        for p in "${PID[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.3
    done
    for p in "${PID[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if ((rc != 0 && rc != 1)) || [[ ${SHOW_LOGS:-0} = 1 ]]; then
        for f in "$TMP"/*.log "$TMP"/*.err; do
            [[ -s $f ]] || continue
            printf -- '--- %s (last lines)\n' "$f" >&2
            tail -n 15 "$f" >&2
        done
    fi
    if [[ $KEEP_TMP = 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
declare -A TAKEN=()
# Listening ports below the kernel's ephemeral range, so no outgoing connection can hold one.
read -r EPHEMERAL_LO _ </proc/sys/net/ipv4/ip_local_port_range
PORT_LO=20000 PORT_HI=$((EPHEMERAL_LO > 21000 ? EPHEMERAL_LO : 50000))
pick_port() {
    local p
    while :; do
        p=$((PORT_LO + RANDOM % (PORT_HI - PORT_LO)))
        [[ -z ${TAKEN[$p]:-} ]] && ! port_in_use "$p" && break
    done
    TAKEN[$p]=1
    echo "$p"
}
PORT=$(pick_port)
ADMIN_PORT=$(pick_port)
H1_PORT=$(pick_port)
H2C_PORT=$(pick_port)

# ---------------------------------------------------------------------------------------------
# 3. Certificates, test data, configs. Two certificate sets from one CA, as in a real
#    renewal: set a from `ephemera certs`, set b a new key and leaf signed by the same CA
#    (openssl). Each reload switches the live files to the other set. (Two CAs from two runs of
#    `ephemera certs` share a subject name, which OpenSSL's verifier in curl cannot tell apart.)
# ---------------------------------------------------------------------------------------------
"$EPH" certs --out "$TMP/certs-a" --name localhost --name 127.0.0.1 >"$TMP/certs.log" 2>&1 ||
    die "ephemera certs failed: $(cat "$TMP/certs.log")"
CA=$TMP/certs-a/ca.crt
mkdir -p "$TMP/certs-b"
printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'extendedKeyUsage=serverAuth' \
    'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' >"$TMP/certs-b/ext.cnf"
(
    umask 077
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
        -keyout "$TMP/certs-b/localhost.key" -out "$TMP/certs-b/leaf.csr" &&
        openssl x509 -req -in "$TMP/certs-b/leaf.csr" -CA "$CA" -CAkey "$TMP/certs-a/ca.key" \
            -CAserial "$TMP/certs-b/ca.srl" -CAcreateserial -days 30 -sha256 \
            -extfile "$TMP/certs-b/ext.cnf" -out "$TMP/certs-b/leaf.crt"
) >>"$TMP/certs.log" 2>&1 || die "openssl could not make the second certificate: $(tail -n 3 "$TMP/certs.log")"
cat "$TMP/certs-b/leaf.crt" "$CA" >"$TMP/certs-b/localhost.crt"
for set in a b; do
    openssl verify -CAfile "$CA" "$TMP/certs-$set/localhost.crt" >/dev/null ||
        die "certificate set $set does not verify against $CA"
    openssl x509 -in "$TMP/certs-$set/localhost.crt" -noout -text | grep -q 'ASN1 OID: prime256v1' ||
        die "$TMP/certs-$set/localhost.crt is not an ECDSA P-256 certificate"
done
mkdir -p "$TMP/live"
install -m 0644 "$TMP/certs-a/localhost.crt" "$TMP/live/localhost.crt"
install -m 0600 "$TMP/certs-a/localhost.key" "$TMP/live/localhost.key"
fingerprint() { openssl x509 -noout -fingerprint -sha256 | sed 's/.*=//'; }
declare -A FP=()
for set in a b; do FP[$set]=$(fingerprint <"$TMP/certs-$set/localhost.crt"); done
[[ ${FP[a]} != "${FP[b]}" ]] || die "the two certificate sets are the same"
LIVE_SET=a

# The backend's document root: "ok" answers, a random file to download, PUT targets. h2c/ is
# a link to the root, so the same paths work below the proxy's /h2c/ route.
WWW=$TMP/www
mkdir -p "$WWW/up" "$TMP/backend"
ln -s . "$WWW/h2c"
head -c "$((BIG_MIB * 1048576))" /dev/urandom >"$WWW/big.bin"
head -c "$((UPLOAD_MIB * 1048576))" /dev/urandom >"$TMP/upload.bin"
BIG_SHA=$(sha256sum <"$WWW/big.bin" | cut -d' ' -f1)
UPLOAD_SHA=$(sha256sum <"$TMP/upload.bin" | cut -d' ' -f1)

# nginx as the backend, for both upstream protocols: plain HTTP/1.1 on H1_PORT, h2c (HTTP/2
# with prior knowledge) on H2C_PORT; no request limit per connection and a long keep-alive,
# so backend connections are closed by the proxy's pool, not by nginx, during a run.
NGINX_NUM=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if [[ $(printf '%s\n' 1.25.1 "$NGINX_NUM" | sort -V | head -n 1) = 1.25.1 ]]; then
    H2C_LISTEN="listen 127.0.0.1:$H2C_PORT; http2 on;"
else
    H2C_LISTEN="listen 127.0.0.1:$H2C_PORT http2;"
fi
NGINX_USER=""
[[ $(id -u) -ne 0 ]] || NGINX_USER="user root root;" # the workers write the uploads into $TMP
SERVER_BODY="
        root $WWW;
        client_max_body_size 0;
        client_body_buffer_size 1m;
        dav_methods PUT;
        create_full_put_path on;
        location = / { return 200 \"ok\\n\"; }
        location = /h2c/ { return 200 \"ok\\n\"; }"
cat >"$TMP/backend.conf" <<EOF
$NGINX_USER
worker_processes 1;
pid $TMP/backend.pid;
error_log $TMP/backend-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $TMP/backend/body;
    server {
        listen 127.0.0.1:$H1_PORT;$SERVER_BODY
    }
    server {
        $H2C_LISTEN$SERVER_BODY
    }
}
EOF

write_config() {
    cat >"$TMP/ephemera.yaml" <<EOF
admin:
  bind: 127.0.0.1:$ADMIN_PORT
shutdown_grace: 5s
listeners:
  - name: soak
    bind: 127.0.0.1:$PORT
    tls:
      certificates:
        - { cert: $TMP/live/localhost.crt, key: $TMP/live/localhost.key }
      key_update: { max_bytes: 1MiB, max_age: 30s }${MAX_AGE:+
      max_connection_age: $MAX_AGE}
    http:
      access_log: false
      max_request_body: $((UPLOAD_MIB + 1))MiB
    routes:
      - { path_prefix: /h2c/, upstream: app_h2c }
      - { path_prefix: /, upstream: app }
upstreams:
  app:
    protocol: http1
    servers: [127.0.0.1:$H1_PORT]
  app_h2c:
    protocol: h2c
    servers: [127.0.0.1:$H2C_PORT]
EOF
}
write_config
"$EPH" check --config "$TMP/ephemera.yaml" >"$TMP/ephemera-check.log" 2>&1 ||
    die "ephemera check rejected the config: $(cat "$TMP/ephemera-check.log")"
nginx -t -p "$TMP/backend/" -c "$TMP/backend.conf" -e "$TMP/backend-error.log" >"$TMP/backend-check.log" 2>&1 ||
    die "nginx -t rejected the backend config: $(cat "$TMP/backend-check.log")"

# ---------------------------------------------------------------------------------------------
# 4. Start the backend and the proxy.
# ---------------------------------------------------------------------------------------------
nginx -p "$TMP/backend/" -c "$TMP/backend.conf" -e "$TMP/backend-error.log" -g 'daemon off;' >"$TMP/backend.log" 2>&1 &
PID[backend]=$!
for ((i = 0; ; i++)); do
    kill -0 "${PID[backend]}" 2>/dev/null || die "backend nginx exited at start: $(tail -n 5 "$TMP/backend.log" "$TMP/backend-error.log" 2>/dev/null)"
    port_in_use "$H1_PORT" && port_in_use "$H2C_PORT" && break
    ((i < 100)) || die "backend nginx does not listen on 127.0.0.1:$H1_PORT and :$H2C_PORT after 10 s"
    sleep 0.1
done

# taskset and env exec, so $! is the proxy itself.
"${PIN_PROXY[@]}" env EPHEMERA_LOG="$PROXY_LOG" "$EPH" serve --config "$TMP/ephemera.yaml" >"$TMP/ephemera.log" 2>&1 &
PID[proxy]=$!
PROXY=${PID[proxy]}
METRICS_URL=http://127.0.0.1:$ADMIN_PORT/metrics
# Ready when the admin listener answers. The TLS port is not probed with a bare TCP connect:
# that would be counted as a failed handshake (client_closed).
for ((i = 0; ; i++)); do
    kill -0 "$PROXY" 2>/dev/null || die "ephemera exited at start: $(tail -n 5 "$TMP/ephemera.log")"
    curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/healthz" 2>/dev/null && break
    ((i < 100)) || die "ephemera's admin listener does not answer on 127.0.0.1:$ADMIN_PORT after 10 s"
    sleep 0.1
done
sleep 0.5

scrape() { curl -fsS --max-time 10 "$METRICS_URL" -o "$1" || die "cannot read $METRICS_URL"; }
# Sum of a metric's samples (all label sets), optionally only lines containing FILTER.
msum() { # file name [filter]
    awk -v n="$2" -v f="${3:-}" '
        ($1 == n || index($1, n "{") == 1) && (f == "" || index($1, f) > 0) { s += $NF }
        END { printf "%.0f\n", s }' "$1"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$PROXY/status"; }
fds() { find "/proc/$PROXY/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
json_get() { # file key.path -> value
    python3 - "$@" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    d = d.get(k, {}) if isinstance(d, dict) else {}
print(json.dumps(d, sort_keys=True) if isinstance(d, dict) else d)
PYEOF
}

AFF=$(awk '/^Cpus_allowed_list/ {print $2}' "/proc/$PROXY/status")
THREADS=$(awk '/^Threads/ {print $2}' "/proc/$PROXY/status")
RSS_START=$(rss_kib)
FD_START=$(fds)
log "proxy: pid $PROXY, CPUs $AFF, threads $THREADS, TLS 127.0.0.1:$PORT, admin :$ADMIN_PORT; RSS $RSS_START KiB, $FD_START fds (before any request)"
log "backend: nginx $NGINX_NUM pid ${PID[backend]}, http1 :$H1_PORT, h2c :$H2C_PORT; clients on CPUs $(awk '/^Cpus_allowed_list/ {print $2}' /proc/$$/status)"

CURL=(curl -sS --cacert "$CA" --resolve "localhost:$PORT:127.0.0.1" --max-time 300)
# One request over each route and protocol before the load: the routes work.
for path in / /h2c/; do
    for ver in --http1.1 --http2; do
        body=$("${CURL[@]}" "$ver" "https://localhost:$PORT$path") || die "GET $path ($ver) through the proxy failed"
        [[ $body = ok ]] || die "GET $path ($ver) through the proxy answered '$body', not 'ok'"
    done
done
served_fp() {
    timeout 10 openssl s_client -connect "127.0.0.1:$PORT" -servername localhost </dev/null 2>/dev/null | fingerprint
}
[[ $(served_fp) = "${FP[a]}" ]] || die "the proxy does not serve the first certificate set"

# ---------------------------------------------------------------------------------------------
# 5. The load.
# ---------------------------------------------------------------------------------------------
scrape "$TMP/metrics-start.prom"
REQ_START=$(msum "$TMP/metrics-start.prom" ephemera_http_requests_total)
RELOAD_OK_START=$(msum "$TMP/metrics-start.prom" ephemera_config_reloads_total 'result="ok"')
RELOAD_ERR_START=$(msum "$TMP/metrics-start.prom" ephemera_config_reloads_total 'result="error"')
START=$(date +%s)
END=$((START + SOAK_SECS))
log "soak: ${SOAK_SECS}s from $(date -u '+%Y-%m-%d %H:%M:%S UTC'); handshakes ${HS_RATE}/s, HTTP/1.1 ${H1_RATE}/s (-c $H1_CONNS), HTTP/2 ${H2_RATE}/s (-c $H2_CONNS --streams $H2_STREAMS), transfers of $BIG_MIB/$UPLOAD_MIB MiB, a reload every ${RELOAD_EVERY}s"

# URLs name localhost, the SNI name: an HTTP/2 request whose host differs from the
# connection's SNI gets 421 unless the certificate covers it by a DNS name.
LG=("$EPH" loadgen --ca "$CA" -d "${SOAK_SECS}s" --json)
"${LG[@]}" "https://localhost:$PORT/" --mode handshake -c "$HS_CONNS" --rate "$HS_RATE" >"$TMP/lg-handshake.json" 2>"$TMP/lg-handshake.err" &
PID[lg_handshake]=$!
"${LG[@]}" "https://localhost:$PORT/" --mode requests --alpn http/1.1 -c "$H1_CONNS" --rate "$H1_RATE" >"$TMP/lg-h1.json" 2>"$TMP/lg-h1.err" &
PID[lg_h1]=$!
"${LG[@]}" "https://localhost:$PORT/h2c/" --mode requests --alpn h2 -c "$H2_CONNS" --streams "$H2_STREAMS" --rate "$H2_RATE" >"$TMP/lg-h2.json" 2>"$TMP/lg-h2.err" &
PID[lg_h2]=$!

# Large transfers, one at a time until the end: TSV lines "kind ok|FAIL bytes seconds detail".
# Kinds: direction (dl/up), client protocol, upstream protocol.
TRANSFERS=$TMP/transfers.tsv
: >"$TRANSFERS"
one_transfer() { # kind n
    local kind=$1 n=$2 dir proto up ver want path out code size httpv secs sha file rc detail=""
    IFS=- read -r dir proto up <<<"$kind"
    ver=--http1.1
    [[ $proto = h2 ]] && ver=--http2
    path=""
    [[ $up = h2c ]] && path=/h2c
    want=1.1
    [[ $proto = h2 ]] && want=2
    if [[ $dir = dl ]]; then
        # The body goes through sha256sum; curl's figures and exit status go to a file.
        out=$TMP/transfer.err
        sha=$({
            "${CURL[@]}" "$ver" -o - -w '%{stderr}\nRESULT %{http_code} %{size_download} %{http_version} %{time_total}\n' \
                "https://localhost:$PORT$path/big.bin" 2>"$out"
            echo "EXIT $?" >>"$out"
        } | sha256sum | cut -d' ' -f1)
        read -r _ code size httpv secs < <(grep '^RESULT ' "$out" | tail -n 1 || true)
        rc=$(sed -n 's/^EXIT //p' "$out")
        if [[ $rc != 0 ]]; then
            detail="curl exit status $rc"
        elif [[ $code != 200 ]]; then
            detail="status $code"
        elif [[ $size != $((BIG_MIB * 1048576)) ]]; then
            detail="$size bytes"
        elif [[ $sha != "$BIG_SHA" ]]; then
            detail="SHA-256 differs"
        elif [[ $httpv != "$want" ]]; then
            detail="HTTP version $httpv"
        fi
        [[ -z $detail ]] || detail="$detail: $(grep -v -e '^RESULT ' -e '^EXIT ' "$out" | head -c 300 | tr '\n\t' '  ')"
    else
        file=soak-$n.bin
        read -r code size httpv secs < <("${CURL[@]}" "$ver" -T "$TMP/upload.bin" -o /dev/null \
            -w '%{http_code} %{size_upload} %{http_version} %{time_total}\n' \
            "https://localhost:$PORT$path/up/$file" 2>"$TMP/transfer.err" || true)
        if [[ $code != 201 && $code != 204 ]]; then
            detail="status ${code:-none}: $(head -c 300 "$TMP/transfer.err" | tr '\n\t' '  ')"
        elif [[ $size != $((UPLOAD_MIB * 1048576)) ]]; then
            detail="$size bytes sent"
        elif [[ ! -f $WWW/up/$file ]]; then
            detail="the backend has no file"
        elif [[ $(sha256sum <"$WWW/up/$file" | cut -d' ' -f1) != "$UPLOAD_SHA" ]]; then
            detail="the backend received $(stat -c %s "$WWW/up/$file") bytes with a different SHA-256"
        elif [[ $httpv != "$want" ]]; then
            detail="HTTP version $httpv"
        fi
        rm -f "$WWW/up/$file"
    fi
    if [[ -z $detail ]]; then
        printf '%s\tok\t%s\t%s\t\n' "$kind" "$size" "$secs" >>"$TRANSFERS"
    else
        printf '%s\tFAIL\t%s\t%s\t%s\n' "$kind" "${size:-0}" "${secs:-0}" "$detail" >>"$TRANSFERS"
        log "transfer $n ($kind) FAILED: $detail"
    fi
}
transfer_loop() {
    local kinds=(dl-h1-http1 dl-h2-http1 dl-h2-h2c dl-h1-h2c up-h1-http1 up-h2-http1 up-h2-h2c up-h1-h2c) n=0
    trap - EXIT
    while (($(date +%s) < END)); do
        one_transfer "${kinds[n % ${#kinds[@]}]}" "$n"
        n=$((n + 1))
        sleep "$TRANSFER_PAUSE"
    done
}
transfer_loop &
PID[transfers]=$!

# Samples: "t rss_kib fds conns_open upstream_conns_open".
SAMPLES=$TMP/samples.tsv
: >"$SAMPLES"
sample() { # label
    local t rss fd open up
    t=$(($(date +%s) - START))
    rss=$(rss_kib)
    fd=$(fds)
    scrape "$TMP/metrics-sample.prom"
    open=$(msum "$TMP/metrics-sample.prom" ephemera_connections_open)
    up=$(msum "$TMP/metrics-sample.prom" ephemera_upstream_connections_open)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$rss" "$fd" "$open" "$up" "$1" >>"$SAMPLES"
    printf '   t=%4ss  RSS %7.1f MiB  fds %4d  client conns %4d  backend conns %3d  handshakes %8d  key updates %6d  %s\n' \
        "$t" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')" "$fd" "$open" "$up" \
        "$(msum "$TMP/metrics-sample.prom" ephemera_tls_handshakes_total)" \
        "$(msum "$TMP/metrics-sample.prom" ephemera_tls_key_updates_total)" "$1" >&2
}
RELOADS=0
RELOAD_FAILS=0
RELOAD_LOG=$TMP/reloads.log
: >"$RELOAD_LOG"
reload() {
    local next code fp
    next=$([[ $LIVE_SET = a ]] && echo b || echo a)
    install -m 0644 "$TMP/certs-$next/localhost.crt" "$TMP/live/localhost.crt.new"
    install -m 0600 "$TMP/certs-$next/localhost.key" "$TMP/live/localhost.key.new"
    mv -f "$TMP/live/localhost.key.new" "$TMP/live/localhost.key"
    mv -f "$TMP/live/localhost.crt.new" "$TMP/live/localhost.crt"
    RELOADS=$((RELOADS + 1))
    code=$(curl -sS --max-time 30 -X POST -o "$TMP/reload.out" -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/reload" 2>&1) || true
    fp=$(served_fp || true)
    if [[ $code = 200 && $fp = "${FP[$next]}" ]]; then
        LIVE_SET=$next
        printf 'reload %d ok: certificate set %s; %s\n' "$RELOADS" "$next" "$(head -c 200 "$TMP/reload.out")" >>"$RELOAD_LOG"
        log "reload $RELOADS: 200, new handshakes get certificate set $next"
    else
        RELOAD_FAILS=$((RELOAD_FAILS + 1))
        [[ $fp != "${FP[$next]}" ]] || LIVE_SET=$next
        printf 'reload %d FAILED: HTTP %s, served certificate %s (expected set %s); %s\n' "$RELOADS" "$code" \
            "$fp" "$next" "$(head -c 300 "$TMP/reload.out" 2>/dev/null | tr '\n' ' ')" >>"$RELOAD_LOG"
        log "reload $RELOADS FAILED: HTTP $code, served certificate ${fp:-none}, expected set $next"
    fi
}

sample "start of load"
NEXT_SAMPLE=$((START + SAMPLE_EVERY))
NEXT_RELOAD=$((START + RELOAD_EVERY / 2))
((NEXT_RELOAD > START)) || NEXT_RELOAD=$((START + 1))
RSS_WARM=""
while :; do
    now=$(date +%s)
    ((now < END)) || break
    if ((now >= NEXT_RELOAD)); then
        reload
        NEXT_RELOAD=$((NEXT_RELOAD + RELOAD_EVERY))
    fi
    if ((now >= NEXT_SAMPLE)); then
        label=""
        if [[ -z $RSS_WARM ]] && ((now - START >= WARMUP_SECS)); then
            label="(after warm-up: RSS baseline)"
        fi
        sample "$label"
        [[ -z $label ]] || RSS_WARM=$(awk -F'\t' 'END {print $2}' "$SAMPLES")
        NEXT_SAMPLE=$((NEXT_SAMPLE + SAMPLE_EVERY))
    fi
    kill -0 "$PROXY" 2>/dev/null || die "ephemera exited during the soak: $(tail -n 5 "$TMP/ephemera.log")"
    sleep 1
done
[[ -n $RSS_WARM ]] || RSS_WARM=$(awk -F'\t' 'END {print $2}' "$SAMPLES")

# ---------------------------------------------------------------------------------------------
# 6. Stop, drain, measure.
# ---------------------------------------------------------------------------------------------
log "load window over; waiting for the clients to finish"
LG_RC=()
for k in lg_handshake lg_h1 lg_h2; do
    rc=0
    wait "${PID[$k]}" || rc=$?
    LG_RC+=("$k=$rc")
    unset "PID[$k]"
done
rc=0
wait "${PID[transfers]}" || rc=$?
unset "PID[transfers]"
((rc == 0)) || log "the transfer loop exited with status $rc"
LOAD_END=$(date +%s)
# Client connections close with a lingering close of up to 2 s; wait until none is open.
for ((i = 0; i < 60; i++)); do
    scrape "$TMP/metrics-drain.prom"
    (($(msum "$TMP/metrics-drain.prom" ephemera_connections_open) == 0)) && break
    sleep 0.5
done
sleep 5
sample "(end, after drain)"
scrape "$TMP/metrics-end.prom"
RSS_END=$(awk -F'\t' 'END {print $2}' "$SAMPLES")
FD_END=$(awk -F'\t' 'END {print $3}' "$SAMPLES")
RSS_MAX=$(awk -F'\t' '$2 > m {m = $2} END {print m}' "$SAMPLES")
FD_MAX=$(awk -F'\t' '$3 > m {m = $3} END {print m}' "$SAMPLES")

# ---------------------------------------------------------------------------------------------
# 7. Checks and the summary.
# ---------------------------------------------------------------------------------------------
M=$TMP/metrics-end.prom
ACCEPTED=$(msum "$M" ephemera_connections_accepted_total)
HANDSHAKES=$(msum "$M" ephemera_tls_handshakes_total)
HS_FAILS=$(msum "$M" ephemera_tls_handshake_failures_total)
HS_FAIL_REASONS=$(awk '$1 ~ /^ephemera_tls_handshake_failures_total\{/ && $NF > 0 {match($1, /reason="[^"]*"/); printf "%s%s=%s", sep, substr($1, RSTART + 8, RLENGTH - 9), $NF; sep = ", "}' "$M")
CLOSED=$(msum "$M" ephemera_tls_connections_closed_total)
CLOSED_REASONS=$(awk '$1 ~ /^ephemera_tls_connections_closed_total\{/ && $NF > 0 {match($1, /reason="[^"]*"/); printf "%s%s=%s", sep, substr($1, RSTART + 8, RLENGTH - 9), $NF; sep = ", "}' "$M")
OPEN=$(msum "$M" ephemera_connections_open)
RESUMED=$(msum "$M" ephemera_tls_resumed_handshakes_total)
KEY_UPDATES=$(msum "$M" ephemera_tls_key_updates_total)
KU_BYTES=$(msum "$M" ephemera_tls_key_updates_total 'trigger="bytes"')
KU_AGE=$(msum "$M" ephemera_tls_key_updates_total 'trigger="age"')
KU_DEFERRED=$(msum "$M" ephemera_tls_key_updates_deferred_total)
KU_FAILS=$(msum "$M" ephemera_tls_key_update_failures_total)
RELOAD_OK=$(($(msum "$M" ephemera_config_reloads_total 'result="ok"') - RELOAD_OK_START))
RELOAD_ERR=$(($(msum "$M" ephemera_config_reloads_total 'result="error"') - RELOAD_ERR_START))
REQUESTS=$(($(msum "$M" ephemera_http_requests_total) - REQ_START))
REQ_5XX=$(msum "$M" ephemera_http_requests_total 'status_class="5xx"')
REQ_4XX=$(msum "$M" ephemera_http_requests_total 'status_class="4xx"')
UP_ERRORS=$(msum "$M" ephemera_upstream_errors_total)
UP_OPEN=$(msum "$M" ephemera_upstream_connections_open)
UP_OPEN_H1=$(msum "$M" ephemera_upstream_connections_open 'protocol="http1"')
UP_OPEN_H2C=$(msum "$M" ephemera_upstream_connections_open 'protocol="h2c"')
H2_STREAMS_TOTAL=$(msum "$M" ephemera_h2_streams_total)
PROXY_BYTES=$(msum "$M" ephemera_tls_connection_bytes_sum)

# loadgen reports.
declare -A LG_REQ=() LG_ERR=() LG_2XX=() LG_HS=() LG_ATT=() LG_RES=() LG_P99=()
LG_PROBLEMS=""
LG_REQ_SUM=0
for k in handshake h1 h2; do
    f=$TMP/lg-$k.json
    if ! python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$f" 2>/dev/null; then
        LG_PROBLEMS+="$k: no JSON report ($(tail -n 2 "$TMP/lg-$k.err" | tr '\n' ' ')); "
        LG_REQ[$k]=0 LG_ERR[$k]=- LG_2XX[$k]=0 LG_HS[$k]=0 LG_ATT[$k]=0 LG_RES[$k]=0 LG_P99[$k]=-
        continue
    fi
    LG_REQ[$k]=$(json_get "$f" requests)
    LG_ATT[$k]=$(json_get "$f" attempts)
    LG_ERR[$k]=$(json_get "$f" errors.total)
    LG_2XX[$k]=$(json_get "$f" status.2xx)
    [[ ${LG_2XX[$k]} =~ ^[0-9]+$ ]] || LG_2XX[$k]=0
    LG_HS[$k]=$(json_get "$f" handshakes)
    LG_RES[$k]=$(json_get "$f" resumed_handshakes)
    LG_P99[$k]=$(awk -v u="$(json_get "$f" latency_us.request.p99)" 'BEGIN {printf "%.2f", u / 1000}')
    LG_REQ_SUM=$((LG_REQ_SUM + LG_REQ[$k]))
    if ((LG_ERR[$k] != 0)); then
        LG_PROBLEMS+="$k: ${LG_ERR[$k]} errors $(json_get "$f" errors.by_kind) $(json_get "$f" errors.examples); "
    fi
    ((LG_2XX[$k] == LG_REQ[$k] && LG_REQ[$k] == LG_ATT[$k] && LG_REQ[$k] > 0)) ||
        LG_PROBLEMS+="$k: ${LG_ATT[$k]} attempts, ${LG_REQ[$k]} responses, ${LG_2XX[$k]} 2xx; "
    ((LG_RES[$k] == 0)) || LG_PROBLEMS+="$k: ${LG_RES[$k]} resumed handshakes; "
done
TR_OK=$(awk -F'\t' '$2 == "ok"' "$TRANSFERS" | wc -l)
TR_FAIL=$(awk -F'\t' '$2 != "ok"' "$TRANSFERS" | wc -l)
TR_ALL=$((TR_OK + TR_FAIL))
TR_DL_BYTES=$(awk -F'\t' '$2 == "ok" && $1 ~ /^dl/ {s += $3} END {printf "%.0f", s}' "$TRANSFERS")
TR_UP_BYTES=$(awk -F'\t' '$2 == "ok" && $1 ~ /^up/ {s += $3} END {printf "%.0f", s}' "$TRANSFERS")
TR_BY_KIND=$(awk -F'\t' '{n[$1]++; if ($2 == "ok") ok[$1]++} END {for (k in n) printf "%s %d/%d\n", k, ok[k], n[k]}' "$TRANSFERS" | sort | paste -sd, - | sed 's/,/, /g')
TR_MEAN_S=$(awk -F'\t' '$2 == "ok" && $1 ~ /^dl/ {s += $4; n++} END {printf "%.2f", (n ? s / n : 0)}' "$TRANSFERS")
TU_MEAN_S=$(awk -F'\t' '$2 == "ok" && $1 ~ /^up/ {s += $4; n++} END {printf "%.2f", (n ? s / n : 0)}' "$TRANSFERS")

FAILS=0
RESULTS=()
check() { # ok(0/1) name detail
    local v=FAIL
    (($1)) && v=PASS
    ((${1})) || FAILS=$((FAILS + 1))
    RESULTS+=("| $2 | $3 | **$v** |")
}
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
gib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1073741824}'; }
RSS_LIMIT=$(awk -v w="$RSS_WARM" -v f="$RSS_FACTOR" -v s="$RSS_SLACK_MIB" 'BEGIN {printf "%.0f", w * f + s * 1024}')
FD_LIMIT=$((FD_START + UP_OPEN + FD_SLACK))

check "$([[ -z $LG_PROBLEMS ]] && echo 1 || echo 0)" "no failed loadgen request" \
    "handshake ${LG_ERR[handshake]}, h1 ${LG_ERR[h1]}, h2 ${LG_ERR[h2]} errors; every response 2xx; exit ${LG_RC[*]}${LG_PROBLEMS:+; $LG_PROBLEMS}"
check "$((TR_FAIL == 0 && TR_OK > 0))" "large transfers intact" "$TR_OK of $TR_ALL right size, status and SHA-256 ($TR_BY_KIND)"
check "$((REQ_5XX == 0 && UP_ERRORS == 0))" "no 5xx, no upstream error" "5xx $REQ_5XX, 4xx $REQ_4XX, ephemera_upstream_errors_total $UP_ERRORS"
check "$((REQUESTS == LG_REQ_SUM + TR_ALL))" "requests: proxy == clients" \
    "ephemera_http_requests_total +$REQUESTS; loadgen $LG_REQ_SUM + transfers $TR_ALL = $((LG_REQ_SUM + TR_ALL))"
check "$((ACCEPTED == HANDSHAKES + HS_FAILS))" "accepted == handshakes + failures" \
    "$ACCEPTED == $HANDSHAKES + $HS_FAILS${HS_FAIL_REASONS:+ ($HS_FAIL_REASONS)}"
check "$((OPEN == 0 && CLOSED == HANDSHAKES))" "closed == handshakes, none open" \
    "closed $CLOSED ($CLOSED_REASONS), handshakes $HANDSHAKES, open $OPEN"
check "$((RESUMED == 0))" "no resumed handshake" "ephemera_tls_resumed_handshakes_total $RESUMED"
check "$((KEY_UPDATES > 0 && KU_FAILS == 0))" "key updates forced, none failed" \
    "$KEY_UPDATES (bytes $KU_BYTES, age $KU_AGE), deferred $KU_DEFERRED, failures $KU_FAILS"
check "$((RELOAD_FAILS == 0 && RELOAD_OK == RELOADS && RELOAD_ERR == 0 && RELOADS > 0))" "reloads ok" \
    "$RELOADS done, answered 200 with the new certificate served: $((RELOADS - RELOAD_FAILS)); reloads_total ok +$RELOAD_OK, error +$RELOAD_ERR"
check "$((RSS_END <= RSS_LIMIT))" "RSS flat" \
    "end $(mib "$RSS_END") MiB <= $RSS_FACTOR x $(mib "$RSS_WARM") (after warm-up) + $RSS_SLACK_MIB = $(mib "$RSS_LIMIT") MiB"
check "$((FD_END <= FD_LIMIT))" "descriptors back" \
    "end $FD_END <= $FD_START (before load) + $UP_OPEN pooled backend connections + $FD_SLACK = $FD_LIMIT"

DUR=$((LOAD_END - START))
{
    echo
    echo "## Soak: $(date -u -d "@$START" '+%Y-%m-%d %H:%M UTC'), ${SOAK_SECS}s"
    echo
    echo "- ephemera: $("$EPH" --version 2>&1 | sed -n 1p)$([[ -z ${EPHEMERA_BIN:-} ]] && echo " (tree $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown))"), pinned to CPUs $AFF ($THREADS threads); clients and nginx $NGINX_NUM backend on CPUs $(awk '/^Cpus_allowed_list/ {print $2}' /proc/$$/status); machine nproc=$NCPU, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- config: key_update { max_bytes: 1MiB, max_age: 30s }${MAX_AGE:+, max_connection_age $MAX_AGE}; routes / -> http1 upstream, /h2c/ -> h2c upstream (one nginx)"
    echo
    echo "| figure | value |"
    echo "|---|---|"
    echo "| duration | ${DUR}s of load (SOAK_SECS=$SOAK_SECS), then drain |"
    echo "| handshakes (proxy) | $HANDSHAKES full ($(awk -v h="$HANDSHAKES" -v d="$DUR" 'BEGIN {printf "%.0f", h / d}')/s); accepted $ACCEPTED, failed $HS_FAILS, resumed $RESUMED |"
    echo "| new-connection requests (loadgen handshake) | ${LG_REQ[handshake]} at ${HS_RATE}/s, p99 ${LG_P99[handshake]} ms, errors ${LG_ERR[handshake]} |"
    echo "| keep-alive HTTP/1.1 requests | ${LG_REQ[h1]} at ${H1_RATE}/s over ${LG_HS[h1]} connections, p99 ${LG_P99[h1]} ms, errors ${LG_ERR[h1]} |"
    echo "| keep-alive HTTP/2 requests (h2c upstream) | ${LG_REQ[h2]} at ${H2_RATE}/s over ${LG_HS[h2]} connections x $H2_STREAMS streams, p99 ${LG_P99[h2]} ms, errors ${LG_ERR[h2]} |"
    echo "| large transfers | $TR_OK ok / $TR_ALL: $(gib "$TR_DL_BYTES") GiB down ($BIG_MIB MiB each, mean ${TR_MEAN_S}s), $(gib "$TR_UP_BYTES") GiB up ($UPLOAD_MIB MiB each, mean ${TU_MEAN_S}s) |"
    echo "| requests (proxy) | $REQUESTS during the load; HTTP/2 streams $H2_STREAMS_TOTAL |"
    echo "| bytes through TLS (proxy, both ways) | $(gib "$PROXY_BYTES") GiB |"
    echo "| key updates | $KEY_UPDATES forced (bytes $KU_BYTES, age $KU_AGE), deferred $KU_DEFERRED, failed $KU_FAILS |"
    echo "| reloads | $RELOADS (ok $RELOAD_OK, error $RELOAD_ERR) |"
    echo "| RSS | start $(mib "$RSS_START") MiB, after warm-up $(mib "$RSS_WARM") MiB, max $(mib "$RSS_MAX") MiB, end $(mib "$RSS_END") MiB |"
    echo "| open fds | start $FD_START, max $FD_MAX, end $FD_END (backend connections pooled at the end: http1 $UP_OPEN_H1, h2c $UP_OPEN_H2C) |"
    echo "| connections closed | $CLOSED_REASONS |"
    echo
    echo "| check | figures | result |"
    echo "|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
    echo
    if ((FAILS == 0)); then echo "All checks PASS."; else echo "$FAILS check(s) FAIL."; fi
}
if ((FAILS > 0)); then
    [[ -s $RELOAD_LOG ]] && { echo "reloads:"; cat "$RELOAD_LOG"; } >&2
    grep -v $'\tok\t' "$TRANSFERS" | head -n 20 >&2 || true
    SHOW_LOGS=1
    exit 1
fi
