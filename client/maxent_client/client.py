"""The synchronous client: typed methods over the MaxEnt service's RPCs."""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterator, Sequence

import grpc
import numpy as np

from . import _convert as cv
from ._generated.maxent.v1 import maxent_pb2 as pb
from ._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from ._wire import array, fill
from .errors import from_rpc_error
from .models import (
    FailurePolicy,
    RewardFunctionInfo,
    RewardStatistics,
    RewardTerm,
    RewardValues,
    Run,
    SeedGrpo,
    UpdateResult,
    WeightingConfig,
    WeightStats,
)

SERVICE = "maxent.v1.MaxEntService"


def retry_service_config(*, max_attempts: int, initial_backoff: float, max_backoff: float) -> str:
    """A gRPC service config that retries UNAVAILABLE with exponential backoff.

    gRPC re-sends the same request bytes, so a retried UpdateController carries
    the same request_id and is applied once.
    """
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": f"{initial_backoff}s",
        "maxBackoff": f"{max_backoff}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": policy}]})


class MaxEntClient:
    """Calls a MaxEnt server at `target` ("host:port").

    Every call has a deadline (`timeout` seconds, per client or per call) and
    is retried on UNAVAILABLE by gRPC's own retry policy.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        max_attempts: int = 5,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_message_mb: int = 64,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        limit = max_message_mb * 1024 * 1024
        channel_options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(
                max_attempts=max_attempts, initial_backoff=initial_backoff, max_backoff=max_backoff)),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            *options,
        ]
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._channel = grpc.insecure_channel(target, options=channel_options)
        self._stub = pb_grpc.MaxEntServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MaxEntClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=self.timeout if timeout is None else timeout, wait_for_ready=self.wait_for_ready
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # -- runs ------------------------------------------------------------------

    def create_run(self, run_id: str, config: WeightingConfig | None = None, *, timeout: float | None = None) -> Run:
        """Create a run (idempotent for an identical config)."""
        request = pb.CreateRunRequest(run_id=run_id, config=cv.config_to_proto(config or WeightingConfig()))
        return cv.run_from_proto(self._call("CreateRun", request, timeout).run)

    def get_run(self, run_id: str, *, timeout: float | None = None) -> Run:
        return cv.run_from_proto(self._call("GetRun", pb.GetRunRequest(run_id=run_id), timeout).run)

    def iter_runs(self, *, page_size: int = 100, timeout: float | None = None) -> Iterator[Run]:
        """Every run, ordered by run_id, fetched a page at a time."""
        token = ""
        while True:
            page = self._call("ListRuns", pb.ListRunsRequest(page_size=page_size, page_token=token), timeout)
            yield from (cv.run_from_proto(r) for r in page.runs)
            token = page.next_page_token
            if not token:
                return

    def list_runs(self, *, page_size: int = 100, timeout: float | None = None) -> list[Run]:
        return list(self.iter_runs(page_size=page_size, timeout=timeout))

    def delete_run(self, run_id: str, *, timeout: float | None = None) -> None:
        self._call("DeleteRun", pb.DeleteRunRequest(run_id=run_id), timeout)

    # -- computations ------------------------------------------------------------

    def compute_reward_statistics(
        self,
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
        scale_rewards: bool | None = None,
        zero_truncated_completion_rewards: bool | None = None,
        max_completion_len: int | None = None,
        seed_grpo: SeedGrpo | bool | None = None,
        on_failure: FailurePolicy | None = None,
        timeout: float | None = None,
    ) -> RewardStatistics:
        """Utilities (precomputed, or from reward terms on completions), moments,
        GRPO advantages and the listwise target q.

        Per-completion inputs are flat with `group_sizes`, or nested per group
        (then group_sizes is computed from `utilities` or `completions`)."""
        primary = utilities if utilities is not None else completions
        sizes = _group_sizes(group_sizes, primary)
        request = pb.ComputeRewardStatisticsRequest(run_id=run_id)
        fill(
            request,
            group_sizes=sizes,
            utilities=_flat(utilities, np.float64),
            token_counts=_flat(token_counts, np.int64),
            truncated=_flat(truncated, np.bool_),
            gen_logp_sum=_flat(gen_logp_sum, np.float64),
        )
        if completions is not None:
            request.completions.extend(cv.strings(completions))
        if answers is not None:
            request.answers.extend(str(a) for a in answers)
        for term in rewards:
            request.rewards.add(name=term.name, weight=term.weight, params=dict(term.params))
        _set_optional(request, q_temperature=q_temperature, q_epsilon=q_epsilon, scale_rewards=scale_rewards,
                      zero_truncated_completion_rewards=zero_truncated_completion_rewards,
                      max_completion_len=max_completion_len)
        if seed_grpo:
            options = seed_grpo if isinstance(seed_grpo, SeedGrpo) else SeedGrpo()
            request.seed_grpo.enabled = True
            _set_optional(request.seed_grpo, **options.__dict__)
        if on_failure is not None:
            request.on_failure = on_failure.value
        reply = self._call("ComputeRewardStatistics", request, timeout)
        return RewardStatistics(
            group_sizes=np.asarray(sizes, dtype=np.int64),
            total_utils=array(reply.total_utils),
            advantages=array(reply.advantages),
            q_values=array(reply.q_values),
            reward_mean=reply.reward_mean,
            reward_std=reply.reward_std,
            per_reward={
                r.name: RewardValues(r.name, array(r.values), array(r.failed, np.bool_), r.failure_count,
                                     r.timeout_count)
                for r in reply.per_reward
            },
            failed=array(reply.failed, np.bool_),
            seed_semantic_entropies=array(reply.seed_semantic_entropies),
            seed_advantage_scales=array(reply.seed_advantage_scales),
        )

    def compute_weight_stats(
        self,
        run_id: str,
        *,
        q_values: Any = None,
        ref_logp_sum: Any = None,
        ref_token_counts: Any = None,
        group_sizes: Any = None,
        advantages: Any = None,
        include_reference_term: bool | None = None,
        normalize_by_tokens: bool = False,
        timeout: float | None = None,
    ) -> WeightStats:
        """MaxEnt weights from q and reference log-probs with the run's tau and beta."""
        sizes = _group_sizes(group_sizes, q_values if q_values is not None else advantages)
        request = pb.ComputeWeightStatsRequest(run_id=run_id, normalize_by_tokens=normalize_by_tokens)
        fill(
            request,
            group_sizes=sizes,
            q_values=_flat(q_values, np.float64),
            ref_logp_sum=_flat(ref_logp_sum, np.float64),
            ref_token_counts=_flat(ref_token_counts, np.int64),
            advantages=_flat(advantages, np.float64),
        )
        _set_optional(request, include_reference_term=include_reference_term)
        reply = self._call("ComputeWeightStats", request, timeout)
        return WeightStats(
            group_sizes=np.asarray(sizes, dtype=np.int64),
            weights=array(reply.weights),
            weight_entropy=reply.weight_entropy,
            weight_entropy_min=reply.weight_entropy_min,
            weight_entropy_max=reply.weight_entropy_max,
            advantage_entropy=array(reply.advantage_entropy),
            group_weight_entropies=array(reply.group_weight_entropies),
            tau=reply.tau,
            beta=reply.beta,
            controller_version=reply.controller_version,
        )

    # -- controller ----------------------------------------------------------------

    def update_controller(
        self,
        run_id: str,
        *,
        global_step: int,
        weight_entropy: float | None = None,
        measured_kl: float | None = None,
        tau_grad: float | None = None,
        beta_grad: float | None = None,
        lr_scale: float | None = None,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> UpdateResult:
        """Apply one controller step. A request_id is generated when none is
        given; retries re-send it, so the update is applied once."""
        request_id = request_id or uuid.uuid4().hex
        request = pb.UpdateControllerRequest(run_id=run_id, request_id=request_id, global_step=global_step)
        _set_optional(request, weight_entropy=weight_entropy, measured_kl=measured_kl, tau_grad=tau_grad,
                      beta_grad=beta_grad, lr_scale=lr_scale, expected_version=expected_version)
        reply = self._call("UpdateController", request, timeout)
        return UpdateResult(cv.state_from_proto(reply.state), reply.replayed, request_id)

    def list_reward_functions(self, *, timeout: float | None = None) -> list[RewardFunctionInfo]:
        reply = self._call("ListRewardFunctions", pb.ListRewardFunctionsRequest(), timeout)
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


def _group_sizes(group_sizes: Any, primary: Any) -> np.ndarray:
    if group_sizes is not None:
        return cv.flat(group_sizes, np.int64)
    sizes = cv.nested_sizes(primary) if primary is not None else None
    if sizes is None:
        raise ValueError("group_sizes is required unless the per-completion inputs are nested per group")
    return np.asarray(sizes, dtype=np.int64)


def _flat(values: Any, dtype: Any) -> np.ndarray | None:
    return None if values is None else cv.flat(values, dtype)


def _set_optional(message: Any, **values: Any) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)
