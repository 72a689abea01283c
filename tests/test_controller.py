"""The controller update (docs/math.md §7) against the plain reference, plus fixed scenarios."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402

from maxent_server.domain import ControllerState, ControllerUpdate, WeightingConfig, apply_update  # noqa: E402

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REF_FIELDS = {f.name for f in dataclasses.fields(ref.ControllerConfig)}


def ref_config(config: WeightingConfig) -> ref.ControllerConfig:
    return ref.ControllerConfig(**{k: v for k, v in config.to_dict().items() if k in REF_FIELDS})


def close(a, b, tol=1e-9) -> bool:
    if a is None or b is None:
        return a is b
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol * max(1.0, abs(b))


def assert_same(state: ControllerState, want: ref.ControllerState, config: WeightingConfig) -> None:
    assert close(state.tau, want.tau), (state, want)
    assert close(state.beta, want.beta), (state, want)
    assert close(state.entropy_ema, want.ema), (state, want)
    assert state.global_step == want.step and state.version == want.version
    assert state.target_unreachable == want.unreachable and state.tau_bound_steps == want.bound_steps
    assert state.last_max_weight_entropy == want.last_max_entropy
    if not config.meta_enabled:
        assert close(state.tau_log, want.log_tau), (state, want)


def run_both(config: WeightingConfig, updates: list[ControllerUpdate]):
    """Apply the updates with engine and reference, comparing after each."""
    rconfig = ref_config(config)
    state = ControllerState.initial(config, now=100.0)
    want = ref.initial_state(rconfig)
    assert_same(state, want, config)
    assert state.active_target_entropy == ref.target_entropy_at(rconfig, 0)
    last_h = last_kl = None
    for n, u in enumerate(updates, start=1):
        state = apply_update(config, state, u, now=100.0 + n)
        want = ref.controller_update(rconfig, want, u.global_step, u.weight_entropy, u.measured_kl,
                                     u.tau_grad, u.beta_grad, u.lr_scale)
        assert_same(state, want, config)
        target = ref.target_entropy_at(rconfig, u.global_step)
        assert close(state.active_target_entropy, target)
        last_h = u.weight_entropy if u.weight_entropy is not None else last_h
        last_kl = u.measured_kl if u.measured_kl is not None else last_kl
        assert state.last_weight_entropy == last_h and state.last_measured_kl == last_kl
        assert state.update_time == 100.0 + n
    return state, want


def step(s, h=None, kl=None, tau_grad=None, beta_grad=None, lr_scale=1.0) -> ControllerUpdate:
    return ControllerUpdate(global_step=s, weight_entropy=h, measured_kl=kl, tau_grad=tau_grad,
                            beta_grad=beta_grad, lr_scale=lr_scale)


# --------------------------------------------------------------------------
# hypothesis: sequences of updates


@st.composite
def configs(draw, meta=None):
    tau_min = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5)))
    kind = draw(st.sampled_from(["none", "fixed", "schedule", "start_only"]))
    return WeightingConfig(
        tau=draw(st.floats(1e-4, 5.0)),
        beta=draw(st.one_of(st.just(0.0), st.floats(0.0, 2.0))),
        target_entropy=draw(st.floats(0.0, 3.0)) if kind in ("fixed", "start_only") else None,
        target_entropy_start=draw(st.floats(0.0, 3.0)) if kind in ("schedule", "start_only") else None,
        target_entropy_final=draw(st.floats(0.0, 3.0)) if kind == "schedule" else None,
        target_entropy_horizon=draw(st.integers(-3, 30)),
        tau_lr=draw(st.floats(0.0, 3.0)),
        tau_min=tau_min,
        tau_max=draw(st.one_of(st.sampled_from([0.0, -1.0]), st.floats(tau_min, 10.0))),
        tau_warmup_steps=draw(st.integers(0, 6)),
        kl_target=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))),
        kl_horizon=draw(st.sampled_from([0, -1, 1, 3, 50])),
        kl_step_size=draw(st.one_of(st.just(0.0), st.floats(0.01, 3.0))),
        meta_enabled=draw(st.booleans()) if meta is None else meta,
        meta_tau_lr=draw(st.floats(0.0, 2.0)),
        meta_beta_lr=draw(st.floats(0.0, 2.0)),
        meta_beta_grad_clip=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))),
    )


@st.composite
def update_lists(draw, max_size=15):
    n = draw(st.integers(0, max_size))
    out, s = [], draw(st.integers(0, 3))
    for _ in range(n):
        s += draw(st.integers(0, 4))  # non-decreasing, repeats allowed
        out.append(
            step(
                s,
                h=draw(st.one_of(st.none(), st.floats(0.0, 4.0))),
                kl=draw(st.one_of(st.none(), st.floats(0.0, 3.0))),
                tau_grad=draw(st.one_of(st.none(), st.floats(-5.0, 5.0))),
                beta_grad=draw(st.one_of(st.none(), st.floats(-5.0, 5.0))),
                lr_scale=draw(st.one_of(st.just(1.0), st.floats(0.0, 3.0))),
            )
        )
    return out


@given(config=configs(), updates=update_lists())
@HYPO
def test_controller_matches_reference(config, updates):
    state, _ = run_both(config, updates)
    assert state.version == len(updates)


@given(config=configs(meta=False), updates=update_lists())
@FEWER
def test_adaptive_controller_matches_reference(config, updates):
    run_both(config, updates)


@given(config=configs(meta=True), updates=update_lists())
@FEWER
def test_meta_controller_matches_reference(config, updates):
    state, _ = run_both(config, updates)
    assert state.entropy_ema is None  # nothing else runs under the meta controller


@given(config=configs(), steps=st.lists(st.integers(0, 100), max_size=20))
@settings(max_examples=100, deadline=None)
def test_empty_updates_only_bump_the_version(config, steps):
    state = ControllerState.initial(config, now=0.0)
    for n, s in enumerate(steps, start=1):
        new = apply_update(config, state, ControllerUpdate(global_step=s), now=float(n))
        assert (new.tau, new.beta, new.tau_log, new.entropy_ema) == (state.tau, state.beta, state.tau_log, state.entropy_ema)
        assert new.version == state.version + 1 == n and new.global_step == s
        state = new


# --------------------------------------------------------------------------
# fixed scenarios


def test_initial_state():
    config = WeightingConfig(tau=0.25, beta=0.1, target_entropy_start=2.0, target_entropy_final=1.0,
                             target_entropy_horizon=4)
    state = ControllerState.initial(config, now=7.0)
    assert state.tau == 0.25 and state.beta == 0.1 and state.tau_log == pytest.approx(math.log(0.25))
    assert state.entropy_ema is None and state.version == 0 and state.global_step == 0
    assert state.active_target_entropy == 2.0 and state.update_time == 7.0


def test_warmup_boundary():
    config = WeightingConfig(tau=1.0, target_entropy=2.0, tau_lr=0.5, tau_warmup_steps=3)
    updates = [step(1, h=1.0), step(2, h=1.0), step(3, h=1.0)]
    state, _ = run_both(config, updates)
    # skipped while s <= warmup: nothing moved, EMA still unset, but three versions
    assert state.tau == 1.0 and state.tau_log == 0.0 and state.entropy_ema is None and state.version == 3
    state = apply_update(config, state, step(4, h=1.0), now=0.0)
    # first measurement initialises the EMA; log τ += 0.5·(2 − 1)
    assert state.entropy_ema == 1.0
    assert state.tau_log == pytest.approx(0.5) and state.tau == pytest.approx(math.exp(0.5))
    state = apply_update(config, state, step(5, h=3.0), now=0.0)
    assert state.entropy_ema == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    assert state.tau_log == pytest.approx(0.5 + 0.5 * (2.0 - 1.2))
    run_both(config, updates + [step(4, h=1.0), step(5, h=3.0), step(6, h=0.0, lr_scale=2.0)])


def test_no_target_no_tau_adaptation():
    config = WeightingConfig(tau=0.7, tau_lr=1.0)
    state, _ = run_both(config, [step(s, h=0.1) for s in range(1, 6)])
    # τ stays; the EMA is tracked all the same (docs/math.md §7)
    assert state.tau == 0.7 and state.entropy_ema == pytest.approx(0.1) and state.version == 5


def test_missing_entropy_skips_tau_adaptation():
    config = WeightingConfig(tau=0.7, tau_lr=1.0, target_entropy=1.0)
    state, _ = run_both(config, [step(1), step(2, kl=0.3)])
    assert state.tau == 0.7 and state.entropy_ema is None


def test_lr_scale_scales_tau_adaptation():
    config = WeightingConfig(tau=1.0, target_entropy=1.0, tau_lr=0.2)
    a = apply_update(config, ControllerState.initial(config, 0.0), step(1, h=0.5, lr_scale=1.0), 0.0)
    b = apply_update(config, ControllerState.initial(config, 0.0), step(1, h=0.5, lr_scale=3.0), 0.0)
    c = apply_update(config, ControllerState.initial(config, 0.0), step(1, h=0.5, lr_scale=0.0), 0.0)
    assert a.tau_log == pytest.approx(0.2 * 0.5)
    assert b.tau_log == pytest.approx(3 * 0.2 * 0.5)
    assert c.tau == 1.0 and c.entropy_ema == 0.5  # the EMA still records the measurement


@pytest.mark.parametrize("horizon", [10, 0, -5])
def test_target_entropy_schedule(horizon):
    config = WeightingConfig(tau=1.0, tau_lr=1.0, target_entropy=9.0, target_entropy_start=2.0,
                       target_entropy_final=1.0, target_entropy_horizon=horizon)
    rconfig = ref_config(config)
    for s, expected in [(0, 2.0), (5, 1.5), (10, 1.0), (25, 1.0)]:
        if horizon <= 0:
            expected = 1.0  # final when the horizon is not positive
        assert config.target_entropy_at(s) == pytest.approx(expected)
        assert ref.target_entropy_at(rconfig, s) == pytest.approx(expected)
        # the tau step uses the target in force at the update's step
        state = apply_update(config, ControllerState.initial(config, 0.0), step(s, h=1.2), 0.0)
        # (step 0 is inside the default warmup of 0 steps: s <= 0 skips)
        assert state.tau_log == pytest.approx(expected - 1.2 if s > 0 else 0.0)
        assert state.active_target_entropy == pytest.approx(expected)
    run_both(config, [step(s, h=1.0 + 0.05 * s) for s in range(0, 30, 3)])


def test_fixed_target_when_schedule_incomplete():
    # only a start: the schedule is not in force, the fixed target is
    config = WeightingConfig(tau=1.0, tau_lr=1.0, target_entropy=0.5, target_entropy_start=2.0,
                             target_entropy_horizon=10)
    assert config.target_entropy_at(3) == 0.5
    run_both(config, [step(3, h=1.0)])


@pytest.mark.parametrize("tau_max", [0.0, -1.0])
def test_no_upper_bound_when_tau_max_not_positive(tau_max):
    config = WeightingConfig(tau=1.0, target_entropy=5.0, tau_lr=1.0, tau_max=tau_max)
    state, _ = run_both(config, [step(s, h=0.0) for s in range(1, 5)])
    assert state.tau > 1e3  # log τ rose by ~5 + 5 + 5 + 5 = 20


def test_tau_clamped_to_bounds():
    config = WeightingConfig(tau=1.0, target_entropy=5.0, tau_lr=1.0, tau_min=0.1, tau_max=2.0)
    state, _ = run_both(config, [step(1, h=0.0)])
    assert state.tau == 2.0 and state.tau_log == math.log(2.0)  # anti-windup: log τ reset at the bound
    config = WeightingConfig(tau=1.0, target_entropy=0.0, tau_lr=1.0, tau_min=0.1, tau_max=2.0)
    state, _ = run_both(config, [step(1, h=5.0)])
    assert state.tau == 0.1


def test_tau_overflow_does_not_raise():
    # log τ beyond the float range: τ is +inf before the clamp (math.exp used to raise)
    config = WeightingConfig(tau=1.0, target_entropy=10.0, tau_lr=100.0)
    state, _ = run_both(config, [step(1, h=0.0)])
    assert state.tau == math.inf
    config = dataclasses.replace(config, tau_max=3.0)
    state, _ = run_both(config, [step(1, h=0.0), step(2, h=0.0)])
    assert state.tau == 3.0


def test_kl_controller():
    config = WeightingConfig(tau=1.0, beta=0.5, kl_target=0.1, kl_horizon=10, kl_step_size=0.2)
    state, _ = run_both(config, [step(1, kl=0.11)])
    assert state.beta == pytest.approx(0.5 * (1 + 0.1 / 10))
    state, _ = run_both(config, [step(1, kl=1.0)])  # error 9 clipped to 0.2
    assert state.beta == pytest.approx(0.5 * (1 + 0.2 / 10))
    state, _ = run_both(config, [step(1, kl=0.0)])  # error -1 clipped to -0.2
    assert state.beta == pytest.approx(0.5 * (1 - 0.2 / 10))
    # a step larger than the horizon would make β negative: the factor is floored at 1e-6
    config = WeightingConfig(tau=1.0, beta=0.5, kl_target=0.1, kl_horizon=1, kl_step_size=3.0)
    state, _ = run_both(config, [step(1, kl=0.0)])
    assert state.beta == 0.5 * 1e-6


@pytest.mark.parametrize("field", ["kl_target", "kl_horizon", "kl_step_size"])
def test_kl_controller_off_unless_all_positive(field):
    config = dataclasses.replace(WeightingConfig(tau=1.0, beta=0.5, kl_target=0.1, kl_horizon=10, kl_step_size=0.2),
                                 **{field: 0})
    state, _ = run_both(config, [step(1, kl=1.0)])
    assert state.beta == 0.5


def test_tau_adaptation_then_kl_controller_in_one_update():
    config = WeightingConfig(tau=1.0, beta=0.5, target_entropy=1.0, tau_lr=0.3, kl_target=0.2, kl_horizon=5,
                       kl_step_size=0.5)
    state, _ = run_both(config, [step(1, h=0.4, kl=0.3)])
    assert state.tau_log == pytest.approx(0.3 * 0.6)
    assert state.beta == pytest.approx(0.5 * (1 + 0.5 / 5))


# --------------------------------------------------------------------------
# meta controller


META = WeightingConfig(tau=1.0, beta=0.5, meta_enabled=True, meta_tau_lr=0.1, meta_beta_lr=0.2, target_entropy=1.0,
                 kl_target=0.1, kl_horizon=10, kl_step_size=0.2, tau_lr=1.0)


def test_meta_analytic_gradients():
    state, _ = run_both(META, [step(1, h=1.5, kl=0.4)])
    assert state.tau == pytest.approx(1.0 - 0.1 * (1.5 - 1.0))
    assert state.beta == pytest.approx(0.5 + 0.2 * (0.4 - 0.1))
    assert state.entropy_ema is None  # no tau adaptation, no KL controller


def test_meta_explicit_gradients_take_precedence():
    state, _ = run_both(META, [step(1, h=1.5, kl=0.4, tau_grad=-2.0, beta_grad=0.7)])
    assert state.tau == pytest.approx(1.0 + 0.1 * 2.0)
    assert state.beta == pytest.approx(0.5 + 0.2 * 0.7)


def test_meta_beta_grad_clip_and_floor():
    config = dataclasses.replace(META, meta_beta_grad_clip=0.25)
    state, _ = run_both(config, [step(1, beta_grad=10.0)])
    assert state.beta == pytest.approx(0.5 + 0.2 * 0.25)
    state, _ = run_both(config, [step(1, beta_grad=-10.0)])
    assert state.beta == pytest.approx(0.5 - 0.2 * 0.25)
    state, _ = run_both(config, [step(1, kl=5.0)])  # analytic gradient is clipped too
    assert state.beta == pytest.approx(0.5 + 0.2 * 0.25)
    # without a clip the step is free and β floors at 0
    state, _ = run_both(META, [step(1, beta_grad=-10.0)])
    assert state.beta == 0.0


def test_meta_lr_scale():
    state, _ = run_both(META, [step(1, tau_grad=1.0, beta_grad=1.0, lr_scale=0.5)])
    assert state.tau == pytest.approx(1.0 - 0.5 * 0.1)
    assert state.beta == pytest.approx(0.5 + 0.5 * 0.2)


def test_meta_tau_clamped():
    config = dataclasses.replace(META, tau_min=0.5, tau_max=1.2)
    state, _ = run_both(config, [step(1, tau_grad=100.0)])
    assert state.tau == 0.5
    state, _ = run_both(config, [step(1, tau_grad=-100.0)])
    assert state.tau == 1.2


def test_meta_without_gradients_or_targets_changes_nothing():
    config = dataclasses.replace(META, target_entropy=None, kl_target=0.0)
    state, _ = run_both(config, [step(1, h=2.0, kl=1.0), step(2)])
    assert (state.tau, state.beta, state.version) == (1.0, 0.5, 2)


def test_meta_ignores_warmup():
    config = dataclasses.replace(META, tau_warmup_steps=100)
    state, _ = run_both(config, [step(1, h=2.0)])
    assert state.tau == pytest.approx(1.0 - 0.1 * 1.0)


def test_meta_uses_scheduled_target():
    config = dataclasses.replace(META, target_entropy=None, target_entropy_start=2.0, target_entropy_final=0.0,
                                 target_entropy_horizon=4)
    state, _ = run_both(config, [step(2, h=1.5)])  # target 1.0 at step 2
    assert state.tau == pytest.approx(1.0 - 0.1 * 0.5)
