"""Benchmark of math_accuracy (issue: 256 prompts x 16 completions).

Scores one deterministic batch of realistic math completions (boxed answers in
many equivalent forms, wrong answers, answer tags, truncated outputs, with
repeats inside each group) two ways, one run each, same inputs:
  (a) a real maxent-server process over gRPC: its reward worker pool
      (--workers, default 2), deduplication and per-worker gold caching;
  (b) a single-process loop calling math-verify's parse + verify for every
      completion, in the style of today's trainer reward functions.
Prints completions/second of both and the ratio, and exits non-zero unless
the rewards are identical for every completion.

With ``--backend ray`` (or ``both``) the server evaluates rewards on a Ray
cluster (``--reward-backend ray``): the one at ``--ray-address``, else a
two-node cluster of one CPU per node started here for the run. ``both``
prints the local pool and Ray side by side, and Ray's overhead per chunk:
the median round trip of a one-item chunk (a trivial item) through each
backend, measured in this process.

    python bench/bench_rewards.py [--prompts 256] [--generations 16] [--workers 2]
                                  [--backend local|ray|both] [--ray-address HOST:PORT]

The server's start-up and a warm-up call are outside the timings.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

try:
    import maxent_server  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

from math_verify import parse, verify  # noqa: E402

from maxent_server.domain.answers import final_answer  # noqa: E402
from maxent_client import MaxEntClient, RewardTerm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_process import ServerProcess  # noqa: E402

# ---------------------------------------------------------------------------
# the batch

OPENERS = [
    "Let's work through this step by step.",
    "We start by writing down what is given.",
    "First, simplify the expression.",
    "Consider the equation carefully.",
    "I'll set up the problem algebraically.",
]
MIDDLES = [
    "Substituting $x = {a}$ gives ${a}^2 + {b} = {c}$, so we move terms around.",
    "Multiplying both sides by ${b}$ we get ${c} = {a} \\cdot {b} - {d}$.",
    "By the formula $\\frac{{-b \\pm \\sqrt{{b^2-4ac}}}}{{2a}}$ with $a={a}$, $b={b}$, $c={d}$ we proceed.",
    "Summing the first ${a}$ terms gives $\\sum_{{k=1}}^{{{a}}} k = {e}$.",
    "Now, ${a} \\times {b} = {f}$ and ${f} - {d} = {g}$.",
    "Wait, let me double check: ${b} + {d} = {h}$. Yes.",
]
CLOSERS = [
    "Therefore the answer is $\\boxed{{{ans}}}$.",
    "So the final answer is \\boxed{{{ans}}}.",
    "Hence, \\[\\boxed{{{ans}}}\\]",
    "The answer: \\fbox{{{ans}}}",
    "<answer>{ans}</answer>",
]


def _frac_forms(value: Fraction, rng: random.Random) -> list[str]:
    p, q = value.numerator, value.denominator
    forms = [f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\frac{{{2 * p}}}{{{2 * q}}}"]
    if q in (2, 4, 5, 8, 10, 20, 25):
        forms.append(str(float(value)))
    if q == 2 and p == 1:
        forms.append("\\frac12")
    return forms


def _problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(gold, equivalent forms, wrong answers) of one random problem."""
    kind = rng.choice(["frac", "int", "sqrt", "poly", "percent", "interval", "set"])
    if kind == "frac":
        q = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10, 12])
        p = rng.choice([k for k in range(1, 3 * q) if Fraction(k, q).denominator == q])
        value = Fraction(p, q)
        wrong = [value + Fraction(1, q), value * 2, Fraction(q, p)]
        return (f"\\frac{{{p}}}{{{q}}}", _frac_forms(value, rng),
                [rng.choice(_frac_forms(w, rng)) for w in wrong if w != value])
    if kind == "int":
        n = rng.randint(2, 500)
        return str(n), [str(n), f"{n}.0", f"{n}", f"{{{n}}}"], [str(n + 1), str(n - 1), str(2 * n)]
    if kind == "sqrt":
        a, b = rng.randint(2, 6), rng.choice([2, 3, 5, 6, 7])
        return (f"{a}\\sqrt{{{b}}}", [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a} \\cdot \\sqrt{{{b}}}"],
                [f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{a * b}}}", f"{b}\\sqrt{{{a}}}"])
    if kind == "poly":
        c = rng.randint(1, 5)
        gold = f"x^2+{2 * c}x+{c * c}"
        return (gold, [gold, f"(x+{c})^2", f"{c * c}+{2 * c}x+x^2", f"x^2 + {2 * c}x + {c * c}"],
                [f"(x-{c})^2", f"x^2+{c * c}", f"(x+{c + 1})^2"])
    if kind == "percent":
        p = rng.choice([5, 10, 12, 20, 25, 40, 50, 75])
        return (f"{p}\\%", [f"{p}\\%", f"{p / 100:g}", f"{p}"], [f"{p + 5}\\%", f"{(p + 5) / 100:g}"])
    if kind == "interval":
        a, b = sorted(rng.sample(range(-9, 10), 2))
        gold = f"({a}, {b}]"
        forms = [gold, f"({a},{b}]", f"\\left({a}, {b}\\right]"]
        return gold, forms, [f"[{a}, {b}]", f"({a}, {b})", f"({a}, {b + 1}]"]
    items = sorted(rng.sample(range(1, 12), 3))
    perm = items[:]
    rng.shuffle(perm)
    fmt = lambda xs: "\\{" + ",".join(map(str, xs)) + "\\}"  # noqa: E731
    return fmt(items), [fmt(items), fmt(perm), "\\{" + ", ".join(map(str, perm)) + "\\}"], [
        fmt(items[:2]), fmt([*items[:2], items[2] + 1])]


def _completion(rng: random.Random, answer: str | None) -> str:
    nums = {k: rng.randint(2, 99) for k in "abcdefgh"}
    body = [rng.choice(OPENERS)]
    body += [rng.choice(MIDDLES).format(**nums) for _ in range(rng.randint(3, 10))]
    if answer is None:  # truncated at the length limit: no final answer
        return " ".join(body) + " So we need to compute"
    body.append(rng.choice(CLOSERS).format(ans=answer))
    return " ".join(body)


def make_batch(prompts: int, generations: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Completions and per-completion gold answers, deterministic for a seed."""
    rng = random.Random(seed)
    completions: list[str] = []
    golds: list[str] = []
    for _ in range(prompts):
        gold, right, wrong = _problem(rng)
        # A group's samples concentrate on a few answers, so final answers repeat.
        pool = rng.sample(right, min(len(right), rng.randint(1, 3))) + rng.sample(wrong, min(len(wrong), rng.randint(0, 2)))
        for _ in range(generations):
            answer = None if rng.random() < 0.05 else rng.choice(pool)
            completions.append(_completion(rng, answer))
            golds.append(gold)
    return completions, golds


# ---------------------------------------------------------------------------
# the two ways to score


def in_process_baseline(completions: list[str], golds: list[str]) -> np.ndarray:
    """math-verify parse + verify per completion, in this process, one at a time."""
    out = np.zeros(len(completions))
    for i, (text, gold) in enumerate(zip(completions, golds)):
        answer = final_answer(text)
        if answer is None or not answer.strip():
            continue
        gold_parsed = parse("\\boxed{" + gold + "}")
        answer_parsed = parse("\\boxed{" + answer + "}")
        out[i] = 1.0 if verify(gold_parsed, answer_parsed) else 0.0
    return out


def start_service(workers: int, timeout_seconds: float, ray_address: str = ""):
    """A real maxent-server process (on the Ray cluster at ``ray_address`` if
    given), warmed up by one scoring call spread over every worker."""
    tmp = tempfile.TemporaryDirectory()
    extra = ["--reward-workers", str(workers), "--reward-timeout-seconds", str(timeout_seconds), "--no-plugins"]
    if ray_address:
        extra += ["--reward-backend", "ray", "--ray-address", ray_address]
    server = ServerProcess(Path(tmp.name) / "data", extra_args=extra).start(timeout=180)
    client = MaxEntClient(server.target, timeout=600)
    groups = 16 * workers
    client.compute_reward_statistics(completions=[[f"\\boxed{{{k}}}", "\\boxed{2}"] for k in range(groups)],
                                     answers=["1"] * groups, rewards=[RewardTerm("math_accuracy")])
    return tmp, server, client


def score_with_service(service, completions: list[str], golds: list[str]) -> np.ndarray:
    """math_accuracy of every completion through the server (gRPC over loopback)."""
    _, _, client = service
    # One gold per group of consecutive completions sharing it.
    sizes, answers = [], []
    for gold in golds:
        if answers and answers[-1] == gold and sizes[-1] < 10**6:
            sizes[-1] += 1
        else:
            sizes.append(1)
            answers.append(gold)
    stats = client.compute_reward_statistics(completions=completions, answers=answers, group_sizes=sizes,
                                             rewards=[RewardTerm("math_accuracy")])
    values = stats.per_reward["math_accuracy"]
    if values.failure_count:
        raise SystemExit(f"{values.failure_count} completions failed")
    return values.values


def stop_service(service) -> None:
    tmp, server, client = service
    client.close()
    server.stop()
    tmp.cleanup()


# ---------------------------------------------------------------------------


def chunk_round_trip_ms(backend, repeats: int = 50) -> float:
    """Median milliseconds of ``backend.run`` on one trivial item (a one-item chunk)."""
    from maxent_server.rewards._worker import ITEM_EXTRACT

    times = []
    for k in range(repeats + 5):
        started = time.perf_counter()
        backend.run([(ITEM_EXTRACT, f"\\boxed{{{k}}}")])
        if k >= 5:  # the first calls start workers
            times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def chunk_overhead(ray_address: str, timeout_seconds: float) -> tuple[float, float]:
    """(local pool, Ray) round trip of a one-item chunk, ms."""
    from maxent_server.rewards.pool import WorkerPool
    from maxent_server.rewards.ray_backend import RayBackend

    pool = WorkerPool(1, timeout_seconds)
    try:
        local_ms = chunk_round_trip_ms(pool)
    finally:
        pool.close()
    return local_ms, chunk_round_trip_ms(RayBackend(ray_address, timeout_seconds))


def run_backend(name: str, args, completions: list[str], golds: list[str], ray_address: str) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    service = start_service(args.workers, args.timeout_seconds, ray_address if name == "ray" else "")
    print(f"{name}: server start-up and warm-up {time.perf_counter() - started:.2f} s (not in the timings)")
    try:
        started = time.perf_counter()
        values = score_with_service(service, completions, golds)
        return time.perf_counter() - started, values
    finally:
        stop_service(service)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout-seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=("local", "ray", "both"), default="local",
                    help="reward backend(s) of the server (default local)")
    ap.add_argument("--ray-address", default="",
                    help="Ray cluster (HOST:PORT) for --backend ray/both; default: start a two-node one here")
    args = ap.parse_args()

    completions, golds = make_batch(args.prompts, args.generations, args.seed)
    n = len(completions)
    finals = [final_answer(c) for c in completions]
    distinct = len({(f, g) for f, g in zip(finals, golds) if f})
    print(f"batch: {args.prompts} prompts x {args.generations} = {n} completions, "
          f"{sum(len(c) for c in completions) / n:.0f} chars each on average, "
          f"{distinct} distinct (final answer, gold) pairs, {len(set(golds))} distinct golds")

    backends = ["local", "ray"] if args.backend == "both" else [args.backend]
    cluster = None
    ray_address = args.ray_address
    if "ray" in backends and not ray_address:
        from ray_cluster import RayCluster

        cluster_dir = tempfile.TemporaryDirectory()
        started = time.perf_counter()
        cluster = RayCluster(Path(cluster_dir.name)).start()
        ray_address = cluster.address
        print(f"started a two-node Ray cluster (1 CPU per node) at {ray_address} in "
              f"{time.perf_counter() - started:.1f} s")
    timings: dict[str, tuple[float, np.ndarray]] = {}
    overhead: tuple[float, float] | None = None
    try:
        for name in backends:
            timings[name] = run_backend(name, args, completions, golds, ray_address)
        if "ray" in backends:
            overhead = chunk_overhead(ray_address, args.timeout_seconds)
    finally:
        if cluster is not None:
            cluster.stop()
            cluster_dir.cleanup()

    parse("\\boxed{1}")  # math-verify's first-use set-up, as the workers had
    started = time.perf_counter()
    baseline = in_process_baseline(completions, golds)
    baseline_s = time.perf_counter() - started

    labels = {"local": f"server, local pool ({args.workers} workers)",
              "ray": "server, Ray backend (2 nodes x 1 CPU)" if cluster else "server, Ray backend"}
    for name, (seconds, values) in timings.items():
        print(f"{labels[name]:<40} {seconds:7.3f} s  {n / seconds:8.0f} completions/s  "
              f"speed-up {baseline_s / seconds:.2f}x")
    print(f"{'in-process parse+verify loop':<40} {baseline_s:7.3f} s  {n / baseline_s:8.0f} completions/s")
    if overhead is not None:
        print(f"one-item chunk round trip: local pool {overhead[0]:.2f} ms, Ray {overhead[1]:.2f} ms "
              f"(Ray overhead per chunk ~{overhead[1] - overhead[0]:.2f} ms)")
    failed = False
    for name, (_, values) in timings.items():
        mismatches = np.flatnonzero(values != baseline)
        if mismatches.size:
            print(f"MISMATCH ({name}): {mismatches.size} completions differ, e.g. {mismatches[:10].tolist()}")
            failed = True
    if failed:
        return 1
    print(f"rewards identical for all {n} completions ({', '.join(timings)} and the in-process loop; "
          f"mean reward {baseline.mean():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
