"""One grpc.aio interceptor for what every call needs around the servicer:
authentication and authorisation, Prometheus metrics, one access-log line.

Per call, in order: count it in flight; for MaxEntService methods (health and
reflection stay open) check the bearer token (UNAUTHENTICATED when missing or
unknown), decode the request and check the token's role and run patterns
against the method and ``request.run_id`` (PERMISSION_DENIED before the
servicer runs, so a refused call changes nothing); run the servicer; encode
the response; record metrics and log one line with the final status code.

Server-streaming MaxEntService methods (WatchRun) get the same checks before
their first message and one metrics count and log line when the stream ends;
health Watch and reflection pass through untouched.

The wrapped handler takes and returns raw bytes so that the sizes in metrics
and logs are the real wire sizes, at no extra cost.

The checked principal is handed to the servicer in auth.CURRENT_PRINCIPAL
(ListRuns lists only the runs it may touch).
"""

from __future__ import annotations

import asyncio
import time

import grpc

from .auth import CURRENT_PRINCIPAL, MAXENT_SERVICE, Authorizer, Principal
from .logs import log_rpc
from .metrics import Metrics, completions_in

_BATCH_METHODS = frozenset({"ComputeRewardStatistics", "ComputeWeightStats", "ComputeStepStatistics"})
_QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection"})


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, metrics: Metrics | None = None, authorizer: Authorizer | None = None,
                 access_log: bool = True) -> None:
        self.metrics = metrics
        self.authorizer = authorizer
        self.access_log = access_log

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # reflection: open, not counted
        service, method = _split(handler_call_details.method)
        if handler.response_streaming:
            if service != MAXENT_SERVICE:
                return handler  # health Watch: open, not counted
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler, service, method))
        return grpc.unary_unary_rpc_method_handler(self._wrap(handler, service, method))

    async def _admit(self, raw: bytes, context, method: str, deserialize, protected: bool):
        """(principal, request) of a call that may proceed: the token checked
        (when `protected`), the request read, the run's access checked.
        Aborts the call otherwise."""
        principal: Principal | None = None
        if protected:
            principal = self.authorizer.authenticate(context.invocation_metadata())
            if principal is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        request = deserialize(raw) if deserialize is not None else raw
        if principal is not None:
            run_id = "" if method == "ListRuns" else getattr(request, "run_id", "")
            denial = Authorizer.denial(principal, method, run_id)
            if denial is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, denial)
        return principal, request

    def _wrap(self, handler, service: str, method: str):
        inner = handler.unary_unary
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer
        protected = self.authorizer is not None and service == MAXENT_SERVICE
        maxent = service == MAXENT_SERVICE
        metrics = self.metrics

        async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = _CallRecord(self, service, method, raw, context)
            try:
                call.principal, call.request = await self._admit(raw, context, method, deserialize, protected)
                principal, request = call.principal, call.request
                CURRENT_PRINCIPAL.set(principal)  # this call's task only
                response = await inner(request, context)
                out = serialize(response) if serialize is not None else response
                call.response_bytes = len(out)
                if metrics is not None and maxent:
                    # An EncodedResponse carries its scalar fields as .message.
                    metrics.observe_response(method, request, getattr(response, "message", response))
                return out
            except asyncio.CancelledError:
                call.interrupted()
                raise
            except BaseException:
                call.failed(context)
                raise
            finally:
                call.finish()

        return behavior

    def _wrap_stream(self, handler, service: str, method: str):
        """A server-streaming MaxEntService method (WatchRun): the same checks
        before the first message, counted as one call, one log line when the
        stream ends; response_bytes is the sum of its messages."""
        inner = handler.unary_stream
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer
        protected = self.authorizer is not None

        async def behavior(raw: bytes, context: grpc.aio.ServicerContext):
            call = _CallRecord(self, service, method, raw, context)
            try:
                call.principal, call.request = await self._admit(raw, context, method, deserialize, protected)
                async for response in inner(call.request, context):
                    out = serialize(response) if serialize is not None else response
                    call.response_bytes += len(out)
                    yield out
            except (asyncio.CancelledError, GeneratorExit):
                # The stream may be closed after its call is gone: the
                # context must not be touched here (grpc can crash on it).
                call.interrupted()
                raise
            except BaseException:
                call.failed(context)
                raise
            finally:
                call.finish()

        return behavior


class _CallRecord:
    """One call's bookkeeping: counted in flight from its start, and when it
    ends, its status and sizes go to the metrics and the access log."""

    def __init__(self, interceptor: CallInterceptor, service: str, method: str, raw: bytes, context) -> None:
        self.metrics, self.access_log = interceptor.metrics, interceptor.access_log
        self.service, self.method, self.raw = service, method, raw
        self.started = time.perf_counter()
        # Read from the context while the call surely exists; a call that ends
        # by cancellation may have none left to ask.
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else self.started + remaining
        self.peer = _peer(context)
        self.code = grpc.StatusCode.OK
        self.principal: Principal | None = None
        self.request = None
        self.response_bytes = 0
        if self.metrics is not None:
            self.metrics.call_started(service, method)

    def interrupted(self) -> None:
        """The client went away, or the deadline passed."""
        expired = self.deadline is not None and time.perf_counter() >= self.deadline
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def failed(self, context) -> None:
        self.code = context.code() or grpc.StatusCode.UNKNOWN

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        if self.metrics is not None:
            self.metrics.call_finished(self.service, self.method, self.code.name, seconds, len(self.raw),
                                       self.response_bytes)
        if self.access_log:
            _log_call(self.service, self.method, self.code, seconds, self.raw, self.response_bytes, self.request,
                      self.principal, self.peer)


def _peer(context) -> str | None:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001 - the peer is only informative
        return None


def _log_call(service, method, code, seconds, raw, response_bytes, request, principal, peer) -> None:
    quiet = service in _QUIET_SERVICES
    completions = None
    if method in _BATCH_METHODS and request is not None and service == MAXENT_SERVICE:
        completions = completions_in(request)
    log_rpc(
        10 if quiet else 20,  # DEBUG for health checks and reflection, INFO otherwise
        method=method,
        service=service,
        run=getattr(request, "run_id", "") if request is not None and not isinstance(request, bytes) else "",
        code=code.name,
        duration_seconds=round(seconds, 6),
        request_bytes=len(raw),
        response_bytes=response_bytes,
        completions=completions,
        principal=principal.name if principal is not None else "",
        peer=peer,
    )
