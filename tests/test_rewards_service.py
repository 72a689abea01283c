"""Reward functions through the real server: builtins, plugins, failure policies."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from maxent_client import RewardFailurePolicy, InvalidArgumentError, RewardFailedError, RewardTerm

COMPLETIONS = [
    "<think>half</think><answer>\\boxed{\\frac12}</answer>",
    "so the answer is \\boxed{0.5}",
    "I think \\boxed{1/3}",
    "no box here",
    "<think>square</think><answer>x^2+2x+1</answer>",
    "\\boxed{(x+1)^2}",
]
ANSWERS = ["1/2", "(x+1)^2"]
SIZES = [4, 2]


def test_builtins_and_plugins_are_listed(client):
    functions = {f.name: f for f in client.list_reward_functions()}
    for name in ("math_accuracy", "boxed_accuracy", "format", "missing_boxed_penalty", "length"):
        assert functions[name].source == "builtin" and functions[name].description
    assert functions["keyword_match"].source != "builtin"
    assert {p["name"] for p in functions["keyword_match"].parameters} >= {"keyword"}


def test_math_accuracy_and_format(client):
    stats = client.compute_reward_statistics(
        completions=COMPLETIONS, answers=ANSWERS, group_sizes=SIZES,
        rewards=[RewardTerm("math_accuracy", 1.0), RewardTerm("format", 0.5),
                 RewardTerm("missing_boxed_penalty", 1.0)],
    )
    np.testing.assert_array_equal(stats.per_reward["math_accuracy"].values, [1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(stats.per_reward["format"].values, [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(stats.per_reward["missing_boxed_penalty"].values, [0, 0, 0, -1, -1, 0])
    expected_u = [1.5, 1.0, 0.0, -1.0, 0.5, 1.0]
    np.testing.assert_allclose(stats.total_utils, expected_u)
    want = ref.reward_statistics(SIZES, expected_u)
    np.testing.assert_allclose(stats.advantages, want.advantages, atol=1e-9)
    np.testing.assert_allclose(stats.q_values, want.q_values, atol=1e-12)
    assert not stats.failed.any()


def test_plugin_with_params(client):
    stats = client.compute_reward_statistics(
        completions=[["Paris is nice", "paris!", "London"]],
        rewards=[RewardTerm("keyword_match", 2.0, {"keyword": "PARIS", "score": "0.5"})],
    )
    np.testing.assert_allclose(stats.total_utils, [1.0, 1.0, 0.0])


def _batch_with_failures():
    completions = ["fine", "RAISE here", "fine too", "also fine", "NAN", "ok"]
    return dict(completions=completions, group_sizes=[4, 2], answers=["", ""], rewards=[RewardTerm("flaky", 2.0)])


def test_exclude_policy_leaves_failed_completions_out(client):
    stats = client.compute_reward_statistics(**_batch_with_failures())
    # A plugin that raises or returns a non-finite value fails that completion.
    np.testing.assert_array_equal(stats.failed, [False, True, False, False, True, False])
    values = stats.per_reward["flaky"]
    assert values.failure_count == 2 and values.timeout_count == 0 and np.isnan(values.values[[1, 4]]).all()
    # A left-out completion has no utility: NaN, never a zero reward.
    assert np.isnan(stats.total_utils[[1, 4]]).all() and np.isfinite(stats.total_utils[[0, 2, 3, 5]]).all()
    want = ref.reward_statistics([4, 2], list(np.nan_to_num(stats.total_utils)),
                                 valid=[True, False, True, True, False, True])
    assert stats.advantages[1] == 0.0 and stats.q_values[1] == 0.0 and stats.q_values[4] == 0.0
    np.testing.assert_allclose(stats.advantages, want.advantages, atol=1e-9)
    np.testing.assert_allclose(stats.q_values, want.q_values, atol=1e-12)
    assert stats.reward_mean == pytest.approx(want.reward_mean)


def test_zero_policy_counts_failures_as_zero_and_says_so(client):
    stats = client.compute_reward_statistics(**_batch_with_failures(), on_failure=RewardFailurePolicy.ZERO)
    assert stats.failed[1] and stats.total_utils[1] == 0.0
    want = ref.reward_statistics([4, 2], list(stats.total_utils))
    np.testing.assert_allclose(stats.q_values, want.q_values, atol=1e-12)


def test_error_policy_fails_the_call(client):
    with pytest.raises(RewardFailedError) as info:
        client.compute_reward_statistics(**_batch_with_failures(), on_failure=RewardFailurePolicy.ERROR)
    assert "2 reward evaluations failed" in str(info.value)


def test_timeouts_and_crashes_fail_only_their_completion(client):
    completions = ["a", "SLEEP", "b", "c", "CRASH", "d"]
    stats = client.compute_reward_statistics(
        completions=completions, group_sizes=[3, 3], answers=["", ""],
        rewards=[RewardTerm("sleepy", 1.0), RewardTerm("crashy", 1.0)], timeout=120,
    )
    assert stats.per_reward["sleepy"].timeout_count == 1 and stats.per_reward["sleepy"].failed[1]
    assert stats.per_reward["crashy"].failure_count == 1 and stats.per_reward["crashy"].failed[4]
    np.testing.assert_array_equal(stats.failed, [False, True, False, False, True, False])
    np.testing.assert_allclose(stats.total_utils[[0, 2, 3, 5]], [2.0, 2.0, 2.0, 2.0])
    # The pool replaced its workers: the next call works.
    again = client.compute_reward_statistics(completions=[["x", "y"]], answers=[""],
                                             rewards=[RewardTerm("crashy", 1.0)])
    np.testing.assert_allclose(again.total_utils, [1.0, 1.0])


def test_reward_violations_name_the_field(client):
    cases = [
        (dict(rewards=[RewardTerm("nope")]), "rewards[0].name"),
        (dict(rewards=[RewardTerm("format"), RewardTerm("length")]), "token_counts"),
        (dict(rewards=[RewardTerm("math_accuracy")], answers=["1", "2"]), "answers"),
        (dict(rewards=[RewardTerm("format")], answers=["1", "2", "3"]), "answers"),  # given: one per group
        (dict(rewards=[RewardTerm("format")], utilities=[1.0, 2.0]), "utilities"),
    ]
    for extra, field in cases:
        with pytest.raises(InvalidArgumentError) as info:
            client.compute_reward_statistics(completions=["a", "b"], group_sizes=[2], **extra)
        assert any(v.field.startswith(field) for v in info.value.violations), (field, info.value.violations)


def test_length_reward(client):
    stats = client.compute_reward_statistics(
        completions=["a", "b", "c"], group_sizes=[3], token_counts=[10, 100, 150], max_completion_len=100,
        rewards=[RewardTerm("length", 1.0)],
    )
    values = stats.per_reward["length"].values
    assert values[0] == 0.0 and values[1] == 0.0 and -1.0 <= values[2] < 0.0
