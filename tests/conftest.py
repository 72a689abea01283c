"""Shared fixtures: a real maxent-server process on a loopback port."""

from __future__ import annotations

import os
import re

import pytest

from maxent_client import MaxEntClient
from server_process import ServerProcess


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="long mode: 100 000 fuzz cases per RPC, more kill points, longer soak")


def pytest_configure(config):
    if config.getoption("--long"):
        os.environ.setdefault("MAXENT_FUZZ_EXAMPLES", "100000")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("server") / "data",
                         extra_args=["--reward-workers", "2", "--reward-timeout-seconds", "2"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def client(server):
    with MaxEntClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture()
def run_id(request):
    """A run id unique to the test."""
    return "test/" + re.sub(r"[^A-Za-z0-9._\-:/]", "_", request.node.name)[:100]
