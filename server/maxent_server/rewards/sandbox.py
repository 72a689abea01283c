"""Run an untrusted Python program in a sandbox, with limits, and say how it ended.

Two modes (:func:`choose_mode` picks one when the server starts):

``bwrap`` (strong)
    bubblewrap with fresh user, PID, network, IPC, UTS, cgroup and mount
    namespaces. The filesystem holds only read-only ``/usr`` (with the
    ``/bin``, ``/lib*`` links or binds), the interpreter's prefix when it lies
    elsewhere, a read-only ``/input`` with the program, a fresh ``/proc`` and a
    minimal ``/dev``, and a size-limited tmpfs ``/tmp`` (the working
    directory, the only writable place). No host ``/etc``, no server files, no
    token file; no network but a downed loopback; empty environment; a new
    session (no terminal); killed with its parent; no further user namespaces.
``rlimits`` (weaker, opt-in)
    A plain child process: new session, empty environment, a private scratch
    directory as working directory, and a network namespace of its own where
    the kernel permits it. It sees the host filesystem as the sandbox user does:
    world-readable files (``/etc/passwd``, a world-readable token file) can be
    read and world-writable places (``/tmp``) written; no PID namespace.

In both modes, when the server runs as root, the program runs as an
unprivileged uid of its own (:func:`sandbox_uid`, one per worker process) with
these resource limits: CPU time, address space (memory), size of any file it
writes, open files and processes (RLIMIT_NPROC counts per uid, hence the uid
of its own). The parent kills it at the wall-clock limit and when its output
passes the output limit (reading stops there, so a flood never fills memory or
disk), and afterwards kills every process left with that uid. Under a
non-root server the process limit counts the server user's processes too.

The program runs with the interpreter's ``-I -S`` (no site-packages, no
environment, no user directories): the standard library only, never the
server's packages.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MODE_BWRAP = "bwrap"
MODE_RLIMITS = "rlimits"
MODE_AUTO = "auto"
MODES = (MODE_AUTO, MODE_BWRAP, MODE_RLIMITS)

# How a run ended. The LIMIT_OUTCOMES mean the sandbox stopped the program.
EXITED = "exited"  # ran to its end (any exit status)
CRASHED = "crashed"  # killed by a signal the sandbox did not send (SIGSEGV...)
WALL_TIME = "wall_time"
CPU_TIME = "cpu_time"
MEMORY = "memory"
OUTPUT = "output"
FILE_SIZE = "file_size"
PROCESSES = "processes"
SANDBOX_ERROR = "sandbox_error"  # the sandbox itself could not run the program
LIMIT_OUTCOMES = frozenset({WALL_TIME, CPU_TIME, MEMORY, OUTPUT, FILE_SIZE, PROCESSES})

#: Inside the sandbox: the program's files (read-only) and the writable scratch.
INPUT_DIR = "/input"
SCRATCH_DIR = "/tmp"

_READ_CHUNK = 65536
_STDERR_TAIL = 4096
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_REAP_SECONDS = 5.0
_SANDBOX_UID_BASE = 100_000


class SandboxUnavailable(RuntimeError):
    """The requested sandbox cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run."""

    wall_seconds: float = 2.0
    memory_mb: int = 256
    max_processes: int = 32
    max_output_bytes: int = 1 << 20  # stdout and stderr, each
    max_file_bytes: int = 16 << 20  # any one file written
    scratch_bytes: int = 32 << 20  # all of the tmpfs scratch (bwrap mode)
    max_open_files: int = 64


@dataclass(frozen=True)
class RunResult:
    outcome: str
    exit_code: int | None = None
    stdout: bytes = b""
    stderr_tail: str = ""
    detail: str = ""
    elapsed_seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def limit_hit(self) -> bool:
        return self.outcome in LIMIT_OUTCOMES

    @property
    def ok(self) -> bool:
        return self.outcome == EXITED and self.exit_code == 0


# ---------------------------------------------------------------------------
# choosing a mode


def _world_reachable(path: str) -> bool:
    """Whether any user can reach ``path``: every directory above it searchable
    by others and the file itself readable by them."""
    p = Path(path)
    try:
        if not p.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


def sandbox_python() -> str:
    """The interpreter that runs untrusted code: this one's base interpreter
    when others may read it, else the system ``python3``."""
    candidates = [getattr(sys, "_base_executable", "") or sys.executable, sys.executable,
                  shutil.which("python3") or "", "/usr/bin/python3"]
    for candidate in candidates:
        if candidate and _world_reachable(os.path.realpath(candidate)):
            return os.path.realpath(candidate)
    raise SandboxUnavailable("no Python interpreter that an unprivileged user can run "
                             f"(tried {', '.join(c for c in candidates if c)})")


def _python_prefix(python: str) -> str:
    """The install prefix of ``python`` (``/usr`` for ``/usr/bin/python3.11``)."""
    return str(Path(python).parent.parent)


def choose_mode(requested: str) -> str:
    """The sandbox mode to use for ``requested`` (auto, bwrap or rlimits),
    checked by running a probe program; raises SandboxUnavailable."""
    if requested not in MODES:
        raise SandboxUnavailable(f"unknown sandbox mode {requested!r} (choose from {', '.join(MODES)})")
    if requested in (MODE_AUTO, MODE_BWRAP):
        if shutil.which("bwrap") is None:
            raise SandboxUnavailable(
                "code execution needs bubblewrap (bwrap) on PATH: install it (apt-get install bubblewrap), or accept "
                "the weaker sandbox with --code-execution-sandbox rlimits"
            )
        probe(MODE_BWRAP)
        return MODE_BWRAP
    probe(MODE_RLIMITS)
    return MODE_RLIMITS


def probe(mode: str) -> None:
    """Run a trivial program in ``mode``; raise SandboxUnavailable unless it works."""
    result = run_python(mode, {"probe.py": "print(6 * 7)\n"}, "probe.py", limits=Limits(wall_seconds=10.0),
                        adopt_orphans=False)
    if not (result.ok and result.stdout.strip() == b"42"):
        why = result.detail or result.stderr_tail.strip().splitlines()[-1:] or [result.outcome]
        raise SandboxUnavailable(f"the {mode} sandbox does not run programs here: {''.join(why)}")


def describe_mode(mode: str) -> str:
    """One line for the start-up log."""
    if mode == MODE_BWRAP:
        return "bubblewrap (namespaces, no network, read-only system files, tmpfs scratch) + rlimits"
    network = "network cut" if network_isolated_without_bwrap() else "NETWORK OPEN (not root, or unshare not permitted)"
    return f"rlimits only (WEAKER: world-readable host files are visible and world-writable places writable; {network})"


# ---------------------------------------------------------------------------
# running one program


def sandbox_uid() -> int:
    """The uid sandboxed programs of this process run as (when the server is root)."""
    return _SANDBOX_UID_BASE + os.getpid() % 100_000


def run_python(
    mode: str,
    files: Mapping[str, str],
    script: str,
    *,
    stdin: bytes = b"",
    limits: Limits = Limits(),
    adopt_orphans: bool = True,
) -> RunResult:
    """Run ``python -I -S /input/<script>`` in the sandbox.

    ``files`` (name -> text) are placed read-only in ``/input``; ``stdin`` is
    the program's standard input. Never raises for anything the program does.
    One run at a time per process: runs share the process's sandbox uid.
    ``adopt_orphans`` (as root) makes this process the reaper of the program's
    orphans, for good; the server's own process probes without it.
    """
    started = time.monotonic()
    try:
        python = sandbox_python()
    except SandboxUnavailable as error:
        return RunResult(SANDBOX_ERROR, detail=str(error))
    as_root = os.geteuid() == 0
    uid = sandbox_uid() if as_root else os.getuid()
    if as_root and adopt_orphans:
        _become_subreaper()
    base = tempfile.gettempdir() if _world_reachable(tempfile.gettempdir()) else "/tmp"
    host_dir = Path(tempfile.mkdtemp(prefix="maxent-sandbox-", dir=base))
    owner = uid if as_root else None
    proc: subprocess.Popen | None = None
    try:
        # A worker's time-limit alarm may end the run while it waits (below),
        # never between starting the process and knowing it, nor mid-cleanup.
        with _alarm_deferred():
            input_dir, scratch, stdin_path = _prepare(host_dir, files, stdin, owner)
            if mode == MODE_BWRAP:
                cmd, cwd = _bwrap_command(python, input_dir, script, limits), "/"
            else:
                cmd, cwd = [python, "-I", "-S", str(input_dir / script)], str(scratch)
            with open(stdin_path, "rb") as stdin_file:
                try:
                    proc = subprocess.Popen(
                        cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=cwd,
                        close_fds=True, preexec_fn=_child_setup(mode, limits, owner),  # noqa: PLW1509 - a reward worker has no other threads
                    )
                except OSError as error:
                    return RunResult(SANDBOX_ERROR, detail=f"cannot start the sandbox: {error}")
        result = _collect(proc, started, limits)
    finally:
        with _alarm_deferred():
            if proc is not None:
                _kill_all(proc, owner)
            shutil.rmtree(host_dir, ignore_errors=True)
    if mode == MODE_BWRAP and result.outcome == EXITED and result.exit_code == 1 and \
            result.stderr_tail.startswith("bwrap:"):
        return RunResult(SANDBOX_ERROR, detail=result.stderr_tail.strip().splitlines()[0])
    return result


@contextlib.contextmanager
def _alarm_deferred() -> Iterator[None]:
    """SIGALRM waits (pending) until the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _prepare(host_dir: Path, files: Mapping[str, str], stdin: bytes, owner: int | None) -> tuple[Path, Path, Path]:
    """The host-side input directory, scratch directory and stdin file."""
    host_dir.chmod(0o711)  # the sandbox user passes through to input/ and scratch/
    input_dir = host_dir / "input"
    input_dir.mkdir(mode=0o755)
    input_dir.chmod(0o755)
    for name, text in files.items():
        path = input_dir / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)
    scratch = host_dir / "scratch"
    scratch.mkdir(mode=0o700)
    if owner is not None:
        os.chown(scratch, owner, owner)
    stdin_path = host_dir / "stdin"
    stdin_path.write_bytes(stdin)
    stdin_path.chmod(0o600)
    return input_dir, scratch, stdin_path


def _bind_system(args: list[str], python: str) -> None:
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = _python_prefix(python)
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]


def _bwrap_command(python: str, input_dir: Path, script: str, limits: Limits) -> list[str]:
    args = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox"]
    _bind_system(args, python)
    args += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(limits.scratch_bytes), "--tmpfs", SCRATCH_DIR,
             "--ro-bind", str(input_dir), INPUT_DIR, "--chdir", SCRATCH_DIR,
             "--setenv", "HOME", SCRATCH_DIR, "--setenv", "PYTHONIOENCODING", "utf-8",
             python, "-I", "-S", f"{INPUT_DIR}/{script}"]
    return args


def _child_setup(mode: str, limits: Limits, uid: int | None):
    """What the child does between fork and exec: limits, then the sandbox uid."""
    cpu = max(1, math.ceil(limits.wall_seconds))
    memory = limits.memory_mb * 1024 * 1024
    nproc = limits.max_processes if uid is not None else _own_task_count() + limits.max_processes
    libc = _libc()
    unshare = libc.unshare if mode == MODE_RLIMITS and uid is not None else None
    prctl = libc.prctl

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the parent's deferred alarm is not the program's
        os.setsid()
        if unshare is not None:
            unshare(_CLONE_NEWNET)  # where permitted: a failure leaves the host's network
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        # After the uid change, which clears it: die with the worker, even one
        # killed at its hard deadline before it could kill the program.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


def _libc() -> ctypes.CDLL:
    """The C library, loaded in the parent (loading it after fork could deadlock)."""
    return ctypes.CDLL(None, use_errno=True)


def network_isolated_without_bwrap() -> bool:
    """Whether the rlimits mode can cut the network here (root and unshare permitted)."""
    if os.geteuid() != 0:
        return False
    try:
        result = subprocess.run(["unshare", "--net", "true"], check=False, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _own_task_count() -> int:
    """Tasks (threads) of this user: RLIMIT_NPROC counts them all."""
    count = 0
    me = os.getuid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == me:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _collect(proc: subprocess.Popen, started: float, limits: Limits) -> RunResult:
    """Read the program's output (capped) until it ends or a limit stops it."""
    deadline = started + limits.wall_seconds
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err_tail = b""
    err_size = 0
    stopped_by = ""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        while selector.get_map() and not stopped_by:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped_by = WALL_TIME
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    out += chunk
                    if len(out) > limits.max_output_bytes:
                        stopped_by = OUTPUT
                else:
                    err_size += len(chunk)
                    err_tail = (err_tail + chunk)[-_STDERR_TAIL:]
                    if err_size > limits.max_output_bytes:
                        stopped_by = OUTPUT
    if not stopped_by:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped_by = WALL_TIME
    elapsed = time.monotonic() - started
    stderr_tail = err_tail.decode("utf-8", "replace")
    stdout = bytes(out[: limits.max_output_bytes])
    if stopped_by == WALL_TIME:
        return RunResult(WALL_TIME, None, stdout, stderr_tail,
                         f"wall-clock limit of {limits.wall_seconds:g} s exceeded", elapsed)
    if stopped_by == OUTPUT:
        return RunResult(OUTPUT, None, stdout, stderr_tail,
                         f"output limit of {limits.max_output_bytes} bytes exceeded", elapsed)
    return _classify(proc.returncode, stdout, stderr_tail, limits, elapsed)


def _signal_of(code: int) -> int | None:
    """The signal that ended the program: a negative return code, or bwrap's 128 + signal."""
    if code < 0:
        return -code
    if 128 < code < 128 + 65:
        return code - 128
    return None


_MEMORY_ERRORS = ("MemoryError",)
_FILE_SIZE_ERRORS = ("OSError: [Errno 27]",)
_PROCESS_ERRORS = ("BlockingIOError: [Errno 11]", "RuntimeError: can't start new thread")


def _classify(code: int, stdout: bytes, stderr_tail: str, limits: Limits, elapsed: float) -> RunResult:
    last_line = (stderr_tail.strip().splitlines() or [""])[-1]
    sig = _signal_of(code)
    cpu_limit = max(1, math.ceil(limits.wall_seconds))
    # The soft CPU limit sends SIGXCPU, the hard one (a second later) SIGKILL.
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and elapsed >= cpu_limit):
        detail = f"CPU-time limit of {cpu_limit} s exceeded"
        return RunResult(CPU_TIME, code, stdout, stderr_tail, detail, elapsed)
    # Python ignores SIGXFSZ: an oversized write raises EFBIG instead.
    if sig == signal.SIGXFSZ or (code != 0 and last_line.startswith(_FILE_SIZE_ERRORS)):
        return RunResult(FILE_SIZE, code, stdout, stderr_tail,
                         f"file-size limit of {limits.max_file_bytes} bytes exceeded", elapsed)
    if code != 0 and last_line.startswith(_MEMORY_ERRORS):
        return RunResult(MEMORY, code, stdout, stderr_tail, f"memory limit of {limits.memory_mb} MB exceeded", elapsed)
    # Forked copies write tracebacks into the same stderr and may be killed
    # mid-line, so the process-limit error can be anywhere in the tail.
    if code != 0 and any(marker in stderr_tail for marker in _PROCESS_ERRORS):
        return RunResult(PROCESSES, code, stdout, stderr_tail,
                         f"process limit of {limits.max_processes} exceeded", elapsed)
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return RunResult(CRASHED, code, stdout, stderr_tail, f"killed by {name}", elapsed)
    return RunResult(EXITED, code, stdout, stderr_tail, "" if code == 0 else f"exit status {code}", elapsed)


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the program, its process group and (as root) every process of the sandbox uid."""
    for action in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            action()
        except (ProcessLookupError, PermissionError):
            pass
    if uid is not None:
        _kill_uid(uid)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    if uid is not None:
        _reap_orphans(uid)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: a child that takes that uid and signals -1."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError as error:
                code = 0 if error.errno == errno.ESRCH else 1
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


_subreaper = False


def _become_subreaper() -> None:
    """Adopt the sandbox's orphans, so this process reaps them at once: left to
    the system's init they linger as zombies that still count against the
    sandbox uid's process limit."""
    global _subreaper
    if not _subreaper:
        _subreaper = _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _reap_orphans(uid: int) -> None:
    """Wait for this process's children that run as ``uid`` (adopted orphans), already killed."""
    deadline = time.monotonic() + _REAP_SECONDS
    me = os.getpid()
    while time.monotonic() < deadline:
        left = [pid for pid in _children_of(me) if _owner(pid) == uid]
        if not left:
            return
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.005)


def _children_of(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
