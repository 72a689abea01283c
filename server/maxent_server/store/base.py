"""The storage interface for runs and their controllers.

A backend keeps each run's config and controller state durably, applies
controller updates atomically per run (read, step, write as one unit), and
remembers recent request ids so a replayed update applies nothing.
"""

from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ..domain import ControllerState, WeightingConfig
from .patterns import RunPatterns, prefix_end

# How many applied request ids a backend remembers per run, at least.
REQUEST_ID_RETENTION = 10_000

ControllerStep = Callable[[WeightingConfig, ControllerState], ControllerState]

# Every run id, as a listing pattern.
ALL_RUNS = RunPatterns(["*"])
# The most ids one listing step reads from a backend.
_SCAN_CHUNK_MAX = 16_384


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: WeightingConfig
    state: ControllerState
    create_time: float  # seconds since the epoch


@dataclass(frozen=True)
class UpdateOutcome:
    state: ControllerState
    replayed: bool


class StoreError(Exception):
    """Base of the errors a store raises."""


class RunNotFound(StoreError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} not found")
        self.run_id = run_id


class RunConflict(StoreError):
    """A run with this id exists with another config; the message names the
    fields that differ (stored value, then the one asked for)."""

    def __init__(
        self, run_id: str, stored: WeightingConfig | None = None, asked: WeightingConfig | None = None
    ) -> None:
        message = f"run {run_id!r} already exists with a different config"
        if stored is not None and asked is not None:
            old, new = stored.to_dict(), asked.to_dict()
            changed = [f"{name} ({old[name]!r} stored, {new[name]!r} asked)" for name in old if old[name] != new.get(name)]
            message += ": " + ", ".join(changed) + "; use another run_id, or the stored config"
        super().__init__(message)
        self.run_id = run_id


class VersionMismatch(StoreError):
    def __init__(self, run_id: str, expected: int, actual: int) -> None:
        super().__init__(f"run {run_id!r} is at version {actual}, not the expected {expected}")
        self.expected, self.actual = expected, actual


class StoreUnavailable(StoreError):
    """The backend cannot be reached now; the caller may retry later."""


class RunStore(abc.ABC):
    """Durable runs. Every method is safe to call from several threads."""

    # True when get_run reads local storage and never waits on writers or
    # the network, so the server may call it on its event loop.
    local_reads: bool = False

    @abc.abstractmethod
    def create_run(
        self, run_id: str, config: WeightingConfig, now: float, initial_state: ControllerState | None = None
    ) -> tuple[RunRecord, bool]:
        """Create a run; return (record, created). Its controller starts from
        `initial_state` when given (an import), else fresh from the config. An
        existing run with the same config is returned with created=False
        (whatever its state); another config raises RunConflict."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRecord:
        """The run, or RunNotFound."""

    def list_runs(self, after: str | None, limit: int) -> list[RunRecord]:
        """Up to `limit` runs with run_id > `after`, ordered by run_id."""
        return self.list_matching(ALL_RUNS, after, limit)

    def list_matching(self, patterns: RunPatterns, after: str | None, limit: int) -> list[RunRecord]:
        """Up to `limit` runs whose id matches `patterns` and is > `after`,
        ordered by run_id. Reads the ids under the patterns' literal prefixes
        in id order (see store/patterns.py) and the records of the runs it
        returns, nothing else; never waits for a writer."""
        if limit <= 0:
            return []
        ids = self._matching_ids(patterns, after, chunk=min(max(limit, 256), 4096))
        records: list[RunRecord] = []
        while len(records) < limit:
            batch = list(itertools.islice(ids, limit - len(records)))
            if not batch:
                break
            records.extend(self._fetch_many(batch))  # a run deleted meanwhile is left out
        return records

    def _matching_ids(self, patterns: RunPatterns, after: str | None, chunk: int) -> Iterator[str]:
        for prefix in patterns.prefixes:
            end = prefix_end(prefix)
            if after is not None and end is not None and after >= end:
                continue  # the page token is past this prefix
            cursor: str | None = after
            while True:
                ids, cursor = self._scan_matching(patterns, cursor, prefix, end, chunk)
                yield from ids
                if cursor is None:
                    break
                chunk = min(chunk * 2, _SCAN_CHUNK_MAX)  # few matches so far: read further per step

    @abc.abstractmethod
    def _scan_matching(
        self, patterns: RunPatterns, after: str | None, low: str, high: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        """One step of a listing: the ids matching `patterns` that are >
        `after` (None: no bound), >= `low` and < `high` (None: no bound),
        ascending, from at most `limit` ids read; and the id to resume after,
        or None when the range is done."""

    @abc.abstractmethod
    def _fetch_many(self, run_ids: Sequence[str]) -> list[RunRecord]:
        """The runs of `run_ids` that exist, in the given order."""

    @abc.abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Delete a run, its request ids and its state history, or raise RunNotFound."""

    @abc.abstractmethod
    def update_controller(
        self, run_id: str, request_id: str, expected_version: int | None, step: ControllerStep
    ) -> UpdateOutcome:
        """Atomically apply `step` to the run's state and persist it before
        returning. A request_id already applied returns the state it produced
        (replayed=True) and applies nothing; a mismatched expected_version
        raises VersionMismatch."""

    @abc.abstractmethod
    def states_since(self, run_id: str, version: int, limit: int) -> list[ControllerState]:
        """The run's states with version > `version`, ascending, at most
        `limit` of them, from the history every update that raises the
        version writes in the same atomic write as the state (the last
        `retention` versions are kept). RunNotFound for an unknown run. A
        version older than the history holds is simply missing: the caller
        compares the first version with the one it wanted."""

    def ping(self) -> None:
        """Raise StoreUnavailable when the backend cannot be reached."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release the backend."""


def redact_url(url: str) -> str:
    """`url` with the password of its user part (if any) replaced by ***,
    however malformed the rest is. Everything up to the last '@' counts as
    the user part, so a password holding '/' or '@' is hidden too."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
