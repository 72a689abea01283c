#!/usr/bin/env bash
# Set up (first time) and start the server on its embedded default: SQLite
# in the per-user data folder, CUDA when present else the CPU. Flags pass
# through to maxent-server (see maxent-server --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/maxent-server "$@"
