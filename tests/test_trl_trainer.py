"""MaxEntGRPOTrainer end to end: a tiny local Llama, a real server, the
service's weights in the loss and one controller step per optimizer step."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("trl", reason="trl is not installed (pip install '.[integrations]')")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_trl import build_tiny_model  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from maxent_client import MaxEntClient, RewardTerm, WeightingConfig  # noqa: E402
from maxent_client.integrations.trl import MaxEntGRPOTrainer  # noqa: E402
from maxent_client.training import controller_request_id  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations inside TRL

K = 4  # completions per prompt
CONTROLLED = dict(target_entropy=0.5, tau_lr=0.1, kl_target=0.01, kl_horizon=10, kl_step_size=0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    return str(path), build_tiny_model(path)


@pytest.fixture()
def service(server):
    with MaxEntClient(server.target, timeout=120) as client:
        yield client


def dataset() -> Dataset:
    return Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+4=", "5+1="], "solution": ["2", "4", "7", "6"]})


def distinct_characters(completions, **kwargs):
    """A TRL reward function that varies on random text."""
    return [len(set(c)) / 8.0 for c in completions]


def config(out, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(out), max_steps=3, num_generations=K, per_device_train_batch_size=K,
                    max_completion_length=8, beta=0.04, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return GRPOConfig(**{**settings, **overrides})


def record_statistics(client: MaxEntClient) -> list:
    """Wrap the client's fused call to keep every answer."""
    seen, call = [], client.compute_step_statistics

    def recording(*args, **kwargs):
        seen.append(call(*args, **kwargs))
        return seen[-1]

    client.compute_step_statistics = recording
    return seen


def test_maxent_arm_steps_once_per_optimizer_step_logs_and_replays_on_resume(service, tiny, tmp_path, run_id):
    service.create_run(run_id, WeightingConfig(tau=0.5, beta=0.04, **CONTROLLED))
    path, tokenizer = tiny
    seen = record_statistics(service)
    terms = [RewardTerm("format", 1.0), RewardTerm("length", 0.5, {"max_len": "6"})]
    args = config(tmp_path / "out", gradient_accumulation_steps=2, save_strategy="steps", save_steps=2)

    def trainer():
        return MaxEntGRPOTrainer(path, client=service, run_id=run_id, rewards=terms, args=args,
                                 train_dataset=dataset(), processing_class=tokenizer)

    first = trainer()
    first.train()

    # one fused call per generation batch, one controller step per optimizer step (2 micro-batches each)
    state = service.get_run(run_id).state
    assert len(seen) == 3 and state.version == 3 and state.global_step == 3
    assert first.last_update.request_id == controller_request_id(run_id, first.job_name, 3)
    logs = [entry for entry in first.state.log_history if "reward" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry, stats in zip(logs, seen):
        assert entry["reward"] == pytest.approx(float(np.mean(stats.total_utils)))
        assert entry["maxent/tau"] == pytest.approx(stats.tau)
        assert entry["maxent/weight_entropy"] == pytest.approx(stats.weight_entropy)
        assert np.isfinite([entry["maxent/beta"], entry["maxent/kl"], entry["maxent/loss"]]).all()
    assert state.last_weight_entropy == pytest.approx(logs[-1]["maxent/weight_entropy"])
    assert state.last_measured_kl == pytest.approx(logs[-1]["maxent/kl"], rel=1e-5, abs=1e-12)
    assert seen[-1].tau != seen[0].tau  # the controller moved tau between steps
    for micro_batch in first._buffered_inputs:  # whole groups per micro-batch, never split
        assert torch.unique_consecutive(micro_batch["maxent_group"], return_counts=True)[1].tolist() == [K]

    # a job resumed from step 2 runs step 3 again: the same request id replays it
    second = trainer()
    assert second.job_name == first.job_name
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert second.last_update.replayed and second.last_update.state.version == 3
    assert service.get_run(run_id).state.version == 3


def test_tau_reaches_the_loss_and_the_gradient(service, tiny, tmp_path, run_id):
    for name, tau in (("cold", 0.05), ("hot", 5.0)):
        service.create_run(f"{run_id}/{name}", WeightingConfig(tau=tau, beta=0.04))
    path, tokenizer = tiny
    trainer = MaxEntGRPOTrainer(path, client=service, run_id=f"{run_id}/cold", reward_funcs=[distinct_characters],
                                skip_zero_variance_groups=True, clip_coef=0.2, args=config(tmp_path),
                                train_dataset=dataset(), processing_class=tokenizer)
    rows = [dict(row) for row in dataset().select([0] * K + [1] * K)]
    trainer.model.eval()  # one micro-batch: the loss is the batch mean, not a share of a step

    def loss_and_gradient():
        torch.manual_seed(1)
        inputs = trainer._generate_and_score_completions(rows)
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        return inputs, loss.detach(), grads

    cold = loss_and_gradient()
    trainer.run_id = f"{run_id}/hot"
    hot = loss_and_gradient()
    assert torch.equal(cold[0]["completion_ids"], hot[0]["completion_ids"])  # the same batch
    assert not torch.allclose(cold[0]["maxent_weights"], hot[0]["maxent_weights"])
    assert trainer.last_statistics.tau == pytest.approx(5.0)
    assert not torch.isclose(cold[1], hot[1])
    assert not torch.allclose(cold[2], hot[2])


def test_grpo_arm_trains_on_the_service_advantages_and_steps_the_controller(service, tiny, tmp_path, run_id):
    service.create_run(run_id, WeightingConfig(tau=0.5, beta=0.04, **CONTROLLED))
    path, tokenizer = tiny
    seen = record_statistics(service)
    trainer = MaxEntGRPOTrainer(path, client=service, run_id=run_id, reward_funcs=[distinct_characters],
                                loss="grpo", args=config(tmp_path, max_steps=2, beta=0.0),
                                train_dataset=dataset(), processing_class=tokenizer)
    with pytest.warns(UserWarning, match="no reference model"):
        trainer.train()
    assert trainer.objective == "grpo" and len(seen) == 2
    assert service.get_run(run_id).state.version == 2
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert [entry["reward"] for entry in logs] == pytest.approx([float(np.mean(s.total_utils)) for s in seen])
    assert all("maxent/tau" in entry and "maxent/kl" in entry for entry in logs)


def test_the_run_can_choose_the_grpo_objective_and_bad_options_fail_clearly(service, tiny, tmp_path, run_id):
    path, tokenizer = tiny
    service.create_run(run_id, WeightingConfig(tau=0.5, train_grpo_objective=True))
    common = dict(client=service, reward_funcs=[distinct_characters], train_dataset=dataset(),
                  processing_class=tokenizer)
    trainer = MaxEntGRPOTrainer(path, run_id=run_id, args=config(tmp_path), **common)
    assert trainer.objective == "grpo"
    with pytest.raises(ValueError, match="loss"):
        MaxEntGRPOTrainer(path, run_id=run_id, loss="listwise", **common)
    with pytest.raises(ValueError, match="run_id"):
        MaxEntGRPOTrainer(path, run_id="", **common)
    with pytest.raises(ValueError, match="exactly one of rewards"):
        MaxEntGRPOTrainer(path, run_id=run_id, rewards=[RewardTerm("format")], **common)
    service.create_run(f"{run_id}/maxent", WeightingConfig(tau=0.5))
    uneven = config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="per_device_train_batch_size .* num_generations"):
        MaxEntGRPOTrainer(path, run_id=f"{run_id}/maxent", args=uneven, **common)
