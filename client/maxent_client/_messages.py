"""The request models (one per RPC, each the signature of its client method)
and the response readers that the sync and async clients share."""

from __future__ import annotations

import inspect
import re
import uuid
from dataclasses import KW_ONLY, dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Generic, ParamSpec, Sequence, TypeVar

import numpy as np

from maxent_api import pb
from maxent_api.wire import array, encode

from . import _convert as cv
from .models import (
    ControllerState,
    RewardFailurePolicy,
    RewardFunction,
    RewardStatistics,
    RewardTerm,
    RewardValues,
    Run,
    SeedGrpoOptions,
    StepStatistics,
    UpdateResult,
    WeightingConfig,
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


# -- request models ----------------------------------------------------------------
#
# One frozen dataclass per RPC holds the arguments of its client method: the
# sync and async clients turn each class into a method with exactly its
# constructor's parameters (client.rpc_method, aio.rpc_coroutine), so every
# signature is written here once.

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
Reader = Callable[[Any], T]


@dataclass(frozen=True, kw_only=True)
class Request(Generic[T]):
    """One RPC's arguments as its client method takes them. `build` gives
    the wire request and the reader that turns the reply into a model."""

    rpc: ClassVar[str]
    # Seconds the call may take; None: the client's timeout.
    timeout: float | None = None

    def build(self) -> tuple[Any, Reader[T]]:
        """The wire request (a message, or bytes already encoded) and its reply's reader."""
        raise NotImplementedError


@dataclass(frozen=True)
class CreateRunRequest(Request[Run]):
    """Create a run (idempotent for an identical config). With
    `initial_state` (an exported run's state) the controller starts
    exactly there: tau, beta, log tau, EMA, step, version and the rest.
    `config` is a WeightingConfig or a dict of its fields ({"tau": 0.5}); an
    unknown key is a ValueError."""

    rpc: ClassVar[str] = "CreateRun"
    run_id: str
    config: WeightingConfig | dict[str, Any] | None = None
    _: KW_ONLY
    initial_state: ControllerState | None = None

    def build(self) -> tuple[pb.CreateRunRequest, Reader[Run]]:
        request = pb.CreateRunRequest(run_id=self.run_id, config=cv.config_to_proto(cv.as_config(self.config)))
        if self.initial_state is not None:
            request.initial_state.CopyFrom(cv.state_to_proto(self.initial_state))
        return request, _run_of


@dataclass(frozen=True)
class GetRunRequest(Request[Run]):
    """A run's config and controller state (NotFoundError when there is none)."""

    rpc: ClassVar[str] = "GetRun"
    run_id: str

    def build(self) -> tuple[pb.GetRunRequest, Reader[Run]]:
        return pb.GetRunRequest(run_id=self.run_id), _run_of


@dataclass(frozen=True)
class DeleteRunRequest(Request[None]):
    """Delete a run and its history."""

    rpc: ClassVar[str] = "DeleteRun"
    run_id: str

    def build(self) -> tuple[pb.DeleteRunRequest, Reader[None]]:
        return pb.DeleteRunRequest(run_id=self.run_id), _nothing


@dataclass(frozen=True)
class ListRunsRequest(Request[tuple[list[Run], str]]):
    """One page of runs, ordered by run_id, and the next page's token ("" after the last)."""

    rpc: ClassVar[str] = "ListRuns"
    page_size: int = 100
    page_token: str = ""

    def build(self) -> tuple[pb.ListRunsRequest, Reader[tuple[list[Run], str]]]:
        return pb.ListRunsRequest(page_size=self.page_size, page_token=self.page_token), _run_page


@dataclass(frozen=True, kw_only=True)
class RewardInputs:
    """The batch and reward options ComputeRewardStatistics and
    ComputeStepStatistics share."""

    utilities: Any = None
    completions: Any = None
    answers: Sequence[str] | None = None
    rewards: Sequence[RewardTerm] = ()
    group_sizes: Any = None
    token_counts: Any = None
    truncated: Any = None
    gen_logp_sum: Any = None
    q_temperature: float | None = None
    q_epsilon: float | None = None
    scale_rewards: bool | str | None = None
    advantage_baseline: str | None = None
    zero_truncated_completion_rewards: bool | None = None
    max_completion_len: int | None = None
    seed_grpo: SeedGrpoOptions | bool | None = None
    on_failure: RewardFailurePolicy | None = None

    def encode_batch(self, request: Any, run_id: str, **arrays: Any) -> tuple[bytes, np.ndarray]:
        """`request` with these fields and `arrays` added, serialized (arrays
        encoded by numpy), and the batch's group sizes."""
        primary = "utilities" if self.utilities is not None else "completions"
        sizes = group_sizes_for(self.group_sizes, getattr(self, primary), primary)
        request.run_id = run_id
        if self.completions is not None:
            request.completions.extend(cv.strings(self.completions))
        if self.answers is not None:
            request.answers.extend(str(a) for a in self.answers)
        for term in self.rewards:
            request.rewards.add(name=term.name, weight=term.weight, params=reward_params(term))
        set_optional(
            request,
            q_temperature=self.q_temperature,
            q_epsilon=self.q_epsilon,
            zero_truncated_completion_rewards=self.zero_truncated_completion_rewards,
            max_completion_len=self.max_completion_len,
        )
        cv.set_advantage_options(request, self.scale_rewards, self.advantage_baseline)
        if self.seed_grpo:
            options = self.seed_grpo if isinstance(self.seed_grpo, SeedGrpoOptions) else SeedGrpoOptions()
            request.seed_grpo.enabled = True
            set_optional(request.seed_grpo, **options.__dict__)
        if self.on_failure is not None:
            request.on_failure = self.on_failure.value
        payload = encode(
            request,
            group_sizes=sizes,
            utilities=_flat(self.utilities, np.float64, "utilities"),
            token_counts=_flat(self.token_counts, np.int64, "token_counts"),
            truncated=_flat(self.truncated, np.bool_, "truncated"),
            gen_logp_sum=_flat(self.gen_logp_sum, np.float64, "gen_logp_sum"),
            **arrays,
        )
        return payload, sizes


@dataclass(frozen=True, kw_only=True)
class ReferenceInputs:
    """The reference log-probs and weight options ComputeWeightStats and
    ComputeStepStatistics share."""

    ref_logp_sum: Any = None
    ref_token_counts: Any = None
    include_reference_term: bool | None = None
    normalize_by_tokens: bool = False

    def reference_arrays(self) -> dict[str, np.ndarray | None]:
        return {
            "ref_logp_sum": _flat(self.ref_logp_sum, np.float64, "ref_logp_sum"),
            "ref_token_counts": _flat(self.ref_token_counts, np.int64, "ref_token_counts"),
        }

    def set_weight_options(self, request: Any) -> None:
        request.normalize_by_tokens = self.normalize_by_tokens
        set_optional(request, include_reference_term=self.include_reference_term)


@dataclass(frozen=True, kw_only=True)
class ComputeRewardStatisticsRequest(RewardInputs, Request[RewardStatistics]):
    """Utilities (precomputed, or from reward terms on completions), moments,
    GRPO advantages and the listwise target q.

    `scale_rewards`: True or "group" divides by each group's std, "batch"
    by the whole batch's, False or "none" not at all; `advantage_baseline`
    "leave_one_out" (RLOO) subtracts the mean of the other completions of
    the group instead of the group mean.

    Per-completion inputs are flat with `group_sizes`, or nested per group
    (then group_sizes is computed from `utilities` or `completions`)."""

    rpc: ClassVar[str] = "ComputeRewardStatistics"
    run_id: str = ""

    def encode(self) -> tuple[bytes, np.ndarray]:
        """The serialized request and its group sizes."""
        return self.encode_batch(pb.ComputeRewardStatisticsRequest(), self.run_id)

    def build(self) -> tuple[bytes, Reader[RewardStatistics]]:
        payload, sizes = self.encode()
        return payload, partial(reward_result, sizes=sizes)


@dataclass(frozen=True)
class ComputeWeightStatsRequest(ReferenceInputs, Request[WeightStats]):
    """MaxEnt weights from q and reference log-probs with the run's tau and beta."""

    rpc: ClassVar[str] = "ComputeWeightStats"
    run_id: str
    _: KW_ONLY
    q_values: Any = None
    group_sizes: Any = None
    advantages: Any = None

    def encode(self) -> tuple[bytes, np.ndarray]:
        """The serialized request and its group sizes."""
        primary = "q_values" if self.q_values is not None else "advantages"
        sizes = group_sizes_for(self.group_sizes, getattr(self, primary), primary)
        request = pb.ComputeWeightStatsRequest(run_id=self.run_id)
        self.set_weight_options(request)
        payload = encode(
            request,
            group_sizes=sizes,
            q_values=_flat(self.q_values, np.float64, "q_values"),
            advantages=_flat(self.advantages, np.float64, "advantages"),
            **self.reference_arrays(),
        )
        return payload, sizes

    def build(self) -> tuple[bytes, Reader[WeightStats]]:
        payload, sizes = self.encode()
        return payload, partial(weight_result, sizes=sizes)


@dataclass(frozen=True)
class ComputeStepStatisticsRequest(RewardInputs, ReferenceInputs, Request[StepStatistics]):
    """One training step in one round trip: compute_reward_statistics on
    the batch, then the run's MaxEnt weights of its q with these reference
    log-probs (compute_weight_stats), read at one controller version.

    `read_mask` names the arrays to send back (e.g. ``("weights",
    "advantages")``); the others come back empty. Default: all."""

    rpc: ClassVar[str] = "ComputeStepStatistics"
    run_id: str
    _: KW_ONLY
    read_mask: Sequence[str] | None = None

    def build(self) -> tuple[bytes, Reader[StepStatistics]]:
        request = pb.ComputeStepStatisticsRequest()
        self.set_weight_options(request)
        if self.read_mask is not None:
            if isinstance(self.read_mask, str):
                raise TypeError("read_mask takes a sequence of field names, e.g. ('weights', 'advantages')")
            request.read_mask.SetInParent()
            request.read_mask.paths.extend(self.read_mask)
        payload, sizes = self.encode_batch(request, self.run_id, **self.reference_arrays())
        return payload, partial(step_result, sizes=sizes)


@dataclass(frozen=True)
class UpdateControllerRequest(Request[UpdateResult]):
    """Apply one controller step. A request_id is generated when none is
    given; retries re-send it, so the update is applied once. On a run with
    reporters_per_step > 1 this is one job's report (`reporter_id`, with
    `sample_count` samples behind it), pooled until the step is complete."""

    rpc: ClassVar[str] = "UpdateController"
    run_id: str
    _: KW_ONLY
    global_step: int
    weight_entropy: float | None = None
    measured_kl: float | None = None
    tau_grad: float | None = None
    beta_grad: float | None = None
    lr_scale: float | None = None
    expected_version: int | None = None
    request_id: str | None = None
    max_weight_entropy: float | None = None
    reporter_id: str | None = None
    sample_count: float | None = None

    def build(self) -> tuple[pb.UpdateControllerRequest, Reader[UpdateResult]]:
        request_id = self.request_id or uuid.uuid4().hex
        request = pb.UpdateControllerRequest(
            run_id=self.run_id, request_id=request_id, global_step=self.global_step, reporter_id=self.reporter_id or ""
        )
        set_optional(
            request,
            weight_entropy=self.weight_entropy,
            measured_kl=self.measured_kl,
            tau_grad=self.tau_grad,
            beta_grad=self.beta_grad,
            lr_scale=self.lr_scale,
            expected_version=self.expected_version,
            max_weight_entropy=self.max_weight_entropy,
            sample_count=self.sample_count,
        )
        return request, partial(update_result, request_id=request_id)


@dataclass(frozen=True)
class ListRewardFunctionsRequest(Request[list[RewardFunction]]):
    """Every reward function the server evaluates, ordered by name."""

    rpc: ClassVar[str] = "ListRewardFunctions"

    def build(self) -> tuple[pb.ListRewardFunctionsRequest, Reader[list[RewardFunction]]]:
        return pb.ListRewardFunctionsRequest(), reward_functions


def reward_request(**fields: Any) -> tuple[bytes, np.ndarray]:
    """A ComputeRewardStatistics request from compute_reward_statistics's
    keywords, serialized, and its group sizes."""
    return ComputeRewardStatisticsRequest(**fields).encode()


def weight_request(run_id: str, **fields: Any) -> tuple[bytes, np.ndarray]:
    """A ComputeWeightStats request from compute_weight_stats's arguments,
    serialized, and its group sizes."""
    return ComputeWeightStatsRequest(run_id, **fields).encode()


def _run_of(reply: Any) -> Run:
    return cv.run_from_proto(reply.run)


def _run_page(reply: pb.ListRunsResponse) -> tuple[list[Run], str]:
    return [cv.run_from_proto(run) for run in reply.runs], reply.next_page_token


def _nothing(reply: Any) -> None:
    return None


def method_name(request: Any) -> str:
    """The client method of an RPC: CreateRun -> create_run."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", request.rpc).lower()


def construct(request: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`request(*args, **kwargs)`; a TypeError about the arguments names the
    client method the caller called, not the request model."""
    try:
        return request(*args, **kwargs)
    except TypeError as error:
        model = f"{getattr(request, '__name__', '')}.__init__()"
        raise TypeError(str(error).replace(model, f"{method_name(request)}()")) from None


def describe_method(method: Callable[..., Any], request: Any, owner: str) -> None:
    """Give `owner`'s method made from `request` its name, docstring and
    signature (self, then the request's fields; `timeout` last), for help()
    and inspect."""
    fields = list(inspect.signature(request).parameters.values())
    fields.sort(key=lambda parameter: parameter.name == "timeout")
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__name__ = method_name(request)
    method.__qualname__ = f"{owner}.{method.__name__}"
    method.__doc__ = request.__doc__
    method.__signature__ = inspect.Signature([self_parameter, *fields])  # type: ignore[attr-defined]


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


def update_result(reply: pb.UpdateControllerResponse, request_id: str) -> UpdateResult:
    return UpdateResult(cv.state_from_proto(reply.state), reply.replayed, request_id, stale=reply.stale,
                        applied=reply.applied, partial=reply.partial)


def reward_functions(reply: pb.ListRewardFunctionsResponse) -> list[RewardFunction]:
    return [
        RewardFunction(
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
