"""TRL integration: service-scored rewards for GRPOTrainer, and a controller callback.

::

    from maxent_client import MaxEntClient, RewardTerm, WeightingConfig
    from maxent_client.integrations.trl import MaxEntControllerCallback, MaxEntRewardFunction

    client = MaxEntClient("127.0.0.1:50051")
    client.create_run("exp-1", WeightingConfig(tau=0.5, beta=0.04, target_entropy=1.2, tau_lr=0.05,
                                               kl_target=0.05, kl_horizon=100, kl_step_size=0.2))
    reward = MaxEntRewardFunction(client, rewards=[RewardTerm("math_accuracy", 1.0), RewardTerm("format", 0.2)],
                                  run_id="exp-1", num_generations=8)
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], args=GRPOConfig(num_generations=8, beta=0.04, ...),
                          train_dataset=dataset,   # columns "prompt" and "answer" (or "solution")
                          callbacks=[MaxEntControllerCallback(client, "exp-1")])

:class:`MaxEntRewardFunction` is what TRL calls as a reward function:
``reward(prompts=..., completions=..., completion_ids=..., **columns)`` with
one entry per completion, completions in groups of ``num_generations``
consecutive entries per prompt. It sends them to ComputeRewardStatistics with
the configured reward terms and returns, by ``output``:

* ``"utilities"`` (default): each completion's utility u_i = sum_r w_r r(i).
  TRL then forms its GRPO advantages from them as from any reward function.
* ``"advantages"``: the service's GRPO advantages (SEED-GRPO scaled when
  enabled). TRL normalises rewards again per group; use
  ``GRPOConfig(scale_rewards="none")`` to keep the service's scale.
  ``scale_rewards`` ("group" | "batch" | "none", or a bool) and
  ``advantage_baseline`` ("group_mean" | "leave_one_out") choose how the
  service forms them.
* ``"weights"``: the MaxEnt weights w of ComputeWeightStats with the run's
  current tau and beta. TRL gives reward functions no reference-model
  log-probabilities, so the beta*log pi_ref factor is left out
  (``include_reference_term=False``): w is proportional to q^(1/(tau+beta))
  within each group, and TRL's centring turns it into w_i - mean_g(w).

With a ``run_id`` the adapter also computes the weight statistics (one more
call) and logs ``maxent/weight_entropy``, ``maxent/tau`` and ``maxent/beta``
through TRL's ``log_metric``; :class:`MaxEntControllerCallback` sends that
entropy and TRL's ``kl`` to UpdateController after each logging step.

Neither class needs trl or transformers at import time; the callback's class
is built on first access (it subclasses ``transformers.TrainerCallback``), and
so is :class:`~maxent_client.integrations.trl_trainer.MaxEntGRPOTrainer`, a
``GRPOTrainer`` that trains with the service's MaxEnt weights.
"""

from __future__ import annotations

import json
import math
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from ..client import MaxEntClient
from ..errors import InvalidArgumentError
from ..models import (
    ControllerState,
    FailurePolicy,
    RewardStatistics,
    RewardTerm,
    SeedGrpo,
    UpdateResult,
    WeightStats,
)

if TYPE_CHECKING:
    from .accelerate import MainProcessClient

#: Dataset columns tried, in order, for each group's gold answer.
DEFAULT_ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "gold")

OUTPUTS = ("utilities", "advantages", "weights")

#: Logged by MaxEntRewardFunction: the weight entropy the run's entropy_scope
#: selects. MaxEntControllerCallback sends it in preference to entropy_key.
SCOPED_ENTROPY_KEY = "maxent/controller_weight_entropy"

# Keyword arguments TRL adds for every reward function that are not dataset columns.
_TRL_KWARGS = {"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"}


class _RewardOptions(TypedDict):
    """The compute_reward_statistics options a MaxEntRewardFunction sends
    with every batch (None: the service's default)."""

    max_completion_len: int | None
    zero_truncated_completion_rewards: bool | None
    scale_rewards: bool | str | None
    advantage_baseline: str | None
    q_temperature: float | None
    seed_grpo: SeedGrpo | bool | None
    on_failure: FailurePolicy | None


class _UpdateArguments(TypedDict):
    """The update_controller keyword arguments of one logging step."""

    global_step: int
    weight_entropy: float | None
    measured_kl: float | None
    max_weight_entropy: float | None
    request_id: str
    reporter_id: str
    lr_scale: float | None
    sample_count: float | None
    timeout: float | None


class MaxEntRewardFunction:
    """A TRL reward function scored by the MaxEnt service.

    ``client`` is a :class:`~maxent_client.MaxEntClient` or a target
    ("host:port"; the client is then opened on first use, so the object can be
    pickled and sent to a worker process, where the copy calls the service
    directly). ``rewards`` are the reward terms evaluated
    on the completions (see ``client.list_reward_functions()``). ``run_id`` (optional for
    ``"utilities"`` and ``"advantages"``, required for ``"weights"``) gives the
    q and scaling defaults and the weights' tau and beta.

    Groups are runs of consecutive completions of the same prompt, cut into
    chunks of ``num_generations`` when it is given (give it: two equal prompts
    in a row are otherwise one group); a run that ``num_generations`` does not
    divide is refused with a ValueError naming the run lengths. Each group's
    gold answer comes from the first of ``answer_columns`` that TRL passes
    (dataset columns), taken at the group's first completion; without one, no
    answers are sent, and a reward that needs them is a ValueError naming the
    columns searched.

    ``accelerator`` (an ``accelerate.Accelerator`` or ``PartialState``): in a
    multi-process job the main process then scores every rank's completions in
    one call and each rank gets its own values back (see
    :mod:`maxent_client.integrations.accelerate`); every rank must call the
    function, as TRL does. Without it each rank calls the service itself.
    """

    def __init__(
        self,
        client: MaxEntClient | str,
        *,
        rewards: Sequence[RewardTerm],
        run_id: str = "",
        output: str = "utilities",
        num_generations: int | None = None,
        answer_columns: Sequence[str] = DEFAULT_ANSWER_COLUMNS,
        send_token_counts: bool = True,
        max_completion_len: int | None = None,
        zero_truncated_completion_rewards: bool | None = None,
        scale_rewards: bool | str | None = None,
        advantage_baseline: str | None = None,
        q_temperature: float | None = None,
        seed_grpo: SeedGrpo | bool | None = None,
        on_failure: FailurePolicy | None = None,
        log_weight_entropy: bool | None = None,
        log_metrics: bool = True,
        name: str = "maxent",
        accelerator: Any = None,
        timeout: float | None = None,
        client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output == "weights" and not run_id:
            raise ValueError("output='weights' needs a run_id (the weights use the run's tau and beta)")
        if not rewards:
            raise ValueError("give at least one reward term")
        if num_generations is not None and num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        self.__name__ = name  # TRL names the reward's metrics after it
        self.rewards = list(rewards)
        self.run_id = run_id
        self.output = output
        self.num_generations = num_generations
        self.answer_columns = tuple(answer_columns)
        self.send_token_counts = send_token_counts
        self.log_weight_entropy = bool(run_id) if log_weight_entropy is None else log_weight_entropy
        if self.log_weight_entropy and not run_id:
            raise ValueError("log_weight_entropy needs a run_id")
        self.log_metrics = log_metrics
        self.timeout = timeout
        self.accelerator = accelerator
        self._options: _RewardOptions = {
            "max_completion_len": max_completion_len,
            "zero_truncated_completion_rewards": zero_truncated_completion_rewards,
            "scale_rewards": scale_rewards,
            "advantage_baseline": advantage_baseline,
            "q_temperature": q_temperature,
            "seed_grpo": seed_grpo,
            "on_failure": on_failure,
        }
        self._target = client if isinstance(client, str) else None
        self._client_kwargs = dict(client_kwargs or {})
        self._client: MaxEntClient | None = None if isinstance(client, str) else client
        self._main: MainProcessClient | None = None
        #: The last call's statistics (this rank's groups) and weight entropy.
        self.last_statistics: RewardStatistics | None = None
        self.last_weight_entropy: float | None = None
        self.calls = 0
        self._warned_empty: set[str] = set()

    # -- plumbing ------------------------------------------------------------------

    def _get_client(self) -> MaxEntClient:
        if self._client is None:
            assert self._target is not None  # only a client built from a target is ever unset
            self._client = MaxEntClient(self._target, **self._client_kwargs)
        return self._client

    def _service(self) -> MainProcessClient | None:
        """A MainProcessClient when an accelerator with several processes is set."""
        if self.accelerator is None or int(self.accelerator.num_processes) <= 1:
            return None
        if self._main is None:
            from .accelerate import MainProcessClient

            source = self._client if self._client is not None else self._get_client
            self._main = MainProcessClient(source, accelerator=self.accelerator)
        return self._main

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._target is not None:  # reopened on first use after unpickling
            state["_client"] = None
        # A pickled copy runs elsewhere (TRL's async rollout worker sends reward
        # functions to a spawned process): it calls the service itself, outside
        # any collective.
        state["_main"] = None
        state["accelerator"] = None
        return state

    def close(self) -> None:
        if self._target is not None and self._client is not None:
            self._client.close()
            self._client = None

    # -- the reward function -------------------------------------------------------

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        texts = [completion_text(c) for c in completions]
        sizes = group_sizes(prompts, self.num_generations)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int) if sizes else np.zeros(0, int)
        answers = self._answers(kwargs, starts)
        ids = kwargs.get("completion_ids")
        token_counts = [len(x) for x in ids] if self.send_token_counts and ids is not None and len(ids) == n else None

        service = self._service()
        try:
            if service is not None:
                stats = service.compute_reward_statistics_sharded(
                    completions=texts, group_sizes=sizes, answers=answers, token_counts=token_counts,
                    rewards=self.rewards, run_id=self.run_id, timeout=self.timeout, **self._options)
            else:
                stats = self._get_client().compute_reward_statistics(
                    completions=texts, group_sizes=sizes, answers=answers, token_counts=token_counts,
                    rewards=self.rewards, run_id=self.run_id, timeout=self.timeout, **self._options)
        except InvalidArgumentError as error:
            if answers is None and any(v.field == "answers" for v in error.violations):
                names = ", ".join(term.name for term in self.rewards)
                given = sorted(k for k in kwargs if k not in _TRL_KWARGS)
                raise ValueError(f"the rewards ({names}) need each group's gold answer, but none of answer_columns "
                                 f"{list(self.answer_columns)} was passed (dataset columns seen: {given}); add one "
                                 "of them to the dataset, or set answer_columns=[...]") from error
            raise
        self.calls += 1
        self.last_statistics = stats

        weights: WeightStats | None = None
        if self.output == "weights" or self.log_weight_entropy:
            if service is not None:
                weights = service.compute_weight_stats_sharded(
                    self.run_id, q_values=stats.q_values, group_sizes=stats.group_sizes,
                    include_reference_term=False, timeout=self.timeout)
            else:
                weights = self._get_client().compute_weight_stats(
                    self.run_id, q_values=stats.q_values, group_sizes=stats.group_sizes,
                    include_reference_term=False, timeout=self.timeout)
            self.last_weight_entropy = weights.weight_entropy

        log_metric = kwargs.get("log_metric")
        if self.log_metrics and callable(log_metric):
            self._log(log_metric, stats, weights)

        if self.output == "utilities":
            values = self._scored_utilities(stats)
        elif self.output == "advantages":
            values = stats.advantages
        else:
            assert weights is not None  # output="weights" always computes them
            values = weights.weights
        failed = stats.failed if len(stats.failed) == n else np.zeros(n, dtype=bool)
        # A completion whose every reward failed (excluded by the service) is
        # None: TRL then treats it as unscored rather than as reward 0.
        return [None if (bad and self._all_failed(stats, i)) or not math.isfinite(v) else float(v)
                for i, (v, bad) in enumerate(zip(values.tolist(), failed.tolist()))]

    def _scored_utilities(self, stats: RewardStatistics) -> np.ndarray:
        """The service's utilities. Where it left a completion out (NaN) but
        some of its rewards scored, the weighted sum of those, as TRL sums its
        reward functions; a completion no reward scored becomes None below."""
        values = np.array(stats.total_utils, dtype=np.float64)
        missing = np.isnan(values)
        if missing.any():
            partial = np.zeros_like(values)
            for term in self.rewards:
                scored = stats.per_reward.get(term.name)
                if scored is not None and len(scored.values) == len(values):
                    partial += term.weight * np.nan_to_num(scored.values, nan=0.0)
            values[missing] = partial[missing]
        return values

    def _all_failed(self, stats: RewardStatistics, i: int) -> bool:
        if self._options["on_failure"] not in (None, FailurePolicy.EXCLUDE):
            return False
        return all(bool(v.failed[i]) for v in stats.per_reward.values() if len(v.failed) > i)

    def _answers(self, kwargs: dict[str, Any], starts: np.ndarray) -> list[str] | None:
        for column in self.answer_columns:
            values = kwargs.get(column)
            if column in _TRL_KWARGS or values is None:
                continue
            answers = [None if values[s] is None else _as_text(values[s]) for s in starts.tolist()]
            if answers and all(a is None for a in answers) and column not in self._warned_empty:
                self._warned_empty.add(column)
                warnings.warn(f"the answer column {column!r} holds no answer (all None) in this batch: every reward "
                              f"that needs a gold answer fails for its completions; fill the column, or set "
                              f"answer_columns= to the one that holds the answers", stacklevel=3)
            return ["" if a is None else a for a in answers]
        return None

    def _log(self, log_metric: Callable[[str, float], None], stats: RewardStatistics,
             weights: WeightStats | None) -> None:
        prefix = "maxent/"
        log_metric(prefix + "reward_mean", float(stats.reward_mean))
        log_metric(prefix + "reward_std", float(stats.reward_std))
        for name, values in stats.per_reward.items():
            finite = values.values[np.isfinite(values.values)]
            if finite.size:
                log_metric(f"{prefix}{name}/mean", float(finite.mean()))
            log_metric(f"{prefix}{name}/failures", float(values.failure_count))
        if weights is not None:
            log_metric(prefix + "weight_entropy", float(weights.weight_entropy))
            # what the run's entropy_scope selects (NaN: no group in scope, nothing to send)
            scoped = weights.controller_weight_entropy
            log_metric(prefix + "controller_weight_entropy", math.nan if scoped is None else float(scoped))
            log_metric(prefix + "max_weight_entropy", float(weights.controller_max_weight_entropy))
            log_metric(prefix + "tau", float(weights.tau))
            log_metric(prefix + "beta", float(weights.beta))


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or a conversational list of
    messages (the assistant messages' contents, joined; all messages' when
    none is marked assistant)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant or messages
        if chosen or not completion:
            return "".join(_content_text(m.get("content")) for m in chosen)
    raise TypeError(f"cannot read a completion of type {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal parts: keep the text ones
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    return str(content)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _as_text(value[0])
    return str(value)


def _prompt_key(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    try:
        return json.dumps(prompt, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(prompt)


def group_sizes(prompts: Sequence[Any], num_generations: int | None = None) -> list[int]:
    """Group sizes of a TRL reward call: runs of consecutive equal prompts, cut
    into chunks of ``num_generations`` when given. A run whose length is not a
    multiple of ``num_generations`` is refused (a ValueError naming the run
    lengths): it would otherwise be cut into groups of the wrong size."""
    runs: list[int] = []
    previous: str | None = None
    for prompt in prompts:
        key = _prompt_key(prompt)
        if runs and key == previous:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = key
    if num_generations is None:
        return runs
    if any(run % num_generations for run in runs):
        raise ValueError(f"num_generations={num_generations} does not divide the runs of consecutive equal prompts "
                         f"in this call (run lengths {runs}); set num_generations to GRPOConfig.num_generations, "
                         "or leave it None to group by prompt")
    return [num_generations for run in runs for _ in range(run // num_generations)]


# -- the controller callback ---------------------------------------------------------


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class _ControllerCallbackMixin:
    """The logic of MaxEntControllerCallback, independent of transformers."""

    def __init__(
        self,
        client: MaxEntClient | str,
        run_id: str,
        *,
        kl_key: str = "kl",
        entropy_key: str = "maxent/weight_entropy",
        request_id_prefix: str | None = None,
        reporter_id: str | None = None,
        sample_count_key: str | None = None,
        lr_scale: float | Callable[[int], float] | None = None,
        send_without_measurements: bool = False,
        on_state: Callable[[ControllerState], None] | None = None,
        accelerator: Any = None,
        timeout: float | None = None,
        client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id
        self.kl_key = kl_key
        self.entropy_key = entropy_key
        self.request_id_prefix = request_id_prefix or f"trl-{uuid.uuid4().hex[:16]}"
        # who reports: one stable name per job, pooled with other jobs' reports on a run
        # with reporters_per_step > 1 (docs/integrations.md, "Several jobs, one run")
        self.reporter_id = reporter_id or self.request_id_prefix
        self.sample_count_key = sample_count_key
        # multiplies the run's tau_lr (and the meta learning rates) for each
        # update: a number, or a function of the global step (a schedule)
        self.lr_scale = lr_scale
        self.send_without_measurements = send_without_measurements
        self.on_state = on_state
        self.accelerator = accelerator
        self.timeout = timeout
        self._target = client if isinstance(client, str) else None
        self._client_kwargs = dict(client_kwargs or {})
        self._client: MaxEntClient | None = None if isinstance(client, str) else client
        self._main: MainProcessClient | None = None
        #: Every update this process sent or received, in order.
        self.updates: list[UpdateResult] = []

    @property
    def last_state(self) -> ControllerState | None:
        return self.updates[-1].state if self.updates else None

    def _get_client(self) -> MaxEntClient:
        if self._client is None:
            assert self._target is not None  # only a client built from a target is ever unset
            self._client = MaxEntClient(self._target, **self._client_kwargs)
        return self._client

    def measurements(self, logs: dict[str, Any] | None) -> tuple[float | None, float | None] | None:
        """(weight_entropy, measured_kl) to send for these logs, or None to send nothing."""
        if not logs or any(str(key).startswith("eval_") for key in logs):
            return None
        # the entropy the run's entropy_scope selects, when MaxEntRewardFunction logged it
        key = SCOPED_ENTROPY_KEY if SCOPED_ENTROPY_KEY in logs else self.entropy_key
        entropy, kl = _finite(logs.get(key)), _finite(logs.get(self.kl_key))
        if entropy is None and kl is None and not self.send_without_measurements:
            return None
        return entropy, kl

    def _lr_scale(self, step: int) -> float | None:
        if self.lr_scale is None:
            return None
        return float(self.lr_scale(step) if callable(self.lr_scale) else self.lr_scale)

    def _sample_count(self, logs: dict[str, Any]) -> float | None:
        if self.sample_count_key is None:
            return None
        count = _finite(logs.get(self.sample_count_key))
        return count if count is not None and count > 0 else None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        measured = self.measurements(logs)
        if measured is None or logs is None:
            return control
        entropy, kl = measured
        step = int(state.global_step)
        update_args: _UpdateArguments = {
            "global_step": step, "weight_entropy": entropy, "measured_kl": kl,
            "max_weight_entropy": _finite(logs.get("maxent/max_weight_entropy")),
            # one id per job and step: a repeated log of a step is a replay, not a second update
            "request_id": f"{self.request_id_prefix}:{step}", "reporter_id": self.reporter_id,
            "lr_scale": self._lr_scale(step), "sample_count": self._sample_count(logs), "timeout": self.timeout,
        }
        if self.accelerator is not None and int(self.accelerator.num_processes) > 1:
            if self._main is None:
                from .accelerate import MainProcessClient

                self._main = MainProcessClient(self._client if self._client is not None else self._get_client,
                                               accelerator=self.accelerator)
            result = self._main.update_controller(self.run_id, **update_args)
        elif getattr(state, "is_world_process_zero", True):
            result = self._get_client().update_controller(self.run_id, **update_args)
        else:
            return control
        self.updates.append(result)
        if self.on_state is not None:
            self.on_state(result.state)
        return control


_CALLBACK_CLASS: type | None = None


def _callback_class() -> type:
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        from transformers import TrainerCallback

        class MaxEntControllerCallback(_ControllerCallbackMixin, TrainerCallback):
            """A ``transformers.TrainerCallback`` that sends UpdateController after
            each logging step, with the weight entropy (``logs[entropy_key]``,
            logged by :class:`MaxEntRewardFunction` when it has a run_id) and the KL
            (``logs[kl_key]``; TRL logs ``kl`` when ``GRPOConfig.beta`` > 0) that
            the trainer logged. Logs with neither are skipped (unless
            ``send_without_measurements``), and so are evaluation logs.

            Only the world's main process sends. With ``accelerator`` every rank
            receives the new state (every rank then calls on_log, as the
            Trainer does). ``on_state(state)`` is called with each new state, e.g.
            ``on_state=lambda s: setattr(trainer, "beta", s.beta)`` to let the
            run's KL controller steer TRL's KL coefficient.

            ``lr_scale`` (a number, or a function of the global step) is sent
            with each update: it multiplies the run's tau_lr on the log-tau
            step, and the meta controller's learning rates.

            Each update's request id is ``f"{request_id_prefix}:{global_step}"``
            (prefix random per callback unless given): give a fixed prefix to a
            job that resumes from a checkpoint so that a step it logs again is a
            replay rather than a second update.

            Each update names its reporter, ``reporter_id`` (default: the
            request id prefix): several jobs on one run with
            ``reporters_per_step`` = their number have their reports pooled into
            one controller step. ``sample_count_key`` names the log entry holding
            the samples behind the step's measurements (the pooling weight;
            default 1 each).
            """

        MaxEntControllerCallback.__module__ = __name__
        MaxEntControllerCallback.__qualname__ = "MaxEntControllerCallback"
        _CALLBACK_CLASS = MaxEntControllerCallback
        globals()["MaxEntControllerCallback"] = MaxEntControllerCallback
    return _CALLBACK_CLASS


def __getattr__(name: str) -> Any:
    if name == "MaxEntControllerCallback":
        return _callback_class()
    if name == "MaxEntGRPOTrainer":  # imports trl; see maxent_client.integrations.trl_trainer
        from .trl_trainer import MaxEntGRPOTrainer

        globals()[name] = MaxEntGRPOTrainer
        return MaxEntGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
