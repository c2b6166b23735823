#!/usr/bin/env bash
# Install what is missing and run every test. This is the README's test
# command and exactly what CI runs (.ci/run).
#
#   scripts/test.sh
#
# Steps: scripts/install-deps.sh (idempotent), shellcheck on every shell
# script, `cargo build --workspace --bins` (the end-to-end tests start the
# real binaries from the same target dir), then `cargo test --workspace`.
# Exits non-zero on the first failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\ntest.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

step "install dependencies"
bash scripts/install-deps.sh || fail "scripts/install-deps.sh (see its message above)"

CACHE=${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}
# Exports COMFY_MULTI_CACHE, COMFYUI_FRONTEND_DIR and puts $CACHE/bin (consul) on PATH.
# shellcheck source=/dev/null
. "$CACHE/env.sh" || fail "cannot read $CACHE/env.sh written by install-deps.sh"
echo "COMFY_MULTI_CACHE=$COMFY_MULTI_CACHE"
echo "COMFYUI_FRONTEND_DIR=$COMFYUI_FRONTEND_DIR"
echo "CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}"

step "shellcheck"
scripts=(scripts/*.sh packer/scripts/*.sh consul/*.sh .ci/run)
shellcheck "${scripts[@]}" || fail "shellcheck ${scripts[*]}"
echo "shellcheck: ${#scripts[@]} scripts clean"

step "cargo build --workspace --bins"
cargo build --workspace --bins || fail "cargo build --workspace --bins"

step "cargo test --workspace"
cargo test --workspace || fail "cargo test --workspace"
