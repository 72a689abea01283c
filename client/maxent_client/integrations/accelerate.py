"""Multi-process jobs: only the main process calls the service.

In an ``accelerate launch`` job every rank runs the same training loop. With
:class:`MainProcessClient` the main process alone holds a channel to the
service; every call is made there and its result (weights, controller state,
or the error) reaches every rank through Accelerate's collectives, so all
ranks train with the same tau, beta and weights::

    from accelerate import Accelerator
    from maxent_client.integrations.accelerate import MainProcessClient

    accelerator = Accelerator()
    service = MainProcessClient("127.0.0.1:50051", accelerator=accelerator)
    service.create_run("exp-1", config)                     # once, on the main process
    ...
    # each rank passes its own groups; the main process scores the whole
    # gathered batch in one call and each rank gets back its own slice
    stats = service.compute_reward_statistics_sharded(completions=my_groups, answers=my_answers,
                                                      rewards=terms, run_id="exp-1")
    weights = service.compute_weight_stats_sharded("exp-1", q_values=stats.q_values,
                                                   group_sizes=stats.group_sizes, ref_logp_sum=..., ...)
    state = service.update_controller("exp-1", global_step=step,
                                      weight_entropy=weights.weight_entropy).state   # same on every rank

Every rank must make the same calls in the same order (they are collective
operations). The plain methods (``create_run``, ``compute_weight_stats``, ...)
use the main process's arguments and give every rank the same result; the
``*_sharded`` methods gather each rank's groups first, and batch-wide
numbers (reward mean and std, weight entropy mean/min/max, failure counts)
then describe the whole gathered batch.

A single-process run (no ``accelerate launch``) calls the service directly.
accelerate and torch are imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from .. import _convert as cv
from .._messages import group_sizes_for
from ..client import MaxEntClient
from ..models import RewardStatistics, WeightStats

T = TypeVar("T")
P = ParamSpec("P")

# Per-completion and per-group inputs of each sharded call.
_REWARD_PER_COMPLETION = {"utilities": np.float64, "token_counts": np.int64, "truncated": np.bool_,
                          "gen_logp_sum": np.float64}
_WEIGHT_PER_COMPLETION = {"q_values": np.float64, "ref_logp_sum": np.float64, "ref_token_counts": np.int64,
                          "advantages": np.float64}


def _replicated(method: Callable[Concatenate[MaxEntClient, P], T]) -> Callable[Concatenate[MainProcessClient, P], T]:
    """A MainProcessClient method that makes the client's `method` call on the
    main process (with the main process's arguments) and returns its result,
    or raises its error, on every rank. Collective: every rank must call it."""

    name = method.__name__

    @functools.wraps(method)
    def replicated(self: MainProcessClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        def send(client: MaxEntClient) -> T:
            # looked up on the instance, so that a wrapper set on the client applies
            bound: Callable[P, T] = getattr(client, name)
            return bound(*args, **kwargs)

        return self.call(send)

    replicated.__qualname__ = f"MainProcessClient.{name}"
    return replicated


class MainProcessClient:
    """A MaxEnt client whose calls run on the main process only.

    ``client`` is a target ("host:port"), a zero-argument factory returning a
    :class:`~maxent_client.MaxEntClient`, or a client; with a target or a
    factory the channel is opened on the main process only, at its first call
    (``client_kwargs`` go to ``MaxEntClient``). ``accelerator`` is an
    ``accelerate.Accelerator`` or ``PartialState``; default ``PartialState()``.
    """

    def __init__(self, client: MaxEntClient | str | Callable[[], MaxEntClient], *, accelerator: Any = None,
                 **client_kwargs: Any) -> None:
        self._source = client
        self._client_kwargs = client_kwargs
        self._client: MaxEntClient | None = client if isinstance(client, MaxEntClient) else None
        self._state = accelerator

    # -- process topology ------------------------------------------------------

    @property
    def state(self) -> Any:
        if self._state is None:
            from accelerate import PartialState

            self._state = PartialState()
        return self._state

    @property
    def is_main_process(self) -> bool:
        return bool(self.state.is_main_process)

    @property
    def num_processes(self) -> int:
        return int(self.state.num_processes)

    @property
    def process_index(self) -> int:
        return int(self.state.process_index)

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def client(self) -> MaxEntClient:
        """The underlying client; exists on the main process only."""
        if self.distributed and not self.is_main_process:
            raise RuntimeError("only the main process talks to the service; use this object's methods")
        if self._client is None:
            source = self._source
            if isinstance(source, str):
                self._client = MaxEntClient(source, **self._client_kwargs)
            elif isinstance(source, MaxEntClient):
                self._client = source
            else:
                self._client = source()
        return self._client

    @property
    def has_channel(self) -> bool:
        """Whether this process opened (or was given) a client."""
        return self._client is not None

    def close(self) -> None:
        if self._client is not None and not isinstance(self._source, MaxEntClient):
            self._client.close()
            self._client = None

    def __enter__(self) -> "MainProcessClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the collective primitive ------------------------------------------------

    def call(self, fn: Callable[[MaxEntClient], T]) -> T:
        """Run ``fn(client)`` on the main process; every rank returns its result,
        or raises its error. Collective: every rank must call it."""
        if not self.distributed:
            return fn(self.client)
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.is_main_process:
            try:
                box[0] = ("ok", fn(self.client))
            except Exception as error:  # every rank must learn of it, or they would wait forever
                box[0] = ("error", _portable(error))
        broadcast_object_list(box, from_process=0)
        kind, value = box[0]
        if kind == "error":
            raise _rebuild(value)
        return value

    # -- replicated calls: the main process's arguments, the same result everywhere --
    #
    # Each takes exactly the arguments of the MaxEntClient method of its name.

    create_run = _replicated(MaxEntClient.create_run)
    get_run = _replicated(MaxEntClient.get_run)
    list_reward_functions = _replicated(MaxEntClient.list_reward_functions)
    compute_reward_statistics = _replicated(MaxEntClient.compute_reward_statistics)
    compute_weight_stats = _replicated(MaxEntClient.compute_weight_stats)
    compute_step_statistics = _replicated(MaxEntClient.compute_step_statistics)
    update_controller = _replicated(MaxEntClient.update_controller)

    # -- sharded calls: each rank's own groups, one call for the gathered batch --

    def compute_reward_statistics_sharded(
        self, *, utilities: Any = None, completions: Any = None, answers: Any = None, group_sizes: Any = None,
        token_counts: Any = None, truncated: Any = None, gen_logp_sum: Any = None, **options: Any,
    ) -> RewardStatistics:
        """compute_reward_statistics over the groups of every rank; returns this
        rank's groups. Per-completion inputs are flat with ``group_sizes`` or
        nested per group, as for the client; ``answers`` has one entry per group.
        The other keyword arguments (``rewards``, ``run_id``, options) are the
        main process's."""
        def prepare() -> dict[str, Any]:
            primary = utilities if utilities is not None else completions
            local: dict[str, Any] = {"group_sizes": group_sizes_for(group_sizes, primary)}
            given = {"utilities": utilities, "token_counts": token_counts, "truncated": truncated,
                     "gen_logp_sum": gen_logp_sum}
            for name, dtype in _REWARD_PER_COMPLETION.items():
                local[name] = None if given[name] is None else cv.flat(given[name], dtype)
            local["completions"] = None if completions is None else cv.strings(completions)
            local["answers"] = None if answers is None else [str(a) for a in answers]
            return local

        if not self.distributed:
            return self.client.compute_reward_statistics(**_drop_none(prepare()), **options)
        shards = _gather(prepare)

        def run(client: MaxEntClient) -> RewardStatistics:
            merged = _merge(shards, per_completion=[*_REWARD_PER_COMPLETION, "completions"], per_group=["answers"])
            return client.compute_reward_statistics(**merged, **options)

        return _slice_rewards(self.call(run), *_span(shards, self.process_index))

    def compute_weight_stats_sharded(
        self, run_id: str, *, q_values: Any = None, ref_logp_sum: Any = None, ref_token_counts: Any = None,
        group_sizes: Any = None, advantages: Any = None, **options: Any,
    ) -> WeightStats:
        """compute_weight_stats over the groups of every rank (one call, the
        run's tau and beta at one version); returns this rank's groups, with the
        entropy summary of the whole batch."""
        def prepare() -> dict[str, Any]:
            local: dict[str, Any] = {"group_sizes": group_sizes_for(group_sizes, q_values if q_values is not None else advantages)}
            given = {"q_values": q_values, "ref_logp_sum": ref_logp_sum, "ref_token_counts": ref_token_counts,
                     "advantages": advantages}
            for name, dtype in _WEIGHT_PER_COMPLETION.items():
                local[name] = None if given[name] is None else cv.flat(given[name], dtype)
            return local

        if not self.distributed:
            return self.client.compute_weight_stats(run_id, **_drop_none(prepare()), **options)
        shards = _gather(prepare)

        def run(client: MaxEntClient) -> WeightStats:
            merged = _merge(shards, per_completion=list(_WEIGHT_PER_COMPLETION), per_group=[])
            return client.compute_weight_stats(run_id, **merged, **options)

        return _slice_weights(self.call(run), *_span(shards, self.process_index))


# -- helpers ----------------------------------------------------------------------


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _gather(prepare: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's inputs, in rank order, on every rank. A rank whose inputs
    are malformed still takes part, so that every rank raises rather than some
    waiting forever for it."""
    from accelerate.utils import gather_object

    try:
        local = prepare()
    except (TypeError, ValueError) as error:
        local = {"error": f"{type(error).__name__}: {error}"}
    shards = list(gather_object([local]))
    bad = [(rank, s["error"]) for rank, s in enumerate(shards) if "error" in s]
    if bad:
        raise ValueError("malformed inputs on " + "; ".join(f"rank {rank}: {message}" for rank, message in bad))
    return shards


def _merge(shards: list[dict[str, Any]], *, per_completion: list[str], per_group: list[str]) -> dict[str, Any]:
    """One request's inputs from every rank's shard (on the main process)."""
    merged: dict[str, Any] = {"group_sizes": np.concatenate([s["group_sizes"] for s in shards])}
    for name in [*per_completion, *per_group]:
        present = [s[name] is not None for s in shards]
        if not any(present):
            continue
        if not all(present):
            missing = [i for i, p in enumerate(present) if not p]
            raise ValueError(f"{name} was given on some ranks but not on ranks {missing}")
        if isinstance(shards[0][name], np.ndarray):
            merged[name] = np.concatenate([s[name] for s in shards])
        else:
            merged[name] = [x for s in shards for x in s[name]]
    return merged


def _span(shards: list[dict[str, Any]], rank: int) -> tuple[int, int, int, int]:
    """This rank's group range and completion range in the gathered batch."""
    groups_before = sum(len(s["group_sizes"]) for s in shards[:rank])
    completions_before = sum(int(np.sum(s["group_sizes"])) for s in shards[:rank])
    mine = shards[rank]["group_sizes"]
    return (groups_before, groups_before + len(mine), completions_before, completions_before + int(np.sum(mine)))


def _slice_groups(array: np.ndarray, g0: int, g1: int) -> np.ndarray:
    return array[g0:g1] if len(array) else array


def _slice_rewards(stats: RewardStatistics, g0: int, g1: int, c0: int, c1: int) -> RewardStatistics:
    return dataclasses.replace(
        stats,
        group_sizes=stats.group_sizes[g0:g1],
        total_utils=stats.total_utils[c0:c1],
        advantages=stats.advantages[c0:c1],
        q_values=stats.q_values[c0:c1],
        failed=stats.failed[c0:c1] if len(stats.failed) else stats.failed,
        per_reward={
            name: dataclasses.replace(values, values=values.values[c0:c1], failed=values.failed[c0:c1])
            for name, values in stats.per_reward.items()
        },
        seed_semantic_entropies=_slice_groups(stats.seed_semantic_entropies, g0, g1),
        seed_advantage_scales=_slice_groups(stats.seed_advantage_scales, g0, g1),
    )


def _slice_weights(stats: WeightStats, g0: int, g1: int, c0: int, c1: int) -> WeightStats:
    return dataclasses.replace(
        stats,
        group_sizes=stats.group_sizes[g0:g1],
        weights=stats.weights[c0:c1],
        advantage_entropy=stats.advantage_entropy[c0:c1],
        group_weight_entropies=_slice_groups(stats.group_weight_entropies, g0, g1),
    )


# ("pickled", the error) or ("text", its description)
_Portable = tuple[str, Any]


def _portable(error: Exception) -> _Portable:
    """An error in a form every rank can unpickle and raise again: the error
    itself when it survives pickling (a MaxEntError does, with its code,
    violations, failures, resource and raw status), else its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return ("pickled", error)
    except Exception:
        return ("text", f"{type(error).__name__}: {error}")


def _rebuild(portable: _Portable) -> Exception:
    kind, value = portable
    if kind == "pickled":
        return value
    return RuntimeError(f"the main process's call to the service failed: {value}")
