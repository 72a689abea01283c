"""Property tests of the engine (docs/math.md §3-§7): invariants that hold for any input."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402

from maxent_server.domain import (  # noqa: E402
    ControllerState,
    ControllerUpdate,
    WeightDenominator,
    WeightingConfig,
    apply_update,
)
from maxent_server.engine import Engine, RewardOptions, WeightOptions  # noqa: E402

HYPO = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENGINE = Engine(device="cpu")


def group_slices(sizes):
    start = 0
    for k in sizes:
        yield slice(start, start + k)
        start += k


def rewards(sizes, utils, **options):
    return ENGINE.reward_statistics(
        np.asarray(sizes, dtype=np.int64), np.asarray(utils, dtype=np.float64), RewardOptions(**options)
    )


def weights(sizes, q, ref_logp, counts, **options):
    return ENGINE.weight_stats(
        np.asarray(sizes, dtype=np.int64),
        np.asarray(q, dtype=np.float64),
        np.asarray(ref_logp, dtype=np.float64),
        None if counts is None else np.asarray(counts, dtype=np.int64),
        WeightOptions(**options),
    )


@st.composite
def ragged(draw, max_groups=6, max_size=8, min_size=0, with_ref=True):
    # Sometimes all groups of one size: the engine's dense [G, K] path.
    sizes = draw(st.one_of(
        st.lists(st.integers(min_size, max_size), min_size=0, max_size=max_groups),
        st.builds(lambda g, k: [k] * g, st.integers(1, max_groups), st.integers(max(min_size, 1), max_size)),
    ))
    n = sum(sizes)
    utils = draw(st.lists(st.one_of(st.floats(-10.0, 10.0), st.sampled_from([0.0, 1.0])), min_size=n, max_size=n))
    if not with_ref:
        return sizes, utils, None, None
    ref_logp = draw(st.lists(st.floats(-500.0, 0.0), min_size=n, max_size=n))
    counts = draw(st.lists(st.integers(0, 64), min_size=n, max_size=n))
    return sizes, utils, ref_logp, counts


# --------------------------------------------------------------------------
# weights


@given(
    batch=ragged(),
    tau=st.one_of(st.floats(1e-6, 20.0), st.just(0.0)),
    beta=st.floats(0.0, 5.0),
    denominator=st.sampled_from(list(WeightDenominator)),
    include_ref=st.booleans(),
    by_tokens=st.booleans(),
    length_norm=st.booleans(),
)
@HYPO
def test_weights_sum_to_one_per_nonempty_group(batch, tau, beta, denominator, include_ref, by_tokens, length_norm):
    sizes, utils, ref_logp, counts = batch
    q = rewards(sizes, utils).q_values
    out = weights(sizes, q, ref_logp, counts, tau=tau, beta=beta, denominator=denominator,
                  include_reference_term=include_ref, normalize_by_tokens=by_tokens, length_normalize_ref=length_norm)
    assert out.weights.shape == (sum(sizes),)
    assert np.all(np.isfinite(out.weights)) and np.all(out.weights >= 0.0)
    for g, s in enumerate(group_slices(sizes)):
        k = s.stop - s.start
        if k:
            assert out.weights[s].sum() == pytest.approx(1.0, abs=1e-9)
            assert -1e-9 <= out.group_entropies[g] <= math.log(k) + 1e-9
        else:
            assert out.group_entropies[g] == 0.0
    present = [out.group_entropies[g] for g, k in enumerate(sizes) if k]
    if present:
        assert min(present) - 1e-12 <= out.weight_entropy <= max(present) + 1e-12
        assert out.weight_entropy_min == pytest.approx(min(present))
        assert out.weight_entropy_max == pytest.approx(max(present))


def _simplex_points(rng: np.random.Generator, w_star: np.ndarray) -> list[np.ndarray]:
    k = w_star.size
    points = [np.full(k, 1.0 / k)]
    points += [np.eye(k)[i] for i in range(k)]
    for alpha in (0.1, 1.0, 10.0):
        points += list(rng.dirichlet(np.full(k, alpha), size=8))
    for eps in (0.3, 1e-2, 1e-4):
        for _ in range(4):
            p = w_star * np.exp(eps * rng.standard_normal(k))
            points.append(p / p.sum())
    return points


@given(
    batch=ragged(min_size=1),
    tau=st.floats(0.01, 5.0),
    beta=st.floats(0.0, 5.0),
    temperature=st.sampled_from([1.0, 0.3, 3.0]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_closed_form_maximises_the_objective(batch, tau, beta, temperature, seed):
    """w* scores at least as high on E_w[log q] + τH(w) − βKL(w‖π_ref) as any other point of the simplex."""
    sizes, utils, ref_logp, counts = batch
    q = rewards(sizes, utils, q_temperature=temperature).q_values
    exact = weights(sizes, q, ref_logp, counts, tau=tau, beta=beta)
    seed_mode = weights(sizes, q, ref_logp, counts, tau=tau, beta=beta, denominator=WeightDenominator.TAU)
    rng = np.random.default_rng(seed)
    for s in group_slices(sizes):
        qs = q[s].tolist()
        ref_log = [r / max(c, 1) for r, c in zip(ref_logp[s], counts[s])]  # π_ref = softmax(ℓ_ref)
        w_star = exact.weights[s]
        best = ref.maxent_objective(w_star.tolist(), qs, ref_log, tau, beta)
        slack = 1e-9 * (1.0 + abs(best))
        for point in _simplex_points(rng, w_star):
            assert ref.maxent_objective(point.tolist(), qs, ref_log, tau, beta) <= best + slack
        # the seed-compatible denominator is just another point of the simplex
        assert ref.maxent_objective(seed_mode.weights[s].tolist(), qs, ref_log, tau, beta) <= best + slack
        # and the closed form is the product form q^(1/(τ+β)) π_ref^(β/(τ+β))
        log_pi = np.asarray(ref_log) - ref.logsumexp(ref_log)
        prod = np.log(np.asarray(qs)) / (tau + beta) + log_pi * beta / (tau + beta)
        prod = np.exp(prod - prod.max())
        np.testing.assert_allclose(w_star, prod / prod.sum(), rtol=1e-6, atol=1e-9)


@given(batch=ragged(), beta=st.floats(0.0, 10.0), denominator=st.sampled_from(list(WeightDenominator)),
       by_tokens=st.booleans())
@HYPO
def test_infinite_tau_gives_uniform_weights(batch, beta, denominator, by_tokens):
    sizes, utils, ref_logp, counts = batch
    q = rewards(sizes, utils).q_values
    out = weights(sizes, q, ref_logp, counts, tau=1e12, beta=beta, denominator=denominator)
    for g, s in enumerate(group_slices(sizes)):
        k = s.stop - s.start
        if k:
            np.testing.assert_allclose(out.weights[s], 1.0 / k, atol=1e-7)
            assert out.group_entropies[g] == pytest.approx(math.log(k), abs=1e-6)
    np.testing.assert_allclose(out.advantage_entropy, 0.0, atol=1e-7)


@given(batch=ragged(), tau=st.floats(0.05, 5.0), beta=st.floats(0.0, 2.0), seed=st.integers(0, 2**32 - 1))
@HYPO
def test_weights_are_permutation_equivariant_and_groupwise(batch, tau, beta, seed):
    """Permuting completions within groups permutes the weights; groups do not interact."""
    sizes, utils, ref_logp, counts = batch
    q = rewards(sizes, utils).q_values
    ref_logp, counts = np.asarray(ref_logp), np.asarray(counts, dtype=np.int64)
    base = weights(sizes, q, ref_logp, counts, tau=tau, beta=beta)
    rng = np.random.default_rng(seed)
    perm = np.concatenate([s.start + rng.permutation(s.stop - s.start) for s in group_slices(sizes)] or [[]]).astype(int)
    permuted = weights(sizes, q[perm], ref_logp[perm], counts[perm], tau=tau, beta=beta)
    np.testing.assert_allclose(permuted.weights, base.weights[perm], rtol=1e-9, atol=1e-12)
    for g, s in enumerate(group_slices(sizes)):
        alone = weights([s.stop - s.start], q[s], ref_logp[s], counts[s], tau=tau, beta=beta)
        np.testing.assert_allclose(alone.weights, base.weights[s], rtol=1e-9, atol=1e-12)
        assert alone.group_entropies[0] == pytest.approx(base.group_entropies[g], abs=1e-12)


# --------------------------------------------------------------------------
# rewards


@given(batch=ragged(with_ref=False), shift=st.floats(-100.0, 100.0), scale=st.booleans(),
       temperature=st.sampled_from([1.0, 0.5, 4.0]))
@HYPO
def test_shifting_utilities_changes_neither_q_nor_advantages(batch, shift, scale, temperature):
    sizes, utils, _, _ = batch
    base = rewards(sizes, utils, scale_rewards=scale, q_temperature=temperature)
    moved = rewards(sizes, [u + shift for u in utils], scale_rewards=scale, q_temperature=temperature)
    np.testing.assert_allclose(moved.q_values, base.q_values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(moved.advantages, base.advantages, rtol=1e-6, atol=1e-6)
    assert moved.reward_std == pytest.approx(base.reward_std, rel=1e-6, abs=1e-9)
    if utils:
        assert moved.reward_mean == pytest.approx(base.reward_mean + shift, rel=1e-9, abs=1e-9)


@given(batch=ragged(with_ref=False), epsilon=st.sampled_from([1e-6, 1e-4, 1e-2]), temperature=st.sampled_from([1.0, 1e-9, 0.2, 5.0]))
@HYPO
def test_q_is_a_distribution_with_full_support(batch, epsilon, temperature):
    sizes, utils, _, _ = batch
    out = rewards(sizes, utils, q_epsilon=epsilon, q_temperature=temperature)
    for s in group_slices(sizes):
        if s.stop > s.start:
            assert out.q_values[s].sum() == pytest.approx(1.0, abs=1e-12)
            assert np.all(out.q_values[s] > 0.0)
            # ε·K of mass is spread evenly: nobody falls below ε/(1+...) ≈ ε
            assert np.all(out.q_values[s] >= epsilon * (1 - 1e-9))


@given(batch=ragged(with_ref=False))
@HYPO
def test_advantages_are_centred_and_ordered(batch):
    sizes, utils, _, _ = batch
    out = rewards(sizes, utils)
    u = np.asarray(utils)
    for s in group_slices(sizes):
        k = s.stop - s.start
        if k == 0:
            continue
        a = out.advantages[s]
        assert abs(a.sum()) <= 1e-6 * (1 + np.abs(a).sum())
        if k == 1:
            assert a[0] == 0.0
        # monotone in the utility
        order = np.argsort(u[s], kind="stable")
        assert np.all(np.diff(a[order]) >= -1e-9)
        # q is monotone in the utility too
        assert np.all(np.diff(out.q_values[s][order]) >= -1e-15)


# --------------------------------------------------------------------------
# controller invariants

optional = st.one_of(st.none(), st.floats(0.0, 4.0))


@st.composite
def controller_runs(draw):
    tau_min = draw(st.floats(0.0, 0.5))
    tau_max = draw(st.one_of(st.sampled_from([0.0, -1.0]), st.floats(tau_min + 0.01, 10.0)))
    upper = tau_max if tau_max > 0 else 10.0
    tau = draw(st.floats(max(tau_min, 1e-3), max(upper, 1e-3)))
    target_kind = draw(st.sampled_from(["none", "fixed", "schedule"]))
    config = WeightingConfig(
        tau=tau,
        beta=draw(st.floats(0.0, 2.0)),
        target_entropy=draw(st.floats(0.0, 3.0)) if target_kind == "fixed" else None,
        target_entropy_start=draw(st.floats(0.0, 3.0)) if target_kind == "schedule" else None,
        target_entropy_final=draw(st.floats(0.0, 3.0)) if target_kind == "schedule" else None,
        target_entropy_horizon=draw(st.integers(-2, 30)),
        tau_lr=draw(st.floats(0.0, 2.0)),
        tau_min=tau_min,
        tau_max=tau_max,
        tau_warmup_steps=draw(st.integers(0, 5)),
        kl_target=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))),
        kl_horizon=draw(st.sampled_from([0, 1, 2, 10, 100])),
        kl_step_size=draw(st.one_of(st.just(0.0), st.floats(0.01, 3.0))),
        meta_enabled=draw(st.booleans()),
        meta_tau_lr=draw(st.floats(0.0, 2.0)),
        meta_beta_lr=draw(st.floats(0.0, 2.0)),
        meta_beta_grad_clip=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))),
    )
    updates = draw(
        st.lists(
            st.builds(
                ControllerUpdate,
                global_step=st.integers(0, 40),
                weight_entropy=optional,
                measured_kl=optional,
                tau_grad=st.one_of(st.none(), st.floats(-5.0, 5.0)),
                beta_grad=st.one_of(st.none(), st.floats(-5.0, 5.0)),
                lr_scale=st.one_of(st.just(1.0), st.floats(0.0, 3.0)),
            ),
            min_size=0,
            max_size=25,
        )
    )
    return config, updates


@given(run=controller_runs())
@HYPO
def test_controller_invariants(run):
    config, updates = run
    state = ControllerState.initial(config, now=0.0)
    assert state.version == 0 and state.entropy_ema is None
    for n, update in enumerate(updates, start=1):
        state = apply_update(config, state, update, now=float(n))
        assert state.version == n
        assert state.global_step == update.global_step
        assert state.beta >= 0.0 and math.isfinite(state.beta)
        assert state.tau >= config.tau_min
        if config.tau_max > 0:
            assert state.tau <= config.tau_max
        assert state.update_time == float(n)
    assert state.version == len(updates)
