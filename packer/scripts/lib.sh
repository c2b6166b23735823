#!/usr/bin/env bash
# lib.sh: helpers shared by the provisioning scripts in this folder
# (nvidia.sh, consul.sh, nomad.sh, comfyui.sh, gpu-task.sh, models.sh).
# Sourced, never run: each script sets NAME (its name in messages), then
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# so lib.sh must stay next to the scripts (Packer uploads the whole folder).
#
# Conventions of the provisioning scripts:
#   - the help is the script's header comment, from line 2 to `set -euo pipefail`;
#   - every failure ends in `die WHAT FIX...`;
#   - `--check` collects what is wrong in the array `problems` (the check_*
#     helpers add to it), prints it with print_missing and dies.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "lib.sh is sourced by the provisioning scripts; run nvidia.sh, consul.sh, nomad.sh, comfyui.sh, gpu-task.sh or models.sh" >&2
    exit 2
fi

log() { printf '[%s] %s\n' "$NAME" "$*"; }

# die WHAT FIX...: say what failed and how to fix it, then exit non-zero.
die() {
    local what=$1
    shift
    printf '[%s] FAILED: %s\n' "$NAME" "$what" >&2
    if [ "$#" -gt 0 ]; then
        printf '[%s]   how to fix: %s\n' "$NAME" "$@" >&2
    fi
    exit 1
}

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# parse_args "$@": --check sets MODE=check (otherwise MODE=install), -h/--help
# prints the usage and exits. Any other argument goes, in order, to the
# script's function `script_arg ARG` if it defines one; it returns non-zero
# for an argument it does not take, which is refused.
# shellcheck disable=SC2034 # MODE is read by the script
parse_args() {
    MODE=install
    while [ "$#" -gt 0 ]; do
        case $1 in
            --check) MODE=check ;;
            -h | --help) usage; exit 0 ;;
            *) { declare -F script_arg >/dev/null && script_arg "$1"; } || die "unknown argument: $1" "run '$0 --help'" ;;
        esac
        shift
    done
}

# need_root COMMAND: die unless root, telling to run 'sudo COMMAND'.
need_root() { [ "$(id -u)" -eq 0 ] || die "installing needs root" "run 'sudo $1'"; }

# need_tools FIX TOOL...: die naming the first TOOL not on PATH, with "install it (FIX)".
need_tools() {
    local fix=$1 tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found" "install it ($fix)"
    done
}

need_x86_64() {
    [ "$(uname -m)" = x86_64 ] || die "this script installs linux_amd64 builds, this host is $(uname -m)" "use an x86_64 instance"
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# download URL FILE: fetch URL to FILE with retries; non-zero if that fails.
download() { curl -fsSL --retry 3 --retry-delay 2 -o "$2" "$1"; }

# verify_sha256 FILE SHA256 FIX: die unless FILE's sha256 is SHA256.
verify_sha256() {
    local got
    got=$(sha_of "$1")
    [ "$got" = "$2" ] || die "checksum mismatch for ${1##*/}: got $got, expected $2" "$3"
}

# bin_version BIN PRODUCT: the version BIN reports, e.g. "Nomad v1.10.5\nBuildDate ..."
# -> 1.10.5 for PRODUCT Nomad; empty if it does not run.
bin_version() {
    local out
    out=$("$1" version 2>/dev/null) || return 0
    out=${out%%$'\n'*}
    out=${out#"$2" v}
    printf '%s' "${out%% *}"
}

# check_version BIN PRODUCT VERSION: a problem unless BIN reports VERSION.
check_version() {
    local have
    have=$(bin_version "$1" "$2")
    if [ ! -x "$1" ]; then
        problems+=("$1 is missing ($2 $3 not installed)")
    elif [ "$have" != "$3" ]; then
        problems+=("$1 is version '${have:-unknown}', expected $3")
    fi
}

# check_unit UNIT TEXT: a problem unless the systemd unit file UNIT holds TEXT.
check_unit() {
    if [ ! -f "$1" ]; then
        problems+=("systemd unit $1 is missing")
    elif [ "$(cat "$1")" != "$2" ]; then
        problems+=("systemd unit $1 differs from the one this script writes")
    fi
}

# check_dirs DIR...: a problem for each DIR that is missing.
check_dirs() {
    local d
    for d in "$@"; do
        [ -d "$d" ] || problems+=("folder $d is missing")
    done
}

# print_missing PROBLEM...: one MISSING line each, on stderr.
print_missing() {
    local p
    for p in "$@"; do
        printf '[%s] MISSING: %s\n' "$NAME" "$p" >&2
    done
}

# install_unit UNIT TEXT: write the systemd unit file UNIT (not enabled) unless it holds TEXT.
install_unit() {
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then
        log "systemd unit $1 up to date"
    else
        printf '%s\n' "$2" >"$1"
        systemctl daemon-reload
        log "wrote $1 (not enabled: the agent config comes at deploy/boot time)"
    fi
}
