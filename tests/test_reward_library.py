"""The reward library (tag_count, reasoning_steps, cosine_length,
repetition_penalty, soft_format) and format's rule=library.

Per rule: hand-computed cases, a hypothesis property against a plain
reference written here, and, through a real server, one call with every rule
and a rejected bad parameter per rule.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maxent_client import InvalidArgumentError, RewardTerm
from maxent_server.rewards import ParamSpec, RewardRegistry, library
from maxent_server.rewards.builtin import format_reward
from maxent_server.rewards.params import param_spec_from_declaration, parse_params

PROPERTY = settings(max_examples=300, deadline=None)


def texts(pieces):
    """Text assembled from pieces that matter to a rule, plus filler."""
    return st.lists(st.sampled_from(pieces + ["a", "b", " ", "\n"]), max_size=30).map("".join)


# ---------------------------------------------------------------------------
# tag_count

TAG_PIECES = ["<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\nwork\n</think>\n<answer>\n4\n</answer>", 1.0),
        ("<think>work</think><answer>4</answer>", 0.0),  # no newlines
        ("<think>\nwork</think>\n<answer>\n4\n</answer>", 0.75),  # no newline before </think>
        ("<think>\n<think>\n\n</think>\n<answer>\n4\n</answer>", 0.75),  # <think>\\n twice
        ("\n</think>\n</think>\n", 0.25),  # the two overlap: counted once
        ("\n</answer>\n</answer>", 0.0),
        ("<THINK>\n", 0.0),
        ("", 0.0),
    ],
)
def test_tag_count_cases(text, expected):
    assert library.tag_count(text) == expected


def count_without_overlap(text, piece):
    count, i = 0, 0
    while i + len(piece) <= len(text):
        if text[i : i + len(piece)] == piece:
            count, i = count + 1, i + len(piece)
        else:
            i += 1
    return count


@PROPERTY
@given(texts(TAG_PIECES + ["<think>", "</think>", "<answer>", "</answer>"]))
def test_tag_count_matches_reference(text):
    expected = sum(0.25 for piece in TAG_PIECES if count_without_overlap(text, piece) == 1)
    assert library.tag_count(text) == expected


# ---------------------------------------------------------------------------
# reasoning_steps


@pytest.mark.parametrize(
    "text, params, expected",
    [
        ("Step 1: add\nStep 2: carry\nStep 3: done", {}, 1.0),
        ("First, we add. Then we multiply.", {}, 1 / 3),
        ("1. one\n2. two\n3. three", {}, 1 / 3),  # only the very start counts for digits
        ("We know\n1. one", {}, 0.0),
        ("\n- a\n- b\n* c\nFinally, done", {}, 1.0),  # 4 markers, capped
        ("step 1: lower case", {}, 0.0),
        ("Step 12:Step :", {}, 1 / 3),
        ("Step 1:Step 2:", {}, 2 / 3),
        ("First, Second, Next,", {"target_steps": 5}, 0.6),
        ("Next, Next, Next, Next,", {"target_steps": 4}, 1.0),
        ("", {}, 0.0),
    ],
)
def test_reasoning_steps_cases(text, params, expected):
    assert library.reasoning_steps(text, **params) == pytest.approx(expected)


def digits_end(text, start):
    """The end of the run of decimal digits (what \\d matches) from ``start``."""
    while start < len(text) and text[start].isdecimal():
        start += 1
    return start


def count_step_markers(text):
    """Left to right, each position tries the markers; a match is skipped over."""
    words = ("\n-", "\n*", "First,", "Second,", "Next,", "Finally,")
    count, i = 0, 0
    while i < len(text):
        length = next((len(w) for w in words if text.startswith(w, i)), 0)
        if text.startswith("Step ", i):
            end = digits_end(text, i + 5)
            if end > i + 5 and text.startswith(":", end):
                length = end + 1 - i
        if i == 0:
            end = digits_end(text, 0)
            if end > 0 and text.startswith(".", end):
                length = end + 1
        if length:
            count, i = count + 1, i + length
        else:
            i += 1
    return count


@PROPERTY
@given(
    texts(["Step ", "1", "23", "\u0663", ":", ".", "-", "*", "First,", "Second,", "Next,", "Finally,", "Step 1:"]),
    st.integers(1, 6),
)
def test_reasoning_steps_matches_reference(text, target):
    expected = min(1.0, count_step_markers(text) / target)
    assert library.reasoning_steps(text, target) == pytest.approx(expected)


# ---------------------------------------------------------------------------
# repetition_penalty


@pytest.mark.parametrize(
    "text, params, expected",
    [
        ("", {}, 0.0),
        ("a b", {}, 0.0),  # fewer words than ngram_size
        ("a b c d", {"ngram_size": 2}, 0.0),
        ("a b c a b c", {}, -0.25),  # 4 trigrams, 3 distinct
        ("The the THE the", {"ngram_size": 1}, -0.75),  # lower-cased: 4 words, 1 distinct
        ("The the THE the", {"ngram_size": 1, "max_penalty": -2.0}, -1.5),
        ("x x x x x", {"ngram_size": 2}, -0.75),
        ("a\tb\n a  b", {"ngram_size": 2}, -1 / 3),  # any whitespace splits
        ("a a a", {"max_penalty": 0.0}, 0.0),
    ],
)
def test_repetition_penalty_cases(text, params, expected):
    value = library.repetition_penalty(text, **params)
    assert value == pytest.approx(expected)
    assert str(value) != "-0.0"


@PROPERTY
@given(
    st.lists(st.sampled_from(["a", "B", "b", "c", "A"]), max_size=40),
    st.sampled_from([" ", "\n", "  \t"]),
    st.integers(1, 5),
    st.floats(-10, 0),
)
def test_repetition_penalty_matches_reference(words, separator, n, max_penalty):
    text = separator.join(words)
    lowered = [w.lower() for w in words]
    grams = Counter(" ".join(lowered[i : i + n]) for i in range(len(lowered) - n + 1))
    total = sum(grams.values())
    expected = 0.0 if total == 0 else max_penalty * (1 - len(grams) / total)
    assert library.repetition_penalty(text, n, max_penalty) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------
# soft_format

SOFT_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("intro <think>\na\n</think>\n\n  <answer>b</answer> outro", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<think>x</think> y </think>\n<answer>z</answer>", 1.0),  # the second </think> is followed by <answer>
        ("<think>a</think> so <answer>b</answer>", 0.0),
        ("<answer>b</answer><think>a</think>", 0.0),
        ("<think>a</think><answer>b", 0.0),
        ("<THINK>a</THINK><answer>b</answer>", 0.0),
        ("</think><think><answer></answer>", 0.0),
        ("", 0.0),
    ],
)
def test_soft_format_cases(text, expected):
    assert library.soft_format(text) == expected


@PROPERTY
@given(texts(["<think>", "</think>", "<answer>", "</answer>", "\t", "<", ">"]))
def test_soft_format_matches_the_regex(text):
    assert library.soft_format(text) == (1.0 if SOFT_FORMAT_RE.search(text) else 0.0)


# ---------------------------------------------------------------------------
# format, rule=library

LIBRARY_FORMAT_RE = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize(
    "text, strict, library_rule",
    [
        ("<think>\na\n</think>\n<answer>\nb\n</answer>", 1.0, 1.0),
        ("<think>a</think><answer>b</answer>", 1.0, 0.0),  # the library needs the newlines
        (" <think>\na\n</think>\n<answer>\nb\n</answer>\n", 1.0, 0.0),  # ... and no leading whitespace
        ("<think>\na\n</think>\n<answer>\nb\n</answer>\ntrailing text", 0.0, 1.0),
        ("<think>\n\n</think>\n<answer>\n\n</answer>", 1.0, 1.0),
        ("<think>\n<think>\n</think>\n<answer>\nb\n</answer>", 0.0, 1.0),  # repeated tag inside
        ("<think>\na\n</think>\n<answer>\nb\n</answer>x", 0.0, 0.0),
        ("<think>\na\n</think>\n<answer>\nb</answer>", 1.0, 0.0),
        ("<think>\n</think>\n<answer>\nb\n</answer>", 1.0, 0.0),  # '<think>\n' cannot share its newline
    ],
)
def test_format_rules_cases(text, strict, library_rule):
    assert format_reward(text) == strict
    assert format_reward(text, "strict") == strict
    assert format_reward(text, "library") == library_rule


@PROPERTY
@given(texts(["<think>\n", "\n</think>\n<answer>\n", "\n</answer>", "</answer>", "<think>", "\n</think>\n"]))
def test_library_format_matches_the_regex(text):
    assert format_reward(text, "library") == (1.0 if LIBRARY_FORMAT_RE.match(text) else 0.0)


def test_format_and_soft_format_stay_linear_where_the_regexes_are_quadratic():
    # Regex searches take minutes on these (about 4 s at a fifth of the size).
    pieces = 20_000
    started = time.monotonic()
    assert library.soft_format("<think></think>" * pieces) == 0.0
    assert format_reward("<think>\n" + "\n</think>\n<answer>\n" * pieces + "\n</answer>x", "library") == 0.0
    assert time.monotonic() - started < 10.0


# ---------------------------------------------------------------------------
# cosine_length


@pytest.mark.parametrize(
    "length, correct, params, expected",
    [
        (0, True, {}, 1.0),
        (500, True, {}, 0.75),  # cos(pi/2) = 0: the middle
        (1000, True, {}, 0.5),
        (2000, True, {}, 0.5),  # clipped at max_len
        (0, False, {}, -1.0),
        (500, False, {}, -0.75),
        (1000, False, {}, -0.5),
        (5, True, {"max_len": 10, "min_value_correct": 0.0, "max_value_correct": 2.0}, 1.0),
        (10, False, {"max_len": 20, "min_value_wrong": -3.0, "max_value_wrong": -1.0}, -2.0),
    ],
)
def test_cosine_scale_cases(length, correct, params, expected):
    assert library.cosine_scale(length, correct, **params) == pytest.approx(expected, abs=1e-12)


BOX_HALF = r"\boxed{\frac12}"  # 15 characters


@pytest.mark.parametrize(
    "text, gold, max_len, expected",
    [
        (BOX_HALF, "0.5", 30, 0.75),  # correct, half of max_len
        (BOX_HALF, "0.5", 15, 0.5),  # correct, at max_len
        (BOX_HALF, "0.25", 30, -0.75),  # wrong, half of max_len
        ("<answer>1/2</answer>", "0.5", 20, 0.5),
        ("no answer here", "0.5", 14, -0.5),  # no final answer: wrong
    ],
)
def test_cosine_length_cases(text, gold, max_len, expected):
    assert library.cosine_length(text, gold, max_len=max_len) == pytest.approx(expected, abs=1e-12)


def test_cosine_length_fails_on_an_unusable_gold():
    with pytest.raises(ValueError, match="empty"):
        library.cosine_length(BOX_HALF, "  ")
    with pytest.raises(ValueError, match="could not be parsed"):
        library.cosine_length(BOX_HALF, "}")


def open_r1_cosine(length, correct, min_wrong, max_wrong, min_correct, max_correct, max_len):
    """open-r1's arrangement (min/max swapped for wrong answers), with the length clipped."""
    low, high = (min_correct, max_correct) if correct else (max_wrong, min_wrong)
    progress = min(length, max_len) / max_len
    return low + 0.5 * (high - low) * (1.0 + math.cos(progress * math.pi))


finite = st.floats(-100, 100)


@PROPERTY
@given(st.integers(0, 5000), st.booleans(), finite, finite, finite, finite, st.integers(1, 3000))
def test_cosine_scale_matches_reference(length, correct, min_wrong, max_wrong, min_correct, max_correct, max_len):
    value = library.cosine_scale(
        length, correct, min_value_wrong=min_wrong, max_value_wrong=max_wrong, min_value_correct=min_correct,
        max_value_correct=max_correct, max_len=max_len,
    )
    expected = open_r1_cosine(length, correct, min_wrong, max_wrong, min_correct, max_correct, max_len)
    assert value == pytest.approx(expected, abs=1e-9)
    ends = (min_correct, max_correct) if correct else (min_wrong, max_wrong)
    assert min(ends) - 1e-9 <= value <= max(ends) + 1e-9


# ---------------------------------------------------------------------------
# declarations


def test_every_library_rule_is_a_builtin_evaluated_in_the_workers():
    registry = RewardRegistry.default(load_plugins=False)
    for function in library.FUNCTIONS:
        spec = registry.get(function.name)
        assert spec is not None and spec.source == "builtin" and spec.description == function.description
        assert spec.entry_point == ""  # the workers have it built in
    assert registry.plugins() == []
    rule = registry.get("format").parameters[0]
    assert (rule.name, rule.default, rule.choices) == ("rule", "strict", ("strict", "library"))


def test_a_text_parameter_with_choices():
    rule = ParamSpec("rule", "", default="strict", choices=("strict", "library"))
    assert parse_params("format", (rule,), {}, 0) == ({"rule": "strict"}, [])
    assert parse_params("format", (rule,), {"rule": "library"}, 0) == ({"rule": "library"}, [])
    assert parse_params("format", (rule,), {"rule": "Library"}, 2) == (
        {}, [('rewards[2].params["rule"]', "must be one of: strict, library")]
    )
    declared = param_spec_from_declaration({"name": "mode", "default": "a", "choices": ["a", "b"]})
    assert declared.choices == ("a", "b")
    with pytest.raises(ValueError):
        ParamSpec("rule", "", default="loose", choices=("strict",))
    with pytest.raises(ValueError):
        ParamSpec("n", "", type="int", choices=("1",))
    with pytest.raises(ValueError):
        param_spec_from_declaration({"name": "mode", "choices": "ab"})


# ---------------------------------------------------------------------------
# through a real server

LIBRARY_NAMES = ["tag_count", "reasoning_steps", "cosine_length", "repetition_penalty", "soft_format"]


def test_library_rules_are_listed_with_their_rules_and_params(client):
    functions = {f.name: f for f in client.list_reward_functions()}
    for name in LIBRARY_NAMES:
        assert functions[name].source == "builtin"
        assert functions[name].description == next(f.description for f in library.FUNCTIONS if f.name == name)
    params = {f.name: {p["name"]: p["default"] for p in functions[f.name].parameters} for f in library.FUNCTIONS}
    assert params["repetition_penalty"] == {"ngram_size": "3", "max_penalty": "-1.0"}
    assert params["cosine_length"] == {
        "min_value_wrong": "-1.0", "max_value_wrong": "-0.5", "min_value_correct": "0.5",
        "max_value_correct": "1.0", "max_len": "1000", "float_rounding": "6",
    }
    assert params["reasoning_steps"] == {"target_steps": "3"}
    assert params["tag_count"] == {} and params["soft_format"] == {}
    assert {p["name"]: p["default"] for p in functions["format"].parameters} == {"rule": "strict"}
    assert "rule=library" in functions["format"].description


def test_every_library_rule_through_the_server(client):
    tagged = "<think>\nStep 1: halve\nStep 2: check\n</think>\n<answer>\n\\boxed{\\frac12}\n</answer>"
    wrong = "<think>half</think> <answer>0.25</answer>"
    completions = [[tagged, wrong, "1. go go go go"], ["First, x x x x", "\\boxed{3}"]]
    max_len = 2 * len(tagged)
    rewards = [
        RewardTerm("tag_count", 1.0),
        RewardTerm("reasoning_steps", 1.0, {"target_steps": "2"}),
        RewardTerm("cosine_length", 1.0, {"max_len": str(max_len)}),
        RewardTerm("repetition_penalty", 1.0, {"ngram_size": "1", "max_penalty": "-0.5"}),
        RewardTerm("soft_format", 1.0),
        RewardTerm("format", 1.0, {"rule": "library"}),
    ]
    stats = client.compute_reward_statistics(completions=completions, answers=["1/2", "3"], rewards=rewards)
    values = {name: stats.per_reward[name].values for name in stats.per_reward}
    np.testing.assert_array_equal(values["tag_count"], [1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(values["reasoning_steps"], [1.0, 0.0, 0.5, 0.5, 0.0])
    # tagged is correct at half of max_len (0.75); the next three are wrong, the last correct.
    cosine = [0.75] + [library.cosine_scale(len(t), False, max_len=max_len) for t in (wrong, "1. go go go go")]
    cosine += [library.cosine_scale(14, False, max_len=max_len), library.cosine_scale(9, True, max_len=max_len)]
    np.testing.assert_allclose(values["cosine_length"], cosine, atol=1e-12)
    # Words: tagged 11 with 'step' twice; 5 with 2 distinct in the third and fourth.
    np.testing.assert_allclose(values["repetition_penalty"], [-0.5 / 11, 0.0, -0.3, -0.3, 0.0], atol=1e-12)
    np.testing.assert_array_equal(values["soft_format"], [1.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(values["format"], [1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(stats.total_utils, sum(values.values()), atol=1e-12)
    assert not stats.failed.any()


def test_cosine_length_fails_only_completions_with_an_empty_gold(client):
    stats = client.compute_reward_statistics(
        completions=[["\\boxed{3}"], ["\\boxed{3}"]], answers=["3", " "],
        rewards=[RewardTerm("cosine_length", 1.0, {"max_len": "9"})],
    )
    assert stats.per_reward["cosine_length"].values[0] == pytest.approx(0.5)
    assert stats.failed.tolist() == [False, True]


@pytest.mark.parametrize(
    "term, field",
    [
        (RewardTerm("tag_count", 1.0, {"strict": "true"}), 'rewards[0].params["strict"]'),
        (RewardTerm("reasoning_steps", 1.0, {"target_steps": "0"}), 'rewards[0].params["target_steps"]'),
        (RewardTerm("cosine_length", 1.0, {"max_value_correct": "inf"}), 'rewards[0].params["max_value_correct"]'),
        (RewardTerm("cosine_length", 1.0, {"max_len": "0"}), 'rewards[0].params["max_len"]'),
        (RewardTerm("repetition_penalty", 1.0, {"max_penalty": "0.5"}), 'rewards[0].params["max_penalty"]'),
        (RewardTerm("repetition_penalty", 1.0, {"ngram_size": "65"}), 'rewards[0].params["ngram_size"]'),
        (RewardTerm("soft_format", 1.0, {"anchored": "yes"}), 'rewards[0].params["anchored"]'),
        (RewardTerm("format", 1.0, {"rule": "loose"}), 'rewards[0].params["rule"]'),
    ],
)
def test_bad_params_are_rejected_naming_the_field(client, term, field):
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_reward_statistics(completions=[["a", "b"]], answers=["1"], rewards=[term])
    assert [v.field for v in info.value.violations] == [field]
