"""Final-answer extraction (docs/math.md §5): the library's rule, against the
plain reference of tests/reference.py, and hand cases for each clause."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402

from maxent_server.domain.answers import final_answer, last_boxed  # noqa: E402

PIECES = ["\\boxed", "\\fbox", "{", "}", " ", "\n", "\t", "x", "42", ",", ".", "!", "?", ";", "\\",
          "<answer>", "</answer>", "<ANSWER>", "</Answer>", "<answer", "ſ", "\u2003"]
pieces = st.lists(st.sampled_from(PIECES), max_size=24).map("".join)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", None),
        ("no answer here", None),
        ("so \\boxed{42}", "42"),
        ("\\boxed 4", "4"),  # brace-less: the run up to whitespace
        ("\\boxed 4, done", "4"),  # ... or one of ,;.!?
        ("\\boxed4.", "4"),
        ("\\fbox{x}", "x"),
        ("\\boxed{{nested}{braces}}", "{nested}{braces}"),
        ("\\boxed{ \\frac{1}{2} }", "\\frac{1}{2}"),
        ("\\boxed {spaced}", "spaced"),
        ("\\boxed\n{7}", "7"),
        ("\\boxed{} then \\boxed{5}", "5"),  # an empty box is ignored ...
        ("\\boxed{5} then \\boxed{  }", "5"),  # ... also when it is the last one
        ("\\boxed{5} then \\boxed.", "5"),  # an empty brace-less run too
        ("\\boxed{5} then \\boxed{6", "5"),  # an unbalanced box yields no candidate
        ("\\boxed{", None),
        ("\\boxed{6", None),
        ("\\boxed{x} \\fbox{y}", "y"),
        ("\\fbox{y} \\boxed{x}", "x"),
        ("\\boxed{a} <answer>b</answer>", "a"),  # a box beats the tag
        ("<answer>b</answer> \\boxed{a}", "a"),
        ("<answer>  </answer>", None),  # blank tag: no answer
        ("<answer></answer>", None),
        ("<ANSWER>7</Answer>", "7"),  # tags in any case
        ("<answer>1</answer> and <answer>2</answer>", "1"),  # the first tag
        ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
        ("<answer>unclosed", None),
        ("<answer>a<answer>b</answer>", "a<answer>b"),
        ("\\boxed{} <answer>t</answer>", "t"),  # no non-empty candidate: the tag
    ],
)
def test_final_answer_hand_cases(text, expected):
    assert final_answer(text) == expected
    assert ref.final_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{5} then \\boxed{}", ""),  # the last closed box, empty or not
        ("\\boxed{5} then \\boxed{6", "5"),
        ("\\boxed 4", None),  # only braced boxes
        ("\\fbox{{a}b}", "{a}b"),
        ("}{ \\boxed{x}", "x"),
        ("", None),
    ],
)
def test_last_boxed_hand_cases(text, expected):
    assert last_boxed(text) == expected


@settings(max_examples=400, deadline=None)
@given(st.one_of(pieces, st.text(max_size=40)))
def test_final_answer_matches_reference_property(text):
    assert final_answer(text) == ref.final_answer(text)
