"""The Node.js client (examples/node) against a live server: CreateRun,
ComputeRewardStatistics, ComputeWeightStats and UpdateController give the
numbers the Python client gets on the same batch."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from maxent_client import RewardTerm, WeightingConfig

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed: the Node client check needs Node.js 18+")

CONFIG = WeightingConfig(tau=0.5, beta=0.04, target_entropy=0.6, tau_lr=0.05, kl_target=0.02, kl_horizon=10,
                         kl_step_size=0.5)
GROUP_SIZES = [3, 2, 4]
COMPLETIONS = [
    "<think>2+2 is 4</think> <answer>\\boxed{4}</answer>", "\\boxed{5}", "no idea",
    "\\boxed{3}", "<think>1+2</think><answer>\\boxed{3}</answer>",
    "\\boxed{10}", "<think>t</think> <answer>\\boxed{12}</answer>", "\\boxed{12}", "",
]
ANSWERS = ["4", "3", "12"]
TERMS = [RewardTerm("boxed_accuracy", 1.0), RewardTerm("format", 0.5), RewardTerm("missing_boxed_penalty", 0.25)]
REF_LOGP = [-12.0, -30.5, -8.1, -4.0, -9.9, -3.3, -17.0, -6.25, -1.0]
REF_TOKENS = [10, 25, 7, 3, 9, 2, 14, 5, 0]
UPDATE = {"global_step": 3, "measured_kl": 0.05}


@pytest.fixture(scope="module")
def node_modules():
    """examples/node's packages: installed from the lock file unless present
    (scripts/test.sh runs `npm ci` there first)."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("node is installed but npm is not: cannot install examples/node's packages")
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{proc.stdout}\n{proc.stderr}"
    return NODE_DIR / "node_modules"


def config_json(config: WeightingConfig) -> dict:
    out = {}
    for name in WeightingConfig.field_names():
        value = getattr(config, name)
        if value is None or name == "denominator":
            continue
        out[name] = value
    return out


def python_expected(client, run_id: str) -> dict:
    run = client.create_run(run_id, CONFIG)
    stats = client.compute_reward_statistics(completions=COMPLETIONS, answers=ANSWERS, group_sizes=GROUP_SIZES,
                                             rewards=TERMS, run_id=run_id)
    weights = client.compute_weight_stats(run_id, q_values=stats.q_values, group_sizes=GROUP_SIZES,
                                          ref_logp_sum=REF_LOGP, ref_token_counts=REF_TOKENS)
    state = client.update_controller(run_id, weight_entropy=weights.weight_entropy, **UPDATE).state
    return {
        "run": {"tau": run.state.tau, "beta": run.state.beta, "version": run.state.version,
                "tau_log": run.state.tau_log},
        "reward": {
            "total_utils": stats.total_utils.tolist(), "advantages": stats.advantages.tolist(),
            "q_values": stats.q_values.tolist(), "reward_mean": stats.reward_mean, "reward_std": stats.reward_std,
            "per_reward": {name: values.values.tolist() for name, values in stats.per_reward.items()},
        },
        "weights": {
            "weights": weights.weights.tolist(), "advantage_entropy": weights.advantage_entropy.tolist(),
            "group_weight_entropies": weights.group_weight_entropies.tolist(),
            "weight_entropy": weights.weight_entropy, "weight_entropy_min": weights.weight_entropy_min,
            "weight_entropy_max": weights.weight_entropy_max, "tau": weights.tau, "beta": weights.beta,
            "controller_version": weights.controller_version,
        },
        "update": {
            "tau": state.tau, "beta": state.beta, "tau_log": state.tau_log, "entropy_ema": state.entropy_ema,
            "global_step": state.global_step, "version": state.version,
            "active_target_entropy": state.active_target_entropy, "last_weight_entropy": state.last_weight_entropy,
            "last_measured_kl": state.last_measured_kl,
        },
    }


def node_input(run_id: str) -> dict:
    return {
        "run_id": run_id,
        "config": config_json(CONFIG),
        "reward_request": {
            "group_sizes": GROUP_SIZES, "completions": COMPLETIONS, "answers": ANSWERS,
            "rewards": [{"name": t.name, "weight": t.weight, "params": t.params} for t in TERMS],
        },
        "weight_request": {"ref_logp_sum": REF_LOGP, "ref_token_counts": REF_TOKENS},
        "update": UPDATE,
    }


def test_node_client_matches_the_python_client(node_modules, server, client, run_id, tmp_path):
    expected = python_expected(client, run_id + "-python")
    # the batch must exercise the numbers: rewards differ, the controller moved
    assert len(set(expected["reward"]["total_utils"])) > 2
    assert expected["update"]["tau"] != CONFIG.tau and expected["update"]["beta"] != CONFIG.beta

    step, want = tmp_path / "step.json", tmp_path / "expected.json"
    step.write_text(json.dumps(node_input(run_id + "-node")))
    want.write_text(json.dumps(expected))
    proc = subprocess.run(
        [NODE, "check.js", "--target", server.target, "--input", str(step), "--expected", str(want),
         "--tolerance", "1e-9"],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"node check failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "node-check: " in proc.stdout and ", 0 failed" in proc.stdout
    passed = int(proc.stdout.rsplit("node-check: ", 1)[1].split(" passed")[0])
    assert passed >= 30, proc.stdout

    # the Node client's run really moved on the server
    node_state = client.get_run(run_id + "-node").state
    assert node_state.version == 1
    assert node_state.tau == pytest.approx(expected["update"]["tau"], abs=1e-12)


def test_node_checker_catches_a_wrong_number(node_modules, server, run_id, tmp_path, client):
    expected = python_expected(client, run_id + "-python")
    expected["weights"]["weights"][0] += 1e-3
    step, want = tmp_path / "step.json", tmp_path / "expected.json"
    step.write_text(json.dumps(node_input(run_id + "-node")))
    want.write_text(json.dumps(expected))
    proc = subprocess.run([NODE, "check.js", "--target", server.target, "--input", str(step), "--expected", str(want)],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL ComputeWeightStats.weights: [0]" in proc.stdout
