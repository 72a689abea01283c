"""Generation batches ready for ComputeRewardStatistics.

A trainer asks its sampler for ``expected_generations`` completions per
prompt. Samplers sometimes return nothing for a prompt (a timeout, a failed
request to an inference server) or a different number of completions.
:func:`prepare_generation_batch` turns whatever came back into whole groups:

1. it calls ``generate(prompts, expected_generations)`` once for the batch;
2. prompts that came back short are asked again, only those and only for
   what they miss (all ``expected_generations`` for an empty one, the
   missing few for a partial group, which keeps what it had: a "top-up"),
   for at most ``max_retry_rounds`` more rounds;
3. groups longer than ``expected_generations`` are cut to that length;
4. groups still shorter (empty ones included) are dropped, and the report
   says which prompt was dropped and why.

The result feeds the service directly::

    batch = prepare_generation_batch(prompts, generate, expected_generations=8, answers=answers)
    stats = client.compute_reward_statistics(**batch.reward_statistics_kwargs(),
                                             rewards=[RewardTerm("math_accuracy")])

``generate`` returns one completion group per prompt (a list of strings),
or a pair ``(groups, metadata)`` where ``metadata`` maps a name to per-group
lists aligned with the completions. The names ``token_counts``,
``truncated`` and ``gen_logp_sum`` are passed on to ComputeRewardStatistics;
any other name is kept in :attr:`GenerationBatch.metadata` for the caller.

Only the standard library is needed here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Metadata names that ComputeRewardStatistics takes per completion.
REQUEST_METADATA = ("token_counts", "truncated", "gen_logp_sum")

#: Retry rounds after the first call when none is given.
DEFAULT_MAX_RETRY_ROUNDS = 3

#: ``generate(prompts, num_generations)`` -> groups, or (groups, metadata).
GenerateFn = Callable[[list[str], int], Any]

#: Why a prompt was dropped.
DROPPED_EMPTY = "empty"  # no completions even after every retry round
DROPPED_INCOMPLETE = "incomplete"  # some completions, fewer than expected


@dataclass(frozen=True)
class DroppedPrompt:
    """A prompt left out of the batch."""

    index: int  # position in the prompts given to prepare_generation_batch
    prompt: str
    received: int  # completions it had when it was dropped
    reason: str  # DROPPED_EMPTY or DROPPED_INCOMPLETE


@dataclass(frozen=True)
class GenerationReport:
    """What prepare_generation_batch did to get whole groups."""

    requested_prompts: int
    kept_prompts: int
    expected_generations: int
    retry_rounds: int  # retry rounds actually run (0 when nothing came back empty)
    retried_prompts: int  # prompts asked again, counted once per round
    recovered_prompts: int  # prompts empty at first that got completions on a retry
    truncated_groups: int  # groups cut to expected_generations
    truncated_completions: int  # completions cut off those groups
    dropped: tuple[DroppedPrompt, ...] = ()
    topped_up_prompts: int = 0  # partial groups that retries made whole
    topped_up_completions: int = 0  # completions added to partial groups

    @property
    def dropped_prompts(self) -> int:
        return len(self.dropped)

    def as_stats(self) -> dict[str, int]:
        """Counters for a trainer's log (the keys :func:`prepare_generation_batch`
        adds to its ``stats`` dict)."""
        return {
            "generation_retry_rounds": self.retry_rounds,
            "generation_retried_prompts": self.retried_prompts,
            "generation_recovered_prompts": self.recovered_prompts,
            "generation_truncated_groups": self.truncated_groups,
            "generation_truncated_completions": self.truncated_completions,
            "generation_topped_up_prompts": self.topped_up_prompts,
            "generation_topped_up_completions": self.topped_up_completions,
            "generation_dropped_prompts": len(self.dropped),
            "generation_dropped_empty": sum(d.reason == DROPPED_EMPTY for d in self.dropped),
            "generation_dropped_incomplete": sum(d.reason == DROPPED_INCOMPLETE for d in self.dropped),
        }


@dataclass(frozen=True)
class GenerationBatch:
    """Whole groups of exactly ``expected_generations`` completions each.

    ``prompts``, ``answers`` (None when none were given), ``completions`` and
    each ``metadata`` entry are aligned per kept prompt, in input order;
    ``indices`` gives each kept prompt's position in the input.
    """

    prompts: list[str]
    answers: list[str] | None
    completions: list[list[str]]
    metadata: dict[str, list[list[Any]]]
    indices: list[int]
    report: GenerationReport
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def group_sizes(self) -> list[int]:
        return [len(group) for group in self.completions]

    @property
    def flat_completions(self) -> list[str]:
        return [text for group in self.completions for text in group]

    def flat(self, name: str) -> list[Any]:
        """One metadata entry flattened in group order."""
        return [value for group in self.metadata[name] for value in group]

    def reward_statistics_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``MaxEntClient.compute_reward_statistics``:
        flat completions, group sizes, answers (when given) and the per-completion
        metadata the service takes. Add ``rewards=[...]`` and any options."""
        kwargs: dict[str, Any] = {"completions": self.flat_completions, "group_sizes": self.group_sizes}
        if self.answers is not None:
            kwargs["answers"] = list(self.answers)
        for name in REQUEST_METADATA:
            if name in self.metadata:
                kwargs[name] = self.flat(name)
        return kwargs


def prepare_generation_batch(
    prompts: Sequence[str] | Mapping[str, Sequence[Any]],
    generate: GenerateFn,
    *,
    expected_generations: int,
    answers: Sequence[Any] | None = None,
    max_retry_rounds: int | None = None,
    stats: dict[str, int] | None = None,
) -> GenerationBatch:
    """Generate completions, retry prompts that got none, keep whole groups.

    ``prompts`` is a list of prompt strings, or a mapping with a ``prompt``
    list and optionally an ``answer`` list (a trainer's mini-batch); any other
    per-prompt lists in the mapping are kept, filtered to the kept prompts, in
    :attr:`GenerationBatch.extra`. ``max_retry_rounds`` bounds the rounds after
    the first call (default :data:`DEFAULT_MAX_RETRY_ROUNDS`; 0 disables
    retries). When ``stats`` is given, the report's counters are added to it in
    place (see :meth:`GenerationReport.as_stats`).

    Raises ValueError when ``generate`` returns a different number of groups
    than prompts it was given, or metadata not aligned with the completions.
    """
    prompt_list, answer_list, extra = _split_batch(prompts, answers)
    if expected_generations < 1:
        raise ValueError(f"expected_generations must be >= 1, got {expected_generations}")
    rounds_left = DEFAULT_MAX_RETRY_ROUNDS if max_retry_rounds is None else max_retry_rounds
    if rounds_left < 0:
        raise ValueError(f"max_retry_rounds must be >= 0, got {max_retry_rounds}")

    n = len(prompt_list)
    groups: list[list[str]] = [[] for _ in range(n)]
    metadata: dict[str, list[list[Any]]] = {}

    def ask(positions: list[int], k: int) -> None:
        """k more completions for each of these prompts, added to what they have."""
        got, meta = _call(generate, [prompt_list[i] for i in positions], k)
        for name in meta:
            metadata.setdefault(name, [[] for _ in range(n)])
        for j, i in enumerate(positions):
            groups[i] = groups[i] + got[j]
            for name, values in metadata.items():
                # A name missing from this round's metadata leaves these
                # completions without values: the group and its values no
                # longer line up, and the name is left out of the batch.
                if name in meta:
                    values[i] = values[i] + meta[name][j]

    ask(list(range(n)), expected_generations)
    first_sizes = [len(group) for group in groups]
    retry_rounds = retried = 0
    pending = [i for i in range(n) if first_sizes[i] < expected_generations]
    while pending and retry_rounds < rounds_left:
        retry_rounds += 1
        retried += len(pending)
        by_missing: dict[int, list[int]] = {}
        for i in pending:
            by_missing.setdefault(expected_generations - len(groups[i]), []).append(i)
        for missing, positions in sorted(by_missing.items(), reverse=True):
            ask(positions, missing)
        pending = [i for i in pending if len(groups[i]) < expected_generations]
    recovered = sum(1 for i in range(n) if first_sizes[i] == 0 and groups[i])
    partial = [i for i in range(n) if 0 < first_sizes[i] < expected_generations]
    topped_up = sum(1 for i in partial if len(groups[i]) >= expected_generations)
    added = sum(min(len(groups[i]), expected_generations) - first_sizes[i] for i in partial)

    kept: list[int] = []
    dropped: list[DroppedPrompt] = []
    truncated_groups = truncated_completions = 0
    for i in range(n):
        size = len(groups[i])
        if size < expected_generations:
            reason = DROPPED_EMPTY if size == 0 else DROPPED_INCOMPLETE
            dropped.append(DroppedPrompt(i, prompt_list[i], size, reason))
            continue
        if size > expected_generations:
            truncated_groups += 1
            truncated_completions += size - expected_generations
        kept.append(i)

    # Metadata names that every kept group carries; a name some kept group lacks
    # is left out rather than sent misaligned.
    complete_names = [name for name, values in metadata.items()
                      if all(len(values[i]) == len(groups[i]) for i in kept)]
    for name in sorted(set(metadata) - set(complete_names)):
        log.warning("generation metadata %r is missing for some prompts; left out of the batch", name)

    report = GenerationReport(
        requested_prompts=n,
        kept_prompts=len(kept),
        expected_generations=expected_generations,
        retry_rounds=retry_rounds,
        retried_prompts=retried,
        recovered_prompts=recovered,
        truncated_groups=truncated_groups,
        truncated_completions=truncated_completions,
        dropped=tuple(dropped),
        topped_up_prompts=topped_up,
        topped_up_completions=added,
    )
    if dropped:
        log.warning(
            "dropped %d of %d prompts without %d completions (%d empty after %d retry rounds, %d incomplete)",
            len(dropped), n, expected_generations, sum(d.reason == DROPPED_EMPTY for d in dropped), retry_rounds,
            sum(d.reason == DROPPED_INCOMPLETE for d in dropped),
        )
    if stats is not None:
        for key, value in report.as_stats().items():
            stats[key] = stats.get(key, 0) + value

    k = expected_generations
    return GenerationBatch(
        prompts=[prompt_list[i] for i in kept],
        answers=None if answer_list is None else [answer_list[i] for i in kept],
        completions=[groups[i][:k] for i in kept],
        metadata={name: [metadata[name][i][:k] for i in kept] for name in complete_names},
        indices=kept,
        report=report,
        extra={name: [values[i] for i in kept] for name, values in extra.items()},
    )


def _split_batch(
    prompts: Sequence[str] | Mapping[str, Sequence[Any]], answers: Sequence[Any] | None
) -> tuple[list[str], list[str] | None, dict[str, list[Any]]]:
    extra: dict[str, list[Any]] = {}
    if isinstance(prompts, Mapping):
        columns = dict(prompts)
        if "prompt" not in columns:
            raise ValueError("a batch mapping needs a 'prompt' list")
        prompt_values = columns.pop("prompt")
        if answers is None and "answer" in columns:
            answers = columns.pop("answer")
        extra = {name: list(values) for name, values in columns.items()}
    else:
        prompt_values = prompts
    if isinstance(prompt_values, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompt_list = [str(p) for p in prompt_values]
    answer_list = None if answers is None else ["" if a is None else str(a) for a in answers]
    if answer_list is not None and len(answer_list) != len(prompt_list):
        raise ValueError(f"{len(answer_list)} answers for {len(prompt_list)} prompts")
    for name, values in extra.items():
        if len(values) != len(prompt_list):
            raise ValueError(f"batch column {name!r} has {len(values)} entries for {len(prompt_list)} prompts")
    return prompt_list, answer_list, extra


def _call(generate: GenerateFn, prompts: list[str], k: int) -> tuple[list[list[str]], dict[str, list[list[Any]]]]:
    """Call generate and check the shape of what it returned."""
    result = generate(prompts, k)
    metadata: Mapping[str, Any] = {}
    if isinstance(result, tuple) and len(result) == 2 and (result[1] is None or isinstance(result[1], Mapping)):
        result, metadata = result[0], result[1] or {}
    groups = list(result) if result is not None else []
    if len(groups) != len(prompts):
        raise ValueError(f"generate returned {len(groups)} completion groups for {len(prompts)} prompts")
    clean: list[list[str]] = []
    for j, group in enumerate(groups):
        if group is None:
            clean.append([])
        elif isinstance(group, (str, bytes)):
            raise TypeError(f"generate returned a string for prompt {j}, expected a list of completions")
        else:
            clean.append([str(text) for text in group])
    meta: dict[str, list[list[Any]]] = {}
    for name, values in metadata.items():
        values = list(values)
        if len(values) != len(prompts):
            raise ValueError(f"metadata {name!r} has {len(values)} groups for {len(prompts)} prompts")
        per_group = [[] if v is None else list(v) for v in values]
        for j, (group, v) in enumerate(zip(clean, per_group)):
            if len(v) != len(group):
                raise ValueError(
                    f"metadata {name!r} has {len(v)} values for the {len(group)} completions of prompt {j}"
                )
        meta[name] = per_group
    return clean, meta
