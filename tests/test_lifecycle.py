"""Server process lifecycle: graceful SIGTERM, kill -9 durability, restarts."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maxent_client import MaxEntClient, MaxEntError, WeightingConfig
from server_process import ServerProcess

CONFIG = WeightingConfig(tau=0.5, beta=0.1, target_entropy=1.0, tau_lr=0.05, kl_target=0.1, kl_horizon=5,
                         kl_step_size=0.5)


def test_sigterm_exits_zero_and_keeps_state(tmp_path):
    server = ServerProcess(tmp_path / "data").start()
    with MaxEntClient(server.target) as client:
        client.create_run("r1", CONFIG)
        client.update_controller("r1", global_step=1, weight_entropy=0.4)
    assert server.terminate() == 0
    assert "listening on 127.0.0.1:" in server.log()
    server.start()
    try:
        with MaxEntClient(server.target) as client:
            assert client.get_run("r1").state.version == 1
    finally:
        server.stop()


def test_sigterm_finishes_calls_in_flight(tmp_path):
    server = ServerProcess(tmp_path / "data", extra_args=["--grace-seconds", "30"]).start()
    client = MaxEntClient(server.target, timeout=120)
    client.create_run("r1", CONFIG)
    q = np.random.default_rng(0).dirichlet(np.ones(16), size=62_500)
    result: dict = {}

    def big_call() -> None:
        try:
            result["stats"] = client.compute_weight_stats("r1", q_values=q, ref_logp_sum=np.zeros_like(q),
                                                          ref_token_counts=np.ones(q.shape, dtype=int))
        except MaxEntError as error:  # pragma: no cover - reported by the assertion below
            result["error"] = error

    caller = threading.Thread(target=big_call)
    caller.start()
    time.sleep(0.5)  # let the request reach the server
    code = server.terminate(60)
    caller.join(60)
    client.close()
    assert code == 0
    assert "error" not in result, result.get("error")
    sums = np.add.reduceat(result["stats"].weights, np.arange(0, q.size, 16))
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)


def test_health_not_serving_while_draining(tmp_path):
    server = ServerProcess(tmp_path / "data", extra_args=["--grace-seconds", "5"]).start()
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.proc.wait(30) == 0


def test_acknowledged_writes_survive_kill_9(tmp_path, kills=3):
    server = ServerProcess(tmp_path / "data").start()
    acknowledged = 0
    try:
        for round_ in range(kills):
            with MaxEntClient(server.target) as client:
                client.create_run(f"run-{round_}", CONFIG)
                client.create_run("shared", CONFIG)
                for step in range(20):
                    client.update_controller("shared", global_step=step + 1, weight_entropy=0.3 + 0.01 * step,
                                             measured_kl=0.05, request_id=f"{round_}-{step}")
                    acknowledged += 1
            server.kill()  # right after the last acknowledged response
            server.start()
            with MaxEntClient(server.target) as client:
                state = client.get_run("shared").state
                assert state.version == acknowledged
                assert client.get_run(f"run-{round_}").run_id == f"run-{round_}"
                replay = client.update_controller("shared", global_step=20, weight_entropy=0.49, measured_kl=0.05,
                                                  request_id=f"{round_}-19")
                assert replay.replayed and replay.state.version == acknowledged
    finally:
        server.stop()
