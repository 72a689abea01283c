"""The clients' method signatures reach a type checker: mypy, run on a small
program, refuses a misspelt keyword and accepts the correct call."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[dev]')")

ROOT = Path(__file__).resolve().parent.parent

CORRECT = """
    import asyncio

    from maxent_client import AsyncMaxEntClient, MaxEntClient, RewardStatistics
    from maxent_client.integrations.accelerate import MainProcessClient

    stats: RewardStatistics = MaxEntClient("127.0.0.1:1").compute_reward_statistics(utilities=[[1.0, 0.0]])
    shared: RewardStatistics = MainProcessClient("127.0.0.1:1").compute_reward_statistics(utilities=[[1.0, 0.0]])


    async def score() -> RewardStatistics:
        return await AsyncMaxEntClient("127.0.0.1:1").compute_reward_statistics(utilities=[[1.0, 0.0]])


    asyncio.run(score())
"""

MISSPELT = CORRECT.replace("utilities=", "utilitys=")


def mypy(program: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """mypy, with the project's configuration, on `program`."""
    path = tmp_path / "program.py"
    path.write_text(textwrap.dedent(program))
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "--cache-dir", str(tmp_path / "mypy-cache"), "--no-error-summary", str(path)]
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_mypy_refuses_an_unexpected_keyword_and_accepts_the_correct_call(tmp_path):
    correct = mypy(CORRECT, tmp_path)
    assert correct.returncode == 0, correct.stdout + correct.stderr

    misspelt = mypy(MISSPELT, tmp_path)
    assert misspelt.returncode == 1, misspelt.stdout + misspelt.stderr
    errors = misspelt.stdout.splitlines()
    # one error per call (sync, Accelerate's main-process client, asyncio), each naming the keyword
    assert len(errors) == 3, misspelt.stdout
    assert all('Unexpected keyword argument "utilitys"' in line and "[call-arg]" in line for line in errors), errors
