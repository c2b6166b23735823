#!/usr/bin/env bash
# deploy-lib.sh: helpers shared by the deploy scripts (deploy-control.sh,
# gpu-up.sh, gpu-down.sh, status.sh). Sourced, never run.
#
# The caller sets NAME (its name in messages) before sourcing, then calls
# parse_args "$@" (--dry-run sets DRY_RUN=1). In a dry run every command and HTTP request is printed
# instead of run, secrets registered with add_secret are printed as ***, and
# nothing is written anywhere.
#
# Conventions of the deploy scripts:
#   - tokens and credentials come from the environment or from files outside
#     the repository (refuse_in_repo), never from the repository;
#   - every failure ends in `die WHAT FIX...`;
#   - a command that changes the host goes through `run`.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "deploy-lib.sh is sourced by the deploy scripts; run scripts/deploy-control.sh, gpu-up.sh, gpu-down.sh or status.sh" >&2
    exit 2
fi

: "${NAME:=deploy}"
: "${DRY_RUN:=0}"
# Everything the scripts tell the operator (steps, commands, requests, notes)
# goes to fd 3 = the script's stdout, also from inside $(...).
exec 3>&1
DEPLOY_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Secret values to mask in everything printed.
DEPLOY_SECRETS=()

log() { printf '[%s] %s\n' "$NAME" "$(mask "$*")" >&3; }
warn() { printf '[%s] WARNING: %s\n' "$NAME" "$(mask "$*")" >&2; }
step() { printf '\n==> %s\n' "$(mask "$*")" >&3; }

# die WHAT FIX...: say what failed and how to fix it, then exit non-zero.
die() {
    local what=$1
    shift
    printf '[%s] FAILED: %s\n' "$NAME" "$(mask "$what")" >&2
    local fix
    for fix in "$@"; do
        printf '[%s]   how to fix: %s\n' "$NAME" "$(mask "$fix")" >&2
    done
    exit 1
}

# parse_args "$@": the flags every deploy script takes: --dry-run and
# -h/--help (the help is printed, after every argument was read, and the
# script exits). Any other argument goes to the script's own
# `script_arg ARG [NEXT]`, if it has one: it sets ARG_USED to how many
# arguments it took (1, or 2 for a flag with a value) and returns non-zero
# for an argument it does not know.
parse_args() {
    local help=0
    while [ "$#" -gt 0 ]; do
        ARG_USED=1
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            -h | --help) help=1 ;;
            *)
                if ! declare -F script_arg >/dev/null || ! script_arg "$@"; then
                    die "unknown argument: $1" "run $0 --help"
                fi
                ;;
        esac
        shift "$ARG_USED"
    done
    if [ "$help" = 1 ]; then
        usage "$0"
        exit 0
    fi
}

# need_value FLAG COUNT: a flag that takes a value was given one.
need_value() {
    [ "$2" -ge 2 ] || die "$1 needs a value" "run $0 --help"
}

# usage FILE: print the comment block at the top of FILE (after the shebang).
usage() {
    sed -n '2,/^set -euo pipefail$/p' "$1" | sed '$d' | sed -n '/^#/p' | sed 's/^# \{0,1\}//'
}

add_secret() {
    local s
    for s in "$@"; do
        # Too short to mask without garbling the output: never registered.
        [ "${#s}" -ge 6 ] && DEPLOY_SECRETS+=("$s")
    done
    return 0
}

# mask TEXT: TEXT with every registered secret replaced by ***.
mask() {
    local text=$1 s
    for s in "${DEPLOY_SECRETS[@]+"${DEPLOY_SECRETS[@]}"}"; do
        text=${text//"$s"/***}
    done
    printf '%s' "$text"
}

# quote ARGS...: the arguments as one shell-quoted command line.
quote() {
    local out='' a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            out+="$a "
        else
            out+="'${a//\'/\'\\\'\'}' "
        fi
    done
    printf '%s' "${out% }"
}

is_dry() { [ "$DRY_RUN" = 1 ]; }

# run CMD...: print the command (masked), then run it unless this is a dry run.
run() {
    printf '+ %s\n' "$(mask "$(quote "$@")")" >&3
    is_dry && return 0
    "$@"
}

# note TEXT: a line that only makes sense in a dry run (placeholders, skipped waits).
note() {
    if is_dry; then printf '[%s] (dry run) %s\n' "$NAME" "$(mask "$*")" >&3; fi
    return 0
}

# need_root: real runs change the host and read root-only secrets.
need_root() {
    is_dry && return 0
    [ "$(id -u)" -eq 0 ] || die "this needs root (it installs and reads root-only secrets)" "run it with sudo"
}

# need_tool TOOL [PACKAGE]: fail clearly when a tool is missing (real runs only).
need_tool() {
    is_dry && return 0
    command -v "$1" >/dev/null 2>&1 || die "$1 not found" "install it: apt-get install -y ${2:-$1}"
}

# refuse_in_repo PATH: secrets must not live inside this repository.
refuse_in_repo() {
    local p
    p=$(realpath -m "$1")
    case $p/ in
        "$DEPLOY_REPO"/*) die "$1 is inside the repository ($DEPLOY_REPO)" \
            "keep credentials and tokens outside the repository, e.g. under /etc/comfy-multi/secrets or ~/.config" ;;
    esac
}

# setting VAR PLACEHOLDER WHAT: use $VAR; when it is unset, die in a real
# run, or use PLACEHOLDER (and say so) in a dry run.
setting() {
    local var=$1 placeholder=$2 what=$3
    if [ -n "${!var:-}" ]; then
        return 0
    fi
    if is_dry; then
        printf -v "$var" '%s' "$placeholder"
        note "$var is not set: using the placeholder $placeholder ($what)"
        return 0
    fi
    die "$var is not set ($what)" "export $var=... and run again (see --help)"
}

# read_secret VAR FILE PLACEHOLDER: set VAR to the first line of FILE
# (registered as a secret, so it is masked everywhere). In a dry run a missing
# or unreadable FILE gives PLACEHOLDER; in a real run it is fatal.
read_secret() {
    local var=$1 file=$2 placeholder=$3 value
    if [ -r "$file" ]; then
        value=$(head -n 1 "$file")
        value=${value%%[[:space:]]}
    elif is_dry; then
        note "cannot read $file: using the placeholder $placeholder"
        value=$placeholder
    else
        die "cannot read $file" "run scripts/deploy-control.sh first (it creates it), as root"
    fi
    [ -n "$value" ] || die "$file is empty" "remove it and run scripts/deploy-control.sh again"
    add_secret "$value"
    printf -v "$var" '%s' "$value"
}

# token_from VAR FILE: VAR from the environment, else from FILE (see read_secret).
token_from() {
    local var=$1 file=$2
    if [ -n "${!var:-}" ]; then
        add_secret "${!var}"
    else
        read_secret "$var" "$file" "<$var>"
    fi
}

# write_file DEST MODE OWNER[:GROUP] < CONTENT: write stdin to DEST atomically
# (unless this is a dry run, which prints what it would write).
write_file() {
    local dest=$1 mode=$2 owner=$3 content tmp
    content=$(cat)
    printf '+ write %s (mode %s, owner %s, %s lines)\n' "$dest" "$mode" "$owner" "$(printf '%s\n' "$content" | wc -l)" >&3
    is_dry && return 0
    tmp=$(mktemp "$(dirname "$dest")/.deploy.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    mv -f "$tmp" "$dest"
}

# json_str VALUE: VALUE as a JSON string literal.
json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    if [[ $s =~ [[:cntrl:]] ]]; then
        die "a value for a JSON request holds a control character" "remove it"
    fi
    printf '"%s"' "$s"
}

# json_list A B ...: ["A","B",...]
json_list() {
    local out='' a
    for a in "$@"; do out+="$(json_str "$a"),"; done
    printf '[%s]' "${out%,}"
}

# wait_for WHAT TIMEOUT_SECONDS INTERVAL CMD...: run CMD until it succeeds.
wait_for() {
    local what=$1 timeout=$2 interval=$3 start
    shift 3
    printf '+ wait up to %ss for %s: %s\n' "$timeout" "$what" "$(mask "$(quote "$@")")" >&3
    is_dry && return 0
    start=$SECONDS
    until "$@"; do
        if [ $((SECONDS - start)) -ge "$timeout" ]; then
            return 1
        fi
        sleep "$interval"
    done
}

# ---- Verda API (formerly DataCrunch) ------------------------------------------
# OAuth2 client credentials: POST $VERDA_API/oauth2/token with
# {"grant_type":"client_credentials","client_id":…,"client_secret":…} gives an
# access_token for `Authorization: Bearer`. The credentials come from
# VERDA_CLIENT_ID / VERDA_CLIENT_SECRET, or from VERDA_CREDENTIALS_FILE (a file
# outside the repository with `VERDA_CLIENT_ID=…` / `VERDA_CLIENT_SECRET=…`
# lines, or the verda CLI's ~/.verda/credentials `verda_client_id = …` form).
VERDA_API=${VERDA_API:-https://api.verda.com/v1}
VERDA_TOKEN=

# verda_credentials: set VERDA_CLIENT_ID and VERDA_CLIENT_SECRET.
verda_credentials() {
    local file=${VERDA_CREDENTIALS_FILE:-} key value line
    if [ -n "$file" ] && { [ -z "${VERDA_CLIENT_ID:-}" ] || [ -z "${VERDA_CLIENT_SECRET:-}" ]; }; then
        refuse_in_repo "$file"
        if [ -r "$file" ]; then
            while IFS= read -r line || [ -n "$line" ]; do
                line=${line%%#*}
                [[ $line == *=* ]] || continue
                key=$(printf '%s' "${line%%=*}" | tr -d '[:space:]' | tr '[:upper:]' '[:lower:]')
                value=${line#*=}
                value=$(printf '%s' "$value" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'$/\1/")
                case $key in
                    verda_client_id | client_id) VERDA_CLIENT_ID=${VERDA_CLIENT_ID:-$value} ;;
                    verda_client_secret | client_secret) VERDA_CLIENT_SECRET=${VERDA_CLIENT_SECRET:-$value} ;;
                esac
            done <"$file"
        elif ! is_dry; then
            die "VERDA_CREDENTIALS_FILE=$file cannot be read" "check the path and its permissions (it should be mode 0600)"
        fi
    fi
    if [ -z "${VERDA_CLIENT_ID:-}" ] || [ -z "${VERDA_CLIENT_SECRET:-}" ]; then
        if is_dry; then
            VERDA_CLIENT_ID=${VERDA_CLIENT_ID:-<VERDA_CLIENT_ID>}
            VERDA_CLIENT_SECRET=${VERDA_CLIENT_SECRET:-<VERDA_CLIENT_SECRET>}
            note "no Verda credentials in the environment: using placeholders (a real run needs VERDA_CLIENT_ID/VERDA_CLIENT_SECRET or VERDA_CREDENTIALS_FILE)"
        else
            die "no Verda API credentials" \
                "export VERDA_CLIENT_ID and VERDA_CLIENT_SECRET (Verda console: Keys → Cloud API credentials), or VERDA_CREDENTIALS_FILE=/path/outside/the/repo"
        fi
    fi
    add_secret "$VERDA_CLIENT_SECRET"
}

# verda_login: get an access token (printed as *** in a dry run).
verda_login() {
    verda_credentials
    local body
    body="{\"grant_type\":\"client_credentials\",\"client_id\":$(json_str "$VERDA_CLIENT_ID"),\"client_secret\":$(json_str "$VERDA_CLIENT_SECRET")}"
    printf '+ HTTP POST %s/oauth2/token %s\n' "$VERDA_API" "$(mask "$body")" >&3
    if is_dry; then
        VERDA_TOKEN='<verda-access-token>'
        return 0
    fi
    need_tool jq
    local answer
    answer=$(verda_curl POST "$VERDA_API/oauth2/token" "$body" "") \
        || die "Verda refused the client credentials" "check VERDA_CLIENT_ID / VERDA_CLIENT_SECRET (Verda console: Keys)"
    VERDA_TOKEN=$(printf '%s' "$answer" | jq -r '.access_token // empty')
    [ -n "$VERDA_TOKEN" ] || die "Verda's token answer has no access_token" "retry; check $VERDA_API"
    add_secret "$VERDA_TOKEN"
}

# verda_curl METHOD URL BODY TOKEN: one request; prints the body, fails on
# non-2xx (printing Verda's error). Secrets go through a private curl config
# on stdin, never on the command line.
verda_curl() {
    local method=$1 url=$2 body=$3 token=$4 out code
    out=$(
        {
            printf 'header = "Content-Type: application/json"\n'
            printf 'header = "Accept: application/json"\n'
            [ -z "$token" ] || printf 'header = "Authorization: Bearer %s"\n' "$token"
        } | if [ -n "$body" ]; then
            curl -sS --max-time 60 --retry 2 -K - -X "$method" --data-binary @<(printf '%s' "$body") -w '\n%{http_code}' "$url"
        else
            curl -sS --max-time 60 --retry 2 -K - -X "$method" -w '\n%{http_code}' "$url"
        fi
    ) || { printf '[%s] %s %s: no answer\n' "$NAME" "$method" "$url" >&2; return 1; }
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    if [ "${code:0:1}" != 2 ]; then
        printf '[%s] %s %s: HTTP %s: %s\n' "$NAME" "$method" "$url" "$code" "$(mask "$out")" >&2
        return 1
    fi
    printf '%s' "$out"
}

# verda METHOD PATH [BODY] [DRY_ANSWER] [SHOWN_BODY]: an authenticated API
# call; the request is printed (with SHOWN_BODY instead of BODY when given, for
# bodies too long to read). In a dry run it answers DRY_ANSWER.
verda() {
    local method=$1 path=$2 body=${3:-} dry=${4:-} shown=${5:-${3:-}}
    printf '+ HTTP %s %s%s%s (Authorization: Bearer ***)\n' "$method" "$VERDA_API" "$path" "${shown:+ $(mask "$shown")}" >&3
    if is_dry; then
        printf '%s' "$dry"
        return 0
    fi
    verda_curl "$method" "$VERDA_API$path" "$body" "$VERDA_TOKEN"
}

# Verda answers a created id as plain text, a JSON string, a JSON list of
# ids (volume clone), or {"id": …}.
verda_id() {
    local raw=$1 re='^[A-Za-z0-9_-]+$'
    raw=$(printf '%s' "$raw" | tr -d '[:space:]')
    case $raw in
        \{*) raw=$(printf '%s' "$raw" | jq -r '.id // empty') ;;
        *)
            raw=${raw#[}
            raw=${raw%]}
            raw=${raw%%,*}
            raw=${raw#\"}
            raw=${raw%\"}
            ;;
    esac
    is_dry && re='^[A-Za-z0-9_<>-]+$'
    [[ $raw =~ $re ]] || return 1
    printf '%s' "$raw"
}

# ---- the VPS layout ---------------------------------------------------------------
# Where deploy-control.sh puts things (nomad/agent/*.hcl and the job specs
# name the same paths); each can be overridden from the environment.
COMFY_ETC=${COMFY_ETC:-/etc/comfy-multi}
SECRETS_DIR=${SECRETS_DIR:-$COMFY_ETC/secrets}
DEPLOY_ENV=${DEPLOY_ENV:-$COMFY_ETC/deploy.env}
STATE_DIR=${STATE_DIR:-/var/lib/comfy-multi}
BIN_DIR=${BIN_DIR:-/opt/comfy-multi/bin}
DATA_DIR_HOST=${DATA_DIR_HOST:-/srv/comfy-multi/data}

# load_deploy_env: KEY=VALUE lines of $DEPLOY_ENV (written by
# deploy-control.sh, no secrets in it) for every KEY not already set.
load_deploy_env() {
    local line key value
    [ -r "$DEPLOY_ENV" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] || continue
        key=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        value=${value#\"}
        value=${value%\"}
        [ -n "${!key:-}" ] || printf -v "$key" '%s' "$value"
    done <"$DEPLOY_ENV"
}

# run_env "K=V ..." CMD...: run CMD with extra environment variables (values
# may be secrets: they are masked when printed and never put on a command line).
run_env() {
    local assignments=$1 a
    shift
    printf '+ %s %s\n' "$(mask "$assignments")" "$(mask "$(quote "$@")")" >&3
    is_dry && return 0
    (
        for a in $assignments; do
            export "${a?}"
        done
        "$@"
    )
}

# find_bin NAME: the comfy-multi binary NAME: $BIN_DIR/NAME, else on PATH,
# else this checkout's target/release or target/debug build.
find_bin() {
    local name=$1 c
    for c in "$BIN_DIR/$name" "$(command -v "$name" 2>/dev/null || true)" \
        "$DEPLOY_REPO/target/release/$name" "$DEPLOY_REPO/target/debug/$name"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            printf '%s' "$c"
            return 0
        fi
    done
    printf '%s' "$BIN_DIR/$name"
}
