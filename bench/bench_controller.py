"""UpdateController throughput and latency: one replica on SQLite against
replicas sharing one Redis, all clients on the same run.

Every setup gets the same load: `--clients` concurrent trainers (asyncio
tasks spread over `--client-processes` processes), each sending
`--updates` UpdateController calls back to back to one run, each with its own
request_id. In the Redis setup the trainers are spread evenly over the
replicas. Both stores are durable per write: SQLite with synchronous=FULL,
Redis with appendonly and appendfsync always. At the end each setup checks
that the run's version equals the number of updates sent.

    python bench/bench_controller.py [--clients 32] [--updates 50] [--replicas 2]

Numbers depend on the machine (and on whatever else runs on it): quote the
two setups from one run, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from maxent_client import MaxEntClient, WeightingConfig  # noqa: E402
from redis_process import REDIS_SERVER, RedisProcess  # noqa: E402
from server_process import ServerProcess  # noqa: E402

RUN_ID = "bench-controller"
CONFIG = WeightingConfig(tau=0.5, beta=0.1, target_entropy=1.0, tau_lr=0.05, kl_target=0.1, kl_horizon=5,
                         kl_step_size=0.5, tau_min=0.01, tau_max=5.0)


# -- the load (in client processes) ------------------------------------------------


async def _trainers(targets: list[str], first: int, count: int, updates: int, barrier) -> tuple[list[float], float, float, int]:
    from maxent_client import AsyncMaxEntClient, MaxEntError

    clients = [AsyncMaxEntClient(t, timeout=120) for t in targets]
    try:
        for c in clients:  # connect before the clock starts
            await c.get_run(RUN_ID)
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        latencies: list[float] = []
        errors = 0

        async def trainer(k: int) -> None:
            nonlocal errors
            client = clients[k % len(clients)]
            for j in range(updates):
                start = time.perf_counter()
                try:
                    await client.update_controller(RUN_ID, request_id=f"c{k}-u{j}", global_step=j + 1,
                                                   weight_entropy=0.5 + (k % 7) * 0.1, measured_kl=0.05)
                except MaxEntError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        began = time.time()
        await asyncio.gather(*(trainer(k) for k in range(first, first + count)))
        return latencies, began, time.time(), errors
    finally:
        for c in clients:
            await c.close()


def _client_process(targets, first, count, updates, barrier, results) -> None:
    results.put(asyncio.run(_trainers(targets, first, count, updates, barrier)))


def run_load(targets: list[str], clients: int, updates: int, processes: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    shares = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    firsts = [sum(shares[:p]) for p in range(processes)]
    procs = [ctx.Process(target=_client_process, args=(targets, firsts[p], shares[p], updates, barrier, results))
             for p in range(processes) if shares[p]]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    outputs = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(60)
    latencies = sorted(x for out in outputs for x in out[0])
    began, ended = min(o[1] for o in outputs), max(o[2] for o in outputs)
    return {
        "updates": len(latencies),
        "errors": sum(o[3] for o in outputs),
        "seconds": ended - began,
        "throughput": len(latencies) / (ended - began),
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_ms": 1e3 * latencies[-1],
    }


# -- the setups --------------------------------------------------------------------------


def measure(targets: list[str], args) -> dict:
    with MaxEntClient(targets[0], timeout=120) as client:
        client.create_run(RUN_ID, CONFIG)
        result = run_load(targets, args.clients, args.updates, args.client_processes)
        result["final_version"] = client.get_run(RUN_ID).state.version
    return result


def start_servers(folder: Path, n: int, extra: list[str]) -> list[ServerProcess]:
    servers = []
    for i in range(n):
        (folder / f"server-{i}").mkdir(parents=True, exist_ok=True)
        servers.append(ServerProcess(folder / f"server-{i}" / "data", extra_args=["--reward-workers", "1", *extra]))
    for s in servers:
        s.start(timeout=300)
    return servers


def sqlite_setup(folder: Path, args) -> dict:
    servers = start_servers(folder / "sqlite", 1, [])
    try:
        return measure([s.target for s in servers], args)
    finally:
        for s in servers:
            s.stop()


def redis_setup(folder: Path, args) -> dict:
    redis = RedisProcess(folder / "redis").start()
    try:
        servers = start_servers(folder / "redis-replicas", args.replicas, ["--state-store", redis.url(prefix="bench")])
        try:
            result = measure([s.target for s in servers], args)
            result["note"] = _conflicts(redis, result["final_version"])
            return result
        finally:
            for s in servers:
                s.stop()
    finally:
        redis.stop()


def _conflicts(redis: RedisProcess, applied: int) -> str:
    """How many compare-and-set writes were refused and tried again (another
    writer came first, or held the turn): every update is one EVALSHA of the
    write script, plus one per refusal; creating the run is one more."""
    import redis as redis_py

    client = redis_py.Redis(host="127.0.0.1", port=redis.port, decode_responses=True)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    finally:
        client.close()
    # failed_calls: the first EVALSHA of each script on each replica (NOSCRIPT, then loaded).
    retried = stats.get("calls", 0) - stats.get("failed_calls", 0) - applied - 1
    return f"{retried} compare-and-set writes refused and retried ({retried / max(applied, 1):.2f} per update)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent trainers (default 32)")
    parser.add_argument("--updates", type=int, default=50, help="updates per trainer (default 50)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas on Redis (default 2)")
    parser.add_argument("--client-processes", type=int, default=2, help="processes the trainers run in (default 2)")
    args = parser.parse_args()
    if REDIS_SERVER is None:
        print("redis-server is not installed (apt-get install -y redis-server)", file=sys.stderr)
        return 1
    total = args.clients * args.updates
    print(f"UpdateController, {args.clients} concurrent clients on one run, {args.updates} updates each "
          f"({total} in all); {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, setup in (("1 replica, SQLite", sqlite_setup),
                            (f"{args.replicas} replicas, Redis", redis_setup)):
            result = setup(Path(tmp), args)
            rows.append((name, result))
            assert result["final_version"] == total - result["errors"], result
    print(f"{'setup':<22} {'updates/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7} {'version':>8}")
    for name, r in rows:
        print(f"{name:<22} {r['throughput']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} "
              f"{r['errors']:>7} {r['final_version']:>8}")
    for name, r in rows:
        if r.get("note"):
            print(f"{name}: {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
