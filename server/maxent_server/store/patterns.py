"""Run-id patterns as a store reads them: shell-style (``*`` any characters,
``?`` one, ``[...]`` a set), case-sensitive, the same rule as
``fnmatch.fnmatchcase`` that authorisation applies.

A listing reads only the ids under each pattern's literal prefix (the text
before its first ``*``, ``?`` or ``[``), so its cost follows the runs it
could return; a pattern that starts with a wildcard has the empty prefix and
reads every id (ids only, never the records of runs it does not return)."""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

_WILDCARDS = re.compile(r"[*?\[]")


def literal_prefix(pattern: str) -> str:
    """The text every id matching `pattern` starts with."""
    found = _WILDCARDS.search(pattern)
    return pattern if found is None else pattern[: found.start()]


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix`
    (code-point order, which is also UTF-8 byte order), or None when there
    is none (an empty prefix, or one of only the highest code point)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            bump = last + 1
            if 0xD800 <= bump <= 0xDFFF:  # surrogates cannot be encoded: skip past them
                bump = 0xE000
            return prefix[:-1] + chr(bump)
        prefix = prefix[:-1]
    return None


class RunPatterns:
    """A token's run patterns: `matches(id)`, the disjoint, ascending literal
    prefixes (`prefixes`) whose ids are the only candidates, and whether
    being under a prefix is enough (`prefixes_decide`)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        if not self.patterns:
            raise ValueError("no run patterns")
        self._regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns))
        self.prefixes = _covering(literal_prefix(p) for p in self.patterns)
        # True when every id under the prefixes matches (every pattern is
        # `literal*`): a listing then need not test each id.
        self.prefixes_decide = all(p.endswith("*") and not _WILDCARDS.search(p[:-1]) for p in self.patterns)

    def matches(self, run_id: str) -> bool:
        return self._regex.match(run_id) is not None


def _covering(prefixes: Iterable[str]) -> tuple[str, ...]:
    """The prefixes in ascending order, without those another one covers."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes)):
        if kept and prefix.startswith(kept[-1]):
            continue
        kept.append(prefix)
    return tuple(kept)
