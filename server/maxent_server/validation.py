"""Request validation: every problem becomes a field violation that names the
field, and the servicer turns the list into INVALID_ARGUMENT with a
google.rpc.BadRequest. Validation runs before any state is touched."""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._\-:/]{1,128}")
MAX_REQUEST_ID_LENGTH = 128
MAX_PAGE_SIZE = 1000


class InvalidArgument(Exception):
    """Raised with the list of (field, description) violations."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))
        self.violations = violations


class Violations:
    """Collects field violations; `raise_if_any` raises InvalidArgument."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def extend(self, items: Iterable[tuple[str, str]]) -> None:
        self.items.extend(items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    # -- scalar checks -------------------------------------------------------

    def run_id(self, value: str, field: str = "run_id", *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if not RUN_ID_PATTERN.fullmatch(value):
            self.add(field, "must be 1 to 128 characters from letters, digits and ._-:/")

    def finite(self, field: str, value: float) -> bool:
        if not math.isfinite(value):
            self.add(field, f"must be finite, got {value!r}")
            return False
        return True

    def at_least(self, field: str, value: float, low: float, *, strict: bool = False) -> bool:
        if not self.finite(field, value):
            return False
        if value < low or (strict and value == low):
            self.add(field, f"must be {'>' if strict else '>='} {low}, got {value!r}")
            return False
        return True

    # -- array checks --------------------------------------------------------

    def length(self, field: str, values: Sequence, expected: int, *, optional: bool = False) -> bool:
        """Check len(values) == expected; an empty optional array passes."""
        if optional and len(values) == 0:
            return False
        if len(values) != expected:
            self.add(field, f"has {len(values)} entries; expected {expected} (one per {_unit(field)})")
            return False
        return True

    def all_finite(self, field: str, values: np.ndarray) -> None:
        # A NaN or infinity anywhere makes the sum non-finite, so one pass
        # without temporaries clears the usual case; an overflowing sum of
        # finite values falls through to the exact search.
        if np.isfinite(values.sum()):
            return
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            self.add(f"{field}[{bad[0]}]", f"must be finite, got {float(values[bad[0]])!r}")

    def all_non_negative(self, field: str, values: np.ndarray) -> None:
        if not values.size or values.min() >= 0:
            return
        bad = np.flatnonzero(values < 0)  # none when the minimum was NaN
        if bad.size:
            self.add(f"{field}[{bad[0]}]", f"must be >= 0, got {values[bad[0]].item()!r}")

    def group_sizes(self, sizes: np.ndarray) -> int:
        """Validate group sizes and return the number of completions."""
        self.all_non_negative("group_sizes", sizes)
        return int(sizes[sizes > 0].sum(dtype=np.float64)) if sizes.size else 0


def _unit(field: str) -> str:
    return "group" if field in ("answers", "seed_semantic_entropies") else "completion"
