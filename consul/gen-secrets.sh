#!/usr/bin/env bash
# Generate the secrets of the Consul datacenter: the gossip encryption key, a
# CA, the server's and a client certificate, and the small config files that
# point Consul at them. Run it on the VPS (the Consul server); it writes
# OUTSIDE the repository, into DIR (default /etc/consul.d):
#
#   DIR/gossip.hcl                 encrypt = "<consul keygen>"
#   DIR/tls.hcl                    ca_file / cert_file / key_file of the server
#   DIR/tls/consul-agent-ca.pem    CA certificate
#   DIR/tls/consul-agent-ca-key.pem  CA key (stays on the VPS, back it up)
#   DIR/tls/server.pem, server-key.pem   server certificate for <dc>
#   DIR/tls/client.pem, client-key.pem   client certificate (HTTPS API clients;
#                                  a client agent without auto_encrypt)
#   DIR/gpu-node/                  what a GPU node needs, to copy into its
#                                  /etc/consul.d: gossip.hcl, tls.hcl (ca_file
#                                  only) and tls/consul-agent-ca.pem. No key.
#
# Existing keys and certificates are never overwritten: running it again only
# adds what is missing and refreshes the derived files (tls.hcl, gpu-node/),
# so it is safe to run on every deploy. Consul skips sub-directories of its
# config dir, so gpu-node/ and tls/ may live inside /etc/consul.d.
#
# Usage: consul/gen-secrets.sh [--dry-run] [--dc NAME] [--gpu-dir PATH] [--owner USER[:GROUP]] [DIR]
#   --dry-run       print what would be done; write nothing
#   --dc NAME       Consul datacenter (default: comfy, as in consul/*.hcl)
#   --gpu-dir PATH  where gpu-node/ ends up on the GPU node (default /etc/consul.d);
#                   used for the ca_file path in gpu-node/tls.hcl
#   --owner U[:G]   chown what is written (e.g. consul:consul, when the agent
#                   does not run as root)
# The consul binary: $CONSUL, else `consul` on PATH, else the one
# scripts/install-deps.sh put in ${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}/bin.
set -euo pipefail

usage() {
  sed -n 's/^# \{0,1\}//; /^Usage:/,/^The consul binary/p' "$0" | sed '$d'
}

die() {
  echo "gen-secrets: $*" >&2
  exit 1
}

DRY_RUN=0
DC=comfy
GPU_DIR=/etc/consul.d
OWNER=
DIR=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --dc)
      [ $# -ge 2 ] || die "--dc needs a value"
      DC=$2
      shift
      ;;
    --dc=*) DC=${1#--dc=} ;;
    --gpu-dir)
      [ $# -ge 2 ] || die "--gpu-dir needs a value"
      GPU_DIR=$2
      shift
      ;;
    --gpu-dir=*) GPU_DIR=${1#--gpu-dir=} ;;
    --owner)
      [ $# -ge 2 ] || die "--owner needs a value"
      OWNER=$2
      shift
      ;;
    --owner=*) OWNER=${1#--owner=} ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [ -z "$DIR" ] || die "only one directory, got '$DIR' and '$1'"
      DIR=$1
      ;;
  esac
  shift
done
DIR=${DIR:-/etc/consul.d}
DIR=${DIR%/}
[ -n "$DIR" ] || DIR=/
GPU_DIR=${GPU_DIR%/}

case "$DC" in
  *[!a-zA-Z0-9_-]* | '') die "datacenter '$DC': use letters, digits, - and _" ;;
esac
case "$DIR" in
  /*) ;;
  *) DIR="$(pwd)/$DIR" ;;
esac
case "$GPU_DIR" in
  /*) ;;
  *) die "--gpu-dir must be an absolute path (it is a path on the GPU node)" ;;
esac

# Refuse to write secrets into a git work tree (this repository or another).
probe=$DIR
while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
if command -v git >/dev/null 2>&1 && git -C "$probe" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  die "$DIR is inside a git work tree; secrets go outside the repository (default /etc/consul.d)"
fi

find_consul() {
  if [ -n "${CONSUL:-}" ]; then
    echo "$CONSUL"
  elif command -v consul >/dev/null 2>&1; then
    command -v consul
  else
    echo "${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}/bin/consul"
  fi
}
CONSUL_BIN=$(find_consul)
if [ ! -x "$CONSUL_BIN" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    echo "gen-secrets: note: no consul binary at $CONSUL_BIN (needed for a real run; scripts/install-deps.sh installs it)" >&2
  else
    die "no consul binary at $CONSUL_BIN: run scripts/install-deps.sh or set CONSUL"
  fi
fi

TLS=$DIR/tls
GPU=$DIR/gpu-node
CA=$TLS/consul-agent-ca.pem
CA_KEY=$TLS/consul-agent-ca-key.pem

say() {
  if [ "$DRY_RUN" = 1 ]; then echo "would $*"; else echo "$*"; fi
}

umask 077
WORK=
cleanup() {
  if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# A scratch dir on the same filesystem, so finished files are moved in
# atomically (a half-written key never sits under its final name).
work_dir() {
  if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "$DIR/.gen-secrets.XXXXXX")
  fi
}

ensure_dir() {
  if [ ! -d "$1" ]; then
    say "create directory $1 (mode 0700)"
    if [ "$DRY_RUN" = 0 ]; then
      mkdir -p "$1"
      chmod 0700 "$1"
    fi
  fi
}

# install_file SRC DEST MODE: move SRC to DEST with MODE.
install_file() {
  chmod "$3" "$1"
  mv -f "$1" "$2"
}

# write_derived DEST MODE CONTENT: (re)write a non-secret-generating file when
# its content differs. Used for the config snippets and the gpu-node/ copies.
write_derived() {
  local dest=$1 mode=$2 content=$3
  if [ -f "$dest" ] && [ "$(cat "$dest")" = "$content" ]; then
    return 0
  fi
  if [ -f "$dest" ]; then say "update $dest"; else say "write $dest"; fi
  if [ "$DRY_RUN" = 0 ]; then
    work_dir
    printf '%s\n' "$content" >"$WORK/derived"
    install_file "$WORK/derived" "$dest" "$mode"
  fi
}

ensure_dir "$DIR"
ensure_dir "$TLS"

# --- gossip key ---------------------------------------------------------------
if [ -f "$DIR/gossip.hcl" ]; then
  echo "keep $DIR/gossip.hcl (exists)"
else
  say "write $DIR/gossip.hcl (consul keygen, mode 0600)"
  if [ "$DRY_RUN" = 0 ]; then
    work_dir
    key=$("$CONSUL_BIN" keygen)
    case "$key" in
      *[!A-Za-z0-9+/=]* | '') die "consul keygen gave no usable key" ;;
    esac
    {
      echo "# Gossip encryption key of Consul datacenter '$DC', made by consul/gen-secrets.sh."
      echo "# Secret: every agent of the datacenter needs this file; keep it out of git."
      echo "encrypt = \"$key\""
    } >"$WORK/gossip.hcl"
    unset key
    install_file "$WORK/gossip.hcl" "$DIR/gossip.hcl" 0600
  fi
fi

# --- CA -------------------------------------------------------------------------
if [ -f "$CA" ] && [ -f "$CA_KEY" ]; then
  echo "keep $CA (exists)"
elif [ -f "$CA" ] || [ -f "$CA_KEY" ]; then
  die "only one of $CA and $CA_KEY exists; restore the other (or remove $TLS to start over)"
else
  for cert in server client; do
    if [ -f "$TLS/$cert.pem" ]; then
      die "$TLS/$cert.pem exists but the CA that signed it is gone; restore the CA (or remove $TLS to start over)"
    fi
  done
  say "create CA $CA and $CA_KEY (consul tls ca create)"
  if [ "$DRY_RUN" = 0 ]; then
    work_dir
    mkdir "$WORK/ca"
    (cd "$WORK/ca" && "$CONSUL_BIN" tls ca create >/dev/null)
    install_file "$WORK/ca/consul-agent-ca-key.pem" "$CA_KEY" 0600
    install_file "$WORK/ca/consul-agent-ca.pem" "$CA" 0644
  fi
fi

# --- server and client certificates -----------------------------------------------
# make_cert KIND (server|client): DIR/tls/KIND.pem and KIND-key.pem.
make_cert() {
  local kind=$1 flag out
  if [ -f "$TLS/$kind.pem" ] && [ -f "$TLS/$kind-key.pem" ]; then
    echo "keep $TLS/$kind.pem (exists)"
    return 0
  fi
  if [ -f "$TLS/$kind.pem" ] || [ -f "$TLS/$kind-key.pem" ]; then
    die "only one of $TLS/$kind.pem and $TLS/$kind-key.pem exists; remove it to make a new pair"
  fi
  flag=-$kind
  say "create $TLS/$kind.pem and $kind-key.pem (consul tls cert create $flag -dc $DC)"
  if [ "$DRY_RUN" = 0 ]; then
    work_dir
    mkdir "$WORK/$kind"
    if ! out=$(cd "$WORK/$kind" && "$CONSUL_BIN" tls cert create "$flag" -dc "$DC" -ca "$CA" -key "$CA_KEY" 2>&1); then
      die "consul tls cert create $flag failed: $out"
    fi
    install_file "$WORK/$kind/$DC-$kind-consul-0-key.pem" "$TLS/$kind-key.pem" 0600
    install_file "$WORK/$kind/$DC-$kind-consul-0.pem" "$TLS/$kind.pem" 0644
  fi
}
make_cert server
make_cert client

# --- config snippets --------------------------------------------------------------
write_derived "$DIR/tls.hcl" 0644 "# TLS files of the Consul server, made by consul/gen-secrets.sh.
ca_file   = \"$CA\"
cert_file = \"$TLS/server.pem\"
key_file  = \"$TLS/server-key.pem\""

# --- what the GPU node gets ---------------------------------------------------------
ensure_dir "$GPU"
ensure_dir "$GPU/tls"
if [ -f "$DIR/gossip.hcl" ]; then
  write_derived "$GPU/gossip.hcl" 0600 "$(cat "$DIR/gossip.hcl")"
else
  say "write $GPU/gossip.hcl (copy of $DIR/gossip.hcl)"
fi
if [ -f "$CA" ]; then
  write_derived "$GPU/tls/consul-agent-ca.pem" 0644 "$(cat "$CA")"
else
  say "write $GPU/tls/consul-agent-ca.pem (copy of $CA)"
fi
write_derived "$GPU/tls.hcl" 0644 "# TLS of a Consul client (auto_encrypt: the CA certificate only), made by consul/gen-secrets.sh.
ca_file = \"$GPU_DIR/tls/consul-agent-ca.pem\""

if [ -n "$OWNER" ]; then
  say "chown $OWNER $DIR, and -R its gossip.hcl tls.hcl tls/ gpu-node/"
  if [ "$DRY_RUN" = 0 ]; then
    chown "$OWNER" "$DIR"
    chown -R "$OWNER" "$DIR/gossip.hcl" "$DIR/tls.hcl" "$TLS" "$GPU"
  fi
fi

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: nothing was written"
else
  echo "done: secrets of datacenter '$DC' in $DIR (copy $GPU/* to the GPU node's $GPU_DIR)"
fi
