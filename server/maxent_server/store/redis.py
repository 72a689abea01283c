"""A store in Redis, shared by several server replicas.

    --state-store redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
    --state-store rediss://...            (TLS)

Layout (version 2), under a key prefix P (option `prefix`, default
"maxent"), so several deployments can share one Redis:

    P:v2:runs       sorted set of every run id, all scores 0: ordered by id
    P:v2:run:E      hash: config, state (JSON), create_time, stamp (and
                    claimant, claim_until while a writer holds the turn)
    P:v2:req:E      hash: request id -> the state that request produced
    P:v2:reqv:E     sorted set: request id scored by the version it produced
    P:v2:hist:E     sorted set: each state (JSON) scored by its version, the
                    last `retention` versions (WatchRun reads it)

where E is the run id percent-encoded so that it holds no ':' (see
_encode_id). Read from the right, a key names its prefix, kind and run id
unambiguously whatever characters the prefix and the id hold, so no prefix
can reach another prefix's keys. Version 1 (P:runs, P:run:ID, ...) is not
read: `python -m maxent_server.store.redis migrate-v1 URL` moves its runs
across (migrate_v1), and ping() warns while any are left.

A controller update runs the Python step on the run's state and writes the
new state with a Lua compare-and-set on `stamp`, a token that every create
and every write replaces. A concurrent write (from this or another replica)
changes the stamp, so the write is refused, the refusal carries the run as it
is now, and the step runs again on that: no update is lost and N accepted
updates raise the version by exactly N. The first attempt starts from the
run as this process last wrote it (one round trip when a replica is a run's
only writer); that snapshot is only ever the input of a compare-and-set,
never an answer, and GetRun always reads Redis. The same script checks and
records the request id, so a retry that lands on another replica is applied
once. Each run remembers at least the ids of its last `retention` updates;
the memory expires `request_id_ttl` seconds after the run's last update (0:
never). A writer that keeps losing claims the next turn for a moment, so no
replica starves on a hot run (see _UPDATE).

Connection failures, timeouts and a Redis that cannot take writes raise
StoreUnavailable (gRPC UNAVAILABLE); no answer comes from memory, so a
replica never serves a stale state, and the next call after Redis returns
succeeds. See docs/redis.md.

Options (query string):
    prefix=maxent            key prefix
    timeout=5                socket timeout per Redis command, seconds
    connect_timeout=2        TCP (and TLS) connect timeout, seconds
    request_id_ttl=604800    expiry of a run's request-id memory, seconds (0: none)
    retention=10000          request ids remembered per run, at least
    startup_wait=30          how long the first ping() waits for Redis, seconds
    max_connections=64       connection pool size
    ssl_ca_certs=PATH        rediss: CA bundle to verify the server
    ssl_certfile=PATH        rediss: client certificate (mutual TLS)
    ssl_keyfile=PATH         rediss: client key
    ssl_cert_reqs=required   rediss: required | optional | none
    ssl_check_hostname=true  rediss: check the server name in its certificate

The password may be left out of the URL and given in MAXENT_REDIS_PASSWORD
(and the ACL user in MAXENT_REDIS_USERNAME), e.g. from a Kubernetes Secret.
Durability is Redis's own configuration: with `appendonly yes` and
`appendfsync always` an acknowledged write survives a kill -9 of Redis, as it
does with the SQLite store.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

try:
    import redis as _redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "the Redis state store needs the 'redis' package (pip install 'redis>=5')"
    ) from error

from ..domain import ControllerState, WeightingConfig
from .base import (
    REQUEST_ID_RETENTION,
    ControllerStep,
    RunConflict,
    RunNotFound,
    RunRecord,
    RunStore,
    StoreUnavailable,
    UpdateOutcome,
    VersionMismatch,
    redact_url,
)
from .patterns import RunPatterns

log = logging.getLogger("maxent_server")

DEFAULT_PREFIX = "maxent"
LAYOUT = "v2"  # the key layout's version, part of every key
DEFAULT_REQUEST_ID_TTL = 7 * 24 * 3600

# Error replies that mean "Redis cannot serve this now" rather than a bug.
_UNAVAILABLE_REPLIES = ("MISCONF", "MASTERDOWN", "NOREPLICAS", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "LOADING")


def _dump(obj: WeightingConfig | ControllerState) -> str:
    return json.dumps(obj.to_dict(), sort_keys=True)


def _state(text: str) -> ControllerState:
    return ControllerState.from_dict(json.loads(text))


def _config(text: str) -> WeightingConfig:
    return WeightingConfig.from_dict(json.loads(text))


# -- settings ------------------------------------------------------------------


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"redis URL option {name}={value!r}: expected true or false")


def _number(name: str, value: str, kind=float, minimum: float = 0):
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"redis URL option {name}={value!r}: expected a number") from None
    if number < minimum:
        raise ValueError(f"redis URL option {name}={value!r}: must be >= {minimum}")
    return number


@dataclass(frozen=True)
class RedisSettings:
    """Everything a RedisStore needs, parsed from the --state-store URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    prefix: str = DEFAULT_PREFIX
    timeout: float = 5.0
    connect_timeout: float = 2.0
    request_id_ttl: int = DEFAULT_REQUEST_ID_TTL
    retention: int = REQUEST_ID_RETENTION
    startup_wait: float = 30.0
    max_connections: int = 64

    @classmethod
    def from_url(cls, url: str, environ: dict[str, str] | None = None) -> "RedisSettings":
        env = os.environ if environ is None else environ
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// or rediss:// URL: {cls._redact(url)!r}")
        if not parts.hostname:
            raise ValueError("redis URL has no host")
        values: dict = {"host": parts.hostname, "tls": parts.scheme == "rediss"}
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"redis URL {cls._redact(url)!r}: the port must be a number from 0 to 65535") from None
        if port is not None:
            values["port"] = port
        path = parts.path.strip("/")
        if path:
            values["db"] = _number("db", path, int)
        values["username"] = unquote(parts.username) if parts.username else env.get("MAXENT_REDIS_USERNAME") or None
        values["password"] = (
            unquote(parts.password) if parts.password is not None else env.get("MAXENT_REDIS_PASSWORD") or None
        )
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "prefix":
                if not value or any(c.isspace() for c in value):
                    raise ValueError("redis URL option prefix: must be non-empty, without spaces")
                values[name] = value
            elif name in ("timeout", "connect_timeout", "startup_wait"):
                values[name] = _number(name, value)
            elif name == "request_id_ttl":
                values[name] = _number(name, value, int)
            elif name in ("retention", "max_connections"):
                values[name] = _number(name, value, int, 1)
            elif name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                values[name] = value
            elif name == "ssl_cert_reqs":
                if value not in ("required", "optional", "none"):
                    raise ValueError("redis URL option ssl_cert_reqs: required, optional or none")
                values[name] = value
            elif name == "ssl_check_hostname":
                values[name] = _bool(name, value)
            elif name == "db":
                values[name] = _number(name, value, int)
            else:
                raise ValueError(f"unknown redis URL option {name!r}")
        if not values["tls"] and any(k.startswith("ssl_") for k in values):
            raise ValueError("ssl_* options need a rediss:// URL")
        return cls(**values)

    @staticmethod
    def _redact(url: str) -> str:
        return redact_url(url)

    @property
    def address(self) -> str:
        """The URL without the password, for logs and error messages."""
        scheme = "rediss" if self.tls else "redis"
        user = quote(self.username, safe="") + "@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}/{self.db}?prefix={quote(self.prefix, safe='')}"

    def client(self) -> "_redis.Redis":
        options: dict = dict(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.connect_timeout,
            socket_keepalive=True,
            # One immediate retry on a broken connection: after Redis restarts,
            # pooled sockets are dead and the retry reconnects. Timeouts are not
            # retried, so a Redis that hangs fails within `timeout`.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1, supported_errors=(_redis.ConnectionError,)),
            health_check_interval=30,
            max_connections=self.max_connections,
            decode_responses=True,
        )
        if self.tls:
            options.update(
                ssl=True,
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_check_hostname and self.ssl_cert_reqs != "none",
            )
        return _redis.Redis(**options)


# -- scripts ---------------------------------------------------------------------

# KEYS: run, runs. ARGV: run_id, config, state, create_time, stamp.
# {1} when created, else {0, config, state, create_time} of the existing run.
_CREATE = """
local cur = redis.call('HMGET', KEYS[1], 'config', 'state', 'create_time')
if cur[1] then return {0, cur[1], cur[2], cur[3]} end
redis.call('HSET', KEYS[1], 'config', ARGV[2], 'state', ARGV[3], 'create_time', ARGV[4], 'stamp', ARGV[5])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return {1}
"""

# KEYS: run, req, reqv, hist. ARGV: stamp read, new stamp, request id, new
# state, new version, retention, ttl, claim (milliseconds, 0 for none),
# '1' when the version rises (the state joins the history), else '0'.
#   {'missing'}            the run is gone
#   {'applied', state}     this very write is already in (a retried command)
#   {'replayed', state}    the request id was applied before: nothing changes
#   {'conflict', stamp, config, state, held}
#                          another write came first (or another writer holds
#                          the turn: held = 1): here is the run now
#   {'ok'}                 written
# Fairness: a writer that keeps losing asks for the next turn (claim > 0).
# Its new stamp is recorded as the run's claimant for that many milliseconds,
# and every other writer is refused meanwhile, so the loser's next attempt
# wins. A claim lapses by itself if its writer goes away.
_UPDATE = """
local cur = redis.call('HMGET', KEYS[1], 'stamp', 'state', 'config', 'claimant', 'claim_until')
if not cur[1] then return {'missing'} end
if cur[1] == ARGV[2] then return {'applied', cur[2]} end
local rid = ARGV[3]
if rid ~= '' then
  local seen = redis.call('HGET', KEYS[2], rid)
  if seen then return {'replayed', seen} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = cur[4] and cur[4] ~= ARGV[2] and tonumber(cur[5]) > now
if cur[1] ~= ARGV[1] or held then
  local claim = tonumber(ARGV[8])
  if claim > 0 and not held then
    redis.call('HSET', KEYS[1], 'claimant', ARGV[2], 'claim_until', now + claim)
  end
  return {'conflict', cur[1], cur[3], cur[2], held and 1 or 0}
end
if cur[4] then redis.call('HDEL', KEYS[1], 'claimant', 'claim_until') end
redis.call('HSET', KEYS[1], 'stamp', ARGV[2], 'state', ARGV[4])
if ARGV[9] == '1' then
  local version = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[4], version, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', version - tonumber(ARGV[6]))
end
if rid ~= '' then
  local version = tonumber(ARGV[5])
  redis.call('HSET', KEYS[2], rid, ARGV[4])
  redis.call('ZADD', KEYS[3], version, rid)
  local floor = version - tonumber(ARGV[6])
  while true do
    local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', floor, 'LIMIT', 0, 500)
    if #old == 0 then break end
    redis.call('HDEL', KEYS[2], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
  local ttl = tonumber(ARGV[7])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[2], ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
  end
end
return {'ok'}
"""

# KEYS: run, req, reqv, hist, runs. ARGV: run_id. 1 when deleted, 0 when missing.
_DELETE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
"""
# KEYS: run, hist. ARGV: version, limit. nil when the run is missing, else
# the states with a version above ARGV[1], ascending, at most ARGV[2].
_HISTORY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
"""

# KEYS: the run's v1 keys (run, req, reqv, hist), the v1 index, its v2 keys
# (same order), the v2 index. ARGV: run_id. 1 when moved; 0 when the v1 run
# is gone or a v2 run of that id exists (its v1 keys are then left as they are).
_MIGRATE_V1 = """
local moved = 0
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('EXISTS', KEYS[6]) == 0 then
  for i = 1, 4 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i + 5]) end
  end
  redis.call('ZADD', KEYS[10], 0, ARGV[1])
  moved = 1
end
redis.call('ZREM', KEYS[5], ARGV[1])
return moved
"""


@dataclass(frozen=True)
class _Snapshot:
    """A run as of one write: the stamp that write left, config and state."""

    stamp: str
    config: WeightingConfig
    state: ControllerState


class _Snapshots:
    """The last snapshot this process saw of its most recently updated runs
    (least recently used dropped first). Only ever the starting point of a
    compare-and-set, never an answer: reads go to Redis."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, _Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: str) -> _Snapshot | None:
        with self._lock:
            snap = self._items.get(run_id)
            if snap is not None:
                self._items.move_to_end(run_id)
            return snap

    def put(self, run_id: str, snap: _Snapshot) -> None:
        with self._lock:
            self._items[run_id] = snap
            self._items.move_to_end(run_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, run_id: str) -> None:
        with self._lock:
            self._items.pop(run_id, None)


class RedisStore(RunStore):
    """Runs in Redis; any number of replicas may share one prefix."""

    # An optimistic write that loses to another writer is retried at once
    # from the run as it is now; after CLAIM_AFTER losses in a row it asks for
    # the next turn (held for CLAIM_MS). Past CONTENTION_LIMIT_S seconds of
    # losing the call gives up with StoreUnavailable.
    CLAIM_AFTER = 3
    CLAIM_MS = 250
    CONTENTION_LIMIT_S = 30.0

    def __init__(self, settings: RedisSettings, *, client: "_redis.Redis | None" = None) -> None:
        self.settings = settings
        self.retention = settings.retention
        self.request_id_ttl = settings.request_id_ttl
        # What the server's start-up log names as the store (no password).
        self.path = settings.address
        self._redis = client if client is not None else settings.client()
        self._create = self._redis.register_script(_CREATE)
        self._update = self._redis.register_script(_UPDATE)
        self._delete = self._redis.register_script(_DELETE)
        self._history = self._redis.register_script(_HISTORY)
        self._runs_key = f"{settings.prefix}:{LAYOUT}:runs"
        # Updates of one run within this process take turns, so the replicas'
        # compare-and-set races are between processes, not threads.
        self._stripes = [threading.Lock() for _ in range(64)]
        self._snapshots = _Snapshots(4096)
        self._pinged = False

    @classmethod
    def from_url(cls, url: str) -> "RedisStore":
        return cls(RedisSettings.from_url(url))

    def __repr__(self) -> str:
        return f"RedisStore({self.path!r})"

    # -- keys and helpers ------------------------------------------------------------

    def _keys(self, run_id: str) -> tuple[str, str, str, str]:
        """run, req, reqv, hist (the order of _UPDATE's and _DELETE's KEYS)."""
        base, encoded = f"{self.settings.prefix}:{LAYOUT}", _encode_id(run_id)
        return f"{base}:run:{encoded}", f"{base}:req:{encoded}", f"{base}:reqv:{encoded}", f"{base}:hist:{encoded}"

    def _stripe(self, run_id: str) -> threading.Lock:
        return self._stripes[zlib.crc32(run_id.encode()) % len(self._stripes)]

    @contextmanager
    def _reachable(self, what: str) -> Iterator[None]:
        """Turn 'Redis cannot serve this now' into StoreUnavailable."""
        try:
            yield
        except _redis.AuthenticationError as error:
            raise StoreUnavailable(f"Redis at {self.path} refused the credentials ({what}): {error}") from error
        except (_redis.ConnectionError, _redis.TimeoutError) as error:
            raise StoreUnavailable(f"Redis at {self.path} unreachable ({what}): {error}") from error
        except (_redis.exceptions.ReadOnlyError, _redis.exceptions.OutOfMemoryError) as error:
            raise StoreUnavailable(f"Redis at {self.path} cannot take writes ({what}): {error}") from error
        except _redis.ResponseError as error:
            if str(error).split(" ", 1)[0].upper() in _UNAVAILABLE_REPLIES:
                raise StoreUnavailable(f"Redis at {self.path} unavailable ({what}): {error}") from error
            raise

    @staticmethod
    def _record(run_id: str, config: str, state: str, create_time: str) -> RunRecord:
        return RunRecord(run_id=run_id, config=_config(config), state=_state(state), create_time=float(create_time))

    # -- RunStore ----------------------------------------------------------------------

    def create_run(
        self, run_id: str, config: WeightingConfig, now: float, initial_state: ControllerState | None = None
    ) -> tuple[RunRecord, bool]:
        state = initial_state if initial_state is not None else ControllerState.initial(config, now)
        record = RunRecord(run_id, config, state, now)
        run_key = self._keys(run_id)[0]
        stamp = uuid.uuid4().hex
        with self._reachable("create run"):
            reply = self._create(
                keys=[run_key, self._runs_key],
                args=[run_id, _dump(config), _dump(record.state), repr(float(now)), stamp],
            )
        if reply[0] == 1:
            self._snapshots.put(run_id, _Snapshot(stamp, config, record.state))
            return record, True
        existing = self._record(run_id, *reply[1:4])
        if existing.config != config:
            raise RunConflict(run_id, existing.config, config)
        return existing, False

    def get_run(self, run_id: str) -> RunRecord:
        with self._reachable("get run"):
            fields = self._redis.hmget(self._keys(run_id)[0], "config", "state", "create_time")
        # Text, as the client decodes replies (redis-py's types say bytes | str); None where missing.
        config, state, create_time = cast("list[str | None]", fields)
        if config is None or state is None or create_time is None:
            raise RunNotFound(run_id)
        return self._record(run_id, config, state, create_time)

    def _scan_matching(
        self, patterns: RunPatterns, after: str | None, low: str, high: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        if after is not None and after >= low:
            start = "(" + after
        else:
            start = "[" + low if low else "-"
        stop = "+" if high is None else "(" + high
        with self._reachable("list runs"):
            ids = cast("list[str]", self._redis.zrangebylex(self._runs_key, start, stop, start=0, num=limit))  # decoded
        resume = ids[-1] if len(ids) == limit else None
        return (ids if patterns.prefixes_decide else [i for i in ids if patterns.matches(i)]), resume

    def _fetch_many(self, run_ids: Sequence[str]) -> list[RunRecord]:
        if not run_ids:
            return []
        with self._reachable("list runs"):
            pipe = self._redis.pipeline(transaction=False)  # each run's fields are read at one instant
            for run_id in run_ids:
                pipe.hmget(self._keys(run_id)[0], "config", "state", "create_time")
            replies = pipe.execute()
        return [self._record(run_id, *fields) for run_id, fields in zip(run_ids, replies) if fields[0] is not None]

    def delete_run(self, run_id: str) -> None:
        with self._reachable("delete run"):
            deleted = self._delete(keys=[*self._keys(run_id), self._runs_key], args=[run_id])
        self._snapshots.drop(run_id)
        if not deleted:
            raise RunNotFound(run_id)

    def update_controller(
        self, run_id: str, request_id: str, expected_version: int | None, step: ControllerStep
    ) -> UpdateOutcome:
        keys = self._keys(run_id)
        stamp = uuid.uuid4().hex  # this call's write, recognisable if a command is retried
        with self._stripe(run_id):
            # Start from the run as this process last wrote or saw it: the
            # compare-and-set rejects it if anyone wrote since, and its
            # rejection carries the run as it is now. So one round trip when
            # this replica is the run's only writer, one more per conflict.
            snap = self._snapshots.get(run_id)
            fresh = False
            deadline = time.monotonic() + self.CONTENTION_LIMIT_S
            losses = 0  # writes refused because another write came first
            while True:
                if snap is None or (
                    expected_version is not None and expected_version != snap.state.version and not fresh
                ):
                    # Read the run and the request id; a replay wins over a stale expected_version.
                    replayed, snap = self._read_for_update(run_id, keys, request_id)
                    if replayed is not None:
                        return UpdateOutcome(replayed, replayed=True)
                    fresh = True
                if expected_version is not None and expected_version != snap.state.version:
                    raise VersionMismatch(run_id, expected_version, snap.state.version)
                new_state = step(snap.config, snap.state)
                with self._reachable("update controller"):
                    reply = self._update(
                        keys=list(keys),
                        args=[snap.stamp, stamp, request_id, _dump(new_state), new_state.version, self.retention,
                              self.request_id_ttl, self.CLAIM_MS if losses >= self.CLAIM_AFTER else 0,
                              "1" if new_state.version > snap.state.version else "0"],
                    )
                outcome = reply[0]
                if outcome == "ok":
                    self._snapshots.put(run_id, _Snapshot(stamp, snap.config, new_state))
                    return UpdateOutcome(new_state, replayed=False)
                if outcome == "applied":
                    state = _state(reply[1])
                    self._snapshots.put(run_id, _Snapshot(stamp, snap.config, state))
                    return UpdateOutcome(state, replayed=False)
                if outcome == "replayed":
                    return UpdateOutcome(_state(reply[1]), replayed=True)
                if outcome == "missing":
                    self._snapshots.drop(run_id)
                    raise RunNotFound(run_id)
                # 'conflict': another writer came first; go again from the run as it is now.
                snap = _Snapshot(reply[1], _config(reply[2]), _state(reply[3]))
                fresh = True
                self._snapshots.put(run_id, snap)
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"run {run_id!r}: too many concurrent writers, try again")
                if reply[4] == 1:  # another writer holds the turn: let it write first
                    time.sleep(random.uniform(0.0002, 0.001))
                else:
                    losses += 1

    def _read_for_update(
        self, run_id: str, keys: tuple[str, ...], request_id: str
    ) -> tuple[ControllerState | None, "_Snapshot"]:
        with self._reachable("update controller"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(keys[0], "stamp", "config", "state")
            if request_id:
                pipe.hget(keys[1], request_id)
            replies = pipe.execute()
        stamp, config, state = replies[0]
        if stamp is None:
            self._snapshots.drop(run_id)
            raise RunNotFound(run_id)
        snap = _Snapshot(stamp, _config(config), _state(state))
        self._snapshots.put(run_id, snap)
        replayed = _state(replies[1]) if request_id and replies[1] is not None else None
        return replayed, snap

    def states_since(self, run_id: str, version: int, limit: int) -> list[ControllerState]:
        run_key, _, _, hist_key = self._keys(run_id)
        if limit <= 0:
            limit = 0
        with self._reachable("read state history"):
            # One script: the run and its history at one instant (and no MULTI for the ACL to allow).
            states = self._history(keys=[run_key, hist_key], args=[int(version), limit])
        if states is None:
            raise RunNotFound(run_id)
        return [_state(text) for text in states][:limit]

    def ping(self) -> None:
        """Check Redis answers. The first call waits up to `startup_wait`
        seconds for it (Redis starting beside the server), then raises
        StoreUnavailable; a wrong password fails at once."""
        if self._pinged:
            with self._reachable("ping"):
                self._redis.ping()
            return
        deadline = time.monotonic() + self.settings.startup_wait
        while True:
            try:
                with self._reachable("ping"):
                    self._redis.ping()
                    self._redis.exists(self._runs_key)  # the user may use the prefix's keys
                break
            except StoreUnavailable as error:
                if isinstance(error.__cause__, _redis.AuthenticationError) or time.monotonic() >= deadline:
                    raise
                log.warning("waiting for Redis at %s: %s", self.path, error.__cause__)
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._pinged = True
        self._warn_if_not_durable()
        self._warn_if_v1_runs_left()

    def _v1_index(self) -> str:
        return f"{self.settings.prefix}:runs"

    def _warn_if_v1_runs_left(self) -> None:
        try:
            left = self._redis.zcard(self._v1_index())
        except _redis.RedisError:  # not a sorted set: not ours
            return
        if left:
            log.warning(
                "Redis at %s holds %d runs in the old key layout, which this server does not read; move them with "
                "python -m maxent_server.store.redis migrate-v1 URL (see docs/redis.md)", self.path, left,
            )

    def migrate_v1(self, batch: int = 500) -> tuple[int, int]:
        """Move the runs of the version-1 key layout under this prefix to
        version 2, each in one script; (moved, skipped). Stop servers of the
        old version first: a run moves from under them."""
        script = self._redis.register_script(_MIGRATE_V1)
        p, old_index = self.settings.prefix, self._v1_index()
        moved = skipped = 0
        while True:
            with self._reachable("migrate"):
                ids = cast("list[str]", self._redis.zrange(old_index, 0, batch - 1))  # decoded replies
            if not ids:
                return moved, skipped
            for run_id in ids:
                old = [f"{p}:{kind}:{run_id}" for kind in ("run", "req", "reqv", "hist")]
                with self._reachable("migrate"):
                    done = script(keys=[*old, old_index, *self._keys(run_id), self._runs_key], args=[run_id])
                moved, skipped = moved + done, skipped + (1 - done)

    def _warn_if_not_durable(self) -> None:
        try:
            appendonly = self._redis.config_get("appendonly").get("appendonly")
        except _redis.RedisError:  # CONFIG may be disabled (managed Redis, ACLs)
            return
        if appendonly != "yes":
            log.warning(
                "Redis at %s runs without appendonly: acknowledged controller updates may be lost if Redis "
                "restarts (see docs/redis.md)", self.path,
            )

    def close(self) -> None:
        self._redis.close()
        self._redis.connection_pool.disconnect()


def _encode_id(run_id: str) -> str:
    """The run id in keys: percent-encoded, so it holds no ':' (and no '%'
    but as an escape); distinct ids give distinct texts."""
    return quote(run_id, safe="/")


def store_from_url(url: str, **overrides) -> RedisStore:
    """A RedisStore for `url`, with settings fields overridden (tests)."""
    return RedisStore(replace(RedisSettings.from_url(url), **overrides))


__all__ = ["LAYOUT", "RedisSettings", "RedisStore", "redact_url", "store_from_url"]


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m maxent_server.store.redis", description="Redis store tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate-v1", help="move runs of the old key layout to the current one")
    migrate.add_argument("url", help="the --state-store URL (the password may come from MAXENT_REDIS_PASSWORD)")
    args = parser.parse_args(argv)
    try:
        store = RedisStore.from_url(args.url)
    except ValueError as error:
        parser.error(str(error))
    try:
        moved, skipped = store.migrate_v1()
    except StoreUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"moved {moved} runs to the {LAYOUT} layout under prefix {store.settings.prefix!r}"
          + (f"; {skipped} left in the old layout (a run of the same id exists in the new one)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

