"""Import cost of the torch-free parts: the time to import a store and the
memory of a reward worker, for the code on PYTHONPATH.

    PYTHONPATH=api:server:client python bench/import_cost.py

Prints the median cumulative `-X importtime` of ``maxent_server.store`` over
`--runs` fresh interpreters, the modules that import loads, and the RSS, PSS
and private memory of each process under a live server (the forkserver and
its reward workers) once its workers are up.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def store_import_us(runs: int) -> list[int]:
    times = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import maxent_server.store"],
                              capture_output=True, text=True, check=True)
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2] == "maxent_server.store":
                times.append(int(parts[1]))
    return times


def _memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for name in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        for line in Path(name).read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Pss", "Private_Clean", "Private_Dirty"):
                values[key] = int(rest.split()[0])
    return {"rss": values["VmRSS"], "pss": values["Pss"], "private": values["Private_Clean"] + values["Private_Dirty"]}


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        if parent == pid:
            found += [int(entry), *_descendants(int(entry))]
    return found


def worker_memory(workers: int, settle: float) -> list[tuple[str, dict[str, int], bool]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen([sys.executable, "-m", "maxent_server", "--port", str(port), "--data-dir", data,
                                   "--device", "cpu", "--metrics-port", "0", "--no-plugins",
                                   "--reward-workers", str(workers)], stderr=subprocess.DEVNULL)
        try:
            time.sleep(settle)
            rows = []
            for pid in _descendants(server.pid):
                command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                kind = "forkserver/worker" if "forkserver" in command else "helper"
                rows.append((kind, _memory_kib(pid), "torch" in Path(f"/proc/{pid}/maps").read_text()))
            return rows
        finally:
            server.terminate()
            server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds for the server and workers to start")
    args = parser.parse_args()
    times = store_import_us(args.runs)
    loaded = subprocess.run([sys.executable, "-c", "import sys, maxent_server.store; "
                             "print(len(sys.modules), 'torch' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.split()
    print(f"import maxent_server.store: median {statistics.median(times) / 1000:.1f} ms "
          f"(min {min(times) / 1000:.1f}, max {max(times) / 1000:.1f}, {len(times)} runs); "
          f"{loaded[0]} modules, torch loaded: {loaded[1]}")
    for kind, memory, torch in worker_memory(args.workers, args.settle):
        print(f"{kind}: RSS {memory['rss'] / 1024:.0f} MiB, PSS {memory['pss'] / 1024:.0f} MiB, "
              f"private {memory['private'] / 1024:.0f} MiB, torch mapped: {torch}")


if __name__ == "__main__":
    main()
