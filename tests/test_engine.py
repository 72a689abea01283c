"""The torch engine against the plain reference of docs/math.md §2-§6 (tests/reference.py).

Everything is compared within 1e-6 absolute/relative: |engine − reference| ≤
1e-6 · max(1, |reference|).
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402

from maxent_server.domain import AdvantageBaseline, WeightDenominator, final_answer  # noqa: E402
from maxent_server.engine import (  # noqa: E402
    Engine,
    RewardOptions,
    SeedGrpoOptions,
    WeightOptions,
    combine_rewards,
)

TOL = 1e-6
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ENGINE = Engine(device="cpu")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return ENGINE


# --------------------------------------------------------------------------
# helpers


def assert_close(actual, expected, tol: float = TOL, what: str = "") -> None:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    if a.size == 0:
        return
    assert np.all(np.isfinite(a) == np.isfinite(e)), f"{what}: finiteness differs\n{a}\n{e}"
    finite = np.isfinite(e)
    err = np.abs(a[finite] - e[finite])
    bound = tol * np.maximum(1.0, np.abs(e[finite]))
    worst = int(np.argmax(err - bound)) if err.size else 0
    assert np.all(err <= bound), f"{what}: max err {err.max() if err.size else 0} (at {worst})\nengine={a}\nreference={e}"
    assert np.array_equal(a[~finite], e[~finite]), f"{what}: non-finite values differ"


def group_slices(sizes):
    start = 0
    for k in sizes:
        yield slice(start, start + k)
        start += k


def engine_rewards(sizes, utils, options=RewardOptions(), **kw):
    arrays = {}
    for key, value in kw.items():
        if value is None or key == "answers":
            arrays[key] = value
        elif key in ("valid", "truncated"):
            arrays[key] = np.asarray(value, dtype=bool)
        elif key == "token_counts":
            arrays[key] = np.asarray(value, dtype=np.int64)
        else:
            arrays[key] = np.asarray(value, dtype=np.float64)
    return ENGINE.reward_statistics(
        np.asarray(sizes, dtype=np.int64), np.asarray(utils, dtype=np.float64), options, **arrays
    )


def seed_dict(s: SeedGrpoOptions | None):
    if s is None:
        return None
    return dict(
        alpha=s.alpha,
        normalize_by_max_entropy=s.normalize_by_max_entropy,
        length_normalize_logprobs=s.length_normalize_logprobs,
        num_generations=s.num_generations,
    )


def check_rewards(sizes, utils, options=RewardOptions(), **kw):
    """Run engine and reference on the same input and compare every output."""
    got = engine_rewards(sizes, utils, options, **kw)
    want = ref.reward_statistics(
        list(sizes),
        list(map(float, utils)),
        valid=kw.get("valid"),
        token_counts=kw.get("token_counts"),
        truncated=kw.get("truncated"),
        zero_truncated_completion_rewards=options.zero_truncated_completion_rewards,
        max_completion_len=options.max_completion_len,
        scale_rewards=options.scale_rewards,
        baseline=options.advantage_baseline.value if hasattr(options.advantage_baseline, "value")
        else options.advantage_baseline,
        q_temperature=options.q_temperature,
        q_epsilon=options.q_epsilon,
        seed=seed_dict(options.seed_grpo),
        gen_logp_sum=kw.get("gen_logp_sum"),
        answers=kw.get("answers"),
    )
    assert_close(got.total_utils, want.total_utils, what="total_utils")
    assert_close(got.advantages, want.advantages, what="advantages")
    assert_close(got.q_values, want.q_values, what="q")
    assert_close(got.reward_mean, want.reward_mean, what="reward_mean")
    assert_close(got.reward_std, want.reward_std, what="reward_std")
    assert got.zero_variance_groups.tolist() == want.zero_variance_groups, "zero_variance_groups"
    if options.seed_grpo is None:
        assert got.seed_semantic_entropies is None and got.seed_advantage_scales is None
    else:
        assert_close(got.seed_semantic_entropies, want.seed_semantic_entropies, what="semantic entropy")
        assert_close(got.seed_advantage_scales, want.seed_advantage_scales, what="seed scales")
    return got, want


def weight_kwargs(options: WeightOptions) -> dict:
    return dict(
        tau=options.tau,
        beta=options.beta,
        denominator=options.denominator.value,
        include_reference_term=options.include_reference_term,
        normalize_by_tokens=options.normalize_by_tokens,
        length_normalize_ref=options.length_normalize_ref,
        train_grpo_objective=options.train_grpo_objective,
    )


def check_weights(sizes, q, ref_logp, ref_counts, options: WeightOptions, advantages=None):
    got = ENGINE.weight_stats(
        np.asarray(sizes, dtype=np.int64),
        np.asarray(q, dtype=np.float64),
        np.asarray(ref_logp, dtype=np.float64),
        None if ref_counts is None else np.asarray(ref_counts, dtype=np.int64),
        options,
        advantages=None if advantages is None else np.asarray(advantages, dtype=np.float64),
    )
    want = ref.weight_stats(
        list(sizes),
        list(map(float, q)),
        list(map(float, ref_logp)),
        None if ref_counts is None else list(map(int, ref_counts)),
        advantages=advantages,
        **weight_kwargs(options),
    )
    assert_close(got.weights, want.weights, what="weights")
    assert_close(got.group_entropies, want.group_entropies, what="group entropies")
    assert_close(got.weight_entropy, want.weight_entropy, what="entropy mean")
    assert_close(got.weight_entropy_min, want.weight_entropy_min, what="entropy min")
    assert_close(got.weight_entropy_max, want.weight_entropy_max, what="entropy max")
    assert_close(got.advantage_entropy, want.advantage_entropy, what="advantage entropy")
    return got, want


# --------------------------------------------------------------------------
# the reference itself against hand-computed numbers (guards the oracle)


def test_reference_matches_hand_computed_values():
    # Bessel std of 1,2,3,4 is sqrt(5/3).
    adv = ref.group_advantages([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5.0 / 3.0)
    assert adv == pytest.approx([-1.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 1.5 / (std + 1e-4)])
    assert ref.group_advantages([7.0]) == [0.0]
    assert ref.reward_moments([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(1.25)))
    # q with epsilon 0 is the softmax
    q = ref.listwise_q([0.0, math.log(3.0)], epsilon=0.0)
    assert q == pytest.approx([0.25, 0.75])
    # semantic entropy of clusters {a,a}, {b}, {None}: P = 1/2, 1/4, 1/4
    h = ref.semantic_entropy(["a", "a", "b", None], [-1.0] * 4, [1] * 4)
    assert h == pytest.approx(1.5 * math.log(2.0))
    # closed form: q^(1/(tau+beta)) * pi_ref^(beta/(tau+beta))
    w = ref.maxent_weights([0.5, 0.25, 0.25], [math.log(0.2), math.log(0.3), math.log(0.5)], None, tau=1.0, beta=1.0)
    raw = [math.sqrt(0.5 * 0.2), math.sqrt(0.25 * 0.3), math.sqrt(0.25 * 0.5)]
    assert w == pytest.approx([r / sum(raw) for r in raw])


# --------------------------------------------------------------------------
# fixed examples: reward statistics


def test_single_group_hand_computed(engine):
    got, _ = check_rewards([4], [1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5.0 / 3.0)
    assert_close(got.advantages, [x / (std + 1e-4) for x in (-1.5, -0.5, 0.5, 1.5)])
    assert got.reward_mean == pytest.approx(2.5)
    assert got.reward_std == pytest.approx(math.sqrt(1.25))
    p = np.exp([1.0, 2.0, 3.0, 4.0])
    p /= p.sum()
    q = p * (1 - 4e-6) + 1e-6
    assert_close(got.q_values, q / q.sum(), tol=1e-12)


def test_ragged_batch_with_empty_groups_and_groups_of_one():
    sizes = [0, 3, 1, 0, 5, 1, 0]
    utils = [0.5, -1.0, 2.0, 9.0, 1.0, 1.0, 1.0, 3.0, -2.0, -4.0]
    got, _ = check_rewards(sizes, utils)
    # groups of one: advantage 0, q = 1
    assert got.advantages[3] == 0.0 and got.q_values[3] == pytest.approx(1.0)
    assert got.advantages[9] == 0.0 and got.q_values[9] == pytest.approx(1.0)
    check_rewards(sizes, utils, RewardOptions(scale_rewards=False))


def test_empty_batch():
    got, _ = check_rewards([], [])
    assert got.advantages.shape == (0,) and got.reward_mean == 0.0 and got.reward_std == 0.0
    got, _ = check_rewards([0, 0], [])
    assert got.q_values.shape == (0,)


def test_batch_scaling_and_leave_one_out_hand_computed(engine):
    sizes, utils = [3, 2], [1.0, 0.0, 0.5, 0.2, 0.9]
    batch_std = float(np.std(utils, ddof=1))  # 0.432434...
    got = engine.reward_statistics(np.array(sizes), np.array(utils), RewardOptions(scale_rewards="batch"))
    want = [0.5, -0.5, 0.0, -0.35, 0.35]
    assert_close(got.advantages, [a / (batch_std + 1e-4) for a in want])
    rloo_options = RewardOptions(scale_rewards="none", advantage_baseline=AdvantageBaseline.LEAVE_ONE_OUT)
    rloo = engine.reward_statistics(np.array(sizes), np.array(utils), rloo_options)
    # u_i minus the mean of the others: 1 - 0.25, 0 - 0.75, 0.5 - 0.5; 0.2 - 0.9, 0.9 - 0.2
    assert_close(rloo.advantages, [0.75, -0.75, 0.0, -0.7, 0.7])


def test_zero_variance_groups(engine):
    sizes = np.array([3, 2, 1, 0, 2])
    utils = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 5.0, 2.0, 2.0 + 1e-9])
    got = engine.reward_statistics(sizes, utils, RewardOptions())
    assert got.zero_variance_groups.tolist() == [True, False, True, True, True]
    # a failed (excluded) completion does not count: the rest are all equal
    valid = np.array([True, True, True, False, True, True, True, True])
    masked = engine.reward_statistics(sizes, utils, RewardOptions(), valid=valid)
    assert masked.zero_variance_groups.tolist() == [True, True, True, True, True]


def test_all_equal_group_has_zero_advantage_and_uniform_q():
    got, _ = check_rewards([4], [2.0] * 4)
    assert np.all(got.advantages == 0.0)
    assert_close(got.q_values, [0.25] * 4, tol=1e-12)


@pytest.mark.parametrize("temperature", [1e-12, 1e-8, 0.0, 0.3, 1.0, 50.0])
def test_q_temperature(temperature):
    got, _ = check_rewards([3, 2], [1.0, 1.5, 0.0, -3.0, -3.0 + 1e-9], RewardOptions(q_temperature=temperature))
    assert np.all(got.q_values > 0)


@pytest.mark.parametrize("epsilon", [0.0, 1e-6, 1e-3, 0.05])
def test_q_epsilon(epsilon):
    got, _ = check_rewards([4, 3], [10.0, -10.0, 0.0, 3.0, 100.0, 0.0, -100.0], RewardOptions(q_epsilon=epsilon))
    if epsilon > 0:
        assert np.all(got.q_values > 0)


def test_large_utilities_are_stable():
    check_rewards([3, 2], [1e6, -1e6, 5e5, 3e8, -2e8])


# --------------------------------------------------------------------------
# the valid mask


def test_valid_mask_fixed_example():
    sizes = [4, 3, 2]
    utils = [1.0, 100.0, 3.0, 5.0, 2.0, 2.0, -7.0, 4.0, 8.0]
    valid = [True, False, True, True, False, False, False, True, True]
    got, _ = check_rewards(sizes, utils, valid=valid)
    invalid = ~np.asarray(valid)
    assert np.all(got.advantages[invalid] == 0.0)
    assert np.all(got.q_values[invalid] == 0.0)
    # group 0 computed only over 1, 3, 5 (mean 3, Bessel std 2)
    assert_close(got.advantages[[0, 2, 3]], [-2.0 / 2.0001, 0.0, 2.0 / 2.0001])
    assert got.q_values[:4].sum() == pytest.approx(1.0)
    # a group with no valid member: all zeros
    assert np.all(got.q_values[4:7] == 0.0) and np.all(got.advantages[4:7] == 0.0)
    # batch moments over the valid utilities only
    kept = np.asarray(utils)[~invalid]
    assert got.reward_mean == pytest.approx(kept.mean())
    assert got.reward_std == pytest.approx(kept.std())


def test_valid_mask_single_valid_member():
    got, _ = check_rewards([3], [1.0, 2.0, 3.0], valid=[False, True, False])
    assert_close(got.q_values, [0.0, 1.0, 0.0], tol=1e-12)
    assert np.all(got.advantages == 0.0)


def test_all_invalid_batch():
    got, _ = check_rewards([2, 1], [1.0, 2.0, 3.0], valid=[False, False, False])
    assert got.reward_mean == 0.0 and got.reward_std == 0.0
    assert np.all(got.q_values == 0.0) and np.all(got.advantages == 0.0)


# --------------------------------------------------------------------------
# zero_truncated_completion_rewards


def test_zero_truncated_by_flag_and_by_length():
    sizes = [3, 3]
    utils = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    truncated = [False, True, False, False, False, False]
    counts = [10, 5, 99, 100, 101, 3]
    options = RewardOptions(zero_truncated_completion_rewards=True, max_completion_len=100)
    got, _ = check_rewards(sizes, utils, options, truncated=truncated, token_counts=counts)
    # flag on #1, length >= 100 on #3 and #4; #2 (99 tokens) untouched
    assert list(got.total_utils) == [1.0, 0.0, 3.0, 0.0, 0.0, 6.0]


def test_zero_truncated_flags_only_and_disabled():
    sizes = [2, 2]
    utils = [1.0, 2.0, 3.0, 4.0]
    truncated = [True, False, False, True]
    options = RewardOptions(zero_truncated_completion_rewards=True)
    got, _ = check_rewards(sizes, utils, options, truncated=truncated, token_counts=[500, 500, 500, 500])
    assert list(got.total_utils) == [0.0, 2.0, 3.0, 0.0]  # no max length: counts do not matter
    got, _ = check_rewards(sizes, utils, RewardOptions(max_completion_len=1), truncated=truncated, token_counts=[5] * 4)
    assert list(got.total_utils) == utils  # option off: nothing zeroed


def test_zero_truncated_with_valid_mask():
    options = RewardOptions(zero_truncated_completion_rewards=True, max_completion_len=8)
    check_rewards(
        [4, 2],
        [1.0, -2.0, 3.0, 0.5, 4.0, 4.5],
        options,
        valid=[True, True, False, True, True, True],
        truncated=[False, False, True, True, False, False],
        token_counts=[1, 8, 2, 3, 7, 0],
    )


# --------------------------------------------------------------------------
# SEED-GRPO


def test_seed_grpo_fixed_example():
    sizes = [4, 3, 2]
    answers = ["a", "a", "b", None, "x", "x", "x", None, None]
    logp = [-4.0, -4.0, -4.0, -4.0, -3.0, -9.0, -1.0, -2.0, -2.0]
    counts = [4, 4, 4, 4, 2, 3, 1, 2, 2]
    options = RewardOptions(seed_grpo=SeedGrpoOptions())
    got, _ = check_rewards(sizes, [1.0, 0.0, 0.5, 0.2, 1.0, 0.0, 0.0, 1.0, 0.0], options,
                           gen_logp_sum=logp, token_counts=counts, answers=answers)
    alpha_eff = 0.0417 / math.log(4)
    h0 = 1.5 * math.log(2.0)
    assert_close(got.seed_semantic_entropies, [h0, 0.0, math.log(2.0)])
    assert_close(got.seed_advantage_scales, [1 / (1 + alpha_eff * h0), 1.0, 1 / (1 + alpha_eff * math.log(2.0))])
    plain = engine_rewards(sizes, [1.0, 0.0, 0.5, 0.2, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert_close(got.advantages[:4], plain.advantages[:4] * got.seed_advantage_scales[0])


def test_seed_grpo_answers_across_groups_do_not_merge():
    # the same answer string in two groups is two clusters, one per group
    options = RewardOptions(seed_grpo=SeedGrpoOptions())
    got, _ = check_rewards([2, 2], [0.0, 1.0, 1.0, 0.0], options,
                           gen_logp_sum=[-1.0] * 4, token_counts=[1] * 4, answers=["7", "8", "7", "8"])
    assert_close(got.seed_semantic_entropies, [math.log(2.0)] * 2)


@pytest.mark.parametrize(
    "seed",
    [
        SeedGrpoOptions(),
        SeedGrpoOptions(alpha=0.5, normalize_by_max_entropy=False),
        SeedGrpoOptions(alpha=1.0, length_normalize_logprobs=False),
        SeedGrpoOptions(alpha=0.2, num_generations=8),
    ],
)
def test_seed_grpo_settings(seed):
    sizes = [5, 0, 1, 3]
    answers = [None, None, "1", "1", "2", "q", "z", None, "z"]
    logp = [-10.0, -3.0, -7.5, -0.1, -40.0, -2.0, -5.0, -50.0, -1.0]
    counts = [10, 0, 3, 1, 20, 2, 5, 25, 1]
    check_rewards(sizes, [0.1, 0.9, 0.3, 0.3, 1.0, 0.0, 1.0, 0.0, 0.5], RewardOptions(seed_grpo=seed),
                  gen_logp_sum=logp, token_counts=counts, answers=answers)


def test_seed_grpo_no_answers_all_singletons():
    options = RewardOptions(seed_grpo=SeedGrpoOptions())
    got, _ = check_rewards([3], [0.0, 1.0, 2.0], options, gen_logp_sum=[-1.0, -1.0, -1.0],
                           token_counts=[1, 1, 1], answers=[None, None, None])
    assert_close(got.seed_semantic_entropies, [math.log(3.0)])


def test_seed_grpo_end_to_end_from_texts():
    texts = [
        "so the answer is \\boxed{42}",
        "first \\boxed{41} then \\boxed{ 42 }",
        "<answer>42</answer>",
        "\\fbox{\\frac{1}{2}}",
        "no answer here",
        "<answer>1</answer> and <answer>2</answer>",
    ]
    answers = [final_answer(t) for t in texts]
    assert answers == [ref.final_answer(t) for t in texts]
    assert answers == ["42", "42", "42", "\\frac{1}{2}", None, "1"]  # the first <answer> tag
    options = RewardOptions(seed_grpo=SeedGrpoOptions(num_generations=6))
    check_rewards([6], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], options, gen_logp_sum=[-5.0, -6.0, -4.0, -8.0, -9.0, -3.0],
                  token_counts=[5, 6, 4, 8, 9, 3], answers=answers)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\\boxed{a} <answer>b</answer>",
        "<answer>b</answer> \\boxed{a}",
        "\\boxed{{nested}{braces}}",
        "\\boxed {spaced}",
        "\\boxed{x} \\fbox{y}",
        "\\fbox{y} \\boxed{x}",
        "<answer>\nmulti\nline\n</answer>",
        "<answer>unclosed",
    ],
)
def test_final_answer_matches_reference(text):
    assert final_answer(text) == ref.final_answer(text)


# --------------------------------------------------------------------------
# combine_rewards


def test_combine_rewards_nan_sum():
    values = np.array([[1.0, np.nan, 3.0, np.nan], [0.5, 2.0, np.nan, np.nan]])
    weights = np.array([2.0, -1.0])
    got = combine_rewards(values, weights)
    want = ref.combine_rewards(values.tolist(), weights.tolist())
    assert_close(got, want)
    assert list(got) == [1.5, -2.0, 6.0, 0.0]


# --------------------------------------------------------------------------
# fixed examples: weights


@pytest.mark.parametrize("denominator", list(WeightDenominator))
@pytest.mark.parametrize("include_ref", [True, False])
@pytest.mark.parametrize("by_tokens", [False, True])
@pytest.mark.parametrize("length_norm", [True, False])
def test_weights_fixed_option_grid(denominator, include_ref, by_tokens, length_norm):
    sizes = [3, 0, 1, 4]
    q = [0.5, 0.3, 0.2, 1.0, 0.1, 0.2, 0.3, 0.4]
    ref_logp = [-12.0, -3.5, -40.0, -1.0, -100.0, -20.0, -0.5, -7.0]
    counts = [6, 2, 20, 1, 50, 0, 1, 7]
    options = WeightOptions(tau=0.7, beta=0.4, denominator=denominator, length_normalize_ref=length_norm,
                            include_reference_term=include_ref, normalize_by_tokens=by_tokens)
    got, _ = check_weights(sizes, q, ref_logp, counts, options)
    for s in group_slices(sizes):
        if s.stop > s.start:
            assert got.weights[s].sum() == pytest.approx(1.0, abs=1e-12)


def test_weights_equal_q_when_tau_one_and_no_beta():
    got, _ = check_weights([3], [0.5, 0.25, 0.25], [-1.0, -2.0, -3.0], [1, 1, 1], WeightOptions(tau=1.0, beta=0.0))
    assert_close(got.weights, [0.5, 0.25, 0.25], tol=1e-12)
    assert got.weight_entropy == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_tau_denominator_differs_from_tau_plus_beta():
    args = ([3], [0.6, 0.3, 0.1], [-2.0, -1.0, -6.0], [1, 1, 1])
    exact, _ = check_weights(*args, WeightOptions(tau=0.5, beta=0.5))
    seed, _ = check_weights(*args, WeightOptions(tau=0.5, beta=0.5, denominator=WeightDenominator.TAU))
    assert np.max(np.abs(exact.weights - seed.weights)) > 1e-3


def test_zero_denominator_is_floored():
    got, _ = check_weights([3], [0.5, 0.3, 0.2], [0.0] * 3, None, WeightOptions(tau=0.0, beta=0.0))
    assert_close(got.weights, [1.0, 0.0, 0.0], tol=1e-12)


def test_grpo_objective_weights_are_advantages():
    adv = [0.5, -0.5, 1.2, 0.0, -1.2]
    got, _ = check_weights([2, 3], [0.5, 0.5, 0.2, 0.3, 0.5], [0.0] * 5, None,
                           WeightOptions(tau=1.0, beta=0.1, train_grpo_objective=True), advantages=adv)
    assert list(got.weights) == adv
    assert got.weight_entropy == 0.0 and got.weight_entropy_min == 0.0 and got.weight_entropy_max == 0.0
    assert np.all(got.group_entropies == 0.0) and np.all(got.advantage_entropy == 0.0)


def test_entropy_stats_skip_empty_groups():
    got, _ = check_weights([0, 2, 0, 3], [0.9, 0.1, 0.2, 0.3, 0.5], [0.0] * 5, None, WeightOptions(tau=1.0, beta=0.0))
    h1 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    h3 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert_close(got.group_entropies, [0.0, h1, 0.0, h3])
    assert got.weight_entropy == pytest.approx((h1 + h3) / 2)
    assert got.weight_entropy_min == pytest.approx(h1) and got.weight_entropy_max == pytest.approx(h3)
    assert_close(got.advantage_entropy, [0.9 - 0.5, 0.1 - 0.5, 0.2 - 1 / 3, 0.3 - 1 / 3, 0.5 - 1 / 3])


def test_weights_empty_batch():
    got, _ = check_weights([0, 0], [], [], [], WeightOptions(tau=1.0, beta=0.1))
    assert got.weights.shape == (0,) and got.weight_entropy == 0.0


# --------------------------------------------------------------------------
# edge cases from the issue


def test_edge_ref_logp_minus_1e5():
    sizes = [3, 2]
    q = [0.4, 0.4, 0.2, 0.5, 0.5]
    ref_logp = [-1e5, -10.0, -1e5, -1e5, -1e5]
    for length_norm in (True, False):
        for beta in (0.0, 0.01, 1.0):
            options = WeightOptions(tau=0.5, beta=beta, length_normalize_ref=length_norm)
            got, _ = check_weights(sizes, q, ref_logp, [1, 1, 1, 1, 1], options)
            assert np.all(np.isfinite(got.weights))
            assert got.weights[:3].sum() == pytest.approx(1.0) and got.weights[3:].sum() == pytest.approx(1.0)
            assert_close(got.weights[3:], [0.5, 0.5], tol=1e-12)  # equal q, equal ref
    # with beta = 1 and no length normalisation the -1e5 completions vanish
    got, _ = check_weights(sizes, q, ref_logp, [1] * 5, WeightOptions(tau=0.5, beta=1.0, length_normalize_ref=False))
    assert got.weights[1] == pytest.approx(1.0)


def test_edge_tiny_q():
    sizes = [3]
    q = [1e-300, 1e-200, 1.0 - 1e-12]
    for tau in (1e-6, 0.1, 1.0, 10.0):
        got, _ = check_weights(sizes, q, [-1.0, -1.0, -1.0], [1, 1, 1], WeightOptions(tau=tau, beta=0.0))
        assert np.all(np.isfinite(got.weights))
        # both tiny q are floored at 1e-12: the same weight
        assert got.weights[0] == pytest.approx(got.weights[1], rel=1e-12)
        assert got.weights.sum() == pytest.approx(1.0)
    got, _ = check_weights([2], [1e-300, 1e-300], [0.0, 0.0], None, WeightOptions(tau=1.0, beta=0.0))
    assert_close(got.weights, [0.5, 0.5], tol=1e-12)


def test_edge_tau_1e_minus_6():
    sizes = [4, 2]
    q = [0.3, 0.3, 0.2, 0.2, 0.7, 0.3]
    got, _ = check_weights(sizes, q, [-5.0] * 6, [5] * 6, WeightOptions(tau=1e-6, beta=0.0))
    # near-argmax: the two tied best completions share the weight
    assert_close(got.weights, [0.5, 0.5, 0.0, 0.0, 1.0, 0.0], tol=1e-12)
    got, _ = check_weights(sizes, q, [-5.0, -4.0, -3.0, -2.0, -1.0, -0.5], [1] * 6,
                           WeightOptions(tau=1e-6, beta=1e-6))
    assert np.all(np.isfinite(got.weights))
    check_weights(sizes, q, [-5.0] * 6, [5] * 6, WeightOptions(tau=1e-6, beta=0.0, denominator=WeightDenominator.TAU))


def test_edge_groups_of_one():
    sizes = [1, 1, 1]
    got, _ = check_rewards(sizes, [3.0, -1.0, 1e9])
    assert np.all(got.advantages == 0.0)
    assert_close(got.q_values, [1.0, 1.0, 1.0], tol=1e-12)
    w, _ = check_weights(sizes, got.q_values, [-1e5, 0.0, -3.0], [1, 0, 2], WeightOptions(tau=1e-6, beta=0.3))
    assert_close(w.weights, [1.0, 1.0, 1.0], tol=1e-12)
    assert np.all(w.group_entropies == pytest.approx(0.0, abs=1e-9))
    assert_close(w.advantage_entropy, [0.0, 0.0, 0.0], tol=1e-12)


def test_edge_one_million_completions():
    groups, k = 62_500, 16
    n = groups * k
    rng = np.random.default_rng(1234)
    sizes = np.full(groups, k, dtype=np.int64)
    utils = rng.normal(size=n)
    counts = rng.integers(1, 512, size=n)
    ref_logp = -rng.gamma(2.0, 50.0, size=n)
    start = time.perf_counter()
    stats = ENGINE.reward_statistics(sizes, utils, RewardOptions())
    w = ENGINE.weight_stats(sizes, stats.q_values, ref_logp, counts, WeightOptions(tau=0.3, beta=0.05))
    elapsed = time.perf_counter() - start
    assert elapsed < 30.0
    assert w.weights.shape == (n,)
    assert np.all(np.isfinite(w.weights)) and np.all(w.weights >= 0)
    np.testing.assert_allclose(w.weights.reshape(groups, k).sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(stats.q_values.reshape(groups, k).sum(axis=1), 1.0, atol=1e-9)
    assert np.all(np.isfinite(stats.advantages))
    assert stats.reward_mean == pytest.approx(utils.mean()) and stats.reward_std == pytest.approx(utils.std())
    assert w.group_entropies.shape == (groups,)
    # a sample of groups against the reference
    for g in rng.choice(groups, size=25, replace=False):
        s = slice(g * k, (g + 1) * k)
        assert_close(stats.advantages[s], ref.group_advantages(utils[s].tolist()))
        assert_close(stats.q_values[s], ref.listwise_q(utils[s].tolist()))
        assert_close(
            w.weights[s],
            ref.maxent_weights(stats.q_values[s].tolist(), ref_logp[s].tolist(), counts[s].tolist(), tau=0.3, beta=0.05),
        )
    assert w.weight_entropy == pytest.approx(float(np.mean(w.group_entropies)))


# --------------------------------------------------------------------------
# hypothesis: ragged batches

utility = st.one_of(
    st.floats(min_value=-10.0, max_value=10.0, allow_nan=False),
    st.sampled_from([0.0, 1.0, -1.0, 0.5]),  # ties
)


def group_sizes(max_groups: int, max_size: int, min_size: int = 0):
    """Ragged sizes, or all groups of one size K >= 1: the engine works on
    those as a dense [G, K] batch, a separate code path to cover as well."""
    ragged = st.lists(st.integers(min_size, max_size), min_size=0, max_size=max_groups)
    uniform = st.builds(lambda g, k: [k] * g, st.integers(1, max_groups), st.integers(max(min_size, 1), max_size))
    return st.one_of(ragged, uniform)


@st.composite
def ragged_batches(draw, max_groups=7, max_size=7):
    sizes = draw(group_sizes(max_groups, max_size))
    n = sum(sizes)
    utils = draw(st.lists(utility, min_size=n, max_size=n))
    return sizes, utils


@given(
    batch=ragged_batches(),
    data=st.data(),
    scale=st.sampled_from([True, False, "group", "batch", "none"]),
    baseline=st.sampled_from(["group_mean", "leave_one_out"]),
    temperature=st.sampled_from([1.0, 0.5, 2.0, 1e-9, 0.05]),
    epsilon=st.sampled_from([1e-6, 0.0, 1e-3, 0.05]),
)
@HYPO
def test_reward_statistics_match_reference(batch, data, scale, baseline, temperature, epsilon):
    sizes, utils = batch
    n = len(utils)
    valid = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)), label="valid")
    options = RewardOptions(q_temperature=temperature, q_epsilon=epsilon, scale_rewards=scale,
                            advantage_baseline=AdvantageBaseline(baseline))
    got, _ = check_rewards(sizes, utils, options, valid=valid)
    keep = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    assert np.all(got.q_values[~keep] == 0.0) and np.all(got.advantages[~keep] == 0.0)


@given(batch=ragged_batches(), data=st.data())
@HYPO
def test_valid_mask_equals_dropping_the_completions(batch, data):
    """Excluded completions change nothing for the others: same as removing them."""
    sizes, utils = batch
    n = len(utils)
    valid = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="valid"), bool)
    masked = engine_rewards(sizes, utils, valid=valid)
    kept_sizes = [int(valid[s].sum()) for s in group_slices(sizes)]
    dropped = engine_rewards(kept_sizes, np.asarray(utils, dtype=np.float64)[valid])
    assert_close(masked.advantages[valid], dropped.advantages)
    assert_close(masked.q_values[valid], dropped.q_values)
    assert_close(masked.reward_mean, dropped.reward_mean)
    assert_close(masked.reward_std, dropped.reward_std)


@given(batch=ragged_batches(), data=st.data(), max_len=st.one_of(st.none(), st.integers(0, 20)))
@HYPO
def test_zero_truncated_match_reference(batch, data, max_len):
    sizes, utils = batch
    n = len(utils)
    truncated = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="truncated")
    counts = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n), label="counts")
    valid = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)), label="valid")
    options = RewardOptions(zero_truncated_completion_rewards=True, max_completion_len=max_len)
    got, _ = check_rewards(sizes, utils, options, truncated=truncated, token_counts=counts, valid=valid)
    for i in range(n):
        if truncated[i] or (max_len is not None and counts[i] >= max_len):
            assert got.total_utils[i] == 0.0


@given(
    batch=ragged_batches(max_size=6),
    data=st.data(),
    alpha=st.sampled_from([0.0417, 0.0, 1.0, 3.0]),
    normalize=st.booleans(),
    length_norm=st.booleans(),
    num_generations=st.one_of(st.none(), st.integers(2, 12)),
)
@HYPO
def test_seed_grpo_match_reference(batch, data, alpha, normalize, length_norm, num_generations):
    sizes, utils = batch
    n = len(utils)
    answers = data.draw(st.lists(st.sampled_from([None, "1", "2", "3", "\\frac{1}{2}"]), min_size=n, max_size=n))
    logp = data.draw(st.lists(st.floats(-200.0, 0.0), min_size=n, max_size=n), label="logp")
    counts = data.draw(st.lists(st.integers(0, 64), min_size=n, max_size=n), label="counts")
    seed = SeedGrpoOptions(alpha=alpha, normalize_by_max_entropy=normalize, length_normalize_logprobs=length_norm,
                            num_generations=num_generations)
    got, _ = check_rewards(sizes, utils, RewardOptions(seed_grpo=seed), gen_logp_sum=logp, token_counts=counts,
                           answers=answers)
    assert np.all(got.seed_advantage_scales > 0) and np.all(got.seed_advantage_scales <= 1.0)
    assert np.all(got.seed_semantic_entropies >= -1e-12)
    for g, s in enumerate(group_slices(sizes)):
        assert got.seed_semantic_entropies[g] <= math.log(max(s.stop - s.start, 1)) + 1e-9


@given(
    batch=ragged_batches(),
    data=st.data(),
    tau=st.one_of(st.floats(0.01, 10.0), st.sampled_from([1e-3, 1.0])),
    beta=st.one_of(st.floats(0.0, 5.0), st.just(0.0)),
    denominator=st.sampled_from(list(WeightDenominator)),
    include_ref=st.booleans(),
    by_tokens=st.booleans(),
    length_norm=st.booleans(),
)
@HYPO
def test_weights_match_reference(batch, data, tau, beta, denominator, include_ref, by_tokens, length_norm):
    sizes, _ = batch
    n = sum(sizes)
    q = data.draw(
        st.lists(st.one_of(st.floats(1e-8, 1.0), st.sampled_from([1e-300, 0.0, 0.5])), min_size=n, max_size=n),
        label="q",
    )
    ref_logp = data.draw(st.lists(st.floats(-1e3, 0.0), min_size=n, max_size=n), label="ref")
    counts = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 100), min_size=n, max_size=n)), label="counts")
    options = WeightOptions(tau=tau, beta=beta, denominator=denominator, length_normalize_ref=length_norm,
                            include_reference_term=include_ref, normalize_by_tokens=by_tokens)
    got, _ = check_weights(sizes, q, ref_logp, counts, options)
    assert np.all(np.isfinite(got.weights))
    for s in group_slices(sizes):
        if s.stop > s.start:
            assert got.weights[s].sum() == pytest.approx(1.0, abs=1e-9)


@given(batch=ragged_batches(), data=st.data(), tau=st.floats(1e-6, 1e-3), beta=st.floats(0.0, 1.0))
@settings(max_examples=100, deadline=None)
def test_weights_small_tau_match_reference(batch, data, tau, beta):
    """Tiny tau (down to 1e-6) with realistic q and ref log-probs."""
    sizes, utils = batch
    stats = engine_rewards(sizes, utils)
    n = len(utils)
    ref_logp = data.draw(st.lists(st.floats(-1e5, 0.0), min_size=n, max_size=n), label="ref")
    counts = data.draw(st.lists(st.integers(1, 4096), min_size=n, max_size=n), label="counts")
    # keep z well conditioned: skip draws where |z| is too large for 1e-6 agreement
    scale = (abs(math.log(1e-12)) + beta * max([abs(r) for r in ref_logp] or [0.0])) / (tau + beta)
    assume(scale < 1e9)
    check_weights(sizes, stats.q_values, ref_logp, counts, WeightOptions(tau=tau, beta=beta))


@given(batch=ragged_batches(), data=st.data())
@settings(max_examples=50, deadline=None)
def test_grpo_objective_match_reference(batch, data):
    sizes, utils = batch
    stats = engine_rewards(sizes, utils)
    n = len(utils)
    check_weights(sizes, stats.q_values, [0.0] * n, None, WeightOptions(tau=0.5, beta=0.1, train_grpo_objective=True),
                  advantages=stats.advantages.tolist())


@given(
    r=st.integers(0, 4),
    n=st.integers(0, 8),
    data=st.data(),
)
@settings(max_examples=100, deadline=None)
def test_combine_rewards_match_reference(r, n, data):
    cell = st.one_of(st.floats(-100.0, 100.0), st.just(float("nan")))
    values = np.asarray(data.draw(st.lists(st.lists(cell, min_size=n, max_size=n), min_size=r, max_size=r)),
                        dtype=np.float64).reshape(r, n)
    weights = np.asarray(data.draw(st.lists(st.floats(-5.0, 5.0), min_size=r, max_size=r)), dtype=np.float64)
    got = combine_rewards(values, weights)
    want = ref.combine_rewards(values.tolist(), weights.tolist()) if r else [0.0] * n
    assert_close(got, want)


@given(
    groups=st.integers(1, 6),
    k=st.integers(1, 7),
    data=st.data(),
    scale=st.booleans(),
    temperature=st.sampled_from([1.0, 0.3]),
    by_tokens=st.booleans(),
)
@HYPO
def test_dense_and_ragged_layouts_agree(groups, k, data, scale, temperature, by_tokens):
    """Equal-sized groups run as a dense [G, K] batch; an empty group appended
    forces the scatter (ragged) path on the same numbers."""
    n = groups * k
    utils = np.asarray(data.draw(st.lists(utility, min_size=n, max_size=n), label="utils"))
    ref_logp = np.asarray(data.draw(st.lists(st.floats(-500.0, 0.0), min_size=n, max_size=n), label="ref"))
    counts = np.asarray(data.draw(st.lists(st.integers(0, 64), min_size=n, max_size=n), label="counts"))
    dense_sizes, ragged_sizes = [k] * groups, [k] * groups + [0]
    options = RewardOptions(q_temperature=temperature, scale_rewards=scale)
    dense, ragged = engine_rewards(dense_sizes, utils, options), engine_rewards(ragged_sizes, utils, options)
    for name in ("total_utils", "advantages", "q_values", "reward_mean", "reward_std"):
        np.testing.assert_allclose(getattr(dense, name), getattr(ragged, name), rtol=1e-12, atol=1e-15, err_msg=name)
    weight_options = WeightOptions(tau=0.4, beta=0.1, normalize_by_tokens=by_tokens)
    dense_w, ragged_w = (
        ENGINE.weight_stats(np.asarray(sizes), dense.q_values, ref_logp, counts, weight_options)
        for sizes in (dense_sizes, ragged_sizes)
    )
    np.testing.assert_allclose(dense_w.weights, ragged_w.weights, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dense_w.group_entropies, ragged_w.group_entropies[:-1], rtol=1e-12, atol=1e-15)
    assert ragged_w.group_entropies[-1] == 0.0
    for name in ("weight_entropy", "weight_entropy_min", "weight_entropy_max"):
        assert getattr(dense_w, name) == pytest.approx(getattr(ragged_w, name), rel=1e-12, abs=1e-15)


def test_results_leave_a_device_in_one_copy_with_the_same_numbers():
    """Off the CPU the float64 results are packed into one transfer; the
    unpacking must give each array back whole and in order."""
    engine = Engine(device="cpu")
    tensors = (torch.arange(6, dtype=torch.float64).reshape(2, 3), None, torch.tensor([True, False]),
               torch.zeros(0, dtype=torch.float64), torch.tensor([7.5], dtype=torch.float64))
    plain = engine._host(*tensors)
    engine.device = torch.device("cuda")  # only the path choice; the tensors stay where they are
    packed = engine._host(*tensors)
    assert [None if a is None else a.tolist() for a in packed] == [None if a is None else a.tolist() for a in plain]
    assert packed[2].dtype == np.bool_ and packed[0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
