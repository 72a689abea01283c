"""Segment (ragged group) reductions over flattened per-completion tensors.

A batch of groups with sizes K_1..K_G is laid out flat; every reduction here
works on the whole batch at once through scatter/index operations, so the cost
does not depend on how many groups there are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Group layout of a flat batch: sizes per group and group id per element."""

    sizes: torch.Tensor  # [G] int64
    ids: torch.Tensor  # [N] int64, group of each element
    # K when every group has the same K > 0 members laid out contiguously:
    # reductions then run on a [G, K] view instead of scatter operations.
    width: int | None = None

    @classmethod
    def from_sizes(cls, sizes: torch.Tensor | list[int], device: torch.device | str = "cpu") -> "Segments":
        sizes_t = torch.as_tensor(sizes, dtype=torch.int64, device=device)
        groups = torch.arange(sizes_t.numel(), device=sizes_t.device)
        width = None
        if sizes_t.numel():
            low, high = torch.aminmax(sizes_t)
            width = int(high) if int(low) == int(high) and int(high) > 0 else None
        return cls(sizes=sizes_t, ids=torch.repeat_interleave(groups, sizes_t), width=width)

    @property
    def num_groups(self) -> int:
        return self.sizes.numel()

    @property
    def num_elements(self) -> int:
        return self.ids.numel()

    @property
    def nonempty(self) -> torch.Tensor:
        return self.sizes > 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group sum, [G]; 0 for empty groups."""
        if self.width:
            return values.view(-1, self.width).sum(dim=1)
        out = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.ids, values)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group maximum, [G]; -inf for empty groups."""
        if self.width:
            return values.view(-1, self.width).amax(dim=1)
        out = torch.full((self.num_groups,), -torch.inf, dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, self.ids, values, reduce="amax", include_self=True)

    def broadcast(self, per_group: torch.Tensor) -> torch.Tensor:
        """Per-group values repeated for each element, [N]."""
        if self.width:
            return per_group.unsqueeze(1).expand(-1, self.width).reshape(-1)
        return per_group.index_select(0, self.ids)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group mean, [G]; 0 for empty groups."""
        return self.sum(values) / self.sizes.clamp(min=1).to(values.dtype)

    def logsumexp(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group log-sum-exp, [G]; -inf for empty groups."""
        peak = self.max(values)
        safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = self.sum(torch.exp(values - self.broadcast(safe_peak)))
        return torch.log(total) + safe_peak

    def softmax(self, values: torch.Tensor) -> torch.Tensor:
        """Softmax within each group, [N]. Elements at -inf get exactly 0."""
        peak = self.max(values)
        safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        shifted = torch.exp(values - self.broadcast(safe_peak))
        return shifted / self.broadcast(self.sum(shifted))
