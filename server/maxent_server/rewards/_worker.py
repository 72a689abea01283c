"""The reward worker process: runs math-verify and plugin rewards, one item at a time.

Runs on the main thread of a process started by :mod:`.pool` (forkserver or
spawn context, never a fork of the server). Protocol over one duplex pipe:

* worker -> parent: ``("ready", pid)`` once its imports and plugins are loaded;
* parent -> worker: a chunk, a list of ``(key, item)``; or None to stop;
* worker -> parent: ``(key, status, value, message, stats, seconds)`` after each item,
  so the parent can time each item separately.

``status`` is ``"ok"`` (value set), ``"error"`` (message set) or
``"timeout"``. ``stats`` counts ``(gold_parses, answer_parses,
verifications, plugin_calls)`` done for the item; ``seconds`` is how long it
ran (the pool sizes its chunks by it).

Time limit: each item runs under ``setitimer(ITIMER_REAL)``; the SIGALRM
handler raises :class:`ItemTimeout` (a BaseException, so ``except Exception``
in library code does not swallow it) and the item is reported as a timeout.
math-verify's own signal-based timeouts are switched off here: they use the
same process timer (cancelling ours) and turn a timeout into a silent False.
An item stuck where no signal gets through (C code, blocked signals) is the
parent's job: it kills the process at the hard deadline.

A worker never outlives the server (:func:`die_with_server`): on Linux the
kernel SIGKILLs it when its parent process ends, and a watchdog thread ends it
when the server's liveness pipe closes, wherever prctl is unavailable too.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint
from typing import Any

from math_verify import parse, verify

from .builtin import extract
from .library import WORKER_FUNCTIONS

PLUGIN_GROUP = "maxent.rewards"
GOLD_CACHE_SIZE = 4096
#: A gold whose parse timed out fails fast (as a timeout) for this many
#: seconds, so a group does not pay the time limit once per completion; then
#: it is tried again.
GOLD_TIMEOUT_TTL_S = 60.0

# Item kinds (the first element of an item tuple).
ITEM_MATH = "math"  # ("math", answer, gold, float_rounding)
ITEM_PLUGIN = "plugin"  # ("plugin", name, completion, answer, params: tuple[(k, v), ...])
ITEM_EXTRACT = "extract"  # ("extract", text) -> (last boxed payload, final answer)

GOLD_UNPARSABLE = "gold answer could not be parsed by math-verify"

#: prctl option: the signal the kernel sends this process when its parent ends.
PR_SET_PDEATHSIG = 1
#: Seconds between the watchdog's checks that the server is still there.
WATCHDOG_INTERVAL_S = 1.0
#: Exit status of a worker that ended because the server went away.
ORPHAN_EXIT_CODE = 70
#: Scheduling niceness added to each worker: reward batches are throughput
#: work, and the server's own threads (the event loop, the store) answer
#: latency-bound calls such as UpdateController; on a busy host the kernel
#: serves those first.
WORKER_NICENESS = 10


class ItemTimeout(BaseException):
    """Raised by the SIGALRM handler when an item runs past its time limit."""


_armed = False


def _on_alarm(signum: int, frame: Any) -> None:
    if _armed:
        raise ItemTimeout()


def as_boxed(text: str) -> str:
    """How math_accuracy hands an answer (or gold) to math-verify's parse."""
    return "\\boxed{" + text + "}"


def math_parse(text: str) -> list[Any]:
    return parse(as_boxed(text), parsing_timeout=None)


def math_verify_pair(gold_parsed: list[Any], answer_parsed: list[Any], float_rounding: int) -> bool:
    return bool(verify(gold_parsed, answer_parsed, float_rounding=float_rounding, timeout_seconds=None))


def quiet_math_verify() -> None:
    """Silence math-verify's warnings (we disable its timeouts on purpose)."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


#: (gold, answer) pairs touching the common answer types (numbers, fractions,
#: roots, polynomials, percentages, intervals, sets, equations), so sympy's and
#: math-verify's lazy imports and first-use set-up happen before real work.
WARM_UP_PAIRS = (
    ("\\frac{1}{2}", "0.5"),
    ("3\\sqrt{2}", "\\sqrt{18}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("50\\%", "0.5"),
    ("(0, 1]", "\\left(0,1\\right]"),
    ("\\{1,2\\}", "\\{2, 1\\}"),
    ("x=3", "3"),
    ("\\pi", "3.14159"),
)


def warm_up() -> None:
    """Run :data:`WARM_UP_PAIRS` through parse and verify (errors ignored)."""
    for gold, answer in WARM_UP_PAIRS:
        try:
            math_verify_pair(math_parse(gold), math_parse(answer), 6)
        except Exception:  # noqa: BLE001 - only a warm-up
            pass


def short_error(exc: BaseException) -> str:
    """Type and (truncated) message of an exception, without long payloads."""
    text = " ".join(str(exc).split())
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WorkerState:
    """Caches and loaded plugins of one worker process."""

    def __init__(self, plugins: Sequence[tuple[str, str]]) -> None:
        self.gold_cache: OrderedDict[str, Any] = OrderedDict()
        # (gold_parses, answer_parses, verifications, plugin_calls) of the current item
        self.stats = [0, 0, 0, 0]
        self.plugins: dict[str, Callable[..., Any]] = dict(WORKER_FUNCTIONS)
        self.plugin_errors: dict[str, str] = {}
        for name, value in plugins:
            try:
                self.plugins[name] = EntryPoint(name=name, value=value, group=PLUGIN_GROUP).load()
            except Exception as exc:  # noqa: BLE001 - reported per item
                self.plugin_errors[name] = f"plugin could not be loaded in the worker: {short_error(exc)}"

    # -- math_accuracy -------------------------------------------------------

    def _gold(self, gold: str) -> Any:
        """Parsed gold (cached), or a float (when its parse timed out) while that is recent."""
        cached = self.gold_cache.get(gold)
        if cached is not None:
            if not isinstance(cached, float) or time.monotonic() - cached < GOLD_TIMEOUT_TTL_S:
                self.gold_cache.move_to_end(gold)
                return cached
            del self.gold_cache[gold]
        self.stats[0] += 1
        try:
            parsed: Any = math_parse(gold)
        except ItemTimeout:
            parsed = time.monotonic()
        self.gold_cache[gold] = parsed
        if len(self.gold_cache) > GOLD_CACHE_SIZE:
            self.gold_cache.popitem(last=False)
        if isinstance(parsed, float):
            raise ItemTimeout()
        return parsed

    def run_math(self, answer: str, gold: str, float_rounding: int) -> tuple[str, Any, str]:
        gold_parsed = self._gold(gold)
        if isinstance(gold_parsed, float):
            # Its parse timed out moments ago: fail fast with the same verdict.
            return "timeout", None, "parsing the gold answer timed out"
        if not gold_parsed:
            return "error", None, GOLD_UNPARSABLE
        self.stats[1] += 1
        answer_parsed = math_parse(answer)
        self.stats[2] += 1
        return "ok", 1.0 if math_verify_pair(gold_parsed, answer_parsed, float_rounding) else 0.0, ""

    # -- plugins --------------------------------------------------------------

    def run_plugin(
        self, name: str, completion: str, answer: str, params: tuple[tuple[str, Any], ...]
    ) -> tuple[str, Any, str]:
        fn = self.plugins.get(name)
        if fn is None:
            return "error", None, self.plugin_errors.get(name, "plugin is not loaded in the worker")
        self.stats[3] += 1
        out = fn([completion], [answer], **dict(params))
        try:
            values = list(out)
        except TypeError:
            return "error", None, f"returned {type(out).__name__}, expected a list of one number"
        if len(values) != 1:
            return "error", None, f"returned {len(values)} values for 1 completion"
        value = values[0]
        if isinstance(value, (str, bytes)):
            return "error", None, f"returned a {type(value).__name__}, expected a number"
        try:
            number = float(value)
        except (TypeError, ValueError):
            return "error", None, f"returned a {type(value).__name__}, expected a number"
        if not math.isfinite(number):
            return "error", None, f"returned a non-finite value ({number})"
        return "ok", number, ""

    # -- one item under the time limit ---------------------------------------

    def run_item(self, item: tuple[Any, ...]) -> tuple[str, Any, str]:
        kind = item[0]
        if kind == ITEM_MATH:
            status, value, message = self.run_math(item[1], item[2], item[3])
        elif kind == ITEM_PLUGIN:
            status, value, message = self.run_plugin(item[1], item[2], item[3], item[4])
        elif kind == ITEM_EXTRACT:
            status, value, message = "ok", extract(item[1]), ""
        else:
            status, value, message = "error", None, f"unknown work item kind {kind!r}"
        return status, value, message


def run_with_limit(state: WorkerState, item: tuple[Any, ...], limit: float) -> tuple[str, Any, str]:
    """Run one item with a SIGALRM at ``limit`` seconds."""
    global _armed
    state.stats = [0, 0, 0, 0]
    started = time.monotonic()
    try:
        try:
            _armed = True
            signal.setitimer(signal.ITIMER_REAL, limit)
            result = state.run_item(item)
        finally:
            _armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ItemTimeout:
        return "timeout", None, f"timed out after {limit:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure of a reward is reported
        return "error", None, short_error(exc)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt from inside a plugin
        return "error", None, short_error(exc)
    if result[0] == "ok" and time.monotonic() - started > limit:
        # Finished, but only after swallowing the alarm: still over the limit.
        return "timeout", None, f"timed out after {limit:g} s"
    return result


def set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent ends. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def release_forkserver_lifeline() -> None:
    """Close this process's copy of the write end of the forkserver's liveness pipe.

    The forkserver (the parent of a worker it forked) exits once every copy of
    that end is closed, and each forked child inherits one: left open here, a
    live worker keeps the forkserver alive after the server is gone, so the
    worker's parent-death signal would never come. Uses a private attribute of
    :mod:`multiprocessing.forkserver`; where it is missing nothing happens and
    the watchdog still ends the worker.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _watch_server(server: Any, parent_pid: int) -> None:
    """Thread: end this process once the server or the parent process is gone."""
    if hasattr(signal, "pthread_sigmask"):
        # Signals (the item time limit's SIGALRM) must reach the main thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    while True:
        if server is not None:
            server.join(WATCHDOG_INTERVAL_S)  # returns early when the server ends
        else:
            time.sleep(WATCHDOG_INTERVAL_S)
        if (server is not None and not server.is_alive()) or os.getppid() != parent_pid:
            os._exit(ORPHAN_EXIT_CODE)


def die_with_server() -> None:
    """End this worker when the server ends, even by SIGKILL.

    The server is :func:`multiprocessing.parent_process` (its liveness pipe
    closes when it ends); the parent process is the server (spawn) or the
    forkserver, which exits when the server does. The kernel's parent-death
    signal needs no help from this process (it works while an item holds the
    GIL in C code); the watchdog thread covers platforms without prctl and a
    parent that ended before the prctl.
    """
    server = multiprocessing.parent_process()
    parent_pid = os.getppid()
    release_forkserver_lifeline()
    set_parent_death_signal()
    # Closes the race with a server that ended before the prctl took effect.
    if server is not None and not server.is_alive():
        os._exit(ORPHAN_EXIT_CODE)
    threading.Thread(target=_watch_server, args=(server, parent_pid), name="maxent-worker-watchdog",
                     daemon=True).start()


def _lower_priority() -> None:
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not permitted here: run at the server's priority
        pass


def worker_main(conn: Any, limit: float, plugins: Sequence[tuple[str, str]]) -> None:
    """Entry point of a worker process."""
    die_with_server()
    _lower_priority()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    signal.signal(signal.SIGALRM, _on_alarm)
    quiet_math_verify()
    warm_up()  # a no-op cost when forked from the warm forkserver
    state = WorkerState(plugins)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for key, item in chunk:
            # A plugin may have replaced the handler; put ours back each time.
            signal.signal(signal.SIGALRM, _on_alarm)
            started = time.monotonic()
            status, value, message = run_with_limit(state, item, limit)
            seconds = time.monotonic() - started
            try:
                conn.send((key, status, value, message, tuple(state.stats), seconds))
            except (EOFError, OSError):
                return
