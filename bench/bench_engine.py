"""The engine alone, on a torch device: reward statistics, weights and the
fused training step over whole batches, no gRPC.

    python bench/bench_engine.py --device cuda --sizes 16384,1048576
    python bench/bench_engine.py --device cpu --sizes 4096 --repeats 5   # what CI runs

Each size is timed on the asked device and, for comparison, on the CPU with
one torch thread (what the server uses by default); the device's numbers
must equal the CPU's to 1e-12. Times include the host <-> device copies of
the inputs and results (numpy in, numpy out), as the server pays them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "server"))

from maxent_server.engine import Engine, RewardOptions, WeightOptions  # noqa: E402

K = 16
TOLERANCE = 1e-12


def batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sizes": np.full(n // K, K),
        "utilities": rng.normal(size=n),
        "ref": rng.normal(-40, 10, size=n),
        "counts": rng.integers(10, 200, size=n),
    }


def calls(engine: Engine, data: dict[str, np.ndarray]) -> dict:
    """The three engine entry points on one batch, as zero-argument callables."""
    weights = WeightOptions(tau=0.3, beta=0.05)
    q = engine.reward_statistics(data["sizes"], data["utilities"], RewardOptions()).q_values
    return {
        "reward_statistics": lambda: engine.reward_statistics(data["sizes"], data["utilities"], RewardOptions()),
        "weight_stats": lambda: engine.weight_stats(data["sizes"], q, data["ref"], data["counts"], weights),
        "step_statistics": lambda: engine.step_statistics(
            data["sizes"], data["utilities"], RewardOptions(), data["ref"], data["counts"], weights),
    }


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # returns numpy arrays: the device work is finished when it returns
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def max_difference(a, b) -> float:
    """Largest absolute difference over every array and number of two results."""
    if isinstance(a, tuple):
        return max(max_difference(x, y) for x, y in zip(a, b))
    worst = 0.0
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            worst = max(worst, float(np.max(np.abs(value - other))) if value.size else 0.0)
        elif isinstance(value, float):
            worst = max(worst, abs(value - other))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (CUDA when present)")
    parser.add_argument("--sizes", default="16384,1048576", help="completions per batch, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = Engine(args.device, threads=1)
    cpu = Engine("cpu", threads=1)
    print(f"device: {device.device} ({torch.cuda.get_device_name(device.device) if device.device.type == 'cuda' else 'CPU, 1 thread'}); "
          f"groups of {K}; median of {args.repeats} calls; numpy in and out")
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        data = batch(n)
        on_device, on_cpu = calls(device, data), calls(cpu, data)
        for name in on_device:
            difference = max_difference(on_device[name](), on_cpu[name]())
            row = {"completions": n, "call": name, "device_ms": median_ms(on_device[name], args.repeats),
                   "cpu_ms": median_ms(on_cpu[name], args.repeats), "max_abs_difference": difference}
            rows.append(row)
            print(f"{n:>9} {name:<18} {device.device.type} {row['device_ms']:9.3f} ms   cpu {row['cpu_ms']:9.3f} ms   "
                  f"speed-up {row['cpu_ms'] / row['device_ms']:6.2f}x   max |diff| {difference:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["max_abs_difference"] <= TOLERANCE]
    if bad:
        print(f"FAIL: {len(bad)} results differ from the CPU's by more than {TOLERANCE}", file=sys.stderr)
        return 1
    print(f"all results equal the CPU's to {TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
