"""The storage interface for runs and their controllers.

A backend keeps each run's config and controller state durably, applies
controller updates atomically per run (read, step, write as one unit), and
remembers recent request ids so a replayed update applies nothing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

from ..domain import ControllerState, RunConfig

# How many applied request ids a backend remembers per run, at least.
REQUEST_ID_RETENTION = 10_000

ControllerStep = Callable[[RunConfig, ControllerState], ControllerState]


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: RunConfig
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

    def __init__(self, run_id: str, stored: RunConfig | None = None, asked: RunConfig | None = None) -> None:
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
        self, run_id: str, config: RunConfig, now: float, initial_state: ControllerState | None = None
    ) -> tuple[RunRecord, bool]:
        """Create a run; return (record, created). Its controller starts from
        `initial_state` when given (an import), else fresh from the config. An
        existing run with the same config is returned with created=False
        (whatever its state); another config raises RunConflict."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRecord:
        """The run, or RunNotFound."""

    @abc.abstractmethod
    def list_runs(self, after: str | None, limit: int) -> list[RunRecord]:
        """Up to `limit` runs with run_id > `after`, ordered by run_id."""

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
