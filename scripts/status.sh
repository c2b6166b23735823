#!/usr/bin/env bash
# status.sh: one look at the whole deployment, on the VPS.
#
#   scripts/status.sh             Nomad nodes and jobs, Consul members, the
#                                 gateway's /healthz, `dispatcher status`
#   scripts/status.sh --dry-run   print the commands, run nothing
#   scripts/status.sh --help
#
# It changes nothing. Every section runs even when an earlier one fails; the
# exit status is non-zero when any failed (so `watch -n 10 scripts/status.sh`
# and scripts both work).
#
# Sections:
#   1. nomad node status     (every node: the VPS in pool control, GPU nodes in pool gpu)
#   2. nomad job status      (redis, gateway, dispatcher, comfyui, comfy-workflow and its children)
#   3. consul members        (the VPS server and each GPU node's client)
#   4. GET $GATEWAY_URL/healthz
#   5. dispatcher status     (queued, in flight, paused by a drain or not)
#
# Environment (defaults fit the VPS as scripts/deploy-control.sh sets it up;
# /etc/comfy-multi/deploy.env supplies PUBLIC_HOST):
#   NOMAD_ADDR         http://127.0.0.1:4646
#   NOMAD_TOKEN        else /etc/comfy-multi/secrets/nomad-management.token
#   CONSUL_HTTP_ADDR   http://127.0.0.1:8500
#   CONSUL_HTTP_TOKEN  else /etc/comfy-multi/secrets/consul-management.token
#   GATEWAY_URL        https://$PUBLIC_HOST (the name in the gateway's certificate)
#   REDIS_URL          redis://127.0.0.1:6379 (for `dispatcher status`)
#   DISPATCHER         the dispatcher binary (default /opt/comfy-multi/bin/dispatcher)
set -euo pipefail

# NAME and DRY_RUN are read by deploy-lib.sh.
# shellcheck disable=SC2034
NAME=status.sh
# shellcheck disable=SC2034
DRY_RUN=0
# shellcheck source=/dev/null
. "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"
parse_args "$@"

load_deploy_env
NOMAD_ADDR=${NOMAD_ADDR:-http://127.0.0.1:4646}
CONSUL_HTTP_ADDR=${CONSUL_HTTP_ADDR:-http://127.0.0.1:8500}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
DISPATCHER=${DISPATCHER:-$(find_bin dispatcher)}
if [ -z "${GATEWAY_URL:-}" ]; then
    if [ -n "${PUBLIC_HOST:-}" ]; then
        GATEWAY_URL=https://$PUBLIC_HOST
    else
        GATEWAY_URL=https://127.0.0.1
        note "neither GATEWAY_URL nor PUBLIC_HOST is set (no $DEPLOY_ENV): checking $GATEWAY_URL"
    fi
fi

# Tokens: from the environment, else the files deploy-control.sh wrote. Without
# one (not root, or not deployed yet) the commands run without a token.
optional_token() {
    local var=$1 file=$2
    if [ -n "${!var:-}" ] || [ -r "$file" ]; then
        token_from "$var" "$file"
    elif is_dry; then
        note "$var is not set and $file is not readable: the commands would run without a token"
    else
        warn "$var is not set and $file is not readable: running without a token (sudo, or export $var)"
    fi
}
optional_token NOMAD_TOKEN "$SECRETS_DIR/nomad-management.token"
optional_token CONSUL_HTTP_TOKEN "$SECRETS_DIR/consul-management.token"

failed=()
# section TITLE CMD...: run one check, remember a failure, carry on.
section() {
    local title=$1
    shift
    step "$title"
    if ! "$@"; then
        failed+=("$title")
        warn "$title failed (see above)"
    fi
}

nomad_env="NOMAD_ADDR=$NOMAD_ADDR${NOMAD_TOKEN:+ NOMAD_TOKEN=$NOMAD_TOKEN}"
consul_env="CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR${CONSUL_HTTP_TOKEN:+ CONSUL_HTTP_TOKEN=$CONSUL_HTTP_TOKEN}"
dispatcher_env="REDIS_URL=$REDIS_URL EXECUTOR=nomad $nomad_env"

if ! is_dry; then
    for tool in nomad consul curl; do
        command -v "$tool" >/dev/null 2>&1 || warn "$tool not found: its section will fail (scripts/deploy-control.sh installs it)"
    done
fi

section "nomad node status" run_env "$nomad_env" nomad node status -verbose
section "nomad job status" run_env "$nomad_env" nomad job status
section "consul members" run_env "$consul_env" consul members
section "gateway $GATEWAY_URL/healthz" run curl -sS --max-time 10 -w '\nHTTP %{http_code}\n' --fail-with-body "$GATEWAY_URL/healthz"
section "dispatcher status" run_env "$dispatcher_env" "$DISPATCHER" status

if is_dry; then
    log "dry run: nothing was run"
    exit 0
fi
if [ "${#failed[@]}" -gt 0 ]; then
    die "${#failed[@]} section(s) failed: ${failed[*]}" \
        "see docs/operations.md (\"What to do when\") for each part"
fi
log "all sections answered"
