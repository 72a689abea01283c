"""Imported once by the forkserver: every reward worker is forked from it warm.

Loads math-verify (and, through :mod:`maxent_server.domain.answers`, the
engine package) and runs one parse and verify, so a new or replacement worker
pays neither the imports nor math-verify's first-use set-up.
"""

from __future__ import annotations

from ._worker import quiet_math_verify, warm_up

quiet_math_verify()
warm_up()
