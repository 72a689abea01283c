"""The synchronous client: typed methods over the MaxEnt service's RPCs."""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Concatenate, Generator, Iterator, ParamSpec, Sequence, TypeVar

import grpc

from maxent_api import SERVICE_NAME, pb, pb_grpc
from maxent_api.wire import decode

from . import _convert as cv
from . import _messages as msg
from ._channel import ChannelSettings
from .errors import from_rpc_error
from .models import ControllerState, Run

PemSource = bytes | str | Path | None
# A watch stream broken with one of these codes (a server restarting or
# draining, a network cut) is resumed from the last version seen.
WATCH_RESUME_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
ENCODED_METHODS = ("ComputeRewardStatistics", "ComputeWeightStats", "ComputeStepStatistics")
P = ParamSpec("P")
T = TypeVar("T")


class ClientBase:
    """Connection options shared by MaxEntClient and AsyncMaxEntClient.

    Every call has a deadline (`timeout` seconds, per client or per call).
    UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried by
    gRPC's retry policy with exponential backoff and jitter (`max_attempts`
    tries in all). TLS: `root_certificates` (CA bundle, PEM bytes or a path;
    `tls=True` alone uses the system roots), plus `private_key` and
    `certificate_chain` for mutual TLS. `token` is sent as
    `authorization: Bearer <token>`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: PemSource = None,
        private_key: PemSource = None,
        certificate_chain: PemSource = None,
        max_attempts: int = 5,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_message_mb: int = 64,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = ChannelSettings(
            target=target, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, tls=tls, token=token, max_attempts=max_attempts,
            initial_backoff=initial_backoff, max_backoff=max_backoff, max_message_mb=max_message_mb, options=options,
        )
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._metadata = self.settings.call_metadata()
        self._channel = self._open_channel()
        self._stub = pb_grpc.MaxEntServiceStub(self._channel)
        # The batch RPCs take requests already serialized by _messages and
        # read their responses' arrays with numpy (_wire.decode).
        self._encoded = {
            name: self._channel.unary_unary(
                f"/{SERVICE_NAME}/{name}",
                request_serializer=None,
                response_deserializer=partial(decode, getattr(pb, f"{name}Response")),
            )
            for name in ENCODED_METHODS
        }

    def _open_channel(self) -> Any:
        raise NotImplementedError

    def _start(self, method: str, request: Any, timeout: float | None) -> Any:
        """Start one unary call: its response (sync) or an awaitable of it (asyncio)."""
        rpc = self._encoded.get(method) or getattr(self._stub, method)
        return rpc(request, timeout=self.timeout if timeout is None else timeout,
                   wait_for_ready=self.wait_for_ready, metadata=self._metadata)

    def _watch_cursor(self, since_version: int, timeout: float | None, reconnect_seconds: float) -> _WatchCursor:
        return _WatchCursor(since_version, timeout, reconnect_seconds, self.settings.initial_backoff,
                            self.settings.max_backoff)

    def _start_watch(self, cursor: _WatchCursor, run_id: str, wait_for_run: bool) -> Any:
        """Open a WatchRun stream from the cursor's position."""
        return self._stub.WatchRun(cursor.request(run_id, wait_for_run), timeout=cursor.remaining(),
                                   wait_for_ready=self.wait_for_ready, metadata=self._metadata)


def rpc_method(request: Callable[P, msg.Request[T]]) -> Callable[Concatenate[MaxEntClient, P], T]:
    """A MaxEntClient method taking exactly `request`'s parameters: it builds
    the request model and sends it."""

    def method(self: MaxEntClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._invoke(msg.construct(request, *args, **kwargs))

    msg.describe_method(method, request, "MaxEntClient")
    return method


class MaxEntClient(ClientBase):
    """Calls a MaxEnt server at `target` ("host:port"); options: ClientBase."""

    def _open_channel(self) -> grpc.Channel:
        return self.settings.sync_channel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MaxEntClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return self._start(method, request, timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def _invoke(self, request: msg.Request[T]) -> T:
        """Send one request model's RPC and read its reply."""
        wire, read = request.build()
        return read(self._call(request.rpc, wire, request.timeout))

    # -- RPCs: each method takes exactly its request model's fields --------------

    create_run = rpc_method(msg.CreateRunRequest)
    get_run = rpc_method(msg.GetRunRequest)
    delete_run = rpc_method(msg.DeleteRunRequest)
    compute_reward_statistics = rpc_method(msg.ComputeRewardStatisticsRequest)
    compute_weight_stats = rpc_method(msg.ComputeWeightStatsRequest)
    compute_step_statistics = rpc_method(msg.ComputeStepStatisticsRequest)
    update_controller = rpc_method(msg.UpdateControllerRequest)
    list_reward_functions = rpc_method(msg.ListRewardFunctionsRequest)

    def iter_runs(self, *, page_size: int = 100, timeout: float | None = None) -> Iterator[Run]:
        """Every run, ordered by run_id, fetched a page at a time."""
        token = ""
        while True:
            runs, token = self._invoke(msg.ListRunsRequest(page_size=page_size, page_token=token, timeout=timeout))
            yield from runs
            if not token:
                return

    def list_runs(self, *, page_size: int = 100, timeout: float | None = None) -> list[Run]:
        return list(self.iter_runs(page_size=page_size, timeout=timeout))

    # -- watching ------------------------------------------------------------------

    def watch_run(
        self,
        run_id: str,
        *,
        since_version: int = 0,
        wait_for_run: bool = False,
        timeout: float | None = None,
        reconnect_seconds: float = 60.0,
    ) -> Generator[ControllerState, None, None]:
        """The run's controller state as it changes: first the current state
        (or, with since_version > 0, every version after it that the server
        still holds), then each new version in order, none skipped, none
        repeated. Runs until the caller stops iterating, `timeout` seconds
        pass (DeadlineExceededError; None: no limit) or the run is deleted
        (NotFoundError). `wait_for_run` waits for a run that does not exist
        yet. A stream broken by a server restart or a network cut is resumed
        from the last version seen, with backoff, for up to
        `reconnect_seconds` before the error is raised."""
        cursor = self._watch_cursor(since_version, timeout, reconnect_seconds)
        while True:
            call = self._start_watch(cursor, run_id, wait_for_run)
            try:
                for response in call:
                    state = cursor.accept(response)
                    if state is not None:
                        yield state
                return
            except grpc.RpcError as error:
                delay = cursor.retry_after(error)
            finally:
                call.cancel()
            time.sleep(delay)
            try:
                grpc.channel_ready_future(self._channel).result(timeout=cursor.reconnect_window())
            except grpc.FutureTimeoutError:
                raise cursor.give_up() from None


class _WatchCursor:
    """A watch's position (the last version yielded) and its reconnect budget."""

    def __init__(self, since_version: int, timeout: float | None, reconnect_seconds: float,
                 initial_backoff: float, max_backoff: float) -> None:
        if since_version < 0:
            raise ValueError("since_version must be >= 0")
        self.last: int | None = since_version if since_version > 0 else None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reconnect_seconds = reconnect_seconds
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.failures = 0
        self.broken_since: float | None = None
        self.error: grpc.RpcError | None = None

    def request(self, run_id: str, wait_for_run: bool) -> pb.WatchRunRequest:
        return pb.WatchRunRequest(run_id=run_id, since_version=self.last or 0, wait_for_run=wait_for_run)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def accept(self, response: Any) -> ControllerState | None:
        """The state to yield, or None for a version already yielded."""
        self.failures, self.broken_since = 0, None
        state = cv.state_from_proto(response.state)
        if self.last is not None and state.version <= self.last:
            return None
        self.last = state.version
        return state

    def retry_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before resuming, or raise the error as a MaxEntError."""
        self.error = error
        now = time.monotonic()
        if self.broken_since is None:
            self.broken_since = now
        if error.code() not in WATCH_RESUME_CODES or now - self.broken_since >= self.reconnect_seconds:
            raise self.give_up() from None
        delay = min(self.max_backoff, self.initial_backoff * 2**self.failures) * random.uniform(0.5, 1.0)
        self.failures += 1
        if self.deadline is not None and now + delay >= self.deadline:
            raise self.give_up() from None
        return delay

    def reconnect_window(self) -> float:
        """How long to wait for the channel to connect again."""
        left = self.reconnect_seconds - (time.monotonic() - (self.broken_since or time.monotonic()))
        remaining = self.remaining()
        return max(0.0, left if remaining is None else min(left, remaining))

    def give_up(self) -> Exception:
        return from_rpc_error(self.error)
