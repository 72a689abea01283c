"""Prometheus metrics: the metric set in process, and a live server's /metrics
scraped while calls run (values move, runs come and go, promtool accepts it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from maxent_api import SERVICE_NAME
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from maxent_server.metrics import Metrics, RunGauges
from ops_support import rpc_count, samples, scrape, value
from server_process import ServerProcess, free_port

CONFIG = pb.WeightingConfig(tau=0.5, beta=0.05, target_entropy=1.0, tau_lr=0.2, tau_min=0.01, tau_max=5.0,
                            kl_target=0.1, kl_horizon=10, kl_step_size=0.2)


def promtool_check(text: str) -> None:
    """`promtool check metrics` on an exposition; skipped without promtool
    unless MAXENT_REQUIRE_PROMTOOL=1 (CI sets it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("MAXENT_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is not installed (Debian package prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- in process ----------------------------------------------------------------------


def test_run_gauges_drop_the_least_recently_touched_run():
    gauges = RunGauges(max_runs=2)
    gauges.update("a", {"tau": 1.0, "version": 1})
    gauges.update("b", {"tau": 2.0, "version": 1})
    gauges.update("a", {"beta": 0.5})  # touches a: b is now the oldest
    gauges.update("c", {"tau": 3.0, "version": 1})
    assert set(gauges.snapshot()) == {"a", "c"}
    gauges.remove("a")
    assert set(gauges.snapshot()) == {"c"}
    parsed = samples(Metrics(max_runs=2, process_metrics=False).render()[0])
    assert value(parsed, "maxent_metrics_runs") == 0


def test_run_gauges_ignore_an_older_controller_version():
    gauges = RunGauges(max_runs=10)
    gauges.update("r", {"tau": 0.7, "beta": 0.2, "version": 5})
    gauges.update("r", {"tau": 0.5, "beta": 0.1, "version": 4, "weight_entropy": 1.5})  # a slow read of v4
    assert gauges.snapshot()["r"] == {"tau": 0.7, "beta": 0.2, "version": 5.0, "weight_entropy": 1.5}
    gauges.update("r", {"tau": 0.9, "version": 6, "target_entropy": None})
    assert gauges.snapshot()["r"]["tau"] == 0.9 and "target_entropy" not in gauges.snapshot()["r"]


def test_reward_observer_counts_per_name():
    metrics = Metrics(process_metrics=False)
    failed = np.array([[True, False, False], [False, False, False], [True, True, False]])
    timed_out = np.array([[True, False, False], [False, False, False], [False, True, False]])
    metrics.rewards_evaluated(["slow", "fmt", "slow"], SimpleNamespace(failed=failed, timed_out=timed_out), 0.25)
    parsed = samples(metrics.render()[0])
    assert value(parsed, "maxent_reward_evaluations_total", reward="slow") == 6
    assert value(parsed, "maxent_reward_failures_total", reward="slow") == 3
    assert value(parsed, "maxent_reward_timeouts_total", reward="slow") == 2
    assert value(parsed, "maxent_reward_failures_total", reward="fmt") == 0
    assert value(parsed, "maxent_reward_evaluation_duration_seconds_count", reward="slow") == 1  # once per call
    assert value(parsed, "maxent_reward_evaluation_duration_seconds_sum", reward="fmt") == 0.25


def test_render_filters_runs_and_passes_promtool():
    metrics = Metrics(process_metrics=False)
    for run in ("team-a/1", "team-b/1"):
        metrics.runs.update(run, {"tau": 0.5, "beta": 0.1, "version": 2, "weight_entropy": 1.1})
    metrics.call_started(SERVICE_NAME, "GetRun")
    metrics.call_finished(SERVICE_NAME, "GetRun", "NOT_FOUND", 0.004, 10, 0)
    body, content_type = metrics.render()
    text = body.decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'run="team-b/1"' in text
    filtered = metrics.render(run_filter=lambda run: run.startswith("team-a/"))[0].decode()
    assert 'run="team-a/1"' in filtered and "team-b" not in filtered
    assert rpc_count(samples(filtered), "GetRun", "NOT_FOUND") == 1
    promtool_check(text)


# -- a live server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    port = free_port()
    proc = ServerProcess(tmp_path_factory.mktemp("metrics") / "data",
                         extra_args=["--metrics-port", str(port), "--metrics-max-runs", "4", "--reward-workers", "2",
                                     "--reward-timeout-seconds", "2"])
    proc.start()
    channel = grpc.insecure_channel(proc.target)
    yield SimpleNamespace(proc=proc, stub=pb_grpc.MaxEntServiceStub(channel), url=f"http://127.0.0.1:{port}/metrics")
    channel.close()
    proc.stop()


def _scrape(live) -> dict:
    status, text = scrape(live.url)
    assert status == 200, text
    return samples(text)


def test_a_reward_call_past_its_deadline_leaves_no_queued_work(live):
    """32 completions that each take the server's whole 2 s limit: 32 s of
    work for 2 workers. While the call runs the queue gauge shows them; once
    its 1.5 s deadline passes the server drops what is still queued."""
    request = pb.ComputeRewardStatisticsRequest(
        group_sizes=[32], completions=[f"SLEEP {k}" for k in range(32)], answers=[""],
        rewards=[pb.RewardTerm(name="sleepy", weight=1.0)],
    )
    call = live.stub.ComputeRewardStatistics.future(request, timeout=1.5)
    seen = 0.0
    while not call.done():
        seen = max(seen, value(_scrape(live), "maxent_reward_queued_items"))
        time.sleep(0.05)
    assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen > 0
    deadline = time.monotonic() + 5
    while value(_scrape(live), "maxent_reward_queued_items") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert value(_scrape(live), "maxent_reward_queued_items") == 0


def test_values_move_while_calls_run(live):
    stub = live.stub
    run = "metrics/moving"
    stub.CreateRun(pb.CreateRunRequest(run_id=run, config=CONFIG), timeout=60)
    before = _scrape(live)
    stop = threading.Event()
    errors: list[BaseException] = []
    steps = {"n": 0, "floor": 3}

    def trainer() -> None:
        rng = np.random.default_rng(0)
        try:
            while not stop.is_set() or steps["n"] < steps["floor"]:
                sizes = [4, 4, 3]
                stats = stub.ComputeRewardStatistics(
                    pb.ComputeRewardStatisticsRequest(run_id=run, group_sizes=sizes, utilities=rng.normal(size=11)),
                    timeout=60)
                weights = stub.ComputeWeightStats(
                    pb.ComputeWeightStatsRequest(run_id=run, group_sizes=sizes, q_values=stats.q_values,
                                                 ref_logp_sum=rng.normal(-10, 2, size=11), ref_token_counts=[5] * 11),
                    timeout=60)
                steps["n"] += 1
                stub.UpdateController(
                    pb.UpdateControllerRequest(run_id=run, request_id=f"step-{steps['n']}", global_step=steps["n"],
                                               weight_entropy=weights.weight_entropy, measured_kl=0.02 * steps["n"]),
                    timeout=60)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=trainer)
    thread.start()
    scrapes = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(scrapes) < 5:
            time.sleep(0.2)
            scrapes.append(_scrape(live))
            if len(scrapes) == 1:  # at least one full step after the first scrape
                steps["floor"] = steps["n"] + 2
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
    after = _scrape(live)
    updates = steps["n"]
    assert rpc_count(after, "UpdateController") - rpc_count(before, "UpdateController") == updates
    assert rpc_count(after, "ComputeWeightStats") - rpc_count(before, "ComputeWeightStats") == updates
    counts = [rpc_count(s, "UpdateController") for s in scrapes + [after]]
    assert counts == sorted(counts) and counts[-1] > counts[0]  # moved while the calls ran
    assert value(after, "maxent_controller_updates_total") - value(before, "maxent_controller_updates_total") == updates
    duration = dict(name="maxent_rpc_duration_seconds_count", service=SERVICE_NAME,
                    method="UpdateController", code="OK")
    assert value(after, **duration) - value(before, **duration) == updates
    completions = value(after, "maxent_request_completions_sum", method="ComputeWeightStats") - value(
        before, "maxent_request_completions_sum", method="ComputeWeightStats")
    assert completions == 11 * updates
    state = stub.GetRun(pb.GetRunRequest(run_id=run), timeout=60).run.state
    assert value(after, "maxent_run_controller_version", run=run) == state.version == updates
    assert value(after, "maxent_run_tau", run=run) == pytest.approx(state.tau)
    assert value(after, "maxent_run_tau", run=run) != pytest.approx(CONFIG.tau)  # the controller moved tau
    assert value(after, "maxent_run_beta", run=run) == pytest.approx(state.beta)
    assert value(after, "maxent_run_kl_nats", run=run) == pytest.approx(0.02 * updates)
    assert value(after, "maxent_run_weight_entropy_ema_nats", run=run) == pytest.approx(state.entropy_ema)
    assert value(after, "maxent_run_target_entropy_nats", run=run) == pytest.approx(1.0)
    assert value(after, "maxent_run_reward_std", run=run, default=None) is not None
    assert value(after, "maxent_rpc_in_flight_requests", service=SERVICE_NAME,
                 method="UpdateController") == 0


def test_replays_errors_and_deleted_runs(live):
    stub = live.stub
    run = "metrics/replay"
    stub.CreateRun(pb.CreateRunRequest(run_id=run, config=CONFIG), timeout=60)
    before = _scrape(live)
    update = pb.UpdateControllerRequest(run_id=run, request_id="once", global_step=1, weight_entropy=0.5)
    assert not stub.UpdateController(update, timeout=60).replayed
    assert stub.UpdateController(update, timeout=60).replayed
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetRun(pb.GetRunRequest(run_id="metrics/none"), timeout=60)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        stub.ComputeRewardStatistics(pb.ComputeRewardStatisticsRequest(group_sizes=[1], utilities=[float("nan")]),
                                     timeout=60)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A call's counters are recorded as its handler unwinds, which for an
    # aborted call can be just after the client has its status: wait a moment.
    deadline = time.monotonic() + 10
    while True:
        after = _scrape(live)
        settled = rpc_count(after, "ComputeRewardStatistics", "INVALID_ARGUMENT") > rpc_count(
            before, "ComputeRewardStatistics", "INVALID_ARGUMENT") and rpc_count(
            after, "GetRun", "NOT_FOUND") > rpc_count(before, "GetRun", "NOT_FOUND")
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(after, "maxent_controller_replays_total") - value(before, "maxent_controller_replays_total") == 1
    assert value(after, "maxent_controller_updates_total") - value(before, "maxent_controller_updates_total") == 1
    assert rpc_count(after, "GetRun", "NOT_FOUND") - rpc_count(before, "GetRun", "NOT_FOUND") == 1
    assert rpc_count(after, "ComputeRewardStatistics", "INVALID_ARGUMENT") - rpc_count(
        before, "ComputeRewardStatistics", "INVALID_ARGUMENT") == 1
    assert value(after, "maxent_run_controller_version", run=run) == 1
    stub.DeleteRun(pb.DeleteRunRequest(run_id=run), timeout=60)
    gone = _scrape(live)
    assert not [key for key in gone if ("run", run) in key[1]]


def test_run_series_are_bounded(live):
    stub = live.stub
    runs = [f"metrics/bounded-{i}" for i in range(6)]
    before = _scrape(live)
    for run in runs:
        stub.CreateRun(pb.CreateRunRequest(run_id=run, config=CONFIG), timeout=60)
    after = _scrape(live)
    shown = {dict(labels)["run"] for (name, labels) in after if name == "maxent_run_tau"}
    assert shown == set(runs[-4:])  # --metrics-max-runs 4: the oldest went first
    assert value(after, "maxent_metrics_runs") == 4
    assert value(after, "maxent_metrics_runs_evicted_total") - value(before, "maxent_metrics_runs_evicted_total") >= 2
    for run in runs:
        stub.DeleteRun(pb.DeleteRunRequest(run_id=run), timeout=60)


def test_reward_metrics_and_in_flight(live):
    stub = live.stub
    before = _scrape(live)
    completions = ["<think>a</think> <answer>1</answer>", "SLEEP", "plain", "SLEEP"]
    request = pb.ComputeRewardStatisticsRequest(
        group_sizes=[4], completions=completions, answers=["1"],
        rewards=[pb.RewardTerm(name="format", weight=1.0), pb.RewardTerm(name="sleepy", weight=1.0)])
    result: dict = {}

    def call() -> None:
        try:
            result["response"] = stub.ComputeRewardStatistics(request, timeout=120)
        except grpc.RpcError as error:  # pragma: no cover - reported below
            result["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    in_flight = []
    while thread.is_alive():  # the sleepy completions hold the call for the 2 s time limit
        in_flight.append(value(_scrape(live), "maxent_rpc_in_flight_requests", service=SERVICE_NAME,
                               method="ComputeRewardStatistics"))
        time.sleep(0.05)
    thread.join()
    assert "error" not in result, result.get("error")
    assert max(in_flight, default=0) >= 1
    after = _scrape(live)

    def delta(name: str, reward: str) -> float:
        return value(after, name, reward=reward) - value(before, name, reward=reward)

    assert delta("maxent_reward_evaluations_total", "sleepy") == 4
    assert delta("maxent_reward_timeouts_total", "sleepy") == 2
    assert delta("maxent_reward_failures_total", "sleepy") == 2
    assert delta("maxent_reward_failures_total", "format") == 0
    assert delta("maxent_reward_evaluation_duration_seconds_count", "sleepy") == 1
    assert delta("maxent_reward_evaluation_duration_seconds_sum", "sleepy") >= 1.0
    assert value(after, "maxent_rpc_in_flight_requests", service=SERVICE_NAME,
                 method="ComputeRewardStatistics") == 0


def test_live_scrape_passes_promtool(live):
    stub = live.stub
    stub.CreateRun(pb.CreateRunRequest(run_id="metrics/promtool", config=CONFIG), timeout=60)
    stub.UpdateController(pb.UpdateControllerRequest(run_id="metrics/promtool", global_step=1, weight_entropy=0.3,
                                                     measured_kl=0.01), timeout=60)
    status, text = scrape(live.url)
    assert status == 200
    for name in ("maxent_rpc_requests_total", "maxent_rpc_duration_seconds_bucket", "maxent_run_tau",
                 "process_cpu_seconds_total"):
        assert name in text
    promtool_check(text)


def test_other_paths_are_not_found(live):
    status, _ = scrape(live.url.replace("/metrics", "/other"))
    assert status == 404
    assert "metrics on http://127.0.0.1:" in live.proc.log()


# -- the deploy/ assets match the metrics ---------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _exposed_names(text: str) -> set[str]:
    """Every sample name the exposition can carry, from its # TYPE lines."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.update([f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name])
    return names


def _queried_names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:maxent|process)_[a-z0-9_]+)", text))


def test_dashboard_and_alerts_query_real_metrics(live):
    status, text = scrape(live.url)
    assert status == 200
    exposed = _exposed_names(text)
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "maxent-grpo.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert exprs
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for topic in ("τ", "β", "entropy", "KL", "Latency", "Errors"):
        assert topic in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    missing = (_queried_names(" ".join(exprs)) | _queried_names(rules)) - exposed
    assert not missing, missing


def test_prometheus_config_and_rules_are_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("MAXENT_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is not installed (Debian package prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        done = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
