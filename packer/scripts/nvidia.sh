#!/usr/bin/env bash
# nvidia.sh: make sure the GPU node has the NVIDIA driver comfy-multi expects.
#
#   nvidia.sh            verify the driver (installs nothing; fails if absent)
#   nvidia.sh --check    the same check, for an already provisioned host
#   nvidia.sh --help
#
# The driver comes with the Verda OS image (e.g. ubuntu-24.04-cuda-12.8-open-docker
# ships the 570 series); this script never installs or upgrades one, because a
# driver change needs a reboot and must match the CUDA build of torch.
# It asks `nvidia-smi` for every GPU's driver version, name and UUID and fails
# when nvidia-smi is missing, cannot talk to the driver, sees no GPU, or
# reports a driver whose major version is not NVIDIA_DRIVER_MAJOR.
#
# Environment:
#   NVIDIA_DRIVER_MAJOR   expected driver major version (default 570; Packer
#                         passes its `nvidia_driver_major` variable)
set -euo pipefail

NAME=nvidia.sh
NVIDIA_DRIVER_MAJOR=${NVIDIA_DRIVER_MAJOR:-570}

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args "$@"

case $NVIDIA_DRIVER_MAJOR in
    '' | *[!0-9]*) die "NVIDIA_DRIVER_MAJOR must be a number, got '$NVIDIA_DRIVER_MAJOR'" "set it to e.g. 570" ;;
esac

FIX_IMAGE="create the instance from a Verda image that ships NVIDIA driver $NVIDIA_DRIVER_MAJOR (e.g. ubuntu-24.04-cuda-12.8-open-docker), or set nvidia_driver_major / NVIDIA_DRIVER_MAJOR to the driver you mean to use"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    die "nvidia-smi not found: no NVIDIA driver is installed on this host (expected driver $NVIDIA_DRIVER_MAJOR.x)" "$FIX_IMAGE"
fi

if ! out=$(nvidia-smi --query-gpu=driver_version,name,uuid --format=csv,noheader 2>&1); then
    die "nvidia-smi cannot talk to the driver: ${out//$'\n'/ }" \
        "check 'lsmod | grep nvidia' and 'dmesg | grep -i nvidia'; a kernel update without a matching driver module needs a reboot or a fresh instance"
fi

gpus=0
while IFS=, read -r version name uuid; do
    version=${version// /}
    [ -n "$version" ] || continue
    gpus=$((gpus + 1))
    major=${version%%.*}
    if [ "$major" != "$NVIDIA_DRIVER_MAJOR" ]; then
        die "GPU${name:+ ${name# }} (${uuid# }) runs driver $version, expected major version $NVIDIA_DRIVER_MAJOR" "$FIX_IMAGE"
    fi
    log "GPU ${name# } ${uuid# }: driver $version"
done <<<"$out"

if [ "$gpus" -eq 0 ]; then
    die "nvidia-smi lists no GPU" "check that the instance type has a GPU (e.g. 1H100.80S.30V) and that 'nvidia-smi -L' shows it"
fi

if [ "$MODE" = check ]; then
    log "ok: $gpus GPU(s) on driver $NVIDIA_DRIVER_MAJOR.x"
else
    log "ok: $gpus GPU(s) on driver $NVIDIA_DRIVER_MAJOR.x; nothing to install"
fi
