"""``code_unit_tests``: run the completion's Python code against the gold answer's tests.

Off unless the server runs with ``--enable-code-execution``. The registry then
declares it as a builtin that runs in the reward worker processes (like a
plugin: one completion per call, under the per-completion time limit), through
the callable of the sandbox mode chosen at start (:data:`ENTRY_POINTS`). Every
test runs in a fresh sandboxed process (:mod:`.sandbox`).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from .params import ParamSpec
from .sandbox import (
    MODE_BWRAP,
    MODE_RLIMITS,
    SANDBOX_ERROR,
    Limits,
    RunResult,
    run_python,
)

CODE_UNIT_TESTS = "code_unit_tests"

#: The callable the worker loads for each sandbox mode.
ENTRY_POINTS = {
    MODE_BWRAP: f"{__name__}:code_unit_tests_bwrap",
    MODE_RLIMITS: f"{__name__}:code_unit_tests_rlimits",
}

MAX_TESTS = 100

DESCRIPTION = (
    "Fraction of the gold answer's tests that the completion's code passes (with binary=true: 1.0 when all pass, "
    "else 0.0). The code is the last fenced ```python (or ```py) block of the completion, else the whole completion. "
    "The gold answer is JSON, either {\"tests\": [{\"input\": STDIN, \"output\": EXPECTED_STDOUT}, ...]} (the code "
    "runs as a program with INPUT on stdin and passes when its stdout equals OUTPUT after trailing whitespace is "
    "stripped from every line and trailing empty lines are dropped) or {\"asserts\": [\"assert f(1) == 2\", ...]} "
    "(each assert runs after the code, as one script named __main__ with empty stdin, and passes when the script "
    "ends normally); any other text (or a JSON string) is one assert-style test block. "
    f"At most {MAX_TESTS} tests. Each test runs in a fresh sandboxed process: standard library only, empty "
    "environment, memory_mb of memory, timeout_seconds of wall-clock time; in the bwrap sandbox also no network and "
    "no host files but the system's read-only /usr (docs/rewards.md says what the weaker rlimits sandbox lacks). "
    "The completion FAILS (no value) when a test hits a sandbox limit (time, memory, output over 1 MiB, a file over "
    "16 MiB, more than 32 processes), when the sandbox cannot run, or when the gold answer is not a valid test set; "
    "a wrong answer, an exception or a non-zero exit fails only that test. Tests run one after another and must "
    "all fit in the server's per-completion reward time limit. Listed only when the server runs with "
    "--enable-code-execution."
)

PARAMETERS = (
    ParamSpec(
        name="binary",
        description="true: 1.0 only when every test passes, else 0.0; false: the fraction of tests passed.",
        type="bool",
        default="false",
    ),
    ParamSpec(
        name="timeout_seconds",
        description="Wall-clock limit of each test's process, seconds (its CPU-time limit is this rounded up).",
        type="float",
        default="2",
        minimum=0.1,
        maximum=30,
    ),
    ParamSpec(
        name="memory_mb",
        description="Address-space limit of each test's process, MiB.",
        type="int",
        default="256",
        minimum=64,
        maximum=4096,
    ),
)

_FENCED_PYTHON = re.compile(r"```(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ASSERT_DRIVER = """\
import sys


def _run_then_mark(folder):
    # The marker lives only in this frame (not in a module global the program could read).
    marker = sys.stdin.readline().strip()
    sys.stdin = open("/dev/null")
    with open(folder + "/program.py", encoding="utf-8") as f:
        program = f.read()
    with open(folder + "/test.py", encoding="utf-8") as f:
        test = f.read()
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(program + "\\n" + test, "<program>", "exec"), scope)
    sys.stdout.flush()
    sys.stdout.write("\\n" + marker + "\\n")
    sys.stdout.flush()


_run_then_mark(sys.argv[0].rsplit("/", 1)[0])
"""


class CodeExecutionFailure(RuntimeError):
    """The completion gets no value: a sandbox limit, a sandbox error or an invalid test set."""


@dataclass(frozen=True)
class IoTest:
    stdin: str
    expected: str


@dataclass(frozen=True)
class AssertTest:
    code: str


def extract_code(completion: str) -> str:
    """The last fenced python block of ``completion``, else all of it."""
    blocks = _FENCED_PYTHON.findall(completion)
    return blocks[-1] if blocks else completion


def parse_tests(answer: str) -> list[IoTest | AssertTest]:
    """The test set in a gold answer (see :data:`DESCRIPTION`); ValueError when invalid."""
    try:
        data: Any = json.loads(answer)
    except ValueError:
        data = answer
    if isinstance(data, str):
        if not data.strip():
            raise ValueError("the gold answer holds no test")
        return [AssertTest(data)]
    if not isinstance(data, dict) or len(data.keys() & {"tests", "asserts"}) != 1:
        raise ValueError('the gold answer must be JSON with one of "tests" or "asserts", or a plain assert block')
    tests: list[IoTest | AssertTest] = []
    if "tests" in data:
        entries = data["tests"]
        if not isinstance(entries, list):
            raise ValueError('"tests" must be a list')
        for k, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("input"), str)
                    and isinstance(entry.get("output"), str)):
                raise ValueError(f'"tests"[{k}] must be an object with text "input" and "output"')
            tests.append(IoTest(entry["input"], entry["output"]))
    else:
        entries = data["asserts"]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError('"asserts" must be a list of texts')
        tests.extend(AssertTest(code) for code in entries)
    if not tests:
        raise ValueError("the gold answer holds no test")
    if len(tests) > MAX_TESTS:
        raise ValueError(f"the gold answer holds {len(tests)} tests, more than {MAX_TESTS}")
    return tests


def normalize_output(text: str) -> list[str]:
    """Lines with trailing whitespace stripped, trailing empty lines dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def run_test(mode: str, code: str, test: IoTest | AssertTest, limits: Limits) -> tuple[bool, RunResult]:
    """(passed, how the run ended) of one test."""
    if isinstance(test, IoTest):
        result = run_python(mode, {"program.py": code}, "program.py", stdin=test.stdin.encode("utf-8"), limits=limits)
        stdout = result.stdout.decode("utf-8", "replace")
        return result.ok and normalize_output(stdout) == normalize_output(test.expected), result
    # The marker, unknown to the program, shows the script ran to its end
    # (an early os._exit(0) or sys.exit(0) does not pass).
    marker = secrets.token_hex(16)
    files = {"driver.py": _ASSERT_DRIVER, "program.py": code, "test.py": test.code}
    result = run_python(mode, files, "driver.py", stdin=(marker + "\n").encode(), limits=limits)
    lines = result.stdout.decode("utf-8", "replace").rstrip("\n").split("\n")
    return result.ok and lines[-1] == marker, result


def score(completion: str, answer: str, mode: str, *, binary: bool, timeout_seconds: float, memory_mb: int) -> float:
    """The reward of one completion; CodeExecutionFailure when it gets none."""
    try:
        tests = parse_tests(answer)
    except ValueError as error:
        raise CodeExecutionFailure(f"invalid test set: {error}") from None
    code = extract_code(completion)
    limits = Limits(wall_seconds=float(timeout_seconds), memory_mb=int(memory_mb))
    passed = 0
    for k, test in enumerate(tests):
        ok, result = run_test(mode, code, test, limits)
        if result.limit_hit or result.outcome == SANDBOX_ERROR:
            raise CodeExecutionFailure(f"test {k + 1} of {len(tests)}: {result.outcome}: {result.detail}")
        passed += ok
    if binary:
        return 1.0 if passed == len(tests) else 0.0
    return passed / len(tests)


def _reward(mode: str):
    def reward(completions: list[str], answers: list[str], *, binary: bool = False, timeout_seconds: float = 2.0,
               memory_mb: int = 256) -> list[float]:
        return [
            score(c, a, mode, binary=binary, timeout_seconds=timeout_seconds, memory_mb=memory_mb)
            for c, a in zip(completions, answers)
        ]

    reward.__name__ = reward.__qualname__ = f"code_unit_tests_{mode}"
    return reward


code_unit_tests_bwrap = _reward(MODE_BWRAP)
code_unit_tests_rlimits = _reward(MODE_RLIMITS)
