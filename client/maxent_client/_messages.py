"""Request builders and response parsers shared by the sync and async clients."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from maxent_api import pb
from maxent_api.wire import array, encode

from . import _convert as cv
from .models import (
    FailurePolicy,
    RewardFunctionInfo,
    RewardStatistics,
    RewardTerm,
    RewardValues,
    SeedGrpo,
    StepStatistics,
    UpdateResult,
    WeightStats,
)


def group_sizes_for(group_sizes: Any, primary: Any, name: str = "the per-completion input") -> np.ndarray:
    """Explicit group sizes, or those of nested per-group inputs. Explicit
    sizes that disagree with the nesting of `primary` (named `name`) are
    refused rather than silently regrouping; a 2-D array with one row or one
    column counts as flat."""
    nested = cv.nested_sizes(primary) if primary is not None else None
    if group_sizes is not None:
        sizes = cv.flat(group_sizes, np.int64, "group_sizes")
        if nested is not None and _is_grouping(primary, nested) and sizes.tolist() != list(nested):
            raise ValueError(f"group_sizes {sizes.tolist()} disagrees with the groups of the nested {name} "
                             f"(lengths {list(nested)}); drop group_sizes, or pass {name} flat")
        return sizes
    if nested is None:
        raise ValueError("group_sizes is required unless the per-completion inputs are nested per group")
    return np.asarray(nested, dtype=np.int64)


def _is_grouping(values: Any, nested: list[int]) -> bool:
    """Whether nested `values` say how they are grouped: a list of
    sequences, or a 2-D array/tensor with more than one row and column."""
    if isinstance(values, np.ndarray) or cv._is_tensor(values):
        return len(nested) > 1 and nested[0] > 1
    # A chat completion is a list of message dicts, not a group.
    return not any(isinstance(item, dict) for group in values for item in group)


def _flat(values: Any, dtype: Any, name: str = "the input") -> np.ndarray | None:
    return None if values is None else cv.flat(values, dtype, name)


def reward_params(term: RewardTerm) -> dict[str, str]:
    """A reward term's parameters as the strings the service takes: numbers
    are written with str(), booleans as "true"/"false"; other types are
    refused with a TypeError naming the parameter."""
    params: dict[str, str] = {}
    for key, value in dict(term.params).items():
        if isinstance(value, (bool, np.bool_)):
            params[str(key)] = "true" if value else "false"
        elif isinstance(value, str):
            params[str(key)] = value
        elif isinstance(value, (int, float, np.integer, np.floating)):
            params[str(key)] = str(value.item() if isinstance(value, np.generic) else value)
        else:
            raise TypeError(f"reward {term.name!r} parameter {key!r} must be a string, number or bool, got "
                            f"{type(value).__name__} {value!r}")
    return params


def set_optional(message: Any, **values: Any) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


def reward_request(
    *,
    utilities: Any = None,
    completions: Any = None,
    answers: Sequence[str] | None = None,
    rewards: Sequence[RewardTerm] = (),
    group_sizes: Any = None,
    token_counts: Any = None,
    truncated: Any = None,
    gen_logp_sum: Any = None,
    run_id: str = "",
    q_temperature: float | None = None,
    q_epsilon: float | None = None,
    scale_rewards: bool | str | None = None,
    advantage_baseline: str | None = None,
    zero_truncated_completion_rewards: bool | None = None,
    max_completion_len: int | None = None,
    seed_grpo: SeedGrpo | bool | None = None,
    on_failure: FailurePolicy | None = None,
    message: Any = None,
    **arrays: Any,
) -> tuple[bytes, np.ndarray]:
    """The serialized request (arrays encoded by numpy) and its group sizes.

    `message` (default a new ComputeRewardStatisticsRequest) is filled in;
    ComputeStepStatisticsRequest has the same reward fields, and `arrays`
    adds its further per-completion arrays."""
    sizes = group_sizes_for(group_sizes, utilities if utilities is not None else completions,
                            "utilities" if utilities is not None else "completions")
    request = pb.ComputeRewardStatisticsRequest() if message is None else message
    request.run_id = run_id
    if completions is not None:
        request.completions.extend(cv.strings(completions))
    if answers is not None:
        request.answers.extend(str(a) for a in answers)
    for term in rewards:
        request.rewards.add(name=term.name, weight=term.weight, params=reward_params(term))
    set_optional(
        request,
        q_temperature=q_temperature,
        q_epsilon=q_epsilon,
        zero_truncated_completion_rewards=zero_truncated_completion_rewards,
        max_completion_len=max_completion_len,
    )
    cv.set_advantage_options(request, scale_rewards, advantage_baseline)
    if seed_grpo:
        options = seed_grpo if isinstance(seed_grpo, SeedGrpo) else SeedGrpo()
        request.seed_grpo.enabled = True
        set_optional(request.seed_grpo, **options.__dict__)
    if on_failure is not None:
        request.on_failure = on_failure.value
    payload = encode(
        request,
        group_sizes=sizes,
        utilities=_flat(utilities, np.float64, "utilities"),
        token_counts=_flat(token_counts, np.int64, "token_counts"),
        truncated=_flat(truncated, np.bool_, "truncated"),
        gen_logp_sum=_flat(gen_logp_sum, np.float64, "gen_logp_sum"),
        **arrays,
    )
    return payload, sizes


def step_request(
    run_id: str,
    *,
    ref_logp_sum: Any = None,
    ref_token_counts: Any = None,
    include_reference_term: bool | None = None,
    normalize_by_tokens: bool = False,
    read_mask: Sequence[str] | None = None,
    **reward_fields: Any,
) -> tuple[bytes, np.ndarray]:
    """A ComputeStepStatistics request: the reward fields (reward_request's
    keywords) plus the reference arrays of the weights."""
    message = pb.ComputeStepStatisticsRequest(normalize_by_tokens=normalize_by_tokens)
    set_optional(message, include_reference_term=include_reference_term)
    if read_mask is not None:
        if isinstance(read_mask, str):
            raise TypeError("read_mask takes a sequence of field names, e.g. ('weights', 'advantages')")
        message.read_mask.SetInParent()
        message.read_mask.paths.extend(read_mask)
    return reward_request(
        run_id=run_id, message=message, ref_logp_sum=_flat(ref_logp_sum, np.float64, "ref_logp_sum"),
        ref_token_counts=_flat(ref_token_counts, np.int64, "ref_token_counts"), **reward_fields,
    )


def step_result(reply: pb.ComputeStepStatisticsResponse, sizes: np.ndarray) -> StepStatistics:
    rewards, weights = reward_result(reply, sizes), weight_result(reply, sizes)
    values = {**weights.__dict__, **rewards.__dict__}
    return StepStatistics(**values)


def reward_result(reply: Any, sizes: np.ndarray) -> RewardStatistics:
    return RewardStatistics(
        group_sizes=sizes,
        total_utils=array(reply.total_utils),
        advantages=array(reply.advantages),
        q_values=array(reply.q_values),
        reward_mean=reply.reward_mean,
        reward_std=reply.reward_std,
        per_reward={
            r.name: RewardValues(r.name, array(r.values), array(r.failed, np.bool_), r.failure_count, r.timeout_count)
            for r in reply.per_reward
        },
        failed=array(reply.failed, np.bool_),
        seed_semantic_entropies=array(reply.seed_semantic_entropies),
        seed_advantage_scales=array(reply.seed_advantage_scales),
        zero_variance_groups=array(reply.zero_variance_groups, np.bool_),
    )


def weight_request(
    run_id: str,
    *,
    q_values: Any = None,
    ref_logp_sum: Any = None,
    ref_token_counts: Any = None,
    group_sizes: Any = None,
    advantages: Any = None,
    include_reference_term: bool | None = None,
    normalize_by_tokens: bool = False,
) -> tuple[bytes, np.ndarray]:
    """The serialized request (arrays encoded by numpy) and its group sizes."""
    sizes = group_sizes_for(group_sizes, q_values if q_values is not None else advantages,
                            "q_values" if q_values is not None else "advantages")
    request = pb.ComputeWeightStatsRequest(run_id=run_id, normalize_by_tokens=normalize_by_tokens)
    set_optional(request, include_reference_term=include_reference_term)
    payload = encode(
        request,
        group_sizes=sizes,
        q_values=_flat(q_values, np.float64, "q_values"),
        ref_logp_sum=_flat(ref_logp_sum, np.float64, "ref_logp_sum"),
        ref_token_counts=_flat(ref_token_counts, np.int64, "ref_token_counts"),
        advantages=_flat(advantages, np.float64, "advantages"),
    )
    return payload, sizes


def weight_result(reply: Any, sizes: np.ndarray) -> WeightStats:
    return WeightStats(
        group_sizes=sizes,
        weights=array(reply.weights),
        weight_entropy=reply.weight_entropy,
        weight_entropy_min=reply.weight_entropy_min,
        weight_entropy_max=reply.weight_entropy_max,
        advantage_entropy=array(reply.advantage_entropy),
        group_weight_entropies=array(reply.group_weight_entropies),
        tau=reply.tau,
        beta=reply.beta,
        controller_version=reply.controller_version,
        max_weight_entropy=reply.max_weight_entropy,
        mixed_weight_entropy=reply.mixed_weight_entropy if reply.HasField("mixed_weight_entropy") else None,
        mixed_group_count=reply.mixed_group_count,
        controller_weight_entropy=(reply.controller_weight_entropy
                                   if reply.HasField("controller_weight_entropy") else None),
        controller_max_weight_entropy=reply.controller_max_weight_entropy,
    )


def update_request(
    run_id: str,
    request_id: str,
    *,
    global_step: int,
    weight_entropy: float | None = None,
    measured_kl: float | None = None,
    tau_grad: float | None = None,
    beta_grad: float | None = None,
    lr_scale: float | None = None,
    expected_version: int | None = None,
    max_weight_entropy: float | None = None,
    reporter_id: str | None = None,
    sample_count: float | None = None,
) -> pb.UpdateControllerRequest:
    request = pb.UpdateControllerRequest(
        run_id=run_id, request_id=request_id, global_step=global_step, reporter_id=reporter_id or ""
    )
    set_optional(
        request,
        weight_entropy=weight_entropy,
        measured_kl=measured_kl,
        tau_grad=tau_grad,
        beta_grad=beta_grad,
        lr_scale=lr_scale,
        expected_version=expected_version,
        max_weight_entropy=max_weight_entropy,
        sample_count=sample_count,
    )
    return request


def update_result(reply: pb.UpdateControllerResponse, request_id: str) -> UpdateResult:
    return UpdateResult(cv.state_from_proto(reply.state), reply.replayed, request_id, stale=reply.stale,
                        applied=reply.applied, partial=reply.partial)


def reward_functions(reply: pb.ListRewardFunctionsResponse) -> list[RewardFunctionInfo]:
    return [
        RewardFunctionInfo(
            name=f.name,
            description=f.description,
            parameters=[
                {"name": p.name, "description": p.description, "default": p.default_value, "required": p.required}
                for p in f.parameters
            ],
            source=f.source,
        )
        for f in reply.reward_functions
    ]
