#!/usr/bin/env bash
# Set up and run every check: generated stubs in sync with proto/, buf lint,
# and the test suite (real servers on loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real services the tests start themselves (Debian packages; CI runs as root).
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v redis-server >/dev/null || need+=(redis-server)
command -v bwrap >/dev/null || need+=(bubblewrap)  # the code_unit_tests sandbox
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
export MAXENT_REQUIRE_PROMTOOL=1

bash scripts/setup.sh --test
.venv/bin/python scripts/gen_proto.py --check
(cd proto && ../.venv/bin/buf lint)
echo "buf lint: clean"
.venv/bin/python -m mypy api/maxent_api client/maxent_client server/maxent_server
.venv/bin/hadolint Dockerfile && echo "hadolint: clean"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules.yml
# The engine bench on the CPU at a small size: it fails if any device's
# numbers differ from the CPU's by more than 1e-12 (on a GPU host: --device cuda).
.venv/bin/python bench/bench_engine.py --device auto --sizes 4096 --repeats 3
if command -v node >/dev/null 2>&1; then
    (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
fi
.venv/bin/python -m pytest -q "$@"
