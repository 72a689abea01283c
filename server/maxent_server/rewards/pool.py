"""A pool of reward worker processes with per-item deadlines.

Why not ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: neither can kill
the one worker that hangs on one item and carry on (the first cannot kill a
task, the second breaks the whole pool when a worker dies). Here:

* ``run(items)`` (thread-safe, blocking) queues a job's items; one
  dispatcher thread owns every worker process.
* Fair between calls: an idle, ready worker gets a chunk of the job that has
  the fewest chunks in workers (ties: the one served longest ago), so a new
  one-item call starts on the next free worker however much other calls have
  queued. Chunks are cut to about :data:`CHUNK_SECONDS` of work from each
  item kind's measured duration, so a worker is never tied up long by one
  chunk: slow items go one at a time, millisecond items in batches.
* The worker answers after every item, so each item has its own deadline:
  the time limit plus a grace from the moment the worker starts it (the
  worker enforces the limit itself with SIGALRM; the grace covers what a
  signal cannot interrupt).
* At the hard deadline the dispatcher SIGKILLs the worker; that item is a
  ``"timeout"``. A worker that dies (``os._exit``, a segfault, the OOM
  killer) makes its current item a ``"crash"``. Either way the rest of its
  chunk goes back to the front of its job's queue and a new worker is started.
* Workers are started from the ``forkserver`` context (``spawn`` where there
  is none) -- never by forking the server, which has gRPC and torch threads.
  The forkserver preloads math-verify, so a replacement starts in
  milliseconds. A new worker counts as ready only once it has loaded its
  modules and plugins, so start-up time never counts against an item.
* ``close()`` is bounded whatever the workers do: every job fails at once,
  idle workers are told to stop, busy ones get SIGTERM and, after
  :data:`TERMINATE_GRACE_S`, SIGKILL. Workers also end by themselves when the
  server process ends (see :func:`._worker.die_with_server`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait as mp_wait
from typing import Any, NamedTuple

from . import _worker

log = logging.getLogger(__name__)

#: A new worker that does not report ready within this many seconds is killed.
STARTUP_TIMEOUT_S = 120.0
#: Consecutive failed worker starts after which queued work fails instead of waiting.
MAX_START_FAILURES = 3
#: Largest number of items sent to a worker at once. Items cost milliseconds
#: (a math-verify comparison: 2-20 ms) against ~0.1 ms per message, so small
#: chunks cost little and keep the workers evenly loaded to the end.
MAX_CHUNK = 16
#: Target seconds of work per chunk: how long a free worker may stay tied to
#: one call while another waits. An item kind not measured yet counts this much.
CHUNK_SECONDS = 0.05
#: Weight of the newest duration in an item kind's running average.
COST_SMOOTHING = 0.3
#: On close: seconds between SIGTERM and SIGKILL for a worker still running.
TERMINATE_GRACE_S = 1.0
#: On close: seconds to wait for the dispatcher thread before killing the workers from the caller.
CLOSE_TIMEOUT_S = 2.0


class ItemResult(NamedTuple):
    """Outcome of one work item: status ``ok``, ``error``, ``timeout`` or ``crash``."""

    status: str
    value: Any
    message: str


def hard_grace(timeout: float) -> float:
    """Seconds past the time limit before a worker is killed."""
    return min(2.0, max(0.25, 0.25 * timeout))


def default_context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # Only effective if the forkserver is not running yet; harmless otherwise.
        ctx.set_forkserver_preload(["maxent_server.rewards._preload"])
        return ctx
    return multiprocessing.get_context("spawn")


class Cancelled(Exception):
    """The caller gave up on a job (its RPC was cancelled or ran out of time)."""


def item_kind(item: tuple[Any, ...]) -> tuple[Any, ...]:
    """What an item's duration is measured by: its kind, and the plugin's name."""
    return tuple(item[:2]) if item and item[0] == _worker.ITEM_PLUGIN else tuple(item[:1])


class _Job:
    def __init__(self, items: Sequence[tuple[Any, ...]]) -> None:
        self.items = items
        self.results: list[ItemResult | None] = [None] * len(items)
        self.pending: deque[int] = deque(range(len(items)))
        self.remaining = len(items)
        self.queued = False
        self.running = 0  # chunks of this job now in workers
        self.served = 0  # when it last got a worker (dispatch count); 0: never
        self.done = threading.Event()

    def finish(self, key: int, result: ItemResult) -> None:
        if self.results[key] is None:
            self.results[key] = result
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail_all(self, message: str, status: str = "error") -> None:
        for key in range(len(self.items)):
            self.finish(key, ItemResult(status, None, message))
        self.pending.clear()


class _Worker:
    def __init__(self, proc: Any, conn: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.started = time.monotonic()
        self.job: _Job | None = None
        self.keys: list[int] = []
        self.pos = 0
        self.item_started = self.started  # when its current item began, as far as the dispatcher knows
        self.deadline: float | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    def current(self) -> int | None:
        return self.keys[self.pos] if self.job is not None and self.pos < len(self.keys) else None


class WorkerPool:
    """Runs work items of :mod:`._worker` in ``size`` processes; see the module docstring."""

    def __init__(
        self,
        size: int,
        timeout_seconds: float,
        plugins: Sequence[tuple[str, str]] = (),
        *,
        context: Any = None,
        prestart: bool = True,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        if not timeout_seconds > 0:
            raise ValueError("timeout_seconds must be > 0")
        self.size = size
        self.timeout = float(timeout_seconds)
        self._hard = self.timeout + hard_grace(self.timeout)
        self._plugins = tuple(plugins)
        self._ctx = context if context is not None else default_context()
        self._lock = threading.Lock()
        self._jobs: list[_Job] = []  # jobs with pending items (new ones last)
        self._dispatches = 0
        self._cost: dict[tuple[Any, ...], float] = {}  # item kind -> running average seconds
        self._closing = False
        # Workers start when the pool is created, or with prestart=False on the first run().
        self._started = prestart
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._next_start = 0.0
        self._last_start_error = ""
        self._stats = {
            "gold_parses": 0,
            "answer_parses": 0,
            "verifications": 0,
            "plugin_calls": 0,
            "items": 0,
            "timeouts": 0,
            "crashes": 0,
            "workers_started": 0,
            "workers_replaced": 0,
        }
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._loop, name="maxent-reward-dispatcher", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------

    def run(self, items: Sequence[tuple[Any, ...]], cancelled: threading.Event | None = None) -> list[ItemResult]:
        """Run ``items``; one result per item, in order. Thread-safe; blocks.

        Once ``cancelled`` is set, chunks not yet started are dropped and
        Cancelled is raised; items already in a worker run to their end (or
        time limit) and their results are discarded."""
        if not items:
            return []
        job = _Job(items)
        with self._lock:
            if self._closing:
                raise RuntimeError("the reward worker pool is closed")
            self._jobs.append(job)
            job.queued = True
            self._started = True
        self._wake()
        poll = 0.05 if cancelled is not None else 0.5
        while not job.done.wait(poll):
            if cancelled is not None and cancelled.is_set():
                with self._lock:
                    dropped = job.remaining
                    # The dispatcher skips a job with nothing pending; results
                    # of items still in a worker land on finished keys.
                    job.fail_all("cancelled by the caller", status="cancelled")
                raise Cancelled(f"{dropped} of {len(items)} work items dropped")
            if self._closing or not self._thread.is_alive():
                with self._lock:
                    job.fail_all("the reward worker pool stopped")
        return [r if r is not None else ItemResult("error", None, "no result") for r in job.results]

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            out["queued_items"] = sum(len(job.pending) for job in self._jobs)
        workers = list(self._workers)
        out["workers_alive"] = len(workers)
        out["workers_ready"] = sum(1 for w in workers if w.ready)
        return out

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Fail every job, stop the workers (SIGTERM, then SIGKILL) and the dispatcher.

        Returns within about ``timeout`` seconds whatever the workers do: if the
        dispatcher has not finished by then, the workers are killed from here."""
        with self._lock:
            already = self._closing
            self._closing = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            if not already:
                log.warning("reward worker pool did not stop within %.1f s; killing its workers", timeout)
            for w in list(self._workers):
                _kill(w.proc)
            return  # the dispatcher may still use its wake-up pipe
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    # -- dispatcher thread ----------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (pipe full) or closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                self._maintain_workers()
                self._assign()
                waitables: list[Any] = [self._wake_r]
                for w in self._workers:
                    waitables.append(w.conn)
                    waitables.append(w.proc.sentinel)
                ready = mp_wait(waitables, self._wait_timeout())
                if self._wake_r in ready:
                    self._drain_wake()
                ready_set = set(id(x) for x in ready if not isinstance(x, int))
                ready_ints = set(x for x in ready if isinstance(x, int))
                for w in list(self._workers):
                    if id(w.conn) in ready_set or w.proc.sentinel in ready_ints:
                        self._service(w)
                self._check_deadlines()
        except BaseException:  # noqa: BLE001 - never leave callers waiting
            log.exception("reward worker pool dispatcher failed")
        finally:
            self._shutdown()

    def _wait_timeout(self) -> float | None:
        now = time.monotonic()
        times: list[float] = []
        for w in self._workers:
            if w.deadline is not None:
                times.append(w.deadline)
            elif not w.ready:
                times.append(w.started + STARTUP_TIMEOUT_S)
        if len(self._workers) < self.size and self._started:
            times.append(self._next_start)
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _start_worker(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        try:
            proc = self._ctx.Process(
                target=_worker.worker_main,
                args=(child_conn, self.timeout, self._plugins),
                name="maxent-reward-worker",
                daemon=True,
            )
            proc.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        self._workers.append(_Worker(proc, parent_conn))
        with self._lock:
            self._stats["workers_started"] += 1

    def _maintain_workers(self) -> None:
        with self._lock:
            if not self._started:
                return
        now = time.monotonic()
        while len(self._workers) < self.size and now >= self._next_start:
            try:
                self._start_worker()
            except Exception as exc:  # noqa: BLE001
                self._start_failures += 1
                self._last_start_error = _worker.short_error(exc)
                self._next_start = now + min(5.0, 0.1 * 2**self._start_failures)
                log.warning("could not start a reward worker: %s", self._last_start_error)
                break
        if self._start_failures >= MAX_START_FAILURES and not any(w.ready for w in self._workers):
            self._fail_queued(f"reward workers could not be started ({self._last_start_error})")

    def _fail_queued(self, message: str) -> None:
        with self._lock:
            jobs = list(self._jobs)
            self._jobs.clear()
            for job in jobs:
                job.queued = False
                for key in job.pending:
                    job.finish(key, ItemResult("error", None, message))
                job.pending.clear()

    def _next_chunk(self) -> tuple[_Job, list[int]] | None:
        """The next chunk to run: from the job with the fewest chunks in workers,
        then the one served longest ago, then the oldest."""
        with self._lock:
            for job in self._jobs:
                if not job.pending:
                    job.queued = False
            self._jobs = [job for job in self._jobs if job.queued]
            if not self._jobs:
                return None
            job = min(self._jobs, key=lambda j: (j.running, j.served))
            keys = self._take_chunk(job)
            job.running += 1
            self._dispatches += 1
            job.served = self._dispatches
            return job, keys

    def _take_chunk(self, job: _Job) -> list[int]:
        """Pending keys of ``job`` worth about CHUNK_SECONDS of work (at least one)."""
        limit = max(1, min(MAX_CHUNK, -(-len(job.items) // (8 * self.size))))
        keys: list[int] = []
        budget = CHUNK_SECONDS
        while job.pending and len(keys) < limit:
            cost = self._cost.get(item_kind(job.items[job.pending[0]]), CHUNK_SECONDS)
            if keys and cost > budget:
                break
            keys.append(job.pending.popleft())
            budget -= cost
        return keys

    def _requeue(self, job: _Job, keys: list[int]) -> None:
        with self._lock:
            keys = [k for k in keys if job.results[k] is None]
            if not keys:
                return
            job.pending.extendleft(reversed(keys))
            if not job.queued:
                self._jobs.insert(0, job)
                job.queued = True

    def _assign(self) -> None:
        for w in list(self._workers):
            if not w.ready or w.busy:
                continue
            nxt = self._next_chunk()
            if nxt is None:
                return
            job, keys = nxt
            w.job, w.keys, w.pos = job, keys, 0
            try:
                w.conn.send([(key, job.items[key]) for key in keys])
            except (OSError, EOFError, ValueError):
                # It died while idle: nothing of this chunk has started.
                self._release(w)
                self._requeue(job, keys)
                self._remove(w, replaced=True)
                continue
            w.item_started = time.monotonic()
            w.deadline = w.item_started + self._hard

    def _release(self, w: _Worker) -> None:
        """``w`` holds no chunk any more."""
        if w.job is not None:
            with self._lock:
                w.job.running -= 1
        w.job, w.keys, w.pos, w.deadline = None, [], 0, None

    def _measure(self, item: tuple[Any, ...], seconds: float) -> None:
        kind = item_kind(item)
        old = self._cost.get(kind)
        self._cost[kind] = seconds if old is None else old + COST_SMOOTHING * (seconds - old)

    def _service(self, w: _Worker) -> None:
        """Read what ``w`` sent; handle its death."""
        dead = False
        try:
            while w.conn.poll():
                self._on_message(w, w.conn.recv())
        except (EOFError, OSError):
            dead = True
        if dead or not w.proc.is_alive():
            code = w.proc.exitcode
            if code is None:
                w.proc.join(timeout=1.0)
                code = w.proc.exitcode
            if code is not None and code < 0:
                why = f"the reward worker was killed by signal {-code}"
            else:
                why = f"the reward worker died (exit code {code})"
            self._abort_current(w, ItemResult("crash", None, why))
            if not w.ready:
                self._start_failures += 1
                self._last_start_error = why + " during start-up"
                self._next_start = time.monotonic() + min(5.0, 0.1 * 2**self._start_failures)
            self._remove(w, replaced=True)

    def _on_message(self, w: _Worker, msg: Any) -> None:
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "ready":
            w.ready = True
            self._start_failures = 0
            return
        key, status, value, message, stats, seconds = msg
        job = w.job
        if job is None or w.current() != key:
            log.warning("reward worker sent an unexpected result; ignored")
            return
        now = time.monotonic()
        self._measure(job.items[key], seconds)
        with self._lock:
            for name, count in zip(("gold_parses", "answer_parses", "verifications", "plugin_calls"), stats):
                self._stats[name] += int(count)
            self._stats["items"] += 1
            if status == "timeout":
                self._stats["timeouts"] += 1
            job.finish(key, ItemResult(status, value, message))
        w.pos += 1
        if w.pos >= len(w.keys):
            self._release(w)
        else:
            w.item_started = now
            w.deadline = now + self._hard

    def _abort_current(self, w: _Worker, result: ItemResult) -> None:
        job = w.job
        if job is None:
            return
        key = w.current()
        rest = w.keys[w.pos + 1 :]
        self._release(w)
        if key is not None:
            self._measure(job.items[key], time.monotonic() - w.item_started)
            with self._lock:
                self._stats["items"] += 1
                self._stats["timeouts" if result.status == "timeout" else "crashes"] += 1
                job.finish(key, result)
        self._requeue(job, rest)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w not in self._workers:
                continue
            if w.deadline is not None and now >= w.deadline:
                self._service(w)  # a result may have just arrived
                if w not in self._workers or w.deadline is None or time.monotonic() < w.deadline:
                    continue
                _kill(w.proc)
                self._abort_current(w, ItemResult("timeout", None, f"timed out after {self.timeout:g} s (worker killed)"))
                self._remove(w, replaced=True)
            elif not w.ready and now >= w.started + STARTUP_TIMEOUT_S:
                _kill(w.proc)
                self._start_failures += 1
                self._last_start_error = f"a reward worker did not start within {STARTUP_TIMEOUT_S:g} s"
                self._remove(w, replaced=True)

    def _remove(self, w: _Worker, *, replaced: bool) -> None:
        if w in self._workers:
            self._workers.remove(w)
        try:
            w.conn.close()
        except OSError:
            pass
        _kill(w.proc)
        if replaced:
            with self._lock:
                self._stats["workers_replaced"] += 1

    def _shutdown(self) -> None:
        """Fail every job now; stop idle workers with a message, busy ones with SIGTERM, then SIGKILL."""
        with self._lock:
            self._closing = True
            jobs = list(self._jobs) + [w.job for w in self._workers if w.job is not None]
            self._jobs.clear()
            for job in jobs:
                job.fail_all("the reward worker pool was closed")
        for w in self._workers:
            if w.busy or not w.ready:
                _signal(w.proc, terminate=True)
                continue
            try:
                w.conn.send(None)
            except (OSError, EOFError, ValueError):
                _signal(w.proc, terminate=True)
        deadline = time.monotonic() + TERMINATE_GRACE_S
        alive = [w.proc for w in self._workers]
        while alive and time.monotonic() < deadline:
            mp_wait([p.sentinel for p in alive], max(0.0, deadline - time.monotonic()))
            alive = [p for p in alive if p.exitcode is None]
        for w in list(self._workers):
            self._remove(w, replaced=False)


def _signal(proc: Any, *, terminate: bool) -> None:
    """SIGTERM (or SIGKILL) ``proc`` unless it is gone already."""
    try:
        if proc.exitcode is None:
            proc.terminate() if terminate else proc.kill()
    except (OSError, ValueError):
        pass  # already reaped or closed


def _kill(proc: Any) -> None:
    """SIGKILL ``proc`` and reap it (a killed process ends at once unless the
    kernel holds it, so the wait is bounded)."""
    _signal(proc, terminate=False)
    try:
        proc.join(timeout=1.0)
    except (OSError, ValueError, AssertionError):
        pass
