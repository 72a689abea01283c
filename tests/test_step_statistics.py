"""ComputeStepStatistics through a real server: one round trip equals the two
calls it fuses, and the advantage options (TRL's scaling vocabulary, the RLOO
baseline, the zero-variance group mask) match the plain reference."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

import reference as ref
from maxent_client import (
    AsyncMaxEntClient,
    InvalidArgumentError,
    NotFoundError,
    RewardFailurePolicy,
    RewardTerm,
    WeightingConfig,
)
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_client.errors import from_rpc_error


def _batch(seed: int, groups: int = 12, k: int = 6):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, k + 1, size=groups)
    n = int(sizes.sum())
    utilities = rng.choice([0.0, 0.5, 1.0, 2.0], size=n)  # ties: some groups come out all equal
    return sizes, utilities, rng.normal(-20, 4, size=n), rng.integers(0, 40, size=n)


def test_step_equals_the_two_calls_and_the_reference(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.35, beta=0.07, q_temperature=0.8))
    sizes, utilities, ref_logp, counts = _batch(1)
    step = client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes, ref_logp_sum=ref_logp,
                                          ref_token_counts=counts)
    rewards = client.compute_reward_statistics(utilities=utilities, group_sizes=sizes, run_id=run_id)
    weights = client.compute_weight_stats(run_id, q_values=rewards.q_values, group_sizes=sizes,
                                          ref_logp_sum=ref_logp, ref_token_counts=counts)
    for name in ("total_utils", "advantages", "q_values", "zero_variance_groups"):
        np.testing.assert_array_equal(getattr(step, name), getattr(rewards, name), err_msg=name)
    for name in ("weights", "advantage_entropy", "group_weight_entropies"):
        np.testing.assert_array_equal(getattr(step, name), getattr(weights, name), err_msg=name)
    assert (step.reward_mean, step.reward_std) == (rewards.reward_mean, rewards.reward_std)
    assert (step.weight_entropy, step.tau, step.beta, step.controller_version) == (
        weights.weight_entropy, 0.35, 0.07, 0)

    want = ref.reward_statistics(sizes.tolist(), utilities.tolist(), q_temperature=0.8)
    np.testing.assert_allclose(step.advantages, want.advantages, atol=1e-9)
    assert step.zero_variance_groups.tolist() == want.zero_variance_groups
    assert step.zero_variance_groups.any() and not step.zero_variance_groups.all()
    w = ref.weight_stats(sizes.tolist(), want.q_values, ref_logp.tolist(), counts.tolist(), tau=0.35, beta=0.07)
    np.testing.assert_allclose(step.weights, w.weights, atol=1e-9)
    assert step.weight_entropy == pytest.approx(w.weight_entropy, abs=1e-9)
    assert [len(g) for g in step.grouped()["weights"]] == sizes.tolist()


def test_step_reads_the_controller_it_weights_with(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, target_entropy=0.1, tau_lr=0.5))
    kwargs = dict(utilities=[[1.0, 0.0, 0.0]], include_reference_term=False)
    before = client.compute_step_statistics(run_id, **kwargs)
    state = client.update_controller(run_id, global_step=1, weight_entropy=before.weight_entropy).state
    after = client.compute_step_statistics(run_id, **kwargs)
    assert after.controller_version == 1 and after.tau == state.tau < 0.5
    assert after.weight_entropy < before.weight_entropy  # a lower tau sharpens the weights


def test_step_with_reward_terms_and_the_grpo_objective(client, run_id):
    client.create_run(run_id, WeightingConfig(train_grpo_objective=True, scale_rewards="none"))
    completions = ["\\boxed{4}", "no", "\\boxed{3}", "\\boxed{3}"]
    step = client.compute_step_statistics(run_id, completions=completions, answers=["4", "3"], group_sizes=[2, 2],
                                          rewards=[RewardTerm("boxed_accuracy", 1.0)])
    assert step.total_utils.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert step.advantages.tolist() == [0.5, -0.5, 0.0, 0.0]
    np.testing.assert_array_equal(step.weights, step.advantages)  # GRPO objective: weights are the advantages
    assert step.zero_variance_groups.tolist() == [False, True]
    assert step.per_reward["boxed_accuracy"].values.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert step.weight_entropy == 0.0


def test_excluded_completions_have_no_utility(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.1))
    step = client.compute_step_statistics(run_id, completions=["fine", "RAISE here", "fine too", "ok"],
                                          answers=["", ""], group_sizes=[2, 2], rewards=[RewardTerm("flaky", 1.0)],
                                          ref_logp_sum=[-3.0, -2.0, -1.0, -2.5], ref_token_counts=[5, 5, 5, 5])
    assert step.failed.tolist() == [False, True, False, False]
    assert np.isnan(step.total_utils[1]) and np.isfinite(step.total_utils[[0, 2, 3]]).all()
    assert step.q_values[1] == 0.0 and step.advantages[1] == 0.0 and step.weights[1] < 1e-12
    assert np.isfinite(step.weights).all() and np.isfinite(step.advantages).all()
    zero = client.compute_step_statistics(run_id, completions=["fine", "RAISE here", "fine too", "ok"],
                                          answers=["", ""], group_sizes=[2, 2], rewards=[RewardTerm("flaky", 1.0)],
                                          ref_logp_sum=[-3.0, -2.0, -1.0, -2.5], ref_token_counts=[5, 5, 5, 5],
                                          on_failure=RewardFailurePolicy.ZERO)
    assert zero.total_utils[1] == 0.0 and zero.failed[1]


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("baseline", ["group_mean", "leave_one_out"])
def test_scaling_and_baseline_match_the_reference(client, scale, baseline):
    sizes, utilities, _, _ = _batch(2)
    got = client.compute_reward_statistics(utilities=utilities, group_sizes=sizes, scale_rewards=scale,
                                           advantage_baseline=baseline)
    want = ref.reward_statistics(sizes.tolist(), utilities.tolist(), scale_rewards=scale, baseline=baseline)
    np.testing.assert_allclose(got.advantages, want.advantages, atol=1e-9)
    assert got.zero_variance_groups.tolist() == want.zero_variance_groups


def test_run_config_keeps_the_advantage_options(client, run_id):
    config = WeightingConfig(tau=0.2, scale_rewards="batch", advantage_baseline="leave_one_out")
    run = client.create_run(run_id, config)
    assert (run.config.scale_rewards, run.config.advantage_baseline) == ("batch", "leave_one_out")
    assert client.create_run(run_id, config).config == run.config  # idempotent
    sizes, utilities, _, _ = _batch(3)
    got = client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes, include_reference_term=False)
    want = ref.reward_statistics(sizes.tolist(), utilities.tolist(), scale_rewards="batch", baseline="leave_one_out")
    np.testing.assert_allclose(got.advantages, want.advantages, atol=1e-9)
    # a request overrides the run's default
    plain = client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes, scale_rewards=False,
                                           advantage_baseline="group_mean", include_reference_term=False)
    want = ref.reward_statistics(sizes.tolist(), utilities.tolist(), scale_rewards=False)
    np.testing.assert_allclose(plain.advantages, want.advantages, atol=1e-12)


def test_bad_step_requests_name_the_field_and_change_nothing(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.3, beta=0.1))
    with pytest.raises(InvalidArgumentError) as missing:
        client.compute_step_statistics(run_id, utilities=[[1.0, 0.0]])
    fields = {v.field for v in missing.value.violations}
    assert {"ref_logp_sum", "ref_token_counts"} <= fields
    with pytest.raises(InvalidArgumentError) as mixed:
        client.compute_step_statistics(run_id, utilities=[[1.0, float("nan")]], ref_logp_sum=[[-1.0]],
                                       ref_token_counts=[[1, 1]])
    fields = {v.field for v in mixed.value.violations}
    assert {"utilities[1]", "ref_logp_sum"} <= fields  # reward and weight inputs reported together
    with pytest.raises(InvalidArgumentError, match="run_id"):
        client.compute_step_statistics("", utilities=[[1.0]], include_reference_term=False)
    with pytest.raises(NotFoundError):
        client.compute_step_statistics(run_id + "-missing", utilities=[[1.0]], include_reference_term=False)
    with pytest.raises(ValueError, match="scale_rewards"):
        client.compute_step_statistics(run_id, utilities=[[1.0]], scale_rewards="groups")
    with pytest.raises(ValueError, match="advantage_baseline"):
        client.compute_reward_statistics(utilities=[[1.0]], advantage_baseline="median")
    with pytest.raises(InvalidArgumentError, match="contradicts advantage_scaling") as conflict:
        _create_conflicting_run(client, run_id + "-conflict")
    assert [v.field for v in conflict.value.violations] == ["config.scale_rewards"]
    with pytest.raises(NotFoundError):
        client.get_run(run_id + "-conflict")
    assert client.get_run(run_id).state.version == 0


def _create_conflicting_run(client, run_id):
    """CreateRun with scale_rewards=false and advantage_scaling BATCH, over the raw stub."""
    config = pb.WeightingConfig(tau=1.0, scale_rewards=False, advantage_scaling=pb.ADVANTAGE_SCALING_BATCH)
    try:
        client._stub.CreateRun(pb.CreateRunRequest(run_id=run_id, config=config), timeout=10)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    raise AssertionError("a contradictory config was accepted")


def test_async_client_step(server, run_id):
    async def main():
        async with AsyncMaxEntClient(server.target) as client:
            await client.create_run(run_id, WeightingConfig(tau=0.5))
            return await client.compute_step_statistics(run_id, utilities=[[1.0, 0.0], [0.5, 0.5]],
                                                        include_reference_term=False)

    step = asyncio.run(main())
    assert step.zero_variance_groups.tolist() == [False, True]
    assert step.weights[2:].tolist() == [0.5, 0.5] and step.weights[0] > step.weights[1]


def test_read_mask_sends_only_the_named_arrays(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.4))
    sizes, utilities, _, _ = _batch(4)
    full = client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes, include_reference_term=False)
    masked = client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes,
                                            include_reference_term=False, read_mask=("weights", "zero_variance_groups"))
    np.testing.assert_array_equal(masked.weights, full.weights)
    np.testing.assert_array_equal(masked.zero_variance_groups, full.zero_variance_groups)
    assert masked.advantages.size == masked.q_values.size == masked.total_utils.size == 0
    assert (masked.weight_entropy, masked.reward_mean, masked.tau) == (full.weight_entropy, full.reward_mean, 0.4)
    with pytest.raises(InvalidArgumentError) as bad:
        client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes,
                                       include_reference_term=False, read_mask=("weights", "tau"))
    assert [v.field for v in bad.value.violations] == ["read_mask.paths[1]"]
    with pytest.raises(TypeError, match="read_mask"):
        client.compute_step_statistics(run_id, utilities=[[1.0]], read_mask="weights")


def _plain_scope(sizes, q, group_entropies):
    """(max entropy, mixed mean entropy or None, mixed count, mixed max entropy), group by group."""
    logs, mixed, mixed_logs, start = [], [], [], 0
    for g, k in enumerate(sizes):
        members = q[start:start + k]
        start += k
        if k == 0:
            continue
        logs.append(np.log(k))
        if max(members) - min(members) > 1e-8:
            mixed.append(group_entropies[g])
            mixed_logs.append(np.log(k))
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return mean(logs) or 0.0, mean(mixed), len(mixed), mean(mixed_logs) or 0.0


@pytest.mark.parametrize("scope", ["all_groups", "mixed_groups"])
def test_mixed_group_entropy_and_the_scope_a_trainer_reports(client, run_id, scope):
    client.create_run(run_id, WeightingConfig(tau=0.3, entropy_scope=scope))
    assert client.get_run(run_id).config.entropy_scope == scope
    sizes, utilities, _, _ = _batch(5)
    step = client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes, include_reference_term=False)
    max_all, mixed, count, max_mixed = _plain_scope(sizes.tolist(), step.q_values.tolist(),
                                                    step.group_weight_entropies.tolist())
    assert 0 < count < int((sizes > 0).sum())
    assert step.max_weight_entropy == pytest.approx(max_all, abs=1e-12)
    assert step.mixed_weight_entropy == pytest.approx(mixed, abs=1e-12) and step.mixed_group_count == count
    if scope == "mixed_groups":
        assert step.controller_weight_entropy == step.mixed_weight_entropy
        assert step.controller_max_weight_entropy == pytest.approx(max_mixed, abs=1e-12)
    else:
        assert step.controller_weight_entropy == step.weight_entropy
        assert step.controller_max_weight_entropy == step.max_weight_entropy
    weights = client.compute_weight_stats(run_id, q_values=step.q_values, group_sizes=sizes,
                                          include_reference_term=False)
    assert (weights.mixed_weight_entropy, weights.controller_weight_entropy) == (
        step.mixed_weight_entropy, step.controller_weight_entropy)


def test_a_batch_without_mixed_groups_has_no_mixed_entropy(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.3, entropy_scope="mixed_groups"))
    step = client.compute_step_statistics(run_id, utilities=[[1.0, 1.0], [0.0, 0.0, 0.0]],
                                          include_reference_term=False)
    assert step.mixed_weight_entropy is None and step.mixed_group_count == 0
    assert step.controller_weight_entropy is None  # nothing for tau to act on: send no entropy
    assert step.max_weight_entropy == pytest.approx((np.log(2) + np.log(3)) / 2)
    with pytest.raises(ValueError, match="entropy_scope"):
        client.create_run(run_id + "-bad", WeightingConfig(tau=0.3, entropy_scope="some"))
