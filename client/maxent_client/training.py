"""Training with the service's weights: the listwise MaxEnt loss, the k3 KL
estimate and the controller's request ids, on the trainer's side.

The server computes the weights w (ComputeStepStatistics or
ComputeWeightStats); the trainer turns them into a gradient. Per group g with
policy sequence log-probs l_i (the sum of the completion's token log-probs):

    p = softmax_g(l)                 listwise policy distribution
    L_g = -sum_i w_i * log p_i       cross-entropy to the MaxEnt weights

and the batch loss is the mean of L_g over active groups (non-empty, and with
`skip_zero_variance_groups` also q not constant). The optional clip term adds
c * mean_g(-sum_i min(r_i a_i, clip(r_i, 1 - eps_low, 1 + eps_high) a_i)) with
a_i = w_i - 1/K_g and r_i = exp(clamp(l_i - l_i_old, +-20)). Weights are
constants: no gradient flows into them.

The measured KL that drives beta is the token mean of
k3 = exp(d) - d - 1, d = clamp(log pi_ref - log pi, +-20), over every
completion token of the batch. Everything here is torch, vectorized over the
whole batch; import it only where torch is installed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

#: Ratio and KL log-differences are clamped to this many nats.
LOG_RATIO_CLAMP = 20.0
#: q is constant in a group when max - min is at most this.
CONSTANT_Q_TOLERANCE = 1e-8
MAX_REQUEST_ID_LENGTH = 128


@dataclass(frozen=True)
class LossParts:
    """The batch loss and its parts (all scalar tensors; `loss` carries the graph)."""

    loss: torch.Tensor
    listwise: torch.Tensor
    clip: torch.Tensor
    active_groups: int


def _as_tensor(values: Any, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device=like.device, dtype=dtype or like.dtype)
    return torch.as_tensor(np.asarray(values), device=like.device, dtype=dtype or like.dtype)


def _group_ids(group_sizes: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = torch.as_tensor(np.asarray(group_sizes, dtype=np.int64), device=device)
    if sizes.ndim != 1 or bool((sizes < 0).any()):
        raise ValueError("group_sizes must be a flat list of counts >= 0")
    return sizes, torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)


def _group_sum(values: torch.Tensor, ids: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add(0, ids, values)


def _group_logsumexp(values: torch.Tensor, ids: torch.Tensor, groups: int) -> torch.Tensor:
    peak = torch.full((groups,), -torch.inf, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, ids, values.detach(), reduce="amax", include_self=True)
    peak = torch.nan_to_num(peak, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.log(_group_sum(torch.exp(values - peak[ids]), ids, groups)) + peak


def constant_q_groups(q_values: Any, group_sizes: Any) -> np.ndarray:
    """Per group: True where q is constant (max - min <= 1e-8) or the group is empty."""
    q = np.asarray(q_values, dtype=np.float64).reshape(-1)
    sizes = np.asarray(group_sizes, dtype=np.int64).reshape(-1)
    if q.size != int(sizes.sum()):
        raise ValueError(f"q_values has {q.size} entries but group_sizes add up to {int(sizes.sum())}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    nonempty = sizes > 0
    spread = np.zeros(sizes.size)
    if q.size:
        idx = starts[nonempty]
        spread[nonempty] = np.maximum.reduceat(q, idx) - np.minimum.reduceat(q, idx)
    return ~nonempty | (spread <= CONSTANT_Q_TOLERANCE)


def active_group_mask(
    group_sizes: Any, *, q_values: Any = None, skip_zero_variance_groups: bool = False
) -> np.ndarray:
    """Groups that count in the loss: non-empty, and with
    `skip_zero_variance_groups` also q not constant."""
    sizes = np.asarray(group_sizes, dtype=np.int64).reshape(-1)
    active = sizes > 0
    if skip_zero_variance_groups:
        if q_values is None:
            raise ValueError("skip_zero_variance_groups needs q_values")
        active &= ~constant_q_groups(q_values, sizes)
    return active


def listwise_maxent_loss(
    policy_logp: torch.Tensor,
    weights: Any,
    group_sizes: Any,
    *,
    active_groups: Any = None,
    old_logp: Any = None,
    clip_coef: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> LossParts:
    """The listwise MaxEnt loss over a whole batch.

    `policy_logp` [N] holds the policy's sequence log-probs (with grad), flat in
    group order; `weights` [N] the MaxEnt weights (constants); `group_sizes`
    [G] the group lengths; `active_groups` [G] bools (default: non-empty
    groups). With `clip_coef` > 0, `old_logp` [N] (the behaviour policy's
    sequence log-probs) is required and the clipped term is added.
    `epsilon_high` defaults to `epsilon_low`.
    """
    logp = policy_logp.reshape(-1)
    sizes, ids = _group_ids(group_sizes, logp.device)
    groups = sizes.numel()
    if logp.numel() != ids.numel():
        raise ValueError(f"policy_logp has {logp.numel()} entries but group_sizes add up to {ids.numel()}")
    w = _as_tensor(weights, like=logp).reshape(-1)
    if w.numel() != logp.numel():
        raise ValueError(f"weights has {w.numel()} entries, policy_logp {logp.numel()}")
    active = (sizes > 0) if active_groups is None else _as_tensor(active_groups, like=logp, dtype=torch.bool)
    if active.numel() != groups:
        raise ValueError(f"active_groups has {active.numel()} entries for {groups} groups")
    active = active & (sizes > 0)
    count = int(active.sum())
    denominator = max(count, 1)
    gate = active.to(logp.dtype)

    log_p = logp - _group_logsumexp(logp, ids, groups)[ids]
    listwise = (_group_sum(-w * log_p, ids, groups) * gate).sum() / denominator
    clip = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if clip_coef > 0:
        if old_logp is None:
            raise ValueError("clip_coef > 0 needs old_logp (the behaviour policy's sequence log-probs)")
        old = _as_tensor(old_logp, like=logp).reshape(-1)
        high = epsilon_low if epsilon_high is None else epsilon_high
        advantage = w - 1.0 / sizes.clamp(min=1).to(logp.dtype)[ids]
        ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        surrogate = torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - epsilon_low, 1 + high) * advantage)
        clip = (_group_sum(-surrogate, ids, groups) * gate).sum() / denominator
    loss = listwise + clip_coef * clip if clip_coef > 0 else listwise
    return LossParts(loss=loss, listwise=listwise.detach(), clip=clip.detach(), active_groups=count)


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor, *, length_normalize: bool = False) -> torch.Tensor:
    """Per-sequence sums of token log-probs [B, T] over `mask` (1 on completion
    tokens), divided by the token count (at least 1) when `length_normalize`."""
    mask = mask.to(token_logp.dtype)
    total = (token_logp * mask).sum(dim=-1)
    return total / mask.sum(dim=-1).clamp(min=1) if length_normalize else total


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: logits [B, T, V] predicting tokens [B, T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def k3_kl_terms(ref_token_logp: torch.Tensor, policy_token_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum of k3 = exp(d) - d - 1, d = clamp(ref - policy, +-20), over masked
    tokens, and the token count. Add both up over ranks; the KL is sum / count."""
    d = torch.clamp(ref_token_logp.detach() - policy_token_logp.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = torch.exp(d) - d - 1.0
    mask = mask.to(torch.bool)
    return float(k3[mask].double().sum()), int(mask.sum())


def k3_kl(ref_token_logp: torch.Tensor, policy_token_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Token mean of k3 over masked tokens (0 when there are none)."""
    total, count = k3_kl_terms(ref_token_logp, policy_token_logp, mask)
    return total / count if count else 0.0


def controller_request_id(run_id: str, job: str, step: int) -> str:
    """The UpdateController request id of `job`'s optimizer step `step` on
    `run_id`: the same inputs always give the same id, so a retried or resumed
    step replays instead of stepping twice. Ids over 128 characters are hashed."""
    raw = f"{run_id}:{job}:{int(step)}"
    if len(raw) <= MAX_REQUEST_ID_LENGTH:
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:40]
    return f"{job[:60]}:{int(step)}:{digest}"


def controller_reporter_id(job: str) -> str:
    """The UpdateController reporter_id of `job` (docs/integrations.md,
    "Several jobs, one run"): the job name itself, hashed when over 128 characters."""
    if len(job) <= MAX_REQUEST_ID_LENGTH:
        return job
    return f"{job[:60]}:{hashlib.sha256(job.encode()).hexdigest()[:40]}"


def weighted_mean(values: Sequence[float], counts: Sequence[float]) -> float | None:
    """The count-weighted mean of per-rank values (None when no counts)."""
    total = float(sum(counts))
    if total <= 0:
        return None
    return float(sum(v * c for v, c in zip(values, counts)) / total)
