"""The reward package: builtin rules, params, plugins, dedupe, time limits, failures.

Needs the test plugin package installed:
    pip install -e tests/plugins/maxent_test_plugin
"""

from __future__ import annotations

import threading
import time
from importlib.metadata import EntryPoint, entry_points

import numpy as np
import pytest
from math_verify import parse, verify

from maxent_server.rewards import ParamSpec, RewardRegistry, RewardRunner, RewardTerm
from maxent_server.rewards.params import parse_params
from maxent_server.rewards.pool import Cancelled

TIMEOUT = 1.0

pytestmark = pytest.mark.skipif(
    not any(ep.name == "keyword_match" for ep in entry_points(group="maxent.rewards")),
    reason="test plugin not installed: pip install -e tests/plugins/maxent_test_plugin",
)


@pytest.fixture(scope="module")
def runner():
    r = RewardRunner(workers=2, timeout_seconds=TIMEOUT)
    yield r
    r.close()


def term(name, **params):
    return RewardTerm(name=name, weight=1.0, params={k: str(v) for k, v in params.items()})


def values_of(runner, name, completions, answers=None, token_counts=None, max_completion_len=None, **params):
    answers = answers if answers is not None else [""] * len(completions)
    ev = runner.evaluate([term(name, **params)], completions, answers, token_counts, max_completion_len)
    return ev.values[0], ev


# ---------------------------------------------------------------------------
# math_accuracy


EQUIVALENT = [
    ("0.5", r"\frac12"),
    ("0.5", "1/2"),
    (r"\frac12", "0.5"),
    (r"\frac{1}{2}", r"\dfrac{1}{2}"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"3\sqrt{2}", r"\sqrt{18}"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("(0,1]", "(0,1]"),
    ("[1,2)", "[1,2)"),
    (r"50\%", "0.5"),
    (r"50\%", r"50\%"),
    ("1000", "10^{3}"),
    ("3", "x=3"),
]
NOT_EQUIVALENT = [
    ("0.5", "0.6"),
    ("(0,1]", "[0,1]"),
    (r"\{1,2\}", r"\{1,3\}"),
    ("x^2+2x+1", "(x-1)^2"),
    (r"3\sqrt{2}", r"2\sqrt{3}"),
]


def test_math_accuracy_equivalences(runner):
    pairs = EQUIVALENT + NOT_EQUIVALENT
    completions = [f"Let me think. So the result is \\boxed{{{answer}}}." for _, answer in pairs]
    golds = [gold for gold, _ in pairs]
    values, ev = values_of(runner, "math_accuracy", completions, golds)
    assert not ev.failed.any()
    assert values.tolist() == [1.0] * len(EQUIVALENT) + [0.0] * len(NOT_EQUIVALENT)


def test_math_accuracy_matches_math_verify_on_sets_intervals_percentages(runner):
    pairs = [
        (r"\{1,2,3\}", r"\{3,2,1\}"),
        (r"\{1,2\}", "1,2"),
        ("(1,2)", r"\{1,2\}"),
        ("[0,1]", "[0, 1]"),
        (r"(-\infty, 0)", r"(-\infty,0)"),
        (r"[0,1) \cup (2,3]", r"[0,1)\cup(2,3]"),
        (r"x \in [0,1)", "[0,1)"),
        (r"25\%", "0.25"),
        (r"25\%", "25"),
        (r"25\%", "0.4"),
    ]
    completions = [f"\\boxed{{{answer}}}" for _, answer in pairs]
    golds = [gold for gold, _ in pairs]
    values, ev = values_of(runner, "math_accuracy", completions, golds)
    assert not ev.failed.any()
    expected = [
        1.0 if verify(parse("\\boxed{" + g + "}"), parse("\\boxed{" + a + "}")) else 0.0 for g, a in pairs
    ]
    assert values.tolist() == expected
    assert values[0] == 1.0 and values[-1] == 0.0


def test_math_accuracy_final_answer_extraction(runner):
    completions = [
        "<think>...</think><answer>1/2</answer>",  # answer tag when there is no box
        r"first \boxed{3} then \boxed{0.5}",  # the last box wins
        r"\fbox{0.5}",
        r"\boxed{0.5} but <answer>7</answer>",  # a box beats the tag
        "no final answer at all: 0.5",
        r"\boxed{}",
        r"unclosed \boxed{0.5",
    ]
    values, ev = values_of(runner, "math_accuracy", completions, ["0.5"] * len(completions))
    assert not ev.failed.any()
    assert values.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_math_accuracy_bad_gold_fails_explicitly(runner):
    completions = [r"\boxed{1}", r"\boxed{1}", r"\boxed{1}"]
    values, ev = values_of(runner, "math_accuracy", completions, ["1", "  ", "}"])
    assert values[0] == 1.0
    assert ev.failed[0].tolist() == [False, True, True]
    assert not ev.timed_out.any()
    assert np.isnan(values[1:]).all()
    assert any("gold answer is empty" in e for e in ev.errors)
    assert any("could not be parsed" in e for e in ev.errors)


def test_math_accuracy_float_rounding_param(runner):
    completions = [r"\boxed{0.3333}"]
    loose, _ = values_of(runner, "math_accuracy", completions, [r"\frac{1}{3}"], float_rounding=3)
    strict, _ = values_of(runner, "math_accuracy", completions, [r"\frac{1}{3}"])
    assert loose.tolist() == [1.0] and strict.tolist() == [0.0]


# ---------------------------------------------------------------------------
# boxed_accuracy, format, missing_boxed_penalty, length


def test_boxed_accuracy_normalisation(runner):
    cases = [
        (r"\boxed{\left( 1, 2 \right)}", "(1,2)", 1.0),
        (r"\boxed{1\!000}", "1000", 1.0),
        (r"\boxed{ x + 1 }", "x+1", 1.0),
        (r"\boxed{\left\{ a \right\}}", r"\{a\}", 1.0),
        (r"\boxed{a \rightarrow b}", r"a\rightarrow b", 1.0),  # \rightarrow is not \right
        (r"\boxed{\leftarrow}", "arrow", 0.0),
        (r"\boxed{0.5}", r"\frac12", 0.0),  # exact match only
        (r"\fbox{7}", "7", 1.0),
        (r"\boxed{3} and \boxed{4}", "4", 1.0),
        ("<answer>4</answer>", "4", 0.0),  # no box
        ("nothing", "4", 0.0),
    ]
    values, ev = values_of(runner, "boxed_accuracy", [c for c, _, _ in cases], [g for _, g, _ in cases])
    assert not ev.failed.any()
    assert values.tolist() == [v for _, _, v in cases]


def test_boxed_accuracy_empty_gold_fails(runner):
    values, ev = values_of(runner, "boxed_accuracy", [r"\boxed{1}"], [" \\! "])
    assert ev.failed[0, 0] and np.isnan(values[0])


def test_format(runner):
    cases = [
        ("<think>reason</think><answer>4</answer>", 1.0),
        ("  <think>\nreason\n</think>\n\n<answer>\n4\n</answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<answer>4</answer>", 0.0),
        ("<think>r</think>", 0.0),
        ("<think>r</think> so <answer>4</answer>", 0.0),  # text between
        ("<think>r</think><answer>4</answer> trailing", 0.0),
        ("lead <think>r</think><answer>4</answer>", 0.0),
        ("<think>r <think> r</think><answer>4</answer>", 0.0),  # a tag twice
        ("<think>r</think><answer>4</answer><answer>5</answer>", 0.0),
        ("<answer>4</answer><think>r</think>", 0.0),
        ("<think>r<answer>4</think></answer>", 0.0),
    ]
    values, ev = values_of(runner, "format", [c for c, _ in cases])
    assert not ev.failed.any()
    assert values.tolist() == [v for _, v in cases]


def test_missing_boxed_penalty(runner):
    completions = [r"\boxed{1}", r"\fbox{x}", r"\boxed{}", "no box", r"\boxed{1", "<answer>1</answer>"]
    values, ev = values_of(runner, "missing_boxed_penalty", completions)
    assert values.tolist() == [0.0, 0.0, 0.0, -1.0, -1.0, -1.0]
    assert not ev.failed.any()


def test_length(runner):
    counts = np.array([0, 50, 100, 101, 150, 200, 1000])
    values, _ = values_of(runner, "length", ["x"] * 7, token_counts=counts, max_completion_len=100)
    np.testing.assert_allclose(values, [0.0, 0.0, 0.0, -0.01, -0.5, -1.0, -1.0])
    values, _ = values_of(runner, "length", ["x"] * 7, token_counts=counts, max_completion_len=100, max_len=50)
    np.testing.assert_allclose(values, [0.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    values, _ = values_of(runner, "length", ["x"] * 7, token_counts=counts, max_len=200)
    np.testing.assert_allclose(values, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])


def test_several_terms_and_answers_optional(runner):
    completions = [r"<think>a</think><answer>\boxed{2}</answer>", "plain"]
    terms = [term("format"), term("missing_boxed_penalty"), term("length", max_len=10)]
    assert not runner.needs_answers(terms)
    ev = runner.evaluate(terms, completions, [], np.array([5, 15]), None)
    assert ev.values.tolist() == [[1.0, 0.0], [0.0, -1.0], [0.0, -0.5]]
    assert ev.values.shape == ev.failed.shape == ev.timed_out.shape == (3, 2)


def test_empty_batch(runner):
    ev = runner.evaluate([term("math_accuracy"), term("format")], [], [], None, None)
    assert ev.values.shape == (2, 0) and ev.errors == []


# ---------------------------------------------------------------------------
# registry, listing, validation


def test_list_functions(runner):
    infos = runner.list_functions()
    names = [f.name for f in infos]
    assert names == sorted(names)
    by_name = {f.name: f for f in infos}
    for builtin in ("math_accuracy", "boxed_accuracy", "format", "missing_boxed_penalty", "length"):
        assert by_name[builtin].source == "builtin"
        assert by_name[builtin].description
    assert [p.name for p in by_name["length"].parameters] == ["max_len"]
    assert by_name["math_accuracy"].parameters[0].default_value == "6"
    kw = by_name["keyword_match"]
    assert kw.source == "maxent-test-plugin"
    assert kw.description.startswith("score when the completion contains keyword")
    params = {p.name: p for p in kw.parameters}
    assert params["keyword"].required and params["keyword"].default_value == ""
    assert not params["case_sensitive"].required and params["case_sensitive"].default_value == "false"
    assert by_name["answer_length"].description == "Length of the gold answer in characters (reads the answers)."


def test_needs_answers(runner):
    assert runner.needs_answers([term("math_accuracy")])
    assert runner.needs_answers([term("format"), term("boxed_accuracy")])
    assert not runner.needs_answers([term("format"), term("length"), term("missing_boxed_penalty")])
    assert not runner.needs_answers([term("keyword_match", keyword="x")])  # declared
    assert runner.needs_answers([term("answer_length")])  # plugins default to yes
    assert not runner.needs_answers([term("nope")])


def test_validate(runner):
    terms = [
        term("format"),
        term("foo"),
        term("length", max_len="abc"),
        term("length", max_len=0, extra=1),
        term("keyword_match"),
        term("keyword_match", keyword="a", case_sensitive="maybe", score="-1"),
        term("math_accuracy", float_rounding="99"),
        RewardTerm(name="", weight=1.0, params={}),
    ]
    problems = runner.validate(terms)
    assert problems == [
        ("rewards[1].name", "unknown reward function 'foo'"),
        ('rewards[2].params["max_len"]', "must be a positive integer"),
        ('rewards[3].params["extra"]', "unknown parameter of reward 'length' (accepted: max_len)"),
        ('rewards[3].params["max_len"]', "must be a positive integer"),
        ('rewards[4].params["keyword"]', "required by reward 'keyword_match'"),
        ('rewards[5].params["case_sensitive"]', "must be true or false"),
        ('rewards[5].params["score"]', "must be a finite number >= 0"),
        ('rewards[6].params["float_rounding"]', "must be an integer between 0 and 15"),
        ("rewards[7].name", "required"),
    ]
    assert runner.validate([term("format"), term("length", max_len=5), term("keyword_match", keyword="k")]) == []
    with pytest.raises(ValueError, match="unknown reward function 'foo'"):
        runner.evaluate([term("foo")], ["x"], ["y"], None, None)


def test_validate_length_needs_request_fields(runner):
    terms = [term("format"), term("length")]
    assert runner.validate(terms) == []  # request-level checks skipped
    assert runner.validate(terms, token_counts_given=False, max_completion_len=None) == [
        ("token_counts", "required by reward 'length' (rewards[1])"),
        ('rewards[1].params["max_len"]', "required when the request sets no max_completion_len"),
    ]
    assert runner.validate(terms, token_counts_given=True, max_completion_len=64) == []
    assert runner.validate([term("length", max_len=8)], token_counts_given=True) == []
    with pytest.raises(ValueError, match="token_counts"):
        runner.evaluate(terms, ["x"], [], None, 10)
    with pytest.raises(ValueError, match="max_len"):
        runner.evaluate(terms, ["x"], [], np.array([3]), None)


def test_param_parsing():
    specs = (
        ParamSpec("n", "", type="int", minimum=1),
        ParamSpec("f", "", type="float", default="0.5"),
        ParamSpec("b", "", type="bool", default="false"),
        ParamSpec("s", "", required=True),
    )
    values, problems = parse_params("r", specs, {"n": " 12 ", "b": "YES", "s": "text"}, 0)
    assert problems == [] and values == {"n": 12, "f": 0.5, "b": True, "s": "text"}
    _, problems = parse_params("r", specs, {"n": "1.5", "f": "nan", "s": ""}, 3)
    assert problems == [
        ('rewards[3].params["f"]', "must be a finite number"),
        ('rewards[3].params["n"]', "must be a positive integer"),
    ]
    with pytest.raises(ValueError):
        ParamSpec("x", "", type="int", default="nope")
    with pytest.raises(ValueError):
        ParamSpec("x", "", type="complex")


def test_broken_plugins_are_skipped():
    def fake_entry_points():
        return [
            EntryPoint(name="format", value="maxent_test_plugin:flaky", group="maxent.rewards"),  # clash
            EntryPoint(name="missing", value="no_such_module_xyz:fn", group="maxent.rewards"),
            EntryPoint(name="not_callable", value="maxent_test_plugin:__doc__", group="maxent.rewards"),
            EntryPoint(name="mine", value="maxent_test_plugin:flaky", group="maxent.rewards"),
            EntryPoint(name="mine", value="maxent_test_plugin:sleepy", group="maxent.rewards"),  # duplicate
        ]

    registry = RewardRegistry.default(entry_points=fake_entry_points)
    plugins = registry.plugins()
    assert [(p.name, p.entry_point) for p in plugins] == [("mine", "maxent_test_plugin:flaky")]
    assert registry.get("format").source == "builtin"
    assert RewardRegistry.default(load_plugins=False).plugins() == []


# ---------------------------------------------------------------------------
# plugins through the runner


def test_plugin_with_params(runner):
    completions = ["The Answer is here", "the answer", "nothing"]
    values, ev = values_of(runner, "keyword_match", completions, keyword="answer")
    assert values.tolist() == [1.0, 1.0, 0.0]
    values, _ = values_of(runner, "keyword_match", completions, keyword="Answer", case_sensitive="true", score=2.5)
    assert values.tolist() == [2.5, 0.0, 0.0]
    values, _ = values_of(runner, "answer_length", ["a", "b"], ["abc", "12345"])
    assert values.tolist() == [3.0, 5.0]


def test_plugin_failures_are_explicit(runner):
    completions = ["fine", "RAISE SECRET-123", "NAN", "TWO", "fine too"]
    values, ev = values_of(runner, "flaky", completions)
    assert ev.failed[0].tolist() == [False, True, True, True, False]
    assert not ev.timed_out.any()
    assert values[0] == values[4] == 0.5
    assert np.isnan(values[1:4]).all()
    text = "\n".join(ev.errors)
    assert "ValueError" in text and "non-finite" in text and "2 values" in text
    assert "completion 1" in text
    assert "SECRET-123" not in text


# ---------------------------------------------------------------------------
# dedupe and caching


def test_dedupe_and_gold_parsed_once():
    with RewardRunner(workers=1, timeout_seconds=5.0) as r:
        golds, completions = [], []
        forms = {"0.5": [r"\frac12", "1/2", "0.5", "3"], "4": ["4", "4.0", "2+2", "5"]}
        for gold, variants in forms.items():
            for k in range(12):
                form = variants[k % len(variants)]
                completions.append(f"Attempt {k}: so it is \\boxed{{{form}}}")  # texts all differ
                golds.append(gold)
        before = r.stats()
        values, ev = values_of(r, "math_accuracy", completions, golds)
        after = r.stats()
        assert not ev.failed.any()
        assert values.tolist() == [1, 1, 1, 0] * 3 + [1, 1, 1, 0] * 3
        assert after["verifications"] - before["verifications"] == 8  # distinct (answer, gold) pairs
        assert after["gold_parses"] - before["gold_parses"] == 2  # one worker: once per gold
        # A second call reuses the worker's parsed golds.
        values_of(r, "math_accuracy", completions[:3], golds[:3])
        assert r.stats()["gold_parses"] == after["gold_parses"]

        before = r.stats()
        values, _ = values_of(r, "answer_length", ["x", "x", "y", "x"], ["ab", "ab", "ab", "abc"])
        assert values.tolist() == [2.0, 2.0, 2.0, 3.0]
        assert r.stats()["plugin_calls"] - before["plugin_calls"] == 3


# ---------------------------------------------------------------------------
# time limits, dead workers, concurrency


def test_pathological_completions_are_cut_off(runner):
    good = [f"\\boxed{{{k}/2}}" for k in range(40)]
    nested = "\\boxed{" + "\\frac{" * 60 + "1" + "}{2}" * 60 + "}"
    unclosed = "\\boxed{" * 20000  # no balanced box: no answer (the extraction is linear)
    huge = "\\boxed{" + "1" * 1_000_000 + "}"  # 1 MB
    completions = good[:20] + [nested, unclosed, huge] + good[20:]
    golds = [str(k / 2) for k in range(20)] + ["1"] * 3 + [str(k / 2) for k in range(20, 40)]
    started = time.monotonic()
    ev = runner.evaluate([term("math_accuracy"), term("missing_boxed_penalty")], completions, golds, None, None)
    elapsed = time.monotonic() - started
    bad = [20, 22]  # math-verify runs past its time limit on these two
    expected_failed = np.zeros(len(completions), dtype=bool)
    expected_failed[bad] = True
    assert ev.failed[0].tolist() == expected_failed.tolist()
    assert ev.timed_out[0].tolist() == expected_failed.tolist()
    ok = ~expected_failed
    ok[21] = False
    assert (ev.values[0][ok] == 1.0).all()
    # The unclosed box has no final answer: scored 0, quickly, not failed.
    assert ev.values[0][21] == 0.0 and not ev.failed[:, 21].any()
    assert not ev.failed[1].any()
    assert (ev.values[1][ok] == 0.0).all() and ev.values[1][22] == 0.0
    assert ev.values[1][21] < 0  # no closed box: the penalty applies
    assert elapsed < 3 * TIMEOUT + 6


def test_hung_and_dead_workers_are_replaced(runner):
    completions = [f"c{k}" for k in range(30)]
    completions[3] = "SLEEP"
    completions[10] = "STUCK"
    completions[17] = "CRASH"
    terms = [term("sleepy"), term("stuck"), term("crashy")]
    before = runner.stats()
    started = time.monotonic()
    ev = runner.evaluate(terms, completions, [""] * 30, None, None)
    elapsed = time.monotonic() - started
    assert elapsed < 4 * TIMEOUT + 6
    assert np.flatnonzero(ev.failed[0]).tolist() == [3] and ev.timed_out[0, 3]
    assert np.flatnonzero(ev.failed[1]).tolist() == [10] and ev.timed_out[1, 10]
    assert np.flatnonzero(ev.failed[2]).tolist() == [17] and not ev.timed_out[2].any()
    assert np.isnan(ev.values[0, 3]) and np.isnan(ev.values[1, 10]) and np.isnan(ev.values[2, 17])
    ok = np.ones(30, dtype=bool)
    assert (ev.values[0][ok & ~ev.failed[0]] == 1.0).all()
    assert (ev.values[1][ok & ~ev.failed[1]] == 1.0).all()
    lengths = np.array([len(c) for c in completions], dtype=float)
    np.testing.assert_array_equal(ev.values[2][~ev.failed[2]], lengths[~ev.failed[2]])
    assert any("died (exit code 3)" in e for e in ev.errors)
    assert any("worker killed" in e for e in ev.errors)
    after = runner.stats()
    assert after["timeouts"] - before["timeouts"] == 2
    assert after["crashes"] - before["crashes"] == 1
    # The pool is whole again and keeps working.
    values, ev = values_of(runner, "math_accuracy", [r"\boxed{2}"] * 4, ["2"] * 4)
    assert values.tolist() == [1.0] * 4
    deadline = time.monotonic() + 10
    while runner.stats()["workers_alive"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.stats()["workers_alive"] == 2


def test_cancelled_evaluation_drops_its_queued_work(runner):
    """20 items that each run into the 1 s limit: 10 s of work for 2 workers.
    Cancelled after 0.5 s, nothing of it stays queued."""
    completions = [f"SLEEP {k}" for k in range(20)]  # distinct: no deduplication
    cancelled = threading.Event()
    timer = threading.Timer(0.5, cancelled.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        runner.evaluate([term("sleepy")], completions, [""] * 20, None, None, cancelled)
    assert time.monotonic() - started < 5 * TIMEOUT  # not the 10 s the whole batch needs
    assert runner.stats()["queued_items"] == 0
    # Only the chunks already in a worker finish; then the pool serves again.
    values, _ = values_of(runner, "keyword_match", ["ab"], keyword="a")
    assert values.tolist() == [1.0]


def test_concurrent_evaluate(runner):
    def batch(seed):
        rng = np.random.default_rng(seed)
        nums = rng.integers(1, 9, size=24)
        completions = [f"\\boxed{{\\frac{{{2 * n}}}{{4}}}}" for n in nums]
        golds = [str(n / 2) if k % 3 else str(n) for k, n in enumerate(nums)]
        expected = [0.0 if k % 3 == 0 else 1.0 for k in range(24)]
        return completions, golds, expected

    results = {}

    def work(seed):
        completions, golds, expected = batch(seed)
        ev = runner.evaluate([term("math_accuracy"), term("keyword_match", keyword="frac")], completions, golds,
                             None, None)
        results[seed] = (ev, expected)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    for ev, expected in results.values():
        assert not ev.failed.any()
        assert ev.values[0].tolist() == expected
        assert ev.values[1].tolist() == [1.0] * 24


def test_close():
    r = RewardRunner(workers=1, timeout_seconds=TIMEOUT)
    r.close()
    r.close()
    with pytest.raises(RuntimeError):
        r.evaluate([term("format")], ["x"], [], None, None)


def test_workers_start_lazily_without_prestart():
    with RewardRunner(workers=1, timeout_seconds=5.0, prestart=False) as r:
        time.sleep(0.3)
        assert r.stats()["workers_started"] == 0
        values, _ = values_of(r, "format", ["<think>a</think><answer>b</answer>"])  # in-process only
        assert values.tolist() == [1.0] and r.stats()["workers_started"] == 0
        values, _ = values_of(r, "math_accuracy", [r"\boxed{2}"], ["2"])
        assert values.tolist() == [1.0] and r.stats()["workers_started"] == 1


def test_gold_that_times_out_fails_every_completion_of_its_group(runner):
    slow_gold = "\\frac{" * 60 + "1" + "}{2}" * 60
    completions = [r"\boxed{1}", r"\boxed{2}", r"\boxed{3}", r"\boxed{1}"]
    started = time.monotonic()
    values, ev = values_of(runner, "math_accuracy", completions, [slow_gold] * 3 + ["1"])
    assert ev.failed[0].tolist() == [True, True, True, False]
    assert ev.timed_out[0].tolist() == [True, True, True, False]
    assert values[3] == 1.0
    # Parsed (and timed out) once per worker, not once per completion.
    assert time.monotonic() - started < 2 * (TIMEOUT + 0.5) + 3
