"""Start and stop a real redis-server for tests: loopback only, a free port,
its own folder, append-only file with fsync on every write, so what Redis
acknowledged survives a kill -9 and a restart on the same port and folder."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = "redis-server is not installed (apt-get install -y redis-server)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """One redis-server on 127.0.0.1. `extra_args` are redis config directives
    as command-line flags (e.g. ["--requirepass", "secret"]). With `tls`
    (a dict of cert_file, key_file, ca_file, auth_clients) the port speaks TLS
    only."""

    def __init__(self, folder: Path, *, port: int | None = None, extra_args: list[str] | None = None,
                 tls: dict[str, str] | None = None, password: str | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError(SKIP_REASON)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.tls = tls
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.log_path = self.folder / "redis.log"

    def url(self, db: int = 0, **query: object) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}" + (f"?{tail}" if tail else "")

    def command(self) -> list[str]:
        cmd = [REDIS_SERVER, "--bind", "127.0.0.1", "--protected-mode", "yes", "--dir", str(self.folder),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
               "--databases", "16", "--loglevel", "notice"]
        if self.tls:
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert_file"],
                    "--tls-key-file", self.tls["key_file"], "--tls-ca-cert-file", self.tls["ca_file"],
                    "--tls-auth-clients", self.tls.get("auth_clients", "no")]
        else:
            cmd += ["--port", str(self.port)]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def start(self, timeout: float = 60.0) -> "RedisProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the server logs that it accepts connections (the port is
        open and the append-only file is loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
            if self._ready_marks() > getattr(self, "_seen_ready", 0):
                self._seen_ready = self._ready_marks()
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server not ready after {timeout}s:\n{self.log()}")

    def _ready_marks(self) -> int:
        return self.log().count("Ready to accept connections")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the port stays open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: only what is in the append-only file survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)
        self._close_log()

    def restart(self, timeout: float = 60.0) -> "RedisProcess":
        """Start again on the same port and folder (after kill or stop)."""
        self.kill()
        deadline = time.monotonic() + timeout
        while True:  # the old socket may linger for a moment
            try:
                return self.start(timeout)
            except RuntimeError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._close_log()

    def _close_log(self) -> None:
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


def make_tls_files(folder: Path) -> dict[str, str] | None:
    """A throwaway CA and a certificate for 127.0.0.1/localhost (used by the
    server, and by the client for mutual TLS), made with the openssl CLI; None
    without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "node.key", folder / "node.csr", folder / "node.crt"
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run([openssl, *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2", "-subj", "/CN=maxent test CA")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return {"cert_file": str(crt), "key_file": str(key), "ca_file": str(ca_crt)}
