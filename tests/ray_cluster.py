"""A real two-node Ray cluster on this machine, started with ``ray start``.

Each node is started in a session of its own, and every process of that node
(its raylet, agents and Ray workers) stays in that session. So a test can
kill exactly one node, and teardown ends exactly the cluster's processes --
nothing else on the machine, and nothing left behind. (An environment marker
would not do: Ray's workers overwrite their environment with their process
title.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server_process import free_port

TASK_NAME = "maxent-reward-chunk"


def ray_command() -> str:
    return str(Path(sys.executable).with_name("ray"))


def session_pids(session: int) -> list[int]:
    """Live processes of the session ``session`` (every process but this one)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # a zombie is dead already
            pids.append(int(entry))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RayCluster:
    """A head node and one worker node, one CPU each."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        # Ray's socket paths must stay under 108 bytes: a short folder of its own.
        self.ray_dir = tempfile.mkdtemp(prefix="mxray-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.sessions: dict[str, int] = {}  # node name -> session id of its processes

    def _start(self, node: str, args: list[str]) -> None:
        cmd = [ray_command(), "start", "--num-cpus=1", "--object-store-memory=100000000",
               "--disable-usage-stats", *args]
        log = self.temp_dir / f"ray-start-{node}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            self.sessions[node] = proc.pid
            code = proc.wait(timeout=120)
        if code != 0:
            raise RuntimeError(f"ray start ({node}) failed with {code}:\n{log.read_text(errors='replace')}")

    def start(self) -> "RayCluster":
        try:
            self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                                 f"--temp-dir={self.ray_dir}", "--node-ip-address=127.0.0.1"])
            self.add_worker_node("worker")
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker_node(self, name: str) -> None:
        """Start a worker node (one CPU) called ``name``."""
        self._start(name, [f"--address={self.address}", "--node-ip-address=127.0.0.1"])

    def running_task(self, node: str, task_name: str = TASK_NAME) -> bool:
        """Whether a Ray worker of ``node`` is running a task named ``task_name`` (its process title)."""
        for pid in session_pids(self.sessions[node]):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if f"ray::{task_name}".encode() in fh.read():
                        return True
            except OSError:
                continue
        return False

    def kill_node(self, node: str) -> int:
        """SIGKILL every process of node ``node`` (its raylet, agents and Ray workers)."""
        pids = session_pids(self.sessions[node])
        kill_pids(pids)
        return len(pids)

    def stop(self) -> None:
        """Kill the cluster's processes and wait until none is left."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = [pid for session in self.sessions.values() for pid in session_pids(session)]
            if not pids:
                shutil.rmtree(self.ray_dir, ignore_errors=True)
                return
            kill_pids(pids)
            time.sleep(0.2)
        raise RuntimeError(f"Ray processes still running: {pids}")
