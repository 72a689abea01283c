"""WatchRun: the stream starts with the current state, then every version in
order, none skipped or repeated, under concurrent updaters, across two Redis
replicas and across a restart of the server; it ends with NOT_FOUND when the
run is deleted, waits for a run with wait_for_run, resumes after
since_version, keeps to the token's role and runs; maxentctl watch prints
aligned lines."""

from __future__ import annotations

import asyncio
import io
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from maxent_client import AsyncMaxEntClient, MaxEntClient, NotFoundError, WeightingConfig
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_client.cli import WATCH_COLUMNS, main
from ops_support import metadata, write_tokens
from redis_process import REDIS_SERVER, SKIP_REASON, RedisProcess
from server_process import ServerProcess

CONFIG = WeightingConfig(tau=0.5, beta=0.1, target_entropy=1.0, tau_lr=0.05, kl_target=0.1, kl_horizon=5,
                         kl_step_size=0.5, tau_min=0.01, tau_max=5.0)
WATCH_LIMIT = 120.0  # seconds: no test waits on a stream longer than this


class Watcher:
    """Iterates client.watch_run in a thread, putting each state on a queue."""

    def __init__(self, client: MaxEntClient, run_id: str, **options) -> None:
        self.states: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._iterator = client.watch_run(run_id, timeout=WATCH_LIMIT, **options)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for state in self._iterator:
                self.states.put(state)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            self.error = error
        finally:
            self.states.put(None)

    def next(self, timeout: float = 30.0):
        return self.states.get(timeout=timeout)

    def until_version(self, version: int, timeout: float = WATCH_LIMIT) -> list:
        """The states received until one at `version` (inclusive)."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            state = self.states.get(timeout=max(0.1, deadline - time.monotonic()))
            if state is None:
                raise AssertionError(f"stream ended after {[s.version for s in seen]}: {self.error!r}")
            seen.append(state)
            if state.version >= version:
                return seen

    def ended(self, timeout: float = 30.0) -> BaseException | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        return self.error


def update(client: MaxEntClient, run_id: str, step: int):
    return client.update_controller(run_id, global_step=step, weight_entropy=0.5 + 0.01 * step, measured_kl=0.05)


def hammer(clients: list[MaxEntClient], run_id: str, threads: int = 32, each: int = 4) -> int:
    """`threads` updaters x `each` updates, spread over `clients`; the updates applied."""

    def updater(i: int) -> None:
        for j in range(each):
            update(clients[(i + j) % len(clients)], run_id, i * each + j + 1)

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(updater, i) for i in range(threads)]:
            f.result()
    return threads * each


def versions(states) -> list[int]:
    return [s.version for s in states]


# -- one server ---------------------------------------------------------------------


def test_stream_starts_with_the_current_state(client, run_id):
    client.create_run(run_id, CONFIG)
    update(client, run_id, 1)
    update(client, run_id, 2)
    states = client.watch_run(run_id, timeout=WATCH_LIMIT)
    first = next(states)
    states.close()
    assert first.version == 2 and first.global_step == 2 and first == client.get_run(run_id).state


def test_concurrent_updaters_every_version_once_in_order(client, run_id):
    client.create_run(run_id, CONFIG)
    watcher = Watcher(client, run_id)
    assert watcher.next().version == 0
    total = hammer([client], run_id)
    seen = watcher.until_version(total)
    assert versions(seen) == list(range(1, total + 1))
    final = client.get_run(run_id).state
    assert seen[-1] == final


def test_deleting_the_run_ends_the_stream_with_not_found(client, run_id):
    client.create_run(run_id, CONFIG)
    watcher = Watcher(client, run_id)
    assert watcher.next().version == 0
    update(client, run_id, 1)
    assert watcher.next().version == 1
    client.delete_run(run_id)
    assert isinstance(watcher.ended(), NotFoundError)


def test_unknown_run_is_not_found_unless_waited_for(client, run_id):
    with pytest.raises(NotFoundError):
        next(client.watch_run(run_id, timeout=WATCH_LIMIT))
    watcher = Watcher(client, run_id, wait_for_run=True)
    time.sleep(0.3)
    assert watcher.states.empty() and watcher.error is None
    client.create_run(run_id, CONFIG)
    assert watcher.next().version == 0
    update(client, run_id, 1)
    assert watcher.next().version == 1


def test_since_version_resumes_after_it(client, run_id):
    client.create_run(run_id, CONFIG)
    for step in range(1, 6):
        update(client, run_id, step)
    watcher = Watcher(client, run_id, since_version=2)
    assert versions(watcher.until_version(5)) == [3, 4, 5]
    # Up to date: nothing until the next version.
    up_to_date = Watcher(client, run_id, since_version=5)
    time.sleep(0.3)
    assert up_to_date.states.empty()
    update(client, run_id, 6)
    assert up_to_date.next().version == 6 and watcher.next().version == 6


def test_bad_requests_name_the_field(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MaxEntServiceStub(channel)
        for request, field in ((pb.WatchRunRequest(run_id=""), "run_id"),
                               (pb.WatchRunRequest(run_id="x", since_version=-1), "since_version")):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.WatchRun(request, timeout=30))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.details()


def test_async_client_watches(server, client, run_id):
    client.create_run(run_id, CONFIG)

    async def watch() -> list[int]:
        async with AsyncMaxEntClient(server.target) as aio:
            seen = []
            async for state in aio.watch_run(run_id, timeout=WATCH_LIMIT):
                seen.append(state.version)
                if state.version == 0:
                    await asyncio.get_running_loop().run_in_executor(None, update, client, run_id, 1)
                if state.version == 1:
                    return seen
        return seen

    assert asyncio.run(watch()) == [0, 1]


# -- maxentctl ---------------------------------------------------------------------------


def test_maxentctl_watch_prints_aligned_lines(server, client, run_id):
    client.create_run(run_id, CONFIG)
    updater = threading.Timer(0.5, lambda: [update(client, run_id, step) for step in (1, 2)])
    updater.start()
    out = io.StringIO()
    code = main(["--target", server.target, "watch", run_id, "--count", "3", "--duration", "60"], out=out)
    updater.join()
    lines = out.getvalue().splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0].split() == [name for name, _ in WATCH_COLUMNS]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    assert lines[3].split()[1] == "2"
    assert len({len(line) for line in lines}) == 1  # every column right-aligned to the header's width


def test_maxentctl_watch_waits_for_the_run(server, client, run_id):
    creator = threading.Timer(0.5, lambda: client.create_run(run_id, CONFIG))
    creator.start()
    out = io.StringIO()
    code = main(["--target", server.target, "watch", run_id, "--wait", "--count", "1", "--duration", "60"],
                out=out)
    creator.join()
    assert code == 0 and out.getvalue().splitlines()[1].split()[0] == "0"


def test_maxentctl_watch_of_an_unknown_run_fails(server, run_id, capsys):
    assert main(["--target", server.target, "watch", run_id, "--count", "1"], out=io.StringIO()) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


# -- restarts, tokens, replicas ------------------------------------------------------------


def test_server_restart_resumes_without_losing_versions(tmp_path):
    proc = ServerProcess(tmp_path / "data", extra_args=["--reward-workers", "1", "--grace-seconds", "30"]).start()
    try:
        with MaxEntClient(proc.target, timeout=60) as client:
            run_id = "restart"
            client.create_run(run_id, CONFIG)
            watcher = Watcher(client, run_id)
            assert watcher.next().version == 0
            for step in (1, 2, 3):
                update(client, run_id, step)
            assert versions(watcher.until_version(3)) == [1, 2, 3]
            started = time.monotonic()
            assert proc.terminate(60) == 0
            # The open stream ends at once instead of holding the 30 s grace period.
            assert time.monotonic() - started < 20
            proc.start()
            with MaxEntClient(proc.target, timeout=60) as again:
                for step in range(4, 9):  # some land before the watcher is back: they come from the history
                    update(again, run_id, step)
            assert versions(watcher.until_version(8)) == [4, 5, 6, 7, 8]
            assert watcher.error is None
    finally:
        proc.stop()


def test_watch_needs_read_access_to_the_run(tmp_path):
    reader, other = "reader-token-0123456789abcdef", "other-token-0123456789abcdef"
    tokens = write_tokens(tmp_path / "tokens.json", [
        {"name": "reader-a", "token": reader, "role": "read", "runs": ["team-a/*"]},
        {"name": "writer-a", "token": "writer-token-0123456789abcdef", "role": "write", "runs": ["*"]},
        {"name": "reader-b", "token": other, "role": "read", "runs": ["team-b/*"]},
    ])
    proc = ServerProcess(tmp_path / "data", extra_args=["--auth-tokens", str(tokens)]).start()
    try:
        with MaxEntClient(proc.target, token="writer-token-0123456789abcdef") as writer:
            writer.create_run("team-a/run", CONFIG)
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.MaxEntServiceStub(channel)
            request = pb.WatchRunRequest(run_id="team-a/run")

            def first_code(token):
                call = stub.WatchRun(request, timeout=30, metadata=metadata(token) if token else None)
                try:
                    next(call)
                    return grpc.StatusCode.OK
                except grpc.RpcError as error:
                    return error.code()
                finally:
                    call.cancel()

            assert first_code(None) == grpc.StatusCode.UNAUTHENTICATED
            assert first_code(other) == grpc.StatusCode.PERMISSION_DENIED
            assert first_code(reader) == grpc.StatusCode.OK
        time.sleep(0.5)
        log = proc.log()
        assert "method=WatchRun" in log and "code=PERMISSION_DENIED" in log and "code=CANCELLED" in log
    finally:
        proc.stop()


@pytest.mark.slow
@pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)
def test_two_replicas_updates_on_one_watch_on_the_other(tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    url = redis.url(prefix=f"watch-{uuid.uuid4().hex[:8]}", timeout=5)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    replicas = [ServerProcess(tmp_path / name / "data", extra_args=["--state-store", url, "--reward-workers", "1"])
                for name in ("a", "b")]
    try:
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(r.start, 180) for r in replicas]:
                f.result()
        with MaxEntClient(replicas[0].target, timeout=60) as a, MaxEntClient(replicas[1].target, timeout=60) as b:
            a.create_run("shared", CONFIG)
            watcher = Watcher(b, "shared")
            assert watcher.next().version == 0
            total = hammer([a], "shared")
            seen = watcher.until_version(total)
            assert versions(seen) == list(range(1, total + 1))
            assert seen[-1] == b.get_run("shared").state
            a.delete_run("shared")
            assert isinstance(watcher.ended(), NotFoundError)
    finally:
        for r in replicas:
            r.stop()
        redis.stop()
