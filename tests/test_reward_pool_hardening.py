"""Reward worker pool under attack: shutdown during long items, a killed server,
and small calls queued behind large ones.

Needs the test plugin package installed:
    pip install -e tests/plugins/maxent_test_plugin
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from maxent_client import RewardFailurePolicy, MaxEntClient, MaxEntError, RewardTerm
from maxent_server.rewards._worker import ITEM_PLUGIN
from maxent_server.rewards.pool import Cancelled, WorkerPool
from server_process import ServerProcess

pytestmark = [
    pytest.mark.skipif(
        not any(ep.name == "sleepy" for ep in entry_points(group="maxent.rewards")),
        reason="test plugin not installed: pip install -e tests/plugins/maxent_test_plugin",
    ),
    pytest.mark.skipif(not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
                       reason="needs /proc/PID/task/TID/children (Linux) to find the worker processes"),
]

PLUGINS = [("sleepy", "maxent_test_plugin:sleepy"), ("stuck", "maxent_test_plugin:stuck"),
           ("keyword_match", "maxent_test_plugin:keyword_match")]


def plugin_item(name: str, completion: str, **params: object) -> tuple:
    return (ITEM_PLUGIN, name, completion, "", tuple(sorted(params.items())))


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``, read from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(map(int, (task / "children").read_text().split()))
        except OSError:
            pass  # the process or thread just ended
    return found


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``: children, grandchildren..."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (waiting only to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def reward_call(server: ServerProcess, name: str, completions: list[str], outcome: dict) -> threading.Thread:
    """Start a ComputeRewardStatistics call on its own thread; ``outcome`` gets
    the statistics (or the error) and the time it ended."""

    def call() -> None:
        try:
            with MaxEntClient(server.target, timeout=300) as client:
                outcome["stats"] = client.compute_reward_statistics(
                    completions=[completions], answers=[""], rewards=[RewardTerm(name, 1.0)],
                    on_failure=RewardFailurePolicy.ZERO,
                )
        except MaxEntError as error:
            outcome["error"] = error
        finally:
            outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def reward_workers(server: ServerProcess, count: int) -> set[int]:
    """Pids of the server's reward workers (the processes below its children)
    once ``count`` of them exist."""
    workers: set[int] = set()

    def enough() -> bool:
        nonlocal workers
        below = descendants(server.proc.pid)
        workers = {pid for pid in below if pid not in children(server.proc.pid)}
        return len(workers) >= count

    assert wait_for(enough, 60), f"no reward workers under the server:\n{server.log()}"
    return workers


# ---------------------------------------------------------------------------
# shutdown


@pytest.mark.parametrize("attempt", range(4))
def test_sigterm_during_a_long_reward_item_exits_within_the_grace_period(tmp_path, attempt):
    """An item that would run for minutes (sleeping, or with SIGALRM and SIGTERM
    blocked) does not hold the server past the grace period; the old server
    waited for the item in the event loop, intermittently for 12-40 s."""
    grace = 2.0
    server = ServerProcess(tmp_path / "data", extra_args=[
        "--grace-seconds", str(grace), "--reward-workers", "2", "--reward-timeout-seconds", "120"]).start()
    name, marker = ("sleepy", "SLEEP") if attempt % 2 == 0 else ("stuck", "STUCK")
    try:
        outcome: dict = {}
        caller = reward_call(server, name, [f"{marker} {k}" for k in range(4)], outcome)
        workers = reward_workers(server, 2)
        time.sleep(1.0)  # let both workers start an item
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(grace + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {grace + 5:g} s after SIGTERM:\n{server.log()}")
        assert code == 0, server.log()
        assert "maxent-server stopped" in server.log()
        assert wait_for(lambda: not any(running(pid) for pid in workers), 5), "reward workers outlived the server"
        caller.join(30)
        assert "stats" not in outcome  # the call was cut off, not answered with made-up values
    finally:
        server.stop()


def test_pool_close_is_bounded_when_a_worker_ignores_sigterm():
    others = descendants(os.getpid())
    pool = WorkerPool(1, 60.0, PLUGINS)
    try:
        outcome: dict = {}

        def run() -> None:
            outcome["results"] = pool.run([plugin_item("stuck", "STUCK")])

        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        assert wait_for(lambda: pool.stats()["queued_items"] == 0 and pool.stats()["workers_ready"] == 1, 60)
        workers = descendants(os.getpid()) - others - children(os.getpid())
        assert workers
        time.sleep(0.5)  # the worker is inside the item, SIGTERM blocked
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < 8  # SIGTERM, then SIGKILL after a second
        caller.join(5)
        assert outcome["results"][0].status == "error" and "closed" in outcome["results"][0].message
        assert pool.stats()["workers_alive"] == 0
        assert not any(running(pid) for pid in workers)
    finally:
        pool.close()


# ---------------------------------------------------------------------------
# orphans


def test_reward_workers_die_with_a_killed_server(tmp_path):
    """kill -9 of the server mid-item: no worker keeps running (the old ones
    kept sleeping in their item, their forkserver kept alive by them)."""
    server = ServerProcess(tmp_path / "data", extra_args=[
        "--reward-workers", "2", "--reward-timeout-seconds", "120"]).start()
    everything: set[int] = set()

    def still() -> set[int]:
        return {pid for pid in everything if running(pid)}

    try:
        outcome: dict = {}
        reward_call(server, "sleepy", ["SLEEP 1", "SLEEP 2"], outcome)
        reward_workers(server, 2)
        time.sleep(1.0)  # both workers are inside their item
        everything = descendants(server.proc.pid)
        server.kill()
        assert wait_for(lambda: not still(), 10), f"still running after the server's SIGKILL: {sorted(still())}"
    finally:
        server.stop()
        for pid in still():  # do not leave orphans behind when the test fails
            os.kill(pid, signal.SIGKILL)


ORPHAN_SCRIPT = """
import multiprocessing, os, sys, time
from maxent_server.rewards import _worker

def child(mechanism, ready_path):
    if mechanism == "watchdog":
        _worker.set_parent_death_signal = lambda: False
    else:
        _worker._watch_server = lambda server, parent_pid: None
    _worker.die_with_server()
    with open(ready_path, "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(3600)

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    ctx.Process(target=child, args=(sys.argv[2], sys.argv[3]), daemon=True).start()
    time.sleep(3600)
"""


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
@pytest.mark.parametrize("mechanism", ["prctl", "watchdog"])
def test_each_orphan_guard_alone_ends_the_worker(tmp_path, context, mechanism):
    """The kernel's parent-death signal (watchdog off) and the watchdog thread
    (prctl off) each end a worker whose server was SIGKILLed."""
    if mechanism == "prctl" and not sys.platform.startswith("linux"):
        pytest.skip("prctl is Linux-only")
    script = tmp_path / "server.py"
    script.write_text(ORPHAN_SCRIPT)
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, str(script), context, mechanism, str(ready)])
    worker = 0
    try:
        assert wait_for(lambda: ready.exists() and ready.read_text(), 60), "the worker did not start"
        worker = int(ready.read_text())
        assert running(worker)
        parent.kill()
        parent.wait(10)
        assert wait_for(lambda: not running(worker), 5), f"worker {worker} outlived its server ({mechanism})"
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker and running(worker):
            os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------------------
# head-of-line blocking


def test_small_job_starts_on_the_next_free_worker():
    """Four large jobs of slow items queued first; a one-item job runs after at
    most the items already in workers, not after their queued chunks."""
    pool = WorkerPool(1, 0.5, PLUGINS)
    try:
        stop = threading.Event()
        big_threads = []
        for job in range(4):
            items = [plugin_item("sleepy", f"SLEEP {job} {k}") for k in range(64)]

            def run(items=items) -> None:
                try:
                    pool.run(items, stop)
                except Cancelled:
                    pass

            big_threads.append(threading.Thread(target=run, daemon=True))
        for thread in big_threads:
            thread.start()
        assert wait_for(lambda: pool.stats()["items"] >= 2, 60)  # the big jobs are under way
        before = pool.stats()["items"]
        results = pool.run([plugin_item("keyword_match", "abc", keyword="b")])
        items_between = pool.stats()["items"] - before
        stop.set()
        for thread in big_threads:
            thread.join(30)
        assert [(r.status, r.value) for r in results] == [("ok", 1.0)]
        # The item in the worker when it arrived, and possibly the one started
        # while its request was on the way; not a chunk of each big job.
        assert items_between <= 3, items_between
    finally:
        pool.close()


def test_one_item_call_is_not_queued_behind_four_large_calls(tmp_path):
    """Through the server: four callers with slow batches, then one caller
    with one item. Its answer comes while every large call is still running
    (the old server queued it behind them: 4 executor threads, FIFO)."""
    server = ServerProcess(tmp_path / "data", extra_args=[
        "--reward-workers", "2", "--reward-timeout-seconds", "1"]).start()
    try:
        big: list[dict] = [{} for _ in range(4)]
        threads = [reward_call(server, "sleepy", [f"SLEEP {n} {k}" for k in range(6)], outcome)
                   for n, outcome in enumerate(big)]
        reward_workers(server, 2)
        time.sleep(2.0)  # the large calls are in the server, their items queued
        small: dict = {}
        reward_call(server, "sleepy", ["quick"], small).join(120)
        for thread in threads:
            thread.join(120)
        assert "stats" in small, small.get("error")
        assert small["stats"].total_utils.tolist() == [1.0]
        assert all("stats" in outcome for outcome in big), [o.get("error") for o in big]
        assert small["ended"] < min(outcome["ended"] for outcome in big)
    finally:
        server.stop()
