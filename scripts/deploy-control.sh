#!/usr/bin/env bash
# deploy-control.sh: set up the VPS (the always-on control node). Run it as
# root from a checkout of this repository on the VPS (Debian 12).
#
#   scripts/deploy-control.sh                  install, configure, start everything
#   scripts/deploy-control.sh --bin-dir DIR    take gateway, dispatcher, gpu-task from DIR
#                                              instead of `cargo build --release`
#   scripts/deploy-control.sh --dry-run        print every command, change nothing
#   scripts/deploy-control.sh --help
#
# It is safe to run again (after a `git pull`, or to change a setting): every
# step keeps what is already there (secrets, tokens, ACL bootstrap) and
# re-applies configs and jobs.
#
# Steps (nomad/README.md and consul/README.md explain each command):
#   1. apt-get install redis-server jq curl unzip openssl ca-certificates
#      (the package's own redis service is disabled: the Nomad job runs Redis);
#      packer/scripts/consul.sh and nomad.sh --no-device-plugin: the same
#      pinned Consul and Nomad as the GPU image.
#   2. The user comfy-multi and the host folders of nomad/agent/client-control.hcl.
#   3. Consul: consul/server.hcl as /etc/consul.d/consul.hcl, secrets with
#      consul/gen-secrets.sh, start, ACL bootstrap (management token in
#      /etc/comfy-multi/secrets/), the policies of consul/acl/, tokens for this
#      agent, the VPS's Nomad agent, the gateway, the dispatcher and gpu-task.
#   4. Nomad: TLS (CA, server and client certificates), gossip key, Consul
#      token, nomad/agent/server.hcl + client-control.hcl, start, ACL
#      bootstrap, policies of nomad/acl/, node pools.
#   5. Binaries into /opt/comfy-multi/bin; the gateway's certificate
#      (GATEWAY_TLS_CERT / GATEWAY_TLS_KEY) into /etc/comfy-multi/tls.
#   6. Secrets of the services (admin token, internal secret, the Consul
#      tokens of the gateway, the dispatcher and gpu-task) as the Nomad
#      variables nomad/jobs/gateway, nomad/jobs/dispatcher and
#      nomad/jobs/comfy-workflow, which those jobs' templates read.
#   7. `nomad job run` redis, gateway, dispatcher, comfyui, and
#      `dispatcher register-job nomad/comfy-workflow.nomad.hcl`; wait for the
#      gateway's /healthz.
#
# Environment:
#   PUBLIC_HOST        required: DNS name of the VPS for participants; the
#                      gateway's certificate must be valid for it
#   GATEWAY_TLS_CERT   PEM certificate chain on this host (e.g. certbot's
#   GATEWAY_TLS_KEY    fullchain.pem / privkey.pem); needed on the first run
#   CONTROL_ADDR       address GPU nodes join (default PUBLIC_HOST), kept in
#                      /etc/comfy-multi/deploy.env for gpu-up.sh
#   PARTICIPANTS       access codes to make (default 20)
#   SLOTS              workflows in flight = GPUs (default 1)
#   GPU_COUNT          GPUs per GPU node = warm ComfyUIs (default 1)
# Secrets and tokens go to /etc/comfy-multi/secrets/ (root, 0600), /etc/consul.d
# and /etc/nomad.d; none of them is ever written into the repository.
set -euo pipefail

# NAME and DRY_RUN are read by deploy-lib.sh.
# shellcheck disable=SC2034
NAME=deploy-control.sh
# shellcheck disable=SC2034
DRY_RUN=0
SRC_BIN_DIR=
# ARG_USED is read by deploy-lib.sh's parse_args.
# shellcheck disable=SC2034
script_arg() {
    case $1 in
        --bin-dir) need_value "$1" "$#"; SRC_BIN_DIR=$2; ARG_USED=2 ;;
        --bin-dir=*) SRC_BIN_DIR=${1#*=} ;;
        *) return 1 ;;
    esac
}
# shellcheck source=/dev/null
. "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"
parse_args "$@"

R=$DEPLOY_REPO
need_root
load_deploy_env
setting PUBLIC_HOST '<PUBLIC_HOST>' "the gateway's public DNS name"
CONTROL_ADDR=${CONTROL_ADDR:-$PUBLIC_HOST}
PARTICIPANTS=${PARTICIPANTS:-20}
SLOTS=${SLOTS:-1}
GPU_COUNT=${GPU_COUNT:-1}
for n in PARTICIPANTS SLOTS GPU_COUNT; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive number, got '${!n}'" "export $n=<number>"
done
TLS_DIR=$COMFY_ETC/tls
NOMAD_ADDR=http://127.0.0.1:4646
CONSUL_HTTP_ADDR=http://127.0.0.1:8500

if ! is_dry; then
    command -v apt-get >/dev/null 2>&1 || die "this script needs Debian (apt-get not found)" "run it on the Debian 12 VPS"
    for f in consul/server.hcl consul/gen-secrets.sh nomad/agent/server.hcl nomad/agent/client-control.hcl \
        nomad/redis.nomad.hcl nomad/gateway.nomad.hcl nomad/dispatcher.nomad.hcl nomad/comfyui.nomad.hcl \
        nomad/comfy-workflow.nomad.hcl nomad/pools/control.hcl nomad/pools/gpu.hcl \
        nomad/acl/dispatcher.policy.hcl nomad/acl/operator.policy.hcl; do
        [ -r "$R/$f" ] || die "missing $R/$f" "run this script from a complete comfy-multi checkout"
    done
fi

# conf_sum DIR: a checksum of DIR's config files and certificates (empty if none).
conf_sum() {
    is_dry && return 0
    find "$1" -maxdepth 2 -type f \( -name '*.hcl' -o -name '*.pem' \) -print0 2>/dev/null \
        | sort -z | xargs -0 -r cat 2>/dev/null | sha256sum | cut -d' ' -f1
}

# restart_if_changed SERVICE BEFORE AFTER: (re)start SERVICE when its config
# changed or it is not running; a re-run with nothing new restarts nothing.
restart_if_changed() {
    if is_dry || [ "$2" != "$3" ] || ! systemctl is-active --quiet "$1"; then
        run systemctl restart "$1"
    else
        log "$1: configuration unchanged and running, not restarted"
    fi
}

# ---- 1. packages, Consul, Nomad -------------------------------------------------------
step "1. packages, Consul and Nomad"
run apt-get update -q
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    redis-server jq curl unzip openssl ca-certificates dpkg
run systemctl disable --now redis-server
run bash "$R/packer/scripts/consul.sh"
run bash "$R/packer/scripts/nomad.sh" --no-device-plugin

# ---- 2. user and folders -----------------------------------------------------------------
step "2. user comfy-multi and the host folders"
if is_dry || ! getent passwd comfy-multi >/dev/null 2>&1; then
    run useradd --system --no-create-home --shell /usr/sbin/nologin comfy-multi
fi
# $COMFY_ETC itself only traversable: the gateway's user reaches tls/ below it.
run install -d -m 0711 "$COMFY_ETC"
run install -d -m 0700 "$SECRETS_DIR" "$STATE_DIR"
run install -d -m 0750 -o comfy-multi -g comfy-multi "$DATA_DIR_HOST"
run install -d -m 0750 -o redis -g redis /srv/comfy-multi/redis
run install -d -m 0750 -o root -g comfy-multi "$TLS_DIR"
run install -d -m 0755 "$BIN_DIR"

# ---- 3. Consul ---------------------------------------------------------------------------
step "3. Consul server, secrets, ACLs"
before=$(conf_sum /etc/consul.d)
run install -m 0640 -o root -g consul "$R/consul/server.hcl" /etc/consul.d/consul.hcl
run bash "$R/consul/gen-secrets.sh" --owner consul:consul /etc/consul.d
run consul validate /etc/consul.d
run systemctl enable consul
restart_if_changed consul "$before" "$(conf_sum /etc/consul.d)"
consul_leader() { [ -n "$(curl -fsS "$CONSUL_HTTP_ADDR/v1/status/leader" 2>/dev/null | tr -d '"')" ]; }
wait_for "a Consul leader" 120 2 consul_leader || die "Consul elected no leader in 2 minutes" "journalctl -u consul -n 50"

CONSUL_MGMT=$SECRETS_DIR/consul-management.token
# acl_bootstrap TOOL FILE: `TOOL acl bootstrap` once; its management token into FILE.
acl_bootstrap() {
    local tool=$1 file=$2 out='' tries=0 addr
    if [ -s "$file" ]; then
        log "$tool ACLs already bootstrapped ($file)"
        return 0
    fi
    if [ "$tool" = consul ]; then addr="CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR"; else addr="NOMAD_ADDR=$NOMAD_ADDR"; fi
    if is_dry; then
        run_env "$addr" "$tool" acl bootstrap "$([ "$tool" = consul ] && printf -- -format=json || printf -- -json)"
        write_file "$file" 0600 root:root </dev/null
        return 0
    fi
    # Right after the leader election the ACL system may not take it yet: retry.
    until out=$(run_env "$addr" "$tool" acl bootstrap "$([ "$tool" = consul ] && printf -- -format=json || printf -- -json)" 2>&1); do
        case $out in
            *"no longer allowed"* | *"already done"* | *"reset index"*)
                die "$tool ACLs were bootstrapped before, but $file is missing" \
                    "put the management token (SecretID) into $file (mode 0600), or reset the bootstrap as $tool's ACL guide describes" ;;
        esac
        tries=$((tries + 1))
        [ "$tries" -lt 30 ] || die "$tool acl bootstrap failed: $out" "journalctl -u $tool -n 50"
        sleep 2
    done
    printf '%s' "$out" | jq -r .SecretID | write_file "$file" 0600 root:root
}
acl_bootstrap consul "$CONSUL_MGMT"
token_from CONSUL_HTTP_TOKEN "$CONSUL_MGMT"
consul_env="CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR CONSUL_HTTP_TOKEN=$CONSUL_HTTP_TOKEN"

for f in "$R"/consul/acl/*.hcl; do
    policy=$(basename "$f" .hcl)
    if ! is_dry && run_env "$consul_env" consul acl policy read -name "$policy" >/dev/null 2>&1; then
        run_env "$consul_env" consul acl policy update -name "$policy" -rules "@$f" >/dev/null
    else
        run_env "$consul_env" consul acl policy create -name "$policy" -rules "@$f" >/dev/null
    fi
done

# consul_token NAME DESCRIPTION POLICY...: a token kept in $SECRETS_DIR/consul-NAME.token.
consul_token() {
    local name=$1 description=$2 file out args=() p
    shift 2
    file=$SECRETS_DIR/consul-$name.token
    if [ -s "$file" ]; then
        log "Consul token $name exists ($file)"
        return 0
    fi
    for p in "$@"; do args+=(-policy-name "$p"); done
    out=$(run_env "$consul_env" consul acl token create -format=json -description "$description" "${args[@]}") \
        || die "consul acl token create ($name) failed" "check the policies: consul acl policy list"
    if is_dry; then
        write_file "$file" 0600 root:root </dev/null
    else
        printf '%s' "$out" | jq -r .SecretID | write_file "$file" 0600 root:root
    fi
}
consul_token agent "comfy-multi VPS Consul agent" consul-agent
consul_token nomad-vps "comfy-multi VPS Nomad agent" nomad-server nomad-control-client
consul_token gpu-task "comfy-multi gpu-task" gpu-task
consul_token gateway "comfy-multi gateway" gateway
consul_token dispatcher "comfy-multi dispatcher" dispatcher
read_secret AGENT_TOKEN "$SECRETS_DIR/consul-agent.token" '<agent-token>'
# PUT /v1/agent/token/agent (= consul acl set-agent-token agent …), the token
# in the body rather than on a command line; kept by enable_token_persistence.
printf '+ HTTP PUT %s/v1/agent/token/agent {"Token":"***"} (X-Consul-Token: ***)\n' "$CONSUL_HTTP_ADDR" >&3
if ! is_dry; then
    printf 'header = "X-Consul-Token: %s"\n' "$CONSUL_HTTP_TOKEN" \
        | curl -fsS -K - -X PUT --data-binary @<(printf '{"Token":%s}' "$(json_str "$AGENT_TOKEN")") \
            "$CONSUL_HTTP_ADDR/v1/agent/token/agent" >/dev/null \
        || die "could not set the Consul agent token" "run: consul acl set-agent-token agent \"\$(cat $SECRETS_DIR/consul-agent.token)\""
fi

# ---- 4. Nomad ----------------------------------------------------------------------------
step "4. Nomad server + control client, secrets, ACLs, node pools"
before=$(conf_sum /etc/nomad.d)
run install -d -m 0700 /etc/nomad.d/tls
if [ -s /etc/nomad.d/tls/nomad-agent-ca.pem ]; then
    log "Nomad CA exists (/etc/nomad.d/tls)"
else
    run sh -c 'cd /etc/nomad.d/tls && nomad tls ca create'
fi
for kind in server client; do
    if [ -s "/etc/nomad.d/tls/global-$kind-nomad.pem" ]; then
        log "Nomad $kind certificate exists"
    else
        run sh -c "cd /etc/nomad.d/tls && nomad tls cert create -$kind -region global && chmod 0600 /etc/nomad.d/tls/*-key.pem"
    fi
done
if [ -s /etc/nomad.d/gossip.hcl ]; then
    log "Nomad gossip key exists (/etc/nomad.d/gossip.hcl)"
else
    if is_dry; then
        run nomad operator gossip keyring generate
        write_file /etc/nomad.d/gossip.hcl 0600 root:root </dev/null
    else
        key=$(nomad operator gossip keyring generate) || die "nomad operator gossip keyring generate failed" "run it by hand"
        add_secret "$key"
        printf 'server {\n  encrypt = "%s"\n}' "$key" | write_file /etc/nomad.d/gossip.hcl 0600 root:root
    fi
fi
read_secret NOMAD_CONSUL_TOKEN "$SECRETS_DIR/consul-nomad-vps.token" '<nomad-vps-consul-token>'
printf 'consul {\n  token = %s\n}' "$(json_str "$NOMAD_CONSUL_TOKEN")" | write_file /etc/nomad.d/consul.hcl 0600 root:root
run install -m 0644 "$R/nomad/agent/server.hcl" /etc/nomad.d/server.hcl
run install -m 0644 "$R/nomad/agent/client-control.hcl" /etc/nomad.d/client.hcl
# The Nomad package's sample config would be merged in: it must not be there.
[ ! -e /etc/nomad.d/nomad.hcl ] || run mv /etc/nomad.d/nomad.hcl /etc/nomad.d/nomad.hcl.disabled
run nomad config validate /etc/nomad.d
run systemctl enable nomad
restart_if_changed nomad "$before" "$(conf_sum /etc/nomad.d)"
nomad_leader() { [ -n "$(curl -fsS "$NOMAD_ADDR/v1/status/leader" 2>/dev/null | tr -d '"')" ]; }
wait_for "a Nomad leader" 120 2 nomad_leader || die "Nomad elected no leader in 2 minutes" "journalctl -u nomad -n 50"

NOMAD_MGMT=$SECRETS_DIR/nomad-management.token
acl_bootstrap nomad "$NOMAD_MGMT"
token_from NOMAD_TOKEN "$NOMAD_MGMT"
nomad_env="NOMAD_ADDR=$NOMAD_ADDR NOMAD_TOKEN=$NOMAD_TOKEN"
run_env "$nomad_env" nomad acl policy apply -description "comfy-multi operators" comfy-operator "$R/nomad/acl/operator.policy.hcl"
run_env "$nomad_env" nomad acl policy apply -namespace default -job dispatcher \
    -description "comfy-multi dispatcher: dispatch and follow comfy-workflow, drain GPU nodes" \
    comfy-dispatcher "$R/nomad/acl/dispatcher.policy.hcl"
run_env "$nomad_env" nomad node pool apply "$R/nomad/pools/control.hcl"
run_env "$nomad_env" nomad node pool apply "$R/nomad/pools/gpu.hcl"
run_env "$nomad_env" nomad operator scheduler set-config -memory-oversubscription=true

# ---- 5. binaries and the gateway's certificate --------------------------------------------
step "5. binaries into $BIN_DIR, certificate into $TLS_DIR"
if [ -z "$SRC_BIN_DIR" ]; then
    if is_dry || command -v cargo >/dev/null 2>&1; then
        run sh -c "cd $(quote "$R") && cargo build --release -p gateway -p dispatcher -p gpu-task"
        SRC_BIN_DIR=$R/target/release
    else
        die "no --bin-dir and no cargo to build the binaries" \
            "build them elsewhere (cargo build --release -p gateway -p dispatcher -p gpu-task), copy them here and pass --bin-dir DIR"
    fi
fi
changed_bins=()
for b in gateway dispatcher gpu-task; do
    [ -x "$SRC_BIN_DIR/$b" ] || is_dry || die "missing $SRC_BIN_DIR/$b" "build it or pass --bin-dir with all three binaries"
    if ! is_dry && [ -x "$BIN_DIR/$b" ] && ! cmp -s "$SRC_BIN_DIR/$b" "$BIN_DIR/$b"; then
        changed_bins+=("$b")
    fi
    run install -m 0755 "$SRC_BIN_DIR/$b" "$BIN_DIR/$b"
done
DISPATCHER=$BIN_DIR/dispatcher

if [ -n "${GATEWAY_TLS_CERT:-}" ] || [ -n "${GATEWAY_TLS_KEY:-}" ]; then
    if [ -z "${GATEWAY_TLS_CERT:-}" ] || [ -z "${GATEWAY_TLS_KEY:-}" ]; then
        die "set both GATEWAY_TLS_CERT and GATEWAY_TLS_KEY (or neither to keep $TLS_DIR)" "export both paths"
    fi
    for f in "$GATEWAY_TLS_CERT" "$GATEWAY_TLS_KEY"; do
        [ -r "$f" ] || is_dry || die "cannot read $f" "check the path (certbot keeps them under /etc/letsencrypt/live/<name>/)"
    done
    run install -m 0644 -o root -g comfy-multi "$GATEWAY_TLS_CERT" "$TLS_DIR/fullchain.pem"
    run install -m 0640 -o root -g comfy-multi "$GATEWAY_TLS_KEY" "$TLS_DIR/privkey.pem"
elif [ -s "$TLS_DIR/fullchain.pem" ] && [ -s "$TLS_DIR/privkey.pem" ]; then
    log "gateway certificate in $TLS_DIR kept"
elif is_dry; then
    note "GATEWAY_TLS_CERT / GATEWAY_TLS_KEY are not set and $TLS_DIR has no certificate: a real run stops here"
else
    die "the gateway has no certificate" \
        "export GATEWAY_TLS_CERT=/path/fullchain.pem GATEWAY_TLS_KEY=/path/privkey.pem (a certificate valid for $PUBLIC_HOST) and run again"
fi

# ---- 6. service secrets as Nomad variables --------------------------------------------------
step "6. admin token, internal secret, Consul tokens of the services as Nomad variables"
for s in admin-token internal-secret; do
    if [ -s "$SECRETS_DIR/$s" ]; then
        log "$SECRETS_DIR/$s exists"
    elif is_dry; then
        run openssl rand -hex 32
        write_file "$SECRETS_DIR/$s" 0600 root:root </dev/null
    else
        value=$(openssl rand -hex 32)
        add_secret "$value"
        printf '%s' "$value" | write_file "$SECRETS_DIR/$s" 0600 root:root
    fi
done
# `key=@file` reads the value from the file: no secret on a command line.
# -force: replace the variable on re-runs (without it `var put` only creates).
# The internal secret twice: the gateway checks it, gpu-task presents it.
run_env "$nomad_env" nomad var put -force nomad/jobs/gateway \
    "admin_token=@$SECRETS_DIR/admin-token" "internal_secret=@$SECRETS_DIR/internal-secret" \
    "consul_token=@$SECRETS_DIR/consul-gateway.token"
run_env "$nomad_env" nomad var put -force nomad/jobs/comfy-workflow \
    "internal_secret=@$SECRETS_DIR/internal-secret" "consul_token=@$SECRETS_DIR/consul-gpu-task.token"
run_env "$nomad_env" nomad var put -force nomad/jobs/dispatcher "consul_token=@$SECRETS_DIR/consul-dispatcher.token"

# ---- 7. jobs --------------------------------------------------------------------------------
step "7. jobs"
run_env "$nomad_env" nomad job run -detach "$R/nomad/redis.nomad.hcl"
run_env "$nomad_env" nomad job run -detach -var "public_host=$PUBLIC_HOST" -var "participants=$PARTICIPANTS" "$R/nomad/gateway.nomad.hcl"
run_env "$nomad_env" "$DISPATCHER" register-job "$R/nomad/comfy-workflow.nomad.hcl"
run_env "$nomad_env" nomad job run -detach -var "slots=$SLOTS" "$R/nomad/dispatcher.nomad.hcl"
run_env "$nomad_env" nomad job run -detach -var "gpu_count=$GPU_COUNT" "$R/nomad/comfyui.nomad.hcl"

write_file "$DEPLOY_ENV" 0644 root:root <<ENV
# Written by scripts/deploy-control.sh; read by gpu-up.sh, gpu-down.sh, status.sh. No secrets.
PUBLIC_HOST=$PUBLIC_HOST
CONTROL_ADDR=$CONTROL_ADDR
PARTICIPANTS=$PARTICIPANTS
SLOTS=$SLOTS
GPU_COUNT=$GPU_COUNT
ENV

gateway_healthy() { curl -fsS --max-time 5 "https://$PUBLIC_HOST/healthz" >/dev/null 2>&1; }
if wait_for "https://$PUBLIC_HOST/healthz" 180 5 gateway_healthy; then
    is_dry || log "gateway answers at https://$PUBLIC_HOST/"
else
    warn "https://$PUBLIC_HOST/healthz does not answer yet: check DNS for $PUBLIC_HOST, the certificate, and 'nomad alloc logs -stderr -job gateway'"
fi

for b in "${changed_bins[@]+"${changed_bins[@]}"}"; do
    case $b in
        gateway | dispatcher)
            warn "the $b binary changed, but a job whose spec did not change keeps running the old one: nomad job restart $b" ;;
    esac
done
if is_dry; then
    log "dry run: nothing was changed"
else
    log "done. Participants' access codes: $DATA_DIR_HOST/secrets/access-codes.txt (sudo cat it)"
    log "next: scripts/gpu-up.sh (GPU node), scripts/status.sh (overview); docs/instructor-guide.md"
fi
