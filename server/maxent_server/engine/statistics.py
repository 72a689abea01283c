"""Reward moments, GRPO advantages, the listwise target q and SEED-GRPO
semantic-entropy scaling (docs/math.md §2-§5), vectorized over ragged groups."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..domain.controller import AdvantageBaseline, AdvantageScaling
from .segments import Segments

ADVANTAGE_STD_EPS = 1e-4
Q_TEMPERATURE_FLOOR = 1e-8
# A group's utilities count as all equal when max - min is at most this.
CONSTANT_TOLERANCE = 1e-8


def reward_moments(utilities: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[float, float]:
    """Batch mean and population standard deviation of the valid utilities."""
    values = utilities if valid is None else utilities[valid]
    if values.numel() == 0:
        return 0.0, 0.0
    mean = values.mean()
    std = (values - mean).square_().mean().sqrt_()
    mean, std = torch.stack((mean, std)).tolist()  # one device sync, not two
    return mean, std


def group_advantages(
    seg: Segments,
    utilities: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale_rewards: bool | str = True,
    baseline: AdvantageBaseline | str = AdvantageBaseline.GROUP_MEAN,
) -> torch.Tensor:
    """A_i = (u_i - b_i) / (s + 1e-4), or u_i - b_i with no scaling.

    b_i is the group mean, or with LEAVE_ONE_OUT the mean of the other K_g - 1
    members (u_i - b_i = K/(K-1) (u_i - mean_g), 0 for K <= 1); s is the
    group's Bessel std (GROUP) or the Bessel std of every utility of the batch
    (BATCH). Invalid completions (valid False) get advantage 0 and are left
    out of every mean and std; valid None means all take part.
    """
    scaling, baseline = AdvantageScaling.of(scale_rewards), AdvantageBaseline(baseline)
    if valid is None:
        u, counts = utilities, None
        mean = seg.mean(u)
    else:
        u = torch.where(valid, utilities, torch.zeros_like(utilities))
        counts = seg.sum(valid.to(utilities.dtype))
        mean = seg.sum(u) / counts.clamp(min=1)
    centred = u - seg.broadcast(mean)
    if valid is not None:
        centred = torch.where(valid, centred, torch.zeros_like(centred))
    if scaling is AdvantageScaling.GROUP:
        std = _group_std(seg, centred, counts, utilities.dtype)
    elif scaling is AdvantageScaling.BATCH:
        std = _batch_std(u if valid is None else u[valid]).expand(seg.num_groups)
    if baseline is AdvantageBaseline.LEAVE_ONE_OUT:
        centred = centred * seg.broadcast(_leave_one_out_factor(seg, counts, utilities.dtype))
    if scaling is AdvantageScaling.NONE:
        return centred
    return centred.div_(seg.broadcast(std + ADVANTAGE_STD_EPS))


def _group_std(seg: Segments, centred: torch.Tensor, counts: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Bessel std per group from centred values; 0 for groups of one."""
    sq = seg.sum(centred.square())
    if counts is None and seg.width:
        # Every group has width members: the Bessel divisor is one number.
        return (sq / (seg.width - 1)).sqrt_() if seg.width > 1 else torch.zeros_like(sq)
    counts = seg.sizes.to(dtype) if counts is None else counts
    return torch.where(counts > 1, torch.sqrt(sq / (counts - 1).clamp(min=1)), torch.zeros_like(sq))


def _batch_std(values: torch.Tensor) -> torch.Tensor:
    """Bessel std of every value of the batch (0 for fewer than two), as TRL's batch scaling."""
    n = values.numel()
    if n < 2:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return (values - values.mean()).square().sum().div(n - 1).sqrt()


def _leave_one_out_factor(seg: Segments, counts: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """K / (K - 1) per group (0 where K <= 1): turns u - mean into u - mean of the others."""
    k = seg.sizes.to(dtype) if counts is None else counts
    return torch.where(k > 1, k / (k - 1).clamp(min=1), torch.zeros_like(k))


def zero_variance_groups(seg: Segments, utilities: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per group: True when its (valid) utilities are all equal (max - min <=
    1e-8), fewer than two of them included: nothing to learn from, what
    DAPO-style dynamic sampling drops."""
    if valid is None and seg.width:
        low, high = torch.aminmax(utilities, dim=-1)
        return (high - low) <= CONSTANT_TOLERANCE
    if valid is None:
        high, low = seg.max(utilities), -seg.max(-utilities)
        count = seg.sizes
    else:
        high = seg.max(torch.where(valid, utilities, torch.full_like(utilities, -torch.inf)))
        low = -seg.max(torch.where(valid, -utilities, torch.full_like(utilities, -torch.inf)))
        count = seg.sum(valid.to(torch.int64))
    spread = torch.where(count > 1, high - low, torch.zeros_like(high))
    return spread <= CONSTANT_TOLERANCE


def listwise_q(
    seg: Segments, utilities: torch.Tensor, valid: torch.Tensor | None = None, *, temperature: float, epsilon: float
) -> torch.Tensor:
    """q = renormalised (softmax(u/T) * (1 - eps*K) + eps) over valid members."""
    t = max(temperature, Q_TEMPERATURE_FLOOR)
    if valid is None:
        q = seg.softmax(utilities if t == 1.0 else utilities / t)
        q.mul_(1.0 - epsilon * (seg.width or seg.broadcast(seg.sizes.to(q.dtype)))).add_(epsilon)
        return q.div_(seg.broadcast(seg.sum(q)))
    logits = torch.where(valid, utilities / t, torch.full_like(utilities, -torch.inf))
    p = seg.softmax(logits)
    p = torch.where(valid, p, torch.zeros_like(p))
    counts = seg.broadcast(seg.sum(valid.to(utilities.dtype)))
    q = torch.where(valid, p * (1.0 - epsilon * counts) + epsilon, torch.zeros_like(p))
    total = seg.broadcast(seg.sum(q))
    return torch.where(total > 0, q / torch.where(total > 0, total, torch.ones_like(total)), q)


@dataclass(frozen=True)
class SeedGrpoOptions:
    alpha: float = 0.0417
    normalize_by_max_entropy: bool = True
    length_normalize_logprobs: bool = True
    num_generations: int | None = None


def cluster_ids(group_ids: list[int], answers: list[str | None]) -> list[int]:
    """Cluster index per completion: same group and same answer share one,
    a completion without an answer is a cluster of its own."""
    index: dict[object, int] = {}
    return [
        index.setdefault((g, a) if a is not None else (None, i), len(index))
        for i, (g, a) in enumerate(zip(group_ids, answers))
    ]


def semantic_entropy(seg: Segments, clusters: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    """H_g = -sum_c P_c log P_c with log P_c = LSE_c(l) - LSE_g(l), per group."""
    num_clusters = int(clusters.max()) + 1 if clusters.numel() else 0
    by_cluster = Segments(sizes=torch.bincount(clusters, minlength=num_clusters), group_of=clusters)
    cluster_group = torch.zeros(num_clusters, dtype=torch.int64, device=clusters.device)
    cluster_group.scatter_(0, clusters, seg.ids)
    log_p = by_cluster.logsumexp(loglik) - seg.logsumexp(loglik).index_select(0, cluster_group)
    by_group = Segments(sizes=seg.sizes, group_of=cluster_group)
    return -by_group.sum(torch.exp(log_p) * log_p)


def seed_advantage_scales(
    seg: Segments,
    answers: list[str | None],
    gen_logp_sum: torch.Tensor,
    token_counts: torch.Tensor | None,
    settings: SeedGrpoOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group semantic entropy H_g and advantage scale 1 / (1 + alpha_eff H_g).

    Clusters are ragged whatever the groups are, so this works flat."""
    seg = seg.flat()
    loglik = gen_logp_sum.reshape(-1)
    if settings.length_normalize_logprobs:
        assert token_counts is not None, "token_counts are required to length-normalize"
        loglik = loglik / token_counts.reshape(-1).clamp(min=1).to(loglik.dtype)
    clusters = torch.tensor(cluster_ids(seg.ids.tolist(), answers), dtype=torch.int64, device=loglik.device)
    entropy = semantic_entropy(seg, clusters, loglik)
    alpha = settings.alpha
    if settings.normalize_by_max_entropy:
        largest = int(seg.sizes.max()) if seg.num_groups else 0
        g = settings.num_generations if settings.num_generations is not None else largest
        # log(G) is 0 for G <= 1: alpha itself then (every group has a single
        # member and H_g = 0, so the scale is 1 either way).
        alpha = alpha / math.log(g) if g > 1 else alpha
    return entropy, 1.0 / (1.0 + alpha * entropy)
