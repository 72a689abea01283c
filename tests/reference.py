"""A plain, slow, obviously-correct oracle for docs/math.md §2-§7.

Written from the text of docs/math.md alone: pure Python floats and the ``math`` module,
one group at a time with ordinary loops. Nothing here imports the service.

Conventions spelled out here (each is listed in the test report):

* An empty group contributes nothing: no advantages, no q, no weights; its
  semantic entropy is 0 and its SEED scale is 1; its weight entropy is left
  out of the mean/min/max (all three are 0 when no group is non-empty).
* A completion excluded by the ``valid`` mask gets advantage 0 and q 0 and is
  left out of its group's mean, std and softmax and of the batch moments; the
  K_g in q's ε·K_g is the number of valid members.
* SEED-GRPO: with G ≤ 1 (log G = 0) α_eff is α itself.
* Meta controller: the analytic β gradient needs a KL target (kl_target > 0),
  just as the analytic τ gradient needs an entropy target.
* Initial log τ = log τ; a run started at τ ≤ 0 starts from log(1e-12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

ADV_EPS = 1e-4
Q_TEMPERATURE_FLOOR = 1e-8
LOG_FLOOR = 1e-12
DENOMINATOR_FLOOR = 1e-8


# --------------------------------------------------------------------------
# small helpers


def split_groups(group_sizes: Sequence[int], flat: Sequence) -> list[list]:
    """Cut a flat per-completion list into groups."""
    out, start = [], 0
    for k in group_sizes:
        out.append(list(flat[start : start + k]))
        start += k
    assert start == len(flat), "group sizes do not add up to the batch"
    return out


def logsumexp(values: Sequence[float]) -> float:
    values = list(values)
    if not values:
        return -math.inf
    peak = max(values)
    if peak == -math.inf:
        return -math.inf
    return peak + math.log(math.fsum(math.exp(v - peak) for v in values))


def softmax(values: Sequence[float]) -> list[float]:
    values = list(values)
    if not values:
        return []
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    total = math.fsum(exps)
    return [e / total for e in exps]


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


# --------------------------------------------------------------------------
# §1 utilities


def combine_rewards(terms: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    """u_i = Σ_r w_r · r(i), NaN terms skipped. ``terms`` is [R][N]."""
    if not terms:
        return []
    n = len(terms[0])
    out = []
    for i in range(n):
        total = 0.0
        for r, w in zip(terms, weights):
            value = w * r[i]
            if not math.isnan(value):
                total += value
        out.append(total)
    return out


def zero_truncated(
    utilities: Sequence[float],
    truncated: Optional[Sequence[bool]],
    token_counts: Optional[Sequence[int]],
    max_completion_len: Optional[int],
) -> list[float]:
    """u_i = 0 for completions that hit the length limit."""
    out = []
    for i, u in enumerate(utilities):
        hit = bool(truncated[i]) if truncated is not None else False
        if max_completion_len is not None and token_counts is not None and token_counts[i] >= max_completion_len:
            hit = True
        out.append(0.0 if hit else float(u))
    return out


# --------------------------------------------------------------------------
# §2 reward moments


def reward_moments(utilities: Sequence[float]) -> tuple[float, float]:
    """Batch mean and population std (divide by N); (0, 0) for no values."""
    values = list(utilities)
    if not values:
        return 0.0, 0.0
    m = mean(values)
    var = math.fsum((u - m) ** 2 for u in values) / len(values)
    return m, math.sqrt(var)


# --------------------------------------------------------------------------
# §3 group advantages


def bessel_std(values: Sequence[float]) -> float:
    """Sample standard deviation (divide by n - 1); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def group_advantages(
    utilities: Sequence[float], scale_rewards: bool | str = True, *, baseline: str = "group_mean",
    batch_std: float | None = None,
) -> list[float]:
    """One group: A_i = u_i - b_i, divided by (std + 1e-4) when scaling.

    b_i: the group mean, or with baseline "leave_one_out" the plain mean of
    the other members (0 advantage for a group of one). std: the group's
    Bessel std ("group", or True), `batch_std` ("batch"), none ("none", False).
    """
    k = len(utilities)
    if k == 0:
        return []
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if baseline == "leave_one_out":
        total = math.fsum(utilities)
        centred = [u - (total - u) / (k - 1) if k > 1 else 0.0 for u in utilities]
    else:
        m = mean(utilities)
        centred = [u - m for u in utilities]
    if mode == "none":
        return centred
    std = bessel_std(utilities) if mode == "group" else batch_std
    return [c / (std + ADV_EPS) for c in centred]


def zero_variance(utilities: Sequence[float]) -> bool:
    """A group with fewer than two utilities, or all within 1e-8 of each other."""
    return len(utilities) < 2 or max(utilities) - min(utilities) <= 1e-8


# --------------------------------------------------------------------------
# §4 listwise q


def listwise_q(utilities: Sequence[float], temperature: float = 1.0, epsilon: float = 1e-6) -> list[float]:
    """One group: q = renormalised softmax(u/T)·(1 − εK) + ε."""
    k = len(utilities)
    if k == 0:
        return []
    t = max(temperature, Q_TEMPERATURE_FLOOR)
    p = softmax([u / t for u in utilities])
    raw = [pi * (1.0 - epsilon * k) + epsilon for pi in p]
    total = math.fsum(raw)
    return [r / total for r in raw]


# --------------------------------------------------------------------------
# §5 SEED-GRPO


_ANSWER_TERMINATORS = ",;.!?"


def _box_candidates(text: str) -> list:
    """Every \\boxed / \\fbox candidate, in text order (None where a brace never closes)."""
    positions = []
    for command in ("\\boxed", "\\fbox"):
        pos = text.find(command)
        while pos != -1:
            positions.append(pos + len(command))
            pos = text.find(command, pos + 1)
    candidates = []
    for j in sorted(positions):
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            depth, candidate = 0, None
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        candidate = text[j + 1 : k].strip()
                        break
            candidates.append(candidate)
        else:
            k = j
            while k < len(text) and not text[k].isspace() and text[k] not in _ANSWER_TERMINATORS:
                k += 1
            candidates.append(text[j:k].strip())
    return candidates


def _tag_at(text: str, i: int, tag: str) -> bool:
    window = text[i : i + len(tag)]
    return len(window) == len(tag) and all(c.casefold() == t for c, t in zip(window, tag))


def _first_answer_tag(text: str) -> Optional[str]:
    """Content of the first <answer>...</answer> (any case), stripped; blank is None."""
    for i in range(len(text)):
        if _tag_at(text, i, "<answer>"):
            for k in range(i + len("<answer>"), len(text)):
                if _tag_at(text, k, "</answer>"):
                    content = text[i + len("<answer>") : k].strip()
                    return content if content else None
            return None
    return None


def final_answer(text: str) -> Optional[str]:
    """Last non-empty box candidate, else the first <answer> content, else None."""
    found = [c for c in _box_candidates(text) if c]
    return found[-1] if found else _first_answer_tag(text)


def semantic_entropy(
    answers: Sequence[Optional[str]],
    gen_logp_sum: Sequence[float],
    token_counts: Optional[Sequence[int]] = None,
    length_normalize_logprobs: bool = True,
) -> float:
    """One group: H = −Σ_c P_c log P_c over answer clusters."""
    k = len(answers)
    if k == 0:
        return 0.0
    loglik = []
    for i in range(k):
        value = float(gen_logp_sum[i])
        if length_normalize_logprobs:
            value = value / max(int(token_counts[i]), 1)
        loglik.append(value)
    clusters: dict = {}
    for i, answer in enumerate(answers):
        key = ("answer", answer) if answer is not None else ("alone", i)
        clusters.setdefault(key, []).append(loglik[i])
    total = logsumexp(loglik)
    entropy = 0.0
    for members in clusters.values():
        log_p = logsumexp(members) - total
        entropy -= math.exp(log_p) * log_p
    return entropy


def seed_alpha_eff(
    group_sizes: Sequence[int],
    alpha: float = 0.0417,
    normalize_by_max_entropy: bool = True,
    num_generations: Optional[int] = None,
) -> float:
    if not normalize_by_max_entropy:
        return alpha
    g = num_generations if num_generations is not None else max(group_sizes, default=0)
    return alpha / math.log(g) if g > 1 else alpha


def seed_scales(
    group_sizes: Sequence[int],
    answers: Sequence[Optional[str]],
    gen_logp_sum: Sequence[float],
    token_counts: Optional[Sequence[int]] = None,
    *,
    alpha: float = 0.0417,
    normalize_by_max_entropy: bool = True,
    length_normalize_logprobs: bool = True,
    num_generations: Optional[int] = None,
) -> tuple[list[float], list[float]]:
    """Per group: semantic entropy H_g and scale 1 / (1 + α_eff H_g)."""
    a = seed_alpha_eff(group_sizes, alpha, normalize_by_max_entropy, num_generations)
    ans = split_groups(group_sizes, answers)
    lps = split_groups(group_sizes, gen_logp_sum)
    cnts = split_groups(group_sizes, token_counts) if token_counts is not None else [None] * len(group_sizes)
    entropies, scales = [], []
    for g in range(len(group_sizes)):
        h = semantic_entropy(ans[g], lps[g], cnts[g], length_normalize_logprobs)
        entropies.append(h)
        scales.append(1.0 / (1.0 + a * h))
    return entropies, scales


# --------------------------------------------------------------------------
# §1-§5 put together for a whole batch


@dataclass
class RewardResult:
    total_utils: list[float]
    advantages: list[float]
    q_values: list[float]
    reward_mean: float
    reward_std: float
    seed_semantic_entropies: Optional[list[float]] = None
    seed_advantage_scales: Optional[list[float]] = None
    zero_variance_groups: Optional[list[bool]] = None


def reward_statistics(
    group_sizes: Sequence[int],
    utilities: Sequence[float],
    *,
    valid: Optional[Sequence[bool]] = None,
    token_counts: Optional[Sequence[int]] = None,
    truncated: Optional[Sequence[bool]] = None,
    zero_truncated_completion_rewards: bool = False,
    max_completion_len: Optional[int] = None,
    scale_rewards: bool | str = True,
    baseline: str = "group_mean",
    q_temperature: float = 1.0,
    q_epsilon: float = 1e-6,
    seed: Optional[dict] = None,
    gen_logp_sum: Optional[Sequence[float]] = None,
    answers: Optional[Sequence[Optional[str]]] = None,
) -> RewardResult:
    n = len(utilities)
    u = [float(x) for x in utilities]
    if zero_truncated_completion_rewards:
        u = zero_truncated(u, truncated, token_counts, max_completion_len)
    keep = [True] * n if valid is None else [bool(v) for v in valid]
    m, s = reward_moments([u[i] for i in range(n) if keep[i]])
    everyone = bessel_std([u[i] for i in range(n) if keep[i]])
    advantages = [0.0] * n
    q = [0.0] * n
    flat_groups = []
    start = 0
    for k in group_sizes:
        members = [i for i in range(start, start + k) if keep[i]]
        group_u = [u[i] for i in members]
        flat_groups.append(zero_variance(group_u))
        for i, a in zip(members, group_advantages(group_u, scale_rewards, baseline=baseline, batch_std=everyone)):
            advantages[i] = a
        for i, qi in zip(members, listwise_q(group_u, q_temperature, q_epsilon)):
            q[i] = qi
        start += k
    entropies = scales = None
    if seed is not None:
        entropies, scales = seed_scales(group_sizes, answers, gen_logp_sum, token_counts, **seed)
        start = 0
        for g, k in enumerate(group_sizes):
            for i in range(start, start + k):
                advantages[i] *= scales[g]
            start += k
    return RewardResult(u, advantages, q, m, s, entropies, scales, flat_groups)


# --------------------------------------------------------------------------
# §6 MaxEnt weights


def maxent_weights(
    q: Sequence[float],
    ref_logp_sum: Sequence[float],
    ref_token_counts: Optional[Sequence[int]],
    *,
    tau: float,
    beta: float,
    denominator: str = "tau_plus_beta",
    include_reference_term: bool = True,
    normalize_by_tokens: bool = False,
    length_normalize_ref: bool = True,
) -> list[float]:
    """One group: w = softmax((log max(q, 1e-12) + β ℓ_ref) / D)."""
    k = len(q)
    if k == 0:
        return []
    counts = [1] * k if ref_token_counts is None else [int(c) for c in ref_token_counts]
    d = tau + beta if denominator == "tau_plus_beta" else tau
    d = max(d, DENOMINATOR_FLOOR)
    z = []
    for i in range(k):
        numerator = math.log(max(q[i], LOG_FLOOR))
        if include_reference_term:
            ref = ref_logp_sum[i] / max(counts[i], 1) if length_normalize_ref else ref_logp_sum[i]
            numerator = numerator + beta * ref
        z.append(numerator / d)
    w = softmax(z)
    if normalize_by_tokens:
        w = [wi * max(counts[i], 1) for i, wi in enumerate(w)]
        total = math.fsum(w)
        w = [wi / total for wi in w]
    return w


def weight_entropy(w: Sequence[float]) -> float:
    return -math.fsum(wi * math.log(max(wi, LOG_FLOOR)) for wi in w)


@dataclass
class WeightResult:
    weights: list[float]
    group_entropies: list[float]
    weight_entropy: float
    weight_entropy_min: float
    weight_entropy_max: float
    advantage_entropy: list[float]


def weight_stats(
    group_sizes: Sequence[int],
    q_values: Sequence[float],
    ref_logp_sum: Sequence[float],
    ref_token_counts: Optional[Sequence[int]],
    *,
    tau: float,
    beta: float,
    denominator: str = "tau_plus_beta",
    include_reference_term: bool = True,
    normalize_by_tokens: bool = False,
    length_normalize_ref: bool = True,
    train_grpo_objective: bool = False,
    advantages: Optional[Sequence[float]] = None,
) -> WeightResult:
    n = sum(group_sizes)
    if train_grpo_objective:
        return WeightResult(
            [float(a) for a in advantages], [0.0] * len(group_sizes), 0.0, 0.0, 0.0, [0.0] * n
        )
    qs = split_groups(group_sizes, q_values)
    refs = split_groups(group_sizes, ref_logp_sum)
    counts = split_groups(group_sizes, ref_token_counts) if ref_token_counts is not None else [None] * len(group_sizes)
    weights, entropies, present, adv_entropy = [], [], [], []
    for g, k in enumerate(group_sizes):
        w = maxent_weights(
            qs[g],
            refs[g],
            counts[g],
            tau=tau,
            beta=beta,
            denominator=denominator,
            include_reference_term=include_reference_term,
            normalize_by_tokens=normalize_by_tokens,
            length_normalize_ref=length_normalize_ref,
        )
        weights.extend(w)
        h = weight_entropy(w) if k else 0.0
        entropies.append(h)
        if k:
            present.append(h)
        adv_entropy.extend(wi - 1.0 / k for wi in w)
    if present:
        return WeightResult(weights, entropies, mean(present), min(present), max(present), adv_entropy)
    return WeightResult(weights, entropies, 0.0, 0.0, 0.0, adv_entropy)


# --------------------------------------------------------------------------
# §6 the program the closed form maximises (for property tests)


def maxent_objective(w: Sequence[float], q: Sequence[float], ref_log: Sequence[float], tau: float, beta: float) -> float:
    """E_w[log q] + τ·H(w) − β·KL(w ‖ π_ref), π_ref = softmax(ref_log); 0·log 0 = 0."""
    log_ref = [r - logsumexp(ref_log) for r in ref_log]
    value = 0.0
    for wi, qi, lr in zip(w, q, log_ref):
        if wi <= 0.0:
            continue
        value += wi * math.log(qi) - tau * wi * math.log(wi) - beta * wi * (math.log(wi) - lr)
    return value


# --------------------------------------------------------------------------
# §7 controller


@dataclass(frozen=True)
class ControllerConfig:
    tau: float = 0.0
    beta: float = 0.0
    target_entropy: Optional[float] = None
    target_entropy_start: Optional[float] = None
    target_entropy_final: Optional[float] = None
    target_entropy_horizon: int = 0
    target_entropy_ratio: Optional[float] = None
    tau_lr: float = 0.0
    tau_min: float = 0.0
    tau_max: float = 0.0
    tau_warmup_steps: int = 0
    kl_target: float = 0.0
    kl_horizon: int = 0
    kl_step_size: float = 0.0
    meta_enabled: bool = False
    meta_tau_lr: float = 0.0
    meta_beta_lr: float = 0.0
    meta_beta_grad_clip: float = 0.0


@dataclass(frozen=True)
class ControllerState:
    tau: float
    beta: float
    log_tau: float
    ema: Optional[float] = None
    step: int = 0
    version: int = 0
    last_max_entropy: Optional[float] = None
    unreachable: bool = False
    bound_steps: int = 0


def initial_state(config: ControllerConfig) -> ControllerState:
    log_tau = math.log(config.tau) if config.tau > 0 else math.log(1e-12)
    return ControllerState(tau=config.tau, beta=config.beta, log_tau=log_tau)


def target_entropy_at(config: ControllerConfig, step: int) -> Optional[float]:
    start, final = config.target_entropy_start, config.target_entropy_final
    if start is not None and final is not None:
        horizon = config.target_entropy_horizon
        if horizon <= 0:
            return final
        if step >= horizon:
            return final
        if step <= 0:
            return start
        return start + (final - start) * (step / horizon)
    return config.target_entropy


def clamp_tau(config: ControllerConfig, tau: float) -> float:
    if tau < config.tau_min:
        tau = config.tau_min
    if config.tau_max > 0 and tau > config.tau_max:
        tau = config.tau_max
    return tau


def controller_update(
    config: ControllerConfig,
    state: ControllerState,
    step: int,
    entropy: Optional[float] = None,
    kl: Optional[float] = None,
    tau_grad: Optional[float] = None,
    beta_grad: Optional[float] = None,
    lr_scale: float = 1.0,
    max_entropy: Optional[float] = None,
) -> ControllerState:
    """One accepted update, in the order of docs/math.md §7."""
    tau, beta, log_tau, ema = state.tau, state.beta, state.log_tau, state.ema
    if max_entropy is None:
        max_entropy = state.last_max_entropy
    if config.target_entropy_ratio is not None:
        target = None if max_entropy is None else config.target_entropy_ratio * max_entropy
    else:
        target = target_entropy_at(config, step)

    if config.meta_enabled:
        g_tau = tau_grad
        if g_tau is None and entropy is not None and target is not None:
            g_tau = entropy - target
        if g_tau is not None:
            tau = clamp_tau(config, tau - lr_scale * config.meta_tau_lr * g_tau)
            log_tau = math.log(tau) if tau > 0 else math.log(1e-12)
        g_beta = beta_grad
        if g_beta is None and kl is not None and config.kl_target > 0:
            g_beta = kl - config.kl_target
        if g_beta is not None:
            clip = config.meta_beta_grad_clip
            if clip > 0:
                if g_beta > clip:
                    g_beta = clip
                elif g_beta < -clip:
                    g_beta = -clip
            beta = max(0.0, beta + lr_scale * config.meta_beta_lr * g_beta)
    else:
        # the EMA follows every entropy after warm-up; τ moves only with a target
        if entropy is not None and step > config.tau_warmup_steps:
            ema = entropy if ema is None else 0.9 * ema + 0.1 * entropy
            if target is not None:
                log_tau = log_tau + config.tau_lr * lr_scale * (target - ema)
                try:
                    raw = math.exp(log_tau)
                except OverflowError:  # τ beyond float range: +inf before the clamp
                    raw = math.inf
                tau = clamp_tau(config, raw)
                if tau != raw:  # anti-windup: log τ restarts at the bound
                    log_tau = math.log(tau) if tau > 0 else math.log(1e-12)
        # KL controller: the factor never drops below 1e-6
        if kl is not None and config.kl_target > 0 and config.kl_horizon > 0 and config.kl_step_size > 0:
            e = kl / config.kl_target - 1.0
            e = min(max(e, -config.kl_step_size), config.kl_step_size)
            factor = 1.0 + e / config.kl_horizon
            if factor < 1e-6:
                factor = 1e-6
            beta = beta * factor

    has_target = config.meta_enabled or config.target_entropy is not None \
        or config.target_entropy_start is not None or config.target_entropy_ratio is not None
    pinned = has_target and ((config.tau_min > 0 and tau <= config.tau_min)
                             or (config.tau_max > 0 and tau >= config.tau_max))
    return ControllerState(
        tau=tau, beta=beta, log_tau=log_tau, ema=ema, step=step, version=state.version + 1,
        last_max_entropy=max_entropy,
        unreachable=target is not None and max_entropy is not None and target > max_entropy,
        bound_steps=state.bound_steps + 1 if pinned else 0,
    )
