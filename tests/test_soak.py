"""Soak: a mixed load of every RPC from 32 concurrent clients for a fixed
time (60 s in CI, 600 s with --long). No errors, and the server's RSS after
warm-up grows by less than 10 %."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from server_process import ServerProcess  # noqa: E402
from soak import run_soak  # noqa: E402


def test_soak_mixed_load(tmp_path, request):
    seconds = 600 if request.config.getoption("--long") else 60
    server = ServerProcess(tmp_path / "data").start()
    try:
        report = run_soak(server.target, server.proc.pid, seconds=seconds, clients=32)
    finally:
        server.stop()
    print("\n" + report.summary())
    assert not report.errors, report.errors[:5]
    assert set(report.latencies) >= {"ComputeRewardStatistics", "ComputeWeightStats", "UpdateController"}
    assert report.requests > 100
    assert report.rss_growth() < 0.10, report.summary()
