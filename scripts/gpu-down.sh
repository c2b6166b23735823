#!/usr/bin/env bash
# gpu-down.sh: empty the GPU node, then delete the Verda instance. On the VPS.
#
#   scripts/gpu-down.sh                     drain, then delete the one recorded GPU node
#   scripts/gpu-down.sh --hostname NAME     the node gpu-up.sh recorded under NAME
#   scripts/gpu-down.sh --instance-id ID    a Verda instance by id (no record needed)
#   scripts/gpu-down.sh --force             delete even when the drain failed
#   scripts/gpu-down.sh --keep-volume       keep the node's OS volume (billed) for a post-mortem
#   scripts/gpu-down.sh --dry-run           print every command and HTTP request, change nothing
#   scripts/gpu-down.sh --help
#
# Steps:
#   1. `dispatcher drain --deadline "${DRAIN_DEADLINE:-10m}"`: dispatching
#      pauses, running workflows get until the deadline, what is still running
#      then goes back to the queue, the GPU pool is drained in Nomad. Queued
#      jobs and every output stay on the VPS (DATA_DIR/users/N/output/).
#      If the drain fails, nothing is deleted (exit 1) unless --force.
#   2. The node's own Consul ACL tokens (made by gpu-up.sh) are deleted.
#   3. PUT /v1/instances {"action":"delete", "id":[ID],
#      "volume_ids":[OS volume], "delete_permanently":true}: the instance and
#      its OS volume (a clone of the base image; the base stays), then it
#      waits until Verda reports the instance gone.
#   4. The node's startup script is deleted from Verda if still there, and
#      its record in /var/lib/comfy-multi/gpu/ is moved to *.deleted.
# Dispatching stays paused afterwards; `scripts/gpu-up.sh` resumes it on the
# next GPU node (or run `dispatcher resume` yourself).
#
# Environment:
#   VERDA_CLIENT_ID, VERDA_CLIENT_SECRET   Verda API credentials, or
#   VERDA_CREDENTIALS_FILE                 a file outside the repository holding them
#   DRAIN_DEADLINE     how long running workflows may take (default 10m)
#   POLL_INTERVAL      seconds between two looks at Verda while waiting for the deletion (default 10)
#   NOMAD_ADDR         http://127.0.0.1:4646
#   NOMAD_TOKEN        else /etc/comfy-multi/secrets/nomad-management.token
#   CONSUL_HTTP_ADDR   http://127.0.0.1:8500
#   CONSUL_HTTP_TOKEN  else /etc/comfy-multi/secrets/consul-management.token
#   REDIS_URL          redis://127.0.0.1:6379
#   DISPATCHER         the dispatcher binary (default /opt/comfy-multi/bin/dispatcher)
#   VERDA_API          https://api.verda.com/v1
set -euo pipefail

# NAME and DRY_RUN are read by deploy-lib.sh.
# shellcheck disable=SC2034
NAME=gpu-down.sh
# shellcheck disable=SC2034
DRY_RUN=0
FORCE=0
KEEP_VOLUME=0
HOST=
INSTANCE_ID=
# ARG_USED is read by deploy-lib.sh's parse_args.
# shellcheck disable=SC2034
script_arg() {
    case $1 in
        --force) FORCE=1 ;;
        --keep-volume) KEEP_VOLUME=1 ;;
        --hostname) need_value "$1" "$#"; HOST=$2; ARG_USED=2 ;;
        --hostname=*) HOST=${1#*=} ;;
        --instance-id) need_value "$1" "$#"; INSTANCE_ID=$2; ARG_USED=2 ;;
        --instance-id=*) INSTANCE_ID=${1#*=} ;;
        *) return 1 ;;
    esac
}
# shellcheck source=/dev/null
. "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"
parse_args "$@"

need_root
load_deploy_env
DRAIN_DEADLINE=${DRAIN_DEADLINE:-10m}
POLL_INTERVAL=${POLL_INTERVAL:-10}
NOMAD_ADDR=${NOMAD_ADDR:-http://127.0.0.1:4646}
CONSUL_HTTP_ADDR=${CONSUL_HTTP_ADDR:-http://127.0.0.1:8500}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
DISPATCHER=${DISPATCHER:-$(find_bin dispatcher)}
GPU_STATE_DIR=$STATE_DIR/gpu
if ! is_dry; then
    need_tool curl
    need_tool jq
    need_tool consul
    [ -x "$DISPATCHER" ] || die "dispatcher binary not found at $DISPATCHER" "run scripts/deploy-control.sh, or set DISPATCHER"
fi

# ---- which node -------------------------------------------------------------------
STATE_FILE=
GPU_HOSTNAME=
VERDA_INSTANCE_ID=
VERDA_OS_VOLUME_ID=
VERDA_SCRIPT_ID=
CONSUL_TOKEN_ACCESSORS=
if [ -n "$HOST" ]; then
    STATE_FILE=$GPU_STATE_DIR/$HOST.env
    [ -r "$STATE_FILE" ] || is_dry || [ -n "$INSTANCE_ID" ] \
        || die "no record of a GPU node named $HOST in $GPU_STATE_DIR" "ls $GPU_STATE_DIR, or pass --instance-id"
elif [ -z "$INSTANCE_ID" ]; then
    records=()
    if [ -d "$GPU_STATE_DIR" ]; then
        while IFS= read -r f; do records+=("$f"); done < <(find "$GPU_STATE_DIR" -maxdepth 1 -name '*.env' | sort)
    fi
    case ${#records[@]} in
        1) STATE_FILE=${records[0]} ;;
        0)
            is_dry || die "no GPU node recorded in $GPU_STATE_DIR" \
                "pass --instance-id ID (Verda console, or GET /v1/instances) for a node gpu-up.sh did not create"
            note "no GPU node recorded in $GPU_STATE_DIR: using placeholders"
            ;;
        *) die "${#records[@]} GPU nodes recorded in $GPU_STATE_DIR" "pass --hostname NAME (one of: $(basename -a -s .env "${records[@]}" | tr '\n' ' '))" ;;
    esac
fi
if [ -n "$STATE_FILE" ] && [ -r "$STATE_FILE" ]; then
    while IFS= read -r line; do
        [[ $line =~ ^(GPU_HOSTNAME|VERDA_INSTANCE_ID|VERDA_OS_VOLUME_ID|VERDA_SCRIPT_ID|CONSUL_TOKEN_ACCESSORS)=(.*)$ ]] \
            && printf -v "${BASH_REMATCH[1]}" '%s' "${BASH_REMATCH[2]}"
    done <"$STATE_FILE"
    log "GPU node from $STATE_FILE: $GPU_HOSTNAME, instance $VERDA_INSTANCE_ID"
fi
INSTANCE_ID=${INSTANCE_ID:-$VERDA_INSTANCE_ID}
if [ -z "$INSTANCE_ID" ]; then
    is_dry || die "no instance id for the GPU node" "pass --instance-id ID"
    INSTANCE_ID='<instance-id>'
fi
GPU_HOSTNAME=${GPU_HOSTNAME:-${HOST:-<gpu-hostname>}}

token_from NOMAD_TOKEN "$SECRETS_DIR/nomad-management.token"

# ---- 1. drain ---------------------------------------------------------------------
step "1. drain: dispatcher drain --deadline $DRAIN_DEADLINE"
drain_env="REDIS_URL=$REDIS_URL EXECUTOR=nomad NOMAD_ADDR=$NOMAD_ADDR NOMAD_TOKEN=$NOMAD_TOKEN NOMAD_GPU_NODE_POOL=${NOMAD_GPU_NODE_POOL:-gpu}"
if run_env "$drain_env" "$DISPATCHER" drain --deadline "$DRAIN_DEADLINE"; then
    is_dry || log "drain done: nothing runs on the GPU any more"
elif [ "$FORCE" = 1 ]; then
    warn "the drain failed; deleting anyway because of --force (workflows still running on the node are lost; their jobs stay in Redis)"
else
    die "the drain failed: refusing to delete the GPU node" \
        "read the drain's error above (Redis and Nomad must be reachable: scripts/status.sh), fix it and run again" \
        "or run with --force to delete the node anyway"
fi

# ---- 2. the node's Consul tokens ---------------------------------------------------
step "2. delete the GPU node's Consul ACL tokens"
if [ -n "$CONSUL_TOKEN_ACCESSORS" ] || is_dry; then
    token_from CONSUL_HTTP_TOKEN "$SECRETS_DIR/consul-management.token"
    consul_env="CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR CONSUL_HTTP_TOKEN=$CONSUL_HTTP_TOKEN"
    for accessor in ${CONSUL_TOKEN_ACCESSORS:-<agent-token-accessor> <nomad-client-token-accessor>}; do
        run_env "$consul_env" consul acl token delete -id "$accessor" \
            || warn "could not delete Consul token $accessor (delete it with 'consul acl token delete -id $accessor')"
    done
else
    log "no Consul tokens recorded for this node"
fi

# ---- 3. delete the instance ---------------------------------------------------------
step "3. delete Verda instance $INSTANCE_ID ($GPU_HOSTNAME)"
verda_login
gone=0
if ! answer=$(verda GET "/instances/$INSTANCE_ID" "" "{\"id\":\"$INSTANCE_ID\",\"status\":\"running\",\"os_volume_id\":\"${VERDA_OS_VOLUME_ID:-<os-volume-id>}\"}"); then
    if [ "$FORCE" = 1 ]; then
        warn "GET /instances/$INSTANCE_ID failed; trying the delete anyway"
        answer='{}'
    else
        die "cannot read instance $INSTANCE_ID from Verda (see the answer above)" \
            "an instance that no longer exists answers 404: check the id in the Verda console" \
            "run with --force to send the delete anyway"
    fi
fi
if is_dry; then
    status=running
    os_volume=${VERDA_OS_VOLUME_ID:-<os-volume-id>}
else
    status=$(printf '%s' "$answer" | jq -r '.status // empty')
    os_volume=$(printf '%s' "$answer" | jq -r '.os_volume_id // empty')
    os_volume=${os_volume:-$VERDA_OS_VOLUME_ID}
fi
case $status in
    deleting | discontinued | notfound) log "instance $INSTANCE_ID is already $status"; gone=1 ;;
esac
if [ "$gone" = 0 ]; then
    if [ "$KEEP_VOLUME" = 1 ] || [ -z "$os_volume" ]; then
        [ -n "$os_volume" ] || warn "Verda reports no OS volume for $INSTANCE_ID: only the instance is deleted"
        volumes='[]'
    else
        volumes=$(json_list "$os_volume")
    fi
    verda PUT /instances "{\"action\":\"delete\",\"id\":$(json_list "$INSTANCE_ID"),\"volume_ids\":$volumes,\"delete_permanently\":true}" >/dev/null \
        || die "Verda refused to delete instance $INSTANCE_ID (see the answer above)" \
            "retry; or delete it in the Verda console (with its OS volume, or it keeps billing)"
    instance_gone() {
        local a s
        a=$(verda_curl GET "$VERDA_API/instances/$INSTANCE_ID" "" "$VERDA_TOKEN" 2>/dev/null) || return 0
        s=$(printf '%s' "$a" | jq -r '.status // empty')
        case $s in deleting | discontinued | notfound | '') return 0 ;; esac
        return 1
    }
    wait_for "Verda to report instance $INSTANCE_ID deleted" 600 "$POLL_INTERVAL" instance_gone \
        || die "instance $INSTANCE_ID is still there after 10 minutes" "check it in the Verda console and delete it there (it is billed while it exists)"
    is_dry || log "instance $INSTANCE_ID deleted$([ "$KEEP_VOLUME" = 1 ] && printf ' (OS volume %s kept, still billed)' "$os_volume")"
fi

# ---- 4. leftovers ---------------------------------------------------------------------
step "4. clean up"
if [ -n "$VERDA_SCRIPT_ID" ] || is_dry; then
    verda DELETE "/scripts/${VERDA_SCRIPT_ID:-<startup-script-id>}" >/dev/null \
        || log "startup script ${VERDA_SCRIPT_ID} already gone"
fi
if [ -n "$STATE_FILE" ] && { [ -f "$STATE_FILE" ] || is_dry; }; then
    run mv -f "$STATE_FILE" "${STATE_FILE%.env}.deleted"
fi
if is_dry; then
    log "dry run: nothing was changed"
else
    log "done: $GPU_HOSTNAME is gone; outputs stay on the VPS under $DATA_DIR_HOST/users/; dispatching stays paused until the next scripts/gpu-up.sh"
fi
