"""Run configuration, controller state and the controller update (docs/math.md §7).

Scalar arithmetic in plain Python floats: one update touches a handful of
numbers, and float64 Python math is exactly what docs/math.md describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum


class WeightDenominator(str, Enum):
    TAU_PLUS_BETA = "tau_plus_beta"
    TAU = "tau"


class AdvantageScaling(str, Enum):
    """What divides the centred utilities: the group's std, the batch's, or nothing."""

    GROUP = "group"
    BATCH = "batch"
    NONE = "none"

    @classmethod
    def of(cls, value: "bool | str | AdvantageScaling") -> "AdvantageScaling":
        """True is GROUP and False NONE (the boolean `scale_rewards` of old)."""
        if isinstance(value, bool):
            return cls.GROUP if value else cls.NONE
        return cls(value)


class AdvantageBaseline(str, Enum):
    """What is subtracted from each utility: the group mean, or (RLOO) the
    mean of the other members of the group."""

    GROUP_MEAN = "group_mean"
    LEAVE_ONE_OUT = "leave_one_out"


class EntropyScope(str, Enum):
    """Which groups' weight entropy drives tau: all non-empty groups, or only
    those whose q is not constant (the ones tau can change)."""

    ALL_GROUPS = "all_groups"
    MIXED_GROUPS = "mixed_groups"


@dataclass(frozen=True)
class WeightingConfig:
    """A run's weighting and controller configuration, defaults applied."""

    tau: float = 0.0
    beta: float = 0.0
    denominator: WeightDenominator = WeightDenominator.TAU_PLUS_BETA
    length_normalize_ref: bool = True
    q_temperature: float = 1.0
    q_epsilon: float = 1e-6
    # Scaling of advantages; True/False are taken as GROUP/NONE.
    scale_rewards: AdvantageScaling = AdvantageScaling.GROUP
    advantage_baseline: AdvantageBaseline = AdvantageBaseline.GROUP_MEAN
    entropy_scope: EntropyScope = EntropyScope.ALL_GROUPS
    train_grpo_objective: bool = False
    target_entropy: float | None = None
    target_entropy_start: float | None = None
    target_entropy_final: float | None = None
    target_entropy_horizon: int = 0
    # Target as a fraction of the batch's maximum possible weight entropy
    # (exclusive with the absolute targets above).
    target_entropy_ratio: float | None = None
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
    # Reporters whose reports of one step are pooled into one controller step
    # (docs/math.md §9); 1 steps on every report.
    reporters_per_step: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_rewards", AdvantageScaling.of(self.scale_rewards))
        object.__setattr__(self, "advantage_baseline", AdvantageBaseline(self.advantage_baseline))
        object.__setattr__(self, "entropy_scope", EntropyScope(self.entropy_scope))

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for name in ("denominator", "scale_rewards", "advantage_baseline", "entropy_scope"):
            out[name] = out[name].value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "WeightingConfig":
        """Also reads configs stored before scaling had three modes (a bool)."""
        data = dict(data)
        data["denominator"] = WeightDenominator(data.get("denominator", WeightDenominator.TAU_PLUS_BETA.value))
        return cls(**data)

    def target_entropy_at(self, step: int) -> float | None:
        """The target weight entropy in force at `step`, or None when unset."""
        start, final = self.target_entropy_start, self.target_entropy_final
        if start is not None and final is not None:
            horizon = self.target_entropy_horizon
            if horizon <= 0:
                return final
            progress = min(max(step, 0) / horizon, 1.0)
            return start + (final - start) * progress
        return self.target_entropy

    def target_at(self, step: int, max_weight_entropy: float | None) -> float | None:
        """The target in force at `step`: target_entropy_ratio times the
        batch's maximum weight entropy (None when that is unknown), else the
        absolute target or schedule."""
        if self.target_entropy_ratio is not None:
            return None if max_weight_entropy is None else self.target_entropy_ratio * max_weight_entropy
        return self.target_entropy_at(step)

    @property
    def adapts_tau(self) -> bool:
        """Whether tau can move at all: the meta controller, or some target."""
        return self.meta_enabled or any(
            value is not None
            for value in (self.target_entropy, self.target_entropy_start, self.target_entropy_ratio)
        )


# The smallest tau whose log is kept; a run created with tau = 0 starts its
# log-tau accumulator here instead of at -inf.
_TAU_LOG_FLOOR = 1e-12
# The largest x for which math.exp(x) is finite.
_LOG_FLOAT_MAX = math.log(1.7976931348623157e308)
# The smallest factor the KL controller multiplies beta by.
_BETA_FACTOR_FLOOR = 1e-6


@dataclass(frozen=True)
class ControllerState:
    """The evolving controller of one run."""

    tau: float
    beta: float
    tau_log: float
    entropy_ema: float | None = None
    global_step: int = 0
    version: int = 0
    active_target_entropy: float | None = None
    update_time: float = 0.0  # seconds since the epoch
    last_weight_entropy: float | None = None
    last_measured_kl: float | None = None
    # The active target is above the last reported maximum weight entropy.
    target_unreachable: bool = False
    # Consecutive applied steps that ended with tau at a bound (see _at_bound).
    tau_bound_steps: int = 0
    last_max_weight_entropy: float | None = None
    # Pooling of reports (docs/math.md §9, engine/pooling.py): the step being
    # collected (0 with no reporters: none), who reported it so far, and per
    # measurement its n-weighted sum and total weight n.
    pending_step: int = 0
    pending_reporters: tuple[str, ...] = ()
    # (measurement name, n-weighted sum, total n) of the pending step's reports;
    # a tuple so that states stay hashable.
    pending_sums: tuple[tuple[str, float, float], ...] = ()

    @classmethod
    def initial(cls, config: WeightingConfig, now: float) -> "ControllerState":
        return cls(
            tau=config.tau,
            beta=config.beta,
            tau_log=math.log(max(config.tau, _TAU_LOG_FLOOR)),
            active_target_entropy=config.target_entropy_at(0),
            update_time=now,
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "ControllerState":
        data = dict(data)
        data["pending_reporters"] = tuple(data.get("pending_reporters", ()))
        data["pending_sums"] = tuple(tuple(entry) for entry in data.get("pending_sums", ()))
        return cls(**data)


@dataclass(frozen=True)
class ControllerUpdate:
    """One measurement sent by a trainer."""

    global_step: int
    weight_entropy: float | None = None
    measured_kl: float | None = None
    tau_grad: float | None = None
    beta_grad: float | None = None
    lr_scale: float = 1.0
    # The batch's maximum possible weight entropy (mean of log K_g).
    max_weight_entropy: float | None = None


def _clamp_tau(config: WeightingConfig, tau: float) -> float:
    tau = max(tau, config.tau_min)
    if config.tau_max > 0:
        tau = min(tau, config.tau_max)
    return tau


def _meta_step(config: WeightingConfig, state: ControllerState, update: ControllerUpdate, target: float | None) -> dict:
    changes: dict = {}
    tau_grad = update.tau_grad
    if tau_grad is None and update.weight_entropy is not None and target is not None:
        tau_grad = update.weight_entropy - target
    if tau_grad is not None:
        tau = _clamp_tau(config, state.tau - update.lr_scale * config.meta_tau_lr * tau_grad)
        changes.update(tau=tau, tau_log=math.log(max(tau, _TAU_LOG_FLOOR)))
    beta_grad = update.beta_grad
    if beta_grad is None and update.measured_kl is not None and config.kl_target > 0:
        beta_grad = update.measured_kl - config.kl_target
    if beta_grad is not None:
        clip = config.meta_beta_grad_clip
        if clip > 0:
            beta_grad = min(max(beta_grad, -clip), clip)
        changes["beta"] = max(0.0, state.beta + update.lr_scale * config.meta_beta_lr * beta_grad)
    return changes


def _tau_step(config: WeightingConfig, state: ControllerState, update: ControllerUpdate, target: float | None) -> dict:
    """The entropy EMA (whenever an entropy is reported after warm-up) and,
    with a target, the log-tau step with anti-windup at the clamp."""
    entropy = update.weight_entropy
    if entropy is None or update.global_step <= config.tau_warmup_steps:
        return {}
    ema = entropy if state.entropy_ema is None else 0.9 * state.entropy_ema + 0.1 * entropy
    if target is None:
        return {"entropy_ema": ema}
    tau_log = state.tau_log + config.tau_lr * update.lr_scale * (target - ema)
    # exp of a log-tau beyond the float range is +inf (math.exp would raise); the clamp then applies.
    raw = math.exp(tau_log) if tau_log <= _LOG_FLOAT_MAX else math.inf
    tau = _clamp_tau(config, raw)
    if tau != raw:
        # Anti-windup: the clamp binds, so log tau restarts at the bound and
        # tau leaves it as soon as the error changes sign. (A binding bound
        # is > 0: tau_min above a positive exp, or a positive tau_max.)
        tau_log = math.log(tau)
    return {"entropy_ema": ema, "tau_log": tau_log, "tau": tau}


def _kl_step(config: WeightingConfig, state: ControllerState, update: ControllerUpdate) -> dict:
    kl = update.measured_kl
    if kl is None or config.kl_target <= 0 or config.kl_horizon <= 0 or config.kl_step_size <= 0:
        return {}
    error = min(max(kl / config.kl_target - 1.0, -config.kl_step_size), config.kl_step_size)
    # The factor is floored above 0, so beta never reaches 0 and can recover.
    return {"beta": state.beta * max(1.0 + error / config.kl_horizon, _BETA_FACTOR_FLOOR)}


def _at_bound(config: WeightingConfig, tau: float) -> bool:
    """Tau at tau_min (> 0) or at tau_max (> 0), on a run that adapts tau."""
    if not config.adapts_tau:
        return False
    return (config.tau_min > 0 and tau <= config.tau_min) or (config.tau_max > 0 and tau >= config.tau_max)


def apply_update(
    config: WeightingConfig, state: ControllerState, update: ControllerUpdate, now: float
) -> ControllerState:
    """Return the state after one accepted update (the version rises by one)."""
    max_entropy = update.max_weight_entropy if update.max_weight_entropy is not None else state.last_max_weight_entropy
    target = config.target_at(update.global_step, max_entropy)
    if config.meta_enabled:
        changes = _meta_step(config, state, update, target)
    else:
        changes = _tau_step(config, state, update, target)
        changes.update(_kl_step(config, replace(state, **changes), update))
    return replace(
        state,
        **changes,
        global_step=update.global_step,
        version=state.version + 1,
        active_target_entropy=target,
        update_time=now,
        last_weight_entropy=update.weight_entropy if update.weight_entropy is not None else state.last_weight_entropy,
        last_measured_kl=update.measured_kl if update.measured_kl is not None else state.last_measured_kl,
        last_max_weight_entropy=max_entropy,
        target_unreachable=target is not None and max_entropy is not None and target > max_entropy,
        tau_bound_steps=state.tau_bound_steps + 1 if _at_bound(config, changes.get("tau", state.tau)) else 0,
    )


__all__ = [
    "AdvantageBaseline",
    "AdvantageScaling",
    "ControllerState",
    "ControllerUpdate",
    "EntropyScope",
    "WeightDenominator",
    "WeightingConfig",
    "apply_update",
]
