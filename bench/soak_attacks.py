"""UpdateController latency on an idle server against the same server under
attack: degenerate SEED-GRPO answer texts, oversized group lists and a
restricted token listing runs in a loop, all beside normal trainer traffic.

Starts its own server (SQLite, CPU, tokens on, default settings) and prints
both p99s and their ratio; the hardening goal is a ratio of at most 2.

The trainer (two threads, an admin token) makes --rate steps per second per
thread, each an UpdateController and a 64x16 ComputeRewardStatistics. The
attackers hold tokens of their own: another tenant's read token sends the
SEED texts and the group floods, a restricted reader lists runs; each
attack loops as fast as the server answers it, from a separate process at
a lower CPU priority (standing in for another host).

    python bench/soak_attacks.py --seconds 60 --runs 5000 --rate 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from maxent_api import pb, pb_grpc  # noqa: E402
from maxent_client import MaxEntClient, MaxEntError, WeightingConfig  # noqa: E402
from server_process import ServerProcess  # noqa: E402

ADMIN = "bench-admin-token-0123456789"
READER = "bench-reader-token-0123456789"
TENANT = "bench-tenant-token-0123456789"
CONFIG = WeightingConfig(tau=0.3, beta=0.05, target_entropy=2.0, tau_lr=0.01, tau_min=0.01, tau_max=10.0)
UNCLOSED_BOXES = "\\boxed{" * 60_000


def _tokens_file(folder: Path) -> Path:
    path = folder / "tokens.json"
    path.write_text(json.dumps({"tokens": [
        {"name": "admin", "token": ADMIN, "role": "admin", "runs": ["*"]},
        {"name": "reader", "token": READER, "role": "read", "runs": ["team-z/*"]},
        {"name": "tenant", "token": TENANT, "role": "read", "runs": ["team-b/*"]},
    ]}))
    path.chmod(0o600)
    return path


def _seed_runs(target: str, count: int) -> None:
    with MaxEntClient(target, token=ADMIN, timeout=60) as client:
        client.create_run("bench/trainer", CONFIG)
        for i in range(count):
            client.create_run(f"filler/run-{i:06d}", CONFIG)
        client.create_run("team-z/visible", CONFIG)


def _trainer(target: str, stop: threading.Event, latencies: list[float], errors: list[str], rate: float) -> None:
    rng = np.random.default_rng(0)
    period = 1.0 / rate if rate > 0 else 0.0
    with MaxEntClient(target, token=ADMIN, timeout=30) as client:
        step = client.get_run("bench/trainer").state.version
        tick = time.perf_counter()
        while not stop.is_set():
            if period:
                tick += period
                stop.wait(max(0.0, tick - time.perf_counter()))
            step += 1
            start = time.perf_counter()
            try:
                client.update_controller("bench/trainer", global_step=step,
                                         weight_entropy=float(rng.uniform(0.5, 2.5)),
                                         measured_kl=float(rng.uniform(0.0, 0.1)))
            except MaxEntError as error:
                errors.append(str(error))
                continue
            latencies.append(time.perf_counter() - start)
            client.compute_reward_statistics(utilities=rng.normal(size=(64, 16)), run_id="bench/trainer")


def _attack_seed(stub, metadata, stop: threading.Event, counts: dict) -> None:
    n = 8
    request = pb.ComputeRewardStatisticsRequest(
        utilities=[float(i % 2) for i in range(n)], completions=[UNCLOSED_BOXES] * n, group_sizes=[n],
        gen_logp_sum=[-1.0] * n, token_counts=[10] * n)
    request.seed_grpo.enabled = True
    _loop(stub.ComputeRewardStatistics, request, metadata, stop, counts, "seed")


def _attack_groups(stub, metadata, stop: threading.Event, counts: dict) -> None:
    request = pb.ComputeRewardStatisticsRequest(utilities=[1.0, 2.0], group_sizes=[2] + [0] * 2_000_000)
    _loop(stub.ComputeRewardStatistics, request, metadata, stop, counts, "groups")


def _attack_listing(stub, stop: threading.Event, counts: dict) -> None:
    request = pb.ListRunsRequest(page_size=100)
    _loop(stub.ListRuns, request, (("authorization", f"Bearer {READER}"),), stop, counts, "listing")


def _loop(method, request, metadata, stop: threading.Event, counts: dict, name: str) -> None:
    while not stop.is_set():
        try:
            method(request, metadata=metadata, timeout=10)
            outcome = "OK"
        except grpc.RpcError as error:
            outcome = error.code().name
        counts.setdefault(f"{name} {outcome}", 0)
        counts[f"{name} {outcome}"] += 1


def _attacker(target: str, attacks: frozenset[str], per_attack: int, stop, counts) -> None:
    """The attack loops, in a process of their own so that their client-side
    work (building and sending megabytes) does not share the measuring
    trainer's interpreter. It runs at a lower CPU priority: on a two-core
    machine it stands in for an attacker on another host, whose own CPU
    should not count against the server."""
    os.nice(10)
    local_stop = threading.Event()
    local_counts: dict = {}
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.MaxEntServiceStub(channel)
    tenant = (("authorization", f"Bearer {TENANT}"),)
    threads = []
    if "seed" in attacks:
        threads += [threading.Thread(target=_attack_seed, args=(stub, tenant, local_stop, local_counts))
                    for _ in range(per_attack)]
    if "groups" in attacks:
        threads += [threading.Thread(target=_attack_groups, args=(stub, tenant, local_stop, local_counts))
                    for _ in range(per_attack)]
    if "listing" in attacks:
        threads += [threading.Thread(target=_attack_listing, args=(stub, local_stop, local_counts))
                    for _ in range(per_attack)]
    for thread in threads:
        thread.start()
    stop.wait()
    local_stop.set()
    for thread in threads:
        thread.join()
    channel.close()
    counts.update(local_counts)


def _measure(target: str, seconds: float, attacks: frozenset[str], per_attack: int = 1,
             rate: float = 0.0) -> tuple[list[float], list[str], dict]:
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_trainer, args=(target, stop, latencies, errors, rate)) for _ in range(2)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        attack_stop, counts = manager.Event(), manager.dict()
        attacker = None
        if attacks:
            attacker = context.Process(target=_attacker, args=(target, attacks, per_attack, attack_stop, counts))
        if attacker is not None:
            attacker.start()
            time.sleep(1.0)  # let the attack reach the server first
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        if attacker is not None:
            attack_stop.set()
            attacker.join(60)
        outcome = dict(counts)
    return latencies, errors, outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30, help="length of each phase (default 30)")
    parser.add_argument("--runs", type=int, default=5000, help="runs the restricted token cannot see (default 5000)")
    parser.add_argument("--threads", type=int, default=1, help="looping clients per attack (default 1)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="steps per second of each trainer thread (UpdateController plus a 64x16 "
                             "ComputeRewardStatistics); 0 = as fast as the server answers (default 20)")
    parser.add_argument("--attacks", default="seed,groups,listing",
                        help="which attacks run together (default all: seed,groups,listing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = ServerProcess(folder / "data", extra_args=["--auth-tokens", str(_tokens_file(folder)),
                                                            "--no-access-log"])
        server.start()
        try:
            _seed_runs(server.target, args.runs)
            idle, idle_errors, _ = _measure(server.target, args.seconds, frozenset(), rate=args.rate)
            attacked, attacked_errors, counts = _measure(server.target, args.seconds, frozenset(args.attacks.split(",")),
                                                 args.threads, args.rate)
            alive = server.proc is not None and server.proc.poll() is None
        finally:
            server.stop()
    idle_p99, attacked_p99 = (float(np.percentile(x, 99)) * 1000 for x in (idle, attacked))
    print(f"UpdateController idle:         {len(idle):6d} calls, p50 {np.median(idle) * 1000:7.2f} ms, "
          f"p99 {idle_p99:7.2f} ms, {len(idle_errors)} errors")
    print(f"UpdateController under attack: {len(attacked):6d} calls, p50 {np.median(attacked) * 1000:7.2f} ms, "
          f"p99 {attacked_p99:7.2f} ms, {len(attacked_errors)} errors")
    print(f"p99 ratio (attack / idle): {attacked_p99 / idle_p99:.2f}  (goal <= 2)")
    print("attack calls by outcome: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(f"server alive after the attack: {alive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
