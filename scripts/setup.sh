#!/usr/bin/env bash
# Create .venv and install the service into it.
#   scripts/setup.sh          server and client
#   scripts/setup.sh --test   also the test tools, Ray (its reward backend is tested) and the test reward plugin
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
extras="server"
if [ "${1:-}" = "--test" ]; then
    extras="server,test,integrations,ray"
fi
# Install only when pyproject.toml (or the extras asked for) changed since the
# last install into this .venv: a second start takes seconds and prints nothing.
stamp=".venv/.installed-${extras//,/-}"
want="$(sha256sum pyproject.toml tests/plugins/maxent_test_plugin/pyproject.toml | sha256sum | cut -c1-64)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
.venv/bin/python -m pip install -qq --upgrade pip
# torch is pinned (pyproject.toml) to the CPU build that lies on this kind of
# machine's disk; a GPU host installs the CUDA build of the same release first.
.venv/bin/python -m pip install -qq -e ".[${extras}]"
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -qq -e tests/plugins/maxent_test_plugin
fi
echo "$want" > "$stamp"
