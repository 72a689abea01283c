"""Conversions between the client's dataclasses/arrays and protobuf messages."""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

import numpy as np

from maxent_api import pb

from .models import ControllerState, Run, WeightDenominator, WeightingConfig

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


_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
               "WeightDenominator": "TAU_PLUS_BETA or TAU", "None": "null"}


def config_type_error(name: str, value: Any) -> str | None:
    """Why `value` does not fit WeightingConfig field `name` (one line naming
    the field and the expected type), or None when it fits."""
    kinds = [k.strip() for k in str(WeightingConfig.__dataclass_fields__[name].type).split("|")]
    fits = {
        "None": value is None,
        "bool": isinstance(value, (bool, np.bool_)),
        "int": isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)),
        "float": isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)),
        "str": isinstance(value, str),
        "WeightDenominator": isinstance(value, WeightDenominator),
    }
    if any(fits.get(kind, True) for kind in kinds):
        return None
    expected = " or ".join(_TYPE_WORDS.get(kind, kind) for kind in kinds)
    return f"config field {name} must be {expected}, got {value!r}"


def as_config(config: Any) -> WeightingConfig:
    """A create_run `config`: None (the defaults), a WeightingConfig, or a
    dict of WeightingConfig fields (e.g. {"tau": 0.5}); a dict with an
    unknown key is a ValueError naming it, anything else a TypeError."""
    if config is None:
        return WeightingConfig()
    if isinstance(config, WeightingConfig):
        return config
    if isinstance(config, dict):
        known = WeightingConfig.field_names()
        unknown = sorted(set(map(str, config)) - set(known))
        if unknown:
            raise ValueError(f"config has unknown field(s) {', '.join(unknown)}; WeightingConfig fields are "
                             f"{', '.join(known)}")
        values = dict(config)
        if isinstance(values.get("denominator"), str):
            name = values["denominator"].upper()
            if name not in WeightDenominator.__members__:
                raise ValueError(f"config denominator must be one of {', '.join(WeightDenominator.__members__)}, "
                                 f"got {values['denominator']!r}")
            values["denominator"] = WeightDenominator[name]
        for name, value in values.items():
            problem = config_type_error(name, value)
            if problem:
                raise TypeError(problem)
        return WeightingConfig(**values)
    raise TypeError(f"config must be a WeightingConfig (or a dict of its fields), got {type(config).__name__}")


def config_to_proto(config: WeightingConfig) -> pb.WeightingConfig:
    msg = pb.WeightingConfig()
    for name in WeightingConfig.field_names():
        value = getattr(config, name)
        if value is None or name in _ADVANTAGE_OPTIONS:
            continue
        setattr(msg, name, value.value if isinstance(value, WeightDenominator) else value)
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
            values[name] = _opt(msg, name)
        elif name == "denominator":
            values[name] = WeightDenominator(msg.denominator) if msg.denominator else WeightDenominator.TAU_PLUS_BETA
        else:
            values[name] = getattr(msg, name)
    return WeightingConfig(**values)


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _time(stamp: Any) -> dt.datetime:
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


def tensor_to_numpy(value: Any, name: str = "the input") -> np.ndarray:
    """A torch tensor as a numpy array on the CPU: bfloat16 and float16 are
    widened exactly to float64; a meta-device tensor (no data) and dtypes
    numpy cannot hold are refused by name."""
    import torch

    tensor = value.detach()
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device; move it to the CPU (a meta tensor has no data to send)")
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.to(torch.float64)
    try:
        return tensor.cpu().numpy()
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"{name} has torch dtype {tensor.dtype}, which is not supported; convert it with "
                         f".to(torch.float64) (or torch.int64 for counts) ({error})") from None


def nested_sizes(values: Any) -> list[int] | None:
    """Group sizes when `values` is nested per group (a list of sequences or a
    2-D array/tensor), else None."""
    if _is_tensor(values) or isinstance(values, np.ndarray):  # the shape alone, no copy of the data
        shape = tuple(values.shape)
        return [shape[1]] * shape[0] if len(shape) == 2 else None
    if len(values) and all(_is_group(g) for g in values):
        return [len(g) for g in values]
    return None


def _whole(array: np.ndarray, dtype: Any, name: str) -> np.ndarray:
    """`array` as the integer `dtype`, refusing values with a fractional part
    (or not finite) instead of truncating them."""
    if array.dtype.kind in "fc" or array.dtype == object:
        try:
            numbers = array.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must hold integers, got {array.reshape(-1)[:5].tolist()!r}") from None
        bad = np.flatnonzero(~np.isfinite(numbers) | (numbers != np.round(numbers)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name} must hold whole numbers; {name}[{i}] is {numbers[i].item()!r} "
                             "(round it, or pass integers)")
        return numbers.astype(dtype)
    return array.astype(dtype, copy=False)


def flat(values: Any, dtype: Any, name: str = "the input") -> np.ndarray:
    """One flat array from a list, nested lists, numpy array or torch tensor.
    For an integer `dtype` a value with a fractional part is refused (a
    ValueError naming `name`), never truncated."""
    if _is_tensor(values):
        values = tensor_to_numpy(values, name)
    integer = np.dtype(dtype).kind in "iu"
    if isinstance(values, np.ndarray):
        if integer:
            return _whole(values, dtype, name).reshape(-1)
        return values.astype(dtype, copy=False).reshape(-1)
    values = list(values)
    if values and all(_is_group(g) for g in values):
        return np.concatenate([flat(g, dtype, name) for g in values])
    if integer:
        return _whole(np.asarray(values), dtype, name).reshape(-1)
    return np.asarray(values, dtype=dtype)


def strings(values: Any) -> list[str]:
    return [str(x) for x in flat(values, object).tolist()]
