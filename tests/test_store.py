"""The SQLite store on its own: atomicity, idempotency, retention, reopening."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from maxent_server.domain import ControllerState, RunConfig
from maxent_server.store import RunConflict, RunNotFound, SqliteStore, VersionMismatch


def bump(config: RunConfig, state: ControllerState) -> ControllerState:
    return replace(state, version=state.version + 1, beta=state.beta + 1.0)


@pytest.fixture()
def store(tmp_path):
    s = SqliteStore(tmp_path / "state.sqlite3", retention=5)
    yield s
    s.close()


def test_create_is_idempotent_for_the_same_config(store):
    record, created = store.create_run("a", RunConfig(tau=1.0), now=1.0)
    again, created_again = store.create_run("a", RunConfig(tau=1.0), now=2.0)
    assert created and not created_again and again == record
    with pytest.raises(RunConflict):
        store.create_run("a", RunConfig(tau=2.0), now=3.0)


def test_replay_returns_the_first_result(store):
    store.create_run("a", RunConfig(tau=1.0), now=1.0)
    first = store.update_controller("a", "req-1", None, bump)
    second = store.update_controller("a", "req-1", None, bump)
    assert second.replayed and second.state == first.state
    assert store.get_run("a").state.version == 1


def test_expected_version_and_failed_step_change_nothing(store):
    store.create_run("a", RunConfig(tau=1.0), now=1.0)
    with pytest.raises(VersionMismatch):
        store.update_controller("a", "x", 3, bump)

    def broken(config, state):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update_controller("a", "y", None, broken)
    assert store.get_run("a").state.version == 0
    assert not store.update_controller("a", "y", None, bump).replayed  # "y" was not recorded


def test_request_ids_are_kept_for_the_retention_window(store):
    store.create_run("a", RunConfig(tau=1.0), now=1.0)
    for i in range(8):
        store.update_controller("a", f"r{i}", None, bump)
    assert store.update_controller("a", "r7", None, bump).replayed
    assert store.update_controller("a", "r3", None, bump).replayed  # within the last 5
    assert not store.update_controller("a", "r0", None, bump).replayed  # forgotten


def test_concurrent_updates_count_exactly(store):
    store.create_run("a", RunConfig(tau=1.0), now=1.0)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.update_controller("a", f"req-{i}", None, bump), range(200)))
    state = store.get_run("a").state
    assert state.version == 200 and state.beta == 200.0


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "state.sqlite3"
    s = SqliteStore(path)
    s.create_run("b", RunConfig(tau=0.5, target_entropy=1.0), now=1.0)
    s.update_controller("b", "r", None, bump)
    s.close()
    reopened = SqliteStore(path)
    assert reopened.get_run("b").state.version == 1
    assert reopened.get_run("b").config == RunConfig(tau=0.5, target_entropy=1.0)
    reopened.delete_run("b")
    with pytest.raises(RunNotFound):
        reopened.get_run("b")
    reopened.close()


def test_reads_from_other_threads_see_every_commit(store):
    """get_run reads through a connection of each thread's own (local_reads):
    it must still see the last committed update at once."""
    assert store.local_reads
    store.create_run("c", RunConfig(tau=1.0), now=1.0)
    with ThreadPoolExecutor(4) as readers:
        for i in range(1, 30):
            store.update_controller("c", f"req-{i}", None, bump)
            versions = list(readers.map(lambda _: store.get_run("c").state.version, range(8)))
            assert versions == [i] * 8
        store.delete_run("c")
        with pytest.raises(RunNotFound):
            readers.submit(store.get_run, "c").result()


def test_close_closes_the_reader_connections(tmp_path):
    s = SqliteStore(tmp_path / "state.sqlite3")
    s.create_run("d", RunConfig(), now=1.0)
    with ThreadPoolExecutor(2) as readers:
        assert list(readers.map(lambda _: s.get_run("d").run_id, range(4))) == ["d"] * 4
    s.get_run("d")
    s.close()
    with pytest.raises(sqlite3.ProgrammingError):
        s.get_run("d")
