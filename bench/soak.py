"""Mixed-load soak of a running maxent-server: every RPC, many concurrent
clients, realistic batches, for a fixed time. Reports requests/s, p50/p99 per
RPC and the server's RSS over time.

    python bench/soak.py --target 127.0.0.1:50051 --pid SERVER_PID --seconds 600 --clients 32
    python bench/soak.py --seconds 120          # starts its own server
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from maxent_client import MaxEntClient, MaxEntError, WeightingConfig  # noqa: E402

CONFIG = WeightingConfig(tau=0.3, beta=0.05, target_entropy=2.0, tau_lr=0.01, tau_min=0.01, tau_max=10.0,
                         kl_target=0.05, kl_horizon=50, kl_step_size=0.2)


@dataclass
class SoakReport:
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (elapsed s, MiB)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def summary(self) -> str:
        lines = [f"{self.requests} requests in {self.seconds:.0f} s: {self.requests / self.seconds:.1f} req/s, "
                 f"{len(self.errors)} errors"]
        lines.append(f"{'RPC':28}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}")
        for name, values in sorted(self.latencies.items()):
            p50, p99 = np.percentile(values, [50, 99]) * 1000
            lines.append(f"{name:28}{len(values):>8}{p50:>10.2f}{p99:>10.2f}")
        if self.rss_mib:
            lines.append(f"RSS MiB: start {self.rss_mib[0][1]:.0f}, after warm-up {self.rss_after_warmup():.0f}, "
                         f"end {self.rss_mib[-1][1]:.0f} (growth {100 * self.rss_growth():.1f}%)")
        return "\n".join(lines)

    def rss_after_warmup(self) -> float:
        warm = [m for t, m in self.rss_mib if t >= self.seconds * 0.25]
        return warm[0] if warm else self.rss_mib[-1][1]

    def rss_growth(self) -> float:
        return self.rss_mib[-1][1] / self.rss_after_warmup() - 1.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(target: str, index: int, deadline: float, report: SoakReport, lock: threading.Lock) -> None:
    rng = random.Random(index)
    nrng = np.random.default_rng(index)
    run_id = f"soak/run-{index % 4}"
    step = 0
    with MaxEntClient(target, timeout=60) as client:
        while time.monotonic() < deadline:
            groups, k = rng.choice([(8, 8), (64, 16), (256, 16)])
            utilities = nrng.normal(size=(groups, k))
            op = rng.random()
            start = time.perf_counter()
            try:
                if op < 0.35:
                    name = "ComputeRewardStatistics"
                    client.compute_reward_statistics(utilities=utilities, run_id=run_id)
                elif op < 0.7:
                    name = "ComputeWeightStats"
                    q = nrng.dirichlet(np.ones(k), size=groups)
                    client.compute_weight_stats(run_id, q_values=q, ref_logp_sum=nrng.normal(-30, 5, size=q.shape),
                                                ref_token_counts=nrng.integers(5, 100, size=q.shape))
                elif op < 0.95:
                    name = "UpdateController"
                    step += 1
                    client.update_controller(run_id, global_step=step, weight_entropy=rng.uniform(0.5, 2.5),
                                             measured_kl=rng.uniform(0.0, 0.2))
                elif op < 0.98:
                    name = "GetRun"
                    client.get_run(run_id)
                else:
                    name = "ListRuns"
                    client.list_runs()
            except MaxEntError as error:
                with lock:
                    report.errors.append(f"{name}: {error}")
                continue
            elapsed = time.perf_counter() - start
            with lock:
                report.latencies[name].append(elapsed)


def run_soak(target: str, server_pid: int | None, *, seconds: float, clients: int) -> SoakReport:
    with MaxEntClient(target) as client:
        for i in range(4):
            client.create_run(f"soak/run-{i}", CONFIG)
    report = SoakReport(seconds=seconds)
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds
    threads = [threading.Thread(target=_worker, args=(target, i, deadline, report, lock), daemon=True)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        if server_pid:
            report.rss_mib.append((time.monotonic() - start, rss_mib(server_pid)))
        time.sleep(max(0.5, seconds / 60))
    for thread in threads:
        thread.join()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="a running server; default: start one")
    parser.add_argument("--pid", type=int, help="the server's pid, for RSS")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    if args.target:
        print(run_soak(args.target, args.pid, seconds=args.seconds, clients=args.clients).summary())
        return 0
    from server_process import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "data").start()
        try:
            report = run_soak(server.target, server.proc.pid, seconds=args.seconds, clients=args.clients)
        finally:
            server.stop()
    print(report.summary())
    return 0 if not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
