"""examples/train_loop.py end to end against a real server: three training
steps, a re-run that replays its controller steps, and a refused config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from maxent_client import WeightingConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_loop.py"
NUMBERS = ("reward_mean", "weight_entropy", "tau", "beta", "kl", "loss")


def run_loop(server, run_id: str, *extra: str) -> subprocess.CompletedProcess:
    """Three small steps of the example loop on `run_id`."""
    cmd = [sys.executable, str(SCRIPT), "--target", server.target, "--run-id", run_id, "--steps", "3",
           "--prompts-per-step", "4", "--generations", "4", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_steps_then_a_rerun_replays(server, client, run_id, tmp_path):
    first = run_loop(server, run_id, "--log-jsonl", str(tmp_path / "first.jsonl"))
    assert first.returncode == 0, first.stderr
    records = read_records(tmp_path / "first.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert len(first.stdout.splitlines()) == 3
    for record in records:
        assert all(math.isfinite(record[name]) for name in NUMBERS), record
        assert record["tau"] > 0 and 0 <= record["weight_entropy"] <= math.log(4) + 1e-9
        assert not record["replayed"]
    state = client.get_run(run_id).state
    assert (state.version, state.global_step) == (3, 3)
    assert state.last_measured_kl == records[-1]["kl"]

    again = run_loop(server, run_id, "--log-jsonl", str(tmp_path / "again.jsonl"))
    assert again.returncode == 0, again.stderr
    assert [r["replayed"] for r in read_records(tmp_path / "again.jsonl")] == [True] * 3
    state = client.get_run(run_id).state
    assert (state.version, state.global_step) == (3, 3)


def test_a_run_with_another_config_or_none_is_refused(server, client, run_id):
    client.create_run(run_id, WeightingConfig(tau=1.0, beta=0.5))
    result = run_loop(server, run_id)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"run {run_id!r} exists with a different config: pass its flags again, or --no-create-run"
    ]
    assert client.get_run(run_id).state.version == 0

    missing = run_loop(server, run_id + "-missing", "--no-create-run")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [
        f"run {run_id + '-missing'!r} does not exist: drop --no-create-run to create it"
    ]
