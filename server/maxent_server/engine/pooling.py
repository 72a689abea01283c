"""Reports of several jobs pooled into one controller step (docs/math.md §9).

A run expects R = reporters_per_step reports per step. The reports of step s
are pooled in the controller state itself (so the store keeps them, replicas
share them, and a request id applies once like any other update): each
measurement becomes the n-weighted mean of what was reported, n being a
report's sample count. The controller steps exactly once for s, with
`apply_update` on the pooled means:

- when R distinct reporters have reported s, or
- when a report for a later step arrives first: s applies with what it has
  (`partial`) and the new report starts pooling its own step.

On a pooled run (R > 1), and for any report that names a reporter, a report
for a step at or below the last applied one (or below the step being pooled,
which a later report has overtaken) changes nothing and is `stale`. A
reporter that reports the pending step again is ignored (its first report
counts): pooling never counts a job twice, whatever request id it sends.
Unnamed reports on a pooled run each count as one more reporter.

With R = 1 and no reporter name, `report` is exactly `apply_update`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..domain.controller import ControllerState, ControllerUpdate, WeightingConfig, apply_update

# Measurements pooled as n-weighted means: every optional number of an update.
_POOLED = tuple(f.name for f in fields(ControllerUpdate) if f.name != "global_step")


@dataclass(frozen=True)
class ReportResult:
    """What one report did: `stale` (nothing changed), `applied` (the
    controller stepped; the version rose) and `partial` (the step applied
    had fewer reporters than expected)."""

    stale: bool = False
    applied: bool = False
    partial: bool = False


def reporters_expected(config: WeightingConfig) -> int:
    return max(int(config.reporters_per_step), 1)


def report(
    config: WeightingConfig,
    state: ControllerState,
    update: ControllerUpdate,
    now: float,
    *,
    reporter_id: str = "",
    sample_count: float = 1.0,
) -> tuple[ControllerState, ReportResult]:
    """The state after one report, and what the report did. Pure."""
    expected = reporters_expected(config)
    if expected == 1 and not reporter_id:
        return apply_update(config, state, update, now), ReportResult(applied=True)
    step = update.global_step
    pending = state.pending_step if state.pending_reporters else None
    if (state.version > 0 and step <= state.global_step) or (pending is not None and step < pending):
        return state, ReportResult(stale=True)
    if expected == 1 and pending is None:  # a named reporter on an unpooled run: its report as sent
        return apply_update(config, state, update, now), ReportResult(applied=True)
    if pending is not None and step == pending:
        if reporter_id and reporter_id in state.pending_reporters:
            return state, ReportResult()  # a second report of this reporter for this step: ignored
        state, applied = _pool(config, state, update, now, reporter_id, sample_count, expected)
        return state, ReportResult(applied=applied)
    partial = False
    if pending is not None:  # a later step came first: the pending one applies with what it has
        state = _flush(config, state, now)
        partial = True
    state, applied = _pool(config, state, update, now, reporter_id, sample_count, expected)
    return state, ReportResult(applied=partial or applied, partial=partial)


def _pool(
    config: WeightingConfig, state: ControllerState, update: ControllerUpdate, now: float,
    reporter_id: str, sample_count: float, expected: int,
) -> tuple[ControllerState, bool]:
    """Add a report to the pool of its step; apply the step once complete."""
    sums = {name: (total, weight) for name, total, weight in state.pending_sums} if state.pending_reporters else {}
    for name in _POOLED:
        value = getattr(update, name)
        if value is None:
            continue
        total, weight = sums.get(name, (0.0, 0.0))
        sums[name] = (total + sample_count * value, weight + sample_count)
    reporters = (state.pending_reporters if state.pending_reporters else ()) + (reporter_id,)
    pending = tuple((name, total, weight) for name, (total, weight) in sorted(sums.items()))
    state = replace(state, pending_step=update.global_step, pending_reporters=reporters, pending_sums=pending)
    if len(reporters) >= expected:
        return _flush(config, state, now), True
    return state, False


def _flush(config: WeightingConfig, state: ControllerState, now: float) -> ControllerState:
    """Apply the pending step with its pooled means and empty the pool."""
    means = {name: total / weight for name, total, weight in state.pending_sums if weight > 0}
    pooled = ControllerUpdate(global_step=state.pending_step, **means)
    cleared = replace(state, pending_step=0, pending_reporters=(), pending_sums=())
    return apply_update(config, cleared, pooled, now)


__all__ = ["ReportResult", "report", "reporters_expected"]
