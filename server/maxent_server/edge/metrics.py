"""The call counters of a call: in flight from its start, then its status,
duration and sizes; per-run values from its successful response."""

from __future__ import annotations

from maxent_api import SERVICE_NAME as MAXENT_SERVICE

from ..auth import Role
from ..metrics import Metrics
from .call import Call


def call_started(metrics: Metrics | None, call: Call) -> None:
    if metrics is not None:
        metrics.call_started(call.service, call.method)


def call_finished(metrics: Metrics | None, call: Call) -> None:
    if metrics is not None:
        metrics.call_finished(call.service, call.method, call.code.name, call.seconds, call.request_bytes,
                              call.response_bytes)


def call_answered(metrics: Metrics | None, call: Call, response) -> None:
    """A successful MaxEntService response. Only a caller who may write runs
    (any caller on a server without tokens) moves the per-run reward values."""
    if metrics is None or call.service != MAXENT_SERVICE:
        return
    writer = call.principal is None or call.principal.role >= Role.WRITE
    # An EncodedResponse carries its scalar fields as .message.
    metrics.observe_response(call.method, call.request, getattr(response, "message", response), from_writer=writer)
