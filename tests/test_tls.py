"""TLS and mutual TLS with a CA and certificates made at run time: plaintext
clients and clients without a valid certificate are refused; the health
check command and the metrics endpoint speak TLS too."""

from __future__ import annotations

import ssl
import subprocess
import sys
from types import SimpleNamespace

import grpc
import pytest

from maxent_api._generated.maxent.v1 import maxent_pb2 as pb
from maxent_api._generated.maxent.v1 import maxent_pb2_grpc as pb_grpc
from ops_support import TlsServerProcess, channel_credentials, make_pki, metadata, scrape, write_tokens
from server_process import ServerProcess, free_port

CONFIG = pb.WeightingConfig(tau=0.5, beta=0.05)
TOKEN = "tls-admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _code(target: str, credentials: grpc.ChannelCredentials | None, token: str | None = None,
          options=None) -> grpc.StatusCode:
    channel = (grpc.secure_channel(target, credentials, options=options or []) if credentials is not None
               else grpc.insecure_channel(target))
    with channel:
        try:
            pb_grpc.MaxEntServiceStub(channel).ListRewardFunctions(
                pb.ListRewardFunctionsRequest(), timeout=30, metadata=metadata(token) if token else None)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


def _healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxent_server.healthcheck", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    tokens = write_tokens(folder / "tokens.json", [{"name": "ops", "token": TOKEN, "role": "admin", "runs": ["*"]}])
    metrics_port = free_port()
    proc = TlsServerProcess(folder / "data", credentials=channel_credentials(pki),
                            extra_args=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                                        "--auth-tokens", str(tokens), "--metrics-port", str(metrics_port)])
    proc.start()
    yield SimpleNamespace(proc=proc, metrics_url=f"https://127.0.0.1:{metrics_port}/metrics")
    proc.stop()


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtls")
    metrics_port = free_port()
    proc = TlsServerProcess(folder / "data", credentials=channel_credentials(pki, client=True),
                            extra_args=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                                        "--tls-client-ca", str(pki.ca), "--metrics-port", str(metrics_port)])
    proc.start()
    yield SimpleNamespace(proc=proc, metrics_url=f"https://127.0.0.1:{metrics_port}/metrics")
    proc.stop()


def test_tls_works_with_the_ca_and_a_token(pki, tls_server):
    target = tls_server.proc.target
    assert _code(target, channel_credentials(pki), TOKEN) == grpc.StatusCode.OK
    assert _code(target, channel_credentials(pki)) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.secure_channel(target, channel_credentials(pki)) as channel:
        stub = pb_grpc.MaxEntServiceStub(channel)
        run = stub.CreateRun(pb.CreateRunRequest(run_id="tls/r1", config=CONFIG), timeout=30,
                             metadata=metadata(TOKEN)).run
        assert run.state.tau == 0.5
    assert "(TLS, device" in tls_server.proc.log()


def test_plaintext_client_is_refused(tls_server):
    assert _code(tls_server.proc.target, None, TOKEN) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_is_refused(pki, tls_server):
    untrusting = channel_credentials(pki, root=pki.rogue_ca)
    assert _code(tls_server.proc.target, untrusting, TOKEN) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_certificate_from_the_client_ca(pki, mtls_server):
    target = mtls_server.proc.target
    assert _code(target, channel_credentials(pki, client=True)) == grpc.StatusCode.OK
    assert _code(target, channel_credentials(pki)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert _code(target, channel_credentials(pki, client=True, rogue=True)) == grpc.StatusCode.UNAVAILABLE
    assert _code(target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert "(mutual TLS, device" in mtls_server.proc.log()


def test_healthcheck_command(pki, tls_server, mtls_server, tmp_path):
    plain = ServerProcess(tmp_path / "plain").start()
    try:
        done = _healthcheck("--target", plain.target)
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
    finally:
        plain.stop()
    assert _healthcheck("--target", plain.target, "--timeout", "2").returncode == 1  # stopped
    done = _healthcheck("--target", tls_server.proc.target, "--tls-ca", str(pki.ca))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _healthcheck("--target", tls_server.proc.target, "--timeout", "5").returncode == 1  # plaintext
    done = _healthcheck("--target", f"localhost:{tls_server.proc.port}", "--tls-ca", str(pki.ca),
                        "--tls-server-name", "localhost")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _healthcheck("--target", mtls_server.proc.target, "--tls-ca", str(pki.ca), "--timeout", "5").returncode == 1
    done = _healthcheck("--target", mtls_server.proc.target, "--tls-ca", str(pki.ca),
                        "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_endpoint_uses_the_same_tls(pki, tls_server, mtls_server):
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    status, body = scrape(tls_server.metrics_url, context=trusting, token=TOKEN)  # tokens on: /metrics needs one
    assert status == 200 and "maxent_rpc_requests_total" in body
    assert scrape(tls_server.metrics_url, context=trusting)[0] == 401
    with pytest.raises(OSError):
        scrape(tls_server.metrics_url.replace("https://", "http://"), timeout=10)
    with pytest.raises(OSError):  # no client certificate
        scrape(mtls_server.metrics_url, context=trusting, timeout=10)
    with_cert = ssl.create_default_context(cafile=str(pki.ca))
    with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    status, body = scrape(mtls_server.metrics_url, context=with_cert)
    assert status == 200 and "maxent_rpc_requests_total" in body


@pytest.mark.parametrize(
    "which, complaint",
    [
        ("cert-only", "--tls-cert and --tls-key go together"),
        ("ca-only", "--tls-client-ca needs --tls-cert"),
        ("mismatched", "cannot load the certificate and key"),
        ("missing", "no such file"),
    ],
)
def test_bad_tls_settings_stop_the_start(pki, tmp_path, which, complaint):
    args = {
        "cert-only": ["--tls-cert", str(pki.server_cert)],
        "ca-only": ["--tls-client-ca", str(pki.ca)],
        "mismatched": ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
        "missing": ["--tls-cert", str(tmp_path / "none.crt"), "--tls-key", str(pki.server_key)],
    }[which]
    server = ServerProcess(tmp_path / "data", extra_args=args)
    with pytest.raises(RuntimeError, match="server exited with 2"):
        server.start()
    assert complaint in server.log()
    server.stop()
