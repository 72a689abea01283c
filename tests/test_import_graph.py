"""The import graph: server → api ← client, no edge between server and
client, and no torch behind the stores, the reward workers, the torch-free
domain package or the command line's own checks. Each import runs in a fresh
interpreter, which then reports `sys.modules`."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str, folder: str, skip: tuple[str, ...] = ()) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(ROOT / folder / package)], package + "."):
        if not info.name.endswith("__main__") and not info.name.startswith(skip):
            names.append(info.name)
    return names


def _loaded_after(modules: list[str]) -> set[str]:
    """Top-level names in sys.modules after importing `modules` in a fresh
    interpreter."""
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


SERVER_MODULES = _modules("maxent_server", "server")
CLIENT_CORE = _modules("maxent_client", "client", skip=("maxent_client.integrations", "maxent_client.training"))
TORCH_FREE = [m for m in SERVER_MODULES
              if m.startswith(("maxent_server.store", "maxent_server.rewards", "maxent_server.domain"))
              ] + ["maxent_server.settings", "maxent_server.cli"]


def test_every_server_module_imports_without_the_client():
    loaded = _loaded_after(SERVER_MODULES)
    assert "maxent_api" in loaded and "maxent_client" not in loaded


def test_stores_reward_workers_and_domain_import_no_torch():
    assert {"maxent_server.store.redis", "maxent_server.rewards._worker", "maxent_server.domain"} <= set(TORCH_FREE)
    assert "torch" not in _loaded_after(TORCH_FREE)


def test_the_command_line_checks_need_neither_grpc_nor_torch():
    # maxent-server must be able to say "install the server extra" without them.
    loaded = _loaded_after(["maxent_server.cli", "maxent_server.settings"])
    assert not loaded & {"grpc", "torch", "grpc_health", "prometheus_client"}


def test_the_client_imports_neither_the_server_nor_torch():
    loaded = _loaded_after(CLIENT_CORE)
    assert "maxent_api" in loaded
    assert not loaded & {"maxent_server", "torch"}


def _imported_roots(folder: Path) -> dict[str, set[str]]:
    """{file: top-level packages it imports, at any depth (lazy imports too)}."""
    found = {}
    for path in folder.rglob("*.py"):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = roots
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("server/maxent_server", {"maxent_client"}),
    ("client/maxent_client", {"maxent_server"}),
    ("api/maxent_api", {"maxent_server", "maxent_client", "torch"}),
])
def test_no_import_statement_crosses_the_boundary(folder, forbidden):
    crossing = {path: sorted(roots & forbidden) for path, roots in _imported_roots(ROOT / folder).items()
                if roots & forbidden}
    assert crossing == {}
