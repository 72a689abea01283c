"""Plain dataclasses for everything the service takes and returns."""

from __future__ import annotations

import datetime as _dt
import enum
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


class WeightDenominator(enum.Enum):
    """Denominator D of the weight softmax (proto WeightDenominator)."""

    TAU_PLUS_BETA = 1  # the exact maximiser (default)
    TAU = 2  # seed-compatible


Denominator = WeightDenominator
"""Former name of WeightDenominator, kept as an alias."""


class RewardFailurePolicy(enum.Enum):
    """What a failed reward evaluation does to its completion (proto RewardFailurePolicy)."""

    EXCLUDE = 1
    ZERO = 2
    ERROR = 3


FailurePolicy = RewardFailurePolicy
"""Former name of RewardFailurePolicy, kept as an alias."""


@dataclass(frozen=True)
class WeightingConfig:
    """A run's configuration. None means the server's documented default."""

    tau: float = 0.0
    beta: float = 0.0
    denominator: WeightDenominator = WeightDenominator.TAU_PLUS_BETA
    length_normalize_ref: bool | None = None
    q_temperature: float | None = None
    q_epsilon: float | None = None
    # True or "group": divide by the group's std; "batch": by the batch's;
    # False or "none": no scaling.
    scale_rewards: bool | str | None = None
    train_grpo_objective: bool = False
    target_entropy: float | None = None
    target_entropy_start: float | None = None
    target_entropy_final: float | None = None
    target_entropy_horizon: int = 0
    # Target as a fraction (0, 1] of the batch's maximum possible weight
    # entropy; exclusive with the absolute targets.
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
    # Reports pooled into one controller step (several jobs, one run); 0 or 1: every report steps.
    reporters_per_step: int = 1
    # "group_mean" (default) or "leave_one_out" (RLOO).
    advantage_baseline: str | None = None
    # Which weight entropy drives tau: "all_groups" (default) or
    # "mixed_groups" (only groups whose q is not constant).
    entropy_scope: str | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class ControllerState:
    """A run's controller after its last accepted update."""

    run_id: str
    tau: float
    beta: float
    tau_log: float
    entropy_ema: float | None
    global_step: int
    version: int
    active_target_entropy: float | None
    update_time: _dt.datetime
    last_weight_entropy: float | None = None
    last_measured_kl: float | None = None
    # The active target is above the last reported maximum weight entropy.
    target_unreachable: bool = False
    # Consecutive applied steps that left tau at tau_min or tau_max.
    tau_bound_steps: int = 0
    last_max_weight_entropy: float | None = None
    # A pooled run's step whose reports are being collected, and who reported it so far.
    pending_step: int = 0
    pending_reporters: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    run_id: str
    config: WeightingConfig
    state: ControllerState
    create_time: _dt.datetime


@dataclass(frozen=True)
class UpdateResult:
    """State after an update; `replayed` when the request_id was applied
    before. `applied` when this call stepped the controller, `stale` when its
    report was for a step already applied (nothing changed), `partial` when
    the step applied had fewer reporters than the run expects."""

    state: ControllerState
    replayed: bool
    request_id: str
    stale: bool = False
    applied: bool = False
    partial: bool = False


@dataclass(frozen=True)
class RewardTerm:
    """A reward function, its weight in the utility sum, and its parameters.
    Parameter values are strings; numbers are sent as str(value) and
    booleans as "true"/"false", any other type is refused (TypeError)."""

    name: str
    weight: float = 1.0
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SeedGrpoOptions:
    """SEED-GRPO semantic-entropy scaling options (None = server default);
    passing them (or True) as `seed_grpo` enables the scaling."""

    alpha: float | None = None
    normalize_by_max_entropy: bool | None = None
    length_normalize_logprobs: bool | None = None
    num_generations: int | None = None


SeedGrpo = SeedGrpoOptions
"""Former name of SeedGrpoOptions, kept as an alias."""


@dataclass(frozen=True)
class RewardValues:
    name: str
    values: np.ndarray
    failed: np.ndarray
    failure_count: int
    timeout_count: int


def _split(array: np.ndarray, group_sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(array, np.cumsum(group_sizes)[:-1]) if len(group_sizes) else []


@dataclass(frozen=True, kw_only=True)
class RewardStatistics:
    """Result of compute_reward_statistics; arrays are flat in group order."""

    group_sizes: np.ndarray
    total_utils: np.ndarray
    advantages: np.ndarray
    q_values: np.ndarray
    reward_mean: float
    reward_std: float
    per_reward: dict[str, RewardValues]
    failed: np.ndarray
    seed_semantic_entropies: np.ndarray
    seed_advantage_scales: np.ndarray
    zero_variance_groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def grouped(self) -> dict[str, list[np.ndarray]]:
        """Per-completion arrays split into one array per group."""
        return {
            name: _split(getattr(self, name), self.group_sizes)
            for name in ("total_utils", "advantages", "q_values")
        }


@dataclass(frozen=True, kw_only=True)
class WeightStats:
    """Result of compute_weight_stats; arrays are flat in group order."""

    group_sizes: np.ndarray
    weights: np.ndarray
    weight_entropy: float
    weight_entropy_min: float
    weight_entropy_max: float
    advantage_entropy: np.ndarray
    group_weight_entropies: np.ndarray
    tau: float
    beta: float
    controller_version: int
    #: mean of log K_g over non-empty groups: the most weight_entropy can be
    max_weight_entropy: float = 0.0
    #: mean weight entropy over groups whose q is not constant (None: no such group)
    mixed_weight_entropy: float | None = None
    mixed_group_count: int = 0
    #: what to send to update_controller as weight_entropy and max_weight_entropy:
    #: the pair the run's entropy_scope selects
    controller_weight_entropy: float | None = None
    controller_max_weight_entropy: float = 0.0

    def grouped(self) -> dict[str, list[np.ndarray]]:
        """Per-completion arrays split into one array per group."""
        return {name: _split(getattr(self, name), self.group_sizes) for name in ("weights", "advantage_entropy")}


@dataclass(frozen=True, kw_only=True)
class StepStatistics(RewardStatistics, WeightStats):
    """Result of compute_step_statistics: a training step's reward statistics
    and the run's weights of their q, in one round trip: the fields of both.
    Arrays are flat in group order; `zero_variance_groups` and
    `group_weight_entropies` have one entry per group."""

    def grouped(self) -> dict[str, list[np.ndarray]]:
        """Per-completion arrays split into one array per group."""
        names = ("total_utils", "advantages", "q_values", "weights", "advantage_entropy")
        return {name: _split(getattr(self, name), self.group_sizes) for name in names}


@dataclass(frozen=True)
class RewardFunction:
    """A reward function the server evaluates. `parameters`: one dict per
    parameter with keys name, description, default and required."""

    name: str
    description: str
    parameters: list[dict[str, Any]]
    source: str


RewardFunctionInfo = RewardFunction
"""Former name of RewardFunction, kept as an alias."""
