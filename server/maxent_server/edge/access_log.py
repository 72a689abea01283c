"""One access-log line per call, with the status the client received."""

from __future__ import annotations

import logging

from ..logs import log_rpc
from ..metrics import completions_in
from .admission import BATCH_METHODS, MAX_GROUPS_PER_REQUEST
from .call import Call

_QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection"})


def _completions(call: Call) -> int | None:
    """The completions a batch call carried (None for other calls, and for
    a batch refused for its group count: not worth counting)."""
    request = call.request
    if call.method not in BATCH_METHODS or request is None or isinstance(request, bytes):
        return None
    if len(request.group_sizes) > MAX_GROUPS_PER_REQUEST:
        return None
    return completions_in(request)


def log_call(call: Call) -> None:
    log_rpc(
        logging.DEBUG if call.service in _QUIET_SERVICES else logging.INFO,
        method=call.method,
        service=call.service,
        run=call.run_id,
        code=call.code.name,
        duration_seconds=round(call.seconds, 6),
        request_bytes=call.request_bytes,
        response_bytes=call.response_bytes,
        completions=_completions(call),
        principal=call.principal.name if call.principal is not None else "",
        peer=call.peer,
    )
