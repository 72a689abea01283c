"""Accelerate: in a two-process CPU job (gloo) only the main process calls the
service, and every rank receives the same weights and controller state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install '.[integrations]')")

from maxent_client import MaxEntClient  # noqa: E402
from maxent_client.integrations.accelerate import MainProcessClient  # noqa: E402
from server_process import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import accelerate_worker as worker  # noqa: E402


def launch(target: str, run_id: str, out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Two processes through `accelerate launch`. Its `--cpu` flag with several
    processes goes through mpirun (an MPI hostfile is needed); `--multi_gpu`
    starts them with torch's elastic launcher, and the worker's
    Accelerator(cpu=True) makes the job a two-process CPU job over gloo."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(HERE / "accelerate_worker.py"), "--target", target, "--run-id", run_id, "--out", str(out),
    ]
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config file applies
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))


def test_two_cpu_processes_share_one_service_call_per_step(server, tmp_path, run_id):
    out = tmp_path / "ranks"
    out.mkdir()
    proc = launch(server.target, run_id, out, tmp_path)
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    main, other = ranks

    assert [r["distributed_type"] for r in ranks] == ["MULTI_CPU"] * 2
    assert [r["backend"] for r in ranks] == ["gloo"] * 2
    # only the main process opened a channel
    assert main["is_main"] and main["has_channel"] and main["reward_has_channel"]
    assert not other["is_main"] and not other["has_channel"] and not other["reward_has_channel"]

    # one update was applied, by one process: the version rose by exactly one,
    # and every rank holds the state it produced
    assert main["update"] == other["update"]
    assert main["update"]["version"] == 1 and not main["update"]["replayed"]
    assert main["after_version"] == other["after_version"] == 1
    assert main["run_version_at_create"] == other["run_version_at_create"] == 0

    # batch-wide numbers are the same everywhere; each rank got its own groups
    for key in ("reward_mean", "weight_entropy", "weights_tau", "weights_version", "adapter_weight_entropy"):
        assert main[key] == other[key], key
    assert main["group_sizes"] == [3, 2] and other["group_sizes"] == [4]

    # and they are the numbers of one call on the whole batch
    with MaxEntClient(server.target, timeout=60) as client:
        reference_run = run_id + "-reference"
        client.create_run(reference_run, worker.CONFIG)
        stats = client.compute_reward_statistics(completions=worker.GROUPS, answers=worker.ANSWERS,
                                                 rewards=worker.TERMS, run_id=reference_run)
        weights = client.compute_weight_stats(reference_run, q_values=stats.q_values, group_sizes=stats.group_sizes,
                                              ref_logp_sum=worker.REF_LOGP, ref_token_counts=worker.REF_TOKENS)
        update = client.update_controller(reference_run, weight_entropy=weights.weight_entropy, **worker.UPDATE)
    for key, expected in (("total_utils", stats.total_utils), ("advantages", stats.advantages),
                          ("q_values", stats.q_values), ("weights", weights.weights),
                          ("group_weight_entropies", weights.group_weight_entropies)):
        np.testing.assert_allclose(main[key] + other[key], expected, rtol=0, atol=1e-12, err_msg=key)
    assert main["weight_entropy"] == pytest.approx(weights.weight_entropy, abs=1e-12)
    assert main["update"]["tau"] == pytest.approx(update.state.tau, abs=1e-12)
    assert main["update"]["beta"] == pytest.approx(update.state.beta, abs=1e-12)
    np.testing.assert_allclose(main["adapter_values"] + other["adapter_values"], stats.total_utils, atol=1e-12)

    # an error on the main process was raised on every rank, with every detail the server attached
    assert main["errors"] == other["errors"]
    errors = other["errors"]
    assert errors["not_found"]["type"] == "NotFoundError" and errors["not_found"]["code"] == "NOT_FOUND"
    assert errors["not_found"]["resource"] == ["maxent.v1.Run", run_id + "-missing"]
    assert errors["not_found"]["status"]["details"] == ["type.googleapis.com/google.rpc.ResourceInfo"]
    failed = errors["reward_failed"]
    assert failed["type"] == "RewardFailedError" and failed["code"] == "FAILED_PRECONDITION"
    assert [f[1] for f in failed["failures"]] == ["rewards[0] (flaky) completion 1", "rewards[0] (flaky) completion 2"]
    assert all(f[0] == "REWARD_FAILED" for f in failed["failures"])
    assert failed["status"]["code"] == 9 and "type.googleapis.com/google.rpc.PreconditionFailure" in (
        failed["status"]["details"])
    invalid = errors["invalid"]
    assert invalid["type"] == "InvalidArgumentError" and invalid["violations"]
    assert invalid["status"]["message"] == invalid["message"]


def test_single_process_calls_the_service_directly(client, run_id):
    """Without `accelerate launch` (one process) the wrapper is a plain client."""

    class OneProcess:
        is_main_process, num_processes, process_index = True, 1, 0

    with MainProcessClient(client, accelerator=OneProcess()) as service:
        service.create_run(run_id, worker.CONFIG)
        stats = service.compute_reward_statistics_sharded(completions=worker.GROUPS, answers=worker.ANSWERS,
                                                          rewards=worker.TERMS)
        assert stats.group_sizes.tolist() == [3, 2, 4]
        weights = service.compute_weight_stats_sharded(run_id, q_values=stats.q_values, group_sizes=stats.group_sizes,
                                                       include_reference_term=False)
        assert weights.weights.size == 9
        assert service.update_controller(run_id, global_step=1).state.version == 1
    # a client it was given is the caller's to close
    assert client.get_run(run_id).state.version == 1
