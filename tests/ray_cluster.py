"""A real two-node Ray cluster on this machine, started with ``ray start``.

Every process of the cluster carries an environment marker (one value per
node), so a test can kill exactly one node and teardown ends exactly the
cluster's processes -- nothing else on the machine, and nothing left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from server_process import free_port

MARKER = "MAXENT_TEST_RAY_NODE"


def ray_command() -> str:
    return str(Path(sys.executable).with_name("ray"))


def marked_pids(value: str, *, prefix: bool = False) -> list[int]:
    """Processes whose environment has MARKER=value (with ``prefix``: a value starting with it)."""
    needle = f"{MARKER}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if any(var.startswith(needle) if prefix else var == needle for var in env.split(b"\0")):
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
        self.tag = uuid.uuid4().hex[:12]
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, node: str, args: list[str]) -> None:
        env = {**os.environ, MARKER: f"{self.tag}-{node}", "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [ray_command(), "start", "--num-cpus=1", "--object-store-memory=100000000",
               "--disable-usage-stats", *args]
        log = self.temp_dir / f"ray-start-{node}.log"
        with open(log, "wb") as out:
            code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120)
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

    def running_task(self, node: str, task_name: str) -> bool:
        """Whether a Ray worker of ``node`` is running a task named ``task_name`` (its process title)."""
        for pid in marked_pids(f"{self.tag}-{node}"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if f"ray::{task_name}".encode() in fh.read():
                        return True
            except OSError:
                continue
        return False

    def kill_node(self, node: str) -> int:
        """SIGKILL every process of worker node ``node`` (its raylet and its Ray workers)."""
        pids = marked_pids(f"{self.tag}-{node}")
        kill_pids(pids)
        return len(pids)

    def stop(self) -> None:
        """Kill the cluster's processes and wait until none is left."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = marked_pids(self.tag, prefix=True)
            if not pids:
                shutil.rmtree(self.ray_dir, ignore_errors=True)
                return
            kill_pids(pids)
            time.sleep(0.2)
        raise RuntimeError(f"Ray processes still running: {marked_pids(self.tag, prefix=True)}")
