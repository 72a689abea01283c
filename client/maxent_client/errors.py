"""Errors raised by the client: one class per gRPC status the service uses,
each carrying every detail the server attached to the status."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field and why (a google.rpc.BadRequest entry)."""

    field: str
    description: str


_REWARD_SUBJECT = re.compile(r"rewards\[(\d+)\] \((.*)\) completion (\d+)")


@dataclass(frozen=True)
class RewardFailure:
    """One failed reward evaluation under on_failure=ERROR (a
    google.rpc.PreconditionFailure entry). `subject` says which reward term
    and completion, e.g. ``rewards[0] (format) completion 3``;
    `description` how it failed ("reward function raised" or "... timed out")."""

    type: str
    subject: str
    description: str

    @property
    def reward_index(self) -> int | None:
        """Index of the failed term in the request's rewards, when the subject names it."""
        match = _REWARD_SUBJECT.fullmatch(self.subject)
        return int(match.group(1)) if match else None

    @property
    def reward_name(self) -> str | None:
        """Name of the failed reward function, when the subject names it."""
        match = _REWARD_SUBJECT.fullmatch(self.subject)
        return match.group(2) if match else None

    @property
    def completion_index(self) -> int | None:
        """Flat index of the completion it failed on, when the subject names it."""
        match = _REWARD_SUBJECT.fullmatch(self.subject)
        return int(match.group(3)) if match else None


@dataclass(frozen=True)
class ResourceInfo:
    """The resource a call was about (a google.rpc.ResourceInfo), e.g. the
    run behind NOT_FOUND or ALREADY_EXISTS: type ``maxent.v1.Run``, name its run_id."""

    resource_type: str
    resource_name: str
    owner: str = ""
    description: str = ""


class MaxEntError(Exception):
    """A failed call.

    `code` is the gRPC status code and `message` its text. The details the
    server attached are unpacked: `violations` (BadRequest: the invalid
    fields), `failures` (PreconditionFailure: the failed reward evaluations),
    `resource` (ResourceInfo: the run it was about, or None). `status` is
    the raw google.rpc.Status with every detail still packed, also those
    this client has no attribute for."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        violations: tuple[FieldViolation, ...] = (),
        failures: tuple[RewardFailure, ...] = (),
        resource: ResourceInfo | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.violations = tuple(violations)
        self.failures = tuple(failures)
        self.resource = resource
        self.status = status if status is not None else _bare_status(self.code, message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: pickle (e.g. between ranks) needs the recipe.
        return (_rebuild, (type(self), self.message, self.code, self.violations, self.failures, self.resource,
                           self.status.SerializeToString()))


def _rebuild(cls: type[MaxEntError], message: str, code: grpc.StatusCode, violations: tuple[FieldViolation, ...],
             failures: tuple[RewardFailure, ...] = (), resource: ResourceInfo | None = None,
             status: bytes | None = None) -> MaxEntError:
    raw = status_pb2.Status.FromString(status) if status is not None else None
    return cls(message, code=code, violations=violations, failures=failures, resource=resource, status=raw)


def _bare_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    """A google.rpc.Status for a failure that came without one."""
    return status_pb2.Status(code=code.value[0], message=message)


class InvalidArgumentError(MaxEntError):
    """The request was refused; `violations` names each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(MaxEntError):
    """The run does not exist; `resource` names it."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(MaxEntError):
    """A run of that id exists with another config; `resource` names it."""

    code = grpc.StatusCode.ALREADY_EXISTS


class VersionConflictError(MaxEntError):
    """expected_version did not match the run's version (ABORTED)."""

    code = grpc.StatusCode.ABORTED


class RewardFailedError(MaxEntError):
    """A reward function failed under on_failure=ERROR (FAILED_PRECONDITION);
    `failures` lists each failed evaluation."""

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


_BY_CODE: dict[grpc.StatusCode, type[MaxEntError]] = {
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


def _unpack(detail: any_pb2.Any, message_class: Any) -> Any:
    """`detail` as `message_class`, or None when it holds another type."""
    if not detail.Is(message_class.DESCRIPTOR):
        return None
    message = message_class()
    detail.Unpack(message)
    return message


def _rich_status(error: Any) -> status_pb2.Status | None:
    """The google.rpc.Status the server attached, or None (none attached,
    or one that disagrees with the call's own code and message)."""
    if not hasattr(error, "trailing_metadata"):
        return None
    try:
        return rpc_status.from_call(error)
    except ValueError:
        return None


def from_rpc_error(error: Any) -> MaxEntError:
    """The MaxEntError for a failed call (a grpc.RpcError, sync or asyncio),
    with every detail the server attached unpacked."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else str(error)) or code.name
    status = _rich_status(error)
    violations: list[FieldViolation] = []
    failures: list[RewardFailure] = []
    resource: ResourceInfo | None = None
    for detail in status.details if status is not None else ():
        if (bad := _unpack(detail, error_details_pb2.BadRequest)) is not None:
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif (failed := _unpack(detail, error_details_pb2.PreconditionFailure)) is not None:
            failures.extend(RewardFailure(v.type, v.subject, v.description) for v in failed.violations)
        elif (info := _unpack(detail, error_details_pb2.ResourceInfo)) is not None:
            resource = ResourceInfo(info.resource_type, info.resource_name, info.owner, info.description)
    cls = _BY_CODE.get(code, MaxEntError)
    return cls(message, code=code, violations=tuple(violations), failures=tuple(failures), resource=resource,
               status=status)
