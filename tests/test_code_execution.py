"""code_unit_tests and its sandbox: real programs (correct, wrong, crashing,
hanging, hostile) in real sandboxed processes, directly and through a real
server started with and without --enable-code-execution."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maxent_client import RewardFailurePolicy, InvalidArgumentError, MaxEntClient, RewardTerm
from maxent_server.rewards import code, sandbox
from maxent_server.rewards.sandbox import Limits, run_python
from server_process import ServerProcess, free_port

HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap (bwrap) is not installed; scripts/test.sh installs it")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the per-sandbox uid needs root")
MODES = [pytest.param(sandbox.MODE_BWRAP, marks=needs_bwrap), sandbox.MODE_RLIMITS]
LIMITS = Limits(wall_seconds=1.5, memory_mb=256, max_processes=32)

HANG = "while True:\n    pass\n"
FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"
STUBBORN_FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
ALLOCATE_10_GB = "block = bytearray(10 * 1024 ** 3)\nprint(len(block))\n"
PRINT_1_GB = "import sys\nline = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(line)\n"


def run(mode: str, program: str, stdin: str = "", limits: Limits = LIMITS) -> sandbox.RunResult:
    return run_python(mode, {"program.py": program}, "program.py", stdin=stdin.encode(), limits=limits)


def blocked(action: str) -> str:
    """A program that prints 'blocked' when ``action`` raises OSError, else what it got."""
    return f"try:\n    got = {action}\nexcept OSError:\n    print('blocked')\nelse:\n    print('GOT', repr(got)[:200])\n"


def live_processes(uid: int) -> list[str]:
    """Names of the processes of ``uid`` that are not zombies (the container's
    init reaps those left to it in its own time)."""
    names = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            owner = os.stat(f"/proc/{entry}").st_uid
            with open(f"/proc/{entry}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue
        if owner == uid and tail.split()[0] != "Z":
            names.append(head.split("(", 1)[1])
    return names


def live_sandbox_processes() -> list[str]:
    return live_processes(sandbox.sandbox_uid())


# ---------------------------------------------------------------------------
# the sandbox on real programs, both modes


@pytest.mark.parametrize("mode", MODES)
def test_correct_and_crashing_programs(mode):
    ok = run(mode, "print(sum(map(int, input().split())))", "2 3\n")
    assert ok.ok and ok.stdout == b"5\n"
    crash = run(mode, "raise ValueError('boom')")
    assert crash.outcome == sandbox.EXITED and crash.exit_code == 1 and "ValueError: boom" in crash.stderr_tail
    assert not crash.limit_hit


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_is_stopped_at_the_wall_clock_limit(mode):
    started = time.monotonic()
    result = run(mode, HANG)
    assert result.outcome == sandbox.WALL_TIME and result.limit_hit
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("mode", MODES)
def test_allocating_10_gb_hits_the_memory_limit(mode):
    result = run(mode, ALLOCATE_10_GB)
    assert result.outcome == sandbox.MEMORY and result.limit_hit and b"10737418240" not in result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_printing_1_gb_is_cut_at_the_output_limit(mode):
    started = time.monotonic()
    result = run(mode, PRINT_1_GB)
    assert result.outcome == sandbox.OUTPUT and result.limit_hit
    assert len(result.stdout) <= LIMITS.max_output_bytes
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("mode", MODES)
def test_writing_a_huge_file_hits_the_file_size_limit(mode):
    result = run(mode, "with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n")
    assert result.outcome == sandbox.FILE_SIZE and result.limit_hit


@needs_root
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bomb", [FORK_BOMB, STUBBORN_FORK_BOMB], ids=["crashing", "stubborn"])
def test_fork_bomb_is_stopped_and_leaves_no_process(mode, bomb):
    started = time.monotonic()
    result = run(mode, bomb)
    assert result.outcome in (sandbox.PROCESSES, sandbox.WALL_TIME), result
    assert time.monotonic() - started < 15
    assert live_sandbox_processes() == []
    assert run(mode, "print('fine')").stdout == b"fine\n"


@pytest.mark.parametrize("mode", MODES)
def test_nothing_of_the_server_environment_is_visible(mode, monkeypatch):
    monkeypatch.setenv("MAXENT_SECRET_PROBE", "s3cr3t-value")
    result = run(mode, "import os, sys\nprint(dict(os.environ))\nprint(sys.path)\n" + blocked("__import__('maxent_server')").replace("OSError", "ImportError"))
    assert result.ok
    text = result.stdout.decode()
    assert "s3cr3t-value" not in text and "/work" not in text and ".venv" not in text
    assert text.rstrip().endswith("blocked")


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_files_of_the_server_user_are_out_of_reach(mode, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o600)
    target = tmp_path / "pwned"
    for action in (f"open({str(secret)!r}).read()", f"open({str(target)!r}, 'w').write('x')",
                   "open('/root/.bashrc').read()"):
        result = run(mode, blocked(action))
        assert result.stdout == b"blocked\n", (action, result)
    assert not target.exists()


@needs_bwrap
def test_bwrap_hides_host_files_even_world_readable_ones():
    result = run(sandbox.MODE_BWRAP, blocked("open('/etc/passwd').read()"))
    assert result.stdout == b"blocked\n"
    shared = Path(tempfile.mkdtemp(prefix="maxent-open-"))
    try:
        shared.chmod(0o777)
        (shared / "readable.txt").write_text("world readable")
        (shared / "readable.txt").chmod(0o666)
        for action in (f"open({str(shared / 'readable.txt')!r}).read()",
                       f"open({str(shared / 'new.txt')!r}, 'w').write('x')",
                       f"open({str(Path(__file__).resolve())!r}).read()"):
            assert run(sandbox.MODE_BWRAP, blocked(action)).stdout == b"blocked\n", action
        assert not (shared / "new.txt").exists()
        assert (shared / "readable.txt").read_text() == "world readable"
    finally:
        shutil.rmtree(shared)
    # Its own scratch directory is writable.
    scratch = run(sandbox.MODE_BWRAP, "open('note', 'w').write('hi')\nprint(open('note').read())")
    assert scratch.stdout == b"hi\n"


@pytest.mark.parametrize("mode", MODES)
def test_no_network(mode):
    if mode == sandbox.MODE_RLIMITS and not sandbox.network_isolated_without_bwrap():
        pytest.skip("the rlimits mode cuts the network only where unshare is permitted")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        result = run(mode, blocked(f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=1)"))
        assert result.stdout == b"blocked\n"
        with pytest.raises(socket.timeout):
            listener.accept()


# ---------------------------------------------------------------------------
# the reward on real programs (strong sandbox)

ADD_TESTS = json.dumps({"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"},
                                  {"input": "-1 1\n", "output": "0\n"}]})
ADD_ASSERTS = json.dumps({"asserts": ["assert add(1, 2) == 3", "assert add(5, 5) == 10", "assert add(0, 0) == 1"]})
ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)   \n\n"
ADD_FUNCTION = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"


def score(completion: str, answer: str, **params) -> float:
    params = {"binary": False, "timeout_seconds": 1.5, "memory_mb": 256, **params}
    return code.score(completion, answer, sandbox.MODE_BWRAP if HAVE_BWRAP else sandbox.MODE_RLIMITS, **params)


def test_extract_code_takes_the_last_python_block_else_everything():
    text = "```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n```\nprint(3)\n```"
    assert code.extract_code(text) == "print(2)\n"
    assert code.extract_code("print(4)") == "print(4)"


def test_parse_tests_formats_and_errors():
    assert code.parse_tests(ADD_TESTS)[1] == code.IoTest("5 5\n", "10")
    assert code.parse_tests(ADD_ASSERTS)[0] == code.AssertTest("assert add(1, 2) == 3")
    assert code.parse_tests("assert f() == 1") == [code.AssertTest("assert f() == 1")]
    assert code.parse_tests('"assert g()"') == [code.AssertTest("assert g()")]
    for bad in ('{"tests": []}', '{"tests": [{"input": 1, "output": "2"}]}', '{"asserts": "x"}', "  ", "[1, 2]",
                '{"tests": [], "asserts": []}', json.dumps({"asserts": ["assert 1"] * (code.MAX_TESTS + 1)})):
        with pytest.raises(ValueError):
            code.parse_tests(bad)


def test_stdin_stdout_tests_score_the_fraction_passed():
    assert score(ADD_PROGRAM, ADD_TESTS) == 1.0
    assert score("a, b = map(int, input().split())\nprint(a + b if a > 0 else 7)", ADD_TESTS) == pytest.approx(2 / 3)
    assert score("print(3)", ADD_TESTS) == pytest.approx(1 / 3)
    assert score("print(3)", ADD_TESTS, binary=True) == 0.0
    assert score("raise SystemExit(3)", ADD_TESTS) == 0.0
    assert score("def broken(:\n", ADD_TESTS) == 0.0


def test_assert_tests_score_the_fraction_passed():
    assert score(ADD_FUNCTION, ADD_ASSERTS) == pytest.approx(2 / 3)
    assert score(ADD_FUNCTION, ADD_ASSERTS, binary=True) == 0.0
    assert score(ADD_FUNCTION, "assert add(2, 2) == 4\nassert add(-1, 1) == 0") == 1.0
    assert score("def add(a, b):\n    return a - b", ADD_ASSERTS) == 0.0
    assert score("raise RuntimeError('crash')\ndef add(a, b):\n    return a + b", ADD_ASSERTS) == 0.0


def test_exiting_early_does_not_pass_asserts():
    module_marker = "import os, sys\nprint(vars(sys.modules['__main__']).get('_marker', ''))\nos._exit(0)"
    for early_exit in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit", module_marker):
        assert score(early_exit, ADD_ASSERTS) == 0.0, early_exit


@pytest.mark.parametrize("program", [HANG, ALLOCATE_10_GB, PRINT_1_GB, FORK_BOMB],
                         ids=["hang", "allocate_10_gb", "print_1_gb", "fork_bomb"])
def test_a_limit_fails_the_completion_instead_of_scoring_zero(program):
    with pytest.raises(code.CodeExecutionFailure, match="test 1 of 3"):
        score(program, ADD_TESTS)


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_the_worker_time_limit_stops_a_run_in_progress(mode):
    """The reward worker's per-completion limit (SIGALRM) fires in the middle of
    a test: the sandboxed program is killed with it, nothing is left behind."""
    import signal

    from maxent_server.rewards import _worker

    state = _worker.WorkerState([(code.CODE_UNIT_TESTS, code.ENTRY_POINTS[mode])])
    previous = signal.signal(signal.SIGALRM, _worker._on_alarm)
    sleepy = "import time\ntime.sleep(0.6)\nprint(3)"
    params = (("binary", False), ("memory_mb", 256), ("timeout_seconds", 5.0))
    started = time.monotonic()
    try:
        item = (_worker.ITEM_PLUGIN, code.CODE_UNIT_TESTS, sleepy, json.dumps({"tests": [{"input": "", "output": "3"}] * 5}),
                params)
        status, value, _ = _worker.run_with_limit(state, item, 1.0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert status == "timeout" and value is None
    assert time.monotonic() - started < 15
    assert live_sandbox_processes() == []


SLEEPER_RUNNER = """
import sys
from maxent_server.rewards import sandbox
sandbox.run_python(sys.argv[1], {"p.py": "import time\\ntime.sleep(60)"}, "p.py", limits=sandbox.Limits(wall_seconds=50))
"""


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_the_program_dies_with_a_killed_worker(mode):
    """A worker killed outright (the pool's hard deadline) takes its sandboxed program with it."""
    runner = subprocess.Popen([sys.executable, "-c", SLEEPER_RUNNER, mode])
    uid = sandbox._SANDBOX_UID_BASE + runner.pid % 100_000

    def programs() -> list[str]:
        return live_processes(uid)

    try:
        deadline = time.monotonic() + 30
        while not any("python" in line for line in programs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("python" in line for line in programs())
    finally:
        runner.kill()
        runner.wait()
    deadline = time.monotonic() + 10
    while programs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert programs() == []


def test_an_invalid_test_set_fails_the_completion():
    with pytest.raises(code.CodeExecutionFailure, match="invalid test set"):
        score(ADD_PROGRAM, '{"tests": "nope"}')


# ---------------------------------------------------------------------------
# through a real server


@pytest.fixture(scope="module")
def token_file():
    """A token file others may read: only the sandbox's namespaces keep it from a program."""
    folder = Path(tempfile.mkdtemp(prefix="maxent-tokens-"))
    folder.chmod(0o755)
    path = folder / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "admin", "token": "tok-" + "z" * 40, "role": "admin",
                                            "runs": ["*"]}]}))
    path.chmod(0o644)
    yield path
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def code_server(tmp_path_factory, token_file):
    if not HAVE_BWRAP:
        pytest.skip("bubblewrap (bwrap) is not installed; scripts/test.sh installs it")
    proc = ServerProcess(tmp_path_factory.mktemp("code-server") / "data",
                         extra_args=["--enable-code-execution", "--reward-workers", "2",
                                     "--reward-timeout-seconds", "30", "--auth-tokens", str(token_file)],
                         env={"MAXENT_SECRET_PROBE": "s3cr3t-value"})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def code_client(code_server):
    with MaxEntClient(code_server.target, timeout=120, token="tok-" + "z" * 40) as c:
        yield c


def test_server_with_the_flag_lists_and_logs_it(code_server, code_client):
    functions = {f.name: f for f in code_client.list_reward_functions()}
    info = functions["code_unit_tests"]
    assert info.source == "builtin" and '"asserts"' in info.description
    assert {p["name"] for p in info.parameters} == {"binary", "timeout_seconds", "memory_mb"}
    assert "code execution ON" in code_server.log() and "bwrap sandbox" in code_server.log()


def test_server_scores_real_programs_and_survives_attacks(code_server, code_client, token_file):
    token_reader = f"print(open({str(token_file)!r}).read())"
    environment_reader = "import os\nprint(os.environ.get('MAXENT_SECRET_PROBE', 'absent'))"
    io_group = [ADD_PROGRAM, "print(3)", "raise ValueError", token_reader, environment_reader]
    io_answer = json.dumps({"tests": [{"input": "1 2\n", "output": "3\n"},
                                      {"input": "", "output": token_file.read_text()},
                                      {"input": "", "output": "s3cr3t-value"}]})
    attacks = [HANG, ALLOCATE_10_GB, PRINT_1_GB, FORK_BOMB, STUBBORN_FORK_BOMB]
    stats = code_client.compute_reward_statistics(
        completions=[io_group, [ADD_FUNCTION, *attacks]], answers=[io_answer, ADD_ASSERTS],
        rewards=[RewardTerm("code_unit_tests", 1.0, {"timeout_seconds": "1.5", "memory_mb": "256"})],
    )
    values = stats.per_reward["code_unit_tests"]
    np.testing.assert_allclose(values.values[:5], [1 / 3, 1 / 3, 0.0, 0.0, 0.0])
    assert values.values[5] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(stats.failed, [False] * 6 + [True] * 5)
    assert values.failure_count == 5 and np.isnan(values.values[6:]).all()
    # The server is healthy and answers the next call.
    with code_server.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    again = code_client.compute_reward_statistics(
        completions=[[ADD_PROGRAM, "print(42)"]], answers=[ADD_TESTS], rewards=[RewardTerm("code_unit_tests", 1.0)])
    np.testing.assert_allclose(again.per_reward["code_unit_tests"].values, [1.0, 0.0])
    plain = code_client.compute_reward_statistics(completions=[["<think>a</think><answer>b</answer>", "x"]],
                                                  rewards=[RewardTerm("format", 1.0)])
    np.testing.assert_allclose(plain.total_utils, [1.0, 0.0])


def test_zero_policy_still_says_which_completions_failed(code_client):
    stats = code_client.compute_reward_statistics(
        completions=[[ADD_PROGRAM, HANG]], answers=[ADD_TESTS], on_failure=RewardFailurePolicy.ZERO,
        rewards=[RewardTerm("code_unit_tests", 1.0, {"timeout_seconds": "0.5"})])
    np.testing.assert_array_equal(stats.failed, [False, True])
    np.testing.assert_allclose(stats.total_utils, [1.0, 0.0])


def test_bad_params_are_invalid_arguments(code_client):
    for params, field in (({"timeout_seconds": "600"}, 'rewards[0].params["timeout_seconds"]'),
                          ({"memory_mb": "1"}, 'rewards[0].params["memory_mb"]'),
                          ({"binary": "maybe"}, 'rewards[0].params["binary"]')):
        with pytest.raises(InvalidArgumentError) as info:
            code_client.compute_reward_statistics(completions=[["print(1)"]], answers=["assert True"],
                                                  rewards=[RewardTerm("code_unit_tests", 1.0, params)])
        assert [v.field for v in info.value.violations] == [field]
    with pytest.raises(InvalidArgumentError) as info:
        code_client.compute_reward_statistics(completions=[["print(1)"]], rewards=[RewardTerm("code_unit_tests", 1.0)])
    assert [v.field for v in info.value.violations] == ["answers"]


def test_server_without_the_flag_refuses_code_unit_tests(client):
    assert "code_unit_tests" not in {f.name for f in client.list_reward_functions()}
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_reward_statistics(completions=[["print(1)", "print(2)"]], answers=["assert True"],
                                         rewards=[RewardTerm("format", 1.0), RewardTerm("code_unit_tests", 1.0)])
    [violation] = info.value.violations
    assert violation.field == "rewards[1].name" and "--enable-code-execution" in violation.description


def start_and_wait(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "maxent_server", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
           "--device", "cpu", "--metrics-port", "0", "--reward-workers", "1", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_without_bwrap_the_server_refuses_to_start(tmp_path):
    result = start_and_wait(tmp_path, "--enable-code-execution", env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(errors) == 1 and "bubblewrap" in errors[0] and "--code-execution-sandbox rlimits" in errors[0]


def test_the_weaker_sandbox_needs_to_be_asked_for_and_says_so(tmp_path):
    proc = ServerProcess(tmp_path / "data", extra_args=["--enable-code-execution", "--code-execution-sandbox",
                                                        "rlimits", "--reward-workers", "1"],
                         env={"PATH": str(tmp_path)})
    proc.start()
    try:
        assert "rlimits only (WEAKER" in proc.log()
        with MaxEntClient(proc.target, timeout=60) as c:
            stats = c.compute_reward_statistics(completions=[[ADD_PROGRAM, "print(3)", HANG]], answers=[ADD_TESTS],
                                                rewards=[RewardTerm("code_unit_tests", 1.0, {"timeout_seconds": "1"})])
        np.testing.assert_allclose(stats.per_reward["code_unit_tests"].values[:2], [1.0, 1 / 3])
        np.testing.assert_array_equal(stats.failed, [False, False, True])
    finally:
        proc.stop()

