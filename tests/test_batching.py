"""prepare_generation_batch: retries of empty prompts, whole groups, the drop report."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from maxent_client import RewardTerm
from maxent_client.batching import (
    DROPPED_EMPTY,
    DROPPED_INCOMPLETE,
    prepare_generation_batch,
)


class ScriptedGenerator:
    """Answers each prompt from a script: per prompt, a list of group sizes, one
    per call that asks for it (the last repeats). Records every call."""

    def __init__(self, script: dict[str, list[int]], *, with_metadata: bool = False) -> None:
        self.script = script
        self.with_metadata = with_metadata
        self.calls: list[list[str]] = []
        self.asked: dict[str, int] = {}

    def __call__(self, prompts: list[str], k: int):
        self.calls.append(list(prompts))
        groups, tokens, logps = [], [], []
        for prompt in prompts:
            turn = self.asked.get(prompt, 0)
            self.asked[prompt] = turn + 1
            sizes = self.script[prompt]
            size = sizes[min(turn, len(sizes) - 1)]
            groups.append([f"{prompt}/try{turn}/c{j}" for j in range(size)])
            tokens.append([10 + j for j in range(size)])
            logps.append([-1.0 - j for j in range(size)])
        if self.with_metadata:
            return groups, {"token_counts": tokens, "gen_logp_sum": logps, "sampler": [["x"] * len(g) for g in groups]}
        return groups


def test_full_groups_pass_through_unchanged():
    gen = ScriptedGenerator({"a": [3], "b": [3]})
    batch = prepare_generation_batch(["a", "b"], gen, expected_generations=3, answers=["1", "2"])
    assert gen.calls == [["a", "b"]]
    assert batch.prompts == ["a", "b"] and batch.answers == ["1", "2"] and batch.indices == [0, 1]
    assert batch.group_sizes == [3, 3]
    assert batch.completions[0] == ["a/try0/c0", "a/try0/c1", "a/try0/c2"]
    report = batch.report
    assert (report.retry_rounds, report.retried_prompts, report.dropped) == (0, 0, ())
    assert report.kept_prompts == report.requested_prompts == 2


def test_empty_prompts_are_retried_alone_until_they_get_completions():
    gen = ScriptedGenerator({"a": [4], "b": [0, 0, 4], "c": [0, 4]})
    batch = prepare_generation_batch(["a", "b", "c"], gen, expected_generations=4, max_retry_rounds=5)
    # round 0 asks everything; retries ask only what is still empty
    assert gen.calls == [["a", "b", "c"], ["b", "c"], ["b"]]
    assert batch.prompts == ["a", "b", "c"]
    assert batch.completions[1][0] == "b/try2/c0" and batch.completions[2][0] == "c/try1/c0"
    report = batch.report
    assert (report.retry_rounds, report.retried_prompts, report.recovered_prompts) == (2, 3, 2)
    assert report.dropped == ()


def test_retries_are_bounded_and_the_still_empty_prompt_is_dropped():
    gen = ScriptedGenerator({"a": [2], "never": [0]})
    stats: dict[str, int] = {"generation_dropped_prompts": 5}
    batch = prepare_generation_batch(["never", "a"], gen, expected_generations=2, answers=["x", "y"],
                                     max_retry_rounds=3, stats=stats)
    assert len(gen.calls) == 4 and all(call == ["never"] for call in gen.calls[1:])
    assert batch.prompts == ["a"] and batch.answers == ["y"] and batch.indices == [1]
    (dropped,) = batch.report.dropped
    assert (dropped.index, dropped.prompt, dropped.received, dropped.reason) == (0, "never", 0, DROPPED_EMPTY)
    assert stats["generation_dropped_prompts"] == 6  # added to what the dict held
    assert stats["generation_dropped_empty"] == 1 and stats["generation_retry_rounds"] == 3


def test_no_retries_when_disabled():
    gen = ScriptedGenerator({"a": [0, 2]})
    batch = prepare_generation_batch(["a"], gen, expected_generations=2, max_retry_rounds=0)
    assert len(gen.calls) == 1 and len(batch) == 0
    assert batch.report.dropped[0].reason == DROPPED_EMPTY


def test_long_groups_are_truncated_and_short_ones_dropped():
    gen = ScriptedGenerator({"long": [6], "short": [2, 1, 0], "exact": [4]}, with_metadata=True)
    batch = prepare_generation_batch(["long", "short", "exact"], gen, expected_generations=4, max_retry_rounds=2)
    # a short group is topped up; one still short after the retry rounds is dropped
    assert gen.calls == [["long", "short", "exact"], ["short"], ["short"]]
    assert batch.prompts == ["long", "exact"] and batch.group_sizes == [4, 4]
    assert batch.completions[0] == [f"long/try0/c{j}" for j in range(4)]
    assert batch.metadata["token_counts"] == [[10, 11, 12, 13], [10, 11, 12, 13]]
    assert batch.metadata["sampler"][0] == ["x"] * 4  # other names are kept for the caller
    report = batch.report
    assert (report.truncated_groups, report.truncated_completions) == (1, 2)
    (dropped,) = report.dropped
    assert (dropped.prompt, dropped.received, dropped.reason) == ("short", 3, DROPPED_INCOMPLETE)
    assert (report.topped_up_prompts, report.topped_up_completions) == (0, 1)


def test_partial_groups_are_topped_up_with_only_what_they_miss():
    asked: list[tuple[list[str], int]] = []
    script = {"a": [4], "b": [3, 1], "c": [1, 3], "d": [0, 4]}
    gen = ScriptedGenerator(script, with_metadata=True)

    def generate(prompts, k):
        asked.append((list(prompts), k))
        return gen(prompts, k)

    stats: dict[str, int] = {}
    batch = prepare_generation_batch(["a", "b", "c", "d"], generate, expected_generations=4, stats=stats)
    # one retry round: each short prompt asked for exactly what it misses, grouped by that number
    assert asked == [(["a", "b", "c", "d"], 4), (["d"], 4), (["c"], 3), (["b"], 1)]
    assert batch.prompts == ["a", "b", "c", "d"] and batch.group_sizes == [4, 4, 4, 4]
    # a topped-up group keeps what it had first, then the new completions
    assert batch.completions[1] == ["b/try0/c0", "b/try0/c1", "b/try0/c2", "b/try1/c0"]
    assert batch.metadata["token_counts"][1] == [10, 11, 12, 10]  # metadata follows its completions
    report = batch.report
    assert (report.topped_up_prompts, report.topped_up_completions, report.recovered_prompts) == (2, 4, 1)
    assert stats["generation_topped_up_prompts"] == 2 and stats["generation_topped_up_completions"] == 4


def test_reward_statistics_kwargs_are_flat_and_aligned():
    gen = ScriptedGenerator({"p": [2], "q": [0, 3]}, with_metadata=True)
    batch = prepare_generation_batch({"prompt": ["p", "q"], "answer": [7, None], "level": ["easy", "hard"]}, gen,
                                     expected_generations=2)
    kwargs = batch.reward_statistics_kwargs()
    assert kwargs["completions"] == ["p/try0/c0", "p/try0/c1", "q/try1/c0", "q/try1/c1"]
    assert kwargs["group_sizes"] == [2, 2]
    assert kwargs["answers"] == ["7", ""]
    assert kwargs["token_counts"] == [10, 11, 10, 11]
    assert kwargs["gen_logp_sum"] == [-1.0, -2.0, -1.0, -2.0]
    assert "sampler" not in kwargs and "truncated" not in kwargs
    assert batch.extra == {"level": ["easy", "hard"]}


def test_metadata_missing_for_a_retried_prompt_is_left_out():
    calls = []

    def generate(prompts, k):
        calls.append(prompts)
        if len(calls) == 1:
            return [["a1"], []], {"token_counts": [[3], []]}
        return [["b1"]]  # the retry brings no metadata

    batch = prepare_generation_batch(["a", "b"], generate, expected_generations=1)
    assert batch.completions == [["a1"], ["b1"]]
    assert batch.metadata == {}
    assert "token_counts" not in batch.reward_statistics_kwargs()


@pytest.mark.parametrize("bad, message", [
    (lambda prompts, k: [["x"]], "1 completion groups for 2 prompts"),
    (lambda prompts, k: (["x", "y"], None), "a string for prompt 0"),
    (lambda prompts, k: ([["x"], ["y"]], {"token_counts": [[1, 2], [1]]}), "2 values for the 1 completions"),
])
def test_malformed_generator_output_is_an_error(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        prepare_generation_batch(["a", "b"], bad, expected_generations=1)


def test_argument_checks():
    gen = ScriptedGenerator({"a": [1]})
    with pytest.raises(ValueError, match="expected_generations"):
        prepare_generation_batch(["a"], gen, expected_generations=0)
    with pytest.raises(ValueError, match="max_retry_rounds"):
        prepare_generation_batch(["a"], gen, expected_generations=1, max_retry_rounds=-1)
    with pytest.raises(ValueError, match="2 answers for 1 prompts"):
        prepare_generation_batch(["a"], gen, expected_generations=1, answers=["1", "2"])
    with pytest.raises(TypeError):
        prepare_generation_batch("a", gen, expected_generations=1)


def test_everything_dropped_is_an_empty_batch_the_service_accepts(client):
    batch = prepare_generation_batch(["a"], lambda prompts, k: [[]], expected_generations=2, max_retry_rounds=1)
    assert len(batch) == 0 and batch.report.kept_prompts == 0
    stats = client.compute_reward_statistics(**batch.reward_statistics_kwargs(), rewards=[RewardTerm("format")])
    assert stats.total_utils.size == 0 and stats.reward_mean == 0.0


def test_output_feeds_compute_reward_statistics(client):
    good = "<think>sum</think> <answer>\\boxed{4}</answer>"
    script = {
        "2+2": [[good, "\\boxed{5}", "no answer", good, "extra"]],  # truncated to 4
        "1+1": [[], ["\\boxed{2}", "<think>t</think><answer>\\boxed{2}</answer>", "x", "\\boxed{3}"]],  # retried
        "3+3": [["\\boxed{6}"], []],  # incomplete, and its top-ups bring nothing: dropped
    }
    turns: dict[str, int] = {}

    def generate(prompts, k):
        out = []
        for p in prompts:
            turn = turns.get(p, 0)
            turns[p] = turn + 1
            out.append(script[p][min(turn, len(script[p]) - 1)])
        return out, {"token_counts": [[len(c.split()) for c in g] for g in out]}

    batch = prepare_generation_batch(["2+2", "1+1", "3+3"], generate, expected_generations=4,
                                     answers=["4", "2", "6"])
    assert batch.prompts == ["2+2", "1+1"] and batch.group_sizes == [4, 4]
    stats = client.compute_reward_statistics(
        **batch.reward_statistics_kwargs(),
        rewards=[RewardTerm("boxed_accuracy", 1.0), RewardTerm("format", 0.5)],
    )
    np.testing.assert_allclose(stats.per_reward["boxed_accuracy"].values, [1, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(stats.per_reward["format"].values, [1, 0, 0, 1, 0, 1, 0, 0])
    np.testing.assert_allclose(stats.total_utils, [1.5, 0, 0, 1.5, 1, 1.5, 0, 0])
    np.testing.assert_array_equal(stats.group_sizes, [4, 4])
    assert [float(q.sum()) for q in stats.grouped()["q_values"]] == pytest.approx([1.0, 1.0])


def test_core_modules_import_without_the_trainer_stack():
    """The batching helper and the integration modules import with the core
    client alone: torch, transformers, trl and accelerate load only when used."""
    code = (
        "import sys\n"
        "import maxent_client, maxent_client.batching, maxent_client.integrations\n"
        "import maxent_client.integrations.trl, maxent_client.integrations.accelerate\n"
        "from maxent_client.integrations.trl import MaxEntRewardFunction\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'accelerate', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
