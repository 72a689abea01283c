"""The interceptor that runs the edge stages around every call.

A MaxEntService call goes, in order, through: its record started (counted in
flight); the bearer token checked on the metadata (UNAUTHENTICATED before
the body is read); the token's rate limit waited for (RESOURCE_EXHAUSTED
when the wait would outlast the deadline, see :mod:`.rates`); a call slot
taken (RESOURCE_EXHAUSTED when the server is at ``max_concurrent_rpcs``);
the body read and its memory reserved against
the server's budget (RESOURCE_EXHAUSTED when over); the body decoded
(INVALID_ARGUMENT when it is not a valid message); the token's role and run
patterns checked against the request (PERMISSION_DENIED); the group count
bounded (INVALID_ARGUMENT); the servicer run; the response encoded
(RESOURCE_EXHAUSTED when larger than the client may receive); then the
metrics and one access-log line with the status the client received. A
refused call never reaches the servicer, so it changes nothing.

To read the body only after the token check, the unary MaxEntService
methods are served as client-streaming ones that read their one message
themselves (grpc reads a unary request before any handler code runs); the
client sees no difference. WatchRun is served the same way as a
bidirectional-streaming method. Health checks get the metrics and a DEBUG
log line; health Watch and reflection pass through untouched.
"""

from __future__ import annotations

import asyncio

import grpc
from maxent_api import SERVICE_NAME as MAXENT_SERVICE

from ..auth import CURRENT_PRINCIPAL, Authorizer
from ..metrics import Metrics
from .access_log import log_call
from .admission import Admission, check_group_count
from .auth import authenticate, authorize
from .call import Call
from .codec import decode_request, encode_response
from .metrics import call_answered, call_finished, call_started
from .rates import CallerRates
from .refusal import Refusal


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, admission: Admission, metrics: Metrics | None = None,
                 authorizer: Authorizer | None = None, access_log: bool = True,
                 max_message_bytes: int | None = None, rates: CallerRates | None = None) -> None:
        """`max_message_bytes`: the server's message size limit, both ways;
        `rates`: per-token rate limits (None: none; calls without a token have none)."""
        self.admission = admission
        self.rates = rates
        self.metrics = metrics
        self.authorizer = authorizer
        self.access_log = access_log
        self.max_message_bytes = max_message_bytes

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # reflection: open, not counted
        service, method = _split(handler_call_details.method)
        if service != MAXENT_SERVICE:
            if handler.response_streaming:
                return handler  # health Watch: open, not counted
            return grpc.unary_unary_rpc_method_handler(self._open_unary(handler, service, method))
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._maxent_stream(handler, method))
        return grpc.stream_unary_rpc_method_handler(self._maxent_unary(handler, method))

    def _finish(self, call: Call) -> None:
        call_finished(self.metrics, call)
        if self.access_log:
            log_call(call)
        # The exception that ends a refused call can outlive it (in a cycle
        # only the garbage collector frees): it must not keep the request.
        call.request = None

    async def _admit(self, call: Call, context, handler) -> None:
        """Everything before the servicer, from the token to the group count.
        What the call holds (a slot, reserved memory) is on `call`, for
        `_release`, whether this returns or raises."""
        if self.authorizer is not None:
            call.principal = authenticate(self.authorizer, context.invocation_metadata())
        turn = None
        if self.rates is not None and call.principal is not None:
            turn = await self.rates.take_turn(call.principal.name, context.time_remaining())
            if turn.waited and self.metrics is not None:
                self.metrics.rate_limit_waited(call.method, turn.waited)
        self.admission.enter()
        call.holds_slot = True
        raw = await context.read()
        if self.rates is not None and turn is not None:
            # A body grpc refused for its size was read all the same.
            self.rates.settle(turn, (self.max_message_bytes or 0) if raw is grpc.aio.EOF else len(raw))
        if raw is grpc.aio.EOF:
            # What grpc hands over when it refused the message for its size
            # (the client already has RESOURCE_EXHAUSTED), or none came.
            limit = "" if self.max_message_bytes is None else f" {self.max_message_bytes}"
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"no request message: larger than the{limit} bytes this server receives, or none sent")
        call.request_bytes = len(raw)
        call.reserved = self.admission.reserve(call.method, len(raw))
        call.request = decode_request(handler.request_deserializer, raw, call.method)
        del raw
        if call.principal is not None:
            authorize(call.principal, call.method, call.request)
        check_group_count(call.request)

    def _release(self, call: Call) -> None:
        if call.reserved:
            self.admission.release(call.reserved)
            call.reserved = 0
        if call.holds_slot:
            self.admission.leave()
            call.holds_slot = False

    # Each behaviour below ends its call with the same except clauses, written
    # out rather than shared through a context manager: a generator-based one
    # keeps a refused call's exception (and the request body its frames hold)
    # in a reference cycle until the garbage collector runs, which showed as
    # higher tail latency under floods of refused 2 MB requests.

    def _maxent_unary(self, handler, method: str):
        inner = handler.unary_unary
        serialize = handler.response_serializer

        async def behavior(request_iterator, context: grpc.aio.ServicerContext) -> bytes:
            call = Call(MAXENT_SERVICE, method, context)
            call_started(self.metrics, call)
            try:
                await self._admit(call, context, handler)
                # The servicer filters ListRuns by it; the value lives in this call's task only.
                CURRENT_PRINCIPAL.set(call.principal)
                response = await inner(call.request, context)
                out = encode_response(serialize, response, self.max_message_bytes)
                call.response_bytes = len(out)
                call_answered(self.metrics, call, response)
                return out
            except Refusal as refusal:
                call.code = refusal.code
                # Its traceback holds the frames that read the body.
                await refusal.with_traceback(None).abort(context)
            except asyncio.CancelledError:
                call.interrupted()
                raise
            except BaseException:
                call.failed(context)
                raise
            finally:
                self._release(call)
                self._finish(call)

        return behavior

    def _maxent_stream(self, handler, method: str):
        """WatchRun: the same stages before its first message, then its slot
        given back (a stream may stay open for hours); counted as one call,
        one log line when it ends, response_bytes the sum of its messages."""
        inner = handler.unary_stream
        serialize = handler.response_serializer

        async def behavior(request_iterator, context: grpc.aio.ServicerContext):
            call = Call(MAXENT_SERVICE, method, context)
            call_started(self.metrics, call)
            try:
                try:
                    await self._admit(call, context, handler)
                finally:
                    self._release(call)
                async for response in inner(call.request, context):
                    out = encode_response(serialize, response, self.max_message_bytes)
                    call.response_bytes += len(out)
                    yield out
            except Refusal as refusal:
                call.code = refusal.code
                # Its traceback holds the frames that read the body.
                await refusal.with_traceback(None).abort(context)
            except (asyncio.CancelledError, GeneratorExit):
                # The stream may be closed after its call is gone: the
                # context must not be touched here (grpc can crash on it).
                call.interrupted()
                raise
            except BaseException:
                call.failed(context)
                raise
            finally:
                self._release(call)
                self._finish(call)

        return behavior

    def _open_unary(self, handler, service: str, method: str):
        """A unary call of another service (health Check): no token, no
        admission; counted and logged at DEBUG."""
        inner = handler.unary_unary
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer

        async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = Call(service, method, context)
            call.request_bytes = len(raw)
            call_started(self.metrics, call)
            try:
                call.request = decode_request(deserialize, raw, method)
                out = encode_response(serialize, await inner(call.request, context), self.max_message_bytes)
                call.response_bytes = len(out)
                return out
            except Refusal as refusal:
                call.code = refusal.code
                # Its traceback holds the frames that read the body.
                await refusal.with_traceback(None).abort(context)
            except asyncio.CancelledError:
                call.interrupted()
                raise
            except BaseException:
                call.failed(context)
                raise
            finally:
                self._finish(call)

        return behavior
