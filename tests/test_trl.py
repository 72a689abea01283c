"""TRL integration: the reward-function adapter, the controller callback, and
GRPOTrainer end to end with a tiny local model and the service's rewards."""

from __future__ import annotations

import math
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("trl", reason="trl is not installed (pip install '.[integrations]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[integrations]')")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerControl, TrainerState  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import get_callable_name  # noqa: E402

from maxent_client import MaxEntClient, RewardTerm, WeightingConfig  # noqa: E402
from maxent_client.integrations.trl import (  # noqa: E402
    MaxEntControllerCallback,
    MaxEntRewardFunction,
    completion_text,
    group_sizes,
)

GOOD = "<think>2 and 2</think> <answer>\\boxed{4}</answer>"
TERMS = [RewardTerm("boxed_accuracy", 1.0), RewardTerm("format", 0.5)]


def trl_batch():
    """What TRL passes for 2 prompts x 3 generations: one entry per completion."""
    prompts = ["2+2=?"] * 3 + ["1+2=?"] * 3
    completions = [GOOD, "\\boxed{5}", "nothing", "\\boxed{3}", "<think>x</think><answer>\\boxed{3}</answer>", "3"]
    columns = {"solution": ["4"] * 3 + ["3"] * 3, "level": ["easy"] * 6}
    return prompts, completions, columns


def test_name_and_utilities_match_the_client(client):
    reward = MaxEntRewardFunction(client, rewards=TERMS, num_generations=3, name="service_reward")
    assert get_callable_name(reward) == "service_reward" == reward.__name__
    prompts, completions, columns = trl_batch()
    values = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 6, **columns)
    expected = client.compute_reward_statistics(completions=completions, answers=["4", "3"], group_sizes=[3, 3],
                                                rewards=TERMS)
    assert values == pytest.approx(expected.total_utils.tolist())
    assert values == pytest.approx([1.5, 0.0, 0.0, 1.0, 1.5, 0.0])
    assert all(type(v) is float for v in values)
    assert reward.calls == 1


def test_conversational_completions_read_the_assistant_text(client):
    reward = MaxEntRewardFunction(client, rewards=TERMS, num_generations=3)
    prompts, completions, columns = trl_batch()
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    plain = reward(prompts=prompts, completions=completions, **columns)
    chat = reward(prompts=chat_prompts, completions=chat_completions, **columns)
    assert chat == plain
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]) == "a"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]) == "b"


def test_groups_follow_prompts_and_num_generations():
    assert group_sizes(["a", "a", "b", "b", "b"]) == [2, 3]
    assert group_sizes(["a"] * 4, num_generations=2) == [2, 2]  # the same prompt twice in a batch
    assert group_sizes([[{"role": "user", "content": "a"}]] * 2 + ["b"]) == [2, 1]
    assert group_sizes([]) == []


def test_advantages_and_weights_outputs(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.1))
    prompts, completions, columns = trl_batch()
    expected = client.compute_reward_statistics(completions=completions, answers=["4", "3"], group_sizes=[3, 3],
                                                rewards=TERMS, run_id=run_id)
    advantages = MaxEntRewardFunction(client, rewards=TERMS, output="advantages", run_id=run_id, num_generations=3)
    assert advantages(prompts=prompts, completions=completions, **columns) == pytest.approx(
        expected.advantages.tolist())
    weights = MaxEntRewardFunction(client, rewards=TERMS, output="weights", run_id=run_id, num_generations=3)
    got = weights(prompts=prompts, completions=completions, **columns)
    reference = client.compute_weight_stats(run_id, q_values=expected.q_values, group_sizes=[3, 3],
                                            include_reference_term=False)
    assert got == pytest.approx(reference.weights.tolist())
    assert sum(got[:3]) == pytest.approx(1.0) and sum(got[3:]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="run_id"):
        MaxEntRewardFunction(client, rewards=TERMS, output="weights")


def test_metrics_token_counts_and_answers(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.3, beta=0.0))
    logged: dict[str, float] = {}
    reward = MaxEntRewardFunction(client, rewards=[RewardTerm("length", 1.0, {"max_len": "4"})], run_id=run_id,
                                  num_generations=2)
    values = reward(prompts=["p", "p"], completions=["a", "b"], completion_ids=[[1, 2, 3], [1] * 8],
                    log_metric=logged.__setitem__, trainer_state=None, log_extra=None)
    # length: 0 up to max_len tokens, then -(n - max_len) / max_len, down to -1
    assert values == pytest.approx([0.0, -1.0])
    assert logged["maxent/length/mean"] == pytest.approx(-0.5)
    assert logged["maxent/reward_mean"] == pytest.approx(-0.5)
    assert logged["maxent/tau"] == pytest.approx(0.3)
    assert 0.0 <= logged["maxent/weight_entropy"] <= math.log(2) + 1e-9
    assert reward.last_weight_entropy == logged["maxent/weight_entropy"]


def test_a_completion_no_reward_could_score_is_none(client):
    """boxed_accuracy fails on an empty gold answer; with no other term the
    completion is unscored (None), which TRL keeps out of its statistics."""
    only_boxed = MaxEntRewardFunction(client, rewards=[RewardTerm("boxed_accuracy")], num_generations=2)
    values = only_boxed(prompts=["a", "a", "b", "b"], completions=["\\boxed{1}", "x", "\\boxed{2}", "y"],
                        answer=["", "", "2", "2"])
    assert values == [None, None, 1.0, 0.0]
    with_format = MaxEntRewardFunction(client, rewards=[RewardTerm("boxed_accuracy"), RewardTerm("format")],
                                       num_generations=2)
    values = with_format(prompts=["a", "a"], completions=["\\boxed{1}", "x"], answer=["", ""])
    assert values == [0.0, 0.0]  # format still scored them


def test_a_reward_on_a_target_pickles_without_its_channel(server):
    reward = MaxEntRewardFunction(server.target, rewards=TERMS, num_generations=3)
    prompts, completions, columns = trl_batch()
    first = reward(prompts=prompts, completions=completions, **columns)
    clone = pickle.loads(pickle.dumps(reward))
    assert clone._client is None
    assert clone(prompts=prompts, completions=completions, **columns) == first
    clone.close()
    reward.close()


def test_callback_sends_logged_entropy_and_kl(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.1, target_entropy=0.5, tau_lr=0.1, kl_target=0.02,
                                              kl_horizon=10, kl_step_size=0.5))
    seen = []
    callback = MaxEntControllerCallback(client, run_id, on_state=seen.append, request_id_prefix="job-a")
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1
    callback.on_log(None, state, control, logs={"loss": 1.0, "kl": 0.04, "maxent/weight_entropy": 0.9})
    after = client.get_run(run_id).state
    assert after.version == 1 and after.global_step == 1
    assert after.last_measured_kl == pytest.approx(0.04) and after.last_weight_entropy == pytest.approx(0.9)
    assert after.tau < 0.5 and after.beta > 0.1  # entropy above target lowers tau; KL above target raises beta
    assert seen == [callback.last_state] and callback.last_state.version == 1

    # evaluation logs and logs with neither measurement send nothing
    callback.on_log(None, state, control, logs={"eval_loss": 1.0, "eval_kl": 0.3})
    callback.on_log(None, state, control, logs={"train_runtime": 3.0, "kl": None})
    assert client.get_run(run_id).state.version == 1
    # the same step logged again is a replay: applied once
    callback.on_log(None, state, control, logs={"kl": 0.04, "maxent/weight_entropy": 0.9})
    assert callback.updates[-1].replayed and client.get_run(run_id).state.version == 1
    # another process than the world's main one sends nothing
    state.global_step, state.is_world_process_zero = 2, False
    callback.on_log(None, state, control, logs={"kl": 0.01})
    assert client.get_run(run_id).state.version == 1


def test_callbacks_of_two_jobs_pool_into_one_step(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, target_entropy=0.5, tau_lr=0.1, reporters_per_step=2))
    jobs = [MaxEntControllerCallback(client, run_id, request_id_prefix=name, sample_count_key="samples")
            for name in ("job-a", "job-b")]
    state, control = TrainerState(), TrainerControl()
    state.global_step = 1
    jobs[0].on_log(None, state, control, logs={"maxent/weight_entropy": 0.9, "samples": 3})
    assert not jobs[0].updates[-1].applied and jobs[0].last_state.pending_reporters == ("job-a",)
    jobs[1].on_log(None, state, control, logs={"maxent/weight_entropy": 0.5, "samples": 1})
    assert jobs[1].updates[-1].applied
    after = client.get_run(run_id).state
    assert after.version == 1 and after.last_weight_entropy == pytest.approx((3 * 0.9 + 0.5) / 4)
    # a job's report of a step already applied is stale
    jobs[1].request_id_prefix = "job-b-restarted"
    jobs[1].on_log(None, state, control, logs={"maxent/weight_entropy": 0.1})
    assert jobs[1].updates[-1].stale and client.get_run(run_id).state.version == 1


# -- end to end ---------------------------------------------------------------------

CHARS = list("0123456789+-*=?(){}\\<>/ abcdefghijklmnopqrstuvwxyz")


def build_tiny_model(path) -> PreTrainedTokenizerFast:
    """A character-level tokenizer and a randomly initialised 2-layer Llama,
    saved to `path` (TRL loads the reference model from the same place)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations inside TRL
def test_grpo_trainer_two_steps_with_service_rewards_and_controller(server, tmp_path, run_id):
    with MaxEntClient(server.target, timeout=120) as client:
        client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.04, target_entropy=0.5, tau_lr=0.1,
                                                  kl_target=0.01, kl_horizon=10, kl_step_size=0.5))
        model_dir = tmp_path / "tiny-llama"
        tokenizer = build_tiny_model(model_dir)
        dataset = Dataset.from_dict({
            "prompt": ["1+1=", "2+2=", "3+4=", "5+1="],
            "solution": ["2", "4", "7", "6"],
        })
        reward = MaxEntRewardFunction(
            client,
            rewards=[RewardTerm("boxed_accuracy", 1.0), RewardTerm("format", 0.5),
                     RewardTerm("length", 0.1, {"max_len": "4"})],
            run_id=run_id, num_generations=4,
        )
        args = GRPOConfig(
            output_dir=str(tmp_path / "out"), max_steps=2, num_generations=4, per_device_train_batch_size=4,
            max_completion_length=8, beta=0.04, learning_rate=1e-3, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer_box = {}
        callback = MaxEntControllerCallback(client, run_id,
                                            on_state=lambda s: setattr(trainer_box["t"], "beta", s.beta))
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[callback])
        trainer_box["t"] = trainer
        trainer.train()

        # the service scored every generation batch: one call per step
        assert reward.calls == 2
        logs = [entry for entry in trainer.state.log_history if "kl" in entry]
        assert [entry["step"] for entry in logs] == [1, 2]
        for entry in logs:
            assert np.isfinite(entry["rewards/maxent/mean"])
            assert "maxent/weight_entropy" in entry and "maxent/length/mean" in entry
        # random 8-token completions: over max_len 4, so the length term is negative
        assert logs[-1]["maxent/length/mean"] < 0

        # the controller stepped once per logging step with what the trainer logged
        state = client.get_run(run_id).state
        assert state.version == 2 and state.global_step == 2
        assert [u.state.version for u in callback.updates] == [1, 2]
        assert state.last_weight_entropy == pytest.approx(logs[-1]["maxent/weight_entropy"], rel=1e-6)
        assert state.last_measured_kl == pytest.approx(logs[-1]["kl"], rel=1e-6, abs=1e-12)
        assert state.tau != 0.5 and state.beta != 0.04
        assert trainer.beta == pytest.approx(state.beta)  # on_state let the run steer TRL's KL coefficient


def test_callback_sends_the_entropy_the_run_scope_selects(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=0.5, target_entropy=0.5, tau_lr=0.1, entropy_scope="mixed_groups"))
    callback = MaxEntControllerCallback(client, run_id, request_id_prefix="scoped")
    state, control = TrainerState(), TrainerControl()
    # no mixed group in the window: the scoped entropy is NaN and no entropy goes out, only the KL
    state.global_step = 1
    callback.on_log(None, state, control, logs={"maxent/weight_entropy": 0.9, "kl": 0.04,
                                                "maxent/controller_weight_entropy": float("nan"),
                                                "maxent/max_weight_entropy": 1.1})
    after = client.get_run(run_id).state
    assert after.version == 1 and after.last_weight_entropy is None and after.tau == 0.5
    # a window with mixed groups: their entropy drives tau
    state.global_step = 2
    callback.on_log(None, state, control, logs={"maxent/weight_entropy": 0.9, "maxent/controller_weight_entropy": 0.3})
    assert client.get_run(run_id).state.last_weight_entropy == pytest.approx(0.3)
    # the reward function logs the scoped pair
    logged: dict[str, float] = {}
    reward = MaxEntRewardFunction(client, rewards=[RewardTerm("format", 1.0)], run_id=run_id, num_generations=2)
    reward(prompts=["p", "p", "q", "q"], completions=["<think>a</think><answer>b</answer>", "x", "y", "z"],
           log_metric=logged.__setitem__)
    assert logged["maxent/controller_weight_entropy"] == pytest.approx(logged["maxent/weight_entropy"] * 0 +
                                                                      reward_mixed_entropy(client, run_id))
    assert logged["maxent/max_weight_entropy"] == pytest.approx(math.log(2))


def reward_mixed_entropy(client, run_id) -> float:
    """The mixed-group entropy of the batch above: only the first group's rewards differ."""
    stats = client.compute_reward_statistics(utilities=[[1.0, 0.0], [0.0, 0.0]], run_id=run_id)
    weights = client.compute_weight_stats(run_id, q_values=stats.q_values, group_sizes=[2, 2],
                                          include_reference_term=False)
    return weights.group_weight_entropies[0]


def test_callback_sends_lr_scale_as_a_number_or_a_schedule(client, run_id):
    client.create_run(run_id, WeightingConfig(tau=1.0, target_entropy=0.5, tau_lr=0.1))
    state, control = TrainerState(), TrainerControl()
    plain = MaxEntControllerCallback(client, run_id, request_id_prefix="plain", lr_scale=0.0)
    state.global_step = 1
    plain.on_log(None, state, control, logs={"maxent/weight_entropy": 0.9})
    assert client.get_run(run_id).state.tau == 1.0  # lr_scale 0: the log-tau step is 0
    scheduled = MaxEntControllerCallback(client, run_id, request_id_prefix="sched", lr_scale=lambda step: step / 2)
    state.global_step = 2
    scheduled.on_log(None, state, control, logs={"maxent/weight_entropy": 0.9})
    # log tau moves by tau_lr * lr_scale * (target - EMA) with lr_scale = 1 at step 2
    ema = 0.9  # both reports were 0.9
    assert client.get_run(run_id).state.tau == pytest.approx(math.exp(0.1 * 1.0 * (0.5 - ema)))


def test_an_answer_column_of_none_warns_once_by_name(client):
    reward = MaxEntRewardFunction(client, rewards=[RewardTerm("format", 1.0)], num_generations=2)
    with pytest.warns(UserWarning, match="answer column 'answer' holds no answer"):
        reward(prompts=["p", "p"], completions=["a", "b"], answer=[None, None])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second batch does not warn again
        assert reward(prompts=["p", "p"], completions=["a", "b"], answer=[None, None]) == [0.0, 0.0]
