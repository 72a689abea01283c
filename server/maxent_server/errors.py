"""Map service exceptions to gRPC status codes with rich error details."""

from __future__ import annotations

import functools
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .domain.validation import InvalidArgument
from .store import RunConflict, RunNotFound, StoreUnavailable, VersionMismatch

log = logging.getLogger("maxent_server")


class RewardFailures(Exception):
    """Reward functions failed under the ERROR policy; `failures` lists them."""

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        super().__init__(f"{len(failures)} reward evaluations failed")
        self.failures = failures


def _pack(detail) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def status_for(error: Exception) -> status_pb2.Status | None:
    """The google.rpc.Status for a known error, or None for an unexpected one."""
    if isinstance(error, InvalidArgument):
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations
            ]
        )
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[_pack(request)])
    if isinstance(error, RunNotFound):
        info = error_details_pb2.ResourceInfo(resource_type="maxent.v1.Run", resource_name=error.run_id)
        return status_pb2.Status(code=code_pb2.NOT_FOUND, message=str(error), details=[_pack(info)])
    if isinstance(error, RunConflict):
        info = error_details_pb2.ResourceInfo(resource_type="maxent.v1.Run", resource_name=error.run_id)
        return status_pb2.Status(code=code_pb2.ALREADY_EXISTS, message=str(error), details=[_pack(info)])
    if isinstance(error, VersionMismatch):
        return status_pb2.Status(code=code_pb2.ABORTED, message=str(error))
    if isinstance(error, StoreUnavailable):
        return status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(error))
    if isinstance(error, RewardFailures):
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(type="REWARD_FAILED", subject=s, description=d)
                for s, d in error.failures
            ]
        )
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(error), details=[_pack(failure)])
    return None


Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def translate_errors(handler: Handler) -> Handler:
    """Turn known exceptions into statuses; anything else is INTERNAL, logged."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error must become a status
            status = _status_or_internal(error, handler.__name__)
        await _abort(context, status)

    return wrapper


def _status_or_internal(error: Exception, where: str) -> status_pb2.Status:
    status = status_for(error)
    if status is None:
        log.exception("unexpected error in %s", where)
        status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    return status


async def _abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    converted = rpc_status.to_status(status)
    await context.abort(converted.code, converted.details, converted.trailing_metadata)


StreamHandler = Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def translate_stream_errors(handler: StreamHandler) -> StreamHandler:
    """translate_errors for a server-streaming handler (an async generator):
    the messages pass through; an error ends the stream with its status."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            async for response in handler(self, request, context):
                yield response
            return
        except Exception as error:  # noqa: BLE001 - every error must become a status
            status = _status_or_internal(error, handler.__name__)
        await _abort(context, status)

    return wrapper
