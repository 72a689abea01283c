"""Property tests: malformed requests over the wire get INVALID_ARGUMENT that
names a field (or another deliberate status), never INTERNAL, and a rejected
request changes no state."""

from __future__ import annotations

import math
import os

import grpc
import pytest
from google.protobuf import descriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxent_client import WeightingConfig
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc

RUN = "fuzz/probe"
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS}
# 1 000 cases per RPC in CI; `pytest --long` sets MAXENT_FUZZ_EXAMPLES=100000.
EXAMPLES = int(os.environ.get("MAXENT_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# Finite extremes too: the bounds of docs/math.md "Input ranges" and far beyond.
EXTREMES = [0.0, -0.0, 1e308, -1e308, 1e300, -1e300, -1e-300, 1e15, -1e15, 1e16, 1e6, -1e6, 1e7, 1e12]
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EXTREMES))
counts = st.integers(min_value=-5, max_value=40)
sizes = st.one_of(st.lists(st.integers(min_value=-2, max_value=6), max_size=6),
                  st.lists(st.sampled_from([0, 1, 2**31 - 1, 2**31, 10**12, 2**62, -(2**63)]), max_size=3))
texts = st.one_of(st.text(max_size=20), st.sampled_from(["\u0000", "é\U0001F600", "x" * 100_000, "\\boxed{" * 50]))


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.MaxEntServiceStub(channel)
    try:
        stub.CreateRun(pb.CreateRunRequest(run_id=RUN, config=pb.WeightingConfig(tau=0.5, beta=0.1, tau_lr=0.1,
                                                                                target_entropy=1.0)))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    yield stub
    channel.close()


def _call(method, request):
    """(code, field violations, response) of a call."""
    try:
        return grpc.StatusCode.OK, [], method(request, timeout=30)
    except grpc.RpcError as error:
        fields = []
        status = rpc_status.from_call(error)
        for detail in status.details if status else ():
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                fields.extend(v.field for v in bad.field_violations)
        return error.code(), fields, None


_FLOATING = (descriptor.FieldDescriptor.TYPE_DOUBLE, descriptor.FieldDescriptor.TYPE_FLOAT)


def _non_finite(message, path=""):
    """The first number of a message (nested ones included) that is NaN or infinite."""
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type in _FLOATING:
            for x in values:
                if not math.isfinite(x):
                    return f"{path}{field.name}={x!r}"
        elif field.type == field.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            for item in values:
                bad = _non_finite(item, f"{path}{field.name}.")
                if bad:
                    return bad
    return None


def _check(stub, method, request):
    before = stub.GetRun(pb.GetRunRequest(run_id=RUN)).run.state
    code, fields, response = _call(method, request)
    assert code in DELIBERATE, (code, request)
    if response is not None:  # OK answers only finite numbers (docs/math.md, Input ranges)
        assert _non_finite(response) is None, (_non_finite(response), request)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert fields and all(fields), request
    if code != grpc.StatusCode.OK:
        assert stub.GetRun(pb.GetRunRequest(run_id=RUN)).run.state == before
    return code


@FUZZ
@given(group_sizes=sizes, utilities=st.lists(floats, max_size=12), token_counts=st.lists(counts, max_size=12),
       truncated=st.lists(st.booleans(), max_size=12), gen_logp=st.lists(floats, max_size=12),
       q_temperature=st.none() | floats, q_epsilon=st.none() | floats, max_len=st.none() | counts,
       seed=st.booleans(), completions=st.lists(texts, max_size=12), on_failure=st.integers(-1, 6),
       answers=st.lists(texts, max_size=4), reward_names=st.lists(st.sampled_from(
           ["format", "boxed_accuracy", "missing_boxed_penalty", "length", "math_accuracy", "nope", ""]), max_size=3),
       params=st.dictionaries(st.sampled_from(["max_len", "x", ""]), texts, max_size=2),
       run=st.sampled_from([RUN, "", "missing-run", "bad id!"]))
def test_compute_reward_statistics(stub, group_sizes, utilities, token_counts, truncated, gen_logp, q_temperature,
                                   q_epsilon, max_len, seed, completions, on_failure, answers, reward_names, params,
                                   run):
    request = pb.ComputeRewardStatisticsRequest(
        run_id=run, group_sizes=group_sizes, utilities=utilities, token_counts=token_counts, truncated=truncated,
        gen_logp_sum=gen_logp, completions=completions, on_failure=on_failure, zero_truncated_completion_rewards=True,
        answers=answers,
    )
    for name in reward_names:
        request.rewards.add(name=name, weight=1.0, params=params)
    if q_temperature is not None:
        request.q_temperature = q_temperature
    if q_epsilon is not None:
        request.q_epsilon = q_epsilon
    if max_len is not None:
        request.max_completion_len = max_len
    request.seed_grpo.enabled = seed
    _check(stub, stub.ComputeRewardStatistics, request)


@FUZZ
@given(group_sizes=sizes, q=st.lists(floats, max_size=12), ref=st.lists(floats, max_size=12),
       counts_=st.lists(counts, max_size=12), include=st.none() | st.booleans(), by_tokens=st.booleans(),
       run=st.sampled_from([RUN, "", "missing-run", "bad id!"]))
def test_compute_weight_stats(stub, group_sizes, q, ref, counts_, include, by_tokens, run):
    request = pb.ComputeWeightStatsRequest(run_id=run, group_sizes=group_sizes, q_values=q, ref_logp_sum=ref,
                                           ref_token_counts=counts_, normalize_by_tokens=by_tokens)
    if include is not None:
        request.include_reference_term = include
    _check(stub, stub.ComputeWeightStats, request)


@FUZZ
@given(group_sizes=sizes, utilities=st.lists(floats, max_size=12), ref=st.lists(floats, max_size=12),
       counts_=st.lists(counts, max_size=12), include=st.none() | st.booleans(), by_tokens=st.booleans(),
       scale=st.none() | st.booleans(), scaling=st.integers(-1, 5), baseline=st.integers(-1, 4),
       completions=st.lists(texts, max_size=6), reward_names=st.lists(st.sampled_from(["format", "length", "nope"]),
                                                                     max_size=2),
       run=st.sampled_from([RUN, RUN, "", "missing-run", "bad id!"]))
def test_compute_step_statistics(stub, group_sizes, utilities, ref, counts_, include, by_tokens, scale, scaling,
                                 baseline, completions, reward_names, run):
    request = pb.ComputeStepStatisticsRequest(
        run_id=run, group_sizes=group_sizes, utilities=utilities, ref_logp_sum=ref, ref_token_counts=counts_,
        normalize_by_tokens=by_tokens, advantage_scaling=scaling, advantage_baseline=baseline,
        completions=completions,
    )
    for name in reward_names:
        request.rewards.add(name=name, weight=1.0)
    if include is not None:
        request.include_reference_term = include
    if scale is not None:
        request.scale_rewards = scale
    _check(stub, stub.ComputeStepStatistics, request)


@FUZZ
@given(step=st.integers(-3, 10**12), entropy=st.none() | floats, kl=st.none() | floats, tau_grad=st.none() | floats,
       lr_scale=st.none() | floats, expected=st.none() | st.integers(-2, 5), request_id=st.text(max_size=140),
       run=st.sampled_from([RUN, RUN, "", "missing-run", "bad id!"]))
def test_update_controller_rejections_change_nothing(stub, step, entropy, kl, tau_grad, lr_scale, expected,
                                                     request_id, run):
    request = pb.UpdateControllerRequest(run_id=run, global_step=step, request_id=request_id)
    for name, value in (("weight_entropy", entropy), ("measured_kl", kl), ("tau_grad", tau_grad),
                        ("lr_scale", lr_scale)):
        if value is not None:
            setattr(request, name, value)
    # Only malformed requests are sent: an accepted one would change the state.
    # (In range is |x| <= 1e6; some out-of-range ones are also made malformed here.)
    if request.global_step >= 0 and all(v is None or abs(v) <= 1e6 for v in (entropy, kl, tau_grad, lr_scale)) \
            and len(request_id) <= 128 and (expected is None or expected >= 0):
        request.global_step = -1
    if expected is not None:
        request.expected_version = expected
    assert _check(stub, stub.UpdateController, request) != grpc.StatusCode.OK


@FUZZ
@given(run_id=st.text(max_size=140), tau=floats, beta=floats, q_eps=st.none() | floats, denominator=st.integers(0, 5),
       tau_min=floats, tau_max=floats, warmup=st.integers(-5, 5))
def test_create_run(stub, run_id, tau, beta, q_eps, denominator, tau_min, tau_max, warmup):
    config = pb.WeightingConfig(tau=tau, beta=beta, denominator=denominator, tau_min=tau_min, tau_max=tau_max,
                                tau_warmup_steps=warmup)
    if q_eps is not None:
        config.q_epsilon = q_eps
    code = _check(stub, stub.CreateRun, pb.CreateRunRequest(run_id=run_id, config=config))
    if code == grpc.StatusCode.OK:
        stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id))


@FUZZ
@given(run_id=st.one_of(st.text(max_size=140), st.sampled_from([RUN, "x" * 129, "a/b:c.d-e_f"])),
       page_size=st.integers(-5, 5000), page_token=st.one_of(st.text(max_size=30), st.sampled_from(["", "YQ==", "%%"])))
def test_read_and_delete_rpcs(stub, run_id, page_size, page_token):
    _check(stub, stub.GetRun, pb.GetRunRequest(run_id=run_id))
    _check(stub, stub.ListRuns, pb.ListRunsRequest(page_size=page_size, page_token=page_token))
    _check(stub, stub.ListRewardFunctions, pb.ListRewardFunctionsRequest())
    if run_id != RUN:  # deleting the probe run would be a deliberate state change
        _check(stub, stub.DeleteRun, pb.DeleteRunRequest(run_id=run_id))


def test_oversize_message_is_resource_exhausted(stub):
    request = pb.ComputeRewardStatisticsRequest(group_sizes=[1], completions=["x" * (65 * 1024 * 1024)])
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeRewardStatistics(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_config_defaults_round_trip(client, run_id):
    run = client.create_run(run_id, WeightingConfig(tau=1.0))
    assert run.config.length_normalize_ref is True and run.config.scale_rewards is True
