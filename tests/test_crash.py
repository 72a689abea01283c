"""Crash durability: SIGKILL the server at random moments under concurrent
UpdateController streams; after each restart every acknowledged update is
there, the version counts acknowledged updates plus at most the ones in
flight, and nothing is half-applied."""

from __future__ import annotations

import itertools
import math
import random
import threading
import time

from maxent_client import MaxEntClient, MaxEntError, WeightingConfig
from server_process import ServerProcess

# Only the KL controller runs (no target entropy): each update multiplies beta
# by (1 + e/h). Multiplication commutes, so beta after any set of applied
# updates is beta0 times the product of their factors, whatever the order.
CONFIG = WeightingConfig(tau=0.5, beta=1.0, kl_target=0.1, kl_horizon=4, kl_step_size=0.5)
STREAMS = 4


def factor(kl: float) -> float:
    e = min(max(kl / CONFIG.kl_target - 1.0, -CONFIG.kl_step_size), CONFIG.kl_step_size)
    return 1.0 + e / CONFIG.kl_horizon


def run_streams(target: str, stop: threading.Event, acked: dict, in_flight: dict, seed: int) -> list[threading.Thread]:
    def stream(worker: int) -> None:
        rng = random.Random(seed * 100 + worker)
        with MaxEntClient(target, timeout=10, max_attempts=1) as client:
            for i in itertools.count():
                if stop.is_set():
                    return
                request_id = f"s{seed}-w{worker}-{i}"
                kl = rng.choice([0.02, 0.08, 0.13, 0.3])
                in_flight[worker] = (request_id, kl)
                try:
                    client.update_controller("crash", global_step=i + 1, measured_kl=kl, request_id=request_id)
                except MaxEntError:
                    return  # the server died under us: this one stays "in flight"
                acked[request_id] = kl
                in_flight.pop(worker, None)

    threads = [threading.Thread(target=stream, args=(w,), daemon=True) for w in range(STREAMS)]
    for thread in threads:
        thread.start()
    return threads


def test_kill_9_at_random_moments(tmp_path, request):
    rounds = 20 if request.config.getoption("--long") else 3
    rng = random.Random(1234)
    server = ServerProcess(tmp_path / "data").start()
    acked: dict[str, float] = {}
    ever_in_flight: dict[str, float] = {}
    try:
        with MaxEntClient(server.target) as client:
            client.create_run("crash", CONFIG)
        for round_ in range(rounds):
            stop = threading.Event()
            in_flight: dict[int, tuple[str, float]] = {}
            threads = run_streams(server.target, stop, acked, in_flight, seed=round_)
            time.sleep(rng.uniform(0.3, 1.5))
            server.kill()
            stop.set()
            for thread in threads:
                thread.join(30)
            ever_in_flight.update(dict(in_flight.values()))
            server.start()
            with MaxEntClient(server.target) as client:
                state = client.get_run("crash").state
                # Which of the unacknowledged updates made it to disk? Replaying
                # an applied request_id says so; an unapplied one would apply now,
                # so ask only about acknowledged ones and infer the rest.
                extra = state.version - len(acked)
                assert 0 <= extra <= len(ever_in_flight), (state.version, len(acked), len(ever_in_flight))
                product = math.prod(factor(kl) for kl in acked.values())
                candidates = [
                    math.prod(factor(ever_in_flight[r]) for r in subset)
                    for subset in itertools.combinations(sorted(ever_in_flight), extra)
                ]
                assert any(math.isclose(state.beta, CONFIG.beta * product * c, rel_tol=1e-9) for c in candidates), (
                    state.beta, extra)
                for request_id in rng.sample(sorted(acked), min(5, len(acked))):
                    replay = client.update_controller("crash", global_step=1, measured_kl=acked[request_id],
                                                      request_id=request_id)
                    assert replay.replayed, request_id
                # Count the in-flight ones that were applied as acknowledged from now on.
                applied_extra = [r for r in ever_in_flight
                                 if client.update_controller("crash", global_step=1, measured_kl=ever_in_flight[r],
                                                             request_id=r).replayed]
                assert len(applied_extra) == extra
                # Those not applied were applied just now by the probe: both count.
                for r, kl in ever_in_flight.items():
                    acked[r] = kl
                ever_in_flight.clear()
                assert client.get_run("crash").state.version == len(acked)
        assert len(acked) > rounds  # the streams really ran
    finally:
        server.stop()
