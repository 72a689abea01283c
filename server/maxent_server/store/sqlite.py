"""The embedded default store: one SQLite file in WAL mode.

Every write commits with synchronous=FULL before the call returns, so an
acknowledged CreateRun or UpdateController survives a kill -9 of the server.
Writes go through one connection under a lock; reads (get_run, listings,
state history) go through a connection of the calling thread's own, which in
WAL mode sees the last commit without waiting for a writer (hence
local_reads). Listings walk the primary-key index on run_id by range.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from ..domain import ControllerState, WeightingConfig
from .base import (
    REQUEST_ID_RETENTION,
    ControllerStep,
    RunConflict,
    RunNotFound,
    RunRecord,
    RunStore,
    UpdateOutcome,
    VersionMismatch,
)
from .patterns import RunPatterns

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    create_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS applied_requests (
    run_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, request_id)
);
CREATE INDEX IF NOT EXISTS applied_requests_by_version ON applied_requests (run_id, version);
CREATE TABLE IF NOT EXISTS state_history (
    run_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, version)
) WITHOUT ROWID;
"""


# Ids per `IN (...)` list: below SQLite's oldest limit on bound parameters.
_IN_LIST_MAX = 500


def _dump(obj: WeightingConfig | ControllerState) -> str:
    return json.dumps(obj.to_dict(), sort_keys=True)


class SqliteStore(RunStore):
    """Runs in one SQLite file (the parent folder is created if missing)."""

    FILENAME = "maxent.sqlite3"
    local_reads = True

    def __init__(self, path: str | Path, *, retention: int = REQUEST_ID_RETENTION) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.retention = retention
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self._readers = threading.local()
        self._readers_lock = threading.Lock()
        self._reader_connections: list[sqlite3.Connection] = []
        self._closed = False

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._readers, "db", None)
        if db is None:
            with self._readers_lock:  # not the writer's lock: a read never waits for a write
                if self._closed:
                    raise sqlite3.ProgrammingError("the store is closed")
                db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA busy_timeout=10000")
                self._reader_connections.append(db)
            self._readers.db = db
        return db

    def _record(self, row: tuple) -> RunRecord:
        run_id, config, state, create_time = row
        return RunRecord(
            run_id=run_id,
            config=WeightingConfig.from_dict(json.loads(config)),
            state=ControllerState.from_dict(json.loads(state)),
            create_time=create_time,
        )

    def _fetch(self, run_id: str, db: sqlite3.Connection | None = None) -> RunRecord | None:
        row = (db or self._db).execute(
            "SELECT run_id, config, state, create_time FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return self._record(row) if row else None

    def create_run(
        self, run_id: str, config: WeightingConfig, now: float, initial_state: ControllerState | None = None
    ) -> tuple[RunRecord, bool]:
        with self._lock, self._transaction():
            existing = self._fetch(run_id)
            if existing is not None:
                if existing.config != config:
                    raise RunConflict(run_id, existing.config, config)
                return existing, False
            state = initial_state if initial_state is not None else ControllerState.initial(config, now)
            record = RunRecord(run_id, config, state, now)
            self._db.execute(
                "INSERT INTO runs (run_id, config, state, create_time) VALUES (?, ?, ?, ?)",
                (run_id, _dump(config), _dump(record.state), now),
            )
            return record, True

    def get_run(self, run_id: str) -> RunRecord:
        record = self._fetch(run_id, self._reader())
        if record is None:
            raise RunNotFound(run_id)
        return record

    def _scan_matching(
        self, patterns: RunPatterns, after: str | None, low: str, high: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        # A range scan of the primary-key index; ids are tested in the same
        # statement, so a step returns up to `limit` matches in one query.
        db = self._reader()
        sql = "SELECT run_id FROM runs WHERE run_id >= ?"
        args: list = [low]
        if after is not None:
            sql += " AND run_id > ?"
            args.append(after)
        if high is not None:
            sql += " AND run_id < ?"
            args.append(high)
        if not patterns.prefixes_decide:
            db.create_function("maxent_run_matches", 1, patterns.matches, deterministic=True)
            sql += " AND maxent_run_matches(run_id)"
        ids = [row[0] for row in db.execute(sql + " ORDER BY run_id LIMIT ?", (*args, limit))]
        return ids, (ids[-1] if len(ids) == limit else None)

    def _fetch_many(self, run_ids: Sequence[str]) -> list[RunRecord]:
        found: dict[str, RunRecord] = {}
        db = self._reader()
        for start in range(0, len(run_ids), _IN_LIST_MAX):
            chunk = run_ids[start : start + _IN_LIST_MAX]
            marks = ",".join("?" * len(chunk))
            for row in db.execute(
                f"SELECT run_id, config, state, create_time FROM runs WHERE run_id IN ({marks})", chunk
            ):
                found[row[0]] = self._record(row)
        return [found[run_id] for run_id in run_ids if run_id in found]

    def delete_run(self, run_id: str) -> None:
        with self._lock, self._transaction():
            if self._db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,)).rowcount == 0:
                raise RunNotFound(run_id)
            self._db.execute("DELETE FROM applied_requests WHERE run_id = ?", (run_id,))
            self._db.execute("DELETE FROM state_history WHERE run_id = ?", (run_id,))

    def update_controller(
        self, run_id: str, request_id: str, expected_version: int | None, step: ControllerStep
    ) -> UpdateOutcome:
        with self._lock, self._transaction():
            record = self._fetch(run_id)
            if record is None:
                raise RunNotFound(run_id)
            if request_id:
                row = self._db.execute(
                    "SELECT state FROM applied_requests WHERE run_id = ? AND request_id = ?", (run_id, request_id)
                ).fetchone()
                if row:
                    return UpdateOutcome(ControllerState.from_dict(json.loads(row[0])), replayed=True)
            if expected_version is not None and expected_version != record.state.version:
                raise VersionMismatch(run_id, expected_version, record.state.version)
            state = step(record.config, record.state)
            encoded = _dump(state)
            self._db.execute("UPDATE runs SET state = ? WHERE run_id = ?", (encoded, run_id))
            if state.version > record.state.version:
                self._record_history(run_id, state.version, encoded)
            if request_id:
                self._db.execute(
                    "INSERT INTO applied_requests (run_id, request_id, version, state) VALUES (?, ?, ?, ?)",
                    (run_id, request_id, state.version, encoded),
                )
                self._db.execute(
                    "DELETE FROM applied_requests WHERE run_id = ? AND version <= ?",
                    (run_id, state.version - self.retention),
                )
            return UpdateOutcome(state, replayed=False)

    def _record_history(self, run_id: str, version: int, encoded: str) -> None:
        """Inside the update's transaction: the new state by version (for
        WatchRun), keeping the run's last `retention` versions."""
        self._db.execute(
            "INSERT OR REPLACE INTO state_history (run_id, version, state) VALUES (?, ?, ?)",
            (run_id, version, encoded),
        )
        self._db.execute(
            "DELETE FROM state_history WHERE run_id = ? AND version <= ?", (run_id, version - self.retention)
        )

    def states_since(self, run_id: str, version: int, limit: int) -> list[ControllerState]:
        # One statement, so one snapshot: the run exists and its history as of the same commit.
        rows = self._reader().execute(
            "SELECT h.state FROM runs r LEFT JOIN state_history h ON h.run_id = r.run_id AND h.version > ? "
            "WHERE r.run_id = ? ORDER BY h.version LIMIT ?",
            (version, run_id, max(limit, 1)),
        ).fetchall()
        if not rows:
            raise RunNotFound(run_id)
        return [ControllerState.from_dict(json.loads(row[0])) for row in rows[:limit] if row[0] is not None]

    def ping(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self._closed = True
            for db in self._reader_connections:
                db.close()
            self._db.close()

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back when the body raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
