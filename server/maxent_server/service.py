"""The gRPC servicer: validate, convert messages to arrays, call the engine or
the store, convert back. Blocking work runs in executors so the event loop
stays free: computations, reward evaluation and store calls each have their
own pool, so a large batch never delays another run's controller update.
Only small batches that need no network run on the loop (INLINE_MAX_COMPLETIONS)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar, get_args

import grpc
import numpy as np
from maxent_api import SERVICE, pb, pb_grpc
from maxent_api.wire import decode, encode, fill

from . import convert
from .auth import CURRENT_PRINCIPAL
from .domain import (
    MAX_ANSWER_TEXT_CHARS,
    ControllerUpdate,
    EntropyScope,
    WeightingConfig,
    final_answer,
)
from .domain.validation import (
    CONFIG_LIMIT,
    MAX_PAGE_SIZE,
    MAX_REQUEST_ID_LENGTH,
    MEASUREMENT_LIMIT,
    SAMPLE_COUNT_LIMIT,
    STATE_LIMIT,
    Violations,
)
from .engine import (
    Engine,
    RewardOptions,
    SeedGrpoOptions,
    WeightOptions,
    combine_rewards,
    pooling,
)
from .engine.pooling import ReportResult
from .errors import RewardFailures, translate_errors, translate_stream_errors
from .store import RunNotFound, RunPatterns, RunRecord, RunStore, StoreUnavailable

if TYPE_CHECKING:
    from .rewards import RewardTerm

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
# Batches up to this many completions are computed on the event loop itself
# when that needs no network: they take well under a millisecond, less than
# the two thread switches of handing them to the compute pool. Larger batches,
# reward functions and reads of a remote store go to the pools.
INLINE_MAX_COMPLETIONS = 32_768
# WatchRun polls the store's state history this often (local SQLite; a
# remote store costs a round trip, so less often) and reads at most
# WATCH_BATCH versions per poll.
WATCH_POLL_SECONDS = 0.02
WATCH_POLL_SECONDS_REMOTE = 0.04
WATCH_BATCH = 256
# The optional config fields that set an absolute target entropy.
_AbsoluteTarget = Literal["target_entropy", "target_entropy_start", "target_entropy_final"]
_ABSOLUTE_TARGETS: tuple[_AbsoluteTarget, ...] = get_args(_AbsoluteTarget)


class EncodedResponse:
    """A response already serialized: `payload` is the whole message, arrays
    included, written in one pass without building them into a message;
    `message` holds the same scalar fields (what metrics read)."""

    __slots__ = ("message", "payload")

    def __init__(self, message: Any, **arrays: Any) -> None:
        self.message = message
        self.payload = encode(message, **arrays)


def serialize_response(response: Any) -> bytes:
    if isinstance(response, EncodedResponse):
        return response.payload
    return response.SerializeToString()


def add_to_server(servicer: "MaxEntServicer", server: Any) -> None:
    """Register `servicer` on `server` as the generated helper does, with a
    response serializer that passes an EncodedResponse's bytes through and,
    for the batch methods, requests whose arrays numpy reads off the wire."""
    handlers = {
        method.name: (grpc.unary_stream_rpc_method_handler if method.server_streaming
                      else grpc.unary_unary_rpc_method_handler)(
            getattr(servicer, method.name),
            request_deserializer=_request_reader(getattr(pb, method.input_type.name)),
            response_serializer=serialize_response,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _request_reader(message_class: Any) -> Callable[[bytes], Any]:
    has_arrays = any(f.is_repeated and f.type != f.TYPE_STRING and f.type != f.TYPE_MESSAGE
                     for f in message_class.DESCRIPTOR.fields)
    return partial(decode, message_class) if has_arrays else message_class.FromString


class MaxEntServicer(pb_grpc.MaxEntServiceServicer):
    def __init__(
        self,
        store: RunStore,
        engine: Engine,
        rewards=None,
        *,
        compute_threads: int = 2,
        reward_threads: int = 64,
        store_threads: int = 4,
        clock: Callable[[], float] = time.time,
        observer=None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.rewards = rewards
        self.clock = clock
        # Optional metrics.ServiceObserver: told about each reward evaluation.
        self.observer = observer
        self._compute = ThreadPoolExecutor(compute_threads, thread_name_prefix="maxent-compute",
                                           initializer=engine.prepare_thread)
        # Reward calls mostly wait on the reward worker pool, which is fair
        # between calls; this bounds only how many wait at once, so a small call
        # is not queued here behind a few large ones.
        self._reward_pool = ThreadPoolExecutor(reward_threads, thread_name_prefix="maxent-rewards",
                                               initializer=engine.prepare_thread)
        self._store_pool = ThreadPoolExecutor(store_threads, thread_name_prefix="maxent-store")
        # Set when the server starts draining: WatchRun streams end at once.
        self._closing = threading.Event()

    def begin_shutdown(self) -> None:
        """The server stops taking calls: open WatchRun streams end with
        UNAVAILABLE within one poll, so they never hold the grace period
        (their clients resume elsewhere or after the restart)."""
        self._closing.set()

    def shutdown(self) -> None:
        self._closing.set()
        for pool in (self._compute, self._reward_pool, self._store_pool):
            pool.shutdown(wait=True)

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    async def _get_run(self, run_id: str) -> RunRecord:
        return await self._run(self._store_pool, self.store.get_run, run_id)

    # -- runs ------------------------------------------------------------------

    @translate_errors
    async def CreateRun(self, request: pb.CreateRunRequest, context) -> pb.CreateRunResponse:
        v = Violations()
        v.run_id(request.run_id)
        _check_config(v, request.config)
        if request.HasField("initial_state"):
            _check_initial_state(v, request.initial_state, request.config)
        v.raise_if_any()
        config = convert.config_from_proto(request.config)
        now = self.clock()
        initial = convert.state_from_proto(request.initial_state, now) if request.HasField("initial_state") else None
        record, _ = await self._run(self._store_pool, self.store.create_run, request.run_id, config, now, initial)
        return pb.CreateRunResponse(run=convert.run_to_proto(record))

    @translate_errors
    async def GetRun(self, request: pb.GetRunRequest, context) -> pb.GetRunResponse:
        v = Violations()
        v.run_id(request.run_id)
        v.raise_if_any()
        return pb.GetRunResponse(run=convert.run_to_proto(await self._get_run(request.run_id)))

    @translate_errors
    async def ListRuns(self, request: pb.ListRunsRequest, context) -> pb.ListRunsResponse:
        v = Violations()
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            v.add("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        after = _decode_page_token(v, request.page_token)
        v.raise_if_any()
        size = request.page_size or DEFAULT_PAGE_SIZE
        # A token limited to some runs lists only those, read by their ids'
        # prefixes: no other run's id, and no count of them, reaches it.
        principal = CURRENT_PRINCIPAL.get()
        if principal is None or principal.all_runs:
            records = await self._run(self._store_pool, self.store.list_runs, after, size + 1)
        else:
            patterns = RunPatterns(principal.run_patterns)
            records = await self._run(self._store_pool, self.store.list_matching, patterns, after, size + 1)
        response = pb.ListRunsResponse(runs=[convert.run_to_proto(r) for r in records[:size]])
        if len(records) > size:
            response.next_page_token = _encode_page_token(records[size - 1].run_id)
        return response

    @translate_errors
    async def DeleteRun(self, request: pb.DeleteRunRequest, context) -> pb.DeleteRunResponse:
        v = Violations()
        v.run_id(request.run_id)
        v.raise_if_any()
        await self._run(self._store_pool, self.store.delete_run, request.run_id)
        return pb.DeleteRunResponse()

    # -- computations ------------------------------------------------------------

    @translate_errors
    async def ComputeRewardStatistics(self, request, context) -> EncodedResponse:
        v = Violations()
        v.run_id(request.run_id, required=False)
        v.raise_if_any()
        return await self._schedule(request, self._reward_statistics, needs_run=bool(request.run_id))

    @translate_errors
    async def ComputeStepStatistics(self, request, context) -> EncodedResponse:
        v = Violations()
        v.run_id(request.run_id)
        v.raise_if_any()
        return await self._schedule(request, self._step_statistics, needs_run=True)

    async def _schedule(self, request, compute: Callable[..., T], *, needs_run: bool) -> T:
        """Run a batch computation where it belongs: reward evaluation and
        SEED-GRPO answer extraction on the reward pool (cancelled with its
        RPC), small batches that need no network on the event loop, the rest
        on the compute pool."""
        if len(request.rewards) or request.seed_grpo.enabled:
            cancelled = threading.Event()
            try:
                return await self._run(self._reward_pool, compute, request, cancelled)
            except asyncio.CancelledError:
                # The client went away or its deadline passed: free the
                # reward workers of this call's queued work.
                cancelled.set()
                raise
        small = _small_batch(request, request.utilities) and not request.seed_grpo.enabled
        if small and (not needs_run or self.store.local_reads):
            return compute(request)
        return await self._run(self._compute, compute, request)

    def _reward_statistics(self, request, cancelled: threading.Event | None = None) -> EncodedResponse:
        config = self.store.get_run(request.run_id).config if request.run_id else WeightingConfig()
        inputs = _RewardInputs.parse(request, config, self.rewards)
        utilities, valid, failed, per_reward = self._utilities(request, inputs, cancelled)
        stats = self.engine.reward_statistics(inputs.group_sizes, utilities, inputs.options, valid=valid,
                                              **inputs.engine_kwargs(self._final_answers(request, cancelled)))
        arrays = _reward_arrays(stats, failed)
        _check_result("reward statistic", _reward_input_names(request), reward_mean=stats.reward_mean,
                      reward_std=stats.reward_std, **arrays)
        _mark_excluded(arrays, valid)
        response = pb.ComputeRewardStatisticsResponse(
            per_reward=per_reward, reward_mean=stats.reward_mean, reward_std=stats.reward_std
        )
        return EncodedResponse(response, **arrays)

    def _step_statistics(self, request, cancelled: threading.Event | None = None) -> EncodedResponse:
        # The run is read once, where the computation runs: its config gives
        # the reward defaults and its state the tau and beta of the weights.
        record = self.store.get_run(request.run_id)
        v = Violations()
        inputs = _RewardInputs.parse(request, record.config, self.rewards, v)
        options = _weight_options(record, request)
        reference = _parse_reference(v, request, options, int(inputs.group_sizes[inputs.group_sizes > 0].sum()))
        _check_read_mask(v, request)
        v.raise_if_any()
        utilities, valid, failed, per_reward = self._utilities(request, inputs, cancelled)
        stats, weights = self.engine.step_statistics(
            inputs.group_sizes, utilities, inputs.options, *reference, options, valid=valid,
            **inputs.engine_kwargs(self._final_answers(request, cancelled)),
        )
        arrays = {**_reward_arrays(stats, failed), **_weight_arrays(weights)}
        scalars = _weight_scalars(weights, record)
        _check_result("step statistic", _reward_input_names(request) + ", ref_logp_sum and the run's tau and beta",
                      reward_mean=stats.reward_mean, reward_std=stats.reward_std, **scalars, **arrays)
        _mark_excluded(arrays, valid)
        wanted = set(request.read_mask.paths) if request.HasField("read_mask") else None
        if wanted is not None:
            arrays = {name: values for name, values in arrays.items() if name in wanted}
            per_reward = per_reward if "per_reward" in wanted else []
        response = pb.ComputeStepStatisticsResponse(
            per_reward=per_reward, reward_mean=stats.reward_mean, reward_std=stats.reward_std, **scalars,
        )
        return EncodedResponse(response, **arrays)

    def _final_answers(self, request, cancelled: threading.Event | None) -> list[str | None] | None:
        """SEED-GRPO's final answer per completion (None: not enabled). Long
        texts are read by the reward workers, out of this process's GIL, so
        degenerate completions cannot slow the other calls."""
        if not request.seed_grpo.enabled:
            return None
        if self.rewards is None:
            return [final_answer(c) for c in request.completions]
        return self.rewards.final_answers(list(request.completions), cancelled)

    def _utilities(self, request, inputs: "_RewardInputs", cancelled: threading.Event | None):
        """Utilities (given, or evaluated from reward terms), the mask of
        completions that take part (None: all), the failure mask and the
        per-reward values."""
        if not inputs.terms:
            return inputs.utilities, None, None, []
        utilities, failed, per_reward = self._evaluate_rewards(request, inputs, cancelled)
        valid = None if request.on_failure == pb.REWARD_FAILURE_POLICY_ZERO else ~failed
        return utilities, valid, failed, per_reward

    def _evaluate_rewards(self, request, inputs: "_RewardInputs", cancelled: threading.Event | None):
        """Utilities, the per-completion failure mask and per-reward values."""
        terms = inputs.terms
        answers = np.repeat(np.asarray(list(request.answers) or [""] * len(inputs.group_sizes), dtype=object), inputs.group_sizes)
        started = time.perf_counter()
        evaluation = self.rewards.evaluate(
            terms, list(request.completions), answers.tolist(), inputs.token_counts, inputs.options.max_completion_len,
            cancelled,
        )
        if self.observer is not None:
            self.observer.rewards_evaluated([t.name for t in terms], evaluation, time.perf_counter() - started)
        failed_any = evaluation.failed.any(axis=0)
        if request.on_failure == pb.REWARD_FAILURE_POLICY_ERROR and failed_any.any():
            raise RewardFailures(_failure_list(terms, evaluation))
        values = evaluation.values
        if request.on_failure == pb.REWARD_FAILURE_POLICY_ZERO:
            values = np.where(evaluation.failed, 0.0, values)
        utilities = combine_rewards(values, np.array([t.weight for t in terms], dtype=np.float64))
        per_reward = [
            fill(
                pb.RewardValues(
                    name=term.name,
                    failure_count=int(evaluation.failed[r].sum()),
                    timeout_count=int(evaluation.timed_out[r].sum()),
                ),
                values=evaluation.values[r],
                failed=evaluation.failed[r],
            )
            for r, term in enumerate(terms)
        ]
        return utilities, failed_any, per_reward

    @translate_errors
    async def ComputeWeightStats(self, request, context) -> EncodedResponse:
        """MaxEnt weights from q. Each non-empty group's q_values must sum to 1
        (within Q_SUM_TOLERANCE), or be all 0 (a group whose completions were
        all excluded, as ComputeRewardStatistics returns it); anything else is
        INVALID_ARGUMENT on q_values naming the group and its sum."""
        v = Violations()
        v.run_id(request.run_id)
        v.raise_if_any()
        values = request.advantages if len(request.advantages) else request.q_values
        if _small_batch(request, values) and self.store.local_reads:
            return self._weight_stats(request)
        return await self._run(self._compute, self._weight_stats, request)

    def _weight_stats(self, request) -> EncodedResponse:
        # The run is read where the computation runs: at most one thread hop.
        record = self.store.get_run(request.run_id)
        options = _weight_options(record, request)
        sizes, q, ref, counts, advantages = _parse_weight_inputs(request, options)
        stats = self.engine.weight_stats(sizes, q, ref, counts, options, advantages=advantages)
        scalars, arrays = _weight_scalars(stats, record), _weight_arrays(stats)
        inputs = "advantages" if options.train_grpo_objective else "q_values, ref_logp_sum and the run's tau and beta"
        _check_result("weight statistic", inputs, **scalars, **arrays)
        response = pb.ComputeWeightStatsResponse(**scalars)
        return EncodedResponse(response, **arrays)

    # -- controller ----------------------------------------------------------------

    @translate_errors
    async def UpdateController(self, request, context) -> pb.UpdateControllerResponse:
        update, expected, reporter, samples = _parse_update(request)
        results: list[ReportResult] = []  # the store may run `step` more than once: the last run is what it wrote

        def step(config: WeightingConfig, state):
            new, result = pooling.report(
                config, state, update, self.clock(), reporter_id=reporter, sample_count=samples
            )
            # Raised inside the store's step, so the store writes nothing.
            _check_new_state(update, new)
            results.append(result)
            return new

        outcome = await self._run(
            self._store_pool, self.store.update_controller, request.run_id, request.request_id, expected, step
        )
        result = results[-1] if results and not outcome.replayed else ReportResult()
        return pb.UpdateControllerResponse(
            state=convert.state_to_proto(request.run_id, outcome.state), replayed=outcome.replayed,
            stale=result.stale, applied=result.applied, partial=result.partial,
        )

    @translate_errors
    async def ListRewardFunctions(self, request, context) -> pb.ListRewardFunctionsResponse:
        functions = self.rewards.list_functions() if self.rewards is not None else []
        return pb.ListRewardFunctionsResponse(
            reward_functions=[
                pb.RewardFunction(
                    name=f.name,
                    description=f.description,
                    source=f.source,
                    parameters=[
                        pb.RewardParameter(
                            name=p.name, description=p.description, default_value=p.default_value, required=p.required
                        )
                        for p in f.parameters
                    ],
                )
                for f in functions
            ]
        )

    # -- watching ------------------------------------------------------------------

    @translate_stream_errors
    async def WatchRun(self, request: pb.WatchRunRequest, context):
        """The run's state at since_version + 1 (from the store's history) or
        the current state, then every later version in order, found by
        polling the store's history (which every replica writes with the
        state itself, so nothing is skipped whichever replica applied it)."""
        v = Violations()
        v.run_id(request.run_id)
        if request.since_version < 0:
            v.add("since_version", "must be >= 0")
        v.raise_if_any()
        run_id = request.run_id
        poll = WATCH_POLL_SECONDS if self.store.local_reads else WATCH_POLL_SECONDS_REMOTE
        while True:
            try:
                current = (await self._watch_read(self.store.get_run, run_id)).state
                break
            except RunNotFound:
                if not request.wait_for_run:
                    raise
            await self._watch_pause(poll)
        since = request.since_version
        if since == 0:
            first = [current]
        else:
            held = await self._watch_read(self.store.states_since, run_id, since, WATCH_BATCH)
            if held and held[0].version == since + 1:
                first = held
            elif current.version > since:
                first = [current]  # the history no longer holds since_version + 1
            else:
                first = []  # the caller is up to date: wait for the next version
        last = since
        for state in first:
            yield pb.WatchRunResponse(state=convert.state_to_proto(run_id, state))
            last = max(last, state.version)
        while True:
            await self._watch_pause(poll)
            states = await self._watch_read(self.store.states_since, run_id, last, WATCH_BATCH)
            for state in states:
                if state.version > last:
                    yield pb.WatchRunResponse(state=convert.state_to_proto(run_id, state))
                    last = state.version

    async def _watch_read(self, fn: Callable[..., T], *args) -> T:
        """A store read for WatchRun: on the event loop when the store reads
        local storage without waiting (SQLite), else in the store pool."""
        if self.store.local_reads:
            return fn(*args)
        return await self._run(self._store_pool, fn, *args)

    async def _watch_pause(self, seconds: float) -> None:
        if not self._closing.is_set():
            await asyncio.sleep(seconds)
        if self._closing.is_set():
            raise StoreUnavailable("the server is shutting down; watch again to resume from the last version")


# -- request parsing -------------------------------------------------------------


def _small_batch(request, values) -> bool:
    """Few enough completions (and groups) to compute on the event loop."""
    return max(len(values), len(request.group_sizes)) <= INLINE_MAX_COMPLETIONS


def _weight_options(record: RunRecord, request) -> WeightOptions:
    config, state = record.config, record.state
    return WeightOptions(
        tau=state.tau,
        beta=state.beta,
        denominator=config.denominator,
        length_normalize_ref=config.length_normalize_ref,
        train_grpo_objective=config.train_grpo_objective,
        include_reference_term=request.include_reference_term if request.HasField("include_reference_term") else True,
        normalize_by_tokens=request.normalize_by_tokens,
    )


def _reward_arrays(stats, failed) -> dict[str, Any]:
    return dict(
        total_utils=stats.total_utils,
        advantages=stats.advantages,
        q_values=stats.q_values,
        seed_semantic_entropies=stats.seed_semantic_entropies,
        seed_advantage_scales=stats.seed_advantage_scales,
        failed=failed,
        zero_variance_groups=stats.zero_variance_groups,
    )


def _mark_excluded(arrays: dict[str, Any], valid: np.ndarray | None) -> None:
    """Under the EXCLUDE policy a failed completion has no utility: NaN in
    `total_utils`, so it cannot be read as a zero reward. Done after the
    finiteness guard, which checks what was computed."""
    if valid is not None and not valid.all():
        arrays["total_utils"] = np.where(valid, arrays["total_utils"], np.nan)


def _weight_scalars(stats, record: RunRecord) -> dict[str, Any]:
    """The scalar fields of a weights response: entropies, the mixed-group
    ones, and the pair the run's entropy_scope tells a trainer to report."""
    state, scope = record.state, stats.scope
    mixed = record.config.entropy_scope is EntropyScope.MIXED_GROUPS
    fields = dict(
        weight_entropy=stats.weight_entropy,
        weight_entropy_min=stats.weight_entropy_min,
        weight_entropy_max=stats.weight_entropy_max,
        tau=state.tau,
        beta=state.beta,
        controller_version=state.version,
        max_weight_entropy=scope.max_entropy,
        mixed_group_count=scope.mixed_count,
        controller_max_weight_entropy=scope.mixed_max_entropy if mixed else scope.max_entropy,
    )
    if scope.mixed_entropy is not None:
        fields["mixed_weight_entropy"] = scope.mixed_entropy
    controller_entropy = scope.mixed_entropy if mixed else (stats.weight_entropy if scope.groups else None)
    if controller_entropy is not None:
        fields["controller_weight_entropy"] = controller_entropy
    return fields


def _reward_input_names(request) -> str:
    """The inputs a reward computation's numbers come from, for errors."""
    names = ["rewards (their weights and values)" if len(request.rewards) else "utilities"]
    if request.seed_grpo.enabled:
        names.append("gen_logp_sum")
    return ", ".join(names)


def _weight_arrays(stats) -> dict[str, Any]:
    return dict(
        weights=stats.weights,
        advantage_entropy=stats.advantage_entropy,
        group_weight_entropies=stats.group_entropies,
    )


_STEP_ARRAYS = frozenset(f.name for f in pb.ComputeStepStatisticsResponse.DESCRIPTOR.fields if f.is_repeated)


def _check_read_mask(v: Violations, request) -> None:
    for i, path in enumerate(request.read_mask.paths):
        if path not in _STEP_ARRAYS:
            v.add(f"read_mask.paths[{i}]", f"{path!r} is not a repeated field of ComputeStepStatisticsResponse "
                                           f"(one of {', '.join(sorted(_STEP_ARRAYS))})")


def _check_advantage_options(v: Violations, message, prefix: str = "") -> None:
    """Known enum values, and scale_rewards agreeing with advantage_scaling."""
    if message.advantage_scaling not in pb.AdvantageScaling.values():
        v.add(prefix + "advantage_scaling", f"unknown AdvantageScaling value {message.advantage_scaling}")
    elif (
        message.advantage_scaling != pb.ADVANTAGE_SCALING_UNSPECIFIED
        and message.HasField("scale_rewards")
        and message.scale_rewards != (message.advantage_scaling != pb.ADVANTAGE_SCALING_NONE)
    ):
        v.add(prefix + "scale_rewards",
              f"scale_rewards={str(message.scale_rewards).lower()} contradicts advantage_scaling "
              f"{pb.AdvantageScaling.Name(message.advantage_scaling)}; set one of them")
    if message.advantage_baseline not in pb.AdvantageBaseline.values():
        v.add(prefix + "advantage_baseline", f"unknown AdvantageBaseline value {message.advantage_baseline}")


def _check_config(v: Violations, config: pb.WeightingConfig) -> None:
    prefix = "config."
    for name in ("tau", "beta", "tau_min", "tau_lr", "meta_tau_lr", "meta_beta_lr"):
        v.within(prefix + name, getattr(config, name), 0.0, CONFIG_LIMIT)
    for name in ("tau_max", "kl_target", "kl_step_size", "meta_beta_grad_clip"):
        v.within(prefix + name, getattr(config, name), -CONFIG_LIMIT, CONFIG_LIMIT)
    for name in _ABSOLUTE_TARGETS:
        if config.HasField(name):
            v.within(prefix + name, getattr(config, name), -CONFIG_LIMIT, CONFIG_LIMIT)
    if config.HasField("target_entropy_start") != config.HasField("target_entropy_final"):
        v.add(prefix + "target_entropy_final", "target_entropy_start and target_entropy_final must be set together")
    if config.HasField("q_temperature") and v.at_least(prefix + "q_temperature", config.q_temperature, 0.0, strict=True):
        v.within(prefix + "q_temperature", config.q_temperature, 0.0, CONFIG_LIMIT)
    if config.HasField("q_epsilon") and v.at_least(prefix + "q_epsilon", config.q_epsilon, 0.0):
        if config.q_epsilon > 1.0:
            v.add(prefix + "q_epsilon", "must be <= 1")
    if config.tau_warmup_steps < 0:
        v.add(prefix + "tau_warmup_steps", "must be >= 0")
    if config.reporters_per_step < 0:
        v.add(prefix + "reporters_per_step", "must be >= 0")
    if config.tau_max > 0 and config.tau_max < config.tau_min:
        v.add(prefix + "tau_max", "must be >= tau_min (or <= 0 for no upper bound)")
    if not convert.known_denominator(config.denominator):
        v.add(prefix + "denominator", f"unknown WeightDenominator value {config.denominator}")
    _check_advantage_options(v, config, prefix)
    if config.entropy_scope not in convert.ENTROPY_SCOPES:
        v.add(prefix + "entropy_scope", f"unknown EntropyScope value {config.entropy_scope}")
    if not config.train_grpo_objective and config.tau + config.beta <= 0:
        v.add(prefix + "tau", "tau + beta must be > 0 for MaxEnt weights (or set train_grpo_objective)")
    elif not config.train_grpo_objective and config.denominator == pb.WEIGHT_DENOMINATOR_TAU and config.tau <= 0:
        v.add(prefix + "tau", "must be > 0 with the tau denominator (WEIGHT_DENOMINATOR_TAU divides by tau)")
    if config.HasField("target_entropy_ratio"):
        ratio = config.target_entropy_ratio
        if v.finite(prefix + "target_entropy_ratio", ratio) and not 0.0 < ratio <= 1.0:
            v.add(prefix + "target_entropy_ratio", f"must be in (0, 1], got {ratio!r}")
        absolute = [n for n in _ABSOLUTE_TARGETS if config.HasField(n)]
        if absolute:
            v.add(prefix + "target_entropy_ratio", f"is exclusive with {', '.join(absolute)}; set one kind of target")


def _check_initial_state(v: Violations, state: pb.ControllerState, config: pb.WeightingConfig) -> None:
    """An imported controller state: finite numbers, tau and beta >= 0 (tau
    > 0 where the config needs it), counters >= 0."""
    prefix = "initial_state."
    tau_ok = v.within(prefix + "tau", state.tau, 0.0, STATE_LIMIT)
    beta_ok = v.within(prefix + "beta", state.beta, 0.0, STATE_LIMIT)
    v.finite(prefix + "tau_log", state.tau_log)
    for name in ("entropy_ema", "active_target_entropy", "last_weight_entropy", "last_measured_kl"):
        if state.HasField(name):
            v.within(prefix + name, getattr(state, name), -STATE_LIMIT, STATE_LIMIT)
    if state.HasField("last_max_weight_entropy"):
        v.within(prefix + "last_max_weight_entropy", state.last_max_weight_entropy, 0.0, MEASUREMENT_LIMIT)
    for name in ("global_step", "version", "tau_bound_steps"):
        if getattr(state, name) < 0:
            v.add(prefix + name, "must be >= 0")
    if tau_ok and beta_ok and not config.train_grpo_objective:
        if state.tau + state.beta <= 0:
            v.add(prefix + "tau", "tau + beta must be > 0 for MaxEnt weights (or set train_grpo_objective)")
        elif config.denominator == pb.WEIGHT_DENOMINATOR_TAU and state.tau <= 0:
            v.add(prefix + "tau", "must be > 0 with the tau denominator (WEIGHT_DENOMINATOR_TAU divides by tau)")


def _check_group_arrays(
    v: Violations, request, name: str, kind: Callable[..., np.ndarray], n: int, *, required: bool, finite=False,
    non_negative=False,
) -> np.ndarray | None:
    field = getattr(request, name)
    if not v.length(name, field, n, optional=not required):
        return None
    array = kind(field)
    if finite:
        v.all_bounded(name, array)
    if non_negative:
        v.all_non_negative(name, array)
    return array


class _RewardInputs:
    """Validated, converted arrays and options of a ComputeRewardStatistics call."""

    group_sizes: np.ndarray
    terms: list[RewardTerm]
    utilities: np.ndarray | None  # None where reward terms give the utilities
    token_counts: np.ndarray | None
    truncated: np.ndarray | None
    gen_logp_sum: np.ndarray | None
    options: RewardOptions

    @classmethod
    def parse(cls, request, config: WeightingConfig, rewards, violations: Violations | None = None) -> "_RewardInputs":
        """Raises InvalidArgument, unless `violations` is given to collect into."""
        self = cls()
        v = Violations() if violations is None else violations
        self.group_sizes = convert.ints(request.group_sizes)
        n = v.group_sizes(self.group_sizes)
        groups = len(self.group_sizes)
        self.terms = _terms(request)
        for i, term in enumerate(self.terms):
            v.within(f"rewards[{i}].weight", term.weight, -CONFIG_LIMIT, CONFIG_LIMIT)
        self.utilities = None
        if self.terms:
            if len(request.utilities):
                v.add("utilities", "give either precomputed utilities or reward terms, not both")
            v.length("completions", request.completions, n)
            if rewards is None:
                v.add("rewards", "this server has no reward functions")
            else:
                max_len = request.max_completion_len if request.HasField("max_completion_len") else None
                v.extend(rewards.validate(self.terms, token_counts_given=len(request.token_counts) > 0,
                                          max_completion_len=max_len if max_len and max_len > 0 else None))
                if len(request.answers) or rewards.needs_answers(self.terms):
                    v.length("answers", request.answers, groups)
        elif n and len(request.completions) and not len(request.utilities):
            v.add("utilities", f"is missing: {len(request.completions)} completions were given without reward "
                               "terms; give utilities, or reward terms (rewards=...) to score the completions")
        else:
            self.utilities = _check_group_arrays(v, request, "utilities", convert.floats, n, required=True, finite=True)
        self.token_counts = _check_group_arrays(v, request, "token_counts", convert.ints, n, required=False, non_negative=True)
        self.truncated = _check_group_arrays(v, request, "truncated", convert.bools, n, required=False)
        self.gen_logp_sum = _check_group_arrays(v, request, "gen_logp_sum", convert.floats, n, required=False, finite=True)
        self.options = _reward_options(v, request, config, self)
        if request.on_failure not in pb.RewardFailurePolicy.values():
            v.add("on_failure", f"unknown RewardFailurePolicy value {request.on_failure}")
        largest = int(self.group_sizes.max()) if groups else 0
        if self.options.q_epsilon * largest > 1.0:
            v.add("q_epsilon", f"q_epsilon * largest group size ({largest}) must be <= 1")
        _check_advantage_options(v, request)
        if violations is None:
            v.raise_if_any()
        return self

    def engine_kwargs(self, answers: list[str | None] | None) -> dict[str, Any]:
        """The per-completion side inputs of Engine.reward_statistics;
        `answers`: SEED-GRPO's final answers (None when it is off)."""
        return dict(
            token_counts=self.token_counts,
            truncated=self.truncated,
            gen_logp_sum=self.gen_logp_sum,
            answers=answers if self.options.seed_grpo else None,
        )


def _terms(request) -> list[RewardTerm]:
    if not len(request.rewards):
        return []
    from .rewards import RewardTerm

    return [RewardTerm(t.name, t.weight, dict(t.params)) for t in request.rewards]


def _reward_options(v: Violations, request, config: WeightingConfig, inputs: _RewardInputs) -> RewardOptions:
    has = request.HasField
    temperature = request.q_temperature if has("q_temperature") else config.q_temperature
    epsilon = request.q_epsilon if has("q_epsilon") else config.q_epsilon
    if has("q_temperature") and v.at_least("q_temperature", temperature, 0.0, strict=True):
        v.within("q_temperature", temperature, 0.0, CONFIG_LIMIT)
    if has("q_epsilon"):
        v.at_least("q_epsilon", epsilon, 0.0)
    max_len = request.max_completion_len if has("max_completion_len") else None
    if max_len is not None and max_len <= 0:
        v.add("max_completion_len", "must be > 0")
    zero_truncated = request.zero_truncated_completion_rewards
    if zero_truncated and max_len is not None and inputs.token_counts is None:
        v.add("token_counts", "required with zero_truncated_completion_rewards and max_completion_len")
    return RewardOptions(
        q_temperature=temperature if np.isfinite(temperature) else 1.0,
        q_epsilon=epsilon if np.isfinite(epsilon) else 0.0,
        scale_rewards=_known(convert.scaling_of, request, config.scale_rewards),
        advantage_baseline=_known(convert.baseline_of, request, config.advantage_baseline),
        zero_truncated_completion_rewards=zero_truncated,
        max_completion_len=max_len,
        seed_grpo=_seed_settings(v, request, inputs),
    )


def _known(choose: Callable, request, default):
    """`choose(request, default)`, or `default` for an unknown enum value (reported by the validation)."""
    try:
        return choose(request, default)
    except KeyError:
        return default


def _seed_settings(v: Violations, request, inputs: _RewardInputs) -> SeedGrpoOptions | None:
    seed = request.seed_grpo
    if not seed.enabled:
        return None
    n = len(request.completions) if len(request.rewards) else (len(inputs.utilities) if inputs.utilities is not None else 0)
    settings = SeedGrpoOptions(
        alpha=seed.alpha if seed.HasField("alpha") else 0.0417,
        normalize_by_max_entropy=seed.normalize_by_max_entropy if seed.HasField("normalize_by_max_entropy") else True,
        length_normalize_logprobs=seed.length_normalize_logprobs if seed.HasField("length_normalize_logprobs") else True,
        num_generations=seed.num_generations if seed.HasField("num_generations") else None,
    )
    v.within("seed_grpo.alpha", settings.alpha, 0.0, CONFIG_LIMIT)
    if settings.num_generations is not None and settings.num_generations <= 0:
        v.add("seed_grpo.num_generations", "must be > 0")
    if not len(request.rewards):
        v.length("completions", request.completions, n)
    _check_answer_texts(v, request.completions)
    if inputs.gen_logp_sum is None:
        v.add("gen_logp_sum", "required when seed_grpo is enabled (one per completion)")
    if settings.length_normalize_logprobs and inputs.token_counts is None:
        v.add("token_counts", "required when seed_grpo.length_normalize_logprobs is on (one per completion)")
    return settings


def _check_answer_texts(v: Violations, completions) -> None:
    """SEED-GRPO reads a final answer from each completion: bound the text (docs/math.md §5)."""
    for i, text in enumerate(completions):
        if len(text) > MAX_ANSWER_TEXT_CHARS:
            v.add(f"completions[{i}]", f"has {len(text)} characters; with seed_grpo a completion may have at most "
                                       f"{MAX_ANSWER_TEXT_CHARS} (its final answer is read from the text)")
            return


def _parse_weight_inputs(request, options: WeightOptions):
    v = Violations()
    sizes = convert.ints(request.group_sizes)
    n = v.group_sizes(sizes)
    q = advantages = None
    if options.train_grpo_objective:
        advantages = _check_group_arrays(v, request, "advantages", convert.floats, n, required=True, finite=True)
    else:
        q = _check_group_arrays(v, request, "q_values", convert.floats, n, required=True, finite=True, non_negative=True)
        _check_q_sums(v, q, sizes)
    ref, counts = _parse_reference(v, request, options, n)
    v.raise_if_any()
    return sizes, q, ref, counts, advantages


Q_SUM_TOLERANCE = 1e-6


def _check_q_sums(v: Violations, q: np.ndarray | None, sizes: np.ndarray) -> None:
    """Each non-empty group's q must sum to 1 within Q_SUM_TOLERANCE, or be
    all 0: ComputeRewardStatistics gives excluded completions q 0 and the
    rest of their group sums to 1, so a group whose every completion was
    excluded has q all 0. Skipped when q or the sizes already failed."""
    if q is None or not q.size or sizes.size == 0 or sizes.min() < 0:
        return
    if not np.isfinite(q).all() or q.min() < 0:
        return  # reported already
    nonempty = np.flatnonzero(sizes > 0)
    starts = np.concatenate([[0], np.cumsum(sizes[nonempty])[:-1]]).astype(np.int64)
    sums = np.add.reduceat(q, starts)
    bad = np.flatnonzero((np.abs(sums - 1.0) > Q_SUM_TOLERANCE) & (sums != 0.0))
    if bad.size:
        group = int(nonempty[bad[0]])
        v.add("q_values", f"group {group} sums to {float(sums[bad[0]])!r}; each group's q_values must sum to 1 "
                          f"(within {Q_SUM_TOLERANCE:g}), or be all 0 for a group whose completions were all "
                          f"excluded ({bad.size} group(s) off)")


def _parse_reference(
    v: Violations, request, options: WeightOptions, n: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Reference log-prob sums and token counts for MaxEnt weights (None
    where not needed), checked against the run's tau and beta."""
    if options.train_grpo_objective:
        return None, None
    if options.tau + options.beta <= 0:
        v.add("run_id", "the run's controller has tau + beta <= 0; MaxEnt weights need tau + beta > 0")
    if options.include_reference_term and n and not len(request.ref_logp_sum):
        v.add("ref_logp_sum", f"is missing; expected {n} entries (the reference model's log-prob sum of each "
                              "completion), or pass include_reference_term=False to weight without a reference")
        ref = None
    else:
        ref = _check_group_arrays(
            v, request, "ref_logp_sum", convert.floats, n, required=options.include_reference_term, finite=True
        )
    counts_needed = options.normalize_by_tokens or (options.include_reference_term and options.length_normalize_ref)
    counts = _check_group_arrays(
        v, request, "ref_token_counts", convert.ints, n, required=counts_needed, non_negative=True
    )
    return ref, counts


# The measurements of an update and their lower bounds; each is at most
# MEASUREMENT_LIMIT. Weight entropies, the KL (a divergence; its k3 estimate
# is >= 0 sample by sample) and lr_scale are >= 0; meta gradients have
# either sign.
_UPDATE_RANGES = {
    "weight_entropy": 0.0,
    "measured_kl": 0.0,
    "tau_grad": -MEASUREMENT_LIMIT,
    "beta_grad": -MEASUREMENT_LIMIT,
    "lr_scale": 0.0,
    "max_weight_entropy": 0.0,
}


def _parse_update(request) -> tuple[ControllerUpdate, int | None, str, float]:
    """The update, expected_version, reporter_id and sample_count of a request."""
    v = Violations()
    v.run_id(request.run_id)
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        v.add("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
    if request.global_step < 0:
        v.add("global_step", "must be >= 0")
    optional = {}
    for name, low in _UPDATE_RANGES.items():
        if request.HasField(name):
            optional[name] = getattr(request, name)
            v.within(name, optional[name], low, MEASUREMENT_LIMIT)
    if len(request.reporter_id) > MAX_REQUEST_ID_LENGTH:
        v.add("reporter_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
    samples = request.sample_count if request.HasField("sample_count") else 1.0
    if v.at_least("sample_count", samples, 0.0, strict=True) and samples > SAMPLE_COUNT_LIMIT:
        v.add("sample_count", f"must be <= {SAMPLE_COUNT_LIMIT:g} (docs/math.md, Input ranges), got {samples!r}")
    expected = request.expected_version if request.HasField("expected_version") else None
    if expected is not None and expected < 0:
        v.add("expected_version", "must be >= 0")
    v.raise_if_any()
    return ControllerUpdate(global_step=request.global_step, **optional), expected, request.reporter_id, samples


def _check_new_state(update: ControllerUpdate, state) -> None:
    """Refuse (INVALID_ARGUMENT naming the measurement) an update that would
    leave the controller state non-finite, or tau or beta beyond STATE_LIMIT."""
    v = Violations()
    # What moves each number: beta the KL controller (or meta g_beta), the
    # rest the entropy measurement (or meta g_tau); lr_scale scales both.
    beta_cause = "beta_grad" if update.beta_grad is not None else "measured_kl"
    tau_cause = "tau_grad" if update.tau_grad is not None else "weight_entropy"
    checks = [
        ("tau", state.tau, tau_cause, STATE_LIMIT),
        ("beta", state.beta, beta_cause, STATE_LIMIT),
        ("tau_log", state.tau_log, tau_cause, None),
        ("entropy_ema", state.entropy_ema, "weight_entropy", None),
    ]
    checks += [(f"pooled {name}", total, name, None) for name, total, _ in state.pending_sums]
    for name, value, cause, limit in checks:
        if value is None:
            continue
        if not np.isfinite(value):
            v.add(cause, f"would make the controller's {name} non-finite ({value!r}); update refused, state unchanged")
        elif limit is not None and abs(value) > limit:
            v.add(cause, f"would make the controller's {name} {value!r}, beyond {limit:g} (docs/math.md, Input "
                         "ranges); update refused, state unchanged")
    v.raise_if_any()


def _check_result(what: str, inputs: str, **values: Any) -> None:
    """The last guard before OK: every number of a response finite, else
    INVALID_ARGUMENT naming the inputs (never NaN or infinity with OK)."""
    v = Violations()
    for name, value in values.items():
        if value is None:
            continue
        array = np.asarray(value)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            v.add(inputs, f"give a non-finite {what} {name}; reduce their magnitude (docs/math.md, Input ranges)")
            break
    v.raise_if_any()


def _failure_list(terms, evaluation) -> list[tuple[str, str]]:
    failures = []
    for r, i in zip(*np.nonzero(evaluation.failed)):
        kind = "timed out" if evaluation.timed_out[r, i] else "raised"
        failures.append((f"rewards[{r}] ({terms[r].name}) completion {i}", f"reward function {kind}"))
    return failures


def _encode_page_token(run_id: str) -> str:
    return base64.urlsafe_b64encode(run_id.encode()).decode()


def _decode_page_token(v: Violations, token: str) -> str | None:
    if not token:
        return None
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        v.add("page_token", "is not a token from a ListRuns response")
        return None
