#!/usr/bin/env bash
# gpu-task.sh: install the gpu-task binary (uploaded by Packer's file
# provisioner) as /usr/local/bin/gpu-task, where nomad/comfy-workflow.nomad.hcl
# runs it (variable gpu_task_command).
#
#   gpu-task.sh [SOURCE]   install SOURCE (default $GPU_TASK_SRC, else
#                          /tmp/comfy-multi-build/gpu-task); needs root
#   gpu-task.sh --check    verify an already provisioned host, change nothing
#   gpu-task.sh --help
#
# The binary is built on the operator's machine (`cargo build --release -p
# gpu-task`) and must run on the node: build it on a system whose glibc is not
# newer than the node's (Debian 12 and Ubuntu 24.04 builds run on Ubuntu
# 24.04), or for x86_64-unknown-linux-musl. The install runs
# `gpu-task --version` to prove it starts, and records the binary's sha256 in
# /usr/local/share/comfy-multi/gpu-task.sha256 so --check can tell whether the
# file was changed since.
set -euo pipefail

NAME=gpu-task.sh
DEST=/usr/local/bin/gpu-task
SUMFILE=/usr/local/share/comfy-multi/gpu-task.sha256

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SRC=${GPU_TASK_SRC:-/tmp/comfy-multi-build/gpu-task}
script_arg() { case $1 in -*) return 1 ;; *) SRC=$1 ;; esac; }
parse_args "$@"

# ---- --check ------------------------------------------------------------------
if [ "$MODE" = check ]; then
    problems=()
    if [ ! -x "$DEST" ]; then
        problems+=("$DEST is missing or not executable")
    else
        out=$("$DEST" --version 2>&1) || problems+=("$DEST --version fails: ${out//$'\n'/ }")
        if [ ! -f "$SUMFILE" ]; then
            problems+=("$SUMFILE is missing (gpu-task was not installed by this script)")
        elif [ "$(cut -d' ' -f1 "$SUMFILE")" != "$(sha_of "$DEST")" ]; then
            problems+=("$DEST changed since it was installed (sha256 differs from $SUMFILE)")
        fi
    fi
    if [ "${#problems[@]}" -gt 0 ]; then
        print_missing "${problems[@]}"
        die "gpu-task is not installed on this host (${#problems[@]} problem(s) above)" \
            "build it (cargo build --release -p gpu-task) and run 'sudo $0 target/release/gpu-task' (the Packer build does it for the GPU image)"
    fi
    log "ok: $out at $DEST"
    exit 0
fi

# ---- install ------------------------------------------------------------------
need_root "$0 $SRC"
[ -f "$SRC" ] || die "gpu-task binary not found at $SRC" \
    "build it with 'cargo build --release -p gpu-task' and pass its path (Packer: -var gpu_task_binary=...)"
out=$("$SRC" --version 2>&1) || die "$SRC does not run on this host: ${out//$'\n'/ }" \
    "a 'GLIBC_x.y not found' error means it was built against a newer glibc than this host's; build it on an older system or for x86_64-unknown-linux-musl"
install -m 0755 "$SRC" "$DEST"
install -d -m 0755 "$(dirname "$SUMFILE")"
sha256sum "$DEST" >"$SUMFILE"
log "installed $out at $DEST (sha256 $(cut -d' ' -f1 "$SUMFILE"))"
