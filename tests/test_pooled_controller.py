"""Several jobs, one run (docs/math.md §9): reports of one step are pooled
(n-weighted means of entropy and KL) and the controller steps once per step,
through a real server on SQLite and through two replicas on one Redis; stale,
out-of-order and retried reports; the pooling function itself."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from maxent_client import MaxEntClient, MaxEntError, WeightingConfig
from maxent_server import domain
from maxent_server.domain import ControllerState, ControllerUpdate, apply_update
from maxent_server.engine.pooling import ReportResult, report
from pooled_job import job_name, measurements
from redis_process import REDIS_SERVER, SKIP_REASON, RedisProcess
from server_process import ServerProcess

JOBS, STEPS = 4, 50
SETTINGS = dict(tau=0.5, beta=0.1, target_entropy=1.0, tau_lr=0.05, kl_target=0.1, kl_horizon=5,
                kl_step_size=0.5, tau_min=0.01, tau_max=5.0)
JOB_SCRIPT = Path(__file__).with_name("pooled_job.py")


def expected_trajectory(reporters: int) -> list[ControllerState]:
    """The states of one controller fed, at each step, the n-weighted means
    of what the jobs report."""
    config = domain.WeightingConfig(**SETTINGS, reporters_per_step=reporters)
    state = ControllerState.initial(config, 0.0)
    states = []
    for step in range(1, STEPS + 1):
        reports = [measurements(job, step) for job in range(JOBS)]
        weights = [1.0 if n is None else n for _, _, n in reports]
        entropy = sum(w * h for w, (h, _, _) in zip(weights, reports)) / sum(weights)
        kl = sum(w * k for w, (_, k, _) in zip(weights, reports)) / sum(weights)
        state = apply_update(config, state, ControllerUpdate(step, weight_entropy=entropy, measured_kl=kl), 0.0)
        states.append(state)
    return states


def run_jobs(targets: list[str], run_id: str) -> list[list[dict]]:
    """JOBS processes, job j talking to targets[j % len(targets)]; each one's report lines."""
    procs = [
        subprocess.Popen([sys.executable, str(JOB_SCRIPT), targets[job % len(targets)], run_id, str(job), str(STEPS)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for job in range(JOBS)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        outputs.append([json.loads(line) for line in out.splitlines()])
    return outputs


def check_pooled_run(client: MaxEntClient, run_id: str, outputs: list[list[dict]]) -> None:
    state = client.get_run(run_id).state
    assert (state.version, state.global_step) == (STEPS, STEPS)
    assert state.pending_reporters == ()
    lines = [line for job in outputs for line in job]
    assert len(lines) == JOBS * STEPS
    assert not any(line["stale"] or line["partial"] or line["replayed"] for line in lines)
    applied = sorted((line for line in lines if line["applied"]), key=lambda line: line["step"])
    # exactly one report per step applied it, and the version rose by one per step
    assert [line["step"] for line in applied] == list(range(1, STEPS + 1))
    assert [line["version"] for line in applied] == list(range(1, STEPS + 1))
    for line, want in zip(applied, expected_trajectory(JOBS)):
        assert line["global_step"] == want.global_step
        assert line["tau"] == pytest.approx(want.tau, rel=1e-12, abs=1e-12)
        assert line["beta"] == pytest.approx(want.beta, rel=1e-12, abs=1e-12)
    want = expected_trajectory(JOBS)[-1]
    assert state.tau == pytest.approx(want.tau, rel=1e-12, abs=1e-12)
    assert state.beta == pytest.approx(want.beta, rel=1e-12, abs=1e-12)
    assert state.entropy_ema == pytest.approx(want.entropy_ema, rel=1e-12, abs=1e-12)


# -- through a real server -------------------------------------------------------


@pytest.mark.slow
def test_four_jobs_pool_into_one_controller_sqlite(server, client, run_id):
    client.create_run(run_id, WeightingConfig(**SETTINGS, reporters_per_step=JOBS))
    check_pooled_run(client, run_id, run_jobs([server.target], run_id))


@pytest.mark.slow
@pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)
def test_four_jobs_pool_into_one_controller_two_redis_replicas(tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    url = redis.url(prefix=f"pooled-{uuid.uuid4().hex[:8]}", timeout=5)
    replicas = [ServerProcess(tmp_path / f"replica-{i}" / "data", extra_args=[
        "--state-store", url, "--reward-workers", "1", "--grace-seconds", "5"]) for i in range(2)]
    try:
        for i in range(2):
            (tmp_path / f"replica-{i}").mkdir()
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(r.start, 180) for r in replicas]:
                f.result()
        run_id = "pooled/replicas"
        with MaxEntClient(replicas[0].target, timeout=60) as client:
            client.create_run(run_id, WeightingConfig(**SETTINGS, reporters_per_step=JOBS))
            check_pooled_run(client, run_id, run_jobs([r.target for r in replicas], run_id))
    finally:
        for r in replicas:
            r.stop()
        redis.stop()


def test_stale_out_of_order_and_retried_reports(client, run_id):
    client.create_run(run_id, WeightingConfig(**SETTINGS, reporters_per_step=3))
    config = domain.WeightingConfig(**SETTINGS, reporters_per_step=3)

    first = client.update_controller(run_id, global_step=1, weight_entropy=0.4, measured_kl=0.2, sample_count=2,
                                     reporter_id="a", request_id="a:1")
    assert (first.applied, first.stale, first.partial, first.replayed) == (False, False, False, False)
    assert (first.state.version, first.state.pending_step, first.state.pending_reporters) == (0, 1, ("a",))

    retried = client.update_controller(run_id, global_step=1, weight_entropy=0.4, measured_kl=0.2, sample_count=2,
                                       reporter_id="a", request_id="a:1")
    assert retried.replayed and not retried.applied and not retried.stale
    assert retried.state == first.state

    # the same reporter again under another request id: its first report counts
    again = client.update_controller(run_id, global_step=1, weight_entropy=9.0, reporter_id="a", request_id="a:1b")
    assert (again.applied, again.stale, again.replayed) == (False, False, False)
    assert again.state.pending_reporters == ("a",)

    # step 2 before all of step 1: step 1 applies with what it has (a's report), partial
    ahead = client.update_controller(run_id, global_step=2, weight_entropy=0.9, reporter_id="b", request_id="b:2")
    assert (ahead.applied, ahead.partial, ahead.stale) == (True, True, False)
    want = apply_update(config, ControllerState.initial(config, 0.0),
                        ControllerUpdate(1, weight_entropy=0.4, measured_kl=0.2), 0.0)
    assert (ahead.state.version, ahead.state.global_step) == (1, 1)
    assert ahead.state.tau == pytest.approx(want.tau, rel=1e-12)
    assert ahead.state.beta == pytest.approx(want.beta, rel=1e-12)
    assert (ahead.state.pending_step, ahead.state.pending_reporters) == (2, ("b",))

    # a late report of step 1 is stale: nothing changes, no error
    late = client.update_controller(run_id, global_step=1, weight_entropy=0.1, reporter_id="c", request_id="c:1")
    assert (late.stale, late.applied, late.partial) == (True, False, False)
    assert late.state == ahead.state

    client.update_controller(run_id, global_step=2, weight_entropy=0.6, reporter_id="c", request_id="c:2")
    done = client.update_controller(run_id, global_step=2, weight_entropy=0.3, sample_count=2, reporter_id="a",
                                    request_id="a:2")
    assert (done.applied, done.partial, done.stale) == (True, False, False)
    assert (done.state.version, done.state.global_step, done.state.pending_reporters) == (2, 2, ())
    want = apply_update(config, want, ControllerUpdate(2, weight_entropy=(0.9 + 0.6 + 0.6) / 4), 0.0)
    assert done.state.tau == pytest.approx(want.tau, rel=1e-12)
    # the retried first report still answers with what it produced
    assert client.update_controller(run_id, global_step=1, reporter_id="a", request_id="a:1").state == first.state


def test_named_reporter_without_pooling(client, run_id):
    client.create_run(run_id, WeightingConfig(**SETTINGS))
    assert client.update_controller(run_id, global_step=5, weight_entropy=0.5, reporter_id="a").applied
    stale = client.update_controller(run_id, global_step=5, weight_entropy=0.7, reporter_id="b")
    assert stale.stale and not stale.applied and stale.state.version == 1
    # unnamed reports keep today's behaviour: every one applies, even for an earlier step
    back = client.update_controller(run_id, global_step=3, weight_entropy=0.7)
    assert back.applied and not back.stale and (back.state.version, back.state.global_step) == (2, 3)
    assert client.get_run(run_id).config.reporters_per_step == 1


def test_report_validation(client, run_id):
    client.create_run(run_id, WeightingConfig(**SETTINGS))
    for bad in (dict(sample_count=0.0), dict(sample_count=-1.0), dict(sample_count=float("nan")),
                dict(reporter_id="r" * 129)):
        with pytest.raises(MaxEntError) as info:
            client.update_controller(run_id, global_step=1, weight_entropy=0.5, **bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(MaxEntError) as info:
        client.create_run(run_id + "-bad", WeightingConfig(**SETTINGS, reporters_per_step=-1))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.value.violations] == ["config.reporters_per_step"]


# -- the pooling function --------------------------------------------------------


def test_default_report_is_apply_update():
    config = domain.WeightingConfig(**SETTINGS)
    state = ControllerState.initial(config, 0.0)
    for step in (3, 1, 1, 2):  # unnamed, R = 1: every report applies, even backwards
        update = ControllerUpdate(step, weight_entropy=0.2 * step, measured_kl=0.05 * step)
        new, result = report(config, state, update, 1.0)
        assert new == apply_update(config, state, update, 1.0)
        assert result == ReportResult(applied=True)
        state = new


def test_pooled_means_weight_by_sample_count_and_missing_measurements():
    config = domain.WeightingConfig(**SETTINGS, reporters_per_step=3)
    state = ControllerState.initial(config, 0.0)
    state, r1 = report(config, state, ControllerUpdate(1, weight_entropy=0.2, measured_kl=0.3), 1.0,
                       reporter_id="a", sample_count=3.0)
    state, r2 = report(config, state, ControllerUpdate(1, weight_entropy=0.6), 1.0, reporter_id="b")
    assert r1 == r2 == ReportResult() and state.version == 0
    # the pool survives the store's JSON round trip
    state = ControllerState.from_dict(json.loads(json.dumps(state.to_dict())))
    state, r3 = report(config, state, ControllerUpdate(1, measured_kl=0.1), 1.0, reporter_id="c", sample_count=1.0)
    assert r3 == ReportResult(applied=True)
    want = apply_update(config, ControllerState.initial(config, 0.0),
                        ControllerUpdate(1, weight_entropy=(3 * 0.2 + 0.6) / 4, measured_kl=(3 * 0.3 + 0.1) / 4), 1.0)
    assert state.version == 1 and state.pending_reporters == () and state.pending_sums == ()
    assert state.tau == pytest.approx(want.tau, rel=1e-12)
    assert state.beta == pytest.approx(want.beta, rel=1e-12)
    assert state.last_weight_entropy == pytest.approx(want.last_weight_entropy, rel=1e-12)


def test_old_stored_state_and_config_load():
    config = domain.WeightingConfig(**SETTINGS)
    stored_config = {k: v for k, v in config.to_dict().items() if k != "reporters_per_step"}
    assert domain.WeightingConfig.from_dict(stored_config).reporters_per_step == 1
    state = ControllerState.initial(config, 0.0).to_dict()
    for name in ("pending_step", "pending_reporters", "pending_sums"):
        del state[name]
    loaded = ControllerState.from_dict(state)
    assert (loaded.pending_step, loaded.pending_reporters, loaded.pending_sums) == (0, (), ())
