#!/usr/bin/env bash
# gpu-up.sh: rent the GPU node. On the VPS, after scripts/deploy-control.sh.
#
#   scripts/gpu-up.sh             create the Verda instance and wait until it is a ready Nomad node
#   scripts/gpu-up.sh --dry-run   print every command and HTTP request (secrets as ***), change nothing
#   scripts/gpu-up.sh --help
#
# Steps:
#   1. Two Consul ACL tokens for the new node: its Consul agent
#      (policy consul-agent) and its Nomad client (policy nomad-client).
#   2. The first-boot script: it writes the Consul client config
#      (consul/client-gpu.hcl + gossip key, CA certificate, join address
#      CONTROL_ADDR, agent token) and the Nomad client config
#      (nomad/agent/client-gpu.hcl + mTLS client certificate, Consul token,
#      retry_join CONTROL_ADDR:4647, the GPUs' UUIDs as client meta), checks
#      the Consul config, and enables and starts consul and nomad.
#   3. Verda API (OAuth2 client credentials): clone the base OS volume made by
#      Packer (PUT /v1/volumes, action clone), upload the first-boot script
#      (POST /v1/scripts), create the instance from the clone
#      (POST /v1/instances), wait until it is running.
#   4. Wait until the node is `ready` in Nomad (pool gpu) with its NVIDIA
#      GPU(s) fingerprinted, then delete the first-boot script from Verda (it
#      holds secrets) and `dispatcher resume` (a previous drain leaves
#      dispatching paused). The warm ComfyUI (system job comfyui) starts on
#      the node by itself.
# The node is recorded in /var/lib/comfy-multi/gpu/<hostname>.env for
# scripts/gpu-down.sh. If creating the instance fails, what was made is
# removed again.
#
# Environment:
#   CONTROL_ADDR           required: the VPS address the node joins (IP or DNS
#                          name; Consul 8300/8301 and Nomad 4647 reachable there)
#   VERDA_BASE_VOLUME_ID   required: the OS volume the Packer build left (packer/README.md)
#   VERDA_CLIENT_ID, VERDA_CLIENT_SECRET   Verda API credentials, or
#   VERDA_CREDENTIALS_FILE                 a file outside the repository holding them
#   VERDA_INSTANCE_TYPE    default 1H100.80S.30V (one H100 80 GB)
#   VERDA_LOCATION         default: the base volume's location
#   VERDA_SSH_KEY_IDS      comma-separated Verda SSH key ids (for `ssh root@<node>`)
#   GPU_HOSTNAME           default comfy-gpu-<yyyymmdd-hhmm>
#   UP_TIMEOUT             seconds to wait for each of: clone, running, Nomad ready (default 1200)
#   POLL_INTERVAL          seconds between two looks at Verda / Nomad while waiting (default 15)
#   NOMAD_ADDR, NOMAD_TOKEN, CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, REDIS_URL,
#   DISPATCHER, VERDA_API  as for scripts/gpu-down.sh
set -euo pipefail

# NAME and DRY_RUN are read by deploy-lib.sh.
# shellcheck disable=SC2034
NAME=gpu-up.sh
# shellcheck disable=SC2034
DRY_RUN=0
# shellcheck source=/dev/null
. "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"
parse_args "$@"

need_root
load_deploy_env
setting CONTROL_ADDR '<CONTROL_ADDR>' "the VPS address the GPU node joins"
setting VERDA_BASE_VOLUME_ID '<base-volume-id>' "the OS volume left by the Packer build"
VERDA_INSTANCE_TYPE=${VERDA_INSTANCE_TYPE:-1H100.80S.30V}
GPU_HOSTNAME=${GPU_HOSTNAME:-comfy-gpu-$(date -u +%Y%m%d-%H%M)}
UP_TIMEOUT=${UP_TIMEOUT:-1200}
POLL_INTERVAL=${POLL_INTERVAL:-15}
NOMAD_ADDR=${NOMAD_ADDR:-http://127.0.0.1:4646}
CONSUL_HTTP_ADDR=${CONSUL_HTTP_ADDR:-http://127.0.0.1:8500}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
DISPATCHER=${DISPATCHER:-$(find_bin dispatcher)}
GPU_STATE_DIR=$STATE_DIR/gpu
STATE_FILE=$GPU_STATE_DIR/$GPU_HOSTNAME.env
# What the node gets from the VPS (made by deploy-control.sh / consul/gen-secrets.sh).
CONSUL_GPU_DIR=${CONSUL_GPU_DIR:-/etc/consul.d/gpu-node}
NOMAD_TLS_DIR=${NOMAD_TLS_DIR:-/etc/nomad.d/tls}

[[ $GPU_HOSTNAME =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] \
    || die "GPU_HOSTNAME '$GPU_HOSTNAME' is not a valid host name" "use lower-case letters, digits and '-'"
addr_re='^[A-Za-z0-9.:<>_-]+$'
[[ $CONTROL_ADDR =~ $addr_re ]] || die "CONTROL_ADDR '$CONTROL_ADDR' is not an address" "give the VPS's public IP or DNS name"
if ! is_dry; then
    for tool in curl jq consul nomad; do need_tool "$tool"; done
    [ ! -e "$STATE_FILE" ] || die "a GPU node named $GPU_HOSTNAME is already recorded ($STATE_FILE)" \
        "pick another GPU_HOSTNAME, or remove it first with scripts/gpu-down.sh --hostname $GPU_HOSTNAME"
fi
ssh_keys=()
IFS=, read -r -a ssh_keys <<<"${VERDA_SSH_KEY_IDS:-}"
[ "${#ssh_keys[@]}" -gt 0 ] || warn "VERDA_SSH_KEY_IDS is empty: you will not be able to ssh into the GPU node"

# file_or_placeholder FILE: FILE's content; in a dry run a missing file gives a placeholder.
file_or_placeholder() {
    if [ -r "$1" ]; then
        cat "$1"
    elif is_dry; then
        note "cannot read $1: the first-boot script gets a placeholder for it" >&2
        printf '<content of %s>\n' "$1"
    else
        die "cannot read $1" "run scripts/deploy-control.sh first (it makes the GPU node's secrets)"
    fi
}
CONSUL_CLIENT_HCL=$DEPLOY_REPO/consul/client-gpu.hcl
NOMAD_CLIENT_HCL=$DEPLOY_REPO/nomad/agent/client-gpu.hcl
for f in "$CONSUL_CLIENT_HCL" "$NOMAD_CLIENT_HCL"; do
    [ -r "$f" ] || is_dry || die "missing $f" "this script runs from a complete comfy-multi checkout"
done
# Everything the first-boot script embeds must be there before anything is created.
for f in "$CONSUL_GPU_DIR/gossip.hcl" "$CONSUL_GPU_DIR/tls.hcl" "$CONSUL_GPU_DIR/tls/consul-agent-ca.pem" \
    "$NOMAD_TLS_DIR/nomad-agent-ca.pem" "$NOMAD_TLS_DIR/global-client-nomad.pem" "$NOMAD_TLS_DIR/global-client-nomad-key.pem"; do
    [ -r "$f" ] || is_dry || die "cannot read $f" "run scripts/deploy-control.sh first (it makes the GPU node's secrets), as root"
done

token_from CONSUL_HTTP_TOKEN "$SECRETS_DIR/consul-management.token"
token_from NOMAD_TOKEN "$SECRETS_DIR/nomad-management.token"
consul_env="CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR CONSUL_HTTP_TOKEN=$CONSUL_HTTP_TOKEN"
nomad_env="NOMAD_ADDR=$NOMAD_ADDR NOMAD_TOKEN=$NOMAD_TOKEN"

# ---- cleanup if anything below fails ------------------------------------------------
made_tokens=()
made_volume=
made_script=
made_instance=
cleanup() {
    local status=$?
    [ "$status" -ne 0 ] && ! is_dry || return 0
    [ -z "$made_instance" ] || {
        warn "instance $made_instance exists and is recorded in $STATE_FILE: remove it with scripts/gpu-down.sh --hostname $GPU_HOSTNAME --force"
        return 0
    }
    warn "gpu-up failed; removing what it made"
    [ -z "$made_script" ] || verda DELETE "/scripts/$made_script" >/dev/null || warn "could not delete Verda startup script $made_script"
    [ -z "$made_volume" ] || verda DELETE "/volumes/$made_volume" '{"is_permanent":true}' >/dev/null \
        || warn "could not delete the cloned volume $made_volume: delete it in the Verda console (it is billed)"
    local t
    for t in "${made_tokens[@]+"${made_tokens[@]}"}"; do
        run_env "$consul_env" consul acl token delete -id "$t" >/dev/null || warn "could not delete Consul token $t"
    done
}
trap cleanup EXIT

# ---- 1. Consul tokens ---------------------------------------------------------------
step "1. Consul ACL tokens for $GPU_HOSTNAME"
# new_token VAR_SECRET VAR_ACCESSOR POLICY
new_token() {
    local secret_var=$1 accessor_var=$2 policy=$3 out
    out=$(run_env "$consul_env" consul acl token create -format=json \
        -description "comfy-multi GPU node $GPU_HOSTNAME: $policy" -policy-name "$policy") \
        || die "consul acl token create -policy-name $policy failed" "check that deploy-control.sh created the policies (consul acl policy list)"
    if is_dry; then
        printf -v "$secret_var" '%s' "<$policy-token>"
        printf -v "$accessor_var" '%s' "<$policy-accessor>"
    else
        printf -v "$secret_var" '%s' "$(printf '%s' "$out" | jq -r .SecretID)"
        printf -v "$accessor_var" '%s' "$(printf '%s' "$out" | jq -r .AccessorID)"
        made_tokens+=("${!accessor_var}")
    fi
    add_secret "${!secret_var}"
}
new_token AGENT_TOKEN AGENT_ACCESSOR consul-agent
new_token NOMAD_CONSUL_TOKEN NOMAD_CONSUL_ACCESSOR nomad-client

# ---- 2. the first-boot script ----------------------------------------------------------
step "2. first-boot script for $GPU_HOSTNAME"
EOF_MARK=COMFY_MULTI_FILE_END
# put DEST MODE OWNER CONTENT: a heredoc writing CONTENT to DEST on the node.
put() {
    local dest=$1 mode=$2 owner=$3 content=$4
    case $content in *"$EOF_MARK"*) die "$dest's content contains $EOF_MARK" "rename the marker in gpu-up.sh" ;; esac
    printf "put %s %s %s <<'%s'\n%s\n%s\n" "$dest" "$mode" "$owner" "$EOF_MARK" "$content" "$EOF_MARK"
}
first_boot_script() {
    cat <<HEAD
#!/bin/bash
# comfy-multi: first boot of GPU node $GPU_HOSTNAME, written by scripts/gpu-up.sh.
# It holds secrets (Consul gossip key, ACL tokens, the Nomad client key);
# gpu-up.sh deletes it from Verda once the node has joined.
set -euo pipefail
exec >>/var/log/comfy-multi-first-boot.log 2>&1
echo "comfy-multi first boot: \$(date -u +%FT%TZ)"
for bin in /usr/local/bin/consul /usr/local/bin/nomad /opt/nomad/plugins/nomad-device-nvidia /usr/local/bin/gpu-task; do
  [ -x "\$bin" ] || { echo "missing \$bin: was this instance created from the comfy-multi Packer volume?"; exit 1; }
done
hostnamectl set-hostname $GPU_HOSTNAME || true
# put DEST MODE OWNER: stdin to DEST, atomically.
put() { cat >"\$1.tmp"; chmod "\$2" "\$1.tmp"; chown "\$3" "\$1.tmp"; mv -f "\$1.tmp" "\$1"; }
install -d -m 0750 -o root -g consul /etc/consul.d /etc/consul.d/tls
install -d -m 0755 /etc/nomad.d
install -d -m 0700 /etc/nomad.d/tls
HEAD
    put /etc/consul.d/consul.hcl 0640 root:consul "$(file_or_placeholder "$CONSUL_CLIENT_HCL")"
    put /etc/consul.d/gossip.hcl 0640 root:consul "$(file_or_placeholder "$CONSUL_GPU_DIR/gossip.hcl")"
    put /etc/consul.d/tls.hcl 0640 root:consul "$(file_or_placeholder "$CONSUL_GPU_DIR/tls.hcl")"
    put /etc/consul.d/tls/consul-agent-ca.pem 0644 root:consul "$(file_or_placeholder "$CONSUL_GPU_DIR/tls/consul-agent-ca.pem")"
    put /etc/consul.d/join.hcl 0640 root:consul "retry_join = [$(json_str "$CONTROL_ADDR")]"
    put /etc/consul.d/acl-tokens.hcl 0640 root:consul "acl {
  tokens {
    agent = $(json_str "$AGENT_TOKEN")
  }
}"
    put /etc/nomad.d/client.hcl 0644 root:root "$(file_or_placeholder "$NOMAD_CLIENT_HCL")"
    put /etc/nomad.d/consul.hcl 0600 root:root "consul {
  token = $(json_str "$NOMAD_CONSUL_TOKEN")
}"
    put /etc/nomad.d/join.hcl 0644 root:root "client {
  server_join {
    retry_join = [$(json_str "$CONTROL_ADDR:4647")]
  }
}"
    put /etc/nomad.d/tls/nomad-agent-ca.pem 0644 root:root "$(file_or_placeholder "$NOMAD_TLS_DIR/nomad-agent-ca.pem")"
    put /etc/nomad.d/tls/global-client-nomad.pem 0644 root:root "$(file_or_placeholder "$NOMAD_TLS_DIR/global-client-nomad.pem")"
    put /etc/nomad.d/tls/global-client-nomad-key.pem 0600 root:root "$(file_or_placeholder "$NOMAD_TLS_DIR/global-client-nomad-key.pem")"
    cat <<'TAIL'
# The GPUs' UUIDs as client meta gpu_uuid_<index> (nomad/comfyui.nomad.hcl pins one ComfyUI to each).
nvidia-smi --query-gpu=index,uuid --format=csv,noheader |
  awk -F', *' 'BEGIN { print "client {\n  meta {" }
               { printf "    gpu_uuid_%s = \"%s\"\n", $1, $2 }
               END { print "  }\n}" }' | put /etc/nomad.d/gpu-meta.hcl 0644 root:root
grep -q gpu_uuid_0 /etc/nomad.d/gpu-meta.hcl || { echo "nvidia-smi lists no GPU"; exit 1; }
/usr/local/bin/consul validate /etc/consul.d
systemctl daemon-reload
systemctl enable --now consul
systemctl enable --now nomad
echo "comfy-multi first boot done: consul and nomad started"
TAIL
}
SCRIPT=$(first_boot_script)
log "first-boot script: $(printf '%s\n' "$SCRIPT" | wc -l) lines (printed with secrets masked by --dry-run)"
if is_dry; then
    printf '%s\n' "----- first-boot script -----" "$(mask "$SCRIPT")" "----- end of first-boot script -----" >&3
fi

# ---- 3. the Verda instance -----------------------------------------------------------
step "3. Verda: clone the base volume, upload the script, create $VERDA_INSTANCE_TYPE"
verda_login
answer=$(verda GET "/volumes/$VERDA_BASE_VOLUME_ID" "" '{"location":"FIN-01","status":"detached"}') \
    || die "cannot read the base volume $VERDA_BASE_VOLUME_ID" "check VERDA_BASE_VOLUME_ID (Verda console → Storage)"
if is_dry; then
    base_location=FIN-01
else
    base_location=$(printf '%s' "$answer" | jq -r '.location // empty')
    base_status=$(printf '%s' "$answer" | jq -r '.status // empty')
    [ "$base_status" = detached ] || warn "the base volume is '$base_status', not detached: is an instance still using it?"
fi
VERDA_LOCATION=${VERDA_LOCATION:-$base_location}
[ "$VERDA_LOCATION" = "$base_location" ] || warn "VERDA_LOCATION=$VERDA_LOCATION but the base volume is in $base_location"

answer=$(verda PUT /volumes "{\"action\":\"clone\",\"id\":$(json_str "$VERDA_BASE_VOLUME_ID"),\"name\":$(json_str "$GPU_HOSTNAME-os")}" '["<cloned-volume-id>"]') \
    || die "Verda refused to clone volume $VERDA_BASE_VOLUME_ID" "read Verda's answer above"
made_volume=$(verda_id "$answer") || die "no volume id in Verda's clone answer: $answer" "check the clone in the Verda console"
volume_ready() {
    local s
    s=$(verda_curl GET "$VERDA_API/volumes/$made_volume" "" "$VERDA_TOKEN" | jq -r '.status // empty') || return 1
    [ "$s" = detached ]
}
wait_for "the cloned volume $made_volume to be ready (detached)" "$UP_TIMEOUT" "$POLL_INTERVAL" volume_ready \
    || die "the cloned volume $made_volume is not ready after ${UP_TIMEOUT}s" "look at it in the Verda console; raise UP_TIMEOUT"

script_name=$(json_str "comfy-multi $GPU_HOSTNAME first boot")
answer=$(verda POST /scripts "{\"name\":$script_name,\"script\":$(json_str "$SCRIPT")}" '<startup-script-id>' \
    "{\"name\":$script_name,\"script\":\"<the first-boot script of step 2, ${#SCRIPT} bytes>\"}") \
    || die "Verda refused the startup script" "read Verda's answer above"
made_script=$(verda_id "$answer") || die "no id in Verda's startup script answer" "check Verda's startup scripts in the console"

create_body="{\"instance_type\":$(json_str "$VERDA_INSTANCE_TYPE"),\"image\":$(json_str "$made_volume"),\"hostname\":$(json_str "$GPU_HOSTNAME"),\"description\":\"comfy-multi GPU node\",\"location_code\":$(json_str "$VERDA_LOCATION"),\"ssh_key_ids\":$(json_list "${ssh_keys[@]+"${ssh_keys[@]}"}"),\"startup_script_id\":$(json_str "$made_script"),\"is_spot\":false,\"contract\":\"PAY_AS_YOU_GO\"}"
answer=$(verda POST /instances "$create_body" '<instance-id>') \
    || die "Verda refused to create the instance" "503 = no capacity for $VERDA_INSTANCE_TYPE in $VERDA_LOCATION, 402 = insufficient funds; read the answer above"
made_instance=$(verda_id "$answer") || die "no id in Verda's create answer: $answer" "check the Verda console for a new instance and delete it"

run install -d -m 0700 "$GPU_STATE_DIR"
write_file "$STATE_FILE" 0600 root:root <<STATE
GPU_HOSTNAME=$GPU_HOSTNAME
VERDA_INSTANCE_ID=$made_instance
VERDA_OS_VOLUME_ID=$made_volume
VERDA_SCRIPT_ID=$made_script
VERDA_LOCATION=$VERDA_LOCATION
VERDA_INSTANCE_TYPE=$VERDA_INSTANCE_TYPE
CONSUL_TOKEN_ACCESSORS=$AGENT_ACCESSOR $NOMAD_CONSUL_ACCESSOR
CREATED_AT=$(date -u +%FT%TZ)
STATE
# From here on the record owns the tokens and the volume: gpu-down.sh removes them.
made_tokens=()

instance_status=
instance_running() {
    local a
    a=$(verda_curl GET "$VERDA_API/instances/$made_instance" "" "$VERDA_TOKEN") || return 1
    instance_status=$(printf '%s' "$a" | jq -r '.status // empty')
    GPU_IP=$(printf '%s' "$a" | jq -r '.ip // empty')
    case $instance_status in
        running) return 0 ;;
        error | no_capacity | installation_failed | discontinued | notfound)
            die "Verda reports instance $made_instance as '$instance_status'" "delete it: scripts/gpu-down.sh --hostname $GPU_HOSTNAME --force" ;;
    esac
    return 1
}
GPU_IP='<gpu-node-ip>'
wait_for "instance $made_instance to be running" "$UP_TIMEOUT" "$POLL_INTERVAL" instance_running \
    || die "instance $made_instance is not running after ${UP_TIMEOUT}s (last status: ${instance_status:-unknown})" \
        "look at it in the Verda console; delete it with scripts/gpu-down.sh --hostname $GPU_HOSTNAME --force"
is_dry || printf 'GPU_IP=%s\n' "$GPU_IP" >>"$STATE_FILE"
is_dry || log "instance $made_instance running at $GPU_IP"

# ---- 4. ready in Nomad ------------------------------------------------------------------
step "4. wait until $GPU_HOSTNAME is a ready Nomad node with its GPU(s)"
NODE_ID=
node_ready() {
    local list
    list=$(NOMAD_ADDR=$NOMAD_ADDR NOMAD_TOKEN=$NOMAD_TOKEN nomad node status -json 2>/dev/null) || return 1
    NODE_ID=$(printf '%s' "$list" | jq -r --arg h "$GPU_HOSTNAME" \
        '[.[] | select(.Name == $h and .Status == "ready")][0].ID // empty')
    [ -n "$NODE_ID" ] || return 1
    # The nvidia plugin fingerprints the GPUs within a minute of the start.
    NOMAD_ADDR=$NOMAD_ADDR NOMAD_TOKEN=$NOMAD_TOKEN nomad node status -json "$NODE_ID" 2>/dev/null \
        | jq -e '[.NodeResources.Devices[]? | select(.Vendor == "nvidia" and .Type == "gpu") | .Instances[]?] | length > 0' >/dev/null
}
wait_for "Nomad node $GPU_HOSTNAME ready with an nvidia/gpu device" "$UP_TIMEOUT" "$POLL_INTERVAL" node_ready \
    || die "$GPU_HOSTNAME did not become a ready Nomad node with a GPU within ${UP_TIMEOUT}s" \
        "ssh root@$GPU_IP 'cat /var/log/comfy-multi-first-boot.log; journalctl -u consul -u nomad --no-pager | tail -50'" \
        "check that CONTROL_ADDR=$CONTROL_ADDR is reachable from the node on TCP 4647, 8300 and TCP+UDP 8301"
is_dry || printf 'NOMAD_NODE_ID=%s\n' "$NODE_ID" >>"$STATE_FILE"
run_env "$nomad_env" nomad node status "${NODE_ID:-<node-id>}"

verda DELETE "/scripts/$made_script" >/dev/null || warn "could not delete the startup script $made_script from Verda (it holds secrets): delete it in the console"
is_dry || sed -i 's/^VERDA_SCRIPT_ID=.*/VERDA_SCRIPT_ID=/' "$STATE_FILE"

run_env "REDIS_URL=$REDIS_URL EXECUTOR=nomad $nomad_env NOMAD_GPU_NODE_POOL=${NOMAD_GPU_NODE_POOL:-gpu}" "$DISPATCHER" resume \
    || die "dispatcher resume failed" "run it by hand: REDIS_URL=$REDIS_URL EXECUTOR=nomad NOMAD_TOKEN=... $DISPATCHER resume"

if is_dry; then
    log "dry run: nothing was created"
else
    log "done: $GPU_HOSTNAME ($GPU_IP, Verda instance $made_instance) is ready; the warm ComfyUI starts there now (scripts/status.sh)"
    log "it is billed until scripts/gpu-down.sh"
fi
