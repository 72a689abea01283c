"""Per-caller rate limits: each caller's share of the request bytes the server reads.

Every token (a caller) has a bucket of request bytes that refills at
``rate`` bytes per second up to ``burst``. A call may start while its
caller's bucket is not in debt; it is charged :data:`CALL_BYTES` plus the
size of the caller's previous body when it starts (calls that wake together
then see each other), and the difference to its own body's size once that
is read, so the bucket can go into debt. A call whose caller is in debt
waits -- before its body is read and before it takes a call slot -- until
the debt is paid back. It is refused with
RESOURCE_EXHAUSTED instead when the wait would outlast its deadline, or
when :data:`MAX_WAITING` calls of the same caller already wait.

A trainer that sends its batches at a steady pace never waits; a caller
that sends requests as fast as the server answers them gets ``rate`` bytes
per second and no more, so it cannot take the server's CPU from the rest.
A server without tokens has no callers to tell apart (addresses say little
behind proxies, and every caller may do anything) and limits none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

import grpc

from .refusal import Refusal

#: What a call costs besides its body, bytes: bounds the calls per second of
#: a caller whose requests are tiny (rate / CALL_BYTES of them).
CALL_BYTES = 64 * 1024
#: Calls of one caller that may wait at once; more are refused at once.
MAX_WAITING = 32
#: Buckets kept before the full, idle ones are forgotten.
MAX_BUCKETS = 4096
_MIB = 1024 * 1024
#: A bucket this close to zero counts as paid back (the refill is computed in
#: floating point, so a wait of exactly the debt can leave a sliver of it).
_SLACK = 1.0


class _Bucket:
    __slots__ = ("level", "at", "waiting", "expected")

    def __init__(self, level: float, at: float) -> None:
        self.level = level
        self.at = at
        self.waiting = 0
        self.expected = 0  # body size of the caller's last call, charged ahead for the next


class Turn(NamedTuple):
    """A call's start: its caller, seconds it waited, bytes charged ahead of its body."""

    caller: str
    waited: float
    charged: float


class CallerRates:
    """Token buckets of request bytes, one per caller; used on the event loop only."""

    def __init__(self, mb_per_second: float, burst_mb: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not mb_per_second > 0 or not burst_mb > 0:
            raise ValueError("mb_per_second and burst_mb must be > 0")
        self.rate = mb_per_second * _MIB
        self.burst = burst_mb * _MIB
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, caller: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets[caller] = _Bucket(self.burst, now)
        else:
            bucket.level = min(self.burst, bucket.level + (now - bucket.at) * self.rate)
            bucket.at = now
        return bucket

    def _forget_idle(self, now: float) -> None:
        for caller, bucket in list(self._buckets.items()):
            if not bucket.waiting and bucket.level + (now - bucket.at) * self.rate >= self.burst:
                del self._buckets[caller]

    def wait_seconds(self, caller: str) -> float:
        """How long a call of `caller` would wait now (0 when it may start)."""
        level = self._bucket(caller).level
        return 0.0 if level > -_SLACK else -level / self.rate

    async def take_turn(self, caller: str, time_left: float | None) -> Turn:
        """Wait until `caller` may start a call, then charge it :data:`CALL_BYTES`
        plus the size of its previous body (so that calls waking together see
        each other's cost); :meth:`settle` corrects that once the body is read.
        Raises a RESOURCE_EXHAUSTED Refusal when the wait would outlast
        `time_left` (seconds, None: no deadline) or too many of the caller's
        calls already wait."""
        waited = 0.0
        bucket = self._bucket(caller)
        while bucket.level <= -_SLACK:
            wait = -bucket.level / self.rate
            if bucket.waiting >= MAX_WAITING:
                raise _over_rate(f"{bucket.waiting} calls of this caller already wait")
            if time_left is not None and waited + wait > time_left:
                raise _over_rate(f"its next call may start in {wait:.2f} s, after this call's deadline")
            bucket.waiting += 1
            try:
                await asyncio.sleep(wait)
            finally:
                bucket.waiting -= 1
            waited += wait
            bucket = self._bucket(caller)
        charged = float(CALL_BYTES + bucket.expected)
        bucket.level -= charged
        return Turn(caller, waited, charged)

    def settle(self, turn: Turn, request_bytes: int) -> None:
        """Count the body read for a call started with `turn` against its caller."""
        bucket = self._bucket(turn.caller)
        bucket.level -= CALL_BYTES + request_bytes - turn.charged
        bucket.expected = request_bytes


def _over_rate(why: str) -> Refusal:
    return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"caller over its rate limit ({why}); slow down and retry later")
