"""A measured toy training run: GRPO against MaxEnt (fixed tau) against MaxEnt
with the tau controller, following either the weight entropy of all groups or
that of the mixed groups only; all four on the service's statistics and weights.

Task: the prompt is 5 distinct digits; the answer is 3 digits; the reward is 1
when they are distinct and all taken from the prompt (60 correct answers per
prompt), else 0. The policy is a 2-layer Llama (hidden 64) over 13 tokens
(10 digits, BOS, SEP, PAD), briefly pre-trained on answers whose digits come
from the prompt half of the time; decoding is restricted to the digits.

Every arm starts from the same pre-trained weights, sees the same prompts and
takes the same number of steps. One step: sample K completions for each of P
prompts, reward them, ask the service for advantages, q and weights, take an
Adam step on the arm's loss, and send exactly one UpdateController with the
weight entropy its run's entropy_scope selects and the k3 KL against the
frozen initial policy.

    python bench/train_toy.py --out docs/training [--steps 1000] [--target HOST:PORT]
                              [--seed 0] [--arms grpo,maxent,controller,controller_mixed]

Without --target the script starts its own maxent-server on a loopback port
with a temporary data directory. It writes results.json and PNG plots under
--out and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from maxent_client import MaxEntClient, WeightingConfig  # noqa: E402
from maxent_client.training import (  # noqa: E402
    controller_request_id,
    k3_kl,
    listwise_maxent_loss,
    sequence_logprobs,
    token_logprobs,
)

DIGITS, BOS, SEP, PAD = 10, 10, 11, 12
VOCAB = 13
PROMPT_LEN, ANSWER_LEN = 5, 3
PREFIX = PROMPT_LEN + 2  # BOS, the prompt, SEP
HELD_OUT = 256
EVAL_SAMPLES = 64
SMOOTH = 25


@dataclass(frozen=True)
class ArmSpec:
    """What sets an arm apart: its objective, whether the controller moves tau
    towards a target, and which groups' weight entropy the controller follows."""

    objective: str  # "grpo" (the advantages as weights) or "maxent" (the listwise loss)
    controlled: bool = False
    entropy_scope: str = "all_groups"
    color: str = "C0"


ARMS = {
    "grpo": ArmSpec("grpo", color="C0"),
    "maxent": ArmSpec("maxent", color="C1"),
    "controller": ArmSpec("maxent", controlled=True, color="C2"),
    "controller_mixed": ArmSpec("maxent", controlled=True, entropy_scope="mixed_groups", color="C3"),
}


# -- the task ------------------------------------------------------------------------


def prompt_pools(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All 30 240 ordered prompts, shuffled: (training pool, held-out prompts)."""
    prompts = np.array(list(itertools.permutations(range(DIGITS), PROMPT_LEN)), dtype=np.int64)
    np.random.default_rng(seed).shuffle(prompts)
    return prompts[HELD_OUT:], prompts[:HELD_OUT]


def with_prefix(prompts: torch.Tensor) -> torch.Tensor:
    """[B, 5] prompt digits -> [B, 7] tokens: BOS, the digits, SEP."""
    b = prompts.shape[0]
    return torch.cat([torch.full((b, 1), BOS), prompts, torch.full((b, 1), SEP)], dim=1)


def rewards(prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """1.0 where the 3 answer digits are distinct and all in the prompt, else 0.0."""
    in_prompt = (answers[:, :, None] == prompts[:, None, :]).any(-1).all(-1)
    a, b, c = answers.unbind(-1)
    return (in_prompt & (a != b) & (a != c) & (b != c)).double()


def pretraining_answers(prompts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each answer digit is a prompt digit with probability 1/2, else any digit."""
    b = prompts.shape[0]
    from_prompt = prompts.gather(1, torch.randint(PROMPT_LEN, (b, ANSWER_LEN), generator=gen))
    anything = torch.randint(DIGITS, (b, ANSWER_LEN), generator=gen)
    coin = torch.rand(b, ANSWER_LEN, generator=gen) < 0.5
    return torch.where(coin, from_prompt, anything)


# -- the policy ----------------------------------------------------------------------


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=16, bos_token_id=BOS, pad_token_id=PAD, eos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def answer_token_logprobs(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """[B, 3] log-probs of the answer tokens under digit-restricted decoding."""
    logits = model(input_ids=tokens).logits[:, PREFIX - 1 : -1, :DIGITS]
    return token_logprobs(logits, tokens[:, PREFIX:])


def pretrain(model: LlamaForCausalLM, pool: np.ndarray, seed: int, steps: int, batch: int = 128) -> float:
    """Supervised steps on half-right answers; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.zeros(())
    for _ in range(steps):
        prompts = torch.from_numpy(pool[torch.randint(len(pool), (batch,), generator=gen).numpy()])
        tokens = torch.cat([with_prefix(prompts), pretraining_answers(prompts, gen)], dim=1)
        loss = -answer_token_logprobs(model, tokens).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def sample(model: LlamaForCausalLM, prompts: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """[P*K, 10] tokens: each prompt repeated K times (groups contiguous), 3 sampled digits."""
    tokens = with_prefix(prompts).repeat_interleave(k, dim=0)
    for _ in range(ANSWER_LEN):
        logits = model(input_ids=tokens).logits[:, -1, :DIGITS].float()
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


@torch.no_grad()
def policy_entropy(model: LlamaForCausalLM, tokens: torch.Tensor) -> float:
    """Mean entropy (nats) of the digit-restricted next-token distributions at the answer positions."""
    logp = torch.log_softmax(model(input_ids=tokens).logits[:, PREFIX - 1 : -1, :DIGITS].float(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


# -- the service ---------------------------------------------------------------------


def arm_config(arm: str, args: argparse.Namespace) -> WeightingConfig:
    spec = ARMS[arm]
    if spec.objective == "grpo":
        return WeightingConfig(train_grpo_objective=True)
    if not spec.controlled:
        return WeightingConfig(tau=args.tau, beta=0.0)
    return WeightingConfig(
        tau=args.controller_tau, beta=0.0, target_entropy=args.target_fraction * math.log(args.k),
        tau_lr=args.tau_lr, tau_min=args.tau_min, entropy_scope=spec.entropy_scope,
    )


def service_weights(client: MaxEntClient, run_id: str, utilities: np.ndarray, sizes: np.ndarray):
    """Reward statistics and weights in one ComputeStepStatistics round trip:
    (weights, the statistics with the weight entropies).

    With beta = 0 the weights need no reference log-probs. Under the GRPO
    objective (train_grpo_objective) the service's weights are the advantages."""
    stats = client.compute_step_statistics(run_id, utilities=utilities, group_sizes=sizes,
                                           include_reference_term=False)
    return stats.weights, stats


def arm_loss(arm: str, seq_logp: torch.Tensor, weights: np.ndarray, sizes: np.ndarray) -> torch.Tensor:
    """GRPO: -mean(A_i * l_i); MaxEnt: the listwise loss with the service's weights."""
    if ARMS[arm].objective == "grpo":
        return -(torch.as_tensor(weights, dtype=seq_logp.dtype) * seq_logp).mean()
    return listwise_maxent_loss(seq_logp, weights, sizes).loss


def mixed_entropy_floor(reward: torch.Tensor, k: int) -> float | None:
    """Mean of log c over the groups with c of k answers right, 0 < c < k (None
    without such a group): with beta = 0 and a 0/1 reward, the mixed-group
    weight entropy tends to it as tau -> 0 and cannot go below it."""
    correct = reward.view(-1, k).sum(1)
    mixed = (correct > 0) & (correct < k)
    return float(correct[mixed].log().mean()) if mixed.any() else None


# -- one arm -------------------------------------------------------------------------


@dataclass
class Arm:
    """One arm's run on the service, its policy, optimizer and sampling generator."""

    name: str
    run_id: str
    policy: LlamaForCausalLM
    reference: LlamaForCausalLM
    optimizer: torch.optim.Optimizer
    gen: torch.Generator


def start_arm(name: str, client: MaxEntClient, init: LlamaForCausalLM, args: argparse.Namespace) -> Arm:
    """Create the arm's run and copy `init` into its policy and frozen reference."""
    run_id = f"toy-{name}-s{args.seed}-{uuid.uuid4().hex[:8]}"
    client.create_run(run_id, arm_config(name, args))
    policy, reference = copy.deepcopy(init), copy.deepcopy(init).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    return Arm(name, run_id, policy, reference, optimizer, torch.Generator().manual_seed(args.seed + 2))


def train_step(arm: Arm, client: MaxEntClient, prompts: torch.Tensor, step: int, args: argparse.Namespace) -> dict:
    """Sample, reward, weigh, take one optimizer step and one controller update; returns the step's numbers."""
    sizes = np.full(len(prompts), args.k, dtype=np.int64)
    tokens = sample(arm.policy, prompts, args.k, arm.gen)
    reward = rewards(prompts.repeat_interleave(args.k, dim=0), tokens[:, PREFIX:])
    weights, stats = service_weights(client, arm.run_id, reward.numpy(), sizes)
    token_lp = answer_token_logprobs(arm.policy, tokens)
    with torch.no_grad():
        ref_lp = answer_token_logprobs(arm.reference, tokens)
    mask = torch.ones_like(token_lp)
    kl = k3_kl(ref_lp, token_lp, mask)
    loss = arm_loss(arm.name, sequence_logprobs(token_lp, mask), weights, sizes)
    arm.optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(arm.policy.parameters(), args.clip)
    arm.optimizer.step()
    # The pair the run's entropy_scope selects; none at all on a step without a group in scope.
    entropy = stats.controller_weight_entropy
    state = client.update_controller(
        arm.run_id, global_step=step, weight_entropy=entropy, measured_kl=kl,
        max_weight_entropy=None if entropy is None else stats.controller_max_weight_entropy,
        request_id=controller_request_id(arm.run_id, arm.name, step),
    ).state
    return {
        "reward": float(reward.mean()), "weight_entropy": stats.weight_entropy,
        "mixed_entropy": stats.mixed_weight_entropy, "mixed_groups": stats.mixed_group_count,
        "mixed_floor": mixed_entropy_floor(reward, args.k),
        "entropy_ema": state.entropy_ema, "target": state.active_target_entropy, "tau": state.tau,
        "beta": state.beta, "kl": kl, "policy_entropy": policy_entropy(arm.policy, tokens),
        "loss": float(loss.detach()),
    }


def train_arm(name: str, client: MaxEntClient, init: LlamaForCausalLM, pool: np.ndarray,
              args: argparse.Namespace) -> tuple[LlamaForCausalLM, dict]:
    """Train one arm from `init`; returns the trained policy and its per-step series."""
    arm = start_arm(name, client, init, args)
    prompt_rng = np.random.default_rng(args.seed + 1)  # the same prompts in every arm
    series: dict[str, list] = {}
    step_seconds = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        prompts = torch.from_numpy(pool[prompt_rng.integers(len(pool), size=args.prompts)])
        record(series, **train_step(arm, client, prompts, step, args))
        step_seconds.append(time.perf_counter() - tick)
        if step % args.log_every == 0 or step == args.steps:
            log_step(name, step, series, time.perf_counter() - started)
    final = client.get_run(arm.run_id).state
    quantiles = np.quantile(step_seconds, [0.1, 0.5, 0.9, 1.0]).round(3).tolist()
    meta = {"run_id": arm.run_id, "wall_seconds": time.perf_counter() - started,
            "step_seconds": dict(zip(("p10", "median", "p90", "max"), quantiles)), "final_state": {
        "tau": final.tau, "beta": final.beta, "entropy_ema": final.entropy_ema, "global_step": final.global_step,
        "version": final.version}}
    return arm.policy, {**meta, "series": series}


def record(series: dict[str, list], **values: float | int | None) -> None:
    """Append one step's values (floats to 5 significant digits; counts and None as they are)."""
    for name, value in values.items():
        series.setdefault(name, []).append(value if value is None or isinstance(value, int) else float(f"{value:.5g}"))


def log_step(arm: str, step: int, series: dict[str, list], elapsed: float) -> None:
    recent = series["reward"][-SMOOTH:]
    ema = series["entropy_ema"][-1]
    print(f"[{arm}] step {step:5d}  reward(last {len(recent)}) {np.mean(recent):.3f}  "
          f"H_w {series['weight_entropy'][-1]:.3f}  EMA {'-' if ema is None else f'{ema:.3f}'}  "
          f"tau {series['tau'][-1]:.4f}  kl {series['kl'][-1]:.4f}  {elapsed:.0f}s", flush=True)


# -- evaluation ----------------------------------------------------------------------


def pass_at_k(n: int, correct: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k per prompt from n samples with `correct` right: 1 - C(n-c, k) / C(n, k)."""
    c = correct.double()
    log_ratio = (torch.lgamma(n - c + 1) - torch.lgamma((n - c - k + 1).clamp(min=1))
                 - math.lgamma(n + 1) + math.lgamma(n - k + 1))
    return torch.where(n - c < k, torch.ones_like(c), 1.0 - log_ratio.exp())


def distinct_correct(answers: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per prompt: the number of distinct correct answers among its samples ([P, S, 3], [P, S])."""
    codes = (answers * torch.tensor([100, 10, 1])).sum(-1)
    codes = torch.where(correct, codes, torch.full_like(codes, -1)).sort(dim=1).values
    first = torch.cat([codes[:, :1] >= 0, (codes[:, 1:] != codes[:, :-1]) & (codes[:, 1:] >= 0)], dim=1)
    return first.sum(1)


def evaluate(model: LlamaForCausalLM, held_out: np.ndarray, k: int, seed: int) -> dict:
    """pass@1, pass@k and distinct correct answers (in k and in 64 samples) on held-out prompts."""
    gen = torch.Generator().manual_seed(seed + 3)
    prompts = torch.from_numpy(held_out)
    tokens = sample(model, prompts, EVAL_SAMPLES, gen)
    answers = tokens[:, PREFIX:]
    correct = rewards(prompts.repeat_interleave(EVAL_SAMPLES, dim=0), answers).bool()
    answers, correct = answers.view(len(prompts), EVAL_SAMPLES, -1), correct.view(len(prompts), EVAL_SAMPLES)
    count = correct.sum(1)
    return {
        "prompts": len(prompts), "samples": EVAL_SAMPLES, "k": k,
        "pass@1": float(count.double().mean() / EVAL_SAMPLES),
        f"pass@{k}": float(pass_at_k(EVAL_SAMPLES, count, k).mean()),
        f"distinct_correct@{k}": float(distinct_correct(answers[:, :k], correct[:, :k]).double().mean()),
        f"distinct_correct@{EVAL_SAMPLES}": float(distinct_correct(answers, correct).double().mean()),
    }


# -- controller band -----------------------------------------------------------------


def band_stats(series: dict[str, list], tolerance: float = 0.1) -> dict | None:
    """Where |EMA - target| < tolerance * target: first entry, in-band share after it, exits."""
    ema, target = series["entropy_ema"], series["target"]
    if not ema or target[-1] is None or all(e is None for e in ema):
        return None
    inside = [e is not None and abs(e - t) < tolerance * t for e, t in zip(ema, target)]
    intervals, start = [], None
    for step, ok in enumerate(inside + [False], start=1):
        if ok and start is None:
            start = step
        elif not ok and start is not None:
            intervals.append([start, step - 1])
            start = None
    first = intervals[0][0] if intervals else None
    after = inside[first - 1 :] if first else []
    return {
        "tolerance": tolerance, "target": target[-1], "first_in_band": first,
        "in_band_fraction_after_first": float(np.mean(after)) if after else 0.0,
        "in_band_fraction_last_half": float(np.mean(inside[len(inside) // 2 :])),
        "intervals": intervals, "exits": [end for _, end in intervals if end < len(inside)],
    }


# -- plots ---------------------------------------------------------------------------


def smooth(values: list, window: int = SMOOTH) -> np.ndarray:
    """Trailing mean over `window` steps (None counts as missing)."""
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    out = np.full_like(x, np.nan)
    for i in range(len(x)):
        chunk = x[max(0, i - window + 1) : i + 1]
        out[i] = np.nanmean(chunk) if np.isfinite(chunk).any() else np.nan
    return out


def scope_floor(series: dict[str, list], scope: str, groups: int, k: int) -> np.ndarray:
    """Per step, the least weight entropy (tau -> 0, beta = 0) over the groups in
    `scope`: log c for a mixed group with c right, log k for any other group."""
    floor = np.array([np.nan if f is None else f for f in series["mixed_floor"]], dtype=float)
    if scope == "mixed_groups":
        return floor
    mixed = np.array(series["mixed_groups"], dtype=float)
    return (mixed * np.nan_to_num(floor) + (groups - mixed) * math.log(k)) / groups


def plot_all(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    color = lambda arm: ARMS[arm].color  # noqa: E731
    steps = lambda s: np.arange(1, len(s) + 1)  # noqa: E731
    nan_none = lambda values: np.array([np.nan if v is None else v for v in values], dtype=float)  # noqa: E731

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, data in arms.items():
        ax.plot(steps(data["series"]["reward"]), smooth(data["series"]["reward"]), color=color(arm), label=arm)
    ax.set(xlabel="step", ylabel=f"mean reward ({SMOOTH}-step trailing mean)", title="Training reward", ylim=(0, 1))
    ax.legend()
    _save(fig, out / "reward.png")

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 10), sharex=True)
    for arm, data in arms.items():
        s = data["series"]
        if ARMS[arm].objective == "maxent":
            top.plot(steps(s["weight_entropy"]), smooth(s["weight_entropy"]), color=color(arm),
                     label=f"{arm}: all groups")
            top.plot(steps(s["mixed_entropy"]), smooth(s["mixed_entropy"]), "--", color=color(arm),
                     label=f"{arm}: mixed groups")
        if ARMS[arm].controlled:
            scope = ARMS[arm].entropy_scope
            middle.plot(steps(s["entropy_ema"]), nan_none(s["entropy_ema"]), color=color(arm), lw=1,
                        label=f"{arm}: EMA ({scope.replace('_', ' ')})")
            floor = scope_floor(s, scope, results["settings"]["prompts"], results["settings"]["k"])
            middle.plot(steps(floor), smooth(list(floor)), "--", color=color(arm), lw=1,
                        label=f"{arm}: floor ({scope.replace('_', ' ')})")
    targets = [nan_none(data["series"]["target"]) for arm, data in arms.items() if ARMS[arm].controlled]
    if targets:
        target = targets[0]
        for ax in (top, middle):
            ax.plot(steps(target), target, "k:", lw=1, label="target")
        middle.fill_between(steps(target), 0.9 * target, 1.1 * target, color="k", alpha=0.1, label="target ±10 %")
    top.set(ylabel="nats", title=f"Weight entropy: mean over all / mixed groups ({SMOOTH}-step trailing mean)")
    middle.set(ylabel="nats", title=f"Controller EMA vs target; dashed: floor at tau -> 0 ({SMOOTH}-step mean)")
    for arm, data in arms.items():
        bottom.plot(steps(data["series"]["policy_entropy"]), smooth(data["series"]["policy_entropy"]),
                    color=color(arm), label=arm)
    bottom.set(xlabel="step", ylabel="nats", title="Policy entropy per answer token")
    middle.set_ylim(0, 2.7)
    middle.legend(fontsize=7, ncol=2, loc="upper left")
    for ax in (top, bottom):
        ax.legend(fontsize=7)
    _save(fig, out / "entropy.png")

    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1, 3]})
    for arm, data in arms.items():
        s = data["series"]
        if ARMS[arm].objective != "grpo":  # the GRPO objective has no tau
            axes[0].plot(steps(s["tau"]), s["tau"], color=color(arm), label=arm)
        axes[1].plot(steps(s["beta"]), s["beta"], color=color(arm), label=arm)
        axes[2].plot(steps(s["kl"]), s["kl"], lw=0.6, color=color(arm), label=arm)
    axes[0].set(ylabel="tau", title="tau and beta per step; k3 KL to the initial policy (sent as measured_kl)")
    axes[1].set(ylabel="beta")
    axes[2].set(ylabel="k3 KL (log scale)", yscale="log", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=7)
    _save(fig, out / "tau_beta.png")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()


# -- main ----------------------------------------------------------------------------


@contextmanager
def service(target: str | None) -> Iterator[str]:
    """The target to use: `target`, or a maxent-server started here for the run."""
    if target:
        yield target
        return
    from server_process import ServerProcess

    with tempfile.TemporaryDirectory(prefix="train-toy-") as tmp:
        server = ServerProcess(Path(tmp) / "data", env={"OMP_NUM_THREADS": "1"})
        server.start()
        try:
            yield server.target
        finally:
            server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and the PNGs")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (group size K)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--tau", type=float, default=0.2, help="the fixed-tau MaxEnt arm's tau")
    p.add_argument("--controller-tau", type=float, default=0.3, help="the controller arms' initial tau")
    p.add_argument("--target-fraction", type=float, default=0.75, help="target entropy = this * log K")
    p.add_argument("--tau-lr", type=float, default=0.1)
    p.add_argument("--tau-min", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    p.add_argument("--replot", action="store_true", help="only redraw the PNGs from --out/results.json")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        p.error(f"unknown arms: {sorted(unknown)} (choose from {', '.join(ARMS)})")
    return args


def summary_line(arm: str, data: dict, k: int) -> str:
    ev, rew = data["eval"], data["series"]["reward"]
    last = np.mean(rew[-100:]) if rew else float("nan")
    return (f"{arm:>16}: {data['wall_seconds']:6.0f} s  train reward (last 100) {last:.3f}  "
            f"pass@1 {ev['pass@1']:.3f}  pass@{k} {ev[f'pass@{k}']:.3f}  "
            f"distinct@{k} {ev[f'distinct_correct@{k}']:.2f}  distinct@{EVAL_SAMPLES} "
            f"{ev[f'distinct_correct@{EVAL_SAMPLES}']:.1f}")


def run_arms(args: argparse.Namespace, init: LlamaForCausalLM, pool: np.ndarray, held_out: np.ndarray) -> dict:
    """Train and evaluate every requested arm against the service."""
    arms = {}
    with service(args.target) as target, MaxEntClient(target, timeout=60) as client:
        for name in args.arms:
            policy, data = train_arm(name, client, init, pool, args)
            data["eval"] = evaluate(policy, held_out, args.k, args.seed)
            data["controller_band"] = band_stats(data["series"]) if ARMS[name].controlled else None
            arms[name] = data
            print(summary_line(name, data, args.k), flush=True)
    return arms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot_all(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pool, held_out = prompt_pools(args.seed)
    began = time.perf_counter()
    init = build_model(args.seed)
    pretrain_loss = pretrain(init, pool, args.seed, args.pretrain_steps)
    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__},
        "pretrain": {"steps": args.pretrain_steps, "final_loss": pretrain_loss, "seconds": time.perf_counter() - began},
        "initial_eval": evaluate(init, held_out, args.k, args.seed),
    }
    print(f"pre-trained in {results['pretrain']['seconds']:.0f} s; initial policy: {results['initial_eval']}")
    results["arms"] = run_arms(args, init, pool, held_out)
    results["wall_seconds"] = time.perf_counter() - began
    (args.out / "results.json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
    plot_all(results, args.out)
    print(f"total {results['wall_seconds']:.0f} s; wrote results.json, reward.png, entropy.png, tau_beta.png "
          f"to {args.out}")
    for name, data in results["arms"].items():
        if data["controller_band"]:
            band = {k: v for k, v in data["controller_band"].items() if k != "intervals"}
            print(f"{name} band: {json.dumps(band)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
