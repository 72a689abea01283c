"""Run visibility and key isolation against real servers: ListRuns under a
token limited to some runs reads only those runs (among 20 000 others) and
reveals nothing of the rest; servers on Redis prefixes that contain each
other cannot see or change each other's runs; a bad --state-store URL stops
the server with one line that never holds the password."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_server.domain import WeightingConfig
from maxent_server.store import SqliteStore
from ops_support import metadata, write_tokens
from redis_process import REDIS_SERVER, SKIP_REASON, RedisProcess
from server_process import ServerProcess

ADMIN = "admin-token-listing-0123456789"
TEAM_A = "team-a-token-listing-0123456789"
EVAL = "eval-token-listing-0123456789"
CONFIG = pb.WeightingConfig(tau=0.5, beta=0.05, target_entropy=1.0, tau_lr=0.2)
OTHER_RUNS = 20_000


def _tokens(path):
    return write_tokens(path, [
        {"name": "ops", "token": ADMIN, "role": "admin", "runs": ["*"]},
        {"name": "team-a", "token": TEAM_A, "role": "read", "runs": ["team-a/*"]},
        {"name": "evals", "token": EVAL, "role": "read", "runs": ["*/final-eval", "team-a/run-0?"]},
    ])


def _fill_other_runs(path, count: int) -> None:
    """`count` runs that no restricted token may see, written straight into
    the server's SQLite file in one transaction (the store's own rows, as
    create_run writes them). Every tenth has a record that cannot be decoded:
    a listing that reads any record it does not return fails on them."""
    store = SqliteStore(path)
    store.create_run("other/template", WeightingConfig(tau=0.5), now=1.0)
    store.close()
    db = sqlite3.connect(path)
    config, state = db.execute("SELECT config, state FROM runs WHERE run_id = 'other/template'").fetchone()
    rows = [(f"{team}/run-{i:05d}", "{" if i % 10 == 0 else config, state, 1.0)
            for i in range(count // 4) for team in ("team-b", "team-c", "team-a0", "u")]
    rows += [("team-a", config, state, 1.0), ("team-aa/x", config, state, 1.0)]  # neighbours of the prefix
    with db:
        db.executemany("INSERT INTO runs (run_id, config, state, create_time) VALUES (?, ?, ?, ?)", rows)
    db.close()


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A server with tokens whose store holds 20 000 runs besides team-a's."""
    folder = tmp_path_factory.mktemp("crowded")
    _fill_other_runs(folder / "data" / SqliteStore.FILENAME, OTHER_RUNS)
    proc = ServerProcess(folder / "data", extra_args=["--auth-tokens", str(_tokens(folder / "tokens.json"))])
    proc.start()
    channel = proc.channel()
    stub = pb_grpc.MaxEntServiceStub(channel)
    for i in range(30):
        stub.CreateRun(pb.CreateRunRequest(run_id=f"team-a/run-{i:02d}", config=CONFIG), timeout=60,
                       metadata=metadata(ADMIN))
    stub.CreateRun(pb.CreateRunRequest(run_id="team-a/final-eval", config=CONFIG), timeout=60,
                   metadata=metadata(ADMIN))
    yield stub
    channel.close()
    proc.stop()


def _pages(stub, token: str, size: int) -> tuple[list[str], list[str]]:
    seen, page_tokens, page_token = [], [], ""
    while True:
        reply = stub.ListRuns(pb.ListRunsRequest(page_size=size, page_token=page_token), timeout=60,
                              metadata=metadata(token))
        assert len(reply.runs) <= size and [f.name for f, _ in reply.ListFields()] in (
            ["runs"], ["runs", "next_page_token"], [])  # nothing but runs and the token
        seen.extend(r.run_id for r in reply.runs)
        if not reply.next_page_token:
            return seen, page_tokens
        page_token = reply.next_page_token
        page_tokens.append(page_token)


def test_restricted_listing_reads_only_the_tokens_runs(crowded):
    """Item 5: the listing costs what it returns. It never reads (decodes)
    another run's record, so the undecodable ones among the 20 000 others
    do not matter, and 50 listings finish within a generous bound."""
    team_a = [f"team-a/run-{i:02d}" for i in range(30)] + ["team-a/final-eval"]
    start = time.monotonic()
    for _ in range(50):
        reply = crowded.ListRuns(pb.ListRunsRequest(page_size=1000), timeout=60, metadata=metadata(TEAM_A))
        assert [r.run_id for r in reply.runs] == sorted(team_a) and not reply.next_page_token
    assert time.monotonic() - start < 60
    seen, page_tokens = _pages(crowded, TEAM_A, 7)
    assert seen == sorted(team_a)
    # Item 11: a page token names only a run the token may see; nothing counts the others.
    assert all(base64.urlsafe_b64decode(t).decode() in team_a for t in page_tokens)


def test_patterns_without_a_literal_prefix_list_their_runs(crowded):
    seen, page_tokens = _pages(crowded, EVAL, 3)
    assert seen == ["team-a/final-eval"] + [f"team-a/run-0{i}" for i in range(10)]
    assert all(base64.urlsafe_b64decode(t).decode() in seen for t in page_tokens)


def test_a_page_token_of_another_run_reveals_nothing(crowded):
    """A hand-made token naming some other run starts the listing after it,
    and still lists only the token's own runs."""
    token = base64.urlsafe_b64encode(b"team-a/run-19").decode()
    reply = crowded.ListRuns(pb.ListRunsRequest(page_size=100, page_token=token), timeout=60,
                             metadata=metadata(TEAM_A))
    assert [r.run_id for r in reply.runs] == [f"team-a/run-{i}" for i in range(20, 30)]
    token = base64.urlsafe_b64encode(b"team-b/run-00001").decode()
    assert not crowded.ListRuns(pb.ListRunsRequest(page_token=token), timeout=60, metadata=metadata(TEAM_A)).runs


# -- Redis prefixes -----------------------------------------------------------------------


@pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)
def test_redis_prefixes_inside_each_other_stay_apart(tmp_path):
    """Item 10: servers on the prefixes `team`, `team:run:evil` and
    `team:run` share one Redis. Under the old keys `team:run:evil`'s run
    `victim` was `team`'s run `evil:run:victim`, and `team`'s run `runs` was
    `team:run`'s run index (INTERNAL there)."""
    redis_server = RedisProcess(tmp_path / "redis").start()
    servers = {}
    try:
        tag = uuid.uuid4().hex[:6]
        for name in ("team", "team:run:evil", "team:run"):
            url = redis_server.url(prefix=f"{tag}{name}", timeout=5)
            folder = tmp_path / name.replace(":", "_")
            folder.mkdir()
            servers[name] = ServerProcess(folder / "data",
                                          extra_args=["--state-store", url]).start()
        stubs = {name: pb_grpc.MaxEntServiceStub(proc.channel()) for name, proc in servers.items()}
        team, evil, inner = stubs["team"], stubs["team:run:evil"], stubs["team:run"]
        for run_id in ("evil:run:victim", "runs", "run:x"):
            team.CreateRun(pb.CreateRunRequest(run_id=run_id, config=CONFIG), timeout=60)
        team.UpdateController(pb.UpdateControllerRequest(run_id="evil:run:victim", request_id="r1",
                                                         weight_entropy=1.0), timeout=60)

        with pytest.raises(grpc.RpcError) as info:
            evil.GetRun(pb.GetRunRequest(run_id="victim"), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            evil.UpdateController(pb.UpdateControllerRequest(run_id="victim", weight_entropy=5.0), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert not evil.ListRuns(pb.ListRunsRequest(), timeout=60).runs
        evil.CreateRun(pb.CreateRunRequest(run_id="victim", config=pb.WeightingConfig(tau=2.0)), timeout=60)
        evil.DeleteRun(pb.DeleteRunRequest(run_id="victim"), timeout=60)

        inner.CreateRun(pb.CreateRunRequest(run_id="x", config=pb.WeightingConfig(tau=3.0)), timeout=60)
        assert [r.run_id for r in inner.ListRuns(pb.ListRunsRequest(), timeout=60).runs] == ["x"]
        assert inner.GetRun(pb.GetRunRequest(run_id="x"), timeout=60).run.config.tau == 3.0

        victim = team.GetRun(pb.GetRunRequest(run_id="evil:run:victim"), timeout=60).run
        assert victim.state.version == 1 and victim.config.tau == 0.5
        assert team.GetRun(pb.GetRunRequest(run_id="run:x"), timeout=60).run.config.tau == 0.5
        assert [r.run_id for r in team.ListRuns(pb.ListRunsRequest(), timeout=60).runs] == \
            ["evil:run:victim", "run:x", "runs"]
    finally:
        for proc in servers.values():
            proc.stop()
        redis_server.stop()


def test_a_bad_state_store_url_stops_the_server_without_its_password(tmp_path):
    """Item 10: one line saying what is wrong, exit code 2, no traceback,
    and the password nowhere in the output."""
    for url in ("redis://:s3cret@host:notaport/0", "redis+tls://:s3cret@host/0"):
        result = subprocess.run(
            [sys.executable, "-m", "maxent_server", "--port", "0", "--data-dir", str(tmp_path / "data"),
             "--device", "cpu", "--state-store", url],
            check=False, capture_output=True, text=True, timeout=120,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "s3cret" not in output and "Traceback" not in output
        assert "--state-store" in output and ":***@host" in output
