"""Admission: how much work the server takes on at once.

Three bounds, none of which queues a call:

* ``max_concurrent_rpcs`` MaxEntService calls at a time (health checks and
  reflection are not counted). Taken before the request body is read, so
  the bodies held at once are at most this many; over it a call gets
  RESOURCE_EXHAUSTED. A WatchRun stream holds its slot only until its
  request is read and checked.
* ``max_inflight_mb`` of estimated memory across the calls being served. A
  call's cost is estimated from its request size (:func:`estimated_cost`);
  when the calls in flight and this one would exceed the budget, this one
  gets RESOURCE_EXHAUSTED (a call larger than the whole budget runs when it
  would run alone: the peak is the larger of the budget and one call).
* at most :data:`MAX_GROUPS_PER_REQUEST` groups in one request
  (INVALID_ARGUMENT on ``group_sizes``), checked before the servicer runs.
"""

from __future__ import annotations

import grpc

from .refusal import Refusal

#: Groups (entries of group_sizes) one request may carry.
MAX_GROUPS_PER_REQUEST = 1_000_000
#: Memory a batch call needs per request byte, at most: a packed varint byte
#: becomes an 8-byte integer, and the computation keeps several arrays of
#: each length side by side.
BATCH_BYTES_PER_REQUEST_BYTE = 16
#: The same for the other calls (runs, controller updates, listings).
OTHER_BYTES_PER_REQUEST_BYTE = 2
#: What any call costs besides its request.
BASE_CALL_BYTES = 64 * 1024

BATCH_METHODS = frozenset({"ComputeRewardStatistics", "ComputeWeightStats", "ComputeStepStatistics"})
_MIB = 1024 * 1024


def estimated_cost(method: str, request_bytes: int) -> int:
    """Bytes of memory a call with a request of `request_bytes` may need."""
    factor = BATCH_BYTES_PER_REQUEST_BYTE if method in BATCH_METHODS else OTHER_BYTES_PER_REQUEST_BYTE
    return BASE_CALL_BYTES + factor * request_bytes


def check_group_count(request) -> None:
    sizes = getattr(request, "group_sizes", None)
    if sizes is not None and len(sizes) > MAX_GROUPS_PER_REQUEST:
        raise Refusal.invalid("group_sizes", f"has {len(sizes)} groups; one request may carry at most "
                                             f"{MAX_GROUPS_PER_REQUEST} (split the batch)")


class Admission:
    """The server-wide counters; every method runs on the event loop, so no
    lock is needed."""

    def __init__(self, max_concurrent_rpcs: int, max_inflight_mb: int) -> None:
        if max_concurrent_rpcs < 1 or max_inflight_mb < 1:
            raise ValueError("max_concurrent_rpcs and max_inflight_mb must be >= 1")
        self.max_calls = max_concurrent_rpcs
        self.budget = max_inflight_mb * _MIB
        self.calls = 0
        self.reserved = 0

    def enter(self) -> None:
        """Take a call slot (before the body is read), or refuse."""
        if self.calls >= self.max_calls:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server busy: {self.calls} calls in flight, the most it serves at once; retry later")
        self.calls += 1

    def leave(self) -> None:
        self.calls -= 1

    def reserve(self, method: str, request_bytes: int) -> int:
        """Reserve the call's estimated memory (returned, for `release`), or refuse."""
        cost = estimated_cost(method, request_bytes)
        # A call larger than the whole budget runs only alone.
        if self.reserved and self.reserved + cost > self.budget:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server busy: the calls in flight hold {self.reserved // _MIB} MiB of its "
                          f"{self.budget // _MIB} MiB budget and this {method} needs about {cost // _MIB} MiB; "
                          "retry later")
        self.reserved += cost
        return cost

    def release(self, cost: int) -> None:
        self.reserved -= cost
