"""Integration tests: a real maxent-server process over a loopback socket."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import reference as ref
from maxent_api import SERVICE_NAME
from maxent_client import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    VersionConflictError,
    WeightDenominator,
    WeightingConfig,
)

CONFIG = WeightingConfig(tau=0.3, beta=0.05, target_entropy=1.0, tau_lr=0.2, tau_min=0.01, tau_max=5.0,
                         kl_target=0.1, kl_horizon=10, kl_step_size=0.2)


def _batch(rng: np.random.Generator, groups: int = 6, k: int = 5):
    sizes = rng.integers(0, k + 1, size=groups)
    n = int(sizes.sum())
    return sizes, rng.normal(size=n), rng.normal(-20, 5, size=n), rng.integers(1, 50, size=n)


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert SERVICE_NAME in services
        assert "grpc.health.v1.Health" in services


def test_run_lifecycle(client, run_id):
    created = client.create_run(run_id, CONFIG)
    assert created.state.version == 0 and created.state.tau == pytest.approx(0.3)
    assert created.config.q_temperature == 1.0 and created.config.q_epsilon == 1e-6  # defaults written out
    again = client.create_run(run_id, CONFIG)  # same config: idempotent
    assert again == created
    with pytest.raises(AlreadyExistsError):
        client.create_run(run_id, WeightingConfig(tau=0.9, beta=0.05))
    assert client.get_run(run_id) == created
    assert run_id in [r.run_id for r in client.list_runs(page_size=1)]
    client.delete_run(run_id)
    with pytest.raises(NotFoundError):
        client.get_run(run_id)
    with pytest.raises(NotFoundError):
        client.delete_run(run_id)


def test_list_runs_pages_in_order(client, run_id):
    ids = [f"{run_id}/{i:02d}" for i in range(7)]
    for rid in reversed(ids):
        client.create_run(rid, CONFIG)
    listed = [r.run_id for r in client.list_runs(page_size=3) if r.run_id.startswith(run_id + "/")]
    assert listed == ids
    for rid in ids:
        client.delete_run(rid)


def test_reward_statistics_match_reference(client):
    rng = np.random.default_rng(7)
    sizes, utilities, _, _ = _batch(rng, groups=20)
    got = client.compute_reward_statistics(utilities=utilities, group_sizes=sizes, q_temperature=0.7)
    want = ref.reward_statistics(sizes.tolist(), utilities.tolist(), q_temperature=0.7)
    np.testing.assert_allclose(got.advantages, want.advantages, atol=1e-9)
    np.testing.assert_allclose(got.q_values, want.q_values, atol=1e-12)
    assert got.reward_mean == pytest.approx(want.reward_mean, abs=1e-12)
    assert got.reward_std == pytest.approx(want.reward_std, abs=1e-12)
    grouped = got.grouped()["q_values"]
    assert [len(g) for g in grouped] == sizes.tolist()


@pytest.mark.parametrize("groups", [2048, 2049])  # x 16 completions: just under and just over the inline limit
def test_small_and_large_batches_take_either_path_with_the_same_numbers(client, run_id, groups):
    """Batches up to 32 768 completions are computed on the server's event
    loop, larger ones in its compute pool; both must give the reference."""
    client.create_run(run_id, WeightingConfig(tau=0.3, beta=0.05, q_temperature=0.5))
    rng = np.random.default_rng(groups)
    utilities = rng.normal(size=(groups, 16))
    ref_logp, counts = rng.normal(-30, 5, size=(groups, 16)), rng.integers(1, 300, size=(groups, 16))
    sizes = [16] * groups
    want = ref.reward_statistics(sizes, utilities.ravel().tolist(), q_temperature=0.5)
    for run in ("", run_id):  # without a run (defaults) and with the run's q_temperature
        got = client.compute_reward_statistics(utilities=utilities, run_id=run,
                                               q_temperature=None if run else 0.5)
        np.testing.assert_allclose(got.q_values, want.q_values, atol=1e-12)
        np.testing.assert_allclose(got.advantages, want.advantages, atol=1e-9)
    got = client.compute_weight_stats(run_id, q_values=want.q_values, ref_logp_sum=ref_logp, ref_token_counts=counts,
                                      group_sizes=sizes)
    weights = ref.weight_stats(sizes, want.q_values, ref_logp.ravel().tolist(), counts.ravel().tolist(),
                               tau=0.3, beta=0.05)
    np.testing.assert_allclose(got.weights, weights.weights, atol=1e-9)
    assert got.weight_entropy == pytest.approx(weights.weight_entropy, abs=1e-9)


def test_reward_statistics_use_run_defaults(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=1, q_temperature=0.25, scale_rewards=False))
    utilities = [[0.0, 1.0, 3.0]]
    got = client.compute_reward_statistics(utilities=utilities, run_id=run_id)
    want = ref.reward_statistics([3], [0.0, 1.0, 3.0], q_temperature=0.25, scale_rewards=False)
    np.testing.assert_allclose(got.q_values, want.q_values, atol=1e-12)
    np.testing.assert_allclose(got.advantages, want.advantages, atol=1e-12)


def test_weight_stats_match_reference(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.4, beta=0.1, denominator=WeightDenominator.TAU))
    rng = np.random.default_rng(11)
    sizes, utilities, ref_logp, counts = _batch(rng, groups=15)
    q = ref.reward_statistics(sizes.tolist(), utilities.tolist()).q_values
    got = client.compute_weight_stats(run_id, q_values=q, ref_logp_sum=ref_logp, ref_token_counts=counts,
                                      group_sizes=sizes)
    want = ref.weight_stats(sizes.tolist(), q, ref_logp.tolist(), counts.tolist(), tau=0.4, beta=0.1, denominator="tau")
    np.testing.assert_allclose(got.weights, want.weights, atol=1e-9)
    assert got.weight_entropy == pytest.approx(want.weight_entropy, abs=1e-9)
    assert got.weight_entropy_min == pytest.approx(want.weight_entropy_min, abs=1e-9)
    assert got.weight_entropy_max == pytest.approx(want.weight_entropy_max, abs=1e-9)
    np.testing.assert_allclose(got.advantage_entropy, want.advantage_entropy, atol=1e-9)
    assert (got.tau, got.beta, got.controller_version) == (0.4, 0.1, 0)


def test_weight_stats_follow_controller(client, run_id):
    client.create_run(run_id, CONFIG)
    before = client.compute_weight_stats(run_id, q_values=[[0.2, 0.8]], ref_logp_sum=[-1, -2], ref_token_counts=[1, 1])
    state = client.update_controller(run_id, global_step=3, weight_entropy=0.1).state
    after = client.compute_weight_stats(run_id, q_values=[[0.2, 0.8]], ref_logp_sum=[-1, -2], ref_token_counts=[1, 1])
    assert after.controller_version == 1 == state.version
    assert after.tau == state.tau != before.tau
    want = ref.weight_stats([2], [0.2, 0.8], [-1, -2], [1, 1], tau=state.tau, beta=state.beta)
    np.testing.assert_allclose(after.weights, want.weights, atol=1e-12)


def test_update_controller_matches_reference_and_replays(client, run_id):
    client.create_run(run_id, CONFIG)
    config = ref.ControllerConfig(**{k: getattr(CONFIG, k) for k in ref.ControllerConfig.__dataclass_fields__})
    expected = ref.initial_state(config)
    measurements = [(1, 0.4, 0.3), (2, 0.6, 0.05), (3, 1.5, 0.1), (4, 0.9, 0.2)]
    for step, entropy, kl in measurements:
        result = client.update_controller(run_id, global_step=step, weight_entropy=entropy, measured_kl=kl,
                                          request_id=f"step-{step}")
        expected = ref.controller_update(config, expected, step, entropy, kl)
        assert not result.replayed
        assert result.state.tau == pytest.approx(expected.tau, rel=1e-12)
        assert result.state.beta == pytest.approx(expected.beta, rel=1e-12)
        assert result.state.entropy_ema == pytest.approx(expected.ema, rel=1e-12)
    assert result.state.version == len(measurements)
    replay = client.update_controller(run_id, global_step=2, weight_entropy=0.6, measured_kl=0.05, request_id="step-2")
    assert replay.replayed and replay.state.version == 2
    assert client.get_run(run_id).state.version == len(measurements)


def test_expected_version(client, run_id):
    client.create_run(run_id, CONFIG)
    client.update_controller(run_id, global_step=1, expected_version=0)
    with pytest.raises(VersionConflictError):
        client.update_controller(run_id, global_step=2, expected_version=0)
    assert client.get_run(run_id).state.version == 1


def test_unknown_run(client):
    with pytest.raises(NotFoundError):
        client.update_controller("no-such-run", global_step=1)
    with pytest.raises(NotFoundError):
        client.compute_weight_stats("no-such-run", q_values=[[1.0]], ref_logp_sum=[0.0], ref_token_counts=[1])


def test_rejected_requests_change_no_state(client, run_id):
    client.create_run(run_id, CONFIG)
    client.update_controller(run_id, global_step=1, weight_entropy=0.5)
    before = client.get_run(run_id)
    bad_updates = [dict(global_step=-1), dict(global_step=2, weight_entropy=float("nan")),
                   dict(global_step=2, measured_kl=float("inf")), dict(global_step=2, lr_scale=-1.0)]
    for bad in bad_updates:
        with pytest.raises(InvalidArgumentError) as info:
            client.update_controller(run_id, **bad)
        assert info.value.violations, bad
    assert client.get_run(run_id) == before


def test_violations_name_the_field(client, run_id):
    client.create_run(run_id, CONFIG)
    cases = [
        (lambda: client.compute_reward_statistics(utilities=[1.0, 2.0], group_sizes=[3]), "utilities"),
        (lambda: client.compute_reward_statistics(utilities=[1.0, float("nan")], group_sizes=[2]), "utilities[1]"),
        (lambda: client.compute_reward_statistics(utilities=[1.0], group_sizes=[1], q_temperature=0.0), "q_temperature"),
        (lambda: client.compute_reward_statistics(utilities=[1.0], group_sizes=[1], token_counts=[-3]), "token_counts[0]"),
        (lambda: client.compute_weight_stats(run_id, q_values=[0.5, 0.5], ref_logp_sum=[0.0], ref_token_counts=[1, 1],
                                             group_sizes=[2]), "ref_logp_sum"),
        (lambda: client.compute_weight_stats(run_id, q_values=[0.5, -0.5], ref_logp_sum=[0.0, 0.0],
                                             ref_token_counts=[1, 1], group_sizes=[2]), "q_values[1]"),
        (lambda: client.create_run("bad id with spaces", CONFIG), "run_id"),
        (lambda: client.create_run(run_id + "-zero", WeightingConfig()), "config.tau"),
        (lambda: client.create_run(run_id + "-q", WeightingConfig(tau=1, q_epsilon=-1.0)), "config.q_epsilon"),
        (lambda: client.list_runs(page_size=-4), "page_size"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgumentError) as info:
            call()
        assert field in [v.field for v in info.value.violations], (field, info.value.violations)


def test_concurrent_updates_are_serialized(client, run_id):
    client.create_run(run_id, CONFIG)
    workers, per_worker = 8, 25

    def hammer(worker: int) -> None:
        for i in range(per_worker):
            client.update_controller(run_id, global_step=i + 1, weight_entropy=0.5 + 0.01 * worker, measured_kl=0.1)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(hammer, range(workers)))
    assert client.get_run(run_id).state.version == workers * per_worker


def test_large_computation_does_not_block_updates(client, run_id):
    client.create_run(run_id, CONFIG)
    client.create_run(run_id + "-other", CONFIG)
    groups, k = 62_500, 16
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.ones(k), size=groups)
    big_done = threading.Event()

    def big() -> None:
        client.compute_weight_stats(run_id, q_values=q, ref_logp_sum=rng.normal(size=q.shape),
                                    ref_token_counts=np.full(q.shape, 10))
        big_done.set()

    worker = threading.Thread(target=big)
    worker.start()
    updates_done_first = 0
    for step in range(5):
        client.update_controller(run_id + "-other", global_step=step + 1, weight_entropy=1.0)
        updates_done_first += not big_done.is_set()
    worker.join(120)
    assert big_done.is_set()
    assert client.get_run(run_id + "-other").state.version == 5
    assert updates_done_first >= 1
