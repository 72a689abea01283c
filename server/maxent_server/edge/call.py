"""One call's record, shared by the edge stages: who called, what was asked,
how it ended. The metrics and the access log read it when the call ends."""

from __future__ import annotations

import time

import grpc

from ..auth import Principal


class Call:
    def __init__(self, service: str, method: str, context) -> None:
        self.service, self.method = service, method
        self.started = time.perf_counter()
        # Read from the context while the call surely exists; a call that ends
        # by cancellation may have none left to ask.
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else self.started + remaining
        self.peer = _peer(context)
        self.code = grpc.StatusCode.OK
        self.principal: Principal | None = None
        self.request = None
        self.request_bytes = 0
        self.response_bytes = 0
        # What the call holds of the server's admission: a slot, reserved bytes.
        self.holds_slot = False
        self.reserved = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def interrupted(self) -> None:
        """The client went away, or the deadline passed."""
        expired = self.deadline is not None and time.perf_counter() >= self.deadline
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def failed(self, context) -> None:
        """The handler aborted the call (its code is on the context) or raised."""
        self.code = context.code() or grpc.StatusCode.UNKNOWN

    @property
    def run_id(self) -> str:
        request = self.request
        if request is None or isinstance(request, bytes):
            return ""
        return getattr(request, "run_id", "")


def _peer(context) -> str | None:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001 - the peer is only informative
        return None
