"""Durable run storage behind a small interface (base.RunStore)."""

from pathlib import Path

from .base import (
    REQUEST_ID_RETENTION,
    RunConflict,
    RunNotFound,
    RunRecord,
    RunStore,
    StoreError,
    StoreUnavailable,
    UpdateOutcome,
    VersionMismatch,
    redact_url,
)
from .patterns import RunPatterns
from .sqlite import SqliteStore


def open_store(url: str, data_dir: str) -> RunStore:
    """Open the store named by `url` ('' or 'sqlite' = the embedded default;
    redis:// or rediss:// = the shared Redis store, see store/redis.py).
    A URL that cannot be used raises ValueError; its message never holds
    the URL's password."""
    if url.startswith(("redis://", "rediss://")):
        from .redis import RedisStore  # imported only when asked for: needs the redis package

        return RedisStore.from_url(url)
    if url in ("", "sqlite"):
        return SqliteStore(Path(data_dir) / SqliteStore.FILENAME)
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite://") :])
    raise ValueError(f"unsupported state store {redact_url(url)!r}")


__all__ = [
    "REQUEST_ID_RETENTION",
    "RunConflict",
    "RunNotFound",
    "RunPatterns",
    "RunRecord",
    "RunStore",
    "SqliteStore",
    "StoreError",
    "StoreUnavailable",
    "UpdateOutcome",
    "VersionMismatch",
    "open_store",
    "redact_url",
]
