#!/usr/bin/env bash
# Install the pinned real dependencies of comfy-multi's tests and local stack.
#
# Idempotent: every step is skipped when it is already done, so a second run
# takes a second or two and changes nothing. Used by .ci/run (through
# scripts/test.sh) and by scripts/start.sh.
#
#   scripts/install-deps.sh            # everything the tests need
#   scripts/install-deps.sh --browser  # also ChromeDriver (optional)
#
# What it installs:
#   - Debian packages: redis-server (we start our own instances on free ports;
#     the system service is neither needed nor started by this script),
#     packer, shellcheck, wrk, curl, chromium (the admin page's headless
#     browser test), and nodejs / npm when there is no `node` / `npm` yet.
#   - Consul $CONSUL_VERSION: the binary of Debian bullseye's `consul` package,
#     fetched through a private apt configuration under the cache, so the
#     system's apt sources are never touched. Ends up in $CACHE/bin/consul.
#   - The pinned ComfyUI editor: PyPI's $FRONTEND_PACKAGE==$FRONTEND_VERSION
#     (the one ComfyUI v0.3.64 ships with), unpacked under $CACHE/frontend/.
#   - The browser tests' JavaScript: `npm ci` in tests/browser (playwright-core,
#     pinned by its package-lock.json; it drives Debian's chromium and never
#     downloads a browser) into tests/browser/node_modules (gitignored), with
#     npm's download cache in $CACHE/npm.
#
# Everything downloaded lives in the cache folder, outside git:
#   ${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}
# It also writes $CACHE/env.sh, which scripts/test.sh and scripts/start.sh
# source to get PATH, COMFY_MULTI_CACHE and COMFYUI_FRONTEND_DIR.
set -euo pipefail

# ---- pins -------------------------------------------------------------------
CONSUL_VERSION=1.8.7
CONSUL_SUITE=bullseye
# Override if bullseye ever leaves the main mirror (e.g. an archive mirror).
BULLSEYE_MIRROR=${COMFY_MULTI_BULLSEYE_MIRROR:-http://deb.debian.org/debian}
FRONTEND_PACKAGE=comfyui-frontend-package
FRONTEND_VERSION=1.27.10
FRONTEND_WHEEL_SHA256=822b2ef715771ec83ad19605d02e25b069991d366b81ccc550ab280ae9c831b8

APT_PACKAGES=(redis-server packer shellcheck wrk curl ca-certificates debian-archive-keyring chromium)
BROWSER_PACKAGES=(chromium-driver)

CACHE=${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BROWSER_JS_DIR="$ROOT/tests/browser"

# ---- helpers ----------------------------------------------------------------
log() { printf '[install-deps] %s\n' "$*"; }

# die WHAT FIX...: say what failed and how to fix it, then exit non-zero.
die() {
    local what=$1
    shift
    printf '[install-deps] FAILED: %s\n' "$what" >&2
    if [ "$#" -gt 0 ]; then
        printf '[install-deps]   how to fix: %s\n' "$@" >&2
    fi
    exit 1
}

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        command -v sudo >/dev/null 2>&1 \
            || die "need root to run: $*" "run this script as root, or install sudo and give this user sudo rights"
        sudo "$@"
    fi
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = 'install ok installed' ]
}

# Write $2 to file $1 only when the content differs (keeps re-runs change-free).
write_if_changed() {
    local file=$1 content=$2
    if [ -f "$file" ] && [ "$(cat "$file")" = "$content" ]; then
        return 0
    fi
    printf '%s\n' "$content" >"$file"
}

# ---- arguments --------------------------------------------------------------
WANT_BROWSER=0
while [ "$#" -gt 0 ]; do
    case $1 in
        --browser) WANT_BROWSER=1 ;; # OPTIONAL: ChromeDriver; off by default (chromium itself is always installed)
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1" "run '$0 --help'" ;;
    esac
    shift
done

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    die "this script needs a Debian-based system (dpkg-query, apt-get not found)" \
        "run it on Debian 12 (bookworm), the project's machine kind"
fi

mkdir -p "$CACHE/bin" || die "cannot create cache folder $CACHE" "set COMFY_MULTI_CACHE to a writable folder"
CACHE=$(cd "$CACHE" && pwd)
log "cache folder: $CACHE"

# Serialize concurrent runs (test.sh and start.sh may both call us).
exec 9>>"$CACHE/.install-deps.lock"
flock 9 || die "cannot lock $CACHE/.install-deps.lock" "check that no other install-deps.sh is stuck"

# ---- 1. Debian packages -----------------------------------------------------
step_apt() {
    local wanted=("${APT_PACKAGES[@]}") missing=() p
    if [ "$WANT_BROWSER" -eq 1 ]; then
        wanted+=("${BROWSER_PACKAGES[@]}")
    fi
    # Node.js for the browser tests; Debian's only when there is none (a
    # NodeSource nodejs already brings npm and conflicts with Debian's npm).
    command -v node >/dev/null 2>&1 || wanted+=(nodejs)
    command -v npm >/dev/null 2>&1 || wanted+=(npm)
    # pip for `pip download`; Debian's python3-pip only if python3 has none.
    if ! command -v python3 >/dev/null 2>&1; then
        wanted+=(python3 python3-pip)
    elif ! python3 -m pip --version >/dev/null 2>&1; then
        wanted+=(python3-pip)
    fi
    for p in "${wanted[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "debian packages: all present (${wanted[*]})"
        return 0
    fi
    log "debian packages: installing ${missing[*]}"
    as_root apt-get update -q \
        || die "apt-get update" "check the network to the Debian mirror and /etc/apt/sources.list*"
    # policy: we never start the system redis-server; our tests and start.sh
    # run their own instances on free ports.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]}" "run 'apt-get install ${missing[*]}' by hand and read its error"
    for p in "${missing[@]}"; do
        pkg_installed "$p" || die "package $p still not installed after apt-get install" "run 'apt-get install $p' by hand"
    done
}

# ---- 2. Consul from Debian bullseye, via a private apt config -----------------
# First line of `consul version`, e.g. "Consul v1.8.7"; empty if it does not run.
consul_version() {
    local out
    out=$("$CACHE/bin/consul" version 2>/dev/null) || return 0
    printf '%s' "${out%%$'\n'*}"
}

consul_ok() {
    [ -x "$CACHE/bin/consul" ] && [ "$(consul_version)" = "Consul v$CONSUL_VERSION" ]
}

step_consul() {
    if consul_ok; then
        log "consul: $CACHE/bin/consul is v$CONSUL_VERSION already"
        return 0
    fi
    local apt_dir="$CACHE/apt-$CONSUL_SUITE" keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -r "$keyring" ] || die "missing $keyring (Debian archive keys, needed to verify $CONSUL_SUITE)" \
        "apt-get install debian-archive-keyring"
    mkdir -p "$apt_dir/etc/preferences.d" "$apt_dir/state/lists/partial" \
        "$apt_dir/cache/archives/partial" "$apt_dir/debs"
    write_if_changed "$apt_dir/etc/sources.list" \
        "deb [signed-by=$keyring] $BULLSEYE_MIRROR $CONSUL_SUITE main"
    [ -f "$apt_dir/state/status" ] || : >"$apt_dir/state/status"
    # Everything apt reads or writes is redirected to $apt_dir; the system's
    # sources, lists, status and cache are left alone. apt.conf.d (proxies) still applies.
    local opts=(
        -o "Dir::Etc::sourcelist=$apt_dir/etc/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::Etc::preferences=$apt_dir/etc/preferences"
        -o "Dir::Etc::preferencesparts=$apt_dir/etc/preferences.d"
        -o "Dir::State=$apt_dir/state"
        -o "Dir::State::status=$apt_dir/state/status"
        -o "Dir::Cache=$apt_dir/cache"
        -o "Dir::Cache::pkgcache=$apt_dir/cache/pkgcache.bin"
        -o "Dir::Cache::srcpkgcache=$apt_dir/cache/srcpkgcache.bin"
        -o "Acquire::Languages=none"
        -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
        -o "APT::Sandbox::User=$(id -un)"
    )
    local deb
    deb=$(find "$apt_dir/debs" -maxdepth 1 -name "consul_${CONSUL_VERSION}*.deb" -print -quit)
    if [ -z "$deb" ]; then
        log "consul: fetching $CONSUL_SUITE package lists into $apt_dir"
        apt-get -q "${opts[@]}" update \
            || die "apt-get update for $CONSUL_SUITE (private config in $apt_dir)" \
                "check that $BULLSEYE_MIRROR serves $CONSUL_SUITE; if it moved, set COMFY_MULTI_BULLSEYE_MIRROR to a mirror that has it"
        log "consul: downloading consul=$CONSUL_VERSION* from $CONSUL_SUITE"
        (cd "$apt_dir/debs" && apt-get -q "${opts[@]}" download "consul=${CONSUL_VERSION}*") \
            || die "apt-get download consul from $CONSUL_SUITE" \
                "'apt-cache ${opts[*]} policy consul' shows what $CONSUL_SUITE offers; the pin is CONSUL_VERSION=$CONSUL_VERSION"
        deb=$(find "$apt_dir/debs" -maxdepth 1 -name "consul_${CONSUL_VERSION}*.deb" -print -quit)
        [ -n "$deb" ] || die "apt-get download left no consul_${CONSUL_VERSION}*.deb in $apt_dir/debs" "remove $apt_dir and re-run"
    else
        log "consul: reusing downloaded $(basename "$deb")"
    fi
    local unpack="$apt_dir/unpacked"
    rm -rf "$unpack"
    dpkg-deb -x "$deb" "$unpack" || die "dpkg-deb -x $deb" "delete $deb (it may be truncated) and re-run"
    [ -f "$unpack/usr/bin/consul" ] || die "no usr/bin/consul inside $deb" "delete $deb and re-run"
    install -m 0755 "$unpack/usr/bin/consul" "$CACHE/bin/consul"
    # Keep only the .deb; the bullseye lists and apt's caches are ~70 MB.
    rm -rf "$unpack" "$apt_dir/state/lists" "$apt_dir/cache"
    consul_ok || die "$CACHE/bin/consul does not report v$CONSUL_VERSION (it says: '$(consul_version)')" \
        "delete $apt_dir and $CACHE/bin/consul, then re-run"
    log "consul: installed $CACHE/bin/consul (v$CONSUL_VERSION)"
}

# ---- 3. The pinned ComfyUI editor (frontend) ----------------------------------
FRONTEND_DIR="$CACHE/frontend/$FRONTEND_VERSION"
FRONTEND_STATIC="$FRONTEND_DIR/comfyui_frontend_package/static"
FRONTEND_MARKER="$FRONTEND_DIR/.installed"

step_frontend() {
    if [ -f "$FRONTEND_MARKER" ] && [ -f "$FRONTEND_STATIC/index.html" ]; then
        log "frontend: $FRONTEND_PACKAGE $FRONTEND_VERSION present"
        return 0
    fi
    local dl="$CACHE/downloads"
    mkdir -p "$dl"
    local wheel="$dl/comfyui_frontend_package-$FRONTEND_VERSION-py3-none-any.whl"
    if [ ! -f "$wheel" ] || ! echo "$FRONTEND_WHEEL_SHA256  $wheel" | sha256sum -c --status -; then
        rm -f "$wheel"
        log "frontend: downloading $FRONTEND_PACKAGE==$FRONTEND_VERSION from PyPI"
        python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
            --progress-bar off -q -d "$dl" "$FRONTEND_PACKAGE==$FRONTEND_VERSION" \
            || die "pip download $FRONTEND_PACKAGE==$FRONTEND_VERSION" \
                "check network access to PyPI (pip config / PIP_INDEX_URL), then re-run"
        [ -f "$wheel" ] || die "pip left no $wheel" "look in $dl for what pip downloaded"
        echo "$FRONTEND_WHEEL_SHA256  $wheel" | sha256sum -c --status - \
            || die "sha256 of $wheel is $(sha256sum "$wheel" | cut -d' ' -f1), expected $FRONTEND_WHEEL_SHA256" \
                "delete $wheel and re-run; if PyPI really changed the file, review it and update FRONTEND_WHEEL_SHA256"
    fi
    rm -rf "$FRONTEND_DIR"
    mkdir -p "$FRONTEND_DIR"
    python3 -m zipfile -e "$wheel" "$FRONTEND_DIR" \
        || die "unzip $wheel into $FRONTEND_DIR" "delete $wheel and re-run"
    [ -f "$FRONTEND_STATIC/index.html" ] \
        || die "$FRONTEND_STATIC/index.html missing after unpacking" "the wheel's layout changed; check $FRONTEND_DIR"
    echo "$FRONTEND_PACKAGE==$FRONTEND_VERSION sha256=$FRONTEND_WHEEL_SHA256" >"$FRONTEND_MARKER"
    log "frontend: unpacked into $FRONTEND_DIR"
}

# ---- 4. Rust tools ----------------------------------------------------------
step_rust() {
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found" "install the Rust toolchain (rustup) and put ~/.cargo/bin on PATH"
    if command -v cargo-nextest >/dev/null 2>&1; then
        log "rust: cargo and cargo-nextest present"
    else
        # Not installed from crates here on purpose; scripts/test.sh uses plain cargo test.
        log "rust: cargo present (cargo-nextest not found; optional)"
    fi
}

# ---- 5. The browser tests' JavaScript ----------------------------------------
BROWSER_JS_MARKER="$BROWSER_JS_DIR/node_modules/.comfy-multi-lock.sha256"

step_browser_js() {
    local lock="$BROWSER_JS_DIR/package-lock.json" want
    [ -f "$lock" ] || die "missing $lock" "restore tests/browser from git"
    want=$(sha256sum "$lock" | cut -d' ' -f1)
    if [ -f "$BROWSER_JS_MARKER" ] && [ "$(cat "$BROWSER_JS_MARKER")" = "$want" ] \
        && [ -f "$BROWSER_JS_DIR/node_modules/playwright-core/package.json" ]; then
        log "browser js: tests/browser/node_modules matches package-lock.json"
        return 0
    fi
    command -v npm >/dev/null 2>&1 || die "npm not found" "apt-get install npm (or a Node.js that ships npm)"
    log "browser js: npm ci in tests/browser (playwright-core; no browser download)"
    (cd "$BROWSER_JS_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --cache "$CACHE/npm" \
        --no-audit --no-fund --loglevel=error) \
        || die "npm ci in $BROWSER_JS_DIR" \
            "check access to the npm registry ('npm config get registry'), then re-run"
    printf '%s\n' "$want" >"$BROWSER_JS_MARKER"
    log "browser js: installed into $BROWSER_JS_DIR/node_modules"
}

step_apt
step_consul
step_frontend
step_rust
step_browser_js

write_if_changed "$CACHE/env.sh" "# Written by scripts/install-deps.sh; source it.
export COMFY_MULTI_CACHE='$CACHE'
export COMFYUI_FRONTEND_DIR='$FRONTEND_STATIC'
case \":\$PATH:\" in *':$CACHE/bin:'*) ;; *) export PATH='$CACHE/bin':\"\$PATH\" ;; esac"

log "done. summary:"
log "  cache:           $CACHE"
log "  consul:          $CACHE/bin/consul ($(consul_version))"
log "  redis-server:    $(command -v redis-server)"
log "  frontend static: $FRONTEND_STATIC"
log "  chromium:        $(command -v chromium || echo missing)"
log "  browser js:      $BROWSER_JS_DIR/node_modules"
log "  env for shells:  . $CACHE/env.sh"
