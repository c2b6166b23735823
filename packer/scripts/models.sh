#!/usr/bin/env bash
# models.sh: download the models of a manifest into ComfyUI's models folder,
# each verified by its sha256.
#
#   models.sh [MANIFEST]            download what is missing (needs root)
#   models.sh --check [MANIFEST]    verify every file, change nothing
#   models.sh --help
#
# MANIFEST (default $MODELS_MANIFEST, else models.json next to this script,
# else ../models.json, i.e. packer/models.json in the repository) is JSON:
#
#   {"models": [{"name": "v1-5-pruned-emaonly.safetensors",
#                "url": "https://huggingface.co/.../v1-5-pruned-emaonly.safetensors",
#                "sha256": "<64 hex digits>",
#                "target": "checkpoints"}]}
#
# Each entry becomes $COMFYUI_DIR/models/<target>/<name>. A file already there
# with the right sha256 is skipped; otherwise it is downloaded (resumably) to
# <name>.part, hashed, and moved into place only if the sha256 matches; a
# mismatch removes the download and fails. An entry whose sha256 is not 64
# hex digits (e.g. "PLACEHOLDER") is refused by the install and reported by
# --check: pin the real value first.
#
# Environment:
#   COMFYUI_DIR       /opt/comfyui
#   MODELS_MANIFEST   the manifest (see above)
#   HF_TOKEN          optional Hugging Face token, sent only to huggingface.co
#                     (for gated models); never printed
set -euo pipefail

NAME=models.sh
COMFYUI_DIR=${COMFYUI_DIR:-/opt/comfyui}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
MANIFEST=${MODELS_MANIFEST:-}
script_arg() { case $1 in -*) return 1 ;; *) MANIFEST=$1 ;; esac; }
parse_args "$@"
if [ -z "$MANIFEST" ]; then
    if [ -f "$HERE/models.json" ]; then MANIFEST=$HERE/models.json; else MANIFEST=$HERE/../models.json; fi
fi
[ -f "$MANIFEST" ] || die "model manifest not found: $MANIFEST" "pass its path (packer/models.json) or set MODELS_MANIFEST"
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed to read the manifest)" "apt-get install -y python3"

# The manifest as validated lines: name<TAB>url<TAB>sha256<TAB>target.
# Structural errors fail here; a non-hex sha256 is passed through so --check
# can report it as a placeholder.
entries=$(python3 - "$MANIFEST" <<'PY'
import json, re, sys
path = sys.argv[1]
try:
    doc = json.load(open(path))
except Exception as e:
    sys.exit(f"{path} is not valid JSON: {e}")
models = doc.get("models") if isinstance(doc, dict) else doc
if not isinstance(models, list):
    sys.exit(f'{path}: expected {{"models": [...]}}')
safe = re.compile(r"^[A-Za-z0-9._+-]+$")
for i, m in enumerate(models):
    where = f"{path}: models[{i}]"
    if not isinstance(m, dict):
        sys.exit(f"{where} is not an object")
    for key in ("name", "url", "sha256", "target"):
        if not isinstance(m.get(key), str) or not m[key]:
            sys.exit(f'{where} has no "{key}" string')
    if not safe.match(m["name"]) or m["name"] in (".", ".."):
        sys.exit(f'{where}: name "{m["name"]}" must be a plain file name')
    parts = m["target"].split("/")
    if any(not safe.match(p) or p in (".", "..") for p in parts):
        sys.exit(f'{where}: target "{m["target"]}" must be a folder under models/ (e.g. checkpoints)')
    if not m["url"].startswith("https://"):
        sys.exit(f'{where}: url must be https')
    if any(c in m[k] for k in m if isinstance(m[k], str) for c in "\t\n"):
        sys.exit(f"{where}: fields must not contain tabs or newlines")
    sha = m["sha256"].lower() if re.fullmatch(r"[0-9a-fA-F]{64}", m["sha256"]) else m["sha256"]
    print("\t".join((m["name"], m["url"], sha, m["target"])))
PY
) || die "cannot use the model manifest $MANIFEST" "fix the entry named above"

is_sha256() { [[ $1 =~ ^[0-9a-f]{64}$ ]]; }

count=0
problems=()
while IFS=$'\t' read -r name url sha target; do
    [ -n "$name" ] || continue
    count=$((count + 1))
    dest=$COMFYUI_DIR/models/$target/$name
    if ! is_sha256 "$sha"; then
        problems+=("$name: sha256 is a placeholder ('$sha'), not a verified checksum; pin the published sha256 in $MANIFEST")
        continue
    fi
    if [ "$MODE" = check ]; then
        if [ ! -f "$dest" ]; then
            problems+=("$name: $dest is missing")
        elif [ "$(sha_of "$dest")" != "$sha" ]; then
            problems+=("$name: $dest has the wrong sha256 (expected $sha)")
        else
            log "ok: $dest"
        fi
        continue
    fi

    need_root "$0 $MANIFEST"
    if [ -f "$dest" ]; then
        if [ "$(sha_of "$dest")" = "$sha" ]; then
            log "$name: already present with the right sha256, skipped"
            continue
        fi
        log "$name: $dest has a different sha256, downloading it again"
    fi
    install -d -m 0755 "$(dirname "$dest")"
    auth=()
    case $url in
        https://huggingface.co/*) [ -z "${HF_TOKEN:-}" ] || auth=(-H "Authorization: Bearer $HF_TOKEN") ;;
    esac
    log "$name: downloading $url"
    curl -fL --retry 5 --retry-delay 5 -C - --progress-bar "${auth[@]}" -o "$dest.part" "$url" \
        || die "$name: download failed: $url" "check the URL and the network; a 401/403 from Hugging Face means a gated model (set HF_TOKEN)"
    got=$(sha_of "$dest.part")
    if [ "$got" != "$sha" ]; then
        rm -f "$dest.part"
        die "$name: sha256 mismatch: got $got, expected $sha (download removed)" \
            "do not use this file; check the url and sha256 in $MANIFEST"
    fi
    chmod 0644 "$dest.part"
    mv -f "$dest.part" "$dest"
    log "$name: verified and installed at $dest"
done <<<"$entries"

[ "$count" -gt 0 ] || log "the manifest $MANIFEST lists no models"
if [ "${#problems[@]}" -gt 0 ]; then
    print_missing "${problems[@]}"
    if [ "$MODE" = check ]; then
        die "${#problems[@]} of $count model(s) not in place under $COMFYUI_DIR/models (listed above)" \
            "run 'sudo $0 $MANIFEST' (the Packer build does it for the GPU image)"
    fi
    die "${#problems[@]} model(s) have no verified sha256 (listed above)" "pin the published sha256 values in $MANIFEST"
fi
log "ok: $count model(s) in place under $COMFYUI_DIR/models"
