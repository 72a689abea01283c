"""Run configuration, controller state and the controller update (docs/math.md §7).

Scalar arithmetic in plain Python floats: one update touches a handful of
numbers, and float64 Python math is exactly what docs/math.md describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum


class Denominator(str, Enum):
    TAU_PLUS_BETA = "tau_plus_beta"
    TAU = "tau"


class Scaling(str, Enum):
    """What divides the centred utilities: the group's std, the batch's, or nothing."""

    GROUP = "group"
    BATCH = "batch"
    NONE = "none"

    @classmethod
    def of(cls, value: "bool | str | Scaling") -> "Scaling":
        """True is GROUP and False NONE (the boolean `scale_rewards` of old)."""
        if isinstance(value, bool):
            return cls.GROUP if value else cls.NONE
        return cls(value)


class Baseline(str, Enum):
    """What is subtracted from each utility: the group mean, or (RLOO) the
    mean of the other members of the group."""

    GROUP_MEAN = "group_mean"
    LEAVE_ONE_OUT = "leave_one_out"


@dataclass(frozen=True)
class RunConfig:
    """A run's weighting and controller configuration, defaults applied."""

    tau: float = 0.0
    beta: float = 0.0
    denominator: Denominator = Denominator.TAU_PLUS_BETA
    length_normalize_ref: bool = True
    q_temperature: float = 1.0
    q_epsilon: float = 1e-6
    # Scaling of advantages; True/False are taken as GROUP/NONE.
    scale_rewards: Scaling = Scaling.GROUP
    advantage_baseline: Baseline = Baseline.GROUP_MEAN
    train_grpo_objective: bool = False
    target_entropy: float | None = None
    target_entropy_start: float | None = None
    target_entropy_final: float | None = None
    target_entropy_horizon: int = 0
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_rewards", Scaling.of(self.scale_rewards))
        object.__setattr__(self, "advantage_baseline", Baseline(self.advantage_baseline))

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for name in ("denominator", "scale_rewards", "advantage_baseline"):
            out[name] = out[name].value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Also reads configs stored before scaling had three modes (a bool)."""
        data = dict(data)
        data["denominator"] = Denominator(data.get("denominator", Denominator.TAU_PLUS_BETA.value))
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


# The smallest tau whose log is kept; a run created with tau = 0 starts its
# log-tau accumulator here instead of at -inf.
_TAU_LOG_FLOOR = 1e-12
# The largest x for which math.exp(x) is finite.
_LOG_FLOAT_MAX = math.log(1.7976931348623157e308)


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

    @classmethod
    def initial(cls, config: RunConfig, now: float) -> "ControllerState":
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


def _clamp_tau(config: RunConfig, tau: float) -> float:
    tau = max(tau, config.tau_min)
    if config.tau_max > 0:
        tau = min(tau, config.tau_max)
    return tau


def _meta_step(config: RunConfig, state: ControllerState, update: ControllerUpdate, target: float | None) -> dict:
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


def _tau_step(config: RunConfig, state: ControllerState, update: ControllerUpdate, target: float | None) -> dict:
    entropy = update.weight_entropy
    if target is None or entropy is None or update.global_step <= config.tau_warmup_steps:
        return {}
    ema = entropy if state.entropy_ema is None else 0.9 * state.entropy_ema + 0.1 * entropy
    tau_log = state.tau_log + config.tau_lr * update.lr_scale * (target - ema)
    # exp of a log-tau beyond the float range is +inf (math.exp would raise); the clamp then applies.
    tau = math.exp(tau_log) if tau_log <= _LOG_FLOAT_MAX else math.inf
    return {"entropy_ema": ema, "tau_log": tau_log, "tau": _clamp_tau(config, tau)}


def _kl_step(config: RunConfig, state: ControllerState, update: ControllerUpdate) -> dict:
    kl = update.measured_kl
    if kl is None or config.kl_target <= 0 or config.kl_horizon <= 0 or config.kl_step_size <= 0:
        return {}
    error = min(max(kl / config.kl_target - 1.0, -config.kl_step_size), config.kl_step_size)
    return {"beta": max(0.0, state.beta * (1.0 + error / config.kl_horizon))}


def apply_update(config: RunConfig, state: ControllerState, update: ControllerUpdate, now: float) -> ControllerState:
    """Return the state after one accepted update (the version rises by one)."""
    target = config.target_entropy_at(update.global_step)
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
    )


__all__ = ["ControllerState", "ControllerUpdate", "Denominator", "RunConfig", "apply_update"]
