"""What only the Redis store has, against a real redis-server on a loopback
port (the RunStore contract both stores keep is test_store_contract.py): its
keys, several store objects racing on one run's compare-and-set, request-id
expiry, key prefixes that cannot reach each other, URLs, AUTH, ACLs, TLS, and
what happens while Redis is away."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import redis
from maxent_server.domain import ControllerState, WeightingConfig
from maxent_server.store import (
    RunNotFound,
    RunPatterns,
    StoreUnavailable,
    VersionMismatch,
    open_store,
)
from maxent_server.store.redis import RedisSettings, RedisStore, store_from_url
from redis_process import REDIS_SERVER, SKIP_REASON, RedisProcess, make_tls_files

# Only a missing redis-server binary skips; the redis package is a server dependency.
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

def bump(config: WeightingConfig, state: ControllerState) -> ControllerState:
    return replace(state, version=state.version + 1, beta=state.beta + 1.0)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def prefix(request):
    return f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def url(redis_server, prefix):
    return redis_server.url(prefix=prefix, timeout=2, startup_wait=0)


@pytest.fixture()
def store(url):
    s = store_from_url(url, retention=5)
    s.ping()
    yield s
    s.close()


@pytest.fixture()
def raw(redis_server):
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    yield client
    client.close()


# -- keys ------------------------------------------------------------------------------


def keys_of(store, run_id: str) -> dict[str, str]:
    return dict(zip(("run", "req", "reqv", "hist"), store._keys(run_id)))


def test_keys_name_the_prefix_layout_and_encoded_run_id(store, prefix):
    assert keys_of(store, "team-a/run:1%") == {
        "run": f"{prefix}:v2:run:team-a/run%3A1%25", "req": f"{prefix}:v2:req:team-a/run%3A1%25",
        "reqv": f"{prefix}:v2:reqv:team-a/run%3A1%25", "hist": f"{prefix}:v2:hist:team-a/run%3A1%25"}
    assert store._runs_key == f"{prefix}:v2:runs"


def test_request_ids_are_trimmed_to_the_retention_window(store, raw):
    store.create_run("a", WeightingConfig(tau=1.0), now=1.0)
    for i in range(8):
        store.update_controller("a", f"r{i}", None, bump)
    keys = keys_of(store, "a")
    assert raw.hlen(keys["req"]) == 5 and raw.zcard(keys["reqv"]) == 5 and raw.zcard(keys["hist"]) == 5


def test_request_id_memory_expires(url, raw):
    s = store_from_url(url, request_id_ttl=1)
    try:
        keys = keys_of(s, "a")
        s.create_run("a", WeightingConfig(), now=1.0)
        s.update_controller("a", "r1", None, bump)
        left = raw.pttl(keys["req"])
        assert left == -2 or 0 < left <= 1000  # -2: already gone on a slow machine
        deadline = time.monotonic() + 60
        while raw.exists(keys["req"], keys["reqv"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not raw.exists(keys["req"], keys["reqv"])
        assert not s.update_controller("a", "r1", None, bump).replayed  # forgotten after the expiry
        assert s.get_run("a").state.version == 2  # the run itself never expires
        assert raw.ttl(keys["run"]) == -1
    finally:
        s.close()


def test_delete_removes_every_key_of_the_run(store, raw, prefix):
    store.create_run("a", WeightingConfig(), now=1.0)
    store.create_run("keep", WeightingConfig(), now=1.0)
    store.update_controller("a", "r1", None, bump)
    store.delete_run("a")
    assert sorted(raw.keys(f"{prefix}:*")) == [keys_of(store, "keep")["run"], f"{prefix}:v2:runs"]


# -- several writers -----------------------------------------------------------------


def test_the_same_request_id_on_every_replica_at_once_applies_once(url):
    replicas = [store_from_url(url) for _ in range(4)]
    try:
        replicas[0].create_run("a", WeightingConfig(), now=1.0)
        for round_ in range(20):
            barrier = threading.Barrier(4)

            def send(s):
                barrier.wait()
                return s.update_controller("a", f"same-{round_}", None, bump)

            with ThreadPoolExecutor(4) as pool:
                outcomes = list(pool.map(send, replicas))
            assert sum(not o.replayed for o in outcomes) == 1
            assert len({o.state for o in outcomes}) == 1
        assert replicas[0].get_run("a").state.version == 20
    finally:
        for s in replicas:
            s.close()


def test_a_write_between_read_and_commit_is_not_lost(url):
    """The step runs between the read and the compare-and-set: another
    replica's write there makes this one start again from the new state."""
    mine, other = store_from_url(url), store_from_url(url)
    try:
        mine.create_run("a", WeightingConfig(), now=1.0)
        seen: list[int] = []

        def interfering(config, state):
            seen.append(state.version)
            if len(seen) == 1:
                other.update_controller("a", "other", None, bump)
            return bump(config, state)

        outcome = mine.update_controller("a", "mine", None, interfering)
        assert seen == [0, 1] and outcome.state.version == 2 and outcome.state.beta == 2.0
        assert mine.get_run("a").state.version == 2
    finally:
        mine.close()
        other.close()


def test_expected_version_is_checked_against_the_fresh_state_after_a_conflict(url):
    mine, other = store_from_url(url), store_from_url(url)
    try:
        mine.create_run("a", WeightingConfig(), now=1.0)

        def interfering(config, state):
            other.update_controller("a", "", None, bump)
            return bump(config, state)

        with pytest.raises(VersionMismatch):
            mine.update_controller("a", "mine", 0, interfering)
        assert mine.get_run("a").state.version == 1
    finally:
        mine.close()
        other.close()


def test_a_run_deleted_and_recreated_mid_update_gets_the_update_on_its_new_self(url):
    mine, other = store_from_url(url), store_from_url(url)
    try:
        mine.create_run("a", WeightingConfig(tau=1.0), now=1.0)
        mine.update_controller("a", "", None, bump)
        configs: list[WeightingConfig] = []

        def interfering(config, state):
            configs.append(config)
            if len(configs) == 1:
                other.delete_run("a")
                other.create_run("a", WeightingConfig(tau=2.0), now=2.0)
            return bump(config, state)

        outcome = mine.update_controller("a", "r", None, interfering)
        assert configs == [WeightingConfig(tau=1.0), WeightingConfig(tau=2.0)]
        assert outcome.state.version == 1 and mine.get_run("a").config == WeightingConfig(tau=2.0)

        def deleting(config, state):
            other.delete_run("a")
            return bump(config, state)

        with pytest.raises(RunNotFound):
            mine.update_controller("a", "r2", None, deleting)
    finally:
        mine.close()
        other.close()


def test_a_replica_never_answers_from_what_it_wrote_before(url, raw):
    mine, other = store_from_url(url), store_from_url(url)
    try:
        mine.create_run("a", WeightingConfig(), now=1.0)
        mine.update_controller("a", "m1", None, bump)
        for i in range(3):
            other.update_controller("a", f"o{i}", None, bump)
        assert mine.get_run("a").state.version == 4
        assert mine.update_controller("a", "m2", None, bump).state.version == 5
        with pytest.raises(VersionMismatch):
            mine.update_controller("a", "m3", 2, bump)
        # The run vanishing behind the replica's back (an operator, a lost
        # Redis) is NOT_FOUND, not a write on top of a remembered state.
        raw.delete(keys_of(mine, "a")["run"])
        with pytest.raises(RunNotFound):
            mine.update_controller("a", "m4", None, bump)
        with pytest.raises(RunNotFound):
            mine.get_run("a")
    finally:
        mine.close()
        other.close()


def test_a_turn_claimed_by_a_writer_that_went_away_lapses(store, raw):
    """A writer that keeps losing claims the next turn; if it never comes
    back, the claim runs out and the others go on."""
    store.create_run("a", WeightingConfig(), now=1.0)
    now_ms = int(raw.time()[0]) * 1000 + int(raw.time()[1]) // 1000
    run_key = keys_of(store, "a")["run"]
    raw.hset(run_key, mapping={"claimant": "ghost", "claim_until": now_ms + 300})
    assert store.update_controller("a", "after-ghost", None, bump).state.version == 1
    assert raw.hmget(run_key, "claimant", "claim_until") == [None, None]


# -- prefixes, AUTH, ACL, TLS ------------------------------------------------------------


def test_prefixes_keep_deployments_apart(redis_server, raw):
    a = store_from_url(redis_server.url(prefix="deploy-a"))
    b = store_from_url(redis_server.url(prefix="deploy-b"))
    try:
        a.create_run("shared-name", WeightingConfig(tau=1.0), now=1.0)
        b.create_run("shared-name", WeightingConfig(tau=2.0), now=1.0)  # no conflict: another deployment
        a.update_controller("shared-name", "r", None, bump)
        assert b.get_run("shared-name").state.version == 0
        assert not b.update_controller("shared-name", "r", None, bump).replayed
        assert [r.config.tau for r in a.list_runs(None, 10)] == [1.0]
        assert all(k.startswith(("deploy-a:", "deploy-b:")) for k in raw.keys("deploy-*"))
    finally:
        for s in (a, b):
            for r in s.list_runs(None, 10):
                s.delete_run(r.run_id)
            s.close()


def test_databases_are_apart(redis_server):
    zero, five = store_from_url(redis_server.url(0, prefix="db")), store_from_url(redis_server.url(5, prefix="db"))
    try:
        zero.create_run("x", WeightingConfig(), now=1.0)
        with pytest.raises(RunNotFound):
            five.get_run("x")
        zero.delete_run("x")
    finally:
        zero.close()
        five.close()


@pytest.mark.parametrize("outer, inner, run_id, inner_id", [
    ("team", "team:run:evil", "evil:run:victim", "victim"),  # v1: both were team:run:evil:run:victim
    ("team", "team:run", "runs", "x"),  # v1: team:run:runs was a run of one and the index of the other
    ("p", "p:v2:run", "a:v2:run:b", "b"),
    ("p", "p:v2", "runs", "runs"),
])
def test_no_prefix_reaches_another_prefixes_runs(redis_server, raw, outer, inner, run_id, inner_id):
    tag = uuid.uuid4().hex[:6]
    a = store_from_url(redis_server.url(prefix=f"{tag}{outer}"))
    b = store_from_url(redis_server.url(prefix=f"{tag}{inner}"))
    try:
        a.create_run(run_id, WeightingConfig(tau=1.0), now=1.0)
        a.update_controller(run_id, "r", None, bump)
        assert b.list_runs(None, 10) == []
        with pytest.raises(RunNotFound):
            b.get_run(inner_id)
        with pytest.raises(RunNotFound):
            b.update_controller(inner_id, "r", None, bump)
        b.create_run(inner_id, WeightingConfig(tau=2.0), now=2.0)  # its own run, no conflict, no WRONGTYPE
        assert not b.update_controller(inner_id, "r", None, bump).replayed
        assert [r.run_id for r in b.list_runs(None, 10)] == [inner_id]
        assert [r.run_id for r in a.list_runs(None, 10)] == [run_id]
        assert a.get_run(run_id).config.tau == 1.0 and a.get_run(run_id).state.version == 1
        b.delete_run(inner_id)
        assert a.get_run(run_id).state.version == 1
    finally:
        for s in (a, b):
            for r in s.list_runs(None, 10):
                s.delete_run(r.run_id)
            s.close()


def test_runs_of_the_v1_layout_are_moved_by_migrate_v1(redis_server, raw, prefix, caplog):
    """Version 1 keys (P:runs, P:run:ID, ...) as the old store wrote them:
    the new store warns that they are there and does not read them;
    migrate-v1 moves them with their request ids and history."""
    store = store_from_url(redis_server.url(prefix=prefix))
    store.create_run("template", WeightingConfig(tau=0.7), now=3.0)
    store.update_controller("template", "req-1", None, bump)
    new_keys = keys_of(store, "template")
    fields = raw.hgetall(new_keys["run"])
    for run_id in ("a", "team/b:c"):
        raw.hset(f"{prefix}:run:{run_id}", mapping=fields)
        raw.hset(f"{prefix}:req:{run_id}", "req-1", raw.hget(new_keys["req"], "req-1"))
        raw.zadd(f"{prefix}:reqv:{run_id}", {"req-1": 1})
        raw.zadd(f"{prefix}:hist:{run_id}", {raw.zrange(new_keys["hist"], 0, 0)[0]: 1})
        raw.zadd(f"{prefix}:runs", {run_id: 0})
    store.delete_run("template")
    with caplog.at_level("WARNING", logger="maxent_server"):
        store_from_url(redis_server.url(prefix=prefix, startup_wait=0)).ping()
    assert "2 runs in the old key layout" in caplog.text
    assert store.list_runs(None, 10) == []
    result = subprocess.run([sys.executable, "-m", "maxent_server.store.redis", "migrate-v1",
                             redis_server.url(prefix=prefix)], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "moved 2 runs" in result.stdout, result.stderr
    assert [r.run_id for r in store.list_runs(None, 10)] == ["a", "team/b:c"]
    for run_id in ("a", "team/b:c"):
        assert store.get_run(run_id).config == WeightingConfig(tau=0.7) and store.get_run(run_id).create_time == 3.0
        assert store.update_controller(run_id, "req-1", None, bump).replayed
        assert [state.version for state in store.states_since(run_id, 0, 10)] == [1]
    assert sorted(raw.keys(f"{prefix}:*")) == sorted([f"{prefix}:v2:runs"] + [
        key for run_id in ("a", "team/b:c") for key in store._keys(run_id)])
    store.close()


@pytest.mark.parametrize("url", [
    "redis://:s3cret@host:notaport/0",
    "redis://user:s3cret@host:99999/0",
    "redis://:s3cret@[::1/0",
    "redis://:s3/cret@host/0?nope=1",
    "redis+tls://:s3cret@host/0",
    "redis://:s3cret@host/x",
])
def test_a_bad_url_never_shows_the_password(url):
    with pytest.raises(ValueError) as info:
        open_store(url, "")
    shown = str(info.value) + repr(info.value.__cause__) + repr(info.value.__context__)
    assert "s3cret" not in shown and "s3/cret" not in shown


def test_url_options_are_parsed_and_checked(monkeypatch):
    s = RedisSettings.from_url("redis://u:p%40ss@localhost:6380/3?prefix=team-a&timeout=1.5&connect_timeout=0.5"
                               "&request_id_ttl=60&retention=20000&startup_wait=0&max_connections=8")
    assert (s.host, s.port, s.db, s.username, s.password, s.tls) == ("localhost", 6380, 3, "u", "p@ss", False)
    assert (s.prefix, s.timeout, s.connect_timeout, s.request_id_ttl, s.retention) == ("team-a", 1.5, 0.5, 60, 20000)
    assert (s.startup_wait, s.max_connections) == (0.0, 8)
    assert "p@ss" not in repr(s) and "p@ss" not in s.address and "p%40ss" not in s.address
    defaults = RedisSettings.from_url("redis://127.0.0.1")
    assert (defaults.port, defaults.db, defaults.prefix, defaults.password) == (6379, 0, "maxent", None)
    t = RedisSettings.from_url("rediss://h/1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional&ssl_check_hostname=false")
    assert t.tls and t.ssl_ca_certs == "/ca.pem" and t.ssl_cert_reqs == "optional" and not t.ssl_check_hostname
    monkeypatch.setenv("MAXENT_REDIS_PASSWORD", "from-env")
    monkeypatch.setenv("MAXENT_REDIS_USERNAME", "svc")
    env = RedisSettings.from_url("redis://h")
    assert (env.username, env.password) == ("svc", "from-env")
    for bad in ("redis://h?nope=1", "redis://h?timeout=-1", "redis://h?retention=0", "redis://h?prefix=",
                "redis://h?ssl_ca_certs=/x", "redis://h/x", "rediss://h?ssl_cert_reqs=maybe", "http://h", "redis://"):
        with pytest.raises(ValueError):
            RedisSettings.from_url(bad)


def test_auth_with_a_password(tmp_path):
    server = RedisProcess(tmp_path / "auth", password="s3cret-pw").start()
    try:
        good = RedisStore.from_url(server.url(startup_wait=0))
        good.ping()
        good.create_run("a", WeightingConfig(), now=1.0)
        good.close()
        wrong = RedisStore.from_url(f"redis://:nope@127.0.0.1:{server.port}/0?startup_wait=30")
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="credentials") as info:
            wrong.ping()  # a wrong password fails at once, without waiting for startup_wait
        assert time.monotonic() - start < 20 and "nope" not in str(info.value)
        wrong.close()
        missing = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0?startup_wait=0")
        with pytest.raises(StoreUnavailable):
            missing.get_run("a")
        missing.close()
    finally:
        server.stop()


def test_acl_user_limited_to_its_prefix(tmp_path, monkeypatch):
    # The permissions docs/redis.md gives for one deployment's user.
    acl = ["--user", "default", "off", "--user", "team-a", "on", ">team-a-pw", "~team-a:*", "+@read", "+@write",
           "+@scripting", "+ping", "+time"]
    server = RedisProcess(tmp_path / "acl", extra_args=acl).start()
    try:
        monkeypatch.setenv("MAXENT_REDIS_USERNAME", "team-a")
        monkeypatch.setenv("MAXENT_REDIS_PASSWORD", "team-a-pw")
        s = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0?prefix=team-a&startup_wait=0")
        s.ping()
        s.create_run("r", WeightingConfig(), now=1.0)
        s.update_controller("r", "x", None, bump)
        assert [r.run_id for r in s.list_runs(None, 5)] == ["r"]
        assert [r.run_id for r in s.list_matching(RunPatterns(["?"]), None, 5)] == ["r"]
        assert [state.version for state in s.states_since("r", 0, 5)] == [1]
        s.delete_run("r")
        s.close()
        # Another prefix is outside the user's key pattern: refused at the start.
        other = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0?prefix=team-b&startup_wait=0")
        with pytest.raises(redis.exceptions.NoPermissionError):
            other.ping()
        other.close()
    finally:
        server.stop()


def test_tls_and_mutual_tls(tmp_path):
    tls = make_tls_files(tmp_path / "certs")
    if tls is None:
        pytest.skip("openssl is not installed")
    server = RedisProcess(tmp_path / "tls", tls=dict(tls, auth_clients="yes"), password="pw").start()
    try:
        url = server.url(ssl_ca_certs=tls["ca_file"], ssl_certfile=tls["cert_file"], ssl_keyfile=tls["key_file"],
                         startup_wait=0)
        s = open_store(url, "")
        s.ping()
        s.create_run("tls-run", WeightingConfig(tau=0.5), now=1.0)
        assert s.update_controller("tls-run", "r", None, bump).state.version == 1
        assert s.path.startswith("rediss://") and "pw" not in s.path
        s.close()
        no_client_cert = open_store(server.url(ssl_ca_certs=tls["ca_file"], startup_wait=0), "")
        with pytest.raises(StoreUnavailable):
            no_client_cert.ping()
        no_client_cert.close()
        untrusted = open_store(server.url(ssl_certfile=tls["cert_file"], ssl_keyfile=tls["key_file"],
                                          startup_wait=0), "")
        with pytest.raises(StoreUnavailable):
            untrusted.ping()  # the test CA is not in the system roots
        untrusted.close()
        plain = open_store(f"redis://:pw@127.0.0.1:{server.port}/0?startup_wait=0&timeout=2", "")
        with pytest.raises(StoreUnavailable):
            plain.ping()
        plain.close()
    finally:
        server.stop()


# -- Redis away and back ---------------------------------------------------------------------


def _every_call(s: RedisStore) -> dict:
    return {
        "ping": s.ping,
        "get": lambda: s.get_run("a"),
        "list": lambda: s.list_runs(None, 10),
        "create": lambda: s.create_run("b", WeightingConfig(), now=2.0),
        "update": lambda: s.update_controller("a", "during", None, bump),
        "delete": lambda: s.delete_run("a"),
    }


def test_killed_redis_is_unavailable_then_recovers_with_the_state(tmp_path):
    server = RedisProcess(tmp_path / "r").start()
    s = RedisStore.from_url(server.url(prefix="k", timeout=2, connect_timeout=1, startup_wait=0))
    try:
        s.ping()
        s.create_run("a", WeightingConfig(tau=1.0), now=1.0)
        acknowledged = s.update_controller("a", "before", None, bump).state
        server.kill()
        for name, call in _every_call(s).items():
            with pytest.raises(StoreUnavailable):
                call()
        server.restart()
        # The same store object, no reconnect by hand; the acknowledged state is there.
        assert s.get_run("a").state == acknowledged
        assert s.update_controller("a", "before", None, bump).replayed
        assert s.update_controller("a", "after", None, bump).state.version == 2
    finally:
        s.close()
        server.stop()


def test_hung_redis_times_out_as_unavailable(tmp_path):
    server = RedisProcess(tmp_path / "r").start()
    s = RedisStore.from_url(server.url(prefix="h", timeout=1, connect_timeout=1, startup_wait=0))
    try:
        s.ping()
        s.create_run("a", WeightingConfig(), now=1.0)
        server.pause()
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            s.get_run("a")
        with pytest.raises(StoreUnavailable):
            s.update_controller("a", "while-paused", None, bump)
        assert time.monotonic() - start < 30
        server.resume()
        # The write sent before the timeout may have landed once Redis woke up;
        # the retry with the same request id settles it: applied exactly once.
        outcome = s.update_controller("a", "while-paused", None, bump)
        assert outcome.state.version == 1 == s.get_run("a").state.version
    finally:
        server.resume()
        s.close()
        server.stop()


def test_first_ping_waits_for_redis_to_come_up(tmp_path):
    server = RedisProcess(tmp_path / "late")
    s = RedisStore.from_url(server.url(startup_wait=60, connect_timeout=1))
    starter = threading.Timer(1.0, server.start)
    starter.start()
    try:
        s.ping()  # returns once Redis is up
        s.create_run("a", WeightingConfig(), now=1.0)
    finally:
        starter.join()
        s.close()
        server.stop()


def test_first_ping_gives_up_after_startup_wait(tmp_path):
    port = RedisProcess(tmp_path / "never").port  # nothing listens there
    s = RedisStore.from_url(f"redis://127.0.0.1:{port}/0?startup_wait=0.5&connect_timeout=1")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        s.ping()
    assert time.monotonic() - start < 30
    s.close()
