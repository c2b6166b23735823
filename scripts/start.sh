#!/usr/bin/env bash
# Start the local comfy-multi stack on loopback, in the background.
#
#   scripts/start.sh                       # local executor, ComfyUI stand-in
#   COMFYUI_URL=http://127.0.0.1:8188 scripts/start.sh   # a real ComfyUI
#   EXECUTOR=nomad NOMAD_ADDR=http://127.0.0.1:4646 scripts/start.sh
#
# Installs what is missing (scripts/install-deps.sh), builds, starts Redis
# (AOF on), a Consul dev agent, the ComfyUI stand-in (unless COMFYUI_URL is
# set), the gateway and the dispatcher; waits until they are healthy; writes
# .local/stack.env (GATEWAY_URL, ADMIN_TOKEN, USER_CODES and what the CLIs
# need: `set -a; . .local/stack.env`); prints the URLs and codes; returns.
# scripts/stop.sh stops exactly what this started (.local/pids/).
#
# COMFY_MULTI_STATE=dir keeps the stack's state there instead of .local/;
# COMFY_MULTI_BIN=dir uses already built binaries from dir (no cargo build).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
LOCAL=${COMFY_MULTI_STATE:-$root/.local}
PIDS=$LOCAL/pids
LOGS=$LOCAL/logs

say() { printf '[start] %s\n' "$*"; }
die() {
    printf '[start] FAILED: %s\n' "$1" >&2
    [ "$#" -gt 1 ] && printf '[start]   %s\n' "${@:2}" >&2
    exit 1
}

if compgen -G "$PIDS/*.pid" >/dev/null; then
    for f in "$PIDS"/*.pid; do
        if kill -0 "$(cat "$f")" 2>/dev/null; then
            die "the stack is already running ($(basename "$f" .pid) is up)" "run scripts/stop.sh first"
        fi
    done
    rm -f "$PIDS"/*.pid
fi

mkdir -p "$LOCAL"
scripts/install-deps.sh >"$LOCAL/install.log" 2>&1 || {
    cat "$LOCAL/install.log" >&2
    die "installing dependencies" "see the messages above"
}
CACHE=${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}
# shellcheck source=/dev/null
[ -f "$CACHE/env.sh" ] && . "$CACHE/env.sh"
export PATH="$CACHE/bin:$PATH"

if [ -n "${COMFY_MULTI_BIN:-}" ]; then
    BIN=$COMFY_MULTI_BIN
else
    say "building (cargo build --workspace --bins)"
    cargo build --workspace --bins --quiet || die "cargo build" "fix the build errors above"
    TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    BIN=$TARGET/debug
fi

mkdir -p "$PIDS" "$LOGS" "$LOCAL/redis" "$LOCAL/data" "$LOCAL/comfyui/output" "$LOCAL/comfyui/input"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME CMD...: run CMD detached, log to .local/logs/NAME.log, remember its pid.
start() {
    local name=$1
    shift
    setsid nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

# wait_for WHAT URL: until URL answers 2xx, 30 s at most.
wait_for() {
    local what=$1 url=$2 i
    for i in $(seq 1 300); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
        [ "$i" = 300 ] || sleep 0.1
    done
    die "$what did not become healthy at $url" "see $LOGS/"
}

REDIS_PORT=$(free_port)
start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$LOCAL/redis" \
    --appendonly yes --appendfsync always --save "" --daemonize no
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

CONSUL_PORT=$(free_port)
start consul consul agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$CONSUL_PORT" \
    -dns-port -1 -serf-lan-port "$(free_port)" -serf-wan-port "$(free_port)" -server-port "$(free_port)" \
    -grpc-port -1
export CONSUL_HTTP_ADDR="http://127.0.0.1:$CONSUL_PORT"
for i in $(seq 1 300); do
    leader=$(curl -fsS "$CONSUL_HTTP_ADDR/v1/status/leader" 2>/dev/null || true)
    [ -n "$leader" ] && [ "$leader" != '""' ] && break
    [ "$i" = 300 ] && die "Consul did not elect a leader" "see $LOGS/consul.log"
    sleep 0.1
done

# register NAME PORT CHECK_PATH: a service in the local Consul agent.
register() {
    curl -fsS -X PUT "$CONSUL_HTTP_ADDR/v1/agent/service/register" -d @- >/dev/null <<JSON || die "registering $1 in Consul"
{"Name": "$1", "ID": "$1-local", "Address": "127.0.0.1", "Port": $2,
 "Check": {"HTTP": "http://127.0.0.1:$2$3", "Interval": "2s", "Timeout": "2s"}}
JSON
}

# wait_passing NAME: until Consul reports the service passing (what gpu-task asks for).
wait_passing() {
    local i
    for i in $(seq 1 300); do
        if curl -fsS "$CONSUL_HTTP_ADDR/v1/health/service/$1?passing=true" 2>/dev/null | grep -q '"ServiceID"'; then
            return 0
        fi
        [ "$i" = 300 ] || sleep 0.1
    done
    die "Consul never saw $1 passing its health check" "see $LOGS/"
}

if [ -z "${COMFYUI_URL:-}" ]; then
    COMFY_PORT=$(free_port)
    start comfyui-standin "$BIN/comfyui-standin" --listen "127.0.0.1:$COMFY_PORT" \
        --output-dir "$LOCAL/comfyui/output" --input-dir "$LOCAL/comfyui/input"
    COMFY=http://127.0.0.1:$COMFY_PORT
    wait_for "the ComfyUI stand-in" "$COMFY/system_stats"
    register comfyui "$COMFY_PORT" /system_stats
    wait_passing comfyui
else
    COMFY=$COMFYUI_URL
    wait_for "ComfyUI" "$COMFY/system_stats"
fi

GATEWAY_PORT=$(free_port)
export DATA_DIR=$LOCAL/data
export GATEWAY_URL="http://127.0.0.1:$GATEWAY_PORT"
start gateway env GATEWAY_LISTEN="127.0.0.1:$GATEWAY_PORT" "$BIN/gateway" serve
wait_for "the gateway" "$GATEWAY_URL/healthz"
register comfy-gateway "$GATEWAY_PORT" /healthz
wait_passing comfy-gateway

EXECUTOR=${EXECUTOR:-local}
export EXECUTOR
ADMIN_TOKEN=$(cat "$DATA_DIR/secrets/admin-token")
INTERNAL_SECRET=$(cat "$DATA_DIR/secrets/internal-secret")
export INTERNAL_SECRET
if [ "$EXECUTOR" = nomad ]; then
    : "${NOMAD_ADDR:?EXECUTOR=nomad needs NOMAD_ADDR (e.g. a nomad agent -dev)}"
    export NOMAD_ADDR
    node_name=$(curl -fsS "$NOMAD_ADDR/v1/nodes" | python3 -c 'import json,sys; n=json.load(sys.stdin); print(n[0]["Name"] if n else "")')
    "$BIN/dispatcher" register-job nomad/comfy-workflow.nomad.hcl \
        --var gpu_count=0 --var node_pool=default --var "node_name_pattern=^${node_name}\$" \
        --var "gpu_task_command=$BIN/gpu-task" || die "registering comfy-workflow with Nomad at $NOMAD_ADDR"
    start dispatcher "$BIN/dispatcher" run
else
    start dispatcher env GPU_TASK_BIN="$BIN/gpu-task" "$BIN/dispatcher" run
fi
sleep 0.2
kill -0 "$(cat "$PIDS/dispatcher.pid")" 2>/dev/null || die "the dispatcher exited at once" "see $LOGS/dispatcher.log"

USER_CODES=$(tr '\n' ' ' <"$DATA_DIR/secrets/access-codes.txt" | sed 's/ $//')
cat >"$LOCAL/stack.env" <<ENV
GATEWAY_URL=$GATEWAY_URL
ADMIN_TOKEN=$ADMIN_TOKEN
USER_CODES="$USER_CODES"
REDIS_URL=$REDIS_URL
CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR
COMFYUI_URL=$COMFY
EXECUTOR=$EXECUTOR
DATA_DIR=$DATA_DIR
INTERNAL_SECRET=$INTERNAL_SECRET
${NOMAD_ADDR:+NOMAD_ADDR=$NOMAD_ADDR}
ENV
chmod 600 "$LOCAL/stack.env"

say "comfy-multi is up (executor: $EXECUTOR)"
say "  gateway:  $GATEWAY_URL (participants log in at $GATEWAY_URL/login)"
say "  admin:    $GATEWAY_URL/admin/ (log in with ADMIN_TOKEN from $LOCAL/stack.env)"
say "  ComfyUI:  $COMFY"
say "  Consul:   $CONSUL_HTTP_ADDR"
say "  Redis:    $REDIS_URL"
say "  access codes (n:code): $USER_CODES"
say "  logs in $LOGS/; settings for the CLIs: set -a; . $LOCAL/stack.env"
say "  stop with scripts/stop.sh"
