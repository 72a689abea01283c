"""The Python client and maxentctl over mutual TLS with bearer tokens."""

from __future__ import annotations

import io

import pytest

from maxent_client import (
    AsyncMaxEntClient,
    MaxEntClient,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    WeightingConfig,
)
from maxent_client.cli import main as ctl
from ops_support import TlsServerProcess, channel_credentials, make_pki, write_tokens

WRITER = "writer-token-for-client-tests-0123"
READER = "reader-token-for-client-tests-0123"


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure")
    pki = make_pki(folder / "pki")
    tokens = write_tokens(folder / "tokens.json", [
        {"name": "writer", "token": WRITER, "role": "write", "runs": ["team/*"]},
        {"name": "reader", "token": READER, "role": "read", "runs": ["team/*"]},
    ])
    server = TlsServerProcess(
        folder / "data",
        extra_args=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                    "--tls-client-ca", str(pki.ca), "--auth-tokens", str(tokens)],
        credentials=channel_credentials(pki, client=True),
    ).start()
    yield server, pki
    server.stop()


def tls_client(server, pki, token: str | None, **kwargs) -> MaxEntClient:
    return MaxEntClient(server.target, token=token, root_certificates=pki.ca, private_key=pki.client_key,
                        certificate_chain=pki.client_cert, max_attempts=1, **kwargs)


def test_mutual_tls_with_token(secure_server):
    server, pki = secure_server
    with tls_client(server, pki, WRITER) as client:
        run = client.create_run("team/a", WeightingConfig(tau=0.5, beta=0.1))
        assert client.update_controller(run.run_id, global_step=1, measured_kl=0.1).state.version == 1


def test_async_client_over_tls(secure_server):
    import asyncio

    server, pki = secure_server

    async def main():
        async with AsyncMaxEntClient(server.target, token=READER, root_certificates=pki.ca,
                                     private_key=pki.client_key, certificate_chain=pki.client_cert) as client:
            return await client.compute_reward_statistics(utilities=[[1.0, 2.0]])

    assert asyncio.run(main()).q_values.sum() == pytest.approx(1.0)


def test_missing_token_and_wrong_role(secure_server):
    server, pki = secure_server
    with tls_client(server, pki, None) as client:
        with pytest.raises(UnauthenticatedError):
            client.get_run("team/a")
    with tls_client(server, pki, READER) as client:
        with pytest.raises(PermissionDeniedError):
            client.create_run("team/b", WeightingConfig(tau=1.0))


def test_client_without_certificate_is_refused(secure_server):
    server, pki = secure_server
    with MaxEntClient(server.target, token=WRITER, root_certificates=pki.ca, max_attempts=1, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.get_run("team/a")


def test_maxentctl_over_tls(secure_server):
    server, pki = secure_server
    out = io.StringIO()
    code = ctl(["--target", server.target, "--token", READER, "--tls-ca", str(pki.ca), "--tls-cert",
                str(pki.client_cert), "--tls-key", str(pki.client_key), "health"], out=out)
    assert code == 0 and out.getvalue().strip() == "SERVING"
