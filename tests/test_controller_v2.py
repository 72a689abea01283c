"""The controller of docs/math.md §7 as planned for runs shared by many jobs:
anti-windup at the tau clamp, the floor on the beta factor, the EMA without a
target, the ratio target, target_unreachable and tau_bound_steps, tau > 0
with the tau denominator, and export/import of the full state (engine,
server and maxentctl)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402

from maxent_client import WeightDenominator, WeightingConfig  # noqa: E402
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb  # noqa: E402
from maxent_client.cli import main as ctl_main  # noqa: E402
from maxent_client.errors import AlreadyExistsError, InvalidArgumentError  # noqa: E402
from maxent_server import domain  # noqa: E402
from maxent_server.domain import ControllerState, ControllerUpdate, apply_update  # noqa: E402

REF_FIELDS = {f.name for f in dataclasses.fields(ref.ControllerConfig)}


def ref_config(config: domain.WeightingConfig) -> ref.ControllerConfig:
    return ref.ControllerConfig(**{k: v for k, v in config.to_dict().items() if k in REF_FIELDS})


def step(s, h=None, kl=None, lr_scale=1.0, mwe=None, tau_grad=None, beta_grad=None) -> ControllerUpdate:
    return ControllerUpdate(global_step=s, weight_entropy=h, measured_kl=kl, lr_scale=lr_scale,
                            max_weight_entropy=mwe, tau_grad=tau_grad, beta_grad=beta_grad)


def run(config: domain.WeightingConfig, updates) -> list[ControllerState]:
    state = ControllerState.initial(config, now=0.0)
    states = []
    for n, u in enumerate(updates, start=1):
        state = apply_update(config, state, u, now=float(n))
        states.append(state)
    return states


# --------------------------------------------------------------------------
# anti-windup


def test_tau_leaves_tau_min_the_first_step_the_error_changes_sign():
    config = domain.WeightingConfig(tau=1.0, target_entropy=1.0, tau_lr=2.0, tau_min=0.5)
    # Too flat for long (tau driven to the bound), then too peaked.
    entropies = [3.0] * 15 + [0.0] * 40
    states = run(config, [step(s, h=h) for s, h in enumerate(entropies, start=1)])
    errors = [config.target_entropy - s.entropy_ema for s in states]
    assert states[14].tau == 0.5 and states[14].tau_log == math.log(0.5)
    flip = next(i for i, e in enumerate(errors) if i > 14 and e > 0)
    for i in range(5, flip):
        assert states[i].tau == 0.5 and states[i].tau_log == math.log(0.5), i
    assert states[flip].tau > 0.5  # leaves the bound on the very step the error turns positive
    assert states[flip].tau_log == pytest.approx(math.log(0.5) + 2.0 * errors[flip], abs=1e-15)


def test_tau_leaves_tau_max_the_first_step_the_error_changes_sign():
    config = domain.WeightingConfig(tau=1.0, target_entropy=1.0, tau_lr=2.0, tau_max=1.5)
    states = run(config, [step(s, h=h) for s, h in enumerate([0.0] * 10 + [3.0] * 20, start=1)])
    flip = next(i for i, s in enumerate(states) if i >= 10 and s.entropy_ema > 1.0)
    assert all(s.tau == 1.5 for s in states[1:flip])
    assert states[flip].tau < 1.5


# --------------------------------------------------------------------------
# beta floor


def test_beta_recovers_after_a_large_negative_error():
    # kl_step_size >= kl_horizon: the factor 1 + e/h reaches <= 0 for KL far below target
    config = domain.WeightingConfig(tau=1.0, beta=0.5, kl_target=0.1, kl_horizon=1, kl_step_size=3.0)
    # KL 0: e = -1, so 1 + e/h = 0, floored at 1e-6 (it used to set beta to 0 for good)
    states = run(config, [step(1, kl=0.0)] + [step(s, kl=1.0) for s in range(2, 20)])
    assert states[0].beta == 0.5 * 1e-6 > 0
    betas = [s.beta for s in states]
    assert all(b > a for a, b in zip(betas, betas[1:]))  # factor 1 + 3/1 each step
    assert betas[-1] == pytest.approx(0.5e-6 * 4.0 ** 18, rel=1e-12) and betas[-1] > 0.5


# --------------------------------------------------------------------------
# EMA without a target; the ratio target


def test_entropy_ema_tracked_without_a_target():
    config = domain.WeightingConfig(tau=0.3, tau_lr=5.0, tau_warmup_steps=1)
    states = run(config, [step(1, h=9.0), step(2, h=1.0), step(3), step(4, h=2.0)])
    assert states[0].entropy_ema is None  # warm-up
    assert states[1].entropy_ema == 1.0 and states[2].entropy_ema == 1.0
    assert states[3].entropy_ema == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert all(s.tau == 0.3 and s.tau_log == math.log(0.3) and s.active_target_entropy is None for s in states)


def test_ratio_target():
    config = domain.WeightingConfig(tau=1.0, target_entropy_ratio=0.5, tau_lr=1.0)
    states = run(config, [step(1, h=1.0), step(2, h=1.0, mwe=3.0), step(3, h=1.0), step(4, h=1.0, mwe=1.0)])
    # no maximum entropy known yet: no adaptation, the EMA still tracked
    assert states[0].tau == 1.0 and states[0].active_target_entropy is None and states[0].entropy_ema == 1.0
    assert states[1].active_target_entropy == 1.5 and states[1].last_max_weight_entropy == 3.0
    assert states[1].tau_log == pytest.approx(0.5)
    # the next update without a maximum uses the one last reported
    assert states[2].active_target_entropy == 1.5 and states[2].tau_log == pytest.approx(1.0)
    assert states[3].active_target_entropy == 0.5 and states[3].tau_log == pytest.approx(0.5)
    assert not any(s.target_unreachable for s in states)  # ratio <= 1 can always be reached


def test_target_unreachable():
    config = domain.WeightingConfig(tau=1.0, target_entropy=2.0, tau_lr=0.1)
    states = run(config, [step(1, h=1.0), step(2, h=1.0, mwe=1.5), step(3), step(4, mwe=2.5), step(5, mwe=2.0)])
    assert [s.target_unreachable for s in states] == [False, True, True, False, False]
    assert states[2].last_max_weight_entropy == 1.5
    # no target at all: never unreachable
    assert not run(domain.WeightingConfig(tau=1.0), [step(1, mwe=0.0)])[0].target_unreachable


def test_tau_bound_steps():
    config = domain.WeightingConfig(tau=1.0, target_entropy=2.0, tau_lr=1.0, tau_max=1.5, tau_min=0.2)
    states = run(config, [step(s, h=0.0) for s in range(1, 5)] + [step(5, kl=1.0), step(6, h=9.0)]
                 + [step(s, h=9.0) for s in range(7, 40)])
    # any applied step that ends at a bound counts, with or without measurements
    assert [s.tau_bound_steps for s in states[:5]] == [1, 2, 3, 4, 5] and states[4].tau == 1.5
    count = 0
    for s in states:
        count = count + 1 if s.tau in (0.2, 1.5) else 0
        assert s.tau_bound_steps == count
    assert 0 in [s.tau_bound_steps for s in states]  # it left the upper bound...
    assert states[-1].tau == 0.2 and states[-1].tau_bound_steps > 5  # ...and is pinned at the lower one
    # a run whose tau never adapts is never "pinned", even at tau_min
    fixed = domain.WeightingConfig(tau=0.2, tau_min=0.2)
    assert run(fixed, [step(1, h=1.0), step(2)])[-1].tau_bound_steps == 0


def test_old_stored_states_load():
    old = {"tau": 0.5, "beta": 0.1, "tau_log": math.log(0.5), "entropy_ema": 1.0, "global_step": 3, "version": 3,
           "active_target_entropy": 1.0, "update_time": 5.0, "last_weight_entropy": 1.0, "last_measured_kl": None}
    state = ControllerState.from_dict(old)
    assert state.target_unreachable is False and state.tau_bound_steps == 0 and state.last_max_weight_entropy is None
    assert domain.WeightingConfig.from_dict({"tau": 0.5}).target_entropy_ratio is None


# --------------------------------------------------------------------------
# hypothesis: the engine against the plain reference


@st.composite
def configs(draw):
    tau_min = draw(st.one_of(st.just(0.0), st.floats(1e-3, 1.0)))
    tau_max = draw(st.one_of(st.just(0.0), st.floats(tau_min + 1e-3, tau_min + 2.0)))
    kind = draw(st.sampled_from(["none", "fixed", "schedule", "ratio"]))
    tau = max(draw(st.floats(1e-3, 3.0)), tau_min)
    return domain.WeightingConfig(
        tau=min(tau, tau_max) if tau_max > 0 else tau,
        beta=draw(st.one_of(st.just(0.0), st.floats(1e-3, 2.0))),
        target_entropy=draw(st.floats(0.0, 3.0)) if kind == "fixed" else None,
        target_entropy_start=draw(st.floats(0.0, 3.0)) if kind == "schedule" else None,
        target_entropy_final=draw(st.floats(0.0, 3.0)) if kind == "schedule" else None,
        target_entropy_horizon=draw(st.integers(-2, 20)),
        target_entropy_ratio=draw(st.floats(0.01, 1.0)) if kind == "ratio" else None,
        tau_lr=draw(st.floats(0.0, 3.0)),
        tau_min=tau_min,
        tau_max=tau_max,
        tau_warmup_steps=draw(st.integers(0, 3)),
        kl_target=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))),
        kl_horizon=draw(st.sampled_from([0, 1, 2, 10])),
        kl_step_size=draw(st.one_of(st.just(0.0), st.floats(0.01, 3.0))),
        meta_enabled=draw(st.booleans()),
        meta_tau_lr=draw(st.floats(0.0, 1.0)),
        meta_beta_lr=draw(st.floats(0.0, 1.0)),
    )


@st.composite
def updates(draw):
    out, s = [], draw(st.integers(0, 2))
    for _ in range(draw(st.integers(0, 25))):
        s += draw(st.integers(0, 3))
        out.append(step(
            s,
            h=draw(st.one_of(st.none(), st.floats(0.0, 4.0))),
            kl=draw(st.one_of(st.none(), st.floats(0.0, 3.0))),
            lr_scale=draw(st.one_of(st.just(1.0), st.floats(0.0, 2.0))),
            mwe=draw(st.one_of(st.none(), st.floats(0.0, 4.0))),
            tau_grad=draw(st.one_of(st.none(), st.floats(-3.0, 3.0))),
        ))
    return out


def _close(a, b, tol=1e-9):
    if a is None or b is None:
        return a is b
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol * max(1.0, abs(b))


@given(config=configs(), sequence=updates())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_engine_matches_reference(config, sequence):
    rconfig = ref_config(config)
    state, want = ControllerState.initial(config, now=0.0), ref.initial_state(rconfig)
    for u in sequence:
        state = apply_update(config, state, u, now=0.0)
        want = ref.controller_update(rconfig, want, u.global_step, u.weight_entropy, u.measured_kl, u.tau_grad,
                                     u.beta_grad, u.lr_scale, u.max_weight_entropy)
        assert _close(state.tau, want.tau) and _close(state.beta, want.beta), (state, want)
        assert _close(state.entropy_ema, want.ema), (state, want)
        # (the meta controller floors log tau at log 1e-12, as test_controller.py notes)
        assert config.meta_enabled or _close(state.tau_log, want.log_tau), (state, want)
        assert (state.global_step, state.version) == (want.step, want.version)
        assert state.tau_bound_steps == want.bound_steps
        target, top = state.active_target_entropy, state.last_max_weight_entropy
        assert state.target_unreachable == (target is not None and top is not None and target > top)
        if target is None or top is None or abs(target - top) > 1e-9:  # the schedule's rounding aside
            assert state.target_unreachable == want.unreachable
        assert state.last_max_weight_entropy == want.last_max_entropy
        assert state.beta > 0 or config.beta == 0 or config.meta_enabled  # the KL controller never zeroes beta
        if not config.meta_enabled and state.tau != math.inf:
            # anti-windup: log tau never strays beyond a bound
            if config.tau_max > 0:
                assert state.tau_log <= math.log(config.tau_max) + 1e-12
            if config.tau_min > 0:
                assert state.tau_log >= math.log(config.tau_min) - 1e-12


# --------------------------------------------------------------------------
# through the server


ADAPTIVE = WeightingConfig(tau=0.4, beta=0.05, target_entropy=1.2, tau_lr=0.7, tau_min=0.05, tau_max=2.0,
                           kl_target=0.1, kl_horizon=5, kl_step_size=0.5)


def _sequence(start: int, n: int) -> list[dict]:
    return [dict(global_step=start + i, weight_entropy=1.0 + 0.9 * math.sin(0.7 * (start + i)),  # >= 0: an entropy
                 measured_kl=0.1 + 0.08 * math.cos(1.3 * (start + i)), max_weight_entropy=2.0 + 0.1 * (i % 3))
            for i in range(n)]


STATE_FIELDS = ("tau", "beta", "tau_log", "entropy_ema", "global_step", "version", "active_target_entropy",
                "last_weight_entropy", "last_measured_kl", "target_unreachable", "tau_bound_steps",
                "last_max_weight_entropy")


def assert_states_equal(a, b, tol=1e-12):
    for name in STATE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, float) and isinstance(y, float):
            assert abs(x - y) <= tol * max(1.0, abs(y)), (name, x, y)
        else:
            assert x == y, (name, x, y)


def _continue_both(client, original: str, copy: str, steps: int = 20) -> None:
    for update in _sequence(20, steps):
        a = client.update_controller(original, **update).state
        b = client.update_controller(copy, **update).state
        assert_states_equal(b, a)


def test_export_import_continue_through_the_server(client, run_id):
    client.create_run(run_id, ADAPTIVE)
    for update in _sequence(1, 12):
        client.update_controller(run_id, **update)
    exported = client.get_run(run_id)
    assert exported.state.version == 12 and exported.state.entropy_ema is not None
    copy = client.create_run(run_id + "-copy", exported.config, initial_state=exported.state)
    assert_states_equal(copy.state, exported.state, tol=0.0)
    # idempotent: the same import again returns the run; another config is refused
    again = client.create_run(run_id + "-copy", exported.config, initial_state=exported.state)
    assert again.state.version == 12
    with pytest.raises(AlreadyExistsError):
        client.create_run(run_id + "-copy", dataclasses.replace(exported.config, tau_lr=0.1),
                          initial_state=exported.state)
    _continue_both(client, run_id, run_id + "-copy")


def _ctl(server, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return ctl_main(["--target", server.target, *argv], out=out), out.getvalue()


def test_export_import_continue_through_maxentctl(server, client, run_id, tmp_path):
    client.create_run(run_id, ADAPTIVE)
    for update in _sequence(1, 12):
        client.update_controller(run_id, **update)
    path = tmp_path / "run.json"
    assert _ctl(server, "export", run_id, "-o", str(path))[0] == 0
    data = json.loads(path.read_text())
    for name in STATE_FIELDS:
        assert name in data["state"], name
    code, text = _ctl(server, "import", str(path), "--run-id", run_id + "-copy")
    assert code == 0 and "version=12" in text
    assert_states_equal(client.get_run(run_id + "-copy").state, client.get_run(run_id).state, tol=0.0)
    _continue_both(client, run_id, run_id + "-copy")


def test_import_of_an_old_export_without_the_new_fields(server, client, run_id, tmp_path):
    client.create_run(run_id, ADAPTIVE)
    client.update_controller(run_id, global_step=1, weight_entropy=0.5)
    path = tmp_path / "run.json"
    assert _ctl(server, "export", run_id, "-o", str(path))[0] == 0
    data = json.loads(path.read_text())
    for name in ("target_unreachable", "tau_bound_steps", "last_max_weight_entropy", "pending_step",
                 "pending_reporters"):
        data["state"].pop(name, None)
    path.write_text(json.dumps(data))
    assert _ctl(server, "import", str(path), "--run-id", run_id + "-copy")[0] == 0
    assert_states_equal(client.get_run(run_id + "-copy").state, client.get_run(run_id).state, tol=0.0)


def test_seed_format_import(server, client, run_id, tmp_path, capsys):
    client.create_run(run_id, ADAPTIVE)
    for update in _sequence(1, 5):
        client.update_controller(run_id, **update)
    original = client.get_run(run_id)
    seed = tmp_path / "controller.json"
    assert _ctl(server, "export", run_id, "--format", "seed", "-o", str(seed))[0] == 0
    # without a config: one clear line, nothing created
    code, _ = _ctl(server, "import", str(seed), "--run-id", run_id + "-seed")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--config" in err[0] and "seed-format" in err[0]
    config = tmp_path / "config.json"
    assert _ctl(server, "export", run_id, "-o", str(config))[0] == 0
    code, _ = _ctl(server, "import", str(seed), "--run-id", run_id + "-seed", "--config", str(config))
    assert code == 0
    state = client.get_run(run_id + "-seed").state
    assert (state.tau, state.beta, state.tau_log, state.entropy_ema) == (
        original.state.tau, original.state.beta, original.state.tau_log, original.state.entropy_ema)
    assert state.version == 0 and state.global_step == 0 and state.active_target_entropy == 1.2
    # --set alone is a config as well
    code, _ = _ctl(server, "import", str(seed), "--run-id", run_id + "-set", "--set", "target_entropy=1.0",
                   "--set", "tau_lr=0.5")
    assert code == 0 and client.get_run(run_id + "-set").config.tau_lr == 0.5


def test_ratio_target_through_the_server(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=1.0, target_entropy_ratio=0.5, tau_lr=1.0))
    state = client.update_controller(run_id, global_step=1, weight_entropy=1.0, max_weight_entropy=3.0).state
    assert state.active_target_entropy == 1.5 and state.last_max_weight_entropy == 3.0
    assert state.tau_log == pytest.approx(0.5) and not state.target_unreachable
    assert client.get_run(run_id).config.target_entropy_ratio == 0.5


def _violations(call) -> set[str]:
    with pytest.raises(InvalidArgumentError) as info:
        call()
    return {v.field for v in info.value.violations}


def test_validation(client, run_id):
    tau_only = WeightingConfig(tau=0.0, beta=0.1, denominator=WeightDenominator.TAU)
    assert "config.tau" in _violations(lambda: client.create_run(run_id, tau_only))
    client.create_run(run_id + "-grpo", dataclasses.replace(tau_only, train_grpo_objective=True))
    assert _violations(lambda: client.create_run(run_id, WeightingConfig(tau=1.0, target_entropy_ratio=1.5))) == {
        "config.target_entropy_ratio"}
    assert _violations(lambda: client.create_run(run_id, WeightingConfig(tau=1.0, target_entropy_ratio=0.0))) == {
        "config.target_entropy_ratio"}
    both = WeightingConfig(tau=1.0, target_entropy_ratio=0.5, target_entropy=1.0)
    assert _violations(lambda: client.create_run(run_id, both)) == {"config.target_entropy_ratio"}
    client.create_run(run_id, WeightingConfig(tau=1.0))
    assert _violations(lambda: client.update_controller(run_id, global_step=1, max_weight_entropy=-1.0)) == {
        "max_weight_entropy"}
    assert _violations(lambda: client.update_controller(run_id, global_step=1, max_weight_entropy=math.inf)) == {
        "max_weight_entropy"}


def test_initial_state_validation(client, run_id):
    def create(**fields):
        request = pb.CreateRunRequest(run_id=run_id + "-import", config=pb.WeightingConfig(tau=1.0))
        request.initial_state.CopyFrom(pb.ControllerState(**{"tau": 1.0, **fields}))
        return lambda: client._call("CreateRun", request, None)

    assert _violations(create(beta=-1.0)) == {"initial_state.beta"}
    assert _violations(create(tau_log=math.nan)) == {"initial_state.tau_log"}
    assert _violations(create(entropy_ema=math.inf)) == {"initial_state.entropy_ema"}
    assert _violations(create(version=-1, global_step=-2)) == {"initial_state.version", "initial_state.global_step"}
    assert _violations(create(tau=0.0)) == {"initial_state.tau"}
    # run_id and update_time are ignored
    run = client._call("CreateRun", pb.CreateRunRequest(
        run_id=run_id + "-ok", config=pb.WeightingConfig(tau=1.0),
        initial_state=pb.ControllerState(run_id="elsewhere", tau=0.3, tau_log=-1.0, version=7, global_step=9,
                                         tau_bound_steps=2, target_unreachable=True)), None).run
    assert run.state.run_id == run_id + "-ok" and (run.state.version, run.state.global_step) == (7, 9)
    assert run.state.tau_bound_steps == 2 and run.state.target_unreachable and run.state.tau_log == -1.0


def test_run_gauges_show_target_unreachable_and_tau_bound_steps():
    from maxent_server.metrics import RunGauges, _state_values

    gauges = RunGauges(4)
    gauges.update("r", _state_values(pb.ControllerState(tau=1.0, version=3, target_unreachable=True,
                                                        tau_bound_steps=51)))
    assert gauges.snapshot()["r"]["target_unreachable"] == 1.0 and gauges.snapshot()["r"]["tau_bound_steps"] == 51
    names = {family.name for family in gauges.collect()}
    assert {"maxent_run_target_unreachable", "maxent_run_tau_bound_steps"} <= names
