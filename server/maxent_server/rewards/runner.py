"""RewardRunner: validates reward terms and evaluates them over a batch.

Where each reward runs:

* ``format``, ``length``, ``boxed_accuracy``, ``missing_boxed_penalty``: in
  the calling thread (linear time). The answer extraction they share runs in
  the worker pool, under the time limit, for completions whose extraction
  could be slow (:func:`.builtin.extraction_cost`).
* ``math_accuracy`` and every plugin: in the worker pool (:mod:`.pool`), one
  item per distinct piece of work, with the per-completion time limit.

Work done once per call: each distinct completion text is extracted once;
identical (final answer, gold, params) for ``math_accuracy`` and identical
(completion, answer, params) for a plugin are evaluated once and the value is
shared. Each worker parses a distinct gold answer once and caches it.

Failures are explicit: a value that raised, timed out or whose worker died is
NaN with ``failed`` set (and ``timed_out`` for timeouts), and
:attr:`Evaluation.errors` says why, without completion text.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from . import builtin
from ._worker import ITEM_EXTRACT, ITEM_MATH, ITEM_PLUGIN
from .params import param_field
from .pool import ItemResult, WorkerPool
from .registry import KIND_PLUGIN, RewardRegistry, RewardSpec

#: At most this many failure descriptions, then one line with the rest counted.
MAX_ERRORS = 50

_FEATURE_TERMS = frozenset({builtin.MATH_ACCURACY, builtin.BOXED_ACCURACY, builtin.MISSING_BOXED_PENALTY})


class RewardBackend(Protocol):
    """What runs work items of :mod:`._worker`: the local pool or a cluster."""

    def run(self, items: Sequence[tuple[Any, ...]], cancelled: threading.Event | None = None) -> list[ItemResult]: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RewardTerm:
    """One reward term of a request: a function name, its weight and params (as text)."""

    name: str
    weight: float = 1.0
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardParameter:
    name: str
    description: str
    default_value: str  # "" when required or when there is no static default
    required: bool


@dataclass(frozen=True)
class RewardFunction:
    name: str
    description: str
    parameters: list[RewardParameter]
    source: str  # "builtin" or the plugin's distribution name


@dataclass(frozen=True)
class Evaluation:
    """Raw (unweighted) values of R terms over N completions."""

    values: np.ndarray  # [R, N] float64, NaN where failed
    failed: np.ndarray  # [R, N] bool
    timed_out: np.ndarray  # [R, N] bool, a subset of failed
    errors: list[str]  # short failure descriptions (no completion text)


class _Failures:
    def __init__(self, failed: np.ndarray, timed_out: np.ndarray) -> None:
        self.failed = failed
        self.timed_out = timed_out
        self.errors: list[str] = []
        self.count = 0

    def add(self, r: int, i: int, name: str, status: str, message: str) -> None:
        self.failed[r, i] = True
        if status == "timeout":
            self.timed_out[r, i] = True
        self.count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"rewards[{r}] '{name}', completion {i}: {message}")

    def summary(self) -> list[str]:
        extra = self.count - len(self.errors)
        return self.errors + ([f"... and {extra} more failures"] if extra > 0 else [])


class RewardRunner:
    """Evaluates reward terms; thread-safe. See the module docstring."""

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout_seconds: float = 5.0,
        load_plugins: bool = True,
        registry: RewardRegistry | None = None,
        prestart: bool = True,
        backend: Callable[[float, list[tuple[str, str]]], RewardBackend] | None = None,
    ) -> None:
        """``workers``: worker processes (default: the CPU count). ``timeout_seconds``:
        time limit per completion and reward. ``load_plugins``: load the
        ``maxent.rewards`` entry points. ``prestart``: start the workers now (in the
        background) rather than on the first evaluation that needs them. ``backend``:
        makes what runs the work items from (timeout_seconds, plugins), e.g. a
        :class:`.ray_backend.RayBackend`; default: a local :class:`.pool.WorkerPool`."""
        if workers is None:
            workers = os.cpu_count() or 1
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if not timeout_seconds > 0:
            raise ValueError("timeout_seconds must be > 0")
        self.timeout_seconds = float(timeout_seconds)
        self.registry = registry if registry is not None else RewardRegistry.default(load_plugins=load_plugins)
        plugins = [(spec.name, spec.entry_point) for spec in self.registry.plugins()]
        if backend is not None:
            self._pool: RewardBackend = backend(self.timeout_seconds, plugins)
        else:
            self._pool = WorkerPool(workers, self.timeout_seconds, plugins, prestart=prestart)
        self._closed = False
        self._close_lock = threading.Lock()

    # -- description and validation ---------------------------------------------

    def list_functions(self) -> list[RewardFunction]:
        """Every reward function, sorted by name."""
        return [
            RewardFunction(
                name=spec.name,
                description=spec.description,
                parameters=[
                    RewardParameter(p.name, p.description, p.default if p.default is not None else "", p.required)
                    for p in spec.parameters
                ],
                source=spec.source,
            )
            for spec in self.registry.specs()
        ]

    def validate(
        self,
        terms: Sequence[Any],
        *,
        token_counts_given: bool | None = None,
        max_completion_len: int | None = None,
    ) -> list[tuple[str, str]]:
        """Field violations of ``terms``; [] when they are fine.

        Checks names and params. With ``token_counts_given`` set (True/False:
        whether the request carries token_counts), it also checks what the
        request must carry for the terms: ``length`` needs token_counts and a
        max length (its ``max_len`` param, else ``max_completion_len``).
        """
        return self._resolve(terms, token_counts_given, max_completion_len)[1]

    def needs_answers(self, terms: Sequence[Any]) -> bool:
        """Whether any known term reads the gold answers."""
        for term in terms:
            spec = self.registry.get(term.name)
            if spec is not None and spec.needs_answers:
                return True
        return False

    def _resolve(
        self, terms: Sequence[Any], token_counts_given: bool | None, max_completion_len: int | None
    ) -> tuple[list[tuple[RewardSpec, dict[str, Any]]], list[tuple[str, str]]]:
        resolved: list[tuple[RewardSpec, dict[str, Any]]] = []
        problems: list[tuple[str, str]] = []
        for index, term in enumerate(terms):
            spec, values, term_problems = self.registry.validate_term(index, term.name, term.params)
            problems += term_problems
            if spec is None:
                continue
            resolved.append((spec, values))
            if spec.name == builtin.LENGTH and token_counts_given is not None and not term_problems:
                if not token_counts_given:
                    problems.append(("token_counts", f"required by reward 'length' (rewards[{index}])"))
                if "max_len" not in values and max_completion_len is None:
                    problems.append(
                        (
                            param_field(index, "max_len"),
                            "required when the request sets no max_completion_len",
                        )
                    )
        return resolved, problems

    # -- evaluation -----------------------------------------------------------------

    def evaluate(
        self,
        terms: Sequence[Any],
        completions: Sequence[str],
        answers: Sequence[str],
        token_counts: np.ndarray | None,
        max_completion_len: int | None,
        cancelled: threading.Event | None = None,
    ) -> Evaluation:
        """Raw values of every term for every completion.

        Setting ``cancelled`` (from another thread) stops queued work and
        raises pool.Cancelled.

        ``answers`` holds the gold answer of each completion (its group's,
        repeated), ``len(answers) == len(completions)``; it may be empty when
        no term needs answers. Raises ValueError for invalid input (what
        :meth:`validate` reports) and RuntimeError after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("the reward runner is closed")
        resolved, problems = self._resolve(terms, token_counts is not None, max_completion_len)
        if problems:
            raise ValueError("; ".join(f"{where}: {what}" for where, what in problems))
        n = len(completions)
        counts: np.ndarray | None = None
        if token_counts is not None:
            counts = np.asarray(token_counts)
            if counts.shape != (n,):
                raise ValueError(f"token_counts has shape {counts.shape}, expected ({n},)")
        if any(spec.needs_answers for spec, _ in resolved) and len(answers) != n:
            raise ValueError(f"answers has {len(answers)} entries for {n} completions")
        if len(answers) != n:
            answers = [""] * n

        r_count = len(resolved)
        values = np.full((r_count, n), np.nan, dtype=np.float64)
        failed = np.zeros((r_count, n), dtype=bool)
        timed_out = np.zeros((r_count, n), dtype=bool)
        failures = _Failures(failed, timed_out)
        if n == 0 or r_count == 0:
            return Evaluation(values, failed, timed_out, [])

        features: list[ItemResult] | None = None
        if any(spec.name in _FEATURE_TERMS and spec.kind != KIND_PLUGIN for spec, _ in resolved):
            features = self._features(completions, cancelled)

        items: list[tuple[Any, ...]] = []
        item_index: dict[tuple[Any, ...], int] = {}
        links: list[tuple[int, int, int]] = []  # (term, completion, item)

        def submit(item: tuple[Any, ...]) -> int:
            idx = item_index.get(item)
            if idx is None:
                idx = item_index[item] = len(items)
                items.append(item)
            return idx

        for r, (spec, params) in enumerate(resolved):
            name = spec.name
            if spec.kind == KIND_PLUGIN:
                frozen = tuple(sorted(params.items()))
                for i in range(n):
                    links.append((r, i, submit((ITEM_PLUGIN, name, completions[i], answers[i], frozen))))
            elif name == builtin.FORMAT:
                values[r] = [builtin.format_reward(text, params["rule"]) for text in completions]
            elif name == builtin.LENGTH:
                assert counts is not None
                max_len = params.get("max_len", max_completion_len)
                if max_len is None or int(max_len) < 1:
                    raise ValueError("length: max_len must be a positive integer")
                values[r] = builtin.length_penalty(counts, int(max_len))
            elif name in _FEATURE_TERMS:
                assert features is not None
                normalized_gold: dict[str, str] = {}
                for i in range(n):
                    feature = features[i]
                    if feature.status != "ok":
                        failures.add(r, i, name, feature.status, f"answer extraction: {feature.message}")
                        continue
                    boxed, final = feature.value
                    if name == builtin.MISSING_BOXED_PENALTY:
                        values[r, i] = -1.0 if boxed is None else 0.0
                    elif name == builtin.BOXED_ACCURACY:
                        gold = normalized_gold.get(answers[i])
                        if gold is None:
                            gold = normalized_gold[answers[i]] = builtin.normalize_boxed(answers[i])
                        if not gold:
                            failures.add(r, i, name, "error", "the gold answer is empty")
                        else:
                            values[r, i] = 1.0 if boxed is not None and builtin.normalize_boxed(boxed) == gold else 0.0
                    else:  # math_accuracy
                        if not answers[i].strip():
                            failures.add(r, i, name, "error", "the gold answer is empty")
                        elif final is None or not final.strip():
                            values[r, i] = 0.0
                        else:
                            item = (ITEM_MATH, final, answers[i], int(params["float_rounding"]))
                            links.append((r, i, submit(item)))
            else:  # pragma: no cover - every builtin is handled above
                raise ValueError(f"reward function {name!r} has no implementation")

        results = self._pool.run(items, cancelled) if items else []
        for r, i, idx in links:
            result = results[idx]
            if result.status == "ok":
                values[r, i] = result.value
            else:
                failures.add(r, i, resolved[r][0].name, result.status, result.message)
        return Evaluation(values, failed, timed_out, failures.summary())

    def final_answers(self, completions: Sequence[str], cancelled: threading.Event | None = None) -> list[str | None]:
        """The final answer of each completion (None: it has none), as
        SEED-GRPO clusters them. Texts whose extraction could be long go to
        the workers under the per-item time limit; one that fails there counts
        as having no answer. Setting ``cancelled`` stops queued work
        (pool.Cancelled)."""
        return [r.value[1] if r.status == "ok" else None for r in self._features(completions, cancelled)]

    def _features(self, completions: Sequence[str], cancelled: threading.Event | None) -> list[ItemResult]:
        """(last boxed payload, final answer) per completion, or why it is unknown."""
        by_text: dict[str, list[int]] = {}
        for i, text in enumerate(completions):
            by_text.setdefault(text, []).append(i)
        out: list[ItemResult | None] = [None] * len(completions)
        slow: list[str] = []
        for text, positions in by_text.items():
            if builtin.extraction_cost(text) > builtin.INPROCESS_EXTRACTION_LIMIT:
                slow.append(text)
                continue
            result = ItemResult("ok", builtin.extract(text), "")
            for i in positions:
                out[i] = result
        if slow:
            results = self._pool.run([(ITEM_EXTRACT, text) for text in slow], cancelled)
            for text, result in zip(slow, results):
                for i in by_text[text]:
                    out[i] = result
        return [r if r is not None else ItemResult("error", None, "no result") for r in out]

    # -- lifecycle ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters of the worker pool: gold_parses, verifications, plugin_calls, timeouts, crashes..."""
        return self._pool.stats()

    def close(self) -> None:
        """Stop the workers. Idempotent; evaluate raises afterwards."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
