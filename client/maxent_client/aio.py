"""The asyncio client: typed coroutines over the MaxEnt service's RPCs."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Concatenate, Coroutine, ParamSpec, TypeVar

import grpc

from . import _messages as msg
from .client import ClientBase
from .errors import from_rpc_error
from .models import ControllerState, Run

P = ParamSpec("P")
T = TypeVar("T")


def rpc_coroutine(
    request: Callable[P, msg.Request[T]],
) -> Callable[Concatenate[AsyncMaxEntClient, P], Coroutine[Any, Any, T]]:
    """An AsyncMaxEntClient coroutine taking exactly `request`'s parameters:
    it builds the request model and sends it."""

    async def method(self: AsyncMaxEntClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._invoke(msg.construct(request, *args, **kwargs))

    msg.describe_method(method, request, "AsyncMaxEntClient")
    return method


class AsyncMaxEntClient(ClientBase):
    """The asyncio twin of MaxEntClient (grpc.aio): the same options
    (ClientBase) and methods, each a coroutine. Create it inside a running
    event loop."""

    def _open_channel(self) -> grpc.aio.Channel:
        return self.settings.aio_channel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncMaxEntClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return await self._start(method, request, timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def _invoke(self, request: msg.Request[T]) -> T:
        """Send one request model's RPC and read its reply."""
        wire, read = request.build()
        return read(await self._call(request.rpc, wire, request.timeout))

    # -- RPCs: each coroutine takes exactly its request model's fields ------------

    create_run = rpc_coroutine(msg.CreateRunRequest)
    get_run = rpc_coroutine(msg.GetRunRequest)
    delete_run = rpc_coroutine(msg.DeleteRunRequest)
    compute_reward_statistics = rpc_coroutine(msg.ComputeRewardStatisticsRequest)
    compute_weight_stats = rpc_coroutine(msg.ComputeWeightStatsRequest)
    compute_step_statistics = rpc_coroutine(msg.ComputeStepStatisticsRequest)
    update_controller = rpc_coroutine(msg.UpdateControllerRequest)
    list_reward_functions = rpc_coroutine(msg.ListRewardFunctionsRequest)

    async def iter_runs(self, *, page_size: int = 100, timeout: float | None = None) -> AsyncIterator[Run]:
        """Every run, ordered by run_id, fetched a page at a time."""
        token = ""
        while True:
            runs, token = await self._invoke(msg.ListRunsRequest(page_size=page_size, page_token=token,
                                                                 timeout=timeout))
            for run in runs:
                yield run
            if not token:
                return

    async def list_runs(self, *, page_size: int = 100, timeout: float | None = None) -> list[Run]:
        return [run async for run in self.iter_runs(page_size=page_size, timeout=timeout)]

    # -- watching ------------------------------------------------------------------

    async def watch_run(
        self,
        run_id: str,
        *,
        since_version: int = 0,
        wait_for_run: bool = False,
        timeout: float | None = None,
        reconnect_seconds: float = 60.0,
    ) -> AsyncGenerator[ControllerState, None]:
        """MaxEntClient.watch_run as an async iterator: ``async for state in
        client.watch_run(run_id)``; resumes a broken stream the same way."""
        cursor = self._watch_cursor(since_version, timeout, reconnect_seconds)
        while True:
            call = self._start_watch(cursor, run_id, wait_for_run)
            try:
                async for response in call:
                    state = cursor.accept(response)
                    if state is not None:
                        yield state
                return
            except grpc.aio.AioRpcError as error:
                delay = cursor.retry_after(error)
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self._channel.channel_ready(), cursor.reconnect_window())
            except asyncio.TimeoutError:
                raise cursor.give_up() from None
