#!/usr/bin/env bash
# Interleaved A/B of two or more ephemera binaries: server CPU per connection, the binaries
# alternating round by round, so that the guest's drift over minutes hits them alike.
#
#   bash benches/ab.sh OLD_BINARY NEW_BINARY [MORE...]
#   ROUNDS=10 DURATION=6 LOADS=s_time bash benches/ab.sh a b
#   LG_ALPN=http/1.1 bash benches/ab.sh a b
#
# Each round starts every binary afresh (`serve`, pinned to SERVER_CPU; every other round
# in reverse order) in front of one shared backend (nginx answering "ok", pinned to
# CLIENT_CPU), and reads the server's
# utime+stime (/proc/PID/stat) around each load, pinned to CLIENT_CPU:
#   s_time   `openssl s_time -new -www /`, one connection at a time (HTTP/1.0)
#   loadgen  `ephemera loadgen --mode handshake -c LG_CONNS --alpn LG_ALPN` (the first
#            binary's loadgen, the same client for every binary)
#   h2load   `h2load -c H2_CONNS -m H2_STREAMS`: keep-alive HTTP/2 requests (not in the
#            default LOADS); its figures are per request, not per connection
# It prints one line per measurement, then per binary and load the median and lowest µs of
# server CPU per connection (per request for h2load) over the rounds, in how many rounds it was below the first
# binary's, and how often the server went to sleep per connection (voluntary context
# switches: a count that the host's load does not inflate, unlike CPU time on this guest).
# compare.sh is the published comparison against nginx and HAProxy; this is for deciding
# whether one change to ephemera helps (differences of a few percent need many rounds here).
#
# Environment: ROUNDS=8 DURATION=5 LOADS="s_time loadgen" LG_CONNS=8 LG_ALPN=h2
# H2_CONNS=8 H2_STREAMS=10 SERVER_CPU=0 CLIENT_CPU=1 KEEP_TMP=0
set -euo pipefail

ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-5}
LOADS=${LOADS:-s_time loadgen}
LG_CONNS=${LG_CONNS:-8}
LG_ALPN=${LG_ALPN:-h2}
H2_CONNS=${H2_CONNS:-8}
H2_STREAMS=${H2_STREAMS:-10}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
KEEP_TMP=${KEEP_TMP:-0}
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# >= 2)) || die "usage: bash benches/ab.sh OLD_BINARY NEW_BINARY [MORE...]"
check_binaries "$@"
for v in ROUNDS DURATION LG_CONNS H2_CONNS H2_STREAMS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
for l in $LOADS; do
    [[ $l = s_time || $l = loadgen || $l = h2load ]] || die "LOADS: unknown load '$l' (s_time, loadgen, h2load)"
done
[[ " $LOADS " != *" h2load "* ]] || command -v h2load >/dev/null || die "h2load is missing (Debian: nghttp2-client)"
[[ $LG_ALPN = h2 || $LG_ALPN = http/1.1 ]] || die "LG_ALPN must be h2 or http/1.1, got '$LG_ALPN'"
for tool in openssl nginx taskset python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (Debian: openssl, nginx-light, util-linux, python3)"
done

bench_setup ab "$1" "$CLIENT_CPU"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Times the server went to sleep (all its threads): unlike CPU time, not inflated when the
# host is busy.
sleeps() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}'; }
TCK=$(getconf CLK_TCK)

start_server() { # binary
    taskset -c "$SERVER_CPU" "$1" serve --config "$TMP/ephemera.yaml" 2>"$TMP/server.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do
        grep -q "listening (TLS 1.3)" "$TMP/server.log" && return
        kill -0 "$SERVER_PID" 2>/dev/null || die "$1 exited at start: $(tail -n 5 "$TMP/server.log")"
        sleep 0.05
    done
    die "$1 did not log its listener within 5 s: $(tail -n 5 "$TMP/server.log")"
}

stop_server() {
    kill -INT "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

run_load() { # load -> connections completed
    case $1 in
    s_time)
        taskset -c "$CLIENT_CPU" openssl s_time -connect "127.0.0.1:$PORT" -new -time "$DURATION" -www / 2>&1 |
            awk '/connections in/ {print $1; exit}'
        ;;
    loadgen)
        taskset -c "$CLIENT_CPU" "$FIRST" loadgen "https://localhost:$PORT/" --mode handshake \
            -c "$LG_CONNS" -d "${DURATION}s" --alpn "$LG_ALPN" --insecure --json 2>/dev/null |
            python3 -c 'import json, sys; d = json.load(sys.stdin); print(d["handshakes"] if d["errors"]["total"] == 0 else 0)'
        ;;
    h2load)
        # "requests: N total, N started, N done, N succeeded, 0 failed, ..."
        taskset -c "$CLIENT_CPU" h2load -c "$H2_CONNS" -m "$H2_STREAMS" -D "$DURATION" "https://127.0.0.1:$PORT/" 2>&1 |
            awk '/^requests:/ {print ($10 == 0 && $12 == 0) ? $8 : 0; exit}'
        ;;
    esac
}

FIRST=$1
RESULTS=$TMP/results.tsv
for r in $(seq "$ROUNDS"); do
    # Every other round in reverse order: in a fixed order the same binary lost 5 of 6
    # loadgen rounds going second and won going first (probably the thousands of client
    # sockets a run leaves in TIME_WAIT make the next run's connects dearer).
    order=$(seq $#)
    ((r % 2 == 0)) && order=$(seq $# -1 1)
    for i in $order; do
        bin=${!i}
        start_server "$bin"
        for load in $LOADS; do
            before=$(cpu_ticks "$SERVER_PID")
            slept=$(sleeps "$SERVER_PID")
            n=$(run_load "$load")
            after=$(cpu_ticks "$SERVER_PID")
            slept=$(($(sleeps "$SERVER_PID") - slept))
            [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || die "round $r, $bin, $load: no connection completed (or errors)"
            us=$(awk -v t=$((after - before)) -v n="$n" -v k="$TCK" 'BEGIN {printf "%.1f", t / k / n * 1e6}')
            per=$(awk -v s="$slept" -v n="$n" 'BEGIN {printf "%.2f", s / n}')
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$i" "$load" "$n" "$us" "$per" >>"$RESULTS"
            unit=connections
            [[ $load = h2load ]] && unit=requests
            printf 'round %d  %-8s %-30s %7d %-11s  %7.1f µs server CPU each  %5.2f sleeps each\n' "$r" "$load" "$(basename "$bin")" "$n" "$unit" "$us" "$per"
        done
        stop_server
    done
done

echo
echo "| binary | load | median µs server CPU per connection (h2load: per request) | lowest | rounds below the first binary | sleeps per connection (median) |"
echo "|---|---|---:|---:|---:|---:|"
python3 - "$RESULTS" "$@" <<'PYEOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
bins = sys.argv[2:]
us = {}
sleeps = {}
for r, i, load, n, v, s in rows:
    us[(int(i), load, int(r))] = float(v)
    sleeps[(int(i), load, int(r))] = float(s)
loads = sorted({l for _, l, _ in us}, key=lambda l: ["s_time", "loadgen", "h2load"].index(l))
rounds = sorted({r for *_, r in us})
for load in loads:
    for i in range(1, len(bins) + 1):
        vals = [us[(i, load, r)] for r in rounds]
        below = "-" if i == 1 else "%d of %d" % (
            sum(us[(i, load, r)] < us[(1, load, r)] for r in rounds), len(rounds))
        slept = statistics.median(sleeps[(i, load, r)] for r in rounds)
        print("| %s | %s | %.1f | %.1f | %s | %.2f |" % (
            bins[i - 1], load, statistics.median(vals), min(vals), below, slept))
PYEOF
