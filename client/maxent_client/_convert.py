"""Conversions between the client's dataclasses/arrays and protobuf messages."""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

import numpy as np

from ._generated.maxent.v1 import maxent_pb2 as pb
from .models import ControllerState, Denominator, Run, WeightingConfig

_OPTIONAL_CONFIG = {"length_normalize_ref", "q_temperature", "q_epsilon", "target_entropy",
                    "target_entropy_start", "target_entropy_final", "target_entropy_ratio"}
_ADVANTAGE_OPTIONS = {"scale_rewards", "advantage_baseline", "entropy_scope"}
ENTROPY_SCOPES = {"all_groups": pb.ENTROPY_SCOPE_ALL_GROUPS, "mixed_groups": pb.ENTROPY_SCOPE_MIXED_GROUPS}
SCALINGS = {"group": pb.ADVANTAGE_SCALING_GROUP, "batch": pb.ADVANTAGE_SCALING_BATCH, "none": pb.ADVANTAGE_SCALING_NONE}
BASELINES = {"group_mean": pb.ADVANTAGE_BASELINE_GROUP_MEAN, "leave_one_out": pb.ADVANTAGE_BASELINE_LEAVE_ONE_OUT,
             "rloo": pb.ADVANTAGE_BASELINE_LEAVE_ONE_OUT}


def set_advantage_options(msg: Any, scale_rewards: bool | str | None, advantage_baseline: str | None) -> None:
    """Write `scale_rewards` (a bool, or TRL's "group" | "batch" | "none") and
    `advantage_baseline` ("group_mean" | "leave_one_out") into a message."""
    if isinstance(scale_rewards, (bool, np.bool_)):
        msg.scale_rewards = bool(scale_rewards)
    elif scale_rewards is not None:
        if scale_rewards not in SCALINGS:
            raise ValueError(f"scale_rewards must be True, False or one of {sorted(SCALINGS)}, got {scale_rewards!r}")
        msg.advantage_scaling = SCALINGS[scale_rewards]
    if advantage_baseline is not None:
        if advantage_baseline not in BASELINES:
            raise ValueError(f"advantage_baseline must be one of {sorted(BASELINES)}, got {advantage_baseline!r}")
        msg.advantage_baseline = BASELINES[advantage_baseline]


def _scale_rewards_from(msg: pb.WeightingConfig) -> bool | str | None:
    if msg.advantage_scaling == pb.ADVANTAGE_SCALING_BATCH:
        return "batch"
    if msg.advantage_scaling != pb.ADVANTAGE_SCALING_UNSPECIFIED:
        return msg.advantage_scaling == pb.ADVANTAGE_SCALING_GROUP
    return msg.scale_rewards if msg.HasField("scale_rewards") else None


def config_to_proto(config: WeightingConfig) -> pb.WeightingConfig:
    msg = pb.WeightingConfig()
    for name in WeightingConfig.field_names():
        value = getattr(config, name)
        if value is None or name in _ADVANTAGE_OPTIONS:
            continue
        setattr(msg, name, value.value if isinstance(value, Denominator) else value)
    set_advantage_options(msg, config.scale_rewards, config.advantage_baseline)
    if config.entropy_scope is not None:
        if config.entropy_scope not in ENTROPY_SCOPES:
            raise ValueError(f"entropy_scope must be one of {sorted(ENTROPY_SCOPES)}, got {config.entropy_scope!r}")
        msg.entropy_scope = ENTROPY_SCOPES[config.entropy_scope]
    return msg


def config_from_proto(msg: pb.WeightingConfig) -> WeightingConfig:
    values: dict[str, Any] = {
        "scale_rewards": _scale_rewards_from(msg),
        "advantage_baseline": {pb.ADVANTAGE_BASELINE_GROUP_MEAN: "group_mean",
                               pb.ADVANTAGE_BASELINE_LEAVE_ONE_OUT: "leave_one_out"}.get(msg.advantage_baseline),
        "entropy_scope": {value: name for name, value in ENTROPY_SCOPES.items()}.get(msg.entropy_scope),
    }
    for name in WeightingConfig.field_names():
        if name in _ADVANTAGE_OPTIONS:
            continue
        if name in _OPTIONAL_CONFIG:
            values[name] = getattr(msg, name) if msg.HasField(name) else None
        elif name == "denominator":
            values[name] = Denominator(msg.denominator) if msg.denominator else Denominator.TAU_PLUS_BETA
        else:
            values[name] = getattr(msg, name)
    return WeightingConfig(**values)


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _time(stamp) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.timezone.utc)


def state_from_proto(msg: pb.ControllerState) -> ControllerState:
    return ControllerState(
        run_id=msg.run_id,
        tau=msg.tau,
        beta=msg.beta,
        tau_log=msg.tau_log,
        entropy_ema=_opt(msg, "entropy_ema"),
        global_step=msg.global_step,
        version=msg.version,
        active_target_entropy=_opt(msg, "active_target_entropy"),
        update_time=_time(msg.update_time),
        last_weight_entropy=_opt(msg, "last_weight_entropy"),
        last_measured_kl=_opt(msg, "last_measured_kl"),
        target_unreachable=msg.target_unreachable,
        tau_bound_steps=msg.tau_bound_steps,
        last_max_weight_entropy=_opt(msg, "last_max_weight_entropy"),
        pending_step=msg.pending_step,
        pending_reporters=tuple(msg.pending_reporters),
    )


_STATE_OPTIONAL = ("entropy_ema", "active_target_entropy", "last_weight_entropy", "last_measured_kl",
                   "last_max_weight_entropy")


def state_to_proto(state: ControllerState) -> pb.ControllerState:
    """A state as CreateRunRequest.initial_state (an import); run_id and
    update_time are left out, the server ignores them."""
    msg = pb.ControllerState(
        tau=state.tau,
        beta=state.beta,
        tau_log=state.tau_log,
        global_step=state.global_step,
        version=state.version,
        target_unreachable=state.target_unreachable,
        tau_bound_steps=state.tau_bound_steps,
    )
    for name in _STATE_OPTIONAL:
        value = getattr(state, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def run_from_proto(msg: pb.Run) -> Run:
    return Run(
        run_id=msg.run_id,
        config=config_from_proto(msg.config),
        state=state_from_proto(msg.state),
        create_time=_time(msg.create_time),
    )


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_group(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) or _is_tensor(value)


def nested_sizes(values: Any) -> list[int] | None:
    """Group sizes when `values` is nested per group (a list of sequences or a
    2-D array/tensor), else None."""
    if _is_tensor(values):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return [values.shape[1]] * values.shape[0] if values.ndim == 2 else None
    if len(values) and all(_is_group(g) for g in values):
        return [len(g) for g in values]
    return None


def flat(values: Any, dtype: Any) -> np.ndarray:
    """One flat array from a list, nested lists, numpy array or torch tensor."""
    if _is_tensor(values):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return values.astype(dtype, copy=False).reshape(-1)
    values = list(values)
    if values and all(_is_group(g) for g in values):
        return np.concatenate([flat(g, dtype) for g in values])
    return np.asarray(values, dtype=dtype)


def strings(values: Any) -> list[str]:
    return [str(x) for x in flat(values, object).tolist()]
