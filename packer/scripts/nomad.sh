#!/usr/bin/env bash
# nomad.sh: install Nomad at a pinned version, the NVIDIA device plugin, and
# a systemd unit. Used by the Packer GPU image and, with --no-device-plugin,
# by scripts/deploy-control.sh on the VPS.
#
#   nomad.sh                      install (idempotent; needs root)
#   nomad.sh --no-device-plugin   install Nomad only (the control node has no GPU)
#   nomad.sh --check [--no-device-plugin]
#                                 verify an already provisioned host, change nothing
#   nomad.sh --help
#
# What it installs:
#   - /usr/local/bin/nomad from HashiCorp's release zip
#     (releases.hashicorp.com/nomad/$NOMAD_VERSION/), checked against
#     NOMAD_SHA256 before it is unpacked;
#   - $NOMAD_PLUGIN_DIR/nomad-device-nvidia from
#     releases.hashicorp.com/nomad-device-nvidia/$NOMAD_DEVICE_NVIDIA_VERSION/,
#     checked against NOMAD_DEVICE_NVIDIA_SHA256 when it is set, otherwise
#     against HashiCorp's SHA256SUMS file after verifying that file's GPG
#     signature with HashiCorp's release key (fingerprint pinned below); the
#     sha256 it found is printed so you can pin it;
#   - /etc/systemd/system/nomad.service running
#     `nomad agent -config $NOMAD_CONFIG_DIR` as root (the GPU client runs
#     raw_exec tasks), NOT enabled: the agent config arrives later
#     (scripts/gpu-up.sh's startup script on the GPU node,
#     scripts/deploy-control.sh on the VPS), which then enable it;
#   - the folders $NOMAD_CONFIG_DIR, $NOMAD_DATA_DIR, $NOMAD_PLUGIN_DIR.
#
# Environment (defaults = the pins in packer/gpu-node.pkr.hcl):
#   NOMAD_VERSION                 1.10.5
#   NOMAD_SHA256                  sha256 of nomad_<version>_linux_amd64.zip
#   NOMAD_DEVICE_NVIDIA_VERSION   1.1.0
#   NOMAD_DEVICE_NVIDIA_SHA256    sha256 of the plugin zip (empty: signed SHA256SUMS)
#   NOMAD_CONFIG_DIR              /etc/nomad.d
#   NOMAD_DATA_DIR                /opt/nomad/data (data_dir in nomad/agent/*.hcl)
#   NOMAD_PLUGIN_DIR              /opt/nomad/plugins (nomad/agent/client-gpu.hcl's plugin_dir)
set -euo pipefail

NAME=nomad.sh
NOMAD_VERSION=${NOMAD_VERSION:-1.10.5}
NOMAD_SHA256=${NOMAD_SHA256:-4242244ab1f6887e963d6bb674ac490ee9b270a29aff6f826c51ef3187c77044}
NOMAD_DEVICE_NVIDIA_VERSION=${NOMAD_DEVICE_NVIDIA_VERSION:-1.1.0}
NOMAD_DEVICE_NVIDIA_SHA256=${NOMAD_DEVICE_NVIDIA_SHA256:-}
NOMAD_CONFIG_DIR=${NOMAD_CONFIG_DIR:-/etc/nomad.d}
NOMAD_DATA_DIR=${NOMAD_DATA_DIR:-/opt/nomad/data}
NOMAD_PLUGIN_DIR=${NOMAD_PLUGIN_DIR:-/opt/nomad/plugins}
NOMAD_BIN=/usr/local/bin/nomad
NOMAD_UNIT=/etc/systemd/system/nomad.service
PLUGIN_BIN=$NOMAD_PLUGIN_DIR/nomad-device-nvidia
PLUGIN_STAMP=$NOMAD_PLUGIN_DIR/.nomad-device-nvidia.version
RELEASES=${HASHICORP_RELEASES:-https://releases.hashicorp.com}
# HashiCorp's release signing key (https://www.hashicorp.com/trust/security).
HASHICORP_KEY_URL=https://www.hashicorp.com/.well-known/pgp-key.txt
HASHICORP_KEY_FPR=C874011F0AB405110D02105534365D9472D7468F

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WITH_PLUGIN=1
script_arg() { [ "$1" = --no-device-plugin ] && WITH_PLUGIN=0; }
parse_args "$@"

installed_version() { bin_version "$NOMAD_BIN" Nomad; }

unit_text() {
    cat <<UNIT
# Installed by comfy-multi packer/scripts/nomad.sh
[Unit]
Description=Nomad agent (comfy-multi)
Documentation=https://developer.hashicorp.com/nomad/docs
Wants=network-online.target consul.service
After=network-online.target consul.service

[Service]
ExecStart=$NOMAD_BIN agent -config $NOMAD_CONFIG_DIR
ExecReload=/bin/kill -HUP \$MAINPID
KillMode=process
KillSignal=SIGINT
LimitNOFILE=65536
LimitNPROC=infinity
TasksMax=infinity
OOMScoreAdjust=-1000
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
}

# ---- --check ------------------------------------------------------------------
if [ "$MODE" = check ]; then
    problems=()
    check_version "$NOMAD_BIN" Nomad "$NOMAD_VERSION"
    if [ "$WITH_PLUGIN" -eq 1 ]; then
        if [ ! -x "$PLUGIN_BIN" ]; then
            problems+=("$PLUGIN_BIN is missing (nomad-device-nvidia $NOMAD_DEVICE_NVIDIA_VERSION not installed)")
        elif [ "$(cat "$PLUGIN_STAMP" 2>/dev/null || true)" != "$NOMAD_DEVICE_NVIDIA_VERSION" ]; then
            problems+=("$PLUGIN_BIN is not the pinned version $NOMAD_DEVICE_NVIDIA_VERSION (stamp $PLUGIN_STAMP says '$(cat "$PLUGIN_STAMP" 2>/dev/null || true)')")
        fi
    fi
    check_unit "$NOMAD_UNIT" "$(unit_text)"
    check_dirs "$NOMAD_CONFIG_DIR" "$NOMAD_DATA_DIR"
    if [ "${#problems[@]}" -gt 0 ]; then
        print_missing "${problems[@]}"
        die "this host is not provisioned for Nomad (${#problems[@]} problem(s) above)" \
            "run 'sudo $0$([ "$WITH_PLUGIN" -eq 0 ] && printf ' --no-device-plugin')' (the Packer build does it for the GPU image)"
    fi
    log "ok: Nomad $NOMAD_VERSION$([ "$WITH_PLUGIN" -eq 1 ] && printf ', nomad-device-nvidia %s' "$NOMAD_DEVICE_NVIDIA_VERSION"), $NOMAD_UNIT"
    exit 0
fi

# ---- install ------------------------------------------------------------------
need_root "$0"
need_tools "apt-get install -y curl unzip coreutils systemd" curl unzip sha256sum install systemctl

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# fetch URL FILE: download with retries, fail clearly.
fetch() {
    local host=${1#*://}
    download "$1" "$2" \
        || die "download failed: $1" "check the network to ${host%%/*} (HASHICORP_RELEASES overrides releases.hashicorp.com)"
}

# The sha256 HashiCorp's signed SHA256SUMS gives for PRODUCT VERSION ZIPNAME.
signed_sha256() {
    local product=$1 version=$2 zip=$3 base status primary sum
    command -v gpg >/dev/null 2>&1 || die "gpg not found (needed to verify ${product}'s SHA256SUMS)" \
        "apt-get install -y gnupg, or pin the checksum (NOMAD_DEVICE_NVIDIA_SHA256)"
    base=$RELEASES/$product/$version
    fetch "$base/${product}_${version}_SHA256SUMS" "$TMP/SHA256SUMS"
    fetch "$base/${product}_${version}_SHA256SUMS.sig" "$TMP/SHA256SUMS.sig"
    fetch "$HASHICORP_KEY_URL" "$TMP/hashicorp.asc"
    install -d -m 0700 "$TMP/gnupg"
    GNUPGHOME=$TMP/gnupg gpg --batch --quiet --import "$TMP/hashicorp.asc" 2>/dev/null \
        || die "cannot import HashiCorp's key from $HASHICORP_KEY_URL" "pin the checksum instead (NOMAD_DEVICE_NVIDIA_SHA256)"
    status=$(GNUPGHOME=$TMP/gnupg gpg --batch --status-fd 1 --verify "$TMP/SHA256SUMS.sig" "$TMP/SHA256SUMS" 2>/dev/null || true)
    # VALIDSIG <signing key fpr> ... <primary key fpr> (last field)
    primary=$(printf '%s\n' "$status" | awk '$2 == "VALIDSIG" { print $NF }' | head -n 1)
    [ "$primary" = "$HASHICORP_KEY_FPR" ] \
        || die "the signature of ${product}_${version}_SHA256SUMS is not a valid signature by HashiCorp's key $HASHICORP_KEY_FPR" \
            "retry; if it persists, do not install this file, pin a checksum you trust"
    sum=$(awk -v f="$zip" '$2 == f { print $1 }' "$TMP/SHA256SUMS")
    [ -n "$sum" ] || die "$zip is not listed in ${product}_${version}_SHA256SUMS" "check the product version"
    printf '%s' "$sum"
}

# fetch_verified PRODUCT VERSION SHA256 -> path of the verified zip in $TMP.
fetch_verified() {
    local product=$1 version=$2 want=$3 zip
    zip=${product}_${version}_linux_amd64.zip
    if [ -z "$want" ]; then
        want=$(signed_sha256 "$product" "$version" "$zip") || exit 1
        log "$zip: sha256 $want from HashiCorp's signed SHA256SUMS (pin it to skip this step)" >&2
    fi
    fetch "$RELEASES/$product/$version/$zip" "$TMP/$zip"
    verify_sha256 "$TMP/$zip" "$want" \
        "do not use this file; check the pinned version/checksum in packer/gpu-node.pkr.hcl"
    printf '%s' "$TMP/$zip"
}

need_x86_64

install -d -m 0755 "$NOMAD_CONFIG_DIR"
install -d -m 0700 "$NOMAD_DATA_DIR"
if [ "$(installed_version)" = "$NOMAD_VERSION" ]; then
    log "Nomad $NOMAD_VERSION already installed at $NOMAD_BIN"
else
    log "installing Nomad $NOMAD_VERSION"
    zip=$(fetch_verified nomad "$NOMAD_VERSION" "$NOMAD_SHA256")
    unzip -o -q "$zip" nomad -d "$TMP/nomad"
    install -m 0755 "$TMP/nomad/nomad" "$NOMAD_BIN"
    [ "$(installed_version)" = "$NOMAD_VERSION" ] || die "$NOMAD_BIN does not report version $NOMAD_VERSION after install" "run '$NOMAD_BIN version'"
fi

if [ "$WITH_PLUGIN" -eq 1 ]; then
    install -d -m 0755 "$NOMAD_PLUGIN_DIR"
    if [ -x "$PLUGIN_BIN" ] && [ "$(cat "$PLUGIN_STAMP" 2>/dev/null || true)" = "$NOMAD_DEVICE_NVIDIA_VERSION" ]; then
        log "nomad-device-nvidia $NOMAD_DEVICE_NVIDIA_VERSION already installed at $PLUGIN_BIN"
    else
        log "installing nomad-device-nvidia $NOMAD_DEVICE_NVIDIA_VERSION into $NOMAD_PLUGIN_DIR"
        zip=$(fetch_verified nomad-device-nvidia "$NOMAD_DEVICE_NVIDIA_VERSION" "$NOMAD_DEVICE_NVIDIA_SHA256")
        unzip -o -q "$zip" nomad-device-nvidia -d "$TMP/plugin"
        install -m 0755 "$TMP/plugin/nomad-device-nvidia" "$PLUGIN_BIN"
        printf '%s\n' "$NOMAD_DEVICE_NVIDIA_VERSION" >"$PLUGIN_STAMP"
    fi
fi

install_unit "$NOMAD_UNIT" "$(unit_text)"
log "done: $("$NOMAD_BIN" version | head -n 1)"
