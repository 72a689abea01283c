"""A reward backend that evaluates chunks of work items as tasks on a Ray cluster.

The same surface as :class:`.pool.WorkerPool` (``run``, ``stats``,
``close``), so :class:`.runner.RewardRunner` uses either. Chosen with
``--reward-backend ray --ray-address ADDRESS``; several server replicas may
share one cluster (each runs its own tasks in the ``maxent`` namespace).

How a chunk runs:

* One Ray task per chunk, a streaming generator that runs each item with the
  code of the local workers (:func:`._worker.run_with_limit`: SIGALRM at the
  time limit, math-verify, plugins). It first yields a start marker (its node
  and process), then one result per item, so the caller times every item
  separately, exactly as the local pool does.
* Hard deadline: an item still running at time limit + grace (a hang no
  signal reaches) has its task force-cancelled, which kills the Ray worker
  process; the item is a ``"timeout"`` and the rest of the chunk is queued
  again. Time waiting in Ray's queue never counts: an item's clock starts at
  the start marker or at the previous item's result.
* A Ray worker that dies on an item (``os._exit``, a segfault) makes that item
  a ``"crash"``; the rest of the chunk is queued again. Results stream back
  after they are yielded and may die with the worker, so the item that seems
  to have killed a chunk's worker first runs again alone, and it is marked
  only when workers die running it alone twice (Ray can lose a worker of its
  own accord right after another crashed).
* A node that goes away (or a task that dies before it starts) loses no
  work: the unfinished items of the chunk are sent again, up to
  :data:`MAX_RETRIES` times; then each is a ``"crash"`` saying so. Tasks are
  submitted with ``max_retries=0`` because a retry by Ray would run the whole
  chunk again, including the items whose results already arrived.
* When the caller's ``cancelled`` event is set (its RPC was cancelled or its
  deadline passed), the call's tasks are force-cancelled and
  :class:`.pool.Cancelled` is raised.

The Ray workers import this module, so the server's packages (and any reward
plugins) must be installed in the cluster's Python environment.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from . import _worker
from .pool import Cancelled, ItemResult, hard_grace

log = logging.getLogger(__name__)

#: Most items in one task. A task costs about a millisecond of Ray overhead
#: against 2-20 ms per math-verify item, so chunks may be larger than the
#: local pool's, but small enough to spread a batch over the cluster.
MAX_CHUNK = 32
#: Times the unfinished items of a chunk are sent again after its node (or
#: its worker before starting) went away, before they are marked failed.
MAX_RETRIES = 3
#: Workers an item must take down while running alone before it is a ``"crash"``.
SOLO_DEATHS_TO_CONVICT = 2
#: How often a waiting call looks at its ``cancelled`` event, seconds.
POLL_S = 0.05
#: Seconds the cluster's CPU count is reused before it is asked again.
CPUS_TTL_S = 5.0
#: A connection to the cluster that takes longer than this fails the start
#: (Ray gives up with its own error after 60 s, e.g. when this host is no node).
CONNECT_TIMEOUT_S = 90.0
#: The name of the chunk tasks (what Ray shows, and a worker's process title while it runs one).
TASK_NAME = "maxent-reward-chunk"
_STAT_NAMES = ("gold_parses", "answer_parses", "verifications", "plugin_calls")


class RayUnavailableError(RuntimeError):
    """Ray is not installed or its cluster cannot be reached; the message says which."""


# -- in the Ray worker ----------------------------------------------------------

_states: dict[tuple[tuple[str, str], ...], _worker.WorkerState] = {}


def _worker_state(plugins: tuple[tuple[str, str], ...]) -> _worker.WorkerState:
    """This process's worker state for ``plugins``, made (and warmed up) once."""
    state = _states.get(plugins)
    if state is None:
        _worker.quiet_math_verify()
        _worker.warm_up()
        state = _states[plugins] = _worker.WorkerState(plugins)
    return state


def evaluate_chunk(items: Sequence[tuple[Any, ...]], limit: float, plugins: tuple[tuple[str, str], ...]):
    """Yield ``("started", node_id)``, then ``(status, value, message, stats)`` per item."""
    import ray

    state = _worker_state(plugins)
    yield ("started", ray.get_runtime_context().get_node_id())
    for item in items:
        # A plugin may have replaced the handler; put ours back each time.
        signal.signal(signal.SIGALRM, _worker._on_alarm)
        status, value, message = _worker.run_with_limit(state, item, limit)
        yield (status, value, message, tuple(state.stats))


# -- in the server ----------------------------------------------------------------


class _Flight:
    """One chunk's task while it runs."""

    def __init__(self, keys: list[int], attempt: int) -> None:
        self.keys = keys
        self.attempt = attempt
        self.pos = 0  # results received
        self.node = ""  # set by the start marker
        self.deadline: float | None = None  # hard deadline of the current item

    def unfinished(self) -> list[int]:
        return self.keys[self.pos :]


class RayBackend:
    """Runs work items of :mod:`._worker` as Ray tasks; see the module docstring."""

    def __init__(self, address: str, timeout_seconds: float, plugins: Sequence[tuple[str, str]] = ()) -> None:
        """Connect to the Ray cluster at ``address`` (``HOST:PORT`` of its head's
        GCS; this host must be a node of it); RayUnavailableError when that fails."""
        if not timeout_seconds > 0:
            raise ValueError("timeout_seconds must be > 0")
        self.address = address
        self.timeout = float(timeout_seconds)
        self._hard = self.timeout + hard_grace(self.timeout)
        self._plugins = tuple((str(name), str(value)) for name, value in plugins)
        self._lock = threading.Lock()
        self._closing = False
        self._queued = 0
        self._stats = dict.fromkeys((*_STAT_NAMES, "items", "timeouts", "crashes", "retries", "tasks"), 0)
        self._ray = _connect(address)
        self._cpus, self._cpus_at = 1, -CPUS_TTL_S
        self._task = self._ray.remote(evaluate_chunk).options(max_retries=0, num_cpus=1, name=TASK_NAME)
        log.info("reward backend: Ray cluster at %s (%d CPUs)", address, self.cluster_cpus())

    # -- public ----------------------------------------------------------------

    def run(self, items: Sequence[tuple[Any, ...]], cancelled: threading.Event | None = None) -> list[ItemResult]:
        """Run ``items`` on the cluster; one result per item, in order. Thread-safe; blocks.

        Raises Cancelled once ``cancelled`` is set (after cancelling its tasks)."""
        if not items:
            return []
        with self._lock:
            if self._closing:
                raise RuntimeError("the Ray reward backend is closed")
        return _Call(self, items, cancelled).run()

    def cluster_cpus(self) -> int:
        """CPUs of the cluster (at least 1): how many chunks of one call run at once.
        Asked of the cluster at most every :data:`CPUS_TTL_S` seconds."""
        now = time.monotonic()
        if now - self._cpus_at >= CPUS_TTL_S:
            try:
                self._cpus = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
            except Exception:  # noqa: BLE001 - the GCS is briefly away; keep the last answer
                pass
            self._cpus_at = now
        return self._cpus

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            out["queued_items"] = self._queued
        return out

    def close(self) -> None:
        """Refuse new work; calls in flight finish. The cluster keeps running."""
        with self._lock:
            self._closing = True

    # -- used by _Call ------------------------------------------------------------

    def _submit(self, items: Sequence[tuple[Any, ...]]) -> Any:
        with self._lock:
            self._stats["tasks"] += 1
        return self._task.remote(list(items), self.timeout, self._plugins)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._stats[name] += amount

    def _node_alive(self, node_id: str) -> bool:
        try:
            return any(n.get("NodeID") == node_id and n.get("Alive") for n in self._ray.nodes())
        except Exception:  # noqa: BLE001 - the GCS is away: treat the node as lost
            return False


class _Call:
    """The chunks of one ``run`` and their tasks."""

    def __init__(self, backend: RayBackend, items: Sequence[tuple[Any, ...]], cancelled: threading.Event | None):
        self.backend = backend
        self.ray = backend._ray
        self.items = items
        self.cancelled = cancelled
        self.results: list[ItemResult | None] = [None] * len(items)
        self.width = backend.cluster_cpus()
        chunk = max(1, min(MAX_CHUNK, -(-len(items) // (4 * self.width))))
        self.pending: deque[tuple[list[int], int]] = deque(
            (list(range(start, min(start + chunk, len(items)))), 0) for start in range(0, len(items), chunk)
        )
        self.flights: dict[Any, _Flight] = {}
        self.solo_deaths: dict[int, int] = {}  # item -> workers that died running it alone
        self._queue_delta(len(items))

    def run(self) -> list[ItemResult]:
        try:
            while self.pending or self.flights:
                if self.cancelled is not None and self.cancelled.is_set():
                    dropped = sum(1 for r in self.results if r is None)
                    raise Cancelled(f"{dropped} of {len(self.items)} work items dropped")
                try:
                    self._launch()
                    ready, _ = self.ray.wait(list(self.flights), num_returns=1, timeout=self._wait_s())
                except Exception as error:  # noqa: BLE001 - the cluster is unreachable: fail, do not hang
                    self._fail_unfinished(f"the Ray cluster failed: {_worker.short_error(error)}")
                    break
                for gen in ready:
                    self._drain(gen)
                self._check_deadlines()
        finally:
            self._cancel_all()
            self.pending.clear()
            self._queue_delta(-sum(1 for r in self.results if r is None))  # dropped: no longer queued
        return [r if r is not None else ItemResult("error", None, "no result") for r in self.results]

    def _fail_unfinished(self, message: str) -> None:
        for key, result in enumerate(self.results):
            if result is None:
                self._finish(key, ItemResult("error", None, message))

    def _queue_delta(self, amount: int) -> None:
        with self.backend._lock:
            self.backend._queued += amount

    def _launch(self) -> None:
        while self.pending and len(self.flights) < self.width:
            keys, attempt = self.pending.popleft()
            gen = self.backend._submit([self.items[k] for k in keys])
            self.flights[gen] = _Flight(keys, attempt)

    def _wait_s(self) -> float:
        deadlines = [f.deadline for f in self.flights.values() if f.deadline is not None]
        wait = POLL_S if self.cancelled is not None else 0.5
        if deadlines:
            wait = min(wait, max(0.0, min(deadlines) - time.monotonic()))
        return wait

    def _finish(self, key: int, result: ItemResult) -> None:
        if self.results[key] is None:
            self.results[key] = result
            self._queue_delta(-1)

    def _drain(self, gen: Any) -> None:
        """Take what ``gen`` has ready: its start marker, item results, its end or failure."""
        flight = self.flights[gen]
        while True:
            ready, _ = self.ray.wait([gen], num_returns=1, timeout=0)
            if not ready:
                return
            try:
                message = self.ray.get(next(gen))
            except StopIteration:
                del self.flights[gen]
                self._requeue(flight.unfinished(), flight.attempt, "its task ended early")
                return
            except Exception as error:  # noqa: BLE001 - the task or its worker failed
                del self.flights[gen]
                self._on_failure(flight, error)
                return
            self._on_message(flight, message)

    def _on_message(self, flight: _Flight, message: tuple[Any, ...]) -> None:
        if message[0] == "started":
            flight.node = message[1]
        else:
            status, value, text, stats = message
            for name, count in zip(_STAT_NAMES, stats):
                self.backend._count(name, int(count))
            self.backend._count("items")
            if status == "timeout":
                self.backend._count("timeouts")
            self._finish(flight.keys[flight.pos], ItemResult(status, value, text))
            flight.pos += 1
        flight.deadline = time.monotonic() + self.backend._hard if flight.pos < len(flight.keys) else None

    def _on_failure(self, flight: _Flight, error: BaseException) -> None:
        """A task failed: its worker died on the current item, or its node went away."""
        unfinished = flight.unfinished()
        if not unfinished:
            return
        if isinstance(error, self.ray.exceptions.RayTaskError):
            # The task itself raised (e.g. this module failed to import on the node): no retry helps.
            why = "the Ray task failed: " + _last_line(error)
            for key in unfinished:
                self._finish(key, ItemResult("error", None, why))
            return
        lost = not flight.node or _node_loss(self.ray, error) or not self.backend._node_alive(flight.node)
        if lost:
            self._requeue(unfinished, flight.attempt, _worker.short_error(error))
            return
        suspect = unfinished[0]
        if len(flight.keys) > 1:
            # Results stream back after they are yielded, so one may be lost with
            # the worker: the first unfinished item is not surely the culprit. Run
            # it again alone; only workers dying on it alone convict it (below).
            if len(unfinished) > 1:
                self.pending.appendleft((unfinished[1:], flight.attempt))
            self.pending.appendleft(([suspect], flight.attempt))
            return
        # Ray can also lose a worker for its own reasons just after another one
        # crashed: an item is a crash only after it took its worker down alone twice.
        self.solo_deaths[suspect] = self.solo_deaths.get(suspect, 0) + 1
        if self.solo_deaths[suspect] < SOLO_DEATHS_TO_CONVICT:
            self.pending.appendleft(([suspect], flight.attempt))
            return
        self.backend._count("items")
        self.backend._count("crashes")
        self._finish(unfinished[0], ItemResult("crash", None, "the Ray worker died (" + _reason(error) + ")"))

    def _requeue(self, keys: list[int], attempt: int, why: str) -> None:
        """Send ``keys`` again, or mark them failed once they were retried enough."""
        if not keys:
            return
        if attempt >= MAX_RETRIES:
            for key in keys:
                self._finish(key, ItemResult("crash", None, f"lost with its Ray node ({attempt + 1} attempts)"))
            self.backend._count("crashes", len(keys))
            self.backend._count("items", len(keys))
            return
        log.warning("Ray reward task lost before finishing (%s); sending %d items again", why, len(keys))
        self.backend._count("retries")
        self.pending.appendleft((keys, attempt + 1))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for gen, flight in list(self.flights.items()):
            if flight.deadline is None or now < flight.deadline:
                continue
            self._drain(gen)  # a result may have just arrived
            if gen not in self.flights or flight.deadline is None or time.monotonic() < flight.deadline:
                continue
            del self.flights[gen]
            self._cancel(gen)
            unfinished = flight.unfinished()
            self.backend._count("items")
            self.backend._count("timeouts")
            self._finish(unfinished[0], ItemResult("timeout", None, f"timed out after {self.backend.timeout:g} s "
                                                   "(Ray worker killed)"))
            if len(unfinished) > 1:
                self.pending.appendleft((unfinished[1:], flight.attempt))

    def _cancel(self, gen: Any) -> None:
        try:
            self.ray.cancel(gen, force=True)
        except Exception as error:  # noqa: BLE001 - already finished, or its node is gone
            log.debug("could not cancel a Ray reward task: %s", error)

    def _cancel_all(self) -> None:
        for gen in list(self.flights):
            self._cancel(gen)
        self.flights.clear()


def _node_loss(ray: Any, error: BaseException) -> bool:
    """Whether ``error`` says the task's node (not only its worker) went away."""
    exceptions = ray.exceptions
    kinds = tuple(
        getattr(exceptions, name)
        for name in ("NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError")
        if hasattr(exceptions, name)
    )
    return isinstance(error, kinds)


def _reason(error: BaseException) -> str:
    return type(error).__name__


def _last_line(error: BaseException) -> str:
    """The last non-empty line of a Ray error (its cause), shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _connect(address: str) -> Any:
    """Import Ray and join the cluster at ``address``."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("the Ray backend needs Ray: pip install 'maxent-grpo-service[ray]'") from None
    problem = _unreachable(address)
    if problem:
        raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {problem}")
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            ray.init(address=address, namespace="maxent", ignore_reinit_error=True, log_to_driver=False)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - reported as one line
            outcome.append(error)

    # ray.init can wait minutes for an address that never answers. In a thread
    # it also leaves the server's SIGTERM handling alone.
    thread = threading.Thread(target=join, name="maxent-ray-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    hint = f"this host must be a node of that cluster (ray start --address={address} --num-cpus=0)"
    if not outcome:
        raise RayUnavailableError(f"Ray cluster at {address} did not answer within {CONNECT_TIMEOUT_S:g} s; {hint}")
    if outcome[0] is not None:
        raise RayUnavailableError(
            f"cannot join the Ray cluster at {address}: {_worker.short_error(outcome[0])}; {hint}"
        )
    return ray


def _unreachable(address: str) -> str:
    """Why a TCP connection to a ``HOST:PORT`` address fails ("" when it works or the form is another)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return ""
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5.0).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return ""
