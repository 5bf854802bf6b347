# Sourced by .ci/run and .ci/test: put the venv .ci/setup makes (.venv) first on PATH, so
# python3, ruff, lint-imports and mypy are its own. Without .venv, whatever is on PATH is used
# (e.g. a venv of your own that is active).
if [ -x .venv/bin/python ]; then
    export VIRTUAL_ENV="$PWD/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
fi
