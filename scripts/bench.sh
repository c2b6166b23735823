#!/usr/bin/env bash
# Benchmark the whole local stack and print its figures (README "Performance").
#
#   scripts/bench.sh
#
# Installs what is missing (scripts/install-deps.sh: Redis, Consul, wrk, ...),
# builds every binary with --release, then runs the bench driver
# (tests/benches/stack.rs, `cargo bench --bench stack`), which starts real
# Redis, Consul, the ComfyUI and Nomad stand-ins, the gateway and the
# dispatcher itself, puts load on them, prints each figure as a line
# `name: value unit (load)` followed by where the time went, and stops
# everything. Takes about three minutes.
#
# Environment: BENCH_SECONDS (each wrk run, default 30), BENCH_FANOUT_SECONDS
# (default 20), BENCH_JOBS (jobs run for the idle gap and the reaction,
# default 40), BENCH_ONLY, BENCH_PERF, BENCH_APPENDFSYNC (see
# tests/benches/stack.rs), CARGO_TARGET_DIR (default: the repository's target/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

fail() {
    printf 'bench.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

bash scripts/install-deps.sh >&2 || fail "scripts/install-deps.sh (see its message above)"
CACHE=${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}
# Exports COMFY_MULTI_CACHE and puts $CACHE/bin (consul) on PATH.
# shellcheck source=/dev/null
. "$CACHE/env.sh" || fail "cannot read $CACHE/env.sh written by install-deps.sh"

cargo build --release --workspace --bins >&2 || fail "cargo build --release --workspace --bins"
cargo bench -p comfy-multi-tests --bench stack || fail "the bench driver (its log tail is above)"
