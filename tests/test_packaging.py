"""What `pip install .` really gives: the project's wheel in a fresh virtual
environment with only the client's dependencies runs the README's client
example against a live server, and `maxent-server` there says in one line
which extra to install."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DEPENDENCIES = ("grpcio", "grpcio-status", "protobuf", "numpy")

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment: ~40 s


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=600, **kwargs)


def _clean_env(home: Path) -> dict[str, str]:
    """No PYTHONPATH (it points at the checkout) and no MAXENT_* settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MAXENT_")}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    # Build with the running interpreter's setuptools when it is recent enough
    # (no download); otherwise pip fetches one into an isolated build env.
    build_flags = ["--no-build-isolation"] if _has_setuptools(77) else []
    done = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), *build_flags,
                str(ROOT))
    assert done.returncode == 0, done.stderr
    wheel = next((work / "dist").glob("maxent_grpo_service-*.whl"))
    venv = work / "venv"
    assert _run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    python = str(venv / "bin" / "python")
    # The client's dependencies at the versions tested here, then the wheel alone.
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CLIENT_DEPENDENCIES]
    env = _clean_env(work)
    done = _run(python, "-m", "pip", "install", "-q", *pins, env=env)
    assert done.returncode == 0, done.stderr
    done = _run(python, "-m", "pip", "install", "-q", "--no-deps", str(wheel), env=env)
    assert done.returncode == 0, done.stderr
    return venv


def _has_setuptools(major: int) -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    return int(importlib.metadata.version("setuptools").split(".")[0]) >= major


def _readme_client_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Calling it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_client_install_has_no_server_dependencies(client_venv, tmp_path):
    probe = ("import importlib.util as u; print(' '.join(m for m in ('torch', 'grpc_health', 'prometheus_client', "
             "'math_verify') if u.find_spec(m)))")
    done = _run(str(client_venv / "bin" / "python"), "-c", probe, cwd=tmp_path, env=_clean_env(tmp_path))
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_readme_client_example_runs_in_the_client_install(client_venv, server, tmp_path):
    code = _readme_client_example().replace("127.0.0.1:50051", server.target).replace("readme-1", "pkg-readme")
    assert server.target in code
    done = _run(str(client_venv / "bin" / "python"), "-c", code, cwd=tmp_path, env=_clean_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("entropy ") and "version 20" in done.stdout, done.stdout


def test_maxent_server_in_the_client_install_says_which_extra(client_venv, tmp_path):
    done = _run(str(client_venv / "bin" / "maxent-server"), cwd=tmp_path, env=_clean_env(tmp_path))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("maxent-server needs the server extra") and "pip install 'maxent-grpo-service[server]'" \
        in lines[0]
    # --help needs no server dependency.
    assert _run(str(client_venv / "bin" / "maxent-server"), "--help", cwd=tmp_path,
                env=_clean_env(tmp_path)).returncode == 0
