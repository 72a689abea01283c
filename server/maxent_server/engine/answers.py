"""Final-answer extraction shared by SEED-GRPO clustering and the rewards.

The final answer of a completion is the payload of its last ``\\boxed{...}``
or ``\\fbox{...}`` (braces balanced), else the content of its last
``<answer>...</answer>``; None when it has neither.
"""

from __future__ import annotations

import re

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Payload of the last complete ``\\boxed{...}``/``\\fbox{...}``, or None."""
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        depth = 1
        for brace in _BRACE.finditer(text, match.end()):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                return text[match.end() : brace.start()].strip()
    return None


def last_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, or None."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def final_answer(text: str) -> str | None:
    """The completion's final answer: last boxed payload, else last answer tag."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else last_answer_tag(text)
