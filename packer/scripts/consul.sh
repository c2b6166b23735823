#!/usr/bin/env bash
# consul.sh: install Consul at a pinned version with a systemd unit. Used by
# the Packer GPU image and by scripts/deploy-control.sh on the VPS.
#
#   consul.sh            install (idempotent; needs root)
#   consul.sh --check    verify an already provisioned host, change nothing
#   consul.sh --help
#
# Consul 1.8.7 is the version consul/*.hcl are written and tested for
# (tests/tests/deploy_consul.rs runs that very binary), so both machines run
# the same build: the consul binary of Debian bullseye's package
# $CONSUL_DEB, checked against CONSUL_SHA256 before it is unpacked
# (`dpkg-deb -x`, not installed as a package: no Debian service, no deps).
#
# What it installs:
#   - /usr/local/bin/consul from that package;
#   - the system user `consul`, $CONSUL_CONFIG_DIR (root:consul, 0750) and
#     $CONSUL_DATA_DIR (consul:consul, 0750);
#   - /etc/systemd/system/consul.service running
#     `consul agent -config-dir=$CONSUL_CONFIG_DIR` as user consul, NOT enabled:
#     the agent config (consul/server.hcl on the VPS, consul/client-gpu.hcl on
#     the GPU node) and its secrets arrive at deploy/boot time, which then
#     enable it.
#
# Environment (defaults = the pins in packer/gpu-node.pkr.hcl):
#   CONSUL_VERSION      1.8.7 (what `consul version` must report)
#   CONSUL_DEB          consul_1.8.7+dfsg1-2+b3_amd64.deb
#   CONSUL_SHA256       sha256 of that .deb
#   CONSUL_MIRRORS      Debian mirrors tried in order (pool/main/c/consul/ under each)
#   CONSUL_CONFIG_DIR   /etc/consul.d
#   CONSUL_DATA_DIR     /var/lib/consul (data_dir in consul/*.hcl)
set -euo pipefail

NAME=consul.sh
CONSUL_VERSION=${CONSUL_VERSION:-1.8.7}
CONSUL_DEB=${CONSUL_DEB:-consul_1.8.7+dfsg1-2+b3_amd64.deb}
CONSUL_SHA256=${CONSUL_SHA256:-e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9}
CONSUL_MIRRORS=${CONSUL_MIRRORS:-https://deb.debian.org/debian https://archive.debian.org/debian}
CONSUL_CONFIG_DIR=${CONSUL_CONFIG_DIR:-/etc/consul.d}
CONSUL_DATA_DIR=${CONSUL_DATA_DIR:-/var/lib/consul}
CONSUL_BIN=/usr/local/bin/consul
CONSUL_UNIT=/etc/systemd/system/consul.service

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

MODE=install
while [ "$#" -gt 0 ]; do
    case $1 in
        --check) MODE=check ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1" "run '$0 --help'" ;;
    esac
    shift
done

# "Consul v1.21.4\nRevision ..." -> 1.21.4; empty if it does not run.
installed_version() {
    local out
    out=$("$CONSUL_BIN" version 2>/dev/null) || return 0
    out=${out%%$'\n'*}
    out=${out#Consul v}
    printf '%s' "${out%% *}"
}

unit_text() {
    cat <<UNIT
# Installed by comfy-multi packer/scripts/consul.sh
[Unit]
Description=Consul agent (comfy-multi)
Documentation=https://developer.hashicorp.com/consul/docs
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
User=consul
Group=consul
ExecStart=$CONSUL_BIN agent -config-dir=$CONSUL_CONFIG_DIR
ExecReload=/bin/kill --signal HUP \$MAINPID
KillMode=process
KillSignal=SIGTERM
LimitNOFILE=65536
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
}

# ---- --check ------------------------------------------------------------------
if [ "$MODE" = check ]; then
    problems=()
    have=$(installed_version)
    if [ ! -x "$CONSUL_BIN" ]; then
        problems+=("$CONSUL_BIN is missing (Consul $CONSUL_VERSION not installed)")
    elif [ "$have" != "$CONSUL_VERSION" ]; then
        problems+=("$CONSUL_BIN is version '${have:-unknown}', expected $CONSUL_VERSION")
    fi
    getent passwd consul >/dev/null 2>&1 || problems+=("system user 'consul' is missing")
    if [ ! -f "$CONSUL_UNIT" ]; then
        problems+=("systemd unit $CONSUL_UNIT is missing")
    elif [ "$(cat "$CONSUL_UNIT")" != "$(unit_text)" ]; then
        problems+=("systemd unit $CONSUL_UNIT differs from the one this script writes")
    fi
    for d in "$CONSUL_CONFIG_DIR" "$CONSUL_DATA_DIR"; do
        [ -d "$d" ] || problems+=("folder $d is missing")
    done
    if [ "${#problems[@]}" -gt 0 ]; then
        for p in "${problems[@]}"; do
            printf '[%s] MISSING: %s\n' "$NAME" "$p" >&2
        done
        die "this host is not provisioned for Consul (${#problems[@]} problem(s) above)" \
            "run 'sudo $0' (the Packer build does it for the GPU image)"
    fi
    log "ok: Consul $CONSUL_VERSION, $CONSUL_UNIT"
    exit 0
fi

# ---- install ------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "installing needs root" "run 'sudo $0'"
for tool in curl dpkg-deb sha256sum install systemctl useradd; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found" "install it (apt-get install -y curl dpkg coreutils systemd passwd)"
done
[ "$(uname -m)" = x86_64 ] || die "this script installs linux_amd64 builds, this host is $(uname -m)" "use an x86_64 instance"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ "$(installed_version)" = "$CONSUL_VERSION" ]; then
    log "Consul $CONSUL_VERSION already installed at $CONSUL_BIN"
else
    log "installing Consul $CONSUL_VERSION from $CONSUL_DEB"
    got=
    for mirror in $CONSUL_MIRRORS; do
        url=$mirror/pool/main/c/consul/$CONSUL_DEB
        if curl -fsSL --retry 3 --retry-delay 2 -o "$TMP/$CONSUL_DEB" "$url"; then
            got=$(sha256sum "$TMP/$CONSUL_DEB" | cut -d' ' -f1)
            break
        fi
        log "not at $url, trying the next mirror"
    done
    [ -n "$got" ] || die "cannot download $CONSUL_DEB from any of: $CONSUL_MIRRORS" \
        "check the network; set CONSUL_MIRRORS to a Debian mirror that still has bullseye's pool"
    [ "$got" = "$CONSUL_SHA256" ] || die "checksum mismatch for $CONSUL_DEB: got $got, expected $CONSUL_SHA256" \
        "do not use this file; check the pinned consul_deb/consul_sha256 in packer/gpu-node.pkr.hcl"
    dpkg-deb -x "$TMP/$CONSUL_DEB" "$TMP/deb" || die "dpkg-deb -x $CONSUL_DEB failed" "the file may be truncated; run again"
    [ -f "$TMP/deb/usr/bin/consul" ] || die "no usr/bin/consul inside $CONSUL_DEB" "check consul_deb"
    install -m 0755 "$TMP/deb/usr/bin/consul" "$CONSUL_BIN"
    [ "$(installed_version)" = "$CONSUL_VERSION" ] || die "$CONSUL_BIN does not report version $CONSUL_VERSION after install" "run '$CONSUL_BIN version'"
fi

if ! getent passwd consul >/dev/null 2>&1; then
    useradd --system --home-dir "$CONSUL_DATA_DIR" --no-create-home --shell /usr/sbin/nologin consul
    log "created system user consul"
fi
install -d -m 0750 -o root -g consul "$CONSUL_CONFIG_DIR"
install -d -m 0750 -o consul -g consul "$CONSUL_DATA_DIR"

if [ -f "$CONSUL_UNIT" ] && [ "$(cat "$CONSUL_UNIT")" = "$(unit_text)" ]; then
    log "systemd unit $CONSUL_UNIT up to date"
else
    unit_text >"$CONSUL_UNIT"
    systemctl daemon-reload
    log "wrote $CONSUL_UNIT (not enabled: the agent config comes at deploy/boot time)"
fi
log "done: $("$CONSUL_BIN" version | head -n 1)"
