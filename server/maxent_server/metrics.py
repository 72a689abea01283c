"""Prometheus metrics: per-RPC, reward evaluation, controller and per-run gauges,
and the HTTP endpoint that serves them (``/metrics``, Prometheus text format).

Every name starts with ``maxent_``, uses base units (seconds, bytes; entropies
and KL in nats) and counters end in ``_total``. The run label is bounded: a
deleted run's series disappear, and beyond ``max_runs`` runs the one touched
longest ago is dropped (``maxent_metrics_runs_evicted_total`` counts those).

How values get here: the call edge (:mod:`maxent_server.edge`) calls
:meth:`Metrics.call_started` and :meth:`Metrics.call_finished` for every unary
call and :meth:`Metrics.observe_response` with each successful MaxEntService
response (controller state, reward moments, completion counts); the
servicer calls :meth:`Metrics.rewards_evaluated` (the :class:`ServiceObserver`
interface) after each reward evaluation.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import ssl
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from maxent_api import METHODS
from maxent_api import SERVICE_NAME as MAXENT_SERVICE
from maxent_api.wire import array

from . import __version__
from .auth import bearer_token

log = logging.getLogger("maxent_server.metrics")

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REWARD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COMPLETION_BUCKETS = tuple(float(4**k) for k in range(11))  # 1 .. 1 048 576

# Created-timestamp series (`*_created`) double the exposition for no use here.
disable_created_metrics()


class ServiceObserver(Protocol):
    """What the servicer reports; :class:`Metrics` implements it."""

    def rewards_evaluated(self, names: Sequence[str], evaluation: Any, seconds: float) -> None:
        """One RewardRunner.evaluate call: the term names in request order, its
        Evaluation (``failed`` and ``timed_out`` masks [R, N]) and its wall time."""


# -- per-run gauges --------------------------------------------------------------

# (key, metric name, help)
RUN_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("tau", "maxent_run_tau", "Entropy temperature tau of the run's controller."),
    ("beta", "maxent_run_beta", "KL coefficient beta of the run's controller."),
    ("weight_entropy", "maxent_run_weight_entropy_nats",
     "Last weight entropy of the run sent with UpdateController (nats)."),
    ("entropy_ema", "maxent_run_weight_entropy_ema_nats",
     "Exponential moving average of the run's weight entropy kept by the controller (nats)."),
    ("target_entropy", "maxent_run_target_entropy_nats", "Target weight entropy in force for the run (nats)."),
    ("measured_kl", "maxent_run_kl_nats", "Last measured KL to the reference sent with UpdateController (nats)."),
    ("reward_mean", "maxent_run_reward_mean",
     "Mean utility of the run's last reward batch sent by a caller who may write runs."),
    ("reward_std", "maxent_run_reward_std",
     "Standard deviation of the utilities of the run's last reward batch sent by a caller who may write runs."),
    ("version", "maxent_run_controller_version", "Number of accepted controller updates of the run."),
    ("target_unreachable", "maxent_run_target_unreachable",
     "1 when the run's target entropy is above the maximum possible weight entropy last reported, else 0."),
    ("tau_bound_steps", "maxent_run_tau_bound_steps",
     "Consecutive applied controller steps of the run that ended with tau at tau_min or tau_max."),
)
_CONTROLLER_KEYS = frozenset({"tau", "beta", "entropy_ema", "target_entropy", "measured_kl", "version",
                              "target_unreachable", "tau_bound_steps"})


class RunGauges(Collector):
    """Latest values per run, at most `max_runs` runs (least recently touched
    dropped first)."""

    def __init__(self, max_runs: int) -> None:
        if max_runs < 1:
            raise ValueError("max_runs must be >= 1")
        self.max_runs = max_runs
        self._runs: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._evicted = 0

    def update(self, run_id: str, values: dict[str, float | None]) -> None:
        """Set the given values (None: leave as is). Controller fields that
        come with a version older than the one shown are ignored, so a slow
        read never moves the gauges back."""
        with self._lock:
            current = self._runs.get(run_id)
            if current is None:
                current = self._runs[run_id] = {}
            else:
                self._runs.move_to_end(run_id)
            version = values.get("version")
            stale = version is not None and version < current.get("version", -1)
            for key, value in values.items():
                if value is None or (stale and key in _CONTROLLER_KEYS):
                    continue
                current[key] = float(value)
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
                self._evicted += 1

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {run: dict(values) for run, values in self._runs.items()}

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            runs = [(run, dict(values)) for run, values in self._runs.items()]
            evicted = self._evicted
        for key, name, documentation in RUN_FIELDS:
            family = GaugeMetricFamily(name, documentation, labels=["run"])
            for run, values in runs:
                if key in values:
                    family.add_metric([run], values[key])
            yield family
        yield GaugeMetricFamily("maxent_metrics_runs", "Runs that have per-run series now.", value=len(runs))
        yield CounterMetricFamily(
            "maxent_metrics_runs_evicted",
            "Runs whose series were dropped because more than --metrics-max-runs runs had series.",
            value=evicted,
        )


def _state_values(state) -> dict[str, float | None]:
    """Gauge values from a maxent.v1.ControllerState message."""
    has = state.HasField
    return {
        "tau": state.tau,
        "beta": state.beta,
        "entropy_ema": state.entropy_ema if has("entropy_ema") else None,
        "target_entropy": state.active_target_entropy if has("active_target_entropy") else None,
        "measured_kl": state.last_measured_kl if has("last_measured_kl") else None,
        "weight_entropy": state.last_weight_entropy if has("last_weight_entropy") else None,
        "version": state.version,
        "target_unreachable": 1.0 if state.target_unreachable else 0.0,
        "tau_bound_steps": state.tau_bound_steps,
    }


def completions_in(request) -> int:
    sizes = array(request.group_sizes, np.int64)
    return int(sizes[sizes > 0].sum())


# -- the metric set ----------------------------------------------------------------


class Metrics:
    """Every metric of one server, in its own registry."""

    def __init__(self, max_runs: int = 1000, *, process_metrics: bool = True) -> None:
        r = self.registry = CollectorRegistry()
        rpc_labels = ["service", "method", "code"]
        self.requests = Counter(
            "maxent_rpc_requests", "Finished RPCs by method and gRPC status code.", rpc_labels, registry=r
        )
        self.duration = Histogram(
            "maxent_rpc_duration_seconds",
            "Time from a request's arrival to its response, by method and gRPC status code.",
            rpc_labels,
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "maxent_rpc_in_flight_requests", "RPCs being handled now.", ["service", "method"], registry=r
        )
        self.received_bytes = Counter(
            "maxent_rpc_received_bytes", "Serialized request bytes received.", ["service", "method"], registry=r
        )
        self.sent_bytes = Counter(
            "maxent_rpc_sent_bytes", "Serialized response bytes sent.", ["service", "method"], registry=r
        )
        self.completions = Histogram(
            "maxent_request_completions",
            "Completions per successful ComputeRewardStatistics, ComputeWeightStats or ComputeStepStatistics request.",
            ["method"],
            buckets=COMPLETION_BUCKETS,
            registry=r,
        )
        self.reward_duration = Histogram(
            "maxent_reward_evaluation_duration_seconds",
            "Wall time of each reward evaluation call that included this reward function.",
            ["reward"],
            buckets=REWARD_BUCKETS,
            registry=r,
        )
        self.reward_evaluations = Counter(
            "maxent_reward_evaluations", "Completions evaluated, by reward function.", ["reward"], registry=r
        )
        self.reward_failures = Counter(
            "maxent_reward_failures",
            "Completions whose reward function raised, timed out or lost its worker (timeouts included).",
            ["reward"],
            registry=r,
        )
        self.reward_timeouts = Counter(
            "maxent_reward_timeouts", "Completions whose reward function ran out of time.", ["reward"], registry=r
        )
        self.reward_queue = Gauge(
            "maxent_reward_queued_items",
            "Reward work items waiting for a worker process (a call that gave up leaves none behind).",
            registry=r,
        )
        self.controller_updates = Counter(
            "maxent_controller_updates", "Controller updates applied (replays not included).", registry=r
        )
        self.controller_replays = Counter(
            "maxent_controller_replays",
            "UpdateController calls answered from an earlier application of the same request_id.",
            registry=r,
        )
        self.controller_stale = Counter(
            "maxent_controller_stale_reports",
            "UpdateController reports for a step at or below the last applied one, which changed nothing.",
            registry=r,
        )
        self.controller_pooled = Counter(
            "maxent_controller_pooled_reports",
            "UpdateController reports pooled while their step waits for more reporters (not applied yet).",
            registry=r,
        )
        self.rate_limited = Counter(
            "maxent_rate_limited_calls",
            "Calls that waited for their caller's rate limit before their body was read, by method.",
            ["method"],
            registry=r,
        )
        self.rate_limit_wait = Counter(
            "maxent_rate_limit_wait_seconds",
            "Time calls spent waiting for their caller's rate limit, by method.",
            ["method"],
            registry=r,
        )
        info = Gauge("maxent_build_info", "Version of this server; always 1.", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        self.runs = RunGauges(max_runs)
        r.register(self.runs)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        for method in METHODS:
            self.requests.labels(MAXENT_SERVICE, method, "OK")
            self.in_flight.labels(MAXENT_SERVICE, method)

    # -- RPCs ----------------------------------------------------------------------

    def rate_limit_waited(self, method: str, seconds: float) -> None:
        self.rate_limited.labels(method).inc()
        self.rate_limit_wait.labels(method).inc(seconds)

    def call_started(self, service: str, method: str) -> None:
        self.in_flight.labels(service, method).inc()

    def call_finished(
        self, service: str, method: str, code: str, seconds: float, request_bytes: int, response_bytes: int
    ) -> None:
        self.in_flight.labels(service, method).dec()
        self.requests.labels(service, method, code).inc()
        self.duration.labels(service, method, code).observe(seconds)
        if request_bytes:
            self.received_bytes.labels(service, method).inc(request_bytes)
        if response_bytes:
            self.sent_bytes.labels(service, method).inc(response_bytes)

    def observe_response(self, method: str, request, response, *, from_writer: bool = True) -> None:
        """Counters from one successful MaxEntService call, and per-run gauges
        from what trainers report: the controller's state from CreateRun and
        UpdateController, the reward moments from a batch call that names the
        run made by a caller who may write runs (`from_writer`). A read (GetRun,
        ComputeWeightStats, a read-only token's batch) moves no per-run gauge,
        so no reader's probe shows on a run's dashboard."""
        if method == "UpdateController":
            if response.replayed:
                self.controller_replays.inc()
            elif response.stale:
                self.controller_stale.inc()
            else:
                if response.applied:
                    self.controller_updates.inc()
                else:
                    self.controller_pooled.inc()
                self.runs.update(request.run_id, _state_values(response.state))
        elif method == "CreateRun":
            self.runs.update(response.run.run_id, _state_values(response.run.state))
        elif method in ("ComputeStepStatistics", "ComputeRewardStatistics"):
            self.completions.labels(method).observe(completions_in(request))
            if request.run_id and from_writer:
                self.runs.update(request.run_id, {"reward_mean": response.reward_mean, "reward_std": response.reward_std})
        elif method == "ComputeWeightStats":
            self.completions.labels(method).observe(completions_in(request))
        elif method == "DeleteRun":
            self.runs.remove(request.run_id)

    # -- rewards (ServiceObserver) ---------------------------------------------------

    def watch_reward_queue(self, queued_items: Callable[[], float]) -> None:
        """Read the reward queue length at each scrape."""
        self.reward_queue.set_function(queued_items)

    def declare_rewards(self, names: Iterable[str]) -> None:
        """Start the reward series at zero so rates exist from the first scrape."""
        for name in names:
            for counter in (self.reward_evaluations, self.reward_failures, self.reward_timeouts):
                counter.labels(name)

    def rewards_evaluated(self, names: Sequence[str], evaluation: Any, seconds: float) -> None:
        failed = np.asarray(evaluation.failed, dtype=bool)
        timed_out = np.asarray(evaluation.timed_out, dtype=bool)
        n = failed.shape[1] if failed.ndim == 2 else 0
        totals: dict[str, list[int]] = {}
        for r, name in enumerate(names):
            entry = totals.setdefault(name, [0, 0, 0])
            entry[0] += n
            if r < failed.shape[0]:
                entry[1] += int(failed[r].sum())
                entry[2] += int(timed_out[r].sum())
        for name, (evaluated, failures, timeouts) in totals.items():
            self.reward_duration.labels(name).observe(seconds)
            self.reward_evaluations.labels(name).inc(evaluated)
            self.reward_failures.labels(name).inc(failures)
            self.reward_timeouts.labels(name).inc(timeouts)

    # -- exposition ------------------------------------------------------------------

    def render(self, accept: str = "", run_filter: Callable[[str], bool] | None = None) -> tuple[bytes, str]:
        """The exposition in the format `accept` asks for (text 0.0.4 by
        default), keeping only the runs `run_filter` allows."""
        encoder, content_type = choose_encoder(accept)
        source = self.registry if run_filter is None else _RunFilteredView(self.registry, run_filter)
        return encoder(source), content_type


# Counts over every run: they would tell a restricted token how many runs
# (of other teams) the server holds.
_ALL_RUN_COUNTS = frozenset({"maxent_metrics_runs", "maxent_metrics_runs_evicted"})


class _RunFilteredView:
    """A registry view without the samples of runs a token may not see, nor
    the server-wide run counts."""

    def __init__(self, registry: CollectorRegistry, allow: Callable[[str], bool]) -> None:
        self.registry = registry
        self.allow = allow

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            if metric.name in _ALL_RUN_COUNTS:
                continue
            if not any("run" in s.labels for s in metric.samples):
                yield metric
                continue
            kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            kept.samples = [s for s in metric.samples if "run" not in s.labels or self.allow(s.labels["run"])]
            yield kept


# -- the HTTP endpoint ---------------------------------------------------------------

HEADER_LIMIT = 16 * 1024  # bytes of request line and headers; more closes the connection
BODY_LIMIT = 64 * 1024  # a GET has no body; a larger one closes the connection
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large"}
_TEXT = "text/plain; charset=utf-8"


class _Request:
    def __init__(self, method: str, path: str, version: str, headers: dict[str, str]) -> None:
        self.method, self.path, self.version, self.headers = method, path, version, headers

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return connection != "close"
        return connection == "keep-alive"


def _parse_head(head: bytes) -> _Request | None:
    """The request line and headers, or None when they are not HTTP/1.x."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers.setdefault(name.strip().lower(), value.strip())
    return _Request(method, target.split("?", 1)[0], version, headers)


async def _read_request(reader: asyncio.StreamReader) -> _Request | int:
    """The next request, or the status (400, 413) of one that cannot be served."""
    head = await reader.readuntil(b"\r\n\r\n")
    request = _parse_head(head[:-4])
    length = request.headers.get("content-length", "0") if request is not None else "0"
    if request is None or not length.isdigit():
        return 400
    if int(length) > BODY_LIMIT:
        return 413
    await reader.readexactly(int(length))  # a GET has none; read past it to keep the connection usable
    return request


def _bearer(header: str) -> str | None:
    return bearer_token([("authorization", header)])


class MetricsServer:
    """`/metrics` over HTTP/1.1 (HTTPS with `ssl_context`), served by one
    asyncio loop in a background thread, so a slow or stalled client costs a
    socket, never a thread. A connection must send each complete request
    within `read_timeout` seconds; at `max_connections` open connections the
    one waiting longest for a request is closed to make room. With an
    `authorizer`, a valid bearer token is required and a token limited to
    some runs sees only those runs' series."""

    def __init__(self, metrics: Metrics, host: str, port: int, *, authorizer=None,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 64,
                 read_timeout: float = 10.0) -> None:
        self.metrics = metrics
        self.authorizer = authorizer
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        # Bound here: a port in use is an OSError of the constructor.
        family = _family(host)
        self._socket = socket.create_server((host, port), family=family, backlog=128,
                                            dualstack_ipv6=family == socket.AF_INET6 and socket.has_dualstack_ipv6())
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self.tls = ssl_context is not None
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_log_loop_error)
        self._server: asyncio.base_events.Server | None = None
        self._waiting: dict[asyncio.Task, None] = {}  # connections waiting for a request, oldest first
        self._connections: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="maxent-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(30)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
        self._socket.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, sock=self._socket, ssl=self.ssl_context, limit=HEADER_LIMIT,
            ssl_handshake_timeout=self.read_timeout if self.ssl_context is not None else None,
        )

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections and self._waiting:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.cancel()
        self._connections.add(task)
        try:
            while await self._answer_one(reader, writer, task):
                pass
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ssl.SSLError, ValueError):
            pass  # a client that stalls, vanishes or oversends just loses its connection
        finally:
            self._waiting.pop(task, None)
            self._connections.discard(task)
            writer.close()

    async def _answer_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          task: asyncio.Task) -> bool:
        """Read one request and answer it; whether to keep the connection."""
        self._waiting[task] = None
        request = await asyncio.wait_for(_read_request(reader), self.read_timeout)
        self._waiting.pop(task, None)
        keep_alive = False
        headers: Sequence[tuple[str, str]] = ()
        if isinstance(request, int):
            status, body, content_type = request, _REASONS[request].lower().encode() + b"\n", _TEXT
        else:
            status, body, content_type, headers = self._response(request)
            keep_alive = request.keep_alive
            if request.method == "HEAD":
                body = b""
        await asyncio.wait_for(self._write(writer, status, body, content_type, headers, close=not keep_alive),
                               self.read_timeout)
        log.debug("metrics %s - %d", writer.get_extra_info("peername", ("?",))[0], status)
        return keep_alive

    def _response(self, request: _Request) -> tuple[int, bytes, str, Sequence[tuple[str, str]]]:
        if request.path not in ("/metrics", "/metrics/"):
            return 404, b"not found; metrics are at /metrics\n", _TEXT, []
        if request.method != "GET":
            return 405, b"", _TEXT, [("Allow", "GET")]
        run_filter = None
        if self.authorizer is not None:
            principal = self.authorizer.authenticate_token(_bearer(request.headers.get("authorization", "")))
            if principal is None:
                return 401, b"missing or unknown bearer token\n", _TEXT, [
                    ("WWW-Authenticate", 'Bearer realm="maxent-metrics"')]
            if not principal.all_runs:
                run_filter = principal.may_access
        body, content_type = self.metrics.render(request.headers.get("accept", ""), run_filter)
        headers: list[tuple[str, str]] = []
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=5)
            headers.append(("Content-Encoding", "gzip"))
        return 200, body, content_type, headers

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str,
                     headers: Sequence[tuple[str, str]] = (), *, close: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}", *(f"{key}: {value}" for key, value in headers)]
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    log.debug("metrics endpoint: %s", context.get("message"), exc_info=context.get("exception"))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
