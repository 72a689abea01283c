#!/usr/bin/env bash
# Create .venv and install the service into it.
#   scripts/setup.sh          server and client
#   scripts/setup.sh --test   also the test tools and the test reward plugin
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="server"
if [ "${1:-}" = "--test" ]; then
    extras="server,test,integrations"
fi
# torch is pinned (pyproject.toml) to the CPU build that lies on this kind of
# machine's disk; a GPU host installs the CUDA build of the same release first.
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install --quiet -e tests/plugins/maxent_test_plugin
fi
