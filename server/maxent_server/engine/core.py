"""The engine facade: numpy arrays in, numpy arrays out, torch in between.

No gRPC here; the servicer converts messages to these calls and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..domain.controller import WeightDenominator
from .segments import Segments
from .statistics import (
    AdvantageBaseline,
    SeedGrpoOptions,
    group_advantages,
    listwise_q,
    reward_moments,
    seed_advantage_scales,
    zero_variance_groups,
)
from .weights import ScopeSummary, entropy_summary, maxent_weights, scope_summary, zero_entropy_summary


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; anything else is taken as is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class RewardOptions:
    q_temperature: float = 1.0
    q_epsilon: float = 1e-6
    # True or "group", "batch", False or "none" (domain.AdvantageScaling).
    scale_rewards: bool | str = True
    advantage_baseline: AdvantageBaseline = AdvantageBaseline.GROUP_MEAN
    zero_truncated_completion_rewards: bool = False
    max_completion_len: int | None = None
    seed_grpo: SeedGrpoOptions | None = None


@dataclass(frozen=True)
class RewardStatistics:
    total_utils: np.ndarray
    advantages: np.ndarray
    q_values: np.ndarray
    reward_mean: float
    reward_std: float
    seed_semantic_entropies: np.ndarray | None = None
    seed_advantage_scales: np.ndarray | None = None
    zero_variance_groups: np.ndarray | None = None  # [G] bool


@dataclass(frozen=True)
class WeightOptions:
    tau: float
    beta: float
    denominator: WeightDenominator = WeightDenominator.TAU_PLUS_BETA
    length_normalize_ref: bool = True
    train_grpo_objective: bool = False
    include_reference_term: bool = True
    normalize_by_tokens: bool = False

    @property
    def denominator_value(self) -> float:
        return self.tau + self.beta if self.denominator is WeightDenominator.TAU_PLUS_BETA else self.tau


@dataclass(frozen=True)
class WeightStats:
    weights: np.ndarray
    group_entropies: np.ndarray
    weight_entropy: float
    weight_entropy_min: float
    weight_entropy_max: float
    advantage_entropy: np.ndarray
    scope: ScopeSummary | None = None  # the mixed-group and maximum entropies


def combine_rewards(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """u_i = sum_r w_r * r(i) with NaN terms skipped; values is [R, N]."""
    if values.shape[0] == 0:
        return np.zeros(values.shape[1], dtype=np.float64)
    return np.nansum(values * weights[:, None], axis=0)


class Engine:
    """MaxEnt-GRPO math on one torch device, in float64."""

    dtype = torch.float64

    def __init__(self, device: str | torch.device = "auto", *, threads: int = 0) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.threads = threads
        self.prepare_thread()

    def prepare_thread(self) -> None:
        """Apply the intra-op thread count to the calling thread.

        torch's CPU thread count is per calling thread (OpenMP), so every
        thread that computes must call this once, e.g. as a pool initializer.
        One thread per call keeps concurrent small calls from fighting over
        the cores; 0 keeps torch's default."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype or self.dtype, device=self.device)

    def _per_completion(self, seg: Segments, array: np.ndarray | None, dtype: torch.dtype | None = None):
        """A flat per-completion array as a tensor in the batch's layout."""
        return None if array is None else seg.layout(self._tensor(array, dtype))

    @staticmethod
    def _numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().reshape(-1).to("cpu").numpy()

    def _host(self, *tensors: torch.Tensor | None) -> list[np.ndarray | None]:
        """Tensors as flat numpy arrays. Off the CPU, the float64 ones travel
        to the host in one copy (one sync) rather than one each."""
        if self.device.type == "cpu":
            return [None if t is None else self._numpy(t) for t in tensors]
        floats = [t.reshape(-1) for t in tensors if t is not None and t.dtype == self.dtype]
        packed = iter(np.split(self._numpy(torch.cat(floats)), np.cumsum([t.numel() for t in floats])[:-1])
                      if floats else [])
        return [None if t is None else next(packed) if t.dtype == self.dtype else self._numpy(t) for t in tensors]

    def reward_statistics(
        self,
        group_sizes: np.ndarray,
        utilities: np.ndarray,
        options: RewardOptions,
        *,
        valid: np.ndarray | None = None,
        token_counts: np.ndarray | None = None,
        truncated: np.ndarray | None = None,
        gen_logp_sum: np.ndarray | None = None,
        answers: list[str | None] | None = None,
    ) -> RewardStatistics:
        """Utilities to moments, advantages and q (docs/math.md §1-§5).

        `valid` marks completions that take part (False: excluded by a
        failed reward; advantage 0, q 0, left out of every statistic).
        """
        seg = Segments.from_sizes(group_sizes, self.device)
        rewards = self._reward_tensors(seg, utilities, options, valid, token_counts, truncated, gen_logp_sum, answers)
        return self._reward_result(rewards)

    def _reward_tensors(self, seg: Segments, utilities, options: RewardOptions, valid=None, token_counts=None,
                        truncated=None, gen_logp_sum=None, answers=None) -> "_RewardTensors":
        u = self._per_completion(seg, utilities)
        keep = self._per_completion(seg, valid, torch.bool) if valid is not None and not valid.all() else None
        counts = self._per_completion(seg, token_counts, torch.int64)
        if options.zero_truncated_completion_rewards:
            cut = (
                self._per_completion(seg, truncated, torch.bool)
                if truncated is not None
                else torch.zeros_like(u, dtype=torch.bool)
            )
            if options.max_completion_len is not None and counts is not None:
                cut = cut | (counts >= options.max_completion_len)
            u = torch.where(cut, torch.zeros_like(u), u)
        mean, std = reward_moments(u, keep)
        advantages = group_advantages(
            seg, u, keep, scale_rewards=options.scale_rewards, baseline=options.advantage_baseline
        )
        q = listwise_q(seg, u, keep, temperature=options.q_temperature, epsilon=options.q_epsilon)
        entropies = scales = None
        if options.seed_grpo is not None:
            assert gen_logp_sum is not None and answers is not None
            entropies, scales = seed_advantage_scales(seg, answers, self._tensor(gen_logp_sum), counts, options.seed_grpo)
            advantages = advantages * seg.broadcast(scales)
        return _RewardTensors(u, advantages, q, mean, std, entropies, scales, zero_variance_groups(seg, u, keep))

    def _reward_result(self, t: "_RewardTensors", *arrays: np.ndarray | None) -> RewardStatistics:
        """`arrays`: t's tensors already on the host, in field order (else copied here)."""
        u, advantages, q, entropies, scales, flat = arrays or self._host(
            t.utilities, t.advantages, t.q, t.entropies, t.scales, t.zero_variance)
        assert u is not None and advantages is not None and q is not None  # copies of tensors, never None
        return RewardStatistics(
            total_utils=u,
            advantages=advantages,
            q_values=q,
            reward_mean=t.mean,
            reward_std=t.std,
            seed_semantic_entropies=entropies,
            seed_advantage_scales=scales,
            zero_variance_groups=flat,
        )

    def step_statistics(
        self,
        group_sizes: np.ndarray,
        utilities: np.ndarray,
        reward_options: RewardOptions,
        ref_logp_sum: np.ndarray | None,
        ref_token_counts: np.ndarray | None,
        weight_options: WeightOptions,
        *,
        valid: np.ndarray | None = None,
        token_counts: np.ndarray | None = None,
        truncated: np.ndarray | None = None,
        gen_logp_sum: np.ndarray | None = None,
        answers: list[str | None] | None = None,
    ) -> tuple[RewardStatistics, WeightStats]:
        """One training step's numbers: reward statistics, then the weights of
        their q (or, under the GRPO objective, of their advantages). q stays
        on the device in between, and the results come back in one copy."""
        seg = Segments.from_sizes(group_sizes, self.device)
        r = self._reward_tensors(seg, utilities, reward_options, valid, token_counts, truncated, gen_logp_sum, answers)
        w = self._weight_tensors(seg, r.q, ref_logp_sum, ref_token_counts, weight_options, r.advantages)
        weights, summary, scope = w
        host = self._host(r.utilities, r.advantages, r.q, r.entropies, r.scales, r.zero_variance,
                          weights, summary.group_entropies, summary.advantage_entropy)
        return self._reward_result(r, *host[:6]), self._weight_result(summary, scope, *host[6:])

    def weight_stats(
        self,
        group_sizes: np.ndarray,
        q_values: np.ndarray,
        ref_logp_sum: np.ndarray,
        ref_token_counts: np.ndarray | None,
        options: WeightOptions,
        *,
        advantages: np.ndarray | None = None,
    ) -> WeightStats:
        """MaxEnt weights and entropy diagnostics (docs/math.md §6)."""
        seg = Segments.from_sizes(group_sizes, self.device)
        q = None if options.train_grpo_objective else self._per_completion(seg, q_values)
        a = self._per_completion(seg, advantages) if options.train_grpo_objective else None
        w, summary, scope = self._weight_tensors(seg, q, ref_logp_sum, ref_token_counts, options, a)
        return self._weight_result(summary, scope, *self._host(w, summary.group_entropies, summary.advantage_entropy))

    def _weight_tensors(self, seg: Segments, q: torch.Tensor | None, ref_logp_sum, ref_token_counts,
                        options: WeightOptions, advantages: torch.Tensor | None):
        """(weights, entropy summary, scope summary); the first two as tensors."""
        if options.train_grpo_objective:
            assert advantages is not None
            summary = zero_entropy_summary(seg, advantages)
            return advantages, summary, scope_summary(seg, summary.group_entropies, advantages)
        counts = (
            self._per_completion(seg, ref_token_counts, torch.int64)
            if ref_token_counts is not None
            else torch.ones(seg.shape, dtype=torch.int64, device=self.device)
        )
        ref = (
            self._per_completion(seg, ref_logp_sum)
            if ref_logp_sum is not None
            else torch.zeros(seg.shape, dtype=self.dtype, device=self.device)
        )
        if options.length_normalize_ref:
            ref = ref / counts.clamp(min=1)  # int64 counts promote to float64 exactly
        w = maxent_weights(
            seg,
            q,
            ref,
            counts,
            beta=options.beta,
            denominator=options.denominator_value,
            include_reference_term=options.include_reference_term,
            normalize_by_tokens=options.normalize_by_tokens,
        )
        summary = entropy_summary(seg, w)
        return w, summary, scope_summary(seg, summary.group_entropies, q)

    @staticmethod
    def _weight_result(summary, scope: ScopeSummary, weights: np.ndarray | None, group_entropies: np.ndarray | None,
                       advantage_entropy: np.ndarray | None) -> WeightStats:
        """The arguments are host copies of tensors, so never None."""
        assert weights is not None and group_entropies is not None and advantage_entropy is not None
        return WeightStats(
            weights=weights,
            group_entropies=group_entropies,
            weight_entropy=summary.mean,
            weight_entropy_min=summary.min,
            weight_entropy_max=summary.max,
            advantage_entropy=advantage_entropy,
            scope=scope,
        )


@dataclass(frozen=True)
class _RewardTensors:
    """Reward statistics still on the device."""

    utilities: torch.Tensor
    advantages: torch.Tensor
    q: torch.Tensor
    mean: float
    std: float
    entropies: torch.Tensor | None
    scales: torch.Tensor | None
    zero_variance: torch.Tensor
