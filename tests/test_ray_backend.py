"""The Ray reward backend against a real two-node Ray cluster on this machine.

The reward cases of test_rewards_service run here against a server started
with ``--reward-backend ray`` (the ``server`` fixture below replaces the
session's local one for this module); then the Ray backend is compared with
the local pool on the same batch, a deadline cancels a call's tasks, bad
settings fail the start, and -- last, since it leaves one node -- the worker
node is killed in the middle of a batch.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")

from maxent_client import DeadlineExceededError, MaxEntClient, RewardTerm  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402
from server_process import ServerProcess  # noqa: E402

# The service's reward cases, collected again here: they use this module's fixtures.
from test_rewards_service import (  # noqa: E402,F401
    test_builtins_and_plugins_are_listed,
    test_error_policy_fails_the_call,
    test_exclude_policy_leaves_failed_completions_out,
    test_length_reward,
    test_math_accuracy_and_format,
    test_plugin_with_params,
    test_reward_violations_name_the_field,
    test_timeouts_and_crashes_fail_only_their_completion,
    test_zero_policy_counts_failures_as_zero_and_says_so,
)

SERVER_ARGS = ["--reward-workers", "2", "--reward-timeout-seconds", "2"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("ray-server") / "data",
                         extra_args=[*SERVER_ARGS, "--reward-backend", "ray", "--ray-address", ray_cluster.address])
    proc.start(timeout=120)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("local-server") / "data", extra_args=SERVER_ARGS)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def backend(ray_cluster):
    """The backend in this process (a driver of the cluster), with the test plugins."""
    import ray

    from maxent_server.rewards.ray_backend import RayBackend

    yield RayBackend(ray_cluster.address, 2.0, [("sleepy", "maxent_test_plugin:sleepy"),
                                                         ("crashy", "maxent_test_plugin:crashy")])
    ray.shutdown()


@pytest.fixture()
def client(server):
    with MaxEntClient(server.target, timeout=120) as c:
        yield c


def _mixed_batch() -> dict:
    """Math, a plugin with params, failures, a timeout and a crash, in two groups."""
    completions = [
        "\\boxed{\\frac12}", "\\boxed{0.5} Paris", "\\boxed{1/3}", "no box", "SLEEP \\boxed{2}", "RAISE",
        "\\boxed{(x+1)^2}", "CRASH", "x^2+2x+1 paris", "\\boxed{x^2+2x+1}", "NAN", "\\boxed{x}",
    ]
    return dict(
        completions=completions, answers=["1/2", "(x+1)^2"], group_sizes=[6, 6], timeout=120,
        rewards=[RewardTerm("math_accuracy", 1.0), RewardTerm("keyword_match", 0.5, {"keyword": "paris"}),
                 RewardTerm("flaky", 1.0), RewardTerm("sleepy", 1.0), RewardTerm("crashy", 0.25)],
    )


def _numbered_batch(n: int) -> tuple[list[str], list[str], np.ndarray]:
    """n distinct math items, every other one right: (completions, golds, expected math_accuracy)."""
    completions = [f"\\boxed{{{k}}}" if k % 2 == 0 else f"\\boxed{{{k + 1}}}" for k in range(n)]
    expected = np.array([1.0 if k % 2 == 0 else 0.0 for k in range(n)])
    return completions, [str(k) for k in range(n)], expected


def _kill_when_busy(cluster: RayCluster, node: str, running: threading.Thread) -> None:
    """Kill ``node`` once it runs a reward chunk, while ``running`` is still going."""
    deadline = time.monotonic() + 120
    while not cluster.running_task(node):
        assert running.is_alive(), "the batch finished before the node ran a chunk; make it larger"
        assert time.monotonic() < deadline, "the node never ran a reward chunk"
        time.sleep(0.05)
    time.sleep(0.5)  # some of its items done, the rest in flight
    assert running.is_alive(), "the batch finished before the node was killed; make it larger"
    assert cluster.kill_node(node) > 0


def test_ray_results_equal_the_local_pool_bit_for_bit(server, local_server):
    with MaxEntClient(server.target, timeout=120) as ray_client, \
            MaxEntClient(local_server.target, timeout=120) as local_client:
        on_ray = ray_client.compute_reward_statistics(**_mixed_batch())
        local = local_client.compute_reward_statistics(**_mixed_batch())
    assert on_ray.failed.any() and not on_ray.failed.all()
    np.testing.assert_array_equal(on_ray.failed, local.failed)
    np.testing.assert_array_equal(on_ray.total_utils, local.total_utils)
    np.testing.assert_array_equal(on_ray.advantages, local.advantages)
    np.testing.assert_array_equal(on_ray.q_values, local.q_values)
    for name, values in local.per_reward.items():
        np.testing.assert_array_equal(on_ray.per_reward[name].values, values.values)  # NaN where failed
        np.testing.assert_array_equal(on_ray.per_reward[name].failed, values.failed)
        assert on_ray.per_reward[name].timeout_count == values.timeout_count
        assert on_ray.per_reward[name].failure_count == values.failure_count
    assert on_ray.per_reward["sleepy"].timeout_count == 1 and on_ray.per_reward["crashy"].failed[7]


def test_hang_beyond_signals_is_killed_and_only_its_completion_fails(client):
    stats = client.compute_reward_statistics(
        completions=[["a", "STUCK", "b", "c"]], answers=[""], rewards=[RewardTerm("stuck", 1.0)], timeout=120)
    np.testing.assert_array_equal(stats.failed, [False, True, False, False])
    assert stats.per_reward["stuck"].timeout_count == 1
    np.testing.assert_array_equal(stats.total_utils[[0, 2, 3]], [1.0, 1.0, 1.0])


def test_deadline_cancels_the_calls_ray_tasks(client):
    # 40 hanging items, 2 s limit each, 2 CPUs: ~50 s of cluster time if the
    # expired call's tasks kept running.
    hanging = [f"SLEEP {i}" for i in range(40)]
    with pytest.raises(DeadlineExceededError):
        client.compute_reward_statistics(completions=[hanging], answers=[""],
                                         rewards=[RewardTerm("sleepy", 1.0)], timeout=1.5)
    started = time.monotonic()
    stats = client.compute_reward_statistics(completions=[["Paris", "Rome"]],
                                             rewards=[RewardTerm("keyword_match", 1.0, {"keyword": "paris"})])
    np.testing.assert_array_equal(stats.total_utils, [1.0, 0.0])
    assert time.monotonic() - started < 30, "the expired call's tasks still held the cluster"


def test_replicas_share_one_cluster(server, ray_cluster, tmp_path):
    other = ServerProcess(tmp_path / "data", extra_args=[*SERVER_ARGS, "--reward-backend", "ray",
                                                         "--ray-address", ray_cluster.address]).start(timeout=120)
    try:
        completions, answers, expected = _numbered_batch(400)
        outcomes: dict = {}

        def score(name: str, target: str) -> None:
            with MaxEntClient(target, timeout=120) as c:
                outcomes[name] = c.compute_reward_statistics(
                    completions=completions, answers=answers, group_sizes=[1] * len(completions),
                    rewards=[RewardTerm("math_accuracy", 1.0)])

        threads = [threading.Thread(target=score, args=(name, proc.target))
                   for name, proc in (("first", server), ("second", other))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        other.stop()
    for name in ("first", "second"):
        assert not outcomes[name].failed.any()
        np.testing.assert_array_equal(outcomes[name].per_reward["math_accuracy"].values, expected)


def test_cancel_kills_the_running_tasks(backend, ray_cluster):
    from maxent_server.rewards.pool import Cancelled
    from maxent_server.rewards._worker import ITEM_PLUGIN

    cancelled = threading.Event()
    items = [(ITEM_PLUGIN, "sleepy", f"SLEEP {i}", "", ()) for i in range(20)]
    timer = threading.Timer(3.0, cancelled.set)
    timer.start()
    with pytest.raises(Cancelled):
        backend.run(items, cancelled)
    # force-cancelled: no worker of either node is still in one of the call's chunks
    deadline = time.monotonic() + 30
    while ray_cluster.running_task("head") or ray_cluster.running_task("worker"):
        assert time.monotonic() < deadline, "a cancelled call's task is still running"
        time.sleep(0.1)
    assert backend.stats()["queued_items"] == 0


def test_a_dead_worker_convicts_only_the_item_it_died_on(backend):
    """Results stream back after they are yielded, so the one just before a
    crash can die with the worker; it must not be marked as the crash."""
    from maxent_server.rewards._worker import ITEM_PLUGIN

    texts = ["CRASH" if k % 6 == 5 else f"ok {k}" for k in range(24)]
    results = backend.run([(ITEM_PLUGIN, "crashy", text, "", ()) for text in texts])
    assert [r.status for r in results] == ["crash" if "CRASH" in t else "ok" for t in texts]
    assert [r.value for r in results if r.status == "ok"] == [float(len(t)) for t in texts if "CRASH" not in t]


def test_ray_backend_without_address_fails_the_start(tmp_path):
    proc = ServerProcess(tmp_path / "data", extra_args=["--reward-backend", "ray"])
    with pytest.raises(RuntimeError, match="server exited with 2"):
        proc.start(timeout=60)
    assert "cannot start: --reward-backend ray needs --ray-address" in proc.log()


def test_unreachable_ray_cluster_fails_the_start(tmp_path):
    from server_process import free_port

    address = f"127.0.0.1:{free_port()}"
    proc = ServerProcess(tmp_path / "data", extra_args=["--reward-backend", "ray", "--ray-address", address])
    with pytest.raises(RuntimeError, match="server exited with 2"):
        proc.start(timeout=60)
    assert f"cannot start: cannot reach the Ray cluster at {address}" in proc.log()


def test_node_loss_mid_batch_loses_no_completion(ray_cluster, server):
    """Kill the worker node while a batch runs: each completion is scored (its
    chunk sent again) or marked failed -- none missing, none a silent 0."""
    n = 5000
    completions, answers, expected = _numbered_batch(n)
    outcome: dict = {}

    def call() -> None:
        with MaxEntClient(server.target, timeout=300) as c:
            try:
                outcome["stats"] = c.compute_reward_statistics(
                    completions=completions, answers=answers, group_sizes=[1] * n,
                    rewards=[RewardTerm("math_accuracy", 1.0)])
            except Exception as error:  # noqa: BLE001 - asserted below
                outcome["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    _kill_when_busy(ray_cluster, "worker", thread)
    thread.join(300)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    stats = outcome["stats"]
    values = stats.per_reward["math_accuracy"].values
    failed = stats.per_reward["math_accuracy"].failed
    assert len(values) == n
    np.testing.assert_array_equal(values[~failed], expected[~failed])  # every value that came back is right
    assert np.isnan(values[failed]).all()
    assert failed.sum() < n // 10, f"{failed.sum()} of {n} failed; the lost chunks should have been retried"
    # The kill did hit work: chunks were sent again, or items failed with their worker.
    assert "sending" in server.log() or failed.any()
    # The surviving node still serves.
    with MaxEntClient(server.target, timeout=120) as c:
        again = c.compute_reward_statistics(completions=[["\\boxed{2}", "\\boxed{3}"]], answers=["2"],
                                            rewards=[RewardTerm("math_accuracy", 1.0)])
    np.testing.assert_array_equal(again.total_utils, [1.0, 0.0])


def test_node_loss_past_the_retries_marks_the_lost_items_failed(backend, ray_cluster, monkeypatch):
    """With no retries left, the items of a lost node come back failed with the
    reason; the rest are scored."""
    from maxent_server.rewards import ray_backend
    from maxent_server.rewards._worker import ITEM_MATH

    ray_cluster.add_worker_node("worker2")
    monkeypatch.setattr(ray_backend, "MAX_RETRIES", 0)
    completions, golds, expected = _numbered_batch(3000)
    items = [(ITEM_MATH, text[len("\\boxed{"):-1], gold, 6) for text, gold in zip(completions, golds)]
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("results", backend.run(items)))
    thread.start()
    _kill_when_busy(ray_cluster, "worker2", thread)
    thread.join(300)
    assert not thread.is_alive()
    results = outcome["results"]
    assert backend.stats()["queued_items"] == 0
    assert len(results) == len(items)
    lost = [r for r in results if r.status != "ok"]
    assert lost and len(lost) < len(items)
    assert all(r.status == "crash" and r.value is None for r in lost), {r.message for r in lost}
    assert {r.message for r in lost} <= {"lost with its Ray node (1 attempts)", "the Ray worker died (WorkerCrashedError)"}
    scored = np.array([r.value if r.status == "ok" else np.nan for r in results])
    ok = ~np.isnan(scored)
    np.testing.assert_array_equal(scored[ok], expected[ok])
