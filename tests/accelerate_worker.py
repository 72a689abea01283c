"""One rank of the two-process Accelerate job of test_accelerate.py.

Run by ``accelerate launch --multi_gpu --num_processes 2 tests/accelerate_worker.py
--target HOST:PORT --run-id RUN --out DIR``: the launcher starts two processes
(torch's elastic launcher) and ``Accelerator(cpu=True)`` makes them a CPU job
over gloo, GPU or not. Every rank holds its own groups;
through MainProcessClient only the main process talks to the service. Each rank
writes what it received to DIR/rank<N>.json for the test to compare.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accelerate import Accelerator

from maxent_client import MaxEntError, RewardFailurePolicy, RewardTerm, WeightingConfig
from maxent_client.integrations.accelerate import MainProcessClient
from maxent_client.integrations.trl import MaxEntRewardFunction

CONFIG = WeightingConfig(tau=0.4, beta=0.05, target_entropy=0.6, tau_lr=0.2, kl_target=0.02, kl_horizon=10,
                         kl_step_size=0.5)
TERMS = [RewardTerm("boxed_accuracy", 1.0), RewardTerm("format", 0.5)]

# The whole job's batch: rank 0 holds groups 0-1, rank 1 holds group 2.
GROUPS = [
    ["<think>a</think> <answer>\\boxed{4}</answer>", "\\boxed{5}", "\\boxed{4}"],
    ["\\boxed{1}", "<think>b</think><answer>\\boxed{2}</answer>"],
    ["x", "\\boxed{9}", "<think>c</think><answer>\\boxed{9}</answer>", "\\boxed{8}"],
]
ANSWERS = ["4", "2", "9"]
REF_LOGP = [[-4.0, -6.5, -3.0], [-2.0, -9.0], [-1.0, -3.5, -7.0, -2.5]]
REF_TOKENS = [[4, 5, 3], [2, 6], [1, 3, 7, 2]]
SHARDS = {0: [0, 1], 1: [2]}
UPDATE = {"global_step": 1, "measured_kl": 0.05}
# The test plugin's "flaky" reward raises on completion 1 and gives NaN on completion 2.
FAILING = {"completions": ["fine", "RAISE here", "NAN"], "group_sizes": [3], "answers": [""],
           "rewards": [RewardTerm("flaky", 1.0)], "on_failure": RewardFailurePolicy.ERROR}


def error_of(call) -> dict | None:
    """What this rank's copy of the error raised by `call` carries."""
    try:
        call()
    except MaxEntError as exc:
        return {
            "type": type(exc).__name__, "code": exc.code.name, "message": exc.message,
            "violations": [[v.field, v.description] for v in exc.violations],
            "failures": [[f.type, f.subject, f.description] for f in exc.failures],
            "resource": None if exc.resource is None else [exc.resource.resource_type, exc.resource.resource_name],
            "status": {"code": exc.status.code, "message": exc.status.message,
                       "details": [detail.type_url for detail in exc.status.details]},
        }
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    assert accelerator.num_processes == 2, accelerator.num_processes
    mine = SHARDS[rank]
    service = MainProcessClient(args.target, accelerator=accelerator, timeout=120)

    run = service.create_run(args.run_id, CONFIG)
    stats = service.compute_reward_statistics_sharded(
        completions=[GROUPS[g] for g in mine], answers=[ANSWERS[g] for g in mine], rewards=TERMS, run_id=args.run_id)
    weights = service.compute_weight_stats_sharded(
        args.run_id, q_values=stats.q_values, group_sizes=stats.group_sizes,
        ref_logp_sum=[x for g in mine for x in REF_LOGP[g]], ref_token_counts=[x for g in mine for x in REF_TOKENS[g]])
    update = service.update_controller(args.run_id, weight_entropy=weights.weight_entropy, **UPDATE)
    after = service.get_run(args.run_id)

    # an error on the main process reaches every rank as the same exception, every detail included
    errors = {
        "not_found": error_of(lambda: service.get_run(args.run_id + "-missing")),
        "reward_failed": error_of(lambda: service.compute_reward_statistics(**FAILING)),
        "invalid": error_of(lambda: service.compute_weight_stats(args.run_id, q_values=[0.5, 0.5], group_sizes=[3])),
    }

    # the TRL reward adapter with the accelerator: rank-local TRL-style inputs
    reward = MaxEntRewardFunction(args.target, rewards=TERMS, num_generations=None, accelerator=accelerator,
                                  run_id=args.run_id)
    prompts = [f"prompt-{g}" for g in mine for _ in GROUPS[g]]
    completions = [c for g in mine for c in GROUPS[g]]
    solutions = [ANSWERS[g] for g in mine for _ in GROUPS[g]]
    logged: dict[str, float] = {}
    values = reward(prompts=prompts, completions=completions, solution=solutions, log_metric=logged.__setitem__)

    result = {
        "rank": rank,
        "is_main": accelerator.is_main_process,
        "distributed_type": str(accelerator.distributed_type.value),
        "backend": accelerator.state.backend,
        "has_channel": service.has_channel,
        "reward_has_channel": reward._client is not None,
        "run_version_at_create": run.state.version,
        "group_sizes": stats.group_sizes.tolist(),
        "total_utils": stats.total_utils.tolist(),
        "advantages": stats.advantages.tolist(),
        "q_values": stats.q_values.tolist(),
        "reward_mean": stats.reward_mean,
        "weights": weights.weights.tolist(),
        "group_weight_entropies": weights.group_weight_entropies.tolist(),
        "weight_entropy": weights.weight_entropy,
        "weights_tau": weights.tau,
        "weights_version": weights.controller_version,
        "update": {"request_id": update.request_id, "replayed": update.replayed, "tau": update.state.tau,
                   "beta": update.state.beta, "version": update.state.version},
        "after_version": after.state.version,
        "errors": errors,
        "adapter_values": values,
        "adapter_weight_entropy": logged.get("maxent/weight_entropy"),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    service.close()
    reward.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
