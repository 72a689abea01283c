"""The first hour: each mistake a new user makes gets one clear line that
names the field and says what to do (client side: TypeError/ValueError;
server side: INVALID_ARGUMENT with a field violation)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys

import numpy as np
import pytest

from maxent_client import InvalidArgumentError, RewardTerm, WeightingConfig
from maxent_client import _convert as cv
from maxent_client import _messages as msg
from maxent_client.cli import main as maxentctl

CONFIG = WeightingConfig(tau=0.5, beta=0.1)


def _violations(error: InvalidArgumentError) -> dict[str, str]:
    return {v.field: v.description for v in error.violations}


# -- 1. nested groups that disagree with group_sizes --------------------------------------------


def test_nested_groups_disagreeing_with_group_sizes_are_refused():
    with pytest.raises(ValueError, match=r"group_sizes \[1, 2\] disagrees .*utilities \(lengths \[2, 1\]\)"):
        msg.reward_request(utilities=[[1.0, 0.0], [1.0]], group_sizes=[1, 2])
    with pytest.raises(ValueError, match=r"group_sizes \[1, 3\] disagrees .*q_values"):
        msg.weight_request("r", q_values=np.full((2, 2), 0.5), group_sizes=[1, 3])


def test_nested_groups_agreeing_with_group_sizes_still_work():
    _, sizes = msg.reward_request(utilities=[[1.0, 0.0], [1.0]], group_sizes=[2, 1])
    assert sizes.tolist() == [2, 1]
    _, sizes = msg.reward_request(utilities=np.zeros((4, 1)), group_sizes=[2, 2])  # a column is flat
    assert sizes.tolist() == [2, 2]


# -- 2. fractional integers ----------------------------------------------------------------------


@pytest.mark.parametrize("field, kwargs", [
    ("group_sizes", {"utilities": [1.0, 0.0, 1.0], "group_sizes": [1.5, 2]}),
    ("token_counts", {"utilities": [1.0, 0.0], "group_sizes": [2], "token_counts": [3, 4.25]}),
])
def test_fractional_integer_arrays_are_refused(field, kwargs):
    with pytest.raises(ValueError, match=rf"{field} must hold whole numbers; {field}\[\d\] is"):
        msg.reward_request(**kwargs)


def test_fractional_reference_token_counts_are_refused():
    with pytest.raises(ValueError, match=r"ref_token_counts must hold whole numbers; ref_token_counts\[0\] is 2.5"):
        msg.weight_request("r", q_values=[0.5, 0.5], ref_logp_sum=[0.0, 0.0], ref_token_counts=[2.5, 3.0],
                           group_sizes=[2])


def test_whole_floats_are_accepted_as_integers():
    assert cv.flat([2.0, 3], np.int64, "group_sizes").tolist() == [2, 3]


# -- 3. torch tensors ----------------------------------------------------------------------------


def test_half_precision_tensors_convert_exactly():
    torch = pytest.importorskip("torch")
    values = torch.tensor([1 / 3, -2.5, 7.0])
    for dtype in (torch.bfloat16, torch.float16):
        got = cv.flat(values.to(dtype), np.float64, "utilities")
        assert got.dtype == np.float64
        assert got.tolist() == values.to(dtype).to(torch.float64).tolist()


def test_meta_and_unsupported_tensors_are_refused_by_name():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="utilities is on the meta device; move it to the CPU"):
        msg.reward_request(utilities=torch.zeros(2, device="meta"), group_sizes=[2])
    with pytest.raises(ValueError, match=r"q_values has torch dtype torch.float8_e4m3fn, which is not supported"):
        msg.weight_request("r", q_values=torch.zeros(2, dtype=torch.float8_e4m3fn), group_sizes=[2])


# -- 4. reward parameters ------------------------------------------------------------------------


def test_numeric_and_bool_reward_params_become_strings():
    term = RewardTerm("length", 1.0, {"max_len": 5, "scale": 0.5, "strict": True, "name": "x"})
    assert msg.reward_params(term) == {"max_len": "5", "scale": "0.5", "strict": "true", "name": "x"}


def test_other_reward_param_types_are_refused_by_name():
    with pytest.raises(TypeError, match=r"reward 'length' parameter 'max_len' must be a string, number or bool"):
        msg.reward_request(completions=["a"], group_sizes=[1], rewards=[RewardTerm("length", 1.0, {"max_len": [5]})])


def test_integer_reward_param_reaches_the_server(client):
    stats = client.compute_reward_statistics(completions=["a" * 10, "b"], group_sizes=[2],
                                             rewards=[RewardTerm("length", 1.0, {"max_len": 5})],
                                             token_counts=[10, 1])
    assert len(stats.total_utils) == 2


# -- 5. a dict as the config ---------------------------------------------------------------------


def test_create_run_takes_a_dict_config(client, run_id):
    run = client.create_run(run_id, config={"tau": 0.5, "beta": 0.1, "denominator": "tau"})
    assert run.config.tau == 0.5 and run.config.denominator.name == "TAU"


def test_create_run_names_unknown_and_mistyped_config_keys(client, run_id):
    with pytest.raises(ValueError, match="config has unknown field.s. temperature; WeightingConfig fields are tau"):
        client.create_run(run_id, config={"tau": 0.5, "temperature": 1.0})
    with pytest.raises(TypeError, match="config field tau must be a number, got 'abc'"):
        client.create_run(run_id, config={"tau": "abc"})
    with pytest.raises(TypeError, match=r"config must be a WeightingConfig \(or a dict of its fields\), got list"):
        client.create_run(run_id, config=[("tau", 0.5)])


# -- 6. maxentctl ----------------------------------------------------------------------------------


def _ctl(server, *argv: str) -> int:
    return maxentctl(["--target", server.target, *argv], out=io.StringIO())


def test_maxentctl_set_with_a_wrong_type_is_one_line(server, run_id, capsys):
    assert _ctl(server, "runs", "create", run_id, "--set", "tau=abc") == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["maxentctl: config field tau must be a number, got 'abc'"]


def test_maxentctl_prints_each_violation_once(server, run_id, capsys):
    assert _ctl(server, "runs", "create", run_id, "--set", "tau=-1", "--set", "beta=2") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("maxentctl: INVALID_ARGUMENT: config.tau: ")


# -- 7. a busy port --------------------------------------------------------------------------------


def test_busy_port_is_one_line(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "maxent_server", "--port", str(port), "--data-dir", str(tmp_path / "data"),
             "--metrics-port", "0"],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"port {port} is in use" in lines[0] and "pick another with --port" in lines[0]


# -- 8. q that does not sum to 1 -------------------------------------------------------------------


def test_q_values_must_sum_to_one_per_group(client, run_id):
    client.create_run(run_id, CONFIG)
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_weight_stats(run_id, q_values=[0.5, 0.5, 0.2, 0.3], group_sizes=[2, 2],
                                    include_reference_term=False)
    description = _violations(info.value)["q_values"]
    assert description.startswith("group 1 sums to 0.5; each group's q_values must sum to 1")


def test_q_of_reward_statistics_passes_the_sum_check(client, run_id):
    """Excluded completions have q 0 (the rest of the group sums to 1); a
    group whose every completion is excluded has q all 0 and passes too."""
    client.create_run(run_id, CONFIG)
    q = [0.0, 0.25, 0.75, 0.0, 0.0, 1 / 3, 1 / 3, 1 / 3]
    weights = client.compute_weight_stats(run_id, q_values=q, group_sizes=[3, 2, 0, 3], include_reference_term=False)
    assert len(weights.weights) == 8
    rewards = client.compute_reward_statistics(utilities=[[1.0, 0.0, 2.0], [0.5, 0.5]])
    client.compute_weight_stats(run_id, q_values=rewards.q_values, group_sizes=rewards.group_sizes,
                                include_reference_term=False)


# -- 9. completions without reward terms -----------------------------------------------------------


def test_completions_without_rewards_say_what_to_give(client):
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_reward_statistics(completions=["a", "b"], group_sizes=[2])
    assert "give utilities, or reward terms (rewards=...) to score the completions" in _violations(info.value)["utilities"]


# -- 10. no reference arrays -----------------------------------------------------------------------


def test_missing_reference_names_include_reference_term(client, run_id):
    client.create_run(run_id, CONFIG)
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_weight_stats(run_id, q_values=[0.5, 0.5], group_sizes=[2])
    assert "include_reference_term=False" in _violations(info.value)["ref_logp_sum"]
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_step_statistics(run_id, utilities=[1.0, 0.0], group_sizes=[2])
    assert "include_reference_term=False" in _violations(info.value)["ref_logp_sum"]


# -- 11. the TRL adapter ---------------------------------------------------------------------------


def test_trl_num_generations_that_cuts_a_run_is_refused():
    pytest.importorskip("trl")
    from maxent_client.integrations.trl import group_sizes

    with pytest.raises(ValueError, match=r"num_generations=3 does not divide .*\(run lengths \[4, 4\]\)"):
        group_sizes(["a"] * 4 + ["b"] * 4, num_generations=3)
    assert group_sizes(["a"] * 4 + ["b"] * 2, num_generations=2) == [2, 2, 2]


def test_trl_missing_answers_name_the_columns_searched(client):
    pytest.importorskip("trl")
    from maxent_client.integrations.trl import MaxEntRewardFunction

    reward = MaxEntRewardFunction(client, rewards=[RewardTerm("boxed_accuracy", 1.0)], num_generations=2)
    with pytest.raises(ValueError, match=r"none of answer_columns \['answer', 'solution'.*dataset columns seen: \['level'\]"):
        reward(["p", "p"], ["\\boxed{4}", "4"], level=["easy", "easy"])


def test_already_exists_names_the_fields_that_differ(client, run_id):
    from maxent_client import AlreadyExistsError, WeightingConfig

    client.create_run(run_id, WeightingConfig(tau=0.5, beta=0.04, target_entropy=1.0))
    with pytest.raises(AlreadyExistsError) as conflict:
        client.create_run(run_id, WeightingConfig(tau=0.3, beta=0.04, target_entropy=1.0))
    assert "tau (0.5 stored, 0.3 asked)" in str(conflict.value)
    assert "beta" not in str(conflict.value) and "another run_id" in str(conflict.value)
