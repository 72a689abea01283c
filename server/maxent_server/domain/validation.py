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

# Input ranges (docs/math.md, "Input ranges"). Far beyond what any trainer
# sends, and small enough that every computation on values in range stays
# finite in float64 (whose largest number is about 1.8e308):
# - per-completion numbers (utilities, advantages, log-prob sums): |x| <=
#   VALUE_LIMIT. Their squares (<= 4e30 after centring) summed over any batch
#   that fits in a message, and the largest logits (1e15 times a beta up to
#   STATE_LIMIT, over a denominator floored at 1e-8) stay far from overflow.
VALUE_LIMIT = 1e15
# - controller measurements (weight entropies, KL, meta gradients, lr_scale)
#   and config numbers (tau, beta, learning rates, targets, step sizes):
#   |x| <= MEASUREMENT_LIMIT. One controller step then moves log tau by at
#   most 1e6 * 1e6 * 2e6 and multiplies beta by at most 1 + 1e6.
MEASUREMENT_LIMIT = 1e6
CONFIG_LIMIT = MEASUREMENT_LIMIT
# - the sample count of a pooled report (its weight in the n-weighted mean).
SAMPLE_COUNT_LIMIT = 1e15
# - a controller state: tau and beta at most STATE_LIMIT, every number
#   finite. An update that would leave the state beyond it is refused.
STATE_LIMIT = 1e12


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

    def within(self, field: str, value: float, low: float, high: float) -> bool:
        """low <= value <= high, value finite."""
        if not self.finite(field, value):
            return False
        if not low <= value <= high:
            self.add(field, f"must be in [{low:g}, {high:g}] (docs/math.md, Input ranges), got {value!r}")
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

    def all_bounded(self, field: str, values: np.ndarray, limit: float = VALUE_LIMIT) -> None:
        """Every value finite with |x| <= limit; names the first that is not."""
        # min and max propagate NaN, so two passes without temporaries clear
        # the usual case.
        if not values.size or (values.min() >= -limit and values.max() <= limit):
            return
        bad = np.flatnonzero(~(np.abs(values) <= limit))
        if bad.size:
            value = float(values[bad[0]])
            if math.isfinite(value):
                self.add(f"{field}[{bad[0]}]", f"must be in [-{limit:g}, {limit:g}] (docs/math.md, Input ranges), "
                                               f"got {value!r}")
            else:
                self.add(f"{field}[{bad[0]}]", f"must be finite, got {value!r}")

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
