"""Group (segment) reductions over per-completion tensors of a whole batch.

A batch of groups with sizes K_1..K_G arrives flat. When every group has the
same size K > 0 (the usual GRPO batch) the per-completion tensors are worked
on as a dense [G, K] view, where each group operation is a single torch
kernel along the last dimension. Otherwise they stay flat ([N]) and groups
are reduced with scatter/index operations. Either way the cost does not
depend on how many groups there are, and the formulas written against this
class (sum, broadcast, softmax...) are the same for both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class Segments:
    """Group layout of a batch: sizes per group and, for dense batches, K."""

    sizes: torch.Tensor  # [G] int64
    # K when every group has the same K > 0 members: per-completion tensors
    # are then [G, K]; None for ragged batches, whose tensors are flat [N].
    width: int | None = None
    group_of: torch.Tensor | None = None  # [N] group of each element; derived when not given

    @classmethod
    def from_sizes(cls, sizes: np.ndarray | list[int], device: torch.device | str = "cpu") -> "Segments":
        array = np.asarray(sizes, dtype=np.int64)
        width = None
        if array.size and array.min() == array.max() and array[0] > 0:
            width = int(array[0])
        return cls(sizes=torch.as_tensor(array, device=device), width=width)

    @cached_property
    def ids(self) -> torch.Tensor:
        """Group id of each element, [N], in flat order."""
        if self.group_of is not None:
            return self.group_of
        groups = torch.arange(self.num_groups, device=self.sizes.device)
        return torch.repeat_interleave(groups, self.sizes)

    @cached_property
    def num_elements(self) -> int:
        if self.width:
            return self.num_groups * self.width
        return int(self.sizes.sum())

    @property
    def num_groups(self) -> int:
        return self.sizes.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of a per-completion tensor in this layout."""
        return (self.num_groups, self.width) if self.width else (self.num_elements,)

    @property
    def nonempty(self) -> torch.Tensor:
        return self.sizes > 0

    def flat(self) -> "Segments":
        """The same groups in the flat layout (for scatter-only work)."""
        return self if self.width is None else Segments(sizes=self.sizes)

    def layout(self, flat_values: torch.Tensor) -> torch.Tensor:
        """A flat [N] tensor viewed in this layout."""
        return flat_values.view(self.shape) if self.width else flat_values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group sum, [G]; 0 for empty groups."""
        if self.width:
            return values.sum(dim=-1)
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.ids, values)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group maximum, [G]; -inf for empty groups."""
        if self.width:
            return values.amax(dim=-1)
        out = torch.full((self.num_groups,), -torch.inf, dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, self.ids, values, reduce="amax", include_self=True)

    def broadcast(self, per_group: torch.Tensor) -> torch.Tensor:
        """Per-group values lined up with the elements: [G, 1] (dense, a view
        that broadcasts) or [N] (flat)."""
        if self.width:
            return per_group.unsqueeze(-1)
        return per_group.index_select(0, self.ids)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group mean, [G]; 0 for empty groups."""
        if self.width:
            return values.mean(dim=-1)
        return self.sum(values) / self.sizes.clamp(min=1).to(values.dtype)

    def logsumexp(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group log-sum-exp, [G]; -inf for empty groups."""
        safe_peak = self._finite_peak(values)
        total = self.sum(torch.exp(values - self.broadcast(safe_peak)))
        return torch.log(total) + safe_peak

    def softmax(self, values: torch.Tensor) -> torch.Tensor:
        """Softmax within each group. Elements at -inf get exactly 0 (a group
        that is all -inf gets NaN, as 0/0)."""
        # Written out rather than torch.softmax: over rows of a few dozen
        # float64 values the fused CPU kernel is several times slower.
        shifted = (values - self.broadcast(self._finite_peak(values))).exp_()
        return shifted.div_(self.broadcast(self.sum(shifted)))

    def _finite_peak(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group maximum, 0 where it is not finite (empty or all -inf)."""
        return torch.nan_to_num(self.max(values), nan=0.0, posinf=0.0, neginf=0.0)
