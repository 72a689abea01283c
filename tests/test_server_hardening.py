"""The server process against hostile or careless peers: idle HTTP/2
connections, half-sent /metrics requests, bearer tokens over plaintext, an
open /metrics, a world-readable token file and an expired certificate. Each
test drives a real server process."""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from ops_support import scrape, write_tokens
from server_process import ServerProcess, free_port

TOKEN = "hardening-admin-token-0123456789"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GOAWAY, PING, SETTINGS = 7, 6, 4


def _tokens(folder: Path, mode: int = 0o600) -> Path:
    path = write_tokens(folder / "tokens.json", [{"name": "ops", "token": TOKEN, "role": "admin", "runs": ["*"]}])
    path.chmod(mode)
    return path


def _thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _http2_goaway_and_close(port: int, within: float) -> tuple[bool, bool]:
    """Open an HTTP/2 connection that starts no call; (GOAWAY received,
    connection closed by the server) after at most `within` seconds."""
    goaway = False
    deadline = time.monotonic() + within
    with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
        sock.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
        pending = b""
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                return goaway, False
            if not chunk:
                return goaway, True
            pending += chunk
            while len(pending) >= 9 and len(pending) >= 9 + int.from_bytes(pending[:3], "big"):
                length, kind, flags = int.from_bytes(pending[:3], "big"), pending[3], pending[4]
                payload, pending = pending[9:9 + length], pending[9 + length:]
                goaway = goaway or kind == GOAWAY
                if kind == SETTINGS and not flags & 1:
                    sock.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # SETTINGS ack
                elif kind == PING and not flags & 1:
                    sock.sendall(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + payload)  # PING ack
    return goaway, False


# -- item 8: idle connections, streams per connection -------------------------------------


@pytest.fixture(scope="module")
def short_idle(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("idle") / "data",
                           extra_args=["--connection-idle-seconds", "1", "--reward-workers", "1"]).start()
    yield server
    server.stop()


def test_idle_connection_is_closed_after_the_idle_limit(short_idle):
    goaway, closed = _http2_goaway_and_close(short_idle.port, within=30)
    assert goaway and closed


def _server_settings_frame(port: int) -> dict[int, int]:
    """The HTTP/2 SETTINGS the server announces: {identifier: value}."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
        pending = b""
        while True:
            chunk = sock.recv(65536)
            assert chunk, "closed before SETTINGS"
            pending += chunk
            while len(pending) >= 9 and len(pending) >= 9 + int.from_bytes(pending[:3], "big"):
                length, kind, flags = int.from_bytes(pending[:3], "big"), pending[3], pending[4]
                payload, pending = pending[9:9 + length], pending[9 + length:]
                if kind == SETTINGS and not flags & 1:
                    return {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                            for i in range(0, len(payload), 6)}


def test_streams_per_connection_are_limited(short_idle):
    max_concurrent_streams = 0x3
    assert _server_settings_frame(short_idle.port).get(max_concurrent_streams) == 100


def test_an_open_watch_stream_is_not_idle(short_idle):
    """A WatchRun stream that carries nothing for longer than the idle limit
    keeps its connection and still delivers the next update."""
    with grpc.insecure_channel(short_idle.target) as channel, grpc.insecure_channel(short_idle.target) as other:
        stub = pb_grpc.MaxEntServiceStub(channel)
        stub.CreateRun(pb.CreateRunRequest(run_id="idle/watch", config=pb.WeightingConfig(tau=0.5, beta=0.1)),
                       timeout=30)
        stream = stub.WatchRun(pb.WatchRunRequest(run_id="idle/watch"), timeout=60)
        first = next(stream)
        time.sleep(3)  # three idle limits without a message on the stream
        pb_grpc.MaxEntServiceStub(other).UpdateController(
            pb.UpdateControllerRequest(run_id="idle/watch", global_step=1, measured_kl=0.01, request_id="w1"),
            timeout=30)
        after = next(stream)
        stream.cancel()
    assert after.state.version == first.state.version + 1


def test_watch_resumes_across_connection_aging(tmp_path):
    """With a short connection age the server sends GOAWAY and, after the
    grace, cuts the WatchRun stream; the client reconnects and resumes, and
    every version arrives once and in order."""
    from maxent_client import MaxEntClient, WeightingConfig

    server = ServerProcess(tmp_path / "data", extra_args=["--connection-max-age-seconds", "1",
                                                          "--connection-age-grace-seconds", "1",
                                                          "--reward-workers", "1"]).start()
    try:
        with MaxEntClient(server.target, timeout=30) as watcher, MaxEntClient(server.target, timeout=30) as writer:
            writer.create_run("aged/watch", WeightingConfig(tau=0.5, beta=0.1))
            versions = []

            def update_slowly():
                for step in range(1, 7):
                    time.sleep(0.8)
                    writer.update_controller("aged/watch", global_step=step, measured_kl=0.01,
                                             request_id=f"aged:{step}")

            updater = threading.Thread(target=update_slowly)
            updater.start()
            for state in watcher.watch_run("aged/watch", timeout=60, reconnect_seconds=30):
                versions.append(state.version)
                if state.version == 6:
                    break
            updater.join()
    finally:
        server.stop()
    assert versions == list(range(7))


# -- item 8: slow /metrics clients ----------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory):
    port = free_port()
    server = ServerProcess(tmp_path_factory.mktemp("slow") / "data",
                           extra_args=["--metrics-port", str(port), "--metrics-read-timeout-seconds", "2",
                                       "--reward-workers", "1"]).start()
    server.metrics_url = f"http://127.0.0.1:{port}/metrics"
    server.metrics_port = port
    yield server
    server.stop()


def test_half_sent_metrics_requests_hold_no_threads(metrics_server):
    assert scrape(metrics_server.metrics_url)[0] == 200
    threads_before = _thread_count(metrics_server.proc.pid)
    stalled = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", metrics_server.metrics_port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the head
            stalled.append(sock)
        status, body = scrape(metrics_server.metrics_url, timeout=30)
        threads_during = _thread_count(metrics_server.proc.pid)
    finally:
        for sock in stalled:
            sock.close()
    assert status == 200 and "maxent_rpc_requests_total" in body
    assert threads_during <= threads_before + 2, (threads_before, threads_during)


def test_a_stalled_metrics_request_is_dropped_after_the_read_timeout(metrics_server):
    with socket.create_connection(("127.0.0.1", metrics_server.metrics_port), timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert sock.recv(1024) == b""  # closed by the server, with no answer


def test_metrics_keep_alive_and_head(metrics_server):
    with socket.create_connection(("127.0.0.1", metrics_server.metrics_port), timeout=30) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):  # two requests on one connection
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
            status = reader.readline()
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            body = reader.read(int(headers["content-length"]))
            assert status.startswith(b"HTTP/1.1 200") and headers["content-encoding"] == "gzip"
            assert __import__("gzip").decompress(body).startswith(b"# HELP")
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reader.readline().startswith(b"HTTP/1.1 405")


# -- item 7: tokens over plaintext, an open /metrics ------------------------------------------


@pytest.mark.parametrize("where", [["--host", "0.0.0.0"], ["--metrics-host", "0.0.0.0", "--metrics-port", "9"]])
def test_tokens_over_plaintext_off_loopback_are_refused(tmp_path, where):
    server = ServerProcess(tmp_path / "data", extra_args=["--auth-tokens", str(_tokens(tmp_path)), *where])
    with pytest.raises(RuntimeError, match="server exited with 2"):
        server.start()
    server.stop()
    refusals = [line for line in server.log().splitlines() if "cannot start" in line]
    assert len(refusals) == 1 and "--allow-plaintext-tokens" in refusals[0] and "cleartext" in refusals[0]


@pytest.fixture(scope="module")
def with_tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    port = free_port()
    server = ServerProcess(folder / "data", extra_args=["--auth-tokens", str(_tokens(folder, 0o644)),
                                                        "--metrics-port", str(port), "--reward-workers", "1"]).start()
    server.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield server
    server.stop()


def test_metrics_need_a_token_when_tokens_are_on(with_tokens):
    with grpc.insecure_channel(with_tokens.target) as channel:
        pb_grpc.MaxEntServiceStub(channel).CreateRun(
            pb.CreateRunRequest(run_id="secret/run", config=pb.WeightingConfig(tau=0.5, beta=0.1)), timeout=30,
            metadata=(("authorization", f"Bearer {TOKEN}"),))
    status, body = scrape(with_tokens.metrics_url)
    assert status == 401 and "secret/run" not in body
    status, body = scrape(with_tokens.metrics_url, token=TOKEN)
    assert status == 200 and 'run="secret/run"' in body


def test_metrics_without_token_is_an_explicit_choice(tmp_path):
    port = free_port()
    server = ServerProcess(tmp_path / "data", extra_args=["--auth-tokens", str(_tokens(tmp_path)),
                                                          "--metrics-port", str(port), "--metrics-without-token",
                                                          "--reward-workers", "1"]).start()
    try:
        assert scrape(f"http://127.0.0.1:{port}/metrics")[0] == 200
        assert "no token needed" in server.log()
    finally:
        server.stop()


# -- item 11: a world-readable token file, an expired certificate ------------------------------


def test_world_readable_token_file_with_plaintext_tokens_is_a_warning(with_tokens, tmp_path):
    warnings = [line for line in with_tokens.log().splitlines() if "readable by every user" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    private = ServerProcess(tmp_path / "data", extra_args=["--auth-tokens", str(_tokens(tmp_path, 0o600)),
                                                           "--reward-workers", "1"]).start()
    private.stop()
    assert "readable by every user" not in private.log()


def _expired_certificate(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "expired.crt", folder / "expired.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _StartedProcess(ServerProcess):
    """Ready when the log says it listens: no client can trust its certificate."""

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while "maxent-server listening on" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)


def test_expired_certificate_is_a_warning(tmp_path):
    cert, key = _expired_certificate(tmp_path)
    server = _StartedProcess(tmp_path / "data", extra_args=["--tls-cert", str(cert), "--tls-key", str(key),
                                                            "--reward-workers", "1"]).start()
    server.stop()
    warnings = [line for line in server.log().splitlines() if "expired on" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and str(cert) in warnings[0]
