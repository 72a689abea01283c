"""One access-log line per call, with the status the client received."""

from __future__ import annotations

import logging

from ..logs import log_rpc
from ..metrics import completions_in
from .admission import BATCH_METHODS
from .call import Call

_QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection"})


def log_call(call: Call) -> None:
    completions = None
    request = call.request
    if call.method in BATCH_METHODS and request is not None and not isinstance(request, bytes):
        completions = completions_in(request)
    log_rpc(
        logging.DEBUG if call.service in _QUIET_SERVICES else logging.INFO,
        method=call.method,
        service=call.service,
        run=call.run_id,
        code=call.code.name,
        duration_seconds=round(call.seconds, 6),
        request_bytes=call.request_bytes,
        response_bytes=call.response_bytes,
        completions=completions,
        principal=call.principal.name if call.principal is not None else "",
        peer=call.peer,
    )
