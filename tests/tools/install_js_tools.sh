#!/usr/bin/env bash
# Install the pinned JavaScript build tools the end-to-end tests drive (tests/tools/js_tools.py)
# into a cache directory: turbo and nx. Idempotent: a finished install is kept.
#   tests/tools/install_js_tools.sh [DIR]    DIR: $SLIPSTREAM_JS_TOOLS or ~/.cache/slipstream/js-tools
set -euo pipefail
TURBO_VERSION=2.11.13
NX_VERSION=24.0.7
dir=${1:-${SLIPSTREAM_JS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/slipstream/js-tools}}
stamp="turbo@$TURBO_VERSION nx@$NX_VERSION"
if [ "$(cat "$dir/.installed" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "install_js_tools: npm is not installed" >&2; exit 1; }
mkdir -p "$dir"
cat > "$dir/package.json" <<JSON
{"name": "slipstream-js-tools", "private": true,
 "dependencies": {"turbo": "$TURBO_VERSION", "nx": "$NX_VERSION"}}
JSON
npm install --prefix "$dir" --no-audit --no-fund --loglevel=error >&2
echo "$stamp" > "$dir/.installed"
