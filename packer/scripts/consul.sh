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

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args "$@"

installed_version() { bin_version "$CONSUL_BIN" Consul; }

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
    check_version "$CONSUL_BIN" Consul "$CONSUL_VERSION"
    getent passwd consul >/dev/null 2>&1 || problems+=("system user 'consul' is missing")
    check_unit "$CONSUL_UNIT" "$(unit_text)"
    check_dirs "$CONSUL_CONFIG_DIR" "$CONSUL_DATA_DIR"
    if [ "${#problems[@]}" -gt 0 ]; then
        print_missing "${problems[@]}"
        die "this host is not provisioned for Consul (${#problems[@]} problem(s) above)" \
            "run 'sudo $0' (the Packer build does it for the GPU image)"
    fi
    log "ok: Consul $CONSUL_VERSION, $CONSUL_UNIT"
    exit 0
fi

# ---- install ------------------------------------------------------------------
need_root "$0"
need_tools "apt-get install -y curl dpkg coreutils systemd passwd" curl dpkg-deb sha256sum install systemctl useradd
need_x86_64

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ "$(installed_version)" = "$CONSUL_VERSION" ]; then
    log "Consul $CONSUL_VERSION already installed at $CONSUL_BIN"
else
    log "installing Consul $CONSUL_VERSION from $CONSUL_DEB"
    got=
    for mirror in $CONSUL_MIRRORS; do
        url=$mirror/pool/main/c/consul/$CONSUL_DEB
        if download "$url" "$TMP/$CONSUL_DEB"; then
            got=1
            break
        fi
        log "not at $url, trying the next mirror"
    done
    [ -n "$got" ] || die "cannot download $CONSUL_DEB from any of: $CONSUL_MIRRORS" \
        "check the network; set CONSUL_MIRRORS to a Debian mirror that still has bullseye's pool"
    verify_sha256 "$TMP/$CONSUL_DEB" "$CONSUL_SHA256" \
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

install_unit "$CONSUL_UNIT" "$(unit_text)"
log "done: $("$CONSUL_BIN" version | head -n 1)"
