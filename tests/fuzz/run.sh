#!/usr/bin/env bash
# Run every fuzz target (or those named as arguments) for a bounded time, one after another.
#
#   bash tests/fuzz/run.sh                      # all targets, 60 s each
#   FUZZ_SECS=300 bash tests/fuzz/run.sh config # one target, 5 minutes
#
# Each target starts from a scratch copy of its committed seeds (tests/fuzz/corpus/<target>),
# so what libFuzzer grows does not flood the repository; KEEP_CORPUS=1 leaves the scratch
# copies behind (their path is printed). Exits non-zero if any target crashes, naming the
# artifact (tests/fuzz/artifacts/<target>/crash-…) and how to reproduce it. Needs nightly
# (`rustup toolchain install nightly`); installs cargo-fuzz if missing. Not run by .ci/run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
fuzz_dir=tests/fuzz
secs="${FUZZ_SECS:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$toolchain" fuzz list --fuzz-dir "$fuzz_dir")
fi

echo "== building ${targets[*]}"
if [ "${#targets[@]}" -eq 1 ]; then
    cargo "+$toolchain" fuzz build --fuzz-dir "$fuzz_dir" "${targets[0]}"
else
    cargo "+$toolchain" fuzz build --fuzz-dir "$fuzz_dir"
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/ephemera-fuzz.XXXXXX")"
if [ "${KEEP_CORPUS:-0}" != 1 ]; then
    trap 'rm -rf "$scratch"' EXIT
fi

failed=()
for t in "${targets[@]}"; do
    corpus="$scratch/$t"
    mkdir -p "$corpus" "$fuzz_dir/artifacts/$t"
    if [ -d "$fuzz_dir/corpus/$t" ]; then
        cp -R "$fuzz_dir/corpus/$t/." "$corpus/"
    fi
    log="$scratch/$t.log"
    echo "== $t: ${secs}s from $(find "$corpus" -type f | wc -l) seeds (log: $log)"
    before="$(find "$fuzz_dir/artifacts/$t" -type f | sort)"
    set +e
    cargo "+$toolchain" fuzz run --fuzz-dir "$fuzz_dir" "$t" "$corpus" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's last status line: executions, coverage (cov), features (ft), corpus size.
    grep -E '^#[0-9]+' "$log" | tail -n 1 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        new="$(comm -13 <(echo "$before") <(find "$fuzz_dir/artifacts/$t" -type f | sort) | grep . || true)"
        echo "!! $t FAILED (exit $rc)"
        grep -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY' "$log" | head -n 5 || true
        for a in $new; do
            echo "   artifact:   $a"
            echo "   reproduce:  cargo +$toolchain fuzz run --fuzz-dir $fuzz_dir $t $a"
            echo "   minimise:   cargo +$toolchain fuzz tmin --fuzz-dir $fuzz_dir $t $a"
        done
        [ -n "$new" ] || tail -n 20 "$log"
        failed+=("$t")
    fi
done

if [ "${KEEP_CORPUS:-0}" = 1 ]; then
    echo "== grown corpora kept in $scratch"
fi
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all ${#targets[@]} targets ran ${secs}s each without a crash"
