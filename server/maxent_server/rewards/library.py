"""The reward library: common GRPO shaping rewards beyond the core builtins.

``tag_count``, ``reasoning_steps``, ``cosine_length``, ``repetition_penalty``
and ``soft_format``. They are listed as builtins but run like plugins: the
runner sends each (completion, gold answer, params) to a worker process, which
has them built in (:data:`WORKER_FUNCTIONS`), under the per-completion time
limit. Each rule is linear in the completion's length (``repetition_penalty``:
words times ``ngram_size``, which is bounded); ``cosine_length`` also runs
math-verify on the final answer, like ``math_accuracy``.

Each description is the exact rule, as ListRewardFunctions shows it.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maxent_server.domain.answers import final_answer

from .params import ParamSpec

TAG_COUNT = "tag_count"
REASONING_STEPS = "reasoning_steps"
COSINE_LENGTH = "cosine_length"
REPETITION_PENALTY = "repetition_penalty"
SOFT_FORMAT = "soft_format"

#: Largest ``ngram_size``: keeps repetition_penalty's work at most this many
#: word hashes per word.
MAX_NGRAM_SIZE = 64


@dataclass(frozen=True)
class LibraryFunction:
    """One library reward: what ListRewardFunctions shows and how a worker calls it."""

    name: str
    description: str
    parameters: tuple[ParamSpec, ...]
    needs_answers: bool
    # The plugin interface: (completions, answers, **params) -> one value per completion.
    evaluate: Callable[..., list[float]]


# ---------------------------------------------------------------------------
# tag_count

_TAG_PIECES = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")

TAG_COUNT_DESCRIPTION = (
    "0.25 for each of the four pieces '<think>\\n', '\\n</think>\\n', '\\n<answer>\\n' and '\\n</answer>' "
    "(\\n a newline) that occurs exactly once in the completion, so 0.0, 0.25, 0.5, 0.75 or 1.0. Occurrences are "
    "counted left to right without overlap (Python's str.count), so '\\n</think>\\n</think>\\n' holds the piece "
    "'\\n</think>\\n' once. Tags are case-sensitive. Same rule as open-r1's tag_count_reward."
)


def tag_count(text: str) -> float:
    """See :data:`TAG_COUNT_DESCRIPTION`."""
    return 0.25 * sum(1 for piece in _TAG_PIECES if text.count(piece) == 1)


# ---------------------------------------------------------------------------
# reasoning_steps

_STEP_MARKER = re.compile(r"Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,")

REASONING_STEPS_DESCRIPTION = (
    "min(1, count / target_steps), where count is the number of matches of the regex "
    "(Step \\d+:|^\\d+\\.|\\n-|\\n\\*|First,|Second,|Next,|Finally,) found left to right without overlap "
    "(re.findall, no flags): 'Step N:' with N one or more digits; digits followed by '.' at the very start of "
    "the completion only (no MULTILINE, so a numbered list scores its first item alone); a newline followed by "
    "'-' or '*'; or one of 'First,', 'Second,', 'Next,', 'Finally,' (case-sensitive). target_steps defaults to "
    "3, open-r1's fixed value, which makes this open-r1's reasoning_steps_reward."
)


def reasoning_steps(text: str, target_steps: int = 3) -> float:
    """See :data:`REASONING_STEPS_DESCRIPTION`."""
    count = sum(1 for _ in _STEP_MARKER.finditer(text))
    return min(1.0, count / target_steps)


# ---------------------------------------------------------------------------
# cosine_length

COSINE_LENGTH_DESCRIPTION = (
    "Correctness scaled by length. L = the completion's length in characters (Unicode code points) clipped to "
    "max_len, c = cos(pi * L / max_len), so c falls from 1 at L = 0 to -1 at L >= max_len. A correct completion "
    "scores min_value_correct + (max_value_correct - min_value_correct) * (1 + c) / 2: max_value_correct when "
    "empty, falling to min_value_correct at max_len. A wrong one scores max_value_wrong + (min_value_wrong - "
    "max_value_wrong) * (1 + c) / 2: min_value_wrong when short, rising to max_value_wrong at max_len (a long "
    "wrong attempt is penalised less). Correct means math_accuracy's rule gives 1.0 (its final-answer "
    "extraction and math-verify comparison with float_rounding); no final answer is wrong. Like math_accuracy, "
    "the completion FAILS when the gold answer is empty or math-verify cannot parse it, or on the time limit. "
    "Differences from open-r1's cosine_scaled_reward (same parameter names and defaults): open-r1 does not clip "
    "L, so its value turns back past max_len; it scores 1.0 when the gold cannot be parsed; and it parses the "
    "whole completion rather than its final answer."
)

_GOLD_CACHE_SIZE = 1024
_parsed_golds: OrderedDict[str, Any] = OrderedDict()


def _parsed_gold(gold: str) -> Any:
    """math-verify's parse of a gold answer, cached per worker process."""
    from ._worker import math_parse  # imported here: _worker imports this module

    parsed = _parsed_golds.get(gold)
    if parsed is None:
        parsed = math_parse(gold)
        _parsed_golds[gold] = parsed
        if len(_parsed_golds) > _GOLD_CACHE_SIZE:
            _parsed_golds.popitem(last=False)
    else:
        _parsed_golds.move_to_end(gold)
    return parsed


def is_correct(text: str, gold: str, float_rounding: int = 6) -> bool:
    """math_accuracy's verdict on one completion; ValueError when the gold is unusable."""
    from ._worker import GOLD_UNPARSABLE, math_parse, math_verify_pair

    if not gold.strip():
        raise ValueError("the gold answer is empty")
    gold_parsed = _parsed_gold(gold)
    if not gold_parsed:
        raise ValueError(GOLD_UNPARSABLE)
    answer = final_answer(text)
    if answer is None or not answer.strip():
        return False
    return math_verify_pair(gold_parsed, math_parse(answer), float_rounding)


def cosine_scale(
    length: int,
    correct: bool,
    *,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
) -> float:
    """The value for a completion of ``length`` characters; see :data:`COSINE_LENGTH_DESCRIPTION`."""
    closeness = (1.0 + math.cos(math.pi * min(length, max_len) / max_len)) / 2.0
    if correct:
        return min_value_correct + (max_value_correct - min_value_correct) * closeness
    return max_value_wrong + (min_value_wrong - max_value_wrong) * closeness


def cosine_length(text: str, gold: str, *, float_rounding: int = 6, **scale: Any) -> float:
    """See :data:`COSINE_LENGTH_DESCRIPTION`."""
    return cosine_scale(len(text), is_correct(text, gold, float_rounding), **scale)


# ---------------------------------------------------------------------------
# repetition_penalty

REPETITION_PENALTY_DESCRIPTION = (
    "The words are the completion lower-cased (str.lower) and split on whitespace (str.split); its n-grams are "
    "the runs of ngram_size consecutive words, total = words - ngram_size + 1 of them. 0.0 when there are fewer "
    "words than ngram_size (an empty completion included); else max_penalty * (1 - distinct n-grams / total): "
    "0.0 when no n-gram repeats, approaching max_penalty as one n-gram fills the text. ngram_size defaults to 3 "
    f"(1 to {MAX_NGRAM_SIZE}), max_penalty to -1.0 (must be <= 0). Same rule as open-r1's repetition penalty."
)


def repetition_penalty(text: str, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """See :data:`REPETITION_PENALTY_DESCRIPTION`."""
    words = text.lower().split()
    total = len(words) - ngram_size + 1
    if total < 1:
        return 0.0
    distinct = len({tuple(words[start : start + ngram_size]) for start in range(total)})
    if distinct == total:
        return 0.0  # not max_penalty * 0.0, which is -0.0
    return max_penalty * (1.0 - distinct / total)


# ---------------------------------------------------------------------------
# soft_format

_SPACES = re.compile(r"\s*")

SOFT_FORMAT_DESCRIPTION = (
    "1.0 when the regex <think>.*?</think>\\s*<answer>.*?</answer> is found anywhere in the completion "
    "(re.search with DOTALL): a <think>, later a </think>, then only whitespace (or nothing) before an <answer>, "
    "and later an </answer>; else 0.0. Text may come before and after, contents may span lines and hold other "
    "tags, and no newlines are required. Tags are case-sensitive. Unlike format it does not count tags or "
    "anchor them to the ends of the completion."
)


def soft_format(text: str) -> float:
    """See :data:`SOFT_FORMAT_DESCRIPTION`; linear where the regex search is not.

    The first <think> leaves the most room, and for each </think> after it the
    whitespace it may skip is scanned once (those runs never overlap).
    """
    first_open = text.find("<think>")
    if first_open < 0:
        return 0.0
    last_answer_close = text.rfind("</answer>")
    search_from = first_open + len("<think>")
    while True:
        think_close = text.find("</think>", search_from)
        if think_close < 0:
            return 0.0
        search_from = think_close + len("</think>")
        answer_open = _SPACES.match(text, search_from).end()  # type: ignore[union-attr]
        if text.startswith("<answer>", answer_open) and last_answer_close >= answer_open + len("<answer>"):
            return 1.0


# ---------------------------------------------------------------------------
# the plugin interface and the declarations


def _text_only(rule: Callable[..., float]) -> Callable[..., list[float]]:
    def evaluate(completions: list[str], answers: list[str], **params: Any) -> list[float]:
        return [rule(text, **params) for text in completions]

    return evaluate


def _with_answer(rule: Callable[..., float]) -> Callable[..., list[float]]:
    def evaluate(completions: list[str], answers: list[str], **params: Any) -> list[float]:
        return [rule(text, gold, **params) for text, gold in zip(completions, answers, strict=True)]

    return evaluate


FUNCTIONS: tuple[LibraryFunction, ...] = (
    LibraryFunction(
        name=TAG_COUNT,
        description=TAG_COUNT_DESCRIPTION,
        parameters=(),
        needs_answers=False,
        evaluate=_text_only(tag_count),
    ),
    LibraryFunction(
        name=REASONING_STEPS,
        description=REASONING_STEPS_DESCRIPTION,
        parameters=(
            ParamSpec(
                name="target_steps",
                description="Step markers that earn the full 1.0; an integer from 1 to 1000.",
                type="int",
                default="3",
                minimum=1,
                maximum=1000,
            ),
        ),
        needs_answers=False,
        evaluate=_text_only(reasoning_steps),
    ),
    LibraryFunction(
        name=COSINE_LENGTH,
        description=COSINE_LENGTH_DESCRIPTION,
        parameters=(
            ParamSpec("min_value_wrong", "Value of a wrong completion of length 0; a finite number.", "float", "-1.0"),
            ParamSpec(
                "max_value_wrong",
                "Value of a wrong completion of max_len characters or more; a finite number.",
                "float",
                "-0.5",
            ),
            ParamSpec(
                "min_value_correct",
                "Value of a correct completion of max_len characters or more; a finite number.",
                "float",
                "0.5",
            ),
            ParamSpec(
                "max_value_correct", "Value of a correct completion of length 0; a finite number.", "float", "1.0"
            ),
            ParamSpec(
                "max_len",
                "Length in characters from which the value stays at its long end; a positive integer.",
                "int",
                "1000",
                minimum=1,
            ),
            ParamSpec(
                "float_rounding",
                "Decimal digits floats are rounded to before the numeric comparison (as in math_accuracy); an "
                "integer from 0 to 15.",
                "int",
                "6",
                minimum=0,
                maximum=15,
            ),
        ),
        needs_answers=True,
        evaluate=_with_answer(cosine_length),
    ),
    LibraryFunction(
        name=REPETITION_PENALTY,
        description=REPETITION_PENALTY_DESCRIPTION,
        parameters=(
            ParamSpec(
                "ngram_size",
                f"Words per n-gram; an integer from 1 to {MAX_NGRAM_SIZE}.",
                "int",
                "3",
                minimum=1,
                maximum=MAX_NGRAM_SIZE,
            ),
            ParamSpec(
                "max_penalty",
                "The most negative value (one n-gram repeated throughout a long completion); a finite number "
                "<= 0.",
                "float",
                "-1.0",
                maximum=0,
            ),
        ),
        needs_answers=False,
        evaluate=_text_only(repetition_penalty),
    ),
    LibraryFunction(
        name=SOFT_FORMAT,
        description=SOFT_FORMAT_DESCRIPTION,
        parameters=(),
        needs_answers=False,
        evaluate=_text_only(soft_format),
    ),
)

#: What a worker process calls for each library reward, by name.
WORKER_FUNCTIONS: dict[str, Callable[..., list[float]]] = {f.name: f.evaluate for f in FUNCTIONS}
