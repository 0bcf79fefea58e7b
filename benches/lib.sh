# Shared by benches/ab.sh and benches/instructions.sh (sourced, not run): die,
# check_binaries, and bench_setup, which makes a temporary
# directory with a backend nginx answering "ok" and an ephemera config proxying to it.
#
#   bench_setup NAME FIRST_BINARY CLIENT_CPU
#
# sets TMP (removed on exit unless KEEP_TMP=1), PORT, ADMIN, BACKEND, writes
# $TMP/ephemera.yaml and $TMP/certs (made by FIRST_BINARY), starts the backend pinned to
# CLIENT_CPU, and installs an EXIT trap that also stops $SERVER_PID if set.

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C

die() {
    printf '%s: ERROR: %s\n' "$(basename "$0")" "$*" >&2
    exit 1
}

check_binaries() { # binary...
    local b
    for b in "$@"; do
        [[ -x $b ]] || die "not an executable file: $b"
    done
}

bench_setup() { # name first_binary client_cpu
    local name=$1 first=$2 cpu=$3
    TMP=$(mktemp -d "/tmp/ephemera-$name.XXXXXX")
    SERVER_PID=
    trap bench_cleanup EXIT
    read -r PORT ADMIN BACKEND < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
    "$first" certs --out "$TMP/certs" >/dev/null || die "$first certs failed"
    mkdir -p "$TMP/backend"
    cat >"$TMP/backend.conf" <<EOC
worker_processes 1;
pid $TMP/backend.pid;
error_log $TMP/backend-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$BACKEND;
        location / { return 200 "ok\n"; }
    }
}
EOC
    taskset -c "$cpu" nginx -p "$TMP/backend/" -c "$TMP/backend.conf" -e "$TMP/backend-error.log" ||
        die "the backend nginx did not start: $(cat "$TMP/backend-error.log" 2>/dev/null)"
    cat >"$TMP/ephemera.yaml" <<EOC
admin:
  bind: 127.0.0.1:$ADMIN
shutdown_grace: 1s
listeners:
  - name: $name
    bind: 127.0.0.1:$PORT
    tls:
      certificates:
        - { cert: $TMP/certs/localhost.crt, key: $TMP/certs/localhost.key }
      groups: [x25519, secp256r1, secp384r1]
    http:
      access_log: false
    routes:
      - { host: "*", path_prefix: /, upstream: app }
upstreams:
  app:
    protocol: http1
    servers: [127.0.0.1:$BACKEND]
EOC
}

bench_cleanup() {
    [[ -n ${SERVER_PID:-} ]] && kill "$SERVER_PID" 2>/dev/null || true
    [[ -f $TMP/backend.pid ]] && kill "$(cat "$TMP/backend.pid")" 2>/dev/null || true
    if [[ ${KEEP_TMP:-0} = 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
