#!/usr/bin/env bash
# User-space instructions of the server per connection or per request, counted by valgrind
# (callgrind), for ephemera binaries side by side: a figure the host's load does not move,
# where CPU time on this guest drifts by 10-50% between runs (see benches/README.md).
#
#   bash benches/instructions.sh BINARY [MORE...]
#   LOADS="h2load" N1=10000 N2=30000 bash benches/instructions.sh a b
#
# For each binary and load, the server runs under `valgrind --tool=callgrind` twice, serving
# N1 and then N2 connections (or requests); the difference of the two instruction totals
# divided by N2 - N1 is the cost of one, without the start-up (aws-lc's entropy seeding alone
# is about 420 million instructions). Loads, the client pinned to CLIENT_CPU, one shared
# backend (nginx answering "ok"):
#   loadgen     `ephemera loadgen --mode handshake -c 4 --alpn h2`: new connection, full
#               handshake, one HTTP/2 request (the first binary's loadgen for all)
#   loadgen-h1  the same over HTTP/1.1 (the request says Connection: close)
#   h2load      `h2load -c 4 -m 10`: keep-alive HTTP/2 requests
# Counts only the server's own instructions (no kernel, no waiting); under valgrind aws-lc
# takes its AVX2 paths (no SHA extensions, no ADX), so the crypto share is larger than on the
# real CPU. Batching depends on timing, so the same binary varies by about 1-2% between runs.
#
# Environment: LOADS="loadgen h2load" N1= N2= (default 200/600 connections, 10000/30000
# requests for h2load) SERVER_CPU=0 CLIENT_CPU=1 KEEP_TMP=0
set -euo pipefail

LOADS=${LOADS:-loadgen h2load}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
KEEP_TMP=${KEEP_TMP:-0}
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# >= 1)) || die "usage: bash benches/instructions.sh BINARY [MORE...]"
check_binaries "$@"
for l in $LOADS; do
    [[ $l = loadgen || $l = loadgen-h1 || $l = h2load ]] || die "LOADS: unknown load '$l' (loadgen, loadgen-h1, h2load)"
done
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || need+=(nginx-light)
command -v taskset >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
[[ " $LOADS " != *" h2load "* ]] || command -v h2load >/dev/null || need+=(nghttp2-client)
if ((${#need[@]})); then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get: install them by hand"
    SUDO=()
    [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
    echo "installing ${need[*]}" >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null ||
        { "${SUDO[@]}" apt-get update >/dev/null && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null; }
fi

bench_setup instructions "$1" "$CLIENT_CPU"

FIRST=$1

run_load() { # load n
    case $1 in
    loadgen | loadgen-h1)
        local alpn=h2
        [[ $1 = loadgen-h1 ]] && alpn=http/1.1
        taskset -c "$CLIENT_CPU" "$FIRST" loadgen "https://localhost:$PORT/" --mode handshake \
            -c 4 -n "$2" --alpn "$alpn" --insecure --json 2>/dev/null |
            python3 -c 'import json, sys; d = json.load(sys.stdin); print(d["handshakes"] if d["errors"]["total"] == 0 else 0)'
        ;;
    h2load)
        taskset -c "$CLIENT_CPU" h2load -c 4 -m 10 -n "$2" "https://127.0.0.1:$PORT/" 2>&1 |
            awk '/^requests:/ {print ($10 == 0 && $12 == 0) ? $8 : 0; exit}'
        ;;
    esac
}

instructions() { # binary load n -> total instructions of the server
    local out=$TMP/callgrind.out
    rm -f "$out"
    taskset -c "$SERVER_CPU" valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$1" serve --config "$TMP/ephemera.yaml" 2>"$TMP/server.log" &
    SERVER_PID=$!
    for _ in $(seq 300); do
        grep -q "listening (TLS 1.3)" "$TMP/server.log" && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "$1 exited at start: $(tail -n 5 "$TMP/server.log")"
        sleep 0.1
    done
    local done_n
    done_n=$(run_load "$2" "$3")
    kill -INT "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    [[ $done_n = "$3" ]] || die "$1, $2: $done_n of $3 completed (or errors)"
    awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

echo "| binary | load | instructions per connection (h2load: per request) |"
echo "|---|---|---:|"
for load in $LOADS; do
    if [[ $load = h2load ]]; then n1=${N1:-10000} n2=${N2:-30000}; else n1=${N1:-200} n2=${N2:-600}; fi
    ((n2 > n1)) || die "N2 must be larger than N1"
    for b in "$@"; do
        a=$(instructions "$b" "$load" "$n1")
        c=$(instructions "$b" "$load" "$n2")
        printf '| %s | %s | %d |\n' "$(basename "$b")" "$load" $(((c - a) / (n2 - n1)))
    done
done
