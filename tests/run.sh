#!/usr/bin/env bash
# The project's test command (README "Run the tests"): format check, lints, then every test.
# One build serves clippy and the tests (dependencies are optimised in the dev profile).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
