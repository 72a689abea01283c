"""The synchronous client: typed methods over the MaxEnt service's RPCs."""

from __future__ import annotations

import random
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc

from maxent_api import SERVICE_NAME, pb, pb_grpc
from maxent_api.wire import decode

from . import _convert as cv
from . import _messages as msg
from ._channel import ChannelSettings
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

PemSource = bytes | str | Path | None
# A watch stream broken with one of these codes (a server restarting or
# draining, a network cut) is resumed from the last version seen.
WATCH_RESUME_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
ENCODED_METHODS = ("ComputeRewardStatistics", "ComputeWeightStats", "ComputeStepStatistics")


class ClientBase:
    """Connection options shared by MaxEntClient and AsyncMaxEntClient.

    Every call has a deadline (`timeout` seconds, per client or per call).
    UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried by
    gRPC's retry policy with exponential backoff and jitter (`max_attempts`
    tries in all). TLS: `root_certificates` (CA bundle, PEM bytes or a path;
    `tls=True` alone uses the system roots), plus `private_key` and
    `certificate_chain` for mutual TLS. `token` is sent as
    `authorization: Bearer <token>`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: PemSource = None,
        private_key: PemSource = None,
        certificate_chain: PemSource = None,
        max_attempts: int = 5,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_message_mb: int = 64,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = ChannelSettings(
            target=target, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, tls=tls, token=token, max_attempts=max_attempts,
            initial_backoff=initial_backoff, max_backoff=max_backoff, max_message_mb=max_message_mb, options=options,
        )
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._metadata = self.settings.call_metadata()
        self._channel = self._open_channel()
        self._stub = pb_grpc.MaxEntServiceStub(self._channel)
        # The batch RPCs take requests already serialized by _messages and
        # read their responses' arrays with numpy (_wire.decode).
        self._encoded = {
            name: self._channel.unary_unary(
                f"/{SERVICE_NAME}/{name}",
                request_serializer=None,
                response_deserializer=partial(decode, getattr(pb, f"{name}Response")),
            )
            for name in ENCODED_METHODS
        }

    def _open_channel(self) -> Any:
        raise NotImplementedError


class MaxEntClient(ClientBase):
    """Calls a MaxEnt server at `target` ("host:port"); options: ClientBase."""

    def _open_channel(self) -> grpc.Channel:
        return self.settings.sync_channel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MaxEntClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return (self._encoded.get(method) or getattr(self._stub, method))(
                request,
                timeout=self.timeout if timeout is None else timeout,
                wait_for_ready=self.wait_for_ready,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # -- runs ------------------------------------------------------------------

    def create_run(
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
        return msg.reward_result(self._call("ComputeRewardStatistics", request, timeout), sizes)

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
        request, sizes = msg.weight_request(
            run_id, q_values=q_values, ref_logp_sum=ref_logp_sum, ref_token_counts=ref_token_counts,
            group_sizes=group_sizes, advantages=advantages, include_reference_term=include_reference_term,
            normalize_by_tokens=normalize_by_tokens,
        )
        return msg.weight_result(self._call("ComputeWeightStats", request, timeout), sizes)

    def compute_step_statistics(
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
        return msg.step_result(self._call("ComputeStepStatistics", request, timeout), sizes)

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
        return msg.update_result(self._call("UpdateController", request, timeout), request_id)

    def list_reward_functions(self, *, timeout: float | None = None) -> list[RewardFunctionInfo]:
        return msg.reward_functions(self._call("ListRewardFunctions", pb.ListRewardFunctionsRequest(), timeout))

    # -- watching ------------------------------------------------------------------

    def watch_run(
        self,
        run_id: str,
        *,
        since_version: int = 0,
        wait_for_run: bool = False,
        timeout: float | None = None,
        reconnect_seconds: float = 60.0,
    ) -> Iterator[ControllerState]:
        """The run's controller state as it changes: first the current state
        (or, with since_version > 0, every version after it that the server
        still holds), then each new version in order, none skipped, none
        repeated. Runs until the caller stops iterating, `timeout` seconds
        pass (DeadlineExceededError; None: no limit) or the run is deleted
        (NotFoundError). `wait_for_run` waits for a run that does not exist
        yet. A stream broken by a server restart or a network cut is resumed
        from the last version seen, with backoff, for up to
        `reconnect_seconds` before the error is raised."""
        cursor = _WatchCursor(since_version, timeout, reconnect_seconds, self.settings.initial_backoff,
                              self.settings.max_backoff)
        while True:
            call = self._stub.WatchRun(
                cursor.request(run_id, wait_for_run), timeout=cursor.remaining(),
                wait_for_ready=self.wait_for_ready, metadata=self._metadata,
            )
            try:
                for response in call:
                    state = cursor.accept(response)
                    if state is not None:
                        yield state
                return
            except grpc.RpcError as error:
                delay = cursor.retry_after(error)
            finally:
                call.cancel()
            time.sleep(delay)
            try:
                grpc.channel_ready_future(self._channel).result(timeout=cursor.reconnect_window())
            except grpc.FutureTimeoutError:
                raise cursor.give_up() from None


class _WatchCursor:
    """A watch's position (the last version yielded) and its reconnect budget."""

    def __init__(self, since_version: int, timeout: float | None, reconnect_seconds: float,
                 initial_backoff: float, max_backoff: float) -> None:
        if since_version < 0:
            raise ValueError("since_version must be >= 0")
        self.last: int | None = since_version if since_version > 0 else None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reconnect_seconds = reconnect_seconds
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.failures = 0
        self.broken_since: float | None = None
        self.error: grpc.RpcError | None = None

    def request(self, run_id: str, wait_for_run: bool) -> pb.WatchRunRequest:
        return pb.WatchRunRequest(run_id=run_id, since_version=self.last or 0, wait_for_run=wait_for_run)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def accept(self, response: Any) -> ControllerState | None:
        """The state to yield, or None for a version already yielded."""
        self.failures, self.broken_since = 0, None
        state = cv.state_from_proto(response.state)
        if self.last is not None and state.version <= self.last:
            return None
        self.last = state.version
        return state

    def retry_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before resuming, or raise the error as a MaxEntError."""
        self.error = error
        now = time.monotonic()
        if self.broken_since is None:
            self.broken_since = now
        if error.code() not in WATCH_RESUME_CODES or now - self.broken_since >= self.reconnect_seconds:
            raise self.give_up() from None
        delay = min(self.max_backoff, self.initial_backoff * 2**self.failures) * random.uniform(0.5, 1.0)
        self.failures += 1
        if self.deadline is not None and now + delay >= self.deadline:
            raise self.give_up() from None
        return delay

    def reconnect_window(self) -> float:
        """How long to wait for the channel to connect again."""
        left = self.reconnect_seconds - (time.monotonic() - (self.broken_since or time.monotonic()))
        remaining = self.remaining()
        return max(0.0, left if remaining is None else min(left, remaining))

    def give_up(self) -> Exception:
        return from_rpc_error(self.error)
