"""Client behaviour: retries keep the request_id, inputs in every shape."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from maxent_client import InvalidArgumentError, MaxEntClient, UnavailableError, WeightingConfig
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc


class FlakyServicer(pb_grpc.MaxEntServiceServicer):
    """Answers UNAVAILABLE `failures` times, then succeeds; records request ids."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.request_ids: list[str] = []
        self.lock = threading.Lock()

    def UpdateController(self, request, context):
        with self.lock:
            self.request_ids.append(request.request_id)
            attempt = len(self.request_ids)
        if attempt <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return pb.UpdateControllerResponse(state=pb.ControllerState(run_id=request.run_id, version=1))


@pytest.fixture()
def flaky_server():
    servers = []

    def start(failures: int):
        servicer = FlakyServicer(failures)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        pb_grpc.add_MaxEntServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_unavailable_is_retried_with_the_same_request_id(flaky_server):
    servicer, target = flaky_server(failures=2)
    with MaxEntClient(target, initial_backoff=0.01, max_backoff=0.05) as client:
        result = client.update_controller("r", global_step=1, weight_entropy=0.5)
    assert result.state.version == 1
    assert len(servicer.request_ids) == 3
    assert set(servicer.request_ids) == {result.request_id}


def test_retries_are_bounded(flaky_server):
    servicer, target = flaky_server(failures=100)
    with MaxEntClient(target, max_attempts=3, initial_backoff=0.01, max_backoff=0.05) as client:
        with pytest.raises(UnavailableError):
            client.update_controller("r", global_step=1)
    assert len(servicer.request_ids) == 3


def test_inputs_in_every_shape_agree(client):
    utilities = np.array([[0.1, 0.9, 0.4], [1.0, -1.0, 0.0]])
    flat = client.compute_reward_statistics(utilities=utilities.ravel().tolist(), group_sizes=[3, 3])
    nested = client.compute_reward_statistics(utilities=utilities.tolist())
    as_numpy = client.compute_reward_statistics(utilities=utilities)
    as_torch = client.compute_reward_statistics(utilities=torch.tensor(utilities))
    for other in (nested, as_numpy, as_torch):
        np.testing.assert_array_equal(other.q_values, flat.q_values)
        np.testing.assert_array_equal(other.group_sizes, [3, 3])
    ragged = client.compute_reward_statistics(utilities=[[1.0], [2.0, 3.0, 4.0], []])
    assert [len(g) for g in ragged.grouped()["advantages"]] == [1, 3, 0]


def test_field_violations_reach_the_caller(client):
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_reward_statistics(utilities=[1.0, 2.0], group_sizes=[1, 2])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.value.violations] == ["utilities"]


def test_group_sizes_needed_for_flat_inputs(client):
    with pytest.raises(ValueError):
        client.compute_reward_statistics(utilities=[1.0, 2.0])


def test_config_round_trips_through_the_server(client, run_id):
    config = WeightingConfig(tau=0.2, beta=0.01, q_temperature=0.5, target_entropy_start=2.0,
                             target_entropy_final=1.0, target_entropy_horizon=100, meta_enabled=True)
    run = client.create_run(run_id, config)
    assert run.config.target_entropy_start == 2.0 and run.config.meta_enabled
    assert run.config.q_temperature == 0.5 and run.config.q_epsilon == 1e-6
    assert run.state.active_target_entropy == 2.0


def test_async_client_matches_sync(server, client, run_id):
    import asyncio

    from maxent_client import AsyncMaxEntClient

    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.1))
    utilities = [[0.3, 0.1, 0.9], [1.0, 2.0]]
    sync_stats = client.compute_reward_statistics(utilities=utilities, run_id=run_id)

    async def main():
        async with AsyncMaxEntClient(server.target) as aclient:
            stats = await aclient.compute_reward_statistics(utilities=utilities, run_id=run_id)
            weights = await aclient.compute_weight_stats(run_id, q_values=stats.q_values, group_sizes=stats.group_sizes,
                                                         ref_logp_sum=[-1, -2, -3, -4, -5], ref_token_counts=[1] * 5)
            results = await asyncio.gather(*(aclient.update_controller(run_id, global_step=i, weight_entropy=0.2)
                                             for i in range(1, 11)))
            run = await aclient.get_run(run_id)
            runs = await aclient.list_runs()
            return stats, weights, results, run, runs

    stats, weights, results, run, runs = asyncio.run(main())
    np.testing.assert_array_equal(stats.q_values, sync_stats.q_values)
    np.testing.assert_allclose([w.sum() for w in weights.grouped()["weights"]], 1.0)
    assert sorted(r.state.version for r in results) == list(range(1, 11))
    assert run.state.version == 10 and run_id in [r.run_id for r in runs]
