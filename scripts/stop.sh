#!/usr/bin/env bash
# Stop exactly what scripts/start.sh started (the pids in .local/pids/, or in
# $COMFY_MULTI_STATE/pids/ when that is set).
# Each process gets SIGTERM, then SIGKILL if it is still there after 10 s.
# Data (.local/data, .local/redis) is kept; remove .local/ to start afresh.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
LOCAL=${COMFY_MULTI_STATE:-$root/.local}
PIDS=$LOCAL/pids

if ! compgen -G "$PIDS/*.pid" >/dev/null; then
    echo "[stop] nothing to stop"
    exit 0
fi
# Dispatcher and gateway first, Redis last, so nothing loses its store early.
for name in dispatcher gateway comfyui-standin consul redis; do
    f=$PIDS/$name.pid
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "[stop] stopped $name ($pid)"
    fi
    rm -f "$f"
done
rm -f "$LOCAL/stack.env"
