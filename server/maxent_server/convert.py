"""Conversions between protobuf messages and engine/store values."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from maxent_api import pb
from maxent_api.wire import array

from .domain import (
    AdvantageBaseline,
    AdvantageScaling,
    ControllerState,
    EntropyScope,
    WeightDenominator,
    WeightingConfig,
)
from .store import RunRecord

_DENOMINATORS = {
    pb.WEIGHT_DENOMINATOR_UNSPECIFIED: WeightDenominator.TAU_PLUS_BETA,
    pb.WEIGHT_DENOMINATOR_TAU_PLUS_BETA: WeightDenominator.TAU_PLUS_BETA,
    pb.WEIGHT_DENOMINATOR_TAU: WeightDenominator.TAU,
}
_DENOMINATOR_ENUMS = {
    WeightDenominator.TAU_PLUS_BETA: pb.WEIGHT_DENOMINATOR_TAU_PLUS_BETA,
    WeightDenominator.TAU: pb.WEIGHT_DENOMINATOR_TAU,
}


SCALINGS = {
    pb.ADVANTAGE_SCALING_GROUP: AdvantageScaling.GROUP,
    pb.ADVANTAGE_SCALING_BATCH: AdvantageScaling.BATCH,
    pb.ADVANTAGE_SCALING_NONE: AdvantageScaling.NONE,
}
_SCALING_ENUMS = {mode: value for value, mode in SCALINGS.items()}
BASELINES = {
    pb.ADVANTAGE_BASELINE_GROUP_MEAN: AdvantageBaseline.GROUP_MEAN,
    pb.ADVANTAGE_BASELINE_LEAVE_ONE_OUT: AdvantageBaseline.LEAVE_ONE_OUT,
}
_BASELINE_ENUMS = {mode: value for value, mode in BASELINES.items()}


ENTROPY_SCOPES = {
    pb.ENTROPY_SCOPE_UNSPECIFIED: EntropyScope.ALL_GROUPS,
    pb.ENTROPY_SCOPE_ALL_GROUPS: EntropyScope.ALL_GROUPS,
    pb.ENTROPY_SCOPE_MIXED_GROUPS: EntropyScope.MIXED_GROUPS,
}
_ENTROPY_SCOPE_ENUMS = {EntropyScope.ALL_GROUPS: pb.ENTROPY_SCOPE_ALL_GROUPS,
                        EntropyScope.MIXED_GROUPS: pb.ENTROPY_SCOPE_MIXED_GROUPS}


def known_denominator(value: int) -> bool:
    return value in _DENOMINATORS


def scaling_of(message, default: AdvantageScaling) -> AdvantageScaling:
    """The scaling a message asks for: its `advantage_scaling` enum, else its
    boolean `scale_rewards`, else `default`. Validated beforehand."""
    if message.advantage_scaling != pb.ADVANTAGE_SCALING_UNSPECIFIED:
        return SCALINGS[message.advantage_scaling]
    if message.HasField("scale_rewards"):
        return AdvantageScaling.of(message.scale_rewards)
    return default


def baseline_of(message, default: AdvantageBaseline) -> AdvantageBaseline:
    if message.advantage_baseline != pb.ADVANTAGE_BASELINE_UNSPECIFIED:
        return BASELINES[message.advantage_baseline]
    return default


def _opt(message, name: str, default=None):
    return getattr(message, name) if message.HasField(name) else default


def config_from_proto(msg: pb.WeightingConfig) -> WeightingConfig:
    """A WeightingConfig with the documented defaults for unset optional fields."""
    return WeightingConfig(
        tau=msg.tau,
        beta=msg.beta,
        denominator=_DENOMINATORS[msg.denominator],
        length_normalize_ref=_opt(msg, "length_normalize_ref", True),
        q_temperature=_opt(msg, "q_temperature", 1.0),
        q_epsilon=_opt(msg, "q_epsilon", 1e-6),
        scale_rewards=scaling_of(msg, AdvantageScaling.GROUP),
        advantage_baseline=baseline_of(msg, AdvantageBaseline.GROUP_MEAN),
        entropy_scope=ENTROPY_SCOPES[msg.entropy_scope],
        train_grpo_objective=msg.train_grpo_objective,
        target_entropy=_opt(msg, "target_entropy"),
        target_entropy_start=_opt(msg, "target_entropy_start"),
        target_entropy_final=_opt(msg, "target_entropy_final"),
        target_entropy_horizon=msg.target_entropy_horizon,
        target_entropy_ratio=_opt(msg, "target_entropy_ratio"),
        tau_lr=msg.tau_lr,
        tau_min=msg.tau_min,
        tau_max=msg.tau_max,
        tau_warmup_steps=msg.tau_warmup_steps,
        kl_target=msg.kl_target,
        kl_horizon=msg.kl_horizon,
        kl_step_size=msg.kl_step_size,
        meta_enabled=msg.meta_enabled,
        meta_tau_lr=msg.meta_tau_lr,
        meta_beta_lr=msg.meta_beta_lr,
        meta_beta_grad_clip=msg.meta_beta_grad_clip,
        reporters_per_step=max(msg.reporters_per_step, 1),
    )


def config_to_proto(config: WeightingConfig) -> pb.WeightingConfig:
    """The config with every default written out explicitly."""
    fields = config.to_dict()
    fields["denominator"] = _DENOMINATOR_ENUMS[config.denominator]
    fields["scale_rewards"] = config.scale_rewards is not AdvantageScaling.NONE
    fields["advantage_scaling"] = _SCALING_ENUMS[config.scale_rewards]
    fields["advantage_baseline"] = _BASELINE_ENUMS[config.advantage_baseline]
    fields["entropy_scope"] = _ENTROPY_SCOPE_ENUMS[config.entropy_scope]
    return pb.WeightingConfig(**{k: v for k, v in fields.items() if v is not None})


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(round(seconds * 1e9)))
    return stamp


def state_to_proto(run_id: str, state: ControllerState) -> pb.ControllerState:
    msg = pb.ControllerState(
        run_id=run_id,
        tau=state.tau,
        beta=state.beta,
        tau_log=state.tau_log,
        global_step=state.global_step,
        version=state.version,
        update_time=timestamp(state.update_time),
        target_unreachable=state.target_unreachable,
        tau_bound_steps=state.tau_bound_steps,
        pending_step=state.pending_step if state.pending_reporters else 0,
        pending_reporters=list(state.pending_reporters),
    )
    for name in _OPTIONAL_STATE:
        value = getattr(state, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


_OptionalStateField = Literal[
    "entropy_ema", "active_target_entropy", "last_weight_entropy", "last_measured_kl", "last_max_weight_entropy"
]
_OPTIONAL_STATE: tuple[_OptionalStateField, ...] = get_args(_OptionalStateField)


def state_from_proto(msg: pb.ControllerState, now: float) -> ControllerState:
    """An imported state (CreateRunRequest.initial_state), validated
    beforehand: every controller field as sent; its run_id and update_time
    are ignored (the state is stamped `now`), and no step is pending."""
    return ControllerState(
        tau=msg.tau,
        beta=msg.beta,
        tau_log=msg.tau_log,
        global_step=msg.global_step,
        version=msg.version,
        update_time=now,
        target_unreachable=msg.target_unreachable,
        tau_bound_steps=msg.tau_bound_steps,
        **{name: getattr(msg, name) for name in _OPTIONAL_STATE if msg.HasField(name)},
    )


def run_to_proto(record: RunRecord) -> pb.Run:
    return pb.Run(
        run_id=record.run_id,
        config=config_to_proto(record.config),
        state=state_to_proto(record.run_id, record.state),
        create_time=timestamp(record.create_time),
    )


def floats(field) -> np.ndarray:
    """A repeated double field as a float64 array."""
    return array(field, np.float64)


def ints(field) -> np.ndarray:
    """A repeated int64 field as an int64 array."""
    return array(field, np.int64)


def bools(field) -> np.ndarray:
    """A repeated bool field as a bool array."""
    return array(field, np.bool_)
