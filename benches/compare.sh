#!/usr/bin/env bash
# Server CPU per full TLS 1.3 handshake and per keep-alive HTTP/2 request: ephemera vs nginx
# vs HAProxy (and the bare loop, benches/bare_loop.rs), side by side.
#
#   bash benches/compare.sh                      # DURATION=10 ROUNDS=2 MODE=proxy
#   DURATION=20 ROUNDS=3 bash benches/compare.sh
#   MODE=respond bash benches/compare.sh         # each server answers "ok" itself
#
# Each server runs pinned to CPU 0 (taskset -c 0) with the same policy (TLS 1.3 only; groups
# X25519, P-256, P-384; suites AES-128-GCM > AES-256-GCM > ChaCha20 in server order; no
# session tickets, no session cache; the same ECDSA P-256 certificate chain; ALPN h2 and
# http/1.1). With MODE=proxy (default) all three proxy to the same plain-HTTP/1.1 backend (a
# separate nginx instance answering "ok", pinned to CPU 1 with the clients) over pooled
# keep-alive connections; with MODE=respond each answers a fixed "ok" itself.
# Four loads, each pinned to CPU 1, one after the other per server:
#   s_time   `openssl s_time -new`: one new TCP connection, one full handshake and one small
#            HTTP/1.0 request per connection, one connection at a time;
#   loadgen  `ephemera loadgen --mode handshake -c LG_CONNS`: the same with 8 concurrent
#            connections (HTTP/2 or HTTP/1.1 by ALPN), client-observed rate and p99;
#   h2load   `h2load -c H2_CONNS -m H2_STREAMS -D DURATION`: keep-alive HTTP/2 requests;
#   loadgen-requests  `ephemera loadgen --mode requests --alpn h2 -c H2_CONNS --streams
#            H2_STREAMS`: the same keep-alive load from our own client, with a p99 per request
#            (h2load gives a mean only).
# The server's utime+stime (/proc/PID/stat, fields 14 and 15) before and after, divided by the
# number of handshakes (or requests), is the server CPU per handshake (or request). See
# benches/README.md.
#
# Environment:
#   MODE=proxy         proxy: the servers proxy to the shared backend; respond: they answer
#   CLIENTS="s_time loadgen h2load loadgen-requests"   which loads to run (any subset, in
#                      this order)
#   DURATION=10        seconds of load per server per round per client
#   ROUNDS=2           how many times the whole set (ephemera, nginx, haproxy, bare) is measured
#   LG_CONNS=8         ephemera loadgen concurrent connections (handshake mode)
#   LG_ALPN=h2         the protocol loadgen offers and must get: h2, or http/1.1 (then each
#                      request says Connection: close, as a one-request HTTP/1.1 client does)
#   H2_CONNS=8         keep-alive connections (h2load and loadgen-requests)
#   H2_STREAMS=10      concurrent streams per keep-alive connection (h2load -m, loadgen --streams)
#   SERVER_CPU=0       CPU the servers are pinned to
#   CLIENT_CPU=1       CPU the clients (and the backend) are pinned to
#   MAX_BUSY=          if set (a percentage, e.g. 10): other processes may use at most this
#                      much of the server CPU and of the client CPU (our backend not
#                      counted). Before each measurement
#                      wait (up to LOAD_WAIT seconds) until both were below it for 2 s, and
#                      measure again (up to RETRIES times) if it was exceeded during the run.
#                      Unset: measure at once, whatever else runs (the table shows it).
#   LOAD_WAIT=600
#   RETRIES=3
#   BARE=1             also measure the bare loop (benches/bare_loop.rs): a tokio-rustls + hyper
#                      server with ephemera's TLS policy that answers "ok" itself in both modes,
#                      the reference the handshake target is stated against; BARE=0 leaves it out
#   EPHEMERA_BIN=      use this binary instead of building (cargo build --release --locked)
#   BARE_BIN=          the bare loop's binary (default: cargo build --release --example bare_loop)
#   CARGO_TARGET_DIR   respected by the build
#   KEEP_TMP=1         keep the temporary directory (configs, logs, client outputs)
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
MAX_BUSY=${MAX_BUSY:-}
LOAD_WAIT=${LOAD_WAIT:-600}
RETRIES=${RETRIES:-3}
KEEP_TMP=${KEEP_TMP:-0}
MODE=${MODE:-proxy}
DEFAULT_CLIENTS="s_time loadgen h2load loadgen-requests"
CLIENTS=${CLIENTS:-$DEFAULT_CLIENTS}
LG_CONNS=${LG_CONNS:-8}
LG_ALPN=${LG_ALPN:-h2}
H2_CONNS=${H2_CONNS:-8}
H2_STREAMS=${H2_STREAMS:-10}
SUITES=TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
BARE=${BARE:-1}
SERVERS=(ephemera nginx haproxy)
[[ $BARE = 1 ]] && SERVERS+=(bare)

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf '\ncompare.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (seconds), got '$DURATION'"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
[[ -z $MAX_BUSY || $MAX_BUSY =~ ^[0-9]+$ ]] || die "MAX_BUSY must be an integer percentage, got '$MAX_BUSY'"
[[ $MODE = proxy || $MODE = respond ]] || die "MODE must be proxy or respond, got '$MODE'"
[[ $BARE = 0 || $BARE = 1 ]] || die "BARE must be 0 or 1, got '$BARE'"
for c in $CLIENTS; do
    [[ $c = s_time || $c = loadgen || $c = h2load || $c = loadgen-requests ]] ||
        die "CLIENTS: unknown client '$c' (s_time, loadgen, h2load, loadgen-requests)"
done
[[ -n ${CLIENTS// /} ]] || die "CLIENTS is empty"
[[ $LG_ALPN = h2 || $LG_ALPN = http/1.1 ]] || die "LG_ALPN must be h2 or http/1.1, got '$LG_ALPN'"
for v in LG_CONNS H2_CONNS H2_STREAMS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done

# ---------------------------------------------------------------------------------------------
# 1. Tools. Debian/Ubuntu packages; the package scripts may start and enable the system
#    services (systemd), which we stop and disable again: we only use the binaries.
# ---------------------------------------------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)
command -v taskset >/dev/null || need+=(util-linux)
command -v getconf >/dev/null || need+=(libc-bin)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v python3 >/dev/null || need+=(python3)
command -v curl >/dev/null || need+=(curl)
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
    if [[ -d /run/systemd/system ]]; then
        for pkg in "${need[@]}"; do
            case $pkg in
            nginx-light) "${SUDO[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true ;;
            haproxy) "${SUDO[@]}" systemctl disable --now haproxy >/dev/null 2>&1 || true ;;
            esac
        done
    fi
fi
for c in nginx haproxy openssl taskset getconf awk h2load python3 curl; do
    command -v "$c" >/dev/null || die "'$c' not found after installation"
done
NCPU=$(nproc)
((SERVER_CPU < NCPU && CLIENT_CPU < NCPU)) ||
    die "SERVER_CPU=$SERVER_CPU / CLIENT_CPU=$CLIENT_CPU do not exist (nproc=$NCPU)"
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || log "WARNING: server and client share CPU $SERVER_CPU (nproc=$NCPU)"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# 2. Build ephemera (release), temp dir, certificates, configs.
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
if [[ $BARE = 1 ]]; then
    if [[ -n ${BARE_BIN:-} ]]; then
        BARE_EXE=$BARE_BIN
    else
        log "building the bare loop (release example bare_loop)"
        (cd "$ROOT" && cargo build --release --locked --example bare_loop) >&2
        BARE_EXE=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bare_loop
        [[ $BARE_EXE = /* ]] || BARE_EXE=$ROOT/$BARE_EXE
    fi
    [[ -x $BARE_EXE ]] || die "bare loop binary not found at $BARE_EXE"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ephemera-bench.XXXXXX")
declare -A PID=() PIDS=() PORT=()

cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for p in "${PID[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.3
    done
    for p in "${PID[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if ((rc != 0)); then
        for f in "$TMP"/*.log; do
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
# Listening ports below the kernel's ephemeral range, so that no outgoing connection (ours or
# anyone else's on the machine) holds the port as its local port when a server binds it.
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
for s in "${SERVERS[@]}"; do PORT[$s]=$(pick_port); done
ADMIN_PORT=$(pick_port)
BACKEND_PORT=$(pick_port)

log "certificates: $EPH certs --out $TMP/certs"
"$EPH" certs --out "$TMP/certs" >"$TMP/certs.log" 2>&1 || die "ephemera certs failed (see $TMP/certs.log)"
CRT=$TMP/certs/localhost.crt
KEY=$TMP/certs/localhost.key
CA=$TMP/certs/ca.crt
openssl x509 -in "$CRT" -noout -text | grep -q 'ASN1 OID: prime256v1' ||
    die "$CRT is not an ECDSA P-256 certificate"
cat "$CRT" "$KEY" >"$TMP/haproxy.pem"

# The shared backend (MODE=proxy): a separate nginx instance (own config, prefix and pid file),
# plain HTTP/1.1 on loopback, answering "ok" with a marker header so the policy check can see
# that a response came through it. Keep-alive without a request limit, so the proxies' pooled
# connections are never closed by the backend during a run.
mkdir -p "$TMP/backend"
cat >"$TMP/backend.conf" <<EOF
worker_processes 1;
pid $TMP/backend.pid;
error_log $TMP/backend-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$BACKEND_PORT;
        add_header X-Bench-Backend 1 always;
        location / { return 200 "ok\n"; }
        # What the proxies add to a request: the policy check compares it across servers.
        location = /bench-forwarded {
            return 200 "xff=\$http_x_forwarded_for proto=\$http_x_forwarded_proto xfh=\$http_x_forwarded_host fwd=\$http_forwarded\n";
        }
    }
}
EOF

# The same forwarding headers from all three: ephemera always sets X-Forwarded-For (the
# client address; a client's own value is dropped, none of ours is trusted), X-Forwarded-Proto,
# X-Forwarded-Host and a Forwarded element, the last two with the request's host when it has
# one (s_time's HTTP/1.0 requests carry none). nginx and HAProxy are told to do the same
# (checked through the backend's /bench-forwarded below, over HTTP/1.1, HTTP/1.0 and HTTP/2).
# Host is left to each: ephemera and HAProxy pass the client's, nginx sends its upstream's
# name ("app"); one header either way.
if [[ $MODE = proxy ]]; then
    EPH_ROUTE="upstream: app"
    NGINX_LOCATION="proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header Forwarded \$bench_forwarded;"
    # (An empty proxy_set_header value sends no header: no X-Forwarded-Host without a host.)
    NGINX_HTTP='map $http_host $bench_forwarded {
        ""      "for=$remote_addr;proto=https";
        default "for=$remote_addr;proto=https;host=\"$http_host\"";
    }'
    HAPROXY_ACTION='http-request set-header X-Forwarded-For %[src]
    http-request set-header X-Forwarded-Proto https
    http-request del-header X-Forwarded-Host
    http-request set-header X-Forwarded-Host %[req.hdr(host)] if { req.hdr(host) -m found }
    http-request set-header Forwarded "for=%[src];proto=https;host=\"%[req.hdr(host)]\"" if { req.hdr(host) -m found }
    http-request set-header Forwarded "for=%[src];proto=https" unless { req.hdr(host) -m found }
    default_backend app'
else
    EPH_ROUTE='respond: { status: 200, body: "ok\n" }'
    NGINX_LOCATION='return 200 "ok\n";'
    NGINX_HTTP=""
    HAPROXY_ACTION='http-request return status 200 content-type text/plain string "ok"'
fi

# ephemera: its policy is fixed (TLS 1.3 only, server suite order AES-128 > AES-256 > ChaCha20,
# no tickets, no session cache, no 0-RTT, ALPN h2 and http/1.1); groups as configured.
cat >"$TMP/ephemera.yaml" <<EOF
admin:
  bind: 127.0.0.1:$ADMIN_PORT
shutdown_grace: 1s
listeners:
  - name: bench
    bind: 127.0.0.1:${PORT[ephemera]}
    tls:
      certificates:
        - { cert: $CRT, key: $KEY }
      groups: [x25519, secp256r1, secp384r1]
    http:
      access_log: false   # as nginx's "access_log off" and HAProxy without "option httplog"
    routes:
      - { host: "*", path_prefix: /, $EPH_ROUTE }
upstreams:
  app:
    protocol: http1
    servers: [127.0.0.1:$BACKEND_PORT]
EOF

# nginx and HAProxy (OpenSSL 3): with tickets and the session cache off, OpenSSL still sends
# two TLS 1.3 NewSessionTicket messages per handshake (stateful tickets nobody can redeem, but
# they cost server CPU and the client stores them). NumTickets=0 stops that: nginx through
# ssl_conf_command, HAProxy (no such directive) through an OpenSSL config file whose
# system_default section OpenSSL applies to every SSL_CTX the process creates.
# HTTP/2: "listen ... ssl http2" before nginx 1.25.1, "http2 on;" since. keepalive_requests
# (which also bounds HTTP/2 streams per connection since 1.19.7) is lifted: h2load does not
# reconnect when a connection is closed after 1000 requests.
NGINX_NUM=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if [[ $(printf '%s\n' 1.25.1 "$NGINX_NUM" | sort -V | head -n 1) = 1.25.1 ]]; then
    NGINX_LISTEN="listen 127.0.0.1:${PORT[nginx]} ssl; http2 on;"
else
    NGINX_LISTEN="listen 127.0.0.1:${PORT[nginx]} ssl http2;"
fi
# nginx keeps at most `keepalive N` idle backend connections and closes the rest after use, so
# N must cover h2load's concurrency (H2_CONNS x H2_STREAMS requests in flight) or nginx would
# open and close backend connections all the time (ephemera and HAProxy keep what they open).
NGINX_KEEPALIVE=$((H2_CONNS * H2_STREAMS > 32 ? H2_CONNS * H2_STREAMS : 32))
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx.conf" <<EOF
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    $NGINX_HTTP
    upstream app {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive $NGINX_KEEPALIVE;
        keepalive_requests 100000000;
    }
    server {
        $NGINX_LISTEN
        ssl_certificate $CRT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.3;
        ssl_ecdh_curve X25519:prime256v1:secp384r1;
        ssl_conf_command Ciphersuites $SUITES;
        ssl_prefer_server_ciphers on;
        ssl_session_tickets off;
        ssl_session_cache off;
        ssl_conf_command NumTickets 0;
        location / { $NGINX_LOCATION }
    }
}
EOF

cat >"$TMP/haproxy-openssl.cnf" <<EOF
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
NumTickets = 0
EOF
# Server suite preference is HAProxy's default ("prefer-client-ciphers" would turn it off).
cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    tune.ssl.cachesize 0
    ssl-default-bind-ciphersuites $SUITES
    ssl-default-bind-curves X25519:P-256:P-384
    ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.0.0.1:${PORT[haproxy]} ssl crt $TMP/haproxy.pem alpn h2,http/1.1
    $HAPROXY_ACTION
backend app
    http-reuse always
    server backend 127.0.0.1:$BACKEND_PORT
EOF

"$EPH" check --config "$TMP/ephemera.yaml" >"$TMP/ephemera-check.log" 2>&1 ||
    die "ephemera check rejected the config: $(cat "$TMP/ephemera-check.log")"
nginx -t -p "$TMP/nginx/" -c "$TMP/nginx.conf" -e "$TMP/nginx-error.log" >"$TMP/nginx-check.log" 2>&1 ||
    die "nginx -t rejected the config: $(cat "$TMP/nginx-check.log")"
OPENSSL_CONF=$TMP/haproxy-openssl.cnf haproxy -c -f "$TMP/haproxy.cfg" >"$TMP/haproxy-check.log" 2>&1 ||
    die "haproxy -c rejected the config: $(cat "$TMP/haproxy-check.log")"
nginx -t -p "$TMP/backend/" -c "$TMP/backend.conf" -e "$TMP/backend-error.log" >"$TMP/backend-check.log" 2>&1 ||
    die "nginx -t rejected the backend config: $(cat "$TMP/backend-check.log")"

# ---------------------------------------------------------------------------------------------
# 3. Start the servers, pinned to SERVER_CPU. (env and taskset exec, so $! is the server.)
# ---------------------------------------------------------------------------------------------
start() {
    local name=$1
    shift
    taskset -c "$SERVER_CPU" "$@" >"$TMP/$name.log" 2>&1 &
    PID[$name]=$!
}
# The backend shares the client CPU: it is not what is measured, and CPU 0 stays the servers'.
BACKEND_PIDS=""
if [[ $MODE = proxy ]]; then
    taskset -c "$CLIENT_CPU" nginx -p "$TMP/backend/" -c "$TMP/backend.conf" -e "$TMP/backend-error.log" \
        -g 'daemon off;' >"$TMP/backend.log" 2>&1 &
    PID[backend]=$!
    for ((i = 0; ; i++)); do
        kill -0 "${PID[backend]}" 2>/dev/null || die "backend nginx exited at start (log: $(tail -n 5 "$TMP/backend.log" 2>/dev/null))"
        port_in_use "$BACKEND_PORT" && break
        ((i < 100)) || die "backend nginx does not listen on 127.0.0.1:$BACKEND_PORT after 10 s"
        sleep 0.1
    done
fi
start ephemera env EPHEMERA_LOG=warn "$EPH" serve --config "$TMP/ephemera.yaml"
start nginx nginx -p "$TMP/nginx/" -c "$TMP/nginx.conf" -e "$TMP/nginx-error.log" -g 'daemon off;'
start haproxy env OPENSSL_CONF="$TMP/haproxy-openssl.cnf" haproxy -db -f "$TMP/haproxy.cfg"
[[ $BARE = 1 ]] && start bare "$BARE_EXE" --listen "127.0.0.1:${PORT[bare]}" --cert "$CRT" --key "$KEY"

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

for s in "${SERVERS[@]}"; do
    for ((i = 0; ; i++)); do
        kill -0 "${PID[$s]}" 2>/dev/null || die "$s exited at start (log: $(tail -n 5 "$TMP/$s.log" 2>/dev/null))"
        port_in_use "${PORT[$s]}" && break
        ((i < 100)) || die "$s does not listen on 127.0.0.1:${PORT[$s]} after 10 s"
        sleep 0.1
    done
done
# The processes whose CPU counts: the server, and for nginx the master and its worker(s).
sleep 0.5
PIDS[ephemera]=${PID[ephemera]}
PIDS[haproxy]=${PID[haproxy]}
[[ $BARE = 1 ]] && PIDS[bare]=${PID[bare]}
workers=$(children_of "${PID[nginx]}" | tr '\n' ' ')
[[ -n $workers ]] || die "nginx master ${PID[nginx]} has no worker process"
PIDS[nginx]="${PID[nginx]} ${workers% }"
if [[ $MODE = proxy ]]; then
    workers=$(children_of "${PID[backend]}" | tr '\n' ' ')
    [[ -n $workers ]] || die "backend nginx master ${PID[backend]} has no worker process"
    BACKEND_PIDS="${PID[backend]} ${workers% }"
    log "backend: nginx pids $BACKEND_PIDS, CPU $CLIENT_CPU, port $BACKEND_PORT (plain HTTP/1.1)"
fi
for s in "${SERVERS[@]}"; do
    for p in ${PIDS[$s]}; do
        aff=$(awk '/^Cpus_allowed_list/ {print $2}' "/proc/$p/status")
        thr=$(awk '/^Threads/ {print $2}' "/proc/$p/status")
        log "$s: pid $p $(tr -d '\0' <"/proc/$p/comm"), threads $thr, CPUs $aff, port ${PORT[$s]}"
        [[ $aff = "$SERVER_CPU" ]] || die "$s (pid $p) is not pinned to CPU $SERVER_CPU (Cpus_allowed_list=$aff)"
    done
done

# ---------------------------------------------------------------------------------------------
# 4. Verify the policy is the same everywhere before measuring anything.
# ---------------------------------------------------------------------------------------------
sclient() { # port out-file extra-args...: one connection, GET /, wait for the server to close
    local port=$1 out=$2
    shift 2
    printf 'GET / HTTP/1.0\r\n\r\n' |
        timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername localhost \
            -CAfile "$CA" -verify_hostname localhost -ign_eof "$@" >"$out" 2>&1
}
forwarded() { # server: the headers the backend received, with and without a Host, are the same
    local s=$1 port=${PORT[$1]} out=$TMP/verify-$1.fwd got want
    for req in 'GET /bench-forwarded HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 192.0.2.66\r\nX-Forwarded-Host: evil\r\nConnection: close\r\n\r\n' \
        'GET /bench-forwarded HTTP/1.0\r\nX-Forwarded-For: 192.0.2.66\r\nX-Forwarded-Host: evil\r\n\r\n'; do
        if [[ $req = *Host:\ localhost* ]]; then
            want='xff=127.0.0.1 proto=https xfh=localhost fwd=for=127.0.0.1;proto=https;host="localhost"'
        else
            want='xff=127.0.0.1 proto=https xfh= fwd=for=127.0.0.1;proto=https'
        fi
        # shellcheck disable=SC2059 # the request is the format: its \r\n are printf's escapes
        printf "$req" | timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername localhost \
            -CAfile "$CA" -ign_eof -quiet >"$out" 2>&1 || true
        got=$(tr -d '\r' <"$out" | grep '^xff=' || true)
        [[ $got = "$want" ]] ||
            die "$s: forwarding headers differ from the others' (${req%%\\r*}): the backend saw '$got', want '$want'"
    done
    # HTTP/2: the host comes from :authority (with the port, as curl sends it).
    got=$(timeout 10 curl -s --http2 --cacert "$CA" --resolve "localhost:$port:127.0.0.1" \
        -H 'X-Forwarded-For: 192.0.2.66' -H 'X-Forwarded-Host: evil' \
        -w '%{http_version}\n' "https://localhost:$port/bench-forwarded" 2>&1 || true)
    want="xff=127.0.0.1 proto=https xfh=localhost:$port fwd=for=127.0.0.1;proto=https;host=\"localhost:$port\""
    [[ $(sed -n 2p <<<"$got") = 2 && $(sed -n 1p <<<"$got") = "$want" ]] ||
        die "$s: forwarding headers over HTTP/2 differ from the others': the backend saw '$(tr '\n' ' ' <<<"$got")', want '$want' over HTTP/2"
}
verify() {
    local s=$1 port=${PORT[$1]} out=$TMP/verify-$1 g want
    rm -f "$out.sess"
    sclient "$port" "$out.default" -sess_out "$out.sess" ||
        die "$s: TLS connection with openssl s_client failed: $(tail -n 5 "$out.default")"
    grep -q 'New, TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256' "$out.default" ||
        die "$s: expected TLSv1.3 with TLS_AES_128_GCM_SHA256 (server preference over the client's AES-256 first), got: $(grep 'Cipher is' "$out.default")"
    grep -q 'Verify return code: 0 (ok)' "$out.default" ||
        die "$s: certificate chain does not verify against $CA: $(grep 'Verify return' "$out.default")"
    grep -q 'Server Temp Key: X25519' "$out.default" ||
        die "$s: default client (X25519 key share) did not get X25519: $(grep 'Temp Key' "$out.default")"
    { grep -q '^HTTP/1\.[01] 200' "$out.default" && grep -q '^ok' "$out.default"; } ||
        die "$s: response is not '200 ... ok': $(grep -A8 '^HTTP/' "$out.default" | sed -n 1,8p)"
    # The bare loop answers itself in both modes: it is the no-proxying reference.
    local proxied=0
    [[ $MODE = proxy && $s != bare ]] && proxied=1
    if ((proxied)) && ! grep -qi '^X-Bench-Backend: 1' "$out.default"; then
        die "$s: the response did not come from the backend (no X-Bench-Backend header): $(grep -A8 '^HTTP/' "$out.default" | sed -n 1,8p)"
    fi
    ((proxied)) && forwarded "$s"
    if grep -q 'New Session Ticket' "$out.default" || [[ -e $out.sess ]]; then
        die "$s issues TLS 1.3 session tickets (policy not equivalent): $(grep -c 'New Session Ticket' "$out.default") NewSessionTicket message(s)"
    fi
    for g in X25519 P-256 P-384; do
        case $g in X25519) want='X25519' ;; P-256) want='prime256v1' ;; P-384) want='secp384r1' ;; esac
        sclient "$port" "$out.$g" -groups "$g" ||
            die "$s: handshake with only group $g offered failed: $(tail -n 3 "$out.$g")"
        grep -q "Server Temp Key: .*$want" "$out.$g" ||
            die "$s: group $g not negotiated: $(grep 'Temp Key' "$out.$g")"
    done
    if sclient "$port" "$out.ffdhe" -groups ffdhe2048 && grep -q 'Cipher is TLS' "$out.ffdhe"; then
        die "$s accepts FFDHE (ffdhe2048): policy not equivalent"
    fi
    if sclient "$port" "$out.tls12" -tls1_2 && grep -q 'Cipher is [A-Z]' "$out.tls12"; then
        die "$s accepts TLS 1.2: policy not equivalent"
    fi
    # HTTP/2 by ALPN, with h2load itself (the keep-alive load below).
    timeout 10 h2load -n 4 -c 1 -m 2 "https://127.0.0.1:$port/" >"$out.h2" 2>&1 ||
        die "$s: h2load -n 4 failed: $(tail -n 5 "$out.h2")"
    { grep -q '^Application protocol: h2' "$out.h2" && grep -q ' 4 succeeded, 0 failed, 0 errored' "$out.h2" &&
        grep -q '^status codes: 4 2xx' "$out.h2"; } ||
        die "$s: HTTP/2 check with h2load failed: $(grep -E '^(Application|requests|status)' "$out.h2")"
    log "$s: policy OK (TLS 1.3 only; AES-128-GCM chosen over the client's order; X25519/P-256/P-384 yes, FFDHE no; no ticket; chain verifies; 200 ok$( ((proxied)) && echo ' from the backend, the same forwarding headers'); h2 by ALPN)"
}
for s in "${SERVERS[@]}"; do verify "$s"; done

# ---------------------------------------------------------------------------------------------
# 5. Measure.
# ---------------------------------------------------------------------------------------------
cpu_ticks() { # pids... -> "utime stime" (clock ticks, all threads)
    local u=0 st=0 p rest f
    for p; do
        rest=$(<"/proc/$p/stat") || die "process $p is gone"
        rest=${rest##*) }
        read -r -a f <<<"$rest"
        u=$((u + f[11]))
        st=$((st + f[12]))
    done
    echo "$u $st"
}
cpu_busy() { # CPU n -> "busy total" ticks from /proc/stat (busy includes irq, softirq, steal)
    awk -v c="cpu$1" '$1 == c {b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6}' /proc/stat
}
child_ticks() { # utime+stime of this shell's reaped children (cutime+cstime), without forking
    local line f
    read -r line <"/proc/$$/stat"
    read -r -a f <<<"${line##*) }"
    echo $((f[13] + f[14]))
}
eph_counter() { # metric name -> sum over label sets, from ephemera's admin /metrics
    local body
    body=$(
        exec 3<>"/dev/tcp/127.0.0.1/$ADMIN_PORT"
        printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        cat <&3
    ) || die "cannot read ephemera metrics on 127.0.0.1:$ADMIN_PORT"
    awk -v m="$1" '($1 == m || index($1, m "{") == 1) {s += $NF} END {printf "%d\n", s}' <<<"$body"
}
pct() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%d\n", (b > 0 ? 100 * a / b + 0.5 : 0)}'; }
wait_quiet() { # until the server and client CPUs were < MAX_BUSY % busy for 2 s
    [[ -n $MAX_BUSY ]] || return 0
    local waited=0 a0 at0 b0 bt0 a1 at1 b1 bt1 pa pb
    while :; do
        read -r a0 at0 < <(cpu_busy "$SERVER_CPU")
        read -r b0 bt0 < <(cpu_busy "$CLIENT_CPU")
        sleep 2
        read -r a1 at1 < <(cpu_busy "$SERVER_CPU")
        read -r b1 bt1 < <(cpu_busy "$CLIENT_CPU")
        pa=$(pct $((a1 - a0)) $((at1 - at0)))
        pb=$(pct $((b1 - b0)) $((bt1 - bt0)))
        ((pa < MAX_BUSY && pb < MAX_BUSY)) && return 0
        ((waited < LOAD_WAIT)) || { log "CPUs still busy ($pa% / $pb%) after ${LOAD_WAIT}s; measuring anyway"; return 0; }
        ((waited % 30 == 0)) && log "waiting for a quiet machine: CPU $SERVER_CPU $pa% busy, CPU $CLIENT_CPU $pb% busy (MAX_BUSY=$MAX_BUSY); load $(cut -d' ' -f1-3 /proc/loadavg)"
        waited=$((waited + 2))
    done
}

# One results file per client: $TMP/results-CLIENT.tsv, one line per measurement:
#  1 round, 2 server, 3 count (handshakes, or requests for h2load and loadgen-requests),
#  4 start, 5 end (s),
#  6 server utime, 7 server stime, 8 client ticks (all ticks), 9 other % CPU server,
# 10 other % CPU client, 11 load 1m, 12 CLK_TCK, 13 flag (! = busy), 14 client-observed rate
# (per s), 15 client-observed latency (ms: loadgen p99 of a whole connection, h2load mean per
# request, loadgen-requests p99 per request, "-" for s_time), 16 backend ticks.
for c in $CLIENTS; do : >"$TMP/results-$c.tsv"; done
json_get() { # file key.path... -> value (python3)
    python3 - "$@" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    d = d.get(k, {}) if isinstance(d, dict) else {}
print(d if not isinstance(d, dict) else "")
PYEOF
}
# Runs one client against port, writing its output to out. Dies if the client fails. Only
# this runs inside the measurement window: the parsing below starts processes of its own
# (python3, awk) that run on whichever CPU is free, often the server's.
run_client() { # client server port out
    local c=$1 s=$2 port=$3 out=$4
    case $c in
    s_time)
        taskset -c "$CLIENT_CPU" openssl s_time -connect "127.0.0.1:$port" -new -time "$DURATION" -www / >"$out" 2>&1 ||
            die "$s: openssl s_time failed: $(tail -n 5 "$out")"
        ;;
    loadgen)
        taskset -c "$CLIENT_CPU" "$EPH" loadgen "https://localhost:$port/" --mode handshake \
            -c "$LG_CONNS" -d "${DURATION}s" --alpn "$LG_ALPN" --insecure --json >"$out" 2>"$out.err" ||
            die "$s: ephemera loadgen failed: $(tail -n 5 "$out.err")"
        ;;
    h2load)
        taskset -c "$CLIENT_CPU" h2load -c "$H2_CONNS" -m "$H2_STREAMS" -D "$DURATION" "https://127.0.0.1:$port/" >"$out" 2>&1 ||
            die "$s: h2load failed: $(tail -n 5 "$out")"
        ;;
    loadgen-requests)
        taskset -c "$CLIENT_CPU" "$EPH" loadgen "https://localhost:$port/" --mode requests --alpn h2 \
            -c "$H2_CONNS" --streams "$H2_STREAMS" -d "${DURATION}s" --insecure --json >"$out" 2>"$out.err" ||
            die "$s: ephemera loadgen --mode requests failed: $(tail -n 5 "$out.err")"
        ;;
    esac
}
# Reads a client's output; sets COUNT, RATE, LAT and HS (the handshakes the client made,
# which ephemera's own counter must match) (globals). Dies on any failed, errored, resumed or
# non-2xx request, or on a protocol other than the one asked for.
parse_client() { # client server out
    local c=$1 s=$2 out=$3 resumed errs alpn_count
    case $c in
    s_time)
        COUNT=$({ grep -Eo '^[0-9]+ connections in [0-9.]+s;' "$out" || true; } | sed -n '1s/ .*//p')
        [[ -n $COUNT && $COUNT -gt 0 ]] || die "$s: cannot parse the connection count from s_time: $(tail -n 3 "$out")"
        # s_time prints one character per connection: '*' new session, 'r' resumed.
        resumed=$({ grep -E '^[*r3t]+$' "$out" || true; } | tr -cd 'r' | wc -c)
        ((resumed == 0)) || die "$s: $resumed of $COUNT s_time connections were resumed"
        RATE=- LAT=- HS=$COUNT
        ;;
    loadgen | loadgen-requests)
        local want=$LG_ALPN ok2xx hs_rate req_rate p99
        [[ $c = loadgen-requests ]] && want=h2
        # One read of the report (the ALPN name "http/1.1" has a dot, which json_get splits on).
        read -r COUNT HS errs resumed ok2xx alpn_count hs_rate req_rate p99 < <(python3 - "$out" "$want" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["requests"], d["handshakes"], d["errors"]["total"], d["resumed_handshakes"],
      d["status"].get("2xx", 0), d["negotiated"]["alpn"].get(sys.argv[2], 0),
      d["handshakes_per_s"], d["requests_per_s"], d["latency_us"]["request"]["p99"])
PYEOF
        ) || die "$s: cannot read $c's report: $(head -c 600 "$out")"
        [[ $COUNT =~ ^[0-9]+$ && $COUNT -gt 0 ]] || die "$s: $c reported no requests: $(head -c 600 "$out")"
        ((errs == 0)) || die "$s: $c saw $errs errors: $(json_get "$out" errors.by_kind)"
        ((resumed == 0)) || die "$s: $c saw $resumed resumed handshakes"
        [[ $ok2xx = "$COUNT" ]] || die "$s: not every $c response was 2xx: $(json_get "$out" status)"
        [[ $alpn_count = "$HS" ]] || die "$s: only $alpn_count of $HS $c connections negotiated $want"
        if [[ $c = loadgen ]]; then
            # Handshake mode: one request per connection, counted per handshake.
            [[ $HS = "$COUNT" ]] || die "$s: loadgen made $HS handshakes for $COUNT requests"
            RATE=$hs_rate
            LAT=$(awk -v u="$p99" 'BEGIN {printf "%.2f", u / 1000}')
        else
            RATE=$req_rate
            LAT=$(awk -v u="$p99" 'BEGIN {printf "%.3f", u / 1000}')
        fi
        ;;
    h2load)
        grep -q '^Application protocol: h2' "$out" || die "$s: h2load did not negotiate h2: $(grep -E '^(Application|requests)' "$out")"
        COUNT=$(awk '/^requests: / {print $8}' "$out")
        errs=$(awk '/^requests: / {print $10 + $12 + $14}' "$out")
        [[ $COUNT =~ ^[0-9]+$ && $COUNT -gt 0 ]] || die "$s: cannot parse h2load's request count: $(grep '^requests' "$out")"
        ((errs == 0)) || die "$s: h2load requests failed/errored/timed out: $(grep '^requests' "$out")"
        grep -q "^status codes: $COUNT 2xx" "$out" || die "$s: not every h2load response was 2xx: $(grep '^status' "$out")"
        RATE=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$out")
        HS=$H2_CONNS
        LAT=$(awk '/^time for request:/ {v = $6; if (v ~ /us$/) {sub("us", "", v); v /= 1000} else if (v ~ /ms$/) sub("ms", "", v); else if (v ~ /s$/) {sub("s", "", v); v *= 1000}; printf "%.2f", v}' "$out")
        ;;
    esac
}

# One measurement; appends a line to the client's results. Returns 1 if other processes used
# more than MAX_BUSY % of the server or client CPU meanwhile (the caller may measure again).
measure_once() { # client round server retries-left
    local c=$1 r=$2 s=$3 left=$4 port=${PORT[$3]} out=$TMP/$1-$3-$2.out flag=""
    local u0 s0 u1 s1 a0 at0 a1 at1 b0 bt0 b1 bt1 c0 c1 w0 w1 load k0=0 k1=0
    local hs0=0 hs1=0 rs0=0 rs1=0 oa ob
    wait_quiet
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [[ $s = ephemera ]]; then
        hs0=$(eph_counter ephemera_tls_handshakes_total)
        rs0=$(eph_counter ephemera_tls_resumed_handshakes_total)
    fi
    # shellcheck disable=SC2086
    [[ -z $BACKEND_PIDS ]] || read -r k0 < <(cpu_ticks $BACKEND_PIDS | awk '{print $1 + $2}')
    # shellcheck disable=SC2086
    read -r u0 s0 < <(cpu_ticks ${PIDS[$s]})
    read -r a0 at0 < <(cpu_busy "$SERVER_CPU")
    read -r b0 bt0 < <(cpu_busy "$CLIENT_CPU")
    w0=$(date +%s.%N)
    c0=$(child_ticks)
    run_client "$c" "$s" "$port" "$out"
    c1=$(child_ticks)
    w1=$(date +%s.%N)
    read -r a1 at1 < <(cpu_busy "$SERVER_CPU")
    read -r b1 bt1 < <(cpu_busy "$CLIENT_CPU")
    # shellcheck disable=SC2086
    read -r u1 s1 < <(cpu_ticks ${PIDS[$s]})
    # shellcheck disable=SC2086
    [[ -z $BACKEND_PIDS ]] || read -r k1 < <(cpu_ticks $BACKEND_PIDS | awk '{print $1 + $2}')
    parse_client "$c" "$s" "$out"
    if [[ $s = ephemera ]]; then
        hs1=$(eph_counter ephemera_tls_handshakes_total)
        rs1=$(eph_counter ephemera_tls_resumed_handshakes_total)
        ((rs1 == rs0)) || die "ephemera counted $((rs1 - rs0)) resumed handshakes"
        # A mismatch would put the wrong count under the CPU per handshake.
        ((hs1 - hs0 == HS)) ||
            die "ephemera counted $((hs1 - hs0)) handshakes during the $c run, the client $HS"
    fi
    # Other processes' share of each CPU: busy ticks minus ours (server on one, client and
    # backend on the other; the few ticks of date/cut in the window count as "other").
    oa=$(pct $((a1 - a0 - (u1 - u0) - (s1 - s0))) $((at1 - at0)))
    ob=$(pct $((b1 - b0 - (c1 - c0) - (k1 - k0))) $((bt1 - bt0)))
    ((oa < 0)) && oa=0
    ((ob < 0)) && ob=0
    local busy=0
    if [[ -n $MAX_BUSY ]] && ((oa >= MAX_BUSY || ob >= MAX_BUSY)); then
        busy=1
        ((left > 0)) || flag="!"
    fi
    if ((busy == 0 || left == 0)); then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$s" "$COUNT" "$w0" "$w1" \
            "$((u1 - u0))" "$((s1 - s0))" "$((c1 - c0))" "$oa" "$ob" "$load" "$CLK_TCK" "$flag" "$RATE" "$LAT" \
            "$((k1 - k0))" >>"$TMP/results-$c.tsv"
    fi
    awk -v cl="$c" -v r="$r" -v s="$s" -v c="$COUNT" -v w="$(awk -v a="$w0" -v b="$w1" 'BEGIN {print b - a}')" \
        -v u="$((u1 - u0))" -v y="$((s1 - s0))" -v ct="$((c1 - c0))" -v hz="$CLK_TCK" -v oa="$oa" -v ob="$ob" -v l="$load" \
        -v rate="$RATE" -v lat="$LAT" 'BEGIN {
        us = 1e6 / hz
        printf "%-7s round %s %-8s %7d x %6.0f/s  server %6.1f us each (user %.1f, sys %.1f)  client %6.1f us each  rate %s  latency %s ms  other procs: %d%% / %d%%  load %s\n",
            cl, r, s, c, c / w, (u + y) * us / c, u * us / c, y * us / c, ct * us / c, rate, lat, oa, ob, l }' >&2
    if ((busy)) && ((left > 0)); then
        log "other processes used ${oa}% / ${ob}% of CPU $SERVER_CPU / $CLIENT_CPU (MAX_BUSY=$MAX_BUSY): measuring $s again"
        return 1
    fi
    return 0
}
measure() { # client round server
    local left=$RETRIES
    until measure_once "$1" "$2" "$3" "$left"; do left=$((left - 1)); done
}

# Warm up each server (page faults, allocator, first-use paths, backend pools), not measured.
for s in "${SERVERS[@]}"; do
    taskset -c "$CLIENT_CPU" openssl s_time -connect "127.0.0.1:${PORT[$s]}" -new -time 1 -www / >/dev/null 2>&1 ||
        die "$s: warm-up s_time failed"
    taskset -c "$CLIENT_CPU" h2load -c "$H2_CONNS" -m "$H2_STREAMS" -D 1 "https://127.0.0.1:${PORT[$s]}/" >/dev/null 2>&1 ||
        die "$s: warm-up h2load failed"
done

START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "measuring ($MODE mode): $ROUNDS round(s) x ${#SERVERS[@]} servers x clients ($CLIENTS) x ${DURATION}s; load now: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= ROUNDS; r++)); do
    # Rotate the order each round so slow drifts in background load do not favour one server.
    for ((k = 0; k < ${#SERVERS[@]}; k++)); do
        for c in $CLIENTS; do
            measure "$c" "$r" "${SERVERS[$(((k + r - 1) % ${#SERVERS[@]}))]}"
        done
    done
done

# ---------------------------------------------------------------------------------------------
# 6. Report (markdown).
# ---------------------------------------------------------------------------------------------
MODEL=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | sed -n 1p)
NGINX_V=$(nginx -v 2>&1 | sed 's/^nginx version: //')
HAPROXY_V=$(haproxy -v 2>&1 | awk 'NR == 1 {print $1, $3}')
EPH_V=$("$EPH" --version 2>&1 | sed -n 1p)
if [[ -z ${EPHEMERA_BIN:-} ]]; then
    EPH_V="$EPH_V (tree $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown))"
fi
OPENSSL_V=$(openssl version)

CMD="DURATION=$DURATION ROUNDS=$ROUNDS"
[[ $MODE != proxy ]] && CMD="MODE=$MODE $CMD"
[[ $BARE != 1 ]] && CMD="BARE=$BARE $CMD"
[[ -n $MAX_BUSY ]] && CMD="$CMD MAX_BUSY=$MAX_BUSY"
[[ $CLIENTS != "$DEFAULT_CLIENTS" ]] && CMD="CLIENTS=\"$CLIENTS\" $CMD"
[[ $LG_CONNS != 8 ]] && CMD="LG_CONNS=$LG_CONNS $CMD"
[[ $LG_ALPN != h2 ]] && CMD="LG_ALPN=$LG_ALPN $CMD"
[[ $H2_CONNS != 8 || $H2_STREAMS != 10 ]] && CMD="H2_CONNS=$H2_CONNS H2_STREAMS=$H2_STREAMS $CMD"
if [[ $MODE = proxy ]]; then
    MODE_TEXT="**proxy mode**: each server proxies every request to the same plain-HTTP/1.1 backend (a separate nginx $NGINX_NUM answering \"ok\", pinned to CPU $CLIENT_CPU with the client) over pooled keep-alive connections (ephemera upstream pool; nginx \`keepalive $NGINX_KEEPALIVE\`; HAProxy \`http-reuse always\`)"
else
    MODE_TEXT="**respond mode**: each server answers \"ok\" itself (no backend)"
fi
if [[ $BARE = 1 ]]; then
    MODE_TEXT="$MODE_TEXT; **bare**: the bare loop (\`benches/bare_loop.rs\`: tokio-rustls + hyper-util's HTTP/1.1 + HTTP/2 builder with ephemera's TLS policy, one current-thread runtime, the system allocator), which answers \"ok\" itself in both modes: the reference the handshake target is stated against (\"the full proxy no heavier than that bare loop\")"
fi
report_client() { # client
    local c=$1 rf=$TMP/results-$1.tsv unit title load latname
    case $c in
    s_time)
        unit=handshake
        title="TLS 1.3 full handshake, \`openssl s_time\`: server CPU per connection"
        load="\`openssl s_time -connect 127.0.0.1:PORT -new -time $DURATION -www /\`, one connection at a time: new TCP connection, full handshake (X25519, TLS_AES_128_GCM_SHA256, ECDSA P-256, no ALPN), GET / over HTTP/1.0, close"
        latname="client latency"
        ;;
    loadgen)
        unit=handshake
        title="TLS 1.3 full handshake, \`ephemera loadgen\`: server CPU per connection"
        if [[ $LG_ALPN = h2 ]]; then
            lg_req="ALPN h2), one GET / over HTTP/2, close"
        else
            lg_req="ALPN http/1.1), one GET / over HTTP/1.1 with Connection: close, close"
        fi
        load="\`ephemera loadgen https://localhost:PORT/ --mode handshake -c $LG_CONNS -d ${DURATION}s --alpn $LG_ALPN --insecure --json\`: $LG_CONNS concurrent connections, each a new TCP connection, full handshake (X25519, TLS_AES_128_GCM_SHA256, ECDSA P-256, $lg_req; rate and p99 as loadgen observed them (p99 of the whole connection: connect + handshake + request)"
        latname="client p99 ms/conn"
        ;;
    h2load)
        unit=request
        title="Keep-alive HTTP/2 requests, \`h2load\`: server CPU per request"
        load="\`h2load -c $H2_CONNS -m $H2_STREAMS -D $DURATION https://127.0.0.1:PORT/\`: $H2_CONNS TLS 1.3 connections (opened once), $H2_STREAMS concurrent streams each, GET /; rate and mean time per request as h2load observed them (h2load gives no percentiles)"
        latname="client mean ms/req"
        ;;
    loadgen-requests)
        unit=request
        title="Keep-alive HTTP/2 requests, \`ephemera loadgen --mode requests\`: server CPU per request"
        load="\`ephemera loadgen https://localhost:PORT/ --mode requests --alpn h2 -c $H2_CONNS --streams $H2_STREAMS -d ${DURATION}s --insecure --json\`: $H2_CONNS TLS 1.3 connections (opened once), $H2_STREAMS concurrent streams each, GET /; rate and p99 per request as loadgen observed them (a heavier client than h2load: the server is less busy, and batches less, than under h2load)"
        latname="client p99 ms/req"
        ;;
    esac
    [[ -s $rf ]] || return 0
    echo
    echo "### $title ($MODE mode)"
    echo
    echo "- load: $load"
    echo
    echo "| round | server | ${unit}s | client ${unit}s/s | $latname | server user µs/$unit | server sys µs/$unit | **server total µs/$unit** | server CPU busy | client µs/$unit | backend µs/$unit | other procs on CPU $SERVER_CPU / $CLIENT_CPU | load 1m |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{
        c = $3; w = $5 - $4; us = 1e6 / $12; mine = $6 + $7
        rate = ($14 == "-" ? sprintf("%.0f", c / w) : sprintf("%.0f", $14))
        printf "| %s | %s%s | %d | %s | %s | %.1f | %.1f | **%.1f** | %.0f%% | %.1f | %.1f | %d%% / %d%% | %s |\n",
            $1, $2, $13, c, rate, $15, $6 * us / c, $7 * us / c, mine * us / c, 100 * mine * us / 1e6 / w,
            $8 * us / c, $16 * us / c, $9, $10, $11 }' "$rf"
    if grep -q $'\t!\t' "$rf"; then
        echo
        echo "\`!\`: other processes used at least MAX_BUSY=$MAX_BUSY% of a CPU during this measurement, even after $RETRIES retries; left out of the summary below unless the server has no other row."
    fi
    echo
    echo "| server | **server total µs/$unit**, all rounds (min–max of rounds) | **ratio to ephemera** | server user / sys µs/$unit | client ${unit}s/s (mean of rounds) | $latname (mean of rounds) |"
    echo "|---|---:|---:|---:|---:|---:|"
    # Rows marked ! count only for a server that has no unmarked row.
    awk -F'\t' 'NR == FNR { if ($13 == "") clean[$2] = 1; next }
    $13 == "" || !($2 in clean) {
        s = $2; us = 1e6 / $12; v = ($6 + $7) * us / $3
        ticks[s] += $6 + $7; ut[s] += $6; st[s] += $7; conns[s] += $3; scale[s] = us; n[s]++
        rate[s] += ($14 == "-" ? $3 / ($5 - $4) : $14)
        if ($15 != "-") { lat[s] += $15; nl[s]++ }
        if (!(s in lo) || v < lo[s]) lo[s] = v
        if (!(s in hi) || v > hi[s]) hi[s] = v
    } END {
        k = split("ephemera nginx haproxy bare", order, " ")
        base = (conns["ephemera"] > 0 ? ticks["ephemera"] * scale["ephemera"] / conns["ephemera"] : 0)
        for (i = 1; i <= k; i++) {
            s = order[i]
            if (!(s in conns)) continue
            m = ticks[s] * scale[s] / conns[s]
            printf "| %s | **%.1f** (%.1f–%.1f) | **%.2f** | %.1f / %.1f | %.0f | %s |\n", s, m, lo[s], hi[s],
                (base > 0 ? m / base : 0), ut[s] * scale[s] / conns[s], st[s] * scale[s] / conns[s],
                rate[s] / n[s], (nl[s] ? sprintf("%.2f", lat[s] / nl[s]) : "-")
        }
    }' "$rf" "$rf"
    echo
    awk -F'\t' '{ v[$1, $2] = ($6 + $7) / $3; if ($1 > R) R = $1; if ($13 != "") busy[$1] = 1 } END {
        printf "Per-round ratios of server CPU:"
        for (r = 1; r <= R; r++) {
            e = v[r, "ephemera"]
            if (e > 0) printf " round %d: nginx/ephemera %.2f, haproxy/ephemera %.2f%s%s", r,
                v[r, "nginx"] / e, v[r, "haproxy"] / e,
                ((r, "bare") in v ? sprintf(", bare/ephemera %.2f", v[r, "bare"] / e) : ""), (r < R ? ";" : "")
            if (r in busy) continue
            if (e > 0 && v[r, "nginx"] > 0) ng[++nn] = e / v[r, "nginx"]
            if (e > 0 && v[r, "haproxy"] > 0) hp[++nh] = e / v[r, "haproxy"]
            if (e > 0 && v[r, "bare"] > 0) ba[++nb] = e / v[r, "bare"]
        }
        printf ".\n"
        # Each round measures the servers within a minute of each other: the median of the
        # per-round ratios is less moved by a slow minute of the host than the sums above.
        # Rounds with a row marked ! (other processes over MAX_BUSY) are left out of it.
        if (nn && nh) printf "\nMedian of the per-round ratios (%d round(s) without a ! row): ephemera at **%.2f×** nginx'"'"'s and **%.2f×** HAProxy'"'"'s server CPU per %s%s.\n", nn, median(ng, nn), median(hp, nh), unit, (nb ? sprintf(", and at **%.2f×** the bare loop'"'"'s", median(ba, nb)) : "")
        else printf "\nNo round without a ! row: no median.\n" }
    function median(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }' unit="$unit" "$rf"
}
{
    echo
    echo "## ephemera vs nginx vs HAProxy$([[ $BARE = 1 ]] && echo ' (and the bare loop)'): server CPU ($MODE mode)"
    echo
    echo "- date: $START_DATE; command: \`$CMD bash benches/compare.sh\`"
    echo "- machine: nproc=$NCPU, ${MODEL:-unknown CPU}, kernel $(uname -r); servers pinned to CPU $SERVER_CPU, clients$([[ $MODE = proxy ]] && echo ' and backend') to CPU $CLIENT_CPU; CLK_TCK=$CLK_TCK; load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- software: $EPH_V; $NGINX_V; $HAPROXY_V; $OPENSSL_V (s_time, and the library of nginx and HAProxy); $(h2load --version 2>&1 | sed -n 1p)"
    echo "- $MODE_TEXT"
    for c in $CLIENTS; do report_client "$c"; done
}
