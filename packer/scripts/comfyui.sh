#!/usr/bin/env bash
# comfyui.sh: install ComfyUI at a pinned git commit in its own venv under
# /opt/comfyui. No systemd unit: Nomad runs the warm ComfyUI (nomad/comfyui
# job) on the GPU node.
#
#   comfyui.sh            install (idempotent; needs root)
#   comfyui.sh --check    verify an already provisioned host, change nothing
#   comfyui.sh --help
#
# What it does:
#   - apt-get installs git, python3-venv, python3-pip (Ubuntu on Verda);
#   - clones $COMFYUI_REPO into $COMFYUI_DIR and checks out $COMFYUI_COMMIT
#     (detached; the commit is verified with `git rev-parse HEAD`);
#   - makes the venv $COMFYUI_DIR/venv and pip-installs ComfyUI's
#     requirements.txt from PyPI, with torch/torchvision/torchaudio held to
#     $TORCH_PINS (a pip constraints file; PyPI's Linux torch wheels are
#     CUDA builds);
#   - creates the system user `comfyui` and gives it the folders ComfyUI
#     writes (input, output, temp, user), so the Nomad job may run it
#     unprivileged; models/ stays root-owned (scripts/models.sh fills it);
#     $COMFYUI_DIR/models and $COMFYUI_DIR/output are also the host volumes
#     comfyui-models and comfyui-output of nomad/agent/client-gpu.hcl;
#   - runs `python main.py --quick-test-for-ci --cpu` once as user comfyui:
#     ComfyUI imports and loads its nodes (no GPU needed for that).
#
# --check verifies the checkout's commit, the venv, that ComfyUI's
# requirements import, and that torch sees a CUDA GPU.
#
# Environment (defaults = the pins in packer/gpu-node.pkr.hcl):
#   COMFYUI_COMMIT   637221995f7424a561bd825de3e61ea117dfe1e3 (v0.3.64)
#   COMFYUI_REPO     https://github.com/Comfy-Org/ComfyUI.git
#   COMFYUI_DIR      /opt/comfyui
#   TORCH_PINS       "torch==2.8.0 torchvision==0.23.0 torchaudio==2.8.0"
set -euo pipefail

NAME=comfyui.sh
COMFYUI_COMMIT=${COMFYUI_COMMIT:-637221995f7424a561bd825de3e61ea117dfe1e3}
COMFYUI_REPO=${COMFYUI_REPO:-https://github.com/Comfy-Org/ComfyUI.git}
COMFYUI_DIR=${COMFYUI_DIR:-/opt/comfyui}
TORCH_PINS=${TORCH_PINS:-torch==2.8.0 torchvision==0.23.0 torchaudio==2.8.0}
VENV=$COMFYUI_DIR/venv
PY=$VENV/bin/python
STAMP=$COMFYUI_DIR/.comfy-multi-installed
WRITABLE=(input output temp user)
# Modules ComfyUI's requirements.txt brings (import names), checked by --check.
IMPORTS=(torch torchvision torchaudio torchsde numpy einops transformers tokenizers sentencepiece safetensors aiohttp yarl yaml PIL scipy tqdm psutil alembic sqlalchemy av kornia spandrel pydantic pydantic_settings comfyui_frontend_package comfyui_workflow_templates comfyui_embedded_docs)

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args "$@"

case $COMFYUI_COMMIT in
    *[!0-9a-f]* | '') die "COMFYUI_COMMIT must be a full git commit id (40 hex digits), got '$COMFYUI_COMMIT'" "pin a commit, not a branch or tag" ;;
esac
[ "${#COMFYUI_COMMIT}" -eq 40 ] || die "COMFYUI_COMMIT must be a full 40-digit commit id, got '$COMFYUI_COMMIT'" "pin a commit, not a branch or tag"

head_commit() { git -C "$COMFYUI_DIR" rev-parse HEAD 2>/dev/null || true; }

# What the stamp records: the inputs of a finished install.
stamp_text() { printf 'commit=%s\ntorch=%s\n' "$COMFYUI_COMMIT" "$TORCH_PINS"; }

imports_py() {
    local m
    printf 'import importlib, sys\nmissing = []\n'
    for m in "${IMPORTS[@]}"; do
        printf 'try:\n    importlib.import_module(%s)\nexcept Exception as e:\n    missing.append("%s (%%s)" %% e)\n' "'$m'" "$m"
    done
    printf 'print("\\n".join(missing))\n'
}

# ---- --check ------------------------------------------------------------------
if [ "$MODE" = check ]; then
    problems=()
    if [ ! -d "$COMFYUI_DIR/.git" ]; then
        problems+=("$COMFYUI_DIR is not a ComfyUI checkout (no .git)")
    elif [ "$(head_commit)" != "$COMFYUI_COMMIT" ]; then
        problems+=("$COMFYUI_DIR is at commit '$(head_commit)', expected $COMFYUI_COMMIT")
    fi
    if [ ! -x "$PY" ]; then
        problems+=("venv $VENV is missing")
    else
        missing=$("$PY" -c "$(imports_py)" 2>&1) || missing="the import check itself failed: $missing"
        if [ -n "$missing" ]; then
            while IFS= read -r line; do problems+=("python module missing in $VENV: $line"); done <<<"$missing"
        fi
        cuda=$("$PY" -c 'import torch; print(torch.cuda.is_available(), torch.version.cuda)' 2>&1 || true)
        case $cuda in
            True*) ;;
            *) problems+=("torch in $VENV sees no CUDA GPU (torch says: ${cuda//$'\n'/ })") ;;
        esac
    fi
    [ "$(cat "$STAMP" 2>/dev/null || true)" = "$(stamp_text)" ] \
        || problems+=("install stamp $STAMP missing or from other pins (the install did not finish)")
    getent passwd comfyui >/dev/null 2>&1 || problems+=("system user 'comfyui' is missing")
    [ -d "$COMFYUI_DIR/models" ] || problems+=("$COMFYUI_DIR/models (host volume comfyui-models) is missing")
    for d in "${WRITABLE[@]}"; do
        [ "$(stat -c %U "$COMFYUI_DIR/$d" 2>/dev/null || true)" = comfyui ] \
            || problems+=("$COMFYUI_DIR/$d is missing or not owned by comfyui (output/ is the host volume comfyui-output)")
    done
    if [ "${#problems[@]}" -gt 0 ]; then
        print_missing "${problems[@]}"
        die "this host has no usable ComfyUI at $COMFYUI_DIR (${#problems[@]} problem(s) above)" \
            "run 'sudo $0' (the Packer build does it for the GPU image); torch without a GPU: see nvidia.sh --check"
    fi
    log "ok: ComfyUI $COMFYUI_COMMIT in $COMFYUI_DIR, venv $VENV, torch sees a GPU"
    exit 0
fi

# ---- install ------------------------------------------------------------------
need_root "$0"

need=()
command -v git >/dev/null 2>&1 || need+=(git)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv python3-pip)
if [ "${#need[@]}" -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -q || die "apt-get update" "check the network and /etc/apt/sources.list*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" \
        || die "apt-get install ${need[*]}" "run it by hand and read its error"
fi

if [ ! -d "$COMFYUI_DIR/.git" ]; then
    log "cloning $COMFYUI_REPO into $COMFYUI_DIR"
    install -d -m 0755 "$COMFYUI_DIR"
    git clone --quiet --no-checkout "$COMFYUI_REPO" "$COMFYUI_DIR.clone" \
        || die "git clone $COMFYUI_REPO failed" "check the network to github.com"
    mv "$COMFYUI_DIR.clone/.git" "$COMFYUI_DIR/.git"
    rmdir "$COMFYUI_DIR.clone"
fi
if [ "$(head_commit)" != "$COMFYUI_COMMIT" ]; then
    git -C "$COMFYUI_DIR" cat-file -e "$COMFYUI_COMMIT^{commit}" 2>/dev/null \
        || git -C "$COMFYUI_DIR" fetch --quiet origin \
        || die "git fetch in $COMFYUI_DIR failed" "check the network to github.com"
    git -C "$COMFYUI_DIR" -c advice.detachedHead=false checkout --quiet --force "$COMFYUI_COMMIT" \
        || die "commit $COMFYUI_COMMIT not found in $COMFYUI_REPO" "check comfyui_commit in packer/gpu-node.pkr.hcl"
fi
[ "$(head_commit)" = "$COMFYUI_COMMIT" ] || die "$COMFYUI_DIR is not at $COMFYUI_COMMIT after checkout" "remove $COMFYUI_DIR and run again"
log "ComfyUI checkout at $COMFYUI_COMMIT"

if [ "$(cat "$STAMP" 2>/dev/null || true)" = "$(stamp_text)" ] && [ -x "$PY" ]; then
    log "venv $VENV already installed for these pins"
else
    [ -x "$PY" ] || python3 -m venv "$VENV" || die "python3 -m venv $VENV failed" "apt-get install -y python3-venv"
    read -r -a pins <<<"$TORCH_PINS"
    printf '%s\n' "${pins[@]}" >"$VENV/constraints.txt"
    log "pip install -r requirements.txt (torch held to: $TORCH_PINS); this downloads a few GB"
    "$PY" -m pip install --quiet --upgrade pip \
        || die "pip upgrade failed" "check the network to pypi.org"
    "$PY" -m pip install --quiet -c "$VENV/constraints.txt" -r "$COMFYUI_DIR/requirements.txt" \
        || die "pip install -r $COMFYUI_DIR/requirements.txt failed" "read pip's error above; check the network to pypi.org"
    missing=$("$PY" -c "$(imports_py)" 2>&1) || missing="the import check itself failed: $missing"
    [ -z "$missing" ] || die "modules still missing after pip install: ${missing//$'\n'/; }" "read pip's output above"
    stamp_text >"$STAMP"
fi

if ! getent passwd comfyui >/dev/null 2>&1; then
    useradd --system --home-dir "$COMFYUI_DIR" --no-create-home --shell /usr/sbin/nologin comfyui
    log "created system user comfyui"
fi
for d in "${WRITABLE[@]}"; do
    install -d -m 0755 -o comfyui -g comfyui "$COMFYUI_DIR/$d"
done
install -d -m 0755 "$COMFYUI_DIR/models"
log "smoke test as user comfyui: main.py --quick-test-for-ci --cpu"
smoke_log=$(mktemp)
(cd "$COMFYUI_DIR" && runuser -u comfyui -- "$PY" main.py --quick-test-for-ci --cpu --disable-auto-launch >"$smoke_log" 2>&1) \
    || die "ComfyUI's quick test failed (log: $smoke_log)" "read the log; a missing module means the pip install is incomplete"
rm -f "$smoke_log"
log "done: ComfyUI $COMFYUI_COMMIT in $COMFYUI_DIR"
