"""How the edge refuses a call: one exception carrying the status the client
gets, turned into a rich google.rpc.Status when the call is aborted."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class Refusal(Exception):
    """The call stops here with `code` and `message`; `field_violations`
    (field, description) become a google.rpc.BadRequest."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 field_violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field_violations = field_violations or []

    @classmethod
    def invalid(cls, field: str, description: str) -> Refusal:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", [(field, description)])

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """End the call with this status (grpc's abort raises, always)."""
        if not self.field_violations:
            await context.abort(self.code, self.message)
        else:
            request = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.field_violations
            ])
            packed = any_pb2.Any()
            packed.Pack(request)
            status = rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message,
                                                            details=[packed]))
            await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("grpc.aio.ServicerContext.abort returned")  # grpc has no stubs to say NoReturn
