"""Benchmark of the service core (issue: one batch of 1024 prompts x 16).

Times ComputeRewardStatistics (utilities path) and ComputeWeightStats through
a real maxent-server process against
  (a) a plain in-process per-group implementation in the style trainers use
      today: a torch tensor per group, Python lists in and out;
  (b) a raw gRPC echo server (another process) sent the same request bytes.
All in one run on the same machine; the ratios are what to quote.

    python bench/bench_core.py [--prompts 1024] [--generations 16] [--repeats 200]
                               [--step-prompts 1024,65536]

Then, per size in --step-prompts, the fused ComputeStepStatistics round trip
against the service's own engine called in-process on the whole batch (no
gRPC; Engine.step_statistics, one torch thread as the server uses), and
against the two calls it replaces.

The RPCs and the echo calls are timed in interleaved rounds (one call of
each per round), so a change of load on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from maxent_client import MaxEntClient, WeightingConfig  # noqa: E402
from maxent_api._generated.maxent.v1 import maxent_pb2 as pb  # noqa: E402
from maxent_server.engine import Engine, RewardOptions, WeightOptions  # noqa: E402
from server_process import ServerProcess, free_port  # noqa: E402

TAU, BETA = 0.3, 0.05
# What a trainer reads back from ComputeStepStatistics (its read_mask).
TRAINER_FIELDS = ("weights", "advantages", "zero_variance_groups", "group_weight_entropies")


def baseline_rewards(utilities: list[list[float]]):
    """Advantages and q the way a trainer loop does it today: a tensor per group."""
    advantages, q_all = [], []
    for u_list in utilities:
        u = torch.tensor(u_list, dtype=torch.float64)
        k = u.numel()
        std = u.std() if k > 1 else torch.tensor(0.0, dtype=torch.float64)
        advantages.append(((u - u.mean()) / (std + 1e-4)).tolist())
        p = torch.softmax(u, dim=0)
        q = p * (1 - 1e-6 * k) + 1e-6
        q_all.append((q / q.sum()).tolist())
    return advantages, q_all


def baseline_weights(q_values: list[list[float]], ref_logp: list[list[float]], ref_counts: list[list[int]]):
    """MaxEnt weights and entropies, one small tensor per group."""
    weights, entropies = [], []
    for q_list, r_list, c_list in zip(q_values, ref_logp, ref_counts):
        q = torch.tensor(q_list, dtype=torch.float64)
        ref = torch.tensor(r_list, dtype=torch.float64) / torch.tensor(c_list, dtype=torch.float64).clamp(min=1)
        w = torch.softmax((torch.log(q.clamp(min=1e-12)) + BETA * ref) / (TAU + BETA), dim=0)
        entropies.append(float(-(w * torch.log(w.clamp(min=1e-12))).sum()))
        weights.append(w.tolist())
    return weights, entropies


def per_group_baseline(utilities: list[list[float]], ref_logp: list[list[float]], ref_counts: list[list[int]]):
    """Both computations, as a trainer loop does them today."""
    advantages, q_all = baseline_rewards(utilities)
    weights, entropies = baseline_weights(q_all, ref_logp, ref_counts)
    return advantages, q_all, weights, entropies


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_medians(calls: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed in rounds of one call each, so that
    the machine's changing load falls on all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


ECHO_SERVER = textwrap.dedent("""
    import sys, time, grpc
    from concurrent import futures
    # Echo returns the request; ReplyN returns the bytes of the N-th file named
    # on the command line whatever the request (a fixed, real-sized response).
    replies = [open(path, "rb").read() for path in sys.argv[2:]]
    methods = {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
    for index, reply in enumerate(replies):
        methods[f"Reply{index}"] = grpc.unary_unary_rpc_method_handler(lambda request, context, r=reply: r)
    handler = grpc.method_handlers_generic_handler("bench.Echo", methods)
    limit = 64 * 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler],
                         options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
""")


def stats_reply_bytes(client: MaxEntClient, utilities, sizes) -> bytes:
    """Serialized ComputeRewardStatisticsResponse for the batch (its real size)."""
    request = pb.ComputeRewardStatisticsRequest(group_sizes=sizes, utilities=utilities.ravel().tolist())
    return client._stub.ComputeRewardStatistics(request, timeout=60).SerializeToString()


def weights_rpc_bytes(client: MaxEntClient, q, ref_logp, ref_counts, sizes) -> bytes:
    request = pb.ComputeWeightStatsRequest(run_id="bench", group_sizes=sizes, q_values=q.tolist(),
                                           ref_logp_sum=ref_logp.ravel().tolist(),
                                           ref_token_counts=ref_counts.ravel().tolist())
    return client._stub.ComputeWeightStats(request, timeout=60).SerializeToString()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def step_rows(client: MaxEntClient, prompt_counts: list[int], k: int, repeats: int) -> list[tuple]:
    """(prompts, in-process engine s, fused RPC s, fused RPC with a read mask s,
    two RPCs s) per batch size."""
    engine = Engine("cpu", threads=1)
    rows = []
    for g in prompt_counts:
        rng = np.random.default_rng(g)
        utilities, sizes = rng.normal(size=g * k), np.full(g, k)
        ref_logp, ref_counts = rng.normal(-40, 10, size=g * k), rng.integers(10, 200, size=g * k)

        def in_process():
            return engine.step_statistics(sizes, utilities, RewardOptions(), ref_logp, ref_counts,
                                          WeightOptions(tau=TAU, beta=BETA))

        def fused():
            return client.compute_step_statistics("bench", utilities=utilities, group_sizes=sizes,
                                                  ref_logp_sum=ref_logp, ref_token_counts=ref_counts)

        def fused_masked():
            return client.compute_step_statistics("bench", utilities=utilities, group_sizes=sizes,
                                                  ref_logp_sum=ref_logp, ref_token_counts=ref_counts,
                                                  read_mask=TRAINER_FIELDS)

        def two_calls():
            stats = client.compute_reward_statistics(utilities=utilities, group_sizes=sizes, run_id="bench")
            return client.compute_weight_stats("bench", q_values=stats.q_values, ref_logp_sum=ref_logp,
                                               ref_token_counts=ref_counts, group_sizes=sizes)

        np.testing.assert_allclose(fused().weights, in_process()[1].weights, atol=1e-12)
        rounds = repeats if g * k <= 32_768 else max(5, repeats // 20)
        t = interleaved_medians({"engine": in_process, "fused": fused, "masked": fused_masked, "two": two_calls},
                                rounds)
        rows.append((g, t["engine"], t["fused"], t["masked"], t["two"]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--step-prompts", default="1024,65536",
                        help="comma-separated prompt counts for the ComputeStepStatistics rows ('' skips them)")
    args = parser.parse_args()
    g, k = args.prompts, args.generations
    rng = np.random.default_rng(0)
    utilities = rng.normal(size=(g, k))
    ref_logp = rng.normal(-40, 10, size=(g, k))
    ref_counts = rng.integers(10, 200, size=(g, k))
    sizes = [k] * g

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "data", extra_args=["--reward-workers", "1"]).start()
        echo = None
        try:
            client = MaxEntClient(server.target, timeout=120)
            client.create_run("bench", WeightingConfig(tau=TAU, beta=BETA))
            stats = client.compute_reward_statistics(utilities=utilities, group_sizes=sizes)

            def rewards_rpc():
                return client.compute_reward_statistics(utilities=utilities, group_sizes=sizes)

            def weights_rpc():
                return client.compute_weight_stats("bench", q_values=stats.q_values, ref_logp_sum=ref_logp,
                                                   ref_token_counts=ref_counts, group_sizes=sizes)

            # Same numbers both ways, so the comparison is like for like.
            base = per_group_baseline(utilities.tolist(), ref_logp.tolist(), ref_counts.tolist())
            np.testing.assert_allclose(np.concatenate(base[1]), stats.q_values, atol=1e-12)
            np.testing.assert_allclose(np.concatenate(base[2]), weights_rpc().weights, atol=1e-9)

            lists = (utilities.tolist(), ref_logp.tolist(), ref_counts.tolist())
            t_baseline = median_seconds(lambda: per_group_baseline(*lists), max(3, args.repeats // 20))

            reward_bytes = pb.ComputeRewardStatisticsRequest(group_sizes=sizes, utilities=utilities.ravel().tolist()
                                                             ).SerializeToString()
            weight_bytes = pb.ComputeWeightStatsRequest(
                run_id="bench", group_sizes=sizes, q_values=stats.q_values.tolist(), ref_logp_sum=ref_logp.ravel().tolist(),
                ref_token_counts=ref_counts.ravel().tolist()).SerializeToString()
            reply_files = []
            for reply in (stats_reply_bytes(client, utilities, sizes),
                          weights_rpc_bytes(client, stats.q_values, ref_logp, ref_counts, sizes)):
                path = Path(tmp) / f"reply{len(reply_files)}.bin"
                path.write_bytes(reply)
                reply_files.append(str(path))
            reply_sizes = [Path(p).stat().st_size for p in reply_files]
            echo_port = free_port()
            echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port), *reply_files],
                                    stdout=subprocess.PIPE, text=True)
            assert echo.stdout.readline().strip() == "ready"
            with grpc.insecure_channel(f"127.0.0.1:{echo_port}") as channel:
                call = channel.unary_unary("/bench.Echo/Echo")
                # Transport floor: the real request in, a fixed real-sized response out.
                reply0, reply1 = channel.unary_unary("/bench.Echo/Reply0"), channel.unary_unary("/bench.Echo/Reply1")
                t = interleaved_medians({
                    "rewards": rewards_rpc,
                    "weights": weights_rpc,
                    "echo_rewards": lambda: call(reward_bytes, timeout=60),
                    "echo_weights": lambda: call(weight_bytes, timeout=60),
                    "floor_rewards": lambda: reply0(reward_bytes, timeout=60),
                    "floor_weights": lambda: reply1(weight_bytes, timeout=60),
                }, args.repeats)
            step_prompts = [int(x) for x in args.step_prompts.split(",") if x.strip()]
            steps = step_rows(client, step_prompts, k, args.repeats)
            rss = peak_rss_mib(server.proc.pid)
        finally:
            if echo is not None:
                echo.kill()
            server.stop()

    t_rewards, t_weights = t["rewards"], t["weights"]
    t_echo_rewards, t_echo_weights = t["echo_rewards"], t["echo_weights"]
    t_floor_rewards, t_floor_weights = t["floor_rewards"], t["floor_weights"]
    rpc_total = t_rewards + t_weights
    echo_total = t_echo_rewards + t_echo_weights
    floor_total = t_floor_rewards + t_floor_weights
    print(f"batch: {g} prompts x {k} completions ({g * k} completions), median of {args.repeats} calls")
    print(f"{'':34}{'seconds':>10}")
    print(f"{'(a) in-process per-group loop':34}{t_baseline:>10.4f}   (both computations)")
    print(f"{'ComputeRewardStatistics via server':34}{t_rewards:>10.4f}   echo of its bytes {t_echo_rewards:.4f}")
    print(f"{'ComputeWeightStats via server':34}{t_weights:>10.4f}   echo of its bytes {t_echo_weights:.4f}")
    print(f"speed-up over (a):          {t_baseline / rpc_total:6.1f}x   (goal >= 10x)")
    print(f"cost relative to echo (b):  {rpc_total / echo_total:6.2f}x   (goal <= 3x)")
    print(f"cost relative to the transport floor (same request in, a fixed real-sized response out): "
          f"{rpc_total / floor_total:.2f}x  (floor {t_floor_rewards:.4f} + {t_floor_weights:.4f} s; responses are "
          f"{reply_sizes[0] / len(reward_bytes):.1f}x and {reply_sizes[1] / len(weight_bytes):.1f}x the request size)")
    for g_step, t_engine, t_fused, t_masked, t_two in steps:
        goal = 2.0 if g_step * k <= 16_384 else 1.5
        print(f"ComputeStepStatistics, {g_step} x {k}: in-process engine {t_engine:.4f} s; "
              f"fused {t_fused:.4f} s = {t_fused / t_engine:.2f}x; "
              f"fused, read_mask {'+'.join(TRAINER_FIELDS)} {t_masked:.4f} s = {t_masked / t_engine:.2f}x "
              f"(goal <= {goal}x); two calls {t_two:.4f} s = {t_two / t_engine:.2f}x")
    print(f"server peak RSS:            {rss:6.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
