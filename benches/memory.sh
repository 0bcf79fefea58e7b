#!/usr/bin/env bash
# Memory per idle TLS 1.3 connection: ephemera vs nginx vs HAProxy, HTTP/1.1 and HTTP/2.
#
#   bash benches/memory.sh                 # N=5000
#   N=2000 HOLD=10 bash benches/memory.sh
#
# For each server and each protocol, a fresh server process is started (same policy and
# certificate as benches/compare.sh: TLS 1.3 only, X25519/P-256/P-384, AES-128-GCM first in
# server order, no tickets, no session cache, ECDSA P-256 chain from `ephemera certs`), warmed
# up with a few connections, and its resident memory read (sum of Rss from
# /proc/PID/smaps_rollup over its processes: nginx master + worker). Then
# benches/hold_connections.py opens N TLS 1.3 connections (full handshakes, ALPN http/1.1 with
# one keep-alive request answered, or ALPN h2 with the preface and SETTINGS exchanged) and
# holds them idle; after HOLD seconds the RSS is read again. (after - before) / N is the
# server's memory per idle connection. Kernel socket buffers are not part of RSS and are not
# counted (the same for all three servers). See benches/README.md.
#
# Environment:
#   N=5000             connections held per measurement
#   HOLD=5             seconds the connections stay idle before RSS is read again
#   CONCURRENCY=100    handshakes in flight in the client while opening
#   SERVER_CPU=0       CPU the servers are pinned to (taskset), CLIENT_CPU=1 the client
#   SERVERS="ephemera nginx haproxy"   which servers to measure (any subset)
#   EPHEMERA_BIN=      use this binary instead of building (cargo build --release --locked)
#   CARGO_TARGET_DIR   respected by the build
#   KEEP_TMP=1         keep the temporary directory (configs, logs)
set -euo pipefail

N=${N:-5000}
HOLD=${HOLD:-5}
CONCURRENCY=${CONCURRENCY:-100}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
KEEP_TMP=${KEEP_TMP:-0}
SUITES=TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
read -r -a SERVERS <<< "${SERVERS:-ephemera nginx haproxy}"
PROTOS=(h1 h2)

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf '\nmemory.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $N =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
[[ $HOLD =~ ^[0-9]+$ ]] || die "HOLD must be an integer (seconds), got '$HOLD'"
[[ $CONCURRENCY =~ ^[1-9][0-9]*$ ]] || die "CONCURRENCY must be a positive integer, got '$CONCURRENCY'"

# ---------------------------------------------------------------------------------------------
# 1. Tools (Debian/Ubuntu packages; services the packages enable are stopped and disabled).
# ---------------------------------------------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
command -v taskset >/dev/null || need+=(util-linux)
command -v ss >/dev/null || need+=(iproute2)
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
for c in nginx haproxy openssl python3 taskset ss awk; do
    command -v "$c" >/dev/null || die "'$c' not found after installation"
done
python3 -c 'import ssl, asyncio; assert ssl.HAS_TLSv1_3 and ssl.HAS_ALPN' 2>/dev/null ||
    die "python3's ssl module lacks TLS 1.3 or ALPN"
NCPU=$(nproc)
((SERVER_CPU < NCPU && CLIENT_CPU < NCPU)) ||
    die "SERVER_CPU=$SERVER_CPU / CLIENT_CPU=$CLIENT_CPU do not exist (nproc=$NCPU)"

# File descriptors: the client holds N sockets, each server N + a few. Children inherit ours.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
FDS=$(ulimit -n)
((FDS > N + 100)) || die "open-file limit $FDS is too low for N=$N connections (raise it: ulimit -n)"
# Connection limits of the servers: N plus headroom, within what the fd limit allows (HAProxy
# wants about 2 fds per connection and refuses to start when maxconn needs more than the limit).
MAXCONN=$((N + 1000))
((2 * MAXCONN + 100 <= FDS)) || MAXCONN=$(((FDS - 100) / 2))
((MAXCONN >= N + 10)) || die "open-file limit $FDS is too low for N=$N (HAProxy needs about 2 per connection)"

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

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ephemera-memory.XXXXXX")
RUNNING_PID=""
CLIENT_PID=""

stop_server() {
    local p=$RUNNING_PID
    [[ -n $p ]] || return 0
    RUNNING_PID=""
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -z $CLIENT_PID ]] || kill -TERM "$CLIENT_PID" 2>/dev/null || true
    stop_server
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
pick_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 30000))
        port_in_use "$p" || break
    done
    echo "$p"
}
PORT=$(pick_port)
ADMIN_PORT=$(pick_port)
[[ $ADMIN_PORT != "$PORT" ]] || ADMIN_PORT=$((PORT + 1))

log "certificates: $EPH certs --out $TMP/certs"
"$EPH" certs --out "$TMP/certs" >"$TMP/certs.log" 2>&1 || die "ephemera certs failed (see $TMP/certs.log)"
CRT=$TMP/certs/localhost.crt
KEY=$TMP/certs/localhost.key
CA=$TMP/certs/ca.crt
openssl x509 -in "$CRT" -noout -text | grep -q 'ASN1 OID: prime256v1' ||
    die "$CRT is not an ECDSA P-256 certificate"
cat "$CRT" "$KEY" >"$TMP/haproxy.pem"

# All three listen on the same port, one at a time. Idle timeouts are raised well above the
# time the measurement takes (N handshakes + HOLD), so no server closes an idle connection.
IDLE=600
cat >"$TMP/ephemera.yaml" <<EOF
admin:
  bind: 127.0.0.1:$ADMIN_PORT
shutdown_grace: 1s
listeners:
  - name: bench
    bind: 127.0.0.1:$PORT
    max_connections: $MAXCONN
    tls:
      certificates:
        - { cert: $CRT, key: $KEY }
      groups: [x25519, secp256r1, secp384r1]
    http:
      idle_timeout: ${IDLE}s
      access_log: false
    routes:
      - { host: "*", path_prefix: /, respond: { status: 200, body: "ok\n" } }
EOF

# nginx 1.22: HTTP/2 through "listen ... http2" (ALPN h2, http/1.1). keepalive_timeout bounds
# idle HTTP/1.1 and HTTP/2 connections.
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $((MAXCONN * 2));
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections $MAXCONN; }
http {
    access_log off;
    default_type text/plain;
    keepalive_timeout ${IDLE}s;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$PORT ssl http2;
        ssl_certificate $CRT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.3;
        ssl_ecdh_curve X25519:prime256v1:secp384r1;
        ssl_conf_command Ciphersuites $SUITES;
        ssl_prefer_server_ciphers on;
        ssl_session_tickets off;
        ssl_session_cache off;
        ssl_conf_command NumTickets 0;
        location / { return 200 "ok\n"; }
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
cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $MAXCONN
    tune.ssl.cachesize 0
    ssl-default-bind-ciphersuites $SUITES
    ssl-default-bind-curves X25519:P-256:P-384
    ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets
defaults
    mode http
    maxconn $MAXCONN
    timeout connect 5s
    timeout client ${IDLE}s
    timeout http-keep-alive ${IDLE}s
    timeout server 30s
frontend bench
    bind 127.0.0.1:$PORT ssl crt $TMP/haproxy.pem alpn h2,http/1.1
    http-request return status 200 content-type text/plain string "ok"
EOF

"$EPH" check --config "$TMP/ephemera.yaml" >"$TMP/ephemera-check.log" 2>&1 ||
    die "ephemera check rejected the config: $(cat "$TMP/ephemera-check.log")"
nginx -t -p "$TMP/nginx/" -c "$TMP/nginx.conf" -e "$TMP/nginx-error.log" >"$TMP/nginx-check.log" 2>&1 ||
    die "nginx -t rejected the config: $(cat "$TMP/nginx-check.log")"
OPENSSL_CONF=$TMP/haproxy-openssl.cnf haproxy -c -f "$TMP/haproxy.cfg" >"$TMP/haproxy-check.log" 2>&1 ||
    die "haproxy -c rejected the config: $(cat "$TMP/haproxy-check.log")"

# ---------------------------------------------------------------------------------------------
# 3. Helpers: start one server, its processes, their RSS, the connections it holds.
# ---------------------------------------------------------------------------------------------
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
start_server() { # name -> RUNNING_PID, PIDS (nginx: master and worker)
    local s=$1 i
    case $s in
    ephemera) taskset -c "$SERVER_CPU" env EPHEMERA_LOG=warn "$EPH" serve --config "$TMP/ephemera.yaml" >>"$TMP/$s.log" 2>&1 & ;;
    nginx) taskset -c "$SERVER_CPU" nginx -p "$TMP/nginx/" -c "$TMP/nginx.conf" -e "$TMP/nginx-error.log" -g 'daemon off;' >>"$TMP/$s.log" 2>&1 & ;;
    haproxy) taskset -c "$SERVER_CPU" env OPENSSL_CONF="$TMP/haproxy-openssl.cnf" haproxy -db -f "$TMP/haproxy.cfg" >>"$TMP/$s.log" 2>&1 & ;;
    esac
    RUNNING_PID=$!
    for ((i = 0; ; i++)); do
        kill -0 "$RUNNING_PID" 2>/dev/null || die "$s exited at start (log: $(tail -n 5 "$TMP/$s.log" 2>/dev/null))"
        port_in_use "$PORT" && break
        ((i < 100)) || die "$s does not listen on 127.0.0.1:$PORT after 10 s"
        sleep 0.1
    done
    sleep 0.5
    PIDS=$RUNNING_PID
    if [[ $s = nginx ]]; then
        local w
        w=$(children_of "$RUNNING_PID" | tr '\n' ' ')
        [[ -n $w ]] || die "nginx master $RUNNING_PID has no worker process"
        PIDS="$RUNNING_PID ${w% }"
    fi
    local p lim
    for p in $PIDS; do
        lim=$(awk '/^Max open files/ {print $4}' "/proc/$p/limits")
        [[ $lim = unlimited ]] || ((lim > N + 20)) || die "$s (pid $p) may open only $lim files"
    done
}
rss_kib() { # pids... -> sum of Rss (KiB); smaps_rollup is exact, VmRSS may lag on older kernels
    local p sum=0 v
    for p in "$@"; do
        v=$(awk '/^Rss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true)
        [[ -n $v ]] || v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")
        sum=$((sum + v))
    done
    echo "$sum"
}
established() { # connections to the server port in state ESTABLISHED, server side
    ss -Htn state established "( sport = :$PORT )" | wc -l
}

RESULTS=$TMP/results.tsv
: >"$RESULTS"
measure() { # server proto
    local s=$1 proto=$2 before after line ready ok fail took err est t
    start_server "$s"
    # Warm-up (allocator arenas, first-use paths, TLS contexts): 50 connections, closed again.
    taskset -c "$CLIENT_CPU" python3 "$HERE/hold_connections.py" --port "$PORT" --ca "$CA" \
        --proto "$proto" -n 50 --concurrency 10 </dev/null >"$TMP/warmup-$s-$proto.out" 2>&1 ||
        die "$s $proto: warm-up client failed: $(tail -n 5 "$TMP/warmup-$s-$proto.out")"
    read -r ready ok fail _ <"$TMP/warmup-$s-$proto.out"
    [[ $ready = READY && $ok = 50 ]] || die "$s $proto: warm-up failed: $(head -n 1 "$TMP/warmup-$s-$proto.out")"
    for ((t = 0; t < 50 && $(established) > 0; t++)); do sleep 0.1; done
    sleep 1
    # shellcheck disable=SC2086
    before=$(rss_kib $PIDS)

    coproc HOLDER { exec taskset -c "$CLIENT_CPU" python3 "$HERE/hold_connections.py" --port "$PORT" \
        --ca "$CA" --proto "$proto" -n "$N" --concurrency "$CONCURRENCY" 2>"$TMP/client-$s-$proto.log"; }
    CLIENT_PID=$HOLDER_PID
    local rfd=${HOLDER[0]} wfd=${HOLDER[1]}
    IFS= read -r line <&"$rfd" || die "$s $proto: client died: $(tail -n 5 "$TMP/client-$s-$proto.log")"
    read -r ready ok fail took err <<<"$line"
    [[ $ready = READY ]] || die "$s $proto: unexpected client output: $line"
    sleep "$HOLD"
    est=$(established)
    # shellcheck disable=SC2086
    after=$(rss_kib $PIDS)
    { echo close >&"$wfd"; } 2>/dev/null || true
    IFS= read -r line <&"$rfd" 2>/dev/null || true
    wait "$CLIENT_PID" 2>/dev/null || true
    CLIENT_PID=""
    stop_server

    log "$s $proto: $ok established, $fail failed in ${took}s${err:+ (first error: $err)}; server side after ${HOLD}s idle: $est established; RSS $before -> $after KiB: $(awk -v a="$before" -v b="$after" -v n="$ok" 'BEGIN {printf "%.1f", (n > 0 ? (b - a) / n : 0)}') KiB/conn"
    ((ok > 0)) || die "$s $proto: no connection established${err:+ (first error: $err)}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$proto" "$ok" "$fail" "$est" "$before" "$after" >>"$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# 4. Measure: every server with every protocol, each on a fresh process.
# ---------------------------------------------------------------------------------------------
START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
log "measuring: N=$N idle connections, HOLD=${HOLD}s, port $PORT; servers on CPU $SERVER_CPU, client on CPU $CLIENT_CPU; open files $FDS"
for proto in "${PROTOS[@]}"; do
    for s in "${SERVERS[@]}"; do
        measure "$s" "$proto"
    done
done

# ---------------------------------------------------------------------------------------------
# 5. Report (markdown).
# ---------------------------------------------------------------------------------------------
MODEL=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | sed -n 1p)
NGINX_V=$(nginx -v 2>&1 | sed 's/^nginx version: //')
HAPROXY_V=$(haproxy -v 2>&1 | awk 'NR == 1 {print $1, $3}')
EPH_V=$("$EPH" --version 2>&1 | sed -n 1p)
[[ -n ${EPHEMERA_BIN:-} ]] || EPH_V="$EPH_V (tree $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown))"
{
    echo
    echo "### Server memory per idle TLS 1.3 connection"
    echo
    echo "- date: $START_DATE; command: \`N=$N HOLD=$HOLD bash benches/memory.sh\`"
    echo "- machine: nproc=$NCPU, ${MODEL:-unknown CPU}, kernel $(uname -r), $(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo); servers pinned to CPU $SERVER_CPU, client to CPU $CLIENT_CPU"
    echo "- software: $EPH_V; $NGINX_V (1 worker); $HAPROXY_V (nbthread 1); client $(python3 -c 'import ssl, sys; print("Python", sys.version.split()[0], ssl.OPENSSL_VERSION)')"
    echo "- per row: a fresh server, 50 warm-up connections (closed), RSS read, N TLS 1.3 connections opened and held idle ${HOLD}s, RSS read again; **KiB/conn = (RSS after − RSS before) / established**. RSS = sum of Rss in /proc/PID/smaps_rollup (nginx: master + worker). Kernel socket memory is not included."
    echo
    echo "| server | protocol | established (failed) | server-side established after hold | RSS before (KiB) | RSS after (KiB) | **KiB per idle connection** | ratio to ephemera |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' 'NR == FNR { if ($1 == "ephemera") base[$2] = ($7 - $6) / $3; next }
    {
        v = ($7 - $6) / $3
        p = ($2 == "h1" ? "HTTP/1.1" : "HTTP/2")
        printf "| %s | %s | %d (%d) | %d | %d | %d | **%.1f** | %s |\n", $1, p, $3, $4, $5, $6, $7, v,
            (base[$2] > 0 ? sprintf("%.2f", v / base[$2]) : "-")
    }' "$RESULTS" "$RESULTS"
    echo
    awk -F'\t' '{ v[$1, $2] = ($7 - $6) / $3 } END {
        n = split("h1 h2", ps, " ")
        for (i = 1; i <= n; i++) {
            p = ps[i]
            if (!(("ephemera", p) in v) || !(("nginx", p) in v)) continue
            e = v["ephemera", p]; g = v["nginx", p]
            printf "Target (idle connection memory at most nginx'"'"'s), %s: ephemera %.1f KiB vs nginx %.1f KiB: %s.\n",
                (p == "h1" ? "HTTP/1.1" : "HTTP/2"), e, g, (e <= g ? "met" : sprintf("NOT met (%.2fx nginx)", e / g))
        }
    }' "$RESULTS"
}
