"""Authentication and authorisation: the token file, roles and run patterns
over the wire, ListRuns filtering, SIGHUP reload, /metrics behind tokens, and
loopback-only binding without tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import time
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from maxent_api import SERVICE_NAME
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_server.auth import Authorizer, Principal, Role, TokenFileError, bearer_token, parse_token_file
from ops_support import listening_addresses, metadata, samples, scrape, wait_for_log, write_tokens
from server_process import ServerProcess, free_port

READER = "reader-token-0123456789abcdef"
WRITER = "writer-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
OTHER = "other-team-token-0123456789abcdef"
CONFIG = pb.WeightingConfig(tau=0.5, beta=0.05, target_entropy=1.0, tau_lr=0.2)


def token_entries(reader: str = READER) -> list[dict]:
    return [
        {"name": "reader-a", "token": reader, "role": "read", "runs": ["team-a/*"]},
        {"name": "writer-a", "token": WRITER, "role": "write", "runs": ["team-a/*", "shared"]},
        {"name": "ops", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "role": "admin", "runs": ["*"]},
        {"name": "writer-b", "token": OTHER, "role": "write", "runs": ["team-b/*"]},
    ]


# -- in process ------------------------------------------------------------------------


def test_token_table_authenticates_by_hash():
    table = parse_token_file(json.dumps({"tokens": token_entries()}))
    assert len(table) == 4
    assert table.authenticate(ADMIN).name == "ops"
    assert table.authenticate(READER) == Principal("reader-a", Role.READ, ("team-a/*",))
    assert table.authenticate("nope") is None and table.authenticate("") is None and table.authenticate(None) is None
    # Only digests are kept.
    assert READER not in repr(vars(table)) and WRITER not in repr(vars(table))


@pytest.mark.parametrize(
    "document, complaint",
    [
        ("{not json", "not valid JSON"),
        ('{"tokens": {}}', '"tokens" list'),
        (json.dumps({"tokens": [{"name": "a", "token": "SECRETSECRET", "role": "boss", "runs": ["*"]}]}), "role"),
        (json.dumps({"tokens": [{"name": "a", "token": "SECRETSECRET", "role": "read"}]}), "runs"),
        (json.dumps({"tokens": [{"name": "a", "token": "SECRETSECRET", "sha256": "0" * 64, "role": "read",
                                 "runs": ["*"]}]}), "exactly one"),
        (json.dumps({"tokens": [{"name": "a", "sha256": "xyz", "role": "read", "runs": ["*"]}]}), "64 hex"),
        (json.dumps({"tokens": [{"name": "a", "token": "SECRETSECRET", "role": "read", "runs": ["*"]},
                                {"name": "a", "token": "OTHERSECRET", "role": "read", "runs": ["*"]}]}), "duplicate"),
        (json.dumps({"tokens": [{"name": "a", "token": "SECRETSECRET", "role": "read", "runs": ["*"]},
                                {"name": "b", "token": "SECRETSECRET", "role": "admin", "runs": ["*"]}]}), "twice"),
        (json.dumps({"tokens": [{"name": "a", "token": "SECRETSECRET", "role": "read", "runs": ["*"],
                                 "extra": 1}]}), "unknown keys"),
    ],
)
def test_bad_token_files_are_refused_without_echoing_tokens(document, complaint):
    with pytest.raises(TokenFileError) as error:
        parse_token_file(document)
    assert complaint in str(error.value)
    assert "SECRET" not in str(error.value)


def test_bearer_metadata_and_rules():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None
    reader = Principal("r", Role.READ, ("team-a/*", "exact"))
    assert reader.may_access("team-a/x/y") and reader.may_access("exact") and not reader.may_access("team-b/x")
    assert Authorizer.denial(reader, "GetRun", "team-a/1") is None
    assert Authorizer.denial(reader, "ComputeRewardStatistics", "") is None
    assert "needs write" in Authorizer.denial(reader, "UpdateController", "team-a/1")
    assert "may not access" in Authorizer.denial(reader, "GetRun", "team-b/1")
    writer = Principal("w", Role.WRITE, ("*",))
    assert Authorizer.denial(writer, "CreateRun", "any") is None
    assert "needs admin" in Authorizer.denial(writer, "DeleteRun", "any")
    assert "needs admin" in Authorizer.denial(writer, "SomeFutureMethod", "")  # unknown methods fail closed
    assert Authorizer.denial(Principal("a", Role.ADMIN, ("*",)), "DeleteRun", "any") is None


# -- a live server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    tokens = write_tokens(folder / "tokens.json", token_entries())
    metrics_port = free_port()
    proc = ServerProcess(folder / "data", extra_args=["--auth-tokens", str(tokens), "--metrics-port",
                                                      str(metrics_port), "--metrics-auth"])
    proc.start()
    channel = grpc.insecure_channel(proc.target)
    yield SimpleNamespace(proc=proc, channel=channel, stub=pb_grpc.MaxEntServiceStub(channel), tokens=tokens,
                          metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    channel.close()
    proc.stop()


def _code(call, request, token: str | None = None, **extra) -> grpc.StatusCode:
    try:
        call(request, timeout=60, metadata=metadata(token) if token else extra.get("raw_metadata"))
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


ALL_CALLS = [
    ("CreateRun", pb.CreateRunRequest(run_id="team-a/x", config=CONFIG)),
    ("GetRun", pb.GetRunRequest(run_id="team-a/x")),
    ("ListRuns", pb.ListRunsRequest()),
    ("DeleteRun", pb.DeleteRunRequest(run_id="team-a/x")),
    ("ComputeRewardStatistics", pb.ComputeRewardStatisticsRequest(group_sizes=[2], utilities=[0.0, 1.0])),
    ("ComputeWeightStats", pb.ComputeWeightStatsRequest(run_id="team-a/x", group_sizes=[1], q_values=[1.0],
                                                        ref_logp_sum=[-1.0], ref_token_counts=[1])),
    ("UpdateController", pb.UpdateControllerRequest(run_id="team-a/x", global_step=1)),
    ("ListRewardFunctions", pb.ListRewardFunctionsRequest()),
]


@pytest.mark.parametrize("method, request_message", ALL_CALLS, ids=[m for m, _ in ALL_CALLS])
def test_missing_or_unknown_token_is_unauthenticated(secured, method, request_message):
    call = getattr(secured.stub, method)
    assert _code(call, request_message) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(call, request_message, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
    assert _code(call, request_message, raw_metadata=(("authorization", f"Basic {ADMIN}"),)) == \
        grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_stay_open(secured):
    health = health_pb2_grpc.HealthStub(secured.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(secured.channel).get_services()


def test_roles_and_runs(secured):
    stub = secured.stub
    md = metadata
    stub.CreateRun(pb.CreateRunRequest(run_id="team-a/roles", config=CONFIG), timeout=60, metadata=md(WRITER))
    stub.UpdateController(pb.UpdateControllerRequest(run_id="team-a/roles", global_step=1, weight_entropy=0.2),
                          timeout=60, metadata=md(WRITER))
    before = stub.GetRun(pb.GetRunRequest(run_id="team-a/roles"), timeout=60, metadata=md(READER)).run
    assert before.state.version == 1

    denied = [
        (stub.UpdateController, pb.UpdateControllerRequest(run_id="team-a/roles", global_step=2, weight_entropy=3.0),
         READER),
        (stub.CreateRun, pb.CreateRunRequest(run_id="team-a/new", config=CONFIG), READER),
        (stub.DeleteRun, pb.DeleteRunRequest(run_id="team-a/roles"), READER),
        (stub.DeleteRun, pb.DeleteRunRequest(run_id="team-a/roles"), WRITER),
        (stub.UpdateController, pb.UpdateControllerRequest(run_id="team-a/roles", global_step=2, weight_entropy=3.0),
         OTHER),
        (stub.GetRun, pb.GetRunRequest(run_id="team-a/roles"), OTHER),
        (stub.DeleteRun, pb.DeleteRunRequest(run_id="team-a/roles"), OTHER),
        (stub.CreateRun, pb.CreateRunRequest(run_id="team-b-not-really/x", config=CONFIG), OTHER),
        (stub.ComputeRewardStatistics,
         pb.ComputeRewardStatisticsRequest(run_id="team-a/roles", group_sizes=[1], utilities=[1.0]), OTHER),
        (stub.ComputeWeightStats, pb.ComputeWeightStatsRequest(run_id="team-a/roles", group_sizes=[1], q_values=[1.0],
                                                               ref_logp_sum=[-1.0], ref_token_counts=[1]), OTHER),
    ]
    for call, request, token in denied:
        assert _code(call, request, token) == grpc.StatusCode.PERMISSION_DENIED, (call, token)
    after = stub.GetRun(pb.GetRunRequest(run_id="team-a/roles"), timeout=60, metadata=md(ADMIN)).run
    assert after == before  # nothing a refused call sent changed the run
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetRun(pb.GetRunRequest(run_id="team-a/new"), timeout=60, metadata=md(ADMIN))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    allowed = [
        (stub.ComputeWeightStats, pb.ComputeWeightStatsRequest(run_id="team-a/roles", group_sizes=[1], q_values=[1.0],
                                                               ref_logp_sum=[-1.0], ref_token_counts=[1]), READER),
        (stub.ComputeRewardStatistics, pb.ComputeRewardStatisticsRequest(group_sizes=[1], utilities=[1.0]), OTHER),
        (stub.ListRewardFunctions, pb.ListRewardFunctionsRequest(), READER),
        (stub.CreateRun, pb.CreateRunRequest(run_id="shared", config=CONFIG), WRITER),
        (stub.DeleteRun, pb.DeleteRunRequest(run_id="shared"), ADMIN),
        (stub.DeleteRun, pb.DeleteRunRequest(run_id="team-a/roles"), ADMIN),
    ]
    for call, request, token in allowed:
        assert _code(call, request, token) == grpc.StatusCode.OK, (call, token)


def test_list_runs_shows_only_permitted_runs(secured):
    stub = secured.stub
    ids_a = [f"team-a/list-{i:02d}" for i in range(5)]
    ids_b = [f"team-b/list-{i:02d}" for i in range(4)]
    for run in ids_a + ids_b + ["team-aa/list", "zz/list"]:
        stub.CreateRun(pb.CreateRunRequest(run_id=run, config=CONFIG), timeout=60, metadata=metadata(ADMIN))

    def pages(token: str, size: int) -> tuple[list[str], list[str]]:
        seen, page_tokens, page_token = [], [], ""
        while True:
            reply = stub.ListRuns(pb.ListRunsRequest(page_size=size, page_token=page_token), timeout=60,
                                  metadata=metadata(token))
            assert len(reply.runs) <= size
            seen.extend(r.run_id for r in reply.runs)
            if not reply.next_page_token:
                return seen, page_tokens
            page_token = reply.next_page_token
            page_tokens.append(page_token)

    seen, tokens = pages(READER, 2)
    assert [r for r in seen if "list" in r] == ids_a
    assert all(r.startswith("team-a/") for r in seen)
    for page_token in tokens:  # a page token never names a run the reader may not see
        assert base64.urlsafe_b64decode(page_token).decode().startswith("team-a/")
    seen_b, _ = pages(OTHER, 3)
    assert [r for r in seen_b if "list" in r] == ids_b
    everything, _ = pages(ADMIN, 4)
    assert set(ids_a + ids_b + ["team-aa/list", "zz/list"]) <= set(everything)
    assert _code(stub.ListRuns, pb.ListRunsRequest(page_size=5000), READER) == grpc.StatusCode.INVALID_ARGUMENT
    for run in ids_a + ids_b + ["team-aa/list", "zz/list"]:
        stub.DeleteRun(pb.DeleteRunRequest(run_id=run), timeout=60, metadata=metadata(ADMIN))


def test_metrics_behind_tokens(secured):
    stub = secured.stub
    for run in ("team-a/metrics", "team-b/metrics"):
        stub.CreateRun(pb.CreateRunRequest(run_id=run, config=CONFIG), timeout=60, metadata=metadata(ADMIN))
    status, body = scrape(secured.metrics_url)
    assert status == 401 and "maxent_" not in body
    assert scrape(secured.metrics_url, token="wrong")[0] == 401
    status, body = scrape(secured.metrics_url, token=READER)
    assert status == 200
    runs = {dict(labels).get("run") for (name, labels) in samples(body) if name == "maxent_run_tau"}
    assert "team-a/metrics" in runs and "team-b/metrics" not in runs
    assert "maxent_rpc_requests_total" in body
    # How many runs the server holds is not a restricted token's business.
    assert "maxent_metrics_runs" not in body
    status, body = scrape(secured.metrics_url, token=ADMIN)
    runs = {dict(labels).get("run") for (name, labels) in samples(body) if name == "maxent_run_tau"}
    assert {"team-a/metrics", "team-b/metrics"} <= runs
    assert "maxent_metrics_runs " in body
    for run in ("team-a/metrics", "team-b/metrics"):
        stub.DeleteRun(pb.DeleteRunRequest(run_id=run), timeout=60, metadata=metadata(ADMIN))


def test_tokens_never_reach_the_log(secured):
    for token in (READER, WRITER, ADMIN, OTHER, "not-a-token"):
        _code(secured.stub.GetRun, pb.GetRunRequest(run_id="team-a/x"), token)
    log = secured.proc.log()
    assert "principal=reader-a" in log and "principal=ops" in log
    for token in (READER, WRITER, ADMIN, OTHER, "not-a-token", hashlib.sha256(ADMIN.encode()).hexdigest()):
        assert token not in log
    assert "authentication: 4 tokens from" in log


def test_sighup_reloads_the_token_file(secured):
    stub, proc = secured.stub, secured.proc
    request = pb.ListRewardFunctionsRequest()
    assert _code(stub.ListRewardFunctions, request, READER) == grpc.StatusCode.OK
    new_reader = "rotated-reader-token-0123456789"
    write_tokens(secured.tokens, token_entries(reader=new_reader))
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while _code(stub.ListRewardFunctions, request, new_reader) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.1)
    assert _code(stub.ListRewardFunctions, request, READER) == grpc.StatusCode.UNAUTHENTICATED
    # A broken file keeps the tokens in force.
    secured.tokens.write_text('{"tokens": [')
    proc.proc.send_signal(signal.SIGHUP)
    wait_for_log(proc, "SIGHUP: kept the previous tokens")
    assert _code(stub.ListRewardFunctions, request, new_reader) == grpc.StatusCode.OK
    write_tokens(secured.tokens, token_entries())
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while _code(stub.ListRewardFunctions, request, READER) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.1)
    assert new_reader not in proc.log()


# -- binding ---------------------------------------------------------------------------


def _all_interfaces(addresses: set[str]) -> bool:
    # gRPC binds 0.0.0.0 as a dual-stack '::' where IPv6 is available.
    return bool(addresses) and addresses <= {"0.0.0.0", "::"}


def _start(tmp_path, name: str, *args: str) -> ServerProcess:
    return ServerProcess(tmp_path / name, extra_args=list(args)).start()


def test_without_tokens_only_loopback(tmp_path):
    metrics_port = free_port()
    server = _start(tmp_path, "narrowed", "--host", "0.0.0.0", "--metrics-port", str(metrics_port))
    try:
        assert listening_addresses(server.port) == {"127.0.0.1"}
        assert listening_addresses(metrics_port) == {"127.0.0.1"}
        log = server.log()
        assert "authentication OFF" in log
        assert "gRPC bound to loopback instead of 0.0.0.0" in log
        assert "metrics bound to loopback instead of 0.0.0.0" in log
    finally:
        server.stop()


def test_remote_binding_needs_tokens_or_the_insecure_flag(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.json", token_entries())
    server = _start(tmp_path, "with-tokens", "--host", "0.0.0.0", "--auth-tokens", str(tokens),
                    "--allow-plaintext-tokens")
    try:
        assert _all_interfaces(listening_addresses(server.port))
        assert "bound to loopback" not in server.log()
    finally:
        server.stop()
    server = _start(tmp_path, "insecure", "--host", "0.0.0.0", "--insecure-allow-remote")
    try:
        assert _all_interfaces(listening_addresses(server.port))
        assert "--insecure-allow-remote: anyone who reaches" in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--metrics-auth", "--metrics-port", "9"], "--metrics-auth needs --auth-tokens"),
        (["--auth-tokens", "/nonexistent/tokens.json"], "cannot read token file"),
    ],
)
def test_bad_security_settings_stop_the_start(tmp_path, args, complaint):
    server = ServerProcess(tmp_path / "data", extra_args=args)
    with pytest.raises(RuntimeError, match="server exited with 2"):
        server.start()
    assert complaint in server.log()
    server.stop()
