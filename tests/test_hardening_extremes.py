"""Finite extreme values (docs/math.md, "Input ranges"): each attack below
once poisoned a run or came back as NaN with OK. Now each is INVALID_ARGUMENT
naming the field, the run's state is unchanged, and every OK response holds
only finite numbers."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc


@pytest.fixture()
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.MaxEntServiceStub(channel)
    channel.close()


def _fields(call) -> set[str]:
    """The violated fields of a call that must be INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    status = rpc_status.from_call(info.value)
    fields = set()
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.update(v.field for v in bad.field_violations)
    return fields


def _state(stub, run_id):
    return stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.state


def _finite(*values) -> bool:
    return all(np.isfinite(np.asarray(list(v) if not np.isscalar(v) else v, dtype=np.float64)).all() for v in values)


def test_huge_weight_entropy_cannot_pin_tau(stub, run_id):
    stub.CreateRun(pb.CreateRunRequest(run_id=run_id, config=pb.WeightingConfig(
        tau=0.5, beta=0.1, tau_lr=0.1, target_entropy=1.0)))
    before = _state(stub, run_id)
    update = pb.UpdateControllerRequest(run_id=run_id, global_step=1, weight_entropy=1e300)
    assert _fields(lambda: stub.UpdateController(update)) == {"weight_entropy"}
    assert _state(stub, run_id) == before
    # The run still works: a sane entropy below target raises tau.
    state = stub.UpdateController(pb.UpdateControllerRequest(run_id=run_id, global_step=1, weight_entropy=0.5)).state
    assert state.tau > 0.5 and math.isfinite(state.tau_log)


def test_negative_entropy_and_kl_are_refused(stub, run_id):
    stub.CreateRun(pb.CreateRunRequest(run_id=run_id, config=pb.WeightingConfig(tau=0.5, beta=0.1)))
    for name in ("weight_entropy", "measured_kl", "max_weight_entropy", "lr_scale"):
        update = pb.UpdateControllerRequest(run_id=run_id, global_step=1, **{name: -1e-3})
        assert _fields(lambda: stub.UpdateController(update)) == {name}
    for name in ("tau_grad", "beta_grad", "lr_scale", "measured_kl"):
        update = pb.UpdateControllerRequest(run_id=run_id, global_step=1, **{name: 1e7})
        assert _fields(lambda: stub.UpdateController(update)) == {name}
    assert _state(stub, run_id).version == 0


def _kl_run(stub, run_id, beta=0.1, **extra):
    config = pb.WeightingConfig(tau=0.5, beta=beta, kl_target=0.1, kl_horizon=1, kl_step_size=1e6, **extra)
    stub.CreateRun(pb.CreateRunRequest(run_id=run_id, config=config))


def _weights(stub, run_id):
    return stub.ComputeWeightStats(pb.ComputeWeightStatsRequest(
        run_id=run_id, group_sizes=[2], q_values=[0.25, 0.75], ref_logp_sum=[-10.0, -20.0], ref_token_counts=[5, 5]))


def test_huge_kl_cannot_make_beta_infinite(stub, run_id):
    _kl_run(stub, run_id)
    before = _state(stub, run_id)
    update = pb.UpdateControllerRequest(run_id=run_id, global_step=1, measured_kl=1e308)
    assert _fields(lambda: stub.UpdateController(update)) == {"measured_kl"}
    assert _state(stub, run_id) == before
    response = _weights(stub, run_id)
    assert _finite(response.weights, response.weight_entropy, response.beta)


def test_kl_steps_cannot_take_beta_beyond_the_state_limit(stub, run_id):
    _kl_run(stub, run_id)
    state = None
    for step in (1, 2):  # beta 0.1 -> ~1e5 -> ~1e11
        state = stub.UpdateController(pb.UpdateControllerRequest(run_id=run_id, global_step=step, measured_kl=1e6)).state
    assert 1e10 < state.beta < 1e12
    update = pb.UpdateControllerRequest(run_id=run_id, global_step=3, measured_kl=1e6)
    assert _fields(lambda: stub.UpdateController(update)) == {"measured_kl"}
    assert _state(stub, run_id) == state
    response = _weights(stub, run_id)
    assert _finite(response.weights, response.group_weight_entropies, response.weight_entropy)


def test_pooled_step_beyond_the_state_limit_writes_nothing(stub, run_id):
    """The flush of a pooled step runs inside the store's step: refused there, nothing is written."""
    _kl_run(stub, run_id, beta=1e6, reporters_per_step=2)
    first = stub.UpdateController(pb.UpdateControllerRequest(
        run_id=run_id, global_step=1, measured_kl=1e6, reporter_id="a")).state
    assert first.version == 0 and first.pending_step == 1
    second = pb.UpdateControllerRequest(run_id=run_id, global_step=1, measured_kl=1e6, reporter_id="b",
                                        request_id="flush")
    assert _fields(lambda: stub.UpdateController(second)) == {"measured_kl"}
    assert _state(stub, run_id) == first
    # The request id was not recorded: a report under the same id that
    # brings the pooled mean down applies.
    second.measured_kl, second.sample_count = 0.0, 1e12
    response = stub.UpdateController(second)
    assert not response.replayed and response.state.version == 1 and math.isfinite(response.state.beta)


def test_huge_sample_count_is_refused(stub, run_id):
    _kl_run(stub, run_id, reporters_per_step=2)
    update = pb.UpdateControllerRequest(run_id=run_id, global_step=1, measured_kl=1e6, reporter_id="a",
                                        sample_count=1e305)
    assert _fields(lambda: stub.UpdateController(update)) == {"sample_count"}
    assert _state(stub, run_id).version == 0


def test_huge_utilities_are_refused_not_nan(stub):
    request = pb.ComputeRewardStatisticsRequest(group_sizes=[2], utilities=[1e308, 1e308])
    assert _fields(lambda: stub.ComputeRewardStatistics(request)) == {"utilities[0]"}
    request = pb.ComputeRewardStatisticsRequest(group_sizes=[2, 1], utilities=[1e15, 1e16, -1e15])
    assert _fields(lambda: stub.ComputeRewardStatistics(request)) == {"utilities[1]"}


def test_utilities_at_the_bound_stay_finite(stub, run_id):
    stub.CreateRun(pb.CreateRunRequest(run_id=run_id, config=pb.WeightingConfig(tau=1e-6, beta=1e6)))
    utilities = [1e15, 1e15, -1e15, 1e15, -1e15, 1e15]
    for scaling in (pb.ADVANTAGE_SCALING_GROUP, pb.ADVANTAGE_SCALING_BATCH, pb.ADVANTAGE_SCALING_NONE):
        r = stub.ComputeRewardStatistics(pb.ComputeRewardStatisticsRequest(
            group_sizes=[3, 3], utilities=utilities, advantage_scaling=scaling, q_temperature=1e-300))
        assert _finite(r.advantages, r.q_values, r.total_utils, r.reward_mean, r.reward_std)
        s = stub.ComputeStepStatistics(pb.ComputeStepStatisticsRequest(
            run_id=run_id, group_sizes=[3, 3], utilities=utilities, advantage_scaling=scaling,
            ref_logp_sum=[1e15, -1e15, 1e15, -1e15, 0.0, 1e15], ref_token_counts=[1] * 6))
        assert _finite(s.advantages, s.q_values, s.weights, s.group_weight_entropies, s.advantage_entropy,
                       s.weight_entropy, s.reward_std)


def test_huge_reference_and_logp_sums_are_refused(stub, run_id):
    stub.CreateRun(pb.CreateRunRequest(run_id=run_id, config=pb.WeightingConfig(tau=0.5, beta=0.1)))
    request = pb.ComputeWeightStatsRequest(run_id=run_id, group_sizes=[2], q_values=[0.5, 0.5],
                                           ref_logp_sum=[-1e308, 1e308], ref_token_counts=[1, 1])
    assert _fields(lambda: stub.ComputeWeightStats(request)) == {"ref_logp_sum[0]"}
    request = pb.ComputeRewardStatisticsRequest(group_sizes=[2], utilities=[0.0, 1.0], gen_logp_sum=[-1e300, 0.0],
                                                token_counts=[1, 1], completions=["a", "b"])
    request.seed_grpo.enabled = True
    assert "gen_logp_sum[0]" in _fields(lambda: stub.ComputeRewardStatistics(request))


def test_config_and_import_ranges(stub, run_id):
    for name, value in (("tau", 1e300), ("beta", 1e7), ("tau_lr", 1e300), ("kl_step_size", 1e308),
                        ("kl_target", -1e7), ("target_entropy", 1e300), ("q_temperature", 1e300)):
        config = pb.WeightingConfig(**{"tau": 0.5, "beta": 0.1, name: value})
        assert _fields(lambda: stub.CreateRun(pb.CreateRunRequest(run_id=run_id, config=config))) == {
            f"config.{name}"}
    imported = pb.CreateRunRequest(run_id=run_id, config=pb.WeightingConfig(tau=0.5, beta=0.1),
                                   initial_state=pb.ControllerState(tau=0.5, beta=1e300))
    assert _fields(lambda: stub.CreateRun(imported)) == {"initial_state.beta"}


def test_reward_term_weight_range(stub):
    request = pb.ComputeRewardStatisticsRequest(group_sizes=[2], completions=["a", "b"])
    request.rewards.add(name="format", weight=1e308)
    assert "rewards[0].weight" in _fields(lambda: stub.ComputeRewardStatistics(request))


def test_final_guard_turns_non_finite_results_into_invalid_argument():
    from maxent_server.service import _check_result
    from maxent_server.domain.validation import InvalidArgument

    _check_result("weight statistic", "q_values", weights=np.array([0.5, 0.5]), tau=0.5, failed=None)
    with pytest.raises(InvalidArgument) as info:
        _check_result("weight statistic", "q_values", weights=np.array([0.5, np.nan]), tau=0.5)
    assert [field for field, _ in info.value.violations] == ["q_values"]
    with pytest.raises(InvalidArgument):
        _check_result("reward statistic", "utilities", reward_std=math.inf)
