"""The RunStore contract, one suite run against every backend: SQLite (a temp
file) and Redis (a real redis-server on a loopback port, a fresh key prefix
per test). Atomicity, idempotency, retention, reopening, paging, and listing
by run-id pattern. What only one backend has (Redis keys, outages, TLS; the
SQLite reader connections) is at the end or in test_redis_store.py."""

from __future__ import annotations

import fnmatch
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from maxent_server.auth import Principal, Role
from maxent_server.domain import ControllerState, WeightingConfig
from maxent_server.store import (
    REQUEST_ID_RETENTION,
    RunConflict,
    RunNotFound,
    RunPatterns,
    SqliteStore,
    VersionMismatch,
    open_store,
)
from redis_process import REDIS_SERVER, SKIP_REASON, RedisProcess

BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON))]


def bump(config: WeightingConfig, state: ControllerState) -> ControllerState:
    return replace(state, version=state.version + 1, beta=state.beta + 1.0)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class Backend:
    """Opens stores of one backend that all see the same runs (replicas)."""

    def __init__(self, kind: str, request, tmp_path) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.url = f"sqlite:///{tmp_path / 'state.sqlite3'}"
        else:
            server = request.getfixturevalue("redis_server")
            prefix = f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
            self.url = server.url(prefix=prefix, timeout=2, startup_wait=0)
        self.opened: list = []

    def open(self, retention: int | None = None):
        if retention is None:
            s = open_store(self.url, "")
        elif self.kind == "sqlite":
            s = SqliteStore(self.url[len("sqlite://") :], retention=retention)
        else:
            from maxent_server.store.redis import store_from_url

            s = store_from_url(self.url, retention=retention)
        s.ping()
        self.opened.append(s)
        return s

    def close_all(self) -> None:
        for s in self.opened:
            s.close()


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    b = Backend(request.param, request, tmp_path)
    yield b
    b.close_all()


@pytest.fixture()
def store(backend):
    return backend.open(retention=5)


def ids_of(records) -> list[str]:
    return [r.run_id for r in records]


# -- create, get, delete ------------------------------------------------------------


def test_open_store_opens_the_backend_named(backend):
    s = backend.open()
    assert type(s).__name__ == {"sqlite": "SqliteStore", "redis": "RedisStore"}[backend.kind]


def test_create_is_idempotent_for_the_same_config(store):
    record, created = store.create_run("a", WeightingConfig(tau=1.0), now=1.5)
    again, created_again = store.create_run("a", WeightingConfig(tau=1.0), now=2.0)
    assert created and not created_again and again == record
    assert store.get_run("a") == record and record.create_time == 1.5
    with pytest.raises(RunConflict):
        store.create_run("a", WeightingConfig(tau=2.0), now=3.0)


def test_config_and_state_round_trip_exactly(store):
    config = WeightingConfig(tau=0.1 + 0.2, beta=1e-300, target_entropy_start=1.0, target_entropy_final=0.25,
                       target_entropy_horizon=7, tau_max=0.0, meta_enabled=True)
    store.create_run("exact", config, now=1234567890.123456)

    def weird(config, state):
        return replace(state, version=state.version + 1, tau=float("inf"), entropy_ema=1 / 3)

    store.update_controller("exact", "r", None, weird)
    got = store.get_run("exact")
    assert got.config == config and got.create_time == 1234567890.123456
    assert got.state.tau == float("inf") and got.state.entropy_ema == 1 / 3


def test_get_and_delete_unknown_runs(store):
    with pytest.raises(RunNotFound):
        store.get_run("nope")
    with pytest.raises(RunNotFound):
        store.delete_run("nope")
    with pytest.raises(RunNotFound):
        store.update_controller("nope", "r", None, bump)
    with pytest.raises(RunNotFound):
        store.states_since("nope", 0, 10)


def test_delete_frees_the_id(store):
    store.create_run("a", WeightingConfig(), now=1.0)
    store.create_run("keep", WeightingConfig(), now=1.0)
    store.update_controller("a", "r1", None, bump)
    store.delete_run("a")
    assert ids_of(store.list_runs(None, 10)) == ["keep"]
    with pytest.raises(RunNotFound):
        store.get_run("a")
    # The id is free again, with a fresh controller and no request ids.
    store.create_run("a", WeightingConfig(tau=2.0), now=2.0)
    assert not store.update_controller("a", "r1", None, bump).replayed
    assert store.get_run("a").state.version == 1


def test_state_survives_reopening(backend):
    s = backend.open()
    s.create_run("b", WeightingConfig(tau=0.5, target_entropy=1.0), now=1.0)
    s.update_controller("b", "r", None, bump)
    s.close()
    reopened = backend.open()
    assert reopened.get_run("b").state.version == 1
    assert reopened.get_run("b").config == WeightingConfig(tau=0.5, target_entropy=1.0)
    assert reopened.update_controller("b", "r", None, bump).replayed
    reopened.delete_run("b")
    with pytest.raises(RunNotFound):
        reopened.get_run("b")


# -- controller updates --------------------------------------------------------------


def test_replay_returns_the_first_result(store):
    store.create_run("a", WeightingConfig(tau=1.0), now=1.0)
    first = store.update_controller("a", "req-1", None, bump)
    second = store.update_controller("a", "req-1", None, bump)
    assert not first.replayed and second.replayed and second.state == first.state
    assert store.get_run("a").state.version == 1


def test_replay_is_checked_before_expected_version(store):
    store.create_run("a", WeightingConfig(), now=1.0)
    first = store.update_controller("a", "req-1", 0, bump)
    store.update_controller("a", "req-2", 1, bump)
    again = store.update_controller("a", "req-1", 0, bump)  # stale expected_version, but a replay
    assert again.replayed and again.state == first.state


def test_expected_version_and_failed_step_change_nothing(store):
    store.create_run("a", WeightingConfig(tau=1.0), now=1.0)
    with pytest.raises(VersionMismatch) as info:
        store.update_controller("a", "x", 3, bump)
    assert (info.value.expected, info.value.actual) == (3, 0)

    def broken(config, state):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update_controller("a", "y", None, broken)
    assert store.get_run("a").state.version == 0
    assert not store.update_controller("a", "y", None, bump).replayed  # "y" was not recorded
    assert store.update_controller("a", "z", 1, bump).state.version == 2


def test_updates_without_request_id_all_apply(store):
    store.create_run("a", WeightingConfig(), now=1.0)
    for _ in range(3):
        assert not store.update_controller("a", "", None, bump).replayed
    assert store.get_run("a").state.version == 3


def test_request_ids_are_kept_for_the_retention_window(store):
    store.create_run("a", WeightingConfig(tau=1.0), now=1.0)
    for i in range(8):
        store.update_controller("a", f"r{i}", None, bump)
    assert store.update_controller("a", "r7", None, bump).replayed
    assert store.update_controller("a", "r3", None, bump).replayed  # within the last 5
    assert not store.update_controller("a", "r0", None, bump).replayed  # forgotten


def test_default_retention_is_at_least_ten_thousand(backend):
    assert backend.open().retention >= REQUEST_ID_RETENTION >= 10_000


def test_concurrent_updates_count_exactly(store):
    store.create_run("a", WeightingConfig(tau=1.0), now=1.0)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: store.update_controller("a", f"req-{i}", None, bump), range(200)))
    state = store.get_run("a").state
    assert state.version == 200 and state.beta == 200.0
    assert sorted(o.state.version for o in outcomes) == list(range(1, 201))


def test_concurrent_updates_from_several_store_objects_count_exactly(backend):
    replicas = [backend.open() for _ in range(3)]
    replicas[0].create_run("a", WeightingConfig(tau=1.0), now=1.0)
    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(lambda i: replicas[i % 3].update_controller("a", f"req-{i}", None, bump),
                                 range(300)))
    state = replicas[1].get_run("a").state
    assert state.version == 300 and state.beta == 300.0
    # Every accepted update saw a distinct predecessor: versions 1..300 once each.
    assert sorted(o.state.version for o in outcomes) == list(range(1, 301))
    assert all(o.state.beta == o.state.version for o in outcomes)


def test_reads_from_other_threads_see_every_commit(store):
    store.create_run("c", WeightingConfig(tau=1.0), now=1.0)
    with ThreadPoolExecutor(4) as readers:
        for i in range(1, 30):
            store.update_controller("c", f"req-{i}", None, bump)
            versions = list(readers.map(lambda _: store.get_run("c").state.version, range(8)))
            assert versions == [i] * 8
        store.delete_run("c")
        with pytest.raises(RunNotFound):
            readers.submit(store.get_run, "c").result()


def test_states_since_reads_the_history_in_order(store):
    store.create_run("h", WeightingConfig(), now=1.0)
    for i in range(8):
        store.update_controller("h", f"r{i}", None, bump)
    assert [s.version for s in store.states_since("h", 0, 100)] == [4, 5, 6, 7, 8]  # the last 5 are kept
    assert [s.version for s in store.states_since("h", 5, 2)] == [6, 7]
    assert store.states_since("h", 8, 10) == [] and store.states_since("h", 0, 0) == []


# -- listing ---------------------------------------------------------------------------


def test_list_runs_is_ordered_and_pages(store):
    ids = ["b", "a/2", "a", "c:1", "B", "a-1", "z" * 128]
    for run_id in ids:
        store.create_run(run_id, WeightingConfig(), now=1.0)
    assert ids_of(store.list_runs(None, 100)) == sorted(ids)
    pages, after = [], None
    while True:
        page = store.list_runs(after, 2)
        if not page:
            break
        pages.append(ids_of(page))
        after = page[-1].run_id
    assert [i for p in pages for i in p] == sorted(ids) and all(len(p) <= 2 for p in pages)
    assert store.list_runs("b", 10)[0].run_id == "c:1"
    assert store.list_runs(None, 0) == []


def test_list_matching_reads_by_prefix(store):
    ids = ["team-a/1", "team-a/2", "team-aa/1", "team-b/1", "x-eval", "team-a/x-eval", "zz"]
    for run_id in ids:
        store.create_run(run_id, WeightingConfig(tau=0.5), now=1.0)
    assert ids_of(store.list_matching(RunPatterns(["team-a/*"]), None, 10)) == ["team-a/1", "team-a/2",
                                                                              "team-a/x-eval"]
    assert ids_of(store.list_matching(RunPatterns(["*-eval", "zz"]), None, 10)) == ["team-a/x-eval", "x-eval", "zz"]
    assert ids_of(store.list_matching(RunPatterns(["team-?/1"]), "team-a/1", 10)) == ["team-b/1"]
    assert ids_of(store.list_matching(RunPatterns(["nothing*"]), None, 10)) == []
    got = store.list_matching(RunPatterns(["team-b/1"]), None, 10)
    assert got == [store.get_run("team-b/1")]


def test_listing_resumes_across_scan_steps(store):
    """More ids than one listing step reads (256 at first): the matches
    scattered among them all come back, in order, at any page size."""
    ids = [f"r/{i:04d}" + ("-eval" if i % 290 == 5 else "") for i in range(600)]
    for run_id in ids:
        store.create_run(run_id, WeightingConfig(), now=1.0)
    for patterns in (["*-eval"], ["r/0*-eval", "r/05?5*"], ["r/*"], ["r/05[!0]?"]):
        principal = Principal("p", Role.READ, tuple(patterns))
        wanted = [i for i in ids if principal.may_access(i)]
        matcher = RunPatterns(patterns)
        for page in (1, 4, 1000):
            got, cursor = [], None
            while True:
                records = store.list_matching(matcher, cursor, page)
                got += ids_of(records)
                if len(records) < page:  # a short page is the last one
                    break
                cursor = got[-1]
            assert got == wanted, (patterns, page)


# Ids and patterns over an alphabet with the pattern characters, ':' (the
# Redis key separator), a non-ASCII letter and the highest code point.
_ALPHABET = "ab:*?[]!/-é\U0010ffff"
_ids = st.lists(st.text(_ALPHABET, min_size=1, max_size=6), max_size=25, unique=True)
# Pattern pieces: literal characters and every wildcard form, so that sets,
# negated sets and unclosed brackets all occur.
_piece = st.sampled_from(list(_ALPHABET) + ["*", "?", "[ab]", "[!a]", "[a-é]", "[]a]", "[:*]", "["])


@st.composite
def _pattern_for(draw, ids: list[str]) -> str:
    """A random pattern, or one of the ids with some characters made wild."""
    if not ids or draw(st.integers(0, 3)) == 0:
        return "".join(draw(st.lists(_piece, max_size=5)))
    chars = list(draw(st.sampled_from(ids)))
    for i in draw(st.lists(st.integers(0, len(chars) - 1), min_size=1, max_size=3)):
        chars[i] = draw(st.sampled_from(["?", f"[{chars[i]}b]", f"[!{chars[i]}]", "*"]))
    return "".join(chars[: draw(st.integers(1, len(chars)))]) + draw(st.sampled_from(["", "*"]))


def _reset(store) -> None:
    for record in store.list_runs(None, 10_000):
        store.delete_run(record.run_id)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), ids=_ids, page=st.integers(1, 6), after=st.none() | st.text(_ALPHABET, max_size=4))
def test_listing_equals_a_plain_filter_of_every_id(store, data, ids, page, after):
    """The listing returns what auth's rule lets through, in id order; its
    pages, each resumed after the last id of the one before and full but for
    the last, add up to the whole list with no id repeated or skipped."""
    patterns = data.draw(st.lists(_pattern_for(ids), min_size=1, max_size=3), label="patterns")
    _reset(store)
    for run_id in ids:
        store.create_run(run_id, WeightingConfig(), now=1.0)
    principal = Principal("p", Role.READ, tuple(patterns))
    wanted = sorted(i for i in ids if principal.may_access(i) and (after is None or i > after))
    assert wanted == sorted(i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)
                            and (after is None or i > after))
    matcher = RunPatterns(patterns)
    assert [i for i in sorted(ids) if matcher.matches(i)] == [i for i in sorted(ids) if principal.may_access(i)]
    assert ids_of(store.list_matching(matcher, after, 100)) == wanted
    pages, cursor = [], after
    while True:
        got = ids_of(store.list_matching(matcher, cursor, page))
        assert len(got) <= page
        pages.append(got)
        if len(got) < page:  # a short page is the last one
            break
        cursor = got[-1]
    assert [i for p in pages for i in p] == wanted


# -- SQLite only -------------------------------------------------------------------------


def test_sqlite_reads_never_wait_for_the_writer(tmp_path):
    """Reads (and listings) go through each thread's own connection: with
    the writer's lock held they still answer."""
    s = SqliteStore(tmp_path / "state.sqlite3")
    try:
        assert s.local_reads
        s.create_run("team-a/1", WeightingConfig(), now=1.0)
        with s._lock, ThreadPoolExecutor(1) as reader:
            assert reader.submit(s.get_run, "team-a/1").result(timeout=30).run_id == "team-a/1"
            assert ids_of(reader.submit(s.list_runs, None, 10).result(timeout=30)) == ["team-a/1"]
            listed = reader.submit(s.list_matching, RunPatterns(["team-a/*"]), None, 10).result(timeout=30)
            assert ids_of(listed) == ["team-a/1"]
    finally:
        s.close()


def test_sqlite_close_closes_the_reader_connections(tmp_path):
    s = SqliteStore(tmp_path / "state.sqlite3")
    s.create_run("d", WeightingConfig(), now=1.0)
    with ThreadPoolExecutor(2) as readers:
        assert list(readers.map(lambda _: s.get_run("d").run_id, range(4))) == ["d"] * 4
    s.get_run("d")
    s.close()
    with pytest.raises(sqlite3.ProgrammingError):
        s.get_run("d")
