"""The builtin reward rules that run in the calling process, and their docs.

``format``, ``boxed_accuracy``, ``missing_boxed_penalty`` and ``length`` are
cheap and run where :meth:`RewardRunner.evaluate` is called. Their only
potentially slow step, the final-answer extraction of
:mod:`maxent_server.domain.answers`, is linear in the text but still costs
about a quarter of a microsecond per brace; :func:`extraction_cost` is a
conservative estimate of that work, and completions over
:data:`INPROCESS_EXTRACTION_LIMIT` are extracted in the worker pool under the
per-completion time limit instead.

``math_accuracy`` runs in the worker pool (see :mod:`._worker`).
"""

from __future__ import annotations

import re

import numpy as np

from maxent_server.domain.answers import final_answer, last_boxed

FORMAT = "format"
LENGTH = "length"
BOXED_ACCURACY = "boxed_accuracy"
MISSING_BOXED_PENALTY = "missing_boxed_penalty"
MATH_ACCURACY = "math_accuracy"

MATH_ACCURACY_DESCRIPTION = (
    "1.0 when the completion's final answer is mathematically equivalent to the gold answer, else 0.0. "
    "The final answer is the last non-empty \\boxed or \\fbox payload (braces balanced; a brace-less "
    "\\boxed 4 reads 4), else the content of the first <answer>...</answer> (tags case-insensitive); a "
    "completion with neither, or with only empty ones, scores 0.0. "
    "Both the final answer and the gold answer are wrapped as \\boxed{...} and parsed with math-verify's parse "
    "(LaTeX and plain-expression extraction), then compared with math-verify's verify(gold, answer) "
    "(float_rounding digits, numeric_precision 15, strict): so \\frac12 = 0.5 = 1/2, (x+1)^2 = x^2+2x+1, "
    "\\sqrt{18} = 3\\sqrt{2}, and sets, intervals and percentages compare as math-verify treats them. "
    "The completion FAILS (no value) when the gold answer is empty or math-verify cannot parse it, or when the "
    "per-completion time limit runs out."
)
BOXED_ACCURACY_DESCRIPTION = (
    "1.0 when the payload of the completion's last \\boxed{...} or \\fbox{...} equals the gold answer exactly "
    "after normalising both: \\left and \\right (when not followed by a letter) and \\! are deleted, then all "
    "whitespace is deleted. 0.0 when they differ or the completion has no complete boxed answer. "
    "The completion FAILS when the gold answer is empty after normalisation."
)
FORMAT_RULE_STRICT = "strict"
FORMAT_RULE_LIBRARY = "library"
FORMAT_RULES = (FORMAT_RULE_STRICT, FORMAT_RULE_LIBRARY)
FORMAT_DESCRIPTION = (
    "rule=strict (default): 1.0 when the completion, stripped of leading and trailing whitespace, starts with "
    "<think>, ends with </answer>, has only whitespace between </think> and <answer>, and contains each of the "
    "four tags <think>, </think>, <answer>, </answer> exactly once; else 0.0. Tag contents are not checked. "
    "rule=library (the published library's and open-r1's rule, the regex "
    "^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$ matched at the start with DOTALL and "
    "MULTILINE): 1.0 when the completion starts with '<think>\\n' (\\n a newline), after that holds "
    "'\\n</think>\\n<answer>\\n', and after that '\\n</answer>' at its very end or followed by a newline; "
    "else 0.0. So the library rule needs those newlines and allows no leading whitespace, but allows repeated "
    "tags inside the contents and any text on the lines after </answer>."
)
MISSING_BOXED_PENALTY_DESCRIPTION = (
    "-1.0 when the completion has no complete \\boxed{...} or \\fbox{...} (balanced braces), else 0.0. "
    "Like every term it is multiplied by its weight."
)
LENGTH_DESCRIPTION = (
    "0.0 when token_count <= max_len, else -(token_count - max_len) / max_len clipped to [-1, 0] "
    "(so -1.0 from twice max_len on). Needs the request's token_counts; max_len defaults to the request's "
    "max_completion_len and one of the two must be set."
)

# ---------------------------------------------------------------------------
# format


def format_reward(text: str, rule: str = FORMAT_RULE_STRICT) -> float:
    """See :data:`FORMAT_DESCRIPTION`."""
    if rule == FORMAT_RULE_LIBRARY:
        return library_format_reward(text)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if text.count(tag) != 1:
            return 0.0
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return 0.0
    think_end = body.index("</think>") + len("</think>")
    answer_start = body.index("<answer>")
    if answer_start < think_end or body[think_end:answer_start].strip():
        return 0.0
    return 1.0


_LIBRARY_OPEN = "<think>\n"
_LIBRARY_MIDDLE = "\n</think>\n<answer>\n"
_LIBRARY_CLOSE = "\n</answer>"


def library_format_reward(text: str) -> float:
    """The ``rule=library`` format check, in linear time.

    The regex's lazy groups only ask whether some split exists: the earliest
    middle separator leaves the most room for the closing tag, so one search
    for each piece decides it.
    """
    if not text.startswith(_LIBRARY_OPEN):
        return 0.0
    middle = text.find(_LIBRARY_MIDDLE, len(_LIBRARY_OPEN))
    if middle < 0:
        return 0.0
    answer_start = middle + len(_LIBRARY_MIDDLE)
    if text.find(_LIBRARY_CLOSE + "\n", answer_start) >= 0:
        return 1.0
    closed_at_end = text.endswith(_LIBRARY_CLOSE) and len(text) - len(_LIBRARY_CLOSE) >= answer_start
    return 1.0 if closed_at_end else 0.0


# ---------------------------------------------------------------------------
# boxed_accuracy

_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_NEG_THIN_SPACE = re.compile(r"\\!")
_WHITESPACE = re.compile(r"\s+")


def normalize_boxed(text: str) -> str:
    """Delete ``\\left``/``\\right`` (not ``\\leftarrow``...), ``\\!`` and whitespace."""
    text = _LEFT_RIGHT.sub("", text)
    text = _NEG_THIN_SPACE.sub("", text)
    return _WHITESPACE.sub("", text)


# ---------------------------------------------------------------------------
# length


def length_penalty(token_counts: np.ndarray, max_len: int) -> np.ndarray:
    """See :data:`LENGTH_DESCRIPTION`."""
    counts = np.asarray(token_counts, dtype=np.float64)
    over = np.maximum(counts - float(max_len), 0.0)
    return -np.minimum(over / float(max_len), 1.0)


# ---------------------------------------------------------------------------
# extraction cost bound

#: Work units (about 4 million per second) above which a completion's answer
#: extraction runs in the worker pool rather than the calling thread: about
#: 25 ms of worst-case work.
INPROCESS_EXTRACTION_LIMIT = 100_000


def extraction_cost(text: str) -> int:
    """A conservative estimate of the work of ``final_answer``/``last_boxed``
    on ``text`` (it bounds what the quadratic extraction of old cost; the
    linear one costs less). ``last_boxed`` scanned the braces after each box opening, from the last one
    back until one closes: at most (box openings) x (braces) Python steps.
    ``last_answer_tag``'s lazy regex scans the rest of the text after each
    ``<answer>`` it tries: at most (openings) x (length) C steps, counted at
    1/20 of a Python step.
    """
    boxes = text.count("\\boxed") + text.count("\\fbox")
    braces = text.count("{") + text.count("}")
    tags = text.count("<answer>")
    return boxes * (braces + 1) + (tags * len(text)) // 20


def extract(text: str) -> tuple[str | None, str | None]:
    """(last boxed payload, final answer) of one completion."""
    return last_boxed(text), final_answer(text)
