"""Errors raised by the client: one class per gRPC status the service uses,
each keeping the status code and the field violations of a BadRequest."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field and why."""

    field: str
    description: str


class MaxEntError(Exception):
    """A failed call. `code` is the gRPC status; `violations` names bad fields."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, violations: tuple[FieldViolation, ...] = ()):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.violations = violations

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __reduce__(self):
        # Keyword-only arguments: pickle (e.g. between ranks) needs the recipe.
        return (_rebuild, (type(self), self.message, self.code, self.violations))


def _rebuild(cls: type, message: str, code: grpc.StatusCode, violations: tuple) -> "MaxEntError":
    return cls(message, code=code, violations=violations)


class InvalidArgumentError(MaxEntError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(MaxEntError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(MaxEntError):
    code = grpc.StatusCode.ALREADY_EXISTS


class VersionConflictError(MaxEntError):
    """expected_version did not match the run's version (ABORTED)."""

    code = grpc.StatusCode.ABORTED


class RewardFailedError(MaxEntError):
    """A reward function failed under on_failure=ERROR (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(MaxEntError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(MaxEntError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(MaxEntError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(MaxEntError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(MaxEntError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        VersionConflictError,
        RewardFailedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        ResourceExhaustedError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> MaxEntError:
    """The MaxEntError for a failed call, with its field violations."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    violations: list[FieldViolation] = []
    try:
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    except ValueError:  # details that disagree with the call's own status
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            violations.extend(FieldViolation(v.field, v.description) for v in request.field_violations)
    cls = _BY_CODE.get(code, MaxEntError)
    return cls(message or code.name, code=code, violations=tuple(violations))
