#!/usr/bin/env bash
# Install the pinned JavaScript build tools the end-to-end tests drive (tests/support/js_tools.py)
# into a cache directory: turbo and nx. Idempotent: a finished install is kept.
#   tests/support/install_js_tools.sh [--bench] [DIR]
#     DIR: $SLIPSTREAM_JS_TOOLS, else ~/.cache/slipstream/js-tools
#     --bench: also the community's Turborepo cache server, turborepo-remote-cache, into
#              DIR/bench (benchmarks/bench_buildtools.py runs beside it)
set -euo pipefail
TURBO_VERSION=2.11.13
NX_VERSION=24.0.7
REFERENCE_VERSION=2.12.0
bench=0
if [ "${1:-}" = "--bench" ]; then
    bench=1
    shift
fi
dir=${1:-${SLIPSTREAM_JS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/slipstream/js-tools}}
command -v npm >/dev/null 2>&1 || { echo "install_js_tools: npm is not installed" >&2; exit 1; }

install() {  # install DIR STAMP PACKAGE@VERSION...
    local into=$1 stamp=$2
    shift 2
    if [ "$(cat "$into/.installed" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    mkdir -p "$into"
    echo '{"name": "slipstream-js-tools", "private": true}' > "$into/package.json"
    npm install --prefix "$into" --save-exact --no-audit --no-fund --loglevel=error "$@" >&2
    echo "$stamp" > "$into/.installed"
}

install "$dir" "turbo@$TURBO_VERSION nx@$NX_VERSION" "turbo@$TURBO_VERSION" "nx@$NX_VERSION"
if [ "$bench" = 1 ]; then
    install "$dir/bench" "turborepo-remote-cache@$REFERENCE_VERSION" \
        "turborepo-remote-cache@$REFERENCE_VERSION"
fi
