"""Every runnable code block of README.md and docs/*.md, run against a live server.

One test per block, named ``FILE:LINE`` (the line of the opening fence), so a
failure names the block.

Which blocks run
----------------
Blocks whose info string is ``python``, ``sh``, ``bash``, ``shell`` or ``js``
run; every other block (``json``, ``yaml``, ``go``, no language: output, data,
file formats) is text and is never run. A runnable block runs unless an HTML
comment right above its fence says otherwise. The comments render invisibly;
several may be stacked, one per line, each of the form
``<!-- doc-test: OPTION ARGUMENTS -->``:

``skip REASON``
    Not run; the reason is the pytest skip reason (say what it needs that CI
    lacks, or where else it is tested).
``requires COMMAND``
    Skipped when COMMAND is not on PATH.
``sub OLD => NEW``
    Replace the literal text OLD by NEW before running (e.g. fewer steps).
    Use it sparingly: the reader runs what the markdown shows.
``ports P1 P2 ...``
    Each listed port number is replaced by a free port (for blocks that start
    their own servers).
``server ARGS``
    Run against a server of its own, started with these extra flags (after the
    ``ports`` replacement), instead of the shared one.
``timeout SECONDS``
    Per-block limit (default 120, or ``DOC_TEST_TIMEOUT``).

How a block runs
----------------
* ``127.0.0.1:50051`` becomes the test server's target, so what the reader
  sees runs as is against a server on the default port; ``MAXENT_TARGET`` is
  set to it too (``maxentctl`` without ``--target``).
* Run ids of the docs' examples (``exp-1``, ``toy-1``, ``readme-1``, ``trl-1``,
  ``node-1``, ``accel-1``, ``team-a/run-1``, ...: a word from RUN_ID_WORDS,
  a dash and a number) get a suffix unique to the block, so blocks never see
  each other's runs.
* The working directory is a fresh temporary directory holding a symlink to
  every top-level entry of the repository (``.venv``, ``scripts``,
  ``examples``, ...): relative paths work, and files a block writes land in
  the temporary directory.
* ``.venv/bin`` is taken off PATH: a shell block that uses ``maxentctl``,
  ``buf`` or ``accelerate`` must activate the venv as the docs tell the reader.
* Python blocks run as a script with this interpreter (the venv's), shell
  blocks with ``bash -e -o pipefail``, JavaScript blocks with ``node``. Blocks
  in JavaScript or naming ``examples/node`` are skipped when node or
  examples/node's packages (``npm ci``, run by scripts/test.sh) are missing. Each runs in a process
  group of its own that is killed afterwards, so servers a block starts in the
  background go away with it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "sh": "sh", "bash": "sh", "shell": "sh", "js": "js"}
DEFAULT_TARGET = "127.0.0.1:50051"
RUN_ID_WORDS = ("exp", "toy", "readme", "trl", "node", "accel", "team-a/run")
RUN_ID_RE = re.compile(r"(?<![\w/.-])((?:%s)-\d+)(?![\d])" % "|".join(re.escape(w) for w in RUN_ID_WORDS))
FENCE_RE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)")
MARKER_RE = re.compile(r"^\s*<!--\s*doc-test:\s*(\w[\w-]*)\s*(.*?)\s*-->\s*$")
OPTIONS = {"skip", "requires", "sub", "ports", "server", "timeout"}
NODE_MODULES = ROOT / "examples" / "node" / "node_modules" / "@grpc" / "grpc-js"


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    options: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def option(self, name: str) -> list[str]:
        return [value for key, value in self.options if key == name]


def parse(path: Path) -> list[Block]:
    """Fenced blocks of a markdown file with the doc-test comments right above each."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE_RE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        options, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("<!--"):
            marker = MARKER_RE.match(lines[j])
            if marker:
                key, value = marker.groups()
                if key not in OPTIONS:
                    raise ValueError(f"{path}:{j + 1}: unknown doc-test option {key!r}")
                options.insert(0, (key, value))
            j -= 1
        body, k = [], i + 1
        while k < len(lines) and not lines[k].strip().startswith(fence):
            body.append(lines[k][len(indent):] if lines[k].startswith(indent) else lines[k].lstrip())
            k += 1
        blocks.append(Block(path, i + 1, lang.lower(), "\n".join(body) + "\n", options))
        i = k + 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in parse(path)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.lang in RUNNABLE]


def test_markers_only_on_runnable_blocks():
    """A doc-test comment above a block that never runs is a mistake (wrong language tag)."""
    stray = [b.name for b in ALL_BLOCKS if b.options and b.lang not in RUNNABLE]
    assert not stray, f"doc-test options on blocks that are not run: {stray}"


def farm(tmp_path: Path) -> Path:
    """A working directory that looks like the repository root but writes elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "__pycache__"}:
            (work / entry.name).symlink_to(entry)
    return work


def block_env(tmp_path: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and os.path.realpath(p) != os.path.realpath(venv_bin)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAXENT_") and k != "VIRTUAL_ENV"}
    env.update(PATH=os.pathsep.join(path), HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def prepare(block: Block, target: str, suffix: str, ports: dict[str, str]) -> str:
    code = block.code
    for spec in block.option("sub"):
        old, sep, new = spec.partition(" => ")
        assert sep, f"{block.name}: sub needs 'OLD => NEW', got {spec!r}"
        assert old in code, f"{block.name}: sub text {old!r} is not in the block"
        code = code.replace(old, new)
    for port, fresh in ports.items():
        code = re.sub(rf"(?<!\d){port}(?!\d)", fresh, code)
    code = code.replace(DEFAULT_TARGET, target)
    return RUN_ID_RE.sub(lambda m: f"{m.group(1)}-{suffix}", code)


def run_process(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, log: Path) -> tuple[int, str]:
    """Run in a new process group; output goes to a file, since background
    processes the block starts (servers) keep a pipe open after it exits."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                if sig == signal.SIGTERM:
                    time.sleep(1.0)
            proc.wait()
    text = log.read_text(errors="replace")
    if code is None:
        pytest.fail(f"timed out after {timeout}s:\n{text}")
    return code, text


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.name for b in RUN_BLOCKS])
def test_doc_block(block: Block, server, tmp_path):
    for reason in block.option("skip"):
        pytest.skip(reason or "marked skip")
    for command in block.option("requires"):
        if shutil.which(command) is None:
            pytest.skip(f"{command} is not installed")
    kind = RUNNABLE[block.lang]
    if kind == "js" or "examples/node" in block.code:
        if shutil.which("node") is None:
            pytest.skip("node is not installed")
        if not NODE_MODULES.is_dir():
            pytest.skip("examples/node's packages are not installed (cd examples/node && npm ci)")

    ports = {p: str(free_port()) for spec in block.option("ports") for p in spec.split()}
    own_server = None
    target = server.target
    for spec in block.option("server"):
        args = spec
        for port, fresh in ports.items():
            args = re.sub(rf"(?<!\d){port}(?!\d)", fresh, args)
        own_server = ServerProcess(tmp_path / "server-data", extra_args=args.split())
        own_server.start()
        target = own_server.target
    suffix = f"doc{RUN_BLOCKS.index(block)}"
    code = prepare(block, target, suffix, ports)

    work = farm(tmp_path)
    env = block_env(tmp_path)
    env["MAXENT_TARGET"] = target  # maxentctl's default target, 127.0.0.1:50051 for the reader
    # the script sits in the working directory: node resolves require('./...') from it
    script = work / {"python": "doc_block.py", "sh": "doc_block.sh", "js": "doc_block.js"}[kind]
    script.write_text(code)
    cmd = {"python": [sys.executable, str(script)],
           "sh": ["bash", "-e", "-o", "pipefail", str(script)],
           "js": [shutil.which("node") or "node", str(script)]}[kind]
    timeout = float((block.option("timeout") or [os.environ.get("DOC_TEST_TIMEOUT", "120")])[-1])
    try:
        code_, output = run_process(cmd, work, env, timeout, tmp_path / "output.log")
    finally:
        if own_server is not None:
            own_server.stop()
    assert code_ == 0, f"{block.name} exited with {code_}\n--- block as run ---\n{code}\n--- output ---\n{output}"
