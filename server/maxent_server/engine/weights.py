"""MaxEnt sequence weights in closed form and their entropy diagnostics
(docs/math.md §6), vectorized over ragged groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .segments import Segments

LOG_FLOOR = 1e-12
DENOMINATOR_FLOOR = 1e-8


def maxent_weights(
    seg: Segments,
    q: torch.Tensor,
    ref_logp: torch.Tensor,
    token_counts: torch.Tensor,
    *,
    beta: float,
    denominator: float,
    include_reference_term: bool,
    normalize_by_tokens: bool,
) -> torch.Tensor:
    """w = softmax_g((log max(q, 1e-12) + beta * ref_logp) / D).

    `ref_logp` is already length-normalized when the run asks for it.
    """
    z = q.clamp(min=LOG_FLOOR).log_()
    if include_reference_term:
        z.add_(ref_logp, alpha=beta)
    w = seg.softmax(z.div_(max(denominator, DENOMINATOR_FLOOR)))
    if normalize_by_tokens:
        w = w * token_counts.clamp(min=1).to(w.dtype)
        w = w / seg.broadcast(seg.sum(w))
    return w


@dataclass(frozen=True)
class EntropySummary:
    group_entropies: torch.Tensor  # [G], 0 for empty groups
    mean: float
    min: float
    max: float
    advantage_entropy: torch.Tensor  # [N], w_i - 1/K_g


def entropy_summary(seg: Segments, weights: torch.Tensor) -> EntropySummary:
    """H_g = -sum w log max(w, 1e-12); mean, min and max over non-empty groups."""
    entropies = seg.sum(weights.clamp(min=LOG_FLOOR).log_().mul_(weights)).neg_()
    present = entropies if seg.width else entropies[seg.nonempty]
    uniform = 1.0 / (seg.width or seg.broadcast(seg.sizes.clamp(min=1).to(weights.dtype)))
    advantage = weights - uniform
    if present.numel() == 0:
        return EntropySummary(entropies, 0.0, 0.0, 0.0, advantage)
    low, high = torch.aminmax(present)
    mean, low, high = torch.stack((present.mean(), low, high)).tolist()
    return EntropySummary(entropies, mean, low, high, advantage)


# A group's q counts as constant when max - min is at most this.
CONSTANT_Q_TOLERANCE = 1e-8


@dataclass(frozen=True)
class ScopeSummary:
    """Which groups tau can act on, and the entropies over them."""

    groups: int  # non-empty groups
    max_entropy: float  # mean of log K_g over non-empty groups
    mixed_entropy: float | None  # mean group entropy over mixed groups; None without any
    mixed_count: int
    mixed_max_entropy: float  # mean of log K_g over mixed groups (0 without any)


def scope_summary(seg: Segments, group_entropies: torch.Tensor, targets: torch.Tensor) -> ScopeSummary:
    """Mixed groups are those whose `targets` (q, or the GRPO advantages) are
    not constant (max - min > 1e-8): only their weights depend on tau."""
    dtype = group_entropies.dtype
    nonempty = seg.sizes > 0
    spread = seg.max(targets) + seg.max(-targets)  # max - min; -inf for an empty group
    mixed = (nonempty & (spread > CONSTANT_Q_TOLERANCE)).to(dtype)
    log_k = torch.log(seg.sizes.clamp(min=1).to(dtype))
    present = nonempty.to(dtype)
    sums = torch.stack(((log_k * present).sum(), present.sum(), (group_entropies * mixed).sum(), mixed.sum(),
                        (log_k * mixed).sum()))
    log_k_total, groups, mixed_entropy, mixed_count, mixed_log_k = sums.tolist()  # one device sync
    count = int(mixed_count)
    return ScopeSummary(
        groups=int(groups),
        max_entropy=log_k_total / groups if groups else 0.0,
        mixed_entropy=mixed_entropy / count if count else None,
        mixed_count=count,
        mixed_max_entropy=mixed_log_k / count if count else 0.0,
    )


def zero_entropy_summary(seg: Segments, like: torch.Tensor) -> EntropySummary:
    """Entropy statistics under the GRPO objective: all zero."""
    return EntropySummary(
        torch.zeros(seg.num_groups, dtype=like.dtype, device=like.device), 0.0, 0.0, 0.0, torch.zeros_like(like)
    )
