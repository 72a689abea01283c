"""Benchmark report: run the benchmarks of every issue and write one markdown
table plus PNG plots.

    python bench/report.py [--out docs/bench] [--soak-seconds 60] [--quick]

Writes OUT/report.md, OUT/latency_ComputeRewardStatistics.png,
OUT/latency_ComputeWeightStats.png and OUT/soak_rss.png. Every number comes
from this one run on this machine; compare ratios, not absolute seconds.
Needs matplotlib (pip install '.[bench]').
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench_core import BETA, TAU, baseline_rewards, baseline_weights, median_seconds  # noqa: E402
from maxent_client import MaxEntClient, WeightingConfig  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from soak import run_soak  # noqa: E402

GENERATIONS = 16


def latency_sweep(target: str, prompt_counts: list[int], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Median seconds per batch size: each RPC through the server and the
    in-process per-group loop doing the same computation."""
    rng = np.random.default_rng(0)
    out = {name: {"server": [], "baseline": []} for name in ("ComputeRewardStatistics", "ComputeWeightStats")}
    with MaxEntClient(target, timeout=300) as client:
        client.create_run("report", WeightingConfig(tau=TAU, beta=BETA))
        for prompts in prompt_counts:
            u = rng.normal(size=(prompts, GENERATIONS))
            ref = rng.normal(-40, 10, size=u.shape)
            counts = rng.integers(10, 200, size=u.shape)
            q = client.compute_reward_statistics(utilities=u).q_values.reshape(u.shape)
            slow = max(2, repeats // 5)
            lists = u.tolist(), q.tolist(), ref.tolist(), counts.tolist()
            out["ComputeRewardStatistics"]["server"].append(
                median_seconds(lambda: client.compute_reward_statistics(utilities=u), repeats))
            out["ComputeRewardStatistics"]["baseline"].append(median_seconds(lambda: baseline_rewards(lists[0]), slow))
            out["ComputeWeightStats"]["server"].append(median_seconds(
                lambda: client.compute_weight_stats("report", q_values=q, ref_logp_sum=ref, ref_token_counts=counts),
                repeats))
            out["ComputeWeightStats"]["baseline"].append(
                median_seconds(lambda: baseline_weights(*lists[1:]), slow))
    return out


def plot_latency(name: str, prompt_counts: list[int], series: dict[str, list[float]], path: Path) -> None:
    completions = [p * GENERATIONS for p in prompt_counts]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(completions, np.array(series["server"]) * 1000, "o-", label=f"{name} via the server (gRPC)")
    ax.plot(completions, np.array(series["baseline"]) * 1000, "s--", label="in-process loop, a tensor per group")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"completions per call ({GENERATIONS} per prompt)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rss(report, path: Path) -> None:
    times = [t for t, _ in report.rss_mib]
    mib = [m for _, m in report.rss_mib]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(times, mib, "-")
    ax.axvline(report.seconds * 0.25, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"Soak: {report.requests / report.seconds:.0f} req/s, 32 clients, all RPCs")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(HERE / name), *args], capture_output=True, text=True, timeout=1800)
    return (result.stdout + (f"\n(exit {result.returncode})\n" + result.stderr[-2000:] if result.returncode else "")).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--soak-seconds", type=float, default=60)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smaller sweep, skip the other issues' benchmarks")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt_counts = [4, 64, 1024] if args.quick else [4, 16, 64, 256, 1024, 4096]

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "data", extra_args=["--reward-workers", "1"]).start()
        try:
            sweep = latency_sweep(server.target, prompt_counts, args.repeats)
            soak = run_soak(server.target, server.proc.pid, seconds=args.soak_seconds, clients=32)
        finally:
            server.stop()
    for name, series in sweep.items():
        plot_latency(name, prompt_counts, series, out / f"latency_{name}.png")
    plot_rss(soak, out / "soak_rss.png")

    lines = [
        "# Benchmark report",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; `python bench/report.py`.",
        "",
        "## Latency against batch size (median of calls; server = gRPC round trip over loopback)",
        "",
        "| completions | ComputeRewardStatistics (ms) | in-process loop (ms) | speed-up "
        "| ComputeWeightStats (ms) | in-process loop (ms) | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    r, w = sweep["ComputeRewardStatistics"], sweep["ComputeWeightStats"]
    for i, prompts in enumerate(prompt_counts):
        lines.append(
            f"| {prompts * GENERATIONS} | {r['server'][i] * 1e3:.2f} | {r['baseline'][i] * 1e3:.2f} "
            f"| {r['baseline'][i] / r['server'][i]:.1f}x | {w['server'][i] * 1e3:.2f} | {w['baseline'][i] * 1e3:.2f} "
            f"| {w['baseline'][i] / w['server'][i]:.1f}x |")
    lines += ["", "![ComputeRewardStatistics](latency_ComputeRewardStatistics.png) "
              "![ComputeWeightStats](latency_ComputeWeightStats.png)", "",
              f"## Soak ({args.soak_seconds:.0f} s, 32 clients)", "", "```", soak.summary(), "```", "",
              "![RSS over the soak](soak_rss.png)", ""]
    if not args.quick:
        for title, script in (("Service core (1024 x 16)", "bench_core.py"),
                              ("Reward functions: math_accuracy, 4096 completions", "bench_rewards.py"),
                              ("Controller: UpdateController, 32 clients, one run", "bench_controller.py")):
            lines += [f"## {title}", "", f"`python bench/{script}`", "", "```", run_script(script), "```", ""]
    lines += _kept_sections(out / "report.md", {line[3:] for line in lines if line.startswith("## ")})
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _kept_sections(path: Path, written: set[str]) -> list[str]:
    """The sections of an earlier report that this script does not write
    (other benches' figures, added by hand with their commands), kept as they
    were, after the ones it writes."""
    if not path.exists():
        return []
    kept: list[str] = []
    for section in path.read_text().split("\n## ")[1:]:
        title = section.splitlines()[0]
        if title not in written and not title.startswith("Soak ("):
            kept += [f"## {section.rstrip()}", ""]
    return kept
    return 0


if __name__ == "__main__":
    sys.exit(main())
