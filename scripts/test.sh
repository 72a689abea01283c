#!/usr/bin/env bash
# Set up and run every check: generated stubs in sync with proto/, buf lint,
# and the test suite (real servers on loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/python scripts/gen_proto.py --check
(cd proto && ../.venv/bin/buf lint)
echo "buf lint: clean"
.venv/bin/python -m pytest -q "$@"
