"""``MaxEntGRPOTrainer``: TRL's GRPOTrainer trained with the service's MaxEnt weights.

::

    from maxent_client import RewardTerm
    from maxent_client.integrations.trl import MaxEntGRPOTrainer

    trainer = MaxEntGRPOTrainer(
        "Qwen/Qwen2.5-0.5B-Instruct", client="127.0.0.1:50051", run_id="exp-1",
        rewards=[RewardTerm("math_accuracy", 1.0), RewardTerm("format", 0.2)],   # or reward_funcs=[...]
        args=GRPOConfig(num_generations=8, per_device_train_batch_size=8, beta=0.04, ...),
        train_dataset=dataset)                                                    # "prompt" and "answer" columns
    trainer.train()

Per generation batch the trainer makes one ComputeStepStatistics call: the
utilities (the service's reward terms on the completion texts, or the
weighted sum of TRL ``reward_funcs``), the reference model's sequence
log-prob sums and token counts, and the group sizes of the whole batch (all
ranks); the service answers with the advantages, q and the MaxEnt weights w
under the run's current tau and beta.

``loss="maxent"`` minimises the listwise loss of
:func:`maxent_client.training.listwise_maxent_loss`: per group
L_g = -sum_i w_i log softmax_g(l)_i over the policy's sequence log-probs l,
averaged over the step's active groups (plus the optional clip term). tau and
beta reach the gradient through w. ``loss="grpo"`` (also chosen when the run
trains the GRPO objective) is TRL's own loss on the service's advantages.

After every optimizer step, and only then, the main process sends one
UpdateController with the step's mean group weight entropy and the k3 KL
between the policy and the reference (token mean over every completion token
of the step, all ranks), under the request id
``controller_request_id(run_id, job_name, step)``: a resumed job that runs a
step again replays it instead of stepping twice.

Every micro-batch of the maxent loss holds whole groups: TRL's row shuffle is
replaced by a shuffle of whole groups, and ``per_device_train_batch_size``
must be a multiple of ``num_generations``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from ..client import MaxEntClient
from ..models import RewardTerm, StepStatistics, UpdateResult
from ..training import (
    active_group_mask,
    controller_reporter_id,
    controller_request_id,
    k3_kl_terms,
    listwise_maxent_loss,
    sequence_logprobs,
)
from .accelerate import MainProcessClient
from .trl import DEFAULT_ANSWER_COLUMNS, _as_text, completion_text

LOSSES = ("maxent", "grpo")

# Arguments of compute_step_statistics that the trainer fills from the batch.
_BATCH_FIELDS = frozenset({
    "utilities", "completions", "answers", "rewards", "group_sizes", "token_counts", "truncated", "gen_logp_sum",
    "ref_logp_sum", "ref_token_counts",
})
_INTEGER_FIELDS = {"token_counts": np.int64, "ref_token_counts": np.int64, "truncated": np.bool_}

# Optional model inputs that TRL's forward passes take from a batch.
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class _ClipOptions(TypedDict):
    """The clip term's options of listwise_maxent_loss."""

    clip_coef: float
    epsilon_low: float
    epsilon_high: float | None


@dataclass
class _Rollout:
    """What ``_calculate_rewards`` saw of a generation batch (this rank's rows)."""

    inputs: list[dict[str, Any]]
    completions: list[Any]
    lengths: list[int]
    utilities: torch.Tensor | None  # every rank's, when TRL reward functions score the batch


class _ServiceRewards:
    """GRPOTrainer's reward function slot when the service's reward terms score
    the completions; MaxEntGRPOTrainer computes those itself."""

    def __init__(self) -> None:
        self.__name__ = "maxent"

    def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        raise RuntimeError("the service's reward terms are evaluated by MaxEntGRPOTrainer, not called directly")


class _ControllerStep(TrainerCallback):
    """Sends the trainer's controller update at the end of each optimizer step."""

    def __init__(self, trainer: "MaxEntGRPOTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.trainer.step_controller()
        return control


def default_job_name(output_dir: str, run_id: str) -> str:
    """A job name that a job resumed in the same output directory derives again."""
    key = f"{os.path.abspath(output_dir or '.')}\n{run_id}"
    return "trl-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def shuffle_groups(batch: dict[str, Any], groups: torch.Tensor) -> dict[str, Any]:
    """Shuffle the rows of `batch` by whole groups (runs of equal `groups` ids),
    keeping each group's rows together and in order."""
    counts = torch.unique_consecutive(groups.cpu(), return_counts=True)[1]
    order = torch.randperm(counts.numel())
    starts = torch.cumsum(counts, 0) - counts
    sizes = counts[order]
    offsets = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    rows = torch.repeat_interleave(starts[order], sizes) + offsets
    return {key: _take(value, rows) for key, value in batch.items()}


def _take(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.ndim == 0 else value[rows.to(value.device)]
    if isinstance(value, list):
        return [value[i] for i in rows.tolist()]
    return value


def _loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


def _check_options(run_id: str, loss: str, rewards: Any, reward_funcs: Any, clip_coef: float,
                   step_options: dict[str, Any], trainer_kwargs: dict[str, Any]) -> None:
    if not run_id:
        raise ValueError("run_id is required: the run whose tau and beta weight the completions")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if (rewards is None) == (reward_funcs is None):
        raise ValueError("give exactly one of rewards (the service's reward terms) and reward_funcs (TRL's)")
    if rewards is not None and trainer_kwargs.get("environment_factory") is not None:
        raise ValueError("rewards= cannot score an environment's rollouts; use reward_funcs= with environment_factory")
    if clip_coef < 0:
        raise ValueError(f"clip_coef must be >= 0, got {clip_coef}")
    reserved = sorted(_BATCH_FIELDS & set(step_options))
    if reserved:
        raise ValueError(f"step_options may not set {reserved}: the trainer fills them from the batch")


def _check_group_batches(args: Any) -> None:
    size, k = args.per_device_train_batch_size, args.num_generations
    if size % k:
        raise ValueError(
            f"loss='maxent' needs whole groups in every micro-batch: per_device_train_batch_size ({size}) must be "
            f"a multiple of num_generations ({k})")


class MaxEntGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss uses the MaxEnt service's weights (see the module docs).

    ``client``: a :class:`~maxent_client.MaxEntClient` or a target "host:port"
    (opened on the main process only). ``run_id``: the run that gives tau,
    beta and the defaults. Rewards come from exactly one of ``rewards`` (the
    service's reward terms on the completion texts, with each group's gold
    answer from the first of ``answer_columns`` in the dataset) and
    ``reward_funcs`` (TRL reward functions; their ``reward_weights``-weighted
    sum is sent as the utilities, a completion none of them scored as 0).
    ``step_options``: further arguments of ``compute_step_statistics``
    (``q_temperature``, ``advantage_baseline``, ``seed_grpo``, ...); TRL's
    ``scale_rewards`` is sent unless they set it. ``job_name`` names the job in
    the controller's request ids (default: from ``args.output_dir`` and
    ``run_id``). Other keyword arguments go to GRPOTrainer.

    Without a reference model (``GRPOConfig(beta=0.0)``) the behaviour
    policy's log-probs stand in for the reference, with a warning.
    """

    # GRPOTrainer's buffer of the generation batch's micro-batches (None until the first)
    _buffered_inputs: list[dict[str, Any]] | None

    def __init__(
        self,
        model: Any,
        *,
        client: MaxEntClient | str,
        run_id: str,
        reward_funcs: Any = None,
        rewards: Sequence[RewardTerm] | None = None,
        loss: str = "maxent",
        length_normalize_policy: bool = False,
        skip_zero_variance_groups: bool = False,
        clip_coef: float = 0.0,
        clip_epsilon_low: float = 0.2,
        clip_epsilon_high: float | None = None,
        job_name: str | None = None,
        answer_columns: Sequence[str] = DEFAULT_ANSWER_COLUMNS,
        step_options: dict[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        step_options = dict(step_options or {})
        _check_options(run_id, loss, rewards, reward_funcs, clip_coef, step_options, kwargs)
        args = kwargs.get("args")
        self.maxent_service = MainProcessClient(client, accelerator=getattr(args, "distributed_state", None))
        self.run_id = run_id
        run = self.maxent_service.get_run(run_id, timeout=timeout)
        self.objective = "grpo" if run.config.train_grpo_objective else loss
        if self.objective == "maxent" and args is not None:  # TRL's default config has whole groups
            _check_group_batches(args)
        self.service_rewards = None if rewards is None else list(rewards)
        funcs = [_ServiceRewards()] if rewards is not None else reward_funcs
        super().__init__(model, reward_funcs=funcs, **kwargs)
        self.job_name = job_name or default_job_name(self.args.output_dir, run_id)
        self.length_normalize_policy = length_normalize_policy
        self.skip_zero_variance_groups = skip_zero_variance_groups
        self.clip: _ClipOptions = {"clip_coef": clip_coef, "epsilon_low": clip_epsilon_low,
                                   "epsilon_high": clip_epsilon_high}
        self.answer_columns = tuple(answer_columns)
        self.step_options = {"scale_rewards": self.scale_rewards, **step_options}
        self.timeout = timeout
        #: The controller update of the last optimizer step (every rank).
        self.last_update: UpdateResult | None = None
        #: The statistics of the last generation batch (the whole batch, every rank).
        self.last_statistics: StepStatistics | None = None
        self._rollout: _Rollout | None = None
        self._policy_logps: torch.Tensor | None = None
        self._kl_terms = [0.0, 0]
        self._entropies: list[float] = []
        self._max_entropies: list[float] = []
        self._entropies_used = False
        self._step_completions = 0  # completions behind self._entropies: the report's sample count
        self._warned_reference = False
        self.add_callback(_ControllerStep(self))

    # -- generation and the service's statistics ---------------------------------------

    def _calculate_rewards(self, inputs: list[dict[str, Any]], prompts: list[Any], completions: list[Any],
                           completion_ids_list: list[list[int]]) -> torch.Tensor:
        lengths = [len(ids) for ids in completion_ids_list]
        if self.service_rewards is not None:
            self._rollout = _Rollout(inputs, list(completions), lengths, None)
            # placeholder scores for TRL's bookkeeping; the logged ones are replaced by the service's
            return torch.zeros(len(prompts) * self.accelerator.num_processes, 1, device=self.accelerator.device)
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weighted = (rewards * self.reward_weights.to(rewards.device)).nansum(dim=1)
        utilities = torch.where(rewards.isnan().all(dim=1), 0.0, weighted)
        self._rollout = _Rollout(inputs, list(completions), lengths, utilities)
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output: dict[str, Any] = super()._generate_and_score_completions(inputs)
        rollout, self._rollout = self._rollout, None
        if rollout is None:  # GRPOTrainer scores every generation batch through _calculate_rewards
            raise RuntimeError("GRPOTrainer generated a batch without calling _calculate_rewards")
        mode = "train" if self.model.training else "eval"
        reference = self._reference_token_logps(output)
        stats = self._step_statistics(output, reference, rollout, mode)
        self._attach(output, stats, reference)
        self._log_statistics(mode, stats)
        return output

    def _step_statistics(self, output: dict[str, Any], reference: torch.Tensor, rollout: _Rollout,
                         mode: str) -> StepStatistics:
        """One ComputeStepStatistics call for the whole batch (every rank's rows)."""
        columns = self._gathered_columns(output, reference, rollout)
        size = self.num_generations if mode == "train" else self.num_generations_eval
        total = len(columns["token_counts"])
        if total % size:
            raise ValueError(f"{total} completions do not make groups of num_generations={size}")
        utilities: np.ndarray | None = None
        completions: list[str] | None = None
        answers: list[str] | None = None
        if rollout.utilities is not None:
            utilities = rollout.utilities.double().cpu().numpy()
        else:
            completions = gather_object([completion_text(c) for c in rollout.completions])
            local_answers = self._answers(rollout.inputs)
            if local_answers is not None:
                answers = gather_object(local_answers)[::size]
        options = {**self.step_options, "timeout": self.timeout}
        stats = self.maxent_service.compute_step_statistics(
            self.run_id, utilities=utilities, completions=completions, answers=answers,
            rewards=self.service_rewards or (), group_sizes=np.full(total // size, size, dtype=np.int64),
            token_counts=columns["token_counts"], truncated=columns["truncated"],
            gen_logp_sum=columns.get("gen_logp_sum"), ref_logp_sum=columns["ref_logp_sum"],
            ref_token_counts=columns["ref_token_counts"], **options)
        self.last_statistics = stats
        return stats

    def _gathered_columns(self, output: dict[str, Any], reference: torch.Tensor,
                          rollout: _Rollout) -> dict[str, np.ndarray]:
        """Per-completion numbers of every rank, gathered in one collective."""
        mask = _loss_mask(output)
        device = mask.device
        lengths = torch.tensor(rollout.lengths, device=device)
        last = output["completion_ids"].gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        ends = torch.tensor([*self.eos_token_ids, self._tokenizer.pad_token_id], device=device)
        columns = {
            "token_counts": lengths,
            "truncated": (lengths > 0) & ~torch.isin(last, ends),
            "ref_logp_sum": sequence_logprobs(reference, mask),
            "ref_token_counts": mask.sum(dim=1),
        }
        behaviour = output.get("old_per_token_logps")
        if behaviour is None and self.step_options.get("seed_grpo"):  # SEED-GRPO needs generation log-probs
            behaviour = self._token_logps(self.model, output)
        if behaviour is not None:
            columns["gen_logp_sum"] = sequence_logprobs(behaviour, mask)
        table = torch.stack([value.double() for value in columns.values()], dim=1)
        table = self.accelerator.gather(table).cpu().numpy()
        return {name: table[:, i].astype(_INTEGER_FIELDS.get(name, np.float64)) for i, name in enumerate(columns)}

    def _answers(self, inputs: list[dict[str, Any]]) -> list[str] | None:
        for column in self.answer_columns:
            if column in inputs[0]:
                return ["" if row.get(column) is None else _as_text(row[column]) for row in inputs]
        return None

    def _reference_token_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """The reference model's token log-probs, or the behaviour policy's in its place."""
        if output.get("ref_per_token_logps") is not None:
            return output["ref_per_token_logps"]
        if self.ref_model is not None:
            return self._token_logps(self.ref_model, output)
        if not self._warned_reference:
            warnings.warn("MaxEntGRPOTrainer has no reference model (GRPOConfig.beta == 0): the behaviour policy's "
                          "log-probs stand in for the reference in the weights and the measured KL", stacklevel=2)
            self._warned_reference = True
        old = output.get("old_per_token_logps")
        return old if old is not None else self._token_logps(self.model, output)

    @torch.no_grad()
    def _token_logps(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        extra = {key: batch[key] for key in _FORWARD_KEYS if batch.get(key) is not None}
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, batch["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size, **extra)
        return logps

    def _attach(self, output: dict[str, Any], stats: StepStatistics, reference: torch.Tensor) -> None:
        """This rank's rows of the statistics, into the batch the loss reads."""
        rows = len(output["completion_ids"])
        local = slice(self.accelerator.process_index * rows, (self.accelerator.process_index + 1) * rows)
        device = output["completion_ids"].device
        sizes = stats.group_sizes
        active = active_group_mask(sizes, q_values=stats.q_values,
                                   skip_zero_variance_groups=self.skip_zero_variance_groups)
        per_row = {
            "advantages": (stats.advantages, torch.float32),
            "maxent_weights": (stats.weights, torch.float32),
            "maxent_active": (np.repeat(active, sizes), torch.bool),
            "maxent_group": (np.repeat(np.arange(len(sizes)), sizes), torch.long),
        }
        for key, (values, dtype) in per_row.items():
            output[key] = torch.as_tensor(values[local], dtype=dtype, device=device)
        output["maxent_active_groups"] = torch.tensor(float(active.sum()), device=device)
        output["maxent_ref_per_token_logps"] = reference

    def _log_statistics(self, mode: str, stats: StepStatistics) -> None:
        """The service's reward numbers replace TRL's; the weights' are added."""
        metrics = self._metrics[mode]
        metrics["reward"][-1] = stats.reward_mean
        metrics["reward_std"][-1] = stats.reward_std
        zero_std = stats.zero_variance_groups
        metrics["frac_reward_zero_std"][-1] = float(zero_std.mean()) if zero_std.size else 0.0
        metrics["maxent/weight_entropy"].append(stats.weight_entropy)
        metrics["maxent/tau"].append(stats.tau)
        metrics["maxent/beta"].append(stats.beta)
        _replace_tail(self._logs["advantages"], stats.advantages.tolist())
        if self.service_rewards is not None:
            name = self.reward_func_names[0]
            metrics[f"rewards/{name}/mean"][-1] = stats.reward_mean
            metrics[f"rewards/{name}/std"][-1] = stats.reward_std
            _replace_tail(self._logs["rewards"][name], stats.total_utils.tolist())
            for term, values in stats.per_reward.items():
                finite = values.values[np.isfinite(values.values)]
                if finite.size:
                    metrics[f"maxent/{term}/mean"].append(float(finite.mean()))
        if mode == "train":
            if self._entropies_used:
                self._entropies, self._max_entropies, self._step_completions = [], [], 0
                self._entropies_used = False
            # the entropy the run's entropy_scope selects; none when no group is in scope
            if stats.controller_weight_entropy is not None:
                self._entropies.append(stats.controller_weight_entropy)
                self._max_entropies.append(stats.controller_max_weight_entropy)
            self._step_completions += int(np.sum(stats.group_sizes))

    # -- micro-batches of whole groups ------------------------------------------------

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        if self.objective != "maxent" or not self.model.training:
            return super()._prepare_inputs(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            batch = shuffle_groups(batch, batch["maxent_group"])
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, steps)]
        return self._buffered_inputs[self._step % steps]

    # -- the loss ---------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        result = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if torch.is_grad_enabled():  # the policy pass of a loss; no_grad passes are old/reference ones
            self._policy_logps = result[0].detach()
        return result

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if self.objective == "maxent":
            loss = self._maxent_loss(model, inputs)
        else:
            loss = super()._compute_loss(model, inputs)
        if self.model.training and self._policy_logps is not None:
            total, count = k3_kl_terms(inputs["maxent_ref_per_token_logps"], self._policy_logps, _loss_mask(inputs))
            self._kl_terms[0] += total
            self._kl_terms[1] += count
        self._policy_logps = None
        return loss

    def _maxent_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The listwise MaxEnt loss of a micro-batch of whole groups, scaled so
        that the step's gradient is that of the mean over all its active groups."""
        mask = _loss_mask(inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        extra = {key: inputs.get(key) for key in _FORWARD_KEYS}
        token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1), compute_entropy=True, **extra)
        old = inputs.get("old_per_token_logps")
        old = token_logps.detach() if old is None else old
        normalize = self.length_normalize_policy
        counts = torch.unique_consecutive(inputs["maxent_group"], return_counts=True)[1]
        firsts = torch.cumsum(counts, 0) - counts
        parts = listwise_maxent_loss(
            sequence_logprobs(token_logps, mask, length_normalize=normalize), inputs["maxent_weights"],
            counts.tolist(), active_groups=inputs["maxent_active"][firsts],
            old_logp=sequence_logprobs(old, mask, length_normalize=normalize), **self.clip)
        mode = "train" if self.model.training else "eval"
        self._log_loss(mode, parts.loss.detach(), entropies, mask)
        if mode == "eval":
            return parts.loss
        # groups of the step per micro-batch, over all ranks (DDP averages the ranks' gradients)
        per_micro = inputs["maxent_active_groups"].clamp(min=1) / (
            self.accelerator.num_processes * self.args.steps_per_generation)
        return parts.loss * parts.active_groups / per_micro / self.current_gradient_accumulation_steps

    def _log_loss(self, mode: str, loss: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        metrics = self._metrics[mode]
        metrics["maxent/loss"].append(self.accelerator.gather(loss).mean().item())
        totals = torch.stack([(entropies * mask).sum(), mask.sum().to(entropies.dtype)]).detach()
        totals = self.accelerator.reduce(totals, reduction="sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1)).item())

    # -- the controller ---------------------------------------------------------------

    def step_controller(self) -> UpdateResult:
        """The UpdateController of the optimizer step just taken (``state.global_step``),
        sent once by the main process; every rank gets the new state. Collective."""
        step = int(self.state.global_step)
        kl = self._step_kl()
        entropy = float(np.mean(self._entropies)) if self._entropies else None
        max_entropy = float(np.mean(self._max_entropies)) if self._max_entropies else None
        self._entropies_used = True
        request_id = controller_request_id(self.run_id, self.job_name, step)
        self.last_update = self.maxent_service.update_controller(
            self.run_id, global_step=step, weight_entropy=entropy, measured_kl=kl, request_id=request_id,
            max_weight_entropy=max_entropy,
            # the job's report: pooled with other jobs' on a run with reporters_per_step > 1
            reporter_id=controller_reporter_id(self.job_name),
            sample_count=float(self._step_completions) if self._step_completions else None, timeout=self.timeout)
        if kl is not None:
            self._metrics["train"]["maxent/kl"].append(kl)
        return self.last_update

    def _step_kl(self) -> float | None:
        """The k3 token mean of the step's micro-batches, over all ranks."""
        totals = torch.tensor(self._kl_terms, dtype=torch.float32, device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        self._kl_terms = [0.0, 0]
        return float(totals[0] / totals[1]) if totals[1] > 0 else None


def _replace_tail(values: deque, tail: list[Any]) -> None:
    """Replace the last len(tail) entries of a bounded deque by `tail`."""
    kept = list(values)[: max(len(values) - len(tail), 0)]
    values.clear()
    values.extend(kept + tail)
