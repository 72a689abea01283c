"""The call edge under attack, each against a real server process: memory
amplification (many groups, many large bodies, bodies without a token),
admission, and the codes and log lines of odd calls (oversized responses,
huge integers, malformed bytes, huge or control-character ids), and per-run
gauges that no reader can move."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from maxent_api import method_path
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_server.edge import MAX_GROUPS_PER_REQUEST, Admission
from maxent_server.edge.admission import estimated_cost
from maxent_server.edge.refusal import Refusal
from ops_support import metadata, samples, scrape, value, write_tokens
from server_process import ServerProcess, free_port

MIB = 1024 * 1024
ADMIN = "edge-admin-token-0123456789"
READER = "edge-reader-token-0123456789"
CONFIG = pb.WeightingConfig(tau=0.5, beta=0.05, target_entropy=1.0, tau_lr=0.2)
REWARD_STATS = method_path("ComputeRewardStatistics")
GET_RUN = method_path("GetRun")

def peak_rss(proc: ServerProcess) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def zero_groups_request(count: int) -> bytes:
    """A ComputeRewardStatisticsRequest whose group_sizes are `count` zeros,
    written directly (a Python list of ten million ints would cost the test
    process itself a lot)."""
    number = pb.ComputeRewardStatisticsRequest.DESCRIPTOR.fields_by_name["group_sizes"].number
    return _varint(number << 3 | 2) + _varint(count) + bytes(count)


def raw_call(channel: grpc.Channel, method: str, body: bytes, token: str | None = None, timeout: float = 120):
    """(code, details, field violations) of a call whose request is `body` as is."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(body, timeout=timeout, metadata=metadata(token) if token else None)
        return grpc.StatusCode.OK, "", []
    except grpc.RpcError as error:
        return error.code(), error.details() or "", _fields(error)


def _fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields


def code_of(fn, request, token: str | None = None):
    try:
        fn(request, timeout=60, metadata=metadata(token) if token else None)
        return grpc.StatusCode.OK, []
    except grpc.RpcError as error:
        return error.code(), _fields(error)


def rpc_lines(proc: ServerProcess) -> list[str]:
    return [line for line in proc.log().splitlines() if " maxent_server.rpc: rpc " in line]


def wait_for_line(proc: ServerProcess, *parts: str, timeout: float = 30) -> str:
    """The last access-log line holding every one of `parts` (a line is
    written as the call unwinds, which can be just after the client has its
    status)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in rpc_lines(proc) if all(part in line for part in parts)]
        if found or time.monotonic() > deadline:
            assert found, f"no access-log line with {parts}"
            return found[-1]
        time.sleep(0.05)


# -- a server with tokens and metrics --------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge-secured")
    tokens = write_tokens(folder / "tokens.json", [
        {"name": "ops", "token": ADMIN, "role": "admin", "runs": ["*"]},
        {"name": "reader", "token": READER, "role": "read", "runs": ["edge/*"]},
    ])
    port = free_port()
    proc = ServerProcess(folder / "data", extra_args=["--auth-tokens", str(tokens), "--metrics-port", str(port)])
    proc.start()
    channel = grpc.insecure_channel(proc.target, options=[("grpc.max_send_message_length", 100 * MIB)])
    yield SimpleNamespace(proc=proc, channel=channel, stub=pb_grpc.MaxEntServiceStub(channel),
                          url=f"http://127.0.0.1:{port}/metrics")
    channel.close()
    proc.stop()


def test_unauthenticated_bodies_are_refused_unread(secured):
    """8 parallel 60 MiB requests without a token: each UNAUTHENTICATED, and
    the server never holds their bodies (the token is checked first)."""
    body = zero_groups_request(60 * MIB)
    before = peak_rss(secured.proc)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: raw_call(secured.channel, REWARD_STATS, body), range(8)))
    assert [code for code, _, _ in results] == [grpc.StatusCode.UNAUTHENTICATED] * 8
    grown = peak_rss(secured.proc) - before
    assert grown < 200 * MIB, f"peak memory grew by {grown / MIB:.0f} MiB for bodies that were never needed"
    assert code_of(secured.stub.GetRun, pb.GetRunRequest(run_id="edge/none"), ADMIN)[0] == grpc.StatusCode.NOT_FOUND


def test_a_huge_run_id_is_clipped_in_the_denial_and_the_log(secured):
    huge = "team-z/" + "x" * MIB
    code, details, _ = raw_call(secured.channel, GET_RUN, pb.GetRunRequest(run_id=huge).SerializeToString(), READER)
    assert code == grpc.StatusCode.PERMISSION_DENIED  # not RESOURCE_EXHAUSTED from an oversized status
    assert len(details) < 1000 and "more chars" in details
    denied = wait_for_line(secured.proc, "method=GetRun", "code=PERMISSION_DENIED")
    assert len(denied) < 2000 and "more chars" in denied
    assert all(len(line) < 2000 for line in rpc_lines(secured.proc))


def test_control_characters_never_reach_the_text_log_raw(secured):
    sneaky = "edge/\x1b[2Jcleared\x00\x7fnext"  # no whitespace, so no quoting hides it
    code, _ = code_of(secured.stub.GetRun, pb.GetRunRequest(run_id=sneaky), ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    wait_for_line(secured.proc, "\\x1b[2Jcleared")
    log = secured.proc.log()
    for raw in ("\x1b", "\x00", "\x7f"):
        assert raw not in log


def test_malformed_bytes_are_invalid_argument_in_one_line(secured):
    code, _, fields = raw_call(secured.channel, REWARD_STATS, b"\xff\xff\xff\xff", ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["request"]
    wait_for_line(secured.proc, "method=ComputeRewardStatistics", "code=INVALID_ARGUMENT")
    log = secured.proc.log()
    assert "Traceback" not in log and " ERROR " not in log


def test_a_huge_integer_parameter_is_invalid_argument(secured):
    request = pb.ComputeRewardStatisticsRequest(
        group_sizes=[2], completions=["a", "b"],
        rewards=[pb.RewardTerm(name="length", weight=1.0, params={"max_len": "9" * 5000})])
    code, fields = code_of(secured.stub.ComputeRewardStatistics, request, ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ['rewards[0].params["max_len"]']


def test_reads_never_move_run_gauges(secured):
    run = "edge/gauges"
    stub = secured.stub
    stub.CreateRun(pb.CreateRunRequest(run_id=run, config=CONFIG), timeout=60, metadata=metadata(ADMIN))
    stub.UpdateController(pb.UpdateControllerRequest(run_id=run, global_step=1, weight_entropy=0.7,
                                                     measured_kl=0.01), timeout=60, metadata=metadata(ADMIN))
    stub.ComputeRewardStatistics(pb.ComputeRewardStatisticsRequest(run_id=run, group_sizes=[2], utilities=[1.0, 0.0]),
                                 timeout=60, metadata=metadata(ADMIN))  # the trainer's batch: mean 0.5
    _, body = scrape(secured.url, token=ADMIN)
    before = samples(body)
    assert value(before, "maxent_run_reward_mean", run=run) == pytest.approx(0.5)
    # A reader probes: extreme utilities, a near one-hot q, a read of the run.
    stub.ComputeRewardStatistics(pb.ComputeRewardStatisticsRequest(run_id=run, group_sizes=[2],
                                                                   utilities=[1e15, -1e15]),
                                 timeout=60, metadata=metadata(READER))
    stub.ComputeWeightStats(pb.ComputeWeightStatsRequest(run_id=run, group_sizes=[2], q_values=[1.0, 0.0],
                                                         include_reference_term=False),
                            timeout=60, metadata=metadata(READER))
    stub.GetRun(pb.GetRunRequest(run_id=run), timeout=60, metadata=metadata(READER))
    _, body = scrape(secured.url, token=ADMIN)
    after = samples(body)
    per_run = {key: v for key, v in before.items() if ("run", run) in key[1]}
    assert per_run and {key: after.get(key) for key in per_run} == per_run
    assert value(after, "maxent_run_weight_entropy_nats", run=run) == pytest.approx(0.7)


# -- admission: groups, memory, concurrency ----------------------------------------------------------


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """A server with a small admission budget and 4 call slots."""
    proc = ServerProcess(tmp_path_factory.mktemp("edge-bounded") / "data",
                         extra_args=["--max-inflight-mb", "256", "--max-concurrent-rpcs", "4", "--reward-workers", "2",
                                     "--reward-timeout-seconds", "3"])
    proc.start()
    channel = grpc.insecure_channel(proc.target, options=[("grpc.max_send_message_length", 100 * MIB)])
    yield SimpleNamespace(proc=proc, channel=channel, stub=pb_grpc.MaxEntServiceStub(channel))
    channel.close()
    proc.stop()


def test_too_many_groups_is_invalid_argument(bounded):
    code, _, fields = raw_call(bounded.channel, REWARD_STATS, zero_groups_request(MAX_GROUPS_PER_REQUEST + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["group_sizes"]
    ok, _, _ = raw_call(bounded.channel, REWARD_STATS, zero_groups_request(1000))
    assert ok == grpc.StatusCode.OK


def test_parallel_group_floods_stay_within_the_budget(bounded):
    """12 parallel 10 MB requests of ten million empty groups: each refused
    (too many groups, or no room in the budget), the server's peak memory
    bounded by its budget, and it still answers."""
    body = zero_groups_request(10_000_000)
    before = peak_rss(bounded.proc)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: raw_call(bounded.channel, REWARD_STATS, body), range(12)))
    codes = {code for code, _, _ in results}
    assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    for code, details, fields in results:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert fields == ["group_sizes"]
        else:
            assert "busy" in details or "budget" in details
    grown = peak_rss(bounded.proc) - before
    assert grown < 512 * MIB, f"peak memory grew by {grown / MIB:.0f} MiB"
    reply = bounded.stub.ComputeRewardStatistics(pb.ComputeRewardStatisticsRequest(group_sizes=[2],
                                                                                   utilities=[1.0, 0.0]), timeout=60)
    assert len(reply.q_values) == 2


def test_calls_beyond_the_slots_are_resource_exhausted_not_queued(bounded):
    """Five slow reward calls (each held 3 s by its reward's time limit) on
    4 slots: one at least is refused at once, the others are served; then
    the slots are free again."""
    slow = pb.ComputeRewardStatisticsRequest(group_sizes=[1], completions=["SLEEP"], answers=["1"],
                                             rewards=[pb.RewardTerm(name="sleepy", weight=1.0)])
    futures = [bounded.stub.ComputeRewardStatistics.future(slow, timeout=60) for _ in range(5)]
    errors = [future.exception() for future in futures]
    refused = [e for e in errors if e is not None]
    assert refused and len(refused) <= 2, errors
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in error.details()
    assert _get_run_code(bounded.stub)[0] == grpc.StatusCode.NOT_FOUND


def _get_run_code(stub):
    try:
        stub.GetRun(pb.GetRunRequest(run_id="edge/none"), timeout=60)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details()


def test_admission_counts_slots_and_memory_and_lets_a_huge_call_run_alone():
    admission = Admission(max_concurrent_rpcs=2, max_inflight_mb=100)
    admission.enter()
    admission.enter()
    with pytest.raises(Refusal) as busy:
        admission.enter()
    assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in busy.value.message
    admission.leave()
    admission.enter()  # a slot given back is taken again
    small = admission.reserve("ComputeWeightStats", 2 * MIB)
    assert small == estimated_cost("ComputeWeightStats", 2 * MIB) > 32 * MIB
    with pytest.raises(Refusal):
        admission.reserve("ComputeWeightStats", 5 * MIB)  # the two would exceed 100 MiB
    admission.release(small)
    huge = admission.reserve("ComputeWeightStats", 50 * MIB)  # alone: admitted though over the budget
    with pytest.raises(Refusal):
        admission.reserve("GetRun", 10)
    admission.release(huge)
    assert admission.reserved == 0


# -- responses larger than the client may receive ----------------------------------------------------


def test_oversized_messages_are_logged_as_the_client_sees_them(tmp_path):
    proc = ServerProcess(tmp_path / "data", extra_args=["--max-message-mb", "1"])
    proc.start()
    try:
        n = 100_000  # about 0.9 MB of request, several MB of response
        request = pb.ComputeRewardStatisticsRequest(group_sizes=[n], utilities=[0.5] * n)
        assert request.ByteSize() < MIB
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.MaxEntServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ComputeRewardStatistics(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        line = wait_for_line(proc, "method=ComputeRewardStatistics")
        assert "code=RESOURCE_EXHAUSTED" in line and "code=OK" not in line
        # A request over the limit: refused by grpc itself, logged with that code.
        big = pb.GetRunRequest(run_id="edge/" + "x" * (2 * MIB))
        with grpc.insecure_channel(proc.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.MaxEntServiceStub(channel).GetRun(big, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "code=RESOURCE_EXHAUSTED" in wait_for_line(proc, "method=GetRun")
    finally:
        proc.stop()
