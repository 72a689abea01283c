"""Final-answer extraction shared by SEED-GRPO clustering and the rewards.

:func:`final_answer` follows the published library's rule (docs/math.md §5):

1. Every ``\\boxed`` or ``\\fbox``, optionally followed by whitespace, yields
   a candidate: with ``{`` the balanced-brace payload (none when the brace
   never closes); without a brace, the run of characters up to the next
   whitespace or one of ``,;.!?``. Candidates are stripped and empty ones
   ignored; the answer is the last non-empty candidate.
2. Otherwise the content of the first ``<answer>...</answer>`` (tags
   case-insensitive, content may span lines), stripped; empty is no answer.
3. Otherwise None.

:func:`last_boxed` (the ``boxed_accuracy`` and ``missing_boxed_penalty``
rewards) is the payload of the last ``\\boxed{...}``/``\\fbox{...}`` whose
braces balance, stripped, an empty payload included.

Both run in time linear in the text length: the braces are matched in one
pass with a stack, candidates are examined from the last one back and only
the answer is sliced, so no part of the text is scanned once per opening.
Callers bound the text length (:data:`MAX_ANSWER_TEXT_CHARS`).
"""

from __future__ import annotations

import re

#: The longest completion, in characters, that SEED-GRPO reads an answer
#: from; a request with a longer one is refused (docs/math.md §5). About
#: 250 000 tokens; worst-case extraction of such a text takes well under a
#: second.
MAX_ANSWER_TEXT_CHARS = 1_000_000

# A box command and the whitespace after it: the match ends where the
# candidate's payload ("{" or the brace-less run) starts.
_COMMAND = re.compile(r"\\(?:boxed|fbox)\s*")
_BRACE = re.compile(r"[{}]")
_RUN = re.compile(r"[^\s,;.!?]*")
_NON_SPACE = re.compile(r"\S")
_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</answer>", re.IGNORECASE)


def _closing_braces(text: str, wanted: set[int]) -> dict[int, int]:
    """Position of each ``{`` in `wanted` that closes -> position of its ``}``.

    One pass over the braces with a stack: a ``}`` closes the innermost open
    ``{``; one with none open is passed over.
    """
    closing: dict[int, int] = {}
    stack: list[int] = []
    for match in _BRACE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            start = stack.pop()
            if start in wanted:
                closing[start] = match.start()
    return closing


def _payload_starts(text: str) -> list[int]:
    """Where each box's payload starts (after the command and whitespace), in text order."""
    return [match.end() for match in _COMMAND.finditer(text)]


def last_boxed(text: str) -> str | None:
    """Payload of the last complete ``\\boxed{...}``/``\\fbox{...}``, or None."""
    opens = [p for p in _payload_starts(text) if text.startswith("{", p)]
    if not opens:
        return None
    closing = _closing_braces(text, set(opens))
    for p in reversed(opens):
        end = closing.get(p)
        if end is not None:
            return text[p + 1 : end].strip()
    return None


def last_box_candidate(text: str) -> str | None:
    """The last non-empty box candidate (rule 1 of :func:`final_answer`), or None.

    From the last candidate back: an empty brace-less run costs O(1), and an
    empty braced payload is seen to be blank by scanning the whitespace right
    after its ``{``; those runs are disjoint, so the walk is linear overall.
    """
    starts = _payload_starts(text)
    if not starts:
        return None
    closing: dict[int, int] | None = None
    for p in reversed(starts):
        if text.startswith("{", p):
            if closing is None:
                closing = _closing_braces(text, {q for q in starts if text.startswith("{", q)})
            end = closing.get(p)
            if end is not None and _NON_SPACE.search(text, p + 1, end):
                return text[p + 1 : end].strip()
        else:
            run = _RUN.match(text, p)
            if run is not None and run.end() > p:
                return run.group()
    return None


def first_answer_tag(text: str) -> str | None:
    """Stripped content of the first ``<answer>...</answer>`` (any case), or None when missing or blank."""
    opening = _OPEN_TAG.search(text)
    if opening is None:
        return None
    closing = _CLOSE_TAG.search(text, opening.end())
    if closing is None:
        # No later opening can have a closing tag after it either.
        return None
    content = text[opening.end() : closing.start()].strip()
    return content or None


def final_answer(text: str) -> str | None:
    """The completion's final answer: last non-empty box candidate, else first answer tag."""
    boxed = last_box_candidate(text)
    return boxed if boxed is not None else first_answer_tag(text)
