"""Several real `maxent-server` processes on one real redis-server (loopback):
concurrent updates through every replica equal a serial replay, a retried
request id lands once whichever replica it reaches, Redis going away gives
UNAVAILABLE and the replicas recover by themselves, and the state outlives a
restart of every replica."""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maxent_client import MaxEntClient, MaxEntError, WeightingConfig
from maxent_server.domain import ControllerState, ControllerUpdate, apply_update
from maxent_server.store.redis import RedisStore
from redis_process import REDIS_SERVER, SKIP_REASON, RedisProcess
from server_process import ServerProcess

# Only a missing redis-server binary skips; the redis package is a server dependency.
pytestmark = [pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON), pytest.mark.slow]

CONFIG = WeightingConfig(tau=0.5, beta=0.1, target_entropy=1.0, tau_lr=0.05, kl_target=0.1, kl_horizon=5,
                         kl_step_size=0.5, tau_min=0.01, tau_max=5.0)
CLIENT_TIMEOUT = 60


def start_replicas(tmp_path, url: str, n: int, *, tag: str = "replica") -> list[ServerProcess]:
    for i in range(n):
        (tmp_path / f"{tag}-{i}").mkdir(parents=True, exist_ok=True)
    replicas = [
        ServerProcess(tmp_path / f"{tag}-{i}" / "data", extra_args=[
            "--state-store", url, "--reward-workers", "1", "--grace-seconds", "5"])
        for i in range(n)
    ]
    try:
        start_all(replicas)
    except BaseException:
        stop_all(replicas)
        raise
    return replicas


def start_all(replicas: list[ServerProcess]) -> None:
    """Start the processes side by side (each takes seconds to import torch)."""
    with ThreadPoolExecutor(len(replicas)) as pool:
        for f in [pool.submit(r.start, 180) for r in replicas]:
            f.result()


def stop_all(replicas: list[ServerProcess]) -> None:
    for r in replicas:
        r.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def store_url(redis_server):
    return redis_server.url(prefix=f"replicas-{uuid.uuid4().hex[:8]}", timeout=5)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, store_url):
    procs = start_replicas(tmp_path_factory.mktemp("replicas"), store_url, 3)
    yield procs
    stop_all(procs)


@pytest.fixture()
def clients(replicas):
    opened = [MaxEntClient(r.target, timeout=CLIENT_TIMEOUT) for r in replicas]
    yield opened
    for c in opened:
        c.close()


def update_args(i: int, j: int) -> dict:
    """Deterministic, distinct measurements for client i's j-th update."""
    rng = random.Random(i * 1000 + j)
    return dict(global_step=j + 1, weight_entropy=rng.uniform(0.2, 2.0), measured_kl=rng.uniform(0.0, 0.3))


def same_state(engine_state, client_state) -> bool:
    names = ("tau", "beta", "tau_log", "entropy_ema", "global_step", "version", "active_target_entropy",
             "last_weight_entropy", "last_measured_kl")
    return all(getattr(engine_state, n) == getattr(client_state, n) for n in names)


def test_concurrent_updates_through_every_replica_equal_a_serial_replay(replicas, clients, store_url, run_id):
    clients[0].create_run(run_id, CONFIG)
    n_clients, n_updates = 8, 50
    results: dict[int, tuple[dict, object]] = {}
    lock = threading.Lock()

    def trainer(i: int) -> None:
        for j in range(n_updates):
            client = clients[(i + j) % len(clients)]  # every trainer goes through every replica
            args = update_args(i, j)
            result = client.update_controller(run_id, request_id=f"t{i}-u{j}", **args)
            assert not result.replayed
            with lock:
                assert result.state.version not in results
                results[result.state.version] = (args, result.state)

    with ThreadPoolExecutor(n_clients) as pool:
        for f in [pool.submit(trainer, i) for i in range(n_clients)]:
            f.result()

    total = n_clients * n_updates
    assert sorted(results) == list(range(1, total + 1))
    # Replay serially, in the order the versions say the updates were applied.
    store = RedisStore.from_url(store_url)
    try:
        record = store.get_run(run_id)
    finally:
        store.close()
    assert record.state.version == total
    config = record.config
    state = ControllerState.initial(config, record.create_time)
    for version in range(1, total + 1):
        args, answered = results[version]
        state = apply_update(config, state, ControllerUpdate(**args), now=0.0)
        assert same_state(state, answered), f"version {version} differs from the serial replay"
    assert replace(state, update_time=0.0) == replace(record.state, update_time=0.0)
    # Every replica reads the same final state.
    finals = [c.get_run(run_id).state for c in clients]
    assert all(f == finals[0] for f in finals) and same_state(state, finals[0])


def test_a_retry_on_another_replica_is_applied_once(clients, run_id):
    clients[0].create_run(run_id, CONFIG)
    first = clients[0].update_controller(run_id, request_id="retry-me", global_step=1, weight_entropy=0.5)
    for other in clients[1:]:
        again = other.update_controller(run_id, request_id="retry-me", global_step=1, weight_entropy=0.5)
        assert again.replayed and again.state == first.state
    assert all(c.get_run(run_id).state.version == 1 for c in clients)

    # The same request id reaching every replica at the same moment: one applies it.
    for round_ in range(10):
        barrier = threading.Barrier(len(clients))

        def send(client):
            barrier.wait()
            return client.update_controller(run_id, request_id=f"race-{round_}", global_step=round_ + 2,
                                            weight_entropy=0.7)

        with ThreadPoolExecutor(len(clients)) as pool:
            outcomes = list(pool.map(send, clients))
        assert sum(not o.replayed for o in outcomes) == 1
        assert len({o.state.version for o in outcomes}) == 1
    assert clients[2].get_run(run_id).state.version == 11


def test_runs_are_shared_by_every_replica(clients, run_id):
    clients[1].create_run(run_id, CONFIG)
    assert clients[2].create_run(run_id, CONFIG).run_id == run_id  # same config: the same run
    with pytest.raises(MaxEntError) as info:
        clients[0].create_run(run_id, replace(CONFIG, tau=0.9))
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    listed = [r.run_id for r in clients[0].list_runs(page_size=2)]
    assert run_id in listed and listed == sorted(listed)
    with pytest.raises(MaxEntError) as stale:
        clients[2].update_controller(run_id, global_step=1, expected_version=3)
    assert stale.value.code == grpc.StatusCode.ABORTED
    clients[2].delete_run(run_id)
    with pytest.raises(MaxEntError) as gone:
        clients[0].get_run(run_id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


def balanced_client(replicas: list[ServerProcess]) -> MaxEntClient:
    """One channel over every replica, balancing per call (what a client of
    the Kubernetes headless Service does with dns:///…)."""
    target = "ipv4:" + ",".join(r.target for r in replicas)
    return MaxEntClient(target, timeout=CLIENT_TIMEOUT, options=[("grpc.lb_policy_name", "round_robin")])


def test_state_survives_a_restart_of_every_replica(replicas, run_id):
    with balanced_client(replicas) as client:
        client.create_run(run_id, CONFIG)
        for step in range(1, 6):
            client.update_controller(run_id, request_id=f"before-{step}", global_step=step, weight_entropy=0.3 * step)
        # Replicas going away one by one: the balanced channel carries on with those left.
        for r in replicas[:-1]:
            assert r.terminate() == 0
            for step in range(step + 1, step + 3):
                client.update_controller(run_id, request_id=f"before-{step}", global_step=step, weight_entropy=0.1)
        before = client.get_run(run_id)
        assert before.state.version == step
    assert replicas[-1].terminate() == 0
    start_all(replicas)
    for r in replicas:
        with MaxEntClient(r.target, timeout=CLIENT_TIMEOUT) as client:
            assert client.get_run(run_id) == before
    with balanced_client(replicas) as client:
        assert client.get_run(run_id) == before
        again = client.update_controller(run_id, request_id="before-5", global_step=5, weight_entropy=1.5)
        assert again.replayed and again.state.version == 5
        assert client.update_controller(run_id, global_step=step + 1, weight_entropy=0.1).state.version == step + 1


# -- Redis going away under load -------------------------------------------------------


class Load:
    """Trainers sending updates round-robin over the replicas until stopped.
    Clients make at most two attempts per call (the fewest the retry policy allows), so the test sees the
    errors; every sent request id and its outcome is kept."""

    def __init__(self, targets: list[str], run_id: str, threads: int = 4) -> None:
        self.run_id = run_id
        self.clients = [MaxEntClient(t, timeout=CLIENT_TIMEOUT, max_attempts=2) for t in targets]
        self.sent: dict[str, dict] = {}
        self.ok: dict[str, int] = {}
        self.errors: list[tuple[str, grpc.StatusCode]] = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.counter = itertools.count()
        self.threads = [threading.Thread(target=self._trainer, args=(t,), daemon=True) for t in range(threads)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(120)
        for c in self.clients:
            c.close()

    def _trainer(self, t: int) -> None:
        for j in itertools.count():
            if self.stop_flag.is_set():
                return
            n = next(self.counter)
            request_id = f"load-{n}"
            args = update_args(t, j)
            with self.lock:
                self.sent[request_id] = args
            try:
                result = self.clients[n % len(self.clients)].update_controller(self.run_id, request_id=request_id,
                                                                                **args)
                with self.lock:
                    self.ok[request_id] = result.state.version
            except MaxEntError as error:
                with self.lock:
                    self.errors.append((request_id, error.code))
                time.sleep(0.05)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.ok), len(self.errors)

    def wait_for(self, condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(*self.counts()):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; ok/errors = {self.counts()}")


def assert_controller_unavailable_but_computing(targets: list[str], run_id: str) -> None:
    for target in targets:
        with MaxEntClient(target, timeout=CLIENT_TIMEOUT, max_attempts=2) as client:
            for call in (lambda: client.get_run(run_id),
                         lambda: client.update_controller(run_id, global_step=1, weight_entropy=0.5),
                         lambda: client.compute_weight_stats(run_id, q_values=[[0.5, 0.5]],
                                                             ref_logp_sum=[[-1.0, -2.0]],
                                                             ref_token_counts=[[1, 2]])):
                with pytest.raises(MaxEntError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
            # Work that needs no controller goes on.
            stats = client.compute_reward_statistics(utilities=[[1.0, 0.0, 0.5], [0.2, 0.9]], q_temperature=1.0,
                                                     q_epsilon=1e-6, scale_rewards=True)
            assert len(stats.q_values) == 5
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_redis_outage_under_load_gives_unavailable_and_recovers(tmp_path, run_id):
    redis_server = RedisProcess(tmp_path / "redis").start()
    url = redis_server.url(prefix="outage", timeout=1, connect_timeout=1)
    replicas = start_replicas(tmp_path, url, 2)
    targets = [r.target for r in replicas]
    try:
        with MaxEntClient(targets[0], timeout=CLIENT_TIMEOUT) as client:
            client.create_run(run_id, CONFIG)
        with Load(targets, run_id) as load:
            load.wait_for(lambda ok, err: ok >= 40, "updates before the outage")

            # 1. Redis hangs (SIGSTOP): calls time out into UNAVAILABLE.
            redis_server.pause()
            ok_at_pause, errors_at_pause = load.counts()
            load.wait_for(lambda ok, err: err >= errors_at_pause + 4, "errors while Redis hangs")
            assert_controller_unavailable_but_computing(targets, run_id)
            redis_server.resume()
            _, errors_now = load.counts()
            ok_now = load.counts()[0]
            load.wait_for(lambda ok, err: ok >= ok_now + 40, "recovery after Redis resumes")

            # 2. Redis dies (SIGKILL) and comes back on the same port and folder.
            redis_server.kill()
            _, errors_at_kill = load.counts()
            load.wait_for(lambda ok, err: err >= errors_at_kill + 4, "errors while Redis is down")
            assert_controller_unavailable_but_computing(targets, run_id)
            redis_server.restart()
            ok_now = load.counts()[0]
            load.wait_for(lambda ok, err: ok >= ok_now + 40, "recovery after Redis restarts")

        assert load.errors, "the outage produced no error"
        codes = {code for _, code in load.errors}
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
        acknowledged = sorted(load.ok.values())
        assert len(set(acknowledged)) == len(acknowledged), "two updates answered with the same version"

        # Re-send every failed request id, as a client's retry would: each is
        # applied exactly once (some may have landed before their error).
        failed = {rid for rid, _ in load.errors} - set(load.ok)
        with MaxEntClient(targets[1], timeout=CLIENT_TIMEOUT) as client:
            for rid in sorted(failed):
                client.update_controller(run_id, request_id=rid, **load.sent[rid])
            for rid, version in list(load.ok.items())[:20]:  # an acknowledged one is a replay
                again = client.update_controller(run_id, request_id=rid, **load.sent[rid])
                assert again.replayed and again.state.version == version
            final = client.get_run(run_id).state
        assert final.version == len(load.sent)
        for target in targets:
            with MaxEntClient(target, timeout=CLIENT_TIMEOUT) as client:
                assert client.get_run(run_id).state == final
        for r in replicas:  # the replicas lived through it
            assert r.proc.poll() is None
    finally:
        redis_server.resume() if redis_server.running else None
        stop_all(replicas)
        redis_server.stop()


# -- start-up ------------------------------------------------------------------------------


def test_a_replica_fails_clearly_when_redis_never_comes(tmp_path):
    dead = RedisProcess(tmp_path / "never")  # a free port nobody listens on
    server = ServerProcess(tmp_path / "data", extra_args=[
        "--state-store", dead.url(startup_wait=1, connect_timeout=1), "--reward-workers", "1"])
    with pytest.raises(RuntimeError, match="server exited"):
        server.start(timeout=120)
    assert server.proc.returncode != 0
    assert f"127.0.0.1:{dead.port}" in server.log() and "unreachable" in server.log()
    server.stop()


def test_a_replica_waits_for_redis_that_starts_late(tmp_path, run_id):
    late = RedisProcess(tmp_path / "late")
    server = ServerProcess(tmp_path / "data", extra_args=[
        "--state-store", late.url(startup_wait=300, connect_timeout=1), "--reward-workers", "1"])
    outcome: dict = {}

    def start() -> None:
        try:
            server.start(timeout=400)
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome["error"] = error

    starter = threading.Thread(target=start)
    starter.start()
    try:
        # Start Redis only once the replica says it is waiting for it.
        deadline = time.monotonic() + 240
        while "waiting for Redis" not in server.log() and time.monotonic() < deadline and starter.is_alive():
            time.sleep(0.1)
        assert "waiting for Redis" in server.log(), server.log()
        late.start()
        starter.join(400)
        assert "error" not in outcome, outcome.get("error")
        with MaxEntClient(server.target, timeout=CLIENT_TIMEOUT) as client:
            client.create_run(run_id, CONFIG)
            assert client.update_controller(run_id, global_step=1, weight_entropy=0.4).state.version == 1
    finally:
        starter.join(400)
        server.stop()
        late.stop()
