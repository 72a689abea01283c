"""Reward plugins used by the tests (entry-point group ``maxent.rewards``).

Each is a callable ``(completions, answers, **params) -> list[float]``.
The misbehaving ones act up only on completions that contain a marker, so a
test can mix good and bad completions in one batch:

* ``sleepy``: sleeps (interruptibly) forever on ``SLEEP``;
* ``stuck``: blocks SIGALRM and SIGTERM, then sleeps forever on ``STUCK``
  (only SIGKILL ends it);
* ``crashy``: kills its own process with ``os._exit(3)`` on ``CRASH``;
* ``flaky``: raises on ``RAISE``, returns NaN on ``NAN`` and two values on
  ``TWO``.
"""

from __future__ import annotations

import os
import signal
import time


def keyword_match(completions, answers, *, keyword, case_sensitive=False, score=1.0):
    """Placeholder docstring; maxent_description wins."""
    out = []
    for text in completions:
        hay, needle = (text, keyword) if case_sensitive else (text.lower(), keyword.lower())
        out.append(float(score) if needle in hay else 0.0)
    return out


keyword_match.maxent_description = (
    "score when the completion contains keyword (case-insensitive unless case_sensitive), else 0.0."
)
keyword_match.maxent_parameters = [
    {"name": "keyword", "description": "Text to look for.", "type": "str", "required": True},
    {"name": "case_sensitive", "description": "Match case.", "type": "bool", "default": False},
    {"name": "score", "description": "Value on a match.", "type": "float", "default": "1.0", "minimum": 0},
]
keyword_match.maxent_needs_answers = False


def answer_length(completions, answers):
    """Length of the gold answer in characters (reads the answers)."""
    return [float(len(a)) for a in answers]


def sleepy(completions, answers):
    """1.0, but never returns for a completion containing SLEEP."""
    out = []
    for text in completions:
        if "SLEEP" in text:
            while True:
                time.sleep(3600)
        out.append(1.0)
    return out


def stuck(completions, answers):
    """1.0, but hangs beyond the reach of signals for a completion containing STUCK."""
    out = []
    for text in completions:
        if "STUCK" in text:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
            while True:
                time.sleep(3600)
        out.append(1.0)
    return out


def crashy(completions, answers):
    """len(completion), but kills its process for a completion containing CRASH."""
    out = []
    for text in completions:
        if "CRASH" in text:
            os._exit(3)
        out.append(float(len(text)))
    return out


def flaky(completions, answers):
    """0.5, but misbehaves on the markers RAISE, NAN and TWO."""
    out = []
    for text in completions:
        if "RAISE" in text:
            raise ValueError("flaky failed on purpose")
        if "NAN" in text:
            out.append(float("nan"))
        elif "TWO" in text:
            out.extend([0.5, 0.5])
        else:
            out.append(0.5)
    return out
