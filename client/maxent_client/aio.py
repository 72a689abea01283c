"""The asyncio client: typed coroutines over the MaxEnt service's RPCs."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator, Sequence

import grpc

from maxent_api import pb

from . import _convert as cv
from . import _messages as msg
from .client import ClientBase, _WatchCursor
from .errors import from_rpc_error
from .models import (
    ControllerState,
    FailurePolicy,
    RewardFunctionInfo,
    RewardStatistics,
    RewardTerm,
    Run,
    SeedGrpo,
    StepStatistics,
    UpdateResult,
    WeightingConfig,
    WeightStats,
)


class AsyncMaxEntClient(ClientBase):
    """The asyncio twin of MaxEntClient (grpc.aio): the same options
    (ClientBase) and methods, each a coroutine. Create it inside a running
    event loop."""

    def _open_channel(self) -> grpc.aio.Channel:
        return self.settings.aio_channel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncMaxEntClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return await (self._encoded.get(method) or getattr(self._stub, method))(
                request,
                timeout=self.timeout if timeout is None else timeout,
                wait_for_ready=self.wait_for_ready,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    # -- runs ------------------------------------------------------------------

    async def create_run(
        self,
        run_id: str,
        config: WeightingConfig | dict[str, Any] | None = None,
        *,
        initial_state: ControllerState | None = None,
        timeout: float | None = None,
    ) -> Run:
        """Create a run (idempotent for an identical config). With
        `initial_state` (an exported run's state) the controller starts
        exactly there: tau, beta, log tau, EMA, step, version and the rest.
        `config` is a WeightingConfig or a dict of its fields ({"tau": 0.5}); an
        unknown key is a ValueError."""
        request = pb.CreateRunRequest(run_id=run_id, config=cv.config_to_proto(cv.as_config(config)))
        if initial_state is not None:
            request.initial_state.CopyFrom(cv.state_to_proto(initial_state))
        return cv.run_from_proto((await self._call("CreateRun", request, timeout)).run)

    async def get_run(self, run_id: str, *, timeout: float | None = None) -> Run:
        return cv.run_from_proto((await self._call("GetRun", pb.GetRunRequest(run_id=run_id), timeout)).run)

    async def iter_runs(self, *, page_size: int = 100, timeout: float | None = None) -> AsyncIterator[Run]:
        """Every run, ordered by run_id, fetched a page at a time."""
        token = ""
        while True:
            page = await self._call("ListRuns", pb.ListRunsRequest(page_size=page_size, page_token=token), timeout)
            for r in page.runs:
                yield cv.run_from_proto(r)
            token = page.next_page_token
            if not token:
                return

    async def list_runs(self, *, page_size: int = 100, timeout: float | None = None) -> list[Run]:
        return [run async for run in self.iter_runs(page_size=page_size, timeout=timeout)]

    async def delete_run(self, run_id: str, *, timeout: float | None = None) -> None:
        await self._call("DeleteRun", pb.DeleteRunRequest(run_id=run_id), timeout)

    # -- computations ------------------------------------------------------------

    async def compute_reward_statistics(
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
        scale_rewards: bool | str | None = None,
        advantage_baseline: str | None = None,
        zero_truncated_completion_rewards: bool | None = None,
        max_completion_len: int | None = None,
        seed_grpo: SeedGrpo | bool | None = None,
        on_failure: FailurePolicy | None = None,
        timeout: float | None = None,
    ) -> RewardStatistics:
        """Utilities (precomputed, or from reward terms on completions), moments,
        GRPO advantages and the listwise target q.

        `scale_rewards`: True or "group" divides by each group's std, "batch"
        by the whole batch's, False or "none" not at all; `advantage_baseline`
        "leave_one_out" (RLOO) subtracts the mean of the other completions of
        the group instead of the group mean.

        Per-completion inputs are flat with `group_sizes`, or nested per group
        (then group_sizes is computed from `utilities` or `completions`)."""
        request, sizes = msg.reward_request(
            utilities=utilities, completions=completions, answers=answers, rewards=rewards, group_sizes=group_sizes,
            token_counts=token_counts, truncated=truncated, gen_logp_sum=gen_logp_sum, run_id=run_id,
            q_temperature=q_temperature, q_epsilon=q_epsilon, scale_rewards=scale_rewards,
            advantage_baseline=advantage_baseline, zero_truncated_completion_rewards=zero_truncated_completion_rewards,
            max_completion_len=max_completion_len, seed_grpo=seed_grpo, on_failure=on_failure,
        )
        return msg.reward_result(await self._call("ComputeRewardStatistics", request, timeout), sizes)

    async def compute_weight_stats(
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
        request, sizes = msg.weight_request(
            run_id, q_values=q_values, ref_logp_sum=ref_logp_sum, ref_token_counts=ref_token_counts,
            group_sizes=group_sizes, advantages=advantages, include_reference_term=include_reference_term,
            normalize_by_tokens=normalize_by_tokens,
        )
        return msg.weight_result(await self._call("ComputeWeightStats", request, timeout), sizes)

    async def compute_step_statistics(
        self,
        run_id: str,
        *,
        utilities: Any = None,
        completions: Any = None,
        answers: Sequence[str] | None = None,
        rewards: Sequence[RewardTerm] = (),
        group_sizes: Any = None,
        token_counts: Any = None,
        truncated: Any = None,
        gen_logp_sum: Any = None,
        ref_logp_sum: Any = None,
        ref_token_counts: Any = None,
        include_reference_term: bool | None = None,
        normalize_by_tokens: bool = False,
        read_mask: Sequence[str] | None = None,
        q_temperature: float | None = None,
        q_epsilon: float | None = None,
        scale_rewards: bool | str | None = None,
        advantage_baseline: str | None = None,
        zero_truncated_completion_rewards: bool | None = None,
        max_completion_len: int | None = None,
        seed_grpo: SeedGrpo | bool | None = None,
        on_failure: FailurePolicy | None = None,
        timeout: float | None = None,
    ) -> StepStatistics:
        """One training step in one round trip: compute_reward_statistics on
        the batch, then the run's MaxEnt weights of its q with these reference
        log-probs (compute_weight_stats), read at one controller version.

        `read_mask` names the arrays to send back (e.g. ``("weights",
        "advantages")``); the others come back empty. Default: all."""
        request, sizes = msg.step_request(
            run_id, ref_logp_sum=ref_logp_sum, ref_token_counts=ref_token_counts, read_mask=read_mask,
            include_reference_term=include_reference_term, normalize_by_tokens=normalize_by_tokens,
            utilities=utilities, completions=completions, answers=answers, rewards=rewards, group_sizes=group_sizes,
            token_counts=token_counts, truncated=truncated, gen_logp_sum=gen_logp_sum, q_temperature=q_temperature,
            q_epsilon=q_epsilon, scale_rewards=scale_rewards, advantage_baseline=advantage_baseline,
            zero_truncated_completion_rewards=zero_truncated_completion_rewards,
            max_completion_len=max_completion_len, seed_grpo=seed_grpo, on_failure=on_failure,
        )
        return msg.step_result(await self._call("ComputeStepStatistics", request, timeout), sizes)

    # -- controller ----------------------------------------------------------------

    async def update_controller(
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
        max_weight_entropy: float | None = None,
        reporter_id: str | None = None,
        sample_count: float | None = None,
        timeout: float | None = None,
    ) -> UpdateResult:
        """Apply one controller step. A request_id is generated when none is
        given; retries re-send it, so the update is applied once. On a run with
        reporters_per_step > 1 this is one job's report (`reporter_id`, with
        `sample_count` samples behind it), pooled until the step is complete."""
        request_id = request_id or uuid.uuid4().hex
        request = msg.update_request(
            run_id, request_id, global_step=global_step, weight_entropy=weight_entropy, measured_kl=measured_kl,
            tau_grad=tau_grad, beta_grad=beta_grad, lr_scale=lr_scale, expected_version=expected_version,
            max_weight_entropy=max_weight_entropy, reporter_id=reporter_id, sample_count=sample_count,
        )
        return msg.update_result(await self._call("UpdateController", request, timeout), request_id)

    async def list_reward_functions(self, *, timeout: float | None = None) -> list[RewardFunctionInfo]:
        return msg.reward_functions(await self._call("ListRewardFunctions", pb.ListRewardFunctionsRequest(), timeout))

    # -- watching ------------------------------------------------------------------

    async def watch_run(
        self,
        run_id: str,
        *,
        since_version: int = 0,
        wait_for_run: bool = False,
        timeout: float | None = None,
        reconnect_seconds: float = 60.0,
    ) -> AsyncIterator[ControllerState]:
        """MaxEntClient.watch_run as an async iterator: ``async for state in
        client.watch_run(run_id)``; resumes a broken stream the same way."""
        cursor = _WatchCursor(since_version, timeout, reconnect_seconds, self.settings.initial_backoff,
                              self.settings.max_backoff)
        while True:
            call = self._stub.WatchRun(
                cursor.request(run_id, wait_for_run), timeout=cursor.remaining(),
                wait_for_ready=self.wait_for_ready, metadata=self._metadata,
            )
            try:
                async for response in call:
                    state = cursor.accept(response)
                    if state is not None:
                        yield state
                return
            except grpc.aio.AioRpcError as error:
                delay = cursor.retry_after(error)
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self._channel.channel_ready(), cursor.reconnect_window())
            except asyncio.TimeoutError:
                raise cursor.give_up() from None
